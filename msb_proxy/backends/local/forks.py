"""Forks of local sandboxes (``ssh msb-api.fork``): the child's writable layer made a copy of
the parent's, taken while every process of the parent is frozen.

Consistency: the processes of a running parent (its whole PID namespace, found through its
init's ``/proc/PID/ns/pid``) are put in a cgroup of their own, ``msb-proxy/<slug>@<hash of the
home>``, on the cgroup v2 hierarchy (``cgroup.freeze``) or else on the v1 freezer
(``freezer.state``), and the layer is copied only once the kernel reports them all frozen. So
the copy is the layer as it was at one instant: a write a process had under way finishes before
that process freezes, and the copy reads the very page cache the parent wrote to (no ``sync``
is needed to see it). After the copy the processes are thawed and moved back to the cgroups
they came from; they see no signal and no stop, only a pause as long as the copy (1 GiB on
ext4, which has no reflinks: 0.6 to 2.8 s here). The parent's own lock is held too, so it is
not started, stopped or removed under the copy. A stopped parent is copied as it is. Where this
host has no freezer msb-proxy may use (no cgroup file system, or one it cannot write), the
layer is copied while the parent runs, and a progress line says so: a file the parent writes
meanwhile may be half-copied in the fork.

Never left frozen: before freezing, a watchdog (``/bin/sh``, in a session of its own) is given
a pipe from this process, and thaws the cgroup when the pipe reads end of file: when the fork
is done, and as well when this process dies, SIGKILL included. The watchdog also holds the
parent's freeze lock (``locks/<slug>.freeze``) until it has thawed, so that a second fork never
freezes the parent just before an earlier fork's watchdog thaws it. :func:`thaw_abandoned`
thaws a cgroup whose freeze lock nobody holds, for the next ``open`` of the parent.

The copy is ``cp -a --reflink=auto`` (killed with this process, through ``setpriv
--pdeathsig``, where util-linux has it): ownership, modes, times, extended attributes (the
``trusted.overlay.*`` of overlayfs's opaque directories and whiteouts among them), hard
links, sparse files and device nodes (the 0:0 whiteouts) as they are, and reflinks where the
file system has them. A layer over ``PROGRESS_FROM`` bytes shows its progress, as the blocks
the destination file system gained. The child's ``sandbox.json`` is written last: a copy that
failed or was interrupted removes the child's directory, and one a killed msb-proxy left (no
``sandbox.json``) is cleared before the next fork into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from msb_proxy.errors import SandboxError
from msb_proxy.progress import Progress
from msb_proxy.state import StateDir, faults_of, slug

__all__ = ["copy_sandbox", "forget", "thaw_abandoned"]

PROGRESS_FROM = 64 << 20  # bytes of layer from which the copy reports how far it is
FREEZE_TIMEOUT_S = 10.0
FREEZE_LOCK_WAIT_S = 300.0  # another fork of the same parent may be copying a large layer
POLL_S = 0.01
PROGRESS_EVERY_S = 0.25
_GATHER_ROUNDS = 100  # passes over /proc before processes forking faster than we move give up
_MOUNTS = Path("/proc/self/mounts")


@dataclass(frozen=True)
class Freezer:
    """One cgroup of one hierarchy that can freeze: where its files are and what they say."""

    directory: Path  # msb-proxy/<slug>@<home> on that hierarchy
    root: Path  # the hierarchy's mount point
    control: str  # cgroup.freeze (v2) or freezer.state (v1)
    frozen: str  # what is written to freeze
    thawed: str  # what is written to thaw
    v2: bool

    def is_frozen(self) -> bool:
        if self.v2:
            text = (self.directory / "cgroup.events").read_text()
            return "frozen 1" in text.splitlines()
        return (self.directory / self.control).read_text().strip() == self.frozen

    def write(self, value: str) -> None:
        (self.directory / self.control).write_text(value)

    def members(self) -> set[int]:
        return _pids_in(self.directory)

    def origin(self, pid: int) -> Path:
        """The cgroup directory ``pid`` is in on this hierarchy; the root for one still in
        ours, where a fork whose msb-proxy was killed left it."""
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            number, controllers, path = line.split(":", 2)
            if (self.v2 and number == "0") or (not self.v2 and "freezer" in controllers.split(",")):
                found = self.root / path.lstrip("/")
                return self.root if found == self.directory else found
        return self.root


def freezer_of(state: StateDir, parent: str) -> Freezer | None:
    """The cgroup that freezes sandbox ``parent`` of the installation ``state``, on the first
    freezing hierarchy mounted (cgroup v2, else v1's freezer); None when there is none. Named
    for the installation too (``msb-proxy/api@<8 hex of its home>``): two installations'
    sandboxes ``api`` never share one."""
    try:
        mounts = _MOUNTS.read_text().splitlines()
    except OSError:
        return None
    v2_roots, v1_roots = [], []
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup2":
            v2_roots.append(Path(fields[1]))
        elif fields[2] == "cgroup" and "freezer" in fields[3].split(","):
            v1_roots.append(Path(fields[1]))
    home = hashlib.sha256(os.path.realpath(state.home).encode("utf-8", "surrogateescape"))
    group = Path("msb-proxy") / f"{slug(parent)}@{home.hexdigest()[:8]}"
    for root in v2_roots:
        if (root / "cgroup.procs").exists():
            return Freezer(root / group, root, "cgroup.freeze", "1", "0", v2=True)
    for root in v1_roots:
        return Freezer(root / group, root, "freezer.state", "FROZEN", "THAWED", v2=False)
    return None


def thaw_abandoned(state: StateDir, parent: str) -> None:
    """Thaw sandbox ``parent``'s cgroup if it is frozen and no fork holds its freeze lock: a
    fork and its watchdog both killed. Called by ``open`` of ``parent``; cheap when there is
    nothing to do."""
    freezer = freezer_of(state, parent)
    if freezer is None or not freezer.directory.is_dir():
        return
    fd = _open_lock(state, parent)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a fork is copying; its watchdog thaws
        with contextlib.suppress(OSError):
            if freezer.is_frozen():
                freezer.write(freezer.thawed)
    finally:
        os.close(fd)


async def copy_sandbox(parent: str, source: Path, child: str, target: Path, *,
                       init_pid: int | None, state: StateDir, progress: Progress) -> None:
    """Make ``target`` the directory of sandbox ``child``: the writable layer of the sandbox
    in ``source`` (``parent``, whose running init is ``init_pid``, None when it is stopped),
    copied consistently, and its ``sandbox.json`` naming the same base rootfs.

    A coroutine; the caller holds the locks of both sandboxes. Raises
    :class:`~msb_proxy.errors.SandboxError` when the copy fails, leaving no ``target``.
    """
    settings = json.loads((source / "sandbox.json").read_text(encoding="utf-8"))
    with faults_of(target, "clear a half-made fork"):
        if target.exists():  # what a killed fork left: it never got its sandbox.json
            shutil.rmtree(target)
    try:
        with faults_of(target, "make the sandbox's directory"):
            target.mkdir(mode=0o700)
        layer = source / "upper"
        # Sized before the freeze: the progress bar needs no exact figure, the parent no
        # longer pause than the copy itself.
        total = _layer_bytes(layer) if layer.is_dir() else 0
        async with _frozen(parent, init_pid, state, progress):
            await _copy_layer(parent, layer, target / "upper", total, progress)
        settings["name"] = child
        with faults_of(target, "write the fork's settings"):
            (target / "name").write_text(child + "\n", encoding="utf-8",
                                         errors="surrogateescape")
            (target / "sandbox.json").write_text(json.dumps(settings), encoding="utf-8")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# The freeze


@contextlib.asynccontextmanager
async def _frozen(parent: str, init_pid: int | None, state: StateDir,
                  progress: Progress) -> AsyncIterator[None]:
    """Hold every process of ``parent`` (the PID namespace of ``init_pid``) frozen; where
    there is no freezer to be had, say so and hold nothing."""
    if init_pid is None:
        yield
        return
    freezer = freezer_of(state, parent)
    lock = _open_lock(state, parent)
    watchdog: asyncio.subprocess.Process | None = None
    origins: dict[int, Path] = {}
    try:
        await _take(lock, parent)
        unusable = _unusable(freezer)
        if freezer is not None and unusable is None:
            watchdog = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", 'cat >/dev/null; echo "$1" >"$2"', "msb-proxy-thaw",
                freezer.thawed, str(freezer.directory / freezer.control),
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(lock,), start_new_session=True, cwd="/")
            try:
                _gather(freezer, _pid_namespace(init_pid), origins)
            except _Unusable as exc:
                unusable = str(exc)
        if freezer is None or unusable is not None:
            progress.step(f"{unusable}: copying sandbox {parent!r} while it runs")
            yield
        else:
            await _freeze(freezer, parent, init_pid)
            yield
    finally:
        if freezer is not None and watchdog is not None:
            with contextlib.suppress(OSError):
                freezer.write(freezer.thawed)
            _release(freezer, origins)
        if watchdog is not None:
            assert watchdog.stdin is not None
            watchdog.stdin.close()
            await watchdog.wait()
        os.close(lock)


class _Unusable(Exception):
    """The freezer cannot hold the sandbox's processes here (what the message says)."""


def _unusable(freezer: Freezer | None) -> str | None:
    """Why ``freezer`` cannot be used (its cgroup made if need be), None when it can."""
    if freezer is None:
        return "no cgroup freezer on this host"
    try:
        freezer.directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot make the cgroup {freezer.directory} ({exc.strerror})"
    if not (freezer.directory / freezer.control).exists():
        return f"the cgroup {freezer.directory} has no {freezer.control}"
    return None


def forget(state: StateDir, name: str) -> None:
    """What forks of sandbox ``name`` left for it, deleted with it: its (empty) cgroup and its
    freeze lock, unless a watchdog still holds that. The caller holds the sandbox's lock, which
    every fork takes before the freeze lock, and the sandbox is stopped."""
    freezer = freezer_of(state, name)
    if freezer is not None:
        with contextlib.suppress(OSError):
            freezer.directory.rmdir()
    path = state.home / "locks" / f"{slug(name)}.freeze"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):
            path.unlink()
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _open_lock(state: StateDir, parent: str) -> int:
    path = state.ensure("locks") / f"{slug(parent)}.freeze"
    with faults_of(path, "lock"):
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


