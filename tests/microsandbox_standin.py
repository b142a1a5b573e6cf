"""A stand-in for the part of the microsandbox SDK (0.7.11) that msb-proxy calls.

microVMs cannot boot on our machines, so the ``microsandbox`` backend is tested against this: a
module-like :class:`StandInSDK`, passed as ``MicrosandboxBackend(state, sdk=...)``. It offers
what the backend uses with the names, signatures, event order and error messages of the real
SDK. Each simulated behaviour names, in a comment, the upstream file it follows (repository
superradcompany/microsandbox: the Python binding ``sdk/python/src/*.rs``, the Rust SDK
``sdk/rust/lib/...``, the guest agent ``crates/agentd/lib/*.rs``, the relay
``crates/runtime/lib/relay.rs``), or says "observed" where the installed 0.7.11 wheel was called
without a VM (``tests/test_sdk_contract.py`` pins those observations against the real SDK). The
SDK's own value types and error classes are used as they are (``microsandbox.types``,
``microsandbox.errors``); mounts and networks are serialised with their own ``_to_dict()``.

The runtime's state (the SDK's sandbox database) is a JSON file in a directory given to
:class:`StandInSDK`, changed under an exclusive ``flock``, so every process that makes a
``StandInSDK`` on the same directory sees the same sandboxes and races between processes are
real races. Local and cloud sandboxes are kept apart, as the two backends' are; which one a
call reaches is decided as the SDK decides it (``set_default_backend``, ``backend_scope``,
``MSB_BACKEND``/``MSB_API_KEY``/``MSB_API_URL``/``MSB_PROFILE``), and a connected sandbox keeps
the backend it was connected through.

Processes in a connected sandbox are REAL host processes, run as the guest agent would run
them (``crates/agentd/lib/session.rs``): the command with its arguments, the agent's own
environment with ours merged in and ``/.msb/scripts`` put first on ``PATH``, in a session of
their own, on pipes or on a terminal that starts at 24x80. What the agent does between them and
the host is modelled too:

* the agent has ONE loop per sandbox (``crates/agentd/lib/agent.rs``): every exec request,
  stdin write, signal and resize, and the sending of every process's output to the host (its
  readers keep reading into the agent's own unbounded queue), go through it in turn, and a
  stdin write waits until the process has taken all of it, so a process that does not read its
  stdin stalls every process of the sandbox;
* the SDK drains each process's output into an unbounded channel whether or not anyone calls
  ``recv()`` (``sdk/rust/lib/sandbox/exec.rs``): nothing the caller does slows the guest;
* every ``exec_stream`` and every connected ``Sandbox`` is a client of the sandbox's agent
  relay, which refuses the 129th (``crates/runtime/lib/relay.rs``).

Where it knowingly differs from the real SDK:

* Only the calls and keyword arguments msb-proxy uses exist. ``image`` must be an
  ``ImageSource``.
* Nothing boots: starting is a status change after the ``start`` delay, a sandbox's guest file
  system (for ``fs`` calls) is a host directory, processes see the host's file system and run as
  the test's user (``user`` is not applied), and ``detached`` is only recorded.
* ``stop()`` goes straight to STOPPED and leaves processes running; nothing crashes by itself.
* The wording of the STARTUP event, of digests, of a refused relay client, of an fs error, of a
  stale handle's connect and of cloud errors is plausible (taken from the upstream sources
  named), not observed.
* Programs can be taken out of the guest or replaced (``remove_program``,
  ``substitute_program``), to play a guest without ``python3`` or with an old one.
* ``fork`` copies the source's root directory and configuration; the real one duplicates its
  running processes and memory too, which host processes cannot be (see
  ``SandboxApi.fork_from`` for what is observed and what assumed).
* A process that leaves its session and process group (a daemon) outlives its exec, as the
  runtime's agent lets it (it signals only an exec's own group, ``crates/agentd/lib/
  session.rs``: ``send_signal``; ``process.rs``: ``fail``), and also ``close()``: a test ends
  such processes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal as _signal
import struct
import subprocess
import termios
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from microsandbox import errors as _errors
from microsandbox.errors import (
    CloudHttpError,
    ExecFailedError,
    FilesystemError,
    ImageNotFoundError,
    ImagePullFailedError,
    InvalidConfigError,
    MicrosandboxError,
    PathNotFoundError,
    RuntimeIncompleteError,
    RuntimeNotInstalledError,
    SandboxAlreadyExistsError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxReplacedError,
    SandboxStillRunningError,
    UnsupportedError,
)
from microsandbox.types import (
    BackendKind,
    ExecEventType,
    GuestFlush,
    Image,
    ImageSource,
    ImageSourceKind,
    LogReadSource,
    LogSource,
    MountConfig,
    MountKind,
    Network,
    NetworkPolicy,
    NetworkProfile,
    PullEventType,
    SandboxStatus,
    Stdin,
    StdinMode,
)

__all__ = [
    "AGENTD_PATH",
    "BOOT_FAILURE_KVM",
    "MAX_RELAY_CLIENTS",
    "BackendKind",
    "CloudHttpError",
    "ExecEvent",
    "ExecEventType",
    "ExecFailedError",
    "ExecHandle",
    "FilesystemError",
    "GuestFlush",
    "Image",
    "ImageNotFoundError",
    "ImagePullFailedError",
    "InvalidConfigError",
    "LogReadSource",
    "LogSource",
    "MicrosandboxError",
    "MountConfig",
    "MountKind",
    "Network",
    "NetworkPolicy",
    "NetworkProfile",
    "PathNotFoundError",
    "PullEvent",
    "PullEventType",
    "PullSession",
    "RuntimeIncompleteError",
    "RuntimeNotInstalledError",
    "Sandbox",
    "SandboxAlreadyExistsError",
    "SandboxHandle",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxReplacedError",
    "SandboxStatus",
    "SandboxStillRunningError",
    "StandInSDK",
    "Stdin",
    "UnsupportedError",
]

READ_CHUNK = 16 * 1024
DEFAULT_ROWS, DEFAULT_COLS = 24, 80  # sdk/rust/lib/sandbox/exec.rs: exec_stream_with_pty_size
DOWNLOAD_STEPS = 4  # LAYER_DOWNLOAD_PROGRESS events per layer
# crates/protocol/lib/lib.rs: AGENT_RELAY_MAX_CLIENTS
MAX_RELAY_CLIENTS = 128
# What the relay socket and the console ring hold of messages toward the agent before a
# sender's write waits (a host socket buffer and the virtio ring: a few hundred KiB).
RELAY_BUFFER = 512 * 1024
# The agent's own environment, which every process inherits (crates/agentd/lib/session.rs:
# Command::new inherits; the PTY path forks). PATH gets /.msb/scripts put first
# (crates/agentd/lib/agent.rs: prepend_scripts_to_path, config.rs: scripts_path).
AGENTD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SCRIPTS_PATH = "/.msb/scripts"
# Observed (0.7.11 on a host whose KVM cannot run the guest): the system log of a failed boot.
BOOT_FAILURE_KVM = ("ERROR msb_krun_vmm::linux::vstate: Received KVM_EXIT_INTERNAL_ERROR signal",
                    "INFO msb_krun_vmm: Vmm is stopping.")
_CALLS = ("get", "list", "create", "start", "resume", "stop", "connect")
_LIVE = frozenset({SandboxStatus.RUNNING, SandboxStatus.STARTING, SandboxStatus.PAUSED,
                   SandboxStatus.DRAINING})
_STARTABLE = frozenset({SandboxStatus.CREATED, SandboxStatus.STOPPED, SandboxStatus.CRASHED})
# sdk/rust/lib/sandbox/handle.rs: connect_with_timeout accepts these cached statuses.
_CONNECTABLE = frozenset({SandboxStatus.RUNNING, SandboxStatus.DRAINING})
# Observed (0.7.11): fork refuses a source that is not running or paused by its user (the .so's
# own words: "branch requires a running or user-paused source") as SandboxNotRunningError.
_FORKABLE = frozenset({SandboxStatus.RUNNING, SandboxStatus.PAUSED})
# Observed (0.7.11): the name check that fork makes before it looks at the source.
_SANDBOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CREATE_KEYWORDS = frozenset({"image", "memory", "cpus", "workdir", "env", "labels", "volumes",
                              "network", "detached", "idle_timeout"})


@dataclass(frozen=True)
class ExecEvent:
    """sdk/python/src/exec.rs: PyExecEvent."""

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


@dataclass(frozen=True)
class PullEvent:
    """One step of an image pull, with the fields the SDK fills for its kind."""

    event_type: PullEventType
    phase: str | None = None
    completed_bytes: int | None = None
    reference: str | None = None
    manifest_digest: str | None = None
    layer_count: int | None = None
    total_download_bytes: int | None = None
    layer_index: int | None = None
    digest: str | None = None
    diff_id: str | None = None
    downloaded_bytes: int | None = None
    total_bytes: int | None = None
    bytes_read: int | None = None


@dataclass(frozen=True)
class LogEntry:
    """_microsandbox.pyi: LogEntry."""

    timestamp_ms: float
    source: LogSource
    session_id: int | None
    cursor: str
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class BackendInfo:
    """_microsandbox.pyi: BackendInfo (secret-free)."""

    kind: str
    api_url: str | None
    profile: str | None
    source: str


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _now_ms() -> float:
    # Observed: created_at and updated_at are milliseconds since the epoch.
    return float(int(time.time() * 1000))


# ---------------------------------------------------------------------------------------------
# The runtime's state


class _Store:
    """The runtime's database: one JSON document, read and written under an exclusive flock."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._document = directory / "runtime.json"
        self._lock = directory / "runtime.lock"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """The state, locked; written back when the block ends without an exception."""
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state: dict[str, Any] = json.loads(self._document.read_text())
            except FileNotFoundError:
                state = {"next_id": 1, "sandboxes": {"local": {}, "cloud": {}}, "images": {},
                         "calls": [], "profiles": {},
                         "knobs": {"delays": {}, "errors": {}, "page_size": 100,
                                   "boot_failure": None, "api_key": "test-key"}}
            _apply_due_changes(state)
            yield state
            scratch = self._document.with_name(f".runtime.{os.getpid()}.tmp")
            scratch.write_text(json.dumps(state))
            os.replace(scratch, self._document)
        finally:
            os.close(fd)


