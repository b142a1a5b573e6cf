"""Tunnels through the real ssh client and the ProxyCommand: ``-L``, ``-D``, ``-R`` (port 0
too), unix sockets both ways, refused and unreachable targets, half-close, 64 tunnels at once,
and agent forwarding (``-A``).

The sandbox has a network namespace of its own, so whatever answers on its ``127.0.0.1``
answered from inside the sandbox, and a host server is only reachable from there through ``-R``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Env
from tunnel_helpers import (
    WAIT_S,
    curl,
    guest_port,
    guest_server,
    guest_servers_path,
    host_http_server,
    host_port,
    install_guest_servers,
    listening,
    short_tmpdir,
    socket_exists,
    ssh_argv,
    tunnel,
    wait_until,
)

QUICK_S = 1.0  # a refused connection must fail the channel open well within this
# sshd's text for a channel whose connection was refused, as the OpenSSH client logs it
REFUSED = re.compile(r"^(?:\w+: )?channel \d+: open failed: connect failed: Connection refused$",
                     re.MULTILINE)


@dataclass(frozen=True)
class Web:
    """An HTTP server in the guest (``python3 -m http.server``) serving ``payload``."""

    port: int
    path: str  # URL path of the payload
    payload: bytes


@pytest.fixture(scope="module")
def guest(msb: Env) -> str:
    """A sandbox for this module, with the test servers' script in it."""
    name = f"tunnels-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    install_guest_servers(msb, name)
    return name


@pytest.fixture(scope="module")
def web(msb: Env, guest: str) -> Iterator[Web]:
    payload = os.urandom(1 << 20) + bytes(range(256))
    directory = f"{msb.guest_tmp(guest)}/www-{uuid.uuid4().hex[:6]}"
    put = msb.ssh(guest, f"mkdir {directory} && cat > {directory}/payload.bin", input=payload)
    assert put.returncode == 0, put.err
    port = guest_port()
    with guest_server(msb, guest, f"python3 -m http.server {port} --bind 127.0.0.1 "
                                  f"--directory {directory}", listening(port)):
        yield Web(port, "/payload.bin", payload)


def forward_success(listen: int | str) -> str:
    """What ``ssh -v`` logs once the server has accepted a ``-R`` forward of ``listen``."""
    where = rf"{listen}" if isinstance(listen, int) else rf"{re.escape(listen)}(?::-2)?"
    return rf"remote forward success for: listen {where}, "


def guest_script(msb: Env, sandbox: str, script: str, timeout: float = WAIT_S) -> str:
    """Run a python3 ``script`` in the guest; its stdout (it must succeed)."""
    run = msb.ssh(sandbox, "python3 -", input=script.encode(), timeout=timeout)
    assert run.returncode == 0, run.err
    return run.out


def exchange(address: int | str, data: bytes, timeout: float = WAIT_S) -> bytes:
    """Connect through a host-side tunnel end, send ``data``, half-close, read until EOF."""
    family = socket.AF_INET if isinstance(address, int) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", address) if isinstance(address, int) else address)
        reply = bytearray()

        def read() -> None:
            with contextlib.suppress(OSError):  # a reset shows as a short reply
                while chunk := sock.recv(65536):
                    reply.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reader.join(timeout)
        return bytes(reply)


# A direct-tcpip channel to an address goes to a socket of the sandbox's network namespace
# (local backend); to a name, through the guest tunnel helper, which resolves it in the guest.
# Both carry the same tests.
TARGETS = pytest.mark.parametrize("target", ["127.0.0.1", "localhost"],
                                  ids=["direct-socket", "tunnel-helper"])


# ---- -L and -D to TCP servers in the guest


