"""The receive side of a connection's packets, with channel data on a shorter path.

Every packet asyncssh receives goes through its general machinery: the input re-sliced as one
bytes object, the header and body handled by two handlers, an ``SSHPacket`` parser, the checks
that decide which layer owns the packet type, a log call, the handler table, a debug line and
the channel's own checks. For a request/answer workload (``scp -r`` of small files makes three
round trips per file, ``git`` and interactive use are alike) that is most of what a packet costs
us. :func:`install` puts :class:`Receiver` in front of asyncssh: on an established connection
with an encrypt-then-MAC cipher (what OpenSSH clients choose with us) it takes each complete
packet itself, checks its MAC, decrypts it and, when it is ``CHANNEL_DATA`` that asyncssh would
accept on an open channel, hands the data to the channel's own ``_accept_data``, which does the
window accounting and delivers it exactly as asyncssh does.

Every other packet is passed to asyncssh. One it had to decrypt to see its type goes to asyncssh
as received, with a one-shot stand-in for the cipher that returns the plaintext (CTR ciphers
cannot decrypt twice): asyncssh then parses, checks and dispatches it exactly as ever. Whenever
the connection is not in a state this covers (before authentication, key exchange under way,
compression, another cipher mode, asyncssh in the middle of a packet or waiting on an
asynchronous handler) all input goes straight to asyncssh. asyncssh's packet-level debug log
(level 2 and up) does not see the packets taken here.

This relies on asyncssh internals (its receive state and the cipher and MAC of its
encryption), which :mod:`msb_proxy.fastpath.gate` checks before any is touched. If anything of
ours still fails on a packet, the receiver hands that packet and everything after it to
asyncssh, in order (a packet it had already decrypted as the plaintext, as above), and tells
its owner, which takes the fast path off the connection: never a lost byte, never an
``internal_error`` for a fault of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from msb_proxy.fastpath import gate
from msb_proxy.transport.batching import feed_slices

if TYPE_CHECKING:
    from asyncssh.encryption import Encryption, ETMEncryption

__all__ = ["Receiver"]

_MIN_PADDING = 4  # RFC 4253 6: at least four bytes of padding
_CHANNEL_DATA = asyncssh.MSG_CHANNEL_DATA
_DATA_HEADER = 10  # padding length, type, recipient channel, data length


class _Decrypted:
    """Stands in for a connection's encryption for one packet already decrypted."""

    def __init__(self, conn: Any, encryption: Any, plain: bytes) -> None:
        self._conn = conn
        self._encryption = encryption
        self._plain = plain

    def decrypt_header(self, seq: int, first_block: bytes,
                       header_len: int) -> tuple[bytes, bytes]:
        return first_block, first_block[:header_len]  # EtM: the length is not encrypted

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int,
                       mac: bytes) -> bytes:
        self._conn._recv_encryption = self._encryption  # before asyncssh acts on the packet
        return self._plain


