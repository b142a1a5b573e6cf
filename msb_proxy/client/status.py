"""How a remote command ended, as the exit status ``ssh`` gives for it."""

from __future__ import annotations

import signal as signals

__all__ = ["EXIT_NO_STATUS", "status_of"]

EXIT_NO_STATUS = 255  # ssh's exit status when the channel closes without one


def status_of(exit_status: int | None, exit_signal: tuple[str, bool, str, str] | None
              ) -> tuple[int, str | None]:
    """The exit status ``ssh`` would give (128 + N for signal N, 255 for none at all), and
    the SSH name of the signal when there was one."""
    if exit_signal is not None:
        name = str(exit_signal[0])
        member = signals.Signals.__members__.get(f"SIG{name}")
        return 128 + (member.value if member is not None else 0), name
    return (EXIT_NO_STATUS if exit_status is None else exit_status), None
