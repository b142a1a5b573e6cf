"""The backend seam: the one narrow interface between SSH semantics and a sandbox runtime.

Everything above this module speaks SSH; everything behind it speaks to a runtime. A backend
gives a :class:`Sandbox` by name, and a sandbox runs processes. A process is driven with plain
calls (write stdin, close stdin, resize, signal) and reports back through a
:class:`ProcessListener` the caller supplies, with flow control in both directions:

* output: the backend calls :meth:`ProcessListener.output_received`; the caller answers with
  :meth:`GuestProcess.pause_output` / :meth:`GuestProcess.resume_output`, and the backend must
  stop reading from the guest while paused, so a slow client slows the guest instead of growing
  our memory.
* input: :meth:`GuestProcess.write_stdin` never blocks; when the backend's buffer toward the guest
  passes its high-water mark it calls :meth:`ProcessListener.stdin_paused`, and
  :meth:`ProcessListener.stdin_resumed` once it has drained.

Three implementations sit beside this file: ``local`` (a Linux namespace jail over a rootfs
directory), ``microsandbox`` (the microsandbox SDK) and ``fake`` (processes of this host as the
invoking user, for the rootless test tier). None is imported by anything above:
``registry`` names them, and imports a backend's module only when it is chosen.

Adding a backend ``NAME`` is one module and one registry line:

1. ``msb_proxy/backends/NAME.py`` (a package ``NAME/`` once it needs more files) holds a
   :class:`Backend` subclass, with its :class:`Sandbox` and :class:`GuestProcess`. Its module
   imports nothing slow: every ``msb-proxy`` that chooses the backend imports it, before the SSH
   banner; a runtime's SDK is imported on first use.
2. ``registry.BACKENDS`` gets ``"NAME": "msb_proxy.backends.NAME:NameBackend"``. From then on
   ``--backend NAME``, ``MSB_PROXY_BACKEND=NAME`` and ``backend = "NAME"`` in the config file
   choose it, ``ls`` lists its sandboxes, ``doctor`` runs its checks, the config file takes its
   template options and the warm server preloads what it names.

What the class declares, besides the sandbox methods of :class:`Backend`: ``name`` (its registry
name, shown by ``ls``); ``options``, the template keys it takes beyond the common ones; the class
methods ``from_config`` (how the CLI makes one) and ``checks`` (its rows of ``doctor``); and
``preload``, the modules the warm server imports for it. Each is documented where
:class:`Backend` declares it: when it is used, what it must be or return and what that means,
whether it may be a coroutine, and what the default does.
"""

from __future__ import annotations

import abc
import contextlib
import signal as _signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from msb_proxy.backends.links import Link, helper_source

if TYPE_CHECKING:
    import asyncio

    from msb_proxy.config import Config, Option, SandboxTemplate
    from msb_proxy.progress import Progress

__all__ = [
    "Backend",
    "Check",
    "CheckStatus",
    "ExitStatus",
    "GuestProcess",
    "GuestUser",
    "ProcessListener",
    "ProcessSpec",
    "PtySpec",
    "RawPipes",
    "Sandbox",
    "SandboxInfo",
    "SandboxState",
    "SessionInfo",
    "SessionListener",
]


@dataclass(frozen=True)
class GuestUser:
    """A user of the guest, as its ``/etc/passwd`` and ``/etc/group`` describe it."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class PtySpec:
    """A pseudo-terminal to run the process on (from the SSH ``pty-req``).

    ``modes`` maps SSH terminal-mode opcodes (RFC 4254 section 8) to their values.
    """

    term: str
    cols: int
    rows: int
    pixel_width: int = 0
    pixel_height: int = 0
    modes: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessSpec:
    """What to run in the guest.

    ``program`` is the file to execute (an absolute guest path, or a name looked up in the
    ``PATH`` of ``env``); ``argv`` is the argument vector it sees, ``argv[0]`` included, so a login
    shell can be started as ``-bash``. ``cwd`` falls back to ``/`` with a note on stderr when it
    does not exist, as sshd does with a missing home directory.
    """

    program: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    user: GuestUser
    pty: PtySpec | None = None


@dataclass(frozen=True)
class ExitStatus:
    """How a guest process ended: exactly one of ``code`` and ``signal`` is set."""

    code: int | None = None
    signal: int | None = None
    core_dumped: bool = False

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        """Decode a raw ``waitpid`` status."""
        import os

        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status), core_dumped=os.WCOREDUMP(status))
        return cls(code=os.waitstatus_to_exitcode(status) & 0xFF)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}" + (" (core dumped)" if self.core_dumped else "")
        return f"exit status {self.code}"


class ProcessListener(Protocol):
    """What a :class:`GuestProcess` reports to; implemented by the caller of ``spawn``.

    All methods are called on the event loop thread and must not block.
    """

    def output_received(self, data: bytes, stderr: bool) -> None:
        """Called with each chunk the process writes to stdout (``stderr`` False) or stderr.

        With a PTY everything arrives as stdout, merged as on a terminal.
        """

    def stdin_paused(self) -> None:
        """Called when the buffer toward the process's stdin is full: stop sending input."""

    def stdin_resumed(self) -> None:
        """Called when that buffer has drained after :meth:`stdin_paused`."""

    def process_exited(self, status: ExitStatus) -> None:
        """Called once, when the process has exited *and* all its output has been delivered.

        A process that leaves a child holding its stdout open is not reported until that child
        closes it, as with sshd.
        """


