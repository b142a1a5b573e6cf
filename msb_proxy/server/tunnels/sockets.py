"""Tunnels over sockets of the sandbox's network namespace: ``-L`` and ``-D`` to an IP
address with no guest process in the data path, as with sshd.

A backend that can (the local one: its jail init makes them) hands out unconnected TCP
sockets that live in the sandbox's network namespace (:meth:`Sandbox.tcp_socket
<msb_proxy.backends.base.Sandbox.tcp_socket>`); we connect one to the target and carry the
channel over it, with the kernel's own flow control on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket

from msb_proxy.backends.base import Sandbox
from msb_proxy.server.tunnels.channel import HIGH_WATER, TunnelSession, channel_open_error

__all__ = ["connect_direct"]


class SocketTunnel(asyncio.Protocol):
    """``-L``/``-D`` to an address in the sandbox over a socket of its network namespace that
    the backend handed us (:meth:`Sandbox.tcp_socket`): no guest process in the data path, as
    with sshd, and the kernel's own flow control on the socket."""

    def __init__(self) -> None:
        self.session: TunnelSession | None = None
        self._transport: asyncio.Transport | None = None
        self._eof = False  # the client half-closed
        self._shut = False  # ... and the socket is shut down for writing
        self._lost = False

    # ---- the socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]
        transport.pause_reading()  # type: ignore[attr-defined]  # until the channel is open

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.write(data)

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.write_eof()
        return True  # half-closed: the client may still send

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.session is not None:
            self.session.close()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_input()

    def resume_writing(self) -> None:
        if self._eof and not self._shut:  # all the client sent is out: now its EOF
            self._shutdown()
        if self.session is not None:
            self.session.resume_input()

    # ---- the channel
    def attach(self, session: TunnelSession) -> None:
        self.session = session
        if self._lost:
            session.close()
        elif self._transport is not None:
            self._transport.resume_reading()

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._eof and not self._transport.is_closing():
            self._transport.write(data)

    def send_eof(self) -> None:
        transport = self._transport
        if transport is None or self._eof or transport.is_closing():
            return
        self._eof = True
        if transport.get_write_buffer_size():
            # Not the transport's write_eof(): its shutdown() after the buffer drains would
            # raise where nothing of ours can catch it. With no water marks, resume_writing()
            # comes once the buffer is empty, and shuts down then.
            transport.set_write_buffer_limits(high=0, low=0)
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        assert self._transport is not None
        self._shut = True
        # ENOTCONN: the guest closed or reset before the client's data and EOF came. As sshd
        # (nchan.c, chan_shutdown_write: "shutdown failure is allowed") that only ends this
        # direction; the channel closes once the client has seen the guest's EOF or reset.
        with contextlib.suppress(OSError):
            self._transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        if self.session is not None:
            self.session.input_ended()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # what the channel sent is written out first

    def channel_paused(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def channel_resumed(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()


async def connect_direct(sandbox: Sandbox, host: str, port: int) -> SocketTunnel | None:
    """Connect to ``host``, an IP address, in the sandbox on a socket of its network
    namespace; None when the backend has no such sockets. A failed connect raises the
    channel open error."""
    version = ipaddress.ip_address(host).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = await sandbox.tcp_socket(family)
    if sock is None:
        return None
    loop = asyncio.get_running_loop()
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        _, tunnel = await loop.create_connection(SocketTunnel, sock=sock)
    except OSError as exc:
        sock.close()
        if exc.errno:  # asyncio's text names the address; sshd gives the system's words
            exc = OSError(exc.errno, os.strerror(exc.errno))
        raise channel_open_error(exc) from None
    except BaseException:
        sock.close()
        raise
    return tunnel
