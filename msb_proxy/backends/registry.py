"""Which backends there are: a name for each, and where its class lives.

``BACKENDS`` is the one table: a backend is chosen by its name here (``--backend``,
``MSB_PROXY_BACKEND``, ``backend =`` in the config file), and its module is imported only
once it is (``msb-proxy stdio --backend local`` never imports the microsandbox SDK, nor even
our module for it). The CLI, the config file's checks, ``ls``, ``doctor`` and the warm server
ask this module, never a backend by name (``load_config`` is handed it, as config sits below
the backends); ``base`` says how to add one.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from msb_proxy.config import unknown_backend

if TYPE_CHECKING:
    from msb_proxy.backends.base import Backend
    from msb_proxy.config import Config, Option

__all__ = [
    "BACKENDS",
    "backend_class",
    "backend_names",
    "backend_options",
    "open_backend",
    "preload",
]

# name -> "module:Class"; the first is listed first by ls and in the CLI's help.
BACKENDS: dict[str, str] = {
    "microsandbox": "msb_proxy.backends.microsandbox:MicrosandboxBackend",
    "microsandbox-cloud": "msb_proxy.backends.microsandbox:MicrosandboxCloudBackend",
    "local": "msb_proxy.backends.local:LocalBackend",
    "fake": "msb_proxy.backends.fake:FakeBackend",
}


def backend_names() -> tuple[str, ...]:
    """The names of every backend, in the order of ``BACKENDS``."""
    return tuple(BACKENDS)


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name``, its module imported now if it was not yet; a
    :class:`~msb_proxy.errors.ConfigError` naming the known ones if there is no such backend."""
    if name not in BACKENDS:
        raise unknown_backend(name, "backend", backend_names())
    module, _, attribute = BACKENDS[name].partition(":")
    found: type[Backend] = getattr(importlib.import_module(module), attribute)
    return found


def backend_options(name: str) -> Mapping[str, Option]:
    """The template options backend ``name`` takes (for :func:`msb_proxy.config.load_config`,
    to which this module is the ``BackendCatalogue``)."""
    return backend_class(name).options


def open_backend(config: Config, name: str | None = None) -> Backend:
    """The backend called ``name`` (default: the configured one), made from ``config``."""
    return backend_class(name or config.backend).from_config(config)


def preload(config: Config) -> None:
    """Import every backend ``config`` may choose, and what each names in ``preload``."""
    for name in config.backends_in_use:
        for module in backend_class(name).preload:
            # A missing SDK is said by the connection that needs it, in its own words.
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
