"""What a run leaves behind, counted from the host: processes, descriptors, files, the guest's
processes, and the memory a process holds of its own.

Shared by the fuzzer (``tests/fuzz``) and the stress run (``tests/stress.py``), which count
before and after and require the same numbers once things have settled.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from msb_proxy.state import StateDir

T = TypeVar("T")

__all__ = ["cmdline", "guest_processes", "open_descriptors", "processes", "settle",
           "state_files", "unique_kib"]


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def cmdline(pid: int) -> list[bytes]:
    """The argv of ``pid`` ([] once it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().split(b"\0")[:-1]
    except OSError:
        return []


def processes(match: Callable[[list[bytes]], bool]) -> list[int]:
    """The PIDs whose argv ``match`` accepts."""
    return [pid for pid in _pids() if (argv := cmdline(pid)) and match(argv)]


def open_descriptors(pid: int) -> int:
    """How many descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def state_files(home: Path) -> int:
    """Files and directories under ``home`` (a ``MSB_PROXY_HOME``), the sandboxes' writable
    layers and jail roots left out: what the guest writes is the guest's business."""
    count = 0
    for _root, dirs, files in os.walk(home):
        dirs[:] = [name for name in dirs if name not in ("upper", "work", "lower", "root")]
        count += len(dirs) + len(files)
    return count


def guest_processes(home: Path, sandbox: str) -> int | None:
    """Processes in the PID namespace of the local jail of ``sandbox``, its init included
    (None when it does not run)."""
    try:
        init = int((StateDir(home).sandbox_dir(sandbox) / "init.pid").read_text())
        namespace = os.readlink(f"/proc/{init}/ns/pid")
    except (OSError, ValueError):
        return None
    count = 0
    for pid in _pids():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                count += 1
    return count


def unique_kib(pid: int) -> int | None:
    """What ``pid`` holds of its own, in KiB: the private pages of ``smaps_rollup``
    (``Private_Clean + Private_Dirty``, USS); pages shared with the process it was forked from
    are not counted. None once it is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as file:
            for line in file:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return None
    return total


def settle(measure: Callable[[], T], expected: T, timeout: float) -> T:
    """``measure()`` once it equals ``expected``, or its last value after ``timeout``: what is
    torn down asynchronously (a process reaped, a socket file removed) gets that long."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if value == expected or time.monotonic() >= deadline:
            return value
        time.sleep(0.1)
