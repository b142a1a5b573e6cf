"""VS Code Remote-SSH, reproduced the way the extension drives ssh (shared/reference/clients.md).

``useLocalServer=false``: ``ssh -T -D PORT host bash`` with the install script written to
bash's stdin. ``useLocalServer=true``: ``ssh -T -D PORT host`` (a shell, no PTY) with the script
typed in. Either way the script checks the platform (``uname -m``, ``/etc/os-release``), unpacks
the server the client sent through the connection (``remote.SSH.localServerDownload``), starts it
in the background with ``nohup ... &``, prints its results between ``<id>: start`` and
``<id>: end`` markers (``listeningOn==127.0.0.1:PORT==``, or a socket path) and is done; the
client keeps bash's stdin open, and reaches the server through the SOCKS port (``-D``), or
through ``-L port:/tmp/code-<uuid>`` for the socket variant. The server must outlive the
connection that started it: a later connection finds it running.
"""

from __future__ import annotations

import base64
import io
import platform
import re
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import Env
from tunnel_helpers import WAIT_S, Client, curl, host_port, ssh_argv, tunnel

# What the stand-in server answers every HTTP request with: who it is, so that a later
# connection can tell it reached the very same process.
SERVER = r'''#!/usr/bin/env python3
"""Stand-in for the VS Code server: code-server COMMIT (--port=0 | --socket-path=PATH)."""
import os, socket, sys, threading

commit, where = sys.argv[1], sys.argv[2]
if where.startswith("--socket-path="):
    address = where.split("=", 1)[1]
    server = socket.socket(socket.AF_UNIX)
    server.bind(address)
else:
    server = socket.socket()
    server.bind(("127.0.0.1", int(where.split("=", 1)[1])))
    address = "127.0.0.1:%d" % server.getsockname()[1]
server.listen(16)
print("Extension host agent listening on %s" % address, flush=True)
body = ("code-server %s pid %d\n" % (commit, os.getpid())).encode()


def answer(conn):
    with conn:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


while True:
    conn, _ = server.accept()
    threading.Thread(target=answer, args=(conn,), daemon=True).start()
'''

# The parts of VS Code's install script that matter to the server side, kept in its shape.
INSTALL_SCRIPT = r'''
COMMIT="@COMMIT@"
MARKER="@MARKER@"
LISTEN_ARG="@LISTEN_ARG@"
SERVER_DATA_DIR="$HOME/.vscode-server"
SERVER_DIR="$SERVER_DATA_DIR/bin/$COMMIT"
SERVER_SCRIPT="$SERVER_DIR/bin/code-server"
SERVER_PIDFILE="$SERVER_DATA_DIR/.$COMMIT.pid"
SERVER_LOGFILE="$SERVER_DATA_DIR/.$COMMIT.log"
LISTENING_ON=
OS_RELEASE_ID=
ARCH=
PLATFORM=

print_install_results_and_exit() {
    echo "$MARKER: start"
    echo "exitCode==$1=="
    echo "listeningOn==$LISTENING_ON=="
    echo "osReleaseId==$OS_RELEASE_ID=="
    echo "arch==$ARCH=="
    echo "platform==$PLATFORM=="
    echo "$MARKER: end"
}

KERNEL="$(uname -s)"
case $KERNEL in
    Linux) PLATFORM="linux";;
    *) echo "Error platform not supported: $KERNEL"; print_install_results_and_exit 1;;
esac
ARCH="$(uname -m)"
case $ARCH in
    x86_64 | amd64) ARCH="x64";;
    armv7l | armv8l) ARCH="armhf";;
    arm64 | aarch64) ARCH="arm64";;
    ppc64le) ARCH="ppc64le";;
    riscv64) ARCH="riscv64";;
    s390x) ARCH="s390x";;
esac
OS_RELEASE_ID="$(grep -i '^ID=' /etc/os-release 2>/dev/null | sed 's/^ID=//gi' | sed 's/"//g')"
if [[ -z $OS_RELEASE_ID ]]; then
    OS_RELEASE_ID="$(grep -i '^ID=' /usr/lib/os-release 2>/dev/null | sed 's/^ID=//gi')"
    [[ -z $OS_RELEASE_ID ]] && OS_RELEASE_ID="unknown"
fi

mkdir -p "$SERVER_DIR"
(
    flock -w 30 9 || exit 1
    if [[ ! -x $SERVER_SCRIPT ]]; then
        # remote.SSH.localServerDownload: the client sent the server along
        base64 -d > "$SERVER_DIR/vscode-server.tar.gz" <<'END_OF_SERVER'
@TARBALL@
END_OF_SERVER
        tar -xf "$SERVER_DIR/vscode-server.tar.gz" -C "$SERVER_DIR" --strip-components 1 \
            && rm "$SERVER_DIR/vscode-server.tar.gz"
    fi
) 9>"$SERVER_DATA_DIR/.$COMMIT.install-lock"
if [[ ! -x $SERVER_SCRIPT ]]; then
    echo "Error server did not install"
    print_install_results_and_exit 1
fi

if [[ -f $SERVER_PIDFILE ]] && kill -0 "$(cat "$SERVER_PIDFILE")" 2>/dev/null; then
    echo "Found running server (pid=$(cat "$SERVER_PIDFILE"))"
else
    rm -f "$SERVER_LOGFILE"
    nohup "$SERVER_SCRIPT" "$COMMIT" "$LISTEN_ARG" &> "$SERVER_LOGFILE" < /dev/null &
    echo $! > "$SERVER_PIDFILE"
    echo "Started server (pid=$(cat "$SERVER_PIDFILE"))"
fi
for _ in $(seq 300); do
    LISTENING_ON="$(sed -n 's/^Extension host agent listening on //p' "$SERVER_LOGFILE")"
    [[ -n $LISTENING_ON ]] && break
    sleep 0.1
done
print_install_results_and_exit 0
'''

