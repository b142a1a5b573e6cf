"""The ``microsandbox`` backend: each sandbox is a microVM run by the microsandbox SDK.

This module owns the translation between the seam in ``base`` and the SDK (``microsandbox`` 0.7),
which is imported on first use rather than with this module (it costs ~0.3 s of every ``ssh``).
A sandbox is found by name and must already be running: ``open`` never creates, starts or
resumes one, and its error says how to. Nothing falls back to another backend: where the host
cannot run microVMs the error says so and names the local backend.

SDK calls made, and what for:

* ``Sandbox.get(name)`` -> ``SandboxHandle``: ``.status``, ``.connect()`` (open), ``.stop()``
  (stop, remove); ``Sandbox.remove(name)`` (remove).
* ``sandbox.fs.read`` of ``/etc/passwd`` and ``/etc/group`` (users), ``sandbox.fs.exists`` (cwd).
* ``sandbox.exec_stream(cmd, args, cwd=, user=, env=, stdin=Stdin.pipe(), tty=)`` ->
  ``ExecHandle``, one per SSH process: ``recv()`` pulled by one task, ``take_stdin()`` ->
  ``ExecSink.write/close`` driven by a second, ``resize(rows, cols)`` once before the first
  ``recv()``, ``signal(SIGHUP)`` on hang-up.
* ``sandbox.exec(...)`` of ``/bin/sh`` running ``kill`` or ``stty`` for SSH ``signal`` and
  ``window-change`` requests. The SDK's ``ExecHandle`` guards ``recv``, ``signal`` and ``resize``
  with one lock that ``recv`` holds until the next event arrives (sdk/python/src/exec.rs), so on
  a process that is silent (``sleep``, a shell at its prompt) those calls would wait for its next
  output. Cancelling the pending ``recv`` would free the lock but can lose an event. So signals
  and later resizes go out of band, to the process group the ``STARTED`` event's pid leads.

How an SSH process maps onto ``exec_stream``:

* The SDK runs ``cmd`` with ``argv[0] = cmd``. A login shell (``argv[0]`` ``-bash``) is started
  as ``bash -l`` instead: the same start-up files and ``login_shell`` state, but ``$0`` is the
  program path. Any other ``argv[0]`` is dropped: POSIX sh has no ``exec -a`` to set it.
* With a terminal, the program runs under a small ``/bin/sh`` wrapper that applies the
  ``pty-req`` size and modes with ``stty`` (the SDK's terminal starts at 24x80 with the guest's
  default modes), exports ``SSH_TTY`` from ``tty``, then ``exec``s the program.
* A ``cwd`` that ``fs.exists`` does not find is replaced by ``/`` with sshd's note, as ``base``
  asks (the agent would fail the spawn instead).
* Exit: ``EXITED`` carries the code. The guest agent reports every death by signal as code -1
  (crates/agentd/lib/process.rs), so the signal is lost: it is reported as the last terminating
  signal an SSH ``signal`` request sent, and otherwise as exit status 255, the status OpenSSH's
  client itself exits with when the remote command was killed by a signal. ``FAILED`` in place of
  ``STARTED`` (the program could not be started) makes ``spawn`` raise ``SandboxError``.

Known gaps versus the local backend:

* A death by signal nobody sent through SSH is exit status 255, not ``exit-signal``; the
  core-dumped flag is never set.
* Output flow control stops at the SDK: while paused we stop calling ``recv()`` and hold at most
  one event, but the SDK's Rust layer drains the agent into an unbounded channel
  (sdk/rust/lib/sandbox/exec.rs), so a fast guest is not slowed and a paused session's output
  queues in the SDK.
* Input flow control likewise: ``ExecSink.write`` returns once the agent has the bytes, so our
  256 KiB buffer stays bounded, but a guest that does not read its stdin is buffered for by the
  agent.
* ``$0`` is the program path (``/bin/bash: line 1: x: command not found``); login shells get
  ``-l`` instead of a ``-`` in ``argv[0]``.
* The agent merges our environment into its own instead of starting from an empty one.
* Terminals: modes and size need ``/bin/sh``, ``stty`` and ``tty`` in the guest (without them
  the size comes from ``resize``, the modes stay the guest's defaults and ``SSH_TTY`` is unset);
  pixel sizes are dropped (the SDK's resize has rows and columns only); ``break`` is not sent;
  a missing program exits 127 with the wrapper's message instead of raising ``SandboxError``.
* Each signal or window change costs one short ``exec`` in the guest.
* The cwd check runs with the SDK's file API, not as the login user: a home directory the user
  may not enter fails the spawn instead of falling back to ``/``.
* Hang-up sends SIGHUP and closes stdin; output of work that survives it (``nohup``) still flows
  to the agent, where a local pipe would have been closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shlex
import signal
from collections import deque
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import (
    BackendUnavailableError,
    SandboxError,
    SandboxNotRunningError,
    UnknownUserError,
    UserError,
)
from ..state import StateDir
from .base import (
    Backend,
    ExitStatus,
    GuestProcess,
    GuestUser,
    ProcessListener,
    ProcessSpec,
    PtySpec,
    Sandbox,
)

if TYPE_CHECKING:
    import microsandbox

__all__ = ["MicrosandboxBackend", "MicrosandboxProcess", "MicrosandboxSandbox"]

log = logging.getLogger(__name__)

STDIN_HIGH_WATER = 256 * 1024
STDIN_LOW_WATER = 64 * 1024
STDIN_WRITE_MAX = 64 * 1024  # bytes per ExecSink.write, which is one agent message
FAILED_EXIT_CODE = 127
UNKNOWN_SIGNAL_EXIT_CODE = 255  # what OpenSSH's client exits with after an exit-signal
LOCAL_BACKEND_HINT = "use the local backend instead: --backend local or MSB_PROXY_BACKEND=local"
# Statuses in which a sandbox has a VM to stop.
_LIVE_STATUSES = frozenset({"running", "starting", "paused", "draining"})
# Messages by which the runtime says it cannot boot a VM on this host.
_CANNOT_BOOT = ("/dev/kvm", "KVM_EXIT_INTERNAL_ERROR", "before agent relay became available",
                "virtualization is not available")
# Signals whose default action does not end the process: sending one says nothing about a death.
_HARMLESS_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                               signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})

# SSH terminal-mode opcodes (RFC 4254 section 8) as Linux stty settings. PENDIN is left out:
# GNU stty rejects it on Linux, and it is never worth a failed batch.
_STTY_CHARS = {1: "intr", 2: "quit", 3: "erase", 4: "kill", 5: "eof", 6: "eol", 7: "eol2",
               8: "start", 9: "stop", 10: "susp", 12: "rprnt", 13: "werase", 14: "lnext",
               16: "swtch", 18: "discard"}
_STTY_FLAGS = {30: "ignpar", 31: "parmrk", 32: "inpck", 33: "istrip", 34: "inlcr", 35: "igncr",
               36: "icrnl", 37: "iuclc", 38: "ixon", 39: "ixany", 40: "ixoff", 41: "imaxbel",
               42: "iutf8", 50: "isig", 51: "icanon", 52: "xcase", 53: "echo", 54: "echoe",
               55: "echok", 56: "echonl", 57: "noflsh", 58: "tostop", 59: "iexten",
               60: "echoctl", 61: "echoke", 70: "opost", 71: "olcuc", 72: "onlcr", 73: "ocrnl",
               74: "onocr", 75: "onlret", 92: "parenb", 93: "parodd"}
_STTY_CHAR_SIZES = {90: "cs7", 91: "cs8"}
_STTY_SPEEDS = {128: "ispeed", 129: "ospeed"}

# Runs a program on a terminal as sshd would: "$1" settings for stty follow, then the program
# and its arguments. The settings go to stty in one batch; if the guest's stty refuses one of
# them, each is applied on its own so that the others still take effect.
_PTY_WRAPPER = """set -f
n=$1; shift
settings=
while [ "$n" -gt 0 ]; do settings="$settings
$1"; shift; n=$((n - 1)); done
if ! stty $settings 2>/dev/null; then
  IFS='
