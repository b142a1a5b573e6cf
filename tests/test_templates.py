"""Sandbox templates in ``MSB_PROXY_HOME/config.toml``: their values reach the sandbox, and a bad
one is a single line naming the file, the table, the key and the form it must take.

What a template sets is seen from inside the sandbox through the real ``ssh``: its environment
in every session, its default login user for names the guest lacks, its volumes. What the local
backend cannot give (a network, an OCI image) is refused in one line, before anything is created.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import TEST_BACKEND, Env, Run
from installations import (
    configure,
    loud,
    make_installation,
    one_line,
    proxy_stdio,
    remove_installation,
)

SSH_GAVE_UP = 255
local_only = pytest.mark.skipif(
    TEST_BACKEND != "local", reason="what the local backend makes of a template")


@pytest.fixture
def private(msb: Env) -> Iterator[Env]:
    """An installation of this test's own; its sandboxes end with the test."""
    env = make_installation(msb)
    yield env
    remove_installation(env)


def _quiet_ssh(env: Env, name: str, *command: str, user: str | None = None) -> Run:
    """``ssh`` with the client's own messages off (``LogLevel QUIET``): stderr is msb-proxy's."""
    return env.ssh(name, *command, user=user, options=["-o", "LogLevel=QUIET"])


# ---- values that reach the sandbox


def test_template_env_is_in_every_sessions_environment(private: Env) -> None:
    configure(private, '[sandbox."app-*"]\nenv = { APP_ENV = "dev", GREETING = "hello world" }\n')
    show = 'printf "%s|%s\\n" "$APP_ENV" "$GREETING"'
    command = private.ssh("app-1", show)
    assert (command.returncode, command.out, command.err) == (0, "dev|hello world\n", "")
    terminal = private.ssh("app-1", show, options=["-tt"])
    assert (terminal.returncode, terminal.out) == (0, "dev|hello world\r\n")
    shell = private.ssh("app-1", input=f"{show}\n".encode())
    assert (shell.returncode, shell.out) == (0, "dev|hello world\n")

    other = private.ssh("other", show)
    assert (other.returncode, other.out) == (0, "|\n")


def test_login_name_the_guest_lacks_runs_as_the_template_user(private: Env) -> None:
    configure(private, '[defaults]\nuser = "dev"\n')
    who = "id -un; echo $HOME"
    ghost = private.ssh("users", who, user="ghost")
    assert (ghost.returncode, ghost.out, ghost.err) == (0, "dev\n/home/dev\n", "")
    root = private.ssh("users", who, user="root")
    assert (root.returncode, root.out, root.err) == (0, "root\n/root\n", "")
    dev = private.ssh("users", who, user="dev")
    assert (dev.returncode, dev.out, dev.err) == (0, "dev\n/home/dev\n", "")


def test_without_a_template_user_a_login_name_the_guest_lacks_is_refused(private: Env) -> None:
    run = _quiet_ssh(private, "users", "id -un", user="ghost")
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    assert one_line(run) == "msb-proxy: sandbox 'users' has no user 'ghost'"


@local_only
def test_read_only_volume_is_visible_and_refuses_writes(private: Env) -> None:
    shared = private.root / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("from the host\n")
    configure(private, f'[defaults]\nvolumes = ["{shared}:/mnt/shared:ro"]\n')
    read = private.ssh("vol", "cat /mnt/shared/hello.txt")
    assert (read.returncode, read.out, read.err) == (0, "from the host\n", "")
    write = private.ssh("vol", "echo x > /mnt/shared/new.txt")
    assert write.returncode != 0
    assert "Read-only file system" in write.err
    assert sorted(path.name for path in shared.iterdir()) == ["hello.txt"]


@local_only
def test_read_write_volume_shares_writes_both_ways(private: Env) -> None:
    work = private.root / "work"
    work.mkdir()
    configure(private, f'[defaults]\nvolumes = ["{work}:/srv/work"]\n')
    write = private.ssh("vol", "echo from the guest > /srv/work/out.txt")
    assert (write.returncode, write.err) == (0, "")
    assert (work / "out.txt").read_text() == "from the guest\n"

    (work / "later.txt").write_text("written while it runs\n")
    read = private.ssh("vol", "cat /srv/work/later.txt")
    assert (read.returncode, read.out) == (0, "written while it runs\n")


