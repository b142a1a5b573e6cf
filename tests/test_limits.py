"""A connection's limits, as sshd has them, through the real ``ssh`` where a user meets them.

``max_auth_tries`` (sshd's MaxAuthTries, 6): the sixth refused key ends the connection with
sshd's own disconnect. ``max_channels`` (1,024): the open past it fails, the connection and its
other channels go on, a closed channel frees its slot. ``login_grace_time`` (LoginGraceTime,
120 s): a client that does not authenticate in time is cut off. ``max_env`` (128) is the
session's: see ``test_client_requests.py`` for the default; here it is set in ``config.toml``.
Bad values are refused in one line naming the file, table, key and form.
"""

from __future__ import annotations

import asyncio
import os
import select
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from conftest import PROXY, Env
from installations import (
    configure,
    make_installation,
    one_line,
    proxy_of,
    proxy_stdio,
    remove_installation,
)

from msb_proxy.config import DEFAULT_MAX_AUTH_TRIES, DEFAULT_MAX_CHANNELS

SSH_GAVE_UP = 255
TOO_MANY = "Received disconnect from UNKNOWN port 65535:2: Too many authentication failures"
WAIT_S = 60


@pytest.fixture
def private(msb: Env) -> Iterator[Env]:
    """An installation of this test's own; its sandboxes end with the test."""
    env = make_installation(msb)
    yield env
    remove_installation(env)


def _keys(env: Env, count: int) -> list[Path]:
    """``count`` new client keys that no source authorizes."""
    keys = []
    for index in range(count):
        key = env.root / f"stranger{index}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f",
                        str(key)], check=True)
        keys.append(key)
    return keys


def _ssh_offering(env: Env, sandbox: str, keys: list[Path],
                  *command: str) -> subprocess.CompletedProcess[str]:
    """``ssh -o IdentitiesOnly=yes -i KEY ...`` offering exactly ``keys``, in that order (the
    installation's ssh config would add its own key: it is left out here)."""
    config = env.root / "ssh_config.keys"
    config.write_text("".join(line + "\n" for line in env.config.read_text().splitlines()
                              if not line.strip().startswith("IdentityFile")))
    identities = [arg for key in keys for arg in ("-i", str(key))]
    return subprocess.run(["ssh", "-F", str(config), "-o", "LogLevel=ERROR",
                           "-o", "IdentitiesOnly=yes", *identities, env.host(sandbox), *command],
                          capture_output=True, text=True, timeout=WAIT_S, check=False,
                          stdin=subprocess.DEVNULL)


# ---- max_auth_tries


def test_seven_wrong_keys_end_with_sshd_s_too_many_authentication_failures(private: Env) -> None:
    run = _ssh_offering(private, "auth", [*_keys(private, 7), private.key], "echo in")
    assert (run.returncode, run.stdout) == (SSH_GAVE_UP, "")
    assert run.stderr.splitlines() == [TOO_MANY]


def test_the_right_key_offered_sixth_still_logs_in(private: Env) -> None:
    wrong = _keys(private, DEFAULT_MAX_AUTH_TRIES - 1)
    run = _ssh_offering(private, "auth", [*wrong, private.key], "echo in")
    assert (run.returncode, run.stdout, run.stderr) == (0, "in\n", "")


def test_max_auth_tries_from_config_toml(private: Env) -> None:
    configure(private, "[defaults]\nmax_auth_tries = 2\n")
    wrong = _keys(private, 2)
    late = _ssh_offering(private, "auth", [*wrong, private.key], "echo in")
    assert (late.returncode, late.stdout, late.stderr.splitlines()) == (SSH_GAVE_UP, "",
                                                                       [TOO_MANY])
    second = _ssh_offering(private, "auth", [wrong[0], private.key], "echo in")
    assert (second.returncode, second.stdout, second.stderr) == (0, "in\n", "")


# ---- max_channels