'
  for setting in $settings; do IFS=' '; stty $setting 2>/dev/null; done
fi
unset IFS
SSH_TTY=$(tty 2>/dev/null) && export SSH_TTY
exec "$@"
"""
# Out-of-band control of a running process (see the module docstring): "$1" is its process
# group, which is its pid, as the agent makes every process a group leader.
_SIGNAL_SCRIPT = 'kill -"$2" -"$1" 2>/dev/null || kill -"$2" "$1"'
_RESIZE_SCRIPT = 'stty rows "$2" cols "$3" <"/proc/$1/fd/0"'
_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_background: set[asyncio.Task[Any]] = set()


def _in_background(coroutine: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
    """Run ``coroutine`` as a task that is referenced until it ends and whose failure is logged."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _background.add(task)
    task.add_done_callback(functools.partial(_task_done, what))
    return task


def _task_done(what: str, task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("%s failed: %s", what, exc, exc_info=exc)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_sdk() -> ModuleType:
    try:
        import microsandbox
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the microsandbox SDK cannot be imported ({_one_line(exc)}); install it with "
            f"'pip install microsandbox', or {LOCAL_BACKEND_HINT}"
        ) from None
    return microsandbox


def _not_running_message(name: str, status: str) -> str:
    command = shlex.quote(name)
    start = f"start it with 'msb start {command}'"
    next_step = {
        "paused": f"resume it with 'msb resume {command}'",
        "starting": "wait for it to finish starting and try again",
        "draining": f"wait for it to stop, then {start}",
    }.get(status, start)
    return (f"sandbox {name!r} is not running (status: {status}); {next_step}, "
            "or use --backend local")


