"""Client authentication and host keys, as the real OpenSSH client meets them.

Only public keys authenticate, taken from the union of ``MSB_PROXY_HOME/authorized_keys``,
microsandbox's ``~/.microsandbox/ssh/authorized_keys`` and the invoking user's ``~/.ssh/*.pub``.
Each sandbox name has its own ed25519 host key, created on first use and kept across ``rm``, so
``StrictHostKeyChecking=yes`` keeps working after a sandbox is recreated.
"""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Env, Run, install

# ---- helpers


def _keygen(path: Path, comment: str = "auth") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True)
    return path


def _public(key: Path) -> str:
    return key.with_suffix(".pub").read_text()


@pytest.fixture
def private(msb: Env, tmp_path: Path) -> Iterator[Env]:
    """An installation of this test's own, whose client key no source authorizes yet; the
    sandboxes it registers are removed afterwards."""
    env = install(tmp_path, msb.backend, msb.rootfs, authorized=False, comment="auth")
    yield env
    for name in env.sandboxes:
        env.msb_proxy("rm", name)


def _fingerprint(path: Path) -> tuple[str, str]:
    """(``SHA256:...``, ``(ED25519)``) of the key, or the only key, in ``path``."""
    listed = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert len(listed) == 1, listed
    fields = listed[0].split()
    return fields[1], fields[-1]


def _ssh_recording(env: Env, sandbox: str, known_hosts: Path, checking: str,
                   *command: str) -> Run:
    """``ssh`` to ``sandbox`` with a real known_hosts file and ``StrictHostKeyChecking``."""
    return env.ssh(sandbox, *command, options=[
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", f"StrictHostKeyChecking={checking}",
        "-o", "LogLevel=INFO"])


# ---- who may log in


def test_unknown_key_is_refused_with_publickey_only(private: Env) -> None:
    stranger = _keygen(private.root / "stranger", "stranger")
    (private.home / "authorized_keys").write_text(_public(stranger))
    run = private.ssh("auth", "echo in", options=["-v"])
    assert (run.returncode, run.out) == (255, "")
    assert "Permission denied (publickey)" in run.err
    prefix = "debug1: Authentications that can continue: "
    offered = [line.removeprefix(prefix) for line in run.err.splitlines()
               if line.startswith(prefix)]
    assert offered
    assert set(offered) == {"publickey"}


def test_password_and_keyboard_interactive_are_not_offered(private: Env) -> None:
    (private.home / "authorized_keys").write_text(_public(private.key))
    run = private.ssh("auth", "echo in", options=[
        "-v", "-o", "BatchMode=no", "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password,keyboard-interactive"])
    assert (run.returncode, run.out) == (255, "")
    assert "Permission denied (publickey)" in run.err
    assert "Next authentication method: password" not in run.err
    assert "Next authentication method: keyboard-interactive" not in run.err


def _authorize_in_proxy_home(env: Env) -> None:
    (env.home / "authorized_keys").write_text(_public(env.key))


def _authorize_in_microsandbox(env: Env) -> None:
    directory = env.user_home / ".microsandbox" / "ssh"
    directory.mkdir(parents=True)
    (directory / "authorized_keys").write_text(_public(env.key))


def _authorize_in_user_ssh_dir(env: Env) -> None:
    (env.user_home / ".ssh" / "laptop.pub").write_text(_public(env.key))


SOURCES = {
    "msb-proxy-home": _authorize_in_proxy_home,
    "microsandbox": _authorize_in_microsandbox,
    "users-ssh-pub": _authorize_in_user_ssh_dir,
}


@pytest.mark.parametrize("authorize", SOURCES.values(), ids=SOURCES.keys())
def test_key_from_each_default_source_logs_in(
    private: Env, authorize: Callable[[Env], None]
) -> None:
    authorize(private)
    run = private.ssh("auth", "echo in")
    assert (run.returncode, run.out, run.err) == (0, "in\n", "")


