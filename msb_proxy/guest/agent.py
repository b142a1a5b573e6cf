"""The guest agent: every process of one SSH connection, forked inside the guest, on one stream.

A backend whose runtime can only run commands in the guest (microsandbox's ``exec_stream``)
starts one agent per SSH connection, as root, with ``python3 -c`` of this file, and hands it
every process of that connection instead of asking the runtime for each. The agent forks them
itself, as sshd would: the login user's uid, gid and groups, their own session, a terminal
from ``openpty`` with the ``pty-req`` size and modes (``SSH_TTY`` set, the terminal made
controlling) or pipes, ``argv[0]`` as given (``-bash``), exactly the environment given, and
sshd's fallback to ``/`` when the working directory is missing. It reports real wait statuses
(a death by signal as that signal, with the core flag), delivers signals, window changes and
breaks, and multiplexes every process's stdin, stdout and stderr over its own stdin/stdout:

    frame   = >I length of the rest, >I process id, B op, payload

    proxy -> agent                       agent -> proxy
    SPAWN      json request              HELLO      json {"version", "python"}  (id 0, first)
    STDIN      bytes                     STARTED    >I pid
    EOF        (close stdin)             FAILED     text: why it could not start
    CREDIT     >I n (output taken)       STDOUT     bytes
    SIGNAL     >I signum                 STDERR     bytes
    RESIZE     >HHHH cols rows px py     STDIN_CREDIT >I n (stdin written)
    BREAK      >I milliseconds           EXIT       >i raw wait status (after all output)
    CLOSE_OUTPUT (the client reads no more: our ends close, its next write gets SIGPIPE)
    HANGUP     (SIGHUP and SIGCONT to its group, every descriptor closed; nothing more said;
               a terminal's group by the kernel, as its master closes)
    ATTACH     json {"name", "timeout",      DETACHED   text: why (taken over; nothing more)
               "user", "run_dir", "spawn"}   ANSWER     json, to SESSIONS or KILL_SESSION
    SESSIONS   json {"run_dir"}
    KILL_SESSION json {"run_dir", "name"}

Flow control is by credit both ways, ``WINDOW`` to begin with: the agent reads a process's
output only as far as the proxy has granted CREDIT, and the proxy sends a process's STDIN only
as far as the agent has granted STDIN_CREDIT, which it does as the process takes it. So a slow
client stops the guest process, a process that never reads its stdin holds at most ``WINDOW``
here, and the agent itself always reads its own stdin at once: nothing between the proxy and
the agent (the runtime's exec channel) ever waits on one process.

When the proxy closes the agent's stdin (the SSH connection ended), or a hang-up signal reaches
it, every process still running is hung up as a terminal hang-up would (``nohup`` work
survives) and the agent exits.

Named sessions (ATTACH) outlive the agent: their shells belong to the sandbox's *session
keeper* (:class:`Keeper`), a daemon this code becomes in a grandchild of the first agent that
needs one. It leaves the agent's session and process group, which is all the runtime's agent
ever signals of an exec (microsandbox ``crates/agentd/lib/session.rs``: ``send_signal``;
``process.rs``: ``fail``, the teardown), and is reaped by the guest's init, the runtime's
agent, whose reaper takes every child (``process.rs``). It listens on ``RUN_DIR/sessions.sock``
(``RUN_DIR`` 0700, root's), holds each session's shell on a terminal of its own and keeps
reading it into a ring while nobody is attached (``msb_proxy/guest/sessions.py``, whose source
the host puts ahead of this one), and speaks these same frames with the agent of whichever
connection is attached; that agent relays them, its own process id for the keeper's 1, so
flow control runs end to end. HANGUP of an attached shell detaches it; its shell goes on. The
keeper hangs up a session detached longer than its timeout, and exits once it has no session
and no connection.

Standard library only, nothing of msb-proxy's; runs on Python 3.6 and newer.
"""

import contextlib
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

# In the guest this import fails: guest_agent.SOURCE has sessions.py's source ahead of ours.
with contextlib.suppress(ImportError):
    from msb_proxy.guest.sessions import (
        HANGUP_GRACE_S,
        Session,
        SessionRefused,
        SessionTable,
        take_over_reason,
    )

__all__ = [
    "ANSWER", "ATTACH", "BREAK", "CLOSE_OUTPUT", "CREDIT", "DETACHED", "EOF", "EXIT", "FAILED",
    "HANGUP", "HEADER", "HELLO", "KILL_SESSION", "RESIZE", "SESSIONS", "SIGNAL", "SPAWN",
    "STARTED", "STDERR", "STDIN", "STDIN_CREDIT", "STDOUT", "VERSION", "WINDOW", "Keeper",
    "apply_modes", "frame", "serve", "set_window_size",
]

VERSION = 2
HEADER = struct.Struct(">IIB")
WINDOW = 256 * 1024
READ_SIZE = 64 * 1024
PTY_DRAIN_S = 0.2

