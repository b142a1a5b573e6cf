"""The SSH end of every tunnel channel: :class:`TunnelSession`, and :class:`GuestEnd`, what it
asks of whatever carries the connection inside the sandbox.

Every forwarding channel (``direct-tcpip``, ``direct-streamlocal@openssh.com``, the
``forwarded-*`` channels of ``-R``, ``auth-agent@openssh.com``) is one :class:`TunnelSession`
in front of one guest end: a stream of the tunnel helper (:mod:`.mux`), a socket of the
sandbox's network namespace (:mod:`.sockets`) or a guest process (:mod:`.processes`). The
session is written once so that each guest end deals only in plain calls, and flow control
between the channel and the guest end works the same for all of them. It is also where a
tunnel's ``tunnel-open`` and ``tunnel-close`` audit events come from, the latter with the
bytes it carried each way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import asyncssh

from msb_proxy.errors import UserError
from msb_proxy.server.audit import ConnectionAudit

__all__ = ["CONNECT_FAILED", "HIGH_WATER", "GuestEnd", "SessionFactory", "TunnelSession",
           "channel_open_error", "report_bug"]

CONNECT_FAILED = asyncssh.OPEN_CONNECT_FAILED
#: What a channel or a guest end buffers before the other side is told to stop sending.
HIGH_WATER = 256 * 1024
TunnelChannel = asyncssh.SSHTCPChannel[bytes] | asyncssh.SSHUNIXChannel[bytes]


class GuestEnd(Protocol):
    """The guest side of one tunnel channel, as :class:`TunnelSession` drives it."""

    def attach(self, session: TunnelSession) -> None:
        """The channel is open: deliver to ``session`` from now on (and what came before)."""

    def send(self, data: bytes) -> None:
        """Channel data from the client, for the guest."""

    def send_eof(self) -> None:
        """The client half-closed the channel. Once everything it sent is written into the
        guest and the guest's side is shut for writing, call the session's
        :meth:`TunnelSession.input_ended` (a guest end that cannot tell never calls it, and its
        channel then ends only when one side closes it)."""

    def close(self) -> None:
        """The channel is closed: end the connection in the guest."""

    def channel_paused(self) -> None:
        """The channel's send buffer is full: stop reading from the guest."""

    def channel_resumed(self) -> None:
        """The channel's send buffer has drained: read from the guest again."""


class SessionFactory(Protocol):
    """Makes the session of a new tunnel channel carried by ``guest``, logged as a tunnel of
    ``kind`` to ``target``."""

    def __call__(self, guest: GuestEnd, *, kind: str, target: str) -> TunnelSession: ...


class TunnelSession(asyncssh.SSHTCPSession[bytes], asyncssh.SSHUNIXSession[bytes]):
    """An SSH forwarding channel carried by a :class:`GuestEnd`; ``on_close`` is called once
    when the channel goes. ``audit`` takes its open and close events, as a tunnel of
    ``kind`` to ``target`` (see :mod:`msb_proxy.server.audit`)."""

    def __init__(self, guest: GuestEnd, on_close: Callable[[], None] | None = None, *,
                 audit: ConnectionAudit | None = None, kind: str = "",
                 target: str = "") -> None:
        self._guest = guest
        self._chan: TunnelChannel | None = None
        self._on_close = on_close
        self._input_paused = False
        self._audit = audit if audit is not None and audit.enabled else None
        self._kind = kind
        self._target = target
        self._channel = -1
        self._from_client = 0
        self._to_client = 0
        self._ended_from_client = False
        self._ended_to_client = False

    def connection_made(self, chan: TunnelChannel) -> None:
        self._chan = chan
        chan.set_write_buffer_limits(high=HIGH_WATER)
        if self._audit is not None:
            self._channel = self._audit.next_channel()
            self._audit.event("tunnel-open", channel=self._channel, kind=self._kind,
                              target=self._target)
        self._to_guest(self._guest.attach, self)

    # ---- from the client
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._from_client += len(data)
        self._to_guest(self._guest.send, data)

    def eof_received(self) -> bool:
        self._to_guest(self._guest.send_eof)
        return True

    def pause_writing(self) -> None:
        self._to_guest(self._guest.channel_paused)

    def resume_writing(self) -> None:
        self._to_guest(self._guest.channel_resumed)

    def connection_lost(self, exc: Exception | None) -> None:
        self._to_guest(self._guest.close)
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        if self._audit is not None:
            self._audit.event("tunnel-close", channel=self._channel, kind=self._kind,
                              target=self._target, bytes_from_client=self._from_client,
                              bytes_to_client=self._to_client)
            self._audit = None

    def _to_guest(self, call: Callable[..., None], *args: object) -> None:
        """``call(*args)`` on the guest end from one of asyncssh's callbacks, where whatever
        escapes ends the whole connection (asyncssh's internal_error): a failing guest end
        closes its own channel instead, and the connection's other channels carry on."""
        try:
            call(*args)
        except Exception as exc:
            self.close()
            if not isinstance(exc, OSError):  # the guest's socket or process went: no bug
                report_bug(exc)

    # ---- from the guest
    def write(self, data: bytes) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._to_client += len(data)
            self._chan.write(data)

    def write_eof(self) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write_eof()
        self._ended_to_client = True
        self._close_when_both_ended()

    def input_ended(self) -> None:
        """The guest end has written all the client sent, then its EOF: this way is done."""
        self._ended_from_client = True
        self._close_when_both_ended()

    def _close_when_both_ended(self) -> None:
        """Both ways have ended (all of the client's data and EOF written into the guest, the
        guest's EOF sent to the client): close the channel, as sshd does once its socket is
        written to the end and read to the end (channels.c, nchan.c), so that ``ssh -W``
        exits when the guest's end is done. What is queued for the client goes out first."""
        if self._ended_from_client and self._ended_to_client:
            self.close()

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()

    def pause_input(self) -> None:
        if self._chan is not None and not self._input_paused:
            self._input_paused = True
            self._chan.pause_reading()

    def resume_input(self) -> None:
        if self._chan is not None and self._input_paused:
            self._input_paused = False
            self._chan.resume_reading()


def report_bug(exc: Exception) -> None:
    """Tell of a bug of ours in a tunnel as of any other, without ending the connection: the
    loop's exception handler prints it as one "internal error" line (the traceback under
    ``--debug``)."""
    asyncio.get_running_loop().call_exception_handler(
        {"message": "a tunnel failed", "exception": exc})


def channel_open_error(exc: OSError | UserError) -> asyncssh.ChannelOpenError:
    """The open failure sshd sends for a connection that could not be made: the reason code
    (which the client prints as "connect failed") and the system's text."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return asyncssh.ChannelOpenError(CONNECT_FAILED, reason)
