"""Channel data on the short send and receive paths is byte-exact, and the paths are taken.

An in-process SshServer on the local backend, served to asyncssh's client over TCP or, as a
ProxyCommand is, over two pipes (then in a thread of its own, where the relay runs as in
``msb-proxy stdio``), so the tests can count what the paths do and steer the client (ciphers,
re-keying); the real-client suites (transfers, tunnels, sshfs) run over the same paths through
the ProxyCommand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import threading
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import asyncssh
import pytest
from conftest import Env

from msb_proxy import fastpath
from msb_proxy.backends.local.backend import LocalBackend
from msb_proxy.config import SandboxTemplate
from msb_proxy.fastpath import receive, relay, send
from msb_proxy.server.endpoint import SshServer, SshServerOptions
from msb_proxy.state import StateDir
from msb_proxy.transport.stdio import SshSocketStream, SshStdioStream

# 3 MiB of random bytes on stdout, and on stderr a line and their digest as the guest saw it:
# both channel data types.
COMMAND = ("head -c 3145728 /dev/urandom | tee /tmp/sent; echo to-stderr >&2; "
           "sha256sum </tmp/sent >&2")


class _FastPaths:
    """The in-process server's connection hooks: fastpath.install, recording every FastPath
    (one per connection) and the packets its receivers handed to asyncssh."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, relay_loop: str) -> None:
        self.relay_loop = relay_loop
        self.paths: list[fastpath.FastPath] = []
        self.replayed: list[int] = []
        replay = receive.Receiver._replay

        def replaying(receiver: receive.Receiver, packet: bytes, encryption: Any,
                      plain: bytes) -> None:
            self.replayed.append(plain[1])
            replay(receiver, packet, encryption, plain)

        monkeypatch.setattr(receive.Receiver, "_replay", replaying)
        monkeypatch.setitem(_RECORDER, "hooks", self)

    def __call__(self, conn: asyncssh.SSHServerConnection) -> fastpath.FastPath:
        hooks = fastpath.install(conn, relay_loop=self.relay_loop)
        assert isinstance(hooks, fastpath.FastPath), "the fast path was not installed"
        self.paths.append(hooks)
        return hooks

    @property
    def receivers(self) -> list[receive.Receiver]:
        return [path.receiver for path in self.paths]

    @property
    def fast(self) -> int:
        return sum(receiver.fast_packets for receiver in self.receivers)

    @property
    def relays(self) -> list[relay.Relay]:
        return [path.relay for path in self.paths if path.relay is not None]

    @property
    def inline_reads(self) -> int:
        return sum(each.inline_reads for each in self.relays)


_RECORDER: dict[str, _FastPaths] = {}


def _recorder(monkeypatch: pytest.MonkeyPatch) -> _FastPaths:
    """The recorder of this test (made with the C loop when the test did not set one up)."""
    return _RECORDER.get("hooks") or _FastPaths(monkeypatch, "c")


def _serving(monkeypatch: pytest.MonkeyPatch, serve: str) -> bool:
    """Set up serving ``serve`` ("tcp", "pipes": the relay's C loop, "pipes-python": its
    Python loop); whether over pipes."""
    if serve == "pipes" and relay.compiled_loop() is None:
        if shutil.which("cc") is None:
            pytest.skip("no C compiler here: msb_proxy.fastpath._relay cannot be built")
        pytest.fail("msb_proxy.fastpath._relay is not built (make install builds it)")
    _FastPaths(monkeypatch, "python" if serve == "pipes-python" else "c")
    return serve != "tcp"


async def _run(msb: Env, sandbox: str, ciphers: list[str],
               pipes: bool) -> asyncssh.SSHCompletedProcess:
    async with _connect(msb, sandbox, ciphers, pipes) as conn:
        return await conn.run(COMMAND, encoding=None)


