"""The per-sandbox lock (``backends/locking.py``) when ``rm`` deletes its file: a process that
was waiting on the deleted file must not think it holds the lock while another process takes
the file made anew. Plain files and processes of our own; no sandbox, no root."""

from __future__ import annotations

import asyncio
from pathlib import Path

from msb_proxy.backends.locking import retire_lock, sandbox_lock
from msb_proxy.errors import SandboxError


def test_a_waiter_on_a_retired_lock_locks_the_file_made_anew(tmp_path: Path) -> None:
    path = tmp_path / "api.lock"

    async def scenario() -> list[str]:
        events: list[str] = []
        holding = asyncio.Event()
        let_go = asyncio.Event()

        async def remover() -> None:
            async with sandbox_lock(path, "api", 5, "hint"):
                holding.set()
                await let_go.wait()
                retire_lock(path)
            events.append("removed")

        async def waiter() -> None:
            await holding.wait()
            async with sandbox_lock(path, "api", 5, "hint"):
                events.append("waiter holds")
                await asyncio.sleep(0.3)
                events.append("waiter lets go")

        async def latecomer() -> None:
            while "waiter holds" not in events:
                await asyncio.sleep(0.005)
            try:
                async with sandbox_lock(path, "api", 0.1, "hint"):
                    events.append("latecomer holds")
            except SandboxError:
                events.append("latecomer refused")

        tasks = [asyncio.create_task(job()) for job in (remover, waiter, latecomer)]
        await asyncio.sleep(0.05)  # the waiter is polling the file the remover holds
        let_go.set()
        await asyncio.gather(*tasks)
        return events

    events = asyncio.run(scenario())
    assert events == ["removed", "waiter holds", "latecomer refused", "waiter lets go"]
    assert path.exists()  # the waiter's lock is on the file there now


def test_retiring_a_lock_that_is_gone_or_cannot_be_deleted_is_no_error(tmp_path: Path) -> None:
    retire_lock(tmp_path / "missing.lock")
    (tmp_path / "dir.lock").mkdir()
    retire_lock(tmp_path / "dir.lock")  # IsADirectoryError: left as it is
    assert (tmp_path / "dir.lock").is_dir()


def test_a_lock_held_elsewhere_still_times_out_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "api.lock"

    async def scenario() -> str:
        async with sandbox_lock(path, "api", 5, "hint"):
            try:
                async with sandbox_lock(path, "api", 0.05, "look at X"):
                    return "taken twice"
            except SandboxError as exc:
                return str(exc)

    assert asyncio.run(scenario()) == (
        "sandbox 'api' is still being created, started or stopped by another msb-proxy after "
        "0.05 s; try again later, or look at X")
