"""The send side of a connection's packets, with channel data on a shorter path.

asyncssh builds every packet it sends in several steps, each a copy of the payload (join the
fields, add the padding, encrypt, prefix the length, append the MAC) and formats a debug log
line for it even when packet logging is off. At 32 KiB per packet (the most an OpenSSH client
accepts) that is where a download spends much of its time outside the cipher. For
``CHANNEL_DATA`` and ``CHANNEL_EXTENDED_DATA`` on an established connection with an
encrypt-then-MAC cipher (what OpenSSH clients choose with us) :func:`install` builds the
packet in one join, encrypts it, MACs the length and ciphertext without joining them, and hands
the three pieces to the transport, which writes them together; every other packet, and every
state this does not cover (key exchange under way or due, compression, other cipher modes,
packet logging on), takes asyncssh's own path.

:func:`write_channel` is the same for a channel's side: a write that can go out as one packet
at once skips asyncssh's per-write log call, buffer copy and flush loop and lands here.

It also drops the empty ``SSH_MSG_IGNORE`` asyncssh puts before every packet: that is the old
countermeasure to an attack on CBC ciphers, which we never offer; OpenSSH's sshd does not send
it, and it doubles the packets on every transfer.

This relies on asyncssh internals (the connection's send state, the cipher and MAC of its
encryption); :func:`install` checks they are there and otherwise leaves the fast path off.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any

import asyncssh
from asyncssh.encryption import ETMEncryption
from asyncssh.logging import SSHLogger

from msb_proxy.fastpath.umac import JOIN_BELOW, CachedKeyUMAC

__all__ = ["fast_state", "install", "seal", "supported", "write_channel"]

_EMPTY_STRING = b"\0\0\0\0"
_DATA = frozenset((asyncssh.MSG_CHANNEL_DATA, asyncssh.MSG_CHANNEL_EXTENDED_DATA))
_STATE = ("_send_encryption", "_send_seq", "_send_blocksize", "_send_enchdrlen",
          "_rekey_bytes_sent", "_rekey_bytes", "_rekey_seconds", "_rekey_time",
          "_kex_complete", "_auth_complete", "_compressor", "_transport")
_UINT32 = struct.Struct(">I").pack
_BYTES = [bytes((value,)) for value in range(256)]


def install(conn: asyncssh.SSHServerConnection) -> None:
    """Answer ``conn.send_packet`` with our path first (an instance attribute)."""
    send_packet = conn.send_packet
    fast = supported(conn)
    state: Any = conn

    def send_data(pkttype: int, args: tuple[bytes, ...]) -> bool:
        """Send a data packet on the short path, if the connection's state allows."""
        if fast and fast_state(state):
            state._transport.writelines(seal(state, pkttype, args))
            return True
        return False

    def send(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == asyncssh.MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        if pkttype in _DATA and send_data(pkttype, args):
            return
        send_packet(pkttype, *args, handler=handler)

    conn.send_packet = send  # type: ignore[method-assign]
    state._msb_send_data = send_data


def supported(conn: Any) -> bool:
    """Whether ``conn`` has the asyncssh send state this module works with."""
    return all(hasattr(conn, name) for name in _STATE)


def fast_state(conn: Any) -> bool:
    """Whether a data packet may be sealed by :func:`seal` now: an established connection
    with an encrypt-then-MAC cipher, no key exchange due, no compression, no packet logging."""
    return (type(conn._send_encryption) is ETMEncryption and conn._kex_complete
            and conn._auth_complete and conn._compressor is None
            and conn._rekey_bytes_sent < conn._rekey_bytes
            and not (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
            and SSHLogger._debug_level < 3 and conn._transport is not None)


def write_channel(chan: Any, data: bytes, datatype: int | None = None) -> None:
    """``chan.write(data, datatype)``, with asyncssh's channel bookkeeping done inline when
    the data goes out as one packet at once (nothing queued before it, window and packet size
    allow): its log line, buffer copy and flush loop cost more than the packet on small
    writes. Everything else goes through ``chan.write``."""
    size = len(data)
    send_data = getattr(chan._conn, "_msb_send_data", None)
    if (send_data is not None and size and chan._send_state == "open" and not chan._send_buf
            and size <= chan._send_window and size <= chan._send_pktsize
            and chan._encoding is None and not chan._send_paused
            and chan._send_chan is not None and SSHLogger._debug_level < 2
            and (datatype is None or datatype in chan._write_datatypes)):
        header = _UINT32(chan._send_chan)
        if datatype is None:
            args: tuple[bytes, ...] = (header, _UINT32(size), data)
            pkttype = asyncssh.MSG_CHANNEL_DATA
        else:
            args = (header, _UINT32(datatype), _UINT32(size), data)
            pkttype = asyncssh.MSG_CHANNEL_EXTENDED_DATA
        chan._send_window -= size
        if not send_data(pkttype, args):
            chan._conn.send_packet(pkttype, b"".join(args), handler=chan)
        return
    chan.write(data, datatype)


def seal(conn: Any, pkttype: int, args: tuple[bytes, ...]) -> tuple[bytes, bytes, bytes]:
    """The packet asyncssh's ``send_packet`` would send, as (length, ciphertext, MAC), with
    fewer copies; the connection's send state moves past it. :func:`fast_state` must hold."""
    encryption = conn._send_encryption
    length = 1 + sum(map(len, args))  # the payload: type byte and fields
    blocksize = conn._send_blocksize
    padding = -(conn._send_enchdrlen + length) % blocksize
    if padding < 4:
        padding += blocksize
    plain = b"".join((_BYTES[padding], _BYTES[pkttype], *args, _random(padding)))
    header = _UINT32(len(plain))
    seq = conn._send_seq
    cipher = encryption._cipher
    encryptor = getattr(cipher, "_encryptor", None)  # made by its first encrypt()
    ciphertext = encryptor.update(plain) if encryptor else cipher.encrypt(plain)
    mac = encryption._mac
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