# Holds every connection to a unix socket and echoes what comes; says "ready" once listening.
ECHO_SERVER = """
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_unix_server(echo, sys.argv[1], backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def _fill_channels(env: Env, sandbox: str, limit: int) -> None:
    """One session (a guest echo server) and ``limit - 1`` tunnels to it fill one
    connection's channels. The next session, ``direct-tcpip`` and ``direct-streamlocal``
    opens are refused with the failure sshd sends past MaxSessions; every tunnel still echoes;
    closing one lets the next session through."""
    proxy = [*env.proxy_command(), env.host(sandbox)]
    socket_path = f"{env.guest_tmp(sandbox)}/echo-{uuid.uuid4().hex[:8]}.sock"
    refused = (asyncssh.OPEN_CONNECT_FAILED,
               f"too many channels open on this connection (max_channels is {limit})")

    async def main() -> None:
        async with asyncssh.connect(env.host(sandbox), proxy_command=proxy, username="root",
                                    client_keys=[str(env.key)], known_hosts=None,
                                    config=None) as conn:
            server = await conn.create_process(shlex.join(["python3", "-c", ECHO_SERVER,
                                                           socket_path]))
            assert await server.stdout.readline() == "ready\n"
            tunnels = await asyncio.gather(*(
                conn.open_unix_connection(socket_path) for _ in range(limit - 1)))
            for open_one in (lambda: conn.run("echo refused"),
                             lambda: conn.open_connection("127.0.0.1", 22),
                             lambda: conn.open_unix_connection(socket_path)):
                with pytest.raises(asyncssh.ChannelOpenError) as error:
                    await open_one()
                assert (error.value.code, error.value.reason) == refused
            for index, (_, writer) in enumerate(tunnels):
                writer.write(f"{index}\n".encode())
            echoed = await asyncio.gather(*(reader.readline() for reader, _ in tunnels))
            assert echoed == [f"{index}\n".encode() for index in range(len(tunnels))]
            tunnels[0][1].close()
            await tunnels[0][1].wait_closed()
            result = await conn.run("echo freed", check=True)
            assert result.stdout == "freed\n"
            server.terminate()

    asyncio.run(asyncio.wait_for(main(), WAIT_S * 2))


def test_the_channel_past_1024_is_refused_and_the_others_go_on(msb: Env, sandbox: str) -> None:
    assert DEFAULT_MAX_CHANNELS == 1024
    _fill_channels(msb, sandbox, DEFAULT_MAX_CHANNELS)


def test_max_channels_from_config_toml(private: Env) -> None:
    configure(private, "[defaults]\nmax_channels = 300\n")
    _fill_channels(private, "chan", 300)


# ---- login_grace_time


def test_a_client_that_never_authenticates_is_cut_off_after_login_grace_time(
    private: Env, tmp_path: Path
) -> None:
    """The real ``ssh`` left at the passphrase prompt of the right key: after
    ``login_grace_time`` msb-proxy says why on stderr and ends the connection without a
    disconnect message, as sshd does; the client's next write finds it gone."""
    configure(private, '[defaults]\nlogin_grace_time = "2s"\n')
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "passphrase", "-f", str(key)],
                   check=True)
    (private.home / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    typed = tmp_path / "typed"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\nwhile [ ! -e {shlex.quote(str(typed))} ]; do sleep 0.05; "
                       "done\necho passphrase\n")
    askpass.chmod(0o755)
    config = private.root / "ssh_config.locked"
    config.write_text(private.config.read_text().replace(f"IdentityFile {private.key}",
                                                          f"IdentityFile {key}")
                      .replace("BatchMode yes", "BatchMode no"))
    client = subprocess.Popen(
        ["ssh", "-F", str(config), "-o", "LogLevel=INFO", private.host("grace"), "echo in"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "SSH_ASKPASS": str(askpass),
             "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"})
    try:
        assert client.stderr is not None
        proxy = os.pidfd_open(proxy_of(client.pid))
        before = [client.stderr.readline().decode()]
        while before[-1] and not before[-1].startswith("msb-proxy:"):
            before.append(client.stderr.readline().decode())
        # The passphrase comes once the ProxyCommand is gone, so that the client's next write
        # is what finds the connection closed.
        assert select.select([proxy], [], [], WAIT_S)[0] == [proxy]
        os.close(proxy)
        typed.touch()
        out, after = client.communicate(timeout=WAIT_S)
    finally:
        client.kill()
        client.wait()
    assert (client.returncode, out) == (SSH_GAVE_UP, b"")
    assert [*before, *after.decode().splitlines(keepends=True)] == [
        "Warning: Permanently added 'msb-grace' (ED25519) to the list of known hosts.\r\n",
        "msb-proxy: timeout before authentication: not logged in within 2 s "
        "(login_grace_time in config.toml)\n",
        "ssh_dispatch_run_fatal: Connection to UNKNOWN port 65535: Broken pipe\r\n"]


