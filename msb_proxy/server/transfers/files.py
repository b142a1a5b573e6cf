"""Guest file operations as the login user: the client of ``guest/files.py``.

:class:`GuestFiles` is what the native SFTP and scp servers work on. Each call is one request to
the file service running in the guest; many can be in flight at once, so pipelined SFTP
requests are served concurrently. Failures raise :class:`OSError` with the guest's errno and
message.

The service is the ``files`` guest helper, reached through a :class:`~msb_proxy.backends.links.Link`
(see :func:`open_files`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from msb_proxy.backends.base import GuestUser, Sandbox
from msb_proxy.backends.links import Link, split_frames

__all__ = ["Attrs", "GuestFiles", "open_files"]

_HEADER = struct.Struct(">IIH")


@dataclass(frozen=True)
class Attrs:
    """A file's metadata, as ``stat`` gives it."""

    size: int
    uid: int
    gid: int
    mode: int
    atime: int
    mtime: int
    nlink: int = 1

    @classmethod
    def from_wire(cls, data: dict[str, int]) -> Attrs:
        return cls(size=data["size"], uid=data["uid"], gid=data["gid"], mode=data["mode"],
                   atime=data["atime"], mtime=data["mtime"], nlink=data.get("nlink", 1))


def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


async def open_files(sandbox: Sandbox, user: GuestUser) -> GuestFiles:
    """Start the file service in ``sandbox`` as ``user`` (working in their home)."""
    link = await sandbox.start_helper(user, "files")
    client = FileServiceClient(link)
    link.attach(client)
    return GuestFiles(client)


