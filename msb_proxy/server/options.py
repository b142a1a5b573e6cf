"""How an :class:`~msb_proxy.server.endpoint.SshServer` serves its sandbox: one immutable
set of options, given once to ``SshServer.prepare``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from msb_proxy.config import SandboxTemplate
from msb_proxy.progress import Progress
from msb_proxy.server.hooks import HooksFactory

__all__ = ["SshServerOptions"]


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
    timeout, and the connection's limits: see :mod:`msb_proxy.server.policy`); ``progress``
    is told about starting and creating it. ``connection_hooks`` is called once per
    connection for the hooks its data path runs through (see :mod:`msb_proxy.server.hooks`;
    ``msb_proxy.fastpath.install`` is the one msb-proxy has); None runs asyncssh's own path.
    ``session`` names the named session the connection's shells attach to unless the client
    names one (``ssh msb-api+work``; see :mod:`msb_proxy.server.session`).
    ``home`` is the ``MSB_PROXY_HOME`` whose ``audit/`` and ``recordings/`` take the audit
    log and the terminal recordings when the template turns ``audit`` or ``record`` on
    (see :mod:`msb_proxy.server.audit`, :mod:`msb_proxy.server.recording`); without one such
    a template is refused by ``SshServer.prepare``.
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
    connection_hooks: HooksFactory | None = None
    session: str | None = None
    home: Path | None = None
