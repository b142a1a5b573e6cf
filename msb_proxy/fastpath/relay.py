"""Channel data between the client and one guest process without a turn of the event loop.

A file-by-file transfer (``scp -r``, ``sftp`` of many small files, ``git``) is a chain of
request and answer: ``scp`` -> ``ssh`` -> msb-proxy -> ``sftp-server`` and back, one process at
a time, so every microsecond we spend on a message is added to the transfer. On the usual path a
message costs an asyncio loop turn (the selector's poll and its bookkeeping, a handle run in a
context), the transport's read, then the layers of asyncssh's channel and our session before the
guest's pipe is written; in a process that every other one in the chain has just evicted from
the CPU's caches each layer costs several times what it costs in a warm loop, and the message
as a whole cost ~70 us of CPU where sshd spends a few.

:class:`Relay` takes over while it can. After a read callback of the client's pipe or of the
guest's stdout it keeps polling asyncio's own epoll descriptor itself, and as long as the one
descriptor ready is one of those two it handles the read in place:

* from the client, the packets of a complete read that are ``CHANNEL_DATA`` for the relayed
  channel (MAC checked and decrypted by :class:`recvpath.Receiver`, window accounted as asyncssh
  does) go to the guest's stdin in one write; any other packet goes to asyncssh as ever;
* from the guest, a read that fits the channel's window and packet size goes out as one packet
  sealed by :func:`sendpath.seal`; anything else through the session as ever.

It gives the loop back whenever anything else wants it: another descriptor ready, a timer due,
a callback scheduled (every write that did not go straight out schedules one), a hang-up or an
error on either pipe. Since asyncio's epoll is level-triggered, whatever it left unread is
reported again at the loop's next poll. Nothing is reordered: data goes straight to a pipe only
when nothing is queued before it there.

The same loop runs in C where ``msb_proxy.fastpath._relay`` was built (``setup.py``; it needs a C
compiler and Python's headers, and is skipped without them): in Python a message still costs
~50 us of CPU, as each of the ~15 calls it takes runs with cold caches; in C it is a few. It
covers UMAC with a CTR cipher (what OpenSSH clients choose with us) and hands back what it does
not take, with the state it moved on (sequence numbers, windows, bytes sent, the UMAC nonce);
the cipher stays asyncssh's CTR context, called through its ``update``, and the MAC the keyed
nettle context of :class:`umac.CachedKeyUMAC`, so nothing needs re-synchronising. Measured on a
2-core VM, 10,000 small files by ``scp -r`` between tmpfs directories: proxy CPU per message
~70 us (usual path), ~50 us (this loop in Python), a few us in C; wall time 0.83x sshd's down,
0.95x up.

Only the stdio transport (real pipes) and a local backend's non-terminal process offer their
descriptors; everything else, and every state this does not cover, stays on the usual path.
"""

from __future__ import annotations

import asyncio
import os
import select
import struct
from types import ModuleType
from typing import Any

import asyncssh
from asyncssh.logging import SSHLogger

from msb_proxy.fastpath import receive as recvpath
from msb_proxy.fastpath import send as sendpath
from msb_proxy.fastpath.receive import Receiver
from msb_proxy.fastpath.umac import CachedKeyUMAC
from msb_proxy.transport.batching import BatchedWriter, batch


def _compiled() -> ModuleType | None:
    if os.environ.get("MSB_PROXY_RELAY") == "python":  # the reference loop, to compare
        return None
    try:
        from msb_proxy.fastpath import _relay
    except ImportError:  # built without a C compiler: the same loop in Python
        return None
    return _relay


_native = _compiled()

__all__ = ["Relay", "install"]

READ_SIZE = 1 << 20
_UINT32 = struct.Struct(">I").pack
_EPOLLIN = select.EPOLLIN
_CHANNEL_DATA = asyncssh.MSG_CHANNEL_DATA
_WINDOW_ADJUST = asyncssh.MSG_CHANNEL_WINDOW_ADJUST
# _relay.run's reasons to stop: those that need a transport's own read, and those after
# which the relay may go on (it stopped to hand something back, not for the loop).
_CLIENT_READ, _GUEST_READ = 1, 2
_GO_ON = frozenset((3, 4))


def _writable(transport: Any) -> bool:
    """Whether the C loop may write to ``transport``'s pipe itself: nothing queued there."""
    return (hasattr(transport, "_fileno") and not transport.is_closing()
            and not transport.get_write_buffer_size())


def install(conn: Any, reader: Any, writer: BatchedWriter) -> Relay | None:
    """A relay for ``conn`` served on the pipe transports ``reader`` (the client's input) and
    ``writer`` (its output), when asyncio, asyncssh and the receiver are as it expects."""
    loop: Any = asyncio.get_running_loop()
    receiver = getattr(conn.data_received, "__self__", None)
    epoll = getattr(getattr(loop, "_selector", None), "_selector", None)
    if (not isinstance(receiver, Receiver) or not sendpath.supported(conn)
            or type(epoll) is not select.epoll
            or not all(hasattr(loop, name) for name in ("_ready", "_scheduled", "_stopping"))
            or not all(hasattr(reader, name) for name in ("_fileno", "_read_ready"))):
        return None
    relay = Relay(loop, conn, receiver, reader, writer)
    conn._msb_relay = relay
    return relay


