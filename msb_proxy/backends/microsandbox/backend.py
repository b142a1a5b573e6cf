"""The ``microsandbox`` backend: each sandbox is a microVM run by the microsandbox SDK.

This module owns the translation between the seam in ``base`` and the SDK (``microsandbox`` 0.7),
which is imported on first use rather than with this module (it costs ~0.3 s of every ``ssh``).
Nothing falls back to another backend: where the host cannot run microVMs the error says so and
names the local backend. What the SDK does, as read in its source and observed in the 0.7.11
wheel, is pinned by ``tests/test_sdk_contract.py`` and played by ``tests/microsandbox_standin.py``.

A sandbox lives on this host's runtime or in microsandbox cloud, as its template or the SDK's
own environment says (``cloud``: the ``cloud`` and ``profile`` options, the
``microsandbox-cloud`` backend); every lifecycle call below runs inside the SDK's
``backend_scope`` of that side, and what only a local runtime has is refused for the cloud.

Lifecycle on connect (``open``), decided under the sandbox's exclusive lock
(``MSB_PROXY_HOME/locks/<slug>.lock``, the local backend's too), held only while deciding,
creating, starting or resuming, so that any number of msb-proxy processes connecting at once
create or start a sandbox once:

* ``Sandbox.get(name)``, then by ``SandboxHandle.status``: RUNNING -> ``handle.connect()``;
  STOPPED, CRASHED or CREATED -> ``handle.start(detached=True)``; PAUSED -> ``handle.resume()``,
  ``handle.refresh()`` (``connect`` checks the status the handle was read with) and
  ``connect()``; STARTING or DRAINING (some other tool is at it) -> ``handle.refresh()`` every
  0.1 s, at most ``wait_s``, then as above.
* Missing (``SandboxNotFoundError``), and the template allows it ->
  ``Sandbox.create_with_progress(name, image=Image.oci(ref) or Image.bind(dir), cpus=,
  memory=, env=, workdir=, volumes={guest: MountConfig(kind=BIND, bind=host, readonly=)},
  network=, labels=LABELS, detached=True)``; its ``PullEvent`` s become "pulling image REF: N%"
  (bytes over the total when the registry gives sizes, else layers over the layer count) and
  ``await session.result()`` is the sandbox. ``network`` ``none`` is ``Network.none()``;
  ``public``, ``private`` and ``host`` are ``Network.from_profiles(NetworkProfile.X)``; unset,
  the SDK's default. ``LABELS`` mark it as msb-proxy's: ``list`` (``ls``) shows only those,
  ``list_all`` (``ls --all``) every sandbox.
* ``detached=True`` because the sandbox must outlive the msb-proxy process that brought it up
  (the SDK stops an attached sandbox when its creator exits): other connections use it, and
  ``stop_after_idle`` decides when it stops. (The SDK's own ``idle_timeout`` is not used: it
  counts the guest agent's traffic, so it would stop a sandbox under a shell idle at its
  prompt.)
* A connection that finds the lock taken waits for it, at most ``lock_wait_s`` (15 minutes: the
  holder may be pulling a large image), and says so after half a second.
* A sandbox that changes under us between two calls (stopped, removed, replaced or created by
  another tool) is decided on again, at most three times. A connect on a handle whose sandbox
  stopped meanwhile fails dialling the sandbox's relay with a generic SDK error: a refresh
  tells that apart from a real failure.
* A VM that dies while booting leaves the sandbox STOPPED with only "before agent relay became
  available" to say; the sandbox's system log (``handle.logs(sources=[SYSTEM])``) has the
  VMM's reason. KVM that cannot run the guest (``KVM_EXIT_INTERNAL_ERROR``, ``/dev/kvm``) says
  microVMs cannot run on this host and names the local backend; any other reason is that
  sandbox's own, with ``msb logs NAME``.
* A failed pull is a plain ``MicrosandboxError`` "image error: ...", a template the SDK refuses
  an ``InvalidConfigError`` "invalid config: ...": both are named as such.
* ``run_id`` is ``"<handle.id>@<handle.updated_at>"`` of the running sandbox. The SDK names no
  run or boot (its database's run table is not in the Python API); ``id`` is the database row,
  new when a sandbox is removed and made again under the same name, and ``updated_at`` is
  rewritten on every status change (start, stop, crash, pause, resume) and by ``modify``, and,
  as the SDK's source reads, by nothing else while the sandbox runs. So it is the same for the
  whole of a run and new after every start; a pause and resume or a ``modify`` in between also
  makes it new, which only ever keeps ``stop_after_idle`` from stopping a sandbox (the safe
  side).

SDK calls made, and what for:

* ``Sandbox.get(name)`` -> ``SandboxHandle``: ``.status``, ``.id``, ``.updated_at``,
  ``.refresh()``, ``.connect()``, ``.start(detached=True)``, ``.resume()``, ``.logs()`` (open),
  ``.stop()`` (stop, remove); ``Sandbox.create_with_progress`` -> ``PullSession``:
  ``.progress``, ``.result()`` (open); ``Sandbox.list_with(labels=, cursor=)`` (list);
  ``Sandbox.remove(name)`` (remove).
* ``sandbox.fs`` taken once per connection (its getter try-locks the sandbox and raises
  ``RuntimeError("sandbox is busy")`` while another call on it is in flight): ``.read`` of
  ``/etc/passwd`` and ``/etc/group`` (a missing one is a ``FilesystemError``, like any other
  failure: ``.exists`` tells them apart), ``.exists`` (the direct path's cwd check).
* ``sandbox.exec_stream`` -> ``ExecHandle``, ``take_stdin()`` -> ``ExecSink``: once per SSH
  connection, for the guest agent (``guest_agent``), which then forks every process of that
  connection itself, with real wait statuses, its own terminals and credit-based flow control
  both ways. Only where the guest cannot run the agent (no ``python3`` 3.6 or newer), once per
  process (``DirectProcess``): ``recv()`` pulled by one task, ``ExecSink.write/close`` driven by
  another, ``ExecHandle.signal`` and ``resize`` (lock-free since upstream #1190), SIGHUP on
  hang-up.

A process on the direct path, and what it loses against the agent (``doctor`` says which path
a running sandbox takes):

* ``argv[0]`` is the program: a login shell (``-bash``) is started as ``bash -l`` (``$0`` is
  the program path); any other ``argv[0]`` is dropped.
* The runtime's agent merges our environment into its own and puts ``/.msb/scripts`` first on
  ``PATH``.
* A terminal starts at 24x80 with the guest's default modes: a small ``/bin/sh`` wrapper
  applies the ``pty-req`` modes with ``stty`` and exports ``SSH_TTY`` from ``tty``, the size is
  ``ExecHandle.resize`` (rows and columns only, no pixels); without ``/bin/sh`` no terminal
  session starts; breaks are not sent; a missing program exits 127 with the wrapper's message.
* A death by signal arrives as exit code -1 (crates/agentd/lib/process.rs): it is reported as
  the last terminating signal an SSH ``signal`` request sent, otherwise as exit status 255 (what
  OpenSSH's client exits with after an ``exit-signal``); the core flag is never set.
* A missing ``cwd`` is found with ``fs.exists`` (as root, not the login user) and replaced by
  ``/`` with sshd's note.
* No flow control: the SDK drains the guest into an unbounded channel, so a slow client grows
  our memory; and the runtime's agent writes stdin in its one loop until the process has taken
  all of it, so a process that does not read its stdin stalls every process of the sandbox.
* Every process is a relay client of its own: the relay refuses the 129th of a sandbox, so a
  connection has at most ~126 channels.
* Hang-up sends SIGHUP and closes stdin; output of work that survives it (``nohup``) still flows
  to the runtime's agent.

Named sessions (``ssh msb-api+work``, ``attach_session``) need the agent: its session keeper
holds the shells in the guest, a daemon out of the agent exec's session and process group (the
runtime's agent signals only an exec's own group: ``crates/agentd/lib/session.rs``
``send_signal``, ``process.rs`` ``fail``; its relay's disconnect ends no exec,
``crates/agentd/lib/agent.rs`` ``RelayClientDisconnected``) and so outlives every connection,
with its socket in ``GUEST_RUN_DIR``. ``sessions`` and ``kill_session`` ask it through an agent
of their own. A guest without ``python3`` refuses named sessions in one line.

Known gaps on both paths:

* A template's options take effect when the sandbox is created: changing them later does not
  change a sandbox that exists (the SDK's ``SandboxHandle.modify`` could; it is not used),
  where the local backend applies ``volumes`` at every start. There is no default image: a
  template without ``image`` cannot create a sandbox.
* Unpacking the image after its download and booting the VM show as one step, without a
  fraction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from msb_proxy.backends.base import (
    Backend,
    Check,
    CheckStatus,
    ExitStatus,
    GuestProcess,
    GuestUser,
    ProcessListener,
    ProcessSpec,
    PtySpec,
    Sandbox,
    SandboxInfo,
    SandboxState,
    SessionInfo,
    SessionListener,
)
from msb_proxy.backends.locking import retire_lock, sandbox_lock
from msb_proxy.backends.microsandbox import cloud
from msb_proxy.backends.microsandbox.guest_agent import (
    AgentUnavailable,
    GuestAgent,
    in_background,
    one_line,
)
from msb_proxy.config import (
    IMAGE_OPTION,
    NETWORK_OPTION,
    VOLUMES_OPTION,
    Config,
    Option,
    SandboxTemplate,
    parse_positive_int,
    parse_size_mib,
    parse_string,
)
from msb_proxy.errors import (
    BackendUnavailableError,
    ConfigError,
    SandboxError,
    SandboxNotFoundError,
    UnknownUserError,
    UserError,
)
from msb_proxy.guest import agent as protocol
from msb_proxy.state import StateDir

if TYPE_CHECKING:
    import microsandbox

    from msb_proxy.progress import Progress

__all__ = ["DirectProcess", "MicrosandboxBackend", "MicrosandboxCloudBackend",
           "MicrosandboxSandbox"]

log = logging.getLogger(__name__)

STDIN_HIGH_WATER = 256 * 1024
STDIN_LOW_WATER = 64 * 1024
STDIN_WRITE_MAX = 64 * 1024  # bytes per ExecSink.write, which is one agent message
FAILED_EXIT_CODE = 127
UNKNOWN_SIGNAL_EXIT_CODE = 255  # what OpenSSH's client exits with after an exit-signal
LOCAL_BACKEND_HINT = "use the local backend instead: --backend local or MSB_PROXY_BACKEND=local"
WAIT_S = 60.0  # for a sandbox some other tool is starting or stopping
LOCK_WAIT_S = 900.0  # for another msb-proxy creating the sandbox: a big image takes a while
STATUS_POLL_S = 0.1
DECIDE_ATTEMPTS = 3
# States in which a sandbox has a VM to stop.
_LIVE_STATES = frozenset({SandboxState.RUNNING, SandboxState.STARTING, SandboxState.PAUSED,
                          SandboxState.DRAINING})
# States of a sandbox the SDK can fork (observed: any other has "no live runtime").
_FORKABLE_STATES = frozenset({SandboxState.RUNNING, SandboxState.PAUSED})
# States that end by themselves, and what the sandbox is doing meanwhile.
_SETTLING_STATES = {SandboxState.STARTING: "starting", SandboxState.DRAINING: "stopping"}
# What the runtime and its VMM say (in errors, and in a sandbox's system log) when this host
# cannot run microVMs at all, as opposed to one sandbox that cannot boot (strings of the 0.7.11
# runtime's msb binary).
_CANNOT_BOOT = ("/dev/kvm", "KVM_EXIT_INTERNAL_ERROR", "Error creating the Kvm object",
                "virtualization is not available", "KVM kernel module is not loaded")
# The runtime's error when a VM died before its agent came up (observed): the reason is in the
# sandbox's log.
_DIED_BOOTING = "before agent relay became available"
# The runtime's log lines that say what went wrong: "ERROR <module>: <message>".
_LOG_ERROR = "ERROR "
_LOG_TAIL = 200
# Marks the sandboxes msb-proxy created, so that 'msb-proxy ls' lists only those (--all: every).
LABELS = {"created-by": "msb-proxy"}
# Where the guest's session keeper keeps its socket (root's, 0700): see msb_proxy/guest/agent.py.
GUEST_RUN_DIR = "/run/msb-proxy"
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

class _Changed(Exception):
    """The sandbox changed under us between two SDK calls: decide again."""


def _load_sdk() -> ModuleType:
    try:
        import microsandbox
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the microsandbox SDK cannot be imported ({one_line(exc)}); install it with "
            f"'pip install microsandbox', or {LOCAL_BACKEND_HINT}"
        ) from None
    return microsandbox


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _stuck_message(name: str, state: SandboxState, waited: float) -> str:
    command = shlex.quote(name)
    force = f"stop it with 'msb stop --force {command}' and connect again"
    if state is SandboxState.STARTING:
        return (f"sandbox {name!r} is still starting after {_seconds(waited)}; see "
                f"'msb logs {command}', or {force}")
    return f"sandbox {name!r} is still stopping after {_seconds(waited)}; {force}"


def _state(handle: microsandbox.SandboxHandle) -> SandboxState:
    """The SDK's status of the sandbox, in the words of :class:`SandboxState`, which are its."""
    return SandboxState(str(handle.status.value))


