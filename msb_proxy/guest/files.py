"""The guest file service: file operations carried out inside the guest, as the login user.

msb-proxy's native SFTP and scp servers (used when the guest has no ``sftp-server`` or ``scp``)
turn each request into a call here, so every permission check, owner and path resolution is the
guest kernel's, for the user who logged in. Runs

* forked from the local backend's jail init, after it has become the login user, or
* as ``python3 -c`` of this file's source in any other guest (standard library only; works on
  Python 3.6 and newer, so it runs on old guests too).

Protocol, over one byte stream in each direction: frames of ``>IIH`` (length of what follows the
length field, request id, header length), a JSON header, then raw payload bytes. A request header
is ``{"op": NAME, ...arguments}``; the reply carries the same id and ``{"ok": true, ...}`` or
``{"errno": N, "error": TEXT}``. Requests are served by a pool of threads, so replies may come
out of order; the caller orders what must be ordered. Paths travel as UTF-8 strings with
surrogate escapes, so any byte string a file name can hold survives the trip.
"""

import errno
import glob
import json
import os
import queue
import stat
import struct
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

try:  # imported now: in the jail init's children nothing can be imported later
    import grp
    import pwd
except ImportError:  # pragma: no cover  (a guest without them shows numeric owners)
    grp = pwd = None  # type: ignore[assignment]

__all__ = ["serve"]

Request = Dict[str, Any]
Reply = Tuple[Dict[str, Any], bytes]

HEADER = struct.Struct(">IIH")
WORKERS = 8
MAX_READ = 256 * 1024


def _path(value: str) -> bytes:
    return os.fsencode(value)


def _name(value: bytes) -> str:
    return os.fsdecode(value)


def _attrs(st: os.stat_result) -> Dict[str, int]:
    return {
        "size": st.st_size, "uid": st.st_uid, "gid": st.st_gid, "mode": st.st_mode,
        "atime": int(st.st_atime), "mtime": int(st.st_mtime), "nlink": st.st_nlink,
    }


