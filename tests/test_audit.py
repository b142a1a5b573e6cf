"""The audit log (``audit = true`` in a template), through the real ``ssh``, ``scp`` and ``sftp``.

Every kind of event is produced the way a user produces it and read back from
``MSB_PROXY_HOME/audit/SANDBOX.jsonl``: who connected with which key, each command, shell and
subsystem with its exit, each SFTP operation with its bytes, legacy scp, and each kind of tunnel
with the bytes it carried. The log stays valid when msb-proxy is killed mid-session, stays
within its rotation bound while many connections append at once, and ``msb-proxy audit`` shows
it. Without the key nothing is written at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import PROXY, Env, write_ssh_config
from installations import children, make_installation, proxy_of, remove_installation, wait_until
from test_listener import ssh as listener_ssh
from test_listener import start as start_listener
from test_tunnels import Agent, agent  # noqa: F401  (the fixture: an ssh-agent with a key)
from tunnel_helpers import (
    Client,
    guest_port,
    guest_server,
    guest_servers_path,
    host_port,
    install_guest_servers,
    listening,
    short_tmpdir,
    socket_exists,
    ssh_argv,
    tunnel,
)

CONFIG = """\
[sandbox."aud-*"]
audit = true

[sandbox."rot-*"]
audit = true
audit_max_size = "1MiB"
audit_keep = 2

[sandbox."many-*"]
audit = true
audit_max_size = "1MiB"
audit_keep = 8

[sandbox."both-*"]
audit = true
record = true
"""
MIB = 1 << 20
WAIT_S = 60
HEADER = ("time", "event", "sandbox", "pid", "connection")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@pytest.fixture(scope="module")
def audited(msb: Env) -> Iterator[Env]:
    """An installation of this module's own whose aud-*, rot-* and many-* sandboxes are
    audited."""
    env = make_installation(msb, CONFIG)
    write_ssh_config(env, warm=False, path=env.cold_config)
    yield env
    remove_installation(env)


def log_path(env: Env, sandbox: str) -> Path:
    return env.home / "audit" / f"{sandbox}.jsonl"


def log_lines(env: Env, sandbox: str) -> list[str]:
    """Every line of the sandbox's logs, oldest first; each must be a whole line."""
    live = log_path(env, sandbox)
    files = sorted(live.parent.glob(f"{sandbox}.jsonl.*[0-9]"),
                   key=lambda path: -int(path.suffix[1:]))
    lines: list[str] = []
    for path in [*files, live]:
        data = path.read_text()
        assert data.endswith("\n"), f"{path} ends in a torn line"
        lines += data.splitlines()
    return lines


def events(env: Env, sandbox: str) -> list[dict[str, Any]]:
    """The sandbox's events; every line must be a JSON object with the common fields."""
    parsed = [json.loads(line) for line in log_lines(env, sandbox)]
    for event in parsed:
        assert list(event)[:5] == list(HEADER), event
        assert TIME.fullmatch(event["time"]), event
        assert event["sandbox"] == sandbox
    return parsed


def settled(env: Env, sandbox: str, connections: int) -> list[dict[str, Any]]:
    """The events once ``connections`` connections have logged their disconnect (the serving
    process writes it after the client has gone)."""
    def done() -> bool:
        return log_path(env, sandbox).exists() and sum(
            event["event"] == "disconnect" for event in events(env, sandbox)) >= connections

    assert wait_until(done, WAIT_S) is not None, log_lines(env, sandbox)
    return events(env, sandbox)


def settled_after(env: Env, sandbox: str, command: str) -> list[dict[str, Any]]:
    """The events once the connection that ran ``command`` has logged its disconnect (for
    logs whose oldest events may have been rotated away)."""
    def done() -> bool:
        if not log_path(env, sandbox).exists():
            return False
        found = events(env, sandbox)
        ran = {event["connection"] for event in found if event.get("command") == command}
        return any(event["event"] == "disconnect" and event["connection"] in ran
                   for event in found)

    assert wait_until(done, WAIT_S) is not None, log_lines(env, sandbox)[-5:]
    return events(env, sandbox)