def test_login_grace_time_covers_the_key_exchange_too(private: Env) -> None:
    """A client that sends its version and nothing more: cut off, exit status 1."""
    configure(private, '[defaults]\nlogin_grace_time = "2s"\n')
    proxy = subprocess.Popen([str(PROXY), "stdio", "--quiet", "--host-prefix", "msb-",
                              "msb-grace"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=private.proxy_env())
    assert proxy.stdin is not None
    proxy.stdin.write(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    proxy.stdin.flush()
    assert proxy.stdout is not None and proxy.stderr is not None
    # stdin stays open: the client just sends nothing more.
    out, err = proxy.stdout.read(), proxy.stderr.read()
    proxy.wait(timeout=WAIT_S)
    proxy.stdin.close()
    assert proxy.returncode == 1
    assert out.startswith(b"SSH-2.0-OpenSSH_compatible msb_proxy_")
    assert err.decode() == ("msb-proxy: timeout before authentication: not logged in within "
                            "2 s (login_grace_time in config.toml)\n")


def test_a_session_outlives_login_grace_time(private: Env) -> None:
    configure(private, '[defaults]\nlogin_grace_time = "1s"\n')
    run = private.ssh("grace", "sleep 2; echo still")
    assert (run.returncode, run.out, run.err) == (0, "still\n", "")


# ---- max_env


def test_max_env_from_config_toml(private: Env) -> None:
    configure(private, '[defaults]\naccept_env = ["MSB_TEST_*"]\nmax_env = 3\n')
    options = ["-oSetEnv=" + " ".join(f"MSB_TEST_{index}={index}" for index in range(5))]
    run = private.ssh("env", "env | grep '^MSB_TEST_' | sort", options=options)
    assert (run.returncode, run.out, run.err) == (0, "MSB_TEST_0=0\nMSB_TEST_1=1\n"
                                                     "MSB_TEST_2=2\n", "")


# ---- config.toml


BAD_LIMITS = {
    "max_auth_tries": ("0", "an integer of at least 1 (sshd's MaxAuthTries) (got 0)"),
    "max_channels": ("255", "an integer of at least 256 (IDEs open many) (got 255)"),
    "max_env": ("-1", "an integer of at least 0 (got -1)"),
    "login_grace_time": ('"soon"', 'a duration such as "2m" or seconds (0: never) '
                                   "(got 'soon')"),
}


@pytest.mark.parametrize(("key", "value", "form"),
                         [(key, value, form) for key, (value, form) in BAD_LIMITS.items()],
                         ids=BAD_LIMITS.keys())
def test_a_bad_limit_is_one_line_naming_the_file_table_key_and_form(
    private: Env, key: str, value: str, form: str
) -> None:
    config = configure(private, f'[sandbox."web-*"]\n{key} = {value}\n')
    run = proxy_stdio(private, "msb-api")
    assert (run.returncode, run.stdout) == (2, b"")
    assert one_line(run) == f'msb-proxy: {config}: sandbox."web-*".{key} must be {form}'


def test_a_connection_may_hold_max_channels_sockets_under_the_usual_soft_limit() -> None:
    """The soft limit on open files is often 1,024, as many as max_channels' default: the
    serving process lifts it to the hard limit before it serves."""
    code = ("import resource; from msb_proxy.cli.commandline import _more_open_files; "
            "_more_open_files(); print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    done = subprocess.run(["bash", "-c", f'ulimit -Sn 512; exec "$0" -c "{code}"',
                           sys.executable], capture_output=True, text=True, timeout=60,
                          check=True)
    soft, hard = done.stdout.split()
    assert soft == hard != "512"
