"""The SSH server side: asyncssh glue that turns SSH semantics into calls on the backend seam.

``endpoint`` (the importable :class:`SshServer`), ``policy`` (authentication and what a
connection may open), ``session`` (session channels: exec, shell, PTY, env, signals),
``keys`` and ``known_hosts``, ``transfers/`` (SFTP and scp) and ``tunnels/`` (port and socket
forwarding, the agent). Each module owns the data path of its channels.
"""

from __future__ import annotations

from msb_proxy.server.endpoint import SshServer, SshServerOptions

__all__ = ["SshServer", "SshServerOptions"]
