"""An in-process stand-in for the part of the microsandbox SDK (0.7.11) that msb-proxy calls.

microVMs cannot boot on our machines, so the ``microsandbox`` backend is tested against this: a
module-like :class:`StandInSDK`, passed as ``MicrosandboxBackend(state, sdk=...)``. It offers
exactly what the backend uses, with the names, signatures, event order and error messages of the
real SDK (checked against its stubs and its source: sdk/python/src/exec.rs,
sdk/rust/lib/sandbox/exec.rs, crates/agentd/lib/session.rs and process.rs):

* ``Sandbox.get(name)`` -> a handle with ``status`` (as of the call), ``connect()``, ``stop()``,
  ``remove()``; ``Sandbox.remove(name)``. Sandboxes are registered with
  :meth:`StandInSDK.add_sandbox`; ``get_error`` makes every ``get`` raise, to play a host that
  cannot run the runtime.
* ``sandbox.fs.read/exists`` on a host directory standing for the guest's root.
* ``sandbox.exec_stream`` and ``sandbox.exec`` run a REAL host process: the command with its
  arguments, environment and cwd, in a session of its own (a process group, as the agent makes
  it), on pipes or, with ``tty=True``, on a pseudo-terminal that starts at 24x80 and is its
  controlling terminal. So exit codes, signals, end of input and stderr are the kernel's.
* Events are pulled: ``recv()`` reads the process's output only when called, one chunk at a
  time, so a caller that stops pulling stops the process once its pipe is full. Order: STARTED,
  output, EXITED (code, or -1 for any death by signal, as the agent reports it); or FAILED alone
  (data: the agent's ``spawn "cmd": <error> (os error N)``, code: errno) when the process cannot
  be started. Then ``None``.
* ``recv``, ``wait``, ``signal``, ``kill`` and ``resize`` share one lock per handle, which
  ``recv`` holds until an event arrives, as in the real binding: a signal sent while a ``recv``
  waits on a silent process waits too. Cancelling that ``recv`` releases the lock.
* ``ExecSink.write(b"")`` closes stdin, as the real wire protocol does. A write the process can
  no longer take (its stdin is closed) becomes a ``STDIN_ERROR`` event, not an exception.

Where it knowingly differs from the real SDK:

* Processes run on the host as the test's own user: ``user`` is not applied, the file system is
  the host's (only ``fs`` calls use the stand-in root), and the environment is exactly ``env``
  (the agent merges it into its own).
* The real SDK moves events from the agent into an unbounded queue whether or not anyone calls
  ``recv()``; here the process itself blocks, which is what a test of "stop pulling while paused"
  needs to observe.
* ``ExecSink.write`` returns once the bytes are in the process's pipe or terminal, not once the
  agent has them; ``close()`` on a terminal does nothing.
* ``handle.stop()`` only changes the recorded status: processes keep running.
* Error messages other than the observed ones (sandbox not found, not running; see
  shared/reference/upstream-msb-ssh.md) and the agent's spawn failure are plausible wordings.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import json
import os
import signal as _signal
import struct
import subprocess
import termios
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = [
    "ExecEvent",
    "ExecEventType",
    "ExecFailedError",
    "MicrosandboxError",
    "PathNotFoundError",
    "RuntimeIncompleteError",
    "RuntimeNotInstalledError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxStatus",
    "SandboxStillRunningError",
    "StandInSDK",
    "Stdin",
]

READ_CHUNK = 16 * 1024
DEFAULT_ROWS, DEFAULT_COLS = 24, 80


class SandboxStatus(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    CRASHED = "crashed"
    DRAINING = "draining"
    PAUSED = "paused"


class ExecEventType(enum.StrEnum):
    STARTED = "started"
    STDOUT = "stdout"
    STDERR = "stderr"
    EXITED = "exited"
    FAILED = "failed"
    STDIN_ERROR = "stdin_error"


class StdinMode(enum.StrEnum):
    NULL = "null"
    PIPE = "pipe"
    BYTES = "bytes"


@dataclass(frozen=True)
class Stdin:
    """How a command gets its stdin: nothing, a pipe the caller writes, or fixed bytes."""

    mode: StdinMode
    data: bytes | None = None

    @classmethod
    def null(cls) -> Stdin:
        return cls(StdinMode.NULL)

    @classmethod
    def pipe(cls) -> Stdin:
        return cls(StdinMode.PIPE)

    @classmethod
    def bytes(cls, data: bytes) -> Stdin:
        return cls(StdinMode.BYTES, data)


class MicrosandboxError(Exception):
    """Base of every SDK error; one string argument, as the real classes take from Rust."""


class RuntimeNotInstalledError(MicrosandboxError):
    pass


class RuntimeIncompleteError(MicrosandboxError):
    pass


class SandboxNotFoundError(MicrosandboxError):
    pass


class SandboxNotRunningError(MicrosandboxError):
    pass


class SandboxStillRunningError(MicrosandboxError):
    pass


class ExecFailedError(MicrosandboxError):
    pass


class PathNotFoundError(MicrosandboxError):
    pass


class FilesystemError(MicrosandboxError):
    pass


@dataclass(frozen=True)
class ExecEvent:
    event_type: ExecEventType
    pid: int | None = None
    data: bytes | None = None
    code: int | None = None


@dataclass(frozen=True)
class ExecOutput:
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    @property
    def stdout_text(self) -> str:
        return self.stdout_bytes.decode()

    @property
    def stderr_text(self) -> str:
        return self.stderr_bytes.decode()


_LIVE = frozenset({SandboxStatus.RUNNING, SandboxStatus.STARTING, SandboxStatus.PAUSED,
                   SandboxStatus.DRAINING})


@dataclass
class SandboxRecord:
    """A sandbox as the stand-in runtime knows it."""

    name: str
    root: Path
    status: SandboxStatus


class StandInSDK(ModuleType):
    """The ``microsandbox`` module as far as msb-proxy uses it, over host processes."""

    def __init__(self) -> None:
        super().__init__("microsandbox_standin")
        self.sandboxes: dict[str, SandboxRecord] = {}
        self.processes: list[ExecHandle] = []
        self.get_error: MicrosandboxError | None = None
        self.Sandbox = SandboxApi(self)
        self.SandboxStatus = SandboxStatus
        self.ExecEventType = ExecEventType
        self.Stdin = Stdin
        self.MicrosandboxError = MicrosandboxError
        self.RuntimeNotInstalledError = RuntimeNotInstalledError
        self.RuntimeIncompleteError = RuntimeIncompleteError
        self.SandboxNotFoundError = SandboxNotFoundError
        self.SandboxNotRunningError = SandboxNotRunningError
        self.SandboxStillRunningError = SandboxStillRunningError
        self.ExecFailedError = ExecFailedError
        self.PathNotFoundError = PathNotFoundError
        self.FilesystemError = FilesystemError

    def add_sandbox(self, name: str, root: Path,
                    status: SandboxStatus = SandboxStatus.RUNNING) -> SandboxRecord:
        """Register sandbox ``name`` whose guest file system is the host directory ``root``."""
        record = SandboxRecord(name, root, status)
        self.sandboxes[name] = record
        return record

    def close(self) -> None:
        """Kill and reap every process still running; for test teardown."""
        for handle in self.processes:
            handle.dispose()


class SandboxApi:
    """``microsandbox.Sandbox``'s static methods, bound to one stand-in runtime."""

    def __init__(self, sdk: StandInSDK) -> None:
        self._sdk = sdk

    async def get(self, name: str) -> SandboxHandle:
        if self._sdk.get_error is not None:
            raise self._sdk.get_error
        return SandboxHandle(self._sdk, self._record(name))

    async def remove(self, name: str) -> None:
        record = self._record(name)
        if record.status in _LIVE:
            raise SandboxStillRunningError(f"sandbox '{name}' is still running")
        del self._sdk.sandboxes[name]

    def _record(self, name: str) -> SandboxRecord:
        try:
            return self._sdk.sandboxes[name]
        except KeyError:
            raise SandboxNotFoundError(f"sandbox not found: {name}") from None


