"""``stop_after_idle``: stop a sandbox once no msb-proxy connection has used it for a while;
and sandboxes that go once their last connection ends (throwaway forks, ``ephemeral``).

Counted across every msb-proxy process: each connection holds a shared ``flock`` on the
sandbox's ``.active`` lock file while it lasts and touches ``.last`` when it ends. The connection
that ends last starts a watcher (``python -m msb_proxy.backends.idle NAME``, one per sandbox at a
time)
which sleeps until the idle time is up, then stops the sandbox only if it can take that lock
exclusively (no connection is open) and nothing ended since. Upstream's server stops a sandbox
when *its own* connection ends, even while others still use it; this does not.

A sandbox msb-proxy did not start is never stopped: the run a connection started is recorded
(``.ours``, the backend's run id), and the watcher stops only that very run.

A sandbox that is to be removed after its last connection has a marker, ``.ephemeral`` (JSON:
its name, backend and the idle seconds to wait first): a throwaway fork (``ssh msb-api.fork``)
gets it before it is even made, with no wait; a sandbox an ``ephemeral = true`` template makes
gets it before it is made too (the connection found none), and again when the connection
that created it ends, waiting its ``stop_after_idle``. The
watcher then removes that sandbox instead of stopping it, whoever the last connection was (a
throwaway fork may be reached by its own name too). Nothing depends on the process that wrote
the marker ending well: a connection whose msb-proxy was killed holds no lock any more, and
:func:`sweep` (each connection's start, ``msb-proxy ls``) starts the watcher for every marked
sandbox that has neither a connection nor a watcher.

A named session left detached (``ssh msb-api+work``) holds its sandbox as a connection does:
the watcher neither stops nor removes a sandbox that keeps one, and counts the idle time again
from when the last one is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from msb_proxy.backends.base import Backend, Sandbox
from msb_proxy.backends.locking import is_current
from msb_proxy.config import SandboxTemplate
from msb_proxy.state import StateDir, faults_of, slug

__all__ = ["ConnectionTracker", "forget", "sweep"]

_MARK = ".ephemeral"
SESSION_POLL_S = 10.0  # how often a watcher held off by named sessions looks again


def _paths(state: StateDir, name: str) -> tuple[Path, Path, Path, Path]:
    base = state.ensure("locks") / slug(name)
    return (base.with_name(base.name + ".active"), base.with_name(base.name + ".last"),
            base.with_name(base.name + ".ours"), base.with_name(base.name + ".watch"))


def _marker(state: StateDir, name: str) -> Path:
    return state.ensure("locks") / (slug(name) + _MARK)


def _read_marker(path: Path) -> dict[str, object] | None:
    """What a sandbox's ``.ephemeral`` marker says, or None when it has none (or a torn one)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _free(path: Path) -> bool:
    """Whether nobody holds the lock file ``path`` (False too when it cannot be had)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def sweep(state: StateDir, environ: Mapping[str, str]) -> list[str]:
    """Start the watcher for every marked sandbox that no connection and no watcher holds:
    what a killed msb-proxy left to be removed. Returns their names. Cheap when there are
    none: one look at the locks directory."""
    found = []
    for path in sorted((state.home / "locks").glob("*" + _MARK)):
        mark = _read_marker(path)
        if mark is None:
            continue
        name, backend = str(mark.get("name")), str(mark.get("backend"))
        active, _, _, watch_lock = _paths(state, name)
        if _free(active) and _free(watch_lock):
            _start_watcher(name, backend, environ)
            found.append(name)
    return found


def forget(state: StateDir, name: str) -> None:
    """Delete what this module keeps of sandbox ``name``, removed by ``msb-proxy rm``: unless
    a connection to it is still open (it ends on its own) or a watcher counts for it."""
    active, last, ours, watch_lock = _paths(state, name)
    held = []
    try:
        for path in (active, watch_lock):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for path in (_marker(state, name), ours, last, active, watch_lock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    except (BlockingIOError, OSError):
        pass
    finally:
        for fd in held:
            os.close(fd)


class ConnectionTracker:
    """Marks one connection to sandbox ``name`` as open, for as long as the ``with`` lasts."""

    def __init__(self, state: StateDir, name: str, template: SandboxTemplate,
                 environ: Mapping[str, str]) -> None:
        self._name = name
        self._backend = template.backend
        self._stop_after_idle = template.stop_after_idle
        self._ephemeral = template.ephemeral
        self._throwaway = template.ephemeral and template.fork_of is not None
        self._environ = environ
        self._state = state
        self._active, self._last, self._ours, _ = _paths(state, name)
        self._mark = _marker(state, name)
        self._fd: int | None = None

    def __enter__(self) -> ConnectionTracker:
        with faults_of(self._active, "lock"):
            while True:
                self._fd = os.open(self._active, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_SH)
                if is_current(self._active, self._fd):
                    break
                os.close(self._fd)  # deleted with its sandbox while we waited: lock anew
        if self._throwaway:  # marked before the fork is made: a half-made one goes too
            self._write_marker(0.0)
        sweep(self._state, self._environ)
        return self

    def expect_creation(self) -> None:
        """Called before the sandbox is opened when there is none yet: an ``ephemeral``
        template's sandbox is marked now, so that it goes even if this msb-proxy is killed
        before its connection ends (if the connection makes none, the watcher finds nothing
        to remove)."""
        if self._ephemeral and not self._throwaway:
            self._write_marker(self._stop_after_idle)

    def sandbox_opened(self, sandbox: Sandbox) -> None:
        """Remember the run this connection started, if it started one, and mark what an
        ``ephemeral`` template's connection created for removal."""
        if sandbox.started and sandbox.run_id:
            with faults_of(self._ours, "write"):
                self._ours.write_text(sandbox.run_id)
        if self._ephemeral and sandbox.created and not self._throwaway:
            self._write_marker(self._stop_after_idle)

    def _write_marker(self, after: float) -> None:
        mark = {"name": self._name, "backend": self._backend, "after": after}
        tmp = self._mark.with_name(f".{self._mark.name}.{os.getpid()}.tmp")
        with faults_of(self._mark, "write"):
            tmp.write_text(json.dumps(mark), encoding="utf-8")
            os.replace(tmp, self._mark)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self._last.touch()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mark.exists() or (self._stop_after_idle > 0 and self._ours.exists()):
            _start_watcher(self._name, self._backend, self._environ)


