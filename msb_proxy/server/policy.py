"""Authentication and channel policy for one SSH connection.

Public key only (the keys of :class:`~msb_proxy.server.keys.AuthorizedKeys`); the login user is
resolved in the guest before any key is checked, so a sandbox that cannot be opened ends the
connection with its reason. Session channels become
:class:`~msb_proxy.server.session.GuestSession`; forwarding requests go to the connection's
:class:`~msb_proxy.server.tunnels.Tunnels`; X11 and anything else is refused.

The connection's limits are the template's, enforced as sshd enforces its own:

* ``max_auth_tries`` (MaxAuthTries): every refused ``userauth-request`` counts, a key offered
  without a signature and refused too, except a first ``none`` (auth2.c, ``userauth_finish``);
  the last one is answered with sshd's disconnect, "Too many authentication failures".
* ``login_grace_time`` (LoginGraceTime): not authenticated in time, the connection ends without
  a word to the client, as sshd's does; the reason goes to stderr.
* ``max_channels``: a ``session``, ``direct-tcpip`` or ``direct-streamlocal@openssh.com`` open
  while that many channels are open or opening is refused with the failure sshd sends past
  MaxSessions (``connect failed``); the connection and its other channels go on.

Once authenticated, the connection's ``connect`` audit event names the key that did it and
both users (see :mod:`msb_proxy.server.audit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from msb_proxy.backends.base import GuestUser, Sandbox
from msb_proxy.errors import UnknownUserError, UserError
from msb_proxy.server.audit import ConnectionAudit
from msb_proxy.server.hooks import ConnectionHooks
from msb_proxy.server.keys import AuthorizedKeys
from msb_proxy.server.options import SshServerOptions
from msb_proxy.server.session import Activity, GuestSession, Login
from msb_proxy.server.tunnels import Tunnels

__all__ = ["ConnectionPolicy"]

T = TypeVar("T")

# sshd's words and code when MaxAuthTries is reached (auth.c, auth_maxtries_exceeded, through
# ssh_packet_disconnect): `ssh` prints "Received disconnect from ...:2: Too many authentication
# failures".
TOO_MANY_AUTH_FAILURES = "Too many authentication failures"


class ConnectionPolicy(asyncssh.SSHServer):
    """Authentication and channel policy for one connection (asyncssh's ``SSHServer``)."""

    def __init__(self, options: SshServerOptions, authorized: AuthorizedKeys,
                 on_error: Callable[[UserError], None] | None, *,
                 audit: ConnectionAudit | None = None, recordings: Path | None = None) -> None:
        """``audit`` takes the connection's audit events (default: none logged);
        ``recordings`` is where its terminal sessions are recorded (None: not)."""
        self._options = options
        self._audit = audit or ConnectionAudit()
        self._recordings = recordings
        self._login_name = ""
        self.logged_in = False  # the client authenticated
        self._key: asyncssh.SSHKey | None = None
        self._authorized = authorized
        self._on_error = on_error
        self._conn: asyncssh.SSHServerConnection | None = None
        self.sandbox_task: asyncio.Task[Sandbox] | None = None
        self.failure: UserError | None = None
        self._login: Login | None = None
        self._hooks = ConnectionHooks()
        self.activity = Activity()
        self.tunnels: Tunnels | None = None
        self._opening = 0  # channels the client asked for that are not open yet
        self._keys_checked = 0  # publickey requests, signed or not
        self._auth_refusals = 0
        self._auth_failures = 0  # refusals as sshd counts them
        self._grace_timer: asyncio.TimerHandle | None = None

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
        # Every refusal of a userauth-request, whatever the method, goes out through this one
        # method of the connection; asyncssh has no limit or hook of its own for them.
        conn.send_userauth_failure = self._auth_failed(conn)  # type: ignore[method-assign,assignment]
        grace = self._options.template.login_grace_time
        if grace > 0:
            self._grace_timer = asyncio.get_running_loop().call_later(grace, self._grace_over)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_grace_timer()
        if self.sandbox_task is not None and not self.sandbox_task.done():
            self.sandbox_task.cancel()

    def auth_completed(self) -> None:
        self.logged_in = True
        self._stop_grace_timer()
        if self._login is not None:
            key = self._key
            self._audit.connected(
                key_fingerprint=key.get_fingerprint("sha256") if key is not None else "",
                key_type=key.get_algorithm() if key is not None else "",
                login_user=self._login_name, guest_user=self._login.user.name)

    async def begin_auth(self, username: str) -> bool:
        """Resolve the login user in the guest before any key is checked (``userauth-request``).

        Waits for the sandbox, started when the connection began. A sandbox that cannot be
        opened ends the connection with its reason; an unknown user just never authenticates,
        as with sshd, after the reason is reported.
        """
        assert self.sandbox_task is not None
        options = self._options
        self._login_name = username
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
        except Exception as exc:  # a bug, ours or the backend's: one line, and the client is
            asyncio.get_running_loop().call_exception_handler(  # told rather than dropped
                {"message": "opening the sandbox failed", "exception": exc})
            if self._conn is not None:
                self._conn.disconnect(asyncssh.DISC_SERVICE_NOT_AVAILABLE,
                                      f"msb-proxy: internal error: {type(exc).__name__}: {exc}")
            return True
        template = options.template
        assert self._conn is not None
        self.tunnels = Tunnels(sandbox, user, self._conn, opened=self.activity.opened,
                               closed=self.activity.closed, audit=self._audit)
        # asyncssh would make the agent socket on this host; ours lives in the guest.
        self._conn.create_agent_listener = self.tunnels.start_agent  # type: ignore[method-assign]
        if self._login is None:
            sandbox.watch_end(lambda: self._sandbox_ended(sandbox.name))
        self._login = Login(sandbox=sandbox, user=user,
                            accept_env=options.accept_env + template.accept_env,
                            sftp=options.sftp, env=dict(template.env), activity=self.activity,
                            tunnels=self.tunnels, hooks=self._hooks,
                            max_env=template.max_env, session=options.session,
                            session_timeout=template.session_timeout, audit=self._audit,
                            recordings=self._recordings)
        return True

    def _sandbox_ended(self, name: str) -> None:
        """The sandbox stopped, was removed or died: every channel went with it, and a tunnel
        could open none, so end the connection (``ssh -N -L`` too) with the reason, which
        ``ssh`` prints as its one line."""
        if self._conn is not None:
            self._conn.disconnect(asyncssh.DISC_BY_APPLICATION,
                                  f"msb-proxy: sandbox {name!r} is no longer "
                                  "running; connect again to start it")

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
        """A ``publickey`` request, with or without a signature: is ``key`` authorized?"""
        self._keys_checked += 1
        allowed = self._login is not None and self._authorized.allows(key)
        if allowed:  # the signed request that follows names the same key
            self._key = key
        return allowed

    def _auth_failed(self, conn: asyncssh.SSHServerConnection) -> Callable[[bool], None]:
        """``send_userauth_failure`` counting failures as sshd does: a first ``none`` is free
        (OpenSSH's client opens with it to learn the methods); the one that reaches
        ``max_auth_tries`` ends the connection instead of being answered."""
        send = conn.send_userauth_failure

        def failed(partial_success: bool) -> None:
            # asyncssh shows us no method name: a refusal before any key was checked answers
            # the client's first request. Were that not "none" but a method we never offer,
            # it goes uncounted where sshd counts it: one more try that cannot succeed.
            opening = self._auth_refusals == 0 and self._keys_checked == 0
            self._auth_refusals += 1
            if not opening:
                self._auth_failures += 1
            if self._auth_failures >= self._options.template.max_auth_tries:
                conn.disconnect(asyncssh.DISC_PROTOCOL_ERROR, TOO_MANY_AUTH_FAILURES)
            else:
                send(partial_success)

        return failed

    def _grace_over(self) -> None:
        """``login_grace_time`` passed unauthenticated: end the connection as sshd does, with
        no message to the client (its child just exits), and say why on stderr."""
        self._grace_timer = None
        grace = self._options.template.login_grace_time
        self._fail(UserError(f"timeout before authentication: not logged in within {grace:g} s "
                             "(login_grace_time in config.toml)"))
        if self._conn is not None:
            self._conn.abort()

    def _stop_grace_timer(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    # ---- channels: session, and the client's tunnels (ssh -L / -D and its unix socket form)
    def session_requested(self) -> Any:
        if self._login is None:
            return False
        login = self._login
        return self._open_channel(lambda: GuestSession(login))

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        """``direct-tcpip``: a connection from inside the guest (asyncssh awaits it)."""
        if self.tunnels is None:
            return False
        tunnels = self.tunnels
        return self._open_channel(lambda: tunnels.connect(dest_host, dest_port))

    def unix_connection_requested(self, dest_path: str) -> Any:
        """``direct-streamlocal@openssh.com``: a guest unix socket."""
        if self.tunnels is None:
            return False
        tunnels = self.tunnels
        return self._open_channel(lambda: tunnels.connect(None, 0, path=dest_path))

    def _open_channel(self, open_session: Callable[[], T | Awaitable[T]]) -> Awaitable[T]:
        """The answer to a channel open: ``open_session()``, unless ``max_channels`` channels
        are open or opening (raises ``ChannelOpenError``: that open fails, nothing else).

        A channel counts as opening from its request until its session is made (it then
        counts as open in :class:`Activity`, in the same step) or its open fails. Channels
        the guest opens toward the client (``ssh -R`` connections, the agent) count as open
        too, but are not refused: the client asked for them when it asked for the listener.
        """
        limit = self._options.template.max_channels
        if self.activity.open + self._opening >= limit:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED,
                f"too many channels open on this connection (max_channels is {limit})")
        self._opening += 1
        # A task, not a bare coroutine: asyncssh drops the answer to an open that races the
        # connection's end, and a coroutine never awaited would neither give its slot back nor
        # keep quiet (Python warns about it on stderr, the client's terminal).
        task = asyncio.get_running_loop().create_task(self._opened(open_session))
        task.add_done_callback(_retrieved)
        return task

    async def _opened(self, open_session: Callable[[], T | Awaitable[T]]) -> T:
        try:
            session = open_session()
            if inspect.isawaitable(session):
                return await session
            return session
        finally:
            self._opening -= 1

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """``tcpip-forward``: a listener in the guest (port 0: the guest picks one)."""
        return self.tunnels.listen(listen_host, listen_port) if self.tunnels else False

    def unix_server_requested(self, listen_path: str) -> Any:
        """``streamlocal-forward@openssh.com``: a unix socket listener in the guest."""
        return self.tunnels.listen(None, 0, path=listen_path) if self.tunnels else False


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Mark the outcome of a channel open as seen: asyncssh reports it to the client when it
    awaits it, and nobody needs it when it did not."""
    if not task.cancelled():
        task.exception()