class Service:
    """Executes requests; every method returns ``(header, payload)`` or raises OSError."""

    def __init__(self) -> None:
        self.handles: Dict[int, Tuple[str, Any, str]] = {}
        self.next_handle = 1
        self.lock = threading.Lock()
        self.users: Dict[int, str] = {}
        self.groups: Dict[int, str] = {}

    # ---- handles
    def _add(self, kind: str, value: Any, path: str) -> int:
        with self.lock:
            handle = self.next_handle
            self.next_handle += 1
            self.handles[handle] = (kind, value, path)
        return handle

    def _fd(self, handle: int) -> int:
        entry = self.handles.get(handle)
        if entry is None or entry[0] != "file":
            raise OSError(errno.EBADF, "invalid handle")
        return int(entry[1])

    # ---- names of owners, for ls -l style listings
    def _user(self, uid: int) -> str:
        if uid not in self.users:
            try:
                self.users[uid] = str(pwd.getpwuid(uid).pw_name)
            except (AttributeError, KeyError):
                self.users[uid] = str(uid)
        return self.users[uid]

    def _group(self, gid: int) -> str:
        if gid not in self.groups:
            try:
                self.groups[gid] = str(grp.getgrgid(gid).gr_name)
            except (AttributeError, KeyError):
                self.groups[gid] = str(gid)
        return self.groups[gid]

    # ---- operations
    def op_open(self, req: Request, payload: bytes) -> Reply:
        flags = req["flags"] | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
        fd = os.open(_path(req["path"]), flags, req.get("mode", 0o666))
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        return {"handle": self._add("file", fd, req["path"])}, b""

    def op_opendir(self, req: Request, payload: bytes) -> Reply:
        path = _path(req["path"])
        names = os.listdir(path)
        entries: List[Dict[str, Any]] = []
        for name in [b".", b"..", *names]:
            try:
                st = os.lstat(os.path.join(path, name))
            except OSError:
                continue
            entry: Dict[str, Any] = dict(_attrs(st))
            entry["name"] = _name(name)
            entry["owner"] = self._user(st.st_uid)
            entry["group"] = self._group(st.st_gid)
            entries.append(entry)
        return {"handle": self._add("dir", entries, req["path"])}, b""

    def op_readdir(self, req: Request, payload: bytes) -> Reply:
        with self.lock:
            entry = self.handles.get(req["handle"])
            if entry is None or entry[0] != "dir":
                raise OSError(errno.EBADF, "invalid handle")
            batch, rest = entry[1][:req.get("count", 100)], entry[1][req.get("count", 100):]
            self.handles[req["handle"]] = ("dir", rest, entry[2])
        return {"entries": batch}, b""

    def op_close(self, req: Request, payload: bytes) -> Reply:
        with self.lock:
            entry = self.handles.pop(req["handle"], None)
        if entry is None:
            raise OSError(errno.EBADF, "invalid handle")
        if entry[0] == "file":
            os.close(entry[1])
        return {}, b""

    def op_read(self, req: Request, payload: bytes) -> Reply:
        data = os.pread(self._fd(req["handle"]), min(req["length"], MAX_READ), req["offset"])
        return {"eof": not data}, data

    def op_write(self, req: Request, payload: bytes) -> Reply:
        fd = self._fd(req["handle"])
        view = memoryview(payload)
        offset = req["offset"]
        if req.get("append"):
            while view:
                view = view[os.write(fd, view):]
        else:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        return {}, b""

    def op_stat(self, req: Request, payload: bytes) -> Reply:
        path = _path(req["path"])
        st = os.stat(path) if req.get("follow", True) else os.lstat(path)
        return {"attrs": _attrs(st)}, b""

    def op_fstat(self, req: Request, payload: bytes) -> Reply:
        return {"attrs": _attrs(os.fstat(self._fd(req["handle"])))}, b""

    def op_setstat(self, req: Request, payload: bytes) -> Reply:
        self._apply(_path(req["path"]), req["attrs"], req.get("follow", True))
        return {}, b""

    def op_fsetstat(self, req: Request, payload: bytes) -> Reply:
        self._apply(self._fd(req["handle"]), req["attrs"], True)
        return {}, b""

    def _apply(self, target: Union[bytes, int], attrs: Dict[str, int], follow: bool) -> None:
        # The order matters as in OpenSSH's sftp-server: size, mode, owner, then times last so
        # that the others do not bump them.
        if "size" in attrs:
            os.truncate(target, attrs["size"])
        # Linux cannot chmod a symlink itself: lsetstat leaves a link's mode alone.
        is_link = not follow and not isinstance(target, int) and stat.S_ISLNK(
            os.lstat(target).st_mode)
        if "mode" in attrs and not is_link:
            os.chmod(target, attrs["mode"] & 0o7777)
        if "uid" in attrs:
            os.chown(target, attrs["uid"], attrs["gid"], follow_symlinks=follow)
        if "mtime" in attrs:
            times = (attrs["atime"], attrs["mtime"])
            if isinstance(target, int):
                os.utime(target, times)
            else:
                os.utime(target, times, follow_symlinks=follow)

    def op_mkdir(self, req: Request, payload: bytes) -> Reply:
        os.mkdir(_path(req["path"]), req.get("mode", 0o777))
        return {}, b""

    def op_rmdir(self, req: Request, payload: bytes) -> Reply:
        os.rmdir(_path(req["path"]))
        return {}, b""

    def op_remove(self, req: Request, payload: bytes) -> Reply:
        path = _path(req["path"])
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        os.unlink(path)
        return {}, b""

    def op_rename(self, req: Request, payload: bytes) -> Reply:
        old, new = _path(req["old"]), _path(req["new"])
        if req.get("replace"):
            os.rename(old, new)
            return {}, b""
        # SFTP v3 rename must not replace: link+unlink for files (atomic), as sftp-server does.
        if stat.S_ISREG(os.lstat(old).st_mode):
            try:
                os.link(old, new)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
            else:
                os.unlink(old)
                return {}, b""
        if os.path.lexists(new):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        os.rename(old, new)
        return {}, b""

    def op_symlink(self, req: Request, payload: bytes) -> Reply:
        os.symlink(_path(req["target"]), _path(req["path"]))
        return {}, b""

    def op_link(self, req: Request, payload: bytes) -> Reply:
        os.link(_path(req["old"]), _path(req["new"]))
        return {}, b""

    def op_readlink(self, req: Request, payload: bytes) -> Reply:
        return {"target": _name(os.readlink(_path(req["path"])))}, b""

    def op_realpath(self, req: Request, payload: bytes) -> Reply:
        """The canonical path; with ``strict`` False only its last component may be missing
        (as OpenSSH's sftp-server allows), any other failure still counts."""
        path = _path(req["path"] or ".")
        real = os.path.realpath(path)
        try:
            os.stat(real)
        except FileNotFoundError:
            if req.get("strict", True):
                raise
            os.stat(os.path.dirname(real) or b"/")
        return {"path": _name(real)}, b""

    def op_statvfs(self, req: Request, payload: bytes) -> Reply:
        if "handle" in req:
            st = os.fstatvfs(self._fd(req["handle"]))
        else:
            st = os.statvfs(_path(req["path"]))
        fields = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_fsid", "f_flag", "f_namemax")
        return {"statvfs": {f: int(getattr(st, f, 0)) for f in fields}}, b""

    def op_fsync(self, req: Request, payload: bytes) -> Reply:
        os.fsync(self._fd(req["handle"]))
        return {}, b""

    def op_copy(self, req: Request, payload: bytes) -> Reply:
        src, dst = self._fd(req["source"]), self._fd(req["target"])
        offset, length, target = req["offset"], req["length"], req["target_offset"]
        copied = 0
        while length == 0 or copied < length:
            want = MAX_READ if length == 0 else min(MAX_READ, length - copied)
            data = os.pread(src, want, offset + copied)
            if not data:
                break
            os.pwrite(dst, data, target + copied)
            copied += len(data)
        return {"copied": copied}, b""

    def op_glob(self, req: Request, payload: bytes) -> Reply:
        return {"paths": sorted(_name(p) for p in glob.glob(_path(req["pattern"])))}, b""

    def op_which(self, req: Request, payload: bytes) -> Reply:
        for candidate in req["paths"]:
            if os.access(_path(candidate), os.X_OK) and os.path.isfile(_path(candidate)):
                return {"path": candidate}, b""
        return {"path": None}, b""

    def op_names(self, req: Request, payload: bytes) -> Reply:
        return {"users": {str(u): self._user(u) for u in req.get("uids", [])},
                "groups": {str(g): self._group(g) for g in req.get("gids", [])}}, b""


