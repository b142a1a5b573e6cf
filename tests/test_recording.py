"""Recordings of terminal sessions (``record = true`` in a template), through the real ``ssh``
on a real terminal, played back with the real ``asciinema``.

``pexpect`` gives ``/usr/bin/ssh`` a terminal of a chosen size and keeps every byte the
terminal was sent; ``asciinema cat`` of the cast must give exactly those bytes back. The cast's
header names the size, terminal, shell, sandbox, users and key; a window change is an ``r``
event; a UTF-8 character that reaches us in two reads is one event's text, never two halves.
Each attachment of a named session is a cast of its own, the next one opening with the
repaint, and the audit log says when it detached. A msb-proxy killed mid-session leaves a cast
that plays up to its last output. Sessions without a terminal and file transfers are never
recorded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import TEST_BACKEND, Env, have, write_ssh_config
from installations import make_installation, proxy_of, remove_installation, wait_until

pytestmark = pytest.mark.skipif(not have("asciinema"), reason="needs asciinema "
                                "(scripts/install-system-deps --test installs it)")

TIMEOUT_S = 60
CAST_NAME = re.compile(r"\d{8}T\d{6}Z-\d+-\d+\.cast")
CLEAR_SCREEN = b"\x1b[0m\x1b[H\x1b[2J"  # how the repaint of a reattached named session begins


@pytest.fixture(scope="module")
def recorded(msb: Env) -> Iterator[Env]:
    """An installation of this module's own whose rec-* sandboxes are recorded."""
    env = make_installation(msb, '[sandbox."rec-*"]\nrecord = true\n\n'
                                 '[sandbox."recaud-*"]\nrecord = true\naudit = true\n')
    write_ssh_config(env, warm=False, path=env.cold_config)
    yield env
    remove_installation(env)


def new_sandbox(env: Env, prefix: str = "rec") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    env.host(name)
    return name


def terminal(env: Env, sandbox: str, *args: str, config: Path | None = None,
             dimensions: tuple[int, int] = (24, 80)) -> tuple[pexpect.spawn, io.BytesIO]:
    """``ssh -tt`` on a fresh terminal, and the buffer that gets every byte it shows."""
    child = pexpect.spawn("ssh", ["-F", str(config or env.config), "-tt", env.host(sandbox),
                                  *args], env=dict(os.environ, TERM="xterm"),
                          dimensions=dimensions, timeout=TIMEOUT_S)
    shown = io.BytesIO()
    child.logfile_read = shown
    return child, shown


def prompt(env: Env, sandbox: str) -> str:
    """Debian's bash prompt for root in its home. The fake backend's shell reads this host's
    start-up files, so there the same prompt is set in the sandbox's ``~/.profile``."""
    shown = f"root@{sandbox}:~# "
    if env.backend == "fake":
        line = f"PS1={shlex.quote(shown)}"
        assert env.ssh(sandbox, f"echo {shlex.quote(line)} > ~/.profile").returncode == 0
    return shown


def casts(env: Env, sandbox: str) -> list[Path]:
    directory = env.home / "recordings" / sandbox
    return sorted(directory.iterdir()) if directory.exists() else []


