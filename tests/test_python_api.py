"""The seed SDK's SSH API in Python (``msb_proxy.ssh``), each from a script of its own run with
the environment a user's shell has (``MSB_PROXY_HOME`` and the rest), on the test backend.

The native client (``connect``): exec with its status, stderr, signal, tty folding and stdin,
the login user, SFTP both ways, SFTP turned off, close. The server endpoint (``server``): the
keys it accepts by default and given in memory, the user override, an empty key set, and
serving the real ``ssh`` over a ``(StreamReader, StreamWriter)`` pair and a ``socket.socket``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, install

pytestmark = pytest.mark.timeout(180)


def run_script(msb: Env, body: str, *args: str, extra: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``body`` (an async function ``main(*args)``'s statements) run by this Python in a
    process of its own with the installation's environment; its stdout is what it prints."""
    source = "import asyncio, json, sys\nimport msb_proxy\n\nasync def main(*args):\n" \
        + textwrap.indent(textwrap.dedent(body), "    ") \
        + "\n\nasyncio.run(main(*sys.argv[1:]))\n"
    env = msb.proxy_env()
    env.update(extra or {})
    return subprocess.run([sys.executable, "-c", source, *args], capture_output=True,
                          text=True, timeout=150, env=env, check=False)


def sandbox(msb: Env) -> str:
    name = f"api-{uuid.uuid4().hex[:8]}"
    msb.host(name)  # removed with the session's sandboxes
    return name


def outputs(done: subprocess.CompletedProcess[str]) -> list[Any]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


SHOW = """
def show(out):
    print(json.dumps({"status": out.status, "stdout": out.stdout_text,
                      "stderr": out.stderr_text, "signal": out.signal,
                      "success": out.success}), flush=True)
"""


def test_exec_gives_status_stdout_stderr_and_signal_and_folds_stderr_with_a_tty(
        msb: Env) -> None:
    done = run_script(msb, SHOW + """
client = await msb_proxy.ssh(args[0]).connect()
show(await client.exec("echo out; echo err >&2; exit 3"))
show(await client.exec("true"))
show(await client.exec("kill -KILL $$"))
show(await client.exec_with("echo out; echo err >&2", tty=True))
show(await client.exec_with("tr a-z A-Z", stdin=b"piped in\\n"))
show(await client.exec("id -un; echo $SHELL"))
await client.close()
""", sandbox(msb))
    assert outputs(done) == [
        {"status": 3, "stdout": "out\n", "stderr": "err\n", "signal": None, "success": False},
        {"status": 0, "stdout": "", "stderr": "", "signal": None, "success": True},
        {"status": 137, "stdout": "", "stderr": "", "signal": "KILL", "success": False},
        {"status": 0, "stdout": "out\r\nerr\r\n", "stderr": "", "signal": None,
         "success": True},
        {"status": 0, "stdout": "PIPED IN\n", "stderr": "", "signal": None, "success": True},
        {"status": 0, "stdout": f"{msb.guest_user('root')}\n/bin/bash\n", "stderr": "",
         "signal": None, "success": True},
    ]


def test_connect_aliases_log_in_as_the_user_given(msb: Env) -> None:
    done = run_script(msb, SHOW + """
namespace = msb_proxy.ssh(args[0])
for connect in (namespace.connect, namespace.open_client, namespace.connect_with,
                namespace.open_client_with):
    async with await connect(user="dev") as client:
        show(await client.exec("id -un"))
""", sandbox(msb))
    user = msb.guest_user("dev")
    assert [out["stdout"] for out in outputs(done)] == [f"{user}\n"] * 4


def test_sftp_writes_and_reads_back_a_file_on_the_same_connection(msb: Env) -> None:
    name = sandbox(msb)
    path = f"{msb.guest_tmp(name)}/api-sftp-{uuid.uuid4().hex[:6]}"
    done = run_script(msb, SHOW + """
async with await msb_proxy.ssh(args[0]).connect() as client:
    sftp = await client.sftp()
    async with sftp.open(args[1], "wb") as f:
        await f.write(bytes(range(256)) * 1000)
    show(await client.exec(f"wc -c < {args[1]}"))
    async with sftp.open(args[1], "rb") as f:
        print(json.dumps({"same": await f.read() == bytes(range(256)) * 1000}))
    sftp.exit()
""", name, path)
    assert [out.get("stdout", out.get("same")) for out in outputs(done)] == ["256000\n", True]


