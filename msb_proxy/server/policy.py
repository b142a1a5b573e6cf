"""Authentication and channel policy for one SSH connection.

Public key only (the keys of :class:`~msb_proxy.server.keys.AuthorizedKeys`); the login user is
resolved in the guest before any key is checked, so a sandbox that cannot be opened ends the
connection with its reason. Session channels become
:class:`~msb_proxy.server.session.GuestSession`; forwarding requests go to the connection's
:class:`~msb_proxy.server.tunnels.Tunnels`; X11 and anything else is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncssh

from msb_proxy.backends.base import GuestUser, Sandbox
from msb_proxy.errors import UnknownUserError, UserError
from msb_proxy.server.hooks import ConnectionHooks
from msb_proxy.server.keys import AuthorizedKeys
from msb_proxy.server.options import SshServerOptions
from msb_proxy.server.session import Activity, GuestSession, Login
from msb_proxy.server.tunnels import Tunnels

__all__ = ["ConnectionPolicy"]


class ConnectionPolicy(asyncssh.SSHServer):
    """Authentication and channel policy for one connection (asyncssh's ``SSHServer``)."""

    def __init__(self, options: SshServerOptions, authorized: AuthorizedKeys,
                 on_error: Callable[[UserError], None] | None) -> None:
        self._options = options
        self._authorized = authorized
        self._on_error = on_error
        self._conn: asyncssh.SSHServerConnection | None = None
        self.sandbox_task: asyncio.Task[Sandbox] | None = None
        self.failure: UserError | None = None
        self._login: Login | None = None
        self._hooks = ConnectionHooks()
        self.activity = Activity()
        self.tunnels: Tunnels | None = None

    def _fail(self, error: UserError) -> None:
        if self.failure is None:
            self.failure = error
            if self._on_error is not None:
                self._on_error(error)

    async def release(self) -> Sandbox | None:
        """Let go of the sandbox at the end of the connection; return it if it was opened."""
        if self.tunnels is not None:
            self.tunnels.close()
        task = self.sandbox_task
        if task is None:
            return None
        if not task.done():
            task.cancel()
        try:
            sandbox = await task
        except BaseException:
            return None
        with contextlib.suppress(Exception):
            await sandbox.close()
        return sandbox

    async def close_when_unused(self, timeout: float) -> None:
        """Disconnect once no channel has been open for ``timeout`` seconds (0: never).

        Like OpenSSH's UnusedConnectionTimeout: an idle shell keeps its connection, a
        connection nobody uses any more (a forgotten ControlMaster) ends, so the sandbox can
        idle-stop.
        """
        if timeout <= 0:
            return
        while True:
            await asyncio.sleep(min(timeout, 30.0) / 4)
            unused = self.activity.unused_for()
            if unused is not None and unused >= timeout and self._conn is not None:
                self._conn.disconnect(asyncssh.DISC_BY_APPLICATION,
                                      f"msb-proxy: no channel open for {timeout:.0f} s")
                return

    # ---- asyncssh.SSHServer
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        factory = self._options.connection_hooks
        if factory is not None:
            self._hooks = factory(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sandbox_task is not None and not self.sandbox_task.done():
            self.sandbox_task.cancel()

    async def begin_auth(self, username: str) -> bool:
        """Resolve the login user in the guest before any key is checked (``userauth-request``).

        Waits for the sandbox, started when the connection began. A sandbox that cannot be
        opened ends the connection with its reason; an unknown user just never authenticates,
        as with sshd, after the reason is reported.
        """
        assert self.sandbox_task is not None
        options = self._options
        try:
            sandbox = await self.sandbox_task
            user = await self._lookup_user(sandbox, options.user or username)
        except UnknownUserError as exc:
            self._fail(exc)
            return True
        except UserError as exc:
            self._fail(exc)
            if self._conn is not None:
                self._conn.disconnect(asyncssh.DISC_SERVICE_NOT_AVAILABLE, f"msb-proxy: {exc}")
            return True
        template = options.template
        assert self._conn is not None
        self.tunnels = Tunnels(sandbox, user, self._conn, opened=self.activity.opened,
                               closed=self.activity.closed)
        # asyncssh would make the agent socket on this host; ours lives in the guest.
        self._conn.create_agent_listener = self.tunnels.start_agent  # type: ignore[method-assign]
        self._login = Login(sandbox=sandbox, user=user,
                            accept_env=options.accept_env + template.accept_env,
                            sftp=options.sftp, env=dict(template.env), activity=self.activity,
                            tunnels=self.tunnels, hooks=self._hooks)
        return True

    async def _lookup_user(self, sandbox: Sandbox, name: str) -> GuestUser:
        """``name`` as a guest user; a name the guest lacks falls back to the template's user
        (``ssh msb-api`` sends your laptop's user name unless told otherwise)."""
        try:
            return await sandbox.lookup_user(name)
        except UnknownUserError:
            fallback = self._options.template.user
            if fallback is None or fallback == name or self._options.user:
                raise
            return await sandbox.lookup_user(fallback)

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._login is not None and self._authorized.allows(key)

    def session_requested(self) -> GuestSession | bool:
        if self._login is None:
            return False
        return GuestSession(self._login)

    # ---- forwarding: ssh -L / -D, -R, and their unix socket forms
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        """``direct-tcpip``: a connection from inside the guest (asyncssh awaits it)."""
        return self.tunnels.connect(dest_host, dest_port) if self.tunnels else False

    def unix_connection_requested(self, dest_path: str) -> Any:
        """``direct-streamlocal@openssh.com``: a guest unix socket."""
        return self.tunnels.connect(None, 0, path=dest_path) if self.tunnels else False

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """``tcpip-forward``: a listener in the guest (port 0: the guest picks one)."""
        return self.tunnels.listen(listen_host, listen_port) if self.tunnels else False

    def unix_server_requested(self, listen_path: str) -> Any:
        """``streamlocal-forward@openssh.com``: a unix socket listener in the guest."""
        return self.tunnels.listen(None, 0, path=listen_path) if self.tunnels else False
