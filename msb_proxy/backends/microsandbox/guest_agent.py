"""The host's end of the guest agent (``msb_proxy/guest/agent.py``): every process of one SSH
connection through one ``exec_stream``.

Without it each process would be an ``exec_stream`` of its own, and the SDK and its guest agent
would then decide things sshd decides otherwise (see ``backend``'s module docstring for the
list). With it, one exec of ``python3 -E -S -c <agent>`` as root per connection forks them all:

* one relay client per connection, however many channels it opens (the relay refuses its
  129th client: ``crates/runtime/lib/relay.rs``);
* real wait statuses, so every death by signal is an ``exit-signal``;
* terminals from the agent's own ``openpty``: the ``pty-req`` size (pixels too) and modes,
  ``SSH_TTY``, breaks, and no ``/bin/sh`` or ``stty`` needed; ``argv[0]`` as given
  (``-bash``); exactly the session's environment; sshd's working-directory fallback, checked
  as the login user;
* flow control both ways by credit: the agent sends a process's output only as far as we have
  taken it, and takes only as much of its stdin as it has written to it. The SDK drains every
  exec into an unbounded channel (``sdk/rust/lib/sandbox/exec.rs``) and the runtime's agent
  writes stdin in its one loop, waiting until the process has taken it all
  (``crates/agentd/lib/agent.rs``); bounded here, neither can grow without bound nor stall
  the sandbox.

Named sessions (``attach``) go through the agent to the guest's session keeper, a daemon the
agent starts and that outlives it (``msb_proxy/guest/agent.py``): the agent relays the
keeper's frames for the shell as if it were one of its own processes, so a hang-up detaches
instead of ending the shell, and a take-over is ``SessionListener.process_detached``. The
agent's source carries ``msb_proxy/guest/sessions.py`` ahead of it (``SOURCE``), as one
``python3 -c`` argument. ``ask`` puts the keeper's other questions (list, kill).

Memory, per process, at most: ``WINDOW`` (256 KiB) of output in flight between the agent and
us (in the SDK's channel or held while the session is paused) plus our stdin queue, which
stops the client past ``STDIN_HIGH_WATER`` (256 KiB), plus what the client had already sent.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import struct
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from msb_proxy.backends.base import (
    ExitStatus,
    GuestProcess,
    ProcessListener,
    ProcessSpec,
    SessionListener,
)
from msb_proxy.backends.links import split_frames
from msb_proxy.errors import SandboxError
from msb_proxy.guest import agent as protocol
from msb_proxy.guest import sessions
from msb_proxy.transport.batching import batch

if TYPE_CHECKING:
    import microsandbox

__all__ = ["AgentProcess", "AgentUnavailable", "GuestAgent", "in_background", "one_line"]

log = logging.getLogger(__name__)

# The agent and, ahead of it, the session bookkeeping its session keeper embeds.
SOURCE = "\n".join(Path(str(module.__file__)).read_text() for module in (sessions, protocol))
PROGRAM = "python3"
# -E: no PYTHON* variables of the guest; -S: no site packages, the standard library only.
ARGUMENTS = ["-E", "-S", "-c", SOURCE]
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT_S = 30.0
STDIN_HIGH_WATER = 256 * 1024
STDIN_LOW_WATER = 64 * 1024
WRITE_MAX = 64 * 1024  # bytes per ExecSink.write, which is one message to the runtime's agent
FRAME_MAX = WRITE_MAX - protocol.HEADER.size
STDERR_KEPT = 4096

_background: set[asyncio.Task[Any]] = set()


def in_background(coroutine: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
    """Run ``coroutine`` as a task that is referenced until it ends and whose failure is logged."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _background.add(task)
    task.add_done_callback(functools.partial(_task_done, what))
    return task


