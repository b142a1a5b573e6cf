"""Native SFTP (version 3 with OpenSSH's extensions), for guests without an ``sftp-server``.

It takes the place of the guest process behind an SFTP subsystem channel: the channel's bytes
are SFTP packets, each turned into calls on
:class:`~msb_proxy.server.transfers.files.GuestFiles`, the file
service running in the guest as the login user. So permissions, owners and relative paths
(from the user's home) are the guest's, as with OpenSSH's own ``sftp-server``, which this
follows wherever the protocol leaves a choice (argument order of ``SYMLINK``, non-replacing
``RENAME``, ``ls -l`` style long names, the extensions it announces).

Pipelined requests are served concurrently: reads and writes on open files run side by side
(a write waits only for earlier writes it overlaps, a read for earlier writes it overlaps),
while every other request waits for everything before it and holds back everything after it,
as a one-request-at-a-time server would. At most ``MAX_IN_FLIGHT`` requests run at once; beyond
that the channel stops reading, so a client cannot make us queue without bound.

Errors carry the guest's errno text (``File exists``, ``Directory not empty`` ...) with the
closest SFTPv3 status code.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from msb_proxy.backends.base import ExitStatus, GuestProcess, ProcessListener
from msb_proxy.server.transfers.files import Attrs, GuestFiles

__all__ = ["NativeSftp"]

VERSION = 3
MAX_PACKET = 256 * 1024 + 1024
MAX_READ = 256 * 1024
MAX_IN_FLIGHT = 64
READDIR_BATCH = 100

# packet types
INIT, VERSION_T, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = range(1, 11)
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
EXTENDED, EXTENDED_REPLY = 200, 201
# status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
STATUS_TEXT = {OK: "Success", EOF: "End of file", NO_SUCH_FILE: "No such file",
               PERMISSION_DENIED: "Permission denied", FAILURE: "Failure",
               BAD_MESSAGE: "Bad message", OP_UNSUPPORTED: "Operation unsupported"}
# open flags
FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 1, 2, 4, 8, 16, 32
# attribute flags
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME, ATTR_EXTENDED = 1, 2, 4, 8, 0x80000000

EXTENSIONS = [
    (b"posix-rename@openssh.com", b"1"), (b"statvfs@openssh.com", b"2"),
    (b"fstatvfs@openssh.com", b"2"), (b"hardlink@openssh.com", b"1"),
    (b"fsync@openssh.com", b"1"), (b"lsetstat@openssh.com", b"1"),
    (b"limits@openssh.com", b"1"), (b"expand-path@openssh.com", b"1"),
    (b"copy-data", b"1"), (b"home-directory", b"1"), (b"users-groups-by-id@openssh.com", b"1"),
]

_ERRNO_STATUS = {
    errno.ENOENT: NO_SUCH_FILE, errno.ENOTDIR: NO_SUCH_FILE, errno.EBADF: NO_SUCH_FILE,
    errno.ELOOP: NO_SUCH_FILE, errno.EPERM: PERMISSION_DENIED, errno.EACCES: PERMISSION_DENIED,
    errno.EFAULT: PERMISSION_DENIED, errno.ENAMETOOLONG: BAD_MESSAGE, errno.EINVAL: BAD_MESSAGE,
    errno.ENOSYS: OP_UNSUPPORTED,
}


class SftpError(Exception):
    """A request that fails with ``status`` and ``message``."""

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(message or STATUS_TEXT.get(status, "Failure"))
        self.status = status
        self.message = message or STATUS_TEXT.get(status, "Failure")


class _Reader:
    """Decodes the fields of one request packet."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    def uint32(self) -> int:
        value: int = struct.unpack_from(">I", self._data, self._at)[0]
        self._at += 4
        return value

    def uint64(self) -> int:
        value: int = struct.unpack_from(">Q", self._data, self._at)[0]
        self._at += 8
        return value

    def string(self) -> bytes:
        length = self.uint32()
        if self._at + length > len(self._data):
            raise SftpError(BAD_MESSAGE, "truncated packet")
        value = bytes(self._data[self._at:self._at + length])
        self._at += length
        return value

    def attrs(self) -> dict[str, int]:
        flags = self.uint32()
        attrs: dict[str, int] = {}
        if flags & ATTR_SIZE:
            attrs["size"] = self.uint64()
        if flags & ATTR_UIDGID:
            attrs["uid"], attrs["gid"] = self.uint32(), self.uint32()
        if flags & ATTR_PERMISSIONS:
            attrs["mode"] = self.uint32()
        if flags & ATTR_ACMODTIME:
            attrs["atime"], attrs["mtime"] = self.uint32(), self.uint32()
        if flags & ATTR_EXTENDED:
            for _ in range(self.uint32()):
                self.string()
                self.string()
        return attrs


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _encode_attrs(attrs: Attrs | None) -> bytes:
    if attrs is None:
        return struct.pack(">I", 0)
    return struct.pack(">IQIIIII", ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME,
                       attrs.size, attrs.uid, attrs.gid, attrs.mode,
                       attrs.atime & 0xFFFFFFFF, attrs.mtime & 0xFFFFFFFF)