@TARGETS
def test_local_forward_reaches_a_guest_http_server_byte_for_byte(
    msb: Env, guest: str, web: Web, target: str
) -> None:
    port = host_port()
    with tunnel(msb, guest, "-L", f"{port}:{target}:{web.port}", ready=port):
        got = curl(f"http://127.0.0.1:{port}{web.path}")
    assert (got.returncode, got.stderr) == (0, b"")
    assert got.stdout == web.payload


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_dynamic_forward_connects_from_the_guest_by_name_or_address(
    msb: Env, guest: str, web: Web, name: str
) -> None:
    # "localhost" resolves in the guest; ::1 may come first, where nothing listens, and the
    # next address is tried then, as sshd does.
    port = host_port()
    with tunnel(msb, guest, "-D", str(port), ready=port):
        got = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://{name}:{web.port}{web.path}")
    assert (got.returncode, got.stderr) == (0, b"")
    assert got.stdout == web.payload


# ---- -L to unix sockets in the guest


@pytest.fixture
def unix_echo(msb: Env, guest: str) -> Iterator[str]:
    """A unix socket echo server in the guest; its path."""
    path = f"{msb.guest_tmp(guest)}/echo-{uuid.uuid4().hex[:8]}.sock"
    with guest_server(msb, guest, f"python3 {guest_servers_path(msb, guest)} echo {path}",
                      socket_exists(path)):
        yield path


def test_local_forward_from_a_unix_socket_to_a_guest_unix_socket(
    msb: Env, guest: str, unix_echo: str
) -> None:
    local = short_tmpdir()
    try:
        sock = str(local / "x.sock")
        with tunnel(msb, guest, "-L", f"{sock}:{unix_echo}", ready=sock):
            data = os.urandom(3 << 20)
            assert exchange(sock, data) == data
    finally:
        shutil.rmtree(local)


def test_local_forward_from_a_port_to_a_guest_unix_socket(
    msb: Env, guest: str, unix_echo: str
) -> None:
    port = host_port()
    with tunnel(msb, guest, "-L", f"{port}:{unix_echo}", ready=port):
        data = b"over direct-streamlocal\n" * 1000
        assert exchange(port, data) == data


# ---- -R: listeners in the guest, connections back to the host


def test_remote_forward_brings_guest_connections_to_a_host_server(msb: Env, guest: str) -> None:
    body = os.urandom(100_000)
    gport = guest_port()
    with host_http_server(body) as hport, \
            tunnel(msb, guest, "-v", "-R", f"{gport}:127.0.0.1:{hport}") as client:
        client.wait_for(forward_success(gport))
        got = msb.ssh(guest, f"curl -sS http://127.0.0.1:{gport}/file | sha256sum")
    assert (got.returncode, got.err) == (0, "")
    assert got.out == f"{hashlib.sha256(body).hexdigest()}  -\n"


def test_remote_forward_to_port_0_prints_and_listens_on_the_allocated_port(
    msb: Env, guest: str
) -> None:
    body = b"reached through the allocated port\n"
    with host_http_server(body) as hport, \
            tunnel(msb, guest, "-o", "LogLevel=INFO", "-R", f"0:127.0.0.1:{hport}") as client:
        allocated = int(client.wait_for(
            rf"^Allocated port (\d+) for remote forward to 127\.0\.0\.1:{hport}$").group(1))
        got = msb.ssh(guest, f"curl -sS http://127.0.0.1:{allocated}/")
    assert 0 < allocated < 65536
    assert (got.returncode, got.out, got.err) == (0, body.decode(), "")


def test_remote_forward_from_a_guest_unix_socket(msb: Env, guest: str) -> None:
    body = b"reached through a unix socket in the guest\n"
    path = f"{msb.guest_tmp(guest)}/guest-{uuid.uuid4().hex[:8]}.sock"
    with host_http_server(body) as hport, \
            tunnel(msb, guest, "-v", "-R", f"{path}:127.0.0.1:{hport}") as client:
        client.wait_for(forward_success(path))
        got = msb.ssh(guest, f"stat -c '%U %a %F' {path}; "
                             f"curl -sS --unix-socket {path} http://guest/")
    assert (got.returncode, got.err) == (0, "")
    assert got.out == f"{msb.guest_user('root')} 600 socket\n{body.decode()}"
    gone = msb.ssh(guest, f"for _ in $(seq 100); do [ -e {path} ] || exit 0; sleep 0.1; done; "
                          "exit 1")
    assert gone.returncode == 0, f"{path} outlived its connection"


