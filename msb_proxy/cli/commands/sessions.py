"""``msb-proxy sessions NAME [--kill SESSION] [--json]``: the named sessions of a sandbox.

Lists the shells that outlive their connection (``ssh msb-NAME+SESSION``, or ``ssh -o
SetEnv=MSB_SESSION=SESSION msb-NAME``): who runs each, how old and how long idle it is, its
terminal size and whether a connection is attached or since when none is. ``--json`` prints a
list of objects with ``session``, ``user``, ``created`` (Unix time), ``age``, ``idle`` and
``detached_for`` (seconds), ``cols``, ``rows`` and ``attached``. ``--kill SESSION`` hangs that
session's shell up (and kills it when it does not go).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from msb_proxy.backends.base import SessionInfo
from msb_proxy.backends.registry import open_backend
from msb_proxy.config import Config, sandbox_name_from_host, session_name
from msb_proxy.errors import SandboxError

__all__ = ["run"]

HEADERS = ("SESSION", "USER", "AGE", "IDLE", "SIZE", "STATE")


def run(config: Config, args: argparse.Namespace) -> int:
    name = sandbox_name_from_host(args.name, None)
    backend = open_backend(config, config.template(name).backend)
    if args.kill is not None:
        session = session_name(args.kill, "--kill")
        if not asyncio.run(backend.kill_session(name, session)):
            raise SandboxError(f"sandbox {name!r} has no session {session!r}; "
                               f"'msb-proxy sessions {name}' lists them")
        return 0
    found = asyncio.run(backend.sessions(name))
    now = time.time()
    if args.json:
        print(json.dumps([_record(info, now) for info in found], indent=2))
        return 0
    if not found:
        print(f"sandbox {name!r} has no named sessions")
        return 0
    rows = [HEADERS, *(_row(info, now) for info in found)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADERS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return 0


def _record(info: SessionInfo, now: float) -> dict[str, object]:
    return {"session": info.name, "user": info.user, "created": info.created,
            "age": max(0.0, now - info.created), "idle": info.idle, "cols": info.cols,
            "rows": info.rows, "attached": info.attached, "detached_for": info.detached_for}


def _row(info: SessionInfo, now: float) -> tuple[str, ...]:
    state = "attached" if info.attached else f"detached {_span(info.detached_for)}"
    return (info.name, info.user, _span(now - info.created), _span(info.idle),
            f"{info.cols}x{info.rows}", state)


def _span(seconds: float) -> str:
    """``seconds`` as ``ps`` and ``w`` show a time: in its largest whole unit."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"
