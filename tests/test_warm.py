"""The warm server: later connections are forked from a pre-imported process, per user."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    PROXY,
    REPO,
    TEST_BACKEND,
    Env,
    stop_warm_servers,
    warm_servers,
    write_ssh_config,
)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path (unix socket paths are limited to 107 bytes); the
    installations made in it have their sandboxes removed and warm servers stopped after."""
    path = Path(tempfile.mkdtemp(prefix="msbw-", dir="/tmp"))
    yield path
    for home in path.glob("*/home"):
        for sandbox in (home / "sandboxes").glob("*/name"):
            subprocess.run([str(PROXY), "rm", sandbox.read_text().strip()], check=False,
                           env=dict(os.environ, MSB_PROXY_HOME=str(home),
                                    MSB_PROXY_BACKEND=TEST_BACKEND), capture_output=True)
    stop_warm_servers(path)
    shutil.rmtree(path, ignore_errors=True)


def _installation(msb: Env, tmp_path: Path, name: str) -> Env:
    """A second installation sharing the session's key and sandboxes but with its own
    MSB_PROXY_HOME and runtime directory."""
    root = tmp_path / name
    home = root / "home"
    home.mkdir(parents=True, mode=0o700)
    (home / "authorized_keys").write_text(msb.key.with_suffix(".pub").read_text())
    env = Env(root=root, home=home, user_home=msb.user_home, key=msb.key,
              config=root / "ssh_config", backend=msb.backend, rootfs=msb.rootfs)
    write_ssh_config(env)
    return env


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _sockets(env: Env) -> list[Path]:
    return sorted((env.runtime_dir / "msb-proxy").glob("*.sock"))