EXPECTED_ARCH = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(),
                                                         platform.machine())


def server_tarball(commit: str) -> str:
    """``vscode-server-linux-<arch>.tar.gz`` as the client would send it, base64-encoded."""
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        top = f"vscode-server-linux-{EXPECTED_ARCH}"
        for name, data, mode in ((f"{top}/bin/code-server", SERVER.encode(), 0o755),
                                 (f"{top}/product.json",
                                  f'{{"commit": "{commit}"}}\n'.encode(), 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return base64.encodebytes(blob.getvalue()).decode()


@dataclass
class Install:
    """One run of the install script over ssh, with the results it printed."""

    client: Client
    marker: str
    started: str  # "Started server (pid=N)" or "Found running server (pid=N)"
    results: dict[str, str]  # exitCode, listeningOn, ...

    def expected_output(self) -> str:
        return (f"{self.started}\n{self.marker}: start\n"
                + "".join(f"{key}=={value}==\n" for key, value in self.results.items())
                + f"{self.marker}: end\n")


def install_script(commit: str, marker: str, listen_arg: str) -> bytes:
    return (INSTALL_SCRIPT.replace("@COMMIT@", commit).replace("@MARKER@", marker)
            .replace("@LISTEN_ARG@", listen_arg)
            .replace("@TARBALL@", server_tarball(commit).rstrip("\n"))).encode()


def run_install(msb: Env, sandbox: str, commit: str, listen_arg: str,
                *ssh_options: str, exec_bash: bool = True) -> Install:
    """Write the install script to ssh's stdin and wait for its results; stdin stays open, as
    VS Code leaves it, so the connection (and its ``-D`` port) stays up."""
    marker = str(uuid.uuid4())
    client = Client(ssh_argv(msb, sandbox, "-T", *ssh_options,
                             command="bash" if exec_bash else None), stdin=True)
    try:
        client.write(install_script(commit, marker, listen_arg))
        client.wait_for_output(rf"^{marker}: end$")
    except BaseException:
        client.stop()
        raise
    lines = client.out.splitlines()
    start = lines.index(f"{marker}: start")
    results = {}
    for line in lines[start + 1:-1]:
        found = re.fullmatch(r"(\w+)==(.*)==", line)
        assert found is not None, client.out
        results[found.group(1)] = found.group(2)
    return Install(client, marker, lines[0], results)


def finish(install: Install) -> tuple[int, str, str]:
    """Close stdin (VS Code going away): bash ends, and so does ssh; what it all printed."""
    install.client.close_stdin()
    code = install.client.wait()
    return code, install.client.out, install.client.err


@pytest.fixture(scope="module")
def vscode_sandbox(msb: Env) -> str:
    name = f"vscode-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    return name


@pytest.fixture
def commit(msb: Env, vscode_sandbox: str) -> Iterator[str]:
    """A fresh server build id; its server is stopped afterwards."""
    commit = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    yield commit
    msb.ssh(vscode_sandbox, f'kill "$(cat ~/.vscode-server/.{commit}.pid)"')


def socks_get(port: int, address: str) -> str:
    got = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://{address}/")
    assert (got.returncode, got.stderr) == (0, b""), got.stderr
    return got.stdout.decode()


@pytest.mark.parametrize("style", ["exec bash", "shell"])
def test_install_script_server_is_reached_through_socks_and_found_again_later(
    msb: Env, vscode_sandbox: str, commit: str, style: str
) -> None:
    exec_bash = style == "exec bash"
    socks = host_port()
    first = run_install(msb, vscode_sandbox, commit, "--port=0", "-D", str(socks),
                        exec_bash=exec_bash)
    try:
        started = re.fullmatch(r"Started server \(pid=(\d+)\)", first.started)
        assert started is not None, first.client.out
        assert first.results["exitCode"] == "0"
        assert first.results["osReleaseId"] == "debian"
        assert (first.results["arch"], first.results["platform"]) == (EXPECTED_ARCH, "linux")
        listening = re.fullmatch(r"127\.0\.0\.1:(\d+)", first.results["listeningOn"])
        assert listening is not None, first.results
        answer = socks_get(socks, first.results["listeningOn"])
    finally:
        code, out, err = finish(first)
    pid = started.group(1)
    assert answer == f"code-server {commit} pid {pid}\n"
    # Only what the script printed: no echo of the script, no prompt, nothing on stderr.
    assert (code, out, err) == (0, first.expected_output(), "")

    socks = host_port()
    again = run_install(msb, vscode_sandbox, commit, "--port=0", "-D", str(socks),
                        exec_bash=exec_bash)
    try:
        answer = socks_get(socks, again.results["listeningOn"])
    finally:
        code, out, err = finish(again)
    assert again.started == f"Found running server (pid={pid})"
    assert again.results["listeningOn"] == first.results["listeningOn"]
    assert answer == f"code-server {commit} pid {pid}\n"
    assert (code, out, err) == (0, again.expected_output(), "")


def test_socket_server_is_reached_through_a_local_forward_to_its_path(
    msb: Env, vscode_sandbox: str, commit: str
) -> None:
    path = f"/tmp/code-{uuid.uuid4()}"
    install = run_install(msb, vscode_sandbox, commit, f"--socket-path={path}")
    try:
        assert install.results["exitCode"] == "0"
        assert install.results["listeningOn"] == path
        port = host_port()
        with tunnel(msb, vscode_sandbox, "-L", f"{port}:{path}", ready=port):
            got = curl(f"http://127.0.0.1:{port}/")
    finally:
        code, out, err = finish(install)
    pid = re.fullmatch(r"Started server \(pid=(\d+)\)", install.started)
    assert pid is not None, out
    assert (got.returncode, got.stdout.decode()) == (0, f"code-server {commit} pid "
                                                        f"{pid.group(1)}\n"), got.stderr
    assert (code, out, err) == (0, install.expected_output(), "")
    # The server outlives the connection that started it; a new one reaches it again.
    port = host_port()
    with tunnel(msb, vscode_sandbox, "-L", f"{port}:{path}", ready=port):
        again = curl(f"http://127.0.0.1:{port}/", timeout=WAIT_S)
    assert again.stdout == got.stdout