class SandboxHandle:
    """Metadata of one sandbox as of ``Sandbox.get``, and its lifecycle calls."""

    def __init__(self, sdk: StandInSDK, record: SandboxRecord) -> None:
        self._sdk = sdk
        self._record = record
        self.name = record.name
        self.status = record.status

    async def connect(self, timeout: float | None = None) -> Sandbox:
        self._check_running()
        return Sandbox(self._sdk, self._record)

    async def stop(self, timeout: float | None = None) -> None:
        if self._record.status not in _LIVE:
            self._check_running()
        self._record.status = SandboxStatus.STOPPED

    async def remove(self) -> None:
        await self._sdk.Sandbox.remove(self.name)

    def _check_running(self) -> None:
        status = self._record.status
        if status != SandboxStatus.RUNNING:
            raise SandboxNotRunningError(
                f"sandbox '{self.name}' is not running (status: {status.value.capitalize()})")


class Sandbox:
    """A connected sandbox: its file system and command execution."""

    def __init__(self, sdk: StandInSDK, record: SandboxRecord) -> None:
        self._sdk = sdk
        self._record = record
        self.fs = SandboxFsOps(record.root)

    async def exec_stream(
        self,
        cmd: str,
        args: list[str] | None = None,
        *,
        cwd: str | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: Stdin | bytes | None = None,
        tty: bool = False,
    ) -> ExecHandle:
        if self._record.status != SandboxStatus.RUNNING:
            raise SandboxNotRunningError(f"sandbox '{self._record.name}' is not running")
        if isinstance(stdin, bytes):
            stdin = Stdin.bytes(stdin)
        handle = ExecHandle(cmd, list(args or []), cwd=cwd, env=dict(env or {}),
                            stdin=stdin or Stdin.null(), tty=tty)
        self._sdk.processes.append(handle)
        return handle

    async def exec(
        self,
        cmd: str,
        args: list[str] | None = None,
        *,
        cwd: str | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: Stdin | bytes | None = None,
        tty: bool = False,
    ) -> ExecOutput:
        handle = await self.exec_stream(cmd, args, cwd=cwd, user=user, env=env, stdin=stdin,
                                        tty=tty)
        return await handle.collect()


