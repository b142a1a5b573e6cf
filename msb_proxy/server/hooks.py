"""What a fast path may attach to one connection: the server's side of that contract.

The server moves every byte through asyncssh's public API. A fast path (``msb_proxy.fastpath``,
the only code that reaches into asyncssh's private state) is optional and never imported from
here: whoever builds the :class:`~msb_proxy.server.endpoint.SshServer` passes a factory in
:attr:`~msb_proxy.server.endpoint.SshServerOptions.connection_hooks`, the server calls it once
per connection, and the sessions of that connection call the returned :class:`ConnectionHooks`
at the three points below. This base class is the plain path, complete on its own: with no
factory, or when a fast path declines a connection, it is what runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import asyncssh

from msb_proxy.backends.base import GuestProcess

__all__ = ["ConnectionHooks", "HooksFactory", "RelayedSession"]


class RelayedSession(Protocol):
    """What a fast path may ask of a session channel whose process it serves."""

    @property
    def closed(self) -> bool:
        """Whether the channel has closed (the process may still be running)."""
        ...

    def output_received(self, data: bytes, stderr: bool) -> None:
        """Hand process output to the channel the usual way (with flow control)."""
        ...


class ConnectionHooks:
    """The data-path hooks of one connection; this class is asyncssh's own path."""

    def write_channel(self, chan: asyncssh.SSHServerChannel[bytes], data: bytes,
                      datatype: int | None) -> None:
        """Send ``data`` on ``chan`` (``datatype`` None: stdout; else extended data, stderr).

        Called for every chunk of process output a session sends, at most 32 KiB at a time.
        Must send exactly what ``chan.write(data, datatype)`` sends, in order; the default
        calls that.
        """
        chan.write(data, datatype)

    def process_started(self, session: RelayedSession, chan: asyncssh.SSHServerChannel[bytes],
                        process: GuestProcess) -> None:
        """Called once ``process`` runs for ``session`` and every byte queued before it started
        has been handed to it. A fast path may serve its pipes from now on (see
        :meth:`~msb_proxy.backends.base.GuestProcess.raw_pipes`); the default does nothing.
        """

    def process_ended(self, session: RelayedSession) -> None:
        """Called when ``session``'s process has exited or its channel has closed, before the
        process is hung up; after it, nothing of that process may be touched. Default: nothing.
        """

    def output_delivered(self) -> None:
        """Called after each chunk of process output has been handed to the channel. Default:
        nothing."""


HooksFactory = Callable[[asyncssh.SSHServerConnection], ConnectionHooks]