def _apply_due_changes(state: dict[str, Any]) -> None:
    """Make every status change a test scheduled (``set_status(..., then=)``) that is due."""
    now = _now_ms()
    for table in state["sandboxes"].values():
        for record in table.values():
            if record["then"] is not None and record["then"][1] <= now:
                status, when = record["then"]
                _set_status(record, SandboxStatus(status), when)


def _set_status(record: dict[str, Any], status: SandboxStatus, when: float | None = None) -> None:
    """Change the status and ``updated_at``, which strictly increases, as the row's does."""
    record["status"] = status.value
    record["updated_at"] = max(when or _now_ms(), record["updated_at"] + 1)
    record["then"] = None


def _log(record: dict[str, Any], text: str, source: LogSource = LogSource.SYSTEM) -> None:
    record["logs"].append([_now_ms(), source.value, text + "\n"])


class _Backend:
    """Which of the SDK's backends a call reaches, and with what credentials."""

    def __init__(self, kind: BackendKind, source: str, api_key: str | None = None,
                 url: str | None = None, profile: str | None = None) -> None:
        self.kind = kind
        self.source = source
        self.api_key = api_key
        self.url = url
        self.profile = profile

    @property
    def table(self) -> str:
        return self.kind.value


class _BackendScope:
    """sdk/python/src/lib.rs: PyBackendScope, restoring the previous default on exit."""

    def __init__(self, sdk: StandInSDK, previous: _Backend | None) -> None:
        self._sdk = sdk
        self._previous = previous

    def __enter__(self) -> _BackendScope:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sdk._default = self._previous


