"""The audit log of a sandbox (``audit = true`` in its template): one JSON object a line.

::

    MSB_PROXY_HOME/audit/<slug>.jsonl      the live log, 0600 (directory 0700)
    MSB_PROXY_HOME/audit/<slug>.jsonl.1    ... .N: rotated logs, newest first (audit_keep)

Every event is an object with ``time`` (ISO-8601 UTC, microseconds), ``event``, ``sandbox``,
``pid`` (the msb-proxy process serving the connection) and ``connection`` (an id of the
connection, the same on all its lines), and the fields of its kind:

* ``connect``: ``key_fingerprint`` (``SHA256:...``), ``key_type``, ``login_user`` (the SSH
  login name), ``guest_user`` (who sessions run as); ``disconnect``.
* ``shell``, ``exec`` (``command``), ``subsystem`` (``name``, ``accepted``), ``scp``
  (``direction`` upload or download, ``paths``, ``recursive``), and per channel ``exit``
  (``status``, or ``signal``; ``error`` when it could not start), ``hangup`` (the channel
  closed while its process ran) or ``detach`` (a named session left running).
* ``sftp``: ``op`` (the operations OpenSSH's sftp-server logs at level INFO: ``read`` and
  ``write`` of a file when its handle is closed, with its ``bytes``; ``open`` when it failed;
  ``list``, ``remove``, ``mkdir``, ``rmdir``, ``rename``, ``setstat``, ``symlink``,
  ``hardlink``), ``path`` (and ``target``), ``result`` (``ok`` or the error's text).
* ``tunnel-listen`` (``ssh -R``'s listener), ``tunnel-open`` (``kind``: ``local``, ``unix``,
  ``remote``, ``remote-unix`` or ``agent``; ``target``), ``tunnel-close`` (the same, with
  ``bytes_from_client`` and ``bytes_to_client``). ``ssh -D`` opens the same
  ``direct-tcpip`` channel ``-L`` does, so its connections are ``local`` with the target the
  SOCKS client asked for: sshd cannot tell them apart either.

Each line is one ``os.write`` to a descriptor opened ``O_APPEND``: many msb-proxy processes
append to one sandbox's log at once without tearing a line, nothing msb-proxy does rewrites
what is logged, and a process killed with ``kill -9`` loses at most the event it was about to
write (a written line is in the kernel's page cache; no fsync per event, so a crash of the
machine itself may lose the last moments). With rotation on (``audit_max_size``), every writer
takes the log's lock (``<slug>.jsonl.lock``, ``flock``) for each event, so that the size check
and the write are one step: no log grows past ``audit_max_size`` (but for a single event
larger than that), and ``audit_keep`` rotated logs are kept. A writer whose file was rotated
away by another process notices on its next event and reopens the live one. Events are few
(per request, never per byte), so the lock costs nothing a transfer would notice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from msb_proxy.state import slug

__all__ = ["MIB", "AuditLog", "ConnectionAudit", "audit_log_path", "log_files", "text", "utc_now"]

MIB = 1 << 20


def audit_log_path(home: Path, sandbox: str) -> Path:
    """Where the live audit log of ``sandbox`` is (made, with its directory, on first use)."""
    return home / "audit" / f"{slug(sandbox)}.jsonl"


def log_files(path: Path) -> list[Path]:
    """The rotated logs of live log ``path`` and then it, oldest first, those that exist."""
    rotated = []
    index = 1
    while (older := path.with_name(f"{path.name}.{index}")).exists():
        rotated.append(older)
        index += 1
    return [*reversed(rotated), *([path] if path.exists() else [])]


def utc_now() -> str:
    """The time as the log writes it: ``2026-12-02T17:40:00.123456Z``."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class AuditLog:
    """One sandbox's audit log, as one process appends to it (any number may at once).

    ``max_size`` is in bytes (0: never rotated), ``keep`` how many rotated logs stay.
    """

    def __init__(self, path: Path, max_size: int, keep: int) -> None:
        self.path = path
        self._max_size = max_size
        self._keep = keep
        self._fd = -1
        self._lock = -1
        self._failed = False

    def append(self, event: Mapping[str, object]) -> None:
        """Write ``event`` as one line. A log that cannot be written is reported once on
        stderr (one line naming it) and the connection goes on."""
        line = (json.dumps(event, ensure_ascii=False, separators=(", ", ": "),
                           default=str) + "\n").encode("utf-8", "backslashreplace")
        try:
            self._write(line)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                print(f"msb-proxy: audit log {self.path}: cannot write: "
                      f"{exc.strerror or exc}; events of this connection go unlogged",
                      file=sys.stderr, flush=True)

    def _write(self, line: bytes) -> None:
        if self._fd < 0:
            with contextlib.suppress(FileExistsError):
                self.path.parent.mkdir(mode=0o700)
        if not self._max_size:
            self._append(line)
            return
        if self._lock < 0:
            self._lock = os.open(self.path.with_name(self.path.name + ".lock"),
                                 os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._append(line)
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _append(self, line: bytes) -> None:
        if self._fd < 0 or self._rotated_away():
            self._reopen()
        size = os.fstat(self._fd).st_size
        if self._max_size and size and size + len(line) > self._max_size:
            self._shift()
            self._reopen()
        os.write(self._fd, line)  # O_APPEND: the whole line lands at the end, in one piece

    def _rotated_away(self) -> bool:
        try:
            live = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (live.st_ino, live.st_dev) != (mine.st_ino, mine.st_dev)

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600)

    def _shift(self) -> None:
        """Rotate: ``.1`` .. ``.N`` up one, dropping what passes ``keep``, the live log to
        ``.1`` (under the lock)."""
        def rotated(index: int) -> Path:
            return self.path.with_name(f"{self.path.name}.{index}")

        index = 1
        while rotated(index).exists():
            index += 1
        for old in range(index - 1, 0, -1):
            if old >= self._keep:
                rotated(old).unlink()
            else:
                rotated(old).rename(rotated(old + 1))
        if self._keep:
            self.path.rename(rotated(1))
        else:
            self.path.unlink()

    def close(self) -> None:
        for fd in (self._fd, self._lock):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock = -1


