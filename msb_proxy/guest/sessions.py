"""Named sessions: shells that outlive the connection they were started from.

A named session (``ssh -o SetEnv=MSB_SESSION=work msb-api``, ``ssh msb-api+work``) is a shell
on a terminal whose master side is kept by a process of the guest side (the local backend's
jail init; the microsandbox guest agent), not by the connection. This module is what that keeper
needs, whatever its transport to the proxy:

* :class:`OutputRing`: the terminal's recent output, bounded (``RING_SIZE``); the master is
  read *always*, attached or not, so the shell never blocks on a full terminal while nobody
  watches, and the oldest output is dropped.
* :func:`repaint`: what a connection that attaches is sent first: clear the screen, then the
  ring from its first line start (at least the last screenful of any terminal up to
  ``RING_SIZE`` bytes of one).
* :class:`Session`: one session's bookkeeping (user, created, last input or output, terminal
  size, attached or detached since when, its ``timeout``) and its terminal: reading the master
  into the ring, writing input to it, resizing it (and a ``SIGWINCH`` to the foreground
  process group even when the size is unchanged, so a full-screen program repaints), hanging
  its shell up.
* :class:`SessionTable`: the sessions of one sandbox by name, and the rules: a session of
  another uid is refused (:class:`SessionRefused`); attaching to an attached session takes it
  over (the keeper tells the connection it displaced :func:`take_over_reason`); a session
  detached longer than its timeout (more than 0) is hung up (:meth:`SessionTable.expired`).
* :class:`PipeRelay`: a session's terminal relayed to a caller's pair of pipes with flow
  control both ways: while the caller's pipe is full, the master is not read (the shell waits
  for the client); while the terminal does not take input, the caller's input is not read.

How to embed it (the jail init does it this way, in ``msb_proxy/backends/local/jail.py``):

1. Fork the shell on a new terminal as for any PTY process, but keep the master; make
   ``Session(name, user=, uid=, pid=, master=, cols=, rows=, timeout=)`` and ``table.add``
   it.
2. On an attach request: ``session, displaced = table.claim(name, uid)`` (raises
   :class:`SessionRefused`); when ``displaced``, tell the old connection
   ``take_over_reason(name)`` and drop its relay; then ``data = session.attach(cols, rows, px,
   py)`` (the repaint) and send it ahead of any live output, e.g. ``PipeRelay(session,
   input_r, output_w, data)`` over two pipes whose other ends the caller gets.
3. In the event loop: register the fds of ``relay.interest()`` (or of
   ``session.read_interest()`` when detached: the master is read regardless) and call
   ``relay.on_ready(fd, events)`` / ``session.read_master()``; ``relay.on_ready`` returning
   False means the caller went: ``session.detach()``, no hang-up. A keeper whose transport is
   not pipes (the guest agent's frames) uses :class:`Session` directly: ``read_master``
   while it has credit or is detached, ``write_input`` as input comes.
4. Every turn, ``table.expired(now)``: hang those up (``session.hang_up()``, then
   ``session.kill()`` after ``HANGUP_GRACE_S``); they are out of the table already, so the next
   attach of the name starts a fresh shell.
5. When the shell is reaped: ``table.remove(session)``; a moment later (output may still be
   on its way through the terminal) ``relay.drain_terminal()``, and once that says nothing is
   left queued (or the caller took too long), ``relay.close()``, ``session.close()``, and
   report the exit on the attached
   connection's control channel, as for any process.

Standard library only, nothing of msb-proxy's outside ``msb_proxy.guest``; runs on Python 3.6
and newer (a guest's ``python3``).
"""

import contextlib
import errno
import fcntl
import os
import selectors
import signal
import struct
import termios
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "CLEAR_SCREEN",
    "HANGUP_GRACE_S",
    "RING_SIZE",
    "OutputRing",
    "PipeRelay",
    "Session",
    "SessionRefused",
    "SessionTable",
    "repaint",
    "take_over_reason",
]

RING_SIZE = 256 * 1024
READ_SIZE = 64 * 1024
HANGUP_GRACE_S = 3.0
# Reset the character attributes, home the cursor, clear the screen (the client's scroll-back
# is left alone): what the screen showed is unknown here, and what follows paints it again.
CLEAR_SCREEN = b"\x1b[0m\x1b[H\x1b[2J"


class SessionRefused(Exception):
    """An attach that may not have the session: its message is one line for the user."""


def take_over_reason(name: str) -> str:
    """What the connection a take-over displaced is told."""
    return "session {!r} was taken over by another connection".format(name)


