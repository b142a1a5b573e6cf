"""The guest tunnel helper: every tunnel of one SSH connection, inside the guest, on one stream.

msb-proxy starts one helper per SSH connection that forwards anything (``-L``, ``-D``, ``-R``,
unix sockets, the agent), as the login user, so connections are made from inside the sandbox
(its ``127.0.0.1`` is its own, names resolve there) and listeners listen there. The helper
multiplexes all of them over its stdin/stdout:

    frame   = >I length of the rest, >I stream or listener id, B op, payload
    CONNECT_TCP  host\\0port        -> OPENED | FAILED errno\\0text
    CONNECT_UNIX path              -> OPENED | FAILED
    LISTEN_TCP   host\\0port        -> LISTENING port | FAILED      (id names the listener)
    LISTEN_UNIX  path\\0mode        -> LISTENING 0 | FAILED         (socket made with that mode)
    UNLISTEN                       stop listening; a unix socket is removed
    ACCEPTED     listener\\0peer-host\\0peer-port  (helper -> proxy; id is the new stream)
    DATA bytes, EOF (half-close), CLOSE, CREDIT n (either way)

Flow control is by credit: a side sends DATA for a stream only as far as the other side has
granted CREDIT for it (``WINDOW`` to begin with), so a slow reader at either end stops the
writer at the other, and nothing buffers without bound. Proxy-opened streams use ids below
2**31, streams from accepted connections ids from 2**31 up.

Standard library only; runs on Python 3.6 and newer.
"""

import contextlib
import encodings.idna  # noqa: F401  (getaddrinfo needs it; the jail cannot import it later)
import errno
import os
import selectors
import signal
import socket
import stat
import struct
import sys
from typing import Any, Dict, List, Optional, Set, Tuple

__all__ = [
    "ACCEPTED", "CLOSE", "CONNECT_TCP", "CONNECT_UNIX", "CREDIT", "DATA", "EOF", "FAILED",
    "HEADER", "LISTENING", "LISTEN_TCP", "LISTEN_UNIX", "OPENED", "UNLISTEN", "WINDOW", "frame",
    "serve",
]

HEADER = struct.Struct(">IIB")
WINDOW = 256 * 1024
READ_SIZE = 64 * 1024
ACCEPTED_IDS = 1 << 31

CONNECT_TCP, CONNECT_UNIX, LISTEN_TCP, LISTEN_UNIX, UNLISTEN = 1, 2, 3, 4, 5
OPENED, FAILED, LISTENING, ACCEPTED = 6, 7, 8, 9
DATA, EOF, CLOSE, CREDIT = 10, 11, 12, 13


