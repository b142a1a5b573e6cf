"""Host keys and authorized keys.

Host keys: one ed25519 key per sandbox name, created on first use with mode 0600 and kept when the
sandbox is deleted, so a recreated sandbox presents the same key and clients never warn.

Authorized keys: the union of the files we are pointed at. A line that is not a plain
``type base64 [comment]`` public key (options, garbage, an unknown type) is skipped with a warning
on stderr; one bad line never locks anyone out.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import asyncssh

from msb_proxy.state import write_private

__all__ = ["AuthorizedKeys", "load_or_create_host_key"]


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """Read the host key at ``path``, creating an ed25519 key there (0600) if there is none.

    Safe when several processes race to create it: all of them end up with the same key.
    """
    try:
        return _read_host_key(path)
    except FileNotFoundError:
        pass
    key = asyncssh.generate_private_key("ssh-ed25519")
    write_private(path, key.export_private_key("openssh"))
    return _read_host_key(path)


def _read_host_key(path: Path) -> asyncssh.SSHKey:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
    return asyncssh.read_private_key(str(path))


class AuthorizedKeys:
    """A set of public keys allowed to authenticate, compared by their public key blob."""

    def __init__(self, keys: Iterable[asyncssh.SSHKey] = ()) -> None:
        self._blobs: set[bytes] = set()
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return len(self._blobs)

    def add(self, key: asyncssh.SSHKey) -> None:
        self._blobs.add(key.public_data)

    def allows(self, key: asyncssh.SSHKey) -> bool:
        return key.public_data in self._blobs

    def add_text(self, text: str, source: str, warn: TextIO | None = sys.stderr) -> None:
        """Add every usable key line of ``text``; ``source`` names it in warnings."""
        algorithms = {alg.decode() for alg in asyncssh.public_key.get_public_key_algs()}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if fields[0].endswith("-cert-v01@openssh.com"):
                continue  # a certificate's .pub: clients present it as a certificate, not a key
            if fields[0] not in algorithms:
                _warn(warn, f"{source}:{number}: skipped: {_why_unusable(fields, algorithms)}")
                continue
            if len(fields) < 2:
                _warn(warn, f"{source}:{number}: skipped: the key data is missing")
                continue
            try:
                self.add(asyncssh.import_public_key(f"{fields[0]} {fields[1]}"))
            except (asyncssh.KeyImportError, ValueError):
                _warn(warn, f"{source}:{number}: skipped: the key data is not valid")

    def add_file(self, path: Path, warn: TextIO | None = sys.stderr) -> None:
        """Add the keys of ``path``; a missing or unreadable file adds nothing."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            _warn(warn, f"{path}: skipped: {exc.strerror}")
            return
        self.add_text(text, str(path), warn)


def _why_unusable(fields: list[str], algorithms: set[str]) -> str:
    if any(field in algorithms for field in fields[1:]):
        return "options before the key are not supported; remove them"
    if fields[0].startswith(("ssh-", "ecdsa-", "sk-")) and len(fields) > 1:
        return f"unsupported key type {fields[0]!r}"
    return "not a public key"


def _warn(stream: TextIO | None, message: str) -> None:
    if stream is not None:
        print(f"msb-proxy: warning: {message}", file=stream, flush=True)
