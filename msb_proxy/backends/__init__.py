"""Sandbox runtimes behind one seam (see ``base``); ``open_backend`` picks one by name."""

from __future__ import annotations

from ..config import Config
from ..state import StateDir
from .base import Backend

__all__ = ["open_backend"]


def open_backend(config: Config, name: str | None = None) -> Backend:
    """The backend called ``name`` (default: the configured one), imported only when chosen."""
    state = StateDir(config.home)
    if (name or config.backend) == "local":
        from .local import LocalBackend

        return LocalBackend(state, config.rootfs)
    from .microsandbox import MicrosandboxBackend

    return MicrosandboxBackend(state)