def test_remote_forward_stops_listening_in_the_guest_when_its_connection_ends(
    msb: Env, guest: str
) -> None:
    gport = guest_port()
    with tunnel(msb, guest, "-v", "-R", f"{gport}:127.0.0.1:{host_port()}") as client:
        client.wait_for(forward_success(gport))
        assert msb.ssh(guest, listening(gport)).returncode == 0
    gone = msb.ssh(guest, f"for _ in $(seq 100); do {listening(gport)} || exit 0; sleep 0.1; "
                          "done; exit 1")
    assert gone.returncode == 0, f"guest port {gport} still listens after the tunnel ended"


def test_cancelled_remote_forward_stops_listening_in_the_guest(msb: Env, guest: str) -> None:
    body = b"before the cancel\n"
    gport = guest_port()
    base = ssh_argv(msb, guest)
    host = base.pop()
    with host_http_server(body) as hport:
        started = msb.run([*base, "-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-Nf",
                           host])
        assert started.returncode == 0, started.err
        try:
            forward = f"{gport}:127.0.0.1:{hport}"
            added = msb.run([*base, "-O", "forward", "-R", forward, host])
            assert added.returncode == 0, added.err
            before = msb.ssh(guest, f"{listening(gport)} && curl -sS http://127.0.0.1:{gport}/")
            assert (before.returncode, before.out) == (0, body.decode()), before.err
            cancelled = msb.run([*base, "-O", "cancel", "-R", forward, host])
            assert cancelled.returncode == 0, cancelled.err
            after = msb.ssh(guest, f"for _ in $(seq 100); do {listening(gport)} || break; "
                                   f"sleep 0.1; done; curl -sS http://127.0.0.1:{gport}/")
        finally:
            msb.run([*base, "-O", "exit", host])
    assert after.returncode == 7, (after.out, after.err)  # curl: couldn't connect


# ---- refused, slow and unresolvable targets


def _guest_helpers(msb: Env, guest: str) -> int:
    """How many guest helpers (the tunnel helper, forked from the jail init) are running now."""
    listing = msb.ssh(guest, "ps -eo pid=,args=").out.splitlines()
    return sum(1 for line in listing
               if line.split(None, 1)[1].startswith("msb-init") and line.split()[0] != "1")


@pytest.mark.parametrize(("target", "helpers"), [("127.0.0.1", 0), ("localhost", 1)],
                         ids=["address-direct", "name-tunnel-helper"])
def test_tunnel_to_an_address_needs_no_process_in_the_guest(
    msb: Env, guest: str, web: Web, target: str, helpers: int
) -> None:
    if msb.backend != "local":
        pytest.skip("sockets of the sandbox's namespace are the local backend's")
    assert wait_until(lambda: _guest_helpers(msb, guest) == 0, 10)
    port = host_port()
    with tunnel(msb, guest, "-L", f"{port}:{target}:{web.port}", ready=port):
        got = curl(f"http://127.0.0.1:{port}{web.path}")
        running = _guest_helpers(msb, guest)
    assert got.stdout == web.payload
    assert running == helpers


