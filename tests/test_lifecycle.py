"""Sandboxes on demand, as ``ssh msb-NAME`` meets them through the real ProxyCommand.

On connect a running sandbox is used, a stopped or crashed one is started, a missing one is
created when its template allows it; progress goes to stderr (a line redrawn in place on a
terminal, plain lines elsewhere, nothing with ``--quiet``). Sixteen simultaneous connections to a
missing sandbox create it once. ``stop_after_idle`` stops a sandbox once no connection to it has
existed for that long, counted across processes. The host key of a sandbox name is pinned in
``MSB_PROXY_HOME/known_hosts`` before the client checks it and survives ``rm``. Connections with
no channel open end after ``inactivity_timeout``; stalled clients are found by ``keepalive``.

Every test builds its own installation with its own ``config.toml``; the local backend is
inspected directly (the jail init's PID), so these tests run on it only.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TEST_BACKEND, Env, Run
from installations import (
    configure,
    gone,
    init_pid,
    loud,
    make_installation,
    proxy_of,
    remove_installation,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    TEST_BACKEND != "local", reason="inspects the local backend's jails and creates sandboxes")

SSH_GAVE_UP = 255
READY = r"msb-proxy: sandbox '{name}' ready in \d+\.\d s"


@pytest.fixture
def private(msb: Env) -> Iterator[Env]:
    """An installation of this test's own; its sandboxes and ssh masters end with the test."""
    env = make_installation(msb)
    yield env
    remove_installation(env)


def _refused(env: Env, name: str, config: Path) -> str:
    """The one line msb-proxy prints when sandbox ``name`` is missing and may not be created."""
    return (f"msb-proxy: there is no sandbox '{name}' and its template does not allow creating "
            f"it; set create = true for it in {config}")


def _quiet_ssh(env: Env, name: str, *command: str) -> Run:
    """``ssh`` with the client's own messages off (``LogLevel QUIET``): stderr is msb-proxy's."""
    return env.ssh(name, *command, options=["-o", "LogLevel=QUIET"])


def _progress(run: Run, verb: str, name: str, source: str = "") -> None:
    """Assert that stderr is exactly the plain progress of creating or starting ``name``."""
    first = f"msb-proxy: {verb} sandbox '{name}'{source} ...\n"
    assert run.err.startswith(first), run.err
    assert re.fullmatch(READY.format(name=re.escape(name)) + "\n", run.err[len(first):]), run.err


# ---- every transition on connect


def test_missing_sandbox_is_created_with_plain_progress_lines_on_a_pipe(private: Env) -> None:
    run = loud(private).ssh("fresh", "echo created")
    assert (run.returncode, run.out) == (0, "created\n")
    _progress(run, "creating", "fresh", f" from {private.rootfs}")
    assert "\r" not in run.err
    assert "\x1b" not in run.err


def test_running_sandbox_is_used_without_any_progress(private: Env) -> None:
    first = loud(private).ssh("busy", "echo first")
    assert (first.returncode, first.out) == (0, "first\n")
    pid = init_pid(private, "busy")

    again = loud(private).ssh("busy", "echo again")
    assert (again.returncode, again.out, again.err) == (0, "again\n", "")
    assert init_pid(private, "busy") == pid


def test_stopped_sandbox_is_started_and_keeps_its_files(private: Env) -> None:
    assert private.ssh("nap", "echo kept > /root/kept").returncode == 0
    pid = init_pid(private, "nap")
    stop = private.msb_proxy("stop", "nap")
    assert (stop.returncode, stop.out, stop.err) == (0, "", "")
    assert gone(pid)

    run = loud(private).ssh("nap", "cat /root/kept")
    assert (run.returncode, run.out) == (0, "kept\n")
    _progress(run, "starting", "nap")
    assert init_pid(private, "nap") != pid


def test_crashed_sandbox_is_started_again_and_keeps_its_files(private: Env) -> None:
    assert private.ssh("crash", "echo kept > /root/kept").returncode == 0
    pid = init_pid(private, "crash")
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: gone(pid), 10) is not None

    run = loud(private).ssh("crash", "cat /root/kept")
    assert (run.returncode, run.out) == (0, "kept\n")
    _progress(run, "starting", "crash")