async def _take(fd: int, parent: str) -> None:
    """The freeze lock, without blocking the event loop."""
    deadline = time.monotonic() + FREEZE_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"sandbox {parent!r} has been frozen for another fork for "
                    f"{FREEZE_LOCK_WAIT_S:g} s; try again later") from None
            await asyncio.sleep(POLL_S)


def _pid_namespace(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError as exc:
        raise SandboxError(f"cannot find the processes of the sandbox (init {pid}): "
                           f"{exc.strerror}") from None


def _namespace_members(namespace: str) -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/ns/pid") == namespace:
                    yield int(entry.name)


def _pids_in(directory: Path) -> set[int]:
    try:
        text = (directory / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(line) for line in text.split()}


def _gather(freezer: Freezer, namespace: str, origins: dict[int, Path]) -> None:
    """Move every process of ``namespace`` into the freezer's cgroup, until a pass over
    ``/proc`` finds none left outside; ``origins`` gets the cgroup each came from, by PID."""
    for _ in range(_GATHER_ROUNDS):
        inside = freezer.members()
        moved = False
        for pid in _namespace_members(namespace):
            if pid in inside:
                continue
            try:
                origin = freezer.origin(pid)
                (freezer.directory / "cgroup.procs").write_text(str(pid))
            except OSError as exc:
                if exc.errno == errno.ESRCH or not Path(f"/proc/{pid}").exists():
                    continue  # it exited meanwhile
                raise _Unusable(f"cannot move the sandbox's process {pid} into the cgroup "
                                f"{freezer.directory} ({exc.strerror})") from None
            origins.setdefault(pid, origin)
            moved = True
        if not moved:
            return
    raise SandboxError("the sandbox's processes fork faster than they can be frozen; "
                       "try again")


async def _freeze(freezer: Freezer, parent: str, init_pid: int) -> None:
    """Freeze the cgroup and wait until the kernel says all of it is frozen, with whatever
    the namespace forked before it froze moved in too."""
    freezer.write(freezer.frozen)
    deadline = time.monotonic() + FREEZE_TIMEOUT_S
    namespace = _pid_namespace(init_pid)
    while True:
        if freezer.is_frozen() and not _gather_late(freezer, namespace):
            return
        if time.monotonic() > deadline:
            raise SandboxError(f"sandbox {parent!r} did not freeze within "
                               f"{FREEZE_TIMEOUT_S:g} s; not forking it")
        await asyncio.sleep(POLL_S)


def _gather_late(freezer: Freezer, namespace: str) -> bool:
    """Whether a process of the namespace was still outside the cgroup (it is moved in)."""
    inside = freezer.members()
    late = [pid for pid in _namespace_members(namespace) if pid not in inside]
    for pid in late:
        with contextlib.suppress(OSError):
            (freezer.directory / "cgroup.procs").write_text(str(pid))
    return bool(late)


def _release(freezer: Freezer, origins: dict[int, Path]) -> None:
    """Move the thawed processes back where they came from (those forked meanwhile go where
    the init came from) and remove the cgroup; what cannot be moved stays, thawed."""
    fallback = next(iter(origins.values()), freezer.root)
    for _ in range(_GATHER_ROUNDS):
        members = freezer.members()
        if not members:
            break
        for pid in members:
            with contextlib.suppress(OSError):
                (origins.get(pid, fallback) / "cgroup.procs").write_text(str(pid))
    with contextlib.suppress(OSError):
        freezer.directory.rmdir()


# ---------------------------------------------------------------------------------------------
# The copy


def _layer_bytes(layer: Path) -> int:
    """The blocks the layer's files take, each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(layer):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(directory, name))
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


def _free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bfree * info.f_frsize


async def _copy_layer(parent: str, layer: Path, target: Path, total: int,
                      progress: Progress) -> None:
    """``cp -a --reflink=auto layer target``, with progress for a layer of ``total`` bytes
    over ``PROGRESS_FROM``."""
    if not layer.is_dir():  # a sandbox never started has no layer yet
        return
    label = f"copying the writable layer of sandbox {parent!r}"
    free_before = _free_bytes(target.parent)
    argv = ["cp", "-a", "--reflink=auto", "--no-target-directory", str(layer), str(target)]
    setpriv = shutil.which("setpriv")
    if setpriv is not None:  # a copy that outlived a killed msb-proxy would race the sweep
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    copier = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    assert copier.stderr is not None
    errors = asyncio.get_running_loop().create_task(copier.stderr.read())
    try:
        while copier.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(copier.wait()), PROGRESS_EVERY_S)
            if total > PROGRESS_FROM:
                gained = max(free_before - _free_bytes(target.parent), 0)
                progress.fraction(label, 1.0 if copier.returncode == 0 else gained / total)
        detail = (await errors).decode(errors="replace").strip()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            copier.kill()
        await copier.wait()
        errors.cancel()
        raise
    if copier.returncode != 0:
        last = detail.splitlines()[-1] if detail else f"cp exited with {copier.returncode}"
        raise SandboxError(f"cannot fork sandbox {parent!r}: {last}")
