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

Every table takes the common keys (``backend``, ``env``, ``user``, ``create``,
``stop_after_idle``, ``ephemeral``, ``accept_env``, ``keepalive``, ``inactivity_timeout``, the
limits ``max_auth_tries``, ``max_channels``, ``max_env``, ``login_grace_time``, the named
sessions' ``session_timeout``, and the opt-in ``record``, ``audit``, ``audit_max_size``,
``audit_keep``) and the options of
its backend (``image``, ``cpus`` ...: the backend class's ``options``, see
``msb_proxy.backends.base``; this module, below the backends, learns them from the
:class:`BackendCatalogue` its caller passes: the registry). A table's backend is the one it
names, else the one ``[defaults]`` names, else the one the flag or the environment chooses, else
``microsandbox``; a key that backend does not take is refused, naming the backends that do. When
the tables a sandbox merges still hand its backend an option it does not take (flag or
environment choosing another backend than the file's tables, say), using that sandbox is refused
the same way.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from msb_proxy.errors import ConfigError, what_to_do

__all__ = [
    "DEFAULT_BACKEND",
    "DEFAULT_LOGIN_GRACE_S",
    "DEFAULT_MAX_AUTH_TRIES",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_ENV",
    "DEFAULT_ROOTFS",
    "IMAGE_OPTION",
    "MIN_CHANNELS",
    "NETWORKS",
    "NETWORK_OPTION",
    "SESSION_VARIABLE",
    "THROWAWAY_INFIX",
    "VOLUMES_OPTION",
    "BackendCatalogue",
    "Config",
    "HostTarget",
    "Option",
    "PatternTable",
    "SandboxTemplate",
    "default_home",
    "load_config",
    "parse_duration",
    "parse_host",
    "parse_positive_int",
    "parse_size_mib",
    "parse_string",
    "sandbox_name_from_host",
    "session_name",
    "throwaway_parent",
    "unknown_backend",
    "user_home",
]

NETWORKS = ("none", "public", "private", "host")
DEFAULT_BACKEND = "microsandbox"
DEFAULT_ROOTFS = Path("/var/cache/msb-proxy/rootfs/bookworm-v1")
MAX_NAME_BYTES = 128
DEFAULT_INACTIVITY_S = 600.0
# A connection's limits, as sshd's defaults: MaxAuthTries, LoginGraceTime, and the 128 variables
# session.c keeps of a session's env requests. sshd has no bound on channels but MaxSessions
# (10 sessions); ours is one well above what IDEs open, and never set below MIN_CHANNELS.
DEFAULT_MAX_AUTH_TRIES = 6
DEFAULT_LOGIN_GRACE_S = 120.0
DEFAULT_MAX_ENV = 128
DEFAULT_MAX_CHANNELS = 1024
MIN_CHANNELS = 256
DEFAULT_AUDIT_MAX_MIB = 16  # one audit log's size before it is rotated
DEFAULT_AUDIT_KEEP = 4  # rotated audit logs kept beside the live one
FORK_SUFFIX = ".fork"  # ssh msb-api.fork: a throwaway fork; msb-api.fork-NAME: a kept one
THROWAWAY_INFIX = ".fork."  # the throwaway fork's own name: api.fork.<8 hex>
_THROWAWAY_NAME = re.compile(r"(.+)\.fork\.[0-9a-f]{8}", re.DOTALL)
SESSION_SEPARATOR = "+"  # ssh msb-api+work: the named session "work"
SESSION_VARIABLE = "MSB_SESSION"  # ssh -o SetEnv=MSB_SESSION=work: the same, named by the client
_SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Option:
    """A key a table of the config file may set.

    ``parse`` turns the file's value into the one used, raising ``ValueError`` or ``TypeError``
    when it cannot; ``form`` ends the error "KEY must be ..."; ``default`` is what a backend
    gets when no table sets one of its options (see ``Backend.option``).
    """

    parse: Callable[[object], object]
    form: str
    default: object = None


class BackendCatalogue(Protocol):
    """What the config's checks need to know of the backends (``msb_proxy.backends.registry``
    is one)."""

    def backend_names(self) -> tuple[str, ...]:
        """The name of every backend."""
        ...

    def backend_options(self, name: str) -> Mapping[str, Option]:
        """The template options backend ``name`` takes, by key."""
        ...


@dataclass(frozen=True)
class SandboxTemplate:
    """How to create and run one sandbox; see the module docstring for where it comes from.

    ``user`` is the guest user for SSH logins whose name is not a user of the guest; ``env`` is
    given to every session. ``stop_after_idle`` and the timeouts are seconds, 0 meaning never.
    The limits hold per connection: failed authentication attempts (``max_auth_tries``),
    channels open at once (``max_channels``), variables one session's ``env`` requests may set
    (``max_env``) and seconds to authenticate in (``login_grace_time``).
    ``ephemeral``: a sandbox a connection created is removed once its last connection has
    ended (after ``stop_after_idle`` when that is set). ``session_timeout``: seconds a named
    session may stay detached before its shell is hung up (0: until the sandbox stops).
    ``record``: PTY sessions are recorded as asciinema casts; ``audit``: every connection,
    command, transfer and tunnel is logged, the log rotated past ``audit_max_size`` MiB with
    ``audit_keep`` old logs kept.
    ``fork_of`` is no key of the file: the CLI sets it for a fork (``ssh msb-api.fork``), whose
    template is its parent's; a backend's ``open`` makes a missing sandbox with ``fork_of`` set
    as a fork of that parent instead of creating it.
    ``options`` holds the values of ``backend``'s own options, by key, as they parse; a key
    no table set is absent (``Backend.option`` gives its default).
    """

    backend: str = DEFAULT_BACKEND
    env: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None
    create: bool = True
    stop_after_idle: float = 0.0
    accept_env: tuple[str, ...] = ()
    keepalive: float = 0.0
    inactivity_timeout: float = DEFAULT_INACTIVITY_S
    max_auth_tries: int = DEFAULT_MAX_AUTH_TRIES
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_env: int = DEFAULT_MAX_ENV
    login_grace_time: float = DEFAULT_LOGIN_GRACE_S
    ephemeral: bool = False
    session_timeout: float = 0.0
    record: bool = False
    audit: bool = False
    audit_max_size: int = DEFAULT_AUDIT_MAX_MIB
    audit_keep: int = DEFAULT_AUDIT_KEEP
    fork_of: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PatternTable:
    """A ``[sandbox."PATTERN"]`` table as it parsed: its common values by template field and its
    backend's options by key."""

    pattern: str
    values: Mapping[str, Any]
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    """Everything a command needs to know, validated."""

    home: Path
    user_home: Path
    catalogue: BackendCatalogue = field(repr=False, compare=False)
    backend: str = DEFAULT_BACKEND
    rootfs: Path = DEFAULT_ROOTFS
    debug: bool = False
    quiet: bool = False
    fastpath: bool = True
    relay_loop: str = "c"
    defaults: SandboxTemplate = field(default_factory=SandboxTemplate)
    patterns: tuple[PatternTable, ...] = ()
    backend_source: str | None = None  # "--backend" or "MSB_PROXY_BACKEND", when one chose it

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def accept_env(self) -> tuple[str, ...]:
        return self.defaults.accept_env

    @property
    def backends_in_use(self) -> tuple[str, ...]:
        """Every backend a sandbox may get from this config."""
        if self.backend_source is not None:
            return (self.backend,)
        named = (table.values["backend"] for table in self.patterns if "backend" in table.values)
        return tuple(dict.fromkeys([self.defaults.backend, *named]))

    def template(self, name: str) -> SandboxTemplate:
        """The template of sandbox ``name``: defaults, then matching pattern tables in order.

        A backend chosen by flag or environment wins over the file's. Raises
        :class:`ConfigError` when an option the tables set is not one of that backend's.
        """
        values: dict[str, Any] = {}
        options = dict(self.defaults.options)
        origins = dict.fromkeys(options, "defaults")
        for table in self.patterns:
            if fnmatch.fnmatchcase(name, table.pattern):
                values.update(table.values)
                options.update(table.options)
                origins.update(dict.fromkeys(table.options, f'sandbox."{table.pattern}"'))
        if self.backend_source is not None:
            values["backend"] = self.backend
        template = replace(self.defaults, **values, options=options)
        taken = self.catalogue.backend_options(template.backend) if options else {}
        for key, origin in origins.items():
            if key not in taken:
                chosen = f" (chosen by {self.backend_source})" if self.backend_source else ""
                raise ConfigError(
                    f"{self.config_file}: {origin}.{key} is not an option of the "
                    f"{template.backend} backend, which sandbox {name!r} uses{chosen}, but of "
                    f"{', '.join(_takers(self.catalogue, key))}: remove it, or choose that "
                    f"backend for {name!r}")
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
    catalogue: BackendCatalogue,
    *,
    backend: str | None = None,
    debug: bool = False,
    quiet: bool = False,
    use_file: bool = True,
) -> Config:
    """Merge flags (the keyword arguments), ``environ`` and the config file into a :class:`Config`.

    ``catalogue`` names the backends and their options (pass ``msb_proxy.backends.registry``).
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
    chosen = backend or environ.get("MSB_PROXY_BACKEND")
    source = None if chosen is None else "--backend" if backend else "MSB_PROXY_BACKEND"
    if chosen is not None and source is not None and chosen not in catalogue.backend_names():
        raise unknown_backend(chosen, source, catalogue.backend_names())

    defaults_table = document.pop("defaults", {})
    if not isinstance(defaults_table, dict):
        raise ConfigError(f"{path}: defaults must be a table ([defaults])")
    rootfs_text = defaults_table.pop("rootfs", None)
    if rootfs_text is not None and not (isinstance(rootfs_text, str) and rootfs_text):
        raise ConfigError(f"{path}: defaults.rootfs must be a string naming a directory")
    inherited = chosen or DEFAULT_BACKEND
    values, options = _read_table(defaults_table, f"{path}: defaults", inherited, catalogue)
    defaults = SandboxTemplate(**{"backend": inherited, **values}, options=options)

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
        values, options = _read_table(table, where, defaults.backend, catalogue)
        patterns.append(PatternTable(pattern, values, options))
    if document:
        unknown = next(iter(document))
        raise ConfigError(f"{path}: unknown table or key {unknown!r}; expected [defaults] and "
                          '[sandbox."PATTERN"] tables')

    if chosen is not None:
        defaults = replace(defaults, backend=chosen)

    rootfs = environ.get("MSB_PROXY_ROOTFS") or rootfs_text
    fastpath, relay_loop = _data_path(environ)
    return Config(
        home=home,
        user_home=user_home(environ),
        catalogue=catalogue,
        backend=defaults.backend,
        rootfs=Path(rootfs).expanduser().absolute() if rootfs else DEFAULT_ROOTFS,
        debug=debug,
        quiet=quiet,
        fastpath=fastpath,
        relay_loop=relay_loop,
        defaults=defaults,
        patterns=tuple(patterns),
        backend_source=source,
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


def unknown_backend(name: str, source: str, names: Sequence[str]) -> ConfigError:
    """The error for backend ``name``, from ``source`` (a flag, a variable), not in ``names``."""
    return ConfigError(f"{source}: unknown backend {name!r}; expected one of {', '.join(names)}")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}; {what_to_do(path, exc)}") from None
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


def parse_size_mib(value: object) -> int:
    """MiB from a positive integer or a size such as ``"512MiB"``, ``"2GiB"``, ``"2G"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        unit = (match.group(2) or "M")[0].lower()
        mib = int(int(match.group(1)) * _SIZE_MIB.get(unit, 1 / (1024 * 1024)))
        if mib > 0:
            return mib
    raise ValueError(value)