class StandInSDK(ModuleType):
    """The ``microsandbox`` module as far as msb-proxy uses it, over host processes.

    ``directory`` holds the runtime's state; stand-ins made on the same directory, in any
    process, share it.
    """

    def __init__(self, directory: Path) -> None:
        super().__init__("microsandbox_standin")
        self.directory = directory
        self.store = _Store(directory)
        self.processes: weakref.WeakSet[ExecHandle] = weakref.WeakSet()
        self._default: _Backend | None = None  # set_default_backend / backend_scope
        self._agents: dict[tuple[str, str], _Agentd] = {}
        self.Sandbox = SandboxApi(self)
        self.SandboxStatus = SandboxStatus
        self.PullEventType = PullEventType
        self.Image = Image
        self.MountConfig = MountConfig
        self.MountKind = MountKind
        self.Network = Network
        self.NetworkPolicy = NetworkPolicy
        self.NetworkProfile = NetworkProfile
        self.ExecEventType = ExecEventType
        self.GuestFlush = GuestFlush
        self.Stdin = Stdin
        self.BackendKind = BackendKind
        self.LogReadSource = LogReadSource
        self.LogSource = LogSource
        for error in __all__:
            if error.endswith("Error"):
                setattr(self, error, globals()[error])

    # ---- the module's functions (sdk/python/src/lib.rs)
    def set_default_backend(self, kind: BackendKind, *, url: str | None = None,
                            api_key: str | None = None, profile: str | None = None) -> None:
        self._default = self._build_backend(kind, url, api_key, profile)

    def backend_scope(self, kind: BackendKind, *, url: str | None = None,
                      api_key: str | None = None, profile: str | None = None) -> _BackendScope:
        previous = self._default
        self._default = self._build_backend(kind, url, api_key, profile)
        return _BackendScope(self, previous)

    def default_backend_kind(self) -> BackendKind:
        return self.backend().kind

    def default_backend_info(self) -> BackendInfo:
        backend = self.backend()
        return BackendInfo(backend.kind.value, backend.url, backend.profile, backend.source)

    def is_runtime_installed(self) -> bool:
        return True

    # ---- for tests
    def add_sandbox(self, name: str, root: Path, status: SandboxStatus = SandboxStatus.RUNNING,
                    labels: Mapping[str, str] | None = None, cloud: bool = False) -> None:
        """Register sandbox ``name`` whose guest file system is the host directory ``root``."""
        with self.store.transaction() as state:
            _insert(state, "cloud" if cloud else "local", name, str(root), status=status,
                    config={"labels": dict(labels or {})})

    def add_image(self, reference: str, root: Path, layers: Sequence[int] = (1 << 20,),
                  sizes_known: bool = True) -> None:
        """Make the OCI image ``reference`` pullable: its layers' sizes, its root file system.

        Without ``sizes_known`` the registry reports no sizes (no total, no per-layer total).
        """
        with self.store.transaction() as state:
            state["images"][reference] = {"root": str(root), "layers": list(layers),
                                          "sizes_known": sizes_known, "cached": False}

    def add_profile(self, name: str, api_url: str = "https://api.example.invalid",
                    api_key: str = "test-key") -> None:
        """A cloud profile in the SDK's global config (what ``msb login`` writes)."""
        with self.store.transaction() as state:
            state["profiles"][name] = {"url": api_url, "api_key": api_key}

    def set_status(self, name: str, status: SandboxStatus, then: SandboxStatus | None = None,
                   after: float = 0.0, cloud: bool = False) -> None:
        """Put sandbox ``name`` in ``status``; with ``then``, in that one ``after`` seconds."""
        with self.store.transaction() as state:
            record = state["sandboxes"]["cloud" if cloud else "local"][name]
            _set_status(record, status)
            if then is not None:
                record["then"] = [then.value, _now_ms() + after * 1000]

    def status_of(self, name: str, cloud: bool = False) -> SandboxStatus | None:
        with self.store.transaction() as state:
            record = state["sandboxes"]["cloud" if cloud else "local"].get(name)
            return None if record is None else SandboxStatus(record["status"])

    def root_of(self, name: str, cloud: bool = False) -> Path:
        """The host directory that is sandbox ``name``'s guest file system."""
        with self.store.transaction() as state:
            return Path(state["sandboxes"]["cloud" if cloud else "local"][name]["root"])

    def labels_of(self, name: str) -> dict[str, str]:
        with self.store.transaction() as state:
            labels: dict[str, str] = state["sandboxes"]["local"][name]["config"]["labels"]
            return labels

    def set_delay(self, call: str, seconds: float) -> None:
        """Make ``create`` (after its pull) or ``start`` take ``seconds``, in every process."""
        with self.store.transaction() as state:
            state["knobs"]["delays"][call] = seconds

    def set_error(self, call: str, error: MicrosandboxError | None) -> None:
        """Make ``call`` (get, list, create, start, resume, stop, connect) raise ``error``."""
        assert call in _CALLS, call
        with self.store.transaction() as state:
            if error is None:
                state["knobs"]["errors"].pop(call, None)
            else:
                state["knobs"]["errors"][call] = [type(error).__name__, str(error)]

    def fail_boot(self, log_lines: Sequence[str] | None = BOOT_FAILURE_KVM) -> None:
        """Make every boot (start, and the start that ends a creation) fail, writing
        ``log_lines`` to the sandbox's system log; None boots again."""
        with self.store.transaction() as state:
            state["knobs"]["boot_failure"] = None if log_lines is None else list(log_lines)

    def remove_program(self, name: str) -> None:
        """Make the guest lack program ``name`` (a name or a path): exec_stream of it FAILs."""
        with self.store.transaction() as state:
            state["knobs"].setdefault("missing", []).append(name)

    def substitute_program(self, name: str, argv: Sequence[str]) -> None:
        """Make the guest's program ``name`` run ``argv`` (followed by the arguments given)."""
        with self.store.transaction() as state:
            state["knobs"].setdefault("substitutes", {})[name] = list(argv)

    def guest_programs(self) -> tuple[list[str], dict[str, list[str]]]:
        """The programs the guest lacks, and those it has in another form."""
        with self.store.transaction() as state:
            knobs = state["knobs"]
            return list(knobs.get("missing", [])), dict(knobs.get("substitutes", {}))

    def agent_backlog(self, name: str) -> int:
        """How many messages from the host the agent of local sandbox ``name`` has not yet
        handled (its loop is stalled while this grows)."""
        agent = self._agents.get(("local", name))
        return 0 if agent is None else agent.backlog

    def set_page_size(self, size: int) -> None:
        with self.store.transaction() as state:
            state["knobs"]["page_size"] = size

    def calls(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every lifecycle call made so far (create, start, resume, pause, stop, remove)."""
        with self.store.transaction() as state:
            return [call for call in state["calls"] if kind is None or call["call"] == kind]

    def relay_clients(self, name: str) -> int:
        """How many clients the agent relay of local sandbox ``name`` has now."""
        agent = self._agents.get(("local", name))
        return 0 if agent is None else agent.clients

    def close(self) -> None:
        """Kill and reap every process still running; for test teardown."""
        for handle in self.processes:
            handle.dispose()
        for agent in self._agents.values():
            agent.close()

    # ---- for the API classes
    def backend(self) -> _Backend:
        """The default backend now (sdk/rust/lib/backend: default_backend, from the process's
        setting, else the environment)."""
        if self._default is not None:
            return self._default
        env = os.environ
        kind = env.get("MSB_BACKEND")
        profile = env.get("MSB_PROFILE")
        if kind not in (None, "local", "cloud"):
            # Observed wording.
            raise InvalidConfigError(
                f"invalid config: MSB_BACKEND must be 'local' or 'cloud', got {json.dumps(kind)}")
        if profile:
            with self.store.transaction() as state:
                found = state["profiles"].get(profile)
            if found is None:
                raise InvalidConfigError(  # observed wording
                    f'invalid config: active profile "{profile}" not found in global config')
            return _Backend(BackendKind.CLOUD, "env", found["api_key"], found["url"], profile)
        if kind == "cloud":
            if not env.get("MSB_API_KEY"):
                raise InvalidConfigError(  # observed wording
                    "invalid config: MSB_BACKEND=cloud requires a non-empty MSB_API_KEY or a "
                    "cloud profile")
            return _Backend(BackendKind.CLOUD, "env", env["MSB_API_KEY"],
                            env.get("MSB_API_URL") or "https://api.microsandbox.dev")
        return _Backend(BackendKind.LOCAL, "default")

    def _build_backend(self, kind: BackendKind, url: str | None, api_key: str | None,
                       profile: str | None) -> _Backend:
        """sdk/python/src/lib.rs: build_backend."""
        if BackendKind(kind) is BackendKind.LOCAL:
            return _Backend(BackendKind.LOCAL, "programmatic")
        if profile is not None:
            with self.store.transaction() as state:
                found = state["profiles"].get(profile)
            if found is None:
                raise InvalidConfigError(  # observed wording
                    f'invalid config: profile "{profile}" not found in global config')
            return _Backend(BackendKind.CLOUD, "programmatic", found["api_key"], found["url"],
                            profile)
        if api_key is None:
            raise ValueError("cloud backend requires api_key or profile")  # observed
        return _Backend(BackendKind.CLOUD, "programmatic", api_key,
                        url or "https://api.microsandbox.dev")

    def check(self, state: dict[str, Any], call: str, backend: _Backend | None = None) -> None:
        """Raise the error a test set for ``call``, if any; a cloud call with a key the cloud
        does not know fails as its HTTP API does."""
        failure = state["knobs"]["errors"].get(call)
        if failure is not None:
            raise getattr(_errors, failure[0])(failure[1])
        if backend is not None and backend.kind is BackendKind.CLOUD \
                and backend.api_key != state["knobs"]["api_key"]:
            raise CloudHttpError("cloud HTTP 401: invalid API key")  # sdk/rust/lib/error.rs

    def delay(self, call: str) -> float:
        with self.store.transaction() as state:
            return float(state["knobs"]["delays"].get(call, 0.0))

    def record(self, state: dict[str, Any], table: str, name: str,
               identity: int | None = None) -> dict[str, Any]:
        """Sandbox ``name``'s row; with ``identity``, only while it is that very sandbox."""
        record: dict[str, Any] | None = state["sandboxes"][table].get(name)
        if record is None:
            raise SandboxNotFoundError(f"sandbox not found: {name}")  # observed
        if identity is not None and record["id"] != identity:
            raise SandboxReplacedError(f"sandbox '{name}' was replaced by another of that name")
        return record

    def note(self, state: dict[str, Any], call: str, name: str, **details: Any) -> None:
        state["calls"].append({"call": call, "name": name, "pid": os.getpid(), **details})

    def agent(self, table: str, name: str) -> _Agentd:
        """The guest agent of sandbox ``name`` (one per run, in this process)."""
        key = (table, name)
        agent = self._agents.get(key)
        if agent is None:
            agent = self._agents[key] = _Agentd(name)
        return agent


def _insert(state: dict[str, Any], table: str, name: str, root: str, *,
            status: SandboxStatus, config: dict[str, Any]) -> dict[str, Any]:
    if name in state["sandboxes"][table]:
        raise SandboxAlreadyExistsError(f"sandbox already exists: {name}")
    now = _now_ms()
    # Observed: ids are "local:N"; cloud ids are the service's (plausible form).
    record = {"id": state["next_id"], "status": status.value, "root": root, "created_at": now,
              "updated_at": now, "then": None, "config": config, "logs": []}
    state["next_id"] += 1
    state["sandboxes"][table][name] = record
    return record


def _not_running(name: str, status: str) -> SandboxNotRunningError:
    # Observed wording (sdk/rust/lib/sandbox/handle.rs: connect_with_timeout).
    return SandboxNotRunningError(
        f"sandbox '{name}' is not running (status: {status.capitalize()})")


def _no_live_runtime(name: str) -> SandboxNotRunningError:
    # Observed: resume() and pause() of a sandbox that is not running.
    return SandboxNotRunningError(f'sandbox sandbox "{name}" has no live runtime')


# ---------------------------------------------------------------------------------------------
# The lifecycle API


class SandboxPage:
    def __init__(self, sandboxes: list[SandboxHandle], next_cursor: str | None) -> None:
        self.sandboxes = sandboxes
        self.next_cursor = next_cursor


class SandboxApi:
    """``microsandbox.Sandbox``'s static methods, bound to one stand-in runtime."""

    def __init__(self, sdk: StandInSDK) -> None:
        self._sdk = sdk

    async def get(self, name: str) -> SandboxHandle:
        backend = self._sdk.backend()
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "get", backend)
            return SandboxHandle(self._sdk, backend, name,
                                 self._sdk.record(state, backend.table, name))

    async def list(self) -> SandboxPage:
        return await self.list_with()

    async def list_with(self, *, cursor: str | None = None, limit: int | None = None,
                        labels: Mapping[str, str] | None = None) -> SandboxPage:
        backend = self._sdk.backend()
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "list", backend)
            table = state["sandboxes"][backend.table]
            wanted = dict(labels or {})
            # Newest first (observed order of the database's listing).
            names = [name for name, record in
                     sorted(table.items(), key=lambda item: -item[1]["id"])
                     if wanted.items() <= record["config"].get("labels", {}).items()]
            first = int(cursor or 0)
            last = first + (limit or state["knobs"]["page_size"])
            handles = [SandboxHandle(self._sdk, backend, name, table[name])
                       for name in names[first:last]]
            return SandboxPage(handles, str(last) if last < len(names) else None)

    async def remove(self, name: str) -> None:
        backend = self._sdk.backend()
        await self.remove_from(backend, name)

    async def remove_from(self, backend: _Backend, name: str) -> None:
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "remove", backend)
            record = self._sdk.record(state, backend.table, name)
            if record["status"] in _LIVE:
                raise SandboxStillRunningError(f"sandbox still running: {name}")
            del state["sandboxes"][backend.table][name]
            self._sdk.note(state, "remove", name)

    async def fork_from(self, backend: _Backend, parent: str, identity: int | None, name: str,
                        guest_flush: GuestFlush | None) -> Sandbox:
        """``fork`` of sandbox ``parent`` as ``name`` (SandboxHandle.fork and Sandbox.fork).

        Observed (0.7.11, without a VM): the name is checked first (InvalidConfigError), then
        the source (SandboxNotFoundError for one removed since the handle was read), then its
        status (SandboxNotRunningError "has no live runtime" for a stopped one). Read in the
        wheel's own strings (``_microsandbox.abi3.so``; the Aug 2026 upstream mirror has no
        fork yet): a fork is a live duplicate ("fork for live execution duplication") of a
        source that keeps running (or stays paused, "a running or user-paused source"),
        captured within one pause of it ("pause epoch"), after the guest's page cache is
        written back when ``guest_flush`` asks ("Optional guest writeback; mandatory storage
        barriers always apply"); "direct forking requires a local backend". Modelled: the
        copy is taken under the runtime's lock, so no other call sees the source mid-copy,
        and the source's status and ``updated_at`` are left as they were (assumed: the pause
        is the runtime's own, not a status change). A name that is taken is
        SandboxAlreadyExistsError in create's words (assumed). The fork's configuration,
        labels included, is its source's (assumed); its root file system is a copy of the
        source's directory. Not modelled: the source's processes and memory, which the real
        fork duplicates, are not copied (its guest processes are host processes here).
        """
        if not _SANDBOX_NAME.fullmatch(name):
            raise InvalidConfigError(  # observed wording
                "invalid config: sandbox name must start with an alphanumeric and contain only "
                f"alphanumeric, dots, hyphens, and underscores: {name}")
        if backend.kind is BackendKind.CLOUD:
            raise UnsupportedError("direct forking requires a local backend")  # the .so's words
        with self._sdk.store.transaction() as state:
            record = self._sdk.record(state, backend.table, parent, identity)
            if SandboxStatus(record["status"]) not in _FORKABLE:
                raise _no_live_runtime(parent)
            if name in state["sandboxes"][backend.table]:
                raise SandboxAlreadyExistsError(f"sandbox already exists: {name}")
            root = self._sdk.directory / "forks" / f"{name}-{state['next_id']}"
            shutil.copytree(record["root"], root, symlinks=True)
            child = _insert(state, backend.table, name, str(root),
                            status=SandboxStatus.RUNNING, config=json.loads(
                                json.dumps(record["config"])))
            _log(child, f"INFO microsandbox_runtime::runner::vm: sandbox forked from {parent}")
            self._sdk.note(state, "fork", name, parent=parent, parent_status=record["status"],
                           guest_flush=None if guest_flush is None else str(guest_flush))
        # Assumed attached, as create is by default: fork takes no ``detached``.
        return Sandbox(self._sdk, backend, name, root, True)

    async def start(self, name: str, *, detached: bool = False) -> Sandbox:
        return await self.boot(self._sdk.backend(), name, None, detached)

    async def boot(self, backend: _Backend, name: str, identity: int | None,
                   detached: bool) -> Sandbox:
        """Start the stopped sandbox ``name``: STARTING for the ``start`` delay, then RUNNING;
        or, when boots fail, STOPPED again with the failure in its system log."""
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "start", backend)
            record = self._sdk.record(state, backend.table, name, identity)
            status = SandboxStatus(record["status"])
            if status == SandboxStatus.RUNNING:
                raise SandboxStillRunningError(f"sandbox still running: {name}")
            if status not in _STARTABLE:
                raise MicrosandboxError(f"sandbox '{name}' cannot be started "
                                        f"(status: {status.value.capitalize()})")
            self._sdk.note(state, "start", name, detached=detached)
            _set_status(record, SandboxStatus.STARTING)
            identity = record["id"]
        await asyncio.sleep(self._sdk.delay("start"))
        with self._sdk.store.transaction() as state:
            record = self._sdk.record(state, backend.table, name, identity)
            failure = _boot(state, record, name)
        if failure is not None:
            raise failure
        return Sandbox(self._sdk, backend, name, Path(record["root"]), not detached)

    def create_with_progress(self, name: str, **options: Any) -> PullSession:
        # sdk/python/src/sandbox.rs: sandbox_builder_from_args refuses unknown keywords at the
        # call (observed: TypeError "unexpected keyword argument 'bogus'").
        for key in options:
            if key not in _CREATE_KEYWORDS:
                raise TypeError(f"unexpected keyword argument '{key}'")
        image = options.get("image")
        if not isinstance(image, ImageSource):
            raise TypeError("image must be an ImageSource (Image.oci or Image.bind) here")
        backend = self._sdk.backend()
        source = {"kind": image._type.value}
        if image._type == ImageSourceKind.OCI:
            source["reference"] = image._to_image_str()
        else:
            source["path"] = image._to_image_str()
        volumes = options.get("volumes")
        network = options.get("network")
        env = options.get("env")
        config = {
            "image": source, "cpus": options.get("cpus"), "memory": options.get("memory"),
            "workdir": options.get("workdir"), "env": None if env is None else dict(env),
            "labels": dict(options.get("labels") or {}),
            "idle_timeout": options.get("idle_timeout"),
            # Serialised here, as the SDK serialises them for its runtime, which is where it
            # rejects a malformed mount or network.
            "volumes": None if volumes is None else {
                guest: mount._to_dict() for guest, mount in volumes.items()},
            "network": None if network is None else network._to_dict(),
        }
        detached = bool(options.get("detached", False))
        with self._sdk.store.transaction() as state:
            self._sdk.note(state, "create", name, detached=detached, **config)
        return PullSession(self._sdk, backend, name, config, detached)