def _run_id(handle: microsandbox.SandboxHandle) -> str | None:
    """The id of the run of a running sandbox (see the module docstring), else None."""
    if _state(handle) is not SandboxState.RUNNING:
        return None
    return f"{handle.id}@{handle.updated_at!r}"


class MicrosandboxBackend(Backend):
    """Sandboxes run by the microsandbox SDK, started, resumed or created on connect.

    ``sdk`` is the ``microsandbox`` module, or a stand-in with the same surface; by default the
    real one, imported on first use. ``wait_s`` bounds the wait for a sandbox some other tool
    is starting or stopping; ``lock_wait_s`` the wait for another msb-proxy that is creating,
    starting or stopping it.
    """

    name = "microsandbox"
    # Each is given to Sandbox.create_with_progress when the sandbox is created (unset: the
    # SDK's default; see the module docstring).
    options: ClassVar[Mapping[str, Option]] = {
        "image": IMAGE_OPTION,
        "cpus": Option(parse_positive_int, "a positive integer"),
        "memory": Option(parse_size_mib, 'MiB as an integer, or a size such as "2GiB"'),
        "workdir": Option(parse_string, "a guest directory"),
        "volumes": VOLUMES_OPTION,
        "network": NETWORK_OPTION,
        # Where the sandbox lives: this host's runtime, or microsandbox cloud (see ``cloud``).
        "cloud": cloud.CLOUD_OPTION,
        "profile": cloud.PROFILE_OPTION,
    }
    # Importing the SDK starts no thread, so the connections the warm server forks can share it.
    preload = ("microsandbox",)
    #: Whether every sandbox of this backend is in microsandbox cloud, whatever its template.
    always_cloud: ClassVar[bool] = False

    def __init__(self, state: StateDir, sdk: ModuleType | None = None, *,
                 wait_s: float = WAIT_S, lock_wait_s: float = LOCK_WAIT_S,
                 templates: Callable[[str], SandboxTemplate] | None = None) -> None:
        self.state = state
        self._sdk = sdk
        self._wait_s = wait_s
        self._lock_wait_s = lock_wait_s
        # For the calls that are given only a name (stop, rm, ls, the idle watcher): which
        # template, and so which side (this host or the cloud), the sandbox has.
        self._templates = templates

    @classmethod
    def from_config(cls, config: Config) -> MicrosandboxBackend:
        return cls(StateDir(config.home), templates=config.template)

    @classmethod
    def checks(cls, config: Config) -> list[Check]:
        """The SDK; then, on this host, its runtime and KVM, or, in the cloud, its
        credentials."""
        try:
            sdk = _load_sdk()
        except BackendUnavailableError:
            return [Check("SDK", CheckStatus.FAIL, "the microsandbox package is not installed: "
                          "pip install microsandbox")]
        side = cloud.Side.of(config.defaults, cls.always_cloud)
        if side.resolved(sdk):
            return cloud.checks(sdk, side, config.config_file)
        installed = bool(sdk.is_runtime_installed())
        kvm = "/dev/kvm"
        usable = os.path.exists(kvm) and os.access(kvm, os.R_OK | os.W_OK)
        return [
            Check("runtime", CheckStatus.OK if installed else CheckStatus.FAIL,
                  "installed" if installed else
                  "not installed: run 'msb install' (or use --backend local)"),
            Check("KVM", CheckStatus.OK if usable else CheckStatus.FAIL,
                  "/dev/kvm is usable (whether VMs boot shows on the first start)" if usable else
                  "/dev/kvm is missing or not accessible: microVMs cannot run here; use "
                  "--backend local"),
        ]

    @property
    def sdk(self) -> ModuleType:
        if self._sdk is None:
            self._sdk = _load_sdk()
        return self._sdk

    @property
    def _api(self) -> type[microsandbox.Sandbox]:
        """``microsandbox.Sandbox``, typed as the SDK's stubs say, so its calls are checked."""
        api: type[microsandbox.Sandbox] = self.sdk.Sandbox
        return api

    async def open(self, name: str, template: SandboxTemplate,
                   progress: Progress) -> MicrosandboxSandbox:
        """Return the running sandbox ``name``, starting, resuming or creating it as needed.

        See the module docstring for each status and the SDK calls it takes.
        """
        sdk = self.sdk

        def waiting() -> None:
            progress.step(f"waiting for another msb-proxy to bring up sandbox {name!r} ...")

        async with self._lock(name, waiting):
            try:
                with self._scope(template):
                    sandbox, started, created = await self._bring_up(name, template, progress)
                    run_id = _run_id(await self._api.get(name))
            except sdk.MicrosandboxError as exc:
                raise self._error(exc, name, self.option(template, "image")) from None
        # Shown only after a step was: a sandbox that was simply running says nothing.
        progress.done(f"sandbox {name!r} ready")
        opened = MicrosandboxSandbox(name, sandbox, sdk, run_id=run_id or "", started=started)
        opened.created = created
        return opened

    async def _bring_up(self, name: str, template: SandboxTemplate,
                        progress: Progress) -> tuple[microsandbox.Sandbox, bool, bool]:
        """The sandbox connected to, whether this call started it, and whether it created
        it (from its template, or as a fork of ``template.fork_of``)."""
        sdk = self.sdk
        for _ in range(DECIDE_ATTEMPTS):
            try:
                handle = await self._api.get(name)
            except sdk.SandboxNotFoundError:
                try:
                    if template.fork_of is not None:
                        return (await self._fork(template.fork_of, name, template, progress),
                                True, True)
                    if not template.create:
                        raise SandboxNotFoundError(
                            f"there is no sandbox {name!r} and its template does not allow "
                            f"creating it; set create = true for it in {self.state.config_file}"
                        ) from None
                    return await self._create(name, template, progress), True, True
                except sdk.SandboxAlreadyExistsError:
                    continue  # another tool made it meanwhile: use that one
            try:
                handle = await self._settled(name, handle, progress)
                state = _state(handle)
                if state is SandboxState.RUNNING:
                    return await self._connect(handle), False, False
                if state is SandboxState.PAUSED:
                    progress.step(f"resuming sandbox {name!r} ...")
                    await handle.resume()
                    # connect() checks the handle's status as of get(), which says PAUSED.
                    return await self._connect(await handle.refresh()), True, False
                progress.step(f"starting sandbox {name!r} ...")
                try:
                    return await handle.start(detached=True), True, False
                except sdk.MicrosandboxError as exc:
                    if _DIED_BOOTING not in str(exc):
                        raise
                    raise await self._boot_failure(name, exc) from None
            except (sdk.SandboxNotFoundError, sdk.SandboxNotRunningError,
                    sdk.SandboxReplacedError, _Changed):
                continue  # stopped, removed or replaced by another tool since we looked
        raise SandboxError(f"sandbox {name!r} kept changing state while msb-proxy brought it "
                           "up (is another tool starting and stopping it?); try again")

    async def _connect(self, handle: microsandbox.SandboxHandle) -> microsandbox.Sandbox:
        """``handle.connect()``; :class:`_Changed` when it fails because the sandbox stopped
        since ``handle`` was read.

        The SDK's connect checks the handle's cached status and then dials the sandbox's agent
        relay: a runtime gone meanwhile fails that dial with a generic agent client error, so
        the cause is told apart by reading the status again.
        """
        sdk = self.sdk
        try:
            return await handle.connect()
        except (sdk.SandboxNotFoundError, sdk.SandboxNotRunningError, sdk.SandboxReplacedError):
            raise
        except sdk.MicrosandboxError:
            if _state(await handle.refresh()) is not SandboxState.RUNNING:
                raise _Changed from None
            raise

    async def _boot_failure(self, name: str, exc: BaseException) -> UserError:
        """What stopped sandbox ``name`` from booting, from its system log.

        The runtime only says that the VM died before its agent came up; the VMM's log lines
        say why. A host that cannot run microVMs (KVM unusable) names the local backend; any
        other death (a bad image, an init that fails) is that sandbox's problem.
        """
        sdk = self.sdk
        command = shlex.quote(name)
        try:
            handle = await self._api.get(name)
            entries = await handle.logs(tail=_LOG_TAIL, sources=[sdk.LogReadSource.SYSTEM])
        except sdk.MicrosandboxError as log_error:
            log.debug("cannot read the log of sandbox %r: %s", name, log_error)
            entries = []
        lines = [" ".join(entry.text().split()) for entry in entries]
        errors = [line for line in lines if line.startswith(_LOG_ERROR)]
        reason = errors[-1].removeprefix(_LOG_ERROR) if errors else one_line(exc)
        if any(marker in line for line in [*errors, one_line(exc)] for marker in _CANNOT_BOOT):
            return BackendUnavailableError(
                f"microVMs cannot run on this host: sandbox {name!r} died while booting "
                f"({reason}); {LOCAL_BACKEND_HINT}")
        return SandboxError(f"sandbox {name!r} failed to boot: {reason}; see "
                            f"'msb logs {command}'")

    async def fork(self, parent: str, child: str, progress: Progress) -> None:
        """``SandboxHandle.fork`` of ``parent`` as ``child`` (see :meth:`_fork`), the fork
        left running. Called under ``child``'s lock, as :meth:`open` calls it."""
        sdk = self.sdk
        template = self._template(parent)  # a fork's template is its parent's
        try:
            with self._scope(template):
                await self._fork(parent, child, template, progress)
        except sdk.SandboxAlreadyExistsError:
            raise SandboxError(f"cannot fork sandbox {parent!r} as {child!r}: there is a "
                               f"sandbox {child!r} already") from None
        except sdk.MicrosandboxError as exc:
            raise self._error(exc, child) from None

    async def _fork(self, parent: str, child: str, template: SandboxTemplate,
                    progress: Progress) -> microsandbox.Sandbox:
        """Fork ``parent`` as ``child`` and return the fork, connected and running.

        The SDK's fork is a live duplicate, memory and processes too, of a sandbox that is
        running or paused (one that is not has "no live runtime": refused here in one line),
        which goes on as it was: it is held still for the copy and its guest's writes are
        flushed first when the runtime can (``GuestFlush.AUTO``; storage barriers always
        apply), so the fork is the parent as of one instant. The fork gets msb-proxy's
        ``LABELS`` (it has its parent's otherwise) and is detached from this process, as a
        created sandbox is.
        """
        sdk = self.sdk
        if self._side(template).resolved(sdk):
            raise SandboxError(f"cannot fork sandbox {parent!r}: microsandbox cloud forks no "
                               "sandboxes (the SDK forks only on this host's runtime)")
        try:
            handle = await self._settled(parent, await self._api.get(parent), progress)
        except sdk.SandboxNotFoundError:
            raise SandboxNotFoundError(f"there is no sandbox {parent!r} to fork") from None
        state = _state(handle)
        if state not in _FORKABLE_STATES:
            raise SandboxError(
                f"cannot fork sandbox {parent!r}: it is {state.value}, and microsandbox forks "
                f"only a running or paused sandbox (the fork copies its memory too); connect "
                f"to {parent!r} once to start it, then fork it again")
        progress.step(f"forking sandbox {parent!r} as {child!r} ...")
        try:
            sandbox: microsandbox.Sandbox = await handle.fork(
                child, guest_flush=sdk.GuestFlush.AUTO)
        except sdk.InvalidConfigError as exc:
            raise ConfigError(f"cannot fork sandbox {parent!r} as {child!r}: "
                              f"{one_line(exc).removeprefix('invalid config: ')}") from None
        except (sdk.SandboxNotFoundError, sdk.SandboxReplacedError):
            raise SandboxNotFoundError(f"sandbox {parent!r} was removed while msb-proxy was "
                                       "forking it") from None
        except sdk.SandboxNotRunningError:
            raise SandboxError(f"cannot fork sandbox {parent!r}: it stopped while msb-proxy "
                               "was forking it; connect to it and fork it again") from None
        if await sandbox.owns_lifecycle:
            await sandbox.detach()
        try:
            await (await self._api.get(child)).modify(labels=LABELS)
        except sdk.MicrosandboxError as exc:  # only 'ls' misses it: the fork itself is fine
            log.debug("cannot label fork %r as msb-proxy's: %s", child, exc)
        return sandbox

    async def _settled(self, name: str, handle: microsandbox.SandboxHandle,
                       progress: Progress) -> microsandbox.SandboxHandle:
        """``handle`` once its sandbox has finished starting or stopping, within ``wait_s``."""
        state = _state(handle)
        if state not in _SETTLING_STATES:
            return handle
        progress.step(f"waiting for sandbox {name!r} to finish {_SETTLING_STATES[state]} ...")
        deadline = time.monotonic() + self._wait_s
        while (state := _state(handle)) in _SETTLING_STATES:
            if time.monotonic() >= deadline:
                raise SandboxError(_stuck_message(name, state, self._wait_s))
            await asyncio.sleep(STATUS_POLL_S)
            handle = await handle.refresh()
        return handle

    async def _create(self, name: str, template: SandboxTemplate,
                      progress: Progress) -> microsandbox.Sandbox:
        """Create and boot sandbox ``name`` from ``template``, showing the image pull."""
        sdk = self.sdk
        reference = self.option(template, "image")
        if reference is None:
            raise ConfigError(
                f"there is no sandbox {name!r} and its template names no image to create it "
                f"from; set image (an OCI image such as \"debian:bookworm\", or a root file "
                f"system directory) for it in {self.state.config_file}")
        if self._side(template).resolved(sdk) and (
                refused := cloud.refusal(name, template, self.state.config_file)) is not None:
            raise refused
        images: type[microsandbox.Image] = sdk.Image
        image = images.bind(reference) if reference.startswith("/") else images.oci(reference)
        volumes = self._volumes(name, template.options.get("volumes") or ())
        progress.step(f"creating sandbox {name!r} from {reference} ...")
        session = self._api.create_with_progress(
            name, image=image, cpus=self.option(template, "cpus"),
            memory=self.option(template, "memory"), env=dict(template.env) or None,
            workdir=self.option(template, "workdir"), volumes=volumes or None,
            network=self._network(self.option(template, "network")), labels=LABELS,
            detached=True)
        meter = _PullMeter(f"pulling image {reference}", progress, sdk)
        async with session:
            async for event in session.progress:
                meter.update(event)
            if meter.shown:
                progress.step(f"starting sandbox {name!r} ...")
            try:
                sandbox: microsandbox.Sandbox = await session.result()
            except sdk.MicrosandboxError as exc:
                if _DIED_BOOTING not in str(exc):
                    raise
                raise await self._boot_failure(name, exc) from None
        return sandbox

    def _volumes(self, name: str, volumes: Sequence[str]) -> dict[str, microsandbox.MountConfig]:
        """The template's ``/host:/guest[:ro]`` volumes as the SDK's bind mounts, by guest path."""
        sdk = self.sdk
        mount_config: type[microsandbox.MountConfig] = sdk.MountConfig
        bind: microsandbox.MountKind = sdk.MountKind.BIND
        mounts = {}
        for volume in volumes:
            host, guest, *mode = volume.split(":")
            if not os.path.exists(host):
                raise ConfigError(f"sandbox {name!r}: volume {volume!r}: {host} does not exist")
            mounts[guest] = mount_config(kind=bind, bind=host, readonly=mode == ["ro"])
        return mounts

    def _network(self, network: str | None) -> microsandbox.Network | None:
        """The template's ``network`` as the SDK's policy; None leaves the SDK's default."""
        if network is None:
            return None
        networks: type[microsandbox.Network] = self.sdk.Network
        if network == "none":
            return networks.none()
        profiles: type[microsandbox.NetworkProfile] = self.sdk.NetworkProfile
        return networks.from_profiles(profiles(network))

    def _side(self, template: SandboxTemplate) -> cloud.Side:
        return cloud.Side.of(template, self.always_cloud)

    def _scope(self, template: SandboxTemplate) -> contextlib.AbstractContextManager[None]:
        """The SDK's calls, while this is entered, reach the side ``template`` puts the
        sandbox on."""
        return cloud.scope(self.sdk, self._side(template), self.state.config_file)

    def _template(self, name: str | None) -> SandboxTemplate:
        """The template of sandbox ``name`` (the defaults for None); the defaults where the
        config cannot give it (stop and rm work whatever its options say)."""
        if self._templates is None:
            return SandboxTemplate()
        try:
            return self._templates(name if name is not None else "")
        except ConfigError:
            return SandboxTemplate()

    def _lock(self, name: str, on_wait: Callable[[], None] | None = None
              ) -> contextlib.AbstractAsyncContextManager[None]:
        return sandbox_lock(self.state.lock_file(name), name, self._lock_wait_s,
                            f"see 'msb logs {shlex.quote(name)}'", on_wait)

    async def state_of(self, name: str) -> SandboxState | None:
        handle = await self._find(name)
        return None if handle is None else _state(handle)

    async def current_run(self, name: str) -> str | None:
        handle = await self._find(name)
        return None if handle is None else _run_id(handle)

    async def _find(self, name: str) -> microsandbox.SandboxHandle | None:
        sdk = self.sdk
        try:
            with self._scope(self._template(name)):
                return await self._api.get(name)
        except sdk.SandboxNotFoundError:
            return None
        except sdk.MicrosandboxError as exc:
            raise self._error(exc, name) from None

    async def stop(self, name: str) -> bool:
        sdk = self.sdk
        async with self._lock(name):
            try:
                with self._scope(self._template(name)):
                    handle = await self._api.get(name)
                    if _state(handle) not in _LIVE_STATES:
                        return False
                    await handle.stop()
            except sdk.SandboxNotFoundError:
                raise SandboxNotFoundError(f"there is no sandbox {name!r}") from None
            except sdk.SandboxNotRunningError:
                return False
            except sdk.MicrosandboxError as exc:
                raise self._error(exc, name) from None
        return True

    async def remove(self, name: str) -> bool:
        sdk = self.sdk
        async with self._lock(name):
            try:
                with self._scope(self._template(name)):
                    handle = await self._api.get(name)
                    if _state(handle) in _LIVE_STATES:
                        with contextlib.suppress(sdk.SandboxNotRunningError):
                            await handle.stop()
                    await self._api.remove(name)
            except sdk.SandboxNotFoundError:
                return False
            except sdk.MicrosandboxError as exc:
                raise self._error(exc, name) from None
            retire_lock(self.state.lock_file(name))
        return True

    def _error(self, exc: BaseException, name: str | None,
               image: str | None = None) -> UserError:
        """The one-line error a user sees for the SDK's ``exc`` about sandbox ``name``."""
        sdk = self.sdk
        text = one_line(exc)
        subject = self.name if name is None else f"sandbox {name!r}"
        if (isinstance(exc, (sdk.RuntimeNotInstalledError, sdk.RuntimeIncompleteError))
                or any(marker in text for marker in _CANNOT_BOOT)):
            return BackendUnavailableError(
                f"microVMs cannot run on this host ({text}); {LOCAL_BACKEND_HINT}")
        # A pull that fails arrives as a plain MicrosandboxError "image error: ..." (observed:
        # sdk/python/src/error.rs maps no image error of the pull to ImagePullFailedError).
        pull_failed = isinstance(exc, (sdk.ImagePullFailedError, sdk.ImageNotFoundError)) or (
            type(exc) is sdk.MicrosandboxError and text.startswith("image error:"))
        if image is not None and pull_failed:
            return SandboxError(
                f"cannot pull image {image!r} for sandbox {name!r} ({text}); check the image "
                f"name and the network, or set another image in {self.state.config_file}")
        if isinstance(exc, sdk.UnsupportedError):
            return SandboxError(f"{subject}: {text} (microsandbox cloud serves less than a "
                                "local runtime)")
        if isinstance(exc, sdk.InvalidConfigError):
            reason = text.removeprefix("invalid config: ")
            return ConfigError(f"{subject}: the microsandbox SDK refuses its template "
                               f"({reason}); fix it in {self.state.config_file}")
        return SandboxError(f"{subject}: {text}")

    async def list_all(self) -> list[SandboxInfo]:
        """Every sandbox of the runtime, whoever made it."""
        return await self._list(None)

    async def _list(self, labels: Mapping[str, str] | None) -> list[SandboxInfo]:
        sdk = self.sdk
        try:
            with self._scope(self._template(None)):
                page = await self._api.list_with(labels=labels)
                handles = list(page.sandboxes)
                while page.next_cursor:
                    page = await self._api.list_with(cursor=page.next_cursor, labels=labels)
                    handles.extend(page.sandboxes)
        except sdk.MicrosandboxError as exc:
            raise self._error(exc, None) from None
        # The SDK lists newest first; ls shows sandboxes by name, as the local backend does.
        return sorted((SandboxInfo(name=handle.name, state=_state(handle), backend=self.name)
                       for handle in handles), key=lambda info: info.name)

    async def list(self) -> list[SandboxInfo]:
        """The sandboxes msb-proxy created (those with its ``LABELS``)."""
        return await self._list(LABELS)

    async def sessions(self, name: str) -> Sequence[SessionInfo]:
        """Asked of the guest's session keeper, through an agent of our own; none when the
        sandbox is not running or its guest runs no agent (and so keeps no sessions)."""
        found = await self._ask_keeper(name, protocol.SESSIONS, {})
        return [SessionInfo(**session) for session in found.get("sessions", [])]

    async def kill_session(self, name: str, session: str) -> bool:
        found = await self._ask_keeper(name, protocol.KILL_SESSION, {"name": session})
        return bool(found.get("killed", False))

    async def _ask_keeper(self, name: str, op: int, request: dict[str, Any]) -> dict[str, Any]:
        sdk = self.sdk
        try:
            with self._scope(self._template(name)):
                handle = await self._api.get(name)
                if _state(handle) is not SandboxState.RUNNING:
                    return {}
                sandbox = await self._connect(handle)
        except sdk.SandboxNotFoundError:
            raise SandboxNotFoundError(f"there is no sandbox {name!r}") from None
        except _Changed:
            return {}
        except sdk.MicrosandboxError as exc:
            raise self._error(exc, name) from None
        try:
            agent = await GuestAgent.start(name, sandbox, sdk)
        except AgentUnavailable:
            return {}
        try:
            return await agent.ask(op, {**request, "run_dir": MicrosandboxSandbox.guest_run_dir})
        except SandboxError as exc:
            raise SandboxError(f"sandbox {name!r}: {exc}") from None
        finally:
            agent.close()


