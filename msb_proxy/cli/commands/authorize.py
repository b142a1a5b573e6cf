"""``msb-proxy authorize``: allow public keys to log in to every sandbox.

The keys come from a file (``--file``, every key line of it), the command line (``--key``, one
line) or standard input (``--stdin``). All of them are checked before anything is written: one
line that is not a usable public key stops the command with a line naming it, and the file is
left as it was. The rest are appended to ``$MSB_PROXY_HOME/authorized_keys`` (mode 0600) unless
that file already holds the same key, whatever its comment says.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from msb_proxy.config import Config
from msb_proxy.errors import UserError
from msb_proxy.server.keys import AuthorizedKeys
from msb_proxy.state import StateDir

__all__ = ["PublicKeyLine", "authorize", "parse_public_keys", "run"]

_EXPECTED = "expected 'TYPE BASE64 [COMMENT]' as in ~/.ssh/id_ed25519.pub"
_SHOWN_CHARS = 40


@dataclass(frozen=True)
class PublicKeyLine:
    """One public key as given, and the authorized_keys line it becomes."""

    key: asyncssh.SSHKey
    line: str


def run(config: Config, args: argparse.Namespace) -> int:
    """Add the keys of ``--file``, ``--key`` or ``--stdin``; print how many were new."""
    if args.file is not None:
        path = Path(args.file)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}; give a public key file such "
                            "as ~/.ssh/id_ed25519.pub") from None
        keys = parse_public_keys(text.splitlines(), str(path))
    elif args.key is not None:
        keys = parse_public_keys([args.key], "--key", numbered=False)
    else:
        text = sys.stdin.buffer.read().decode("utf-8", "replace")
        keys = parse_public_keys(text.splitlines(), "stdin")
    state = StateDir(config.home)
    added = authorize(state, keys)
    present = len(keys) - added
    print(f"added {_keys(added)} to {state.authorized_keys}; {_keys(present)} already there")
    return 0


def parse_public_keys(lines: Sequence[str], source: str, *,
                      numbered: bool = True) -> list[PublicKeyLine]:
    """The public keys of ``lines``, blank lines and ``#`` comments skipped.

    Raises :class:`UserError` naming ``source`` (and the line number when ``numbered``) for the
    first line that is not a usable public key, or when there is no key at all.
    """
    algorithms = {alg.decode() for alg in asyncssh.public_key.get_public_key_algs()}
    keys: list[PublicKeyLine] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{source}:{number}" if numbered else source
        fields = text.split(None, 2)
        try:
            key = asyncssh.import_public_key(f"{fields[0]} {fields[1]}")
        except (IndexError, asyncssh.KeyImportError, ValueError):
            shown = text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
            raise UserError(f"{where} {shown!r}: {_why_unusable(fields, algorithms)}; nothing "
                            "was added") from None
        keys.append(PublicKeyLine(key, " ".join(fields)))
    if not keys:
        raise UserError(f"{source} holds no public key; {_EXPECTED}")
    return keys


def authorize(state: StateDir, keys: Sequence[PublicKeyLine]) -> int:
    """Append the ``keys`` that ``state``'s authorized_keys lacks; return how many were added.

    The file is created 0600 if missing and set to 0600 if not; a lock on it keeps concurrent
    runs from adding the same key twice.
    """
    path = state.authorized_keys
    try:
        state.ensure()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            os.fchmod(handle.fileno(), 0o600)
            existing = handle.read()
            new = _missing(keys, existing.decode("utf-8", "replace"), path)
            if new:
                separator = "\n" if existing and not existing.endswith(b"\n") else ""
                handle.write((separator + "".join(f"{line}\n" for line in new)).encode())
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename and exc.filename != str(path) else ""
        raise UserError(f"cannot add keys to {path}: {where}{exc.strerror}") from None
    return len(new)


def _missing(keys: Sequence[PublicKeyLine], existing: str, path: Path) -> list[str]:
    """The lines of the ``keys`` that ``existing`` (authorized_keys text) does not hold yet."""
    known = AuthorizedKeys()
    known.add_text(existing, str(path))
    new: list[str] = []
    for entry in keys:
        if not known.allows(entry.key):
            known.add(entry.key)
            new.append(entry.line)
    return new


def _why_unusable(fields: list[str], algorithms: set[str]) -> str:
    kind = fields[0]
    if kind.startswith("-----BEGIN"):
        return "this is a private key; give its public half, the .pub file"
    if kind.endswith("-cert-v01@openssh.com"):
        return "this is a certificate; give the plain public key it certifies"
    if kind not in algorithms:
        if any(field.split(None, 1)[0] in algorithms for field in fields[1:]):
            return "options before the key are not supported; remove them"
        if kind.startswith(("ssh-", "ecdsa-", "sk-")) and len(fields) > 1:
            return f"unsupported key type {kind!r}"
        return f"not a public key; {_EXPECTED}"
    if len(fields) < 2:
        return "the key data is missing"
    return "the key data is not valid"


def _keys(count: int) -> str:
    return f"{count} key" if count == 1 else f"{count} keys"