def serve(read_fd: int, write_fd: int, workers: int = WORKERS) -> None:
    """Serve requests from ``read_fd`` until it closes; replies go to ``write_fd``."""
    service = Service()
    jobs: "queue.Queue[Optional[Tuple[int, Request, bytes]]]" = queue.Queue()
    write_lock = threading.Lock()

    def reply(request_id: int, header: Dict[str, Any], payload: bytes) -> None:
        body = json.dumps(header).encode()
        frame = HEADER.pack(4 + 2 + len(body) + len(payload), request_id, len(body)) + body
        with write_lock:
            for part in (frame, payload):
                view = memoryview(part)
                while view:
                    view = view[os.write(write_fd, view):]

    def work() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            request_id, request, payload = job
            try:
                method = getattr(service, "op_" + str(request.get("op")), None)
                if method is None:
                    raise OSError(errno.ENOSYS, "unknown operation")
                header, data = method(request, payload)
                header["ok"] = True
            except OSError as exc:
                code = exc.errno or errno.EIO
                header, data = {"errno": code, "error": exc.strerror or str(exc)}, b""
            except Exception as exc:  # a bad request must not take the service down
                header, data = {"errno": errno.EINVAL, "error": str(exc)}, b""
            try:
                reply(request_id, header, data)
            except OSError:
                return

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    buffer = b""
    while True:
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 4:
            (length,) = struct.unpack_from(">I", buffer)
            if len(buffer) < 4 + length:
                break
            _, request_id, header_length = HEADER.unpack_from(buffer)
            start = HEADER.size
            request = json.loads(buffer[start:start + header_length])
            payload = buffer[start + header_length:4 + length]
            buffer = buffer[4 + length:]
            jobs.put((request_id, request, payload))
    for _ in threads:
        jobs.put(None)
    for thread in threads:  # let requests already read finish and reply
        thread.join()


if __name__ == "__main__":
    serve(sys.stdin.fileno(), sys.stdout.fileno())
