"""One validated, immutable :class:`Config`, built once at the edge from flags, env and file.

Precedence, highest first: command-line flags, environment (``MSB_PROXY_HOME``,
``MSB_PROXY_BACKEND``, ``MSB_PROXY_ROOTFS``), the ``[defaults]`` table of
``$MSB_PROXY_HOME/config.toml``, built-in defaults. Everything below the CLI receives the
:class:`Config`; nothing else reads ``os.environ`` or argv.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "BACKENDS",
    "DEFAULT_ROOTFS",
    "Config",
    "default_home",
    "load_config",
    "sandbox_name_from_host",
    "user_home",
]

BACKENDS = ("microsandbox", "local")
DEFAULT_BACKEND = "microsandbox"
DEFAULT_ROOTFS = Path("/var/cache/msb-proxy/rootfs/bookworm-v1")
MAX_NAME_BYTES = 128


@dataclass(frozen=True)
class Config:
    """Everything a command needs to know, validated.

    ``accept_env`` holds glob patterns of client environment variables passed to guest processes
    on top of the built-in ``LANG``, ``LC_*`` and terminal variables (sshd's ``AcceptEnv``).
    """

    home: Path
    user_home: Path
    backend: str = DEFAULT_BACKEND
    rootfs: Path = DEFAULT_ROOTFS
    accept_env: tuple[str, ...] = ()
    debug: bool = False

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"


def user_home(environ: Mapping[str, str]) -> Path:
    """The invoking user's home directory: ``$HOME``, else the password database's."""
    home = environ.get("HOME")
    if home and os.path.isabs(home):
        return Path(home)
    import pwd

    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def default_home(environ: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/msb-proxy``, else ``~/.local/state/msb-proxy``."""
    state = environ.get("XDG_STATE_HOME")
    if state and os.path.isabs(state):
        return Path(state) / "msb-proxy"
    return user_home(environ) / ".local" / "state" / "msb-proxy"


def load_config(
    environ: Mapping[str, str],
    *,
    backend: str | None = None,
    debug: bool = False,
) -> Config:
    """Merge flags (the keyword arguments), ``environ`` and the config file into a :class:`Config`.

    Raises :class:`ConfigError` naming the source, key and expected form of the first bad value.
    """
    home_text = environ.get("MSB_PROXY_HOME")
    if home_text is not None and not home_text.strip():
        raise ConfigError("MSB_PROXY_HOME is set but empty; unset it or give it a directory")
    home = Path(home_text).expanduser() if home_text else default_home(environ)
    home = home.absolute()

    defaults = _read_defaults(home / "config.toml")
    settings: dict[str, Any] = {"home": home, "user_home": user_home(environ), "debug": debug}

    chosen = backend or environ.get("MSB_PROXY_BACKEND") or defaults.get("backend")
    if chosen is not None:
        source = (
            "--backend" if backend else
            "MSB_PROXY_BACKEND" if environ.get("MSB_PROXY_BACKEND") else
            f"{home / 'config.toml'}: defaults.backend"
        )
        if chosen not in BACKENDS:
            raise ConfigError(
                f"{source}: unknown backend {chosen!r}; expected one of {', '.join(BACKENDS)}"
            )
        settings["backend"] = chosen

    rootfs = environ.get("MSB_PROXY_ROOTFS") or defaults.get("rootfs")
    if rootfs:
        settings["rootfs"] = Path(rootfs).expanduser().absolute()

    if "accept_env" in defaults:
        settings["accept_env"] = tuple(defaults["accept_env"])
    return Config(**settings)


def _read_defaults(path: Path) -> dict[str, Any]:
    """Read and check the ``[defaults]`` table of the config file; a missing file is empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: defaults must be a table ([defaults])")
    checks = {
        "backend": (str, "a string, one of " + ", ".join(BACKENDS)),
        "rootfs": (str, "a string naming a directory"),
        "accept_env": (list, "a list of strings such as [\"MY_*\"]"),
    }
    for key, value in defaults.items():
        if key not in checks:
            raise ConfigError(
                f"{path}: defaults.{key} is not a known key; expected one of {', '.join(checks)}"
            )
        kind, form = checks[key]
        if not isinstance(value, kind) or (
            kind is list and not all(isinstance(item, str) and item for item in value)
        ):
            raise ConfigError(f"{path}: defaults.{key} must be {form}")
    return defaults


def sandbox_name_from_host(host: str, prefix: str | None) -> str:
    """Strip ``prefix`` from the ``HOST`` OpenSSH passed us and check what is left.

    A name is refused when it is empty, longer than 128 bytes, ``.`` or ``..``, or holds ``/``,
    NUL or a control character: it names files and a hostname, and must not escape either.
    """
    name = host
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    shown = ascii(host)
    if not name:
        raise ConfigError(f"bad host {shown}: no sandbox name left after the prefix {prefix!r}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ConfigError(f"bad host {shown}: sandbox names are at most {MAX_NAME_BYTES} bytes")
    if "/" in name:
        raise ConfigError(f"bad host {shown}: a sandbox name cannot contain '/'")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        raise ConfigError(f"bad host {shown}: a sandbox name cannot contain control characters")
    if name in {".", ".."}:
        raise ConfigError(f"bad host {shown}: {name!r} is not a usable sandbox name")
    return name