@local_only
def test_volume_whose_host_path_is_missing_is_a_one_line_error(private: Env) -> None:
    missing = private.root / "missing"
    configure(private, f'[defaults]\nvolumes = ["{missing}:/mnt/data"]\n')
    run = _quiet_ssh(private, "vol", "true")
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    assert one_line(run) == (f"msb-proxy: sandbox 'vol': volume '{missing}:/mnt/data': {missing} "
                             "does not exist")
    # A creation that failed leaves no sandbox behind: the next try creates it, not starts it.
    assert not (private.home / "sandboxes" / "vol").exists()


@local_only
def test_network_is_refused_by_the_local_backend_in_one_line(private: Env) -> None:
    configure(private, '[sandbox."net-*"]\nnetwork = "public"\n')
    run = _quiet_ssh(private, "net-1", "true")
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    assert one_line(run) == (
        "msb-proxy: sandbox 'net-1': the local backend gives a sandbox its own loopback and no "
        "other network; network = 'public' needs the microsandbox backend")
    assert not (private.home / "sandboxes" / "net-1").exists()


@local_only
def test_oci_image_is_refused_by_the_local_backend_in_one_line(private: Env) -> None:
    configure(private, '[sandbox."py-*"]\nimage = "python:3.12"\n')
    run = _quiet_ssh(private, "py-1", "true")
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    assert one_line(run) == (
        "msb-proxy: sandbox 'py-1': the local backend boots a root file system directory, not "
        "the image 'python:3.12'; set image to a directory or use the microsandbox backend")
    assert not (private.home / "sandboxes" / "py-1").exists()


@local_only
def test_image_directory_is_the_root_the_sandbox_is_created_from(private: Env) -> None:
    image = private.root / "my rootfs"
    image.symlink_to(private.rootfs)
    configure(private, f'[sandbox."img-*"]\nimage = "{image}"\n')
    run = loud(private).ssh("img-1", "echo in")
    assert (run.returncode, run.out) == (0, "in\n")
    assert run.err.startswith(f"msb-proxy: creating sandbox 'img-1' from {image} ...\n")


def test_valid_forms_of_every_key_are_accepted(private: Env) -> None:
    configure(private, (
        '[defaults]\nbackend = "local"\ncreate = true\nstop_after_idle = "1h30m"\n'
        'keepalive = 30\ninactivity_timeout = "10m"\naccept_env = ["MY_*"]\n\n'
        '[sandbox."all-*"]\nenv = { A = "1" }\nnetwork = "none"\nuser = "dev"\n'
        'stop_after_idle = 0\n\n'
        '[sandbox."vm-*"]\nbackend = "microsandbox"\ncpus = 2\nmemory = "2GiB"\n'
        'workdir = "/root"\n'))
    run = private.ssh("all-1", "echo $A", user="ghost")
    assert (run.returncode, run.out, run.err) == (0, "1\n", "")


# ---- validation

# The keys a table takes: the common ones, then its backend's.
_BACKEND_KEYS = {"local": ["image", "volumes", "network"],
                 "microsandbox": ["image", "cpus", "memory", "workdir", "volumes", "network"]}
_KEYS = ", ".join(["backend", "env", "user", "create", "stop_after_idle", "accept_env",
                   "keepalive", "inactivity_timeout", "max_auth_tries", "max_channels",
                   "max_env", "login_grace_time", "ephemeral", "session_timeout", "record",
                   "audit", "audit_max_size", "audit_keep", *_BACKEND_KEYS[TEST_BACKEND]])