class MicrosandboxBackend(Backend):
    """Sandboxes run by the microsandbox SDK; a sandbox must be running to be opened.

    ``sdk`` is the ``microsandbox`` module, or a stand-in with the same surface; by default the
    real one, imported on first use.
    """

    name = "microsandbox"

    def __init__(self, state: StateDir, sdk: ModuleType | None = None) -> None:
        self.state = state
        self._sdk = sdk

    @property
    def sdk(self) -> ModuleType:
        if self._sdk is None:
            self._sdk = _load_sdk()
        return self._sdk

    async def open(self, name: str) -> MicrosandboxSandbox:
        """Connect to the running sandbox ``name``; one that is not running is not started."""
        sdk = self.sdk
        try:
            handle: microsandbox.SandboxHandle = await sdk.Sandbox.get(name)
            status = handle.status
            if status != sdk.SandboxStatus.RUNNING:
                raise SandboxNotRunningError(_not_running_message(name, str(status.value)))
            sandbox: microsandbox.Sandbox = await handle.connect()
        except sdk.SandboxNotRunningError as exc:  # it stopped between get and connect
            raise SandboxNotRunningError(
                f"{_one_line(exc)}; start it with 'msb start {shlex.quote(name)}', "
                "or use --backend local"
            ) from None
        except sdk.MicrosandboxError as exc:
            raise self._error(exc, name) from None
        return MicrosandboxSandbox(name, sandbox, sdk)

    async def stop(self, name: str) -> bool:
        sdk = self.sdk
        try:
            handle: microsandbox.SandboxHandle = await sdk.Sandbox.get(name)
            if handle.status.value not in _LIVE_STATUSES:
                return False
            await handle.stop()
        except (sdk.SandboxNotFoundError, sdk.SandboxNotRunningError):
            return False
        except sdk.MicrosandboxError as exc:
            raise self._error(exc, name) from None
        return True

    async def remove(self, name: str) -> bool:
        sdk = self.sdk
        try:
            handle: microsandbox.SandboxHandle = await sdk.Sandbox.get(name)
            if handle.status.value in _LIVE_STATUSES:
                with contextlib.suppress(sdk.SandboxNotRunningError):
                    await handle.stop()
            await sdk.Sandbox.remove(name)
        except sdk.SandboxNotFoundError:
            return False
        except sdk.MicrosandboxError as exc:
            raise self._error(exc, name) from None
        return True

    def _error(self, exc: BaseException, name: str) -> UserError:
        """The one-line error a user sees for the SDK's ``exc`` about sandbox ``name``."""
        sdk = self.sdk
        text = _one_line(exc)
        if (isinstance(exc, (sdk.RuntimeNotInstalledError, sdk.RuntimeIncompleteError))
                or any(marker in text for marker in _CANNOT_BOOT)):
            return BackendUnavailableError(
                f"microVMs cannot run on this host ({text}); {LOCAL_BACKEND_HINT}")
        if isinstance(exc, sdk.SandboxNotFoundError):
            return SandboxError(
                f"sandbox {name!r} does not exist; create it with "
                f"'msb create --name {shlex.quote(name)} IMAGE', or use --backend local")
        return SandboxError(f"sandbox {name!r}: {text}")


