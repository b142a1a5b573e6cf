"""Write batching for the bulk data path.

asyncssh writes one SSH packet at a time (16 to 32 KiB) and the session writes one channel
packet at a time into the guest's stdin; written straight through, every packet costs a system
call. :class:`BatchedWriter` collects what is written during one event-loop turn and hands it to
the transport as one write at the end of that turn, which is when the data would have left
anyway: the latency is unchanged, the system calls drop roughly tenfold on a transfer.

"The end of that turn" is a ``call_soon``, which costs a turn of the event loop of its own (a
poll of the descriptors and the loop's bookkeeping). The read callbacks that cause almost all
writes (the client's packets, the guest's output) run inside :func:`batch` instead: what they
write is handed over when they return, and a request and its answer cost one loop turn each
rather than two. That is most of the per-message cost a file-by-file transfer pays here.

One write joins at most ``JOIN_SIZE`` bytes, and each piece is let go of once written: a turn
can collect far more (a session hands a process that has just started the 4 MiB its client sent
meanwhile), and one join copied it all while the pieces were still held, on top of what the
transport then copies of it for a guest that does not read.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["FEED_SIZE", "JOIN_SIZE", "BatchedWriter", "after_batch", "batch", "feed_slices"]

FEED_SIZE = 32 * 1024
JOIN_SIZE = 1 << 20  # a pipe's size: what one write can hand the kernel at most


class _Batches(threading.local):
    """Per thread (each runs its own event loop, with its own writers): how many batch() calls
    are running, and the writers written to inside them, to flush when they return."""

    depth = 0

    def __init__(self) -> None:
        self.dirty: list[BatchedWriter] = []
        self.after: list[Callable[[], object]] = []


_batches = _Batches()


def batch(callback: Callable[..., object], *args: Any) -> None:
    """Run ``callback(*args)``, then flush every writer it wrote to (even if it raised)."""
    batches = _batches
    batches.depth += 1
    try:
        callback(*args)
    finally:
        batches.depth -= 1
        if not batches.depth:
            if batches.dirty:
                _flush_dirty(batches.dirty)
            if batches.after:
                after, batches.after = batches.after, []
                for each in after:
                    each()


def after_batch(callback: Callable[[], object]) -> None:
    """Call ``callback()`` once the running :func:`batch` has returned and flushed what it
    wrote (at once when none is running); once per batch however often it is asked."""
    batches = _batches
    if not batches.depth:
        callback()
    elif callback not in batches.after:
        batches.after.append(callback)


def feed_slices(receive: Callable[[bytes], None], data: bytes, start: int = 0) -> None:
    """``receive(data[start:])`` in slices of ``FEED_SIZE``.

    asyncssh keeps its input as one bytes object and re-slices it after every packet, so
    handing it a whole 1 MiB read copies ~64 MiB; in slices of a few packets it copies the
    data about twice."""
    for offset in range(start, len(data), FEED_SIZE):
        receive(data[offset:offset + FEED_SIZE])


def _flush_dirty(dirty: list[BatchedWriter]) -> None:
    while dirty:
        dirty.pop(0).flush()


class BatchedWriter:
    """An ``asyncio.WriteTransport`` front that coalesces writes made within one loop turn."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self.transport.is_closing():
            return
        self._pending.append(data if isinstance(data, bytes) else bytes(data))
        self._pending_size += len(data)
        if not self._scheduled:
            self._schedule()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """``write`` of each, in one call."""
        if self.transport.is_closing():
            return
        pending = self._pending
        for data in list_of_data:
            if data:
                pending.append(data if isinstance(data, bytes) else bytes(data))
                self._pending_size += len(data)
        if pending and not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        """Flush when the running batch() returns, or else at the end of this loop turn."""
        self._scheduled = True
        if _batches.depth:
            _batches.dirty.append(self)
        else:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand everything collected so far to the transport now."""
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_size = 0
        if self.transport.is_closing():
            return
        if len(pending) == 1:
            self.transport.write(pending[0])
            return
        # From the back, so that each piece is let go of once it is written: what the
        # transport keeps it has copied.
        pending.reverse()
        while pending:
            group = [pending.pop()]
            size = len(group[0])
            while pending and size + len(pending[-1]) <= JOIN_SIZE:
                size += len(pending[-1])
                group.append(pending.pop())
            self.transport.write(group[0] if len(group) == 1 else b"".join(group))

    def close(self) -> None:
        """Write what is collected, then close once the transport has written it all."""
        self.flush()
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop what is collected and close at once."""
        self._pending.clear()
        self._pending_size = 0
        if not self.transport.is_closing():
            self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    @property
    def pending_size(self) -> int:
        """Bytes collected and not yet handed to the transport."""
        return self._pending_size

    def get_write_buffer_size(self) -> int:
        return self._pending_size + self.transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)
