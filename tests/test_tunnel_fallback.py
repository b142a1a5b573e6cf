"""-L and -D in a guest that cannot run the tunnel helper: socat, nc or bash carry each
connection.

The local backend forks its tunnel helper from the jail init (and connects to addresses in the
sandbox on sockets the init makes), so it never needs this; a sandbox whose start_helper fails
and that hands out no sockets (as a microVM without python3) is made here by wrapping the local
backend, and served through the real ssh client by the importable SshServer API.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Env

from msb_proxy.backends.base import GuestUser
from msb_proxy.backends.links import Link
from msb_proxy.backends.local.backend import LocalBackend, LocalSandbox
from msb_proxy.config import SandboxTemplate
from msb_proxy.errors import SandboxError
from msb_proxy.progress import Progress
from msb_proxy.server.endpoint import SshServer, SshServerOptions
from msb_proxy.state import StateDir
from msb_proxy.transport.stdio import SshSocketStream


class _NoHelperSandbox(LocalSandbox):
    """As a microVM without python3: no tunnel helper, and no sockets of its namespace for us."""

    async def start_helper(self, user: GuestUser, helper: str) -> Link:
        raise SandboxError(f"sandbox {self.name!r} has no python3 for the {helper} helper")

    async def tcp_socket(self, family: int) -> socket.socket | None:
        return None


class _NoHelperBackend(LocalBackend):
    async def open(self, name: str, template: SandboxTemplate,
                   progress: Progress) -> LocalSandbox:
        opened = await super().open(name, template, progress)
        return _NoHelperSandbox(name, opened.socket_path, opened.run_id, opened.started)


@pytest.fixture(scope="module")
def served(msb: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A unix socket where an in-process SshServer serves a helper-less sandbox; the ssh
    config to reach it (host ``fallback``)."""
    if msb.backend != "local":
        pytest.skip("wraps the local backend")
    root = tmp_path_factory.mktemp("fallback")
    listen = Path("/tmp") / f"msb-fallback-{id(root)}.sock"
    name = f"fallback-{id(root) % 100000}"
    msb.host(name)  # removed with the session's other sandboxes
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    finish = asyncio.Event()

    async def main() -> None:
        backend = _NoHelperBackend(StateDir(msb.home), msb.rootfs)
        options = SshServerOptions(host_key_path=root / "host_key",
                                   authorized_keys=[msb.key.with_suffix(".pub").read_text()],
                                   template=SandboxTemplate(backend="local"))
        server = await SshServer.prepare(backend, name, options)

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket").dup()
            writer.transport.abort()
            await server.serve(SshSocketStream(socket.socket(fileno=sock.detach())))

        listener = await asyncio.start_unix_server(connection, path=str(listen))
        ready.set()
        await finish.wait()
        listener.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    config = root / "ssh_config"
    config.write_text(
        "Host fallback\n"
        f"  ProxyCommand socat - UNIX-CONNECT:{listen}\n"
        f"  IdentityFile {msb.key}\n"
        "  IdentitiesOnly yes\n  User root\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel INFO\n")
    subprocess.run(["ssh", "-F", str(config), "fallback",
                    "cd /tmp && echo fallback-ok > probe.txt && "
                    "(nohup python3 -m http.server 8777 --bind 127.0.0.1 >/dev/null 2>&1 &) && "
                    # Listening before any test: a refused connect through socat is no "7".
                    "for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/8777) 2>/dev/null "
                    "&& exit 0; sleep 0.1; done; exit 1"],
                   check=True, timeout=60)
    yield config, name
    loop.call_soon_threadsafe(finish.set)
    thread.join(timeout=30)
    listen.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _through(config: Path, forward: list[str], url: str, socks: int | None = None) -> str:
    tunnel = subprocess.Popen(["ssh", "-F", str(config), "-N", "-o", "ExitOnForwardFailure=yes",
                               *forward, "fallback"], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            fetched = subprocess.run(
                ["curl", "-s", "--max-time", "10",
                 *(["--socks5-hostname", f"127.0.0.1:{socks}"] if socks else []), url],
                capture_output=True, text=True, check=False)
            if fetched.returncode != 7:  # 7: nothing listening locally yet
                return fetched.stdout
            time.sleep(0.1)
        raise AssertionError("the local forward never came up")
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)


def _refusal(config: Path, guest_port: int) -> str:
    """What ``ssh -L`` to guest port ``guest_port`` prints once a connection through it has
    been tried (its open failed, as the tests expect)."""
    port = _free_port()
    tunnel = subprocess.Popen(["ssh", "-F", str(config), "-N", "-L",
                               f"{port}:127.0.0.1:{guest_port}", "fallback"],
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            done = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/"], check=False,
                                  capture_output=True)
            if done.returncode != 7:  # 7: nothing listening locally yet
                break
            time.sleep(0.1)
    finally:
        tunnel.terminate()
        _, err = tunnel.communicate(timeout=10)
    return err