class MicrosandboxSandbox(Sandbox):
    """One connection's view of a running sandbox: the SDK's ``Sandbox`` from ``connect()``."""

    def __init__(self, name: str, sandbox: microsandbox.Sandbox, sdk: ModuleType) -> None:
        self.name = name
        self._sandbox = sandbox
        self._sdk = sdk
        self._users: dict[str, GuestUser] = {}
        self._directories: set[str] = set()

    async def lookup_user(self, name: str) -> GuestUser:
        if name in self._users:
            return self._users[name]
        for fields in await self._read_table("/etc/passwd"):
            if (len(fields) >= 7 and fields[0] == name and fields[2].isdigit()
                    and fields[3].isdigit()):
                gid = int(fields[3])
                groups = {gid}
                for group in await self._read_table("/etc/group"):
                    if len(group) >= 4 and group[2].isdigit() and name in group[3].split(","):
                        groups.add(int(group[2]))
                user = GuestUser(name=name, uid=int(fields[2]), gid=gid, home=fields[5],
                                 shell=fields[6], groups=tuple(sorted(groups)))
                self._users[name] = user
                return user
        raise UnknownUserError(f"sandbox {self.name!r} has no user {name!r}")

    async def _read_table(self, path: str) -> list[list[str]]:
        """The lines of the guest's colon-separated ``path``, split; none when it is missing."""
        try:
            data = await self._sandbox.fs.read(path)
        except self._sdk.PathNotFoundError:
            return []
        except self._sdk.MicrosandboxError as exc:
            raise SandboxError(
                f"sandbox {self.name!r}: cannot read {path}: {_one_line(exc)}") from None
        text = data.decode("utf-8", "surrogateescape")
        return [line.split(":") for line in text.splitlines() if ":" in line]

    async def spawn(self, spec: ProcessSpec, listener: ProcessListener) -> MicrosandboxProcess:
        cwd = spec.cwd
        if not await self._is_directory(cwd):
            newline = "\r\n" if spec.pty is not None else "\n"
            note = f"Could not chdir to home directory {cwd}: No such file or directory{newline}"
            listener.output_received(note.encode(), spec.pty is None)
            cwd = "/"
        program, args = _command_line(spec)
        try:
            handle: microsandbox.ExecHandle = await self._sandbox.exec_stream(
                program, args, cwd=cwd, user=spec.user.name, env=dict(spec.env),
                stdin=self._sdk.Stdin.pipe(), tty=spec.pty is not None,
            )
        except self._sdk.MicrosandboxError as exc:
            raise SandboxError(
                f"sandbox {self.name!r} cannot start {spec.program}: {_one_line(exc)}") from None
        process = MicrosandboxProcess(self._sandbox, handle, listener, self._sdk, spec.pty)
        try:
            await process.start()
        except (SandboxError, self._sdk.MicrosandboxError) as exc:
            raise SandboxError(
                f"sandbox {self.name!r} cannot start {spec.program}: {_one_line(exc)}") from None
        return process

    async def _is_directory(self, path: str) -> bool:
        """Whether ``path`` exists in the guest; when the check itself fails, assume it does."""
        if path in self._directories:
            return True
        try:
            exists = await self._sandbox.fs.exists(path)
        except self._sdk.MicrosandboxError as exc:
            log.debug("cannot check %s in sandbox %r: %s", path, self.name, exc)
            return True
        if exists:
            self._directories.add(path)
        return exists


def _command_line(spec: ProcessSpec) -> tuple[str, list[str]]:
    """The ``cmd`` and ``args`` for ``exec_stream`` that run ``spec`` (see module docstring)."""
    args = list(spec.argv[1:])
    if spec.argv and spec.argv[0].startswith("-"):
        args.insert(0, "-l")
    if spec.pty is None:
        return spec.program, args
    settings = _stty_settings(spec.pty)
    return "/bin/sh", ["-c", _PTY_WRAPPER, "msb-proxy", str(len(settings)), *settings,
                       spec.program, *args]


def _stty_settings(pty: PtySpec) -> list[str]:
    """The terminal size and SSH modes of ``pty`` as stty settings, one or two words each."""
    settings = [f"rows {pty.rows}", f"cols {pty.cols}"]
    for opcode, value in sorted(pty.modes.items()):
        if opcode in _STTY_CHARS:
            settings.append(f"{_STTY_CHARS[opcode]} {_stty_char(value)}")
        elif opcode in _STTY_FLAGS:
            settings.append(_STTY_FLAGS[opcode] if value else f"-{_STTY_FLAGS[opcode]}")
        elif opcode in _STTY_CHAR_SIZES and value:
            settings.append(_STTY_CHAR_SIZES[opcode])
        elif opcode in _STTY_SPEEDS:
            settings.append(f"{_STTY_SPEEDS[opcode]} {value}")
    return settings