def read_cast(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    header, *lines = path.read_text().splitlines()
    return json.loads(header), [json.loads(line) for line in lines]


def played(path: Path) -> bytes:
    """What ``asciinema cat`` writes for the cast. It puts its controlling terminal in raw
    mode, so it gets one of its own, while its stdout stays a pipe that keeps every byte."""
    controller, terminal_fd = os.openpty()
    terminal_name = os.ttyname(terminal_fd)

    def own_terminal() -> None:
        os.setsid()
        os.close(os.open(terminal_name, os.O_RDWR))  # a session leader's first tty: its own

    try:
        run = subprocess.run(["asciinema", "cat", str(path)], capture_output=True, timeout=60,
                             check=False, env=dict(os.environ, LC_ALL="C.UTF-8"),
                             preexec_fn=own_terminal)
    finally:
        os.close(controller)
        os.close(terminal_fd)
    assert (run.returncode, run.stderr) == (0, b"")
    return run.stdout


def fingerprint(env: Env) -> str:
    listed = subprocess.run(["ssh-keygen", "-l", "-f", f"{env.key}.pub"], capture_output=True,
                            text=True, check=True)
    return listed.stdout.split()[1]


def test_shell_on_a_terminal_replays_as_the_terminal_showed_it(recorded: Env) -> None:
    sandbox = new_sandbox(recorded)
    shell_prompt = prompt(recorded, sandbox)
    started = int(time.time())
    child, shown = terminal(recorded, sandbox, dimensions=(30, 100))
    try:
        child.expect_exact(shell_prompt)
        # "é" reaches us in two reads: its first byte, and after a pause its second
        child.sendline(r"printf 'caf\303'; sleep 0.5; printf '\251 \342\234\223\n'")
        child.expect_exact("café ✓\r\n".encode())
        child.expect_exact(shell_prompt)
        child.setwinsize(40, 120)  # the client sends window-change on its next turn
        time.sleep(0.3)
        child.sendline("stty size")
        child.expect_exact("40 120\r\n")
        child.expect_exact(shell_prompt)
        child.sendline("exit 7")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 7
    [cast] = casts(recorded, sandbox)
    assert CAST_NAME.fullmatch(cast.name), cast.name
    assert oct(cast.stat().st_mode & 0o777) == "0o600"
    assert oct(cast.parent.stat().st_mode & 0o777) == "0o700"
    header, events = read_cast(cast)
    timestamp = header.pop("timestamp")
    assert started <= timestamp <= time.time()
    assert re.fullmatch(r"[0-9a-f]{8}", header.pop("connection"))
    assert header == {
        "version": 2, "width": 100, "height": 30,
        "env": {"TERM": "xterm", "SHELL": "/bin/bash"}, "title": f"root@{sandbox}: shell",
        "sandbox": sandbox, "login_user": "root", "guest_user": recorded.guest_user("root"),
        "key_fingerprint": fingerprint(recorded),
    }
    assert [event[1:] for event in events if event[1] == "r"] == [["r", "120x40"]]
    assert {event[1] for event in events} == {"o", "r"}
    times = [event[0] for event in events]
    assert times == sorted(times)
    text = [event[2] for event in events if event[1] == "o"]
    split = [index for index, piece in enumerate(text) if piece.endswith("caf")]
    assert len(split) == 1  # the read that ended inside "é" ...
    assert text[split[0] + 1].startswith("é ✓")  # ... and the next has it whole
    assert "\ufffd" not in "".join(text)
    assert played(cast) == shown.getvalue()


def test_command_on_a_terminal_is_recorded_under_its_command(recorded: Env) -> None:
    sandbox = new_sandbox(recorded)
    run = recorded.ssh(sandbox, "-tt", "echo recorded")  # no terminal here: ssh asks for 0x0
    assert (run.returncode, run.out) == (0, "recorded\r\n")
    [cast] = casts(recorded, sandbox)
    header, events = read_cast(cast)
    assert (header["title"], header["width"], header["height"]) == \
        (f"root@{sandbox}: echo recorded", 80, 24)
    assert [event[1:] for event in events] == [["o", "recorded\r\n"]]
    assert played(cast) == b"recorded\r\n"


@pytest.mark.skipif(TEST_BACKEND != "local",
                    reason="named sessions are kept by the local jail's init")
def test_each_attachment_of_a_named_session_is_a_cast_the_next_opening_with_its_repaint(
        recorded: Env) -> None:
    sandbox = new_sandbox(recorded, "recaud")
    shell_prompt = prompt(recorded, sandbox)
    named = ["-o", "SetEnv=MSB_SESSION=work"]
    first, first_shown = terminal(recorded, sandbox, *named)
    try:
        first.expect_exact(shell_prompt)
        first.sendline("echo 'before-''drop'")
        first.expect_exact("before-drop\r\n")
        first.expect_exact(shell_prompt)
    finally:
        first.kill(signal.SIGKILL)  # the client is gone; the shell stays
        first.close(force=True)

    def detached() -> bool:
        return any(event["event"] == "detach" for event in audit_events(recorded, sandbox))

    assert wait_until(detached, TIMEOUT_S) is not None
    second, second_shown = terminal(recorded, sandbox, *named)
    try:
        second.expect_exact("before-drop\r\n")  # the repaint
        second.expect_exact(shell_prompt)
        second.sendline("exit 3")
        second.expect(pexpect.EOF)
    finally:
        second.close()
    # by when each was last written: the first attachment's before the second began
    one, two = sorted(casts(recorded, sandbox), key=lambda path: path.stat().st_mtime_ns)
    assert played(one) == first_shown.getvalue()
    assert played(two) == second_shown.getvalue()
    assert played(two).startswith(CLEAR_SCREEN)
    ends = [(event["event"], event.get("session"), event.get("reason"), event.get("status"))
            for event in audit_events(recorded, sandbox)
            if event["event"] in ("shell", "detach", "exit")]
    assert ends == [("shell", "work", None, None), ("detach", None, "the connection closed", None),
                    ("shell", "work", None, None), ("exit", None, None, 3)]


def audit_events(env: Env, sandbox: str) -> list[dict[str, Any]]:
    path = env.home / "audit" / f"{sandbox}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_killed_msb_proxy_leaves_a_cast_that_plays_to_its_last_output(recorded: Env) -> None:
    sandbox = new_sandbox(recorded)
    shell_prompt = prompt(recorded, sandbox)
    child, shown = terminal(recorded, sandbox, config=recorded.cold_config)
    try:
        child.expect_exact(shell_prompt)
        child.sendline("echo 'before the ''kill'")
        child.expect_exact("before the kill\r\n")
        child.expect_exact(shell_prompt)
        until_kill = shown.getvalue()
        os.kill(proxy_of(child.pid), signal.SIGKILL)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    [cast] = casts(recorded, sandbox)
    assert played(cast) == until_kill
    assert cast.read_text().endswith("\n")


def test_sessions_without_a_terminal_and_transfers_are_not_recorded(
        recorded: Env, tmp_path: Path) -> None:
    sandbox = new_sandbox(recorded)
    tmp = recorded.guest_tmp(sandbox)
    assert recorded.ssh(sandbox, "echo plain").out == "plain\n"
    assert recorded.ssh(sandbox, input=b"echo piped\n").out == "piped\n"
    local = tmp_path / "f"
    local.write_text("payload\n")
    for argv in (["scp", "-q", "-F", str(recorded.config), "-O", str(local),
                  f"{recorded.host(sandbox)}:{tmp}/legacy"],
                 ["scp", "-q", "-F", str(recorded.config), str(local),
                  f"{recorded.host(sandbox)}:{tmp}/over-sftp"]):
        assert recorded.run(argv).returncode == 0
    assert casts(recorded, sandbox) == []
