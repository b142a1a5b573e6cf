"""Errors a user can meet.

Every failure that reaches the user is a :class:`UserError`: one line that names the thing that
failed and says what to do next. The CLI prints it as ``msb-proxy: <message>`` on stderr and exits
non-zero; anything else escaping to the top is a bug and is reported the same way, with the
traceback only under ``--debug``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "SandboxError",
    "SandboxNotFoundError",
    "StateError",
    "UnknownUserError",
    "UserError",
    "what_to_do",
]

# What to do about a file msb-proxy cannot read or write (its state, its config), by errno: the
# end of its one line.
_WHAT_TO_DO = {
    errno.EROFS: "make that file system writable, or point MSB_PROXY_HOME at a directory that is",
    errno.ENOSPC: "free some space there, or point MSB_PROXY_HOME at another file system",
    errno.EDQUOT: "free some space there (the disk quota is used up)",
    errno.EACCES: "check the owner, mode and attributes (lsattr) of it and of its directory",
    errno.EPERM: "check the owner, mode and attributes (lsattr) of it and of its directory",
    errno.EISDIR: "it is a directory where a file belongs: remove it",
    errno.ENOTDIR: "one of the directories on its path is a file: remove that file",
    errno.ELOOP: "a symbolic link on the way loops: remove it",
}


class UserError(Exception):
    """A failure explained in one line, meant to be shown to the user as it is."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(UserError):
    """The command line, the environment or the config file holds a value we cannot use."""

    exit_code = 2


class BackendUnavailableError(UserError):
    """The chosen backend cannot run on this host (no KVM, no runtime, not root ...)."""


class SandboxError(UserError):
    """A sandbox could not be started, reached or stopped."""


class SandboxNotFoundError(SandboxError):
    """There is no sandbox of that name (and it may not be created)."""


class StateError(UserError):
    """A file or directory of msb-proxy's own state (``MSB_PROXY_HOME``) cannot be read or
    written, or holds what msb-proxy cannot use: a fault of this host, not a bug of ours."""


class UnknownUserError(UserError):
    """The SSH login name is not a user of the guest."""


def what_to_do(path: Path, exc: OSError) -> str:
    """What the user can do about ``exc``, met on ``path``: the end of its one line."""
    if exc.errno == errno.ENOTDIR and os.path.isfile(path):  # (os.path's: never raise)
        return "it is a file where a directory belongs: remove it"
    return _WHAT_TO_DO.get(exc.errno or 0,
                           "fix that, or point MSB_PROXY_HOME at another directory")