def frame(ident: int, op: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(5 + len(payload), ident, op) + payload


class GuestStream:
    """One tunnelled connection's socket and its two directions of flow."""

    def __init__(self, ident: int, sock: socket.socket) -> None:
        self.ident = ident
        self.sock = sock
        self.credit = WINDOW      # what we may still send to the proxy
        self.outgoing = bytearray()  # from the proxy, not yet written to the socket
        self.connecting = False
        self.candidates: List[Tuple[int, int, int, Any]] = []  # addresses still to try
        self.eof_pending = False  # the proxy half-closed: shut down once outgoing is written
        self.closing = False  # the proxy closed: close once outgoing is written
        self.read_closed = False


class GuestTunnels:
    """Every tunnelled connection and listener of one SSH connection, and the loop that
    serves them."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.selector = selectors.DefaultSelector()
        self.streams: Dict[int, GuestStream] = {}
        self.listeners: Dict[int, Tuple[socket.socket, Optional[str]]] = {}
        self.next_accepted = ACCEPTED_IDS
        self.inbox = b""
        self.made_dirs: Set[str] = set()

    # ---- to the proxy
    def send(self, ident: int, op: int, payload: bytes = b"") -> None:
        view = memoryview(frame(ident, op, payload))
        while view:
            view = view[os.write(self.write_fd, view):]

    def fail(self, ident: int, exc: OSError) -> None:
        code = exc.errno or errno.EIO
        text = exc.strerror or str(exc)
        self.send(ident, FAILED, "{}\0{}".format(code, text).encode())

    # ---- event loop
    def run(self, wakeup: int) -> None:
        """Serve until the proxy closes our input or a hang-up signal wakes ``wakeup``.

        Our input stays blocking (it is read only when ready): it may be the very socket our
        output goes to, and writes to the proxy must block rather than fail when it is slow.
        """
        self.selector.register(self.read_fd, selectors.EVENT_READ, None)
        self.selector.register(wakeup, selectors.EVENT_READ, "signal")
        while True:
            for key, events in self.selector.select():
                if key.data == "signal":
                    return
                if key.data is None:
                    if not self.from_proxy():
                        return
                elif isinstance(key.data, GuestStream):
                    self.on_stream(key.data, events)
                else:
                    self.on_listener(key.data)

    def watch(self, stream: GuestStream) -> None:
        events = 0
        if stream.connecting or stream.outgoing or stream.eof_pending:
            events |= selectors.EVENT_WRITE
        if not stream.connecting and not stream.read_closed and stream.credit > 0:
            events |= selectors.EVENT_READ
        try:
            key = self.selector.get_key(stream.sock)
        except KeyError:
            key = None
        if key is None and events:
            self.selector.register(stream.sock, events, stream)
        elif key is not None and not events:
            self.selector.unregister(stream.sock)
        elif key is not None and key.events != events:
            self.selector.modify(stream.sock, events, stream)

    def from_proxy(self) -> bool:
        try:
            chunk = os.read(self.read_fd, 1 << 20)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.inbox += chunk
        while len(self.inbox) >= 4:
            (length,) = struct.unpack_from(">I", self.inbox)
            if len(self.inbox) < 4 + length:
                break
            _, ident, op = HEADER.unpack_from(self.inbox)
            payload = self.inbox[HEADER.size:4 + length]
            self.inbox = self.inbox[4 + length:]
            self.request(ident, op, payload)
        return True

    def request(self, ident: int, op: int, payload: bytes) -> None:
        if op in (CONNECT_TCP, CONNECT_UNIX):
            self.connect(ident, op, payload)
        elif op in (LISTEN_TCP, LISTEN_UNIX):
            self.listen(ident, op, payload)
        elif op == UNLISTEN:
            self.unlisten(ident)
        else:
            stream = self.streams.get(ident)
            if stream is None:
                return
            if op == DATA:
                stream.outgoing += payload
            elif op == EOF:
                stream.eof_pending = True
            elif op == CREDIT:
                stream.credit += struct.unpack(">I", payload)[0]
            elif op == CLOSE:
                if not stream.outgoing and not stream.eof_pending:
                    self.drop(stream, tell=False)
                    return
                # What the client sent before closing still goes to the socket, then we close.
                stream.closing = True
                stream.read_closed = True
            self.watch(stream)

    # ---- opening
    def connect(self, ident: int, op: int, payload: bytes) -> None:
        """Connect, trying each address a name resolves to in turn, as sshd does."""
        try:
            text = payload.decode("utf-8", "surrogateescape")
            candidates: List[Tuple[int, int, int, Any]] = []
            if op == CONNECT_TCP:
                host, port = text.split("\0")
                for family, kind, proto, _, address in socket.getaddrinfo(
                        host, int(port), type=socket.SOCK_STREAM):
                    candidates.append((family, kind, proto, address))
            else:
                candidates.append((socket.AF_UNIX, socket.SOCK_STREAM, 0, os.fsencode(text)))
        except socket.gaierror as exc:
            self.send(ident, FAILED, "{}\0{}".format(errno.EHOSTUNREACH, exc.strerror)
                      .encode())
            return
        except ValueError as exc:
            self.fail(ident, OSError(errno.EINVAL, str(exc)))
            return
        self.try_next(ident, candidates, None)

    def try_next(self, ident: int, candidates: List[Tuple[int, int, int, Any]],
                 error: Optional[OSError]) -> None:
        while candidates:
            family, kind, proto, address = candidates.pop(0)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                error = exc
                continue
            sock.setblocking(False)
            stream = GuestStream(ident, sock)
            stream.candidates = candidates
            try:
                sock.connect(address)
            except (BlockingIOError, InterruptedError):
                stream.connecting = True
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self.streams[ident] = stream
            if not stream.connecting:
                self.send(ident, OPENED)
            self.watch(stream)
            return
        self.fail(ident, error or OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH)))

    def listen(self, ident: int, op: int, payload: bytes) -> None:
        path = None
        try:
            if op == LISTEN_TCP:
                host, port = payload.decode("utf-8", "surrogateescape").split("\0")
                family, kind, proto, _, address = socket.getaddrinfo(
                    host or None, int(port), type=socket.SOCK_STREAM,
                    flags=socket.AI_PASSIVE)[0]
                sock = socket.socket(family, kind, proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                bound = sock.getsockname()[1]
            else:
                text, mode = payload.decode("utf-8", "surrogateescape").split("\0")
                path = text
                parent = os.path.dirname(path)
                if parent and not os.path.isdir(parent):
                    # The agent's socket gets a private directory of its own, as sshd's does.
                    os.mkdir(parent, 0o700)
                    self.made_dirs.add(parent)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                old = os.umask(0o777 & ~int(mode, 8))
                try:
                    sock.bind(os.fsencode(path))
                finally:
                    os.umask(old)
                bound = 0
            sock.listen(128)
            sock.setblocking(False)
        except socket.gaierror as exc:
            self.send(ident, FAILED, "{}\0{}".format(errno.EADDRNOTAVAIL, exc.strerror)
                      .encode())
            return
        except OSError as exc:
            self.fail(ident, exc)
            return
        self.listeners[ident] = (sock, path)
        self.selector.register(sock, selectors.EVENT_READ, ident)
        self.send(ident, LISTENING, struct.pack(">I", bound))

    def unlisten(self, ident: int) -> None:
        entry = self.listeners.pop(ident, None)
        if entry is None:
            return
        sock, path = entry
        self.selector.unregister(sock)
        sock.close()
        if path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            parent = os.path.dirname(path)
            if parent in self.made_dirs:
                self.made_dirs.discard(parent)
                with contextlib.suppress(OSError):
                    os.rmdir(parent)

    def on_listener(self, ident: int) -> None:
        sock, _ = self.listeners[ident]
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        conn.setblocking(False)
        stream_id = self.next_accepted
        self.next_accepted += 1
        stream = GuestStream(stream_id, conn)
        self.streams[stream_id] = stream
        host, port = (peer[0], peer[1]) if isinstance(peer, tuple) else ("", 0)
        self.send(stream_id, ACCEPTED, "{}\0{}\0{}".format(ident, host, port).encode())
        self.watch(stream)

    # ---- data
    def on_stream(self, stream: GuestStream, events: int) -> None:
        if stream.connecting:
            code = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                del self.streams[stream.ident]
                self.selector.unregister(stream.sock)
                stream.sock.close()
                self.try_next(stream.ident, stream.candidates, OSError(code, os.strerror(code)))
                return
            stream.connecting = False
            self.send(stream.ident, OPENED)
        if events & selectors.EVENT_WRITE and (stream.outgoing or stream.eof_pending):
            self.flush(stream)
        if stream.ident in self.streams and events & selectors.EVENT_READ:
            self.pull(stream)
        if stream.ident in self.streams:
            self.watch(stream)

    def flush(self, stream: GuestStream) -> None:
        if stream.outgoing:
            try:
                sent = stream.sock.send(stream.outgoing)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drop(stream, tell=True)
                return
            del stream.outgoing[:sent]
            self.send(stream.ident, CREDIT, struct.pack(">I", sent))
        if not stream.outgoing and stream.eof_pending:
            stream.eof_pending = False
            with contextlib.suppress(OSError):
                stream.sock.shutdown(socket.SHUT_WR)
        if not stream.outgoing and not stream.eof_pending and stream.closing:
            self.drop(stream, tell=False)

    def pull(self, stream: GuestStream) -> None:
        try:
            data = stream.sock.recv(min(READ_SIZE, stream.credit))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            stream.credit -= len(data)
            self.send(stream.ident, DATA, data)
            return
        stream.read_closed = True
        self.send(stream.ident, EOF)

    def drop(self, stream: GuestStream, tell: bool) -> None:
        self.streams.pop(stream.ident, None)
        with contextlib.suppress(KeyError):
            self.selector.unregister(stream.sock)
        stream.sock.close()
        if tell:
            self.send(stream.ident, CLOSE)


def serve(read_fd: int, write_fd: int) -> None:
    """Serve until the proxy closes our input; then every tunnel and listener goes with us.

    A hang-up (the proxy's connection to us is gone) ends it the same way. The signal only
    wakes the loop, so the unix sockets we made are removed in one piece, never half-way.
    """
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, _ignore)
    tunnels = GuestTunnels(read_fd, write_fd)
    try:
        tunnels.run(wake_r)
    finally:
        for ident in list(tunnels.listeners):
            tunnels.unlisten(ident)


def _ignore(signum: int, frame: object) -> None:
    """Nothing: the wake-up descriptor tells the loop."""


if __name__ == "__main__":
    serve(sys.stdin.fileno(), sys.stdout.fileno())
