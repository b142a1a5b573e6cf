"""Errors a user can meet.

Every failure that reaches the user is a :class:`UserError`: one line that names the thing that
failed and says what to do next. The CLI prints it as ``msb-proxy: <message>`` on stderr and exits
non-zero; anything else escaping to the top is a bug and is reported the same way, with the
traceback only under ``--debug``.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "SandboxError",
    "SandboxNotFoundError",
    "UnknownUserError",
    "UserError",
]


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


class UnknownUserError(UserError):
    """The SSH login name is not a user of the guest."""
