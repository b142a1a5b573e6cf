"""Memory of a connection: what the warm server's children import, and how far a client that
stops reading, or a guest that never reads its stdin, makes the serving process grow.

Sizes are measured from ``/proc/PID/smaps_rollup``: USS (``Private_Clean + Private_Dirty``),
what a process holds of its own, is what a connection costs; pages a warm server's child still
shares with the server are free. ``pytest tests/test_memory.py -s`` prints the numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import PROXY, Env, warm_servers

# The most a serving process may grow above an idle connection's (README, "Memory"): twice
# what was measured, since sizes, unlike times, hardly vary from run to run.
SLOW_READER_BOUND_KIB = 2 * 4 * 1024
UNREAD_STDIN_BOUND_KIB = 2 * 12 * 1024
CONCURRENT = 10
SETTLED_S = 2.0  # a peak that has not risen for this long is the peak
LONGEST_S = 30.0
_PRELOADED = """\
import json, os, sys
from msb_proxy.cli import warm
warm._preload()
warm._preload_backend(sys.argv[2:])
before = set(sys.modules)
from msb_proxy.cli.commandline import run
code = run(sys.argv[2:])
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(sorted(set(sys.modules) - before)) + "\\n")
os._exit(code)
"""


def _memory_kib(pid: int) -> tuple[int, int]:
    """(USS, PSS) of ``pid`` in KiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if name in ("Private_Clean", "Private_Dirty", "Pss"):
                fields[name] = int(value.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def _stdin(pid: int) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/fd/0")
    return ""


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def _line(stream: int, timeout: float = 60.0) -> bytes:
    """The first line on ``stream`` (a descriptor), read byte by byte so nothing after it is
    taken; b"" at end of file or after ``timeout``."""
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            if not selector.select(deadline - time.monotonic()):
                break
            byte = os.read(stream, 1)
            if not byte:
                break
            line += byte
    return line


@contextlib.contextmanager
def _client(msb: Env, sandbox: str, command: str, *, config: Path,
            stdin: int = subprocess.DEVNULL) -> Iterator[subprocess.Popen[bytes]]:
    """``ssh -F CONFIG HOST 'echo ready >&2; COMMAND'``, ended when the block ends; its
    stdout is a pipe the block may leave unread. Yields once ``ready`` has arrived."""
    client = subprocess.Popen(
        ["ssh", "-F", str(config), msb.host(sandbox), f"echo ready >&2; {command}"],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert client.stderr is not None
        assert _line(client.stderr.fileno()) == b"ready\n"
        yield client
    finally:
        client.kill()
        client.wait()
        for stream in (client.stdout, client.stderr):
            if stream is not None:
                stream.close()


def _served_in(client: subprocess.Popen[bytes]) -> int:
    """The ProxyCommand process of ``client`` (with the cold config it serves in-process)."""
    (proxy,) = _children(client.pid)
    return proxy


def _peak_unique_kib(pid: int, going: threading.Event | None = None) -> int:
    """The largest USS of ``pid`` until it has not risen for ``SETTLED_S`` (and ``going``, if
    given, has not been set for as long: the writer still gets its bytes through)."""
    peak, since = 0, time.monotonic()
    start = since
    while time.monotonic() - since < SETTLED_S and time.monotonic() - start < LONGEST_S:
        unique, _ = _memory_kib(pid)
        if unique > peak:
            peak, since = unique, time.monotonic()
        if going is not None and going.is_set():
            going.clear()
            since = time.monotonic()
        time.sleep(0.05)
    return peak


def _idle_unique_kib(msb: Env, sandbox: str) -> int:
    """The USS of a process serving an idle session, once it has settled (the heap trimmer
    has had its first look, see msb_proxy/transport/heap.py); the sandbox already runs, so
    the connection does not pay for starting it."""
    assert msb.ssh(sandbox, "true").returncode == 0
    with _client(msb, sandbox, "exec sleep 600", config=msb.cold_config) as client:
        server = _served_in(client)
        lowest, since = _memory_kib(server)[0], time.monotonic()
        while time.monotonic() - since < SETTLED_S:
            unique = _memory_kib(server)[0]
            if unique < lowest:
                lowest, since = unique, time.monotonic()
            time.sleep(0.05)
        return lowest


def test_a_connection_the_warm_server_forks_imports_nothing_more(msb: Env, sandbox: str,
                                                                 tmp_path: Path) -> None:
    """Whatever a warm server's child imports itself it pays for in memory of its own; served
    right after the warm server's preload, a command, a terminal, sftp and both scp protocols
    import nothing."""
    script = tmp_path / "preloaded.py"
    script.write_text(_PRELOADED)
    imported = tmp_path / "imported"
    config = tmp_path / "ssh_config"
    config.write_text(msb.cold_config.read_text().replace(
        shlex.quote(str(PROXY)), f"{sys.executable} {script} {imported}", 1))
    host = msb.host(sandbox)
    source = tmp_path / "file"
    source.write_bytes(b"x" * 100_000)
    runs = [
        ["ssh", "-F", str(config), host, "true"],
        ["ssh", "-F", str(config), "-tt", host, "true"],
        ["sftp", "-q", "-F", str(config), "-b", "-", host],
        ["scp", "-q", "-O", "-F", str(config), str(source), f"{host}:/tmp/msb-memory-scp"],
        ["scp", "-q", "-F", str(config), f"{host}:/tmp/msb-memory-scp", str(tmp_path / "back")],
    ]
    for argv in runs:
        done = msb.run(argv, input=b"ls /\n" if argv[0] == "sftp" else None)
        assert done.returncode == 0, (argv, done.err)
    assert (tmp_path / "back").read_bytes() == source.read_bytes()
    lists = [json.loads(line) for line in imported.read_text().splitlines()]
    assert lists == [[]] * len(runs)


def test_warm_connections_each_have_a_child_of_their_own(msb: Env, sandbox: str) -> None:
    """Ten connections at once, each served by a child of the warm server of its own; prints
    the memory each holds (USS and PSS), and that of the ``msb-proxy stdio`` waiting for it."""
    msb.ssh(sandbox, "true")  # starts the warm server, if none runs, for the next ones
    deadline = time.monotonic() + 60
    while not any((msb.runtime_dir / "msb-proxy").glob("warm-*.sock")):
        assert time.monotonic() < deadline, "no warm server started"
        time.sleep(0.05)
    clients = [subprocess.Popen(["ssh", "-F", str(msb.config), msb.host(sandbox),
                                 "echo up; exec sleep 600"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL) for _ in range(CONCURRENT)]
    try:
        for client in clients:
            assert client.stdout is not None
            assert _line(client.stdout.fileno()) == b"up\n"
        warm = warm_servers(msb.runtime_dir)
        served: dict[int, int] = {}
        for client in clients:
            proxy = _served_in(client)
            (child,) = [pid for pid in warm if _stdin(pid) == _stdin(proxy)]
            served[proxy] = child
        assert len(set(served.values())) == CONCURRENT
        children = [_memory_kib(child) for child in served.values()]
        waiting = [_memory_kib(proxy)[0] for proxy in served]
        print(f"\n{CONCURRENT} warm connections: USS of the child median "
              f"{statistics.median(u for u, _ in children) / 1024:.1f} MiB, largest "
              f"{max(u for u, _ in children) / 1024:.1f}; PSS median "
              f"{statistics.median(p for _, p in children) / 1024:.1f} MiB; USS of msb-proxy "
              f"stdio median {statistics.median(waiting) / 1024:.1f} MiB")
    finally:
        for client in clients:
            client.kill()
            client.wait()
            if client.stdout is not None:
                client.stdout.close()


def test_a_client_that_stops_reading_holds_the_proxy_to_a_bound(msb: Env,
                                                                  sandbox: str) -> None:
    """``ssh host 'cat /dev/zero' | (sleep 30; head -c 1)``: the client's window and ours
    stop the guest, and the serving process stays within the bound above an idle one's."""
    idle = _idle_unique_kib(msb, sandbox)
    with _client(msb, sandbox, "exec cat /dev/zero", config=msb.cold_config) as client:
        peak = _peak_unique_kib(_served_in(client))
        assert client.poll() is None  # still connected, just not read
    print(f"\nclient not reading: {(peak - idle) / 1024:.1f} MiB above an idle connection's "
          f"{idle / 1024:.1f} MiB")
    assert peak - idle <= SLOW_READER_BOUND_KIB


def test_a_guest_that_never_reads_its_stdin_holds_the_proxy_to_a_bound(msb: Env,
                                                                        sandbox: str) -> None:
    """``cat /dev/zero | ssh host 'sleep 30'``: the client's stdin is stopped by the windows
    once the guest's pipe is full, and the serving process stays within the bound."""
    idle = _idle_unique_kib(msb, sandbox)
    read_end, write_end = os.pipe()
    going = threading.Event()

    def feed() -> None:  # from the start, as `cat /dev/zero |` does: before the guest runs
        block = bytes(64 * 1024)
        with contextlib.suppress(OSError):  # EPIPE once the client is gone
            while True:
                os.write(write_end, block)
                going.set()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with _client(msb, sandbox, "exec sleep 600", config=msb.cold_config,
                     stdin=read_end) as client:
            os.close(read_end)
            read_end = -1
            peak = _peak_unique_kib(_served_in(client), going)
            assert client.poll() is None
    finally:
        if read_end >= 0:
            os.close(read_end)
        writer.join(60)
        os.close(write_end)  # only now: the writer must not write to a number reused
    print(f"\nguest not reading stdin: {(peak - idle) / 1024:.1f} MiB above an idle "
          f"connection's {idle / 1024:.1f} MiB")
    assert peak - idle <= UNREAD_STDIN_BOUND_KIB
