"""A stand-in for the part of the microsandbox SDK (0.7.11) that msb-proxy calls.

microVMs cannot boot on our machines, so the ``microsandbox`` backend is tested against this: a
module-like :class:`StandInSDK`, passed as ``MicrosandboxBackend(state, sdk=...)``. It offers
exactly what the backend uses, with the names, signatures, event order and error messages of the
real SDK (checked against its stubs and its source: sdk/python/src/sandbox.rs and exec.rs,
sdk/rust/lib/sandbox/exec.rs, sdk/rust/lib/backend/local/sandbox/mod.rs,
crates/agentd/lib/session.rs and process.rs). The SDK's own value types (``SandboxStatus``,
``PullEventType``, ``Image``/``ImageSource``, ``MountConfig``, ``Network``, ``NetworkPolicy``,
``NetworkProfile``) and its error classes are used as they are, and mounts and networks are
serialised with their own ``_to_dict()``, which is where the SDK rejects a malformed one.

The runtime's state (the SDK's sandbox database) is a JSON file in a directory given to
:class:`StandInSDK`, changed under an exclusive ``flock``; so every process that makes a
``StandInSDK`` on the same directory sees the same sandboxes, and races between processes are
real races. Lifecycle:

* ``Sandbox.get(name)`` -> a handle with ``name``, ``id``, ``status``, ``created_at`` and
  ``updated_at`` as of the call (``updated_at`` changes with every status change, as the
  database row's does), and ``connect()``, ``start(detached=)``, ``stop()``, ``pause()``,
  ``resume()``, ``refresh()``, ``remove()``. A missing sandbox raises
  ``SandboxNotFoundError("sandbox not found: NAME")``.
* ``Sandbox.list()`` / ``Sandbox.list_with(cursor=, limit=)`` -> ``SandboxPage`` (by name;
  :meth:`StandInSDK.set_page_size` makes pages short so ``next_cursor`` is exercised);
  ``Sandbox.remove(name)``; ``Sandbox.start(name, detached=)``.
* ``Sandbox.create_with_progress(name, image=, cpus=, memory=, env=, workdir=, volumes=,
  network=, detached=)`` (not a coroutine) -> ``PullSession``: ``progress`` yields
  ``PullEvent`` s while the creation runs in a task; ``await result()`` gives the
  ``Sandbox`` or raises what failed. An OCI image (registered with
  :meth:`StandInSDK.add_image`) gives STARTUP, RESOLVING, RESOLVED (layer count, total bytes),
  per layer LAYER_DOWNLOAD_PROGRESS x4 and LAYER_DOWNLOAD_COMPLETE, per layer
  LAYER_MATERIALIZE_STARTED and _COMPLETE, STITCH_COMPLETE, COMPLETE; once pulled, an image is
  cached and later creations give STARTUP, RESOLVING, RESOLVED, COMPLETE only. An unknown
  image fails with ``ImagePullFailedError`` after RESOLVING. ``Image.bind(dir)`` gives no
  events (as the SDK's own tests show) and fails with ``InvalidConfigError`` when the
  directory is missing. A name that exists fails with ``SandboxAlreadyExistsError``. A created
  sandbox is RUNNING.
* Statuses move CREATED/STOPPED/CRASHED -start-> STARTING -> RUNNING (or CRASHED when start
  fails), RUNNING -pause-> PAUSED -resume-> RUNNING, live -stop-> STOPPED. A test places any
  status with :meth:`StandInSDK.set_status`, optionally followed by another after a delay
  (STARTING that becomes RUNNING, DRAINING that becomes STOPPED ...).
* Knobs for tests, shared by every process on the directory: :meth:`StandInSDK.set_delay`
  (``create`` or ``start`` takes that long: races can be exercised), :meth:`set_error`
  (a call raises that SDK error until cleared; a ``start`` error also fails the boot of a
  creation, leaving the sandbox CRASHED, as a VM that cannot boot does), and :meth:`calls`, the
  record of every lifecycle call made, with its arguments and the caller's pid.

Processes in a connected sandbox:

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

* Only the calls and keyword arguments msb-proxy uses exist; anything else is an
  ``AttributeError`` or ``TypeError``, so the backend cannot come to depend on something
  untested. ``image`` must be an ``ImageSource`` (``Image.oci``/``Image.bind``), not a string.
* Nothing boots: "starting" is a status change (after the ``start`` delay), a sandbox's guest
  file system is a host directory (the image's registered root, or the bound directory), and
  ``detached`` is only recorded: an attached sandbox is not stopped when its creator exits.
* ``stop()`` goes straight to STOPPED (the SDK passes through DRAINING) and leaves processes
  running; nothing ever crashes on its own.
* The wording of the STARTUP event (its ``phase``), of digests and of errors other than the
  observed ones (sandbox not found, not running; see shared/reference/upstream-msb-ssh.md;
  ``rootfs bind path does not exist`` from the SDK's tests) is plausible, not observed. So is
  the answer to ``start`` on a sandbox that is running (``SandboxStillRunningError``) or
  paused, starting or draining (``MicrosandboxError``).
* Processes run on the host as the test's own user: ``user`` is not applied, the file system is
  the host's (only ``fs`` calls use the stand-in root), and the environment is exactly ``env``
  (the agent merges it into its own).
* The real SDK moves events from the agent into an unbounded queue whether or not anyone calls
  ``recv()``; here the process itself blocks, which is what a test of "stop pulling while paused"
  needs to observe.
* ``ExecSink.write`` returns once the bytes are in the process's pipe or terminal, not once the
  agent has them; ``close()`` on a terminal does nothing.
* The agent's spawn failure message is a plausible wording.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import hashlib
import json
import os
import signal as _signal
import struct
import subprocess
import termios
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from microsandbox import errors as _errors
from microsandbox.errors import (
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
)
from microsandbox.types import (
    Image,
    ImageSource,
    ImageSourceKind,
    MountConfig,
    MountKind,
    Network,
    NetworkPolicy,
    NetworkProfile,
    PullEventType,
    SandboxStatus,
)

__all__ = [
    "ExecEvent",
    "ExecEventType",
    "ExecFailedError",
    "FilesystemError",
    "Image",
    "ImageNotFoundError",
    "ImagePullFailedError",
    "InvalidConfigError",
    "MicrosandboxError",
    "MountConfig",
    "MountKind",
    "Network",
    "NetworkPolicy",
    "NetworkProfile",
    "PathNotFoundError",
    "PullEvent",
    "PullEventType",
    "RuntimeIncompleteError",
    "RuntimeNotInstalledError",
    "SandboxAlreadyExistsError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxReplacedError",
    "SandboxStatus",
    "SandboxStillRunningError",
    "StandInSDK",
    "Stdin",
]

READ_CHUNK = 16 * 1024
DEFAULT_ROWS, DEFAULT_COLS = 24, 80
DOWNLOAD_STEPS = 4  # LAYER_DOWNLOAD_PROGRESS events per layer


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


_LIVE = frozenset({SandboxStatus.RUNNING, SandboxStatus.STARTING, SandboxStatus.PAUSED,
                   SandboxStatus.DRAINING})
_STARTABLE = frozenset({SandboxStatus.CREATED, SandboxStatus.STOPPED, SandboxStatus.CRASHED})
_CALLS = ("get", "list", "create", "start", "resume", "stop", "connect")


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


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
                state = {"next_id": 1, "sandboxes": {}, "images": {}, "calls": [],
                         "knobs": {"delays": {}, "errors": {}, "page_size": 100}}
            _apply_due_changes(state)
            yield state
            scratch = self._document.with_name(f".runtime.{os.getpid()}.tmp")
            scratch.write_text(json.dumps(state))
            os.replace(scratch, self._document)
        finally:
            os.close(fd)


def _apply_due_changes(state: dict[str, Any]) -> None:
    """Make every status change a test scheduled (``set_status(..., then=)``) that is due."""
    now = time.time()
    for record in state["sandboxes"].values():
        if record["then"] is not None and record["then"][1] <= now:
            status, when = record["then"]
            _set_status(record, SandboxStatus(status), when)


def _set_status(record: dict[str, Any], status: SandboxStatus, when: float | None = None) -> None:
    """Change the status and ``updated_at``, which strictly increases, as the row's does."""
    record["status"] = status.value
    record["updated_at"] = max(when or time.time(), record["updated_at"] + 1e-6)
    record["then"] = None


