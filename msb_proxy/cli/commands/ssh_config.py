"""``msb-proxy config``: the ssh_config block that makes ``ssh PREFIXNAME`` reach sandbox NAME.

Without flags the block is printed. ``--install`` writes it to its own file,
``~/.ssh/msb-proxy.config``, and puts one ``Include`` line for that file at the very top of
``~/.ssh/config`` between two marker comments: at the top, because an ``Include`` below a ``Host``
line would only apply inside that block. Nothing else in ``~/.ssh/config`` changes, byte for byte;
the file is copied to ``~/.ssh/config.msb-proxy.bak`` before msb-proxy first changes it.
``--uninstall`` removes the marked lines and the include file, and nothing else.

The block keeps host key checking on: msb-proxy pins each sandbox's host key in the
``known_hosts`` file of its state directory, which the block names as ``UserKnownHostsFile``.
The ProxyCommand therefore always names that same state directory (``MSB_PROXY_HOME``), so that
the proxy writes the keys where ssh looks for them whatever the environment ssh runs in.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from msb_proxy.config import Config
from msb_proxy.errors import ConfigError, UserError
from msb_proxy.state import StateDir

__all__ = ["SshFiles", "install", "render_block", "run", "uninstall"]

BEGIN_MARKER = "# >>> msb-proxy: added by 'msb-proxy config --install', removed by --uninstall"
END_MARKER = "# <<< msb-proxy"
INCLUDE_HEADER = (
    "# Written by 'msb-proxy config --install': rewritten by the next install, deleted by\n"
    "# 'msb-proxy config --uninstall'. Change it with those commands, not by hand.\n"
)

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
_OPTION_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*")
# Options the block sets itself, or that would break its structure or its pinned host keys.
_RESERVED = {
    "host": "the block has its own Host line; use --prefix",
    "match": "the block has its own Host line; use --prefix",
    "include": "it cannot be nested in the block",
    "proxycommand": "msb-proxy is the ProxyCommand of these hosts",
    "proxyjump": "msb-proxy is the ProxyCommand of these hosts",
    "user": "use --user",
    "userknownhostsfile": "msb-proxy keeps these hosts' keys in its own known_hosts",
    "stricthostkeychecking": "msb-proxy pins every sandbox's host key, so checking stays on",
    "hostkeyalias": "msb-proxy pins host keys under the name you ssh to",
}
# ssh_config cannot hold these in a quoted path: '"' ends the quotes, '\' escapes and '${' expands.
_UNQUOTABLE = re.compile(r'["\\$\x00-\x1f\x7f]')
# An Include path is also a glob(7) pattern, and newer OpenSSH versions expand '%' tokens in it.
_UNINCLUDABLE = re.compile(r"[%*?\[\]]")


@dataclass(frozen=True)
class SshFiles:
    """Where the user's OpenSSH client configuration lives, under their home directory."""

    user_home: Path

    @property
    def directory(self) -> Path:
        return self.user_home / ".ssh"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def include(self) -> Path:
        """The file holding the block, which ``~/.ssh/config`` includes."""
        return self.directory / "msb-proxy.config"

    @property
    def backup(self) -> Path:
        return self.directory / "config.msb-proxy.bak"


def run(config: Config, args: argparse.Namespace) -> int:
    """Print the block, or install or uninstall it; see the module docstring."""
    files = SshFiles(config.user_home)
    if args.listener is not None:
        if args.install or args.uninstall:
            raise ConfigError("--listener prints a block; add it to ~/.ssh/config yourself")
        sys.stdout.write(listener_block(StateDir(config.home), args.listener,
                                        prefix=args.prefix, user=args.user,
                                        host=args.listen_host, port=args.listen_port,
                                        options=args.ssh_option))
        return 0
    if args.uninstall:
        print(uninstall(files))
        return 0
    block = render_block(StateDir(config.home), _entry_point(), prefix=args.prefix,
                         user=args.user, options=args.ssh_option)
    if args.install:
        print(install(files, block))
    else:
        sys.stdout.write(block)
    return 0


def render_block(state: StateDir, proxy: Sequence[str], *, prefix: str, user: str,
                 options: Sequence[str]) -> str:
    """The ``Host PREFIX*`` block for ``proxy`` (the msb-proxy command as an argv).

    Raises :class:`ConfigError` for a prefix, user or ``--ssh-option`` that cannot be used.
    """
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"--prefix {prefix!r}: use letters, digits, '.', '_' and '-' only, "
                          "starting with a letter or digit (e.g. --prefix msb-)")
    _check_user(user)
    command = ["env", f"MSB_PROXY_HOME={_checked_path(state.home, 'MSB_PROXY_HOME')}",
               *proxy, "stdio", "--host-prefix", prefix]
    # ssh expands %-tokens in ProxyCommand, then hands it to the user's shell after 'exec'.
    proxy_command = " ".join(shlex.quote(word).replace("%", "%%") for word in command) + " %n"
    return _block(state, f"{prefix}*", [f"  ProxyCommand {proxy_command}"], user, options)


