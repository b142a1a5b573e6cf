"""Giving back to the kernel the heap memory that a burst of traffic leaves behind.

A bulk transfer allocates and frees buffers of up to a few MiB every loop turn: the reads of
the client's and the guest's pipes, the packets sealed from them, the C relay's buffers. glibc's
malloc keeps freed memory for the next allocation and, once it has freed one such buffer, also
raises its own threshold for handing memory back (its "dynamic mmap threshold"). So after a
burst the process of a connection stays several MiB larger than it needs: a warm server's child
that had sent 300 MiB still held 17.8 MiB of memory of its own (USS) 15 s later, against 11.8
MiB for one that never moved data. Fixing the thresholds instead (``M_MMAP_THRESHOLD`` 256 KiB)
hands each buffer back at once, but costs a page fault per 4 KiB on every read: +22% CPU for a
1 GiB upload.

So :class:`HeapTrimmer` looks at the process's resident memory now and then and, when it has
grown by ``SLACK`` since the last look, asks glibc to hand its free pages back
(``malloc_trim``); the same child then holds 12.0 MiB. A look costs a read of
``/proc/self/statm``; the first comes ``FIRST_S`` after the start and after each trim, the
next ones ever more rarely (the wait doubles up to ``LAST_S``) while nothing grows, so that an
idle connection is not woken every second. Where there is no glibc or no ``/proc`` it does
nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable

__all__ = ["FIRST_S", "LAST_S", "SLACK", "HeapTrimmer"]

SLACK = 1 << 20  # growth of resident memory worth a trim
FIRST_S = 1.0
LAST_S = 32.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim(pad)``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


# Looked up once, at import: in a warm server that is before it forks, so that no child makes
# ctypes' objects for it of its own.
_TRIM = _malloc_trim()


def _resident() -> int | None:
    """This process's resident memory in bytes, or None where /proc cannot tell."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class HeapTrimmer:
    """Trims the C heap of this process on ``loop`` while it runs: :meth:`start` and
    :meth:`stop` it with the connection it serves. One per process is enough."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._interval = FIRST_S
        self._baseline = 0

    def start(self) -> None:
        resident = _resident()
        if _TRIM is None or resident is None or self._timer is not None:
            return
        self._baseline = resident
        self._timer = self._loop.call_later(self._interval, self._look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look(self) -> None:
        resident = _resident()
        if resident is None or _TRIM is None:
            self._timer = None
            return
        if resident - self._baseline > SLACK:
            _TRIM(0)
            # What trimming could not hand back (live data, pages shared with the warm server
            # that this process has since written) is the new baseline.
            self._baseline = _resident() or resident
            self._interval = FIRST_S
        else:
            self._baseline = min(self._baseline, resident)
            self._interval = min(self._interval * 2, LAST_S)
        self._timer = self._loop.call_later(self._interval, self._look)
