"""Channel data on the short send path is byte-exact, and the path is really taken.

An in-process SshServer on the local backend, served over a socketpair to asyncssh's client,
so the test can count what the send path does; the real-client suites (transfers, tunnels,
sshfs) run over the same path through the ProxyCommand.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import uuid

import asyncssh
import pytest
from conftest import Env

from msb_proxy import sendpath
from msb_proxy.backends.local import LocalBackend
from msb_proxy.config import SandboxTemplate
from msb_proxy.server import SshServer, SshServerOptions
from msb_proxy.state import StateDir
from msb_proxy.stdio import SshSocketStream

# 3 MiB of random bytes on stdout, and on stderr a line and their digest as the guest saw it:
# both channel data types.
COMMAND = ("head -c 3145728 /dev/urandom | tee /tmp/sent; echo to-stderr >&2; "
           "sha256sum </tmp/sent >&2")


async def _run(msb: Env, sandbox: str, ciphers: list[str]) -> asyncssh.SSHCompletedProcess:
    backend = LocalBackend(StateDir(msb.home), msb.rootfs)
    options = SshServerOptions(host_key_path=msb.home / f"sendpath-{sandbox}.key",
                               authorized_keys=[msb.key.with_suffix(".pub").read_text()],
                               template=SandboxTemplate(backend="local"))
    server = await SshServer.prepare(backend, sandbox, options)
    served: list[asyncio.Task[object]] = []

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket").dup()
        writer.transport.abort()
        served.append(asyncio.current_task())  # type: ignore[arg-type]
        await server.serve(SshSocketStream(socket.socket(fileno=sock.detach())))

    listener = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect("127.0.0.1", port, username="root", known_hosts=None,
                                    client_keys=[str(msb.key)], encryption_algs=ciphers,
                                    config=None) as conn:
            return await conn.run(COMMAND, encoding=None)
    finally:
        listener.close()
        await asyncio.wait_for(asyncio.gather(*served, return_exceptions=True), 30)


@pytest.mark.parametrize(("cipher", "fast"), [("aes128-ctr", True), ("aes256-ctr", True),
                                               ("aes128-gcm@openssh.com", False)])
def test_channel_data_is_exact_on_either_path(
    msb: Env, monkeypatch: pytest.MonkeyPatch, cipher: str, fast: bool
) -> None:
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"sendpath-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    sent: list[int] = []
    original = sendpath._send_data

    def counting(conn: object, encryption: object, pkttype: int, args: tuple[bytes, ...]) -> None:
        sent.append(pkttype)
        original(conn, encryption, pkttype, args)  # type: ignore[arg-type]

    monkeypatch.setattr(sendpath, "_send_data", counting)
    result = asyncio.run(_run(msb, sandbox, [cipher]))
    assert result.exit_status == 0
    stdout, stderr = result.stdout, result.stderr
    assert isinstance(stdout, bytes) and isinstance(stderr, bytes)
    assert len(stdout) == 3 << 20
    assert stderr.startswith(b"to-stderr\n")
    assert stderr.split()[1] == hashlib.sha256(stdout).hexdigest().encode()
    if fast:  # every data packet; 3 MiB is at least 96 of them at 32 KiB
        assert sent.count(asyncssh.MSG_CHANNEL_DATA) >= 96
        assert sent.count(asyncssh.MSG_CHANNEL_EXTENDED_DATA) >= 1
    else:
        assert sent == []
