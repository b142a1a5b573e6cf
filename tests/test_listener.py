"""``msb-proxy serve NAME``: one sandbox on a TCP port, reached by the real ``ssh -p``,
``scp -P``, ``sftp -P`` and ``rsync -e 'ssh -p'``, many connections at once; SIGTERM while
connections are open; a port in use; a non-loopback address."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PROXY, Env

pytestmark = pytest.mark.timeout(240)
WAIT_S = 60  # a bound for waiting on events, not a timing assertion


@dataclass
class Listener:
    process: subprocess.Popen[bytes]
    port: int
    first_lines: list[str]

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(signum)
        _, err = self.process.communicate(timeout=WAIT_S)
        return self.process.returncode, err.decode()


def start(msb: Env, name: str, *options: str) -> Listener:
    """``msb-proxy serve NAME --port 0 OPTIONS``, once it says where it listens."""
    process = subprocess.Popen([str(PROXY), "serve", name, "--port", "0", "--quiet",
                                *options], env=msb.proxy_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    lines: list[str] = []
    while True:
        line = process.stderr.readline().decode()
        assert line, f"serve exited: {lines}"
        lines.append(line)
        found = re.search(r"listening on [^ ]+:(\d+)$", line.strip())
        if found:
            return Listener(process, int(found.group(1)), lines)


def client_options(msb: Env) -> list[str]:
    return ["-i", str(msb.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR"]


def ssh(msb: Env, listener: Listener, *command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh", "-p", str(listener.port), *client_options(msb),
                           "root@127.0.0.1", *command], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=WAIT_S, check=False)


@pytest.fixture
def served(msb: Env) -> Iterator[tuple[str, Listener]]:
    name = f"listen-{uuid.uuid4().hex[:8]}"
    msb.host(name)
    listener = start(msb, name)
    yield name, listener
    if listener.process.poll() is None:
        listener.stop()


def test_ssh_p_runs_commands_with_their_exit_status(msb: Env,
                                                     served: tuple[str, Listener]) -> None:
    name, listener = served
    done = ssh(msb, listener, "hostname; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, f"{name}\n".encode(), b"err\n")


def test_scp_sftp_and_rsync_transfer_through_the_listener(
        msb: Env, served: tuple[str, Listener]) -> None:
    name, listener = served
    local = msb.root / f"up-{uuid.uuid4().hex[:6]}"
    local.write_bytes(bytes(range(256)) * 4096)
    guest = f"{msb.guest_tmp(name)}/{local.name}"
    port = str(listener.port)
    scp = subprocess.run(["scp", "-P", port, *client_options(msb), str(local),
                          f"root@127.0.0.1:{guest}"], capture_output=True, timeout=WAIT_S,
                         check=False)
    assert (scp.returncode, scp.stderr) == (0, b"")
    back = local.with_suffix(".sftp")
    sftp = subprocess.run(["sftp", "-P", port, *client_options(msb), "-b", "-",
                           "root@127.0.0.1"], input=f"get {guest} {back}\n".encode(),
                          capture_output=True, timeout=WAIT_S, check=False)
    assert sftp.returncode == 0, sftp.stderr
    assert back.read_bytes() == local.read_bytes()
    tree = msb.root / f"tree-{uuid.uuid4().hex[:6]}"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("synced\n")
    shell = " ".join(["ssh", "-p", port, *client_options(msb)])
    rsync = subprocess.run(["rsync", "-a", "-e", shell, f"{tree}/",
                            f"root@127.0.0.1:{guest}.tree/"], capture_output=True,
                           timeout=WAIT_S, check=False)
    assert (rsync.returncode, rsync.stderr) == (0, b"")
    assert ssh(msb, listener, f"cat {guest}.tree/sub/file").stdout == b"synced\n"


def test_sixteen_concurrent_connections_each_get_their_own_answer(
        msb: Env, served: tuple[str, Listener]) -> None:
    _, listener = served
    with ThreadPoolExecutor(16) as pool:
        done = list(pool.map(lambda n: ssh(msb, listener, f"echo {n}"), range(16)))
    assert [(d.returncode, d.stdout) for d in done] == [(0, f"{n}\n".encode())
                                                        for n in range(16)]


def test_sigterm_with_connections_open_ends_them_and_their_processes_and_exits_0(
        msb: Env) -> None:
    name = f"listen-{uuid.uuid4().hex[:8]}"
    msb.host(name)
    listener = start(msb, name)
    marker = f"sleep 4{uuid.uuid4().int % 100000:05d}"
    open_ = subprocess.Popen(["ssh", "-p", str(listener.port), *client_options(msb),
                              "root@127.0.0.1", f"echo started; exec {marker}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
    assert open_.stdout is not None
    assert open_.stdout.readline() == b"started\n"
    code, err = listener.stop(signal.SIGTERM)
    assert (code, err) == (0, "")
    assert open_.wait(timeout=WAIT_S) == 255
    left = msb.ssh(name, f"pgrep -f '^{marker}$' || echo none")
    assert left.stdout == b"none\n"


def test_sigint_stops_the_listener_with_exit_0(msb: Env,
                                               served: tuple[str, Listener]) -> None:
    _, listener = served
    assert listener.stop(signal.SIGINT) == (0, "")


def test_a_port_in_use_is_one_line_and_a_non_zero_exit(msb: Env) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = msb.msb_proxy("serve", "inuse", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr == \
        f"msb-proxy: cannot listen on 127.0.0.1:{port}: Address already in use\n".encode()


def test_a_bad_port_is_a_usage_error(msb: Env) -> None:
    done = msb.msb_proxy("serve", "bad", "--port", "70000")
    assert done.returncode == 2
    assert done.stderr.startswith(b"msb-proxy: argument --port: bad port '70000'")


def test_a_non_loopback_address_gets_a_one_line_warning(msb: Env) -> None:
    name = f"listen-{uuid.uuid4().hex[:8]}"
    msb.host(name)
    listener = start(msb, name, "--host", "0.0.0.0")
    assert listener.first_lines[0] == (
        "msb-proxy: warning: listening on 0.0.0.0, not a loopback address: other machines "
        f"can reach sandbox {name!r} (with an authorized key)\n")
    assert listener.stop() == (0, "")


GUEST_ECHO = ("import socket, sys\n"
              "server = socket.create_server(('127.0.0.1', 0))\n"
              "print(server.getsockname()[1], flush=True)\n"
              "conn, _ = server.accept()\n"
              "conn.sendall(conn.recv(100).upper())\n")


def test_a_tunnel_and_the_agent_go_through_the_listener(msb: Env, served: tuple[str, Listener],
                                                        tmp_path: Path) -> None:
    """The listener's connections are served like ssh msb-NAME's: -L to a guest port, and
    -A (the guest's ssh-add lists the client's key)."""
    _, listener = served
    guest = subprocess.Popen(["ssh", "-p", str(listener.port), *client_options(msb),
                              "root@127.0.0.1", f"python3 -c {shlex.quote(GUEST_ECHO)}"],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert guest.stdout is not None
    guest_port = int(guest.stdout.readline())
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        local_port = free.getsockname()[1]
    tunnel = subprocess.Popen(["ssh", "-p", str(listener.port), *client_options(msb), "-N",
                               "-o", "ExitOnForwardFailure=yes",
                               "-L", f"{local_port}:127.0.0.1:{guest_port}", "root@127.0.0.1"],
                              stdin=subprocess.DEVNULL)
    try:
        answer = b""
        for _ in range(WAIT_S * 10):  # until the client's -L listens
            try:
                with socket.create_connection(("127.0.0.1", local_port), timeout=WAIT_S) as sock:
                    sock.sendall(b"through the tunnel")
                    answer = sock.recv(100)
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert answer == b"THROUGH THE TUNNEL"
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=WAIT_S)
        guest.kill()
        guest.wait(timeout=WAIT_S)
    started = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True)
    sock_path = re.search(r"SSH_AUTH_SOCK=([^;]+);", started.stdout)
    pid = re.search(r"SSH_AGENT_PID=(\d+);", started.stdout)
    assert sock_path is not None and pid is not None
    env = dict(os.environ, SSH_AUTH_SOCK=sock_path.group(1))
    try:
        key = tmp_path / "agent_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        listed = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True,
                                text=True, check=True).stdout
        run = subprocess.run(["ssh", "-A", "-p", str(listener.port), *client_options(msb),
                              "root@127.0.0.1", "ssh-add -l"], capture_output=True, text=True,
                             env=env, stdin=subprocess.DEVNULL, timeout=WAIT_S, check=False)
        assert (run.returncode, run.stdout) == (0, listed), run.stderr
    finally:
        os.kill(int(pid.group(1)), signal.SIGTERM)


def test_msb_proxy_config_prints_a_block_that_reaches_the_listener_with_checking_on(
        msb: Env, served: tuple[str, Listener], tmp_path: Path) -> None:
    name, listener = served
    block = msb.msb_proxy("config", "--listener", name, "--listen-port", str(listener.port))
    assert block.returncode == 0, block.err
    assert block.out.splitlines()[:5] == [
        f"Host msb-{name}-listener", "  HostName 127.0.0.1", f"  Port {listener.port}",
        "  User root", f"  HostKeyAlias msb-{name}"]
    config = tmp_path / "ssh_config"
    config.write_text(block.out + f"  IdentityFile {msb.key}\n  IdentitiesOnly yes\n"
                      "  BatchMode yes\n")
    run = subprocess.run(["ssh", "-F", str(config), f"msb-{name}-listener", "echo checked"],
                         capture_output=True, stdin=subprocess.DEVNULL, timeout=WAIT_S,
                         check=False)
    assert (run.returncode, run.stdout) == (0, b"checked\n"), run.stderr
