"""The layout of ``MSB_PROXY_HOME``: where each piece of msb-proxy's state lives.

::

    MSB_PROXY_HOME/            0700
      config.toml              optional, see config.py
      authorized_keys          keys allowed to log in to every sandbox
      known_hosts              every sandbox alias's host key, for ssh's UserKnownHostsFile
      host_keys/<slug>         one ed25519 host key per sandbox name, 0600, kept across rm
      sandboxes/<slug>/        the local backend's sandboxes (see backends/local/)
      locks/<slug>.lock        held while a sandbox is being decided on or started

``<slug>`` is the sandbox name itself when it is a plain file name, else a digest of it, so that
no name can reach outside its directory or trip over characters that mount options reserve.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

__all__ = ["StateDir", "slug", "write_private"]

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def slug(name: str) -> str:
    """A file-name-safe, collision-free stand-in for the sandbox ``name``."""
    if _PLAIN_NAME.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"~{digest}"


class StateDir:
    """Paths under one ``MSB_PROXY_HOME``; directories are created 0700 on first use."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def ensure(self, *parts: str) -> Path:
        """Create ``home/parts...`` (and the home itself) with mode 0700 if missing; return it."""
        path = self.home.joinpath(*parts)
        for directory in (self.home, path):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700, parents=True)
        return path

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def authorized_keys(self) -> Path:
        return self.home / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        """Pinned host keys, one line per ssh alias, kept by msb-proxy for the ssh client."""
        return self.home / "known_hosts"

    def host_key(self, name: str) -> Path:
        return self.ensure("host_keys") / slug(name)

    def sandbox_dir(self, name: str) -> Path:
        return self.home / "sandboxes" / slug(name)

    def lock_file(self, name: str) -> Path:
        return self.ensure("locks") / f"{slug(name)}.lock"


def write_private(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` and mode 0600 unless it already exists.

    Returns False when another process won the race; the file is written to a temporary name and
    linked into place, so readers never see it half-written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True