class _PullMeter:
    """Shows an image pull's ``PullEvent`` s as ``Progress.fraction`` of ``label``.

    The fraction is the bytes downloaded over the total when the registry gave sizes, else the
    layers downloaded over the layer count. An image already in the cache, which downloads
    nothing, shows nothing.
    """

    def __init__(self, label: str, progress: Progress, sdk: ModuleType) -> None:
        self._label = label
        self._progress = progress
        self._kinds: type[microsandbox.PullEventType] = sdk.PullEventType
        self._layer_count = 0
        self._total: int | None = None
        self._downloaded: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._complete: set[int] = set()
        self.shown = False

    def update(self, event: microsandbox.PullEvent) -> None:
        kinds = self._kinds
        kind = event.event_type
        if kind == kinds.RESOLVED:
            self._layer_count = event.layer_count or 0
            self._total = event.total_download_bytes or None
        elif (kind in (kinds.LAYER_DOWNLOAD_PROGRESS, kinds.LAYER_DOWNLOAD_COMPLETE)
              and event.layer_index is not None):
            index = event.layer_index
            if event.downloaded_bytes is not None:
                self._downloaded[index] = event.downloaded_bytes
            if event.total_bytes:
                self._sizes[index] = event.total_bytes
            if kind == kinds.LAYER_DOWNLOAD_COMPLETE:
                self._complete.add(index)
            self._show(self._fraction())
        elif kind == kinds.COMPLETE and self.shown:
            self._show(1.0)

    def _fraction(self) -> float:
        total = self._total
        if total is None and self._layer_count and len(self._sizes) == self._layer_count:
            total = sum(self._sizes.values())
        if total:
            return sum(self._downloaded.values()) / total
        if self._layer_count:
            return len(self._complete) / self._layer_count
        return 0.0

    def _show(self, done: float) -> None:
        self.shown = True
        self._progress.fraction(self._label, done)


