"""``msb-proxy ls [--json]``: the sandboxes, their state, backend and the alias to ssh to.

Lists the sandboxes of every backend in the registry (one that cannot list them, such as
microsandbox without its SDK, is named in a warning), or only of the backend ``--backend``
names; only those msb-proxy made unless ``--all``. ``--json`` prints a list of objects with
``name``, ``state``, ``backend`` and ``alias``. First it sweeps: throwaway forks and
``ephemeral`` sandboxes whose msb-proxy was killed before their last connection ended are
handed to their watcher to be removed (``backends/idle.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from msb_proxy.backends.base import SandboxInfo
from msb_proxy.backends.idle import sweep
from msb_proxy.backends.registry import backend_names, open_backend
from msb_proxy.config import Config
from msb_proxy.errors import UserError
from msb_proxy.state import StateDir

__all__ = ["run"]

ALIAS_PREFIX = "msb-"  # what 'msb-proxy config' uses unless told otherwise


def run(config: Config, args: argparse.Namespace) -> int:
    sweep(StateDir(config.home), os.environ)
    names = [args.backend] if args.backend else backend_names()
    found: list[SandboxInfo] = []
    for name in names:
        try:
            backend = open_backend(config, name)
            found += asyncio.run(backend.list_all() if args.all else backend.list())
        except UserError as exc:
            if args.backend:  # asked for this one: its failure is the answer
                raise
            print(f"msb-proxy: warning: {name} sandboxes not listed: {exc}", file=sys.stderr)
    rows = [{"name": info.name, "state": info.state.value, "backend": info.backend,
             "alias": f"{ALIAS_PREFIX}{info.name}"} for info in found]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no sandboxes")
        return 0
    headers = {"name": "NAME", "state": "STATE", "backend": "BACKEND", "alias": "SSH"}
    widths = {key: max(len(headers[key]), *(len(row[key]) for row in rows)) for key in headers}
    for row in [headers, *rows]:
        print("  ".join(row[key].ljust(widths[key]) for key in headers).rstrip())
    return 0
