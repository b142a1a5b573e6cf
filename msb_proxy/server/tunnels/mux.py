"""The proxy's end of the guest tunnel helper (``guest/tunnels.py``): many tunnelled
connections and listeners over one :class:`~msb_proxy.backends.links.Link`.

One helper runs per SSH connection that forwards anything it cannot reach over a socket of
the sandbox's namespace (names to resolve in the guest, unix sockets, ``-R``, the agent).
:class:`TunnelMux` speaks its framed protocol (described in ``guest/tunnels.py``): it opens
connections and listeners there and routes each frame to its :class:`MuxStream`. Each stream
has credit-based flow control end to end: the helper reads from a guest socket only as far as
the SSH channel has drained, and we send into the guest only as far as the helper has written
out.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from msb_proxy.backends.links import Link, split_frames
from msb_proxy.guest import tunnels as protocol
from msb_proxy.server.tunnels.channel import HIGH_WATER, TunnelSession

__all__ = ["MuxStream", "TunnelMux"]

#: Called with each connection a guest listener accepts: the stream, peer host and port.
AcceptHandler = Callable[["MuxStream", str, int], Coroutine[Any, Any, None]]


class MuxStream:
    """One tunnelled connection inside the guest, as the proxy sees it."""

    def __init__(self, mux: TunnelMux, ident: int) -> None:
        self.mux = mux
        self.ident = ident
        self.session: TunnelSession | None = None
        self._credit = protocol.WINDOW  # how much the helper will still take
        self._queued: list[bytes] = []
        self._queued_size = 0
        self._eof_queued = False
        self._eof_sent = False
        self._close_queued = False
        self._early: list[tuple[int, bytes]] = []  # what came before a session was attached
        self._owed = 0  # credit to grant once our channel drains
        self._channel_paused = False
        self.closed = False

    def attach(self, session: TunnelSession) -> None:
        self.session = session
        for op, payload in self._early:
            self.from_guest(op, payload)
        self._early.clear()

    # ---- toward the guest
    def send(self, data: bytes) -> None:
        if self.closed or self._close_queued:
            return
        self._queued.append(data)
        self._queued_size += len(data)
        self._flush()
        if self._queued_size > HIGH_WATER and self.session is not None:
            self.session.pause_input()

    def send_eof(self) -> None:
        if self.closed or self._close_queued:  # the guest closed it first: nothing to tell
            return
        self._eof_queued = True
        self._flush()

    def close(self) -> None:
        """The channel is closed: what it sent still reaches the guest, then the stream ends."""
        if self.closed:
            return
        if self._queued:
            self._close_queued = True
            return
        self.closed = True
        self.mux.forget(self.ident)
        self.mux.send(self.ident, protocol.CLOSE)

    def _flush(self) -> None:
        while self._queued and self._credit > 0:
            chunk = self._queued[0]
            part, rest = chunk[:self._credit], chunk[self._credit:]
            if rest:
                self._queued[0] = rest
            else:
                self._queued.pop(0)
            self._credit -= len(part)
            self._queued_size -= len(part)
            self.mux.send(self.ident, protocol.DATA, part)
        if not self._queued and self._eof_queued:
            self._eof_queued = False
            self._eof_sent = True
            self.mux.send(self.ident, protocol.EOF)
        self._tell_input_ended()
        if not self._queued and self._close_queued:
            self._close_queued = False
            self.close()
        if self._queued_size <= HIGH_WATER // 4 and self.session is not None:
            self.session.resume_input()

    def _tell_input_ended(self) -> None:
        """Once the EOF is sent and the helper has written out all before it (it gives back
        credit for what it has written to the guest's socket, and shuts it down for writing
        next, in the same turn), the client's way is done."""
        if self._eof_sent and self._credit == protocol.WINDOW and self.session is not None:
            self._eof_sent = False
            self.session.input_ended()

    # ---- from the guest
    def from_guest(self, op: int, payload: bytes) -> None:
        if self.session is None:
            self._early.append((op, payload))
            return
        if op == protocol.DATA:
            self.session.write(payload)
            if self._channel_paused:
                self._owed += len(payload)
            else:
                self.mux.send(self.ident, protocol.CREDIT, struct.pack(">I", len(payload)))
        elif op == protocol.CREDIT:
            self._credit += struct.unpack(">I", payload)[0]
            self._flush()
        elif op == protocol.EOF:
            self.session.write_eof()
        elif op == protocol.CLOSE:
            self.closed = True
            self.mux.forget(self.ident)
            self.session.close()

    def channel_paused(self) -> None:
        self._channel_paused = True

    def channel_resumed(self) -> None:
        self._channel_paused = False
        if self._owed:
            self.mux.send(self.ident, protocol.CREDIT, struct.pack(">I", self._owed))
            self._owed = 0