class OutputRing:
    """The last ``size`` bytes a terminal printed; older bytes are dropped as new ones come."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self.size = size
        self._data = bytearray()
        self._mid_line = False  # whether what was dropped ended within a line

    def append(self, data: bytes) -> None:
        self._data += data
        excess = len(self._data) - self.size
        if excess > 0:
            self._mid_line = self._data[excess - 1] != 0x0A
            del self._data[:excess]

    def contents(self) -> bytes:
        """What is kept, from its first whole line when the start was cut off."""
        data = bytes(self._data)
        if self._mid_line:
            start = data.find(b"\n")
            data = data[start + 1:] if start >= 0 else b""
        return data


def repaint(ring: OutputRing) -> bytes:
    """The bytes that repaint a terminal for a connection that attaches: clear, then replay."""
    return CLEAR_SCREEN + ring.contents()


class Session:
    """One named session: its shell (``pid``, a session and process group leader) on the
    terminal whose master side is ``master``, and its bookkeeping."""

    def __init__(self, name: str, *, user: str, uid: int, pid: int, master: int, cols: int,
                 rows: int, timeout: float, now: Optional[float] = None) -> None:
        self.name = name
        self.user = user
        self.uid = uid
        self.pid = pid
        self.master = master
        self.cols = cols
        self.rows = rows
        self.timeout = timeout
        self.created = time.time() if now is None else now
        self.last_io = self.created
        self.attached = False
        self.detached_since = None  # type: Optional[float]
        self.ring = OutputRing()
        self.hung_up_at = None  # type: Optional[float]
        self.gone = False  # the terminal read end of file: nothing more will come
        os.set_blocking(master, False)

    # ---- the terminal
    def read_master(self) -> Optional[bytes]:
        """Read what the terminal has: the bytes (also kept in the ring), None when there is
        nothing now, b"" when the terminal is gone (every process on it has closed it)."""
        try:
            data = os.read(self.master, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.gone = True
        else:
            self.ring.append(data)
            self.last_io = time.time()
        return data

    def read_interest(self) -> int:
        """The selector events to wait for on the master while detached."""
        return 0 if self.gone else selectors.EVENT_READ

    def write_input(self, data: bytes) -> int:
        """Write ``data`` to the terminal as typed; return how much it took (0: full)."""
        try:
            written = os.write(self.master, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return len(data)  # nobody reads the terminal any more: the input goes nowhere
        self.last_io = time.time()
        return written

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        """Set the terminal's size, and have its foreground program repaint: the kernel sends
        ``SIGWINCH`` only on a change, so it is sent here too."""
        self.cols, self.rows = cols, rows
        sizes = [max(0, min(v, 0xFFFF)) for v in (rows, cols, pixel_width, pixel_height)]
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", *sizes))
        with contextlib.suppress(OSError):
            foreground = os.tcgetpgrp(self.master)
            if foreground > 0:  # 0: nobody has the terminal as theirs
                os.killpg(foreground, signal.SIGWINCH)

    def send_break(self) -> None:
        with contextlib.suppress(OSError):
            termios.tcsendbreak(self.master, 0)

    def signal(self, signum: int) -> None:
        """``signum`` to the shell's process group, as ``signal`` does for any process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    # ---- connections
    def attach(self, cols: int, rows: int, pixel_width: int = 0,
               pixel_height: int = 0) -> bytes:
        """A connection attaches: resize to its window and return the repaint to send it
        before any live output."""
        self.attached = True
        self.detached_since = None
        data = repaint(self.ring)
        self.resize(cols, rows, pixel_width, pixel_height)
        return data

    def detach(self, now: Optional[float] = None) -> None:
        """The connection went: the shell goes on, its output kept in the ring."""
        if self.attached:
            self.attached = False
            self.detached_since = time.time() if now is None else now

    def is_expired(self, now: float) -> bool:
        """Whether it was detached for longer than its timeout (0: never expires)."""
        return (self.timeout > 0 and not self.attached and self.detached_since is not None
                and now - self.detached_since > self.timeout)

    def hang_up(self, now: Optional[float] = None) -> None:
        """End the shell as a terminal hang-up would: SIGHUP and SIGCONT to its group (the
        shell passes SIGHUP on to its jobs); :meth:`kill` follows after ``HANGUP_GRACE_S``."""
        self.hung_up_at = time.time() if now is None else now
        for signum in (signal.SIGHUP, signal.SIGCONT):
            self.signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        """Close the master; what still runs on the terminal then reads end of file."""
        if self.master >= 0:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = -1

    def info(self, now: Optional[float] = None) -> Dict[str, Any]:
        """The session as ``msb-proxy sessions`` lists it (see ``SessionInfo``)."""
        now = time.time() if now is None else now
        return {
            "name": self.name, "user": self.user, "created": self.created,
            "idle": max(0.0, now - self.last_io), "cols": self.cols, "rows": self.rows,
            "attached": self.attached,
            "detached_for": 0.0 if self.detached_since is None
            else max(0.0, now - self.detached_since),
        }