def listener_block(state: StateDir, name: str, *, prefix: str, user: str, host: str,
                   port: int, options: Sequence[str]) -> str:
    """The ``Host PREFIXNAME-listener`` block for ``msb-proxy serve NAME`` on ``host:port``.

    The listener presents the sandbox's own host key, the one ``ssh PREFIXNAME`` pins: the
    block checks it under that alias (HostKeyAlias), and pins it now, so checking stays on and
    never prompts even before the first ``ssh PREFIXNAME``.
    """
    from msb_proxy.config import sandbox_name_from_host
    from msb_proxy.server.keys import load_or_create_host_key
    from msb_proxy.server.known_hosts import pin

    name = sandbox_name_from_host(name, None)
    alias = f"{prefix}{name}"
    if not _PREFIX.fullmatch(alias):
        raise ConfigError(f"--listener {name!r}: the alias {alias!r} cannot be an ssh host name")
    _check_user(user)
    key = load_or_create_host_key(state.host_key(name)).export_public_key("openssh").decode()
    pin(state.known_hosts, alias, " ".join(key.split()[:2]))
    return _block(state, f"{alias}-listener",
                  [f"  HostName {host}", f"  Port {port}"], user, options,
                  checks=[f"  HostKeyAlias {alias}"])


def _check_user(user: str) -> None:
    if not _USER.fullmatch(user):
        raise ConfigError(f"--user {user!r}: use a user name of the guest such as root: letters, "
                          "digits, '_', '.', '@' and '-'")


def _block(state: StateDir, host: str, reach: Sequence[str], user: str, options: Sequence[str],
           *, checks: Sequence[str] = ()) -> str:
    """A ``Host`` block: how to reach it, the user, host key checking against our known_hosts
    (always on), then the ``--ssh-option`` lines."""
    extra = [_parse_option(text) for text in options]
    known_hosts = _checked_path(state.known_hosts, "MSB_PROXY_HOME")
    lines = [
        f"Host {host}", *reach,
        f"  User {user}", *checks,
        f'  UserKnownHostsFile "{known_hosts.replace("%", "%%")}"',
        "  StrictHostKeyChecking yes",
        *(f"  {key} {value}" for key, value in extra),
    ]
    return "\n".join(lines) + "\n"


def install(files: SshFiles, block: str) -> str:
    """Write ``block`` to the include file and include it from ``~/.ssh/config``.

    Idempotent. Returns the line to show the user.
    """
    include_path = _checked_path(files.include, "HOME")
    if _UNINCLUDABLE.search(include_path):
        raise ConfigError(f"{include_path}: an ssh Include line cannot name a path holding "
                          "'%', '*', '?', '[' or ']'; print the block with 'msb-proxy config' and "
                          "add it to ~/.ssh/config by hand")
    marked = f'{BEGIN_MARKER}\nInclude "{include_path}"\n{END_MARKER}\n'.encode()
    try:
        config_path = _real(files.config)
        original = _read(config_path)
        wanted = marked + _without_marked_lines(config_path, original or b"")
        _make_ssh_directory(files.directory)
        # The include file first, so that the Include line never names a missing file.
        include_changed = _write_include(files.include, (INCLUDE_HEADER + block).encode())
        if wanted == original:
            if include_changed:
                return f"updated {files.include}; {files.config} already includes it"
            return f"already installed: {files.config} includes {files.include}; nothing changed"
        backed_up = original is not None and _backup_once(config_path, original, files.backup)
        _replace(config_path, wanted, _mode_and_owner(config_path))
    except OSError as exc:
        raise UserError(f"cannot install the ssh_config block: {_describe(exc)}") from None
    backup = f"; the original is saved in {files.backup}" if backed_up else ""
    return (f"installed {files.include} and an Include line for it at the top of "
            f"{files.config}{backup}")


