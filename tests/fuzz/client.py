"""A small SSH client that controls every byte it sends, for fuzzing the server side.

It speaks just enough SSH to reach any state of a connection: curve25519-sha256 key exchange
(with or without OpenSSH's strict key exchange), an ed25519 server host key (the signature is
checked), ``aes128-ctr``/``aes256-ctr`` with ``hmac-sha2-256``, ``hmac-sha2-256-etm`` or
``umac-64-etm`` (what OpenSSH clients pick with msb-proxy, the fast path's case) and
``aes128-gcm``, public-key authentication with ed25519, and the channel bookkeeping of
RFC 4254 (windows, confirmations, replies, closes). Every packet it sends can be mutated as it
is sealed (:class:`Mutation`: its length field, padding length, a bit flipped anywhere in the
sealed bytes, cut short), and raw bytes can be written anywhere in the stream.

Everything the server sends is parsed and checked (framing, padding, MAC, decryption): bytes
that are not SSH raise :class:`NotSsh`, which a fuzz case reports. Randomness (cookies,
padding, the ephemeral key) comes from the ``random.Random`` it is given, so a case replays
byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncssh import mac as asyncssh_mac
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "CIPHERS",
    "MACS",
    "Channel",
    "Client",
    "Closed",
    "Disconnected",
    "Mutation",
    "NotSsh",
    "SshEnded",
    "Stalled",
    "UserKey",
    "boolean",
    "name_list",
    "string",
    "u32",
]

# Message numbers (RFC 4250 4.1.2, OpenSSH's PROTOCOL).
DISCONNECT, IGNORE, UNIMPLEMENTED, DEBUG = 1, 2, 3, 4
SERVICE_REQUEST, SERVICE_ACCEPT, EXT_INFO = 5, 6, 7
KEXINIT, NEWKEYS, KEX_ECDH_INIT, KEX_ECDH_REPLY = 20, 21, 30, 31
USERAUTH_REQUEST, USERAUTH_FAILURE, USERAUTH_SUCCESS, USERAUTH_BANNER = 50, 51, 52, 53
USERAUTH_PK_OK = 60
GLOBAL_REQUEST, REQUEST_SUCCESS, REQUEST_FAILURE = 80, 81, 82
CHANNEL_OPEN, OPEN_CONFIRMATION, OPEN_FAILURE, WINDOW_ADJUST = 90, 91, 92, 93
CHANNEL_DATA, EXTENDED_DATA, CHANNEL_EOF, CHANNEL_CLOSE = 94, 95, 96, 97
CHANNEL_REQUEST, CHANNEL_SUCCESS, CHANNEL_FAILURE = 98, 99, 100

KEX = b"curve25519-sha256"
STRICT_KEX = b"kex-strict-c-v00@openssh.com"
HOST_KEY = b"ssh-ed25519"
CIPHERS = ("aes128-ctr", "aes256-ctr", "aes128-gcm@openssh.com")
MACS = ("umac-64-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "hmac-sha2-256")
_KEY_SIZES = {"aes128-ctr": 16, "aes256-ctr": 32, "aes128-gcm@openssh.com": 16}
_MAC_KEYS = {"umac-64-etm@openssh.com": 16, "hmac-sha2-256-etm@openssh.com": 32,
             "hmac-sha2-256": 32}
_GCM_TAG = 16
MAX_PACKET_IN = 256 * 1024  # what we take from the server: its max packet plus headroom
CLIENT_WINDOW = 1 << 20  # the window we give the server on each channel
CLIENT_MAX_PACKET = 32768


def u32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def string(value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return u32(len(data)) + data


def boolean(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


def name_list(names: list[bytes]) -> bytes:
    return string(b",".join(names))


def mpint(value: int) -> bytes:
    if value == 0:
        return u32(0)
    data = value.to_bytes((value.bit_length() + 8) // 8, "big")  # a leading 0 keeps it positive
    return string(data)


class SshEnded(Exception):
    """The connection is over from the client's point of view."""