def _wait(condition: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_first_connection_starts_a_warm_server_that_serves_the_next(
    msb: Env, sandbox: str, short_tmp: Path
) -> None:
    env = _installation(msb, short_tmp, "a")
    try:
        assert warm_servers(env.runtime_dir) == []
        assert env.ssh(sandbox, "true").returncode == 0
        assert _wait(lambda: len(warm_servers(env.runtime_dir)) == 1)
        (server,) = warm_servers(env.runtime_dir)
        client = subprocess.Popen(["ssh", "-F", str(env.config), env.host(sandbox), "sleep 4"],
                                  stdin=subprocess.DEVNULL)
        try:
            assert _wait(lambda: len(_children(server)) == 1), "no connection forked"
        finally:
            assert client.wait(timeout=60) == 0
        assert warm_servers(env.runtime_dir) == [server]
        # The child ended with the connection; the server reaps it then, leaving no zombie
        # until its next connection.
        assert _wait(lambda: _children(server) == [], timeout=5), "the child was not reaped"
    finally:
        stop_warm_servers(env.runtime_dir)


def test_each_connection_uses_its_own_environment(msb: Env, sandbox: str,
                                                  short_tmp: Path) -> None:
    first = _installation(msb, short_tmp, "first")
    second = _installation(msb, short_tmp, "second")
    second_runtime = second.root / "run"
    # Both installations share one runtime directory, hence one warm server.
    write_ssh_config(second)
    second.config.write_text(second.config.read_text().replace(str(second_runtime),
                                                               str(first.runtime_dir)))
    try:
        assert first.ssh(sandbox, "true").returncode == 0
        assert _wait(lambda: len(warm_servers(first.runtime_dir)) == 1)
        assert second.ssh(sandbox, "true").returncode == 0
        assert (first.home / "host_keys" / sandbox).exists()
        assert (second.home / "host_keys" / sandbox).exists()
        assert not second_runtime.exists()
        assert len(warm_servers(first.runtime_dir)) == 1
    finally:
        stop_warm_servers(first.runtime_dir)


def test_msb_proxy_warm_0_serves_in_process_and_starts_no_server(
    msb: Env, sandbox: str, short_tmp: Path
) -> None:
    env = _installation(msb, short_tmp, "cold")
    write_ssh_config(env, warm=False)
    for _ in range(2):
        assert env.ssh(sandbox, "echo cold").out == "cold\n"
    time.sleep(1.0)
    assert warm_servers(env.runtime_dir) == []


def test_warm_server_exits_after_its_idle_time(msb: Env, sandbox: str, short_tmp: Path) -> None:
    env = _installation(msb, short_tmp, "idle")
    env.config.write_text(env.config.read_text().replace("MSB_PROXY_WARM_IDLE_S=20",
                                                         "MSB_PROXY_WARM_IDLE_S=1"))
    try:
        assert env.ssh(sandbox, "true").returncode == 0
        assert _wait(lambda: len(warm_servers(env.runtime_dir)) == 1)
        assert _wait(lambda: warm_servers(env.runtime_dir) == [], timeout=30)
        assert _sockets(env) == []
    finally:
        stop_warm_servers(env.runtime_dir)


def test_runtime_directory_is_private(msb: Env, sandbox: str, short_tmp: Path) -> None:
    env = _installation(msb, short_tmp, "private")
    try:
        assert env.ssh(sandbox, "true").returncode == 0
        assert _wait(lambda: len(_sockets(env)) == 1)
        assert oct((env.runtime_dir / "msb-proxy").stat().st_mode & 0o777) == "0o700"
        (socket_file,) = _sockets(env)
        assert oct(socket_file.stat().st_mode & 0o777) == "0o600"
        assert socket_file.stat().st_uid == os.getuid()
    finally:
        stop_warm_servers(env.runtime_dir)


# ---- what live connections survive

ECHO_SIZE = 8 << 20
ECHO_FIRST = 1 << 20


def _servers(env: Env) -> list[int]:
    """The warm servers of ``env`` without the connections they forked, which run the same
    command line: only a server holds its lock file open."""
    def holds_lock(pid: int) -> bool:
        with contextlib.suppress(OSError):
            return any(os.readlink(fd).endswith(".sock.lock")
                       for fd in Path(f"/proc/{pid}/fd").iterdir())
        return False
    return [pid for pid in warm_servers(env.runtime_dir) if holds_lock(pid)]


def _accepts(socket_file: Path) -> bool:
    """Whether a warm server listens on ``socket_file`` (connecting and saying nothing costs
    it nothing: it reads end of file and goes on)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        return probe.connect_ex(str(socket_file)) == 0


def _echo_across(env: Env, sandbox: str, disrupt: Callable[[], None]) -> None:
    """``ssh HOST cat`` echoing random bytes: a first part before ``disrupt()``, the rest after;
    every byte must come back, in order, with exit status 0."""
    data = secrets.token_bytes(ECHO_SIZE)
    client = subprocess.Popen(["ssh", "-F", str(env.config), env.host(sandbox), "cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write(data[:ECHO_FIRST])
        client.stdin.flush()
        echoed = bytearray()
        while len(echoed) < ECHO_FIRST:  # the connection is up and carrying data
            chunk = os.read(client.stdout.fileno(), 1 << 16)
            assert chunk, client.stderr.read() if client.stderr else ""
            echoed += chunk
        disrupt()

        def send_rest() -> None:
            assert client.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                client.stdin.write(data[ECHO_FIRST:])
                client.stdin.close()

        sender = threading.Thread(target=send_rest)
        sender.start()
        echoed += client.stdout.read()
        sender.join()
        assert client.wait(timeout=60) == 0
        assert client.stderr is not None and client.stderr.read() == b""
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert len(echoed) == ECHO_SIZE and bytes(echoed) == data, "the live connection lost bytes"


def _assert_serves(env: Env, sandbox: str, server: int, not_by: int | None = None) -> None:
    """The next connection is forked by warm server ``server`` (and not by ``not_by``)."""
    client = subprocess.Popen(["ssh", "-F", str(env.config), env.host(sandbox), "sleep 3"],
                              stdin=subprocess.DEVNULL)
    try:
        assert _wait(lambda: len(_children(server)) == 1), f"warm server {server} served nothing"
        assert not_by is None or _children(not_by) == []
    finally:
        assert client.wait(timeout=60) == 0


def test_killed_warm_server_leaves_its_connections_running_and_is_replaced(
    msb: Env, sandbox: str, short_tmp: Path
) -> None:
    env = _installation(msb, short_tmp, "killed")
    try:
        assert env.ssh(sandbox, "true").returncode == 0
        assert _wait(lambda: len(_servers(env)) == 1)
        (server,) = _servers(env)
        # The server holds its lock a moment before its socket is bound.
        assert _wait(lambda: len(_sockets(env)) == 1)
        (socket_file,) = _sockets(env)

        def kill_server() -> None:
            assert len(_children(server)) == 1, "the live connection is not the server's"
            os.kill(server, signal.SIGKILL)
            assert _wait(lambda: _servers(env) == [])

        _echo_across(env, sandbox, kill_server)
        # What it left: its socket file, which nothing answers any more.
        assert _sockets(env) == [socket_file] and not _accepts(socket_file)
        # The next connection is served all the same and starts a successor on that path.
        assert env.ssh(sandbox, "echo next").out == "next\n"
        assert _wait(lambda: len(_servers(env)) == 1)
        (successor,) = _servers(env)
        assert successor != server
        assert _wait(lambda: _accepts(socket_file)) and _sockets(env) == [socket_file]
        _assert_serves(env, sandbox, successor)
    finally:
        stop_warm_servers(env.runtime_dir)


def _server_software(env: Env, sandbox: str) -> str:
    """The software version the server announced to ``ssh -v``: ``msb_proxy_VERSION``."""
    run = env.ssh(sandbox, "true", options=["-v"])
    assert run.returncode == 0, run.err
    found = re.search(r"remote software version .*?(msb_proxy_\S+)", run.err)
    assert found, run.err
    return found[1]


def test_upgrade_leaves_live_connections_running_and_serves_new_ones_with_the_new_code(
    msb: Env, sandbox: str, short_tmp: Path
) -> None:
    # An installation of its own: a copy of the package, found first through PYTHONPATH.
    code = short_tmp / "code"
    shutil.copytree(REPO / "msb_proxy", code / "msb_proxy")
    env = _installation(msb, short_tmp, "upgrade")
    env.config.write_text(env.config.read_text().replace(
        " MSB_PROXY_WARM=1", f" PYTHONPATH={code} MSB_PROXY_WARM=1"))
    version_file = code / "msb_proxy" / "version.py"
    found = re.search(r'__version__ = "([^"]+)"', version_file.read_text())
    assert found
    old_version, new_version = found[1], f"{found[1]}+upgraded"
    try:
        assert _server_software(env, sandbox) == f"msb_proxy_{old_version}"
        assert _wait(lambda: len(_servers(env)) == 1)
        (old_server,) = _servers(env)

        def upgrade() -> None:
            assert len(_children(old_server)) == 1, "the live connection is not the server's"
            version_file.write_text(version_file.read_text().replace(
                f'"{old_version}"', f'"{new_version}"'))
            # Served by the new code at once (in its own process), which starts its server.
            assert _server_software(env, sandbox) == f"msb_proxy_{new_version}"
            assert _wait(lambda: len(_servers(env)) == 2)

        _echo_across(env, sandbox, upgrade)
        (new_server,) = set(_servers(env)) - {old_server}
        assert _wait(lambda: len(_sockets(env)) == 2)  # one per version of the code
        _assert_serves(env, sandbox, new_server, not_by=old_server)
        assert _server_software(env, sandbox) == f"msb_proxy_{new_version}"
    finally:
        stop_warm_servers(env.runtime_dir)
