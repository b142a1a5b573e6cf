"""Links to the helper programs msb-proxy runs inside a guest (``guest/files.py``,
``guest/tunnels.py``).

A helper runs as the login user and speaks a framed protocol over one byte stream each way. A
:class:`Link` is the proxy's end of that stream, whatever carries it: a socket (the local
backend forks helpers from its jail init, so the guest needs no Python) or a guest process's
stdin and stdout (``python3 -c`` of the helper's source, for any other backend). Whoever uses
the link sets its :class:`LinkReceiver`.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

__all__ = ["Link", "LinkReceiver", "SocketLink", "helper_source", "split_frames"]

HELPERS = ("files", "tunnels")


def helper_source(name: str) -> str:
    """The Python source of helper ``name`` (one of :data:`HELPERS`)."""
    if name not in HELPERS:
        raise ValueError(f"no guest helper {name!r}")
    return (Path(__file__).resolve().parents[1] / "guest" / f"{name}.py").read_text()


def split_frames(buffer: bytearray) -> Iterator[bytes]:
    """Take every complete length-prefixed frame off the front of ``buffer``.

    Both helper protocols frame messages as a 4-byte big-endian length and
    that many bytes; each yielded frame keeps its length prefix so callers can
    unpack their fixed headers at the offsets their protocol defines.  A
    partial frame stays in ``buffer`` for the next read.
    """
    while len(buffer) >= 4:
        (length,) = struct.unpack_from(">I", buffer)
        if len(buffer) < 4 + length:
            return
        frame = bytes(buffer[:4 + length])
        del buffer[:4 + length]
        yield frame


class LinkReceiver(Protocol):
    """What a :class:`Link` delivers to."""

    def link_data(self, data: bytes) -> None:
        """Bytes from the helper."""

    def link_lost(self, exc: Exception | None) -> None:
        """The helper is gone (``exc`` says why, when known); no more data will come."""


class Link:
    """The proxy's end of a helper's byte stream."""

    def __init__(self) -> None:
        self.receiver: LinkReceiver | None = None
        self._pending: list[bytes] = []
        self._lost: tuple[Exception | None] | None = None

    def attach(self, receiver: LinkReceiver) -> None:
        """Start delivering to ``receiver``, including anything that arrived before."""
        self.receiver = receiver
        for data in self._pending:
            receiver.link_data(data)
        self._pending.clear()
        if self._lost is not None:
            receiver.link_lost(self._lost[0])

    def _deliver(self, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver.link_data(data)
        else:
            self._pending.append(data)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost is not None:
            return
        self._lost = (exc,)
        if self.receiver is not None:
            self.receiver.link_lost(exc)

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the helper; never blocks."""
        raise NotImplementedError

    def close(self) -> None:
        """End the helper and release what carries the link."""
        raise NotImplementedError


class SocketLink(Link, asyncio.Protocol):
    """A link over a connected stream socket; ``keep`` is closed with it (e.g. the control
    connection whose closing ends the helper)."""

    def __init__(self, keep: object | None = None) -> None:
        Link.__init__(self)
        self._transport: asyncio.Transport | None = None
        self._keep = keep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._deliver(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc or EOFError("the guest helper ended"))

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        close = getattr(self._keep, "close", None)
        if close is not None:
            close()
