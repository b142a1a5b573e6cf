"""The audit log's view of an SFTP channel: a tap on its packets, both ways, that never
changes a byte.

With ``audit = true`` every SFTP channel, whether the guest's own ``sftp-server`` or native
SFTP (:mod:`.sftp`) serves it, runs through :class:`TappedProcess`: the client's requests are
read on their way in, the server's replies on their way out (the session hands them over), and
each operation OpenSSH's ``sftp-server`` logs at level INFO becomes one ``sftp`` event once
its reply is seen (see :mod:`msb_proxy.server.audit`). Only the head of a packet is looked at:
the data of ``WRITE`` and ``DATA`` is counted, not copied, so a 1 GiB transfer costs a few
integer operations per 256 KiB packet. A stream the tap cannot follow (no SFTP at all) ends the
tap, never the channel.

A tapped process has no :meth:`~msb_proxy.backends.base.GuestProcess.raw_pipes`, so a fast path
cannot serve its pipes around the tap.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from msb_proxy.backends.base import GuestProcess
from msb_proxy.server.audit import text
from msb_proxy.server.transfers import sftp as wire

__all__ = ["SftpTap", "TappedProcess"]

HEAD_MAX = 3 * 4096 + 64  # the longest head we parse: RENAME's two PATH_MAX paths
Report = Callable[..., None]

_PATH_OPS = {wire.REMOVE: "remove", wire.MKDIR: "mkdir", wire.RMDIR: "rmdir",
             wire.SETSTAT: "setstat"}
_HANDLE_OPS = {wire.CLOSE: "close", wire.READ: "read", wire.WRITE: "write",
               wire.FSETSTAT: "fsetstat"}
_TWO_PATH_OPS = {wire.RENAME: "rename", wire.SYMLINK: "symlink"}
_TWO_PATH_EXTENSIONS = {b"posix-rename@openssh.com": "rename",
                        b"hardlink@openssh.com": "hardlink"}


class _Packets:
    """Splits one direction of an SFTP stream into packets and hands on the head of each
    (its first ``HEAD_MAX`` bytes after the length) with the packet's full length."""

    def __init__(self, on_packet: Callable[[bytes, int], None]) -> None:
        self._on_packet = on_packet
        self._head = bytearray()
        self._length = -1  # of the packet being read; -1 while its length is not yet known
        self._skip = 0  # bytes of the packet's body past its head, still to come

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
                continue
            want = 4 if self._length < 0 else min(self._length, HEAD_MAX)
            piece = view[:want - len(self._head)]
            self._head += piece
            view = view[len(piece):]
            if len(self._head) < want:
                return
            if self._length < 0:
                self._length = int.from_bytes(self._head, "big")
                self._head.clear()
                if self._length:
                    continue
            head, length = bytes(self._head), self._length
            self._head.clear()
            self._length = -1
            self._skip = length - len(head)
            self._on_packet(head, length)