class MicrosandboxSandbox(Sandbox):
    """One connection's view of a running sandbox: the SDK's ``Sandbox`` from ``connect()``."""

    #: The guest directory of the session keeper's socket (a test on the SDK stand-in, whose
    #: guest processes share the host's file system, points it elsewhere).
    guest_run_dir: ClassVar[str] = GUEST_RUN_DIR

    def __init__(self, name: str, sandbox: microsandbox.Sandbox, sdk: ModuleType,
                 run_id: str = "", started: bool = False) -> None:
        self.name = name
        self.run_id = run_id
        self.started = started
        self._sandbox = sandbox
        # Taken once, now: the SDK's fs getter try-locks the sandbox and raises RuntimeError
        # "sandbox is busy" while any other call on it is in flight (sdk/python/src/sandbox.rs).
        self._fs = sandbox.fs
        self._sdk = sdk
        self._users: dict[str, GuestUser] = {}
        self._directories: set[str] = set()
        self._agent: asyncio.Task[GuestAgent] | None = None
        self._no_agent: str | None = None  # why this guest runs no agent: processes go direct

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
            data = await self._fs.read(path)
        except self._sdk.MicrosandboxError as exc:
            # The SDK maps every failure of the guest's file service to FilesystemError, a
            # missing file included (sdk/python/src/error.rs): ask whether it exists.
            with contextlib.suppress(self._sdk.MicrosandboxError):
                if not await self._fs.exists(path):
                    return []
            raise SandboxError(
                f"sandbox {self.name!r}: cannot read {path}: {one_line(exc)}") from None
        text = data.decode("utf-8", "surrogateescape")
        return [line.split(":") for line in text.splitlines() if ":" in line]

    async def spawn(self, spec: ProcessSpec, listener: ProcessListener) -> GuestProcess:
        """Through this connection's guest agent; where the guest cannot run one, one
        ``exec_stream`` per process (see the module docstring for what that loses)."""
        agent = await self._guest_agent()
        if agent is None:
            return await self._spawn_direct(spec, listener)
        try:
            return await agent.spawn(spec, listener)
        except SandboxError as exc:
            raise SandboxError(f"sandbox {self.name!r} cannot start {spec.program}: {exc}"
                               ) from None

    async def _guest_agent(self) -> GuestAgent | None:
        """This connection's agent, started on first use (again if it died); None when the
        guest cannot run it."""
        if self._no_agent is not None:
            return None
        task = self._agent
        if task is not None and task.done() and not task.cancelled() \
                and task.exception() is None and not task.result().alive:
            task = None  # died (its VM was restarted under us?): a new one
        if task is None:
            task = self._agent = asyncio.ensure_future(
                GuestAgent.start(self.name, self._sandbox, self._sdk))
        try:
            return await asyncio.shield(task)
        except AgentUnavailable as exc:
            self._agent = None  # nothing of it kept: each exec holds a client of the relay
            self._no_agent = str(exc)
            log.debug("sandbox %r runs no guest agent (%s): one exec_stream per process",
                      self.name, exc)
            return None

    async def attach_session(self, session: str, spec: ProcessSpec, listener: SessionListener,
                             timeout: float) -> GuestProcess:
        """Through this connection's guest agent to the guest's session keeper, a daemon the
        first such attach starts (see ``msb_proxy/guest/agent.py``): it holds the shell and
        its terminal, so that both outlive the agent and this connection. A guest without
        ``python3`` runs no agent and keeps no sessions: refused in one line."""
        agent = await self._guest_agent()
        if agent is None:
            raise SandboxError(
                f"sandbox {self.name!r} cannot keep named session {session!r}: its guest runs "
                f"no msb-proxy agent ({self._no_agent}); install python3 (3.6 or newer) in the "
                "image, or connect without MSB_SESSION or +SESSION")
        try:
            return await agent.attach(session, spec, listener, timeout, self.guest_run_dir)
        except SandboxError as exc:
            raise SandboxError(f"sandbox {self.name!r}: named session {session!r}: {exc}"
                               ) from None

    async def checks(self) -> list[Check]:
        """Whether this guest runs msb-proxy's agent, or each process as an exec of its own."""
        agent = await self._guest_agent()
        if agent is not None:
            return [Check("guest agent", CheckStatus.OK,
                          f"python {agent.python}: one agent per connection forks every process")]
        return [Check("guest agent", CheckStatus.WARN,
                      f"none ({self._no_agent}): each process is an exec of its own, so deaths "
                      "by signal show as exit 255, terminals need /bin/sh and stty, a slow "
                      "client does not slow the guest, a process not reading its stdin stalls "
                      "the sandbox and a connection has at most ~126 channels; install "
                      "python3 (3.6 or newer) in the image")]

    async def close(self) -> None:
        task, self._agent = self._agent, None
        if task is None:
            return
        if not task.done():
            task.cancel()
            return
        if not task.cancelled() and task.exception() is None:
            task.result().close()

    async def _spawn_direct(self, spec: ProcessSpec, listener: ProcessListener
                            ) -> DirectProcess:
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
                f"sandbox {self.name!r} cannot start {spec.program}: {one_line(exc)}") from None
        process = DirectProcess(handle, listener, self._sdk, spec.pty)
        try:
            await process.start()
        except (SandboxError, self._sdk.MicrosandboxError) as exc:
            raise SandboxError(
                f"sandbox {self.name!r} cannot start {spec.program}: {one_line(exc)}") from None
        return process

    async def _is_directory(self, path: str) -> bool:
        """Whether ``path`` exists in the guest; when the check itself fails, assume it does."""
        if path in self._directories:
            return True
        try:
            exists = await self._fs.exists(path)
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