def long_name(name: bytes, attrs: Attrs, owner: str, group: str) -> bytes:
    """An ``ls -l`` line as OpenSSH's sftp-server writes it for READDIR."""
    mode = stat.filemode(attrs.mode)
    now = time.time()
    stamp = time.localtime(attrs.mtime)
    recent = now - 182 * 86400 < attrs.mtime <= now + 3600
    when = time.strftime("%b %e %H:%M" if recent else "%b %e  %Y", stamp)
    head = f"{mode} {attrs.nlink:3d} {owner:<8} {group:<8} {attrs.size:8d} {when} "
    return head.encode() + name


@dataclass
class _Request:
    kind: int
    request_id: int
    body: bytes
    handle: bytes = b""
    span: tuple[int, int] = (0, 0)  # offset range of a READ or WRITE
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    response: bytes | None = field(default=None, repr=False)


class NativeSftp(GuestProcess):
    """An SFTP server in the proxy, standing in for the guest's sftp-server process."""

    def __init__(self, files: GuestFiles, listener: ProcessListener, home: bytes) -> None:
        self._files = files
        self._listener = listener
        self._home = home
        self._buffer = bytearray()
        self._handles: dict[bytes, tuple[str, int]] = {}
        self._next_handle = 1
        self._running: list[_Request] = []
        self._barrier: _Request | None = None
        self._stdin_paused = False
        self._output_paused = asyncio.Event()
        self._output_paused.set()
        self._eof = False
        self._done = False

    # ---- GuestProcess
    def write_stdin(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from(">I", self._buffer)
            if length < 1 or length > MAX_PACKET:
                self._finish(ExitStatus(code=1))
                return
            if len(self._buffer) < 4 + length:
                return
            packet = bytes(self._buffer[4:4 + length])
            del self._buffer[:4 + length]
            self._dispatch(packet)

    def close_stdin(self) -> None:
        self._eof = True
        self._maybe_finish()

    def pause_output(self) -> None:
        self._output_paused.clear()

    def resume_output(self) -> None:
        self._output_paused.set()
        self._emit()

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        pass

    def send_signal(self, signum: int) -> None:
        pass  # sshd refuses signals to subsystems as well

    def hangup(self) -> None:
        self._done = True
        for request in self._running:
            if request.task is not None:
                request.task.cancel()
        self._files.close_service()

    # ---- scheduling
    def _dispatch(self, packet: bytes) -> None:
        kind = packet[0]
        if kind == INIT:
            extensions = b"".join(_string(name) + _string(data) for name, data in EXTENSIONS)
            self._send(struct.pack(">BI", VERSION_T, VERSION) + extensions)
            return
        if len(packet) < 5:
            self._finish(ExitStatus(code=1))
            return
        request = _Request(kind=kind, request_id=struct.unpack_from(">I", packet, 1)[0],
                           body=packet[5:])
        depends: list[asyncio.Task[None]] = []
        if kind in (READ, WRITE):
            reader = _Reader(request.body)
            try:
                request.handle = reader.string()
                offset = reader.uint64()
                length = reader.uint32() if kind == READ else len(reader.string())
            except (SftpError, struct.error):
                # As sftp-server, whose fatal() exits 255 on a packet it cannot parse. Raised
                # here, in the channel's data_received, it would end the whole SSH connection.
                self._finish(ExitStatus(code=255))
                return
            request.span = (offset, offset + length)
            if self._barrier is not None and self._barrier.task is not None:
                depends.append(self._barrier.task)
            depends += [r.task for r in self._running if r.task is not None
                        and r.response is None and r.kind == WRITE
                        and r.handle == request.handle
                        and r.span[0] < request.span[1] and request.span[0] < r.span[1]]
        else:
            depends = [r.task for r in self._running
                       if r.task is not None and r.response is None]
        request.task = asyncio.get_running_loop().create_task(self._run(request, depends))
        self._running.append(request)
        if kind not in (READ, WRITE):
            self._barrier = request
        if len(self._running) >= MAX_IN_FLIGHT and not self._stdin_paused:
            self._stdin_paused = True
            self._listener.stdin_paused()

    async def _run(self, request: _Request, depends: list[asyncio.Task[None]]) -> None:
        if depends:
            await asyncio.wait(depends)
        try:
            response = await self._handle(request)
        except SftpError as exc:
            response = self._status(request.request_id, exc.status, exc.message)
        except OSError as exc:
            if self._files.lost:  # the sandbox is gone: end the session, as sftp-server would
                self._finish(ExitStatus(code=1))
                return
            code = _ERRNO_STATUS.get(exc.errno or 0, FAILURE)
            response = self._status(request.request_id, code, exc.strerror or str(exc))
        except (struct.error, IndexError, ValueError, KeyError):
            response = self._status(request.request_id, BAD_MESSAGE, "Bad message")
        except Exception as exc:  # a bug of ours: fail this request, not every one after it
            response = self._status(request.request_id, FAILURE,
                                    f"msb-proxy: internal error: {type(exc).__name__}: {exc}")
        if self._barrier is request:
            self._barrier = None
        request.response = response
        self._emit()

    def _emit(self) -> None:
        """Send finished replies in the order their requests came.

        OpenSSH's scp counts a pipelined transfer as written only up to the first reply out of
        order, and cuts the file there: requests run side by side, replies leave in line.
        """
        while self._running and self._running[0].response is not None \
                and self._output_paused.is_set():
            request = self._running.pop(0)
            assert request.response is not None
            self._send(request.response)
        if self._stdin_paused and len(self._running) < MAX_IN_FLIGHT // 2:
            self._stdin_paused = False
            self._listener.stdin_resumed()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._eof and not self._running:
            self._finish(ExitStatus(code=0))

    def _finish(self, status: ExitStatus) -> None:
        if self._done:
            return
        self._done = True
        self._files.close_service()
        self._listener.process_exited(status)

    def _send(self, payload: bytes) -> None:
        if not self._done:
            self._listener.output_received(struct.pack(">I", len(payload)) + payload, False)

    # ---- responses
    @staticmethod
    def _status(request_id: int, code: int, message: str | None = None) -> bytes:
        text = (message or STATUS_TEXT.get(code, "Failure")).encode()
        return struct.pack(">BII", STATUS, request_id, code) + _string(text) + _string(b"")

    @staticmethod
    def _name(request_id: int, entries: list[tuple[bytes, bytes, Attrs | None]]) -> bytes:
        body = b"".join(_string(name) + _string(long) + _encode_attrs(attrs)
                        for name, long, attrs in entries)
        return struct.pack(">BII", NAME, request_id, len(entries)) + body

    def _new_handle(self, kind: str, guest_handle: int) -> bytes:
        handle = struct.pack(">I", self._next_handle)
        self._next_handle += 1
        self._handles[handle] = (kind, guest_handle)
        return handle

    def _lookup(self, handle: bytes, kind: str) -> int:
        entry = self._handles.get(handle)
        if entry is None or entry[0] != kind:
            raise SftpError(FAILURE, "Invalid handle")
        return entry[1]

    def _full(self, path: bytes) -> bytes:
        """SFTP paths relative to the login user's home, as sftp-server (run there) has them."""
        if path.startswith(b"/"):
            return path
        return self._home.rstrip(b"/") + b"/" + path if path else self._home

    # ---- request handlers
    async def _handle(self, request: _Request) -> bytes:
        handler = _HANDLERS.get(request.kind)
        if handler is None:
            raise SftpError(OP_UNSUPPORTED)
        return await handler(self, request.request_id, _Reader(request.body))

    async def _open(self, rid: int, r: _Reader) -> bytes:
        path, pflags, attrs = r.string(), r.uint32(), r.attrs()
        access = pflags & (FXF_READ | FXF_WRITE)
        flags = {FXF_READ: os.O_RDONLY, FXF_WRITE: os.O_WRONLY}.get(access, os.O_RDWR)
        if pflags & FXF_APPEND:
            flags |= os.O_APPEND
        if pflags & FXF_CREAT:
            flags |= os.O_CREAT
        if pflags & FXF_TRUNC:
            flags |= os.O_TRUNC
        if pflags & FXF_EXCL:
            flags |= os.O_EXCL
        guest = await self._files.open(self._full(path), flags, attrs.get("mode", 0o666) & 0o7777)
        handle = self._new_handle("append" if pflags & FXF_APPEND else "file", guest)
        return struct.pack(">BI", HANDLE, rid) + _string(handle)

    async def _close(self, rid: int, r: _Reader) -> bytes:
        handle = r.string()
        entry = self._handles.pop(handle, None)
        if entry is None:
            raise SftpError(FAILURE, "Invalid handle")
        await self._files.close(entry[1])
        return self._status(rid, OK)

    def _file(self, handle: bytes) -> tuple[int, bool]:
        entry = self._handles.get(handle)
        if entry is None or entry[0] not in ("file", "append"):
            raise SftpError(FAILURE, "Invalid handle")
        return entry[1], entry[0] == "append"

    async def _read(self, rid: int, r: _Reader) -> bytes:
        guest, _ = self._file(r.string())
        offset, length = r.uint64(), r.uint32()
        data = await self._files.read(guest, offset, min(length, MAX_READ))
        if not data:
            return self._status(rid, EOF)
        return struct.pack(">BI", DATA, rid) + _string(data)

    async def _write(self, rid: int, r: _Reader) -> bytes:
        guest, append = self._file(r.string())
        offset, data = r.uint64(), r.string()
        await self._files.write(guest, offset, data, append=append)
        return self._status(rid, OK)

    async def _stat_path(self, rid: int, r: _Reader, follow: bool) -> bytes:
        attrs = await self._files.stat(self._full(r.string()), follow=follow)
        return struct.pack(">BI", ATTRS, rid) + _encode_attrs(attrs)

    async def _lstat(self, rid: int, r: _Reader) -> bytes:
        return await self._stat_path(rid, r, follow=False)

    async def _stat(self, rid: int, r: _Reader) -> bytes:
        return await self._stat_path(rid, r, follow=True)

    async def _fstat(self, rid: int, r: _Reader) -> bytes:
        guest, _ = self._file(r.string())
        return struct.pack(">BI", ATTRS, rid) + _encode_attrs(await self._files.fstat(guest))

    async def _setstat(self, rid: int, r: _Reader) -> bytes:
        path, attrs = r.string(), r.attrs()
        await self._files.setstat(self._full(path), attrs)
        return self._status(rid, OK)

    async def _fsetstat(self, rid: int, r: _Reader) -> bytes:
        guest, _ = self._file(r.string())
        await self._files.fsetstat(guest, r.attrs())
        return self._status(rid, OK)

    async def _opendir(self, rid: int, r: _Reader) -> bytes:
        guest = await self._files.opendir(self._full(r.string()))
        return struct.pack(">BI", HANDLE, rid) + _string(self._new_handle("dir", guest))

    async def _readdir(self, rid: int, r: _Reader) -> bytes:
        guest = self._lookup(r.string(), "dir")
        entries = await self._files.readdir(guest, READDIR_BATCH)
        if not entries:
            return self._status(rid, EOF)
        return self._name(rid, [(name, long_name(name, attrs, owner, group), attrs)
                                for name, attrs, owner, group in entries])

    async def _remove(self, rid: int, r: _Reader) -> bytes:
        await self._files.remove(self._full(r.string()))
        return self._status(rid, OK)

    async def _mkdir(self, rid: int, r: _Reader) -> bytes:
        path, attrs = r.string(), r.attrs()
        await self._files.mkdir(self._full(path), attrs.get("mode", 0o777) & 0o7777)
        return self._status(rid, OK)

    async def _rmdir(self, rid: int, r: _Reader) -> bytes:
        await self._files.rmdir(self._full(r.string()))
        return self._status(rid, OK)

    async def _realpath(self, rid: int, r: _Reader) -> bytes:
        real = await self._files.realpath(self._full(r.string()), strict=False)
        return self._name(rid, [(real, real, None)])

    async def _rename(self, rid: int, r: _Reader) -> bytes:
        old, new = r.string(), r.string()
        await self._files.rename(self._full(old), self._full(new), replace=False)
        return self._status(rid, OK)

    async def _readlink(self, rid: int, r: _Reader) -> bytes:
        target = await self._files.readlink(self._full(r.string()))
        return self._name(rid, [(target, target, None)])

    async def _symlink(self, rid: int, r: _Reader) -> bytes:
        # OpenSSH sends (and its sftp-server reads) the target first: the reverse of the draft.
        target, link = r.string(), r.string()
        await self._files.symlink(target, self._full(link))
        return self._status(rid, OK)

    async def _extended(self, rid: int, r: _Reader) -> bytes:
        name = r.string()
        handler = _EXTENDED.get(name)
        if handler is None:
            shown = name.decode(errors="replace")
            raise SftpError(OP_UNSUPPORTED, f"Unsupported extension {shown}")
        return await handler(self, rid, r)

    async def _posix_rename(self, rid: int, r: _Reader) -> bytes:
        old, new = r.string(), r.string()
        await self._files.rename(self._full(old), self._full(new), replace=True)
        return self._status(rid, OK)

    async def _statvfs(self, rid: int, r: _Reader) -> bytes:
        return self._statvfs_reply(rid, await self._files.statvfs(path=self._full(r.string())))

    async def _fstatvfs(self, rid: int, r: _Reader) -> bytes:
        guest, _ = self._file(r.string())
        return self._statvfs_reply(rid, await self._files.statvfs(handle=guest))

    @staticmethod
    def _statvfs_reply(rid: int, st: dict[str, int]) -> bytes:
        flag = (1 if st["f_flag"] & 1 else 0) | (2 if st["f_flag"] & 2 else 0)  # RDONLY, NOSUID
        fields = [st["f_bsize"], st["f_frsize"], st["f_blocks"], st["f_bfree"], st["f_bavail"],
                  st["f_files"], st["f_ffree"], st["f_favail"], st["f_fsid"] & (2**64 - 1), flag,
                  st["f_namemax"]]
        return struct.pack(">BI11Q", EXTENDED_REPLY, rid, *fields)

    async def _hardlink(self, rid: int, r: _Reader) -> bytes:
        old, new = r.string(), r.string()
        await self._files.link(self._full(old), self._full(new))
        return self._status(rid, OK)

    async def _fsync(self, rid: int, r: _Reader) -> bytes:
        guest, _ = self._file(r.string())
        await self._files.fsync(guest)
        return self._status(rid, OK)

    async def _lsetstat(self, rid: int, r: _Reader) -> bytes:
        path, attrs = r.string(), r.attrs()
        await self._files.setstat(self._full(path), attrs, follow=False)
        return self._status(rid, OK)

    async def _limits(self, rid: int, r: _Reader) -> bytes:
        return struct.pack(">BIQQQQ", EXTENDED_REPLY, rid, MAX_PACKET, MAX_READ, MAX_READ, 0)

    async def _expand_path(self, rid: int, r: _Reader) -> bytes:
        path = r.string()
        if path == b"~" or path.startswith(b"~/"):
            path = self._home + path[1:]
        elif path.startswith(b"~"):
            raise SftpError(OP_UNSUPPORTED, "Only the login user's home can be expanded")
        real = await self._files.realpath(self._full(path), strict=False)
        return self._name(rid, [(real, real, None)])

    async def _copy_data(self, rid: int, r: _Reader) -> bytes:
        source, _ = self._file(r.string())
        offset, length = r.uint64(), r.uint64()
        target, _ = self._file(r.string())
        await self._files.copy(source, offset, length, target, r.uint64())
        return self._status(rid, OK)

    async def _home_directory(self, rid: int, r: _Reader) -> bytes:
        user = r.string()
        if user not in (b"", b"~"):
            raise SftpError(OP_UNSUPPORTED, "Only the login user's home is known")
        return self._name(rid, [(self._home, self._home, None)])

    async def _users_groups_by_id(self, rid: int, r: _Reader) -> bytes:
        """Names for ``ls -l`` of single files (OpenSSH 9.1+ clients); unknown ids map to ""."""
        uids_blob, gids_blob = r.string(), r.string()
        uids = list(struct.unpack(f">{len(uids_blob) // 4}I", uids_blob[: len(uids_blob) // 4 * 4]))
        gids = list(struct.unpack(f">{len(gids_blob) // 4}I", gids_blob[: len(gids_blob) // 4 * 4]))
        users, groups = await self._files.names(uids, gids)

        def names(ids: list[int], known: dict[int, str]) -> bytes:
            return _string(b"".join(_string(known.get(i, "").encode()) for i in ids))

        return struct.pack(">BI", EXTENDED_REPLY, rid) + names(uids, users) + names(gids, groups)


_Handler = Callable[[NativeSftp, int, _Reader], Awaitable[bytes]]
_HANDLERS: dict[int, _Handler] = {
    OPEN: NativeSftp._open, CLOSE: NativeSftp._close, READ: NativeSftp._read,
    WRITE: NativeSftp._write, LSTAT: NativeSftp._lstat, FSTAT: NativeSftp._fstat,
    SETSTAT: NativeSftp._setstat, FSETSTAT: NativeSftp._fsetstat, OPENDIR: NativeSftp._opendir,
    READDIR: NativeSftp._readdir, REMOVE: NativeSftp._remove, MKDIR: NativeSftp._mkdir,
    RMDIR: NativeSftp._rmdir, REALPATH: NativeSftp._realpath, STAT: NativeSftp._stat,
    RENAME: NativeSftp._rename, READLINK: NativeSftp._readlink, SYMLINK: NativeSftp._symlink,
    EXTENDED: NativeSftp._extended,
}
_EXTENDED: dict[bytes, _Handler] = {
    b"posix-rename@openssh.com": NativeSftp._posix_rename,
    b"statvfs@openssh.com": NativeSftp._statvfs,
    b"fstatvfs@openssh.com": NativeSftp._fstatvfs,
    b"hardlink@openssh.com": NativeSftp._hardlink,
    b"fsync@openssh.com": NativeSftp._fsync,
    b"lsetstat@openssh.com": NativeSftp._lsetstat,
    b"limits@openssh.com": NativeSftp._limits,
    b"expand-path@openssh.com": NativeSftp._expand_path,
    b"copy-data": NativeSftp._copy_data,
    b"home-directory": NativeSftp._home_directory,
    b"users-groups-by-id@openssh.com": NativeSftp._users_groups_by_id,
}