SPAWN, STDIN, EOF, CREDIT, SIGNAL, RESIZE, BREAK, CLOSE_OUTPUT, HANGUP = range(1, 10)
ATTACH, SESSIONS, KILL_SESSION = range(10, 13)
HELLO, STARTED, FAILED, STDOUT, STDERR, STDIN_CREDIT, EXIT = range(20, 27)
DETACHED, ANSWER = range(27, 29)
KEEPER_SOCKET = "sessions.sock"
KEEPER_LOCK = "sessions.lock"
KEEPER_START_S = 10.0  # for a keeper just forked to listen
KEEPER_IDLE_S = 5.0  # a keeper with no session and no connection exits after this
KEEPER_IDENT = 1  # the id of the one process of a connection to the keeper

# SSH terminal modes (RFC 4254 section 8, RFC 8160): opcode -> control character index name
_CC = {
    1: "VINTR", 2: "VQUIT", 3: "VERASE", 4: "VKILL", 5: "VEOF", 6: "VEOL", 7: "VEOL2",
    8: "VSTART", 9: "VSTOP", 10: "VSUSP", 11: "VDSUSP", 12: "VREPRINT", 13: "VWERASE",
    14: "VLNEXT", 15: "VFLUSH", 16: "VSWTC", 17: "VSTATUS", 18: "VDISCARD",
}
# opcode -> (index of the flag word in the tcgetattr list, flag name)
_IFLAG, _OFLAG, _CFLAG, _LFLAG = 0, 1, 2, 3
_FLAGS = {
    30: (_IFLAG, "IGNPAR"), 31: (_IFLAG, "PARMRK"), 32: (_IFLAG, "INPCK"), 33: (_IFLAG, "ISTRIP"),
    34: (_IFLAG, "INLCR"), 35: (_IFLAG, "IGNCR"), 36: (_IFLAG, "ICRNL"), 37: (_IFLAG, "IUCLC"),
    38: (_IFLAG, "IXON"), 39: (_IFLAG, "IXANY"), 40: (_IFLAG, "IXOFF"), 41: (_IFLAG, "IMAXBEL"),
    42: (_IFLAG, "IUTF8"),
    50: (_LFLAG, "ISIG"), 51: (_LFLAG, "ICANON"), 52: (_LFLAG, "XCASE"), 53: (_LFLAG, "ECHO"),
    54: (_LFLAG, "ECHOE"), 55: (_LFLAG, "ECHOK"), 56: (_LFLAG, "ECHONL"), 57: (_LFLAG, "NOFLSH"),
    58: (_LFLAG, "TOSTOP"), 59: (_LFLAG, "IEXTEN"), 60: (_LFLAG, "ECHOCTL"),
    61: (_LFLAG, "ECHOKE"), 62: (_LFLAG, "PENDIN"),
    70: (_OFLAG, "OPOST"), 71: (_OFLAG, "OLCUC"), 72: (_OFLAG, "ONLCR"), 73: (_OFLAG, "OCRNL"),
    74: (_OFLAG, "ONOCR"), 75: (_OFLAG, "ONLRET"),
    92: (_CFLAG, "PARENB"), 93: (_CFLAG, "PARODD"),
}
# Flags Python's termios does not name on every version (IUTF8 came in 3.13), as Linux has them.
_LINUX_FLAGS = {"IUTF8": 0o040000}
_CS7, _CS8, _ISPEED, _OSPEED = 90, 91, 128, 129
_DISABLED = 255  # OpenSSH sends 255 for a disabled control character


