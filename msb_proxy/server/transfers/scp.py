"""Native legacy scp (``scp -O``): the ``scp -t`` / ``scp -f`` end, for guests without ``scp``.

OpenSSH's ``scp -O`` runs ``scp -t TARGET`` (upload) or ``scp -f PATH...`` (download) as an
exec command and speaks the old rcp protocol over the channel. When the guest has an ``scp``
binary it is run like any command; when it has none, this module takes its place, doing the
file work through :class:`~msb_proxy.server.transfers.files.GuestFiles` as the login user, so
ownership,
permissions and the home directory are the same as they would be with the guest's scp.

Protocol: control lines ``Cmode size name``, ``Dmode 0 name``, ``E``, ``Tmtime 0 atime 0``,
each answered by ``\\0`` (ok), ``\\1text`` (warning, go on) or ``\\2text`` (fatal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shlex
import stat
from dataclasses import dataclass, field

from msb_proxy.backends.base import ExitStatus, GuestProcess, ProcessListener
from msb_proxy.errors import UserError
from msb_proxy.server.transfers.files import Attrs, GuestFiles

__all__ = ["NativeScp", "ScpRequest", "parse_scp_command"]

CHUNK = 64 * 1024
INPUT_HIGH_WATER = 1 << 20


class ScpProtocolError(Exception):
    """The peer broke the protocol or gave up; the transfer ends with exit status 1."""


@dataclass(frozen=True)
class ScpRequest:
    """What an ``scp -t`` or ``scp -f`` command line asks for."""

    sink: bool  # -t: we receive files
    recursive: bool = False
    preserve: bool = False
    target_is_dir: bool = False
    paths: tuple[str, ...] = field(default_factory=tuple)


def parse_scp_command(command: str) -> ScpRequest | None:
    """The request if ``command`` is a legacy scp server invocation, else None."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words or posixpath.basename(words[0]) != "scp":
        return None
    sink = source = recursive = preserve = target_is_dir = False
    index = 1
    while index < len(words) and words[index].startswith("-") and words[index] != "-":
        word = words[index]
        index += 1
        if word == "--":
            break
        for flag in word[1:]:
            if flag == "t":
                sink = True
            elif flag == "f":
                source = True
            elif flag == "r":
                recursive = True
            elif flag == "p":
                preserve = True
            elif flag == "d":
                target_is_dir = True
            elif flag not in "vq":
                return None
    if sink == source:
        return None
    return ScpRequest(sink=sink, recursive=recursive, preserve=preserve,
                      target_is_dir=target_is_dir, paths=tuple(words[index:]))


