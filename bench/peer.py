"""The two ends of a timed transfer through an ``ssh -L`` tunnel; stdlib only, as it also runs in
the guest (copied there with the data sets).

In the guest, the listeners: each binds 127.0.0.1:PORT, detaches once it listens (so the command
that started it returns exactly when it is ready), writes its PID to PIDFILE and serves one
connection after another until it is killed, or after ``LIFETIME_S`` at the latest::

    sink PORT PIDFILE           reads a connection to its end; answers the byte count (and
                                their sha256 when asked) and closes
    source PORT FILE PIDFILE    sends the first N bytes of FILE, N asked for by the client
    page PORT DIR PIDFILE       serves DIR over HTTP/1.0, one connection per request

On the host, the clients the bench times; they exit 0 only when exactly SIZE bytes went through::

    push PORT FILE SIZE [--digest]   sends the first SIZE bytes of FILE to a sink, half-closes and
                                     waits for the sink's answer: every byte has arrived
    pull PORT SIZE [--digest]        asks a source for SIZE bytes and reads to end of file

With ``--digest`` they print the sha256 of the bytes that went through, as ``sha256sum`` prints it
for its standard input; the bench compares it with the data set's. On either side, ``digest``
prints the same for its standard input (OpenSSL's sha256, several times faster than coreutils').
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import signal
import socket
import sys
from collections.abc import Callable

LIFETIME_S = 900
BUFFER = 1 << 20
COUNT, DIGEST = b"count\n", b"sha256\n"


def _listen(port: int, pidfile: str, serve: Callable[[socket.socket], None]) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(16)
    _detach(pidfile)
    while True:
        connection, _ = server.accept()
        with connection:
            serve(connection)


def _detach(pidfile: str) -> None:
    """Return in a detached child; the parent writes the child's PID and exits."""
    child = os.fork()
    if child:
        with open(pidfile, "w") as handle:
            handle.write(f"{child}\n")
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    signal.alarm(LIFETIME_S)  # SIGALRM ends it: a bench that died cannot leave it behind


def _read_line(connection: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = connection.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def _drain(connection: socket.socket, digest: bool) -> tuple[int, str]:
    """Read ``connection`` to its end: (bytes read, their sha256 in hex, or "" unless asked)."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    hashed = hashlib.sha256() if digest else None
    total = 0
    while True:
        count = connection.recv_into(buffer)
        if not count:
            return total, hashed.hexdigest() if hashed else ""
        if hashed:
            hashed.update(view[:count])
        total += count


def _sink(connection: socket.socket) -> None:
    mode = _read_line(connection)
    total, digest = _drain(connection, mode == DIGEST)
    connection.sendall(f"{total} {digest}".strip().encode() + b"\n")


def _source(path: str, connection: socket.socket) -> None:
    wanted = int(_read_line(connection))
    with open(path, "rb") as handle:
        connection.sendfile(handle, 0, wanted)


def _page(port: int, directory: str, pidfile: str) -> None:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """No log line per request."""

    handler = functools.partial(Quiet, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    _detach(pidfile)
    server.serve_forever()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def _push(port: int, path: str, size: int, digest: bool) -> str:
    with _connect(port) as connection, open(path, "rb") as handle:
        connection.sendall(DIGEST if digest else COUNT)
        sent = connection.sendfile(handle, 0, size)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
    fields = answer.split()
    received = int(fields[0]) if fields else -1
    if sent != size or received != size:
        raise SystemExit(f"peer: push sent {sent} of {size} bytes, the sink got {received}")
    return fields[1].decode() if digest and len(fields) > 1 else ""


def _pull(port: int, size: int, digest: bool) -> str:
    with _connect(port) as connection:
        connection.sendall(f"{size}\n".encode())
        received, hexdigest = _drain(connection, digest)
    if received != size:
        raise SystemExit(f"peer: pull asked for {size} bytes and got {received}")
    return hexdigest


def main(argv: list[str]) -> None:
    digest = "--digest" in argv
    command, *args = [arg for arg in argv if arg != "--digest"]
    if command == "sink":
        _listen(int(args[0]), args[1], _sink)
    elif command == "source":
        _listen(int(args[0]), args[2], functools.partial(_source, args[1]))
    elif command == "page":
        _page(int(args[0]), args[1], args[2])
    elif command == "digest":
        hashed = hashlib.sha256()
        while chunk := sys.stdin.buffer.read(BUFFER):
            hashed.update(chunk)
        print(f"{hashed.hexdigest()}  -")
    elif command in ("push", "pull"):
        if command == "push":
            hexdigest = _push(int(args[0]), args[1], int(args[2]), digest)
        else:
            hexdigest = _pull(int(args[0]), int(args[1]), digest)
        if digest:
            print(f"{hexdigest}  -")
    else:
        raise SystemExit(f"peer: unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
