"""The warm server: connections that start in milliseconds instead of half a second.

Importing asyncssh and its cryptography takes ~0.4 s of CPU, more than OpenSSH's whole sshd
needs for a connection. So ``msb-proxy stdio`` first tries to hand its stdin, stdout and stderr
(with its argv, environment and working directory) to a *warm server*: one process per user that
has imported everything once and forks a child per connection. The child becomes an ordinary
``msb-proxy stdio`` for that connection, on those very descriptors, and reports its exit status
back; the ``stdio`` process waits for it and exits with it. From OpenSSH's side nothing changes:
one ProxyCommand process per connection, which ends when the connection does.

When no warm server answers, ``stdio`` serves the connection itself and starts one in the
background for the next connection. The server listens on a unix socket in a private runtime
directory (``$XDG_RUNTIME_DIR/msb-proxy`` or ``/tmp/msb-proxy-<uid>``, 0700), accepts only its own
user, serves one version of the code (its socket name carries a fingerprint of the installed
files, so an upgrade never runs old code), and exits after ``IDLE_EXIT_S`` without connections.
``MSB_PROXY_WARM=0`` turns it off.

This module is imported by every ``msb-proxy stdio``: it must stay light (no asyncio, no asyncssh)
until the server itself starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["delegate", "serve"]

IDLE_EXIT_S = 600.0  # MSB_PROXY_WARM_IDLE_S in the environment of the first connection overrides
_lock_fd: int | None = None  # the server's lock, which its children must not keep
_wake_fds: tuple[int, ...] = ()  # the server's SIGCHLD wakeup pipe, likewise
_backends_preloaded: set[str] = set()  # the names of --backend the server has imported
MAX_REQUEST = 1 << 20
_UNIX_PATH_MAX = 107
_SO_PEERCRED_FORMAT = "3i"


def _fingerprint() -> str:
    """Identifies this installation's code: the interpreter and every msb_proxy source file.

    Two checksums of zlib's rather than hashlib's sha256: nothing is to be kept secret or
    proven here, only versions told apart, and importing hashlib loads OpenSSL into every
    ``msb-proxy stdio``, which waits out the whole connection (2.7 ms more at its start, and
    0.5 MiB of its own memory: 6.3 MiB instead of 5.8).
    """
    import zlib

    lines = [sys.executable]
    root = Path(__file__).resolve().parents[1]  # the msb_proxy package
    for path in sorted(root.rglob("*.py")):
        info = path.stat()
        lines.append(f"{path.relative_to(root)}:{info.st_size}:{info.st_mtime_ns}")
    text = "\n".join(lines).encode()
    return f"{zlib.crc32(text):08x}{zlib.adler32(text):08x}"


def _runtime_dir(environ: Mapping[str, str]) -> Path | None:
    """A directory only we can use, or None when none can be had safely."""
    base = environ.get("XDG_RUNTIME_DIR")
    uid = os.getuid()
    directory = (Path(base) / "msb-proxy" if base and os.path.isabs(base)
                 else Path(f"/tmp/msb-proxy-{uid}"))
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=bool(base))
    try:
        info = os.lstat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or stat.S_IMODE(info.st_mode) & 0o077:
        return None
    return directory


def _socket_path(environ: Mapping[str, str]) -> Path | None:
    directory = _runtime_dir(environ)
    if directory is None:
        return None
    path = directory / f"warm-{_fingerprint()}.sock"
    return path if len(bytes(path)) <= _UNIX_PATH_MAX else None


# ---------------------------------------------------------------------------------------------
# The ``msb-proxy stdio`` side


def delegate(argv: Sequence[str], environ: Mapping[str, str]) -> int | None:
    """Hand this connection to the warm server and return its exit status.

    Returns None when there is no warm server to take it (one is then started for the next
    connection) or warm serving is off; the caller then serves the connection itself.
    """
    if environ.get("MSB_PROXY_WARM", "1") == "0":
        return None
    path = _socket_path(environ)
    if path is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(2.0)
        sock.connect(str(path))
        request = json.dumps({"argv": list(argv), "env": dict(environ),
                              "cwd": os.getcwd()}).encode()
        fds = struct.pack("3i", 0, 1, 2)
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    except OSError:
        sock.close()
        _start_server(path)
        return None
    # From here on the connection is the warm child's: whatever happens, we only wait for it.
    sock.settimeout(None)
    try:
        reply = sock.recv(4096)
    except OSError:
        reply = b""
    finally:
        sock.close()
    try:
        return int(json.loads(reply)["exit"])
    except (ValueError, KeyError, TypeError):
        return 1


def _start_server(path: Path) -> None:
    """Start a warm server in the background; it takes over from the next connection on."""
    import subprocess

    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-P", "-m", "msb_proxy.cli.warm", str(path)], cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )


# ---------------------------------------------------------------------------------------------
# The server


def serve(path: Path) -> None:
    """Run the warm server on ``path`` until it has been idle for ``IDLE_EXIT_S``."""
    import fcntl
    import selectors
    import signal
    import time

    # Held for the server's life; children close it, so a successor can start while they run.
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another one is starting or running
    global _lock_fd
    _lock_fd = lock
    _preload()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # we hold the lock: any socket left there is a dead server's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    # A child's end must wake the select() below to reap it. A Python signal handler alone
    # does not: select() is retried after it runs (PEP 475). The wakeup fd makes it readable.
    global _wake_fds
    wake_read, wake_write = _wake_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    try:
        idle_exit_s = float(os.environ.get("MSB_PROXY_WARM_IDLE_S", IDLE_EXIT_S))
    except ValueError:
        idle_exit_s = IDLE_EXIT_S
    children: set[int] = set()
    idle_since = time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    try:
        while True:
            ready = [key.fileobj for key, _ in selector.select(timeout=min(idle_exit_s, 30.0))]
            if wake_read in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 4096)
            children -= _reaped(children)
            if listener in ready:
                child = _accept(listener)
                if child:
                    children.add(child)
                idle_since = time.monotonic()
            elif children:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_exit_s:
                return
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(lock)


def _preload() -> None:
    """Import everything a connection needs, so that forked children start warm.

    What a child imports itself it pays for in memory of its own: each of its modules' objects,
    and the pages of the server's it writes to while importing (0.3 MiB a child for the seven
    modules once missing here). ``tests/test_memory.py`` checks that a connection served after
    this imports nothing more.
    """
    import asyncio  # noqa: F401
    import codecs
    import concurrent.futures.thread  # noqa: F401  (asyncio's default executor: waits for a guest)
    import resource  # noqa: F401  (each connection raises its open-files limit)

    import asyncssh  # noqa: F401

    import msb_proxy.backends.idle
    import msb_proxy.cli.commandline
    import msb_proxy.client.namespace  # the defaults the command line shows
    import msb_proxy.fastpath
    import msb_proxy.fastpath.relay
    import msb_proxy.fastpath.umac
    import msb_proxy.server.endpoint
    import msb_proxy.server.known_hosts
    import msb_proxy.server.session
    import msb_proxy.server.transfers.files
    import msb_proxy.server.transfers.scp
    import msb_proxy.server.transfers.sftp
    import msb_proxy.transport.stdio
    from msb_proxy.backends import registry
    from msb_proxy.config import load_config
    from msb_proxy.errors import UserError

    msb_proxy.fastpath.umac.load()  # nettle loaded once, for every child
    codecs.lookup("ascii")  # a text file read as ASCII (endpoint.py: /proc/cpuinfo) imports it
    # The C loop too: each child would load it at its first relay, and after an upgrade a
    # connection of the old code would load the new build.
    msb_proxy.fastpath.relay.compiled_loop()
    # The backends this user's config chooses (the environment is the first connection's); a
    # config that does not load fails each connection anyway, with the reason.
    with contextlib.suppress(UserError):
        registry.preload(load_config(os.environ, registry))


def _preload_backend(argv: object) -> None:
    """Import the backend a connection's ``--backend`` names, here before the fork, once per
    name: the environment the server started with may choose another one (a ProxyCommand
    that says ``--backend local`` sets no ``MSB_PROXY_BACKEND``), and a child that imports
    its backend itself holds 0.4 MiB more of its own."""
    if not isinstance(argv, list) or "--backend" not in argv[:-1]:
        return
    name = str(argv[argv.index("--backend") + 1])
    if name in _backends_preloaded:
        return
    _backends_preloaded.add(name)
    from msb_proxy.backends import registry
    from msb_proxy.config import load_config
    from msb_proxy.errors import UserError

    with contextlib.suppress(UserError):  # a name that is none: the child says so
        registry.preload(load_config(os.environ, registry, backend=name, use_file=False))


def _reaped(children: set[int]) -> set[int]:
    done = set()
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                done.add(pid)
    return done


def _accept(listener: socket.socket) -> int | None:
    """Take one connection request and fork its child; return the child's pid."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return None
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize(_SO_PEERCRED_FORMAT))
        _, uid, _ = struct.unpack(_SO_PEERCRED_FORMAT, creds)
        conn.settimeout(5.0)
        data, ancdata, _, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
        if uid != os.getuid() or len(fds) != 3 or not data:
            return None
        request = json.loads(data)
        _preload_backend(request.get("argv"))
        pid = os.fork()
        if pid == 0:
            listener.close()
            if _lock_fd is not None:
                os.close(_lock_fd)
            _run_child(conn, fds, request)
        return pid
    except (OSError, ValueError):
        return None
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _run_child(conn: socket.socket, fds: list[int], request: dict[str, object]) -> None:
    """In the forked child: become ``msb-proxy stdio`` on the client's descriptors."""
    import signal

    code = 70
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in _wake_fds:
            os.close(fd)
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})  # type: ignore[call-overload]
        with contextlib.suppress(OSError):
            os.chdir(str(request["cwd"]))
        from msb_proxy.cli.commandline import run

        code = run([str(arg) for arg in request["argv"]])  # type: ignore[attr-defined]
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"exit": code}).encode())
        os._exit(code)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
