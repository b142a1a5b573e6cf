"""Tunnels: ``-L``, ``-D``, ``-R``, unix sockets both ways, and agent forwarding, in the guest.

A ``direct-tcpip`` channel to an IP address goes straight to a socket of the sandbox's network
namespace when the backend can hand one out (the local backend's jail init makes it), so the
data path has no guest process in it, as with sshd. Everything else of a connection goes
through one guest relay (``guest/relay.py``, started on the
first tunnel, as the login user): ``direct-tcpip`` and ``direct-streamlocal@openssh.com``
channels are connections the relay makes from inside the sandbox; ``tcpip-forward`` and
``streamlocal-forward@openssh.com`` requests are listeners it opens there, whose connections
come back as ``forwarded-tcpip`` / ``forwarded-streamlocal@openssh.com`` channels; agent
forwarding is a unix listener at ``/tmp/ssh-XXXXXXXXXX/agent.N`` (directory 0700, as sshd
makes it) whose connections come back as ``auth-agent@openssh.com`` channels.

A connection to a refused or unreachable target fails the channel open with the
``connect failed`` reason code and the system's text, as sshd does, without holding up the
connection's other channels.
Each stream has credit-based flow control end to end: the relay reads from a guest socket only
as far as the SSH channel has drained, and we send into the guest only as far as the relay has
written out.

Where the guest has no Python to run the relay (a backend other than the local one), ``-L``
and ``-D`` fall back to one ``socat``, ``nc`` or ``bash /dev/tcp`` process per channel; ``-R``
and agent forwarding then report what the sandbox lacks.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import secrets
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import asyncssh

from msb_proxy.backends.base import ExitStatus, GuestProcess, GuestUser, ProcessSpec, Sandbox
from msb_proxy.backends.links import Link, split_frames
from msb_proxy.errors import UserError
from msb_proxy.guest import tunnels as protocol

__all__ = ["Relay", "RelayStream", "TunnelSession", "open_agent_listener"]

CONNECT_FAILED = asyncssh.OPEN_CONNECT_FAILED
HIGH_WATER = 256 * 1024
FALLBACK_GRACE_S = 0.3
AcceptHandler = Callable[["RelayStream", str, int], Coroutine[Any, Any, None]]
TunnelChannel = asyncssh.SSHTCPChannel[bytes] | asyncssh.SSHUNIXChannel[bytes]


class RelayStream:
    """One tunnelled connection inside the guest, as the proxy sees it."""

    def __init__(self, relay: Relay, ident: int) -> None:
        self.relay = relay
        self.ident = ident
        self.session: TunnelSession | None = None
        self._credit = protocol.WINDOW  # how much the relay will still take
        self._queued: list[bytes] = []
        self._queued_size = 0
        self._eof_queued = False
        self._close_queued = False
        self._early: list[tuple[int, bytes]] = []  # what came before a session was attached
        self._owed = 0  # credit to grant once our channel drains
        self._channel_paused = False
        self.closed = False

    def attach(self, session: TunnelSession) -> None:
        self.session = session
        for op, payload in self._early:
            self.from_relay(op, payload)
        self._early.clear()

    # ---- toward the guest
    def send(self, data: bytes) -> None:
        if self.closed or self._close_queued:
            return
        self._queued.append(data)
        self._queued_size += len(data)
        self._flush()
        if self._queued_size > HIGH_WATER and self.session is not None:
            self.session.pause_input()

    def send_eof(self) -> None:
        self._eof_queued = True
        self._flush()

    def close(self) -> None:
        """The channel is closed: what it sent still reaches the guest, then the stream ends."""
        if self.closed:
            return
        if self._queued:
            self._close_queued = True
            return
        self.closed = True
        self.relay.forget(self.ident)
        self.relay.send(self.ident, protocol.CLOSE)

    def _flush(self) -> None:
        while self._queued and self._credit > 0:
            chunk = self._queued[0]
            part, rest = chunk[:self._credit], chunk[self._credit:]
            if rest:
                self._queued[0] = rest
            else:
                self._queued.pop(0)
            self._credit -= len(part)
            self._queued_size -= len(part)
            self.relay.send(self.ident, protocol.DATA, part)
        if not self._queued and self._eof_queued:
            self._eof_queued = False
            self.relay.send(self.ident, protocol.EOF)
        if not self._queued and self._close_queued:
            self._close_queued = False
            self.close()
        if self._queued_size <= HIGH_WATER // 4 and self.session is not None:
            self.session.resume_input()

    # ---- from the guest
    def from_relay(self, op: int, payload: bytes) -> None:
        if self.session is None:
            self._early.append((op, payload))
            return
        if op == protocol.DATA:
            self.session.write(payload)
            if self._channel_paused:
                self._owed += len(payload)
            else:
                self.relay.send(self.ident, protocol.CREDIT, struct.pack(">I", len(payload)))
        elif op == protocol.CREDIT:
            self._credit += struct.unpack(">I", payload)[0]
            self._flush()
        elif op == protocol.EOF:
            self.session.write_eof()
        elif op == protocol.CLOSE:
            self.closed = True
            self.relay.forget(self.ident)
            self.session.close()

    def channel_paused(self) -> None:
        self._channel_paused = True

    def channel_resumed(self) -> None:
        self._channel_paused = False
        if self._owed:
            self.relay.send(self.ident, protocol.CREDIT, struct.pack(">I", self._owed))
            self._owed = 0


class Relay:
    """The proxy end of one guest relay: opens streams and listeners, routes frames."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._next_id = 1
        self._buffer = bytearray()
        self._streams: dict[int, RelayStream] = {}
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._accept: dict[int, AcceptHandler] = {}
        self.lost: Exception | None = None
        link.attach(self)

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    def send(self, ident: int, op: int, payload: bytes = b"") -> None:
        if self.lost is None:
            self._link.send(protocol.frame(ident, op, payload))

    def forget(self, ident: int) -> None:
        self._streams.pop(ident, None)

    def close(self) -> None:
        self._link.close()

    async def _request(self, ident: int, op: int, payload: bytes) -> bytes:
        if self.lost is not None:
            raise OSError(errno.ECONNRESET, f"the guest relay is gone: {self.lost}")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self.send(ident, op, payload)
        return await future

    async def connect(self, host: str | None, port: int, path: str | None = None) -> RelayStream:
        """A connection from inside the guest to ``host``:``port`` (or unix ``path``)."""
        ident = self._new_id()
        stream = RelayStream(self, ident)
        self._streams[ident] = stream
        if path is not None:
            op, payload = protocol.CONNECT_UNIX, path.encode("utf-8", "surrogateescape")
        else:
            op, payload = protocol.CONNECT_TCP, f"{host}\0{port}".encode()
        try:
            await self._request(ident, op, payload)
        except BaseException:
            self._streams.pop(ident, None)
            raise
        return stream

    async def listen(self, accept: AcceptHandler, host: str | None = None, port: int = 0,
                     path: str | None = None, mode: int = 0o600) -> tuple[int, int]:
        """Listen inside the guest; return (listener id, port). Each accepted connection is
        handed to ``accept(stream, peer_host, peer_port)``."""
        ident = self._new_id()
        if path is not None:
            op, payload = protocol.LISTEN_UNIX, f"{path}\0{mode:o}".encode(
                "utf-8", "surrogateescape")
        else:
            op, payload = protocol.LISTEN_TCP, f"{host or ''}\0{port}".encode()
        self._accept[ident] = accept
        try:
            reply = await self._request(ident, op, payload)
        except BaseException:
            self._accept.pop(ident, None)
            raise
        return ident, struct.unpack(">I", reply)[0]

    def unlisten(self, ident: int) -> None:
        if self._accept.pop(ident, None) is not None:
            self.send(ident, protocol.UNLISTEN)

    # ---- LinkReceiver
    def link_data(self, data: bytes) -> None:
        self._buffer += data
        for frame in split_frames(self._buffer):
            _, ident, op = protocol.HEADER.unpack_from(frame)
            self._dispatch(ident, op, frame[protocol.HEADER.size:])

    def _dispatch(self, ident: int, op: int, payload: bytes) -> None:
        if op in (protocol.OPENED, protocol.LISTENING, protocol.FAILED):
            future = self._waiting.pop(ident, None)
            if future is not None and not future.done():
                if op == protocol.FAILED:
                    code, _, text = payload.decode(errors="replace").partition("\0")
                    future.set_exception(OSError(int(code or errno.EIO), text))
                else:
                    future.set_result(payload)
        elif op == protocol.ACCEPTED:
            listener, peer_host, peer_port = payload.decode(errors="replace").split("\0")
            handler = self._accept.get(int(listener))
            stream = RelayStream(self, ident)
            self._streams[ident] = stream
            if handler is None:
                stream.close()
            else:
                asyncio.get_running_loop().create_task(
                    handler(stream, peer_host, int(peer_port or 0)))
        else:
            known = self._streams.get(ident)
            if known is not None:
                known.from_relay(op, payload)

    def link_lost(self, exc: Exception | None) -> None:
        self.lost = exc or EOFError("the guest relay ended")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(OSError(errno.ECONNRESET, f"the guest relay ended: "
                                                               f"{self.lost}"))
        self._waiting.clear()
        for stream in list(self._streams.values()):
            stream.from_relay(protocol.CLOSE, b"")
        self._streams.clear()