class SessionTable:
    """The named sessions of one sandbox, by name."""

    def __init__(self) -> None:
        self.by_name = {}  # type: Dict[str, Session]

    def add(self, session: Session) -> None:
        self.by_name[session.name] = session

    def remove(self, session: Session) -> None:
        if self.by_name.get(session.name) is session:
            del self.by_name[session.name]

    def claim(self, name: str, uid: int) -> Tuple[Optional[Session], bool]:
        """The session ``name`` for an attach by ``uid``, or None when there is none (start
        one), and whether a connection attached to it is displaced (take-over). Raises
        :class:`SessionRefused` when it is another user's."""
        session = self.by_name.get(name)
        if session is None:
            return None, False
        if session.uid != uid:
            raise SessionRefused("session {!r} belongs to another user ({}); pick another "
                                 "name".format(name, session.user))
        return session, session.attached

    def expired(self, now: float) -> List[Session]:
        """Sessions detached longer than their timeout, taken out of the table (hang them up)."""
        gone = [session for session in self.by_name.values() if session.is_expired(now)]
        for session in gone:
            self.remove(session)
        return gone

    def next_expiry(self) -> Optional[float]:
        """When the next detached session expires (time.time()), or None."""
        times = [session.detached_since + session.timeout for session in self.by_name.values()
                 if session.timeout > 0 and session.detached_since is not None]
        return min(times) if times else None

    def infos(self, now: Optional[float] = None) -> List[Dict[str, Any]]:
        return [self.by_name[name].info(now) for name in sorted(self.by_name)]


class PipeRelay:
    """The terminal of ``session`` relayed to a caller through two pipes it owns (made
    non-blocking): ``input_fd``, the read end of what the caller types, and ``output_fd``, the
    write end of what it is shown, where ``first`` (the repaint) goes ahead of live output.
    (Pipes, not one socket: asyncio's pipe transports, which the proxy reads and writes them
    with, take a readable socket for a closed one.)"""

    def __init__(self, session: Session, input_fd: int, output_fd: int,
                 first: bytes = b"") -> None:
        self.session = session
        self.input_fd = input_fd
        self.output_fd = output_fd
        for fd in (input_fd, output_fd):
            os.set_blocking(fd, False)
        self._to_client = bytearray(first)
        self._to_terminal = bytearray()

    def interest(self) -> Dict[int, int]:
        """The events to wait for, by fd: the master is read only while the caller took all
        that was read before, the caller's input only while the terminal took all before."""
        master = self.session.master
        wanted = {self.input_fd: 0, self.output_fd: 0, master: 0}
        if self._to_client:
            wanted[self.output_fd] |= selectors.EVENT_WRITE
        else:
            wanted[master] |= self.session.read_interest()
        if self._to_terminal:
            wanted[master] |= selectors.EVENT_WRITE
        else:
            wanted[self.input_fd] |= selectors.EVENT_READ
        return wanted

    def on_ready(self, fd: int, events: int) -> bool:
        """Move what ``events`` on ``fd`` allow; False when the caller is gone."""
        if fd == self.session.master:
            if events & selectors.EVENT_READ:
                data = self.session.read_master()
                if data:
                    self._to_client += data
            if events & selectors.EVENT_WRITE:
                self._write_terminal()
        elif fd == self.input_fd and events & selectors.EVENT_READ:
            try:
                data = os.read(self.input_fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            self._to_terminal += data
            self._write_terminal()
        return self._flush()

    def _write_terminal(self) -> None:
        if self._to_terminal:
            del self._to_terminal[:self.session.write_input(bytes(self._to_terminal))]

    def _flush(self) -> bool:
        if not self._to_client:
            return True
        try:
            sent = os.write(self.output_fd, self._to_client)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del self._to_client[:sent]
        return True

    def drain_terminal(self) -> bool:
        """The shell ended: queue what is left on the terminal and send what the caller takes
        now. Whether some is still queued (wait for :meth:`on_ready`, or give up: close)."""
        while True:
            data = self.session.read_master()
            if not data:
                break
            self._to_client += data
        return self._flush() and bool(self._to_client)

    def close(self) -> None:
        self._to_client.clear()
        for fd in (self.input_fd, self.output_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.input_fd = self.output_fd = -1
