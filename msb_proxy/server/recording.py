"""Recordings of terminal sessions (``record = true`` in a sandbox's template): asciinema v2.

::

    MSB_PROXY_HOME/recordings/<slug>/           0700
      20261202T174012Z-4242-0.cast              <UTC start>-<pid>-<channel>, 0600

Every session on a terminal (a shell, a named session, ``ssh -t HOST COMMAND``) is one cast
(https://docs.asciinema.org/manual/asciicast/v2/): a header line, then one JSON array a line,
``[seconds, "o", text]`` for what the terminal was sent and ``[seconds, "r", "COLSxROWS"]`` for
each window change, so ``asciinema play`` and ``asciinema cat`` show what the user saw. Input
is not recorded (asciinema's default too): what is typed shows in the terminal's echo.

The header has asciinema's ``version``, ``width``, ``height``, ``timestamp``, ``env`` (``TERM``
and ``SHELL``) and ``title``, and ours, which players ignore: ``sandbox``, ``login_user``,
``guest_user``, ``key_fingerprint`` and ``connection`` (the audit log's id of the connection).

Each line is written by one ``os.write`` as the output comes, so a recording of a session whose
msb-proxy was killed plays up to its last event. Output is decoded as UTF-8 incrementally: a
character split across two reads is written whole, in the event of the read that completes it
(bytes that are no UTF-8 at all become U+FFFD, as a terminal shows them).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from msb_proxy.server.audit import ConnectionAudit
from msb_proxy.state import slug

__all__ = ["Recording", "recordings_dir"]

# A client with no terminal of its own (ssh -tt from a script) asks for a 0x0 one, which
# players cannot show: the size a terminal has until told otherwise.
DEFAULT_COLS, DEFAULT_ROWS = 80, 24


def recordings_dir(home: Path, sandbox: str) -> Path:
    """Where the casts of ``sandbox`` go (made, 0700, by the first one)."""
    return home / "recordings" / slug(sandbox)


class Recording:
    """One terminal session's cast, written as the session goes."""

    def __init__(self, fd: int, path: Path) -> None:
        self.path = path
        self._fd = fd
        self._start = time.monotonic()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._failed = False

    @classmethod
    def start(cls, directory: Path, channel: int, *, cols: int, rows: int, term: str,
              shell: str, title: str, audit: ConnectionAudit) -> Recording:
        """Create the cast of channel ``channel`` in ``directory`` and write its header.

        Raises :class:`OSError` when it cannot be created."""
        for made in (directory.parent, directory):
            with contextlib.suppress(FileExistsError):
                made.mkdir(mode=0o700)
        started = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
        path = directory / f"{stamp}-{os.getpid()}-{channel}.cast"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        recording = cls(fd, path)
        recording._line({
            "version": 2, "width": cols or DEFAULT_COLS, "height": rows or DEFAULT_ROWS,
            "timestamp": int(started),
            "env": {"TERM": term, "SHELL": shell}, "title": title, "sandbox": audit.sandbox,
            "login_user": audit.login_user, "guest_user": audit.guest_user,
            "key_fingerprint": audit.key_fingerprint, "connection": audit.connection,
        })
        return recording

    def output(self, data: bytes) -> None:
        """What the terminal was sent."""
        text = self._decoder.decode(data)
        if text:
            self._line([self._elapsed(), "o", text])

    def resize(self, cols: int, rows: int) -> None:
        """A ``window-change``."""
        self._line([self._elapsed(), "r", f"{cols}x{rows}"])

    def close(self) -> None:
        """The session is over: write what is left of a split character, and close."""
        if self._fd < 0:
            return
        text = self._decoder.decode(b"", final=True)
        if text:
            self._line([self._elapsed(), "o", text])
        os.close(self._fd)
        self._fd = -1

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._start, 6)

    def _line(self, value: object) -> None:
        if self._fd < 0:
            return
        line = json.dumps(value, ensure_ascii=False) + "\n"
        try:
            os.write(self._fd, line.encode("utf-8", "surrogatepass"))
        except OSError as exc:
            if not self._failed:  # the session goes on; say once that its cast does not
                self._failed = True
                print(f"msb-proxy: recording {self.path}: cannot write: "
                      f"{exc.strerror or exc}; the rest of this session goes unrecorded",
                      file=sys.stderr, flush=True)