class DirectProcess(GuestProcess):
    """A guest process behind an SDK ``ExecHandle`` of its own (where the guest runs no agent).

    Three kinds of task drive it: one pulls events and reports them to the listener, one writes
    queued input through the ``ExecSink``, and a chain runs control requests one after another.
    """

    def __init__(self, handle: microsandbox.ExecHandle, listener: ProcessListener,
                 sdk: ModuleType, pty: PtySpec | None) -> None:
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
                # The SDK's terminal starts at 24x80 (sdk/rust/lib/sandbox/exec.rs).
                await self._handle.resize(self._pty.rows, self._pty.cols)
            self._events = in_background(self._pull_events(), "exec event pump")
            if self._sink is not None:
                self._writer = in_background(self._write_stdin(self._sink), "exec stdin writer")
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
        handle = self._handle
        self._control(lambda: handle.signal(signum))

    def hangup(self) -> None:
        if self._hung_up:
            return
        self._hung_up = True
        self._stdin_open = False
        self._stdin.clear()
        if not self._started.done():
            self._started.cancel()
        # Nobody listens any more: what the process still says is not pulled.
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

        self._control_tail = in_background(run_in_turn(), "exec control request")

    async def _apply_size(self) -> None:
        """Give the terminal the newest size asked for, unless it already has it."""
        size = self._size
        if size != self._applied_size and self._running():
            self._applied_size = size
            await self._handle.resize(*size)

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


class MicrosandboxCloudBackend(MicrosandboxBackend):
    """microsandbox's sandboxes in microsandbox cloud (see ``cloud``): the microsandbox backend
    with every sandbox in the cloud, so ``volumes`` and ``cloud`` are not among its options."""

    name = "microsandbox-cloud"
    options: ClassVar[Mapping[str, Option]] = {
        key: option for key, option in MicrosandboxBackend.options.items()
        if key not in ("volumes", "cloud")}
    always_cloud = True

    async def _list(self, labels: Mapping[str, str] | None) -> list[SandboxInfo]:
        """None where the cloud is not set up at all (ls of every backend stays quiet)."""
        try:
            with self._scope(self._template(None)):
                pass
        except ConfigError as exc:
            if str(exc) == cloud.NO_CREDENTIALS:
                return []
            raise
        return await super()._list(labels)