class TunnelSession(asyncssh.SSHTCPSession[bytes], asyncssh.SSHUNIXSession[bytes]):
    """An SSH forwarding channel carried by a :class:`RelayStream` (or a fallback process)."""

    def __init__(self, stream: RelayStream | ProcessTunnel | SocketTunnel,
                 on_close: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._chan: TunnelChannel | None = None
        self._on_close = on_close
        self._input_paused = False

    def connection_made(self, chan: TunnelChannel) -> None:
        self._chan = chan
        chan.set_write_buffer_limits(high=HIGH_WATER)
        self._stream.attach(self)

    # ---- from the client
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._stream.send(data)

    def eof_received(self) -> bool:
        self._stream.send_eof()
        return True

    def pause_writing(self) -> None:
        self._stream.channel_paused()

    def resume_writing(self) -> None:
        self._stream.channel_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    # ---- from the guest
    def write(self, data: bytes) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write(data)

    def write_eof(self) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write_eof()

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()

    def pause_input(self) -> None:
        if self._chan is not None and not self._input_paused:
            self._input_paused = True
            self._chan.pause_reading()

    def resume_input(self) -> None:
        if self._chan is not None and self._input_paused:
            self._input_paused = False
            self._chan.resume_reading()


class SocketTunnel(asyncio.Protocol):
    """``-L``/``-D`` to an address in the sandbox over a socket of its network namespace that
    the backend handed us (:meth:`Sandbox.tcp_socket`): no guest process in the data path, as
    with sshd, and the kernel's own flow control on the socket."""

    def __init__(self) -> None:
        self.session: TunnelSession | None = None
        self._transport: asyncio.Transport | None = None
        self._eof = False
        self._lost = False

    # ---- the socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]
        transport.pause_reading()  # type: ignore[attr-defined]  # until the channel is open

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.write(data)

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.write_eof()
        return True  # half-closed: the client may still send

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.session is not None:
            self.session.close()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_input()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_input()

    # ---- the channel
    def attach(self, session: TunnelSession) -> None:
        self.session = session
        if self._lost:
            session.close()
        elif self._transport is not None:
            self._transport.resume_reading()

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._eof and not self._transport.is_closing():
            self._transport.write(data)

    def send_eof(self) -> None:
        if self._transport is not None and not self._eof and not self._transport.is_closing():
            self._eof = True
            self._transport.write_eof()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # what the channel sent is written out first

    def channel_paused(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def channel_resumed(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()


async def connect_direct(sandbox: Sandbox, host: str, port: int) -> SocketTunnel | None:
    """Connect to ``host``, an IP address, in the sandbox on a socket of its network
    namespace; None when the backend has no such sockets. A failed connect raises the
    channel open error."""
    version = ipaddress.ip_address(host).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = await sandbox.tcp_socket(family)
    if sock is None:
        return None
    loop = asyncio.get_running_loop()
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        _, tunnel = await loop.create_connection(SocketTunnel, sock=sock)
    except OSError as exc:
        sock.close()
        if exc.errno:  # asyncio's text names the address; sshd gives the system's words
            exc = OSError(exc.errno, os.strerror(exc.errno))
        raise channel_open_error(exc) from None
    except BaseException:
        sock.close()
        raise
    return tunnel


class ProcessTunnel:
    """``-L``/``-D`` without a relay: one guest process (socat, nc, bash) per channel, its
    stdin and stdout being the connection."""

    def __init__(self) -> None:
        self.process: GuestProcess | None = None
        self.session: TunnelSession | None = None
        self.exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._early: list[bytes] = []
        self._stderr = bytearray()
        self._output_seen = False

    def attach(self, session: TunnelSession) -> None:
        self.session = session
        for data in self._early:
            session.write(data)
        self._early.clear()
        if self.exited.done():
            session.close()

    def send(self, data: bytes) -> None:
        if self.process is not None:
            self.process.write_stdin(data)

    def send_eof(self) -> None:
        if self.process is not None:
            self.process.close_stdin()

    def close(self) -> None:
        if self.process is not None:
            self.process.hangup()

    def channel_paused(self) -> None:
        if self.process is not None:
            self.process.pause_output()

    def channel_resumed(self) -> None:
        if self.process is not None:
            self.process.resume_output()

    def failure(self) -> str:
        """The reason the tool gave, without its own prefix ("nc: connect to ...: Connection
        refused" gives "Connection refused"), as sshd would report it."""
        lines = self._stderr.decode(errors="replace").strip().splitlines()
        return lines[-1].rsplit(": ", 1)[-1] if lines else "the connection failed"

    # ---- ProcessListener
    def output_received(self, data: bytes, stderr: bool) -> None:
        if stderr:
            self._stderr += data[:4096 - len(self._stderr)]
        elif self.session is not None:
            self.session.write(data)
        else:
            self._early.append(data)

    def stdin_paused(self) -> None:
        if self.session is not None:
            self.session.pause_input()

    def stdin_resumed(self) -> None:
        if self.session is not None:
            self.session.resume_input()

    def process_exited(self, status: ExitStatus) -> None:
        if not self.exited.done():
            self.exited.set_result(status)
        if self.session is not None:
            self.session.write_eof()
            self.session.close()


def _socat(tool: str, host: str, port: int) -> list[str]:
    return [tool, "-", f"TCP:{host}:{port}"]


def _nc(tool: str, host: str, port: int) -> list[str]:
    # OpenBSD nc needs -N to pass the client's EOF on; busybox's applet passes it anyway.
    return [*([tool, "nc"] if tool.endswith("busybox") else [tool, "-N"]), host, str(port)]


def _bash(tool: str, host: str, port: int) -> list[str]:
    script = 'exec 3<>"/dev/tcp/$1/$2" && { cat <&3 & cat >&3; kill %1 2>/dev/null; wait; }'
    return [tool, "-c", script, "bash", host, str(port)]


# Tried in order when the guest cannot run the relay; each connects stdin/stdout to the target.
FALLBACK_TOOLS: tuple[tuple[list[str], Callable[[str, str, int], list[str]]], ...] = (
    (["/usr/bin/socat", "/bin/socat", "/usr/local/bin/socat"], _socat),
    (["/usr/bin/nc", "/bin/nc", "/usr/local/bin/nc", "/bin/busybox", "/usr/bin/busybox"], _nc),
    (["/bin/bash", "/usr/bin/bash"], _bash),
)


async def connect_with_tool(sandbox: Sandbox, user: GuestUser, host: str,
                            port: int) -> ProcessTunnel:
    """``host``:``port`` from inside the guest through the first tool it has."""
    for paths, argv in FALLBACK_TOOLS:
        found = await sandbox.find_program(user, paths)
        if found is None:
            continue
        tunnel = ProcessTunnel()
        command = argv(found, host, port)
        spec = ProcessSpec(program=command[0], argv=command,
                           env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, cwd=user.home or "/",
                           user=user)
        tunnel.process = await sandbox.spawn(spec, tunnel)
        # A refused target makes the tool exit at once; give it a moment to say so, as the
        # relay would have before the channel opened.
        done, _ = await asyncio.wait({tunnel.exited}, timeout=FALLBACK_GRACE_S)
        if done and tunnel.exited.result().code not in (0, None):
            raise asyncssh.ChannelOpenError(CONNECT_FAILED, tunnel.failure())
        return tunnel
    raise asyncssh.ChannelOpenError(
        CONNECT_FAILED, f"sandbox {sandbox.name!r} has neither python3 nor socat, nc or bash "
                        "to make connections with")


async def open_agent_listener(relay: Relay, accept: AcceptHandler) -> str:
    """Listen for agent clients at a fresh ``/tmp/ssh-XXXXXXXXXX/agent.N``; return its path."""
    directory = f"/tmp/ssh-{secrets.token_hex(5)}"
    path = f"{directory}/agent.{os.getpid()}"
    await relay.listen(accept, path=path, mode=0o600)
    return path


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def channel_open_error(exc: OSError | UserError) -> asyncssh.ChannelOpenError:
    """The open failure sshd sends for a connection that could not be made: the reason code
    (which the client prints as "connect failed") and the system's text."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return asyncssh.ChannelOpenError(CONNECT_FAILED, reason)


class GuestListener(asyncssh.SSHListener):
    """A ``-R`` listener inside the guest, as asyncssh's forwarding code expects one."""

    def __init__(self, relay: Relay, ident: int, port: int) -> None:
        super().__init__()
        self._relay = relay
        self._ident = ident
        self._port = port
        self._closed = asyncio.Event()

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        self._relay.unlisten(self._ident)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class Tunnels:
    """Every tunnel of one SSH connection, and the guest relay they share."""

    def __init__(self, sandbox: Sandbox, user: GuestUser,
                 conn: asyncssh.SSHServerConnection, opened: Callable[[], None],
                 closed: Callable[[], None]) -> None:
        self._sandbox = sandbox
        self._user = user
        self._conn = conn
        self._opened = opened
        self._closed = closed
        self._relay: Relay | None = None
        self._relay_error: UserError | None = None
        self._starting = asyncio.Lock()
        self._direct = True  # try sockets of the sandbox's namespace before the relay
        self.agent_path: str | None = None

    async def relay(self) -> Relay:
        """The connection's guest relay, started on first use."""
        async with self._starting:
            if self._relay is None or self._relay.lost is not None:
                if self._relay_error is not None:
                    raise self._relay_error
                try:
                    link = await self._sandbox.start_helper(self._user, "tunnels")
                except UserError as exc:
                    self._relay_error = exc
                    raise
                self._relay = Relay(link)
            return self._relay

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()

    def _session(self, stream: RelayStream | ProcessTunnel | SocketTunnel) -> TunnelSession:
        self._opened()
        return TunnelSession(stream, on_close=self._closed)

    # ---- direct-tcpip, direct-streamlocal@openssh.com
    async def connect(self, host: str | None, port: int,
                      path: str | None = None) -> TunnelSession:
        # An address: a socket of the sandbox's namespace. A name: the relay, for the guest
        # resolves it.
        if path is None and host is not None and self._direct and _is_address(host):
            direct = await connect_direct(self._sandbox, host, port)
            if direct is not None:
                return self._session(direct)
            self._direct = False  # the backend hands out no sockets: stop asking
        try:
            relay = await self.relay()
        except UserError:
            if path is not None or host is None:
                raise asyncssh.ChannelOpenError(
                    CONNECT_FAILED, f"sandbox {self._sandbox.name!r} cannot run the relay unix "
                                    "sockets need (it has no python3)") from None
            return self._session(await connect_with_tool(self._sandbox, self._user, host, port))
        try:
            stream = await relay.connect(host, port, path)
        except OSError as exc:
            raise channel_open_error(exc) from None
        return self._session(stream)

    # ---- tcpip-forward, streamlocal-forward@openssh.com
    async def listen(self, host: str | None, port: int,
                     path: str | None = None) -> GuestListener:
        relay = await self.relay()
        # As sshd with GatewayPorts no: -R listens on the guest's loopback.
        bind_host = None if path is not None else "127.0.0.1" if host in ("", "*", "localhost",
                                                                          "0.0.0.0") else host
        listen_port = 0

        async def accept(stream: RelayStream, peer_host: str, peer_port: int) -> None:
            try:
                if path is not None:
                    await self._conn.create_unix_connection(lambda: self._session(stream), path)
                else:
                    await self._conn.create_connection(lambda: self._session(stream),
                                                       host or "", listen_port, peer_host,
                                                       peer_port)
            except (asyncssh.ChannelOpenError, OSError):
                stream.close()

        try:
            ident, listen_port = await relay.listen(accept, host=bind_host, port=port, path=path)
        except OSError:
            return None  # type: ignore[return-value]  # asyncssh: None means "failed"
        return GuestListener(relay, ident, listen_port)

    # ---- auth-agent-req@openssh.com
    async def start_agent(self) -> bool:
        """Make the guest socket sessions find the client's agent at (``SSH_AUTH_SOCK``)."""
        if self.agent_path is not None:
            return True
        create_channel = getattr(self._conn, "create_agent_channel", None)
        if create_channel is None:
            return False

        async def accept(stream: RelayStream, _host: str, _port: int) -> None:
            try:
                channel = create_channel()
                await channel.open(lambda: self._session(stream))
            except (asyncssh.ChannelOpenError, OSError):
                stream.close()

        try:
            relay = await self.relay()
            self.agent_path = await open_agent_listener(relay, accept)
        except (UserError, OSError):
            return False
        return True