@contextlib.asynccontextmanager
async def _connect(msb: Env, sandbox: str, ciphers: list[str], pipes: bool = False,
                   **client_options: object) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An asyncssh client connected to an in-process SshServer for ``sandbox``."""
    if pipes:
        async with _connect_pipes(msb, sandbox, ciphers, **client_options) as conn:
            yield conn
        return
    server = await SshServer.prepare(LocalBackend(StateDir(msb.home), msb.rootfs), sandbox,
                                     _options(msb, sandbox))
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
                                    config=None, **client_options) as conn:
            yield conn
    finally:
        listener.close()
        await asyncio.wait_for(asyncio.gather(*served, return_exceptions=True), 30)


def _options(msb: Env, sandbox: str) -> SshServerOptions:
    return SshServerOptions(host_key_path=msb.home / f"send-{sandbox}.key",
                            authorized_keys=[msb.key.with_suffix(".pub").read_text()],
                            template=SandboxTemplate(backend="local"),
                            connection_hooks=_RECORDER.get("hooks"))


@contextlib.asynccontextmanager
async def _connect_pipes(msb: Env, sandbox: str, ciphers: list[str],
                         **client_options: object) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """The server on two pipes in a thread with its own loop, as ``msb-proxy stdio`` is."""
    to_server, from_client = os.pipe()
    to_client, from_server = os.pipe()
    failures: list[BaseException] = []

    async def serve() -> None:
        server = await SshServer.prepare(LocalBackend(StateDir(msb.home), msb.rootfs), sandbox,
                                         _options(msb, sandbox))
        await server.serve(SshStdioStream(to_server, from_server))

    def thread() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            failures.append(exc)

    server_thread = threading.Thread(target=thread, name="server")
    server_thread.start()
    try:
        async with asyncssh.connect(sandbox, username="root", known_hosts=None,
                                    tunnel=SshStdioStream(to_client, from_client),
                                    client_keys=[str(msb.key)], encryption_algs=ciphers,
                                    config=None, **client_options) as conn:
            yield conn
    finally:
        os.close(from_client)  # the server's end of file
        await asyncio.get_running_loop().run_in_executor(None, server_thread.join, 30)
        for fd in (to_server, to_client, from_server):
            os.close(fd)
    assert not server_thread.is_alive() and not failures, failures


@pytest.mark.parametrize(("cipher", "fast", "serve"), [
    ("aes128-ctr", True, "tcp"), ("aes256-ctr", True, "tcp"),
    ("aes128-gcm@openssh.com", False, "tcp"), ("aes128-ctr", True, "pipes"),
    ("aes256-ctr", True, "pipes-python"), ("aes128-gcm@openssh.com", False, "pipes"),
])
def test_channel_data_is_exact_on_either_path(
    msb: Env, monkeypatch: pytest.MonkeyPatch, cipher: str, fast: bool, serve: str
) -> None:
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"sendpath-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    pipes = _serving(monkeypatch, serve)
    relays = _recorder(monkeypatch)
    sent: list[int] = []
    original = send.seal

    def counting(conn: asyncssh.SSHServerConnection, pkttype: int,
                 args: tuple[bytes, ...]) -> tuple[bytes, ...]:
        sent.append(pkttype)
        return original(conn, pkttype, args)

    monkeypatch.setattr(send, "seal", counting)
    result = asyncio.run(_run(msb, sandbox, [cipher], pipes))
    assert result.exit_status == 0
    stdout, stderr = result.stdout, result.stderr
    assert isinstance(stdout, bytes) and isinstance(stderr, bytes)
    assert len(stdout) == 3 << 20
    assert stderr.startswith(b"to-stderr\n")
    assert stderr.split()[1] == hashlib.sha256(stdout).hexdigest().encode()
    if fast and serve == "pipes":  # sealed in C, reads of at most 256 KiB (a few of the 12+
        assert relays.inline_reads >= 6  # go the usual way, after the relay gave the loop back)
        assert sent.count(asyncssh.MSG_CHANNEL_EXTENDED_DATA) >= 1  # stderr: not relayed
    elif fast:  # every data packet; 3 MiB is at least 96 of them at 32 KiB
        assert sent.count(asyncssh.MSG_CHANNEL_DATA) >= 96
        assert sent.count(asyncssh.MSG_CHANNEL_EXTENDED_DATA) >= 1
    else:
        assert sent == []
    assert len(relays.relays) == pipes


@pytest.mark.parametrize(("cipher", "mac", "fast", "serve"), [
    ("aes128-ctr", "umac-64-etm@openssh.com", True, "tcp"),
    ("aes256-ctr", "hmac-sha2-256-etm@openssh.com", True, "tcp"),  # asyncssh's own MAC object
    ("aes128-ctr", "hmac-sha2-256", False, "tcp"),  # MAC before encryption: asyncssh's path
    ("aes128-gcm@openssh.com", None, False, "tcp"),
    ("aes128-ctr", "umac-64-etm@openssh.com", True, "pipes"),
    ("aes256-ctr", "umac-128-etm@openssh.com", True, "pipes"),
    ("aes128-ctr", "umac-64-etm@openssh.com", True, "pipes-python"),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com", True, "pipes"),  # Python's loop
    ("aes128-ctr", "hmac-sha2-256", False, "pipes"),
])
def test_client_data_is_exact_across_rekeys(
    msb: Env, monkeypatch: pytest.MonkeyPatch, *, cipher: str, mac: str | None, fast: bool,
    serve: str
) -> None:
    """4 MiB into the guest's stdin while the client re-keys every MiB: the key exchange
    packets arrive between data packets, are decrypted to find their type and must reach
    asyncssh intact, and the data after each exchange is read with the new keys."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"recvpath-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    pipes = _serving(monkeypatch, serve)
    seen = _recorder(monkeypatch)
    payload = os.urandom(4 << 20)

    async def run() -> asyncssh.SSHCompletedProcess:
        macs = {"mac_algs": [mac]} if mac else {}
        async with _connect(msb, sandbox, [cipher], pipes, rekey_bytes=1 << 20,
                            **macs) as conn:
            assert conn.get_extra_info("send_mac") == (mac or cipher), "another MAC chosen"
            return await conn.run("sha256sum; echo done >&2", input=payload, encoding=None)

    result = asyncio.run(run())
    assert result.exit_status == 0, result.stderr
    assert isinstance(result.stdout, bytes)
    assert result.stdout.split()[0] == hashlib.sha256(payload).hexdigest().encode()
    assert result.stderr == b"done\n"
    if fast and pipes:  # most on the short paths; over pipes a few go to asyncssh whenever the
        # guest's stdin pipe is full (then the relay hands them back, as flow control wants)
        assert seen.fast + seen.replayed.count(asyncssh.MSG_CHANNEL_DATA) >= 128
        assert seen.fast >= 64
    if fast:  # 4 MiB is at least 128 packets of 32 KiB; at least 3 exchanges went to asyncssh
        assert pipes or seen.fast >= 128
        assert seen.replayed.count(asyncssh.MSG_KEXINIT) >= 3
        assert asyncssh.MSG_CHANNEL_EOF in seen.replayed
    else:
        assert seen.fast == 0 and seen.replayed == []