def fields(event: dict[str, Any]) -> dict[str, Any]:
    """An event without the fields every event has but its kind."""
    return {key: value for key, value in event.items() if key == "event" or key not in HEADER}


def of_connection(found: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """The events of the ``index``-th connection of ``found`` (by the order they connected),
    without their common fields."""
    order: list[str] = []
    for event in found:
        if event["connection"] not in order:
            order.append(event["connection"])
    return [fields(event) for event in found if event["connection"] == order[index]]


def fingerprint(env: Env) -> str:
    listed = subprocess.run(["ssh-keygen", "-l", "-f", f"{env.key}.pub"], capture_output=True,
                            text=True, check=True)
    return listed.stdout.split()[1]


def connect_event(env: Env) -> dict[str, Any]:
    return {"event": "connect", "key_fingerprint": fingerprint(env), "key_type": "ssh-ed25519",
            "login_user": "root", "guest_user": env.guest_user("root")}


def name(prefix: str = "aud") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---- connections, commands, shells, subsystems


def test_connection_command_and_exit_status_are_logged(audited: Env) -> None:
    sandbox = name()
    run = audited.ssh(sandbox, "echo hi; exit 3")
    assert (run.returncode, run.out) == (3, "hi\n")
    killed = audited.ssh(sandbox, "kill -KILL $$")
    assert killed.returncode == 255  # as with sshd: ssh's own status for a signalled command
    found = settled(audited, sandbox, 2)
    assert of_connection(found, 0) == [
        connect_event(audited),
        {"event": "exec", "channel": 0, "command": "echo hi; exit 3", "pty": False},
        {"event": "exit", "channel": 0, "status": 3},
        {"event": "disconnect"},
    ]
    assert of_connection(found, 1)[1:] == [
        {"event": "exec", "channel": 0, "command": "kill -KILL $$", "pty": False},
        {"event": "exit", "channel": 0, "signal": "KILL", "core_dumped": False},
        {"event": "disconnect"},
    ]
    assert oct(log_path(audited, sandbox).stat().st_mode & 0o777) == "0o600"
    assert oct(log_path(audited, sandbox).parent.stat().st_mode & 0o777) == "0o700"


def test_shells_with_and_without_a_terminal_and_subsystems_are_logged(audited: Env) -> None:
    sandbox = name()
    shell = audited.ssh(sandbox, input=b"echo in-shell; exit 4\n")
    assert (shell.returncode, shell.out) == (4, "in-shell\n")
    terminal = audited.ssh(sandbox, "-tt", input=b"exit 5\n")
    assert terminal.returncode == 5
    refused = audited.ssh(sandbox, "-s", "no-such-subsystem")
    assert refused.returncode != 0
    found = settled(audited, sandbox, 3)
    assert of_connection(found, 0)[1:] == [
        {"event": "shell", "channel": 0, "pty": False, "session": None},
        {"event": "exit", "channel": 0, "status": 4},
        {"event": "disconnect"},
    ]
    assert of_connection(found, 1)[1:] == [
        {"event": "shell", "channel": 0, "pty": True, "session": None},
        {"event": "exit", "channel": 0, "status": 5},
        {"event": "disconnect"},
    ]
    assert of_connection(found, 2)[1:] == [
        {"event": "subsystem", "channel": 0, "name": "no-such-subsystem", "accepted": False},
        {"event": "disconnect"},
    ]


def test_a_command_whose_client_is_killed_is_logged_as_hung_up(audited: Env) -> None:
    sandbox = name()
    client = Client(ssh_argv(audited, sandbox, command="echo started; exec sleep 1000"))
    try:
        client.wait_for_output("^started$")
        client.process.kill()
        client.process.wait(WAIT_S)
    finally:
        client.stop()
    logged = [fields(event) for event in settled(audited, sandbox, 1)]
    assert logged[1:] == [
        {"event": "exec", "channel": 0, "command": "echo started; exec sleep 1000", "pty": False},
        {"event": "hangup", "channel": 0},
        {"event": "disconnect"},
    ]


# ---- file transfers


@pytest.mark.parametrize("server", ["guest", pytest.param("native", marks=pytest.mark.needs_guest(
    "a guest sftp-server to take away"))])
def test_sftp_operations_are_logged_with_their_bytes_and_results(
        audited: Env, tmp_path: Path, server: str) -> None:
    sandbox = name()
    tmp = audited.guest_tmp(sandbox)
    gone = None
    if server == "native":  # without one in the guest, msb-proxy serves SFTP itself
        gone = audited.ssh(sandbox, "rm /usr/lib/openssh/sftp-server")
        assert gone.returncode == 0, gone.err
    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(300_001))
    batch = "\n".join([
        f"put {local} {tmp}/up.bin",
        f"get {tmp}/up.bin {tmp_path}/down.bin",
        f"mkdir {tmp}/dir",
        f"rename {tmp}/up.bin {tmp}/dir/moved.bin",
        f"chmod 600 {tmp}/dir/moved.bin",
        f"ln -s {tmp}/dir/moved.bin {tmp}/link",
        f"ls {tmp}/dir",
        f"rm {tmp}/link",
        f"rm {tmp}/dir/moved.bin",
        f"rmdir {tmp}/dir",
        f"-rm {tmp}/missing",
        f"-put {local} {tmp}/no-such-dir/up.bin",
    ]) + "\n"
    # sftp-server's words for the status, or msb-proxy's own SFTP's (where the guest has no
    # sftp-server: taken away, or the fake backend's host lacks it): the guest's errno text
    has_server = audited.ssh(sandbox, "test -x /usr/lib/openssh/sftp-server").returncode == 0
    missing = "No such file" if has_server else "No such file or directory"
    assert not (server == "native" and has_server)
    run = audited.run(["sftp", "-F", str(audited.config), "-b", "-", audited.host(sandbox)],
                      input=batch.encode())
    assert run.returncode == 0, run.err
    assert (tmp_path / "down.bin").read_bytes() == local.read_bytes()
    connections = 3 if gone else 2  # the sftp-server probe and the sftp client, after the rm
    sftp = [event for event in of_connection(settled(audited, sandbox, connections), -1)
            if event["event"] == "sftp"]
    for event in sftp:
        assert (event.pop("event"), event.pop("channel")) == ("sftp", 0)
    assert sftp == [
        {"op": "write", "path": f"{tmp}/up.bin", "bytes": 300_001, "result": "ok"},
        {"op": "read", "path": f"{tmp}/up.bin", "bytes": 300_001, "result": "ok"},
        {"op": "mkdir", "path": f"{tmp}/dir", "result": "ok"},
        {"op": "rename", "path": f"{tmp}/up.bin", "target": f"{tmp}/dir/moved.bin",
         "result": "ok"},
        {"op": "setstat", "path": f"{tmp}/dir/moved.bin", "result": "ok"},
        {"op": "symlink", "path": f"{tmp}/link", "target": f"{tmp}/dir/moved.bin",
         "result": "ok"},
        {"op": "list", "path": f"{tmp}/dir/", "result": "ok"},
        {"op": "remove", "path": f"{tmp}/link", "result": "ok"},
        {"op": "remove", "path": f"{tmp}/dir/moved.bin", "result": "ok"},
        {"op": "rmdir", "path": f"{tmp}/dir", "result": "ok"},
        {"op": "remove", "path": f"{tmp}/missing", "result": missing},
        {"op": "open", "path": f"{tmp}/no-such-dir/up.bin", "result": missing},
    ]


