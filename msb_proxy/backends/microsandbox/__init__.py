"""The ``microsandbox`` backend: sandboxes as microVMs, through the microsandbox SDK."""

from __future__ import annotations

from msb_proxy.backends.microsandbox.backend import MicrosandboxBackend, MicrosandboxCloudBackend

__all__ = ["MicrosandboxBackend", "MicrosandboxCloudBackend"]
