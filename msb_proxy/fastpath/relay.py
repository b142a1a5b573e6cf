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
  channel (MAC checked and decrypted by :class:`~msb_proxy.fastpath.receive.Receiver`, window
  accounted as asyncssh does) go to the guest's stdin in one write; any other packet goes to
  asyncssh as ever;
* from the guest, a read that fits the channel's window and packet size goes out as one packet
  sealed by :func:`~msb_proxy.fastpath.send.seal`; anything else through the session as ever.

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

Only the stdio transport (real pipes, :class:`~msb_proxy.transport.stdio.ClientPipes`) and a
process whose backend hands out plain pipes (:class:`~msb_proxy.backends.base.RawPipes`, the
local backend's non-terminal processes) can be relayed; everything else, and every state this
does not cover, stays on the usual path. End of file and errors on either pipe are left to the
transport that owns it: the relay gives the loop back and the loop's next poll reports them.
"""

from __future__ import annotations

import importlib
import os
import select
import struct
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from msb_proxy.backends.base import GuestProcess, RawPipes
from msb_proxy.fastpath import gate, send
from msb_proxy.fastpath.receive import Receiver
from msb_proxy.fastpath.send import Sender
from msb_proxy.fastpath.umac import CachedKeyUMAC
from msb_proxy.server.hooks import RelayedSession
from msb_proxy.transport.batching import batch
from msb_proxy.transport.stdio import ClientPipes

if TYPE_CHECKING:
    from asyncssh.encryption import ETMEncryption

__all__ = ["Relay", "compiled_loop"]

READ_SIZE = 1 << 20
_UINT32 = struct.Struct(">I").pack
_EPOLLIN = select.EPOLLIN
_CHANNEL_DATA = asyncssh.MSG_CHANNEL_DATA
_WINDOW_ADJUST = asyncssh.MSG_CHANNEL_WINDOW_ADJUST
# _relay.run's reasons to stop: those after which the relay may go on (it stopped to hand
# something back, not for the loop).
_GO_ON = frozenset((3, 4))


def compiled_loop() -> ModuleType | None:
    """The C loop (``_relay.c``), or None where it was not built (no C compiler)."""
    try:  # by name: a compiled module the import graph (make lint) cannot see as a module
        return importlib.import_module("msb_proxy.fastpath._relay")
    except ImportError:
        return None


class Relay:
    """The short path for one connection; one guest process at a time is relayed.

    ``client`` is the connection's pipe transport (:class:`ClientPipes` and the methods beside
    it); ``native`` the C loop, or None for the Python one; ``failed(reason)`` is called when
    our code fails, and the owner then stops the relay.
    """

    def __init__(self, conn: asyncssh.SSHServerConnection, *, loop: Any, receiver: Receiver,
                 sender: Sender, client: Any, native: ModuleType | None,
                 failed: Callable[[str], None]) -> None:
        self._loop = loop
        self._conn = conn
        self._receiver = receiver
        self._sender = sender
        self._client = client
        self._native = native
        self._failed = failed
        self._running = False
        self._session: RelayedSession | None = None
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._process: GuestProcess | None = None
        self._payloads: list[bytes] = []
        self._backlog = b""  # client bytes the C loop handed back, from a packet's start
        self.inline_reads = 0  # reads handled here (for the tests)

    @property
    def attached(self) -> bool:
        return self._session is not None

    def attach(self, session: RelayedSession, chan: asyncssh.SSHServerChannel[bytes],
               process: GuestProcess) -> bool:
        """Relay ``chan``, carried by ``process``; False if another is, or it has no pipes."""
        if self._session is not None or process.raw_pipes() is None:
            return False
        if chan._encoding is not None or chan._packet_handlers.get(_CHANNEL_DATA) is None:
            return False
        self._session, self._chan, self._process = session, chan, process
        return True

    def detach(self, session: RelayedSession | None = None) -> None:
        """Stop relaying ``session`` (any session when None)."""
        if session is None or self._session is session:
            self._session = self._chan = self._process = None

    def run(self) -> None:
        """Serve the two pipes here until anything else needs the loop (see the module)."""
        process = self._process
        if self._running or process is None:
            return
        self._running = True
        try:
            while self._process is process:  # detached when a packet handed back closed it
                guest = process.raw_pipes()
                client = self._client.pipes()
                if guest is None or client is None:
                    return
                if self._native is not None:
                    arguments = self._native_arguments(guest, client)
                    if arguments is not None:
                        if not self._run_native(arguments):
                            return
                        continue
                self._feed_backlog()
                if not self._step(guest, client):
                    return
        except Exception as exc:  # ours: the owner takes the fast path off this connection
            self._failed(f"{type(exc).__name__}: {exc}")
        finally:
            self._running = False
            self._feed_backlog()

    def _feed_backlog(self) -> None:
        if self._backlog:
            backlog, self._backlog = self._backlog, b""
            batch(self._receiver.feed, backlog)

    def _step(self, guest: RawPipes, client: ClientPipes) -> bool:
        """Wait for and handle one read of either pipe; False to give the loop back."""
        loop = self._loop
        if loop._ready or loop._stopping:
            return False
        scheduled = loop._scheduled
        if scheduled:
            timeout = scheduled[0].when() - loop.time()
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
        if fd == guest.stdout:
            return self._from_guest(fd)
        if fd == client.read_fd:
            return self._from_client(fd, guest)
        return False

    # ---- the same loop in C
    def _native_arguments(self, guest: RawPipes, client: ClientPipes) -> tuple[Any, ...] | None:
        """What _relay.run takes, when the state is one it covers: UMAC and a CTR cipher
        both ways, nothing queued towards the client, the channel open that way. Channel data
        from the client is taken only while the channel is open that way too, not paused, and
        nothing is queued for the guest's stdin; otherwise the C loop hands it back."""
        conn, chan, receiver, loop = self._conn, self._chan, self._receiver, self._loop
        session, out = self._session, self._client
        if (loop._ready or loop._stopping or session is None or chan is None
                or not receiver.ready() or not self._sender.ready()):
            return None
        # ready() checked both are encrypt-then-MAC; the casts let mypy check the names used.
        inbound = cast("ETMEncryption", conn._recv_encryption)
        outbound = cast("ETMEncryption", conn._send_encryption)
        decryptor = getattr(inbound._cipher, "_decryptor", None)
        encryptor = getattr(outbound._cipher, "_encryptor", None)
        # asyncssh's MAC objects or ours, which it calls alike (CachedKeyUMAC is not its class)
        in_mac: Any = inbound._mac
        out_mac: Any = outbound._mac
        if (type(in_mac) is not CachedKeyUMAC or type(out_mac) is not CachedKeyUMAC
                or decryptor is None or encryptor is None):
            return None
        if (out.queued() or chan._send_state != "open" or chan._send_buf or chan._send_paused
                or chan._send_chan is None or session.closed
                or chan._packet_handlers.get(_CHANNEL_DATA) is not gate.PROCESS_DATA):
            return None
        take_data = (chan._recv_state == "open" and not chan._recv_paused
                     and not chan._recv_buf and guest.stdin >= 0 and not guest.stdin_queued)
        scheduled = loop._scheduled
        held = receiver._held or self._backlog  # never both: see _run_native
        receiver._held = self._backlog = b""
        return (
            (loop._selector._selector.fileno(), client.read_fd, client.write_fd,
             guest.stdin if take_data else -1, guest.stdout),
            (decryptor.update, *in_mac.native, in_mac.next_seq, conn._recv_seq),
            (encryptor.update, *out_mac.native, out_mac.next_seq, conn._send_seq),
            (conn._recv_blocksize, conn._max_recv_pktlen, conn._send_blocksize,
             conn._send_enchdrlen, chan._recv_chan, chan._send_chan, take_data,
             chan._recv_window, chan._init_recv_window, chan._send_window, chan._send_pktsize,
             conn._rekey_bytes - conn._rekey_bytes_sent,
             float(conn._rekey_time) if conn._rekey_seconds else 0.0,
             float(scheduled[0].when()) if scheduled else 0.0),
            held,
        )

    def _run_native(self, arguments: tuple[Any, ...]) -> bool:
        """One run of the C loop, then what it hands back, the usual way and in order;
        whether the relay may go on (the C loop stopped only to hand something back)."""
        conn, chan, receiver = self._conn, self._chan, self._receiver
        session, process = self._session, self._process
        inbound = cast("ETMEncryption", conn._recv_encryption)  # as _native_arguments saw
        outbound = cast("ETMEncryption", conn._send_encryption)
        assert self._native is not None and session is not None and process is not None
        assert chan is not None
        try:
            result = self._native.run(*arguments)
        except TypeError as exc:  # refused its arguments before reading anything: give the
            receiver._held = arguments[-1]  # held bytes back; the Python loop takes over
            self._native = None
            self._failed(f"the C loop refused its arguments: {exc}")
            return False
        except Exception:  # past saving (bytes read inside it): as asyncssh ends on a bug
            conn.internal_error()
            return False
        reason, state, to_client, to_guest, packet, plain, client_rest, guest_rest = result
        in_seq, in_nonce, out_seq, out_nonce, recv_window, send_window, sent, packets, reads \
            = state
        in_mac: Any = inbound._mac  # CachedKeyUMAC both, as _native_arguments checked
        out_mac: Any = outbound._mac
        conn._recv_seq, in_mac.next_seq = in_seq, in_nonce
        conn._send_seq, out_mac.next_seq = out_seq, out_nonce
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
            self._client.write_now(to_client)
        if to_guest:  # taken only with a stdin to write to
            self._write_stdin(process, to_guest)
        if packet is not None:
            batch(receiver.replay, packet, inbound, plain)
        if client_rest and packet is not None:  # from the packet after it: the next C run
            self._backlog = client_rest  # takes it if it can, else the receiver (run())
        elif client_rest:  # bytes the C loop could not take (a bad MAC or length, or the
            batch(receiver.feed, client_rest)  # start of a packet): never the C loop again
        if guest_rest:
            batch(session.output_received, guest_rest, False)
        self._adjust_window()
        return bool(reason in _GO_ON)

    # ---- client -> guest
    def _from_client(self, fd: int, guest: RawPipes) -> bool:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False  # the transport's own read meets it again and reports it
        if not data:
            return False  # end of file: the transport's own read meets it
        self.inline_reads += 1
        receiver = self._receiver
        session = self._session
        if session is None or session.closed or guest.stdin < 0 or guest.stdin_queued:
            batch(receiver.feed, data)
            return True
        receiver.direct = (self._chan, self._payloads.append, self._deliver)
        try:
            batch(receiver.feed, data)
        finally:
            receiver.direct = None
        self._deliver()
        return True

    def _deliver(self) -> None:
        """Write the channel data collected to the guest's stdin, then the window adjust
        asyncssh would send (it sends one once half the window is used)."""
        payloads = self._payloads
        if not payloads:
            return
        data = payloads[0] if len(payloads) == 1 else b"".join(payloads)
        payloads.clear()
        if self._process is not None:
            self._write_stdin(self._process, data)
        self._adjust_window()

    @staticmethod
    def _write_stdin(process: GuestProcess, data: bytes) -> None:
        """Write ``data`` to the process's stdin pipe, what it does not take through the
        backend's own writer (which then keeps it in order before anything later)."""
        pipes = process.raw_pipes()
        written = 0
        if pipes is not None and pipes.stdin >= 0 and not pipes.stdin_queued:
            try:
                written = os.write(pipes.stdin, data)
            except OSError:  # full, or the guest closed it: the backend's writer handles it
                written = 0
        if written < len(data):
            process.write_stdin(data[written:] if written else data)

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
            return False  # end of file: the backend's own read meets it
        self.inline_reads += 1
        chan, conn, out, session = self._chan, self._conn, self._client, self._session
        assert session is not None and chan is not None
        size = len(data)
        if (size <= chan._send_window and size <= chan._send_pktsize
                and chan._send_state == "open" and not chan._send_buf
                and not chan._send_paused and not session.closed
                and not out.batched() and self._sender.ready()):
            try:
                packet = send.seal(conn, _CHANNEL_DATA, (_UINT32(chan._send_chan), _UINT32(size),
                                                    data))
            except Exception as exc:  # nothing was sent: the data goes the usual way
                self._failed(f"{type(exc).__name__}: {exc}")
                batch(session.output_received, data, False)
                return False
            chan._send_window -= size
            out.write_now(b"".join(packet))
            self._sender.sealed += 1
            return True
        batch(session.output_received, data, False)
        return True
