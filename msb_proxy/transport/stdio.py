"""Duplex streams an SSH connection can be served over.

A stream is anything with ``create_connection(protocol_factory, host, port)`` returning
``(transport, protocol)``, the shape asyncssh accepts as a tunnel. Two are provided:

* :class:`SshStdioStream`: this process's stdin and stdout, which OpenSSH hands a ProxyCommand
  as two pipes (not a socket). The analogue of the seed SDK's ``SshStdioStream``.
* :class:`SshSocketStream`: any connected stream socket (a socketpair in tests, an accepted unix
  socket in an embedding program).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from msb_proxy.transport.batching import FEED_SIZE, BatchedWriter, batch, feed_slices
from msb_proxy.transport.heap import HeapTrimmer

__all__ = ["ClientPipes", "DuplexStream", "SshSocketStream", "SshStdioStream"]

_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


class DuplexStream(Protocol):
    """A byte stream in both directions that one SSH connection can run over."""

    async def create_connection(
        self, protocol_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        """Attach a protocol from ``protocol_factory`` to the stream and return both.

        ``host`` and ``port`` are ignored; they are part of the shape asyncssh calls.
        """
        ...


class SshStdioStream:
    """This process's stdin (client to server) and stdout (server to client) as one stream.

    Both descriptors are switched to non-blocking mode. Nothing else may write to stdout while
    the stream is in use: every byte there is SSH protocol. While the stream is open the
    process hands back the heap memory bursts of traffic leave behind (:mod:`.heap`): it
    serves this one connection, as a ProxyCommand does.
    """

    def __init__(self, read_fd: int = 0, write_fd: int = 1) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd

    async def create_connection(
        self, protocol_factory: Callable[[], asyncio.Protocol], host: str = "", port: int = 0
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        protocol = protocol_factory()
        transport = _PipePairTransport(loop, protocol)
        await transport.attach(self._read_fd, self._write_fd)
        return transport, protocol


class SshSocketStream:
    """A connected stream socket as one stream."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def create_connection(
        self, protocol_factory: Callable[[], asyncio.Protocol], host: str = "", port: int = 0
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        return await loop.connect_accepted_socket(protocol_factory, self._sock)


@dataclass(frozen=True)
class ClientPipes:
    """The two descriptors of a pipe-pair transport, for code that serves them itself between
    turns of the event loop (the fast path's relay): it reads ``read_fd`` only when the loop's
    poller says so, and writes ``write_fd`` only while :meth:`_PipePairTransport.queued` is 0."""

    read_fd: int
    write_fd: int