def test_quiet_shows_no_progress_even_when_creating(private: Env) -> None:
    run = private.ssh("hush", "echo created")
    assert (run.returncode, run.out, run.err) == (0, "created\n", "")
    assert (private.home / "sandboxes" / "hush" / "init.pid").exists()


def test_missing_sandbox_is_refused_in_one_line_when_defaults_forbid_creating(
    private: Env,
) -> None:
    config = configure(private, "[defaults]\ncreate = false\n")
    run = _quiet_ssh(loud(private), "nope", "true")
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    assert run.err == _refused(private, "nope", config) + "\n"
    assert not (private.home / "sandboxes" / "nope").exists()


def test_pattern_table_forbids_creating_what_defaults_allow(private: Env) -> None:
    config = configure(private,
                        '[defaults]\ncreate = true\n\n[sandbox."prod-*"]\ncreate = false\n')
    refused = _quiet_ssh(loud(private), "prod-db", "true")
    assert (refused.returncode, refused.out) == (SSH_GAVE_UP, "")
    assert refused.err == _refused(private, "prod-db", config) + "\n"
    assert not (private.home / "sandboxes" / "prod-db").exists()

    allowed = private.ssh("dev-db", "echo created")
    assert (allowed.returncode, allowed.out, allowed.err) == (0, "created\n", "")


ORDERS = {
    # (config, sandbox name, whether it may be created)
    "narrow-table-last-wins": (
        '[defaults]\ncreate = false\n\n[sandbox."web-*"]\ncreate = true\n\n'
        '[sandbox."web-locked-*"]\ncreate = false\n', "web-locked-1", False),
    "broad-table-last-wins": (
        '[defaults]\ncreate = false\n\n[sandbox."web-locked-*"]\ncreate = false\n\n'
        '[sandbox."web-*"]\ncreate = true\n', "web-locked-1", True),
    "table-overrides-defaults": (
        '[defaults]\ncreate = false\n\n[sandbox."web-*"]\ncreate = true\n', "web-1", True),
    "defaults-where-no-table-matches": (
        '[defaults]\ncreate = false\n\n[sandbox."web-*"]\ncreate = true\n', "api-1", False),
}


@pytest.mark.parametrize(("text", "name", "created"), ORDERS.values(), ids=ORDERS.keys())
def test_pattern_tables_override_defaults_and_each_other_in_file_order(
    private: Env, text: str, name: str, created: bool
) -> None:
    config = configure(private, text)
    run = _quiet_ssh(private, name, "echo in")
    if created:
        assert (run.returncode, run.out, run.err) == (0, "in\n", "")
    else:
        assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
        assert run.err == _refused(private, name, config) + "\n"
    assert (private.home / "sandboxes" / name).exists() == created


# ---- progress on a terminal