def _task_done(what: str, task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("%s failed: %s", what, exc, exc_info=exc)


class AgentUnavailable(Exception):
    """The guest cannot run the agent; the message says why (no python3, too old a one)."""


class GuestAgent:
    """One agent in the guest, the exec that runs it, and the processes it runs for us."""

    def __init__(self, name: str, sdk: ModuleType, handle: microsandbox.ExecHandle,
                 sink: microsandbox.ExecSink) -> None:
        self.name = name
        self.python = ""
        self._sdk = sdk
        self._handle = handle
        self._sink = sink
        self._processes: dict[int, AgentProcess] = {}
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._inbox = bytearray()
        self._outgoing = bytearray()
        self._outgoing_ready = asyncio.Event()
        self._stderr = bytearray()
        self._hello: asyncio.Future[dict[str, Any]] = \
            asyncio.get_running_loop().create_future()
        self._gone: str | None = None
        self._closing = False
        self._pump = in_background(self._pull(), "guest agent output pump")
        self._writer = in_background(self._push(), "guest agent input writer")

    @classmethod
    async def start(cls, name: str, sandbox: microsandbox.Sandbox,
                    sdk: ModuleType) -> GuestAgent:
        """Run the agent in ``sandbox`` and wait for its greeting.

        Raises :class:`AgentUnavailable` when the guest cannot run it.
        """
        try:
            handle: microsandbox.ExecHandle = await sandbox.exec_stream(
                PROGRAM, ARGUMENTS, cwd="/", user="root",
                env={"PATH": AGENT_PATH, "LC_ALL": "C.UTF-8"}, stdin=sdk.Stdin.pipe())
        except sdk.MicrosandboxError as exc:
            raise AgentUnavailable(f"cannot run {PROGRAM}: {one_line(exc)}") from None
        sink = handle.take_stdin()
        if sink is None:
            raise AgentUnavailable("the SDK gave no stdin to the agent")
        agent = cls(name, sdk, handle, sink)
        try:
            hello = await asyncio.wait_for(asyncio.shield(agent._hello), START_TIMEOUT_S)
        except TimeoutError:
            agent.close()
            raise AgentUnavailable(f"{PROGRAM} did not start the agent within "
                                   f"{START_TIMEOUT_S:g} s") from None
        except AgentUnavailable:
            agent.close()
            raise
        agent.python = str(hello.get("python", "?"))
        return agent

    @property
    def alive(self) -> bool:
        return self._gone is None and not self._closing

    async def spawn(self, spec: ProcessSpec, listener: ProcessListener) -> AgentProcess:
        """Start ``spec`` through the agent; :class:`SandboxError` when it cannot start."""
        if not self.alive:
            raise SandboxError(f"the guest agent is gone ({self._gone or 'closed'})")
        ident = self._take_ident()
        process = AgentProcess(self, ident, spec.pty is not None, listener)
        self._processes[ident] = process
        self.send(ident, protocol.SPAWN, json.dumps(_spawn_request(spec)).encode())
        await process.started
        return process

    async def attach(self, session: str, spec: ProcessSpec, listener: SessionListener,
                     timeout: float, run_dir: str) -> AgentProcess:
        """Attach to named session ``session`` through the guest's session keeper (under
        ``run_dir``), which starts ``spec`` as it when there is none; :class:`SandboxError`
        when it cannot (another user's, no terminal to be had)."""
        if not self.alive:
            raise SandboxError(f"the guest agent is gone ({self._gone or 'closed'})")
        ident = self._take_ident()
        process = AgentProcess(self, ident, True, listener, session=listener)
        self._processes[ident] = process
        request = {"name": session, "timeout": timeout, "user": spec.user.name,
                   "run_dir": run_dir, "spawn": _spawn_request(spec)}
        self.send(ident, protocol.ATTACH, json.dumps(request).encode())
        await process.started
        return process

    async def ask(self, op: int, request: dict[str, Any]) -> dict[str, Any]:
        """The keeper's answer to ``op`` (``SESSIONS``, ``KILL_SESSION``); SandboxError when
        it gives none."""
        if not self.alive:
            raise SandboxError(f"the guest agent is gone ({self._gone or 'closed'})")
        ident = self._take_ident()
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[ident] = answer
        self.send(ident, op, json.dumps(request).encode())
        try:
            found = await answer
        finally:
            self._answers.pop(ident, None)
        if "error" in found:
            raise SandboxError(str(found["error"]))
        return found

    def _take_ident(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    def send(self, ident: int, op: int, payload: bytes = b"") -> None:
        """Queue a frame for the agent; never blocks."""
        if not self.alive:
            return
        self._outgoing += protocol.frame(ident, op, payload)
        self._outgoing_ready.set()

    def forget(self, ident: int) -> None:
        self._processes.pop(ident, None)

    def close(self) -> None:
        """End the agent: its stdin closes, and it hangs up what it still runs and exits."""
        if self._closing:
            return
        self._closing = True
        self._outgoing_ready.set()  # the writer sends what is queued, then closes the sink
        for process in list(self._processes.values()):
            process.agent_gone("the connection is closing")

    # ---- internals
    async def _push(self) -> None:
        """Write queued frames to the agent's stdin in order, a message at a time."""
        try:
            while True:
                while not self._outgoing and not self._closing:
                    self._outgoing_ready.clear()
                    await self._outgoing_ready.wait()
                if self._outgoing:
                    chunk = bytes(self._outgoing[:WRITE_MAX])
                    del self._outgoing[:WRITE_MAX]
                    await self._sink.write(chunk)
                    continue
                await self._sink.close()
                return
        except self._sdk.MicrosandboxError as exc:
            self._lose(f"writing to it failed: {one_line(exc)}")

    async def _pull(self) -> None:
        """Take every event of the agent's exec as it comes: credits bound how much that is."""
        kinds = self._sdk.ExecEventType
        reason = "it ended"
        try:
            while True:
                event: microsandbox.ExecEvent | None = await self._handle.recv()
                if event is None:
                    break
                kind = event.event_type
                if kind == kinds.STDOUT and event.data:
                    # One batch: what the listeners write answering these frames leaves once.
                    batch(self._received, bytes(event.data))
                elif kind == kinds.STDERR and event.data:
                    self._stderr += event.data
                    del self._stderr[:-STDERR_KEPT]
                    log.debug("guest agent of %r: %s", self.name,
                              bytes(event.data).decode(errors="replace").rstrip())
                elif kind == kinds.FAILED:
                    said = bytes(event.data or b"").decode(errors="replace").strip()
                    reason = f"cannot run {PROGRAM}: {said}"
                    break
                elif kind == kinds.EXITED:
                    lines = self._stderr.decode(errors="replace").strip().splitlines()
                    reason = f"{PROGRAM} exited with status {event.code}" + (
                        f": {lines[-1]}" if lines else "")
                    break
        except self._sdk.MicrosandboxError as exc:
            reason = one_line(exc)
        self._lose(reason)

    def _received(self, data: bytes) -> None:
        self._inbox += data
        for frame in split_frames(self._inbox):
            _, ident, op = protocol.HEADER.unpack_from(frame)
            payload = frame[protocol.HEADER.size:]
            if op == protocol.HELLO:
                if not self._hello.done():
                    self._hello.set_result(json.loads(payload))
            elif op == protocol.ANSWER:
                if (answer := self._answers.get(ident)) is not None and not answer.done():
                    answer.set_result(json.loads(payload))
            elif (process := self._processes.get(ident)) is not None:
                process.frame_received(op, payload)

    def _lose(self, reason: str) -> None:
        if self._gone is not None:
            return
        self._gone = reason
        if not self._hello.done():
            self._hello.set_exception(AgentUnavailable(reason))
        for process in list(self._processes.values()):
            process.agent_gone(reason)
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(SandboxError(f"the guest agent is gone ({reason})"))
        self._writer.cancel()


class AgentProcess(GuestProcess):
    """A guest process the agent forked for us (see the module docstring)."""

    def __init__(self, agent: GuestAgent, ident: int, pty: bool,
                 listener: ProcessListener, session: SessionListener | None = None) -> None:
        self._agent = agent
        self._ident = ident
        self._pty = pty
        self._listener = listener
        self._session = session  # a named session's shell: it may be taken over
        self._loop = asyncio.get_running_loop()
        self.started: asyncio.Future[int] = self._loop.create_future()
        self._stdin = bytearray()  # not yet sent to the agent
        self._stdin_credit = protocol.WINDOW
        self._stdin_open = True
        self._eof_wanted = False
        self._eof_sent = False
        self._stdin_paused = False
        self._paused = False
        self._pending: deque[tuple[bytes, bool]] = deque()  # output held while paused
        self._output_closed = False
        self._status: ExitStatus | None = None
        self._reported = False
        self._hung_up = False

    # ---- from the agent
    def frame_received(self, op: int, payload: bytes) -> None:
        if op in (protocol.STDOUT, protocol.STDERR):
            if self._output_closed or self._hung_up:
                return
            stderr = op == protocol.STDERR
            if self._paused:
                self._pending.append((payload, stderr))
            else:
                self._deliver(payload, stderr)
        elif op == protocol.STDIN_CREDIT:
            self._stdin_credit += struct.unpack(">I", payload)[0]
            self._flush_stdin()
            if self._stdin_paused and len(self._stdin) <= STDIN_LOW_WATER:
                self._stdin_paused = False
                # Not from inside this callback: the listener answers with more writes.
                self._loop.call_soon(self._listener.stdin_resumed)
        elif op == protocol.STARTED:
            if not self.started.done():
                self.started.set_result(struct.unpack(">I", payload)[0])
        elif op == protocol.FAILED:
            self._agent.forget(self._ident)
            if not self.started.done():
                self.started.set_exception(SandboxError(payload.decode(errors="replace")))
        elif op == protocol.EXIT:
            self._agent.forget(self._ident)
            self._status = ExitStatus.from_wait_status(struct.unpack(">i", payload)[0])
            self._maybe_report()
        elif op == protocol.DETACHED and self._session is not None:
            self._agent.forget(self._ident)
            self._hung_up = True  # nothing more is reported, nor sent
            self._pending.clear()
            self._session.process_detached(payload.decode(errors="replace"))

    def agent_gone(self, reason: str) -> None:
        """The agent (or its VM, or the connection) is gone, and the process with it."""
        self._agent.forget(self._ident)
        if not self.started.done():
            self.started.set_exception(SandboxError(f"the guest agent is gone ({reason})"))
            return
        if self._session is not None and self._status is None and not self._hung_up:
            # The shell is the keeper's, not the agent's: it goes on without this connection.
            self._hung_up = True
            self._pending.clear()
            self._session.process_detached(f"the guest agent is gone ({reason}); the session "
                                           "goes on: connect again to get it back")
            return
        if self._status is None:
            self._status = ExitStatus(signal=signal.SIGKILL)
            self._pending.clear()
            self._maybe_report()

    # ---- GuestProcess
    def write_stdin(self, data: bytes) -> None:
        if not data or not self._stdin_open or self._hung_up or self._status is not None:
            return
        self._stdin += data
        self._flush_stdin()
        if not self._stdin_paused and len(self._stdin) > STDIN_HIGH_WATER:
            self._stdin_paused = True
            self._listener.stdin_paused()

    def close_stdin(self) -> None:
        if self._pty or not self._stdin_open:
            return
        self._stdin_open = False
        self._eof_wanted = True
        self._flush_stdin()

    def pause_output(self) -> None:
        self._paused = True

    def resume_output(self) -> None:
        self._paused = False
        while self._pending and not self._paused:
            data, stderr = self._pending.popleft()
            self._deliver(data, stderr)
        self._maybe_report()

    def close_output(self) -> None:
        if self._output_closed:
            return
        self._output_closed = True
        self._pending.clear()
        self._agent.send(self._ident, protocol.CLOSE_OUTPUT)
        self._maybe_report()

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        if self._pty and self._live():
            clamp = [max(0, min(value, 0xFFFF))
                     for value in (cols, rows, pixel_width, pixel_height)]
            self._agent.send(self._ident, protocol.RESIZE, struct.pack(">HHHH", *clamp))

    def send_signal(self, signum: int) -> None:
        if self._live():
            self._agent.send(self._ident, protocol.SIGNAL, struct.pack(">I", signum))

    def send_break(self, msec: int) -> bool:
        if not self._pty or not self._live():
            return False
        self._agent.send(self._ident, protocol.BREAK, struct.pack(">I", max(0, msec)))
        return True

    def hangup(self) -> None:
        if self._hung_up:
            return
        self._hung_up = True
        self._stdin.clear()
        self._pending.clear()
        if not self.started.done():
            self.started.cancel()
        if self._status is None:
            self._agent.send(self._ident, protocol.HANGUP)
        self._agent.forget(self._ident)

    # ---- internals
    def _live(self) -> bool:
        return self.started.done() and self._status is None and not self._hung_up

    def _deliver(self, data: bytes, stderr: bool) -> None:
        self._listener.output_received(data, stderr)
        self._agent.send(self._ident, protocol.CREDIT, struct.pack(">I", len(data)))

    def _flush_stdin(self) -> None:
        """Send queued input as far as the agent has room for it, then the end of input."""
        while self._stdin and self._stdin_credit > 0:
            size = min(len(self._stdin), self._stdin_credit, FRAME_MAX)
            self._agent.send(self._ident, protocol.STDIN, bytes(self._stdin[:size]))
            del self._stdin[:size]
            self._stdin_credit -= size
        if self._eof_wanted and not self._stdin and not self._eof_sent:
            self._eof_sent = True
            self._agent.send(self._ident, protocol.EOF)

    def _maybe_report(self) -> None:
        if (self._status is None or self._reported or self._hung_up
                or (self._pending and not self._output_closed)):
            return
        self._reported = True
        self._stdin.clear()
        self._listener.process_exited(self._status)


def _spawn_request(spec: ProcessSpec) -> dict[str, Any]:
    """``spec`` as the agent's SPAWN request (see ``msb_proxy/guest/agent.py``)."""
    pty = None if spec.pty is None else {
        "term": spec.pty.term, "cols": spec.pty.cols, "rows": spec.pty.rows,
        "px": spec.pty.pixel_width, "py": spec.pty.pixel_height,
        "modes": {str(opcode): value for opcode, value in spec.pty.modes.items()}}
    return {"program": spec.program, "argv": list(spec.argv), "env": dict(spec.env),
            "cwd": spec.cwd or "/", "uid": spec.user.uid, "gid": spec.user.gid,
            "groups": list(spec.user.groups) or [spec.user.gid], "pty": pty}


def one_line(exc: BaseException) -> str:
    """An SDK error's message on one line (the SDK's can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