class _PipePairTransport(asyncio.Transport):
    """One duplex transport over a read pipe and a write pipe.

    The protocol's ``connection_made`` runs before the read pipe is watched, so the first bytes
    the client sends (its version string) cannot reach a protocol that is not ready for them.

    ``after_read``, when set, is called after each read of the client's pipe has been handed to
    the protocol and what that wrote has been flushed: the hook a fast path attaches to.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._reader: asyncio.ReadTransport | None = None
        self._writer: BatchedWriter | None = None
        self._closing = False
        self._lost = False
        self._pipes: ClientPipes | None = None
        self._heap = HeapTrimmer(loop)
        self.after_read: Callable[[], None] | None = None

    async def attach(self, read_fd: int, write_fd: int) -> None:
        for fd in (read_fd, write_fd):  # bulk transfers: fewer, larger reads and writes
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        if _pollable(write_fd, select.EPOLLOUT):
            pipe, _ = await self._loop.connect_write_pipe(
                lambda: _WriteSide(self), os.fdopen(write_fd, "wb", buffering=0, closefd=False)
            )
            self._writer = BatchedWriter(pipe)
        else:
            self._writer = BatchedWriter(_BlockingWriter(write_fd))
        self._protocol.connection_made(self)
        if _pollable(read_fd, select.EPOLLIN):
            self._reader, _ = await self._loop.connect_read_pipe(
                lambda: _ReadSide(self), os.fdopen(read_fd, "rb", buffering=0, closefd=False)
            )
            if hasattr(self._reader, "max_size"):
                self._reader.max_size = _PIPE_SIZE  # read it whole
            if isinstance(self._writer.transport, asyncio.WriteTransport) and not isinstance(
                    self._writer.transport, _BlockingWriter):
                self._pipes = ClientPipes(read_fd, write_fd)
        else:
            self._reader = _ThreadReader(self._loop, read_fd, _ReadSide(self))
        self._heap.start()

    # ---- asyncio.Transport
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._heap.stop()
        if self._reader is not None:
            self._reader.close()
        if self._writer is not None:
            self._writer.close()  # flushes what is buffered first

    def abort(self) -> None:
        self._closing = True
        self._heap.stop()
        if self._reader is not None:
            self._reader.close()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.writelines(list_of_data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def get_write_buffer_size(self) -> int:
        return self._writer.get_write_buffer_size() if self._writer is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._writer is not None:
            self._writer.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        if self._reader is not None and not self._reader.is_closing():
            self._reader.pause_reading()

    def resume_reading(self) -> None:
        if self._reader is not None and not self._reader.is_closing():
            self._reader.resume_reading()

    def is_reading(self) -> bool:
        return self._reader is not None and self._reader.is_reading()

    # ---- for a fast path (see ClientPipes)
    def pipes(self) -> ClientPipes | None:
        """Both descriptors when both are pollable pipes and open; None otherwise."""
        if self._pipes is None or self._closing or self._lost:
            return None
        return self._pipes

    def queued(self) -> int:
        """Bytes written to this transport that have not reached the pipe yet."""
        return self.get_write_buffer_size()

    def batched(self) -> int:
        """Of those, the bytes still collected by the write batching (not yet handed to the
        pipe's own transport, whose queue keeps the order of what :meth:`write_now` adds)."""
        return self._writer.pending_size if self._writer is not None else 0

    def write_now(self, data: bytes) -> None:
        """Write ``data`` past the batching, behind what the pipe's transport holds: call only
        while :meth:`batched` is 0, or the order on the wire breaks."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.transport.write(data)

    # ---- from the two sides
    def _lose(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.close()
            self._protocol.connection_lost(exc)


class _ReadSide(asyncio.Protocol):
    def __init__(self, owner: _PipePairTransport) -> None:
        self._owner = owner

    def data_received(self, data: bytes) -> None:
        receive = self._owner._protocol.data_received
        if len(data) <= FEED_SIZE or getattr(receive, "takes_any_size", False):
            batch(receive, data)
        else:
            batch(feed_slices, receive, data)
        after_read = self._owner.after_read
        if after_read is not None:
            after_read()

    def eof_received(self) -> bool:
        self._owner._lose(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lose(exc)


class _WriteSide(asyncio.Protocol):
    def __init__(self, owner: _PipePairTransport) -> None:
        self._owner = owner

    def pause_writing(self) -> None:
        self._owner._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._owner._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # the client closed its end of our stdout
            self._owner._lose(exc)


def _pollable(fd: int, events: int) -> bool:
    """Whether epoll accepts ``fd``: not so for regular files and /dev/null (``ssh ... </dev/null``
    style redirections of a ProxyCommand run by hand)."""
    poller = select.epoll()
    try:
        poller.register(fd, events)
    except PermissionError:
        return False
    finally:
        poller.close()
    return True


class _ThreadReader(asyncio.ReadTransport):
    """Reads a descriptor epoll refuses, in a thread, feeding ``protocol`` on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: asyncio.Protocol):
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._running = threading.Event()
        self._running.set()
        self._closed = False
        threading.Thread(target=self._pump, name="msb-proxy-stdin", daemon=True).start()

    def _pump(self) -> None:
        exc: Exception | None = None
        try:
            while not self._closed:
                self._running.wait()
                data = os.read(self._fd, 256 * 1024)
                if not data:
                    break
                self._loop.call_soon_threadsafe(self._deliver, data)
        except OSError as error:
            exc = error
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._finish, exc)

    def _deliver(self, data: bytes) -> None:
        if not self._closed:
            self._protocol.data_received(data)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        if exc is None:
            self._protocol.eof_received()
        self._closed = True
        self._protocol.connection_lost(exc)

    def pause_reading(self) -> None:
        self._running.clear()

    def resume_reading(self) -> None:
        self._running.set()

    def is_reading(self) -> bool:
        return self._running.is_set()

    def close(self) -> None:
        self._closed = True
        self._running.set()

    def is_closing(self) -> bool:
        return self._closed


class _BlockingWriter(asyncio.WriteTransport):
    """Writes to a descriptor epoll refuses (a regular file, /dev/null): such writes never block."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view and not self._closed:
            view = view[os.write(self._fd, view):]

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        self._closed = True

    def abort(self) -> None:
        self._closed = True

    def is_closing(self) -> bool:
        return self._closed