class StandInSDK(ModuleType):
    """The ``microsandbox`` module as far as msb-proxy uses it, over host processes.

    ``directory`` holds the runtime's state; stand-ins made on the same directory, in any
    process, share it.
    """

    def __init__(self, directory: Path) -> None:
        super().__init__("microsandbox_standin")
        self.store = _Store(directory)
        self.processes: list[ExecHandle] = []
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
        self.Stdin = Stdin
        for error in __all__:
            if error.endswith("Error"):
                setattr(self, error, globals()[error])

    # ---- for tests
    def add_sandbox(self, name: str, root: Path,
                    status: SandboxStatus = SandboxStatus.RUNNING) -> None:
        """Register sandbox ``name`` whose guest file system is the host directory ``root``."""
        with self.store.transaction() as state:
            _insert(state, name, str(root), status, {})

    def add_image(self, reference: str, root: Path, layers: Sequence[int] = (1 << 20,),
                  sizes_known: bool = True) -> None:
        """Make the OCI image ``reference`` pullable: its layers' sizes, its root file system.

        Without ``sizes_known`` the registry reports no sizes (no total, no per-layer total).
        """
        with self.store.transaction() as state:
            state["images"][reference] = {"root": str(root), "layers": list(layers),
                                          "sizes_known": sizes_known, "cached": False}

    def set_status(self, name: str, status: SandboxStatus, then: SandboxStatus | None = None,
                   after: float = 0.0) -> None:
        """Put sandbox ``name`` in ``status``; with ``then``, in that one ``after`` seconds."""
        with self.store.transaction() as state:
            record = state["sandboxes"][name]
            _set_status(record, status)
            if then is not None:
                record["then"] = [then.value, time.time() + after]

    def status_of(self, name: str) -> SandboxStatus | None:
        with self.store.transaction() as state:
            record = state["sandboxes"].get(name)
            return None if record is None else SandboxStatus(record["status"])

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

    def set_page_size(self, size: int) -> None:
        with self.store.transaction() as state:
            state["knobs"]["page_size"] = size

    def calls(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every lifecycle call made so far (create, start, resume, pause, stop, remove)."""
        with self.store.transaction() as state:
            return [call for call in state["calls"] if kind is None or call["call"] == kind]

    def close(self) -> None:
        """Kill and reap every process still running; for test teardown."""
        for handle in self.processes:
            handle.dispose()

    # ---- for the API classes
    def check(self, state: dict[str, Any], call: str) -> None:
        """Raise the error a test set for ``call``, if any."""
        failure = state["knobs"]["errors"].get(call)
        if failure is not None:
            raise getattr(_errors, failure[0])(failure[1])

    def delay(self, call: str) -> float:
        with self.store.transaction() as state:
            return float(state["knobs"]["delays"].get(call, 0.0))

    def record(self, state: dict[str, Any], name: str, identity: int | None = None
               ) -> dict[str, Any]:
        """Sandbox ``name``'s row; with ``identity``, only while it is that very sandbox."""
        record: dict[str, Any] | None = state["sandboxes"].get(name)
        if record is None:
            raise SandboxNotFoundError(f"sandbox not found: {name}")
        if identity is not None and record["id"] != identity:
            raise SandboxReplacedError(f"sandbox '{name}' was replaced by another of that name")
        return record

    def note(self, state: dict[str, Any], call: str, name: str, **details: Any) -> None:
        state["calls"].append({"call": call, "name": name, "pid": os.getpid(), **details})


def _insert(state: dict[str, Any], name: str, root: str, status: SandboxStatus,
            config: dict[str, Any]) -> dict[str, Any]:
    if name in state["sandboxes"]:
        raise SandboxAlreadyExistsError(f"sandbox already exists: {name}")
    now = time.time()
    record = {"id": state["next_id"], "status": status.value, "root": root, "created_at": now,
              "updated_at": now, "then": None, "config": config}
    state["next_id"] += 1
    state["sandboxes"][name] = record
    return record


def _not_running(name: str, status: str) -> SandboxNotRunningError:
    return SandboxNotRunningError(
        f"sandbox '{name}' is not running (status: {status.capitalize()})")


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
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "get")
            return SandboxHandle(self._sdk, name, self._sdk.record(state, name))

    async def list(self) -> SandboxPage:
        return await self.list_with()

    async def list_with(self, *, cursor: str | None = None, limit: int | None = None,
                        labels: Mapping[str, str] | None = None) -> SandboxPage:
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "list")
            names = sorted(state["sandboxes"])
            first = int(cursor or 0)
            last = first + (limit or state["knobs"]["page_size"])
            handles = [SandboxHandle(self._sdk, name, state["sandboxes"][name])
                       for name in names[first:last]]
            return SandboxPage(handles, str(last) if last < len(names) else None)

    async def remove(self, name: str) -> None:
        with self._sdk.store.transaction() as state:
            record = self._sdk.record(state, name)
            if record["status"] in _LIVE:
                raise SandboxStillRunningError(f"sandbox '{name}' is still running")
            del state["sandboxes"][name]
            self._sdk.note(state, "remove", name)

    async def start(self, name: str, *, detached: bool = False) -> Sandbox:
        return await self.boot(name, None, detached)

    async def boot(self, name: str, identity: int | None, detached: bool) -> Sandbox:
        """Start the stopped sandbox ``name``: STARTING for the ``start`` delay, then RUNNING."""
        with self._sdk.store.transaction() as state:
            record = self._sdk.record(state, name, identity)
            status = SandboxStatus(record["status"])
            if status == SandboxStatus.RUNNING:
                raise SandboxStillRunningError(f"sandbox '{name}' is already running")
            if status not in _STARTABLE:
                raise MicrosandboxError(f"sandbox '{name}' cannot be started "
                                        f"(status: {status.value.capitalize()})")
            self._sdk.note(state, "start", name, detached=detached)
            _set_status(record, SandboxStatus.STARTING)
            identity = record["id"]
        await asyncio.sleep(self._sdk.delay("start"))
        with self._sdk.store.transaction() as state:
            record = self._sdk.record(state, name, identity)
            try:
                self._sdk.check(state, "start")
            except MicrosandboxError:
                _set_status(record, SandboxStatus.CRASHED)
                failure = state["knobs"]["errors"]["start"]
            else:
                _set_status(record, SandboxStatus.RUNNING)
                return Sandbox(self._sdk, name, Path(record["root"]), not detached)
        raise getattr(_errors, failure[0])(failure[1])

    def create_with_progress(
        self,
        name: str,
        *,
        image: ImageSource | None = None,
        memory: int | None = None,
        cpus: int | None = None,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, MountConfig] | None = None,
        network: Network | None = None,
        detached: bool = False,
    ) -> PullSession:
        if not isinstance(image, ImageSource):
            raise TypeError("image must be an ImageSource (Image.oci or Image.bind) here")
        source = {"kind": image._type.value}
        if image._type == ImageSourceKind.OCI:
            source["reference"] = image._to_image_str()
        else:
            source["path"] = image._to_image_str()
        config = {
            "image": source, "cpus": cpus, "memory": memory, "workdir": workdir,
            "env": None if env is None else dict(env),
            # Serialised here, as the SDK serialises them for its runtime, which is where it
            # rejects a malformed mount or network.
            "volumes": None if volumes is None else {
                guest: mount._to_dict() for guest, mount in volumes.items()},
            "network": None if network is None else network._to_dict(),
        }
        with self._sdk.store.transaction() as state:
            self._sdk.note(state, "create", name, detached=detached, **config)
        return PullSession(self._sdk, name, config, detached)