def _boot(state: dict[str, Any], record: dict[str, Any], name: str) -> MicrosandboxError | None:
    """The VM's boot: RUNNING, or, when a test makes boots fail, the failure's log lines and
    STOPPED (observed: a failed boot leaves the sandbox STOPPED, its runtime gone), and the
    error to raise once the change is written."""
    lines = state["knobs"]["boot_failure"]
    # Observed: the start of every boot's system log.
    _log(record, f"INFO microsandbox_runtime::runner::vm: sandbox starting sandbox={name}")
    _log(record, f"INFO microsandbox_runtime::runner::vm: entering VM sandbox={name}")
    if lines is None:
        _set_status(record, SandboxStatus.RUNNING)
        return None
    for line in lines:
        _log(record, line)
    _log(record, "--- sandbox stopped ---")
    _set_status(record, SandboxStatus.STOPPED)
    return MicrosandboxError(  # observed wording
        f'failed to start "{name}": sandbox process exited (exit status: 1) before agent relay '
        "became available")


class PullSession:
    """A creation under way: its pull's events, then its result."""

    def __init__(self, sdk: StandInSDK, backend: _Backend, name: str, config: dict[str, Any],
                 detached: bool) -> None:
        self._sdk = sdk
        self._backend = backend
        self._events: asyncio.Queue[PullEvent | None] = asyncio.Queue()
        self._ended = False
        self._consumed = False
        self._task = asyncio.get_running_loop().create_task(self._create(name, config, detached))

    @property
    def progress(self) -> AsyncIterator[PullEvent]:
        return self._progress()

    async def _progress(self) -> AsyncIterator[PullEvent]:
        while not self._ended:
            event = await self._events.get()
            if event is None:
                self._ended = True
                return
            yield event

    async def result(self) -> Sandbox:
        if self._consumed:
            raise RuntimeError("result() already consumed")
        self._consumed = True
        return await self._task

    def cancel(self) -> None:
        self._task.cancel()

    async def __aenter__(self) -> PullSession:
        return self

    async def __aexit__(self, *exc_info: object) -> bool:
        with contextlib.suppress(BaseException):
            await self._task
        return False

    async def _create(self, name: str, config: dict[str, Any], detached: bool) -> Sandbox:
        backend = self._backend
        try:
            with self._sdk.store.transaction() as state:
                self._sdk.check(state, "create", backend)
            root = await self._pull(name, config["image"])
            await asyncio.sleep(self._sdk.delay("create"))
            with self._sdk.store.transaction() as state:
                _insert(state, backend.table, name, root, status=SandboxStatus.STARTING,
                        config=config)
            with self._sdk.store.transaction() as state:
                failure = _boot(state, self._sdk.record(state, backend.table, name), name)
            if failure is not None:
                raise failure
            return Sandbox(self._sdk, backend, name, Path(root), not detached)
        finally:
            self._events.put_nowait(None)

    async def _pull(self, name: str, source: dict[str, str]) -> str:
        """Emit the pull's events; the root file system the sandbox will have."""
        with self._sdk.store.transaction() as state:
            if name in state["sandboxes"][self._backend.table]:
                raise SandboxAlreadyExistsError(f"sandbox already exists: {name}")
        emit = self._events.put_nowait
        if source["kind"] == ImageSourceKind.BIND.value:
            if self._backend.kind is BackendKind.CLOUD:
                raise UnsupportedError(  # observed wording
                    "sandbox.create() is not supported by this backend: the host-directory "
                    "rootfs option is not accepted here")
            if not os.path.isdir(source["path"]):
                raise InvalidConfigError(  # observed wording
                    f"invalid config: rootfs bind path does not exist: {source['path']}")
            emit(PullEvent(PullEventType.STARTUP, phase="activating"))  # observed
            return source["path"]
        reference = source["reference"]
        # Observed: a pull begins with RESOLVING; a registry that cannot be reached fails it
        # with a plain MicrosandboxError.
        emit(PullEvent(PullEventType.RESOLVING, reference=reference))
        await asyncio.sleep(0)
        with self._sdk.store.transaction() as state:
            image = state["images"].get(reference)
            if image is None:
                registry, _, path = reference.rpartition("/") if "." in reference.split("/")[0] \
                    else ("registry-1.docker.io", "", reference)
                repository, _, tag = (path or reference).partition(":")
                raise MicrosandboxError(
                    f"image error: registry error: error sending request for url (https://"
                    f"{registry.split('/')[0]}/v2/{repository}/manifests/{tag or 'latest'})")
            cached = image["cached"]
            image["cached"] = True
        layers: list[int] = image["layers"]
        known = image["sizes_known"]
        emit(PullEvent(PullEventType.RESOLVED, reference=reference,
                       manifest_digest=_digest(reference), layer_count=len(layers),
                       total_download_bytes=sum(layers) if known else None))
        if not cached:
            for index, size in enumerate(layers):
                digest = _digest(f"{reference}/{index}")
                for step in range(1, DOWNLOAD_STEPS + 1):
                    emit(PullEvent(PullEventType.LAYER_DOWNLOAD_PROGRESS, layer_index=index,
                                   digest=digest, downloaded_bytes=size * step // DOWNLOAD_STEPS,
                                   total_bytes=size if known else None))
                    await asyncio.sleep(0)
                emit(PullEvent(PullEventType.LAYER_DOWNLOAD_COMPLETE, layer_index=index,
                               digest=digest, downloaded_bytes=size))
            for index in range(len(layers)):
                diff_id = _digest(f"{reference}/{index}/diff")
                emit(PullEvent(PullEventType.LAYER_MATERIALIZE_STARTED, layer_index=index,
                               diff_id=diff_id))
                emit(PullEvent(PullEventType.LAYER_MATERIALIZE_COMPLETE, layer_index=index,
                               diff_id=diff_id))
            emit(PullEvent(PullEventType.STITCH_COMPLETE))
        emit(PullEvent(PullEventType.COMPLETE, reference=reference, layer_count=len(layers)))
        emit(PullEvent(PullEventType.STARTUP, phase="activating"))
        return str(image["root"])