@pytest.mark.parametrize("serve", ["tcp", "pipes", "pipes-python"])
def test_small_requests_and_answers_are_exact(
    msb: Env, monkeypatch: pytest.MonkeyPatch, serve: str
) -> None:
    """SFTP with 200 small files each way: requests and answers of a few dozen bytes, the
    traffic scp -r makes, on both short paths; over pipes, most of it in the relay."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"recvpath-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    pipes = _serving(monkeypatch, serve)
    seen = _recorder(monkeypatch)
    relays = _recorder(monkeypatch)
    files = {f"f{index:03d}": os.urandom(index * 7 % 3000) for index in range(200)}

    async def run() -> dict[str, bytes]:
        async with _connect(msb, sandbox, ["aes128-ctr"], pipes) as conn, \
                conn.start_sftp_client() as sftp:
            await sftp.mkdir("small")
            for name, data in files.items():
                async with sftp.open(f"small/{name}", "wb") as handle:
                    await handle.write(data)
            back: dict[str, bytes] = {}
            for name in await sftp.listdir("small"):
                if name not in (".", ".."):
                    async with sftp.open(f"small/{name}", "rb") as handle:
                        back[name] = cast(bytes, await handle.read())
            return back

    assert asyncio.run(run()) == files
    assert seen.fast >= 1000  # open, write, close, open, read, close: ~6 per file
    # asyncssh's client sends an SSH_MSG_IGNORE before its packets: every loop hands each to
    # asyncssh as it does any packet it does not take (the C loop once dropped them itself)
    assert seen.replayed.count(asyncssh.MSG_IGNORE) >= 100
    if pipes:  # both ways, most reads; the client shares its process, so not all
        assert len(relays.relays) == 1
        assert relays.inline_reads >= 1000
    else:
        assert relays.relays == []


def _relay_test(msb: Env, monkeypatch: pytest.MonkeyPatch, serve: str) -> tuple[str, _FastPaths]:
    """A sandbox for a test of the relay on ``serve``, and the relays its server installs."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"relay-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    _serving(monkeypatch, serve)
    return sandbox, _recorder(monkeypatch)