def test_bad_authorized_keys_lines_are_skipped_with_one_warning_each(private: Env) -> None:
    other = _keygen(private.root / "other", "other")
    other_type, other_data = _public(other).split()[:2]
    authorized = private.home / "authorized_keys"
    authorized.write_text(
        f'command="x" {other_type} {other_data} with-options\n'
        "this is not a key\n"
        f"ssh-unknown {other_data} unknown-type\n"
        + _public(private.key)
    )
    run = private.ssh("auth", "echo in")
    assert (run.returncode, run.out) == (0, "in\n")
    warnings = run.err.splitlines()
    assert len(warnings) == 3, run.err
    for number, line in enumerate(warnings, start=1):
        assert line.startswith(f"msb-proxy: warning: {authorized}:{number}: "), line

    # The key of the skipped lines does not log in, not even with the options ignored.
    config = private.root / "ssh_config-other"
    config.write_text(private.config.read_text().replace(str(private.key), str(other)))
    refused = private.run(["ssh", "-F", str(config), private.host("auth"), "echo in"])
    assert (refused.returncode, refused.out) == (255, "")
    assert "Permission denied (publickey)" in refused.err


# ---- host keys


def test_host_key_is_created_on_first_connection_and_is_what_the_client_sees(
    private: Env,
) -> None:
    _authorize_in_proxy_home(private)
    name = f"hk-{uuid.uuid4().hex[:6]}"
    host_key = private.home / "host_keys" / name
    assert not host_key.exists()
    known_hosts = private.root / "known_hosts"

    run = _ssh_recording(private, name, known_hosts, "accept-new", "true")
    assert run.returncode == 0, run.err

    assert stat.S_IMODE(host_key.stat().st_mode) == 0o600
    assert host_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    fingerprint, kind = _fingerprint(host_key)
    assert kind == "(ED25519)"
    recorded = known_hosts.read_text().splitlines()
    assert len(recorded) == 1
    assert recorded[0].startswith(f"{private.host(name)} ssh-ed25519 ")
    assert _fingerprint(known_hosts) == (fingerprint, "(ED25519)")


def test_host_key_differs_per_sandbox_name(private: Env) -> None:
    _authorize_in_proxy_home(private)
    names = [f"hk-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for name in names:
        assert private.ssh(name, "true").returncode == 0
    first, second = (_fingerprint(private.home / "host_keys" / name)[0] for name in names)
    assert first != second


def test_host_key_survives_rm_so_strict_checking_still_connects(private: Env) -> None:
    _authorize_in_proxy_home(private)
    name = f"hk-{uuid.uuid4().hex[:6]}"
    known_hosts = private.root / "known_hosts"
    assert _ssh_recording(private, name, known_hosts, "accept-new", "true").returncode == 0
    recorded = known_hosts.read_bytes()

    rm = private.msb_proxy("rm", name)
    assert (rm.returncode, rm.err) == (0, "")

    run = _ssh_recording(private, name, known_hosts, "yes", "echo again")
    assert (run.returncode, run.out, run.err) == (0, "again\n", "")
    assert known_hosts.read_bytes() == recorded


def test_simultaneous_first_connections_agree_on_host_key_and_jail(private: Env) -> None:
    _authorize_in_proxy_home(private)
    name = f"race-{uuid.uuid4().hex[:6]}"
    count = 16

    def connect(index: int) -> tuple[Run, Path]:
        known_hosts = private.root / f"known_hosts-{index}"
        run = _ssh_recording(private, name, known_hosts, "accept-new",
                             "readlink /proc/self/ns/pid /proc/self/ns/mnt")
        return run, known_hosts

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(connect, range(count), timeout=120))

    for run, _ in results:
        assert run.returncode == 0, run.err
    namespaces = {run.out for run, _ in results}
    assert len(namespaces) == 1, namespaces
    fingerprints = {_fingerprint(known_hosts) for _, known_hosts in results}
    assert fingerprints == {_fingerprint(private.home / "host_keys" / name)}

    init_pid = int((private.home / "sandboxes" / name / "init.pid").read_text())
    host_view = os.readlink(f"/proc/{init_pid}/ns/pid")
    assert namespaces == {f"{host_view}\n{os.readlink(f'/proc/{init_pid}/ns/mnt')}\n"}