class SandboxHandle:
    """Metadata of one sandbox as of ``Sandbox.get`` (a snapshot: its ``status`` does not
    follow the sandbox; sdk/rust/lib/sandbox/handle.rs), and its lifecycle calls."""

    def __init__(self, sdk: StandInSDK, backend: _Backend, name: str,
                 record: dict[str, Any]) -> None:
        self._sdk = sdk
        self._backend = backend
        self._identity: int = record["id"]
        self.name = name
        self.id = f"{backend.table}:{record['id']}"
        self.status = SandboxStatus(record["status"])
        self.created_at: float | None = record["created_at"]
        self.updated_at: float | None = record["updated_at"]
        self.config_json = json.dumps(record["config"])

    def _record(self, state: dict[str, Any]) -> dict[str, Any]:
        return self._sdk.record(state, self._backend.table, self.name, self._identity)

    async def refresh(self) -> SandboxHandle:
        with self._sdk.store.transaction() as state:
            return SandboxHandle(self._sdk, self._backend, self.name, self._record(state))

    async def connect(self, timeout: float | None = None) -> Sandbox:
        # sdk/rust/lib/sandbox/handle.rs: connect_with_timeout checks the handle's cached
        # status, then dials the agent relay.
        if self.status not in _CONNECTABLE:
            raise _not_running(self.name, self.status.value)
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "connect", self._backend)
            record = self._record(state)
            if SandboxStatus(record["status"]) not in _CONNECTABLE:
                # The relay socket of a runtime that is gone: a generic agent client error.
                raise MicrosandboxError(
                    "agent client error: connect to the agent relay: Connection refused "
                    "(os error 111)")
            return Sandbox(self._sdk, self._backend, self.name, Path(record["root"]), False)

    async def start(self, *, detached: bool = False) -> Sandbox:
        return await self._sdk.Sandbox.boot(self._backend, self.name, self._identity, detached)

    async def pause(self) -> None:
        with self._sdk.store.transaction() as state:
            record = self._record(state)
            if record["status"] != SandboxStatus.RUNNING.value:
                raise _no_live_runtime(self.name)
            self._sdk.note(state, "pause", self.name)
            _set_status(record, SandboxStatus.PAUSED)

    async def resume(self) -> None:
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "resume", self._backend)
            record = self._record(state)
            if record["status"] != SandboxStatus.PAUSED.value:
                raise _no_live_runtime(self.name)
            self._sdk.note(state, "resume", self.name)
            _set_status(record, SandboxStatus.RUNNING)

    async def stop(self, timeout: float | None = None) -> tuple[()]:
        """Observed: resolves to ``()`` (the stubs say None), also for a stopped sandbox."""
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "stop", self._backend)
            record = self._record(state)
            if record["status"] in _LIVE:
                self._sdk.note(state, "stop", self.name)
                _set_status(record, SandboxStatus.STOPPED)
        return ()

    async def fork(self, name: str, *, record_integrity: bool = False,
                   guest_flush: GuestFlush | None = None,
                   volumes: Mapping[str, MountConfig] | None = None) -> Sandbox:
        return await self._sdk.Sandbox.fork_from(self._backend, self.name, self._identity, name,
                                                 guest_flush)

    async def modify(self, *, labels: Mapping[str, str] | None = None,
                     labels_rm: list[str] | None = None) -> None:
        """Only the labels (the stubs: ``modify(..., labels=, labels_rm=, ...)``), which a
        running sandbox takes at once (assumed)."""
        with self._sdk.store.transaction() as state:
            config = self._record(state)["config"]
            config["labels"] = {key: value for key, value in
                                {**config.get("labels", {}), **(labels or {})}.items()
                                if key not in (labels_rm or [])}
            self._sdk.note(state, "modify", self.name, labels=config["labels"])

    async def remove(self) -> None:
        await self._sdk.Sandbox.remove_from(self._backend, self.name)

    async def logs(self, tail: int | None = None, since_ms: float | None = None,
                   until_ms: float | None = None,
                   sources: list[LogReadSource] | None = None) -> list[LogEntry]:
        """Observed: without ``sources`` only the output logs; the runtime's own lines are
        ``SYSTEM`` (or ``ALL``)."""
        wanted = {LogReadSource(source) for source in sources or [LogReadSource.OUTPUT]}
        if LogReadSource.ALL in wanted:
            wanted = set(LogReadSource)
        if LogReadSource.OUTPUT in wanted:
            wanted |= {LogReadSource.STDOUT, LogReadSource.STDERR}
        with self._sdk.store.transaction() as state:
            lines = self._record(state)["logs"]
        entries = [LogEntry(when, LogSource(source), None, str(index), text.encode())
                   for index, (when, source, text) in enumerate(lines)
                   if LogReadSource(source) in wanted
                   and (since_ms is None or when >= since_ms)
                   and (until_ms is None or when <= until_ms)]
        return entries[-tail:] if tail else entries