# For every line it reads, 100,000 random bytes in one write; at the end their digest on stderr.
ANSWERS = ("python3 -c 'import hashlib, os, sys\n"
           "digest = hashlib.sha256()\n"
           "for line in sys.stdin:\n"
           "    data = os.urandom(100000); digest.update(data); os.write(1, data)\n"
           "sys.stderr.write(digest.hexdigest())'")


@pytest.mark.parametrize("serve", ["pipes", "pipes-python"])
def test_the_relay_keeps_to_windows_and_full_pipes(
    msb: Env, monkeypatch: pytest.MonkeyPatch, serve: str
) -> None:
    """Guest output larger than the client's window of 48 KiB, in packets of at most 8 KiB
    (the relay splits its reads and leaves what the window does not take to asyncssh), and
    8 MiB into a guest that starts reading half a second late (its stdin pipe fills: what is not
    written goes to the transport's queue, and the rest of the data after it)."""
    sandbox, relays = _relay_test(msb, monkeypatch, serve)
    payload = os.urandom(8 << 20)
    handed_back: list[tuple[Any, ...]] = []  # what the C loop left to the usual path
    native = relay.compiled_loop()
    if serve == "pipes" and native is not None:

        def recording(*arguments: Any) -> Any:
            result = native.run(*arguments)
            handed_back.append(result)
            return result

        loop = types.SimpleNamespace(run=recording)
        monkeypatch.setattr(relay, "compiled_loop", lambda: loop)

    async def run() -> tuple[bytes, bytes, bytes]:
        async with _connect(msb, sandbox, ["aes128-ctr"], True) as conn:
            # one answer at a time: the relay is polling when the next one comes (the first
            # may go the usual way, when the relay had just given the loop back)
            process = await conn.create_process(ANSWERS, encoding=None, window=48 << 10,
                                                max_pktsize=8 << 10)
            answers = b""
            for _ in range(8):
                process.stdin.write(b"next\n")
                answers += await process.stdout.readexactly(100000)
            process.stdin.write_eof()
            digest = await process.stderr.read()
            await process.wait()
            # a first byte goes the usual way and the relay starts polling; the rest, 1 MiB
            # per read, meets a stdin pipe nobody reads yet
            late = await conn.create_process("sleep 0.5; sha256sum", encoding=None)
            late.stdin.write(payload[:1])
            await asyncio.sleep(0.1)
            late.stdin.write(payload[1:])
            late.stdin.write_eof()
            summed = await late.stdout.read()
            await late.wait()
            return answers, digest, summed

    answers, digest, summed = asyncio.run(run())
    assert digest == hashlib.sha256(answers).hexdigest().encode()
    assert summed.split()[0] == hashlib.sha256(payload).hexdigest().encode()
    assert relays.inline_reads >= 5
    if serve == "pipes":  # output past the window; input the full pipe did not take
        assert any(result[0] == 3 and result[7] for result in handed_back)
        assert any(result[3] for result in handed_back)


