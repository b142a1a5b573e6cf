"""Host keys and authorized keys.

Host keys: one ed25519 key per sandbox name, created on first use with mode 0600 and kept when the
sandbox is deleted, so a recreated sandbox presents the same key and clients never warn.

Authorized keys: the union of the files we are pointed at. A line that is not a plain
``type base64 [comment]`` public key (options, garbage, an unknown type), or a file that cannot be
read, is skipped with a warning on stderr; one bad line never locks anyone out. When nothing is
left, one error line says what was skipped first and what to do.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import asyncssh

from msb_proxy.errors import StateError, UserError, what_to_do
from msb_proxy.state import faults_of, state_error, write_private

__all__ = ["AuthorizedKeys", "load_authorized_keys", "load_or_create_host_key"]


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """Read the host key at ``path``, creating an ed25519 key there (0600) if there is none.

    Safe when several processes race to create it: all of them end up with the same key.
    Raises :class:`StateError` when it cannot be read or written, or is no usable key.
    """
    try:
        return _read_host_key(path)
    except FileNotFoundError:
        pass
    key = asyncssh.generate_private_key("ssh-ed25519")
    write_private(path, key.export_private_key("openssh"))
    return _read_host_key(path)


def _read_host_key(path: Path) -> asyncssh.SSHKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise state_error(path, exc, "read the host key") from None
    with faults_of(path, "make the host key private (chmod 600)"):
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)  # sshd refuses a host key that others can read
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        raise StateError(
            f"{path}: not a usable host key ({exc}); remove it, and the next connection "
            "makes a new one (clients that knew the old one will see a changed host key)"
        ) from None


AUTHORIZE_HINT = "add one with 'msb-proxy authorize --file ~/.ssh/id_ed25519.pub'"


class AuthorizedKeys:
    """A set of public keys allowed to authenticate, compared by their public key blob.

    What could not be used is kept in :attr:`skipped`, one ``(what, what to do)`` each, for
    :func:`load_authorized_keys` to tell.
    """

    def __init__(self, keys: Iterable[asyncssh.SSHKey] = ()) -> None:
        self._blobs: set[bytes] = set()
        self.skipped: list[tuple[str, str]] = []
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return len(self._blobs)

    def add(self, key: asyncssh.SSHKey) -> None:
        self._blobs.add(key.public_data)

    def allows(self, key: asyncssh.SSHKey) -> bool:
        return key.public_data in self._blobs

    def add_text(self, text: str, source: str) -> None:
        """Add every usable key line of ``text``; ``source`` names it in what is skipped."""
        algorithms = {alg.decode() for alg in asyncssh.public_key.get_public_key_algs()}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if fields[0].endswith("-cert-v01@openssh.com"):
                continue  # a certificate's .pub: clients present it as a certificate, not a key
            if fields[0] not in algorithms:
                why = _why_unusable(fields, algorithms)
            elif len(fields) < 2:
                why = "the key data is missing"
            else:
                try:
                    self.add(asyncssh.import_public_key(f"{fields[0]} {fields[1]}"))
                    continue
                except (asyncssh.KeyImportError, ValueError):
                    why = "the key data is not valid"
            self.skipped.append((f"{source}:{number}: skipped: {why}", AUTHORIZE_HINT))

    def add_file(self, path: Path) -> None:
        """Add the keys of ``path``; a missing file adds nothing, an unreadable one is
        skipped."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            self.skipped.append((f"{path}: skipped: {exc.strerror}",
                                 f"{what_to_do(path, exc)}, or {AUTHORIZE_HINT}"))
            return
        self.add_text(text, str(path))


def load_authorized_keys(paths: Sequence[Path], lines: Sequence[str] = (),
                         warn: TextIO | None = sys.stderr) -> AuthorizedKeys:
    """The keys of the files ``paths`` and of the key ``lines``.

    What is skipped gets a warning line each (``warn``) when some key is usable. When none
    is, the connection cannot succeed: raises :class:`UserError`, one line naming the first
    thing skipped (or the files looked at) and what to do.
    """
    authorized = AuthorizedKeys()
    for path in paths:
        authorized.add_file(path)
    for number, line in enumerate(lines, start=1):
        authorized.add_text(line, f"authorized key {number}")
    if not authorized:
        if not authorized.skipped:
            shown = ", ".join(str(p) for p in paths) or "(none given)"
            raise UserError(f"no authorized keys found in {shown}; {AUTHORIZE_HINT}")
        (what, what_to_do), more = authorized.skipped[0], len(authorized.skipped) - 1
        also = f" (and {more} more skipped)" if more else ""
        raise UserError(f"no usable authorized key: {what}{also}; {what_to_do}")
    if warn is not None:
        for what, _ in authorized.skipped:
            print(f"msb-proxy: warning: {what}", file=warn, flush=True)
    return authorized


def _why_unusable(fields: list[str], algorithms: set[str]) -> str:
    if any(field in algorithms for field in fields[1:]):
        return "options before the key are not supported; remove them"
    if fields[0].startswith(("ssh-", "ecdsa-", "sk-")) and len(fields) > 1:
        return f"unsupported key type {fields[0]!r}"
    return "not a public key"