class Sandbox:
    """A connected sandbox: its file system and command execution. It keeps the backend it
    was connected through, and is one client of the sandbox's agent relay."""

    def __init__(self, sdk: StandInSDK, backend: _Backend, name: str, root: Path,
                 owns_lifecycle: bool) -> None:
        self._sdk = sdk
        self._backend = backend
        self._name = name
        self._root = root
        self._busy = 0
        self._agent = sdk.agent(backend.table, name)
        self._agent.connect_client()
        weakref.finalize(self, self._agent.disconnect_client)
        self._owns_lifecycle = owns_lifecycle

    @property
    def owns_lifecycle(self) -> Any:
        """The stubs: ``Awaitable[bool]``: whether this process stops the sandbox on exit."""
        async def owns() -> bool:
            return self._owns_lifecycle

        return owns()

    async def detach(self) -> None:
        """The sandbox no longer ends with this process (the stubs' ``Sandbox.detach``)."""
        self._owns_lifecycle = False
        with self._sdk.store.transaction() as state:
            self._sdk.note(state, "detach", self._name)

    async def fork(self, name: str, *, record_integrity: bool = False,
                   guest_flush: GuestFlush | None = None,
                   volumes: Mapping[str, MountConfig] | None = None) -> Sandbox:
        return await self._sdk.Sandbox.fork_from(self._backend, self._name, None, name,
                                                 guest_flush)

    @property
    def fs(self) -> SandboxFsOps:
        # sdk/python/src/sandbox.rs: the fs getter takes the sandbox's lock with try_lock().
        if self._busy:
            raise RuntimeError("sandbox is busy")
        return SandboxFsOps(self._sdk, self._backend, self._name, self._root)

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
        # sdk/python/src/sandbox.rs: clone_sandbox holds the sandbox's lock across an await.
        self._busy += 1
        try:
            await asyncio.sleep(0)
        finally:
            self._busy -= 1
        if self._sdk.status_of(self._name, self._backend.kind is BackendKind.CLOUD) \
                != SandboxStatus.RUNNING:
            raise SandboxNotRunningError(f"sandbox '{self._name}' is not running")
        if isinstance(stdin, bytes):
            stdin = Stdin.bytes(stdin)
        # sdk/rust/lib/sandbox/exec.rs: every exec_stream dials the relay anew.
        self._agent.connect_client()
        handle = ExecHandle(self._agent, cmd, list(args or []), cwd=cwd, env=dict(env or {}),
                            stdin=stdin or Stdin.null(), tty=tty)
        self._sdk.processes.add(handle)
        # sdk/rust/lib/sandbox/exec.rs: the request is sent and the handle returned; the agent
        # starts the process when its loop comes to the request.
        await self._agent.send(handle, "spawn", self._sdk.guest_programs())
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

    def __init__(self, sdk: StandInSDK, backend: _Backend, name: str, root: Path) -> None:
        self._sdk = sdk
        self._cloud = backend.kind is BackendKind.CLOUD
        self._name = name
        self._root = root

    def _path(self, path: str) -> Path:
        if self._sdk.status_of(self._name, self._cloud) != SandboxStatus.RUNNING:
            raise SandboxNotRunningError(f"sandbox '{self._name}' is not running")
        return self._root / path.lstrip("/")

    async def read(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except OSError as exc:
            # sdk/python/src/error.rs maps every agent fs failure to FilesystemError, none to
            # PathNotFoundError; sdk/rust/lib/error.rs "sandbox fs error: {0}",
            # crates/agentd/lib/fs.rs "open: {e}".
            raise FilesystemError(f"sandbox fs error: open: {exc.strerror} "
                                  f"(os error {exc.errno})") from None

    async def exists(self, path: str) -> bool:
        return self._path(path).exists()


# ---------------------------------------------------------------------------------------------
# The guest agent and the processes it runs


class _Agentd:
    """The guest agent of one sandbox, as far as the host can tell it apart: its relay's
    clients and its single loop.

    crates/agentd/lib/agent.rs handles each message from the host in turn and awaits it:
    ``ExecStdin`` awaits ``blocking_write_fd`` (crates/agentd/lib/session.rs), which returns once
    the process has taken every byte, and meanwhile no other message is handled and no
    process's output is sent to the host.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.clients = 0
        self._loop = asyncio.Lock()  # the agent's loop: held while it handles one message
        self._inbox: deque[tuple[ExecHandle, str, Any]] = deque()
        self._inbox_bytes = 0
        self._inbox_ready = asyncio.Event()
        self._inbox_space = asyncio.Event()
        self._inbox_space.set()
        # The agent's queue of output its readers took from processes (unbounded: the guest's
        # memory), sent to the host only when its loop is free.
        self._outbox: deque[tuple[ExecHandle, ExecEvent]] = deque()
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._handling = 0  # 1 while the loop handles a message

    def connect_client(self) -> None:
        # crates/runtime/lib/relay.rs: a client past AGENT_RELAY_MAX_CLIENTS is dropped before
        # the handshake, which the SDK reports as a generic agent client error.
        if self.clients >= MAX_RELAY_CLIENTS:
            raise MicrosandboxError(
                "agent client error: the agent relay closed the connection during the handshake")
        self.clients += 1

    def disconnect_client(self) -> None:
        self.clients -= 1

    @property
    def backlog(self) -> int:
        return len(self._inbox) + self._handling


    async def send(self, handle: ExecHandle, kind: str, payload: Any) -> None:
        """A message toward the agent: queued on the relay, waiting while its buffer is full
        (sdk/rust/lib/sandbox/exec.rs: ExecSink.write and ExecControl return once written)."""
        size = len(payload) if isinstance(payload, bytes) else 16
        while self._inbox_bytes >= RELAY_BUFFER:
            self._inbox_space.clear()
            await self._inbox_space.wait()
        self._inbox.append((handle, kind, payload))
        self._inbox_bytes += size
        self._inbox_ready.set()
        self._start()

    def output(self, handle: ExecHandle, event: ExecEvent) -> None:
        """An event of ``handle``'s process, for the host, in order."""
        self._outbox.append((handle, event))
        self._outbox_ready.set()
        self._start()

    def _start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._serve()), loop.create_task(self._forward())]

    async def _serve(self) -> None:
        while True:
            while not self._inbox:
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            handle, kind, payload = self._inbox.popleft()
            async with self._loop:
                self._handling = 1
                try:
                    await handle.handle_message(kind, payload)
                finally:
                    self._handling = 0
            self._inbox_bytes -= len(payload) if isinstance(payload, bytes) else 16
            if self._inbox_bytes < RELAY_BUFFER:
                self._inbox_space.set()

    async def _forward(self) -> None:
        while True:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            async with self._loop:
                while self._outbox:
                    handle, event = self._outbox.popleft()
                    handle.deliver(event)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class ExecSink:
    """sdk/rust/lib/sandbox/exec.rs: ExecSink. Each write is one ``ExecStdin`` message; an
    empty one, and ``close()``, is the end of input."""

    def __init__(self, handle: ExecHandle) -> None:
        self._handle = handle

    async def write(self, data: bytes) -> None:
        await self._handle.agent.send(self._handle, "stdin", bytes(data))

    async def close(self) -> None:
        await self._handle.agent.send(self._handle, "stdin", b"")