@pytest.mark.parametrize("serve", ["pipes", "pipes-python"])
def test_a_channel_closed_while_relayed_leaves_the_connection_working(
    msb: Env, monkeypatch: pytest.MonkeyPatch, serve: str
) -> None:
    """The client closes a session whose process is still reading, right after data for it:
    the close reaches asyncssh (which ends the session and the relay's hold on it) and the
    connection goes on serving."""
    sandbox, relays = _relay_test(msb, monkeypatch, serve)

    async def run() -> asyncssh.SSHCompletedProcess:
        async with _connect(msb, sandbox, ["aes128-ctr"], True) as conn:
            for _ in range(3):
                process = await conn.create_process("cat", encoding=None)
                process.stdin.write(b"echo\n")
                assert await process.stdout.readexactly(5) == b"echo\n"
                process.stdin.write(b"more\n")
                process.close()
                await process.wait_closed()
            return await asyncio.wait_for(conn.run("echo still here", encoding=None), 30)

    result = asyncio.run(run())
    assert result.stdout == b"still here\n"
    assert relays.inline_reads >= 1


@pytest.mark.parametrize("serve", ["pipes", "pipes-python"])
def test_server_rekeys_while_relaying_are_exact(
    msb: Env, monkeypatch: pytest.MonkeyPatch, serve: str
) -> None:
    """The server re-keys every 256 KiB it sends: the relay stops sending before the limit,
    asyncssh starts the exchange with the next packet, and the output after it goes out under
    the new keys, 3 MiB of it exact."""
    sandbox, relays = _relay_test(msb, monkeypatch, serve)
    kexinits: list[object] = []
    patched: list[object] = []
    attach = relay.Relay.attach

    def small_rekeys(self: relay.Relay, *arguments: Any) -> bool:
        conn: Any = self._conn  # authenticated by now: asyncssh has set its limits
        if conn not in patched:
            patched.append(conn)
            conn._rekey_bytes = 256 << 10
            send_kexinit = conn._send_kexinit

            def counted() -> None:
                kexinits.append(None)
                send_kexinit()

            conn._send_kexinit = counted
        return attach(self, *arguments)

    monkeypatch.setattr(relay.Relay, "attach", small_rekeys)

    async def run() -> asyncssh.SSHCompletedProcess:
        async with _connect(msb, sandbox, ["aes128-ctr"], True) as conn:
            output = await conn.run(COMMAND, encoding=None)
            process = await conn.create_process(ANSWERS, encoding=None)
            answers = b""
            for _ in range(20):  # answers while the relay is polling
                process.stdin.write(b"next\n")
                answers += await process.stdout.readexactly(100000)
            process.stdin.write_eof()
            assert await process.stderr.read() == hashlib.sha256(answers).hexdigest().encode()
            await process.wait()
            return output

    output = asyncio.run(run())
    assert output.exit_status == 0
    stdout, stderr = output.stdout, output.stderr
    assert isinstance(stdout, bytes) and isinstance(stderr, bytes)
    assert stderr.split()[1] == hashlib.sha256(stdout).hexdigest().encode()
    assert len(kexinits) >= 15  # 5 MiB in all: one exchange per 256 KiB sent is 20
    assert relays.inline_reads >= 10


