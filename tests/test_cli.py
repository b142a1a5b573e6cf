"""The ``msb-proxy`` command line: HOST checks, stdout discipline, configuration, stop and rm.

These are the parts of the contract other tooling relies on: what reaches stdout (the SSH
protocol and nothing else), what reaches stderr (one ``msb-proxy:`` line per failure), the exit
status, and which source of configuration wins. Everything runs the installed ``msb-proxy`` as a
process, directly or as the real ``ssh`` client's ProxyCommand.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROXY, WARM_IDLE_S, Env, Run, install

from msb_proxy import __version__

BANNER = f"SSH-2.0-OpenSSH_compatible msb_proxy_{__version__}\r\n".encode()
EXIT_USAGE = 2
NOT_LOGGED_IN = 255  # sshd -i's status for a connection that ended before a login


# ---- helpers


@pytest.fixture
def private(msb: Env, tmp_path: Path) -> Iterator[Env]:
    """An installation of this test's own; the sandboxes it registers are removed afterwards."""
    env = install(tmp_path, msb.backend, msb.rootfs, comment="cli")
    yield env
    for name in env.sandboxes:
        env.msb_proxy("rm", name)


def _state(home: Path) -> list[str]:
    """Every path under MSB_PROXY_HOME, relative to it."""
    return sorted(str(path.relative_to(home)) for path in home.rglob("*"))


def _one_error_line(run: Run) -> str:
    """The single ``msb-proxy:`` line that stderr must consist of; fails on anything else."""
    lines = run.stderr.split(b"\n")
    assert len(lines) == 2, f"expected exactly one line on stderr, got {run.stderr!r}"
    assert lines[1] == b""
    line = lines[0].decode("utf-8", "replace")
    assert line.startswith("msb-proxy: "), line
    return line