def test_scp_both_protocols_are_logged(audited: Env, tmp_path: Path) -> None:
    sandbox = name()
    tmp = audited.guest_tmp(sandbox)
    local = tmp_path / "file.txt"
    local.write_bytes(b"scp payload\n" * 1000)
    scp = ["scp", "-q", "-F", str(audited.config)]
    host = audited.host(sandbox)
    for argv in ([*scp, "-O", str(local), f"{host}:{tmp}/legacy.txt"],
                 [*scp, "-O", f"{host}:{tmp}/legacy.txt", str(tmp_path / "back.txt")],
                 [*scp, str(local), f"{host}:{tmp}/over-sftp.txt"]):
        run = audited.run(argv)
        assert run.returncode == 0, run.err
    assert (tmp_path / "back.txt").read_bytes() == local.read_bytes()
    found = settled(audited, sandbox, 3)
    assert of_connection(found, 0)[1:4] == [
        {"event": "exec", "channel": 0, "command": f"scp -t {tmp}/legacy.txt", "pty": False},
        {"event": "scp", "channel": 0, "direction": "upload", "paths": [f"{tmp}/legacy.txt"],
         "recursive": False},
        {"event": "exit", "channel": 0, "status": 0},
    ]
    assert of_connection(found, 1)[1:4] == [
        {"event": "exec", "channel": 0, "command": f"scp -f {tmp}/legacy.txt", "pty": False},
        {"event": "scp", "channel": 0, "direction": "download", "paths": [f"{tmp}/legacy.txt"],
         "recursive": False},
        {"event": "exit", "channel": 0, "status": 0},
    ]
    over_sftp = of_connection(found, 2)
    assert over_sftp[1] == {"event": "subsystem", "channel": 0, "name": "sftp", "accepted": True}
    assert {"event": "sftp", "channel": 0, "op": "write", "path": f"{tmp}/over-sftp.txt",
            "bytes": 12_000, "result": "ok"} in over_sftp