@pytest.mark.parametrize("serve", ["pipes", "pipes-python"])
def test_a_bad_mac_while_relayed_ends_the_connection_as_asyncssh_does(
    msb: Env, monkeypatch: pytest.MonkeyPatch, serve: str
) -> None:
    """A data packet for the relayed session whose MAC does not verify (its last byte flipped
    on the wire) is not delivered: asyncssh gets it and disconnects with a MAC error."""
    sandbox, relays = _relay_test(msb, monkeypatch, serve)
    lost: list[Exception | None] = []

    class Client(asyncssh.SSHClient):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    async def run() -> None:
        async with _connect(msb, sandbox, ["aes128-ctr"], True,
                            client_factory=Client) as conn:
            process = await conn.create_process("cat", encoding=None)
            process.stdin.write(b"first\n")
            assert await process.stdout.readexactly(6) == b"first\n"
            await asyncio.sleep(0.2)  # the relay is polling now
            transport: Any = conn._transport
            write = transport.write

            def corrupting(data: bytes) -> None:
                transport.write = write
                write(data[:-1] + bytes((data[-1] ^ 1,)))

            transport.write = corrupting
            process.stdin.write(b"second\n")
            with pytest.raises(asyncssh.MACError):  # "second" never comes back from cat
                await process.stdout.read()
            await asyncio.wait_for(conn.wait_closed(), 10)

    asyncio.run(run())
    assert len(lost) == 1 and isinstance(lost[0], asyncssh.DisconnectError)
    assert lost[0].code == asyncssh.DISC_MAC_ERROR
    assert relays.inline_reads >= 1


class _FailOnce:
    """A MAC that fails to verify the packet with sequence number ``seq``."""

    def __init__(self, mac: Any, seq: int) -> None:
        self._mac, self._seq = mac, seq

    def sign(self, seq: int, packet: bytes) -> bytes:
        return bytes(self._mac.sign(seq, packet))

    def verify(self, seq: int, packet: bytes, sig: bytes) -> bool:
        return seq != self._seq and bool(self._mac.verify(seq, packet, sig))


async def _until_disconnected(msb: Env, sandbox: str, seen: _FastPaths,
                              act: Callable[[asyncssh.SSHClientConnection, receive.Receiver],
                                            Awaitable[object]]) -> tuple[object, object]:
    """Connect, check a command runs, ``act`` on the connection and the server's receiver,
    and wait (10 s at most) for the server to end it: (why the client lost it, act's result)."""
    lost: list[Exception | None] = []

    class Client(asyncssh.SSHClient):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    async with _connect(msb, sandbox, ["aes128-ctr"], client_factory=Client) as conn:
        assert (await conn.run("echo ok", encoding=None)).stdout == b"ok\n"
        result = await act(conn, seen.receivers[0])
        await asyncio.wait_for(conn.wait_closed(), 10)
    assert len(lost) == 1
    return lost[0], result