def _stty_char(value: int) -> str:
    """A control character for stty, in a form no shell word splitting or globbing can alter."""
    value &= 0xFF
    if value in (0, 0xFF):  # OpenSSH sends 255 for a disabled character
        return "undef"
    if value < 0x20:
        return "^" + chr(value + 0x40)
    if value == 0x7F:
        return "^?"
    return str(value)  # two or three digits: stty would read a single one as the character


class MicrosandboxProcess(GuestProcess):
    """A guest process behind an SDK ``ExecHandle``.

    Three kinds of task drive it: one pulls events and reports them to the listener, one writes
    queued input through the ``ExecSink``, and a chain runs control requests one after another.
    """

    def __init__(self, sandbox: microsandbox.Sandbox, handle: microsandbox.ExecHandle,
                 listener: ProcessListener, sdk: ModuleType, pty: PtySpec | None) -> None:
        self._sandbox = sandbox
        self._handle = handle
        self._sink = handle.take_stdin()
        self._listener = listener
        self._sdk = sdk
        self._pty = pty
        self._started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pid: int | None = None
        self._output_allowed = asyncio.Event()
        self._output_allowed.set()
        self._events: asyncio.Task[None] | None = None
        self._stdin: deque[bytes] = deque()
        self._stdin_size = 0
        self._stdin_open = self._sink is not None
        self._stdin_eof = False
        self._stdin_closed = False
        self._stdin_paused = False
        self._stdin_ready = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._control_tail: asyncio.Task[None] | None = None
        self._size = (pty.rows, pty.cols) if pty is not None else (0, 0)
        self._applied_size = self._size
        self._fatal_signal: int | None = None
        self._exited = False
        self._hung_up = False

    async def start(self) -> None:
        """Set the terminal size, start pulling events, and wait for ``STARTED``.

        Raises :class:`SandboxError` with the agent's reason when the program cannot start.
        """
        try:
            if self._pty is not None:
                # Before the first recv(), which would hold the handle's lock (module docstring).
                await self._handle.resize(self._pty.rows, self._pty.cols)
            self._events = _in_background(self._pull_events(), "exec event pump")
            if self._sink is not None:
                self._writer = _in_background(self._write_stdin(self._sink), "exec stdin writer")
            self._pid = await asyncio.shield(self._started)
        except BaseException:
            self.hangup()
            raise

    # ---- GuestProcess
    def write_stdin(self, data: bytes) -> None:
        if not data or not self._stdin_open:
            return
        self._stdin.append(bytes(data))
        self._stdin_size += len(data)
        self._stdin_ready.set()
        if not self._stdin_paused and self._stdin_size > STDIN_HIGH_WATER:
            self._stdin_paused = True
            self._listener.stdin_paused()

    def close_stdin(self) -> None:
        if self._pty is None and self._stdin_open:
            self._stdin_open = False
            self._stdin_eof = True
            self._stdin_ready.set()

    def pause_output(self) -> None:
        self._output_allowed.clear()

    def resume_output(self) -> None:
        self._output_allowed.set()

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        if self._pty is not None and self._running():
            self._size = (rows, cols)
            self._control(self._apply_size)

    def send_signal(self, signum: int) -> None:
        if not self._running():
            return
        if signum not in _HARMLESS_SIGNALS:
            self._fatal_signal = signum
        self._control(functools.partial(self._guest_shell, _SIGNAL_SCRIPT, str(signum)))

    def hangup(self) -> None:
        if self._hung_up:
            return
        self._hung_up = True
        self._stdin_open = False
        self._stdin.clear()
        if not self._started.done():
            self._started.cancel()
        # Cancelling the pending recv() gives the handle's lock back for signal() below; an
        # event lost with it no longer matters to anyone.
        for task in (self._events, self._writer):
            if task is not None:
                task.cancel()
        if self._exited:
            return
        handle = self._handle
        self._control(lambda: handle.signal(signal.SIGHUP))
        if self._sink is not None and self._pty is None and not self._stdin_closed:
            self._control(self._sink.close)

    # ---- internals
    def _running(self) -> bool:
        return self._pid is not None and not self._exited and not self._hung_up

    def _control(self, request: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``request`` after every control request made before it, in the background."""
        previous = self._control_tail

        async def run_in_turn() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await request()

        self._control_tail = _in_background(run_in_turn(), "exec control request")

    async def _apply_size(self) -> None:
        """Give the terminal the newest size asked for, unless it already has it."""
        size = self._size
        if size != self._applied_size:
            self._applied_size = size
            await self._guest_shell(_RESIZE_SCRIPT, str(size[0]), str(size[1]))

    async def _guest_shell(self, script: str, *args: str) -> None:
        """Run ``script`` as root in the guest with this process's pid as ``$1``."""
        if not self._running():
            return
        output: microsandbox.ExecOutput = await self._sandbox.exec(
            "/bin/sh", ["-c", script, "msb-proxy", str(self._pid), *args], user="root",
            env={"PATH": _GUEST_PATH})
        if output.exit_code != 0:
            log.debug("%r in the guest exited %d: %s", script, output.exit_code,
                      output.stderr_bytes.decode(errors="replace").strip())

    async def _pull_events(self) -> None:
        """Deliver the process's events to the listener, pulling one only while output flows."""
        kinds = self._sdk.ExecEventType
        status: ExitStatus | None = None
        try:
            while status is None:
                await self._output_allowed.wait()
                event: microsandbox.ExecEvent | None = await self._handle.recv()
                if event is None:
                    break
                await self._output_allowed.wait()
                kind = event.event_type
                if kind == kinds.STARTED:
                    self._started.set_result(event.pid or 0)
                elif kind in (kinds.STDOUT, kinds.STDERR):
                    if event.data:
                        self._listener.output_received(bytes(event.data), kind == kinds.STDERR)
                elif kind == kinds.EXITED:
                    status = self._exit_status(event.code)
                elif kind == kinds.FAILED:
                    reason = bytes(event.data or b"").decode(errors="replace").strip()
                    if not self._started.done():
                        self._started.set_exception(SandboxError(reason or "the agent refused"))
                        return
                    self._listener.output_received(f"{reason}\n".encode(), True)
                    status = ExitStatus(code=FAILED_EXIT_CODE)
                # STDIN_ERROR: the guest closed its stdin; input written after that is dropped,
                # as it is once a process has exited.
        except self._sdk.MicrosandboxError as exc:
            log.debug("exec event stream failed: %s", exc)
        if not self._started.done():
            self._started.set_exception(
                SandboxError("the agent ended the session before the process started"))
            return
        # Without an exit event the agent or its VM is gone, and the process with it.
        self._finish(status or ExitStatus(signal=signal.SIGKILL))

    def _exit_status(self, code: int | None) -> ExitStatus:
        if code is not None and code >= 0:
            return ExitStatus(code=code & 0xFF)
        if self._fatal_signal is not None:
            return ExitStatus(signal=self._fatal_signal)
        return ExitStatus(code=UNKNOWN_SIGNAL_EXIT_CODE)

    def _finish(self, status: ExitStatus) -> None:
        self._exited = True
        self._stdin_open = False
        self._stdin.clear()
        if self._writer is not None:
            self._writer.cancel()
        self._listener.process_exited(status)

    async def _write_stdin(self, sink: microsandbox.ExecSink) -> None:
        """Write queued input through ``sink`` in order, then close it once asked to."""
        while True:
            await self._stdin_ready.wait()
            self._stdin_ready.clear()
            while self._stdin:
                chunk = self._next_stdin_chunk()
                try:
                    await sink.write(chunk)
                except self._sdk.MicrosandboxError as exc:
                    log.debug("stdin write failed, dropping further input: %s", exc)
                    self._stdin_open = False
                    self._stdin.clear()
                    self._stdin_size = 0
                    self._resume_stdin()
                    return
                self._stdin_size -= len(chunk)
                if self._stdin_size <= STDIN_LOW_WATER:
                    self._resume_stdin()
            if self._stdin_eof:
                await sink.close()
                self._stdin_closed = True
                return

    def _next_stdin_chunk(self) -> bytes:
        parts = [self._stdin.popleft()]
        size = len(parts[0])
        while self._stdin and size + len(self._stdin[0]) <= STDIN_WRITE_MAX:
            parts.append(self._stdin.popleft())
            size += len(parts[-1])
        return b"".join(parts)

    def _resume_stdin(self) -> None:
        if self._stdin_paused:
            self._stdin_paused = False
            self._listener.stdin_resumed()
