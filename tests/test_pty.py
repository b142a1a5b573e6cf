"""Sessions with a terminal (``pty-req``), driven through a real terminal as a user would.

``pexpect`` gives ``/usr/bin/ssh`` a pseudo-terminal of a chosen size, so everything OpenSSH's
client does on a terminal happens for real: it sends ``pty-req`` with the local size and modes,
``window-change`` on SIGWINCH, and raw keystrokes such as Ctrl-C. The expected outcomes are what
OpenSSH's sshd produces for the same client.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import time

import asyncssh
import pexpect
import pytest
from conftest import Env

TIMEOUT_S = 60  # the machine is shared: generous for waiting, exact about what arrives


def _spawn_ssh(msb: Env, sandbox: str, option: str, *command: str,
               dimensions: tuple[int, int] = (24, 80), user: str | None = None,
               term: str = "xterm") -> pexpect.spawn:
    """``ssh -F CONFIG OPTION [USER@]msb-SANDBOX COMMAND`` on a fresh terminal of ``dimensions``."""
    target = msb.host(sandbox) if user is None else f"{user}@{msb.host(sandbox)}"
    env = dict(os.environ, TERM=term)
    return pexpect.spawn("ssh", ["-F", str(msb.config), option, target, *command], env=env,
                         dimensions=dimensions, timeout=TIMEOUT_S)


def _close(child: pexpect.spawn) -> None:
    if child.isalive():
        child.terminate(force=True)
    child.close()


def _prompt(msb: Env, user: str, sandbox: str) -> str:
    """Debian's bash prompt, ``\\u@\\h:\\w\\$ `` in the user's home directory.

    The fake backend's shell reads this host's start-up files, so there the same prompt is set
    in the sandbox's ``~/.profile``, which a login shell reads last.
    """
    prompt = f"{user}@{sandbox}:~{'#' if user == 'root' else '$'} "
    if msb.backend == "fake":
        line = f"PS1={shlex.quote(prompt)}"
        run = msb.ssh(sandbox, f"echo {shlex.quote(line)} > ~/.profile", user=user)
        assert run.returncode == 0, run.err
    return prompt


def _login_shell(msb: Env, sandbox: str) -> str:
    """The name of the login user's shell, as ``$0`` of a login shell shows it: ``-bash``."""
    return "-" + os.path.basename(msb.ssh(sandbox, "echo $SHELL").out.strip())


def _run_in_shell(child: pexpect.spawn, command: str, prompt: str) -> str:
    """Type ``command`` into the interactive shell; return what it printed between markers.

    The command's output is fenced by markers the shell builds from quoted pieces, so the echo
    of the typed line (which holds the quotes) never matches them.
    """
    child.sendline(f"echo 'BEG''IN'; {command}; echo 'E''ND'")
    child.expect_exact("BEGIN\r\n")
    child.expect_exact("END\r\n")
    output: str = child.before.decode()
    child.expect_exact(prompt)
    return output


def test_terminal_size_is_the_clients_and_follows_window_changes(msb: Env, sandbox: str) -> None:
    prompt = _prompt(msb, "root", sandbox)
    child = _spawn_ssh(msb, sandbox, "-tt", dimensions=(33, 111))
    try:
        child.expect_exact(prompt)
        assert _run_in_shell(child, "stty size", prompt) == "33 111\r\n"
        child.setwinsize(41, 97)  # the client sees SIGWINCH and sends window-change
        time.sleep(0.3)  # ... on its next turn of the loop, not before it forwards keystrokes
        assert _run_in_shell(child, "stty size", prompt) == "41 97\r\n"
        child.setwinsize(12, 200)
        time.sleep(0.3)
        assert _run_in_shell(child, "stty size", prompt) == "12 200\r\n"
    finally:
        _close(child)


def test_command_with_a_terminal_sees_the_clients_size(msb: Env, sandbox: str) -> None:
    child = _spawn_ssh(msb, sandbox, "-tt", "stty size", dimensions=(50, 132))
    try:
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        _close(child)
    assert output == b"50 132\r\n"
    assert child.exitstatus == 0


def test_interactive_login_shell_runs_commands_and_exits_with_its_status(
    msb: Env, sandbox: str
) -> None:
    prompt = _prompt(msb, "root", sandbox)
    shell = _login_shell(msb, sandbox)
    child = _spawn_ssh(msb, sandbox, "-t")
    try:
        child.expect_exact(prompt)
        assert _run_in_shell(child, "echo $((6*7)); echo $0", prompt) == f"42\r\n{shell}\r\n"
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        _close(child)
    assert child.exitstatus == 5


