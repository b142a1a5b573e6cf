"""One validated, immutable :class:`Config`, built once at the edge from flags, env and file.

Precedence, highest first: command-line flags, environment (``MSB_PROXY_HOME``,
``MSB_PROXY_BACKEND``, ``MSB_PROXY_ROOTFS``), ``$MSB_PROXY_HOME/config.toml``, built-in
defaults. Everything below the CLI receives the :class:`Config`; nothing else reads
``os.environ`` or argv.

The config file holds sandbox *templates*: a ``[defaults]`` table and ``[sandbox."PATTERN"]``
tables whose glob patterns select sandbox names::

    [defaults]
    backend = "local"
    create = true
    stop_after_idle = "30m"

    [sandbox."web-*"]
    image = "python:3.12"
    cpus = 2
    memory = "2GiB"
    env = { APP_ENV = "dev" }

A sandbox's template is ``[defaults]``, then every matching pattern table in file order, each
overriding the keys it sets. Every value is checked when the file is read; a bad one is a
one-line error naming the file, the table, the key and the form it must take.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from msb_proxy.errors import ConfigError

__all__ = [
    "BACKENDS",
    "DEFAULT_ROOTFS",
    "NETWORKS",
    "Config",
    "SandboxTemplate",
    "default_home",
    "load_config",
    "parse_duration",
    "sandbox_name_from_host",
    "user_home",
]

BACKENDS = ("microsandbox", "local")
NETWORKS = ("none", "public", "private", "host")
DEFAULT_BACKEND = "microsandbox"
DEFAULT_ROOTFS = Path("/var/cache/msb-proxy/rootfs/bookworm-v1")
MAX_NAME_BYTES = 128
DEFAULT_INACTIVITY_S = 600.0


@dataclass(frozen=True)
class SandboxTemplate:
    """How to create and run one sandbox; see the module docstring for where it comes from.

    ``image`` is an OCI reference or a root file system directory (for the local backend only a
    directory will do; unset, it uses the configured rootfs). ``user`` is the guest user for
    SSH logins whose name is not a user of the guest. ``stop_after_idle`` and the timeouts are
    seconds, 0 meaning never.
    """

    backend: str = DEFAULT_BACKEND
    image: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    volumes: tuple[str, ...] = ()
    network: str | None = None
    user: str | None = None
    create: bool = True
    stop_after_idle: float = 0.0
    accept_env: tuple[str, ...] = ()
    keepalive: float = 0.0
    inactivity_timeout: float = DEFAULT_INACTIVITY_S


@dataclass(frozen=True)
class Config:
    """Everything a command needs to know, validated."""

    home: Path
    user_home: Path
    backend: str = DEFAULT_BACKEND
    rootfs: Path = DEFAULT_ROOTFS
    debug: bool = False
    quiet: bool = False
    fastpath: bool = True
    relay_loop: str = "c"
    defaults: SandboxTemplate = field(default_factory=SandboxTemplate)
    patterns: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    backend_forced: bool = False

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def accept_env(self) -> tuple[str, ...]:
        return self.defaults.accept_env

    def template(self, name: str) -> SandboxTemplate:
        """The template of sandbox ``name``: defaults, then matching pattern tables in order.

        A backend chosen by flag or environment wins over the file's.
        """
        template = self.defaults
        for pattern, values in self.patterns:
            if fnmatch.fnmatchcase(name, pattern):
                template = replace(template, **values)
        if self.backend_forced:
            template = replace(template, backend=self.backend)
        return template


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
    quiet: bool = False,
    use_file: bool = True,
) -> Config:
    """Merge flags (the keyword arguments), ``environ`` and the config file into a :class:`Config`.

    Raises :class:`ConfigError` naming the source, key and expected form of the first bad value.
    ``use_file`` False leaves the config file out (``doctor`` looks around a broken one).
    """
    home_text = environ.get("MSB_PROXY_HOME")
    if home_text is not None and not home_text.strip():
        raise ConfigError("MSB_PROXY_HOME is set but empty; unset it or give it a directory")
    home = Path(home_text).expanduser() if home_text else default_home(environ)
    home = home.absolute()
    path = home / "config.toml"
    document = _read(path) if use_file else {}

    defaults_table = document.pop("defaults", {})
    if not isinstance(defaults_table, dict):
        raise ConfigError(f"{path}: defaults must be a table ([defaults])")
    rootfs_text = defaults_table.pop("rootfs", None)
    if rootfs_text is not None and not (isinstance(rootfs_text, str) and rootfs_text):
        raise ConfigError(f"{path}: defaults.rootfs must be a string naming a directory")
    defaults = SandboxTemplate(**_template_values(defaults_table, f"{path}: defaults"))

    sandboxes = document.pop("sandbox", {})
    if not isinstance(sandboxes, dict):
        raise ConfigError(f'{path}: sandbox must hold tables such as [sandbox."web-*"]')
    patterns = []
    for pattern, table in sandboxes.items():
        where = f'{path}: sandbox."{pattern}"'
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        if not pattern:
            raise ConfigError(f"{where}: the pattern must not be empty")
        patterns.append((pattern, _template_values(table, where)))
    if document:
        unknown = next(iter(document))
        raise ConfigError(f"{path}: unknown table or key {unknown!r}; expected [defaults] and "
                          '[sandbox."PATTERN"] tables')

    chosen = backend or environ.get("MSB_PROXY_BACKEND")
    if chosen is not None:
        source = "--backend" if backend else "MSB_PROXY_BACKEND"
        if chosen not in BACKENDS:
            raise ConfigError(
                f"{source}: unknown backend {chosen!r}; expected one of {', '.join(BACKENDS)}")
        defaults = replace(defaults, backend=chosen)

    rootfs = environ.get("MSB_PROXY_ROOTFS") or rootfs_text
    fastpath, relay_loop = _data_path(environ)
    return Config(
        home=home,
        user_home=user_home(environ),
        backend=defaults.backend,
        rootfs=Path(rootfs).expanduser().absolute() if rootfs else DEFAULT_ROOTFS,
        debug=debug,
        quiet=quiet,
        fastpath=fastpath,
        relay_loop=relay_loop,
        defaults=defaults,
        patterns=tuple(patterns),
        backend_forced=chosen is not None,
    )


def _data_path(environ: Mapping[str, str]) -> tuple[bool, str]:
    """``MSB_PROXY_FASTPATH`` (``0``: asyncssh's own data path) and ``MSB_PROXY_RELAY``
    (``python``: the relay's Python loop instead of its C one), read for every connection."""
    fastpath = environ.get("MSB_PROXY_FASTPATH", "1").strip().lower()
    if fastpath not in ("0", "1", "", "no", "yes", "off", "on", "false", "true"):
        raise ConfigError(f"MSB_PROXY_FASTPATH: expected 0 or 1, not {fastpath!r}")
    relay_loop = environ.get("MSB_PROXY_RELAY", "c").strip().lower() or "c"
    if relay_loop not in ("c", "python"):
        raise ConfigError(f"MSB_PROXY_RELAY: expected c or python, not {relay_loop!r}")
    return fastpath not in ("0", "no", "off", "false"), relay_loop


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Values


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_SIZE_MIB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_duration(value: object) -> float:
    """Seconds from an integer or a string such as ``"90s"``, ``"10m"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int) and value >= 0:
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return float(text)
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text.replace(" ", ""):
            return float(sum(float(n) * _DURATION_UNITS[u] for n, u in parts))
    raise ValueError(value)


def _memory_mib(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        unit = (match.group(2) or "M")[0].lower()
        mib = int(int(match.group(1)) * _SIZE_MIB.get(unit, 1 / (1024 * 1024)))
        if mib > 0:
            return mib
    raise ValueError(value)


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(value)


def _string(value: object) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError(value)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(value)


def _backend(value: object) -> str:
    if value in BACKENDS:
        return str(value)
    raise ValueError(value)


def _network(value: object) -> str:
    if value in NETWORKS:
        return str(value)
    raise ValueError(value)


def _env(value: object) -> dict[str, str]:
    if isinstance(value, dict) and all(
            isinstance(k, str) and _ENV_NAME.fullmatch(k) and isinstance(v, str)
            for k, v in value.items()):
        return dict(value)
    raise ValueError(value)


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(item, str) and item for item in value):
        return tuple(value)
    raise ValueError(value)


def _volumes(value: object) -> tuple[str, ...]:
    volumes = _strings(value)
    for volume in volumes:
        parts = volume.split(":")
        if not (2 <= len(parts) <= 3 and parts[0].startswith("/") and parts[1].startswith("/")
                and (len(parts) == 2 or parts[2] in ("ro", "rw"))):
            raise ValueError(volume)
    return volumes


# key -> (template field, parser, the form it must take)
_KEYS: dict[str, tuple[str, Callable[[object], object], str]] = {
    "backend": ("backend", _backend, "one of " + ", ".join(BACKENDS)),
    "image": ("image", _string, "an OCI image reference or a root file system directory"),
    "cpus": ("cpus", _positive_int, "a positive integer"),
    "memory": ("memory_mib", _memory_mib, 'MiB as an integer, or a size such as "2GiB"'),
    "env": ("env", _env, 'a table of variables, e.g. { APP_ENV = "dev" }'),
    "workdir": ("workdir", _string, "a guest directory"),
    "volumes": ("volumes", _volumes, 'a list of "/host/dir:/guest/dir[:ro]"'),
    "network": ("network", _network, "one of " + ", ".join(NETWORKS)),
    "user": ("user", _string, "a guest user name"),
    "create": ("create", _boolean, "true or false"),
    "stop_after_idle": ("stop_after_idle", parse_duration,
                        'a duration such as "90s", "10m", "1h" or seconds (0: never)'),
    "accept_env": ("accept_env", _strings, 'a list of variable patterns such as ["MY_*"]'),
    "keepalive": ("keepalive", parse_duration,
                  'a duration such as "30s" or seconds (0: no keepalive)'),
    "inactivity_timeout": ("inactivity_timeout", parse_duration,
                           'a duration such as "10m" or seconds (0: never)'),
}


def _template_values(table: Mapping[str, object], where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _KEYS:
            raise ConfigError(f"{where}.{key} is not a known key; expected one of "
                              f"{', '.join(_KEYS)}")
        attribute, parse, form = _KEYS[key]
        try:
            values[attribute] = parse(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{where}.{key} must be {form} (got {value!r})") from None
    return values


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