def uninstall(files: SshFiles) -> str:
    """Remove what :func:`install` added, leaving everything else as it was.

    Returns the line to show the user.
    """
    try:
        config_path = _real(files.config)
        original = _read(config_path)
        rest = _without_marked_lines(config_path, original or b"")
        include_is_ours = _is_ours(files.include)
        removed = []
        if original is not None and rest != original:
            if not rest and not files.backup.exists():
                # Nothing was backed up, so install created this file: take it away again.
                config_path.unlink()
            else:
                _backup_once(config_path, original, files.backup)
                _replace(config_path, rest, _mode_and_owner(config_path))
            removed.append(f"the msb-proxy Include line from {files.config}")
        if include_is_ours:
            files.include.unlink()
            removed.append(str(files.include))
    except OSError as exc:
        raise UserError(f"cannot uninstall the ssh_config block: {_describe(exc)}") from None
    if not removed:
        return (f"msb-proxy is not installed in {files.config} (no msb-proxy Include line "
                f"and no {files.include}); nothing to remove")
    return "removed " + " and ".join(removed)


def _entry_point() -> list[str]:
    """The running msb-proxy as an absolute argv, symlinks kept (they survive upgrades)."""
    script = sys.argv[0]
    if not script.endswith(".py") and os.path.isfile(script) and os.access(script, os.X_OK):
        return [os.path.abspath(script)]
    beside = Path(sys.executable).parent / "msb-proxy"
    if os.access(beside, os.X_OK):
        return [os.path.abspath(beside)]
    found = shutil.which("msb-proxy")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "msb_proxy"]


def _parse_option(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    value = value.strip()
    if not equals or not _OPTION_KEY.fullmatch(key) or not value:
        raise ConfigError(f"--ssh-option {text!r}: expected KEY=VALUE with an ssh_config keyword "
                          "as KEY (e.g. --ssh-option ServerAliveInterval=30)")
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ConfigError(f"--ssh-option {text!r}: the value cannot hold control characters")
    reason = _RESERVED.get(key.lower())
    if reason:
        raise ConfigError(f"--ssh-option {text!r}: {key} cannot be set here: {reason}")
    return key, value


def _checked_path(path: Path, source: str) -> str:
    text = str(path)
    if _UNQUOTABLE.search(text):
        raise ConfigError(f"{text!a}: ssh_config cannot hold a path with '\"', '\\', '$' or "
                          f"control characters; choose a {source} without them")
    return text


def _make_ssh_directory(directory: Path) -> None:
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)


def _write_include(path: Path, data: bytes) -> bool:
    """Write the include file (0600) unless it already holds ``data``; True when it changed."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        _replace(path, data, (0o600, None))
        return True
    if not _is_ours(path):
        raise ConfigError(f"{path} exists and was not written by msb-proxy; move it away, "
                          "then rerun 'msb-proxy config --install'")
    if path.read_bytes() == data and stat.S_IMODE(info.st_mode) == 0o600:
        return False
    _replace(path, data, (0o600, None))
    return True


def _is_ours(path: Path) -> bool:
    """True when ``path`` is a regular file that :func:`install` wrote."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        with path.open("rb") as handle:
            return handle.read(len(INCLUDE_HEADER)) == INCLUDE_HEADER.encode()
    except FileNotFoundError:
        return False


def _without_marked_lines(path: Path, data: bytes) -> bytes:
    """``data`` without its marked Include lines, every other byte kept as it was."""
    lines = data.splitlines(keepends=True)
    kept: list[bytes] = []
    begin: int | None = None
    for number, line in enumerate(lines, start=1):
        text = line.rstrip(b"\r\n")
        if begin is None and text == BEGIN_MARKER.encode():
            begin = number
        elif begin is not None and text == END_MARKER.encode():
            begin = None
        elif begin is None:
            kept.append(line)
    if begin is not None:
        raise ConfigError(f"{path}:{begin}: the msb-proxy lines that start here have no "
                          f"'{END_MARKER}' line after them; remove them by hand, then rerun")
    return b"".join(kept)


def _real(path: Path) -> Path:
    """``path`` with symlinks resolved: a linked ~/.ssh/config (dotfile managers) stays linked."""
    return Path(os.path.realpath(path))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _mode_and_owner(path: Path) -> tuple[int, tuple[int, int] | None]:
    """The mode and owner ``path`` has, to be kept by a rewrite; new files get 0600."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return 0o600, None
    return stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)


def _backup_once(path: Path, data: bytes, backup: Path) -> bool:
    """Save ``data`` (the bytes of ``path``) to ``backup`` unless there is one; True if saved."""
    try:
        fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    try:
        _write_all(fd, data, *_mode_and_owner(path))
    finally:
        os.close(fd)
    return True


def _replace(path: Path, data: bytes, mode_and_owner: tuple[int, tuple[int, int] | None]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half
    a file, and a crash leaves the old one."""
    mode, owner = mode_and_owner
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data, mode, owner)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_all(fd: int, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if owner is not None and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != owner:
        # Only root gets here with someone else's file; ssh refuses configs of other owners.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, *owner)
    os.fchmod(fd, mode)
    os.fsync(fd)


def _describe(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
