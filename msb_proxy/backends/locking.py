"""The per-sandbox lock every msb-proxy process takes to decide on, create, start or stop it.

An exclusive ``flock`` on ``MSB_PROXY_HOME/locks/<name>.lock``, held only for those steps and
never across a connection: sixteen connections arriving at once for a missing sandbox create
it once, and the other fifteen find it there.

``msb-proxy rm`` deletes the file with the sandbox (:func:`retire_lock`, while holding it), so
that throwaway forks leave nothing behind: a process that was waiting on the deleted file finds,
once it has the lock, that the path no longer names what it locked, and locks the path anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from msb_proxy.errors import SandboxError
from msb_proxy.state import faults_of

__all__ = ["is_current", "retire_lock", "sandbox_lock"]

POLL_S = 0.01
NOTICE_S = 0.5


@contextlib.asynccontextmanager
async def sandbox_lock(path: Path, name: str, wait_s: float, hint: str,
                       on_wait: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Hold the lock of sandbox ``name`` (file ``path``) without blocking the event loop.

    ``on_wait`` is called once when another process has held it for ``NOTICE_S``; after
    ``wait_s`` something is stuck, and the error says so, ending with ``hint`` (where to look).
    """
    fd = _open(path)
    began = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if is_current(path, fd):
                    break
                os.close(fd)  # retired while we waited: the lock is the new file's
                fd = -1
                fd = _open(path)
            except BlockingIOError:
                waited = time.monotonic() - began
                if waited > wait_s:
                    raise SandboxError(
                        f"sandbox {name!r} is still being created, started or stopped by "
                        f"another msb-proxy after {wait_s:g} s; try again later, or {hint}"
                    ) from None
                if on_wait is not None and waited >= NOTICE_S:
                    on_wait()
                    on_wait = None
                await asyncio.sleep(POLL_S)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def retire_lock(path: Path) -> None:
    """Delete lock file ``path``; called by its holder when the sandbox is gone. One that
    cannot be deleted is left: it does no harm."""
    with contextlib.suppress(OSError):
        path.unlink()


def _open(path: Path) -> int:
    with faults_of(path, "lock"):
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def is_current(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (a lock file deleted and made anew
    while ``fd`` waited on it is not)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
