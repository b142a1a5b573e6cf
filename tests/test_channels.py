"""Many session channels on one SSH connection, as OpenSSH's connection sharing makes them.

A ``ControlMaster`` holds the one connection (and so the one msb-proxy process); every
``ssh -o ControlMaster=no`` client then opens a new session channel on it. sshd serves any number
of such channels side by side, and closing one leaves its siblings alone; so must we.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Env, Run

CLIENTS = 32
WAIT_S = 60  # the machine is shared: bounds every wait generously


@dataclass
class Master:
    """A running ``ControlMaster`` for one sandbox."""

    msb: Env
    host: str
    pid: int
    proxy: int  # the msb-proxy process that carries the master's connection

    def client(self, command: str) -> list[str]:
        return ["ssh", "-F", str(self.msb.config), "-o", "ControlMaster=no", self.host, command]

    def run(self, command: str, timeout: float = WAIT_S) -> Run:
        return self.msb.run(self.client(command), timeout=timeout)


@pytest.fixture
def master(msb: Env, fresh_sandbox: str) -> Iterator[Master]:
    """A ControlMaster connection to a sandbox of the test's own; exited afterwards."""
    host = msb.host(fresh_sandbox)
    base = ["ssh", "-F", str(msb.config)]
    # Not "-M" as well: "-M" on top of ControlMaster=yes means "ask", and under BatchMode the
    # master then refuses every session (the clients quietly fall back to their own connection).
    started = msb.run([*base, "-o", "ControlMaster=yes", "-o", "ControlPersist=120", "-Nf",
                       host], timeout=WAIT_S)
    assert started.returncode == 0, started.err
    check = msb.run([*base, "-O", "check", host])
    found = re.search(r"Master running \(pid=(\d+)\)", check.err)
    assert found is not None, check.err
    pid = int(found.group(1))
    proxies = _proxies_for(host)
    try:
        assert len(proxies) == 1, proxies
        yield Master(msb, host, pid, proxies[0])
    finally:
        msb.run([*base, "-O", "exit", host])
        _wait_until(lambda: not _alive(pid), 10)
        if _alive(pid):
            os.kill(pid, 9)


def test_32_concurrent_channels_share_one_connection(master: Master) -> None:
    directory = f"/tmp/concurrent-{uuid.uuid4().hex[:8]}"
    assert master.run(f"mkdir {directory}").returncode == 0
    # Each client leaves a marker, then waits (bounded) until every marker and the test's "go"
    # exist: its index is printed only if all of them really ran at the same time.
    script = (
        f'touch {directory}/m$I; '
        f'for _ in $(seq {WAIT_S * 10}); do set -- {directory}/m*; '
        f'[ $# -eq {CLIENTS} ] && [ -e {directory}/go ] && break; sleep 0.1; done; '
        f'[ $# -eq {CLIENTS} ] && [ -e {directory}/go ] && echo "client $I"'
    )
    clients = [
        subprocess.Popen(master.client(f"I={index}; {script}"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for index in range(CLIENTS)
    ]
    try:
        assert _wait_until(
            lambda: master.run(f"ls {directory} | wc -l").out == f"{CLIENTS}\n", WAIT_S)
        # All 32 are running now, over one connection: so through one msb-proxy process.
        assert _proxies_for(master.host) == [master.proxy]
        assert master.run(f"touch {directory}/go").returncode == 0
        results = [(c.wait(timeout=WAIT_S), *c.communicate(timeout=WAIT_S)) for c in clients]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        master.run(f"rm -rf {directory}")
    assert results == [(0, f"client {i}\n".encode(), b"") for i in range(CLIENTS)]
    assert _proxies_for(master.host) == [master.proxy]


def test_many_sessions_in_sequence_on_one_connection(master: Master) -> None:
    outputs = [master.run(f"echo session {index}") for index in range(50)]
    assert [(r.returncode, r.out, r.err) for r in outputs] == [
        (0, f"session {index}\n", "") for index in range(50)
    ]
    assert _proxies_for(master.host) == [master.proxy]


def test_closing_one_channel_leaves_its_sibling_running(master: Master) -> None:
    marker = f"sleep {6000 + os.getpid() % 1000}.75"
    sibling = subprocess.Popen(
        master.client('echo ready; read line; echo "got $line"; exit 4'),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = subprocess.Popen(master.client(f"echo ready; {marker}"), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert sibling.stdout is not None and victim.stdout is not None
        assert sibling.stdout.readline() == b"ready\n"
        assert victim.stdout.readline() == b"ready\n"
        victim.kill()  # the master sees its client go and closes that channel
        victim.wait()
        # As with sshd, the closed channel's command is hung up ...
        assert _wait_until(lambda: master.run(f"pgrep -fx '{marker}'").returncode == 1, WAIT_S)
        # ... while the sibling channel still carries data both ways and then exits normally.
        out, err = sibling.communicate(b"hello\n", timeout=WAIT_S)
    finally:
        for client in (sibling, victim):
            if client.poll() is None:
                client.kill()
                client.wait()
        master.run(f"pkill -fx '{marker}'")
    assert (sibling.returncode, out, err) == (4, b"got hello\n", b"")
    assert master.msb.run(["ssh", "-F", str(master.msb.config), "-O", "check",
                           master.host]).returncode == 0


def _proxies_for(host: str) -> list[int]:
    """PIDs of the ``msb-proxy stdio ... HOST`` processes running now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            if (any(arg.endswith(b"msb-proxy") for arg in argv) and b"stdio" in argv
                    and argv[-1] == host.encode()):
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False
