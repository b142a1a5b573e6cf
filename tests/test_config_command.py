"""``msb-proxy config``: the printed ssh_config block, ``--install`` and ``--uninstall``.

Everything runs the installed ``msb-proxy`` with a HOME and an MSB_PROXY_HOME of the test's own,
both with spaces in their paths, and checks the result with the real ``ssh``: ``ssh -G`` for what
it reads from the files, and a real connection for the whole chain. OpenSSH finds ``~/.ssh/config``
through the password database, not ``$HOME``, so the test names that file with ``-F``; the
``Include`` line and everything after it are then read exactly as for a user.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROXY, Env, Run, stop_warm_servers

# A ~/.ssh/config as people have them: comments, global options, several Host blocks, a line
# with CRLF and no newline at the end.
USER_CONFIG = (
    b"# my settings\n"
    b"ServerAliveInterval 33\r\n"
    b"\n"
    b"Host work\n"
    b"  HostName work.example.com\n"
    b"  User bob\n"
    b"\n"
    b"Host *\n"
    b"  User carl"
)
BEGIN = "# >>> msb-proxy: added by 'msb-proxy config --install', removed by --uninstall"
END = "# <<< msb-proxy"
INCLUDE_HEADER = (
    "# Written by 'msb-proxy config --install': rewritten by the next install, deleted by\n"
    "# 'msb-proxy config --uninstall'. Change it with those commands, not by hand.\n"
)


# ---- helpers


@pytest.fixture
def user(msb: Env, tmp_path: Path) -> Iterator[Env]:
    """A user whose HOME and MSB_PROXY_HOME have spaces in their paths; ~/.ssh does not exist.

    ``config`` is that user's ``~/.ssh/config``. Sandboxes it registers are removed afterwards.
    """
    root = tmp_path
    user_home = root / "user home"
    user_home.mkdir()
    env = Env(root=root, home=root / "state dir", user_home=user_home, key=root / "id_ed25519",
              config=user_home / ".ssh" / "config", backend=msb.backend, rootfs=msb.rootfs)
    env.runtime_dir.mkdir(mode=0o700)
    yield env
    for name in env.sandboxes:
        env.msb_proxy("rm", name)
    stop_warm_servers(env.runtime_dir)


def _ssh_dir(user: Env) -> Path:
    return user.user_home / ".ssh"


def _include(user: Env) -> Path:
    return _ssh_dir(user) / "msb-proxy.config"


def _backup(user: Env) -> Path:
    return _ssh_dir(user) / "config.msb-proxy.bak"


def _write_user_config(user: Env, data: bytes = USER_CONFIG, mode: int = 0o640) -> None:
    _ssh_dir(user).mkdir(mode=0o700)
    user.config.write_bytes(data)
    user.config.chmod(mode)


def _marked_lines(user: Env) -> bytes:
    """What --install puts at the top of ~/.ssh/config."""
    return f'{BEGIN}\nInclude "{_include(user)}"\n{END}\n'.encode()


def _block(user: Env, prefix: str = "msb-", login: str = "root", *extra: str) -> str:
    """The ssh_config block msb-proxy should print for ``user``'s state directory."""
    words = ["env", f"MSB_PROXY_HOME={user.home}", str(PROXY), "stdio", "--host-prefix", prefix]
    command = " ".join(shlex.quote(word).replace("%", "%%") for word in words)
    known_hosts = str(user.home / "known_hosts").replace("%", "%%")
    return (f"Host {prefix}*\n"
            f"  ProxyCommand {command} %n\n"
            f"  User {login}\n"
            f'  UserKnownHostsFile "{known_hosts}"\n'
            "  StrictHostKeyChecking yes\n"
            + "".join(f"  {line}\n" for line in extra))


