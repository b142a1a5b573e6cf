"""The known_hosts file msb-proxy keeps, so that host key checking stays on and never warns.

Each sandbox name has one host key for good (it survives delete and recreate), so its ssh alias
can be pinned. ``msb-proxy stdio`` writes ``ALIAS KEYTYPE KEY`` for the alias it was started
for before it sends its host key, so the client, pointed here by the generated ssh_config
(``UserKnownHostsFile``, ``StrictHostKeyChecking yes``), finds the entry when it checks. Peers
such as Coder and DevPod turn checking off instead; Teleport pins, as we do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from msb_proxy.state import faults_of

__all__ = ["pin"]

_UNSAFE = set(" \t\r\n,*?!#[]")


def pin(path: Path, alias: str, public_key: str) -> bool:
    """Make ``path`` hold exactly ``public_key`` (``type base64``) for host ``alias``.

    Returns True when the file changed. An alias that a known_hosts line cannot spell (white
    space, commas, wildcards) is left alone. Safe against concurrent writers. Raises
    :class:`~msb_proxy.errors.StateError` when the file cannot be read or written.
    """
    if not alias or _UNSAFE.intersection(alias):
        return False
    wanted = f"{alias} {public_key}"
    if wanted in _read_lines(path):  # as on nearly every connection: no lock, no write
        return False
    lock_path = path.with_name(f"{path.name}.lock")
    with faults_of(lock_path, "lock"):
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = _read_lines(path)
        if wanted in lines:
            return False
        kept = [line for line in lines if alias not in _hosts(line)]
        kept.append(wanted)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with faults_of(path, "write"):
            try:
                tmp.write_text("\n".join(kept) + "\n", encoding="utf-8",
                               errors="surrogateescape")
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):  # gone once it has replaced the file
                    tmp.unlink()
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(lock)


def _read_lines(path: Path) -> list[str]:
    with faults_of(path, "read"):
        try:
            return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        except FileNotFoundError:
            return []


def _hosts(line: str) -> list[str]:
    """The host names a known_hosts line is for (none for comments and marker lines)."""
    fields = line.split()
    if not fields or fields[0].startswith(("#", "@")):
        return []
    return fields[0].split(",")