def parse_positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(value)


def parse_string(value: object) -> str:
    """A string that is not empty."""
    if isinstance(value, str) and value:
        return value
    raise ValueError(value)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(value)


def _at_least(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise ValueError(value)

    return parse


def _one_of(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(value)

    return parse


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


# Options more than one backend takes, spelled once so that they read the same in each.
IMAGE_OPTION = Option(parse_string, "an OCI image reference or a root file system directory")
VOLUMES_OPTION = Option(_volumes, 'a list of "/host/dir:/guest/dir[:ro]"', default=())
NETWORK_OPTION = Option(_one_of(NETWORKS), "one of " + ", ".join(NETWORKS))


def _common_keys(catalogue: BackendCatalogue) -> dict[str, Option]:
    """The keys every table takes, whatever its backend, named as the template's fields."""
    names = catalogue.backend_names()
    return {
        "backend": Option(_one_of(names), "one of " + ", ".join(names)),
        "env": Option(_env, 'a table of variables, e.g. { APP_ENV = "dev" }'),
        "user": Option(parse_string, "a guest user name"),
        "create": Option(_boolean, "true or false"),
        "stop_after_idle": Option(
            parse_duration, 'a duration such as "90s", "10m", "1h" or seconds (0: never)'),
        "accept_env": Option(_strings, 'a list of variable patterns such as ["MY_*"]'),
        "keepalive": Option(parse_duration,
                            'a duration such as "30s" or seconds (0: no keepalive)'),
        "inactivity_timeout": Option(parse_duration,
                                     'a duration such as "10m" or seconds (0: never)'),
        "max_auth_tries": Option(_at_least(1), "an integer of at least 1 (sshd's MaxAuthTries)"),
        "max_channels": Option(_at_least(MIN_CHANNELS),
                               f"an integer of at least {MIN_CHANNELS} (IDEs open many)"),
        "max_env": Option(_at_least(0), "an integer of at least 0"),
        "login_grace_time": Option(parse_duration,
                                   'a duration such as "2m" or seconds (0: never)'),
        "ephemeral": Option(_boolean, "true or false"),
        "session_timeout": Option(parse_duration,
                                  'a duration such as "8h" or seconds (0: never)'),
        "record": Option(_boolean, "true or false"),
        "audit": Option(_boolean, "true or false"),
        "audit_max_size": Option(parse_size_mib, 'a size such as "16MiB" (a whole MiB or more)'),
        "audit_keep": Option(_at_least(0), "an integer of at least 0 (rotated logs kept)"),
    }


def _read_table(table: Mapping[str, object], where: str, inherited: str,
                catalogue: BackendCatalogue) -> tuple[dict[str, Any], dict[str, Any]]:
    """``table``'s common values by template field, and its backend's options by key, parsed.

    Its backend is the one it names, else ``inherited``. Only a table with keys of a backend
    imports that backend's class; only a key that backend does not take imports the others.
    """
    common = _common_keys(catalogue)
    values: dict[str, Any] = {}
    if "backend" in table:
        values["backend"] = _parse(common["backend"], table["backend"], where, "backend")
    backend = values.get("backend", inherited)
    own = [key for key in table if key not in common]
    taken = catalogue.backend_options(backend) if own else {}
    for key in own:
        if key not in taken and not _takers(catalogue, key):
            raise ConfigError(f"{where}.{key} is not a known key; expected one of "
                              f"{', '.join([*common, *taken])}")
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key in common:
            values[key] = _parse(common[key], value, where, key)
        elif key in taken:
            options[key] = _parse(taken[key], value, where, key)
        else:
            takers = _takers(catalogue, key)
            # A bad value is named first: it is wrong whichever backend the table ends up with.
            _parse(catalogue.backend_options(takers[0])[key], value, where, key)
            raise ConfigError(f"{where}.{key} is not an option of the {backend} backend but of "
                              f"{', '.join(takers)}: remove it, or set backend = "
                              f'"{takers[0]}" in that table')
    return values, options


def _takers(catalogue: BackendCatalogue, key: str) -> list[str]:
    """The backends that take option ``key`` (this asks every one)."""
    return [name for name in catalogue.backend_names() if key in catalogue.backend_options(name)]


def _parse(option: Option, value: object, where: str, key: str) -> Any:
    try:
        return option.parse(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}.{key} must be {option.form} (got {value!r})") from None


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


@dataclass(frozen=True)
class HostTarget:
    """What the host OpenSSH was given asks for (see :func:`parse_host`).

    ``sandbox`` is the sandbox the connection uses. For a fork, ``fork_of`` is its parent and
    ``sandbox`` the fork: ``PARENT.fork-NAME`` for a kept one, and for a throwaway one
    (``ephemeral_fork``) a name of this connection's own, made by the caller. ``session``
    names the named session a shell attaches to (``msb-api+work``), None for none.
    """

    sandbox: str
    fork_of: str | None = None
    ephemeral_fork: bool = False
    session: str | None = None


def session_name(value: str, source: str) -> str:
    """``value`` as a named session's name, or a :class:`ConfigError` naming ``source``."""
    if not _SESSION_NAME.fullmatch(value):
        raise ConfigError(f"{source}: bad session name {value!a}: 1-64 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    return value


def parse_host(host: str, prefix: str | None) -> HostTarget:
    """The sandbox, fork and named session the ``HOST`` OpenSSH passed us names:
    ``[PREFIX]NAME[.fork[-KEPT]][+SESSION]``.

    ``NAME.fork`` is a throwaway fork of ``NAME`` (the caller names it: ``sandbox`` is left
    as the parent's name here), ``NAME.fork-KEPT`` the fork kept as sandbox
    ``NAME.fork-KEPT``; ``+SESSION`` attaches the connection's shells to that named session.
    Every name is checked as :func:`sandbox_name_from_host` checks one.
    """
    name = sandbox_name_from_host(host, prefix)
    session = None
    if SESSION_SEPARATOR in name:
        name, _, session_part = name.rpartition(SESSION_SEPARATOR)
        session = session_name(session_part, f"host {host!a}")
        if not name:
            raise ConfigError(f"bad host {host!a}: no sandbox name before "
                              f"'{SESSION_SEPARATOR}{session}'")
        name = sandbox_name_from_host(name, None)
    if name.endswith(FORK_SUFFIX):
        parent = sandbox_name_from_host(name[:-len(FORK_SUFFIX)], None)
        return HostTarget(sandbox=parent, fork_of=parent, ephemeral_fork=True, session=session)
    stem, marker, kept = name.rpartition(FORK_SUFFIX + "-")
    if marker and stem and kept:
        parent = sandbox_name_from_host(stem, None)
        return HostTarget(sandbox=name, fork_of=parent, session=session)
    return HostTarget(sandbox=name, session=session)


def throwaway_parent(name: str) -> str | None:
    """The parent of ``name`` when it is a throwaway fork's own name (``api.fork.1a2b3c4d``,
    what ``ssh msb-api.fork`` made), else None."""
    match = _THROWAWAY_NAME.fullmatch(name)
    return match.group(1) if match else None
