"""The per-sandbox lock every msb-proxy process takes to decide on, create, start or stop it.

An exclusive ``flock`` on ``MSB_PROXY_HOME/locks/<name>.lock``, held only for those steps and
never across a connection: sixteen connections arriving at once for a missing sandbox create
it once, and the other fifteen find it there.
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

__all__ = ["sandbox_lock"]

POLL_S = 0.01
NOTICE_S = 0.5


@contextlib.asynccontextmanager
async def sandbox_lock(path: Path, name: str, wait_s: float, hint: str,
                       on_wait: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Hold the lock of sandbox ``name`` (file ``path``) without blocking the event loop.

    ``on_wait`` is called once when another process has held it for ``NOTICE_S``; after
    ``wait_s`` something is stuck, and the error says so, ending with ``hint`` (where to look).
    """
    with faults_of(path, "lock"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    began = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
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
        os.close(fd)