def test_a_client_connected_with_sftp_off_is_refused_sftp_and_still_runs_commands(
        msb: Env) -> None:
    done = run_script(msb, SHOW + """
async with await msb_proxy.ssh(args[0]).connect(sftp=False) as client:
    try:
        await client.sftp()
    except msb_proxy.UserError as exc:
        print(json.dumps({"error": str(exc)}))
    show(await client.exec("echo still"))
""", name := sandbox(msb))
    first, second = outputs(done)
    assert str(first["error"]).startswith(f"sandbox {name!r} refused SFTP: ")
    assert second["stdout"] == "still\n"


def test_a_closed_client_says_so_on_every_use_and_closes_twice_harmlessly(msb: Env) -> None:
    done = run_script(msb, """
client = await msb_proxy.ssh(args[0]).connect()
await client.close()
await client.close()
for use in (lambda: client.exec("true"), client.sftp, client.attach):
    try:
        await use()
    except msb_proxy.UserError as exc:
        print(json.dumps(str(exc)))
""", name := sandbox(msb))
    assert outputs(done) == [f"this SSH client of sandbox {name!r} is closed; connect again"] * 3


def test_the_exports_are_the_seeds_names(msb: Env) -> None:
    done = run_script(msb, """
names = ["ssh", "SandboxSsh", "SshClient", "SshOutput", "SshServer", "SshStdioStream",
         "DEFAULT_SSH_HOST", "DEFAULT_SSH_PORT"]
print(json.dumps([name in msb_proxy.__all__ for name in names]))
print(json.dumps([msb_proxy.DEFAULT_SSH_HOST, msb_proxy.DEFAULT_SSH_PORT]))
server = msb_proxy.SshServer
print(json.dumps(server.serve_connection is server.serve))
""")
    assert outputs(done) == [[True] * 8, ["127.0.0.1", 2222], True]


# ---- the server endpoint, reached by the real ssh

SERVE_TCP = """
import os
server = await msb_proxy.ssh(args[0]).{method}({options})
listener = await asyncio.start_server(lambda r, w: server.serve((r, w)), "127.0.0.1", 0)
port = listener.sockets[0].getsockname()[1]
ssh = await asyncio.create_subprocess_exec(
    "ssh", "-p", str(port), "-i", args[1], "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=" + args[2],
    "-o", "LogLevel=ERROR", "root@127.0.0.1", *args[3:],
    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
out, err = await ssh.communicate()
print(json.dumps({{"code": ssh.returncode, "out": out.decode(), "err": err.decode()}}))
"""


def serve_once(msb: Env, name: str, options: str, *command: str, method: str = "server",
               key: str | None = None) -> dict[str, Any]:
    known = msb.root / f"known-{uuid.uuid4().hex[:6]}"
    done = run_script(msb, SERVE_TCP.format(method=method, options=options), name,
                      key or str(msb.key), str(known), *command)
    (only,) = outputs(done)
    result: dict[str, Any] = only
    result["known"] = known.read_text() if known.exists() else ""
    return result


def test_server_with_defaults_accepts_the_clis_keys_and_shows_the_pinned_host_key(
        msb: Env) -> None:
    name = sandbox(msb)
    result = serve_once(msb, name, "", "echo served")
    assert (result["code"], result["out"], result["err"]) == (0, "served\n", "")
    # The endpoint's key is the sandbox's own: the one ``ssh msb-NAME`` pins.
    stdio = msb.ssh(name, "true", options=["-o", f"UserKnownHostsFile={msb.root}/k-{name}",
                                           "-o", "StrictHostKeyChecking=accept-new"])
    assert stdio.returncode == 0, stdio.err
    assert str(result["known"]).split()[1:] == \
        (msb.root / f"k-{name}").read_text().split()[1:]


def test_every_server_alias_runs_sessions_as_the_user_option(msb: Env) -> None:
    name = sandbox(msb)
    for method in ("server", "prepare_server", "server_with", "prepare_server_with"):
        result = serve_once(msb, name, 'user="dev"', "id -un", method=method)
        assert (result["code"], result["out"]) == (0, f"{msb.guest_user('dev')}\n")