class TunnelMux:
    """The proxy end of one guest tunnel helper: opens streams and listeners, routes frames."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._next_id = 1
        self._buffer = bytearray()
        self._streams: dict[int, MuxStream] = {}
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._accept: dict[int, AcceptHandler] = {}
        self.lost: Exception | None = None
        link.attach(self)

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    def send(self, ident: int, op: int, payload: bytes = b"") -> None:
        if self.lost is None:
            self._link.send(protocol.frame(ident, op, payload))

    def forget(self, ident: int) -> None:
        self._streams.pop(ident, None)

    def close(self) -> None:
        self._link.close()

    async def _request(self, ident: int, op: int, payload: bytes) -> bytes:
        if self.lost is not None:
            raise OSError(errno.ECONNRESET, f"the guest relay is gone: {self.lost}")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self.send(ident, op, payload)
        return await future

    async def connect(self, host: str | None, port: int, path: str | None = None) -> MuxStream:
        """A connection from inside the guest to ``host``:``port`` (or unix ``path``)."""
        ident = self._new_id()
        stream = MuxStream(self, ident)
        self._streams[ident] = stream
        if path is not None:
            op, payload = protocol.CONNECT_UNIX, path.encode("utf-8", "surrogateescape")
        else:
            op, payload = protocol.CONNECT_TCP, f"{host}\0{port}".encode()
        try:
            await self._request(ident, op, payload)
        except BaseException:
            self._streams.pop(ident, None)
            raise
        return stream

    async def listen(self, accept: AcceptHandler, host: str | None = None, port: int = 0,
                     path: str | None = None, mode: int = 0o600) -> tuple[int, int]:
        """Listen inside the guest; return (listener id, port). Each accepted connection is
        handed to ``accept(stream, peer_host, peer_port)``."""
        ident = self._new_id()
        if path is not None:
            op, payload = protocol.LISTEN_UNIX, f"{path}\0{mode:o}".encode(
                "utf-8", "surrogateescape")
        else:
            op, payload = protocol.LISTEN_TCP, f"{host or ''}\0{port}".encode()
        self._accept[ident] = accept
        try:
            reply = await self._request(ident, op, payload)
        except BaseException:
            self._accept.pop(ident, None)
            raise
        return ident, struct.unpack(">I", reply)[0]

    def unlisten(self, ident: int) -> None:
        if self._accept.pop(ident, None) is not None:
            self.send(ident, protocol.UNLISTEN)

    # ---- LinkReceiver
    def link_data(self, data: bytes) -> None:
        self._buffer += data
        for frame in split_frames(self._buffer):
            _, ident, op = protocol.HEADER.unpack_from(frame)
            self._dispatch(ident, op, frame[protocol.HEADER.size:])

    def _dispatch(self, ident: int, op: int, payload: bytes) -> None:
        if op in (protocol.OPENED, protocol.LISTENING, protocol.FAILED):
            future = self._waiting.pop(ident, None)
            if future is not None and not future.done():
                if op == protocol.FAILED:
                    code, _, text = payload.decode(errors="replace").partition("\0")
                    future.set_exception(OSError(int(code or errno.EIO), text))
                else:
                    future.set_result(payload)
        elif op == protocol.ACCEPTED:
            listener, peer_host, peer_port = payload.decode(errors="replace").split("\0")
            handler = self._accept.get(int(listener))
            stream = MuxStream(self, ident)
            self._streams[ident] = stream
            if handler is None:
                stream.close()
            else:
                asyncio.get_running_loop().create_task(
                    handler(stream, peer_host, int(peer_port or 0)))
        else:
            known = self._streams.get(ident)
            if known is not None:
                known.from_guest(op, payload)

    def link_lost(self, exc: Exception | None) -> None:
        self.lost = exc or EOFError("the guest relay ended")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(OSError(errno.ECONNRESET, f"the guest relay ended: "
                                                               f"{self.lost}"))
        self._waiting.clear()
        for stream in list(self._streams.values()):
            stream.from_guest(protocol.CLOSE, b"")
        self._streams.clear()