def _files(directory: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry under ``directory``: its bytes (a symlink: its target) and mode."""
    found: dict[str, tuple[bytes | str, int]] = {}
    if not directory.exists():
        return found
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        content: bytes | str = (os.readlink(path) if path.is_symlink() else
                                b"" if path.is_dir() else path.read_bytes())
        found[str(path.relative_to(directory))] = (content, stat.S_IMODE(info.st_mode))
    return found


def _ssh_settings(config: Path, host: str) -> dict[str, str]:
    """``ssh -G -F config host``: the options ssh would use, keyword -> value."""
    done = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True,
                          check=True, stdin=subprocess.DEVNULL)
    settings: dict[str, str] = {}
    for line in done.stdout.splitlines():
        keyword, _, value = line.partition(" ")
        settings.setdefault(keyword, value)
    return settings


def _one_error_line(run: Run) -> str:
    """The single ``msb-proxy:`` line that stderr must consist of."""
    assert run.err.endswith("\n") and run.err.count("\n") == 1, run.err
    return run.err[:-1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "config", "-f",
                    str(path)], check=True)
    return path


# ---- the printed block


def test_printed_block_names_this_proxy_its_state_directory_and_the_options(user: Env) -> None:
    run = user.msb_proxy("config", "--prefix", "box.", "--user", "alice",
                         "--ssh-option", "ServerAliveInterval=30",
                         "--ssh-option", "SetEnv=GREETING=hello world")
    assert (run.returncode, run.err) == (0, "")
    assert run.out == _block(user, "box.", "alice", "ServerAliveInterval 30",
                             "SetEnv GREETING=hello world")


def test_printed_block_is_read_by_ssh_as_written_with_quotes_and_percent_signs(
    user: Env,
) -> None:
    user.home = user.root / "state 100% 'mine'"
    run = user.msb_proxy("config")
    assert (run.returncode, run.out, run.err) == (0, _block(user), "")
    block = user.root / "block"
    block.write_text(run.out)

    settings = _ssh_settings(block, "msb-demo")
    assert settings["user"] == "root"
    assert settings["stricthostkeychecking"] == "true"
    assert settings["userknownhostsfile"] == f"{user.home}/known_hosts"
    # ssh shows ProxyCommand before %-expansion; the shell then gets one word per argument.
    command = settings["proxycommand"].replace("%n", "msb-demo").replace("%%", "%")
    assert shlex.split(command) == ["env", f"MSB_PROXY_HOME={user.home}", str(PROXY), "stdio",
                                    "--host-prefix", "msb-", "msb-demo"]
    # Other hosts are not touched by the block.
    assert "proxycommand" not in _ssh_settings(block, "elsewhere")


def test_printing_writes_nothing(user: Env) -> None:
    assert user.msb_proxy("config").returncode == 0
    assert _files(user.user_home) == {}
    assert not user.home.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--prefix", ""], "--prefix '': use letters, digits, '.', '_' and '-' only, starting with "
                       "a letter or digit (e.g. --prefix msb-)"),
    (["--prefix", "msb -"], "--prefix 'msb -': use letters, digits, '.', '_' and '-' only, "
                            "starting with a letter or digit (e.g. --prefix msb-)"),
    (["--prefix", "msb*"], "--prefix 'msb*': use letters, digits, '.', '_' and '-' only, "
                           "starting with a letter or digit (e.g. --prefix msb-)"),
    (["--prefix", "a?"], "--prefix 'a?': use letters, digits, '.', '_' and '-' only, "
                         "starting with a letter or digit (e.g. --prefix msb-)"),
    (["--prefix", "a/b-"], "--prefix 'a/b-': use letters, digits, '.', '_' and '-' only, "
                           "starting with a letter or digit (e.g. --prefix msb-)"),
    (["--user", "ro ot"], "--user 'ro ot': use a user name of the guest such as root: letters, "
                          "digits, '_', '.', '@' and '-'"),
    (["--ssh-option", "ServerAliveInterval"],
     "--ssh-option 'ServerAliveInterval': expected KEY=VALUE with an ssh_config keyword as KEY "
     "(e.g. --ssh-option ServerAliveInterval=30)"),
    (["--ssh-option", "Server-Alive=3"],
     "--ssh-option 'Server-Alive=3': expected KEY=VALUE with an ssh_config keyword as KEY "
     "(e.g. --ssh-option ServerAliveInterval=30)"),
    (["--ssh-option", "ServerAliveInterval="],
     "--ssh-option 'ServerAliveInterval=': expected KEY=VALUE with an ssh_config keyword as KEY "
     "(e.g. --ssh-option ServerAliveInterval=30)"),
    (["--ssh-option", "SetEnv=A=1\nHost *"],
     "--ssh-option 'SetEnv=A=1\\nHost *': the value cannot hold control characters"),
    (["--ssh-option", "StrictHostKeyChecking=no"],
     "--ssh-option 'StrictHostKeyChecking=no': StrictHostKeyChecking cannot be set here: "
     "msb-proxy pins every sandbox's host key, so checking stays on"),
    (["--ssh-option", "user=bob"], "--ssh-option 'user=bob': user cannot be set here: use --user"),
])
@pytest.mark.parametrize("action", [[], ["--install"]])
def test_bad_values_are_one_line_errors_and_write_nothing(
    user: Env, args: list[str], message: str, action: list[str],
) -> None:
    _write_user_config(user)
    before = _files(user.user_home)
    run = user.msb_proxy("config", *action, *args)
    assert (run.returncode, run.out) == (2, "")
    assert _one_error_line(run) == f"msb-proxy: {message}"
    assert _files(user.user_home) == before


# ---- --install and --uninstall


def test_install_twice_puts_one_include_at_the_top_and_keeps_the_rest_byte_identical(
    user: Env,
) -> None:
    _write_user_config(user)
    run = user.msb_proxy("config", "--install")
    assert (run.returncode, run.err) == (0, "")
    assert run.out == (f"installed {_include(user)} and an Include line for it at the top of "
                       f"{user.config}; the original is saved in {_backup(user)}\n")
    assert user.config.read_bytes() == _marked_lines(user) + USER_CONFIG
    assert stat.S_IMODE(user.config.stat().st_mode) == 0o640
    assert _include(user).read_text() == INCLUDE_HEADER + _block(user)
    assert stat.S_IMODE(_include(user).stat().st_mode) == 0o600
    assert _backup(user).read_bytes() == USER_CONFIG
    installed = _files(user.user_home)

    again = user.msb_proxy("config", "--install")
    assert (again.returncode, again.err) == (0, "")
    assert again.out == (f"already installed: {user.config} includes {_include(user)}; "
                         "nothing changed\n")
    assert _files(user.user_home) == installed

    # ssh reads the block for sandbox hosts, and the user's own settings for everything else.
    sandbox = _ssh_settings(user.config, "msb-demo")
    assert (sandbox["user"], sandbox["serveraliveinterval"]) == ("root", "33")
    assert sandbox["proxycommand"].startswith("env ")
    work = _ssh_settings(user.config, "work")
    assert (work["user"], work["hostname"], work["serveraliveinterval"]) == (
        "bob", "work.example.com", "33")
    assert "proxycommand" not in work
    assert _ssh_settings(user.config, "other")["user"] == "carl"


def test_uninstall_restores_the_original_bytes_and_removes_the_include_file(user: Env) -> None:
    _write_user_config(user)
    assert user.msb_proxy("config", "--install").returncode == 0

    run = user.msb_proxy("config", "--uninstall")
    assert (run.returncode, run.err) == (0, "")
    assert run.out == (f"removed the msb-proxy Include line from {user.config} and "
                       f"{_include(user)}\n")
    assert _files(_ssh_dir(user)) == {"config": (USER_CONFIG, 0o640),
                                      "config.msb-proxy.bak": (USER_CONFIG, 0o640)}

    again = user.msb_proxy("config", "--uninstall")
    assert (again.returncode, again.err) == (0, "")
    assert again.out == (f"msb-proxy is not installed in {user.config} (no msb-proxy Include "
                         f"line and no {_include(user)}); nothing to remove\n")
    assert _files(_ssh_dir(user))["config"] == (USER_CONFIG, 0o640)


def test_install_creates_ssh_directory_and_config_and_uninstall_takes_them_back(
    user: Env,
) -> None:
    run = user.msb_proxy("config", "--install")
    assert (run.returncode, run.err) == (0, "")
    assert run.out == (f"installed {_include(user)} and an Include line for it at the top of "
                       f"{user.config}\n")
    assert stat.S_IMODE(_ssh_dir(user).stat().st_mode) == 0o700
    assert _files(_ssh_dir(user)) == {
        "config": (_marked_lines(user), 0o600),
        "msb-proxy.config": ((INCLUDE_HEADER + _block(user)).encode(), 0o600),
    }

    assert user.msb_proxy("config", "--uninstall").returncode == 0
    assert _files(_ssh_dir(user)) == {}


def test_reinstall_with_other_settings_rewrites_only_the_include_file(user: Env) -> None:
    _write_user_config(user)
    assert user.msb_proxy("config", "--install").returncode == 0
    config = user.config.read_bytes()

    run = user.msb_proxy("config", "--install", "--user", "alice")
    assert (run.returncode, run.err) == (0, "")
    assert run.out == f"updated {_include(user)}; {user.config} already includes it\n"
    assert user.config.read_bytes() == config
    assert _include(user).read_text() == INCLUDE_HEADER + _block(user, "msb-", "alice")


def test_an_existing_backup_is_never_overwritten(user: Env) -> None:
    _write_user_config(user)
    _backup(user).write_bytes(b"Host older\n")
    run = user.msb_proxy("config", "--install")
    assert run.out == (f"installed {_include(user)} and an Include line for it at the top of "
                       f"{user.config}\n")
    assert _backup(user).read_bytes() == b"Host older\n"

    assert user.msb_proxy("config", "--uninstall").returncode == 0
    assert user.config.read_bytes() == USER_CONFIG
    assert _backup(user).read_bytes() == b"Host older\n"


def test_install_through_a_symlinked_config_edits_its_target(user: Env) -> None:
    dotfiles = user.user_home / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "ssh_config").write_bytes(USER_CONFIG)
    _ssh_dir(user).mkdir(mode=0o700)
    user.config.symlink_to(dotfiles / "ssh_config")

    assert user.msb_proxy("config", "--install").returncode == 0
    assert os.readlink(user.config) == str(dotfiles / "ssh_config")
    assert (dotfiles / "ssh_config").read_bytes() == _marked_lines(user) + USER_CONFIG

    assert user.msb_proxy("config", "--uninstall").returncode == 0
    assert os.readlink(user.config) == str(dotfiles / "ssh_config")
    assert (dotfiles / "ssh_config").read_bytes() == USER_CONFIG


def test_install_leaves_an_include_file_it_did_not_write(user: Env) -> None:
    _write_user_config(user)
    _include(user).write_bytes(b"Host mine\n")
    before = _files(user.user_home)
    run = user.msb_proxy("config", "--install")
    assert (run.returncode, run.out) == (2, "")
    assert _one_error_line(run) == (
        f"msb-proxy: {_include(user)} exists and was not written by msb-proxy; move it away, "
        "then rerun 'msb-proxy config --install'")
    assert _files(user.user_home) == before


def test_a_begin_marker_without_end_is_left_for_the_user_to_fix(user: Env) -> None:
    _write_user_config(user, b"Host a\n" + BEGIN.encode() + b"\nInclude x\n")
    before = _files(user.user_home)
    for action in ("--install", "--uninstall"):
        run = user.msb_proxy("config", action)
        assert (run.returncode, run.out) == (2, "")
        assert _one_error_line(run) == (
            f"msb-proxy: {user.config}:2: the msb-proxy lines that start here have no "
            f"'{END}' line after them; remove them by hand, then rerun")
    assert _files(user.user_home) == before


# ---- end to end


def test_installed_config_takes_the_real_ssh_into_a_sandbox_with_spaces_in_every_path(
    user: Env,
) -> None:
    _write_user_config(user)
    (user.root / "key dir").mkdir()
    key = _keygen(user.root / "key dir" / "id_ed25519")
    assert user.msb_proxy("config", "--install").returncode == 0
    authorized = user.msb_proxy("authorize", "--file", str(key.with_suffix(".pub")))
    assert authorized.returncode == 0, authorized.err

    sandbox = f"cfg-{uuid.uuid4().hex[:6]}"
    # The installed ProxyCommand must find MSB_PROXY_HOME by itself; the backend and rootfs
    # come from the environment as they would from a user's config.toml.
    environ = {k: v for k, v in user.proxy_env().items() if k != "MSB_PROXY_HOME"}
    run = user.run(["ssh", "-F", str(user.config), "-o", "BatchMode=yes", "-o",
                    "IdentitiesOnly=yes", "-i", str(key), user.host(sandbox), "echo ok"],
                   env=environ)
    assert (run.returncode, run.out) == (0, "ok\n"), run.err
    assert "Host key verification failed" not in run.err
    assert "WARNING" not in run.err
    # The key ssh checked is the sandbox's own, pinned under the name ssh was given.
    pinned = subprocess.run(["ssh-keygen", "-F", user.host(sandbox), "-f",
                             str(user.home / "known_hosts")], capture_output=True, text=True,
                            check=False)
    assert pinned.returncode == 0, pinned.stdout