class Receiver:
    """Feeds one connection's input to asyncssh, taking its channel data on a shorter path.

    Invariant: what it holds back (``_held``) is the start of a packet that asyncssh has not
    seen, and asyncssh has nothing buffered; so any input can go to asyncssh at any time,
    ``_held`` first. :meth:`feed` is installed as the connection's ``data_received``;
    ``failed(reason)`` is called once if our code fails, after which it only passes input on.
    """

    takes_any_size = True  # the stdio transport hands it whole reads, not asyncssh-sized slices

    def __init__(self, conn: asyncssh.SSHServerConnection,
                 failed: Callable[[str], None]) -> None:
        self._conn = conn
        self._receive = conn.data_received  # asyncssh's own
        self._failed = failed
        self._broken = False
        self._held = b""
        self._channel_ok = gate.Accepts(gate.channel_refusal)
        self._encryption_ok = gate.Accepts(gate.encryption_refusal)
        # Where the input stands while a feed runs, for handing the rest back on a fault: the
        # buffer being taken, how much of it asyncssh has or we have handled, what follows it,
        # and the packet decrypted but not yet handled (start, end, encryption, plaintext).
        self._buf = b""
        self._done = 0
        self._tail = b""
        self._decrypted: tuple[int, int, Any, bytes] | None = None
        self._in_asyncssh = False
        self.fast_packets = 0  # how many packets took the short path (for the tests)
        # Set by the relay around a feed: (channel, sink, flush). That channel's data goes
        # to sink() instead of its _accept_data, and flush() runs before any packet goes to
        # asyncssh, so nothing asyncssh does with the channel overtakes data sunk before it.
        self.direct: tuple[Any, Callable[[bytes], object], Callable[[], object]] | None = None

    def install(self) -> None:
        """Answer the connection's ``data_received`` (an instance attribute)."""
        self._conn.data_received = self.feed  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        """Give ``data_received`` back to asyncssh; held input goes to it now."""
        if self._conn.__dict__.get("data_received") == self.feed:
            del self._conn.data_received
        self._broken = True
        if self._held:
            held, self._held = self._held, b""
            self._receive(held)

    def feed(self, data: bytes) -> None:
        """The connection's ``data_received``."""
        if self._broken:
            self._receive(data)
            return
        try:
            self._feed(data)
        except asyncssh.DisconnectError as exc:  # asyncssh's own, as its _recv_data does
            self._end(exc)
        except Exception as exc:
            if self._in_asyncssh:  # raised by asyncssh's handling of a packet, not by us
                self._end(None)
            else:
                self._recover(exc)
        finally:
            self._buf = self._tail = b""
            self._decrypted = None
            self._in_asyncssh = False

    def _end(self, exc: asyncssh.DisconnectError | None) -> None:
        """End the connection as asyncssh's receive loop does when handling a packet fails."""
        conn = self._conn
        self._held = b""
        if exc is None:
            conn.internal_error()
        else:
            conn._send_disconnect(exc.code, exc.reason, exc.lang)
            conn._force_close(exc)

    def _recover(self, exc: Exception) -> None:
        """Our code failed mid-feed: everything not yet handled goes to asyncssh, in order."""
        decrypted, self._decrypted = self._decrypted, None
        rest_from = self._done
        self._broken = True
        if self.direct is not None:
            self.direct[2]()
        if decrypted is not None:  # its cipher has moved on: asyncssh gets the plaintext
            start, end, encryption, plain = decrypted
            try:
                self._replay(self._buf[start:end], encryption, plain)
            except Exception:  # the stand-in itself failed: the stream cannot be resumed
                self._failed(f"{type(exc).__name__}: {exc}")
                self._conn.internal_error()
                return
            rest_from = end
        rest = self._buf[rest_from:] + self._tail
        self._failed(f"{type(exc).__name__}: {exc}")
        if rest:
            feed_slices(self._receive, rest)

    def _feed(self, data: bytes) -> None:
        conn = self._conn
        if not self._ready(conn):
            if self._held:
                data, self._held = self._held + data, b""
            self._pass(data, 0)
            return
        if conn._keepalive_interval:
            conn._reset_keepalive_timer()
        pos = 0
        if self._held:
            held, pos = self._top_up(data)
            if held is None:
                return
            self._held = b""
            self._tail = data[pos:]
            if self._run(held, 0) is None:
                self._tail = b""
                self._pass(data, pos)
                return
            self._tail = b""
        end = self._run(data, pos)
        if end is not None and end < len(data):
            self._held = data[end:]
            self._done = len(data)

    def _top_up(self, data: bytes) -> tuple[bytes | None, int]:
        """Complete the held packet from ``data``: (the packet, bytes of ``data`` used), or
        (None, _) when ``data`` is not enough (then it is held too)."""
        held, pos = self._held, 0
        while True:
            need = self._length(held) - len(held)
            take = data[pos:pos + need]
            held += take
            pos += len(take)
            if len(take) < need:
                self._held = held
                return None, pos
            if len(held) >= 4 and (len(held) == self._length(held)
                                   or not self._valid(int.from_bytes(held[:4], "big"))):
                return held, pos  # a bad length goes to asyncssh now, not after its bytes

    def _length(self, held: bytes) -> int:
        """How long the packet ``held`` starts is (4, until its length field is in)."""
        if len(held) < 4:
            return 4
        macsize: int = self._conn._recv_macsize
        return 4 + int.from_bytes(held[:4], "big") + macsize

    def _valid(self, length: int) -> bool:
        """Whether asyncssh accepts ``length`` as a packet's (else it ends the connection)."""
        conn = self._conn
        return bool(conn._recv_blocksize <= length <= conn._max_recv_pktlen)

    def ready(self) -> bool:
        """Whether the next packet may take the short path (see :meth:`_ready`)."""
        return not self._broken and self._ready(self._conn)

    def _ready(self, conn: asyncssh.SSHServerConnection) -> bool:
        """Whether the next packet may take the short path: asyncssh between packets, and the
        connection established with an EtM cipher, nothing more to it."""
        encryption = conn._recv_encryption
        handler = conn._recv_handler
        return (type(encryption) is gate.ETM_ENCRYPTION and not conn._inpbuf
                and getattr(handler, "__func__", None) is gate.RECV_PKTHDR
                and conn._auth_complete and conn._kex_complete
                and conn._decompressor is None and conn._transport is not None
                and self._encryption_ok(encryption))

    def _run(self, buf: bytes, pos: int) -> int | None:
        """Take the packets of ``buf`` from ``pos``: where an incomplete one starts, or None
        once the rest has gone to asyncssh. The caller has checked :meth:`_ready`."""
        conn = self._conn
        size = len(buf)
        channels = conn._channels
        direct = self.direct
        direct_chan: Any = direct[0] if direct is not None else None
        self._buf, self._done = buf, pos
        while pos < size:
            if size - pos < 4:
                return pos
            length = int.from_bytes(buf[pos:pos + 4], "big")
            if not self._valid(length):
                self._pass(buf, pos)  # asyncssh says what is wrong with it
                return None
            body_end = pos + 4 + length
            end = body_end + conn._recv_macsize
            if end > size:
                return pos
            # _ready() checked its type; the cast lets mypy check the names we use of it.
            encryption = cast("ETMEncryption", conn._recv_encryption)
            seq = conn._recv_seq
            if not encryption._mac.verify(seq, buf[pos:body_end], buf[body_end:end]):
                self._pass(buf, pos)  # asyncssh checks it again and closes the connection
                return None
            cipher = encryption._cipher
            decryptor = getattr(cipher, "_decryptor", None)  # made by its first decrypt()
            ciphertext = buf[pos + 4:body_end]
            plain = decryptor.update(ciphertext) if decryptor else cipher.decrypt(ciphertext)
            start, pos = pos, end
            self._decrypted = (start, end, encryption, plain)
            # CHANNEL_DATA that asyncssh would accept as is goes to its channel here: its
            # padding as the RFC has it, the data filling the payload, a channel open for
            # data with the window for it, handled by asyncssh's own data handler.
            padding = plain[0]
            data_end = len(plain) - padding
            if (plain[1] == _CHANNEL_DATA and padding >= _MIN_PADDING
                    and data_end > _DATA_HEADER
                    and int.from_bytes(plain[6:10], "big") == data_end - _DATA_HEADER):
                chan = channels.get(int.from_bytes(plain[2:6], "big"))
                if (chan is not None and self._channel_ok(chan)
                        and chan._recv_state == "open"
                        and data_end - _DATA_HEADER <= chan._recv_window
                        and chan._packet_handlers.get(_CHANNEL_DATA) is gate.PROCESS_DATA):
                    sink = (chan is direct_chan and chan._send_state == "open"
                            and not chan._recv_paused)
                    payload = plain[_DATA_HEADER:data_end]
                    # From here the packet is handled: asyncssh's state moves past it.
                    self._decrypted = None
                    self._done = end
                    conn._recv_seq = (seq + 1) & 0xFFFFFFFF
                    conn._auth_final = True  # as asyncssh marks any packet past authentication
                    self.fast_packets += 1
                    if sink:
                        chan._recv_window -= len(payload)  # as _accept_data does
                        direct[1](payload)  # type: ignore[index]
                    else:
                        self._in_asyncssh = True
                        chan._accept_data(payload)
                        self._in_asyncssh = False
                    continue
            if direct is not None:
                direct[2]()
            self._decrypted = None
            self._done = end
            self._replay(buf[start:end], encryption, plain)
            if not self._ready(conn):
                self._pass(buf, pos)
                return None
        return pos

    def replay(self, packet: bytes, encryption: Any, plain: bytes) -> None:
        """asyncssh's own handling of ``packet``, whose plaintext is ``plain`` (the relay's C
        loop decrypted it)."""
        self._replay(packet, encryption, plain)

    def _replay(self, packet: bytes, encryption: Any, plain: bytes) -> None:
        conn = self._conn
        stand_in = cast("Encryption", _Decrypted(conn, encryption, plain))  # duck-typed
        conn._recv_encryption = stand_in
        try:
            self._receive(packet)
        finally:
            if conn._recv_encryption is stand_in:
                conn._recv_encryption = encryption

    def _pass(self, data: bytes, pos: int) -> None:
        if self.direct is not None:
            self.direct[2]()
        self._done = len(data)  # asyncssh has it all from here
        self._tail = b""
        feed_slices(self._receive, data, pos)
