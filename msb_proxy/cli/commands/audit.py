"""``msb-proxy audit NAME [-f|--follow] [--json]``: a sandbox's audit log, oldest first.

Reads ``MSB_PROXY_HOME/audit/<slug>.jsonl`` and the rotated logs beside it (see
:mod:`msb_proxy.server.audit`). Each event is one readable line: its time (UTC), connection,
kind and fields::

    2026-12-02 17:45:40Z 8fd9d0ef exec        channel=0 command="make test" pty=false

``--json`` prints the lines exactly as logged. ``--follow`` then keeps printing what is
appended, across rotations, until interrupted (Ctrl-C: exit 130, no traceback). A sandbox
with no log is one line and exit status 1; a line that is no JSON object (not one msb-proxy
wrote) is shown as such, never skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from msb_proxy.config import Config, sandbox_name_from_host
from msb_proxy.errors import UserError
from msb_proxy.server.audit import audit_log_path, log_files

__all__ = ["run"]

FOLLOW_POLL_S = 0.2
_HEADER_KEYS = ("time", "event", "sandbox", "pid", "connection")


def run(config: Config, args: argparse.Namespace) -> int:
    name = sandbox_name_from_host(args.name, None)
    path = audit_log_path(config.home, name)
    files = log_files(path)
    if not files:
        raise UserError(f"sandbox {name!r} has no audit log ({path} does not exist); "
                        "'audit = true' in its template in config.toml starts one")
    show = _as_logged if args.json else _readable
    try:
        for line in _lines(files, path, follow=args.follow):
            sys.stdout.write(show(line))
            if args.follow:
                sys.stdout.flush()
        sys.stdout.flush()
    except BrokenPipeError:  # audit NAME | head: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _lines(files: list[Path], live: Path, *, follow: bool) -> Iterator[bytes]:
    """Every complete line of ``files`` in order; with ``follow``, then those appended to
    ``live`` from then on, reopening it whenever it has been rotated away."""
    for path in files[:-1]:
        with contextlib.suppress(FileNotFoundError):  # rotated out of reach meanwhile
            yield from _complete_lines(path.read_bytes())
    last = files[-1]
    try:
        handle = last.open("rb")
    except FileNotFoundError:
        return
    pending = b""
    try:
        while True:
            chunk = handle.read()
            if not chunk and follow and _rotated(handle.fileno(), live):
                # What was written to the old file before it was renamed comes first: only a
                # read after the rename that finds nothing more lets go of it.
                chunk = handle.read()
                if not chunk:
                    with contextlib.suppress(FileNotFoundError):
                        fresh = live.open("rb")
                        handle.close()
                        handle = fresh
                        continue
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line + b"\n"
                continue
            if not follow:
                if pending:  # a line still being written when we read: shown as it is
                    yield pending + b"\n"
                return
            time.sleep(FOLLOW_POLL_S)
    finally:
        handle.close()


def _complete_lines(data: bytes) -> Iterator[bytes]:
    for line in data.splitlines(keepends=True):
        yield line if line.endswith(b"\n") else line + b"\n"


def _rotated(fd: int, live: Path) -> bool:
    """Whether ``live`` is now another file than the one ``fd`` reads (and exists)."""
    try:
        now = os.stat(live)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev)


def _as_logged(line: bytes) -> str:
    return line.decode("utf-8", "backslashreplace")


def _readable(line: bytes) -> str:
    text = line.decode("utf-8", "backslashreplace").rstrip("\n")
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return f"(not an audit event) {text}\n"
    stamp = str(event.get("time", "?"))
    if "T" in stamp:  # 2026-12-02T17:45:40.033263Z -> 2026-12-02 17:45:40Z
        stamp = stamp.replace("T", " ").split(".", 1)[0].removesuffix("Z") + "Z"
    fields = " ".join(f"{key}={_value(value)}" for key, value in event.items()
                      if key not in _HEADER_KEYS)
    return f"{stamp} {event.get('connection', '?')} {event.get('event', '?')!s:<12} " \
           f"{fields}".rstrip() + "\n"


def _value(value: object) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)
