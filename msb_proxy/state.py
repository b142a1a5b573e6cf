"""The layout of ``MSB_PROXY_HOME``: where each piece of msb-proxy's state lives.

::

    MSB_PROXY_HOME/            0700
      config.toml              optional, see config.py
      authorized_keys          keys allowed to log in to every sandbox
      known_hosts              every sandbox alias's host key, for ssh's UserKnownHostsFile
      host_keys/<slug>         one ed25519 host key per sandbox name, 0600, kept across rm
      sandboxes/<slug>/        the local backend's sandboxes (see backends/local/)
      fake/<slug>/             the fake backend's sandboxes (see backends/fake.py)
      locks/<slug>.lock        held while a sandbox is being decided on or started
      locks/<slug>.active ...  idle tracking (see backends/idle.py)
      locks/<slug>.ephemeral   a sandbox to remove after its last connection (idle.py)
      locks/<slug>.freeze      held while the local backend forks the sandbox (local/forks.py)
      recordings/<slug>/       record = true: one asciinema cast per terminal session, 0600
      audit/<slug>.jsonl       audit = true: the audit log, with its rotated .1 .. .N (0600)

``<slug>`` is the sandbox name itself when it is a plain file name, else a digest of it, so that
no name can reach outside its directory or trip over characters that mount options reserve.

A fault of any of these (a read-only or full file system, a directory where a file belongs, a
file msb-proxy cannot read) is a :class:`~msb_proxy.errors.StateError`: one line that names the
path and says what to do (:func:`state_error`), never an "internal error".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from msb_proxy.errors import StateError, what_to_do

__all__ = ["StateDir", "faults_of", "slug", "state_error", "write_private"]

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
        """Create ``home/parts...`` (and the home itself) with mode 0700 if missing; return it.

        Raises :class:`StateError` when it cannot be had as a directory.
        """
        path = self.home.joinpath(*parts)
        for directory in (self.home, path):
            with faults_of(directory, "make the directory"):
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o700, parents=True)
                if not directory.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
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


def state_error(path: Path, exc: OSError, doing: str) -> StateError:
    """The one line for ``exc``, met while trying to ``doing`` ("read", "write" ...)
    ``path``: the path, what failed, and what to do about it."""
    return StateError(f"{path}: cannot {doing}: {exc.strerror or exc}; {what_to_do(path, exc)}")


@contextlib.contextmanager
def faults_of(path: Path, doing: str) -> Iterator[None]:
    """Turn an :class:`OSError` of the block into the :class:`StateError` that names ``path``
    (the file the user knows, not a temporary one beside it)."""
    try:
        yield
    except OSError as exc:
        raise state_error(path, exc, doing) from None


def write_private(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` and mode 0600 unless it already exists.

    Returns False when another process won the race; the file is written to a temporary name and
    linked into place, so readers never see it half-written. Raises :class:`StateError` when
    it cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with faults_of(path, "write"):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:  # a short write on a nearly full disk is not the whole key
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return True