def test_server_accepts_an_in_memory_key_and_only_it(msb: Env) -> None:
    name = sandbox(msb)
    other = msb.root / f"other-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    line = other.with_suffix(".pub").read_text().strip()
    accepted = serve_once(msb, name, f"authorized_key={line!r}", "echo in", key=str(other))
    assert (accepted["code"], accepted["out"]) == (0, "in\n")
    refused = serve_once(msb, name, f"authorized_key=[{line!r}]", "echo in")
    assert refused["code"] == 255
    assert "Permission denied (publickey)" in str(refused["err"])


def test_server_with_sftp_off_refuses_the_sftp_subsystem(msb: Env) -> None:
    result = serve_once(msb, sandbox(msb), "sftp=False", "-s", "sftp")
    assert result["code"] != 0


def test_server_with_an_empty_key_set_is_a_user_error_naming_where_it_looked(
        msb: Env) -> None:
    empty = msb.root / f"empty-{uuid.uuid4().hex[:6]}"
    empty.write_text("")
    done = run_script(msb, """
try:
    await msb_proxy.ssh(args[0]).server(authorized_keys_path=[args[1]])
except msb_proxy.UserError as exc:
    print(json.dumps(str(exc)))
""", sandbox(msb), str(empty))
    (message,) = outputs(done)
    assert str(message).startswith(f"no authorized keys found in {empty}; ")


def test_server_serves_a_connected_socket(msb: Env) -> None:
    name = sandbox(msb)
    done = run_script(msb, """
import socket
server = await msb_proxy.ssh(args[0]).server()
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
ssh = await asyncio.create_subprocess_exec(
    "ssh", "-p", str(port), "-i", args[1], "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR", "root@127.0.0.1", "echo", "over", "a", "socket",
    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
sock, _ = await asyncio.get_running_loop().run_in_executor(None, listener.accept)
serving = asyncio.ensure_future(server.serve_connection(sock))
out, err = await ssh.communicate()
await serving
print(json.dumps([ssh.returncode, out.decode(), err.decode()]))
""", name, str(msb.key))
    assert outputs(done) == [[0, "over a socket\n", ""]]


def test_attach_with_bad_detach_keys_is_a_value_error_naming_them(msb: Env) -> None:
    done = run_script(msb, """
async with await msb_proxy.ssh(args[0]).connect() as client:
    try:
        await client.attach_with(detach_keys="ctrl-p,meta-x")
    except ValueError as exc:
        print(json.dumps(str(exc)))
""", sandbox(msb))
    assert outputs(done) == [
        "bad detach keys 'ctrl-p,meta-x': 'meta-x' is not a-z or ctrl-<a-z, @, [, \\, ], ^ or _>"]


# ---- the same API on the microsandbox backend, its SDK the stand-in (no microVM needed)

@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, dict[str, str]]]:
    """An installation on the microsandbox backend whose SDK is the stand-in (loaded into the
    script by tests/standin_site), with running sandbox "e2e"; and the script's environment."""
    from microsandbox_standin import StandInSDK
    from test_microsandbox_backend import GROUP, PASSWD

    from msb_proxy.backends.microsandbox.backend import LABELS

    root = tmp_path_factory.mktemp("api-standin")
    guest = root / "guest"
    (guest / "etc").mkdir(parents=True)
    (guest / "etc" / "passwd").write_text(PASSWD)
    (guest / "etc" / "group").write_text(GROUP)
    sdk = StandInSDK(root / "runtime")
    sdk.add_sandbox("e2e", guest, labels=LABELS)
    env = install(root / "install", "microsandbox", guest)
    here = Path(__file__).parent
    extra = {"PYTHONPATH": f"{here / 'standin_site'}:{here}",
             "MSB_PROXY_TEST_STANDIN": str(root / "runtime")}
    yield env, extra
    sdk.close()


def test_the_same_api_runs_on_the_microsandbox_backend_given_a_sandbox_object(
        standin: tuple[Env, dict[str, str]]) -> None:
    env, extra = standin
    done = run_script(env, SHOW + """
class Sandbox:  # what ssh() reads of a microsandbox.Sandbox
    name = "e2e"

async with await msb_proxy.ssh(Sandbox()).connect() as client:
    show(await client.exec("echo out; echo err >&2; exit 3"))
    show(await client.exec_with("cat", stdin=b"through the stand-in"))
""", extra=extra)
    assert outputs(done) == [
        {"status": 3, "stdout": "out\n", "stderr": "err\n", "signal": None,
         "success": False},
        {"status": 0, "stdout": "through the stand-in", "stderr": "", "signal": None,
         "success": True},
    ]