# ---- tunnels


def socks5_exchange(port: int, target_port: int, data: bytes) -> bytes:
    """Through ``ssh -D port``: SOCKS5 to the guest's 127.0.0.1:``target_port``, ``data`` out
    and everything back until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                     + target_port.to_bytes(2, "big"))
        assert sock.recv(10)[:2] == b"\x05\x00"
        return exchange_on(sock, data)


def exchange_on(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    reply = bytearray()
    while chunk := sock.recv(65536):
        reply += chunk
    return bytes(reply)


def exchange(address: int | str, data: bytes) -> bytes:
    family = socket.AF_INET if isinstance(address, int) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(("127.0.0.1", address) if isinstance(address, int) else address)
        return exchange_on(sock, data)


class HostEcho:
    """An echo server on the host's loopback, for ``-R``: every byte back, then EOF."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
                conn.shutdown(socket.SHUT_WR)


GUEST_EXCHANGE = """
import socket, sys
family = socket.AF_UNIX if sys.argv[1].startswith("/") else socket.AF_INET
sock = socket.socket(family)
sock.connect(sys.argv[1] if family == socket.AF_UNIX else ("127.0.0.1", int(sys.argv[1])))
sock.sendall(b"r" * int(sys.argv[2]))
sock.shutdown(socket.SHUT_WR)
got = b""
while chunk := sock.recv(65536):
    got += chunk
print(len(got))
"""


def test_every_kind_of_tunnel_is_logged_with_its_bytes_each_way(audited: Env) -> None:
    sandbox = name()
    install_guest_servers(audited, sandbox)
    tmp = audited.guest_tmp(sandbox)
    put = audited.ssh(sandbox, f"cat > {tmp}/exchange.py", input=GUEST_EXCHANGE.encode())
    assert put.returncode == 0, put.err
    gport, local_port, socks_port = guest_port(), host_port(), host_port()
    guest_sock = f"{tmp}/echo-{uuid.uuid4().hex[:6]}.sock"
    remote_port, remote_sock = guest_port(), f"{tmp}/remote-{uuid.uuid4().hex[:6]}.sock"
    local_dir = short_tmpdir()
    local_sock = str(local_dir / "l.sock")
    echo = HostEcho()
    servers = guest_servers_path(audited, sandbox)
    try:
        with guest_server(audited, sandbox, f"python3 {servers} echo {gport}", listening(gport)), \
                guest_server(audited, sandbox, f"python3 {servers} echo {guest_sock}",
                             socket_exists(guest_sock)):
            before = len(settled(audited, sandbox, 4))  # the set-up's own connections
            with tunnel(audited, sandbox, "-L", f"{local_port}:127.0.0.1:{gport}",
                        "-L", f"{local_sock}:{guest_sock}", "-D", str(socks_port),
                        "-R", f"{remote_port}:127.0.0.1:{echo.port}",
                        "-R", f"{remote_sock}:127.0.0.1:{echo.port}", ready=socks_port):
                assert exchange(local_port, b"L" * 1000) == b"L" * 1000
                assert exchange(local_sock, b"U" * 2000) == b"U" * 2000
                assert socks5_exchange(socks_port, gport, b"D" * 3000) == b"D" * 3000
                for target, size in ((remote_port, 4000), (remote_sock, 5000)):
                    ran = audited.ssh(sandbox, f"python3 {tmp}/exchange.py {target} {size}")
                    assert (ran.returncode, ran.out) == (0, f"{size}\n"), ran.err
    finally:
        shutil.rmtree(local_dir)
        echo.sock.close()
    found = settled(audited, sandbox, 9)[before:]
    tunnels = [fields(event) for event in found if event["event"].startswith("tunnel-")]
    opened = {event["channel"]: event for event in tunnels if event["event"] == "tunnel-open"}
    closed = [event for event in tunnels if event["event"] == "tunnel-close"]
    listens = sorted((event["kind"], event["target"]) for event in tunnels
                     if event["event"] == "tunnel-listen")
    assert listens == [("remote", f"localhost:{remote_port}"), ("remote-unix", remote_sock)]
    summary = sorted((event["kind"], event["bytes_from_client"], event["bytes_to_client"])
                     for event in closed)
    assert summary == [("local", 1000, 1000), ("local", 3000, 3000), ("remote", 4000, 4000),
                       ("remote-unix", 5000, 5000), ("unix", 2000, 2000)]
    targets = {(event["kind"], event["target"]) for event in closed}
    assert {("local", f"127.0.0.1:{gport}"), ("unix", guest_sock),
            ("remote-unix", remote_sock)} <= targets
    for event in closed:
        assert (opened[event["channel"]]["kind"], opened[event["channel"]]["target"]) == \
            (event["kind"], event["target"])


