"""Sandbox runtimes behind one seam (see ``base``); ``open_backend`` picks one by name."""

from __future__ import annotations

from msb_proxy.backends.base import Backend
from msb_proxy.config import Config
from msb_proxy.state import StateDir

__all__ = ["open_backend"]


def open_backend(config: Config, name: str | None = None) -> Backend:
    """The backend called ``name`` (default: the configured one), imported only when chosen."""
    state = StateDir(config.home)
    if (name or config.backend) == "local":
        from msb_proxy.backends.local.backend import LocalBackend

        return LocalBackend(state, config.rootfs)
    from msb_proxy.backends.microsandbox.backend import MicrosandboxBackend

    return MicrosandboxBackend(state)
