"""msb-proxy: reach microsandbox sandboxes with the OpenSSH tools you already use.

The public API, imported lazily so that ``msb-proxy`` starts fast::

    from msb_proxy import SshServer, SshServerOptions, SshStdioStream, LocalBackend
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "LocalBackend",
    "MicrosandboxBackend",
    "Sandbox",
    "SshServer",
    "SshServerOptions",
    "SshSocketStream",
    "SshStdioStream",
    "UserError",
    "__version__",
]

_EXPORTS = {
    "Backend": "msb_proxy.backends.base",
    "Sandbox": "msb_proxy.backends.base",
    "LocalBackend": "msb_proxy.backends.local",
    "MicrosandboxBackend": "msb_proxy.backends.microsandbox",
    "SshServer": "msb_proxy.server",
    "SshServerOptions": "msb_proxy.server",
    "SshSocketStream": "msb_proxy.stdio",
    "SshStdioStream": "msb_proxy.stdio",
    "UserError": "msb_proxy.errors",
}

if TYPE_CHECKING:
    from .backends.base import Backend, Sandbox
    from .backends.local import LocalBackend
    from .backends.microsandbox import MicrosandboxBackend
    from .errors import UserError
    from .server import SshServer, SshServerOptions
    from .stdio import SshSocketStream, SshStdioStream


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'msb_proxy' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