class PullSession:
    """A creation under way: its pull's events, then its result."""

    def __init__(self, sdk: StandInSDK, name: str, config: dict[str, Any],
                 detached: bool) -> None:
        self._sdk = sdk
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
        try:
            root = await self._pull(name, config["image"])
            await asyncio.sleep(self._sdk.delay("create"))
            with self._sdk.store.transaction() as state:
                self._sdk.check(state, "create")
                record = _insert(state, name, root, SandboxStatus.RUNNING, config)
                try:
                    self._sdk.check(state, "start")
                except MicrosandboxError:
                    _set_status(record, SandboxStatus.CRASHED)
                    failure = state["knobs"]["errors"]["start"]
                else:
                    return Sandbox(self._sdk, name, Path(root), not detached)
            raise getattr(_errors, failure[0])(failure[1])
        finally:
            self._events.put_nowait(None)

    async def _pull(self, name: str, source: dict[str, str]) -> str:
        """Emit the pull's events; the root file system the sandbox will have."""
        with self._sdk.store.transaction() as state:
            if name in state["sandboxes"]:
                raise SandboxAlreadyExistsError(f"sandbox already exists: {name}")
        if source["kind"] == ImageSourceKind.BIND.value:
            if not os.path.isdir(source["path"]):
                raise InvalidConfigError(f"rootfs bind path does not exist: {source['path']}")
            return source["path"]
        reference = source["reference"]
        emit = self._events.put_nowait
        emit(PullEvent(PullEventType.STARTUP))
        emit(PullEvent(PullEventType.RESOLVING, reference=reference))
        await asyncio.sleep(0)
        with self._sdk.store.transaction() as state:
            image = state["images"].get(reference)
            if image is None:
                raise ImagePullFailedError(
                    f"failed to pull image {reference}: manifest unknown: the registry has no "
                    f"image {reference}")
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
        return str(image["root"])


