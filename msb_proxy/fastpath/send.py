"""The send side of a connection's packets, with channel data on a shorter path.

asyncssh builds every packet it sends in several steps, each a copy of the payload (join the
fields, add the padding, encrypt, prefix the length, append the MAC) and formats a debug log
line for it even when packet logging is off. At 32 KiB per packet (the most an OpenSSH client
accepts) that is where a download spends much of its time outside the cipher. For
``CHANNEL_DATA`` and ``CHANNEL_EXTENDED_DATA`` on an established connection with an
encrypt-then-MAC cipher (what OpenSSH clients choose with us) :class:`Sender` builds the
packet in one join, encrypts it, MACs the length and ciphertext without joining them, and hands
the three pieces to the transport, which writes them together; every other packet, and every
state this does not cover (key exchange under way or due, compression, other cipher modes),
takes asyncssh's own path; asyncssh's packet log does not see the packets sealed here.

:func:`write_channel` is the same for a channel's side: a write that can go out as one packet
at once skips asyncssh's per-write log call, buffer copy and flush loop and lands here.

It also drops the empty ``SSH_MSG_IGNORE`` asyncssh puts before every packet: that is the old
countermeasure to an attack on CBC ciphers, which we never offer; OpenSSH's sshd does not send
it, and it doubles the packets on every transfer.

This relies on asyncssh internals (the connection's send state, the cipher and MAC of its
encryption), which :mod:`msb_proxy.fastpath.gate` checks before any is touched; a packet our
code fails to build goes out through asyncssh's own ``send_packet`` and takes the fast path off
the connection.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from msb_proxy.fastpath import gate
from msb_proxy.fastpath.umac import JOIN_BELOW, CachedKeyUMAC

if TYPE_CHECKING:
    from asyncssh.encryption import ETMEncryption

__all__ = ["Sender", "seal"]

_EMPTY_STRING = b"\0\0\0\0"
_DATA = frozenset((asyncssh.MSG_CHANNEL_DATA, asyncssh.MSG_CHANNEL_EXTENDED_DATA))
_UINT32 = struct.Struct(">I").pack
_BYTES = [bytes((value,)) for value in range(256)]


class Sender:
    """The send side of one connection: its ``send_packet``, and channel writes."""

    def __init__(self, conn: asyncssh.SSHServerConnection,
                 failed: Callable[[str], None]) -> None:
        self._conn = conn
        self._send_packet = conn.send_packet  # asyncssh's own
        self._failed = failed
        self._broken = False
        self._encryption_ok = gate.Accepts(gate.encryption_refusal)
        self._channel_ok = gate.Accepts(gate.channel_refusal)
        self.sealed = 0  # data packets sent on the short path (for the tests)

    def install(self) -> None:
        """Answer the connection's ``send_packet`` (an instance attribute)."""
        self._conn.send_packet = self.send  # type: ignore[method-assign]

    def uninstall(self) -> None:
        self._broken = True
        if self._conn.__dict__.get("send_packet") == self.send:
            del self._conn.send_packet

    def ready(self) -> bool:
        """Whether a data packet may be sealed here now (see :func:`fast_state`)."""
        conn = self._conn
        return (not self._broken and fast_state(conn)
                and self._encryption_ok(conn._send_encryption))

    def send(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        """The connection's ``send_packet``."""
        if pkttype == asyncssh.MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        if pkttype in _DATA and self.send_data(pkttype, args):
            return
        self._send_packet(pkttype, *args, handler=handler)

    def send_data(self, pkttype: int, args: tuple[bytes, ...]) -> bool:
        """Send a data packet on the short path, if the connection's state allows."""
        if not self.ready():
            return False
        try:
            parts = seal(self._conn, pkttype, args)
        except Exception as exc:  # nothing was sent: asyncssh sends it
            self._failed(f"{type(exc).__name__}: {exc}")
            return False
        transport = self._conn._transport
        assert transport is not None  # ready() checked it
        transport.writelines(parts)
        self.sealed += 1
        return True

    def write_channel(self, chan: asyncssh.SSHServerChannel[bytes], data: bytes,
                      datatype: int | None) -> None:
        """``chan.write(data, datatype)``, with asyncssh's channel bookkeeping done inline
        when the data goes out as one packet at once (nothing queued before it, window and
        packet size allow): its log line, buffer copy and flush loop cost more than the packet
        on small writes. Everything else goes through ``chan.write``."""
        size = len(data)
        try:
            short = (size and not self._broken and self._channel_ok(chan)
                     and chan._send_state == "open" and not chan._send_buf
                     and size <= chan._send_window and size <= chan._send_pktsize
                     and chan._encoding is None and not chan._send_paused
                     and chan._send_chan is not None
                     and (datatype is None or datatype in chan._write_datatypes))
        except Exception as exc:  # nothing was changed yet: asyncssh writes it
            self._failed(f"{type(exc).__name__}: {exc}")
            short = False
        if short:
            header = _UINT32(chan._send_chan)
            if datatype is None:
                args: tuple[bytes, ...] = (header, _UINT32(size), data)
                pkttype = asyncssh.MSG_CHANNEL_DATA
            else:
                args = (header, _UINT32(datatype), _UINT32(size), data)
                pkttype = asyncssh.MSG_CHANNEL_EXTENDED_DATA
            chan._send_window -= size
            if not self.send_data(pkttype, args):
                self._send_packet(pkttype, b"".join(args), handler=chan)
            return
        chan.write(data, datatype)


def fast_state(conn: asyncssh.SSHServerConnection) -> bool:
    """Whether a data packet may be sealed by :func:`seal` now: an established connection
    with an encrypt-then-MAC cipher, no key exchange due, no compression."""
    return (type(conn._send_encryption) is gate.ETM_ENCRYPTION and conn._kex_complete
            and conn._auth_complete and conn._compressor is None
            and conn._rekey_bytes_sent < conn._rekey_bytes
            and not (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
            and conn._transport is not None)


def seal(conn: asyncssh.SSHServerConnection, pkttype: int,
         args: tuple[bytes, ...]) -> tuple[bytes, bytes, bytes]:
    """The packet asyncssh's ``send_packet`` would send, as (length, ciphertext, MAC), with
    fewer copies; the connection's send state moves past it. :func:`fast_state` must hold.

    Everything that can fail comes before the cipher is used, so a failure leaves the state as
    it was and the packet can still go out through asyncssh."""
    # fast_state() checked its type; the cast lets mypy check the names we use of it.
    encryption = cast("ETMEncryption", conn._send_encryption)
    mac = encryption._mac
    cipher = encryption._cipher
    seq = conn._send_seq
    length = 1 + sum(map(len, args))  # the payload: type byte and fields
    blocksize = conn._send_blocksize
    padding = -(conn._send_enchdrlen + length) % blocksize
    if padding < 4:
        padding += blocksize
    plain = b"".join((_BYTES[padding], _BYTES[pkttype], *args, _random(padding)))
    header = _UINT32(len(plain))
    encryptor = getattr(cipher, "_encryptor", None)  # made by its first encrypt()
    ciphertext = encryptor.update(plain) if encryptor else cipher.encrypt(plain)
    if len(ciphertext) > JOIN_BELOW and isinstance(mac, CachedKeyUMAC):
        tag = mac.sign_parts(seq, header, ciphertext)
    else:
        tag = mac.sign(seq, header + ciphertext)
    conn._send_seq = (seq + 1) & 0xFFFFFFFF
    conn._rekey_bytes_sent += len(plain)
    return header, ciphertext, tag


class _RandomPool:
    """Random bytes for packet padding, read from the kernel a page at a time instead of one
    system call per packet; no byte is handed out twice."""

    def __init__(self) -> None:
        self._pool = b""
        self._used = 0

    def __call__(self, size: int) -> bytes:
        used = self._used
        if used + size > len(self._pool):
            self._pool, used = os.urandom(_POOL_SIZE), 0
        self._used = used + size
        return self._pool[used:used + size]


_POOL_SIZE = 4096
_random = _RandomPool()
