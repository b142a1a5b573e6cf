"""The client half of the seed SDK's SSH API: ``msb_proxy.ssh(sandbox)`` and what it returns.

:mod:`.namespace` has :func:`~.namespace.ssh` and :class:`~.namespace.SandboxSsh` (how a
sandbox is reached with the CLI's own settings), :mod:`.session` the native in-process client.
"""
