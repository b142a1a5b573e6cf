"""Session requests asyncssh does not handle itself: OpenSSH's ``eow@openssh.com`` (the
client's stdout closed) and the limit on ``env`` variables, both as sshd has them."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import Env, install

from msb_proxy.config import DEFAULT_MAX_ENV as MAX_ENV


def _piped(msb: Env, sandbox: str, remote: str, reader: str,
           timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """``ssh HOST REMOTE | READER`` through the real ProxyCommand, as a shell runs it."""
    ssh = shlex.join(["ssh", "-F", str(msb.config), msb.host(sandbox), remote])
    return subprocess.run(["bash", "-c", f"set -o pipefail; {ssh} | {reader}; "
                           'echo "statuses: ${PIPESTATUS[*]}" >&2'],
                          capture_output=True, timeout=timeout, check=False)


@pytest.mark.parametrize(("remote", "reader", "expected"), [
    ("cat /dev/zero", "head -c 100 | wc -c", b"100\n"),
    ("yes", "head -1", b"y\n"),
    ("while :; do echo line; sleep 0.05; done", "grep -m1 line", b"line\n"),
])
def test_a_reader_that_stops_ends_the_command(msb: Env, sandbox: str, remote: str,
                                              reader: str, expected: bytes) -> None:
    """The reader exits, OpenSSH says eow@openssh.com, and the command ends at its next
    write (it used to block for ever on the full window)."""
    done = _piped(msb, sandbox, remote, reader)
    assert done.stdout == expected


def test_the_command_gets_sigpipe_and_what_follows_it_still_runs(msb: Env,
                                                                  sandbox: str) -> None:
    """As with sshd: our end of the command's output is closed, so its next write dies of
    SIGPIPE (the shell sees 141), and the shell goes on with what follows."""
    done = _piped(msb, sandbox, "yes; echo $? >/tmp/eow-status", "head -1")
    assert done.stdout == b"y\n"
    status = msb.ssh(sandbox, "cat /tmp/eow-status; rm /tmp/eow-status")
    assert status.out == "141\n"


def test_a_reader_that_stops_leaves_the_connection_s_other_sessions_working(
    msb: Env, sandbox: str, tmp_path: Path
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(msb.config.read_text().replace(
        f"  ControlPath {msb.root}/cm-%C", f"  ControlPath {msb.root}/eow-%C\n"
        "  ControlMaster auto\n  ControlPersist 30"))
    host = msb.host(sandbox)
    try:
        first = subprocess.run(["ssh", "-F", str(config), host, "echo one"],
                               capture_output=True, timeout=60, check=False)
        assert first.stdout == b"one\n"
        piped = subprocess.run(
            ["bash", "-c", f"{shlex.join(['ssh', '-F', str(config), host, 'yes'])} | head -1"],
            capture_output=True, timeout=60, check=False)
        assert piped.stdout == b"y\n"
        after = subprocess.run(["ssh", "-F", str(config), host, "echo two"],
                               capture_output=True, timeout=60, check=False)
        assert after.stdout == b"two\n"
    finally:
        subprocess.run(["ssh", "-F", str(config), "-O", "exit", host], capture_output=True,
                       timeout=30, check=False)


def test_env_requests_past_sshd_s_limit_are_refused(msb: Env) -> None:
    """sshd keeps at most 128 variables of a session's env requests; so do we."""
    # A short root: ssh's ControlPath under it must fit a unix socket's 108 bytes.
    own = install(Path(tempfile.mkdtemp(prefix="env-", dir="/tmp")), msb.backend, msb.rootfs)
    (own.home / "config.toml").write_text('[defaults]\naccept_env = ["MSB_TEST_*"]\n')
    sent = MAX_ENV + 72
    # One SetEnv: ssh takes the first SetEnv directive only, with all its variables.
    options = ["-oSetEnv=" + " ".join(f"MSB_TEST_{index:03d}={index}" for index in range(sent))]
    try:
        run = own.ssh("env-limit", "env | grep -c '^MSB_TEST_'", options=options)
        assert run.returncode == 0, run.err
        assert run.out == f"{MAX_ENV}\n"
        kept = own.ssh("env-limit", "echo $MSB_TEST_000 $MSB_TEST_127 x$MSB_TEST_128",
                       options=options)
        assert kept.out == "0 127 x\n"  # the first 128 are kept, the rest refused
    finally:
        own.msb_proxy("rm", "env-limit")
        shutil.rmtree(own.root, ignore_errors=True)