class SandboxFsOps:
    """The guest file system, played by the host directory ``root``."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, path: str) -> Path:
        return self._root / path.lstrip("/")

    async def read(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except FileNotFoundError:
            raise PathNotFoundError(f"path not found: {path}") from None
        except OSError as exc:
            raise FilesystemError(f"{path}: {exc.strerror}") from None

    async def exists(self, path: str) -> bool:
        return self._path(path).exists()


class ExecSink:
    """The stdin of one process: its pipe, or its terminal."""

    def __init__(self, handle: ExecHandle) -> None:
        self._handle = handle

    async def write(self, data: bytes) -> None:
        if not data:  # the wire protocol's end of input is an empty write
            await self.close()
            return
        await self._handle.write_stdin(data)

    async def close(self) -> None:
        self._handle.close_stdin()


class ExecHandle:
    """One command running on the host, seen as the SDK shows a command in the guest."""

    def __init__(self, cmd: str, args: list[str], *, cwd: str | None, env: dict[str, str],
                 stdin: Stdin, tty: bool) -> None:
        self.id = str(id(self))
        self._lock = asyncio.Lock()
        self._events: deque[ExecEvent] = deque()
        self._outputs: dict[int, bool] = {}  # open output fd -> whether it is stderr
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._ended = False
        self._tty = tty
        self._master: int | None = None
        self._stdin_fd: int | None = None
        self._sink: ExecSink | None = None
        self._pidfd: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self._start([cmd, *args], cwd, env, stdin)
        except OSError as exc:
            message = f"spawn {json.dumps(cmd)}: {exc.strerror} (os error {exc.errno})"
            self._events.append(ExecEvent(ExecEventType.FAILED, data=message.encode(),
                                          code=exc.errno))
            self._ended = True

    def _start(self, argv: list[str], cwd: str | None, env: dict[str, str],
               stdin: Stdin) -> None:
        if self._tty:
            master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ,
                        struct.pack("HHHH", DEFAULT_ROWS, DEFAULT_COLS, 0, 0))
            try:
                # preexec_fn is safe here: the tests start no threads that could hold a lock
                # across the fork, and nothing else makes the terminal controlling before exec.
                process = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                    start_new_session=True,
                    preexec_fn=_take_controlling_terminal,  # noqa: PLW1509
                )
            except OSError:
                os.close(master)
                raise
            finally:
                os.close(slave)
            os.set_blocking(master, False)
            self._master = master
            self._outputs[master] = False
            if stdin.mode != StdinMode.NULL:
                # A descriptor of its own: the reader closes the master at end of output.
                self._stdin_fd = os.dup(master)
        else:
            process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL if stdin.mode == StdinMode.NULL else subprocess.PIPE,
                start_new_session=True,
            )
            assert process.stdout is not None and process.stderr is not None
            for stream, is_stderr in ((process.stdout, False), (process.stderr, True)):
                fd = os.dup(stream.fileno())
                stream.close()
                os.set_blocking(fd, False)
                self._outputs[fd] = is_stderr
            if process.stdin is not None:
                self._stdin_fd = os.dup(process.stdin.fileno())
                process.stdin.close()
                os.set_blocking(self._stdin_fd, False)
        self.process = process
        self._events.append(ExecEvent(ExecEventType.STARTED, pid=process.pid))
        self._watch_exit(process)
        if stdin.mode == StdinMode.PIPE:
            self._sink = ExecSink(self)
        elif stdin.mode == StdinMode.BYTES:
            task = asyncio.get_running_loop().create_task(self._feed(stdin.data or b""))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _feed(self, data: bytes) -> None:
        await self.write_stdin(data)
        self.close_stdin()

    def _watch_exit(self, process: subprocess.Popen[bytes]) -> None:
        """Reap the process as soon as it exits, pulled or not, as the agent's reaper does."""
        loop = asyncio.get_running_loop()
        pidfd = self._pidfd = os.pidfd_open(process.pid)

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._pidfd = None
            code = process.wait()
            if not self._exit.done():
                self._exit.set_result(code if code >= 0 else -1)

        loop.add_reader(pidfd, exited)

    # ---- the SDK surface
    def take_stdin(self) -> ExecSink | None:
        sink, self._sink = self._sink, None
        return sink

    async def recv(self) -> ExecEvent | None:
        async with self._lock:
            return await self._next_event()

    def __aiter__(self) -> ExecHandle:
        return self

    async def __anext__(self) -> ExecEvent:
        event = await self.recv()
        if event is None:
            raise StopAsyncIteration
        return event

    async def wait(self) -> tuple[int, bool]:
        async with self._lock:
            while (event := await self._next_event()) is not None:
                if event.event_type == ExecEventType.EXITED:
                    code = event.code if event.code is not None else -1
                    return code, code == 0
                if event.event_type == ExecEventType.FAILED:
                    raise ExecFailedError((event.data or b"").decode())
        raise MicrosandboxError("exec session ended without exit event")

    async def collect(self) -> ExecOutput:
        stdout, stderr = bytearray(), bytearray()
        async with self._lock:
            while (event := await self._next_event()) is not None:
                if event.event_type == ExecEventType.STDOUT:
                    stdout += event.data or b""
                elif event.event_type == ExecEventType.STDERR:
                    stderr += event.data or b""
                elif event.event_type == ExecEventType.EXITED:
                    return ExecOutput(event.code if event.code is not None else -1,
                                      bytes(stdout), bytes(stderr))
                elif event.event_type == ExecEventType.FAILED:
                    raise ExecFailedError((event.data or b"").decode())
        raise MicrosandboxError("exec session ended without exit event")

    async def signal(self, sig: int) -> None:
        async with self._lock:
            if self.process is not None and not self._exit.done():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)

    async def kill(self) -> None:
        await self.signal(_signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        async with self._lock:
            if self._master is not None and not self._ended:
                fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    # ---- what ExecSink does
    async def write_stdin(self, data: bytes) -> None:
        """Write all of ``data`` to the process, waiting while its pipe or terminal is full."""
        view = memoryview(data)
        while view:
            if self._stdin_fd is None:
                self._stdin_failed(OSError(errno.EPIPE, os.strerror(errno.EPIPE)))
                return
            try:
                view = view[os.write(self._stdin_fd, view):]
            except BlockingIOError:
                await _ready(self._stdin_fd, writable=True)
            except OSError as exc:
                self._stdin_failed(exc)
                return

    def close_stdin(self) -> None:
        """End the process's input; a terminal has no end of input, so it stays open."""
        if not self._tty and self._stdin_fd is not None:
            os.close(self._stdin_fd)
            self._stdin_fd = None

    # ---- internals
    def _stdin_failed(self, exc: OSError) -> None:
        self._events.append(ExecEvent(ExecEventType.STDIN_ERROR, data=str(exc).encode(),
                                      code=exc.errno))

    async def _next_event(self) -> ExecEvent | None:
        if self._events:
            return self._events.popleft()
        if self._ended:
            return None
        while self._outputs:
            fd = await _ready(*self._outputs)
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:  # EIO: every holder of the terminal has closed it
                data = b""
            if data:
                kind = ExecEventType.STDERR if self._outputs[fd] else ExecEventType.STDOUT
                return ExecEvent(kind, data=data)
            self._close_output(fd)
        code = await self._exit
        self._ended = True
        return ExecEvent(ExecEventType.EXITED, code=code)

    def _close_output(self, fd: int) -> None:
        del self._outputs[fd]
        if fd == self._master:
            self._master = None
        os.close(fd)

    def dispose(self) -> None:
        """Kill the process group if it still runs, reap it, and close every descriptor."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, _signal.SIGKILL)
            process.wait()
        for fd in [*self._outputs, self._stdin_fd, self._pidfd]:
            if fd is not None:
                os.close(fd)
        self._outputs.clear()
        self._stdin_fd = self._pidfd = self._master = None


def _take_controlling_terminal() -> None:
    """In the child, after ``setsid``: make stdin, the terminal, its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def _ready(*fds: int, writable: bool = False) -> int:
    """Wait until one of ``fds`` is readable (or ``writable``); return which."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    watch = loop.add_writer if writable else loop.add_reader
    unwatch = loop.remove_writer if writable else loop.remove_reader

    def woken(fd: int) -> None:
        if not ready.done():
            ready.set_result(fd)

    for fd in fds:
        watch(fd, woken, fd)
    try:
        return await ready
    finally:
        for fd in fds:
            unwatch(fd)