class SessionListener(ProcessListener, Protocol):
    """What a named session's shell reports to (:meth:`Sandbox.attach_session`)."""

    def process_detached(self, reason: str) -> None:
        """Called instead of :meth:`process_exited` when the shell goes on without this
        listener: another connection took the session over. ``reason`` is one line for the
        user. Nothing more is reported after it.
        """


@dataclass(frozen=True)
class RawPipes:
    """A process's stdin and stdout as plain pipe descriptors, for code that serves them itself
    between turns of the event loop (msb-proxy's fast path, ``msb_proxy/fastpath/relay.py``).

    ``stdout`` is the non-blocking read end the backend watches with the running event loop;
    the reader may ``read`` it only when that loop's poller reports it readable, and leaves end
    of file and errors to the backend. ``stdin`` is the write end (-1 once stdin is closed);
    it may be written only while ``stdin_queued`` is 0, and whatever a write does not take goes
    to :meth:`GuestProcess.write_stdin`, so the order stays the same.
    """

    stdout: int
    stdin: int
    stdin_queued: int


class GuestProcess(abc.ABC):
    """A process running in the guest, started by :meth:`Sandbox.spawn`."""

    def raw_pipes(self) -> RawPipes | None:
        """The process's pipes as they are now (see :class:`RawPipes`), when both are plain
        pipes of this host and stdout is still open; None otherwise.

        Called for every read a fast path serves, so it must be cheap. The default (None) means
        every byte goes through :meth:`write_stdin` and :meth:`ProcessListener.output_received`.
        """
        return None

    @abc.abstractmethod
    def write_stdin(self, data: bytes) -> None:
        """Queue ``data`` for the process's stdin (or its terminal). Never blocks.

        Backpressure is reported through :meth:`ProcessListener.stdin_paused`. Data written after
        the process has gone is dropped.
        """

    @abc.abstractmethod
    def close_stdin(self) -> None:
        """Signal end of input: close the process's stdin once queued data is written.

        With a PTY this does nothing, as with sshd: a terminal has no end of file to close.
        """

    @abc.abstractmethod
    def pause_output(self) -> None:
        """Stop delivering output until :meth:`resume_output`; the guest blocks when it fills up."""

    @abc.abstractmethod
    def resume_output(self) -> None:
        """Deliver output again after :meth:`pause_output`."""

    def close_output(self) -> None:  # noqa: B027  (a hook with a default, not abstract)
        """The client will read no more output (OpenSSH's ``eow@openssh.com``, sent once the
        client's stdout has closed, as in ``ssh host yes | head -1``): stop reading the
        process's stdout and stderr and close our ends, so that its next write fails with
        SIGPIPE, as sshd does. Its exit is still reported, once it has exited.

        The default, for a backend that cannot close them, keeps reading while the session
        drops what arrives: the process is never blocked, but it ends only by itself.
        """

    @abc.abstractmethod
    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        """Set the terminal size (SSH ``window-change``); ignored without a PTY."""

    @abc.abstractmethod
    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the process's process group (SSH ``signal``, as sshd's killpg)."""

    def send_break(self, msec: int) -> bool:
        """Send a break on the terminal (SSH ``break``); return whether one was sent.

        The default sends none.
        """
        return False

    @abc.abstractmethod
    def hangup(self) -> None:
        """The client is gone: end the process's foreground work and release its resources.

        Sends SIGHUP to the process group (so ``nohup``-started work survives, as when a terminal
        hangs up) and closes every pipe. Safe to call at any time, also after exit.
        """


class Sandbox(abc.ABC):
    """A running sandbox, as one SSH connection uses it.

    ``run_id`` identifies this run of the sandbox: it changes whenever the sandbox is started
    anew, so that msb-proxy only ever idle-stops a run it started itself. ``started`` says
    whether the :meth:`Backend.open` that returned it started (or created) it, ``created``
    whether it created it (from its template, or as a fork): an ``ephemeral`` template's
    sandbox is removed after its last connection only then.
    """

    name: str
    run_id: str = ""
    started: bool = False
    created: bool = False

    @abc.abstractmethod
    async def lookup_user(self, name: str) -> GuestUser:
        """Resolve the login ``name`` against the guest's ``/etc/passwd``.

        Raises :class:`~msb_proxy.errors.UnknownUserError` when there is no such user.
        """

    @abc.abstractmethod
    async def spawn(self, spec: ProcessSpec, listener: ProcessListener) -> GuestProcess:
        """Start ``spec`` in the guest and return it running.

        Output and exit are reported to ``listener`` from then on. Raises
        :class:`~msb_proxy.errors.SandboxError` when the process cannot be started (for example
        the program does not exist in the guest).
        """

    async def find_program(self, user: GuestUser, candidates: Sequence[str]) -> str | None:
        """The first of the absolute paths ``candidates`` that is an executable file, or None.

        The default asks the guest's ``/bin/sh`` as ``user``; a backend with a cheaper way
        overrides this.
        """
        script = 'for p in "$@"; do if [ -f "$p" ] && [ -x "$p" ]; then echo "$p"; exit 0; fi; done'
        collector = _Collector()
        await self.spawn(ProcessSpec(program="/bin/sh", argv=["sh", "-c", script, "sh",
                                                                *candidates],
                                     env={"PATH": "/usr/bin:/bin"}, cwd="/", user=user), collector)
        await collector.done
        found = collector.stdout.decode("utf-8", "surrogateescape").strip()
        return found or None

    async def start_helper(self, user: GuestUser, helper: str) -> Link:
        """Start guest helper ``helper`` (see :mod:`msb_proxy.backends.links`) as ``user``, in their
        home, and return the link to it.

        The default runs the helper's source with the guest's ``python3`` through
        :meth:`spawn`; a backend with a better way overrides this. Raises
        :class:`~msb_proxy.errors.SandboxError` when the helper cannot be started.
        """
        link = ProcessLink()
        spec = ProcessSpec(
            program="python3", argv=["python3", "-c", helper_source(helper)],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONUTF8": "1", "LC_ALL": "C.UTF-8"},
            cwd=user.home or "/", user=user,
        )
        link.process = await self.spawn(spec, link)
        return link

    async def tcp_socket(self, family: int) -> socket.socket | None:
        """A new, unconnected TCP socket of ``family`` (``AF_INET``/``AF_INET6``) that lives in
        the sandbox's network namespace, for connecting to an address there without a guest
        process in between; None when the backend cannot hand one out (the default), and
        tunnels then go through the guest tunnel helper.
        """
        return None

    def watch_end(self, ended: Callable[[], None]) -> None:  # noqa: B027  (a default hook)
        """Call ``ended`` once, as soon as this run of the sandbox is over: stopped, removed or
        crashed (``msb-proxy stop`` or ``rm``, its init or VM killed).

        It is called before the exits of the processes that ended with the run are reported to
        their listeners, so that a connection can close saying why instead of passing their
        deaths on one channel at a time, and it also ends connections that hold only tunnels.
        Not a coroutine; ``ended`` must not block. The default never calls it: on a backend
        that cannot tell, a connection ends with its channels.
        """

    async def attach_session(self, session: str, spec: ProcessSpec, listener: SessionListener,
                             timeout: float) -> GuestProcess:
        """Attach ``listener`` to the named session ``session`` of this sandbox and return its
        shell: the one running under that name, else ``spec`` started as it (``spec.pty`` is
        always set).

        A running session first delivers, as output, a repaint of its terminal (a bounded
        replay of its recent output, at least the last screenful), then is resized to
        ``spec.pty``; its shell keeps the user, cwd, variables and jobs it had. The returned
        process is driven as any other, except that :meth:`GuestProcess.hangup` *detaches*:
        the shell keeps running, its output kept for the next attach, until it exits or has
        been detached ``timeout`` seconds (0: until the sandbox stops). A second attach to a
        session someone is attached to takes it over: the first listener gets
        :meth:`SessionListener.process_detached` with the reason. A session whose shell
        exited is gone; the next attach starts a new one. A session of another user is
        refused (:class:`~msb_proxy.errors.SandboxError`).

        The default raises :class:`~msb_proxy.errors.SandboxError`: no named sessions.
        """
        from msb_proxy.errors import SandboxError

        raise SandboxError(f"sandbox {self.name!r}: its backend keeps no named sessions")

    async def checks(self) -> list[Check]:
        """Rows ``msb-proxy doctor`` adds about this running sandbox besides the guest tools it
        looks for itself: how the backend serves it (``what`` is a short noun, printed after
        the sandbox's name). A coroutine; it may start a guest process. The default adds none.
        """
        return []

    async def close(self) -> None:  # noqa: B027  (a hook with a default, not abstract)
        """Release what this connection holds on the sandbox; the sandbox keeps running.

        The default holds nothing.
        """


class _Collector:
    """A :class:`ProcessListener` that keeps a short process's stdout."""

    def __init__(self) -> None:
        import asyncio

        self.stdout = bytearray()
        self.done: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()

    def output_received(self, data: bytes, stderr: bool) -> None:
        if not stderr:
            self.stdout += data

    def stdin_paused(self) -> None:
        pass

    def stdin_resumed(self) -> None:
        pass

    def process_exited(self, status: ExitStatus) -> None:
        if not self.done.done():
            self.done.set_result(status)


class SandboxState(StrEnum):
    """What a sandbox is doing; each value is the word ``msb-proxy ls`` shows for it.

    The local backend reports only ``RUNNING`` and ``STOPPED``; microsandbox reports all of them,
    in its own words (``DRAINING`` is its "stopping": finishing work before the VM stops).
    """

    CREATED = "created"  # made, never started
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    DRAINING = "draining"
    STOPPED = "stopped"
    CRASHED = "crashed"


class ProcessLink(Link):
    """A link over a guest process's stdin and stdout (the default of
    :meth:`Sandbox.start_helper`); also its :class:`ProcessListener`."""

    def __init__(self) -> None:
        super().__init__()
        self.process: GuestProcess | None = None
        self._stderr = bytearray()

    def send(self, data: bytes) -> None:
        if self.process is not None:
            self.process.write_stdin(data)

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.hangup()

    # ---- ProcessListener
    def output_received(self, data: bytes, stderr: bool) -> None:
        if stderr:
            self._stderr += data[:4096 - len(self._stderr)]
        else:
            self._deliver(data)

    def stdin_paused(self) -> None:
        pass

    def stdin_resumed(self) -> None:
        pass

    def process_exited(self, status: ExitStatus) -> None:
        detail = self._stderr.decode(errors="replace").strip().splitlines()
        self._lose(EOFError(detail[-1] if detail else f"the guest helper {status.describe()}"))


@dataclass(frozen=True)
class SessionInfo:
    """One named session of a sandbox (``msb-proxy sessions NAME``): its ``name``, the guest
    ``user`` it runs as, when it was made (``created``, Unix time), seconds since its last
    input or output (``idle``), its terminal size, whether a connection is attached, and
    seconds since it was left (``detached_for``, 0 while attached)."""

    name: str
    user: str
    created: float
    idle: float
    cols: int
    rows: int
    attached: bool
    detached_for: float = 0.0


@dataclass(frozen=True)
class SandboxInfo:
    """One line of ``msb-proxy ls``."""

    name: str
    state: SandboxState
    backend: str


class CheckStatus(StrEnum):
    """How a ``doctor`` check came out: ``FAIL`` (something essential is missing) makes
    ``doctor`` exit 1; ``WARN`` works, with less."""

    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One row of ``msb-proxy doctor``: what was checked, how it came out, and ``detail``: what
    was found, or what to do about it."""

    what: str
    status: CheckStatus
    detail: str


class Backend(abc.ABC):
    """A kind of sandbox runtime: finds, creates, starts and stops sandboxes by name."""

    #: The name ``registry.BACKENDS`` gives the backend; ``ls`` shows it as the BACKEND.
    name: str

    #: The template keys this backend takes besides the common ones (``create``, ``env``,
    #: ``user`` ...; see :mod:`msb_proxy.config`), by key. Read when the config file is loaded:
    #: each value is parsed by its option, and a table whose backend does not take one of its
    #: keys is refused, naming the backends that do. Default: no keys of its own.
    options: ClassVar[Mapping[str, Option]] = {}

    #: Modules the warm server imports for this backend, besides the backend's own module, so
    #: that the connections it forks find them loaded; one that cannot be imported is skipped.
    #: Default: none.
    preload: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: Config) -> Backend:
        """Return the backend, set up from ``config``.

        Called by :func:`~msb_proxy.backends.registry.open_backend` whenever a command needs
        the backend (``stdio``, ``stop``, ``rm``, ``ls``, ``doctor``, the idle watcher); it
        must return fast and start nothing (no SDK import, no runtime). Not a coroutine. There
        is no default.
        """

    @classmethod
    def checks(cls, config: Config) -> list[Check]:
        """Return the rows ``msb-proxy doctor`` prints about this backend on this host.

        Called by ``doctor`` for the configured backend, before it lists sandboxes; ``what``
        is a short noun (``root``, ``KVM``), printed after the backend's name, and a
        :attr:`CheckStatus.FAIL` row should say how to fix it or which backend to use
        instead. Not a coroutine, and it must not start anything. The default checks nothing.
        """
        return []

    @classmethod
    def option(cls, template: SandboxTemplate, key: str) -> Any:
        """The value ``template`` gives ``key`` of :attr:`options`, else that option's default."""
        return template.options.get(key, cls.options[key].default)

    @abc.abstractmethod
    async def open(self, name: str, template: SandboxTemplate, progress: Progress) -> Sandbox:
        """Return the sandbox ``name`` running and ready for processes (an SSH connection).

        Running: used as it is. Stopped or crashed: started. Paused: resumed. Starting or
        stopping elsewhere: waited for, within a bound. Missing: created from ``template``
        when ``template.create`` allows it, else
        :class:`~msb_proxy.errors.SandboxNotFoundError`. Steps that take a while are reported
        to ``progress``. Concurrent calls for one name, from any number of processes, create
        or start it once. Other failures raise :class:`~msb_proxy.errors.UserError`
        subclasses with a one-line reason.
        """

    @abc.abstractmethod
    async def state_of(self, name: str) -> SandboxState | None:
        """The state of sandbox ``name``; None if there is no such sandbox."""

    @abc.abstractmethod
    async def current_run(self, name: str) -> str | None:
        """The ``run_id`` of the sandbox's current run (see :class:`Sandbox`); None if it is
        not running."""

    async def list_all(self) -> list[SandboxInfo]:
        """Every sandbox of the runtime, also those other tools made (``msb-proxy ls --all``).

        The default is :meth:`list`, for a backend whose sandboxes are all msb-proxy's.
        """
        return await self.list()

    @abc.abstractmethod
    async def list(self) -> list[SandboxInfo]:
        """The sandboxes this backend has for msb-proxy (``msb-proxy ls``)."""

    @abc.abstractmethod
    async def stop(self, name: str) -> bool:
        """Stop the sandbox ``name``; return False when it was not running.

        Raises :class:`~msb_proxy.errors.SandboxNotFoundError` when there is no such sandbox.
        """

    @abc.abstractmethod
    async def remove(self, name: str) -> bool:
        """Stop and delete the sandbox ``name``; return False when there was none."""

    async def fork(self, parent: str, child: str, progress: Progress) -> None:
        """Make sandbox ``child`` a copy-on-write copy of sandbox ``parent`` as it is now
        (``ssh msb-api.fork``), leaving ``parent`` as it was: running or not, untouched.

        Called by :meth:`open` for a missing sandbox whose template has ``fork_of`` set,
        under ``child``'s lock; the copy is taken consistently (each backend says how).
        Raises :class:`~msb_proxy.errors.SandboxNotFoundError` when there is no ``parent``.
        The default raises :class:`~msb_proxy.errors.BackendUnavailableError`: no forks.
        """
        from msb_proxy.errors import BackendUnavailableError

        raise BackendUnavailableError(f"the {self.name} backend cannot fork sandboxes")

    async def sessions(self, name: str) -> Sequence[SessionInfo]:
        """The named sessions of sandbox ``name`` (none when it is not running); raises
        :class:`~msb_proxy.errors.SandboxNotFoundError` when there is no such sandbox. The
        default: none."""
        return []

    async def kill_session(self, name: str, session: str) -> bool:
        """End named session ``session`` of sandbox ``name`` (its shell is hung up, and
        killed when it does not go); False when there is no such session. The default has
        none."""
        return False
