"""Guest processes whose stdio is descriptors of this host: pipes, or a terminal's master side.

The local backend's jail init hands us the pipes or terminal of each process it forks; the fake
backend forks processes itself. Either way what flows through those descriptors, and how it is
paused, drained and closed, is the same; :class:`PipedProcess` owns that. A subclass says how the
process is signalled, how it is hung up, and reports its end with :meth:`PipedProcess.exited`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import os

from msb_proxy.backends.base import ExitStatus, GuestProcess, ProcessListener, RawPipes
from msb_proxy.backends.local import terminal
from msb_proxy.transport.batching import BatchedWriter, batch

__all__ = ["PIPE_SIZE", "PipedProcess", "enlarge_pipe"]

PTY_DRAIN_S = 0.2
STDIN_HIGH_WATER = 256 * 1024
# Reads of the guest's output: in 256 KiB a read and the packets made of it stay in the CPU's
# cache (1 GiB download: 4.2 s against 5.1 s with 1 MiB reads, 4.7 s with 64 KiB).
READ_SIZE = 256 << 10
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size


def enlarge_pipe(fd: int) -> None:
    """Give the pipe of ``fd`` ``PIPE_SIZE`` bytes where the kernel allows: fewer, larger reads
    and writes on the bulk data path."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


class PipedProcess(GuestProcess):
    """A guest process whose pipes (``[stdin, stdout, stderr]``) or terminal (``[master]``,
    or ``[input, output]`` pipes of a terminal someone else keeps: a named session) are ours,
    handed over in ``fds``; :meth:`start` takes them over."""

    def __init__(self, fds: list[int], listener: ProcessListener, pty: bool) -> None:
        self._fds = fds
        self._stdout_fd = self._stdin_fd = -1  # the pipes raw_pipes() hands out (no PTY)
        self._listener = listener
        self._pty = pty
        self._loop = asyncio.get_running_loop()
        self._stdin: BatchedWriter | None = None
        self._readers: list[asyncio.ReadTransport] = []
        self._open_outputs = 0
        self._status: ExitStatus | None = None
        self._reported = False
        self._paused = False
        self._drain_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        if self._pty:
            master = self._fds[-1]
            writer_fd = self._fds[0] if len(self._fds) == 2 else os.dup(master)
            readers = [(master, False)]
        else:
            writer_fd, stdout_fd, stderr_fd = self._fds
            readers = [(stdout_fd, False), (stderr_fd, True)]
        self._stdout_fd, self._stdin_fd = readers[0][0], writer_fd
        for fd, is_stderr in readers:
            transport, _ = await self._loop.connect_read_pipe(
                lambda e=is_stderr: _OutputReader(self, e),  # type: ignore[misc]
                os.fdopen(fd, "rb", buffering=0),
            )
            with contextlib.suppress(AttributeError):  # uvloop's reads are its own size
                transport.max_size = READ_SIZE  # type: ignore[attr-defined]
            self._readers.append(transport)
            self._open_outputs += 1
        stdin, _ = await self._loop.connect_write_pipe(
            lambda: _InputWriter(self._listener), os.fdopen(writer_fd, "wb", buffering=0)
        )
        stdin.set_write_buffer_limits(high=STDIN_HIGH_WATER)
        self._stdin = BatchedWriter(stdin)

    @abc.abstractmethod
    def send_signal(self, signum: int) -> None: ...

    @abc.abstractmethod
    def hangup(self) -> None:
        """Subclasses hang the process up their way, then :meth:`close_pipes`."""

    # ---- GuestProcess
    def raw_pipes(self) -> RawPipes | None:
        stdin = self._stdin
        if self._pty or not self._readers or stdin is None or self._readers[0].is_closing():
            return None
        if stdin.is_closing():
            return RawPipes(self._stdout_fd, -1, 0)
        return RawPipes(self._stdout_fd, self._stdin_fd, stdin.get_write_buffer_size())

    def write_stdin(self, data: bytes) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(data)

    def close_stdin(self) -> None:
        if not self._pty and self._stdin is not None and not self._stdin.is_closing():
            self._stdin.close()

    def pause_output(self) -> None:
        self._paused = True
        for reader in self._readers:
            if not reader.is_closing():
                reader.pause_reading()

    def resume_output(self) -> None:
        self._paused = False
        for reader in self._readers:
            if not reader.is_closing():
                reader.resume_reading()

    def close_output(self) -> None:
        for reader in self._readers:  # the guest's next write meets a closed pipe: SIGPIPE
            reader.close()

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        if self._pty and self._stdin is not None and not self._stdin.is_closing():
            fd = self._stdin.get_extra_info("pipe").fileno()
            with contextlib.suppress(OSError):
                terminal.set_window_size(fd, cols, rows, pixel_width, pixel_height)

    def send_break(self, msec: int) -> bool:
        if not self._pty or self._stdin is None or self._stdin.is_closing():
            return False
        import termios

        with contextlib.suppress(OSError):
            termios.tcsendbreak(self._stdin.get_extra_info("pipe").fileno(), 0)
        return True

    # ---- for subclasses
    def close_pipes(self) -> None:
        """Close stdin and the outputs now, whatever is still queued or unread."""
        self._abort_stdin()
        for reader in self._readers:
            reader.close()
        if self._drain_timer is not None:
            self._drain_timer.cancel()

    def exited(self, status: ExitStatus) -> None:
        """The process ended with ``status``: report it once its output is all delivered."""
        self._status = status
        if self._pty and self._open_outputs:
            # Output the process wrote may still sit in the terminal; read it, then hang up as
            # a terminal does when its session leader exits (background jobs get SIGHUP).
            self._drain_timer = self._loop.call_later(PTY_DRAIN_S, self._end_pty)
        self._maybe_report()

    # ---- internals
    def _abort_stdin(self) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.abort()

    def _end_pty(self) -> None:
        for reader in self._readers:
            pipe = reader.get_extra_info("pipe")
            with contextlib.suppress(OSError, ValueError):
                while chunk := os.read(pipe.fileno(), 65536):
                    self._listener.output_received(chunk, False)
            reader.close()

    def _output_closed(self) -> None:
        self._open_outputs -= 1
        self._maybe_report()

    def _maybe_report(self) -> None:
        if self._status is not None and self._open_outputs == 0 and not self._reported:
            self._reported = True
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self._abort_stdin()
            self._listener.process_exited(self._status)


class _OutputReader(asyncio.Protocol):
    def __init__(self, process: PipedProcess, is_stderr: bool) -> None:
        self._process = process
        self._is_stderr = is_stderr
        self._closed = False

    def data_received(self, data: bytes) -> None:
        batch(self._process._listener.output_received, data, self._is_stderr)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self._process._output_closed()


class _InputWriter(asyncio.Protocol):
    def __init__(self, listener: ProcessListener) -> None:
        self._listener = listener

    def pause_writing(self) -> None:
        self._listener.stdin_paused()

    def resume_writing(self) -> None:
        # Not synchronously: the listener answers with more writes and maybe a close, and
        # asyncio's pipe transport, still inside its write callback, would then close the pipe
        # with that new data unwritten.
        asyncio.get_running_loop().call_soon(self._listener.stdin_resumed)