def _hide(config: Path, *programs: str) -> None:
    for program in programs:
        subprocess.run(["ssh", "-F", str(config), "fallback",
                        f"mv /usr/bin/{program} /usr/bin/{program}.hidden"], check=True,
                       timeout=60)


def _restore(config: Path, *programs: str) -> None:
    for program in programs:
        subprocess.run(["ssh", "-F", str(config), "fallback",
                        f"mv /usr/bin/{program}.hidden /usr/bin/{program}"], check=False,
                       timeout=60)


@pytest.mark.parametrize("hidden", [(), ("socat",), ("socat", "nc")],
                         ids=["socat", "nc", "bash"])
def test_local_forward_works_through_each_fallback_tool(
    served: tuple[Path, str], hidden: tuple[str, ...]
) -> None:
    config, _ = served
    _hide(config, *hidden)
    try:
        port = _free_port()
        body = _through(config, ["-L", f"{port}:127.0.0.1:8777"],
                        f"http://127.0.0.1:{port}/probe.txt")
    finally:
        _restore(config, *hidden)
    assert body == "fallback-ok\n"


def test_stdio_forward_ends_when_the_guest_connection_is_done(served: tuple[Path, str]) -> None:
    """``ssh -W`` to a server that answers and closes (HTTP/1.0) exits 0 with the whole answer
    while its stdin is still open, as with sshd: the tool's end of file reaches the client."""
    config, _ = served
    client = subprocess.Popen(["ssh", "-F", str(config), "-W", "127.0.0.1:8777", "fallback"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert client.stdin is not None
    try:
        client.stdin.write(b"GET /probe.txt HTTP/1.0\r\n\r\n")
        client.stdin.flush()
        status = client.wait(timeout=30)  # stdin left open
        out = client.stdout.read() if client.stdout is not None else b""
    finally:
        client.kill()
        client.wait()
        client.stdin.close()
    assert status == 0
    assert out.startswith(b"HTTP/1.0 200")
    assert out.endswith(b"\r\n\r\nfallback-ok\n")


def test_dynamic_forward_resolves_names_in_the_guest(served: tuple[Path, str]) -> None:
    config, _ = served
    port = _free_port()
    assert _through(config, ["-D", str(port)], "http://localhost:8777/probe.txt",
                    socks=port) == "fallback-ok\n"


def test_refused_target_fails_the_channel_open_with_the_reason(
    served: tuple[Path, str]
) -> None:
    config, _ = served
    err = _refusal(config, 1)
    assert "open failed: connect failed: Connection refused" in err


def test_guest_without_any_tool_gets_a_line_naming_what_it_lacks(
    served: tuple[Path, str]
) -> None:
    config, name = served
    _hide(config, "socat", "nc")
    subprocess.run(["ssh", "-F", str(config), "fallback",
                    "mv /usr/bin/bash /usr/bin/bash.hidden"], check=True, timeout=60)
    try:
        err = _refusal(config, 8777)
    finally:
        # Not over ssh: without bash, root has no login shell to run the mv. sftp runs the
        # guest's sftp-server with no shell in between.
        subprocess.run(["sftp", "-F", str(config), "-b", "-", "fallback"], check=False,
                       input="rename /usr/bin/bash.hidden /usr/bin/bash\n", text=True,
                       capture_output=True, timeout=60)
        _restore(config, "socat", "nc")
    assert (f"open failed: connect failed: sandbox '{name}' has neither python3 nor socat, "
            "nc or bash to make connections with") in err



@pytest.mark.parametrize("forward", ["-R", "-A"])
def test_remote_forward_and_agent_fail_alone_where_the_guest_cannot_run_the_helper(
    served: tuple[Path, str], tmp_path: Path, forward: str
) -> None:
    config, _ = served
    port = _free_port()
    agent_sock = tmp_path / "agent.sock"
    # Without -D, ssh-agent answers once its socket listens, with the variables to use it.
    started = subprocess.run(["ssh-agent", "-s", "-a", str(agent_sock)], capture_output=True,
                             text=True, timeout=30, check=True)
    found = re.search(r"SSH_AGENT_PID=(\d+)", started.stdout)
    assert found is not None, started.stdout
    agent_pid = int(found.group(1))
    try:
        argv = ["-R", f"{port}:127.0.0.1:{_free_port()}"] if forward == "-R" else ["-A"]
        done = subprocess.run(["ssh", "-F", str(config), *argv, "fallback",
                               'echo "alive, agent: ${SSH_AUTH_SOCK:-none}"'],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "SSH_AUTH_SOCK": str(agent_sock)})
    finally:
        os.kill(agent_pid, signal.SIGTERM)
    assert (done.returncode, done.stdout) == (0, "alive, agent: none\n"), done.stderr
    refused = [line for line in done.stderr.splitlines() if "forwarding failed" in line]
    assert refused == ([f"Warning: remote port forwarding failed for listen port {port}"]
                       if forward == "-R" else [])