def test_forwarded_agent_connections_are_logged(
        audited: Env, agent: Agent) -> None:  # noqa: F811  (test_tunnels' fixture)
    sandbox = name()
    run = audited.run(ssh_argv(audited, sandbox, "-A",
                               command='ssh-add -l >/dev/null; echo "$SSH_AUTH_SOCK"'),
                      env=agent.env)
    assert run.returncode == 0, run.err
    path = run.out.strip()
    found = of_connection(settled(audited, sandbox, 1), 0)
    logged = [event for event in found if event["event"].startswith("tunnel-")]
    closed = logged[2]
    # ssh-add -l: one request (its length, 4 bytes, and its type), and the answer: length,
    # type, the number of keys, then the ed25519 key (4 + 51 bytes) and its comment
    assert (closed.pop("bytes_to_client"), closed.pop("bytes_from_client")) == \
        (5, 4 + 1 + 4 + (4 + 51) + (4 + len("forwarded-key")))
    assert logged == [
        {"event": "tunnel-listen", "kind": "agent", "target": path},
        {"event": "tunnel-open", "channel": 1, "kind": "agent", "target": path},
        {"event": "tunnel-close", "channel": 1, "kind": "agent", "target": path},
    ]


def test_the_listener_and_the_python_api_audit_and_record_as_ssh_does(audited: Env) -> None:
    sandbox = name("both")
    assert audited.ssh(sandbox, "true").returncode == 0
    listener = start_listener(audited, sandbox)
    try:
        served = listener_ssh(audited, listener, "-tt", "echo via-serve")
        assert (served.returncode, served.stdout) == (0, b"via-serve\r\n")
    finally:
        listener.stop()
    script = ("import asyncio, msb_proxy\n"
              "async def main():\n"
              f"    client = await msb_proxy.ssh({sandbox!r}).connect()\n"
              "    print((await client.exec_with('echo via-api', tty=True)).stdout_text, end='')\n"
              "    await client.close()\n"
              "asyncio.run(main())\n")
    api = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=audited.proxy_env(), timeout=WAIT_S, check=False)
    assert (api.returncode, api.stdout) == (0, "via-api\n"), api.stderr
    found = settled(audited, sandbox, 3)
    for index, command in ((1, "echo via-serve"), (2, "echo via-api")):
        connection = of_connection(found, index)
        assert connection[0]["event"] == "connect" and connection[0]["login_user"] == "root"
        assert connection[1:] == [
            {"event": "exec", "channel": 0, "command": command, "pty": True},
            {"event": "exit", "channel": 0, "status": 0},
            {"event": "disconnect"},
        ]
    titles = sorted(json.loads(path.read_text().splitlines()[0])["title"]
                    for path in (audited.home / "recordings" / sandbox).iterdir())
    assert titles == [f"root@{sandbox}: echo via-api", f"root@{sandbox}: echo via-serve"]


