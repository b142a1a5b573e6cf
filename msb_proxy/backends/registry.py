"""Which backends there are: a name for each, and where its class lives.

``BACKENDS`` is the one table: a backend is chosen by its name here (``--backend``,
``MSB_PROXY_BACKEND``, ``backend =`` in the config file), and its module is imported only
once it is (``msb-proxy stdio --backend local`` never imports the microsandbox SDK, nor even
our module for it). The CLI, the config file's checks, ``ls``, ``doctor`` and the warm server
ask this module, never a backend by name; ``base`` says how to add one.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING

from msb_proxy.errors import ConfigError

if TYPE_CHECKING:
    from msb_proxy.backends.base import Backend
    from msb_proxy.config import Config

__all__ = [
    "BACKENDS",
    "backend_class",
    "backend_names",
    "backends_taking",
    "known_backend",
    "open_backend",
    "preload",
]

# name -> "module:Class"; the first is listed first by ls and in the CLI's help.
BACKENDS: dict[str, str] = {
    "microsandbox": "msb_proxy.backends.microsandbox:MicrosandboxBackend",
    "local": "msb_proxy.backends.local:LocalBackend",
}


def backend_names() -> tuple[str, ...]:
    """The names of every backend, in the order of ``BACKENDS``."""
    return tuple(BACKENDS)


def known_backend(name: str, source: str = "backend") -> str:
    """``name`` when it names a backend; else a :class:`ConfigError` naming ``source`` (the flag,
    variable or key it came from) and the backends there are."""
    if name not in BACKENDS:
        raise ConfigError(f"{source}: unknown backend {name!r}; expected one of "
                          f"{', '.join(BACKENDS)}")
    return name


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name``, its module imported now if it was not yet."""
    module, _, attribute = BACKENDS[known_backend(name)].partition(":")
    found: type[Backend] = getattr(importlib.import_module(module), attribute)
    return found


def backends_taking(key: str) -> list[str]:
    """The backends whose template options include ``key`` (this imports every backend)."""
    return [name for name in BACKENDS if key in backend_class(name).options]


def open_backend(config: Config, name: str | None = None) -> Backend:
    """The backend called ``name`` (default: the configured one), made from ``config``."""
    return backend_class(name or config.backend).from_config(config)


def preload(config: Config) -> None:
    """Import every backend ``config`` may choose, and what each names in ``preload``."""
    for name in config.backends:
        for module in backend_class(name).preload:
            # A missing SDK is said by the connection that needs it, in its own words.
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
