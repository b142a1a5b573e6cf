"""exec and shell sessions without a terminal, through the real ssh client and ProxyCommand."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator

import asyncssh
import pytest
from conftest import Env


def test_stdout_and_stderr_arrive_separately(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "echo to-out; echo to-err >&2")
    assert (run.returncode, run.out, run.err) == (0, "to-out\n", "to-err\n")


@pytest.mark.parametrize("code", [0, 1, 42, 127, 255])
def test_exit_status_is_the_commands(msb: Env, sandbox: str, code: int) -> None:
    assert msb.ssh(sandbox, f"exit {code}").returncode == code


@pytest.mark.needs_guest("the guest's bash: the fake's login shell is this host user's")
def test_missing_command_exits_127_with_the_shells_message(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "no-such-command-xyz")
    assert run.returncode == 127
    assert "no-such-command-xyz: command not found" in run.err


def test_client_eof_closes_the_guest_stdin(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "cat; echo done", input=b"abc")
    assert run.out == "abcdone\n"


def test_stdin_and_stdout_are_binary_clean(msb: Env, sandbox: str) -> None:
    payload = bytes(range(256)) * 4096 + b"\r\n\x00\xff~.\n~C"
    run = msb.ssh(sandbox, "cat", input=payload)
    assert run.returncode == 0
    assert run.stdout == payload


def test_large_upload_reaches_a_slow_reader_intact(msb: Env, sandbox: str) -> None:
    payload = os.urandom(8 << 20)
    run = msb.ssh(sandbox, "sleep 0.5; cat | sha256sum", input=payload)
    import hashlib

    assert run.out.split()[0] == hashlib.sha256(payload).hexdigest()


@pytest.mark.needs_guest("the guest's root account: /root and bash")
def test_command_runs_in_the_users_login_shell_environment(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, 'echo "$0|$HOME|$USER|$LOGNAME|$SHELL|$PATH|$PWD|${SSH_TTY-unset}"')
    assert run.out == (
        "bash|/root|root|root|/bin/bash|"
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|unset\n"
    )


def test_ssh_connection_variables_are_set_as_sshd_does_for_a_pipe(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, 'echo "$SSH_CLIENT|$SSH_CONNECTION"')
    assert run.out == "UNKNOWN 65535 65535|UNKNOWN 65535 UNKNOWN 65535\n"


@pytest.mark.needs_guest("the guest user dev")
def test_login_name_picks_the_guest_user(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, 'id -un; id -u; echo "$HOME|$PATH"; pwd', user="dev")
    assert run.out == "dev\n1000\n/home/dev|/usr/local/bin:/usr/bin:/bin:/usr/games\n/home/dev\n"


@pytest.mark.needs_guest("the guest's /etc/passwd: the fake takes every name as this user")
def test_unknown_guest_user_is_refused_with_a_clear_line(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "true", user="nosuchuser")
    assert run.returncode == 255
    lines = run.err.splitlines()
    assert f"msb-proxy: sandbox '{sandbox}' has no user 'nosuchuser'" in lines
    assert any("Permission denied (publickey)" in line for line in lines)


def test_accepted_environment_variables_are_passed(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, 'echo "${LANG-unset}|${LC_TIME-unset}|${COLORTERM-unset}|${FOO-unset}"',
                  options=["-o", "SetEnv=LANG=C.UTF-8 LC_TIME=C COLORTERM=truecolor FOO=bar"])
    assert run.out == "C.UTF-8|C|truecolor|unset\n"


def test_configured_allow_list_passes_more_variables(msb: Env, sandbox: str) -> None:
    (msb.home / "config.toml").write_text('[defaults]\naccept_env = ["FOO", "APP_*"]\n')
    try:
        run = msb.ssh(sandbox, 'echo "${FOO-unset}|${APP_MODE-unset}|${BAR-unset}"',
                      options=["-o", "SetEnv=FOO=1 APP_MODE=dev BAR=2"])
    finally:
        (msb.home / "config.toml").unlink()
    assert run.out == "1|dev|unset\n"


def test_shell_without_a_terminal_reads_commands_from_stdin_without_echo(
    msb: Env, sandbox: str
) -> None:
    script = b"echo first\nx=$((6*7))\necho $x\nexit 3\n"
    run = msb.ssh(sandbox, input=script, options=["-T"])
    assert (run.returncode, run.out) == (3, "first\n42\n")


def test_background_process_survives_its_session(msb: Env, sandbox: str) -> None:
    marker = f"sleep {4000 + os.getpid() % 1000}.5"
    started = msb.ssh(sandbox, f"nohup {marker} >/dev/null 2>&1 &")
    assert started.returncode == 0
    try:
        check = msb.ssh(sandbox, f"pgrep -fx '{marker}' >/dev/null && echo alive")
        assert check.out == "alive\n"
    finally:
        msb.ssh(sandbox, f"pkill -fx '{marker}'")


def test_losing_the_client_ends_the_foreground_process(msb: Env, sandbox: str) -> None:
    marker = f"sleep {5000 + os.getpid() % 1000}.25"
    client = subprocess.Popen(
        ["ssh", "-F", str(msb.config), msb.host(sandbox), marker],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(lambda: msb.ssh(sandbox, f"pgrep -fx '{marker}'").returncode == 0)
    finally:
        client.kill()
        client.wait()
    assert _wait_for(lambda: msb.ssh(sandbox, f"pgrep -fx '{marker}'").returncode == 1)


def test_x11_request_is_refused_and_the_session_still_runs(msb: Env, sandbox: str) -> None:
    env = dict(os.environ, DISPLAY=":0")
    run = msb.run(["ssh", "-F", str(msb.config), "-o", "LogLevel=INFO", "-o", "ForwardX11=yes",
                   msb.host(sandbox), "echo ran"], env=env)
    assert run.returncode == 0
    assert run.out == "ran\n"
    assert "X11 forwarding request failed" in run.err


def test_kill_by_signal_is_reported_as_exit_signal(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "kill -9 $$", options=["-v"])
    assert run.returncode == 255
    assert "rtype exit-signal" in run.err
    assert "rtype exit-status" not in run.err


# ---- protocol details the OpenSSH client does not expose, through asyncssh as the client


@contextlib.asynccontextmanager
async def _client(msb: Env, sandbox: str) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """asyncssh as the client, through the same ProxyCommand the ssh config uses."""
    proxy = [*msb.proxy_command(), msb.host(sandbox)]
    conn = await asyncssh.connect(
        msb.host(sandbox), proxy_command=proxy, username="root", client_keys=[str(msb.key)],
        known_hosts=None, config=None,
    )
    try:
        yield conn
    finally:
        conn.close()
        await conn.wait_closed()


def test_exit_signal_names_the_signal_and_core_dump(msb: Env, sandbox: str) -> None:
    async def main() -> list[tuple[str, bool]]:
        async with _client(msb, sandbox) as conn:
            results: list[tuple[str, bool]] = []
            for command in ("kill -KILL $$", "kill -TERM $$", "ulimit -c 0; kill -SEGV $$",
                            "kill -USR2 $$", "kill -WINCH $$; exit 0", "kill -TRAP $$"):
                result = await conn.run(command)
                if result.exit_signal:
                    results.append((result.exit_signal[0], result.exit_signal[1]))
                else:
                    results.append((f"status {result.exit_status}", False))
            return results

    assert asyncio.run(main()) == [
        ("KILL", False), ("TERM", False), ("SEGV", False), ("USR2", False),
        ("status 0", False), ("SIG@openssh.com", False),
    ]


SIGNALS = ["ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
           "USR1", "USR2"]


@pytest.mark.parametrize("name", SIGNALS)
def test_every_rfc_signal_reaches_the_process(msb: Env, sandbox: str, name: str) -> None:
    async def main() -> asyncssh.SSHCompletedProcess:
        async with _client(msb, sandbox) as conn:
            # Signalled once it is sleep itself: a signal landing in bash's handler just
            # before its exec is lost with bash's memory (with sshd too).
            marker = f"sleep {3000 + SIGNALS.index(name)}"
            process = await conn.create_process(f"exec {marker}")
            while (await conn.run(f"pgrep -fx '{marker}'")).exit_status != 0:
                await asyncio.sleep(0.05)
            process.send_signal(name)
            return await process.wait()

    result = asyncio.run(main())
    assert result.exit_signal is not None
    assert result.exit_signal[0] == name


def test_trapped_signal_runs_the_handler(msb: Env, sandbox: str) -> None:
    async def main() -> str:
        async with _client(msb, sandbox) as conn:
            process = await conn.create_process(
                "trap 'echo got-usr1; exit 7' USR1; echo ready; while :; do sleep 0.1; done")
            assert await process.stdout.readline() == "ready\n"
            process.send_signal("USR1")
            result = await process.wait()
            return f"{result.stdout!s}|{result.exit_status}"

    assert asyncio.run(main()) == "got-usr1\n|7"


def test_unknown_channel_request_gets_a_failure_reply(msb: Env, sandbox: str) -> None:
    async def main() -> tuple[bool, str]:
        async with _client(msb, sandbox) as conn:
            chan, _session = await conn.create_session(asyncssh.SSHClientSession, "cat")
            replied = await chan._make_request(b"no-such-request@example.com")
            chan.write("still alive\n")
            chan.write_eof()
            await chan.wait_closed()
            result = await conn.run("echo connection fine")
            return bool(replied), str(result.stdout)

    assert asyncio.run(main()) == (False, "connection fine\n")


def _wait_for(condition: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False
