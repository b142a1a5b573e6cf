"""msb-proxy: reach microsandbox sandboxes with the OpenSSH tools you already use.

The public API, imported lazily so that ``msb-proxy`` starts fast::

    from msb_proxy import SshServer, SshServerOptions, SshStdioStream, LocalBackend

    client = await msb_proxy.ssh("api").connect()    # the seed's sb.ssh() namespace
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from msb_proxy.version import __version__

__all__ = [
    "DEFAULT_SSH_HOST",
    "DEFAULT_SSH_PORT",
    "Backend",
    "LocalBackend",
    "MicrosandboxBackend",
    "Sandbox",
    "SandboxSsh",
    "SshClient",
    "SshOutput",
    "SshServer",
    "SshServerOptions",
    "SshSocketStream",
    "SshStdioStream",
    "UserError",
    "__version__",
    "ssh",
]

_EXPORTS = {
    "Backend": "msb_proxy.backends.base",
    "Sandbox": "msb_proxy.backends.base",
    "LocalBackend": "msb_proxy.backends.local.backend",
    "MicrosandboxBackend": "msb_proxy.backends.microsandbox.backend",
    "SshServer": "msb_proxy.server.endpoint",
    "SshServerOptions": "msb_proxy.server.endpoint",
    "SshSocketStream": "msb_proxy.transport.stdio",
    "SshStdioStream": "msb_proxy.transport.stdio",
    "UserError": "msb_proxy.errors",
    "DEFAULT_SSH_HOST": "msb_proxy.client.namespace",
    "DEFAULT_SSH_PORT": "msb_proxy.client.namespace",
    "SandboxSsh": "msb_proxy.client.namespace",
    "ssh": "msb_proxy.client.namespace",
    "SshClient": "msb_proxy.client.session",
    "SshOutput": "msb_proxy.client.session",
}

if TYPE_CHECKING:
    from msb_proxy.backends.base import Backend, Sandbox
    from msb_proxy.backends.local.backend import LocalBackend
    from msb_proxy.backends.microsandbox.backend import MicrosandboxBackend
    from msb_proxy.client.namespace import DEFAULT_SSH_HOST, DEFAULT_SSH_PORT, SandboxSsh, ssh
    from msb_proxy.client.session import SshClient, SshOutput
    from msb_proxy.errors import UserError
    from msb_proxy.server.endpoint import SshServer, SshServerOptions
    from msb_proxy.transport.stdio import SshSocketStream, SshStdioStream


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'msb_proxy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