BAD_CONFIGS = {
    "ephemeral-not-a-boolean": (
        '[defaults]\nephemeral = "yes"\n',
        "defaults.ephemeral must be true or false (got 'yes')"),
    "record-not-a-boolean": (
        '[sandbox."web-*"]\nrecord = 1\n',
        'sandbox."web-*".record must be true or false (got 1)'),
    "bad-session-timeout": (
        '[defaults]\nsession_timeout = "a while"\n',
        "defaults.session_timeout must be a duration such as \"8h\" or seconds (0: never) "
        "(got 'a while')"),
    "zero-audit-size": (
        '[defaults]\naudit_max_size = 0\n',
        'defaults.audit_max_size must be a size such as "16MiB" (a whole MiB or more) (got 0)'),
    "negative-audit-keep": (
        '[defaults]\naudit_keep = -1\n',
        "defaults.audit_keep must be an integer of at least 0 (rotated logs kept) (got -1)"),
    "bad-duration": (
        '[sandbox."web-*"]\nstop_after_idle = "soon"\n',
        'sandbox."web-*".stop_after_idle must be a duration such as "90s", "10m", "1h" or '
        "seconds (0: never) (got 'soon')"),
    "bad-duration-in-defaults": (
        '[defaults]\ninactivity_timeout = "-5s"\n',
        'defaults.inactivity_timeout must be a duration such as "10m" or seconds (0: never) '
        "(got '-5s')"),
    "bad-memory": (
        '[sandbox."web-*"]\nmemory = "lots"\n',
        'sandbox."web-*".memory must be MiB as an integer, or a size such as "2GiB" '
        "(got 'lots')"),
    "zero-memory": (
        '[defaults]\nmemory = 0\n',
        'defaults.memory must be MiB as an integer, or a size such as "2GiB" (got 0)'),
    "unknown-key-in-a-pattern-table": (
        '[sandbox."web-*"]\ncpus = 2\nflavour = "mint"\n',
        f'sandbox."web-*".flavour is not a known key; expected one of {_KEYS}'),
    "pattern-table-that-is-not-a-table": (
        '[sandbox]\n"web-*" = "python:3.12"\n',
        'sandbox."web-*" must be a table'),
    "sandbox-that-is-not-a-table": (
        'sandbox = "web-*"\n',
        'sandbox must hold tables such as [sandbox."web-*"]'),
    "bad-volume": (
        '[sandbox."web-*"]\nvolumes = ["data:/data"]\n',
        'sandbox."web-*".volumes must be a list of "/host/dir:/guest/dir[:ro]" '
        "(got ['data:/data'])"),
    "bad-network": (
        '[sandbox."web-*"]\nnetwork = "internet"\n',
        "sandbox.\"web-*\".network must be one of none, public, private, host (got 'internet')"),
    "bad-create": (
        '[sandbox."web-*"]\ncreate = "yes"\n',
        "sandbox.\"web-*\".create must be true or false (got 'yes')"),
}


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_is_one_line_naming_the_file_table_key_and_form(
    private: Env, text: str, message: str
) -> None:
    config = configure(private, text)
    # The bad table is for web-* sandboxes; a connection to any sandbox is refused all the same.
    run = proxy_stdio(private, "msb-api")
    assert run.returncode != 0
    assert run.stdout == b""
    assert one_line(run) == f"msb-proxy: {config}: {message}"
    assert not (private.home / "sandboxes").exists()


def test_bad_config_through_ssh_is_the_same_one_line(private: Env) -> None:
    config = configure(private, '[sandbox."web-*"]\nstop_after_idle = "soon"\n')
    run = _quiet_ssh(private, "web-1", "true")
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    assert one_line(run) == (
        f'msb-proxy: {config}: sandbox."web-*".stop_after_idle must be a duration such as '
        '"90s", "10m", "1h" or seconds (0: never) (got \'soon\')')


def test_config_file_path_with_spaces_is_named_whole(msb: Env) -> None:
    env = make_installation(msb)
    try:
        spaced = env.root / "my home"
        env.home.rename(spaced)
        env.home = spaced
        config = configure(env, '[defaults]\nmemory = "lots"\n')
        run = proxy_stdio(env, "msb-api")
        assert run.returncode != 0
        assert run.stdout == b""
        assert one_line(run) == (f"msb-proxy: {config}: defaults.memory must be MiB as an "
                                 f"integer, or a size such as \"2GiB\" (got 'lots')")
    finally:
        remove_installation(env)