class _Input:
    """Bytes from the channel, read as the protocol needs them."""

    def __init__(self, listener: ProcessListener) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._changed = asyncio.Event()
        self._listener = listener
        self._paused = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self._changed.set()
        if len(self._buffer) > INPUT_HIGH_WATER and not self._paused:
            self._paused = True
            self._listener.stdin_paused()

    def end(self) -> None:
        self._eof = True
        self._changed.set()

    async def _wait(self) -> None:
        if self._eof:
            raise ScpProtocolError("connection closed")
        self._changed.clear()
        await self._changed.wait()

    def _take(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        if self._paused and len(self._buffer) < INPUT_HIGH_WATER // 4:
            self._paused = False
            self._listener.stdin_resumed()
        return data

    async def read_some(self, limit: int) -> bytes:
        while not self._buffer:
            await self._wait()
        return self._take(min(limit, len(self._buffer)))

    async def read_byte(self) -> int:
        return (await self.read_some(1))[0]

    async def readline(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            await self._wait()
        return self._take(end + 1)[:-1]

    async def at_eof(self) -> bool:
        while not self._buffer and not self._eof:
            self._changed.clear()
            await self._changed.wait()
        return not self._buffer and self._eof


class NativeScp(GuestProcess):
    """The guest side of an ``scp -O`` transfer, run in the proxy over guest file operations."""

    def __init__(self, request: ScpRequest, files: GuestFiles, listener: ProcessListener,
                 home: str) -> None:
        self._request = request
        self._files = files
        self._listener = listener
        self._home = home
        self._input = _Input(listener)
        self._writable = asyncio.Event()
        self._writable.set()
        self._errors = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    # ---- GuestProcess
    def write_stdin(self, data: bytes) -> None:
        self._input.feed(data)

    def close_stdin(self) -> None:
        self._input.end()

    def pause_output(self) -> None:
        self._writable.clear()

    def resume_output(self) -> None:
        self._writable.set()

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        pass

    def send_signal(self, signum: int) -> None:
        if signum in (2, 9, 15):  # INT, KILL, TERM end a transfer as they would end scp
            self._task.cancel()

    def hangup(self) -> None:
        self._task.cancel()

    # ---- running
    async def _run(self) -> None:
        status = ExitStatus(code=1)
        try:
            if self._request.sink:
                await self._sink()
            else:
                await self._source()
            status = ExitStatus(code=1 if self._errors else 0)
        except ScpProtocolError as exc:
            if str(exc):
                self._stderr(f"scp: {exc}")
        except asyncio.CancelledError:
            status = ExitStatus(signal=15)
        except UserError as exc:
            self._stderr(f"scp: {exc}")
        except Exception as exc:  # the file service failed under us: fail the transfer, loudly
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._stderr(f"scp: {reason}")
        finally:
            self._files.close_service()
        self._listener.process_exited(status)

    async def _send(self, data: bytes) -> None:
        await self._writable.wait()
        self._listener.output_received(data, False)

    def _stderr(self, text: str) -> None:
        self._listener.output_received(text.encode("utf-8", "surrogateescape") + b"\n", True)

    def _check_service(self) -> None:
        """End the transfer at once when the guest file service is gone: no file can be read
        or written any more, so there is nothing to go on with, as when a guest scp is killed
        (not zeros sent for the rest of a download, not the rest of an upload read first)."""
        if self._files.lost:
            raise ScpProtocolError("the guest file service ended")

    async def _warn(self, text: str) -> None:
        """A per-file error: reported to the client, which goes on, and to stderr."""
        self._check_service()
        self._errors += 1
        await self._send(b"\x01scp: " + text.encode("utf-8", "surrogateescape") + b"\n")

    def _path(self, path: str) -> bytes:
        if path == "~" or path.startswith("~/"):
            path = self._home + path[1:]
        elif not path.startswith("/"):
            path = posixpath.join(self._home, path or ".")
        return path.encode("utf-8", "surrogateescape")

    async def _ack(self) -> None:
        """Wait for the peer's answer to what we sent: ok, a warning, or fatal."""
        code = await self._input.read_byte()
        if code == 0:
            return
        message = (await self._input.readline()).decode("utf-8", "replace")
        if code == 1:
            self._stderr(message)
            self._errors += 1
            return
        raise ScpProtocolError(message.removeprefix("scp: "))

    # ---- upload: the client sends, we write
    async def _sink(self) -> None:
        if len(self._request.paths) != 1:
            raise ScpProtocolError("ambiguous target")
        target = self._path(self._request.paths[0])
        try:
            target_attrs: Attrs | None = await self._files.stat(target)
        except OSError:
            target_attrs = None
        is_dir = target_attrs is not None and stat.S_ISDIR(target_attrs.mode)
        if self._request.target_is_dir and not is_dir:
            await self._send(b"\x02scp: " + target + b": Not a directory\n")
            raise ScpProtocolError("")
        await self._send(b"\0")
        await self._receive_into(target, is_dir, depth=0)

    async def _receive_into(self, directory: bytes, is_dir: bool, depth: int) -> None:
        times: tuple[int, int] | None = None
        while not await self._input.at_eof():
            line = (await self._input.readline()).decode("utf-8", "surrogateescape")
            kind, rest = line[:1], line[1:]
            if kind in ("\x01", "\x02"):
                self._stderr(rest)
                if kind == "\x02":
                    raise ScpProtocolError("")
                self._errors += 1
                continue
            if kind == "E":
                await self._send(b"\0")
                if depth == 0:
                    raise ScpProtocolError("unexpected E")
                return
            if kind == "T":
                fields = rest.split()
                times = (int(fields[2]), int(fields[0]))  # atime, mtime
                await self._send(b"\0")
                continue
            if kind not in ("C", "D"):
                await self._send(b"\x02scp: protocol error: unexpected line\n")
                raise ScpProtocolError("protocol error")
            mode_text, size_text, name = rest.split(" ", 2)
            if "/" in name or name in ("", ".", ".."):
                await self._send(b"\x02scp: error: unexpected filename: "
                                 + name.encode("utf-8", "surrogateescape") + b"\n")
                raise ScpProtocolError("")
            mode, size = int(mode_text, 8) & 0o7777, int(size_text)
            path = (directory.rstrip(b"/") + b"/" + name.encode("utf-8", "surrogateescape")
                    if is_dir else directory)
            if kind == "D":
                await self._receive_directory(path, mode, times, depth)
            else:
                await self._receive_file(path, mode, size, times)
            times = None

    async def _receive_directory(self, path: bytes, mode: int, times: tuple[int, int] | None,
                                 depth: int) -> None:
        if not self._request.recursive:
            await self._send(b"\x02scp: received directory without -r\n")
            raise ScpProtocolError("")
        try:
            existing = await self._files.stat(path)
            if not stat.S_ISDIR(existing.mode):
                raise NotADirectoryError(20, "Not a directory")
        except FileNotFoundError:
            try:
                await self._files.mkdir(path, mode | 0o700)
            except OSError as exc:
                await self._send(b"\x02scp: " + path + f": {exc.strerror}\n".encode())
                raise ScpProtocolError("") from None
        except OSError as exc:
            await self._send(b"\x02scp: " + path + f": {exc.strerror}\n".encode())
            raise ScpProtocolError("") from None
        await self._send(b"\0")
        await self._receive_into(path, True, depth + 1)
        attrs: dict[str, int] = {}
        if self._request.preserve:
            attrs["mode"] = mode
            if times is not None:
                attrs["atime"], attrs["mtime"] = times
        if attrs:
            try:
                await self._files.setstat(path, attrs)
            except OSError as exc:
                await self._warn(f"{path.decode(errors='replace')}: set mode: {exc.strerror}")

    async def _receive_file(self, path: bytes, mode: int, size: int,
                            times: tuple[int, int] | None) -> None:
        error: str | None = None
        handle: int | None = None
        try:
            handle = await self._files.open(path, os.O_WRONLY | os.O_CREAT, mode)
        except OSError as exc:
            error = f"{path.decode('utf-8', 'replace')}: {exc.strerror}"
        await self._send(b"\0")
        offset = 0
        while offset < size:
            chunk = await self._input.read_some(min(CHUNK, size - offset))
            if handle is not None and error is None:
                try:
                    await self._files.write(handle, offset, chunk)
                except OSError as exc:
                    self._check_service()
                    error = f"{path.decode('utf-8', 'replace')}: {exc.strerror}"
            offset += len(chunk)
        if handle is not None:
            try:
                if error is None:
                    await self._files.fsetstat(handle, {"size": size})
                    if self._request.preserve:
                        attrs = {"mode": mode}
                        if times is not None:
                            attrs["atime"], attrs["mtime"] = times
                        await self._files.fsetstat(handle, attrs)
            except OSError as exc:
                error = f"{path.decode('utf-8', 'replace')}: {exc.strerror}"
            try:
                await self._files.close(handle)
            except OSError as exc:  # a file system that reports write errors only here (NFS)
                self._check_service()
                error = error or f"{path.decode('utf-8', 'replace')}: close: {exc.strerror}"
        await self._ack()  # the sender's end-of-file byte
        if error is None:
            await self._send(b"\0")
        else:
            await self._warn(error)

    # ---- download: we read, the client receives
    async def _close_read(self, handle: int) -> None:
        """Close what was only read: as OpenSSH's scp, a failure here changes nothing sent,
        and must not hide the failure that brought us here."""
        with contextlib.suppress(OSError):
            await self._files.close(handle)

    async def _source(self) -> None:
        await self._ack()  # the sink says it is ready
        for pattern in self._request.paths:
            for path in await self._expand(pattern):
                await self._send_path(path)

    async def _expand(self, pattern: str) -> list[bytes]:
        path = self._path(pattern)
        if not any(ch in pattern for ch in "*?["):
            return [path]
        matches = await self._files.glob(path)
        if not matches:
            await self._warn(f"{pattern}: No such file or directory")
        return matches

    async def _send_path(self, path: bytes) -> None:
        shown = path.decode("utf-8", "replace")
        try:
            attrs = await self._files.stat(path)
        except OSError as exc:
            await self._warn(f"{shown}: {exc.strerror}")
            return
        # As OpenSSH's scp: a newline would end the control line, so it travels as \^J.
        name = (posixpath.basename(path.rstrip(b"/")) or b"/").replace(b"\n", b"\\^J")
        if self._request.preserve:
            await self._send(f"T{attrs.mtime} 0 {attrs.atime} 0\n".encode())
            await self._ack()
        if stat.S_ISDIR(attrs.mode):
            if not self._request.recursive:
                await self._warn(f"{shown}: not a regular file")
                return
            await self._send(f"D{attrs.mode & 0o7777:04o} 0 ".encode() + name + b"\n")
            await self._ack()
            try:
                handle = await self._files.opendir(path)
            except OSError as exc:
                await self._warn(f"{shown}: {exc.strerror}")
            else:
                try:
                    while entries := await self._files.readdir(handle):
                        for entry, _, _, _ in entries:
                            if entry not in (b".", b".."):
                                await self._send_path(path.rstrip(b"/") + b"/" + entry)
                finally:
                    await self._close_read(handle)
            await self._send(b"E\n")
            await self._ack()
            return
        if not stat.S_ISREG(attrs.mode):
            await self._warn(f"{shown}: not a regular file")
            return
        try:
            handle = await self._files.open(path, os.O_RDONLY)
        except OSError as exc:
            await self._warn(f"{shown}: {exc.strerror}")
            return
        try:
            await self._send(f"C{attrs.mode & 0o7777:04o} {attrs.size} ".encode() + name + b"\n")
            await self._ack()
            offset, failure = 0, None
            while offset < attrs.size:
                want = min(CHUNK, attrs.size - offset)
                data = b""
                if failure is None:
                    try:
                        data = await self._files.read(handle, offset, want)
                    except OSError as exc:
                        self._check_service()
                        failure = exc.strerror
                if len(data) < want:  # the file shrank or broke: keep the stream's promise
                    failure = failure or "file changed size"
                    data += bytes(want - len(data))
                await self._send(data)
                offset += want
        finally:
            await self._close_read(handle)
        if failure is None:
            await self._send(b"\0")
        else:
            await self._warn(f"{shown}: {failure}")
        await self._ack()
