"""``msb-proxy connect NAME [COMMAND]``: the native client (``SshClient.exec`` and ``attach``)
from the shell, without OpenSSH. With a COMMAND: output passed through, stdin forwarded, the
exit status ``ssh`` gives. Without: a login shell on this terminal, driven through a real
terminal (pexpect): prompt, a command's output, resize, Ctrl-C, the detach keys (default and
given), the shell's exit code and the terminal's modes afterwards."""

from __future__ import annotations

import signal
import sys
import termios
import uuid
from collections.abc import Iterator

import pexpect
import pytest
from conftest import PROXY, TEST_BACKEND, Env

pytestmark = pytest.mark.timeout(180)
TIMEOUT_S = 60  # a bound for waiting on output, not a timing assertion
OUTER = "outer$ "


@pytest.fixture
def name(msb: Env) -> str:
    sandbox = f"connect-{uuid.uuid4().hex[:8]}"
    msb.host(sandbox)
    return sandbox


def test_a_command_passes_output_through_with_its_exit_status(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", name, "echo out; echo err >&2; exit 5")
    assert (done.returncode, done.stdout, done.stderr) == (5, b"out\n", b"err\n")


def test_stdin_is_forwarded_to_the_command(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", name, "tr a-z A-Z", input=b"forwarded\n")
    assert (done.returncode, done.stdout) == (0, b"FORWARDED\n")


def test_several_words_stay_separate_arguments(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", name, "printf", "%s|", "a b", "c")
    assert (done.returncode, done.stdout) == (0, b"a b|c|")


def test_a_command_killed_by_a_signal_exits_128_plus_its_number(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", name, "kill -KILL $$")
    assert (done.returncode, done.stdout, done.stderr) == (137, b"", b"")


def test_dash_t_gives_a_command_a_pty_that_folds_stderr_into_stdout(msb: Env,
                                                                     name: str) -> None:
    done = msb.msb_proxy("connect", "-q", "-t", name, "tty -s && echo a pty; echo err >&2")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"a pty\r\nerr\r\n", b"")


def test_a_user_option_runs_as_that_user(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", "--user", "dev", name, "id -un")
    assert (done.returncode, done.stdout) == (0, f"{msb.guest_user('dev')}\n".encode())


def test_a_shell_without_a_terminal_reads_its_commands_from_stdin(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", name, input=b"echo from stdin\nexit 4\n")
    assert (done.returncode, done.stdout) == (4, b"from stdin\n")


def test_bad_detach_keys_are_one_line_naming_them(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", "--detach-keys", "ctrl-p,ctrl-1", name)
    assert done.returncode == 1
    assert done.stderr == (b"msb-proxy: bad detach keys 'ctrl-p,ctrl-1': 'ctrl-1' is not a-z "
                           b"or ctrl-<a-z, @, [, \\, ], ^ or _>\n")


# ---- attach, on a real terminal

@pytest.fixture
def terminal(msb: Env) -> Iterator[pexpect.spawn]:
    """A plain bash on a 24x80 terminal with the installation's environment."""
    env = dict(msb.proxy_env(), TERM="xterm", PS1=OUTER)
    child = pexpect.spawn("bash", ["--norc", "--noprofile"], env=env, dimensions=(24, 80),
                          timeout=TIMEOUT_S, encoding="utf-8")
    child.expect_exact(OUTER)
    # readline's bracketed-paste markers would wrap every command's output
    child.sendline("bind 'set enable-bracketed-paste off'")
    child.expect_exact(OUTER)
    yield child
    if child.isalive():
        child.terminate(force=True)
    child.close()


def outer(child: pexpect.spawn, command: str) -> str:
    child.sendline(command)
    child.expect_exact(OUTER)
    return str(child.before).replace("\r\n", "\n").split("\n", 1)[1]


def attach(child: pexpect.spawn, name: str, *options: str) -> str:
    prompt = f"root@{name}:~# "
    child.sendline(" ".join([str(PROXY), "connect", "-q", *options, name]))
    child.expect_exact(prompt)
    return prompt


def test_attach_runs_a_shell_that_sees_resizes_and_ctrl_c_then_detaches_with_modes_restored(
        terminal: pexpect.spawn, name: str) -> None:
    modes = outer(terminal, "stty -g")
    prompt = attach(terminal, name)
    terminal.sendline("echo $((6 * 7)) $TERM")
    terminal.expect_exact("42 xterm\r\n")
    terminal.expect_exact(prompt)
    terminal.setwinsize(30, 100)
    terminal.sendline("stty size")
    terminal.expect_exact("30 100\r\n")
    terminal.expect_exact(prompt)
    # Ctrl-C once the foreground job runs and has said so itself: typed ahead, or sent between
    # bash's own echo and the sleep's start, it would reach bash and the sleep would never end.
    terminal.sendline("sh -c 'echo started; exec sleep 1000'")
    terminal.expect_exact("started\r\n")
    terminal.sendintr()
    terminal.expect_exact(prompt)
    terminal.sendline("echo after interrupt")
    terminal.expect_exact("after interrupt\r\n")
    terminal.expect_exact(prompt)
    terminal.send("\x10\x11")  # ctrl-p, ctrl-q
    terminal.expect_exact(OUTER)
    assert outer(terminal, "echo rc=$?") == "rc=0\n"
    assert outer(terminal, "stty -g") == modes


def test_attach_returns_the_shells_exit_code_and_takes_given_detach_keys(
        terminal: pexpect.spawn, name: str) -> None:
    prompt = attach(terminal, name)
    terminal.sendline("exit 3")
    terminal.expect_exact(OUTER)
    assert outer(terminal, "echo rc=$?") == "rc=3\n"
    attach(terminal, name, "--detach-keys", "ctrl-x,x")
    # The default keys are plain keystrokes now: ctrl-p recalls history, which ctrl-u clears.
    terminal.send("\x10\x11\x15")
    terminal.sendline("echo still attached")
    terminal.expect_exact("still attached\r\n")
    terminal.expect_exact(prompt)
    terminal.send("\x18x")
    terminal.expect_exact(OUTER)
    assert outer(terminal, "echo rc=$?") == "rc=0\n"


@pytest.mark.skipif(TEST_BACKEND == "fake", reason="the fake backend keeps no named sessions")
def test_attach_to_a_named_session_detaches_leaving_it_running_and_reattaches(
        terminal: pexpect.spawn, name: str) -> None:
    attach(terminal, name, "--session", "desk")
    terminal.sendline("cd /tmp; KEPT=$((6 * 7))")
    terminal.expect_exact(f"root@{name}:/tmp# ")
    terminal.send("\x10\x11")  # ctrl-p, ctrl-q: the shell runs on
    terminal.expect_exact(OUTER)
    assert outer(terminal, "echo rc=$?") == "rc=0\n"
    listed = outer(terminal, f"{PROXY} sessions {name}")
    assert listed.splitlines()[1].split()[::5] == ["desk", "detached"], listed
    terminal.sendline(f"{PROXY} connect -q --session desk {name}")
    terminal.expect_exact("\x1b[2J")  # the repaint of the shell that ran on
    terminal.expect_exact(f"root@{name}:/tmp# ")
    terminal.sendline("echo $KEPT; exit 5")
    terminal.expect_exact("42\r\n")
    terminal.expect_exact(OUTER)
    assert outer(terminal, "echo rc=$?") == "rc=5\n"
    assert outer(terminal, f"{PROXY} sessions {name}") == \
        f"sandbox {name!r} has no named sessions\n"


def test_a_session_with_a_command_is_one_line(msb: Env, name: str) -> None:
    done = msb.msb_proxy("connect", "-q", "--session", "desk", name, "true")
    assert (done.returncode, done.stderr) == (
        1, b"msb-proxy: --session names a shell: give no COMMAND with it\n")


def test_sshclient_attach_with_from_a_script_returns_at_its_detach_keys(
        msb: Env, terminal: pexpect.spawn, name: str) -> None:
    modes = outer(terminal, "stty -g")
    script = ("import asyncio, msb_proxy\n"
              "async def main():\n"
              f"    async with await msb_proxy.ssh({name!r}).connect() as client:\n"
              "        code = await client.attach_with(term='vt100', detach_keys='ctrl-x,x')\n"
              "    print('attach returned', code)\n"
              "asyncio.run(main())\n")
    path = msb.root / f"attach-{uuid.uuid4().hex[:8]}.py"
    path.write_text(script)
    terminal.sendline(f"{sys.executable} {path} 2>/dev/null")
    prompt = f"root@{name}:~# "
    terminal.expect_exact(prompt)
    terminal.sendline("echo $TERM")
    terminal.expect_exact("vt100\r\n")
    terminal.expect_exact(prompt)
    terminal.send("\x18x")
    terminal.expect_exact("attach returned 0\r\n")
    terminal.expect_exact(OUTER)
    assert outer(terminal, "stty -g") == modes


def test_sigterm_while_attached_restores_the_terminal_and_exits_128_plus_15(
        msb: Env, name: str) -> None:
    child = pexpect.spawn(str(PROXY), ["connect", "-q", name], env=dict(msb.proxy_env(),
                          TERM="xterm"), dimensions=(24, 80), timeout=TIMEOUT_S)
    cooked = termios.tcgetattr(child.child_fd)
    child.expect_exact(f"root@{name}:~# ".encode())
    raw = termios.tcgetattr(child.child_fd)
    assert (cooked[3] & termios.ICANON, raw[3] & termios.ICANON) == (termios.ICANON, 0)
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF)
    restored = termios.tcgetattr(child.child_fd)
    child.wait()
    child.close()
    assert (child.exitstatus, restored) == (143, cooked)


def test_dash_t_from_a_terminal_runs_the_command_on_a_pty_of_its_size_in_raw_mode(
        terminal: pexpect.spawn, name: str) -> None:
    """As ``ssh -t host COMMAND``: a PTY of the terminal's size, this terminal raw while it
    runs (the typed line is echoed once, by the guest's terminal, not twice), the command's
    exit status, and the terminal's modes as they were."""
    modes = outer(terminal, "stty -g")
    terminal.sendline(f"{PROXY} connect -q -t {name} "
                      "'stty size; read line; echo \"got $line\"; exit 5'")
    terminal.expect_exact("24 80\r\n")
    terminal.send("typed\r")
    terminal.expect_exact("got typed\r\n")
    assert str(terminal.before).count("typed") == 1
    terminal.expect_exact(OUTER)
    assert outer(terminal, "echo rc=$?") == "rc=5\n"
    assert outer(terminal, "stty -g") == modes