def _start_watcher(name: str, backend: str, environ: Mapping[str, str]) -> None:
    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-P", "-m", "msb_proxy.backends.idle", name, backend],
            env=dict(environ),
            cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )


def watch(name: str, backend_name: str) -> None:
    """The watcher: once sandbox ``name`` of ``backend_name`` has had no connection for its
    ``stop_after_idle``, stop it; or, when it is marked ``.ephemeral``, remove it once it has
    had none for the marker's wait. Its environment is the ending connection's."""

    from msb_proxy.backends import registry
    from msb_proxy.config import load_config

    config = load_config(os.environ, registry, backend=backend_name)
    state = StateDir(config.home)
    active, last, _, watch_lock = _paths(state, name)
    mark_path = _marker(state, name)
    mark = _read_marker(mark_path)
    if mark is not None:
        wait = float(str(mark.get("after", 0)))
        backend_name = str(mark.get("backend", backend_name))
    else:
        template = config.template(name)
        wait, backend_name = template.stop_after_idle, template.backend
        if wait <= 0:
            return
    watcher = os.open(watch_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(watcher, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # a watcher is already counting; it re-reads .last as it goes
    if not is_current(watch_lock, watcher):
        return  # the sandbox was removed meanwhile, its lock files with it
    backend = registry.open_backend(config, backend_name)
    while True:
        idle_since = _idle_since(last, mark_path if mark is not None else None)
        if idle_since is None:
            return
        remaining = idle_since + wait - time.time()
        if remaining > 0:
            time.sleep(min(remaining, 60.0))
            continue
        fd = os.open(active, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a connection is open; the one that ends last starts a new watcher
            if not is_current(active, fd):
                return  # removed by another watcher, its lock files with it
            if _idle_since(last, mark_path if mark is not None else None) != idle_since:
                continue  # a connection ended meanwhile: count again from then
            if not _has_named_sessions(backend, name):
                _end(backend, state, name, mark_path if mark is not None else None)
                return
        finally:
            os.close(fd)
        # A detached named session is kept for its user as an open connection would be: the
        # idle time counts again from when the last one is gone (exited, killed, timed out).
        with contextlib.suppress(OSError):
            last.touch()
        time.sleep(min(max(wait, 2.0), SESSION_POLL_S))


def _end(backend: Backend, state: StateDir, name: str, mark_path: Path | None) -> None:
    """What the watcher is for, under the exclusive lock (no connection can begin meanwhile):
    remove a marked sandbox and every file of it here (a connection or watcher waiting on one
    of the locks finds it deleted and locks anew), else stop the run a connection of ours
    started."""
    import asyncio

    active, last, ours, watch_lock = _paths(state, name)
    if mark_path is not None:
        if mark_path.exists():
            asyncio.run(backend.remove(name))
        for path in (mark_path, ours, last, active, watch_lock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    try:
        ours_run = ours.read_text()
    except FileNotFoundError:
        return
    if asyncio.run(backend.current_run(name)) == ours_run:
        asyncio.run(backend.stop(name))
    with contextlib.suppress(FileNotFoundError):
        ours.unlink()


def _has_named_sessions(backend: Backend, name: str) -> bool:
    """Whether sandbox ``name`` keeps a named session (one the watcher could not ask about
    counts as none: stopping it is what ``stop_after_idle`` asked for)."""
    import asyncio

    try:
        return bool(asyncio.run(backend.sessions(name)))
    except Exception:
        return False


def _idle_since(last: Path, mark: Path | None) -> float | None:
    """When the sandbox's last connection ended; for a marked sandbox whose connections all
    died before saying so, when it was marked. None when neither is known."""
    for path in (last, mark):
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                return path.stat().st_mtime
    return None


if __name__ == "__main__":
    with contextlib.suppress(Exception):
        watch(sys.argv[1], sys.argv[2])
    # Leave as msb-proxy does (cli/main.py): the microsandbox SDK's runtime threads could abort
    # the process if Python were finalized under them.
    os._exit(0)
