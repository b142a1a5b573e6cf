"""What the tunnel, VS Code and git/Ansible tests share: long-running ssh clients, guest and
host servers, and waiting for a listener.

The sandbox has a network namespace of its own: its ``127.0.0.1`` is not the host's, so a
server started in the guest can only be reached through a tunnel, and a host server only
through ``-R``.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from conftest import Env

WAIT_S = 30  # the machine is shared: bounds every wait generously


def host_port() -> int:
    """A TCP port free on the host's loopback right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def guest_port() -> int:
    """A port for a listener in the sandbox (its loopback is its own; nothing else uses it)."""
    return random.randrange(20000, 40000)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def accepts(address: int | str) -> bool:
    """Whether a host TCP port (int) or unix socket path (str) takes a connection now."""
    family = socket.AF_INET if isinstance(address, int) else socket.AF_UNIX
    target = ("127.0.0.1", address) if isinstance(address, int) else address
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(target)
        except OSError:
            return False
        return True


class Client:
    """A long-running ``ssh`` (a tunnel, a master, a session fed on stdin); its stderr is
    collected line by line as it arrives so a test can wait for what ssh logs."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 stdin: bool = False) -> None:
        self.argv = list(argv)
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self._lines: list[str] = []
        self._stdout: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stderr, self._lines),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.process.stdout, self._stdout),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: object, into: list[str]) -> None:
        assert pipe is not None
        for raw in pipe:  # type: ignore[attr-defined]
            with self._changed:
                # ssh ends its log lines with "\r\n"
                into.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def err(self) -> str:
        """stderr so far, one ``\n`` after each line."""
        with self._changed:
            return "".join(f"{line}\n" for line in self._lines)

    @property
    def out(self) -> str:
        """stdout so far, one ``\n`` after each line."""
        with self._changed:
            return "".join(f"{line}\n" for line in self._stdout)

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def _wait_for(self, lines: list[str], pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in lines:
                    found = re.search(pattern, line)
                    if found is not None:
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or not any(reader.is_alive() for reader in self._readers):
                    raise AssertionError(
                        f"{pattern!r} never came from {shlex.join(self.argv)} "
                        f"(exit {self.process.poll()}); stdout: {''.join(self._stdout)!r}; "
                        f"stderr: {''.join(self._lines)!r}")
                self._changed.wait(min(left, 0.5))

    def wait_for(self, pattern: str, timeout: float = WAIT_S) -> re.Match[str]:
        """The first stderr line matching ``pattern``, waiting for it if need be."""
        return self._wait_for(self._lines, pattern, timeout)

    def wait_for_output(self, pattern: str, timeout: float = WAIT_S) -> re.Match[str]:
        """The first stdout line matching ``pattern``, waiting for it if need be."""
        return self._wait_for(self._stdout, pattern, timeout)

    def wait(self, timeout: float = WAIT_S) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        for reader in self._readers:
            reader.join(10)


def ssh_argv(msb: Env, sandbox: str, *options: str, command: str | None = None,
             user: str | None = None) -> list[str]:
    """``ssh -F CONFIG OPTIONS... [USER@]msb-SANDBOX [COMMAND]``."""
    host = msb.host(sandbox)
    return ["ssh", "-F", str(msb.config), *options, host if user is None else f"{user}@{host}",
            *([] if command is None else [command])]


@contextlib.contextmanager
def tunnel(msb: Env, sandbox: str, *forwards: str, ready: int | str | None = None,
           env: dict[str, str] | None = None) -> Iterator[Client]:
    """``ssh -N -o ExitOnForwardFailure=yes FORWARDS... msb-SANDBOX``, stopped afterwards.

    ``ready``: a host port or unix socket path to wait for (a ``-L``/``-D`` listener: ssh makes
    it only once it is logged in).
    """
    client = Client(ssh_argv(msb, sandbox, "-N", "-o", "ExitOnForwardFailure=yes", *forwards),
                    env=env)
    try:
        if ready is not None:
            assert wait_until(lambda: accepts(ready) or client.process.poll() is not None), \
                f"no listener at {ready}"
            assert client.process.poll() is None, client.err
        yield client
    finally:
        client.stop()


GUEST_SERVERS = r'''
"""Test servers for the tunnel tests, run in the guest: python3 SERVERS MODE ADDRESS [FILE]."""
import hashlib, os, socket, sys, threading

mode, address = sys.argv[1], sys.argv[2]
lock = threading.Lock()
open_now = peak = 0


def listen():
    if address.isdigit():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(address)))
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(address)
    sock.listen(128)
    return sock


def record(path, text):
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)


def echo(conn):
    """Everything back as it comes; EOF back after the client's."""
    global open_now, peak
    with lock:
        open_now += 1
        if open_now > peak:
            peak = open_now
            if len(sys.argv) > 3:
                record(sys.argv[3], str(peak))
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    finally:
        with lock:
            open_now -= 1


