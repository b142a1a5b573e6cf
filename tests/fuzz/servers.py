"""Where a fuzz case's server runs, and what it did: in this process, or as ``msb-proxy stdio``.

:class:`InProcessServer` serves each connection with the :class:`~msb_proxy.server.endpoint.
SshServer` API on an event loop of its own thread, over a pipe pair through
:class:`~msb_proxy.transport.stdio.SshStdioStream`, exactly the transport ``msb-proxy stdio``
serves fd 0/1 with, so the fast path and its relay run as in production. It sees what a
process would only print: every uncaught exception asyncssh catches around our callbacks
(logged as "Uncaught exception", which ends the connection), every exception the event loop
reports (what the CLI prints as "internal error") and every fault that takes the fast path off
a connection.

:class:`ProcessServer` starts the real ``msb-proxy stdio`` per connection (cold: no warm server,
so the process measured is the one serving) and reports its exit status, stderr and peak RSS
(its ``VmHWM``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import asyncssh

from msb_proxy import fastpath
from msb_proxy.backends.local.backend import LocalBackend
from msb_proxy.config import SandboxTemplate
from msb_proxy.errors import UserError
from msb_proxy.server.endpoint import SshServer, SshServerOptions
from msb_proxy.state import StateDir
from msb_proxy.transport.stdio import SshStdioStream

__all__ = ["Connection", "Ending", "InProcessServer", "ProcessServer", "Server"]

PROXY = Path(sys.executable).parent / "msb-proxy"


@dataclass
class Ending:
    """How the server side of one connection ended."""

    ended: bool  # within the bound
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, loop errors
    exit_code: int | None = None  # the process's (ProcessServer)
    stderr: str = ""
    max_rss_kib: int | None = None
    decode_errors: int = 0  # see _decode_error


class Connection(Protocol):
    """One connection to a server: the client's two descriptors and the server's end."""

    read_fd: int  # the server's output
    write_fd: int  # the server's input

    def close_read(self) -> None:
        """Close the client's end of the server's output (idempotent)."""
        ...

    def finish(self, bound_s: float) -> Ending:
        """Wait up to ``bound_s`` for the server side to end (the client has closed its
        input), then report how it ended; kills what is still running past the bound."""
        ...


class Server(Protocol):
    def connect(self, fast: bool) -> Connection:
        """A new connection (``fast``: with the fast path)."""
        ...


class _Recorder(logging.Handler):
    """Keeps the log records that say an exception escaped (asyncssh's "Uncaught exception",
    the fast path's faults)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.decode_errors = 0  # asyncssh's own PacketDecodeError (see emit)

    def emit(self, record: logging.LogRecord) -> None:
        template = str(record.msg)  # asyncssh puts "[conn=N, chan=M] " in front
        if "Uncaught exception" in template or "after a fault" in template:
            message = record.getMessage()
            if record.exc_info and isinstance(record.exc_info, tuple) and record.exc_info[1]:
                error = record.exc_info[1]
                if _decode_error(error):
                    self.decode_errors += 1
                    return
                message += f": {type(error).__name__}: {error}"
                message += " at " + _where(error)
            self.lines.append(f"{record.name}: {message}")


def _decode_error(error: BaseException) -> bool:
    """asyncssh failing to decode a packet in its own code (its PacketDecodeError, a
    UnicodeDecodeError of a name it decodes, an IndexError on a packet that is too short, which
    it meets going on with its input buffer after an earlier error closed the connection).
    It ends the connection through its internal-error
    path instead of a protocol error; msb-proxy ends such a connection as it does any protocol
    error (``server/endpoint.py``), so it is counted, not reported."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return (isinstance(error, (UnicodeDecodeError, IndexError))
            or type(error).__name__ == "PacketDecodeError") and raised_in.startswith("asyncssh.")


def _where(error: BaseException) -> str:
    """The innermost frames of ``error``'s traceback (module:line), for a one-line report."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "?")
        frames.append(f"{module}:{tb.tb_lineno}")
        tb = tb.tb_next
    return " > ".join(frames[-4:])


class InProcessServer:
    """msb-proxy's server for ``sandbox`` of the local backend, in a thread of this process."""

    def __init__(self, home: Path, rootfs: Path, sandbox: str, authorized: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-server",
                                        daemon=True)
        self._thread.start()
        self.errors: list[str] = []
        self._recorder = _Recorder()
        for name in ("asyncssh", "msb_proxy"):
            logger = logging.getLogger(name)
            logger.addHandler(self._recorder)
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
        asyncssh.set_debug_level(1)  # "Uncaught exception" is a level-1 debug line
        backend = LocalBackend(StateDir(home), rootfs)
        template = SandboxTemplate(backend="local")
        key = asyncssh.generate_private_key("ssh-ed25519")
        self._servers = {
            fast: asyncio.run_coroutine_threadsafe(SshServer.prepare(
                backend, sandbox, SshServerOptions(
                    host_key=key, authorized_keys=[authorized], template=template,
                    connection_hooks=functools.partial(fastpath.install) if fast else None)),
                self._loop).result()
            for fast in (True, False)}

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        detail = (f"{type(exc).__name__}: {exc} at {_where(exc)}"
                  if isinstance(exc, BaseException) else str(context.get("message")))
        self.errors.append(f"event loop: {detail}")

    def take_decode_errors(self) -> int:
        """How many packets asyncssh failed to decode in its own code since the last call."""
        count, self._recorder.decode_errors = self._recorder.decode_errors, 0
        return count

    def take_errors(self) -> list[str]:
        """What went wrong since the last call."""
        found = self.errors + self._recorder.lines
        self.errors = []
        self._recorder.lines = []
        return found

    def connect(self, fast: bool) -> _InProcessConnection:
        to_server = os.pipe2(os.O_CLOEXEC)
        to_client = os.pipe2(os.O_CLOEXEC)
        future = asyncio.run_coroutine_threadsafe(
            self._serve(self._servers[fast], to_server[0], to_client[1]), self._loop)
        return _InProcessConnection(self, to_client[0], to_server[1], future)

    async def _serve(self, server: SshServer, read_fd: int, write_fd: int) -> str | None:
        """One connection; what it raised that the CLI would call an internal error."""
        try:
            await server.serve(SshStdioStream(read_fd, write_fd))
        except UserError:
            return None
        except Exception as exc:
            return f"serve raised {type(exc).__name__}: {exc} at {_where(exc)}"
        finally:
            # The transports close on the next turns of the loop; closing the descriptors
            # before that could hand their numbers to the next connection while still watched.
            await asyncio.sleep(0.05)
            os.close(read_fd)
            os.close(write_fd)
        return None

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class _InProcessConnection:
    def __init__(self, server: InProcessServer, read_fd: int, write_fd: int,
                 future: Future[str | None]) -> None:
        self._server = server
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._future = future
        self._read_open = True

    def close_read(self) -> None:
        if self._read_open:
            self._read_open = False
            os.close(self.read_fd)

    def finish(self, bound_s: float) -> Ending:
        self.close_read()
        try:
            raised = self._future.result(timeout=bound_s)
        except FutureTimeout:
            self._future.cancel()
            with contextlib.suppress(FutureTimeout, Exception):
                self._future.result(timeout=5)
            return Ending(False, self._server.take_errors())
        errors = self._server.take_errors()
        if raised:
            errors.append(raised)
        return Ending(True, errors, decode_errors=self._server.take_decode_errors())


class ProcessServer:
    """``msb-proxy stdio`` run per connection for ``sandbox`` with ``environ``."""

    def __init__(self, environ: Mapping[str, str], sandbox: str) -> None:
        self._environ = dict(environ, MSB_PROXY_WARM="0")
        self._sandbox = sandbox

    def connect(self, fast: bool) -> _ProcessConnection:
        environ = dict(self._environ, MSB_PROXY_FASTPATH="1" if fast else "0")
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed by finish())
        process = subprocess.Popen(
            [str(PROXY), "stdio", "--backend", "local", "--quiet", "--host-prefix", "msb-",
             f"msb-{self._sandbox}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=stderr, env=environ, start_new_session=True)
        return _ProcessConnection(process, stderr)


class _ProcessConnection:
    def __init__(self, process: subprocess.Popen[bytes], stderr: object) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stderr = stderr
        self.read_fd = process.stdout.fileno()
        self.write_fd = os.dup(process.stdin.fileno())  # the client closes its own copy
        process.stdin.close()
        # Not wait4's ru_maxrss: Linux carries the parent's resident size over fork and exec
        # into it (the fuzzer's own). VmHWM is the high-water mark of the process's own memory
        # since its exec, read until it exits.
        self._peak_kib = 0
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        path = f"/proc/{self._process.pid}/status"
        while True:
            try:
                with open(path, encoding="ascii") as status:
                    lines = [line for line in status if line.startswith("VmHWM:")]
            except OSError:
                return
            if not lines:  # a zombie: it has exited
                return
            self._peak_kib = max(self._peak_kib, int(lines[0].split()[1]))
            time.sleep(0.02)

    def close_read(self) -> None:
        assert self._process.stdout is not None
        self._process.stdout.close()

    def finish(self, bound_s: float) -> Ending:
        process = self._process
        deadline = time.monotonic() + bound_s
        self._sampler.join(max(0.0, deadline - time.monotonic()))  # it ends when the process does
        # The leader of a process with threads can be a zombie before the others have gone.
        while (pid_status := os.waitpid(process.pid, os.WNOHANG))[0] == 0 and (
                time.monotonic() < deadline):
            time.sleep(0.005)
        pid, status = pid_status
        ended = pid != 0
        if not ended:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            _, status = os.waitpid(process.pid, 0)
        process.returncode = 0  # reaped here; keep Popen from waiting again
        self._stderr.seek(0)  # type: ignore[attr-defined]
        text = self._stderr.read().decode("utf-8", "replace")  # type: ignore[attr-defined]
        self._stderr.close()  # type: ignore[attr-defined]
        self.close_read()
        code = os.waitstatus_to_exitcode(status)
        return Ending(ended, [], exit_code=code, stderr=text, max_rss_kib=self._peak_kib)
