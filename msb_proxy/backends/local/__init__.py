"""The ``local`` backend: a Linux-namespace jail over a rootfs directory (``backend``), the
jail's init process (``jail``) and terminal set-up inside it (``terminal``)."""

from __future__ import annotations

from msb_proxy.backends.local.backend import LocalBackend, LocalSandbox

__all__ = ["LocalBackend", "LocalSandbox"]
