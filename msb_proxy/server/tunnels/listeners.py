"""``-R`` listeners: ``tcpip-forward`` and ``streamlocal-forward@openssh.com`` requests become
listeners the tunnel helper opens inside the guest.

Each connection one accepts comes back to the client as a ``forwarded-tcpip`` or
``forwarded-streamlocal@openssh.com`` channel. :class:`GuestListener` is such a listener in the
shape asyncssh's forwarding code expects, which closes it on ``cancel-tcpip-forward`` and at
the end of the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncssh

from msb_proxy.server.tunnels.channel import GuestEnd, TunnelSession, report_bug
from msb_proxy.server.tunnels.mux import MuxStream, TunnelMux

__all__ = ["GuestListener", "listen_in_guest", "open_to_client"]


class ForwardedSession(Protocol):
    """Makes the session of a channel carrying ``guest``, a connection a listener accepted,
    logged as a tunnel to ``target``."""

    def __call__(self, guest: GuestEnd, *, target: str) -> TunnelSession: ...


class GuestListener(asyncssh.SSHListener):
    """A ``-R`` listener inside the guest, as asyncssh's forwarding code expects one."""

    def __init__(self, mux: TunnelMux, ident: int, port: int) -> None:
        super().__init__()
        self._mux = mux
        self._ident = ident
        self._port = port
        self._closed = asyncio.Event()

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        self._mux.unlisten(self._ident)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def open_to_client(stream: MuxStream, open_channel: Callable[[], Awaitable[object]]
                         ) -> None:
    """Carry ``stream``, a connection a guest listener accepted, over the channel
    ``open_channel()`` opens to the client; if it cannot be had, the guest's connection is
    closed. It runs as a task of our own: nothing may escape it unhandled."""
    try:
        await open_channel()
    except (asyncssh.Error, OSError):  # the client refused the channel, or the connection went
        stream.close()
    except Exception as exc:
        stream.close()
        report_bug(exc)


async def listen_in_guest(mux: TunnelMux, conn: asyncssh.SSHServerConnection,
                          session: ForwardedSession, *, host: str | None,
                          port: int, path: str | None) -> GuestListener | None:
    """Listen in the guest on ``host``:``port`` (or unix ``path``) and forward each connection
    to the client over a channel whose session ``session(stream, target=...)`` makes (the
    target: the listener's address and the guest's peer); None when the guest refused the
    listener (asyncssh then fails the request)."""
    # As sshd with GatewayPorts no: -R listens on the guest's loopback.
    bind_host = None if path is not None else "127.0.0.1" if host in ("", "*", "localhost",
                                                                      "0.0.0.0") else host
    listen_port = 0

    async def accept(stream: MuxStream, peer_host: str, peer_port: int) -> None:
        if path is not None:
            await open_to_client(stream, lambda: conn.create_unix_connection(
                lambda: session(stream, target=path), path))
        else:
            target = f"{host or ''}:{listen_port} from {peer_host}:{peer_port}"
            await open_to_client(stream, lambda: conn.create_connection(
                lambda: session(stream, target=target), host or "", listen_port, peer_host,
                peer_port))

    try:
        ident, listen_port = await mux.listen(accept, host=bind_host, port=port, path=path)
    except OSError:
        return None
    return GuestListener(mux, ident, listen_port)