@TARGETS
def test_refused_target_fails_the_channel_open_at_once_while_other_tunnels_work(
    msb: Env, guest: str, web: Web, target: str
) -> None:
    refused, healthy = host_port(), host_port()
    closed = guest_port()
    with tunnel(msb, guest, "-o", "LogLevel=INFO", "-L", f"{refused}:{target}:{closed}",
                "-L", f"{healthy}:{target}:{web.port}", ready=healthy) as client:
        # A slow download through the healthy tunnel runs while the refusals happen.
        download = subprocess.Popen(
            ["curl", "-sS", "--max-time", str(WAIT_S), "--limit-rate", "1M",
             f"http://127.0.0.1:{healthy}{web.path}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        took = []
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", refused), timeout=WAIT_S) as sock:
                started = time.monotonic()
                with contextlib.suppress(ConnectionResetError):  # closed, or reset
                    assert sock.recv(1) == b""
                took.append(time.monotonic() - started)
        running = download.poll() is None
        out, err = download.communicate(timeout=WAIT_S + 10)
        assert wait_until(lambda: client.err.count(": open failed: ") == 5, 5), client.err
    assert max(took) < QUICK_S, took
    assert running, "the download should still have been going on"
    assert (download.returncode, err) == (0, b"")
    assert out == web.payload
    assert len(REFUSED.findall(client.err)) == 5, client.err


def test_connect_still_in_progress_does_not_hold_up_other_tunnels(
    msb: Env, guest: str, web: Web
) -> None:
    # A listener with a full accept queue drops further SYNs: a connect to it just hangs.
    stuck_port = guest_port()
    filled = f"{msb.guest_tmp(guest)}/filled-{uuid.uuid4().hex[:8]}"
    server = (f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {stuck_port})); "
              f"s.listen(0); c = socket.create_connection(('127.0.0.1', {stuck_port})); "
              f"open('{filled}', 'w').close(); time.sleep(600)")
    stuck, healthy = host_port(), host_port()
    with guest_server(msb, guest, f'python3 -c "{server}"', f"[ -e {filled} ]"), \
            tunnel(msb, guest, "-L", f"{stuck}:127.0.0.1:{stuck_port}",
                   "-L", f"{healthy}:127.0.0.1:{web.port}", ready=healthy), \
            socket.create_connection(("127.0.0.1", stuck), timeout=WAIT_S) as pending:
        time.sleep(0.3)  # the channel open is now waiting on the guest's connect
        started = time.monotonic()
        got = curl(f"http://127.0.0.1:{healthy}{web.path}")
        took = time.monotonic() - started
        pending.settimeout(0.5)
        with pytest.raises(TimeoutError):
            pending.recv(1)  # still neither open nor failed
    assert (got.returncode, got.stdout == web.payload) == (0, True), got.stderr
    assert took < 5, took


def test_unresolvable_name_through_socks_fails_the_channel_open_cleanly(
    msb: Env, guest: str, web: Web
) -> None:
    port = host_port()
    with tunnel(msb, guest, "-o", "LogLevel=INFO", "-D", str(port), ready=port) as client:
        started = time.monotonic()
        failed = curl("--socks5-hostname", f"127.0.0.1:{port}", "http://no-such-host.invalid/")
        took = time.monotonic() - started
        assert wait_until(lambda: ": open failed: " in client.err, 5), client.err
        after = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://127.0.0.1:{web.port}"
                     f"{web.path}")
        alive = client.process.poll() is None
    # ssh closes the SOCKS connection without a reply: curl's "connection to proxy closed".
    assert (failed.returncode, failed.stdout) == (97, b""), failed.stderr
    assert took < QUICK_S, took
    assert alive
    assert (after.returncode, after.stdout == web.payload) == (0, True), after.stderr
    # The resolver's own words, as sshd passes them on (the sandbox has no DNS server here).
    assert re.search(r"^(?:\w+: )?channel \d+: open failed: connect failed: "
                     r"(Temporary failure in name resolution|Name or service not known)$",
                     client.err, re.MULTILINE), client.err


# ---- half-close


@TARGETS
def test_client_eof_reaches_the_guest_server_and_its_reply_comes_back(
    msb: Env, guest: str, target: str
) -> None:
    gport, port = guest_port(), host_port()
    data = os.urandom(5 << 20)
    with guest_server(msb, guest, f"python3 {guest_servers_path(msb, guest)} digest {gport}",
                      listening(gport)), \
            tunnel(msb, guest, "-L", f"{port}:{target}:{gport}", ready=port):
        reply = exchange(port, data)
    assert reply == hashlib.sha256(data).hexdigest().encode()


