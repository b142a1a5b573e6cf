"""What the user sees on stderr while a sandbox is created or started.

OpenSSH hands a ProxyCommand the user's terminal as stderr, so this is the one place to say
"pulling image python:3.12: 45%" or "starting sandbox api ...". On a terminal a single line is
redrawn in place with a bar; anywhere else (an IDE's log, a pipe) each step is a plain line and
percentages only every quarter; with ``--quiet`` nothing at all. Every line starts
``msb-proxy:``. stdout is never touched.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_BAR = 24


class Progress:
    """Reports the steps of bringing a sandbox up. Cheap to call when nothing is shown."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False,
                 interactive: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._quiet = quiet
        if interactive is None:
            try:
                interactive = self._stream.isatty()
            except (AttributeError, ValueError):
                interactive = False
        self._interactive = interactive
        self._started = time.monotonic()
        self._line_open = False
        self._last_quarter: dict[str, int] = {}
        self.shown = False

    def step(self, text: str) -> None:
        """A new step: ``starting sandbox api ...``."""
        self._line(text, final=False)

    def fraction(self, label: str, done: float) -> None:
        """How far a long step is, 0.0 to 1.0: ``pulling image x: 45%``."""
        done = min(max(done, 0.0), 1.0)
        percent = int(done * 100)
        if self._interactive:
            filled = int(done * _BAR)
            self._line(f"{label} [{'#' * filled}{'.' * (_BAR - filled)}] {percent:3d}%",
                       final=False)
            return
        quarter = percent // 25
        if self._last_quarter.get(label, -1) < quarter:
            self._last_quarter[label] = quarter
            self._line(f"{label}: {percent}%", final=False)

    def done(self, text: str) -> None:
        """The last step: ``sandbox api ready in 1.2 s``."""
        if self.shown:
            elapsed = time.monotonic() - self._started
            self._line(f"{text} in {elapsed:.1f} s", final=True)

    def _line(self, text: str, final: bool) -> None:
        if self._quiet:
            return
        self.shown = True
        if self._interactive:
            self._stream.write(f"\r\x1b[Kmsb-proxy: {text}" + ("\n" if final else ""))
            self._line_open = not final
        else:
            self._stream.write(f"msb-proxy: {text}\n")
        self._stream.flush()

    def close(self) -> None:
        """End a line left open on the terminal, so that what follows starts clean."""
        if self._line_open and not self._quiet:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False