def _ssh_with_stderr_on_a_terminal(env: Env, name: str, *command: str) -> tuple[Run, bytes]:
    """Run ``ssh`` with stderr on a pseudo-terminal, as from an interactive shell.

    Returns the run (its stderr empty) and every byte written to the terminal. Output
    post-processing is off, so the bytes are exactly what was written.
    """
    master, slave = os.openpty()
    attributes = termios.tcgetattr(slave)
    attributes[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attributes)
    try:
        process = subprocess.Popen(
            ["ssh", "-F", str(env.config), "-o", "LogLevel=QUIET", env.host(name), *command],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    written = bytearray()
    try:
        stdout, _ = process.communicate(timeout=60)
        while select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(master)
    return Run(process.returncode, stdout, b""), bytes(written)


def _screen(written: bytes) -> list[str]:
    """The lines a terminal shows for ``written`` (carriage return, erase to end of line,
    newline); the last item is the line the cursor is on."""
    lines = [""]
    column = 0
    text = written.decode()
    at = 0
    while at < len(text):
        if text.startswith("\x1b[K", at):
            lines[-1] = lines[-1][:column]
            at += 3
            continue
        char = text[at]
        at += 1
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("")
            column = 0
        else:
            line = lines[-1].ljust(column)
            lines[-1] = line[:column] + char + line[column + 1:]
            column += 1
    return lines


def test_progress_on_a_terminal_is_one_line_redrawn_in_place(private: Env) -> None:
    run, written = _ssh_with_stderr_on_a_terminal(loud(private), "tty", "echo created")
    assert (run.returncode, run.out) == (0, "created\n")
    creating = f"msb-proxy: creating sandbox 'tty' from {private.rootfs} ..."
    pattern = (re.escape(f"\r\x1b[K{creating}") + r"\r\x1b\[K"
               + READY.format(name="tty") + r"\n")
    assert re.fullmatch(pattern.encode(), written), written
    assert _screen(written)[1:] == [""], "the line is redrawn, not added to"

    _, again = _ssh_with_stderr_on_a_terminal(loud(private), "tty", "true")
    assert again == b""


def test_error_on_a_terminal_is_a_line_of_its_own(private: Env) -> None:
    missing = private.root / "missing"
    configure(private, f'[defaults]\nvolumes = ["{missing}:/mnt/data"]\n')
    run, written = _ssh_with_stderr_on_a_terminal(loud(private), "broken", "true")
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    error = (f"msb-proxy: sandbox 'broken': volume '{missing}:/mnt/data': {missing} does not "
             "exist")
    creating = f"msb-proxy: creating sandbox 'broken' from {private.rootfs} ..."
    assert _screen(written) in ([creating, error, ""], [error, ""]), written


# ---- concurrent connects


def test_16_simultaneous_connections_create_the_sandbox_once(private: Env) -> None:
    clients = 16
    env = loud(private)
    env.host("herd")
    known_hosts = private.home / "known_hosts"
    start = threading.Barrier(clients)

    def connect(_: int) -> Run:
        argv = ["ssh", "-F", str(env.config), "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known_hosts}", "msb-herd",
                "readlink /proc/self/ns/pid /proc/self/ns/mnt"]
        start.wait()
        return env.run(argv, timeout=120)

    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(connect, range(clients)))

    assert [run.returncode for run in runs] == [0] * clients, [run.err for run in runs]
    namespaces = {run.out for run in runs}
    assert len(namespaces) == 1, namespaces
    assert re.fullmatch(r"pid:\[\d+\]\nmnt:\[\d+\]\n", namespaces.pop())
    lines = sorted(line for run in runs for line in run.err.splitlines())
    assert len(lines) == 2, lines
    assert lines[0] == f"msb-proxy: creating sandbox 'herd' from {private.rootfs} ..."
    assert re.fullmatch(READY.format(name="herd"), lines[1])
    assert sorted(path.name for path in (private.home / "sandboxes").iterdir()) == ["herd"]
    assert not gone(init_pid(private, "herd"))
    assert len(known_hosts.read_text().splitlines()) == 1


# ---- stop_after_idle