def digest(conn):
    """Read until the client's EOF, then answer with the sha256 of what came."""
    summed = hashlib.sha256()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        summed.update(data)
    conn.sendall(summed.hexdigest().encode())


def speak_first(conn):
    """Send a greeting and half-close, then read until EOF; record "SIZE SHA256" in FILE."""
    conn.sendall(b"greeting from the guest\n" * 4096)
    conn.shutdown(socket.SHUT_WR)
    summed, size = hashlib.sha256(), 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        summed.update(data)
        size += len(data)
    record(sys.argv[3], "%d %s" % (size, summed.hexdigest()))


def serve(conn):
    try:
        {"echo": echo, "digest": digest, "speak-first": speak_first}[mode](conn)
    except OSError:
        pass
    finally:
        conn.close()


server = listen()
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''
def guest_servers_path(msb: Env, sandbox: str) -> str:
    """Where :func:`install_guest_servers` puts the servers' script in ``sandbox``."""
    return f"{msb.guest_tmp(sandbox)}/tunnel-test-servers.py"


def install_guest_servers(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, f"cat > {guest_servers_path(msb, sandbox)}",
                  input=GUEST_SERVERS.encode())
    assert run.returncode == 0, run.err


def listening(port: int) -> str:
    """A guest shell test: something listens on the guest's 127.0.0.1:``port``.

    Read from /proc, not by connecting: a probe would be a connection the server serves.
    """
    return f"grep -q ': 0100007F:{port:04X} 00000000:0000 0A ' /proc/net/tcp"


def socket_exists(path: str) -> str:
    """A guest shell test: a unix socket exists at ``path``."""
    return f"[ -S {shlex.quote(path)} ]"


@contextlib.contextmanager
def guest_server(msb: Env, sandbox: str, command: str, ready: str,
                 user: str | None = None) -> Iterator[None]:
    """``command`` running in the background in the sandbox until the block ends, started
    the way a user would (``nohup ... &``); waits until the shell test ``ready`` holds."""
    started = msb.ssh(
        sandbox, f"nohup {command} >/dev/null 2>&1 </dev/null & echo $!; "
                 f"for _ in $(seq 300); do {ready} && exit 0; sleep 0.1; done; exit 1",
        user=user)
    assert started.returncode == 0, f"{command} did not start: {started.err}"
    pid = int(started.out.split()[0])
    try:
        yield
    finally:
        msb.ssh(sandbox, f"kill {pid}", user=user)


@contextlib.contextmanager
def host_http_server(body: bytes) -> Iterator[int]:
    """An HTTP server on the host's loopback answering every GET with ``body``; its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def short_tmpdir() -> Path:
    """A fresh directory whose paths fit a unix socket address (108 bytes)."""
    path = Path("/tmp") / f"msb-t-{os.getpid()}-{random.randrange(1 << 30):x}"
    path.mkdir(mode=0o700)
    return path


def curl(*args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess[bytes]:
    """The host's curl, quiet, with connect and overall time limits."""
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 10, check=False)
