"""``msb_proxy.ssh(sandbox)``: the SSH namespace of one sandbox, as the seed SDK's ``sb.ssh()``.

::

    import msb_proxy

    async with await msb_proxy.ssh("api").connect() as client:
        out = await client.exec("python3 -V")

Without an explicit backend the sandbox is reached with the CLI's own settings
(``MSB_PROXY_HOME``, ``MSB_PROXY_BACKEND``, ``MSB_PROXY_ROOTFS``, ``config.toml``), so a
script and ``ssh msb-NAME`` see the same sandboxes, keys and templates. Nothing is loaded or
connected until a method is called.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from msb_proxy.client import DEFAULT_SSH_HOST, DEFAULT_SSH_PORT
from msb_proxy.errors import UserError

if TYPE_CHECKING:
    from msb_proxy.backends.base import Backend
    from msb_proxy.client.session import SshClient
    from msb_proxy.config import Config, SandboxTemplate
    from msb_proxy.server.endpoint import SshServer
    from msb_proxy.server.hooks import HooksFactory

__all__ = ["DEFAULT_SSH_HOST", "DEFAULT_SSH_PORT", "SandboxSsh", "ssh"]


_CLIENT_KEY_TYPE = "ssh-ed25519"


def ssh(sandbox: object, *, backend: Backend | None = None) -> SandboxSsh:
    """The SSH namespace of ``sandbox``: a sandbox name, or a ``microsandbox.Sandbox`` object
    (then the microsandbox backend serves it). ``backend`` overrides the configured one."""
    return SandboxSsh(sandbox, backend=backend)


@dataclass(frozen=True)
class _Settings:
    config: Config
    template: SandboxTemplate
    backend: Backend


class SandboxSsh:
    """The SSH client and server helpers of one sandbox. Cheap: nothing happens until a
    method is called, and each call reads the settings afresh."""

    def __init__(self, sandbox: object, *, backend: Backend | None = None,
                 environ: Mapping[str, str] | None = None, config: Config | None = None
                 ) -> None:
        """``environ`` (default ``os.environ``) is where the settings are read from;
        ``config``, settings already read (the CLI's), is used as it is."""
        from msb_proxy.config import sandbox_name_from_host

        forced: str | None = None
        if isinstance(sandbox, str):
            name = sandbox
        else:
            attribute = getattr(sandbox, "name", None)
            if not isinstance(attribute, str):
                raise TypeError("ssh() takes a sandbox name or a microsandbox.Sandbox, not "
                                f"{type(sandbox).__name__}")
            name, forced = attribute, "microsandbox"
        self.name = sandbox_name_from_host(name, None)
        self._backend = backend
        self._backend_name = forced
        self._environ = environ
        self._config = config

    def __repr__(self) -> str:
        return f"SandboxSsh({self.name!r})"

    def _settings(self) -> _Settings:
        from msb_proxy.backends import registry
        from msb_proxy.config import load_config

        config = self._config or load_config(
            os.environ if self._environ is None else self._environ, registry,
            backend=self._backend_name)
        template = config.template(self.name)
        backend = self._backend or registry.open_backend(config, template.backend)
        return _Settings(config, template, backend)

    # ---- the client
    async def connect(self, *, user: str = "root", term: str | None = None,
                      sftp: bool = True) -> SshClient:
        """A native in-process SSH client logged in to the sandbox as ``user``.

        The client and a server of our own (the one ``ssh msb-NAME`` talks to, with its
        fast path) are joined by an in-memory stream: no socket, no OpenSSH. Both keys are
        ephemeral and the client's is accepted only on that stream. The sandbox is started
        or created as for ``ssh``, with the same progress on stderr, and audited and recorded
        as its template says. ``term`` (default
        ``$TERM``, else ``xterm``) names the terminal of PTY requests; ``sftp=False`` refuses
        the SFTP subsystem. Raises :class:`UserError` when the sandbox cannot be reached.
        """
        from msb_proxy.backends.idle import ConnectionTracker
        from msb_proxy.client.session import SshClient
        from msb_proxy.progress import Progress
        from msb_proxy.server.endpoint import SshServer, SshServerOptions
        from msb_proxy.state import StateDir

        settings = self._settings()
        client_key = asyncssh.generate_private_key(_CLIENT_KEY_TYPE)
        options = SshServerOptions(
            host_key=asyncssh.generate_private_key(_CLIENT_KEY_TYPE),
            authorized_keys=[client_key.export_public_key("openssh").decode()],
            sftp=sftp, template=settings.template,
            progress=Progress(quiet=settings.config.quiet),
            connection_hooks=data_path(settings.config), home=settings.config.home)
        server = await SshServer.prepare(settings.backend, self.name, options)
        tracker = ConnectionTracker(StateDir(settings.config.home), self.name,
                                    settings.template, os.environ)
        return await SshClient.open(server, client_key, user=user,
                                    term=term or os.environ.get("TERM") or "xterm",
                                    tracker=tracker)

    open_client = connect
    connect_with = connect
    open_client_with = connect

    # ---- the server
    async def server(self, *, host_key_path: str | os.PathLike[str] | None = None,
                     host_key: asyncssh.SSHKey | str | bytes | None = None,
                     authorized_keys_path: str | os.PathLike[str]
                     | Sequence[str | os.PathLike[str]] | None = None,
                     authorized_key: str | Sequence[str] | None = None,
                     user: str | None = None, sftp: bool = True) -> SshServer:
        """A reusable SSH server endpoint for the sandbox; ``serve(stream)`` runs one
        connection, any number of them at once.

        ``host_key`` (an asyncssh key or private key text) wins over ``host_key_path``; with
        neither, the sandbox's own persistent host key (the one ``ssh msb-NAME`` pins) is
        used. Accepted client keys are those of ``authorized_keys_path`` (one path or several)
        and ``authorized_key`` (one public key line or a list); with neither, the keys the CLI
        accepts. No usable key raises :class:`UserError` naming where it looked. ``user`` runs
        every session as that guest user; ``sftp=False`` refuses the SFTP subsystem. Its
        connections are audited and recorded as the sandbox's template says, under
        ``MSB_PROXY_HOME`` as with ``ssh``.
        """
        from msb_proxy.progress import Progress
        from msb_proxy.server.endpoint import SshServer, SshServerOptions
        from msb_proxy.state import StateDir

        settings = self._settings()
        paths = _paths(authorized_keys_path)
        lines = [authorized_key] if isinstance(authorized_key, str) else list(authorized_key or ())
        if not paths and not lines:
            paths = default_authorized_keys(settings.config)
        key = _private_key(host_key)
        key_path = Path(host_key_path) if host_key_path is not None else None
        if key is None and key_path is None:
            key_path = StateDir(settings.config.home).host_key(self.name)
        options = SshServerOptions(
            host_key_path=key_path, host_key=key, authorized_keys_paths=paths,
            authorized_keys=lines, user=user, sftp=sftp, template=settings.template,
            progress=Progress(quiet=settings.config.quiet),
            connection_hooks=data_path(settings.config), home=settings.config.home)
        return await SshServer.prepare(settings.backend, self.name, options)

    prepare_server = server
    server_with = server
    prepare_server_with = server


def default_authorized_keys(config: Config) -> list[Path]:
    """The client keys the CLI accepts: msb-proxy's own file, microsandbox's, ``~/.ssh/*.pub``."""
    from msb_proxy.state import StateDir

    return [StateDir(config.home).authorized_keys,
            config.user_home / ".microsandbox" / "ssh" / "authorized_keys",
            *sorted((config.user_home / ".ssh").glob("*.pub"))]


def data_path(config: Config) -> HooksFactory | None:
    """The fast path for every connection, unless MSB_PROXY_FASTPATH=0 turned it off."""
    if not config.fastpath:
        import logging

        logging.getLogger("msb_proxy.fastpath").debug(
            "fast path not installed (MSB_PROXY_FASTPATH=0): asyncssh's own path")
        return None
    from msb_proxy import fastpath

    return functools.partial(fastpath.install, relay_loop=config.relay_loop)


def _paths(value: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
           ) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(item) for item in value]


def _private_key(value: asyncssh.SSHKey | str | bytes | None) -> asyncssh.SSHKey | None:
    if value is None or isinstance(value, asyncssh.SSHKey):
        return value
    try:
        return asyncssh.import_private_key(value)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise UserError(f"host_key is not a usable private key: {exc}") from None