# ---- durability, rotation, concurrency


def test_a_killed_msb_proxy_leaves_a_log_of_whole_lines(audited: Env, tmp_path: Path) -> None:
    sandbox = name()
    tmp = audited.guest_tmp(sandbox)
    warm = audited.ssh(sandbox, "true")  # the sandbox exists before the killed connection
    assert warm.returncode == 0
    batch = "".join(f"mkdir {tmp}/d{i}\nrmdir {tmp}/d{i}\n" for i in range(20_000))
    client = subprocess.Popen(["sftp", "-F", str(audited.cold_config), "-b", "-",
                               audited.host(sandbox)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert client.stdin is not None
    feeder = threading.Thread(target=_feed, args=(client.stdin, batch.encode()), daemon=True)
    feeder.start()
    try:
        assert wait_until(lambda: bool(children(client.pid)), WAIT_S) is not None
        proxy = proxy_of(children(client.pid)[0])  # sftp runs ssh, ssh the ProxyCommand

        def busy() -> bool:
            return sum(line.count('"sftp"') for line in log_lines(audited, sandbox)) >= 200

        assert wait_until(busy, WAIT_S) is not None
        os.kill(proxy, signal.SIGKILL)
        client.wait(WAIT_S)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    killed = [event for event in events(audited, sandbox)
              if event["connection"] != events(audited, sandbox)[0]["connection"]]
    assert killed[0]["event"] == "connect" and killed[0]["pid"] == proxy
    assert [event["event"] for event in killed[1:3]] == ["subsystem", "sftp"]
    assert "disconnect" not in {event["event"] for event in killed}
    after = audited.ssh(sandbox, "echo after")  # the next connection appends whole lines
    assert after.returncode == 0
    assert settled(audited, sandbox, 2)[-3]["command"] == "echo after"


def _feed(pipe: Any, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except OSError:
        pass  # the client went with its msb-proxy


def big_command(index: int, size: int) -> str:
    return f": {index:05d} " + "x" * size


def test_rotation_bounds_the_log_and_keeps_the_newest_events(audited: Env) -> None:
    sandbox = name("rot")
    commands = [big_command(i, 100_000) for i in range(40)]  # 4 MB of exec events
    for command in commands:
        assert audited.ssh(sandbox, command).returncode == 0
    found = settled_after(audited, sandbox, commands[-1])
    live = log_path(audited, sandbox)
    files = sorted(path.name for path in live.parent.iterdir()
                   if path.name.startswith(live.name))
    assert files == [live.name, f"{live.name}.1", f"{live.name}.2", f"{live.name}.lock"]
    for path in live.parent.glob(f"{live.name}*"):
        assert path.stat().st_size <= MIB, path
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    logged = [event["command"] for event in found if event["event"] == "exec"]
    assert 20 <= len(logged) < 40  # up to three 1 MiB files of 100 kB events
    assert logged == commands[-len(logged):]  # the newest, in order, none torn or lost


def test_many_connections_appending_at_once_lose_and_tear_nothing(audited: Env) -> None:
    sandbox = name("many")
    assert audited.ssh(sandbox, "true").returncode == 0
    commands = [big_command(i, 40_000) for i in range(64)]  # 2.5 MiB: rotated twice or more

    def run(command: str) -> int:
        return audited.ssh(sandbox, command).returncode

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(run, commands)) == [0] * len(commands)
    found = settled(audited, sandbox, 65)
    assert sorted(event["command"] for event in found if event["event"] == "exec") \
        == sorted([*commands, "true"])
    live = log_path(audited, sandbox)
    assert (live.parent / f"{live.name}.2").exists()
    for path in live.parent.glob(f"{live.name}*"):
        assert path.stat().st_size <= MIB, path


# ---- msb-proxy audit


def test_audit_command_prints_readable_lines_and_the_json_as_logged(audited: Env) -> None:
    sandbox = name()
    assert audited.ssh(sandbox, "echo 'two words'").returncode == 0
    found = settled(audited, sandbox, 1)
    shown = audited.msb_proxy("audit", sandbox)
    assert (shown.returncode, shown.err) == (0, "")
    connection = found[0]["connection"]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ"
    patterns = [
        rf"{stamp} {connection} connect      key_fingerprint={re.escape(fingerprint(audited))} "
        rf"key_type=ssh-ed25519 login_user=root guest_user={audited.guest_user('root')}",
        rf"{stamp} {connection} exec         channel=0 command=\"echo 'two words'\" pty=false",
        rf"{stamp} {connection} exit         channel=0 status=0",
        rf"{stamp} {connection} disconnect",
    ]
    lines = shown.out.splitlines()
    assert len(lines) == len(patterns), shown.out
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), line
    as_json = audited.msb_proxy("audit", "--json", sandbox)
    assert (as_json.returncode, as_json.out, as_json.err) == \
        (0, log_path(audited, sandbox).read_text(), "")


def test_audit_command_without_a_log_is_one_line_and_status_1(audited: Env) -> None:
    missing = audited.msb_proxy("audit", "aud-never-used")
    path = audited.home / "audit" / "aud-never-used.jsonl"
    assert (missing.returncode, missing.out) == (1, "")
    assert missing.err == (f"msb-proxy: sandbox 'aud-never-used' has no audit log ({path} does "
                           "not exist); 'audit = true' in its template in config.toml starts "
                           "one\n")


def test_audit_follow_prints_new_events_across_rotation_until_interrupted(
        audited: Env) -> None:
    sandbox = name("rot")
    assert audited.ssh(sandbox, "echo first").returncode == 0
    settled(audited, sandbox, 1)
    follow = Client([str(PROXY), "audit", "--follow", "--json", sandbox],
                    env=audited.proxy_env())
    try:
        follow.wait_for_output(r'"command": "echo first"')
        commands = [big_command(i, 100_000) for i in range(15)]  # 1.5 MB: rotated once
        for command in commands:
            assert audited.ssh(sandbox, command).returncode == 0
        settled_after(audited, sandbox, commands[-1])
        assert (log_path(audited, sandbox).parent / f"{sandbox}.jsonl.1").exists()
        follow.wait_for_output(rf'"command": "{commands[-1]}"')
        follow.process.send_signal(signal.SIGINT)
        assert follow.process.wait(WAIT_S) == 130
    finally:
        follow.stop()
    printed = [json.loads(line) for line in follow.out.splitlines()]
    assert [event["command"] for event in printed if event["event"] == "exec"] == \
        ["echo first", *commands]
    assert follow.err == ""


def test_a_log_that_cannot_be_written_is_one_line_and_the_session_goes_on(msb: Env) -> None:
    env = make_installation(msb, '[defaults]\naudit = true\n')
    try:
        (env.home / "audit").write_text("a file where the directory belongs\n")
        run = env.ssh(name(), "echo still-served; exit 4")
        path = env.home / "audit" / f"{env.sandboxes[0]}.jsonl"
        assert (run.returncode, run.out) == (4, "still-served\n")
        assert run.err == (f"msb-proxy: audit log {path}: cannot write: Not a directory; "
                           "events of this connection go unlogged\n")
    finally:
        remove_installation(env)


# ---- off by default


def test_nothing_is_logged_or_recorded_without_the_template_keys(
        msb: Env, fresh_sandbox: str, tmp_path: Path) -> None:
    assert msb.ssh(fresh_sandbox, "echo hi").returncode == 0
    assert msb.ssh(fresh_sandbox, "-tt", "echo hi").returncode == 0
    local = tmp_path / "f"
    local.write_text("x")
    sftp = msb.run(["sftp", "-F", str(msb.config), "-b", "-", msb.host(fresh_sandbox)],
                   input=f"put {local} {msb.guest_tmp(fresh_sandbox)}/f\n".encode())
    assert sftp.returncode == 0, sftp.err
    assert not (msb.home / "audit").exists()
    assert not (msb.home / "recordings").exists()