def test_ctrl_c_interrupts_the_foreground_command_and_the_prompt_returns(
    msb: Env, sandbox: str
) -> None:
    prompt = _prompt(msb, "root", sandbox)
    child = _spawn_ssh(msb, sandbox, "-t")
    try:
        child.expect_exact(prompt)
        # "sleeping" is printed by the foreground job itself (bash gave it the terminal before
        # exec), so the ^C after it cannot land in bash between its echo and the sleep's start,
        # where it would be lost and the sleep run on; nor can the sleep end before the prompt
        # is waited for, so the prompt's return is the interrupt's doing.
        child.sendline(f"sh -c 'echo sleep\"\"ing; exec sleep {10 * TIMEOUT_S}'")
        child.expect_exact("sleeping\r\n")
        child.send("\x03")
        child.expect_exact(prompt)
        child.sendline("echo status=$?")
        child.expect(r"status=(\d+)\r\n")
        status = child.match.group(1)
        child.expect_exact(prompt)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        _close(child)
    assert status == b"130"
    assert child.exitstatus == 0


def test_stderr_is_merged_into_the_terminal_with_crlf_line_ends(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "echo to-err >&2; printf 'a\\nb\\n'", options=["-tt"])
    assert (run.returncode, run.stdout, run.stderr) == (0, b"to-err\r\na\r\nb\r\n", b"")


def test_term_from_the_client_reaches_the_guest(msb: Env, sandbox: str) -> None:
    child = _spawn_ssh(msb, sandbox, "-tt", "echo $TERM", term="xterm-256color")
    try:
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        _close(child)
    assert output == b"xterm-256color\r\n"


def test_ssh_tty_names_the_sessions_terminal(msb: Env, sandbox: str) -> None:
    child = _spawn_ssh(msb, sandbox, "-tt", 'echo "tty=$(tty) SSH_TTY=${SSH_TTY-unset}"')
    try:
        child.expect(pexpect.EOF)
        output = child.before.decode()
    finally:
        _close(child)
    found = re.fullmatch(r"tty=(/dev/pts/\d+) SSH_TTY=(\S+)\r\n", output)
    assert found is not None, output
    assert found.group(1) == found.group(2)


def test_without_a_terminal_ssh_tty_is_unset_and_tty_says_not_a_tty(
    msb: Env, sandbox: str
) -> None:
    run = msb.ssh(sandbox, 'echo "${SSH_TTY-unset}"; tty')
    assert (run.returncode, run.out) == (1, "unset\nnot a tty\n")


def test_terminal_modes_from_pty_req_are_applied(msb: Env, sandbox: str) -> None:
    proxy = [*msb.proxy_command(), msb.host(sandbox)]

    async def main() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            msb.host(sandbox), proxy_command=proxy, username="root",
            client_keys=[str(msb.key)], known_hosts=None, config=None,
        ) as conn:
            return await conn.run(
                "stty -a", term_type="xterm", term_size=(90, 30),
                term_modes={asyncssh.PTY_VINTR: 2, asyncssh.PTY_ECHO: 0,
                            asyncssh.PTY_IXON: 0, asyncssh.PTY_VEOF: 5},
            )

    result = asyncio.run(main())
    assert result.exit_status == 0
    settings = re.split(r"[;\s]+", str(result.stdout))
    assert settings[settings.index("rows") + 1] == "30"
    assert settings[settings.index("columns") + 1] == "90"
    assert settings[settings.index("intr") + 2] == "^B"
    assert settings[settings.index("eof") + 2] == "^E"
    assert "-echo" in settings
    assert "-ixon" in settings


@pytest.mark.needs_guest("the guest user dev")
def test_login_as_another_user_owns_its_terminal(msb: Env, sandbox: str) -> None:
    prompt = _prompt(msb, "dev", sandbox)
    child = _spawn_ssh(msb, sandbox, "-t", user="dev")
    try:
        child.expect_exact(prompt)
        assert _run_in_shell(child, "id -un; stat -c %U:%a $(tty)", prompt) == (
            "dev\r\ndev:620\r\n"
        )
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        _close(child)
    assert child.exitstatus == 0
