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

from .umac import CachedKeyUMAC

__all__ = ["install"]

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
    fast = all(hasattr(conn, name) for name in _STATE)
    state: Any = conn

    def send(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == asyncssh.MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        if fast and pkttype in _DATA:
            encryption = state._send_encryption
            if (type(encryption) is ETMEncryption and state._kex_complete
                    and state._auth_complete and state._compressor is None
                    and state._rekey_bytes_sent < state._rekey_bytes
                    and not (state._rekey_seconds and time.monotonic() >= state._rekey_time)
                    and SSHLogger._debug_level < 3 and state._transport is not None):
                _send_data(state, encryption, pkttype, args)
                return
        send_packet(pkttype, *args, handler=handler)

    conn.send_packet = send  # type: ignore[method-assign]


def _send_data(conn: Any, encryption: ETMEncryption, pkttype: int,
               args: tuple[bytes, ...]) -> None:
    """What asyncssh's ``send_packet`` does for this packet, with fewer copies."""
    length = 1 + sum(len(arg) for arg in args)  # the payload: type byte and fields
    blocksize = conn._send_blocksize
    padding = -(conn._send_enchdrlen + length) % blocksize
    if padding < 4:
        padding += blocksize
    plain = b"".join((_BYTES[padding], _BYTES[pkttype], *args, os.urandom(padding)))
    header = _UINT32(len(plain))
    seq = conn._send_seq
    ciphertext = encryption._cipher.encrypt(plain)
    mac = encryption._mac
    if isinstance(mac, CachedKeyUMAC):
        tag = mac.sign_parts(seq, header, ciphertext)
    else:
        tag = mac.sign(seq, header + ciphertext)
    transport = conn._transport
    transport.write(header)
    transport.write(ciphertext)
    transport.write(tag)
    conn._send_seq = (seq + 1) & 0xFFFFFFFF
    conn._rekey_bytes_sent += len(plain)
