"""Duplex streams inside one process: an in-memory pair (the native client's link to its own
server, no socket and no file descriptor), and adapters that make a connected socket or an
asyncio ``(StreamReader, StreamWriter)`` pair into a :class:`~.stdio.DuplexStream`.

The in-memory pair has no write buffer limit of its own: SSH's channel windows bound what
either side can have in flight, as they do over a socket.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from msb_proxy.transport.stdio import DuplexStream, SshSocketStream

__all__ = ["MemoryStream", "StreamPairStream", "as_duplex_stream", "duplex_pair"]

_READ_SIZE = 1 << 18


def duplex_pair() -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory streams: what one side writes, the other receives, in order."""
    first, second = MemoryStream(), MemoryStream()
    first._peer, second._peer = second, first
    return first, second


class MemoryStream:
    """One end of :func:`duplex_pair`; attach it once with ``create_connection``.

    Bytes written before the other end is attached wait for it (the server's version banner
    goes out before the client is there to read it)."""

    def __init__(self) -> None:
        self._peer: MemoryStream | None = None
        self._transport: _MemoryTransport | None = None
        self._waiting: list[Callable[[_MemoryTransport], None]] = []

    async def create_connection(
        self, protocol_factory: Callable[[], asyncio.Protocol], host: str = "", port: int = 0
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        if self._transport is not None:
            raise RuntimeError("this in-memory stream is already attached")
        loop = asyncio.get_running_loop()
        protocol = protocol_factory()
        self._transport = _MemoryTransport(loop, self, protocol)
        protocol.connection_made(self._transport)
        for event in self._waiting:
            loop.call_soon(event, self._transport)
        self._waiting.clear()
        return self._transport, protocol

    def _deliver(self, event: Callable[[_MemoryTransport], None]) -> None:
        """Run ``event`` on this end's transport in a later turn of the loop, in order."""
        transport = self._transport
        if transport is None:
            self._waiting.append(event)
        else:
            transport.loop.call_soon(event, transport)


class _MemoryTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, end: MemoryStream,
                 protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.lost = False
        self._end = end
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        peer = self._end._peer
        if self._closing or peer is None or not data:
            return
        chunk = bytes(data)
        peer._deliver(lambda transport: transport.received(chunk))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        peer = self._end._peer
        if peer is not None and not self._closing:
            peer._deliver(_MemoryTransport.eof)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        peer = self._end._peer
        if peer is not None:
            peer._deliver(_MemoryTransport.lose)
        self.loop.call_soon(self.lose)

    def abort(self) -> None:
        self.close()

    def received(self, data: bytes) -> None:
        if not self.lost:
            self.protocol.data_received(data)

    def eof(self) -> None:
        if not self.lost:
            self.protocol.eof_received()

    def lose(self) -> None:
        """The connection is over for this end: its peer closed it, or it closed itself."""
        self._closing = True
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    # Flow control is SSH's own (channel windows); reading is never paused for long enough
    # to matter, so these are accepted and ignored.
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class StreamPairStream:
    """An asyncio ``(StreamReader, StreamWriter)`` pair (from ``asyncio.open_connection`` or
    ``asyncio.start_server``) as one stream: the reader is pumped into the protocol, the
    protocol's writes go to the writer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def create_connection(
        self, protocol_factory: Callable[[], asyncio.Protocol], host: str = "", port: int = 0
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        protocol = protocol_factory()
        transport = _StreamPairTransport(self._reader, self._writer, protocol)
        protocol.connection_made(transport)
        transport.start()
        return transport, protocol


class _StreamPairTransport(asyncio.Transport):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self._pump: asyncio.Task[None] | None = None
        self._closing = False
        self._lost = False

    def start(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                self._protocol.data_received(data)
            if not self._closing:
                self._protocol.eof_received()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._end()

    def _end(self) -> None:
        if not self._lost:
            self._lost = True
            self._writer.close()
            self._protocol.connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._writer.write(bytes(data))

    def can_write_eof(self) -> bool:
        return self._writer.can_write_eof()

    def write_eof(self) -> None:
        self._writer.write_eof()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._pump is not None:
            self._pump.cancel()
        else:
            self._end()

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def as_duplex_stream(stream: object) -> DuplexStream:
    """``stream`` as a :class:`~.stdio.DuplexStream`: one already is, a connected
    ``socket.socket``, or an ``(asyncio.StreamReader, asyncio.StreamWriter)`` pair."""
    if isinstance(stream, socket.socket):
        return SshSocketStream(stream)
    if isinstance(stream, tuple) and len(stream) == 2 \
            and isinstance(stream[0], asyncio.StreamReader) \
            and isinstance(stream[1], asyncio.StreamWriter):
        return StreamPairStream(stream[0], stream[1])
    if callable(getattr(stream, "create_connection", None)):
        return stream  # type: ignore[return-value]
    raise TypeError("serve() takes an SshStdioStream, a connected socket.socket or an "
                    "(asyncio.StreamReader, asyncio.StreamWriter) pair, not "
                    f"{type(stream).__name__}")
