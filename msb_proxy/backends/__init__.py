"""Sandbox runtimes behind one seam (see ``base``); ``open_backend`` picks one by name from the
``registry``."""

from __future__ import annotations

from msb_proxy.backends.registry import open_backend

__all__ = ["open_backend"]