class ConnectionAudit:
    """The audit events of one SSH connection, and who it is (known once authenticated).

    With no log (``audit`` off, the default) it writes nothing and costs one test per event;
    the identity is kept all the same, for the recordings' headers.
    """

    def __init__(self, log: AuditLog | None = None, sandbox: str = "") -> None:
        self._log = log
        self.sandbox = sandbox
        self.connection = os.urandom(4).hex()
        self.key_fingerprint = ""
        self.key_type = ""
        self.login_user = ""
        self.guest_user = ""
        self._channels = 0
        self._connected = False

    @property
    def enabled(self) -> bool:
        return self._log is not None

    def next_channel(self) -> int:
        """A number for a channel of this connection, unique within it, from 0."""
        number = self._channels
        self._channels += 1
        return number

    def event(self, event: str, **fields: object) -> None:
        """Log ``event`` with ``fields`` (nothing when auditing is off)."""
        if self._log is None:
            return
        self._log.append({"time": utc_now(), "event": event, "sandbox": self.sandbox,
                          "pid": os.getpid(), "connection": self.connection, **fields})

    def connected(self, key_fingerprint: str, key_type: str, login_user: str,
                  guest_user: str) -> None:
        """The client authenticated: remember who it is and log ``connect``."""
        self.key_fingerprint, self.key_type = key_fingerprint, key_type
        self.login_user, self.guest_user = login_user, guest_user
        self._connected = True
        self.event("connect", key_fingerprint=key_fingerprint, key_type=key_type,
                   login_user=login_user, guest_user=guest_user)

    def disconnected(self) -> None:
        """The connection is over: log ``disconnect`` if it had logged ``connect``."""
        if self._connected:
            self._connected = False
            self.event("disconnect")
        if self._log is not None:
            self._log.close()


def text(value: bytes) -> str:
    """A guest path or name as the log shows it: UTF-8, other bytes as ``\\xNN``."""
    return value.decode("utf-8", "backslashreplace")