class ExecHandle:
    """One command the agent runs, on the host, seen as the SDK shows a command in the guest."""

    def __init__(self, agent: _Agentd, cmd: str, args: list[str], *, cwd: str | None,
                 env: dict[str, str], stdin: Stdin, tty: bool) -> None:
        self.agent = agent
        self.id = str(id(self))
        # sdk/python/src/exec.rs: recv, wait and collect take the handle's inner lock; signal,
        # kill and resize go through ExecControl, which takes none (since upstream #1190).
        self._recv_lock = asyncio.Lock()
        # sdk/rust/lib/sandbox/exec.rs: the unbounded channel the SDK drains the agent into.
        self._events: deque[ExecEvent] = deque()
        self._event_ready = asyncio.Event()
        self._ended = False  # no more events will be queued
        self._outputs: dict[int, bool] = {}  # open output fd -> whether it is stderr
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tty = tty
        self._master: int | None = None
        self._stdin_fd: int | None = None
        self._sink: ExecSink | None = None
        self._pidfd: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.process: subprocess.Popen[bytes] | None = None
        self._request = (cmd, args, cwd, env, stdin)
        if stdin._mode == StdinMode.PIPE:
            self._sink = ExecSink(self)
        weakref.finalize(self, agent.disconnect_client)

    def begin(self, programs: tuple[list[str], dict[str, list[str]]]) -> None:
        """The agent's ExecRequest: the process started, or FAILED (``programs``: those the
        guest lacks, and those it has in another form)."""
        cmd, args, cwd, env, stdin = self._request
        missing, substitutes = programs
        try:
            if cmd in missing or os.path.basename(cmd) in missing:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            if cmd in substitutes:
                cmd, args = substitutes[cmd][0], [*substitutes[cmd][1:], *args]
            self._start(cmd, args, cwd, env, stdin)
        except OSError as exc:
            # crates/agentd/lib/session.rs: exec_failed_from_io_error, "spawn {cmd:?}: {err}".
            message = f"spawn {json.dumps(cmd)}: {exc.strerror} (os error {exc.errno})"
            self._sink = None
            self.agent.output(self, ExecEvent(ExecEventType.FAILED, data=message.encode(),
                                              code=exc.errno))

    def _start(self, cmd: str, args: list[str], cwd: str | None, env: dict[str, str],
               stdin: Stdin) -> None:
        argv = [cmd, *args]  # crates/agentd/lib/session.rs: argv[0] is always the command
        env = {"PATH": AGENTD_PATH, **env}
        env["PATH"] = f"{SCRIPTS_PATH}:{env['PATH']}"
        if self._tty:
            # sdk/rust/lib/sandbox/mod.rs: build_exec_request adds TERM for a terminal.
            env.setdefault("TERM", "xterm")
            master, slave = os.openpty()
            fcntl.ioctl(master, termios.TIOCSWINSZ,
                        struct.pack("HHHH", DEFAULT_ROWS, DEFAULT_COLS, 0, 0))
            # crates/agentd/lib/session.rs: spawn_pty ignores a chdir that fails.
            if cwd is not None and not os.path.isdir(cwd):
                cwd = "/"
            try:
                # preexec_fn is safe here: the tests start no threads that could hold a lock
                # across the fork, and nothing else makes the terminal controlling before exec.
                process = subprocess.Popen(
                    argv, cwd=cwd or "/", env=env, stdin=slave, stdout=slave, stderr=slave,
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
            self._stdin_fd = os.dup(master)
        else:
            # crates/agentd/lib/session.rs: spawn_pipe, stdin always a pipe; a cwd that does
            # not exist fails the spawn.
            process = subprocess.Popen(
                argv, cwd=cwd or "/", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.PIPE, start_new_session=True)
            assert process.stdout is not None and process.stderr is not None
            assert process.stdin is not None
            for stream, is_stderr in ((process.stdout, False), (process.stderr, True)):
                fd = os.dup(stream.fileno())
                stream.close()
                os.set_blocking(fd, False)
                self._outputs[fd] = is_stderr
            self._stdin_fd = os.dup(process.stdin.fileno())
            process.stdin.close()
            os.set_blocking(self._stdin_fd, False)
            if stdin._mode == StdinMode.NULL:
                self._close_stdin()
        self.process = process
        self.agent.output(self, ExecEvent(ExecEventType.STARTED, pid=process.pid))
        self._watch_exit(process)
        for fd in list(self._outputs):
            self._spawn(self._read_output(fd))
        if stdin._mode == StdinMode.BYTES:
            self._spawn(self._feed(stdin._data or b""))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _feed(self, data: bytes) -> None:
        await self.agent.send(self, "stdin", data)
        await self.agent.send(self, "stdin", b"")

    def _watch_exit(self, process: subprocess.Popen[bytes]) -> None:
        """crates/agentd/lib/process.rs: reaped as soon as it exits; a death by signal is -1."""
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

    async def _read_output(self, fd: int) -> None:
        """crates/agentd/lib/session.rs: pipe_reader_task / pty_reader_task, forwarded through
        the agent's loop; once every output has ended and the process exited, EXITED."""
        while True:
            await _ready(fd)
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:  # EIO: every holder of the terminal has closed it
                data = b""
            if not data:
                break
            kind = ExecEventType.STDERR if self._outputs[fd] else ExecEventType.STDOUT
            self.agent.output(self, ExecEvent(kind, data=data))
        self._close_output(fd)
        if not self._outputs:
            code = await self._exit
            self.agent.output(self, ExecEvent(ExecEventType.EXITED, code=code))

    def _queue(self, event: ExecEvent) -> None:
        self._events.append(event)
        self._event_ready.set()

    def deliver(self, event: ExecEvent) -> None:
        """The SDK's event mapper: into the unbounded channel; nothing after EXITED or
        FAILED."""
        self._queue(event)
        if event.event_type in (ExecEventType.EXITED, ExecEventType.FAILED):
            self._ended = True

    # ---- the SDK surface
    def take_stdin(self) -> ExecSink | None:
        sink, self._sink = self._sink, None
        return sink

    async def recv(self) -> ExecEvent | None:
        async with self._recv_lock:
            return await self._next_event()

    def __aiter__(self) -> ExecHandle:
        return self

    async def __anext__(self) -> ExecEvent:
        event = await self.recv()
        if event is None:
            raise StopAsyncIteration
        return event

    async def wait(self) -> tuple[int, bool]:
        async with self._recv_lock:
            while (event := await self._next_event()) is not None:
                if event.event_type == ExecEventType.EXITED:
                    code = event.code if event.code is not None else -1
                    return code, code == 0
                if event.event_type == ExecEventType.FAILED:
                    raise _exec_failed(event)
        raise MicrosandboxError("runtime error: exec session ended without exit event")

    async def collect(self) -> ExecOutput:
        stdout, stderr = bytearray(), bytearray()
        async with self._recv_lock:
            while (event := await self._next_event()) is not None:
                if event.event_type == ExecEventType.STDOUT:
                    stdout += event.data or b""
                elif event.event_type == ExecEventType.STDERR:
                    stderr += event.data or b""
                elif event.event_type == ExecEventType.EXITED:
                    return ExecOutput(event.code if event.code is not None else -1,
                                      bytes(stdout), bytes(stderr))
                elif event.event_type == ExecEventType.FAILED:
                    raise _exec_failed(event)
        raise MicrosandboxError("runtime error: exec session ended without exit event")

    async def signal(self, sig: int) -> None:
        await self.agent.send(self, "signal", sig)

    async def kill(self) -> None:
        await self.signal(_signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        await self.agent.send(self, "resize", (rows, cols))

    # ---- what the agent does with our messages
    async def handle_message(self, kind: str, payload: Any) -> None:
        """crates/agentd/lib/agent.rs: handle_message, for this process's session."""
        if kind == "spawn":
            self.begin(payload)
        elif kind == "signal":
            # session.rs: send_signal signals the process group.
            if self.process is not None and not self._exit.done():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, payload)
        elif kind == "resize":
            rows, cols = payload
            if self._master is not None:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self._master, termios.TIOCSWINSZ,
                                struct.pack("HHHH", rows, cols, 0, 0))
        elif not payload:
            self._close_stdin()  # an empty ExecStdin: end of input (a terminal stays open)
        else:
            await self._write_stdin(payload)

    async def _write_stdin(self, data: bytes) -> None:
        """session.rs: blocking_write_fd, all of ``data``, waiting while the pipe is full."""
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

    def _close_stdin(self) -> None:
        if not self._tty and self._stdin_fd is not None:
            os.close(self._stdin_fd)
            self._stdin_fd = None

    def _stdin_failed(self, exc: OSError) -> None:
        # agent.rs: ExecStdinError, not fatal to the session.
        self.agent.output(self, ExecEvent(ExecEventType.STDIN_ERROR,
                              data=f"{exc.strerror} (os error {exc.errno})".encode(),
                              code=exc.errno))

    # ---- internals
    async def _next_event(self) -> ExecEvent | None:
        while not self._events:
            if self._ended:
                return None
            self._event_ready.clear()
            await self._event_ready.wait()
        return self._events.popleft()

    def _close_output(self, fd: int) -> None:
        del self._outputs[fd]
        if fd == self._master:
            self._master = None
        os.close(fd)

    def dispose(self) -> None:
        """Kill the process group if it still runs, reap it, and close every descriptor."""
        for task in list(self._tasks):
            task.cancel()
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, _signal.SIGKILL)
            process.wait()
        for fd in [*self._outputs, self._stdin_fd, self._pidfd]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._outputs.clear()
        self._stdin_fd = self._pidfd = self._master = None


def _exec_failed(event: ExecEvent) -> MicrosandboxError:
    # sdk/python/src/error.rs has no arm for ExecFailed: it arrives as a plain
    # MicrosandboxError (sdk/rust/lib/error.rs: "exec failed: {message}"), never
    # ExecFailedError.
    return MicrosandboxError(f"exec failed: {(event.data or b'').decode()}")


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