class Relay:
    """The short path for one connection; one guest process at a time is relayed."""

    def __init__(self, loop: Any, conn: Any, receiver: Receiver, reader: Any,
                 writer: BatchedWriter) -> None:
        self._loop = loop
        self._conn = conn
        self._receiver = receiver
        self._client = reader
        self._out = writer
        self._running = False
        self._session: Any = None
        self._chan: Any = None
        self._guest: Any = None  # the process's stdout transport
        self._stdin: BatchedWriter | None = None
        self._payloads: list[bytes] = []
        self._backlog = b""  # client bytes the C loop handed back, from a packet's start
        self.inline_reads = 0  # reads handled here (for the tests)

    def attach(self, session: Any, chan: Any, stdout: Any, stdin: BatchedWriter) -> bool:
        """Relay ``chan``, carried by a process with these pipes; False if another is."""
        if self._session is not None or not all(
                hasattr(stdout, name) for name in ("_fileno", "_closing", "_read_ready")):
            return False
        if chan._encoding is not None or chan._packet_handlers.get(_CHANNEL_DATA) is None:
            return False
        self._session, self._chan, self._guest, self._stdin = session, chan, stdout, stdin
        return True

    def detach(self, session: Any) -> None:
        if self._session is session:
            self._session = self._chan = self._guest = self._stdin = None

    def run(self) -> None:
        """Serve the two pipes here until anything else needs the loop (see the module)."""
        guest = self._guest
        if self._running or guest is None or SSHLogger._debug_level >= 2:
            return
        self._running = True
        try:
            while self._guest is guest:  # detached when a packet handed back closed it
                if _native is not None:
                    arguments = self._native_arguments()
                    if arguments is not None:
                        if not self._run_native(arguments):
                            return
                        continue
                self._feed_backlog()
                if not self._step(guest):
                    return
        finally:
            self._running = False
            self._feed_backlog()

    def _feed_backlog(self) -> None:
        if self._backlog:
            backlog, self._backlog = self._backlog, b""
            batch(self._receiver.feed, backlog)

    def _step(self, guest: Any) -> bool:
        """Wait for and handle one read of either pipe; False to give the loop back."""
        loop = self._loop
        client = self._client
        if (loop._ready or loop._stopping or self._guest is not guest or guest._closing
                or client._closing):
            return False
        scheduled = loop._scheduled
        if scheduled:
            timeout = scheduled[0]._when - loop.time()
            if timeout <= 0:
                return False
        else:
            timeout = -1
        events = loop._selector._selector.poll(timeout, 2)
        if len(events) != 1:
            return False
        fd, mask = events[0]
        if mask != _EPOLLIN:
            return False
        if fd == guest._fileno:
            return self._from_guest(fd)
        if fd == client._fileno:
            return self._from_client(fd)
        return False

    # ---- the same loop in C
    def _native_arguments(self) -> tuple[Any, ...] | None:
        """What _relay.run takes, when the state is one it covers: UMAC and a CTR cipher
        both ways, nothing queued towards the client, the channel open that way. Channel data
        from the client is taken only while the channel is open that way too, not paused, and
        nothing is queued for the guest's stdin; otherwise the C loop hands it back."""
        conn, chan, receiver, loop = self._conn, self._chan, self._receiver, self._loop
        session, stdin, out = self._session, self._stdin, self._out
        if (loop._ready or loop._stopping or self._guest._closing or self._client._closing
                or not receiver._ready(conn) or not sendpath.fast_state(conn)):
            return None
        inbound, outbound = conn._recv_encryption, conn._send_encryption
        decryptor = getattr(inbound._cipher, "_decryptor", None)
        encryptor = getattr(outbound._cipher, "_encryptor", None)
        if (type(inbound._mac) is not CachedKeyUMAC or type(outbound._mac) is not CachedKeyUMAC
                or decryptor is None or encryptor is None):
            return None
        to_client: Any = out.transport
        if (out._pending or not _writable(to_client) or chan._send_state != "open"
                or chan._send_buf or chan._send_paused or chan._send_chan is None
                or session._closed
                or chan._packet_handlers.get(_CHANNEL_DATA) is not recvpath.PROCESS_DATA):
            return None
        to_guest: Any = stdin.transport if stdin is not None else None
        take_data = (chan._recv_state == "open" and not chan._recv_paused
                     and not chan._recv_buf and self._stdin_open()
                     and not to_guest.get_write_buffer_size() and hasattr(to_guest, "_fileno"))
        scheduled = loop._scheduled
        held = receiver._held or self._backlog  # never both: see _run_native
        receiver._held = self._backlog = b""
        return (
            (loop._selector._selector.fileno(), self._client._fileno, to_client._fileno,
             to_guest._fileno if take_data else -1, self._guest._fileno),
            (decryptor.update, *inbound._mac.native, inbound._mac.next_seq, conn._recv_seq),
            (encryptor.update, *outbound._mac.native, outbound._mac.next_seq,
             conn._send_seq),
            (conn._recv_blocksize, conn._max_recv_pktlen, conn._send_blocksize,
             conn._send_enchdrlen, chan._recv_chan, chan._send_chan, take_data,
             chan._recv_window, chan._init_recv_window, chan._send_window, chan._send_pktsize,
             conn._rekey_bytes - conn._rekey_bytes_sent,
             float(conn._rekey_time) if conn._rekey_seconds else 0.0,
             float(scheduled[0]._when) if scheduled else 0.0),
            held,
        )

    def _run_native(self, arguments: tuple[Any, ...]) -> bool:
        """One run of the C loop, then what it hands back, the usual way and in order;
        whether the relay may go on (the C loop stopped only to hand something back)."""
        conn, chan, receiver = self._conn, self._chan, self._receiver
        session, stdin, guest = self._session, self._stdin, self._guest
        inbound, outbound = conn._recv_encryption, conn._send_encryption
        assert _native is not None
        try:
            result = _native.run(*arguments)
        except Exception:  # the state is past saving: as asyncssh ends a connection on a bug
            conn.internal_error()
            return False
        reason, state, to_client, to_guest, packet, plain, client_rest, guest_rest = result
        in_seq, in_nonce, out_seq, out_nonce, recv_window, send_window, sent, packets, reads \
            = state
        conn._recv_seq, inbound._mac.next_seq = in_seq, in_nonce
        conn._send_seq, outbound._mac.next_seq = out_seq, out_nonce
        conn._rekey_bytes_sent += sent
        chan._recv_window, chan._send_window = recv_window, send_window
        if packets:
            conn._auth_final = True  # as asyncssh marks any packet past authentication
            receiver.fast_packets += packets
        if reads:
            self.inline_reads += reads
            if conn._keepalive_interval:
                conn._reset_keepalive_timer()
        if to_client:
            self._out.transport.write(to_client)
        if to_guest:
            assert stdin is not None  # taken only with a stdin to write to
            stdin.transport.write(to_guest)
        if packet is not None:
            batch(receiver._replay, packet, inbound, plain)
        if client_rest and packet is not None:  # from the packet after it: the next C run
            self._backlog = client_rest  # takes it if it can, else the receiver (run())
        elif client_rest:  # bytes the C loop could not take (a bad MAC or length, or the
            batch(receiver.feed, client_rest)  # start of a packet): never the C loop again
        if guest_rest:
            batch(session.output_received, guest_rest, False)
        self._adjust_window()
        if reason == _CLIENT_READ:
            self._client._read_ready()  # end of file or an error, as the transport handles it
        elif reason == _GUEST_READ:
            guest._read_ready()
        return reason in _GO_ON

    # ---- client -> guest
    def _from_client(self, fd: int) -> bool:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False  # the transport's own read meets it again and reports it
        if not data:
            self._client._read_ready()  # end of file, as the transport handles it
            return False
        self.inline_reads += 1
        receiver = self._receiver
        if not self._stdin_open():
            batch(receiver.feed, data)
            return True
        receiver.direct = (self._chan, self._payloads.append, self._deliver)
        try:
            batch(receiver.feed, data)
        finally:
            receiver.direct = None
        self._deliver()
        return True

    def _stdin_open(self) -> bool:
        """Whether channel data may be written to the guest's stdin transport now: the
        process started, the session open, nothing waiting in our writer before it."""
        session, stdin = self._session, self._stdin
        return (session._process is not None and not session._closed and stdin is not None
                and not stdin._pending and not stdin.transport.is_closing())

    def _deliver(self) -> None:
        """Write the channel data collected to the guest's stdin, then the window adjust
        asyncssh would send (it sends one once half the window is used)."""
        payloads = self._payloads
        if not payloads:
            return
        data = payloads[0] if len(payloads) == 1 else b"".join(payloads)
        payloads.clear()
        assert self._stdin is not None
        self._stdin.transport.write(data)
        self._adjust_window()

    def _adjust_window(self) -> None:
        chan = self._chan  # asyncssh adjusts when it delivers data, so never while paused
        if (chan is not None and chan._recv_state == "open" and not chan._recv_paused
                and not chan._recv_buf and chan._recv_window < chan._init_recv_window / 2):
            adjust = chan._init_recv_window - chan._recv_window
            chan._recv_window = chan._init_recv_window
            batch(chan.send_packet, _WINDOW_ADJUST, _UINT32(adjust))

    # ---- guest -> client
    def _from_guest(self, fd: int) -> bool:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            self._guest._read_ready()  # end of file, as the transport handles it
            return False
        self.inline_reads += 1
        chan = self._chan
        size = len(data)
        conn = self._conn
        out = self._out
        if (size <= chan._send_window and size <= chan._send_pktsize
                and chan._send_state == "open" and not chan._send_buf
                and not chan._send_paused and not self._session._closed
                and not out._pending and sendpath.fast_state(conn)):
            chan._send_window -= size
            out.transport.write(b"".join(sendpath.seal(
                conn, _CHANNEL_DATA, (_UINT32(chan._send_chan), _UINT32(size), data))))
            return True
        batch(self._session.output_received, data, False)
        return True
