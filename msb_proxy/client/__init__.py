"""The client half of the seed SDK's SSH API: ``msb_proxy.ssh(sandbox)`` and what it returns.

:mod:`.namespace` has :func:`~.namespace.ssh` and :class:`~.namespace.SandboxSsh` (how a
sandbox is reached with the CLI's own settings), :mod:`.session` the native in-process client.
"""

__all__ = ["DEFAULT_SSH_HOST", "DEFAULT_SSH_PORT"]

# Here, not in namespace.py, so that the CLI's argument parser can name them without importing
# asyncssh (every command line is parsed, `msb-proxy ls` included).
DEFAULT_SSH_HOST = "127.0.0.1"
"""Where ``msb-proxy serve`` listens unless told otherwise (the seed's constant)."""
DEFAULT_SSH_PORT = 2222
"""The port ``msb-proxy serve`` listens on unless told otherwise (the seed's constant)."""