def _proxy(env: Env, *args: str, stdin: int | None = None,
           environ: dict[str, str] | None = None, timeout: float = 60,
           input: bytes = b"") -> Run:
    """Run ``msb-proxy ARGS`` with ``env``'s state; the client side sends ``input`` and closes
    at once by default.

    A run past ``timeout`` is killed and reported with what it wrote and status -9, so that a
    hang fails the test's assertion with the output in view.
    """
    process = subprocess.Popen(
        [str(PROXY), *args], stdin=stdin if stdin is not None else subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=environ if environ is not None else env.proxy_env(),
    )
    try:
        stdout, stderr = process.communicate(None if stdin is not None else input, timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return Run(process.returncode, stdout, stderr)


def _proxy_config(env: Env, flag: str | None, variable: str | None) -> Path:
    """An ssh config whose ProxyCommand passes ``--backend flag`` and ``MSB_PROXY_BACKEND``."""
    settings = ["env", "-u", "MSB_PROXY_BACKEND", f"HOME={env.user_home}",
                f"MSB_PROXY_HOME={env.home}", f"MSB_PROXY_ROOTFS={env.rootfs}",
                # The installation's own warm server, gone soon after the test.
                f"XDG_RUNTIME_DIR={env.runtime_dir}", f"MSB_PROXY_WARM_IDLE_S={WARM_IDLE_S}"]
    if variable is not None:
        settings.append(f"MSB_PROXY_BACKEND={variable}")
    command = [*settings, str(PROXY), "stdio", "--quiet", "--host-prefix", "msb-"]
    if flag is not None:
        command += ["--backend", flag]
    path = env.root / f"ssh_config-{flag}-{variable}"
    path.write_text(
        "Host msb-*\n"
        f"  ProxyCommand {shlex.join(command)} %n\n"
        f"  IdentityFile {env.key}\n"
        "  IdentitiesOnly yes\n"
        "  User root\n"
        "  BatchMode yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  LogLevel QUIET\n"
    )
    return path


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (never existed, reaped, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except FileNotFoundError:
        return True


def _init_pid(env: Env, name: str) -> int:
    return int((env.home / "sandboxes" / name / "init.pid").read_text())


# ---- HOST validation

BAD_HOSTS = {
    "empty-after-prefix": "msb-",
    "129-bytes": "msb-" + "a" * 129,
    "129-bytes-in-65-characters": "msb-" + "\u00e9" * 64 + "a",
    "slash": "msb-a/b",
    "leading-slash": "msb-/etc",
    "soh": "msb-a\x01b",
    "escape": "msb-\x1b[31m",
    "delete": "msb-a\x7f",
    "newline": "msb-a\nb",
    "dot": "msb-.",
    "dot-dot": "msb-..",
    "empty-session": "msb-api+",
    "session-only": "msb-+work",
    "session-with-a-space": "msb-api+my work",
    "fork-of-nothing": "msb-.fork",
    "fork-of-a-dot-dot": "msb-...fork",
}


@pytest.mark.parametrize("host", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
def test_bad_host_is_refused_before_any_backend_is_touched(private: Env, host: str) -> None:
    before = _state(private.home)
    run = _proxy(private, "stdio", "--quiet", "--host-prefix", "msb-", host)
    assert run.returncode != 0
    assert run.stdout == b""
    line = _one_error_line(run)
    assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in line), "raw control characters"
    assert _state(private.home) == before


SSH_PASSES_THROUGH = {k: BAD_HOSTS[k] for k in
                      ("empty-after-prefix", "129-bytes", "slash", "dot", "dot-dot")}


@pytest.mark.parametrize("host", SSH_PASSES_THROUGH.values(), ids=SSH_PASSES_THROUGH.keys())
def test_bad_host_through_ssh_shows_one_msb_proxy_line_and_ssh_exits_255(
    private: Env, host: str
) -> None:
    before = _state(private.home)
    run = private.run(["ssh", "-F", str(private.config), host, "true"])
    assert run.returncode == 255
    ours = [line for line in run.err.splitlines() if line.startswith("msb-proxy:")]
    assert len(ours) == 1, run.err
    assert _state(private.home) == before


NAMES_OF_128_BYTES = {"ascii": "a" * 128, "two-byte-characters": "\u00e9" * 64}


@pytest.mark.parametrize("name", NAMES_OF_128_BYTES.values(), ids=NAMES_OF_128_BYTES.keys())
def test_host_of_exactly_128_bytes_is_accepted(private: Env, name: str) -> None:
    host = private.host(name)
    run = _proxy(private, "stdio", "--quiet", "--host-prefix", "msb-", host)
    assert (run.returncode, run.stdout, run.err) == (NOT_LOGGED_IN, BANNER, "")


def test_128_byte_sandbox_name_works_through_ssh(private: Env) -> None:
    run = private.ssh("n" * 128, "echo in")
    assert (run.returncode, run.out, run.err) == (0, "in\n", "")


# ---- stdout carries the SSH protocol only


def test_stdout_is_only_the_banner_when_the_client_sends_nothing(private: Env) -> None:
    private.host("banner")
    with open(os.devnull, "rb") as devnull:
        run = _proxy(private, "stdio", "--quiet", "--host-prefix", "msb-", "msb-banner",
                     stdin=devnull.fileno(), timeout=20)
    assert (run.returncode, run.stdout, run.err) == (NOT_LOGGED_IN, BANNER, "")


def test_stdout_is_only_the_banner_when_the_client_closes_its_pipe(private: Env) -> None:
    private.host("banner")
    run = _proxy(private, "stdio", "--quiet", "--host-prefix", "msb-", "msb-banner", timeout=20)
    assert (run.returncode, run.stdout, run.err) == (NOT_LOGGED_IN, BANNER, "")


NOT_SSH = {"a line that is no version": b"GET / HTTP/1.1\r\n\r\n",
           "SSH 1": b"SSH-1.5-OpenSSH_1\r\n",
           "an empty packet": b"SSH-2.0-x\r\n" + bytes(64)}


@pytest.mark.parametrize("sent", NOT_SSH.values(), ids=NOT_SSH.keys())
def test_a_client_that_is_not_ssh_gets_one_line_and_exit_255(private: Env, sent: bytes) -> None:
    host = private.host("notssh")
    run = _proxy(private, "stdio", "--quiet", "--host-prefix", "msb-", host, input=sent)
    assert run.returncode == NOT_LOGGED_IN
    assert run.stdout.startswith(BANNER)  # and, past a version line, our KEXINIT
    assert re.fullmatch(r"msb-proxy: protocol error from the client: [^\n]+\n", run.err), run.err


def _holders(directory: Path) -> list[int]:
    """Processes with a file under ``directory`` open (a jail init holds its init.log)."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue
        if any(link.startswith(f"{directory}/") for link in links):
            found.append(int(fd_dir.parent.name))
    return found


def test_client_leaving_while_its_sandbox_starts_leaves_no_jail_behind(private: Env) -> None:
    """The client is gone before the jail is up (here at once): the start is called off and
    the half-started jail taken down, so nothing is left that `rm` could miss."""
    private.host("leaver")
    with open(os.devnull, "rb") as devnull:
        run = _proxy(private, "stdio", "--quiet", "--host-prefix", "msb-", "msb-leaver",
                     stdin=devnull.fileno(), timeout=20)
    assert (run.returncode, run.stdout) == (NOT_LOGGED_IN, BANNER)
    directory = private.home / "sandboxes" / "leaver"
    removed = private.msb_proxy("rm", "leaver")
    # Either it got as far as existing (and is removed now) or it never did.
    assert removed.returncode == 0 or "there is no sandbox 'leaver'" in removed.err, removed.err
    deadline = time.monotonic() + 10
    while _holders(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _holders(directory) == []


# ---- configuration sources


def test_unknown_backend_flag_is_a_usage_error(private: Env) -> None:
    run = _proxy(private, "stdio", "--backend", "x", "msb-a")
    assert (run.returncode, run.stdout) == (EXIT_USAGE, b"")
    line = _one_error_line(run)
    assert "--backend" in line
    assert "'x'" in line
    assert not (private.home / "sandboxes").exists()


def test_unknown_backend_variable_is_named_in_the_error(private: Env) -> None:
    environ = dict(private.proxy_env(), MSB_PROXY_BACKEND="x")
    run = _proxy(private, "stdio", "msb-a", environ=environ)
    assert run.returncode != 0
    assert run.stdout == b""
    line = _one_error_line(run)
    assert "MSB_PROXY_BACKEND" in line
    assert "'x'" in line
    assert not (private.home / "sandboxes").exists()


CONFIG_FILES = {
    "invalid-toml": ("[defaults\nbackend = 'local'\n", None),
    "unknown-key": ("[defaults]\nflavour = 'mint'\n", "flavour"),
    "backend-not-a-string": ("[defaults]\nbackend = 3\n", "backend"),
    "unknown-backend": ("[defaults]\nbackend = 'qemu'\n", "backend"),
    "rootfs-not-a-string": ("[defaults]\nrootfs = ['/']\n", "rootfs"),
    "accept-env-not-a-list": ("[defaults]\naccept_env = 'FOO'\n", "accept_env"),
    "accept-env-not-strings": ("[defaults]\naccept_env = [1]\n", "accept_env"),
}


@pytest.mark.parametrize(("text", "key"), CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_bad_config_file_is_one_line_naming_the_file_and_key(
    private: Env, text: str, key: str | None
) -> None:
    config = private.home / "config.toml"
    config.write_text(text)
    environ = {k: v for k, v in private.proxy_env().items() if k != "MSB_PROXY_BACKEND"}
    run = _proxy(private, "stdio", "msb-a", environ=environ)
    assert run.returncode != 0
    assert run.stdout == b""
    line = _one_error_line(run)
    assert str(config) in line
    if key is not None:
        assert key in line
    assert "Traceback" not in run.err


def test_backend_variable_overrides_the_config_file(private: Env) -> None:
    (private.home / "config.toml").write_text("[defaults]\nbackend = 'microsandbox'\n")
    config = _proxy_config(private, flag=None, variable="local")
    run = private.run(["ssh", "-F", str(config), private.host("precedence"), "echo via-local"])
    assert (run.returncode, run.out, run.err) == (0, "via-local\n", "")

    (private.home / "config.toml").write_text("[defaults]\nbackend = 'local'\n")
    config = _proxy_config(private, flag=None, variable="microsandbox")
    run = private.run(["ssh", "-F", str(config), private.host("other"), "echo via-local"])
    assert (run.returncode, run.out) == (255, "")
    _one_error_line(run)
    assert not (private.home / "sandboxes" / "other").exists()


def test_backend_flag_overrides_the_variable(private: Env) -> None:
    config = _proxy_config(private, flag="local", variable="microsandbox")
    run = private.run(["ssh", "-F", str(config), private.host("precedence"), "echo via-local"])
    assert (run.returncode, run.out, run.err) == (0, "via-local\n", "")

    config = _proxy_config(private, flag="microsandbox", variable="local")
    run = private.run(["ssh", "-F", str(config), private.host("other"), "echo via-local"])
    assert (run.returncode, run.out) == (255, "")
    _one_error_line(run)
    assert not (private.home / "sandboxes" / "other").exists()


# ---- argparse


ARGUMENT_ERRORS = {
    "no-command": [],
    "stdio-without-host": ["stdio"],
    "unknown-flag": ["stdio", "--frobnicate", "msb-a"],
    "unknown-command": ["start", "a"],
    "rm-without-name": ["rm"],
}


@pytest.mark.parametrize("argv", ARGUMENT_ERRORS.values(), ids=ARGUMENT_ERRORS.keys())
def test_argument_errors_are_one_line_and_exit_2(private: Env, argv: list[str]) -> None:
    run = _proxy(private, *argv)
    assert (run.returncode, run.stdout) == (EXIT_USAGE, b"")
    _one_error_line(run)


# ---- the microsandbox backend on a host where microVMs cannot boot


def test_microsandbox_backend_fails_in_one_line_without_a_traceback(private: Env) -> None:
    config = _proxy_config(private, flag="microsandbox", variable=None)
    run = private.run(["ssh", "-F", str(config), private.host("vm"), "true"])
    assert run.returncode == 255
    line = _one_error_line(run)
    assert "Traceback" not in line


def test_microsandbox_backend_writes_only_msb_proxy_lines_when_the_client_leaves(
    private: Env,
) -> None:
    run = _proxy(private, "stdio", "--backend", "microsandbox", "--host-prefix", "msb-",
                 "msb-vm")
    assert run.stdout in {b"", BANNER}
    assert all(line.startswith("msb-proxy:") for line in run.err.splitlines()), run.err


# ---- stop and rm


def test_stop_ends_the_jail_and_keeps_the_writable_layer(msb: Env, fresh_sandbox: str) -> None:
    if msb.backend != "local":
        pytest.skip("inspects the local backend's jail")
    assert msb.ssh(fresh_sandbox, "echo kept > /root/kept").returncode == 0
    pid = _init_pid(msb, fresh_sandbox)
    assert not _gone(pid)

    stop = msb.msb_proxy("stop", fresh_sandbox)
    assert (stop.returncode, stop.out, stop.err) == (0, "", "")
    assert _gone(pid)

    again = msb.ssh(fresh_sandbox, "cat /root/kept")
    assert (again.returncode, again.out) == (0, "kept\n")
    assert _init_pid(msb, fresh_sandbox) != pid


def test_rm_deletes_the_writable_layer_and_keeps_the_host_key(
    msb: Env, fresh_sandbox: str
) -> None:
    if msb.backend != "local":
        pytest.skip("inspects the local backend's jail")
    assert msb.ssh(fresh_sandbox, "echo doomed > /root/doomed").returncode == 0
    host_key = msb.home / "host_keys" / fresh_sandbox
    key_bytes = host_key.read_bytes()
    pid = _init_pid(msb, fresh_sandbox)

    rm = msb.msb_proxy("rm", fresh_sandbox)
    assert (rm.returncode, rm.out, rm.err) == (0, "", "")
    assert _gone(pid)
    assert not (msb.home / "sandboxes" / fresh_sandbox).exists()
    assert host_key.read_bytes() == key_bytes

    after = msb.ssh(fresh_sandbox, "cat /root/doomed")
    assert after.returncode == 1
    assert "No such file or directory" in after.err
    assert host_key.read_bytes() == key_bytes


def test_rm_of_a_missing_sandbox_is_a_one_line_error(private: Env) -> None:
    run = private.msb_proxy("rm", "never-created")
    assert run.returncode != 0
    assert run.stdout == b""
    assert "never-created" in _one_error_line(run)