def test_bad_mac_closes_the_connection_as_asyncssh_does(
    msb: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packet whose MAC does not verify is left to asyncssh, which disconnects with a MAC
    error, instead of being decrypted or delivered."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"recvpath-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    seen = _recorder(monkeypatch)

    async def fail_next_mac(conn: asyncssh.SSHClientConnection,
                            receiver: receive.Receiver) -> None:
        server: Any = receiver._conn
        encryption = server._recv_encryption
        encryption._mac = _FailOnce(encryption._mac, server._recv_seq)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("echo never", encoding=None)

    why, _ = asyncio.run(_until_disconnected(msb, sandbox, seen, fail_next_mac))
    assert isinstance(why, asyncssh.DisconnectError)
    assert why.code == asyncssh.DISC_MAC_ERROR


def test_a_bad_length_split_across_reads_is_refused_at_once(
    msb: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packet length past asyncssh's limit whose four bytes arrive in two reads goes to
    asyncssh as soon as it is complete, which ends the connection; it is not held while
    waiting for the 4 GiB it announces."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"recvpath-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    seen = _recorder(monkeypatch)

    async def split_bad_length(conn: asyncssh.SSHClientConnection,
                               receiver: receive.Receiver) -> bytes:
        receiver.feed(b"\xff\xff")
        receiver.feed(b"\xff\xf0" + bytes(1000))
        return receiver._held

    why, held = asyncio.run(_until_disconnected(msb, sandbox, seen, split_bad_length))
    assert held == b""
    assert isinstance(why, asyncssh.DisconnectError)
    assert why.code == asyncssh.DISC_PROTOCOL_ERROR


def _failing(original: Callable[..., Any], after: int,
             when: Callable[..., bool] = lambda *args: True) -> Callable[..., Any]:
    """``original``, raising RuntimeError at the ``after``-th call for which ``when`` holds."""
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            calls[0] += 1
            if calls[0] == after:
                raise RuntimeError("a fault injected by the test")
        return original(*args, **kwargs)

    return call


def _is_channel(_gate: object, obj: object) -> bool:
    return isinstance(obj, asyncssh.SSHServerChannel)


FAULTS = {  # where a fault of ours strikes: (object, attribute, after how many calls, when)
    "receive, before decrypting": (receive.Receiver, "_valid", 40, None),
    "receive, after decrypting": (fastpath.gate.Accepts, "__call__", 1, _is_channel),
    "send, sealing a packet": (send, "seal", 5, None),
    "relay, polling": (relay.Relay, "_step", 3, None),
    "relay, entering the C loop": (relay.Relay, "_native_arguments", 3, None),
}


@pytest.mark.parametrize("serve", ["tcp", "pipes", "pipes-python"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_in_the_fast_path_hands_everything_to_asyncssh_in_order(
    msb: Env, monkeypatch: pytest.MonkeyPatch, fault: str, serve: str
) -> None:
    """Our code raising anywhere on the fast path, mid-transfer: the bytes in flight go to
    asyncssh's own path in order (a packet already decrypted as its plaintext), the fast path
    is off for that connection only, and the transfer and the next command are exact."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    owner, attribute, after, when = FAULTS[fault]
    if fault.startswith("relay") and serve == "tcp":
        pytest.skip("no relay over TCP")
    if attribute == "_native_arguments" and serve != "pipes":
        pytest.skip("the C loop serves only pipes")
    if attribute in ("seal", "_step") and serve == "pipes":
        pytest.skip("the C loop seals and polls there (faults entering it: the C-loop case)")
    sandbox = f"fault-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    pipes = _serving(monkeypatch, serve)
    seen = _recorder(monkeypatch)
    original = getattr(owner, attribute)
    monkeypatch.setattr(owner, attribute, _failing(original, after, when or (lambda *a: True)))
    payload = os.urandom(4 << 20)

    async def run() -> tuple[asyncssh.SSHCompletedProcess, asyncssh.SSHCompletedProcess]:
        async with _connect(msb, sandbox, ["aes128-ctr"], pipes) as conn:
            upload = await conn.run("sha256sum; head -c 3145728 /dev/urandom | tee /tmp/out | "
                                    "sha256sum >&2; cat /tmp/out", input=payload,
                                    encoding=None)
            return upload, await conn.run("echo still here", encoding=None)

    upload, after_it = asyncio.run(run())
    assert upload.exit_status == 0
    stdout, stderr = upload.stdout, upload.stderr
    assert isinstance(stdout, bytes) and isinstance(stderr, bytes)
    assert stdout[:64] == hashlib.sha256(payload).hexdigest().encode()
    assert stderr.split()[0] == hashlib.sha256(stdout[68:]).hexdigest().encode()
    assert len(stdout) == 68 + (3 << 20)
    assert after_it.stdout == b"still here\n"
    assert len(seen.paths) == 1 and not seen.paths[0].active, "the fault did not strike"
