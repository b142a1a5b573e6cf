"""Tunnels: ``-L``, ``-D``, ``-R``, unix sockets both ways, and agent forwarding, in the guest.

:class:`Tunnels` answers a connection's forwarding requests and picks what carries each:

* ``direct-tcpip`` to an IP address: a socket of the sandbox's network namespace when the
  backend can hand one out (:mod:`.sockets`), so the data path has no guest process in it, as
  with sshd.
* Everything else goes through one guest tunnel helper per connection (``guest/tunnels.py``,
  started on the first tunnel, as the login user; :mod:`.mux` is our end of it):
  ``direct-tcpip`` to a name and ``direct-streamlocal@openssh.com`` are connections it makes
  from inside the sandbox; ``tcpip-forward`` and ``streamlocal-forward@openssh.com`` are
  listeners it opens there (:mod:`.listeners`); agent forwarding is a unix listener there too
  (:mod:`.agent`).
* Where the guest has no Python to run the helper (a backend other than the local one), ``-L``
  and ``-D`` fall back to one ``socat``, ``nc`` or ``bash /dev/tcp`` process per channel
  (:mod:`.processes`); ``-R`` and agent forwarding then report what the sandbox lacks.

Every channel is a :class:`~.channel.TunnelSession` in front of one of those, logged as a
tunnel of its kind (``local``, ``unix``, ``remote``, ``remote-unix``, ``agent``) when the
connection is audited. A connection to a
refused or unreachable target fails the channel open with the ``connect failed`` reason code
and the system's text, as sshd does, without holding up the connection's other channels.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
from collections.abc import Callable

import asyncssh

from msb_proxy.backends.base import GuestUser, Sandbox
from msb_proxy.errors import UserError
from msb_proxy.server.audit import ConnectionAudit
from msb_proxy.server.tunnels.agent import open_agent_listener
from msb_proxy.server.tunnels.channel import (
    CONNECT_FAILED,
    GuestEnd,
    TunnelSession,
    channel_open_error,
    report_bug,
)
from msb_proxy.server.tunnels.listeners import GuestListener, listen_in_guest
from msb_proxy.server.tunnels.mux import TunnelMux
from msb_proxy.server.tunnels.processes import connect_with_tool
from msb_proxy.server.tunnels.sockets import connect_direct

__all__ = ["Tunnels"]

_MAX_PORT = 0xFFFF


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Tunnels:
    """Every tunnel of one SSH connection, and the guest tunnel helper they share."""

    def __init__(self, sandbox: Sandbox, user: GuestUser,
                 conn: asyncssh.SSHServerConnection, opened: Callable[[], None],
                 closed: Callable[[], None], *, audit: ConnectionAudit | None = None) -> None:
        self._sandbox = sandbox
        self._audit = audit
        self._user = user
        self._conn = conn
        self._opened = opened
        self._closed = closed
        self._mux: TunnelMux | None = None
        self._mux_error: UserError | None = None
        self._starting = asyncio.Lock()
        self._ended = False
        self._direct = True  # try sockets of the sandbox's namespace before the helper
        self.agent_path: str | None = None

    async def mux(self) -> TunnelMux:
        """The connection's guest tunnel helper, started on first use."""
        async with self._starting:
            if self._mux is None or self._mux.lost is not None:
                if self._mux_error is not None:
                    raise self._mux_error
                try:
                    link = await self._sandbox.start_helper(self._user, "tunnels")
                except UserError as exc:
                    self._mux_error = exc
                    raise
                self._mux = TunnelMux(link)
                if self._ended:
                    # The connection ended while the helper started (a tcpip-forward and at
                    # once EOF; tests/test_fuzz.py): close() has run, so it would be left
                    # running in the guest for as long as this process lives.
                    self._mux.close()
                    raise OSError(errno.ECONNABORTED, "the SSH connection has ended")
            return self._mux

    def close(self) -> None:
        self._ended = True
        if self._mux is not None:
            self._mux.close()

    def _session(self, guest: GuestEnd, *, kind: str, target: str) -> TunnelSession:
        self._opened()
        return TunnelSession(guest, on_close=self._closed, audit=self._audit, kind=kind,
                             target=target)

    # ---- direct-tcpip, direct-streamlocal@openssh.com
    async def connect(self, host: str | None, port: int,
                      path: str | None = None) -> TunnelSession:
        """The channel's session, connected to ``host``:``port`` (or unix ``path``) in the
        guest. asyncssh awaits this in a task of the connection's, where anything but
        :class:`asyncssh.ChannelOpenError` would end the connection: every failure becomes
        this channel's open failure."""
        if path is None and not 0 <= port <= _MAX_PORT:
            # The port is a uint32 on the wire; sshd refuses what is not a port, as here.
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "invalid target port")
        kind, target = ("unix", path) if path is not None else ("local", f"{host}:{port}")
        try:
            return self._session(await self._connect(host, port, path), kind=kind,
                                 target=target)
        except asyncssh.ChannelOpenError:
            raise
        except (UserError, OSError) as exc:
            raise channel_open_error(exc) from None
        except Exception as exc:
            report_bug(exc)
            raise asyncssh.ChannelOpenError(
                CONNECT_FAILED, f"msb-proxy: internal error: {type(exc).__name__}: {exc}"
            ) from None

    async def _connect(self, host: str | None, port: int, path: str | None) -> GuestEnd:
        # An address: a socket of the sandbox's namespace. A name: the helper, for the guest
        # resolves it.
        if path is None and host is not None and self._direct and _is_address(host):
            direct = await connect_direct(self._sandbox, host, port)
            if direct is not None:
                return direct
            self._direct = False  # the backend hands out no sockets: stop asking
        try:
            mux = await self.mux()
        except UserError:
            if path is not None or host is None:
                raise asyncssh.ChannelOpenError(
                    CONNECT_FAILED, f"sandbox {self._sandbox.name!r} cannot run the relay unix "
                                    "sockets need (it has no python3)") from None
            return await connect_with_tool(self._sandbox, self._user, host, port)
        return await mux.connect(host, port, path)

    # ---- tcpip-forward, streamlocal-forward@openssh.com
    async def listen(self, host: str | None, port: int,
                     path: str | None = None) -> GuestListener | None:
        """A listener in the guest; None when it cannot be had (asyncssh: "failed"), as
        anything else escaping asyncssh's task for the request would end the connection."""
        if path is None and not 0 <= port <= _MAX_PORT:
            return None
        kind = "remote" if path is None else "remote-unix"
        try:
            mux = await self.mux()
            listener = await listen_in_guest(mux, self._conn,
                                             functools.partial(self._session, kind=kind),
                                             host=host, port=port, path=path)
        except (UserError, OSError):
            return None
        except Exception as exc:
            report_bug(exc)
            return None
        if listener is not None and self._audit is not None:
            self._audit.event("tunnel-listen", kind=kind, target=path if path is not None else
                              f"{host}:{listener.get_port()}")
        return listener

    # ---- auth-agent-req@openssh.com
    async def start_agent(self) -> bool:
        """Make the guest socket sessions find the client's agent at (``SSH_AUTH_SOCK``)."""
        if self.agent_path is not None:
            return True
        create_channel = getattr(self._conn, "create_agent_channel", None)
        if create_channel is None:
            return False
        try:
            mux = await self.mux()
            self.agent_path = await open_agent_listener(mux, create_channel, self._session)
            if self._audit is not None:
                self._audit.event("tunnel-listen", kind="agent", target=self.agent_path)
        except (UserError, OSError):
            return False
        except Exception as exc:  # asyncssh's caller would end the connection
            report_bug(exc)
            return False
        return True
