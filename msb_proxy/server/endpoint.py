"""The SSH server side of one sandbox, as an importable API (the seed SDK's ``SshServer``).

::

    server = await SshServer.prepare(backend, "api", SshServerOptions(host_key_path=...))
    await server.serve(SshStdioStream())      # one connection; call again for the next

``prepare`` loads the host key and the authorized keys once; ``serve`` runs one SSH connection
over any :class:`~msb_proxy.transport.stdio.DuplexStream`. The sandbox is opened while the key
exchange runs, so its start-up overlaps the handshake; the version banner goes out first.

Authentication is public key only. The SSH login name is the guest user unless the options name
one for every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from msb_proxy import __version__
from msb_proxy.backends.base import Backend, GuestUser, Sandbox
from msb_proxy.config import SandboxTemplate
from msb_proxy.errors import UnknownUserError, UserError
from msb_proxy.fastpath import receive as recvpath
from msb_proxy.fastpath import send as sendpath
from msb_proxy.fastpath import umac
from msb_proxy.progress import Progress
from msb_proxy.server.keys import AuthorizedKeys, load_or_create_host_key
from msb_proxy.server.session import Activity, GuestSession, Login
from msb_proxy.server.tunnels.forward import Tunnels
from msb_proxy.transport.stdio import DuplexStream

__all__ = ["SshServer", "SshServerOptions"]

SERVER_VERSION = f"msb_proxy_{__version__}"
LOGIN_TIMEOUT_S = 120
KEEPALIVE_COUNT_MAX = 3  # unanswered keepalives before the client counts as gone, as sshd
# Offered ciphers, best first. asyncssh runs chacha20-poly1305 as three OpenSSL calls per packet,
# which caps a transfer at a third of what AES-GCM or AES-CTR with an EtM MAC reach on a CPU
# with AES instructions; there we leave it out, and OpenSSH clients settle on AES (their next
# choice). Without AES instructions chacha20 is the faster one and goes first.
AES_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr",
               "aes256-ctr"]
CHACHA = "chacha20-poly1305@openssh.com"


@dataclass(frozen=True)
class SshServerOptions:
    """How to serve a sandbox.

    ``host_key`` (an in-memory private key) wins over ``host_key_path``; with neither, an
    ephemeral ed25519 key is generated. Accepted client keys are the union of
    ``authorized_keys_paths`` and ``authorized_keys`` (public key lines); an empty union is an
    error. ``user`` runs every session as that guest user whatever the SSH login name.
    ``accept_env`` adds glob patterns of client variables to pass on (sshd's ``AcceptEnv``).
    ``template`` says how the sandbox is created if it is missing, and carries the
    per-sandbox settings (default login user, session environment, keepalive, inactivity
    timeout); ``progress`` is told about starting and creating it.
    """

    host_key_path: Path | None = None
    host_key: asyncssh.SSHKey | None = None
    authorized_keys_paths: Sequence[Path] = ()
    authorized_keys: Sequence[str] = ()
    user: str | None = None
    sftp: bool = True
    accept_env: tuple[str, ...] = ()
    template: SandboxTemplate = field(default_factory=SandboxTemplate)
    progress: Progress | None = None


class SshServer:
    """A prepared SSH endpoint for one sandbox; reusable for any number of connections."""

    def __init__(self, backend: Backend, sandbox: str, options: SshServerOptions,
                 host_key: asyncssh.SSHKey, authorized: AuthorizedKeys) -> None:
        self.backend = backend
        self.sandbox = sandbox
        self.options = options
        self.host_key = host_key
        self.authorized = authorized

    @classmethod
    async def prepare(cls, backend: Backend, sandbox: str,
                      options: SshServerOptions | None = None) -> SshServer:
        """Load keys for serving ``sandbox`` of ``backend``; the sandbox itself is not touched.

        Raises :class:`UserError` when no authorized key is found.
        """
        options = options or SshServerOptions()
        if options.host_key is not None:
            host_key = options.host_key
        elif options.host_key_path is not None:
            host_key = load_or_create_host_key(options.host_key_path)
        else:
            host_key = asyncssh.generate_private_key("ssh-ed25519")
        authorized = AuthorizedKeys()
        for path in options.authorized_keys_paths:
            authorized.add_file(path)
        for number, line in enumerate(options.authorized_keys, start=1):
            authorized.add_text(line, f"authorized key {number}")
        if not authorized:
            shown = ", ".join(str(p) for p in options.authorized_keys_paths) or "(none given)"
            raise UserError(
                f"no authorized keys found in {shown}; add one with "
                "'msb-proxy authorize --file ~/.ssh/id_ed25519.pub'"
            )
        return cls(backend, sandbox, options, host_key, authorized)

    async def serve(self, stream: DuplexStream,
                    on_error: Callable[[UserError], None] | None = None,
                    hangup: asyncio.Event | None = None) -> Sandbox | None:
        """Serve one SSH connection over ``stream`` until either side closes it, or ``hangup``
        is set (the client is known to be gone).

        Returns the sandbox the connection used (None if it never got that far).
        ``on_error`` is called as soon as a failure the user should see happens (the sandbox
        cannot be opened, the login user does not exist), while the client is still connected;
        the same error is then raised once the connection is over. A client that simply
        disconnects or fails to authenticate is a normal end.
        """
        loop = asyncio.get_running_loop()
        options = self.options
        progress = options.progress or Progress(quiet=True)

        def report(error: UserError) -> None:
            progress.close()  # an error must not land on the end of an open progress line
            if on_error is not None:
                on_error(error)

        umac.install()
        gate = _Gatekeeper(self, report)
        gate.sandbox_task = loop.create_task(
            self.backend.open(self.sandbox, options.template, progress))
        try:
            conn = await asyncssh.connect_reverse(
                "", 0,
                tunnel=stream,
                config=None,
                server_factory=lambda: gate,
                server_host_keys=[self.host_key],
                server_version=SERVER_VERSION,
                encoding=None,
                line_editor=False,
                allow_pty=True,
                x11_forwarding=False,
                agent_forwarding=False,
                allow_scp=False,
                password_auth=False,
                kbdint_auth=False,
                gss_host=None,
                login_timeout=LOGIN_TIMEOUT_S,
                keepalive_interval=options.template.keepalive,
                keepalive_count_max=KEEPALIVE_COUNT_MAX,
                encryption_algs=_preferred_ciphers(),
            )
        except (asyncssh.Error, OSError):
            conn = None
        finally:
            progress.close()
        if conn is not None:
            idle = loop.create_task(gate.close_when_unused(options.template.inactivity_timeout))
            closed = loop.create_task(conn.wait_closed())
            waits: set[asyncio.Task[Any]] = {idle, closed}
            if hangup is not None:
                waits.add(loop.create_task(hangup.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not closed.done():
                conn.abort()
                await conn.wait_closed()
            for task in waits:
                task.cancel()
        sandbox = await gate.release()
        if gate.failure is not None:
            raise gate.failure
        return sandbox


def _preferred_ciphers() -> list[str]:
    if _cpu_has_aes():
        return AES_CIPHERS
    return [CHACHA, *AES_CIPHERS]


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


class _Gatekeeper(asyncssh.SSHServer):
    """Authentication and channel policy for one connection."""

    def __init__(self, server: SshServer, on_error: Callable[[UserError], None] | None) -> None:
        self._server = server
        self._on_error = on_error
        self._conn: asyncssh.SSHServerConnection | None = None
        self.sandbox_task: asyncio.Task[Sandbox] | None = None
        self.failure: UserError | None = None
        self._login: Login | None = None
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
        sendpath.install(conn)
        recvpath.install(conn)

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
        options = self._server.options
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
                            tunnels=self.tunnels)
        return True

    async def _lookup_user(self, sandbox: Sandbox, name: str) -> GuestUser:
        """``name`` as a guest user; a name the guest lacks falls back to the template's user
        (``ssh msb-api`` sends your laptop's user name unless told otherwise)."""
        try:
            return await sandbox.lookup_user(name)
        except UnknownUserError:
            fallback = self._server.options.template.user
            if fallback is None or fallback == name or self._server.options.user:
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
        return self._login is not None and self._server.authorized.allows(key)

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