class SandboxHandle:
    """Metadata of one sandbox as of ``Sandbox.get``, and its lifecycle calls."""

    def __init__(self, sdk: StandInSDK, name: str, record: dict[str, Any]) -> None:
        self._sdk = sdk
        self._identity: int = record["id"]
        self.name = name
        self.id = str(record["id"])
        self.status = SandboxStatus(record["status"])
        self.created_at: float | None = record["created_at"]
        self.updated_at: float | None = record["updated_at"]
        self.config_json = json.dumps(record["config"])

    async def refresh(self) -> SandboxHandle:
        return await self._sdk.Sandbox.get(self.name)

    async def connect(self, timeout: float | None = None) -> Sandbox:
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "connect")
            record = self._sdk.record(state, self.name, self._identity)
            if record["status"] != SandboxStatus.RUNNING.value:
                raise _not_running(self.name, record["status"])
            return Sandbox(self._sdk, self.name, Path(record["root"]), False)

    async def start(self, *, detached: bool = False) -> Sandbox:
        return await self._sdk.Sandbox.boot(self.name, self._identity, detached)

    async def pause(self) -> None:
        with self._sdk.store.transaction() as state:
            record = self._sdk.record(state, self.name, self._identity)
            if record["status"] != SandboxStatus.RUNNING.value:
                raise _not_running(self.name, record["status"])
            self._sdk.note(state, "pause", self.name)
            _set_status(record, SandboxStatus.PAUSED)

    async def resume(self) -> None:
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "resume")
            record = self._sdk.record(state, self.name, self._identity)
            if record["status"] != SandboxStatus.PAUSED.value:
                raise MicrosandboxError(f"sandbox '{self.name}' is not paused "
                                        f"(status: {record['status'].capitalize()})")
            self._sdk.note(state, "resume", self.name)
            _set_status(record, SandboxStatus.RUNNING)

    async def stop(self, timeout: float | None = None) -> None:
        with self._sdk.store.transaction() as state:
            self._sdk.check(state, "stop")
            record = self._sdk.record(state, self.name, self._identity)
            if record["status"] not in _LIVE:
                raise _not_running(self.name, record["status"])
            self._sdk.note(state, "stop", self.name)
            _set_status(record, SandboxStatus.STOPPED)

    async def remove(self) -> None:
        await self._sdk.Sandbox.remove(self.name)


class Sandbox:
    """A connected sandbox: its file system and command execution."""

    def __init__(self, sdk: StandInSDK, name: str, root: Path, owns_lifecycle: bool) -> None:
        self._sdk = sdk
        self._name = name
        self.fs = SandboxFsOps(root)
        self.owns_lifecycle = owns_lifecycle

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
        if self._sdk.status_of(self._name) != SandboxStatus.RUNNING:
            raise SandboxNotRunningError(f"sandbox '{self._name}' is not running")
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