def test_stop_after_idle_counts_from_the_last_of_overlapping_connections_and_only_where_set(
    private: Env,
) -> None:
    configure(private, '[sandbox."idle-*"]\nstop_after_idle = "2s"\n')
    assert private.ssh("keep", "true").returncode == 0
    keep_pid = init_pid(private, "keep")

    def connect(command: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["ssh", "-F", str(private.config), private.host("idle-1"), f"echo up; {command}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        assert process.stdout.readline() == b"up\n"
        return process

    # The first connection creates the sandbox and ends while the long one is open.
    creator = connect("sleep 1")
    pid = init_pid(private, "idle-1")
    long = connect("sleep 7")
    assert creator.wait(30) == 0
    short = private.ssh("idle-1", "true")
    assert short.returncode == 0
    time.sleep(3.5)  # idle time passed since the short connections ended; the long one is open
    assert not gone(pid), "stopped while a connection was still open"

    assert long.wait(30) == 0
    stopped_after = wait_until(lambda: gone(pid), 15)
    assert stopped_after is not None, "not stopped after the last connection ended"
    assert stopped_after >= 1.0, "stopped before it had been idle for stop_after_idle"
    assert not gone(keep_pid), "stop_after_idle = 0 (the default) stopped a sandbox"

    back = private.ssh("idle-1", "echo back")
    assert (back.returncode, back.out) == (0, "back\n")


# ---- host keys


def test_host_key_is_pinned_before_the_first_check_and_survives_rm(private: Env) -> None:
    known_hosts = private.home / "known_hosts"
    strict = ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
              "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=INFO"]
    first = private.ssh("pinned", "echo first > /root/first; echo in", options=strict)
    assert (first.returncode, first.out, first.err) == (0, "in\n", "")
    public = subprocess.run(["ssh-keygen", "-y", "-f", str(private.home / "host_keys" / "pinned")],
                            capture_output=True, text=True, check=True).stdout.split()
    pinned = known_hosts.read_bytes()
    assert pinned.decode() == f"msb-pinned {public[0]} {public[1]}\n"

    rm = private.msb_proxy("rm", "pinned")
    assert (rm.returncode, rm.out, rm.err) == (0, "", "")
    again = private.ssh("pinned", "test -e /root/first || echo recreated", options=strict)
    assert (again.returncode, again.out, again.err) == (0, "recreated\n", "")
    assert known_hosts.read_bytes() == pinned


# ---- inactivity timeout and keepalive


def _start_master(env: Env, name: str) -> None:
    """A ControlMaster for ``name`` in the background, as ``ssh -f`` leaves it."""
    with open(env.root / f"master-{name}.log", "wb") as log:
        started = subprocess.run(
            ["ssh", "-F", str(env.config), "-o", "ControlMaster=yes", "-o", "ControlPersist=60",
             "-Nf", env.host(name)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=60, check=False)
    assert started.returncode == 0, (env.root / f"master-{name}.log").read_text()


def _master_running(env: Env, name: str) -> bool:
    return subprocess.run(["ssh", "-F", str(env.config), "-O", "check", env.host(name)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                          check=False).returncode == 0


def test_unused_control_master_is_disconnected_after_the_inactivity_timeout(
    private: Env,
) -> None:
    configure(private, '[defaults]\ninactivity_timeout = "2s"\n')
    assert private.ssh("unused", "true").returncode == 0
    _start_master(private, "unused")
    assert _master_running(private, "unused")
    ended = wait_until(lambda: not _master_running(private, "unused"), 15, step=0.2)
    assert ended is not None, "an unused connection outlived inactivity_timeout"


def test_open_session_keeps_its_connection_past_the_inactivity_timeout(private: Env) -> None:
    configure(private, '[defaults]\ninactivity_timeout = "2s"\n')
    assert private.ssh("used", "true").returncode == 0
    _start_master(private, "used")
    session = subprocess.Popen(
        ["ssh", "-F", str(private.config), private.host("used"), "echo up; sleep 5; echo done"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert session.stdout is not None
    assert session.stdout.readline() == b"up\n"
    time.sleep(3.5)  # past the timeout: only the open session keeps the master's connection
    assert _master_running(private, "used"), "a connection with an open channel was closed"
    out, err = session.communicate(timeout=30)
    assert (session.returncode, out, err) == (0, b"done\n", b"")

    ended = wait_until(lambda: not _master_running(private, "used"), 15, step=0.2)
    assert ended is not None, "the connection outlived inactivity_timeout after its session"


def test_keepalive_ends_the_connection_of_a_stalled_client(private: Env) -> None:
    configure(private, '[sandbox."ka-*"]\nkeepalive = "1s"\n')
    clients = {}
    for name in ("ka-1", "plain"):
        client = subprocess.Popen(
            ["ssh", "-F", str(private.config), private.host(name), "echo up; sleep 10; echo done"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert client.stdout is not None
        assert client.stdout.readline() == b"up\n"
        clients[name] = client
    proxies = {name: proxy_of(client.pid) for name, client in clients.items()}
    time.sleep(3.5)  # a client that answers keepalives keeps its connection
    assert not gone(proxies["ka-1"])

    for client in clients.values():
        os.kill(client.pid, signal.SIGSTOP)
    try:
        # Three unanswered keepalives a second apart, then the proxy gives up and exits.
        assert wait_until(lambda: gone(proxies["ka-1"]), 10) is not None, \
            "the proxy kept serving a client that answers no keepalive"
        assert not gone(proxies["plain"]), "a stalled client without keepalive was dropped"
    finally:
        for client in clients.values():
            os.kill(client.pid, signal.SIGCONT)

    out, _ = clients["ka-1"].communicate(timeout=30)
    assert (clients["ka-1"].returncode, out) == (SSH_GAVE_UP, b"")
    out, err = clients["plain"].communicate(timeout=30)
    assert (clients["plain"].returncode, out, err) == (0, b"done\n", b"")