@TARGETS
def test_guest_server_eof_reaches_the_client_while_the_client_still_sends(
    msb: Env, guest: str, target: str
) -> None:
    gport, port = guest_port(), host_port()
    record = f"{msb.guest_tmp(guest)}/speak-first-{uuid.uuid4().hex[:8]}"
    data = os.urandom(3 << 20)
    servers = guest_servers_path(msb, guest)
    with guest_server(msb, guest, f"python3 {servers} speak-first {gport} {record}",
                      listening(gport)), \
            tunnel(msb, guest, "-L", f"{port}:{target}:{gport}", ready=port), \
            socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        greeting = bytearray()
        while chunk := sock.recv(65536):  # until the server's EOF
            greeting.extend(chunk)
        sock.sendall(data)  # the other direction is still open
        sock.shutdown(socket.SHUT_WR)
        recorded = msb.ssh(guest, f"for _ in $(seq 300); do [ -e {record} ] && break; "
                                  f"sleep 0.1; done; cat {record}")
    assert bytes(greeting) == b"greeting from the guest\n" * 4096
    assert recorded.out == f"{len(data)} {hashlib.sha256(data).hexdigest()}"


@TARGETS
def test_stdio_forward_ends_once_the_client_and_the_guest_server_are_both_done(
    msb: Env, guest: str, target: str
) -> None:
    """``ssh -W`` (what ProxyJump runs): all of stdin reaches the guest server, its answer
    comes back, and once it closes the channel is closed, as sshd does, so ssh exits 0."""
    gport = guest_port()
    data = os.urandom(3 << 20)
    with guest_server(msb, guest, f"python3 {guest_servers_path(msb, guest)} digest {gport}",
                      listening(gport)):
        forward = msb.run(["ssh", "-F", str(msb.config), "-W", f"{target}:{gport}",
                           msb.host(guest)], input=data, timeout=WAIT_S)
    assert (forward.returncode, forward.out) == (0, hashlib.sha256(data).hexdigest()), \
        forward.err


@TARGETS
def test_stdio_forward_ends_when_the_guest_server_closes_first_and_stdin_ends(
    msb: Env, guest: str, target: str
) -> None:
    gport = guest_port()
    record = f"{msb.guest_tmp(guest)}/speak-first-{uuid.uuid4().hex[:8]}"
    with guest_server(msb, guest, f"python3 {guest_servers_path(msb, guest)} speak-first "
                                  f"{gport} {record}", listening(gport)):
        forward = msb.run(["ssh", "-F", str(msb.config), "-W", f"{target}:{gport}",
                           msb.host(guest)], input=b"", timeout=WAIT_S)
    assert (forward.returncode, forward.out) == (0, "greeting from the guest\n" * 4096), \
        forward.err


