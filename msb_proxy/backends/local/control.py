"""Talking to the local backend's jail init (``jail.py``) from the host: one
``SOCK_SEQPACKET`` connection per request, each message one JSON object, descriptors passed
with ``SCM_RIGHTS``; and :class:`LocalProcess`, a jailed process whose pipes (or terminal) are
in our hands and whose control connection to the init reports its exit.

The sandbox (``backend.py``) and its named sessions (``sessions.py``) both speak through
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msb_proxy.backends.base import ExitStatus, ProcessListener, ProcessSpec
from msb_proxy.backends.processes import PipedProcess

__all__ = ["LocalProcess", "connect", "exchange", "ping", "process_request", "request"]

SEND_BUFFER = 8 << 20  # one spawn request carries the whole environment and command line
_UNIX_PATH_MAX = 107


def process_request(op: str, spec: ProcessSpec) -> dict[str, Any]:
    """What the jail init needs to fork the process ``spec`` describes."""
    request: dict[str, Any] = {
        "op": op, "program": spec.program, "argv": list(spec.argv),
        "env": dict(spec.env), "cwd": spec.cwd, "uid": spec.user.uid, "gid": spec.user.gid,
        "groups": list(spec.user.groups),
    }
    if spec.pty is not None:
        request["pty"] = {
            "cols": spec.pty.cols, "rows": spec.pty.rows,
            "px": spec.pty.pixel_width, "py": spec.pty.pixel_height,
            "modes": {str(k): v for k, v in spec.pty.modes.items()},
        }
    return request


class LocalProcess(PipedProcess):
    """A jailed process: its pipes (or terminal) in our hands, its control connection to init."""

    def __init__(self, control: socket.socket, fds: list[int], listener: ProcessListener,
                 pty: bool, init_gone: Callable[[], None] | None = None) -> None:
        super().__init__(fds, listener, pty)
        self._control = control
        self._init_gone = init_gone

    async def start(self) -> None:
        await super().start()
        self._loop.add_reader(self._control.fileno(), self._on_control)

    # ---- GuestProcess
    def send_signal(self, signum: int) -> None:
        self._send_control({"op": "signal", "sig": signum})

    def hangup(self) -> None:
        self._close_control()
        self.close_pipes()

    # ---- internals
    def _control_message(self, message: dict[str, Any]) -> None:
        """Called for a message of the init other than the exit; the default ignores it."""

    def _send_control(self, message: dict[str, Any]) -> None:
        if self._control.fileno() >= 0:
            with contextlib.suppress(OSError):
                self._control.send(json.dumps(message).encode())

    def _close_control(self) -> None:
        if self._control.fileno() >= 0:
            self._loop.remove_reader(self._control.fileno())
            self._control.close()

    def _on_control(self) -> None:
        try:
            data = self._control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            message = json.loads(data)
            if "exit" not in message:
                self._control_message(message)
                return
            status = ExitStatus.from_wait_status(int(message["exit"]))
        else:  # the init is gone, and the kernel killed everything in the sandbox with it
            status = ExitStatus(signal=signal.SIGKILL)
            if self._init_gone is not None:  # before the exit: the connection says why first
                self._init_gone()
        self._close_control()
        self.exited(status)


def _socket_address(path: Path) -> str:
    """``path``, or an equivalent short enough for a unix socket address."""
    text = str(path)
    if len(text.encode()) <= _UNIX_PATH_MAX:
        return text
    return f"/proc/self/fd/{_directory_fd(path.parent)}/{path.name}"


_dir_fds: dict[Path, int] = {}


def _directory_fd(directory: Path) -> int:
    if directory not in _dir_fds:
        _dir_fds[directory] = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return _dir_fds[directory]


async def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 32, SEND_BUFFER)  # SO_SNDBUFFORCE: we are root
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, _socket_address(path))
    except BaseException:
        sock.close()
        raise
    return sock


async def exchange(
    sock: socket.socket, message: dict[str, Any]
) -> tuple[dict[str, Any], list[int]]:
    """Send one request on ``sock`` and wait for its reply and any descriptors it carries."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, json.dumps(message).encode())
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4))
            break
        except (BlockingIOError, InterruptedError):
            await _readable(sock)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ConnectionResetError(errno.ECONNRESET, "the sandbox init closed the connection")
    return json.loads(data), fds


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def request(path: Path, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    sock = await connect(path)
    try:
        return await exchange(sock, message)
    finally:
        sock.close()


async def ping(path: Path) -> int | None:
    """The protocol version of the init listening at ``path``, or None if none answers."""
    try:
        reply, _ = await asyncio.wait_for(request(path, {"op": "ping"}), 5.0)
    except (OSError, TimeoutError, ValueError):
        return None
    return int(reply.get("protocol", 0)) if reply.get("ok") else None