class _Head:
    """Fields of a packet head, read in order."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._data = data
        self._at = offset

    def uint32(self) -> int:
        (value,) = struct.unpack_from(">I", self._data, self._at)
        self._at += 4
        return int(value)

    def string(self) -> bytes:
        size = self.uint32()
        if self._at + size > len(self._data):
            raise struct.error("string past the packet's head")
        value = self._data[self._at:self._at + size]
        self._at += size
        return value


@dataclass
class _Handle:
    """An open file or directory: its path, what it is used for, how many bytes so far."""

    path: str
    op: str  # read, write or list
    bytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class _Asked:
    """A request waiting for its reply: ``what`` it is (open, close, read, write, fsetstat,
    or an operation on ``path``), the ``op`` it is logged as, and its subject."""

    what: str
    op: str = ""
    path: str = ""
    target: str | None = None
    handle: bytes = b""


class SftpTap:
    """Watches one SFTP channel and reports its operations to ``report(**fields)``."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._client = _Packets(self._request)
        self._server = _Packets(self._reply)
        self._pending: dict[int, _Asked] = {}  # by request id
        self._handles: dict[bytes, _Handle] = {}
        self._lost = False

    def from_client(self, data: bytes) -> None:
        """Bytes the client sent to the SFTP server."""
        self._feed(self._client, data)

    def from_server(self, data: bytes) -> None:
        """Bytes the SFTP server sent to the client."""
        self._feed(self._server, data)

    def _feed(self, packets: _Packets, data: bytes) -> None:
        if self._lost:
            return
        try:
            packets.feed(data)
        except (struct.error, IndexError, KeyError):
            self._lost = True  # not SFTP as we know it: stop looking, the bytes go on

    # ---- requests: remember what each one asks until its reply
    def _request(self, head: bytes, length: int) -> None:
        kind = head[0]
        if kind == wire.INIT:
            return
        fields = _Head(head, 1)
        rid = fields.uint32()
        if kind in (wire.OPEN, wire.OPENDIR):
            path = text(fields.string())
            op = "list"
            if kind == wire.OPEN:
                op = "write" if fields.uint32() & (wire.FXF_WRITE | wire.FXF_APPEND) else "read"
            self._pending[rid] = _Asked("open", op, path)
        elif kind in _HANDLE_OPS:
            handle = fields.string()
            if kind == wire.WRITE and handle in self._handles:
                fields.uint32()  # the offset, a uint64
                fields.uint32()
                self._handles[handle].bytes += fields.uint32()
            self._pending[rid] = _Asked(_HANDLE_OPS[kind], handle=handle)
        elif kind in _PATH_OPS:
            self._pending[rid] = _Asked("path", _PATH_OPS[kind], text(fields.string()))
        elif kind in _TWO_PATH_OPS:
            first, second = text(fields.string()), text(fields.string())
            # OpenSSH sends SYMLINK's arguments as (target, link), its own reversed order
            path, target = (second, first) if kind == wire.SYMLINK else (first, second)
            self._pending[rid] = _Asked("path", _TWO_PATH_OPS[kind], path, target)
        elif kind == wire.EXTENDED:
            extension = fields.string()
            if extension in _TWO_PATH_EXTENSIONS:
                first, second = text(fields.string()), text(fields.string())
                self._pending[rid] = _Asked("path", _TWO_PATH_EXTENSIONS[extension], first,
                                            second)
            elif extension == b"lsetstat@openssh.com":
                self._pending[rid] = _Asked("path", "setstat", text(fields.string()))

    # ---- replies: the outcome of what was asked
    def _reply(self, head: bytes, length: int) -> None:
        kind = head[0]
        if kind == wire.VERSION_T:
            return
        fields = _Head(head, 1)
        asked = self._pending.pop(fields.uint32(), None)
        if asked is None:
            return
        if kind == wire.HANDLE and asked.what == "open":
            self._handles[fields.string()] = _Handle(asked.path, asked.op)
        elif kind == wire.DATA and asked.what == "read":
            handle = self._handles.get(asked.handle)
            if handle is not None:
                handle.bytes += fields.uint32()
        elif kind == wire.STATUS:
            code = fields.uint32()
            result = "ok" if code in (wire.OK, wire.EOF) else \
                text(fields.string()) or wire.STATUS_TEXT.get(code, "Failure")
            self._status(asked, result)

    def _status(self, asked: _Asked, result: str) -> None:
        if asked.what == "open":
            if result != "ok":
                self._report(op="open", path=asked.path, result=result)
        elif asked.what == "path":
            extra = {} if asked.target is None else {"target": asked.target}
            self._report(op=asked.op, path=asked.path, **extra, result=result)
        elif (handle := self._handles.get(asked.handle)) is not None:
            if asked.what == "fsetstat":
                self._report(op="setstat", path=handle.path, result=result)
            elif asked.what == "close":
                del self._handles[asked.handle]
                self._closed(handle, result)
            elif result != "ok" and handle.error is None:
                handle.error = result

    def _closed(self, handle: _Handle, result: str) -> None:
        outcome = handle.error or result
        if handle.op == "list":
            self._report(op="list", path=handle.path, result=outcome)
        else:
            self._report(op=handle.op, path=handle.path, bytes=handle.bytes, result=outcome)

    def channel_closed(self) -> None:
        """The channel is gone: files it left open are reported as closed with it."""
        for handle in self._handles.values():
            self._closed(handle, "ok")
        self._handles.clear()


class TappedProcess(GuestProcess):
    """``process`` with the client's bytes shown to ``tap`` on their way in; everything else
    is the process's own. No raw pipes: every byte passes the tap."""

    def __init__(self, process: GuestProcess, tap: SftpTap) -> None:
        self.process = process
        self._tap = tap

    def write_stdin(self, data: bytes) -> None:
        self._tap.from_client(data)
        self.process.write_stdin(data)

    def close_stdin(self) -> None:
        self.process.close_stdin()

    def pause_output(self) -> None:
        self.process.pause_output()

    def resume_output(self) -> None:
        self.process.resume_output()

    def close_output(self) -> None:
        self.process.close_output()

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        self.process.resize(cols, rows, pixel_width, pixel_height)

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def send_break(self, msec: int) -> bool:
        return self.process.send_break(msec)

    def hangup(self) -> None:
        self.process.hangup()