def test_guest_client_eof_reaches_a_host_server_through_a_remote_forward(
    msb: Env, guest: str
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    hport = listener.getsockname()[1]
    received = hashlib.sha256()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.update(chunk)
            conn.sendall(b"host saw " + received.hexdigest().encode())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    gport = guest_port()
    client_script = f"""
import hashlib, socket
data = hashlib.sha256(b"seed").digest() * (1 << 17)   # 4 MiB
sock = socket.create_connection(("127.0.0.1", {gport}))
sock.sendall(data)
sock.shutdown(socket.SHUT_WR)
reply = b""
while True:
    chunk = sock.recv(65536)
    if not chunk:
        break
    reply += chunk
print(reply.decode())
"""
    try:
        with tunnel(msb, guest, "-v", "-R", f"{gport}:127.0.0.1:{hport}") as client:
            client.wait_for(forward_success(gport))
            out = guest_script(msb, guest, client_script)
        server.join(WAIT_S)
    finally:
        listener.close()
    sent = hashlib.sha256(hashlib.sha256(b"seed").digest() * (1 << 17)).hexdigest()
    assert out == f"host saw {sent}\n"


# ---- many tunnels at once


@TARGETS
def test_64_concurrent_tunnels_carry_checksummed_data_and_survive_siblings_closing(
    msb: Env, guest: str, target: str
) -> None:
    tunnels, size, aborted = 64, 2 << 20, set(range(5, 64, 8))
    gport, port = guest_port(), host_port()
    peak_file = f"{msb.guest_tmp(guest)}/echo-peak-{uuid.uuid4().hex[:8]}"
    payloads = [os.urandom(size) for _ in range(tunnels)]

    async def one(index: int, everyone: asyncio.Barrier) -> str | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        assert await reader.readexactly(1) == b"!"
        await everyone.wait()  # every tunnel is open in the guest before data moves
        payload = payloads[index]
        summed = hashlib.sha256(b"!")

        async def receive() -> None:
            while chunk := await reader.read(65536):
                summed.update(chunk)

        receiving = asyncio.create_task(receive())
        try:
            cut = size // 2 if index in aborted else size
            for offset in range(0, cut, 65536):
                writer.write(payload[offset:min(offset + 65536, cut)])
                await writer.drain()
            if index in aborted:
                writer.transport.abort()
                return None
            writer.write_eof()
            await receiving
            return summed.hexdigest()
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
            writer.close()

    async def everything() -> list[str | None]:
        everyone = asyncio.Barrier(tunnels)
        return await asyncio.wait_for(
            asyncio.gather(*(one(index, everyone) for index in range(tunnels))), 120)

    servers = guest_servers_path(msb, guest)
    with guest_server(msb, guest, f"python3 {servers} echo {gport} {peak_file}",
                      listening(gport)), \
            tunnel(msb, guest, "-L", f"{port}:{target}:{gport}", ready=port) as client:
        results = asyncio.run(everything())
        assert client.process.poll() is None, client.err
        # Read before the next connection: the guest server counts a connection closed only
        # after it has sent its EOF, so the client can be done with one before the count is.
        peak = msb.ssh(guest, f"cat {peak_file}").out
        again = exchange(port, b"still fine")
    expected = [None if index in aborted else hashlib.sha256(b"!" + payloads[index]).hexdigest()
                for index in range(tunnels)]
    assert results == expected
    assert again == b"still fine"
    assert peak == str(tunnels)


# ---- agent forwarding


@dataclass(frozen=True)
class Agent:
    env: dict[str, str]  # the environment ssh sees, with SSH_AUTH_SOCK
    fingerprint: str  # the key's line as `ssh-add -l` prints it


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """An ssh-agent of the test's own, holding one fresh key."""
    started = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True)
    sock = re.search(r"SSH_AUTH_SOCK=([^;]+);", started.stdout)
    pid = re.search(r"SSH_AGENT_PID=(\d+);", started.stdout)
    assert sock is not None and pid is not None, started.stdout
    env = dict(os.environ, SSH_AUTH_SOCK=sock.group(1))
    try:
        key = tmp_path / "agent_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "forwarded-key",
                        "-f", str(key)], check=True)
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        listed = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True,
                                text=True, check=True)
        yield Agent(env, listed.stdout)
    finally:
        os.kill(int(pid.group(1)), signal.SIGTERM)


@pytest.mark.parametrize(
    "user", ["root", pytest.param("dev", marks=pytest.mark.needs_guest("the guest user dev"))])
def test_forwarded_agent_lists_the_users_key_at_a_private_socket_gone_after(
    msb: Env, guest: str, agent: Agent, user: str
) -> None:
    run = msb.run(ssh_argv(msb, guest, "-A", command='ssh-add -l; echo "$SSH_AUTH_SOCK"; '
                           'stat -c "%U %a %F" "$SSH_AUTH_SOCK" "$(dirname "$SSH_AUTH_SOCK")"',
                           user=user), env=agent.env)
    assert (run.returncode, run.err) == (0, "")
    listed, path, sock_stat, dir_stat, *rest = run.out.splitlines(keepends=True)
    assert listed == agent.fingerprint
    assert re.fullmatch(r"/tmp/ssh-\w+/agent\.\d+\n", path), path
    owner = msb.guest_user(user)
    assert (sock_stat, dir_stat, rest) == (f"{owner} 600 socket\n", f"{owner} 700 directory\n", [])
    path = path.strip()
    gone = msb.ssh(guest, f"for _ in $(seq 100); do [ -e {path} ] || [ -e {os.path.dirname(path)} ]"
                          " || exit 0; sleep 0.1; done; exit 1")
    assert gone.returncode == 0, f"{path} outlived its connection"


def test_without_agent_forwarding_no_agent_socket_is_set(
    msb: Env, guest: str, agent: Agent
) -> None:
    run = msb.run(ssh_argv(msb, guest, command='echo "${SSH_AUTH_SOCK-unset}"'), env=agent.env)
    assert (run.returncode, run.out, run.err) == (0, "unset\n", "")

