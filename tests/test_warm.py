"""The warm server: later connections are forked from a pre-imported process, per user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    PROXY,
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