class Closed(SshEnded):
    """The server closed its output (end of file)."""


class Disconnected(SshEnded):
    """The server sent SSH_MSG_DISCONNECT."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"disconnect {code}: {reason}")
        self.code = code
        self.reason = reason


class Stalled(Exception):
    """Nothing the client waited for came within its time (the server neither answered nor
    closed): a hang."""


class NotSsh(Exception):
    """The server wrote something that is not SSH protocol."""


class Reader:
    """Fields of one payload, in order; a short payload raises NotSsh."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise NotSsh(f"truncated message {self.data[:1].hex()}: wanted {size} bytes")
        part = self.data[self.pos:self.pos + size]
        self.pos += size
        return part

    def byte(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        return self.take(self.u32())

    def boolean(self) -> bool:
        return self.byte() != 0


@dataclass(frozen=True)
class Mutation:
    """How one packet is damaged as it is sealed (None: as it should be).

    ``length``: the packet-length field sent instead of the real one; ``padding``: the
    padding-length byte instead of the real one; ``flip``: a bit of the sealed packet to flip
    (taken modulo its size in bits: header, ciphertext or MAC alike); ``cut``: send only the
    first ``cut`` bytes (modulo its size) of the sealed packet.
    """

    length: int | None = None
    padding: int | None = None
    flip: int | None = None
    cut: int | None = None


class UserKey:
    """An ed25519 client key made from a seed (the same seed, the same key)."""

    def __init__(self, seed: int) -> None:
        self._private = Ed25519PrivateKey.from_private_bytes(
            random.Random(seed).randbytes(32))
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.blob = string(HOST_KEY) + string(raw)

    @property
    def openssh(self) -> str:
        """The ``authorized_keys`` line."""
        return f"ssh-ed25519 {base64.b64encode(self.blob).decode()} fuzz"

    def sign(self, data: bytes) -> bytes:
        return string(HOST_KEY) + string(self._private.sign(data))


class _Keys:
    """One direction's cipher and MAC after NEWKEYS."""

    def __init__(self, cipher: str, mac: str, key: bytes, iv: bytes, mac_key: bytes) -> None:
        self.cipher = cipher
        self.mac_name = mac
        self.gcm = cipher.endswith("gcm@openssh.com")
        self.etm = self.gcm or mac.endswith("-etm@openssh.com")
        self.block = 16
        if self.gcm:
            self._aead = AESGCM(key)
            self._fixed = iv[:4]
            self._counter = int.from_bytes(iv[4:12], "big")
            self.mac_size = _GCM_TAG
            self._mac: Any = None
        else:
            ctr = Cipher(algorithms.AES(key), modes.CTR(iv))
            self._enc = ctr.encryptor()
            self._dec = ctr.decryptor()
            self._mac = asyncssh_mac.get_mac(mac.encode(), mac_key)
            self.mac_size = 8 if mac.startswith("umac-64") else 32

    def _nonce(self) -> bytes:
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & ((1 << 64) - 1)
        return nonce

    def seal(self, seq: int, length: bytes, body: bytes) -> bytes:
        """The wire form of a packet: ``length`` (4 bytes) then ``body`` (padding length,
        payload, padding)."""
        if self.gcm:
            return length + self._aead.encrypt(self._nonce(), body, length)
        if self.etm:
            ciphertext = self._enc.update(body)
            return length + ciphertext + bytes(self._mac.sign(seq, length + ciphertext))
        plain = length + body
        return self._enc.update(plain) + bytes(self._mac.sign(seq, plain))

    def header_size(self) -> int:
        """Bytes needed to learn a received packet's length."""
        return 4 if self.etm else self.block

    def length_of(self, head: bytes, state: dict[str, bytes]) -> int:
        if self.etm:
            return int.from_bytes(head[:4], "big")
        first = self._dec.update(head)
        state["first"] = first
        return int.from_bytes(first[:4], "big")

    def open(self, seq: int, wire: bytes, length: int, state: dict[str, bytes]) -> bytes:
        """The body (padding length onwards) of a received packet; NotSsh if it is not one."""
        if self.gcm:
            try:
                return self._aead.decrypt(self._nonce(), wire[4:4 + length + _GCM_TAG],
                                          wire[:4])
            except InvalidTag:
                raise NotSsh(f"packet {seq}: GCM tag does not verify") from None
        mac = wire[4 + length:4 + length + self.mac_size]
        if self.etm:
            if not self._mac.verify(seq, wire[:4 + length], mac):
                raise NotSsh(f"packet {seq}: MAC does not verify")
            return bytes(self._dec.update(wire[4:4 + length]))
        first = state["first"]
        plain = first + self._dec.update(wire[self.block:4 + length])
        if not self._mac.verify(seq, plain, mac):
            raise NotSsh(f"packet {seq}: MAC does not verify")
        return plain[4:]


@dataclass
class Channel:
    """A channel this client opened, as far as the server has told it."""

    local: int
    remote: int | None = None
    window: int = 0  # how much we may still send
    max_packet: int = 0
    our_window: int = CLIENT_WINDOW  # how much the server may still send us
    failed: int | None = None  # OPEN_FAILURE's reason code
    data: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    eof: bool = False
    closed: bool = False  # the server sent CLOSE
    we_closed: bool = False
    we_eof: bool = False
    exit_status: int | None = None
    exit_signal: str | None = None
    replies: list[bool] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # requests the server sent

    @property
    def open(self) -> bool:
        return self.remote is not None and not self.closed and not self.we_closed


class Client:
    """One client connection over a pair of descriptors (we write ``write_fd``, the server's
    input, and read ``read_fd``, its output).

    ``wait_s`` bounds every wait for the server: past it, :class:`Stalled`.
    """

    def __init__(self, read_fd: int, write_fd: int, rng: random.Random, *,
                 wait_s: float = 10.0) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.rng = rng
        self.wait_s = wait_s
        self._in = bytearray()
        self._eof = False
        self.received = 0  # bytes the server wrote
        self.version = b"SSH-2.0-fuzz_1.0"
        self.server_version = b""
        self._send_seq = 0
        self._recv_seq = 0
        self._send_keys: _Keys | None = None
        self._recv_keys: _Keys | None = None
        self._pending_recv_keys: _Keys | None = None
        self._strict = False
        self.session_id = b""
        self.channels: dict[int, Channel] = {}
        self._next_channel = 0
        self.global_replies: list[bool] = []
        self.unimplemented: list[int] = []
        self.disconnect: Disconnected | None = None
        self.authenticated = False
        self.write_broken = False  # the server closed its input
        # The server switched to keys this client does not have (it answered a key exchange
        # that a case began with damaged packets): its output can only be read, not checked.
        self.opaque = False

    # ---- bytes
    def send_raw(self, data: bytes) -> None:
        """Write ``data`` to the server, reading its output meanwhile so neither side blocks;
        a server that stops reading our input and sends nothing for ``wait_s`` is a hang."""
        view = memoryview(data)
        deadline = time.monotonic() + self.wait_s
        while view:
            if self.write_broken:
                return
            readable, writable, _ = select.select(
                [] if self._eof else [self._read_fd], [self._write_fd], [],
                max(0.0, deadline - time.monotonic()))
            if readable:
                self._read_some()
                deadline = time.monotonic() + self.wait_s
            if writable:
                try:
                    written = os.write(self._write_fd, view[:1 << 16])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    self.write_broken = True
                    return
                view = view[written:]
                deadline = time.monotonic() + self.wait_s
            elif not readable and time.monotonic() >= deadline:
                raise Stalled(f"the server took none of our input for {self.wait_s:.0f} s")

    def _read_some(self) -> bool:
        try:
            chunk = os.read(self._read_fd, 1 << 18)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self._eof = True
            return False
        self._in += chunk
        self.received += len(chunk)
        if len(self._in) > 64 << 20:
            raise NotSsh("the server sent over 64 MiB that this client could not use")
        return True

    def _wait_bytes(self, size: int, deadline: float) -> None:
        while len(self._in) < size:
            if self._eof:
                if self._in:
                    raise NotSsh(f"the server's output ends inside a packet "
                                 f"({len(self._in)} bytes of {size})")
                raise self.disconnect or Closed("the server closed the connection")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stalled(f"no answer from the server within {self.wait_s:.0f} s")
            readable, _, _ = select.select([self._read_fd], [], [], left)
            if readable:
                self._read_some()

    def close_write(self) -> None:
        """Our end of file: the server's input closes."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
            self.write_broken = True

    def drain(self, timeout: float) -> None:
        """Read and check everything the server still writes until it closes its output
        (NotSsh if any of it is not SSH, Stalled if it does not close within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.opaque:
            try:
                self.recv(deadline=deadline)
            except SshEnded:
                return
        while True:
            self._in.clear()
            try:
                self._wait_bytes(1, deadline)
            except SshEnded:
                return

    # ---- packets
    def send(self, payload: bytes, mutation: Mutation | None = None) -> None:
        """Seal and send one packet (mutated as ``mutation`` says)."""
        self.send_raw(self.seal(payload, mutation))

    def seal(self, payload: bytes, mutation: Mutation | None = None) -> bytes:
        keys = self._send_keys
        block = keys.block if keys else 8
        aligned = 1 + len(payload) if keys is not None and keys.etm else 5 + len(payload)
        padding = 4 + (-(aligned + 4)) % block
        padding += block * self.rng.randrange(0, 2)  # any length of padding is allowed
        body_padding = padding if mutation is None or mutation.padding is None else (
            mutation.padding & 0xFF)
        body = bytes([body_padding]) + payload + self.rng.randbytes(padding)
        length = len(body) if mutation is None or mutation.length is None else mutation.length
        header = u32(length)
        wire = keys.seal(self._send_seq, header, body) if keys else header + body
        self._send_seq = (self._send_seq + 1) & 0xFFFFFFFF
        if mutation is not None and mutation.flip is not None:
            bit = mutation.flip % (len(wire) * 8)
            damaged = bytearray(wire)
            damaged[bit // 8] ^= 1 << (bit % 8)
            wire = bytes(damaged)
        if mutation is not None and mutation.cut is not None:
            wire = wire[:mutation.cut % len(wire)]
        return wire

    def recv(self, *, deadline: float | None = None) -> bytes:
        """The next payload the server sends, checked; transport-level messages the client
        must answer are answered on the way by :meth:`dispatch`'s caller."""
        if deadline is None:
            deadline = time.monotonic() + self.wait_s
        if not self.server_version:
            self.read_version(deadline)
        keys = self._recv_keys
        if keys is None:
            self._wait_bytes(4, deadline)
            length = int.from_bytes(self._in[:4], "big")
            self._check_length(length, 8)
            self._wait_bytes(4 + length, deadline)
            body = bytes(self._in[4:4 + length])
            del self._in[:4 + length]
        else:
            state: dict[str, bytes] = {}
            head = keys.header_size()
            self._wait_bytes(head, deadline)
            length = keys.length_of(bytes(self._in[:head]), state)
            self._check_length(length, keys.block)
            total = 4 + length + keys.mac_size
            self._wait_bytes(total, deadline)
            body = keys.open(self._recv_seq, bytes(self._in[:total]), length, state)
            del self._in[:total]
        self._recv_seq = (self._recv_seq + 1) & 0xFFFFFFFF
        padding = body[0]
        if padding < 4 or padding > len(body) - 2:
            raise NotSsh(f"packet {self._recv_seq - 1}: padding length {padding} of "
                         f"{len(body)}")
        payload = body[1:len(body) - padding]
        if payload[0] == NEWKEYS:
            if self._pending_recv_keys is None:
                self.opaque = True
                raise SshEnded("the server took keys this client did not make")
            self._recv_keys, self._pending_recv_keys = self._pending_recv_keys, None
            if self._strict:
                self._recv_seq = 0
        if payload[0] == DISCONNECT:
            fields = Reader(payload, 1)
            code = fields.u32()
            self.disconnect = Disconnected(code, fields.string().decode("utf-8", "replace"))
            raise self.disconnect
        return payload

    def _check_length(self, length: int, block: int) -> None:
        keys = self._recv_keys
        aligned = length if keys is not None and keys.etm else length + 4
        if length < 5 or length > MAX_PACKET_IN or aligned % block:
            raise NotSsh(f"packet {self._recv_seq}: length {length}")

    # ---- handshake
    def exchange_versions(self, line: bytes | None = None) -> None:
        self.send_raw(line if line is not None else self.version + b"\r\n")
        self.read_version()

    def read_version(self, deadline: float | None = None) -> None:
        if deadline is None:
            deadline = time.monotonic() + self.wait_s
        while True:
            end = self._in.find(b"\n")
            while end < 0:
                if len(self._in) > 8192:
                    raise NotSsh("no SSH version line in the server's first 8 KiB")
                self._wait_bytes(len(self._in) + 1, deadline)
                end = self._in.find(b"\n")
            line = bytes(self._in[:end + 1])
            del self._in[:end + 1]
            if line.startswith(b"SSH-"):
                if not line.startswith(b"SSH-2.0-") or not line.endswith(b"\r\n"):
                    raise NotSsh(f"server version line {line!r}")
                self.server_version = line[:-2]
                return

    def kexinit_payload(self, *, cipher: str, mac: str, strict: bool,
                        kex: list[bytes] | None = None) -> bytes:
        names = kex if kex is not None else [KEX, *([STRICT_KEX] if strict else [])]
        return (bytes([KEXINIT]) + self.rng.randbytes(16) + name_list(names)
                + name_list([HOST_KEY]) + name_list([cipher.encode()]) * 2
                + name_list([mac.encode()]) * 2 + name_list([b"none"]) * 2
                + name_list([]) * 2 + boolean(False) + u32(0))

    def key_exchange(self, *, cipher: str, mac: str, strict: bool,
                     kexinit: bytes | None = None) -> None:
        """KEXINIT both ways, curve25519 and NEWKEYS; checks the server's signature."""
        ours = kexinit or self.kexinit_payload(cipher=cipher, mac=mac, strict=strict)
        self.send(ours)
        theirs = self.expect(KEXINIT)
        self._strict = strict and b"kex-strict-s-v00@openssh.com" in Reader(
            theirs, 17).string().split(b",")
        ephemeral = X25519PrivateKey.from_private_bytes(self.rng.randbytes(32))
        q_c = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.send(bytes([KEX_ECDH_INIT]) + string(q_c))
        reply = Reader(self.expect(KEX_ECDH_REPLY), 1)
        k_s, q_s, signature = reply.string(), reply.string(), reply.string()
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(q_s))
        k = mpint(int.from_bytes(shared, "big"))
        h = hashlib.sha256(string(self.version) + string(self.server_version) + string(ours)
                           + string(theirs) + string(k_s) + string(q_c) + string(q_s)
                           + k).digest()
        host = Reader(k_s)
        sig = Reader(signature)
        if host.string() != HOST_KEY or sig.string() != HOST_KEY:
            raise NotSsh("the server's host key or signature is not ed25519")
        try:
            Ed25519PublicKey.from_public_bytes(host.string()).verify(sig.string(), h)
        except InvalidSignature:
            raise NotSsh("the server's exchange-hash signature does not verify") from None
        if not self.session_id:
            self.session_id = h

        def derive(letter: bytes, size: int) -> bytes:
            out = hashlib.sha256(k + h + letter + self.session_id).digest()
            while len(out) < size:
                out += hashlib.sha256(k + h + out).digest()
            return out[:size]

        def keys(iv: bytes, key: bytes, mac_key: bytes) -> _Keys:
            return _Keys(cipher, mac, derive(key, _KEY_SIZES[cipher]), derive(iv, 16),
                         derive(mac_key, _MAC_KEYS[mac]))

        self._pending_recv_keys = keys(b"B", b"D", b"F")
        self.send(bytes([NEWKEYS]))
        self._send_keys = keys(b"A", b"C", b"E")
        if self._strict:
            self._send_seq = 0
        self.expect(NEWKEYS)

    def authenticate(self, key: UserKey, user: str = "root") -> None:
        self.send(bytes([SERVICE_REQUEST]) + string("ssh-userauth"))
        self.expect(SERVICE_ACCEPT)
        signed = (string("ssh-connection") + string("publickey") + boolean(True)
                  + string(HOST_KEY) + string(key.blob))
        head = bytes([USERAUTH_REQUEST]) + string(user)
        signature = key.sign(string(self.session_id) + head + signed)
        self.send(head + signed + string(signature))
        self.expect(USERAUTH_SUCCESS)
        self.authenticated = True

    def expect(self, kind: int) -> bytes:
        """The next message of type ``kind``; what comes before it is handled as usual."""
        deadline = time.monotonic() + self.wait_s
        while True:
            payload = self.recv(deadline=deadline)
            if payload[0] == kind:
                return payload
            if payload[0] in (USERAUTH_FAILURE, KEXINIT):
                raise SshEnded(f"expected message {kind}, got {payload[0]}")
            self.dispatch(payload)

    # ---- connection layer
    def dispatch(self, payload: bytes) -> None:
        """Handle one message of the connection layer (or one to ignore)."""
        kind = payload[0]
        fields = Reader(payload, 1)
        if kind in (IGNORE, DEBUG, EXT_INFO, USERAUTH_BANNER, SERVICE_ACCEPT):
            return
        if kind == UNIMPLEMENTED:
            self.unimplemented.append(fields.u32())
            return
        if kind == GLOBAL_REQUEST:
            fields.string()
            if fields.boolean():
                self.send(bytes([REQUEST_FAILURE]))
            return
        if kind in (REQUEST_SUCCESS, REQUEST_FAILURE):
            self.global_replies.append(kind == REQUEST_SUCCESS)
            return
        if kind == CHANNEL_OPEN:
            fields.string()
            sender = fields.u32()
            self.send(bytes([OPEN_FAILURE]) + u32(sender) + u32(1) + string("no") + string(""))
            return
        if kind < GLOBAL_REQUEST:
            return  # transport and authentication answers (a case may send KEXINIT, userauth)
        if kind > CHANNEL_FAILURE or kind < CHANNEL_OPEN:
            raise NotSsh(f"unexpected message {kind} from the server")
        chan = self.channels.get(fields.u32())
        if chan is None:
            raise NotSsh(f"message {kind} for a channel the client does not have")
        if kind == OPEN_CONFIRMATION:
            chan.remote = fields.u32()
            chan.window = fields.u32()
            chan.max_packet = fields.u32()
        elif kind == OPEN_FAILURE:
            chan.failed = fields.u32()
        elif kind == WINDOW_ADJUST:
            chan.window += fields.u32()
        elif kind in (CHANNEL_DATA, EXTENDED_DATA):
            if kind == EXTENDED_DATA:
                fields.u32()
            data = fields.string()
            chan.our_window -= len(data)
            if chan.our_window < 0:
                raise NotSsh(f"the server overran channel {chan.local}'s window")
            (chan.data if kind == CHANNEL_DATA else chan.stderr).extend(data)
            if chan.our_window < CLIENT_WINDOW // 2 and chan.open:
                self.send(bytes([WINDOW_ADJUST]) + u32(chan.remote or 0)
                          + u32(CLIENT_WINDOW - chan.our_window))
                chan.our_window = CLIENT_WINDOW
        elif kind == CHANNEL_EOF:
            chan.eof = True
        elif kind == CHANNEL_CLOSE:
            chan.closed = True
            if not chan.we_closed and chan.remote is not None:
                chan.we_closed = True
                self.send(bytes([CHANNEL_CLOSE]) + u32(chan.remote))
        elif kind == CHANNEL_REQUEST:
            name = fields.string().decode("ascii", "replace")
            want_reply = fields.boolean()
            chan.requests.append(name)
            if name == "exit-status":
                chan.exit_status = fields.u32()
            elif name == "exit-signal":
                chan.exit_signal = fields.string().decode("ascii", "replace")
            if want_reply and chan.open:
                self.send(bytes([CHANNEL_FAILURE]) + u32(chan.remote or 0))
        else:
            chan.replies.append(kind == CHANNEL_SUCCESS)

    def poll(self) -> None:
        """Handle whatever the server has sent so far, without waiting."""
        while True:
            readable, _, _ = select.select([self._read_fd], [], [], 0)
            if readable and not self._eof:
                self._read_some()
            try:
                payload = self.recv(deadline=time.monotonic())
            except Stalled:
                return
            self.dispatch(payload)

    def pump(self, done: Callable[[], bool], *, wait_s: float | None = None) -> None:
        """Handle messages until ``done()``; Stalled past ``wait_s`` (default: the client's)."""
        deadline = time.monotonic() + (wait_s if wait_s is not None else self.wait_s)
        while not done():
            self.dispatch(self.recv(deadline=deadline))

    def new_channel(self) -> Channel:
        chan = Channel(local=self._next_channel)
        self.channels[chan.local] = chan
        self._next_channel += 1
        return chan

    def open_payload(self, chan: Channel, kind: bytes, extra: bytes = b"", *,
                     window: int = CLIENT_WINDOW, max_packet: int = CLIENT_MAX_PACKET) -> bytes:
        chan.our_window = window
        return (bytes([CHANNEL_OPEN]) + string(kind) + u32(chan.local) + u32(window)
                + u32(max_packet) + extra)

    def open_session(self) -> Channel:
        """A session channel, confirmed (SshEnded if the server refuses it)."""
        chan = self.new_channel()
        self.send(self.open_payload(chan, b"session"))
        self.pump(lambda: chan.remote is not None or chan.failed is not None)
        if chan.failed is not None:
            raise SshEnded(f"session refused: reason {chan.failed}")
        return chan

    def request(self, chan: Channel, name: str | bytes, body: bytes = b"",
                want_reply: bool = True) -> bytes:
        return (bytes([CHANNEL_REQUEST]) + u32(chan.remote or 0) + string(name)
                + boolean(want_reply) + body)

    def data(self, chan: Channel, data: bytes) -> None:
        """Send ``data`` on ``chan`` within its window and packet size."""
        view = memoryview(data)
        while view:
            self.pump(lambda: chan.window > 0 or not chan.open)
            if not chan.open:
                return
            size = min(len(view), chan.window, chan.max_packet or 1, 32768)
            self.send(bytes([CHANNEL_DATA]) + u32(chan.remote or 0) + string(bytes(view[:size])))
            chan.window -= size
            view = view[size:]

    def run(self, command: bytes, stdin: bytes = b"") -> Channel:
        """``exec`` ``command`` on a new session, send ``stdin`` and EOF, and wait until the
        server closes the channel."""
        chan = self.open_session()
        self.send(self.request(chan, "exec", string(command)))
        self.pump(lambda: bool(chan.replies) or chan.closed)
        if stdin:
            self.data(chan, stdin)
        if chan.open:
            self.send(bytes([CHANNEL_EOF]) + u32(chan.remote or 0))
            chan.we_eof = True
        self.pump(lambda: chan.closed)
        return chan