def frame(ident: int, op: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(5 + len(payload), ident, op) + payload


def apply_modes(fd: int, modes: Mapping[int, int]) -> None:
    """Set the terminal on ``fd`` to the SSH ``modes``; unknown opcodes are ignored."""
    attrs = termios.tcgetattr(fd)
    cc = attrs[6]
    for opcode, value in modes.items():
        if opcode in _CC:
            index = getattr(termios, _CC[opcode], None)
            if index is not None:
                char = 0 if value == _DISABLED else value & 0xFF
                cc[index] = bytes([char]) if isinstance(cc[index], bytes) else char
        elif opcode in _FLAGS:
            word, name = _FLAGS[opcode]
            flag = getattr(termios, name, None)
            if flag is None and sys.platform.startswith("linux"):
                flag = _LINUX_FLAGS.get(name)
            if flag is not None:
                attrs[word] = attrs[word] | flag if value else attrs[word] & ~flag
        elif opcode in (_CS7, _CS8) and value:
            attrs[_CFLAG] = (attrs[_CFLAG] & ~termios.CSIZE) | (
                termios.CS7 if opcode == _CS7 else termios.CS8
            )
        elif opcode in (_ISPEED, _OSPEED):
            speed = getattr(termios, "B{}".format(value), None)
            if speed is not None:
                attrs[4 if opcode == _ISPEED else 5] = speed
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def set_window_size(fd: int, cols: int, rows: int, pixel_width: int, pixel_height: int) -> None:
    """Set the terminal size on ``fd``; the kernel sends SIGWINCH to its foreground group."""
    clamp = [max(0, min(v, 0xFFFF)) for v in (rows, cols, pixel_width, pixel_height)]
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", *clamp))


def _group_id(name: str, default: int) -> int:
    try:
        with open("/etc/group", encoding="utf-8", errors="surrogateescape") as table:
            for line in table:
                fields = line.rstrip("\n").split(":")
                if fields[0] == name and len(fields) > 2 and fields[2].isdigit():
                    return int(fields[2])
    except OSError:
        pass
    return default


class Process:
    """One process the agent forked, and the state of its three streams."""

    def __init__(self, ident: int, pid: int, pty: bool, stdin_fd: int,
                 outputs: Dict[int, bool]) -> None:
        self.ident = ident
        self.pid = pid
        self.pty = pty
        self.stdin_fd = stdin_fd  # the pipe's write end, or the terminal's master; -1: closed
        self.outputs = outputs  # open output descriptor -> whether it is stderr
        self.incoming = bytearray()  # stdin from the proxy, not yet written
        self.eof_pending = False  # close stdin once incoming is written
        self.credit = WINDOW  # output we may still send
        self.status: Optional[int] = None
        self.drain_deadline: Optional[float] = None


class Agent:
    """Every process of one SSH connection, and the loop that serves them."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.selector = selectors.DefaultSelector()
        self.processes: Dict[int, Process] = {}
        self.by_pid: Dict[int, Process] = {}
        self.inbox = bytearray()
        self.tty_gid = _group_id("tty", 5)
        self.uid = os.geteuid()
        self.attached = {}  # type: Dict[int, socket.socket]  # named sessions, to the keeper
        self.keeper_inbox = {}  # type: Dict[int, bytearray]

    # ---- to the proxy
    def send(self, ident: int, op: int, payload: bytes = b"") -> None:
        """Blocking: the runtime drains our stdout into its own queue whatever we send, so a
        write waits only for the moment it takes."""
        view = memoryview(frame(ident, op, payload))
        while view:
            try:
                view = view[os.write(self.write_fd, view):]
            except InterruptedError:
                continue

    # ---- the loop
    def run(self, wakeup: int) -> None:
        """Serve until the proxy closes our input or a hang-up signal arrives."""
        self.selector.register(self.read_fd, selectors.EVENT_READ, "proxy")
        self.selector.register(wakeup, selectors.EVENT_READ, "signal")
        self.send(0, HELLO, json.dumps({"version": VERSION, "python": sys.version.split()[0]})
                  .encode())
        while True:
            timeout = self.next_deadline()
            for key, events in self.selector.select(timeout):
                if key.data == "proxy":
                    if not self.from_proxy():
                        return
                elif key.data == "signal":
                    if self.on_signal(wakeup):
                        return
                elif isinstance(key.data, tuple):
                    # Not if it was let go earlier in this turn (its EXIT came, say).
                    if self.attached.get(key.data[1]) is key.fileobj:
                        self.from_keeper(key.data[1])
                else:
                    self.on_ready(key.data, key.fd, events)
            self.drain_due()

    def next_deadline(self) -> Optional[float]:
        deadlines = [p.drain_deadline for p in self.processes.values()
                     if p.drain_deadline is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def from_proxy(self) -> bool:
        try:
            chunk = os.read(self.read_fd, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return True
        if not chunk:
            return False
        self.inbox += chunk
        while True:
            taken = take_frame(self.inbox)
            if taken is None:
                return True
            self.request(*taken)

    def request(self, ident: int, op: int, payload: bytes) -> None:
        if op == SPAWN:
            self.spawn(ident, json.loads(payload.decode("utf-8", "surrogateescape")))
            return
        if op == ATTACH:
            self.attach(ident, json.loads(payload.decode("utf-8", "surrogateescape")))
            return
        if op in (SESSIONS, KILL_SESSION):
            self.ask_keeper(ident, op, json.loads(payload.decode("utf-8", "surrogateescape")))
            return
        if ident in self.attached:
            self.to_keeper(ident, op, payload)
            return
        process = self.processes.get(ident)
        if process is None:
            if op == STDIN:  # for a process that is gone: taken, so the proxy's credit holds
                self.send(ident, STDIN_CREDIT, struct.pack(">I", len(payload)))
            return
        if op == STDIN:
            if process.stdin_fd < 0:
                self.send(ident, STDIN_CREDIT, struct.pack(">I", len(payload)))
            else:
                process.incoming += payload
        elif op == EOF:
            process.eof_pending = True
        elif op == CREDIT:
            process.credit += struct.unpack(">I", payload)[0]
        elif op == SIGNAL:
            self.signal(process, struct.unpack(">I", payload)[0])
        elif op == RESIZE:
            cols, rows, px, py = struct.unpack(">HHHH", payload)
            if process.pty and process.stdin_fd >= 0:
                with contextlib.suppress(OSError):
                    set_window_size(process.stdin_fd, cols, rows, px, py)
        elif op == BREAK:
            if process.pty and process.stdin_fd >= 0:
                with contextlib.suppress(OSError):
                    termios.tcsendbreak(process.stdin_fd, 0)
        elif op == CLOSE_OUTPUT:
            for fd in list(process.outputs):
                self.close_output(process, fd)
        elif op == HANGUP:
            self.hang_up(process)
            return
        self.watch(process)
        self.maybe_report(process)

    def on_signal(self, wakeup: int) -> bool:
        """Reap what exited; True when a hang-up or termination signal came."""
        try:
            signals = os.read(wakeup, 4096)
        except (BlockingIOError, InterruptedError):
            signals = b""
        self.reap()
        return any(signum in (signal.SIGHUP, signal.SIGTERM) for signum in signals)

    def reap(self) -> None:
        for pid, status in reaped():
            process = self.by_pid.pop(pid, None)
            if process is None or process.ident not in self.processes:
                continue
            process.status = status
            if process.pty and process.outputs:
                # Output it wrote may still sit in the terminal: read it, then close the
                # terminal as it does when its session leader exits (background jobs: SIGHUP).
                process.drain_deadline = time.monotonic() + PTY_DRAIN_S
            self.maybe_report(process)

    def drain_due(self) -> None:
        now = time.monotonic()
        for process in list(self.processes.values()):
            if process.drain_deadline is not None and process.drain_deadline <= now:
                process.drain_deadline = None
                for fd in list(process.outputs):
                    self.read_all(process, fd)
                    self.close_output(process, fd)
                self.maybe_report(process)

    def maybe_report(self, process: Process) -> None:
        if process.status is None or process.outputs:
            return
        self.send(process.ident, EXIT, struct.pack(">i", process.status))
        self.forget(process)

    # ---- streams
    def watch(self, process: Process) -> None:
        """Register each of the process's descriptors for what it waits for now (a terminal's
        master is its stdin and its output both)."""
        wanted: Dict[int, int] = {}
        if process.stdin_fd >= 0:
            want = process.incoming or (process.eof_pending and not process.pty)
            wanted[process.stdin_fd] = selectors.EVENT_WRITE if want else 0
        for fd in process.outputs:
            wanted[fd] = wanted.get(fd, 0) | (selectors.EVENT_READ if process.credit > 0 else 0)
        for fd, events in wanted.items():
            self.register(fd, events, process)

    def on_ready(self, process: Process, fd: int, events: int) -> None:
        if events & selectors.EVENT_WRITE and fd == process.stdin_fd:
            self.on_stdin(process)
        if events & selectors.EVENT_READ and fd in process.outputs \
                and process.ident in self.processes:
            self.on_output(process, fd)

    def register(self, fd: int, events: int, data: Any) -> None:
        set_interest(self.selector, fd, events, data)

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fd)

    def on_stdin(self, process: Process) -> None:
        if process.incoming:
            try:
                written = os.write(process.stdin_fd, process.incoming)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # It closed its stdin: what it was sent is dropped, as after its exit.
                written = len(process.incoming)
                self.close_stdin(process)
            del process.incoming[:written]
            self.send(process.ident, STDIN_CREDIT, struct.pack(">I", written))
        if not process.incoming and process.eof_pending and not process.pty:
            self.close_stdin(process)
        self.watch(process)

    def close_stdin(self, process: Process) -> None:
        if process.stdin_fd < 0 or process.pty:
            return
        self.unregister(process.stdin_fd)
        os.close(process.stdin_fd)
        process.stdin_fd = -1
        if process.incoming:
            self.send(process.ident, STDIN_CREDIT, struct.pack(">I", len(process.incoming)))
            del process.incoming[:]

    def on_output(self, process: Process, fd: int) -> None:
        try:
            data = os.read(fd, min(READ_SIZE, process.credit))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: every holder of the terminal has closed it
            data = b""
        if not data:
            self.close_output(process, fd)
            self.maybe_report(process)
            return
        process.credit -= len(data)
        self.send(process.ident, STDERR if process.outputs[fd] else STDOUT, data)
        self.watch(process)

    def read_all(self, process: Process, fd: int) -> None:
        """What the terminal still holds, whatever the credit: at most its small buffer."""
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:
                return
            if not data:
                return
            process.credit -= len(data)
            self.send(process.ident, STDOUT, data)

    def close_output(self, process: Process, fd: int) -> None:
        self.unregister(fd)
        del process.outputs[fd]
        if process.pty and fd == process.stdin_fd:
            process.stdin_fd = -1  # one descriptor: the terminal's master
        os.close(fd)

    # ---- processes
    def signal(self, process: Process, signum: int) -> None:
        """Signal the process group (sshd's killpg), else the process."""
        for target in (-process.pid, process.pid):
            try:
                os.kill(target, signum)
                return
            except (ProcessLookupError, PermissionError, OSError):
                continue

    def hang_up(self, process: Process) -> None:
        """The proxy is done with it: hang up its group, close everything, tell nothing more.

        A terminal process is hung up by closing its master alone, as sshd does: the kernel
        then sends the session SIGHUP and SIGCONT. Signals of ours beside that race bash's
        hang-up, which can then leave its background jobs running (see the local jail)."""
        if process.status is None and not process.pty:
            for signum in (signal.SIGHUP, signal.SIGCONT):
                self.signal(process, signum)
        self.forget(process)

    def forget(self, process: Process) -> None:
        self.processes.pop(process.ident, None)
        for fd in list(process.outputs):
            self.close_output(process, fd)
        if process.stdin_fd >= 0:
            self.unregister(process.stdin_fd)
            os.close(process.stdin_fd)
            process.stdin_fd = -1

    def spawn(self, ident: int, request: Dict[str, Any]) -> None:
        try:
            self.fork(ident, request)
        except OSError as exc:  # no terminal, descriptor or process to be had
            self.send(ident, FAILED, str(exc.strerror or exc).encode("utf-8", "surrogateescape"))

    def fork(self, ident: int, request: Dict[str, Any]) -> None:
        pid, ours, failure = fork_process(request, self.uid, self.tty_gid)
        if failure:
            self.send(ident, FAILED, failure)
            return
        if request.get("pty") is not None:
            process = Process(ident, pid, True, ours[0], {ours[0]: False})
        else:
            process = Process(ident, pid, False, ours[0], {ours[1]: False, ours[2]: True})
        self.processes[ident] = process
        self.by_pid[pid] = process
        self.send(ident, STARTED, struct.pack(">I", pid))
        self.watch(process)
        self.reap()  # it may have exited already; its SIGCHLD came before we knew it

    # ---- named sessions: relayed to the keeper
    def attach(self, ident: int, request: Dict[str, Any]) -> None:
        """Hand the named session request to the keeper (started if none runs) and relay."""
        try:
            sock = keeper_socket(str(request["run_dir"]), start=True)
            assert sock is not None
            sock.sendall(frame(KEEPER_IDENT, ATTACH, json.dumps(request).encode()))
        except OSError as exc:
            self.send(ident, FAILED, "the session keeper cannot be reached: {}".format(
                exc.strerror or exc).encode("utf-8", "surrogateescape"))
            return
        self.attached[ident] = sock
        self.keeper_inbox[ident] = bytearray()
        self.selector.register(sock, selectors.EVENT_READ, ("keeper", ident))

    def to_keeper(self, ident: int, op: int, payload: bytes) -> None:
        # A failure: the keeper closed its end, most often just after its last frame (the
        # shell's EXIT, a take-over's DETACHED), which is still ours to read; the end of the
        # socket after what it sent says whether there was one (see keeper_lost).
        with contextlib.suppress(OSError):
            self.attached[ident].sendall(frame(KEEPER_IDENT, op, payload))
        if op == HANGUP:  # detached: the keeper tells this connection nothing more
            self.drop_keeper(ident)

    def from_keeper(self, ident: int) -> None:
        chunk = receive(self.attached[ident])
        if chunk is None:
            return
        if not chunk:
            self.keeper_lost(ident)
            return
        inbox = self.keeper_inbox[ident]
        inbox += chunk
        while ident in self.attached:
            taken = take_frame(inbox)
            if taken is None:
                return
            _, op, payload = taken
            self.send(ident, op, payload)
            if op in (EXIT, FAILED, DETACHED):
                self.drop_keeper(ident)

    def keeper_lost(self, ident: int) -> None:
        """The keeper went away under an attached shell: to this connection, it was killed."""
        self.drop_keeper(ident)
        self.send(ident, EXIT, struct.pack(">i", signal.SIGKILL))

    def drop_keeper(self, ident: int) -> None:
        sock = self.attached.pop(ident, None)
        self.keeper_inbox.pop(ident, None)
        if sock is not None:
            self.unregister(sock.fileno())
            sock.close()

    def ask_keeper(self, ident: int, op: int, request: Dict[str, Any]) -> None:
        """SESSIONS or KILL_SESSION, answered by the keeper; by us when none runs."""
        answer = {"sessions": []} if op == SESSIONS else {"killed": False}  # type: Any
        sock = None
        try:
            sock = keeper_socket(str(request["run_dir"]), start=False)
            if sock is not None:
                sock.settimeout(KEEPER_START_S)
                sock.sendall(frame(KEEPER_IDENT, op, json.dumps(request).encode()))
                answer = json.loads(_read_frame(sock)[1].decode())
        except (OSError, ValueError) as exc:
            answer = {"error": "the session keeper did not answer: {}".format(exc)}
        finally:
            if sock is not None:
                sock.close()
        self.send(ident, ANSWER, json.dumps(answer).encode())

    def hang_up_all(self) -> None:
        for process in list(self.processes.values()):
            self.hang_up(process)
        for ident in list(self.attached):  # named sessions: detached, their shells go on
            self.drop_keeper(ident)


def take_frame(inbox: bytearray) -> Optional[Tuple[int, int, bytes]]:
    """The first whole frame of ``inbox`` (id, op, payload), taken off it; None while there
    is none yet."""
    if len(inbox) < 4:
        return None
    (length,) = struct.unpack_from(">I", inbox)
    if len(inbox) < 4 + length:
        return None
    _, ident, op = HEADER.unpack_from(inbox)
    payload = bytes(inbox[HEADER.size:4 + length])
    del inbox[:4 + length]
    return ident, op, payload


def receive(sock: socket.socket) -> Optional[bytes]:
    """What the non-blocking ``sock`` has: None when nothing now, b"" when it is gone."""
    try:
        return sock.recv(READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def set_interest(selector: selectors.BaseSelector, fd: int, events: int, data: Any) -> None:
    """Have ``selector`` wait for ``events`` on ``fd`` (none: not at all)."""
    try:
        key = selector.get_key(fd)  # type: Optional[selectors.SelectorKey]
    except KeyError:
        key = None
    if key is None and events:
        selector.register(fd, events, data)
    elif key is not None and not events:
        selector.unregister(fd)
    elif key is not None and key.events != events:
        selector.modify(fd, events, data)


def reaped() -> Iterator[Tuple[int, int]]:
    """Every child that has exited, reaped: (pid, raw wait status)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        yield pid, status


def fork_process(request: Dict[str, Any], agent_uid: int,
                 tty_gid: int) -> Tuple[int, List[int], bytes]:
    """Fork the process ``request`` asks for: its pid, our ends of its terminal (the master)
    or pipes (stdin, stdout, stderr), and why it could not start (b"" when it did)."""
    pty = request.get("pty")
    env = dict(request.get("env") or {})
    if pty is not None:
        master, slave = os.openpty()
        with contextlib.suppress(OSError, termios.error):
            apply_modes(slave, {int(k): int(v) for k, v in (pty.get("modes") or {}).items()})
        set_window_size(master, pty["cols"], pty["rows"], pty.get("px", 0), pty.get("py", 0))
        if agent_uid == 0:
            try:
                os.fchown(slave, request["uid"], tty_gid)
                os.fchmod(slave, 0o620)
            except OSError:
                pass
        env["SSH_TTY"] = os.ttyname(slave)
        child_stdio = (slave, slave, slave)
        ours = [master]  # type: List[int]
        theirs = [slave]
    else:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child_stdio = (in_r, out_w, err_w)
        ours, theirs = [in_w, out_r, err_r], [in_r, out_w, err_w]
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _become(request, env, child_stdio, report_w, agent_uid)
    os.close(report_w)
    for fd in theirs:
        os.close(fd)
    failure = b""
    while True:
        try:
            chunk = os.read(report_r, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        failure += chunk
    os.close(report_r)
    if failure:
        for fd in ours:
            os.close(fd)
        _wait_for(pid)
        return pid, [], failure
    for fd in ours:
        os.set_blocking(fd, False)
    return pid, ours, b""


def _read_frame(sock: socket.socket) -> Tuple[int, bytes]:
    """One whole frame from the blocking ``sock``: its op and payload."""
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack_from(">I", data)[0]:
        chunk = sock.recv(READ_SIZE)
        if not chunk:
            raise OSError(errno.ECONNRESET, "the session keeper closed the connection")
        data += chunk
    _, _, op = HEADER.unpack_from(data)
    return op, data[HEADER.size:]


def keeper_socket(run_dir: str, start: bool) -> Optional[socket.socket]:
    """A connection to the sandbox's session keeper; when none listens, None, or with
    ``start`` a keeper started (:func:`start_keeper`) and then connected to."""
    path = os.path.join(run_dir, KEEPER_SOCKET)
    deadline = None  # type: Optional[float]
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if not start:
                return None
        if deadline is None:
            start_keeper(run_dir)
            deadline = time.monotonic() + KEEPER_START_S
        elif time.monotonic() > deadline:
            raise OSError(errno.ETIMEDOUT, "no session keeper listens on {}".format(path))
        time.sleep(0.02)


def start_keeper(run_dir: str) -> None:
    """Become the keeper in a grandchild, out of our session, process group and descriptors
    (see the module docstring); a second keeper started at once finds the lock taken and
    exits."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)
    pid = os.fork()
    if pid != 0:
        _wait_for(pid)
        return
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_IGN if signum == signal.SIGPIPE else signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        _close_inherited(-1)
        os.chdir("/")
        Keeper(run_dir).serve()
    finally:
        os._exit(0)


class KeeperClient:
    """One connection to the keeper: an agent's, for one attached shell or one question."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.session = None  # type: Optional[Session]
        self.credit = WINDOW  # shell output we may still send it
        self.incoming = bytearray()  # input for the shell not yet written


class Keeper:
    """The named sessions of a sandbox, and the loop that serves the agents attached to them."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.selector = selectors.DefaultSelector()
        self.table = SessionTable()
        self.clients = {}  # type: Dict[int, KeeperClient]  # by socket fd
        self.attached = {}  # type: Dict[str, KeeperClient]  # by session name
        self.by_pid = {}  # type: Dict[int, Session]  # every shell, ending ones too
        self.ending = {}  # type: Dict[int, Session]  # hung up, killed if still there later
        self.idle_since = time.monotonic()
        self.uid = os.geteuid()
        self.tty_gid = _group_id("tty", 5)

    def serve(self) -> None:
        lock = os.open(os.path.join(self.run_dir, KEEPER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another keeper serves this sandbox
        os.ftruncate(lock, 0)
        os.write(lock, "{}\n".format(os.getpid()).encode())  # who holds it, for a person
        path = os.path.join(self.run_dir, KEEPER_SOCKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, _wake)
        self.selector.register(listener, selectors.EVENT_READ, "listener")
        self.selector.register(wake_r, selectors.EVENT_READ, "signal")
        try:
            while not self.done():
                for key, events in self.selector.select(self.timeout()):
                    if key.data == "listener":
                        self.accept(listener)
                    elif key.data == "signal":
                        with contextlib.suppress(OSError):
                            os.read(wake_r, 4096)
                        self.reap()
                    elif isinstance(key.data, Session):
                        # Not if its shell was reaped earlier in this turn: the master is
                        # closed then, and its number may be another's already.
                        if key.data.master == key.fd:
                            self.on_terminal(key.data, events)
                    elif key.fd in self.clients:
                        self.on_client(self.clients[key.fd])
                self.expire()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)  # before the lock goes: the next keeper binds afresh
            listener.close()

    def done(self) -> bool:
        if self.table.by_name or self.by_pid or self.clients:
            self.idle_since = time.monotonic()
            return False
        return time.monotonic() - self.idle_since > KEEPER_IDLE_S

    def timeout(self) -> float:
        waits = [KEEPER_IDLE_S, 1.0]
        expiry = self.table.next_expiry()
        if expiry is not None:
            waits.append(expiry - time.time() + 0.01)
        return max(0.01, min(waits))

    # ---- connections
    def accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        self.clients[sock.fileno()] = KeeperClient(sock)
        self.selector.register(sock, selectors.EVENT_READ, "client")

    def on_client(self, client: KeeperClient) -> None:
        chunk = receive(client.sock)
        if chunk is None:
            return
        if not chunk:
            self.drop(client)
            return
        client.inbox += chunk
        while client.sock.fileno() in self.clients:
            taken = take_frame(client.inbox)
            if taken is None:
                return
            self.request(client, taken[1], taken[2])

    def send(self, client: KeeperClient, op: int, payload: bytes = b"") -> None:
        """Blocking, as the agent's own: it reads us at once, whatever we send."""
        with contextlib.suppress(OSError):
            client.sock.setblocking(True)
            client.sock.sendall(frame(KEEPER_IDENT, op, payload))
            client.sock.setblocking(False)

    def drop(self, client: KeeperClient) -> None:
        """A connection went (or detached): its session, if any, goes on without it."""
        fd = client.sock.fileno()
        self.clients.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fd)
        client.sock.close()
        session = client.session
        client.session = None
        if session is not None and self.attached.get(session.name) is client:
            del self.attached[session.name]
            session.detach()
            self.watch(session)

    def request(self, client: KeeperClient, op: int, payload: bytes) -> None:
        session = client.session
        if op == ATTACH:
            self.attach(client, json.loads(payload.decode("utf-8", "surrogateescape")))
        elif op == SESSIONS:
            self.send(client, ANSWER, json.dumps({"sessions": self.table.infos()}).encode())
        elif op == KILL_SESSION:
            name = json.loads(payload.decode())["name"]
            found = self.table.by_name.get(name)
            if found is not None:
                self.end(found)
            self.send(client, ANSWER, json.dumps({"killed": found is not None}).encode())
        elif op == HANGUP:
            self.drop(client)
        elif session is None:
            return
        elif op == STDIN:
            client.incoming += payload
            self.write_input(client)
        elif op == CREDIT:
            client.credit += struct.unpack(">I", payload)[0]
        elif op == RESIZE:
            session.resize(*struct.unpack(">HHHH", payload))
        elif op == SIGNAL:
            session.signal(struct.unpack(">I", payload)[0])
        elif op == BREAK:
            session.send_break()
        if session is not None and not session.gone and session.master >= 0:
            self.watch(session)

    def attach(self, client: KeeperClient, request: Dict[str, Any]) -> None:
        spawn = request["spawn"]
        pty = spawn["pty"]
        name = str(request["name"])
        try:
            session, displaced = self.table.claim(name, int(spawn["uid"]))
        except SessionRefused as exc:
            self.send(client, FAILED, str(exc).encode("utf-8", "surrogateescape"))
            return
        repaint = b""
        if session is None:
            pid, ours, failure = fork_process(spawn, self.uid, self.tty_gid)
            if failure:
                self.send(client, FAILED, failure)
                return
            session = Session(name, user=str(request["user"]), uid=int(spawn["uid"]), pid=pid,
                              master=ours[0], cols=pty["cols"], rows=pty["rows"],
                              timeout=float(request["timeout"]))
            self.table.add(session)
            self.by_pid[pid] = session
            session.attached = True
        else:
            if displaced and name in self.attached:
                old = self.attached.pop(name)
                old.session = None
                self.send(old, DETACHED, take_over_reason(name).encode())
                self.drop(old)
            session.timeout = float(request["timeout"])
            repaint = session.attach(pty["cols"], pty["rows"], pty.get("px", 0),
                                     pty.get("py", 0))
        client.session = session
        self.attached[name] = client
        self.send(client, STARTED, struct.pack(">I", session.pid))
        if repaint:
            client.credit -= len(repaint)
            self.send(client, STDOUT, repaint)
        self.watch(session)
        self.reap()  # a shell that exited already

    # ---- terminals
    def watch(self, session: Session) -> None:
        """Read the terminal while its connection has credit, or always while detached;
        write to it while input waits."""
        if session.master < 0:
            return
        client = self.attached.get(session.name)
        events = 0
        if not session.gone and (client is None or client.credit > 0):
            events |= selectors.EVENT_READ
        if client is not None and client.incoming:
            events |= selectors.EVENT_WRITE
        set_interest(self.selector, session.master, events, session)

    def on_terminal(self, session: Session, events: int) -> None:
        client = self.attached.get(session.name)
        if events & selectors.EVENT_WRITE and client is not None:
            self.write_input(client)
        if events & selectors.EVENT_READ:
            data = session.read_master()
            if data and client is not None:
                client.credit -= len(data)
                self.send(client, STDOUT, data)
        self.watch(session)

    def write_input(self, client: KeeperClient) -> None:
        session = client.session
        if session is None or not client.incoming or session.master < 0:
            return
        written = session.write_input(bytes(client.incoming))
        if written:
            del client.incoming[:written]
            self.send(client, STDIN_CREDIT, struct.pack(">I", written))

    # ---- shells
    def reap(self) -> None:
        for pid, status in reaped():
            session = self.by_pid.pop(pid, None)
            self.ending.pop(pid, None)
            if session is not None:
                self.finish(session, status)

    def finish(self, session: Session, status: int) -> None:
        """The shell exited: what it still printed, then its exit, to its connection."""
        self.table.remove(session)
        client = self.attached.pop(session.name, None)
        if client is not None and client.session is not session:
            self.attached[session.name] = client  # a new shell of that name has it
            client = None
        if session.master >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(session.master)
            deadline = time.monotonic() + PTY_DRAIN_S
            while not session.gone and time.monotonic() < deadline:
                data = session.read_master()
                if data is None:
                    break
                if data and client is not None:
                    self.send(client, STDOUT, data)
        session.close()
        if client is not None:
            client.session = None
            self.send(client, EXIT, struct.pack(">i", status))
            self.drop(client)

    def end(self, session: Session) -> None:
        """Hang ``session`` up (killed after ``HANGUP_GRACE_S`` if it is still there)."""
        self.table.remove(session)
        session.hang_up()
        self.ending[session.pid] = session

    def expire(self) -> None:
        now = time.time()
        for session in self.table.expired(now):
            session.hang_up(now)
            self.ending[session.pid] = session
        for session in list(self.ending.values()):
            if session.hung_up_at is not None and now - session.hung_up_at > HANGUP_GRACE_S:
                session.kill()


def _wait_for(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def _become(request: Dict[str, Any], env: Dict[str, str], stdio: Tuple[int, int, int],
            report_w: int, agent_uid: int) -> None:
    """In the forked child: become the requested process. Never returns; whatever fails before
    the program runs is written to ``report_w``."""
    try:
        signal.set_wakeup_fd(-1)
        for signum in range(1, signal.NSIG):
            if signum not in (signal.SIGKILL, signal.SIGSTOP):
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        if request.get("pty") is not None:
            fcntl.ioctl(stdio[0], termios.TIOCSCTTY, 0)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        _close_inherited(report_w)
        uid, gid = int(request["uid"]), int(request["gid"])
        if agent_uid == 0:
            os.setgroups([int(g) for g in request.get("groups") or [gid]])
            os.setgid(gid)
            os.setuid(uid)
        elif uid != agent_uid:
            raise OSError(errno.EPERM, "the agent runs as uid {} and cannot become uid {}"
                          .format(agent_uid, uid))
        os.umask(0o022)
        try:
            os.chdir(request["cwd"])
        except OSError as exc:
            # sshd's words, on the session's stderr (the terminal, with a PTY).
            os.write(2, "Could not chdir to home directory {}: {}\n".format(
                request["cwd"], exc.strerror).encode("utf-8", "surrogateescape"))
            os.chdir("/")
        program, argv = request["program"], request["argv"]
        if "/" in program:
            os.execve(program, argv, env)
        os.execvpe(program, argv, env)
    except BaseException as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            os.write(report_w, reason.encode("utf-8", "surrogateescape"))
        finally:
            os._exit(127)


def _close_inherited(keep: int) -> None:
    """Close every descriptor above stderr but ``keep`` (ours are close-on-exec already; this
    is for any the agent itself inherited)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2 and fd != keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def serve(read_fd: int, write_fd: int) -> None:
    """Serve one connection's processes until the proxy closes our input."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, _wake)
    agent = Agent(read_fd, write_fd)
    try:
        agent.run(wake_r)
    finally:
        agent.hang_up_all()


def _wake(signum: int, frame: Any) -> None:
    """Nothing: the wake-up descriptor tells the loop."""


if __name__ == "__main__":
    serve(sys.stdin.fileno(), sys.stdout.fileno())