class FileServiceClient:
    """The proxy end of the file-service protocol, over a helper link."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._send = link.send
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._buffer = bytearray()
        self.lost: Exception | None = None

    async def call(
        self, op: str, payload: bytes = b"", **args: Any
    ) -> tuple[dict[str, Any], bytes]:
        """Run ``op`` in the guest; return its reply header and payload, or raise OSError."""
        if self.lost is not None:
            raise OSError(errno.ECONNRESET, f"the guest file service is gone: {self.lost}")
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        header = json.dumps({"op": op, **args}).encode()
        future: asyncio.Future[tuple[dict[str, Any], bytes]] = (
            asyncio.get_running_loop().create_future())
        self._waiting[request_id] = future
        self._send(_HEADER.pack(4 + 2 + len(header) + len(payload), request_id, len(header))
                   + header + payload)
        reply, data = await future
        if not reply.get("ok"):
            code = int(reply.get("errno", errno.EIO))
            raise OSError(code, str(reply.get("error") or os.strerror(code)))
        return reply, data

    def link_data(self, data: bytes) -> None:
        self._buffer += data
        for frame in split_frames(self._buffer):
            _, request_id, header_length = _HEADER.unpack_from(frame)
            start = _HEADER.size
            reply = json.loads(frame[start:start + header_length])
            future = self._waiting.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result((reply, frame[start + header_length:]))

    def link_lost(self, exc: Exception | None) -> None:
        self.lost = exc or EOFError("closed")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(
                    OSError(errno.ECONNRESET, f"the guest file service ended: {self.lost}"))
        self._waiting.clear()

    def close(self) -> None:
        self._link.close()


class GuestFiles:
    """File operations in the guest, typed. Paths are bytes, as SFTP carries them."""

    def __init__(self, client: FileServiceClient) -> None:
        self._client = client

    async def open(self, path: bytes, flags: int, mode: int = 0o666) -> int:
        reply, _ = await self._client.call("open", path=_text(path), flags=flags, mode=mode)
        return int(reply["handle"])

    async def opendir(self, path: bytes) -> int:
        reply, _ = await self._client.call("opendir", path=_text(path))
        return int(reply["handle"])

    async def readdir(
        self, handle: int, count: int = 100
    ) -> list[tuple[bytes, Attrs, str, str]]:
        """Up to ``count`` entries: name, lstat attributes, owner name, group name."""
        reply, _ = await self._client.call("readdir", handle=handle, count=count)
        return [(_bytes(e["name"]), Attrs.from_wire(e), e["owner"], e["group"])
                for e in reply["entries"]]

    async def close(self, handle: int) -> None:
        await self._client.call("close", handle=handle)

    async def read(self, handle: int, offset: int, length: int) -> bytes:
        _, data = await self._client.call("read", handle=handle, offset=offset, length=length)
        return data

    async def write(self, handle: int, offset: int, data: bytes, append: bool = False) -> None:
        await self._client.call("write", data, handle=handle, offset=offset, append=append)

    async def stat(self, path: bytes, follow: bool = True) -> Attrs:
        reply, _ = await self._client.call("stat", path=_text(path), follow=follow)
        return Attrs.from_wire(reply["attrs"])

    async def fstat(self, handle: int) -> Attrs:
        reply, _ = await self._client.call("fstat", handle=handle)
        return Attrs.from_wire(reply["attrs"])

    async def setstat(self, path: bytes, attrs: dict[str, int], follow: bool = True) -> None:
        await self._client.call("setstat", path=_text(path), attrs=attrs, follow=follow)

    async def fsetstat(self, handle: int, attrs: dict[str, int]) -> None:
        await self._client.call("fsetstat", handle=handle, attrs=attrs)

    async def mkdir(self, path: bytes, mode: int = 0o777) -> None:
        await self._client.call("mkdir", path=_text(path), mode=mode)

    async def rmdir(self, path: bytes) -> None:
        await self._client.call("rmdir", path=_text(path))

    async def remove(self, path: bytes) -> None:
        await self._client.call("remove", path=_text(path))

    async def rename(self, old: bytes, new: bytes, replace: bool) -> None:
        await self._client.call("rename", old=_text(old), new=_text(new), replace=replace)

    async def symlink(self, target: bytes, path: bytes) -> None:
        await self._client.call("symlink", target=_text(target), path=_text(path))

    async def link(self, old: bytes, new: bytes) -> None:
        await self._client.call("link", old=_text(old), new=_text(new))

    async def readlink(self, path: bytes) -> bytes:
        reply, _ = await self._client.call("readlink", path=_text(path))
        return _bytes(reply["target"])

    async def realpath(self, path: bytes, strict: bool = True) -> bytes:
        reply, _ = await self._client.call("realpath", path=_text(path), strict=strict)
        return _bytes(reply["path"])

    async def statvfs(
        self, path: bytes | None = None, handle: int | None = None
    ) -> dict[str, int]:
        args: dict[str, Any] = (
            {"handle": handle} if handle is not None else {"path": _text(path or b"/")})
        reply, _ = await self._client.call("statvfs", **args)
        return dict(reply["statvfs"])

    async def fsync(self, handle: int) -> None:
        await self._client.call("fsync", handle=handle)

    async def copy(self, source: int, offset: int, length: int, target: int,
                   target_offset: int) -> int:
        reply, _ = await self._client.call("copy", source=source, target=target, offset=offset,
                                           length=length, target_offset=target_offset)
        return int(reply["copied"])

    async def glob(self, pattern: bytes) -> list[bytes]:
        """The paths matching the shell wildcard ``pattern``, sorted."""
        reply, _ = await self._client.call("glob", pattern=_text(pattern))
        return [_bytes(path) for path in reply["paths"]]

    async def which(self, paths: list[str]) -> str | None:
        """The first of ``paths`` that is an executable file for the user, or None."""
        reply, _ = await self._client.call("which", paths=paths)
        found = reply.get("path")
        return str(found) if found else None

    async def names(
        self, uids: list[int], gids: list[int]
    ) -> tuple[dict[int, str], dict[int, str]]:
        reply, _ = await self._client.call("names", uids=uids, gids=gids)
        return ({int(k): v for k, v in reply["users"].items()},
                {int(k): v for k, v in reply["groups"].items()})

    def close_service(self) -> None:
        """End the file service; in-flight calls fail."""
        self._client.close()

    @property
    def lost(self) -> bool:
        """Whether the file service has ended (every call fails from then on)."""
        return self._client.lost is not None
