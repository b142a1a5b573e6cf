"""``stop_after_idle``: stop a sandbox once no msb-proxy connection has used it for a while.

Counted across every msb-proxy process: each connection holds a shared ``flock`` on the
sandbox's ``.active`` lock file while it lasts and touches ``.last`` when it ends. The connection
that ends last starts a watcher (``python -m msb_proxy.backends.idle NAME``, one per sandbox at a
time)
which sleeps until the idle time is up, then stops the sandbox only if it can take that lock
exclusively (no connection is open) and nothing ended since. Upstream's server stops a sandbox
when *its own* connection ends, even while others still use it; this does not.

A sandbox msb-proxy did not start is never stopped: the run a connection started is recorded
(``.ours``, the backend's run id), and the watcher stops only that very run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from msb_proxy.backends.base import Sandbox
from msb_proxy.config import SandboxTemplate
from msb_proxy.state import StateDir, faults_of, slug

__all__ = ["ConnectionTracker"]


def _paths(state: StateDir, name: str) -> tuple[Path, Path, Path, Path]:
    base = state.ensure("locks") / slug(name)
    return (base.with_name(base.name + ".active"), base.with_name(base.name + ".last"),
            base.with_name(base.name + ".ours"), base.with_name(base.name + ".watch"))


class ConnectionTracker:
    """Marks one connection to sandbox ``name`` as open, for as long as the ``with`` lasts."""

    def __init__(self, state: StateDir, name: str, template: SandboxTemplate,
                 environ: Mapping[str, str]) -> None:
        self._name = name
        self._backend = template.backend
        self._stop_after_idle = template.stop_after_idle
        self._environ = environ
        self._active, self._last, self._ours, _ = _paths(state, name)
        self._fd: int | None = None

    def __enter__(self) -> ConnectionTracker:
        with faults_of(self._active, "lock"):
            self._fd = os.open(self._active, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        return self

    def sandbox_opened(self, sandbox: Sandbox) -> None:
        """Remember the run this connection started, if it started one."""
        if sandbox.started and sandbox.run_id:
            with faults_of(self._ours, "write"):
                self._ours.write_text(sandbox.run_id)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self._last.touch()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stop_after_idle > 0 and self._ours.exists():
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
    """The watcher: stop sandbox ``name`` of ``backend_name`` once it has been idle for its
    ``stop_after_idle``. Its environment is the ending connection's."""
    import asyncio

    from msb_proxy.backends import registry
    from msb_proxy.config import load_config

    config = load_config(os.environ, registry, backend=backend_name)
    state = StateDir(config.home)
    template = config.template(name)
    if template.stop_after_idle <= 0:
        return
    active, last, ours, watch_lock = _paths(state, name)
    watcher = os.open(watch_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(watcher, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # a watcher is already counting; it re-reads .last as it goes
    backend = registry.open_backend(config, template.backend)
    while True:
        try:
            idle_since = last.stat().st_mtime
        except FileNotFoundError:
            return
        remaining = idle_since + template.stop_after_idle - time.time()
        if remaining > 0:
            time.sleep(min(remaining, 60.0))
            continue
        fd = os.open(active, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a connection is open; the one that ends last starts a new watcher
            if last.stat().st_mtime != idle_since:
                continue  # a connection ended meanwhile: count again from then
            try:
                ours_run = ours.read_text()
            except FileNotFoundError:
                return
            if asyncio.run(backend.current_run(name)) == ours_run:
                asyncio.run(backend.stop(name))
            with contextlib.suppress(FileNotFoundError):
                ours.unlink()
            return
        finally:
            os.close(fd)


if __name__ == "__main__":
    with contextlib.suppress(Exception):
        watch(sys.argv[1], sys.argv[2])
