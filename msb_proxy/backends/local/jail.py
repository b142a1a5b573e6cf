"""The local backend's jail init: PID 1 of one sandbox, and the only way into it.

Started by ``backends/local/backend.py`` as ``python -m msb_proxy.backends.local.jail``, it

1. unshares mount, PID, network, IPC, UTS and cgroup namespaces and forks PID 1;
2. mounts an overlay of the read-only base rootfs and the sandbox's own writable layer, with a
   fresh ``/proc`` (its kernel knobs read-only), a read-only ``/sys``, a minimal ``/dev`` with
   its own ``devpts``, and tmpfs ``/run`` and ``/dev/shm``; brings up the sandbox's own loopback;
3. binds ``init.sock`` in the sandbox directory, pivots into the overlay and detaches the host
   root, so nothing of the host remains reachable from inside;
4. serves spawn requests on the socket: it forks each process natively inside the jail (its own
   session, a terminal from the jail's ``devpts`` when asked, the login user's uid/gid/groups, a
   container-grade capability bounding set), passes the pipe or terminal file descriptors back to
   the caller with ``SCM_RIGHTS`` so the data never passes through this process, reports the raw
   wait status when the process exits, and reaps every orphan;
5. keeps named sessions (``msb_proxy/guest/sessions.py``): a shell forked as any terminal
   process, but whose terminal master this init keeps and always reads into a bounded ring, so
   the shell outlives the connection that started it; the terminal's bytes pass through here,
   relayed to the attached caller over a pair of pipes.

A caller that disconnects while its process still runs gets that process group hung up
(SIGHUP, then SIGCONT), as a terminal hang-up would: plain foreground work ends, ``nohup`` work
survives. A terminal process is hung up by its terminal alone, as with sshd: the caller closing
the master makes the kernel send the session SIGHUP and SIGCONT. Signals of our own at that
moment race bash's own hang-up, which then can leave its background jobs running (bash 5.2 at
its prompt, a job in the background: with the signals just before the close 19 jobs in 60 left
running, 13 with both cores busy; just after it 31 and 5; with the close alone none in 160);
they follow only ``PTY_HANGUP_FALLBACK_S`` later, to a shell still there. A named session's
caller that disconnects only detaches; the session is hung up so once it has been detached
longer than its ``timeout`` (more than 0), or when killed.

Protocol: one ``SOCK_SEQPACKET`` connection per request, each message one JSON object.
``{"op": "ping"}``, ``{"op": "user", "name": ...}``, ``{"op": "stop"}`` get one reply;
``{"op": "socket", "family": "inet"|"inet6"}`` gets it with an unconnected TCP socket of the
sandbox's network namespace (the caller connects it: tunnels to a guest address need no guest
process).
``{"op": "spawn", ...}`` gets ``{"ok": true, "pid": N}`` with the descriptors (stdin, stdout,
stderr; or the terminal) and later ``{"exit": WAIT_STATUS}``; meanwhile the caller may send
``{"op": "signal", "sig": N}``.
``{"op": "attach", "session": NAME, "user": LOGIN, "timeout": S, ...}`` (the fields of a spawn
with ``pty``) gets ``{"ok": true, "pid": N, "resumed": BOOL}`` with two pipes, the terminal's
input and its output (the repaint first when resumed), and later ``{"exit": WAIT_STATUS}``, or
``{"detached": REASON}`` when another attach took the session over; meanwhile ``signal``,
``{"op": "resize", "cols", "rows", "px", "py"}`` and ``{"op": "break"}``.
``{"op": "sessions"}`` gets ``{"ok": true, "sessions": [...]}`` (see ``Session.info``),
``{"op": "kill_session", "session": NAME}`` ``{"ok": true, "killed": BOOL}``.

Standard library only, and everything is imported before the pivot: afterwards the host's
Python installation is out of reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import linecache  # noqa: F401  (traceback needs it after the pivot)
import os
import platform
import selectors
import signal
import socket
import stat
import struct
import termios
import time
import traceback
from typing import Any, NoReturn

from msb_proxy.backends.local.terminal import apply_modes, set_window_size
from msb_proxy.guest import files as guest_files
from msb_proxy.guest import tunnels as guest_tunnels
from msb_proxy.guest.sessions import (
    HANGUP_GRACE_S,
    PipeRelay,
    Session,
    SessionRefused,
    SessionTable,
    take_over_reason,
)

# A program (``python -m``), not a library: nothing here is imported by other modules.
__all__: list[str] = []

_libc = ctypes.CDLL(None, use_errno=True)
_SOCKET_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_DUMPABLE, PR_SET_NAME, PR_CAPBSET_DROP = 4, 15, 24
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(platform.machine())

# Capabilities the guest's root keeps: Docker's default set without CAP_MKNOD (there is no device
# cgroup here to make device nodes harmless). Notably absent: SYS_ADMIN (mounts), DAC_READ_SEARCH
# (open_by_handle_at), SYS_PTRACE (this init holds every capability), SYS_MODULE, SYS_RAWIO.
KEEP_CAPS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 29, 31})

MAX_MESSAGE = 4 << 20
HELPERS = {"files": guest_files.serve, "tunnels": guest_tunnels.serve}
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size
PTY_DRAIN_S = 0.2  # how long a named session's last output may take through its terminal
FLUSH_WAIT_S = 2.0  # and how long its caller may take to read it
PTY_HANGUP_FALLBACK_S = 5.0  # a terminal process whose caller left, its master's hang-up past


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


# ---------------------------------------------------------------------------------------------
# Building the jail


def build(name: str, rootfs: str, sandbox_dir: str, volumes: list[str]) -> None:
    """Mount the sandbox's root under ``sandbox_dir`` (we are PID 1 here)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.chdir(sandbox_dir)
    root_mode = stat.S_IMODE(os.stat(rootfs).st_mode)
    for part in ("lower", "upper", "work", "root"):
        os.makedirs(part, mode=0o700, exist_ok=True)
    os.chmod("upper", root_mode)  # the upper dir's mode becomes the mode of the guest's "/"
    _mount(rootfs, "lower", None, MS_BIND | MS_REC)
    _mount(None, "lower", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    # Relative paths: sandbox directories may hold characters that mount options reserve.
    _mount("overlay", "root", "overlay", 0, "lowerdir=lower,upperdir=upper,workdir=work")
    os.chdir("root")
    for volume in volumes:
        _bind_volume(volume)

    for directory in ("proc", "sys", "dev", "run", "tmp"):
        os.makedirs(directory, exist_ok=True)
    _mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", "sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _build_dev()
    _mount("tmpfs", "run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    if stat.S_IMODE(os.stat("tmp").st_mode) != 0o1777:
        os.chmod("tmp", 0o1777)
    _protect_proc()

    socket.sethostname(_hostname(name))
    _loopback_up()


def _bind_volume(volume: str) -> None:
    """Bind host directory (or file) ``HOST:GUEST[:ro]`` into the guest tree (cwd is its root).

    Nothing runs in the guest yet, so checking that no part of GUEST is a symlink (which could
    point the mount out of the guest tree, onto the host) cannot be raced.
    """
    host, guest, *mode = volume.split(":")
    parts = [part for part in guest.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EINVAL, f"volume {volume}: '..' in the guest path")
    target = "."
    for part in parts:
        target = os.path.join(target, part)
        if os.path.islink(target):
            raise OSError(errno.EINVAL, f"volume {volume}: {guest} passes through a symlink")
        if not os.path.exists(target):
            if os.path.isdir(host) or part != parts[-1]:
                os.mkdir(target, 0o755)
            else:
                open(target, "a").close()
    _mount(host, target, None, MS_BIND | MS_REC)
    if mode == ["ro"]:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _build_dev() -> None:
    _mount("tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
    for node, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
        os.mknod(f"dev/{node}", stat.S_IFCHR | 0o666, os.makedev(1, minor))
        os.chmod(f"dev/{node}", 0o666)
    os.mknod("dev/tty", stat.S_IFCHR | 0o666, os.makedev(5, 0))
    os.chmod("dev/tty", 0o666)
    os.mkdir("dev/pts")
    os.mkdir("dev/shm")
    tty_gid = _group_id("tty", 5, "etc/group")  # not yet pivoted: the guest's root is "."
    _mount("devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
           f"newinstance,ptmxmode=0666,mode=0620,gid={tty_gid}")
    _mount("tmpfs", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    links = (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))
    for link, target in links:
        os.symlink(target, f"dev/{link}")


def _protect_proc() -> None:
    """Make the kernel's global knobs read-only and hide what leaks host state (as runc does)."""
    for path in ("proc/sys", "proc/sysrq-trigger", "proc/irq", "proc/bus", "proc/fs"):
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in ("proc/kcore", "proc/keys", "proc/timer_list", "proc/sched_debug"):
        if os.path.isfile(path):
            _mount("dev/null", path, None, MS_BIND)


def _hostname(name: str) -> str:
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in ".-") else "-" for ch in name)
    return cleaned.strip(".-")[:63] or "sandbox"


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def pivot() -> None:
    """Make the current directory the root and detach the host's root beneath it."""
    if SYS_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unsupported machine {platform.machine()}")
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


# ---------------------------------------------------------------------------------------------
# Guest accounts


def _default_signals() -> None:
    """Every signal back to its default action and unblocked, as a login gets it from sshd.

    Ignored signals survive exec, so without this a guest process would inherit whatever the
    first msb-proxy of the sandbox happened to ignore (a shell's background job ignores
    SIGINT and SIGQUIT; nohup, SIGHUP), and Ctrl-C would do nothing in the sandbox for good.
    """
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _read_table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return [line.rstrip("\n").split(":") for line in handle if ":" in line]
    except FileNotFoundError:
        return []


def _hang_up_group(pid: int) -> None:
    """SIGHUP, then SIGCONT, to process group ``pid``: as a terminal's hang-up, a stopped job
    woken to see it."""
    for signum in (signal.SIGHUP, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)


def _group_id(name: str, default: int, table: str = "/etc/group") -> int:
    for fields in _read_table(table):
        if fields[0] == name and len(fields) > 2 and fields[2].isdigit():
            return int(fields[2])
    return default


def lookup_user(name: str) -> dict[str, Any] | None:
    for fields in _read_table("/etc/passwd"):
        if len(fields) >= 7 and fields[0] == name and fields[2].isdigit() and fields[3].isdigit():
            gid = int(fields[3])
            groups = {gid}
            for group in _read_table("/etc/group"):
                if len(group) >= 4 and group[2].isdigit() and name in group[3].split(","):
                    groups.add(int(group[2]))
            return {
                "name": name, "uid": int(fields[2]), "gid": gid, "home": fields[5],
                "shell": fields[6], "groups": sorted(groups),
            }
    return None


def _executable(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and bool(mode & 0o111)


# ---------------------------------------------------------------------------------------------
# Processes


class Client:
    """One connection to the init; for a spawn, also the process it started."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid: int | None = None
        self.pty = False  # its process has a terminal, whose master the caller holds
        self.kept: KeptSession | None = None  # the named session it is attached to

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        # If the caller is gone, its process is dealt with when the connection closes.
        with contextlib.suppress(OSError):
            self.sock.sendmsg([data], ancillary)


class KeptSession:
    """A named session as the init keeps it: the session, the connection attached to it and
    its relay, and once its shell was reaped, the wait status still to report."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.client: Client | None = None
        self.relay: PipeRelay | None = None
        self.watched: set[int] = set()
        self.status: int | None = None
        self.finish_at = 0.0  # when the shell's last output is through the terminal
        self.flushing = False  # waiting (FLUSH_WAIT_S at most) for the caller to take it
        self.killed = False


class Init:
    def __init__(self, listener: socket.socket, protocol: int) -> None:
        self.listener = listener
        self.protocol = protocol
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, Client] = {}
        self.sessions = SessionTable()
        self.kept: dict[int, KeptSession] = {}  # by the shell's pid, until it is reported
        self.hung_up: dict[int, float] = {}  # terminal processes whose caller left: when to
        # signal their group should they outlive their terminal's hang-up (until reaped)
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            self.last_cap = int(handle.read())
        self.tty_gid = _group_id("tty", 5)
        self.max_fd = os.sysconf("SC_OPEN_MAX")
        self.stopping = False

    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(wake_r, selectors.EVENT_READ, "signal")
        while True:
            for key, events in self.selector.select(self._next_timeout()):
                if key.data == "accept":
                    self._accept()
                elif key.data == "signal":
                    self._on_signal(wake_r)
                elif isinstance(key.data, KeptSession):
                    self._on_session(key.data, key.fd, events)
                else:
                    self._on_message(key.data)
            self._tick()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(True)
        sock.settimeout(10.0)
        self.selector.register(sock, selectors.EVENT_READ, Client(sock))

    def _on_signal(self, wake_r: int) -> None:
        try:
            signals = os.read(wake_r, 4096)
        except BlockingIOError:
            signals = b""
        self._reap()
        if signal.SIGTERM in signals:
            self.stop()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.hung_up.pop(pid, None)
            kept = self.kept.get(pid)
            if kept is not None:
                self.sessions.remove(kept.session)
                kept.status = status
                kept.finish_at = time.monotonic() + PTY_DRAIN_S
            client = self.children.pop(pid, None)
            if client is not None:
                client.pid = None
                client.send({"exit": status})

    def _on_message(self, client: Client) -> None:
        try:
            data, ancdata, _, _ = client.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:  # we never accept descriptors: close any sent
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]):
                    os.close(fd)
        if not data:
            self._disconnect(client)
            return
        try:
            request = json.loads(data)
            self._handle(client, request)
        except Exception as exc:
            client.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _disconnect(self, client: Client) -> None:
        self.selector.unregister(client.sock)
        client.sock.close()
        if client.kept is not None:  # a named session's caller left: detach, no hang-up
            self._release(client.kept)
        if client.pid is not None:
            if client.pty:  # the caller's closed master hangs it up (see the module's text)
                self.hung_up[client.pid] = time.monotonic() + PTY_HANGUP_FALLBACK_S
            else:
                _hang_up_group(client.pid)
            self.children.pop(client.pid, None)
            client.pid = None

    def _handle(self, client: Client, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "ping":
            client.send({"ok": True, "protocol": self.protocol})
        elif op == "user":
            client.send({"ok": True, "user": lookup_user(str(request["name"]))})
        elif op in ("spawn", "helper", "attach"):
            if client.pid is not None or client.kept is not None:
                raise ValueError("one process per connection")
            if op == "attach":
                self._attach(client, request)
            else:
                self._spawn(client, request)
        elif op == "signal":
            if client.kept is not None:
                client.kept.session.signal(int(request["sig"]))
            elif client.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(client.pid, int(request["sig"]))
        elif op == "resize" and client.kept is not None:
            client.kept.session.resize(int(request["cols"]), int(request["rows"]),
                                       int(request.get("px", 0)), int(request.get("py", 0)))
        elif op == "break" and client.kept is not None:
            client.kept.session.send_break()
        elif op == "sessions":
            client.send({"ok": True, "sessions": self.sessions.infos()})
        elif op == "kill_session":
            session = self.sessions.by_name.get(str(request["session"]))
            if session is not None:
                self.sessions.remove(session)
                session.hang_up()
            client.send({"ok": True, "killed": session is not None})
        elif op == "which":
            found = next((path for path in request["paths"] if _executable(path)), None)
            client.send({"ok": True, "path": found})
        elif op == "socket":
            # Made here, so it belongs to the sandbox's network namespace wherever it is used.
            family = _SOCKET_FAMILIES[str(request["family"])]
            with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as made:
                client.send({"ok": True}, [made.fileno()])
        elif op == "stop":
            client.send({"ok": True})
            self.stop()
        else:
            raise ValueError(f"unknown op {op!r}")

    def _spawn(self, client: Client, request: dict[str, Any]) -> None:
        env = dict(request.get("env", {}))
        pty = request.get("pty")
        if request["op"] == "helper":
            ours_end, theirs_end = socket.socketpair()
            null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            child_stdio = (theirs_end.fileno(), theirs_end.fileno(), null)
            ours, theirs = [ours_end.detach()], [theirs_end.detach(), null]
        elif pty is not None:
            master, slave = self._terminal(request, env)
            child_stdio, ours, theirs = (slave, slave, slave), [master], [slave]
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            for fd in (in_w, out_w):  # fewer, larger reads and writes on the bulk data path
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            child_stdio = (in_r, out_w, err_w)
            ours, theirs = [in_w, out_r, err_r], [in_r, out_w, err_w]
        pid, failure = self._fork(request, env, child_stdio, theirs)
        try:
            if failure:
                client.send({"ok": False, "error": failure})
            else:
                client.pid, client.pty = pid, pty is not None
                self.children[pid] = client
                client.send({"ok": True, "pid": pid}, ours)
        finally:
            for fd in ours:
                os.close(fd)

    def _terminal(self, request: dict[str, Any], env: dict[str, str]) -> tuple[int, int]:
        """A new terminal of the jail's devpts as ``request["pty"]`` asks, its slave owned by
        the user; ``SSH_TTY`` set in ``env``. Returns the master and the slave."""
        pty = request["pty"]
        master, slave = os.openpty()
        os.set_inheritable(slave, False)
        apply_modes(slave, {int(k): int(v) for k, v in pty.get("modes", {}).items()})
        set_window_size(master, pty["cols"], pty["rows"], pty.get("px", 0), pty.get("py", 0))
        os.fchown(slave, request["uid"], self.tty_gid)
        os.fchmod(slave, 0o620)
        env["SSH_TTY"] = os.ttyname(slave)
        return master, slave

    def _fork(self, request: dict[str, Any], env: dict[str, str],
              child_stdio: tuple[int, int, int], theirs: list[int]) -> tuple[int, str]:
        """Fork the requested process on ``child_stdio``, then close ``theirs`` here. Returns
        its pid and, when it could not start (it is reaped already), why."""
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            self._become(request, env, child_stdio, report_w)
        os.close(report_w)
        for fd in theirs:
            os.close(fd)
        failure = b""
        while chunk := os.read(report_r, 4096):
            failure += chunk
        os.close(report_r)
        if failure:
            os.waitpid(pid, 0)
        return pid, failure.decode(errors="replace")

    # ---- named sessions

    def _attach(self, client: Client, request: dict[str, Any]) -> None:
        """Attach ``client`` to its named session, starting the shell when there is none."""
        name, pty = str(request["session"]), request["pty"]
        try:
            session, displaced = self.sessions.claim(name, int(request["uid"]))
        except SessionRefused as exc:
            client.send({"ok": False, "error": str(exc), "refused": True})
            return
        resumed = session is not None
        if session is None:
            env = dict(request.get("env", {}))
            master, slave = self._terminal(request, env)
            pid, failure = self._fork(request, env, (slave, slave, slave), [slave])
            if failure:
                os.close(master)
                client.send({"ok": False, "error": failure})
                return
            session = Session(name, user=str(request.get("user", request["uid"])),
                              uid=int(request["uid"]), pid=pid, master=master,
                              cols=int(pty["cols"]), rows=int(pty["rows"]),
                              timeout=float(request.get("timeout", 0)))
            self.sessions.add(session)
            self.kept[pid] = KeptSession(session)
        kept = self.kept[session.pid]
        if displaced and kept.client is not None:
            kept.client.send({"detached": take_over_reason(name)})
        self._release(kept)
        first = session.attach(int(pty["cols"]), int(pty["rows"]), int(pty.get("px", 0)),
                               int(pty.get("py", 0)))
        input_r, input_w = os.pipe()
        output_r, output_w = os.pipe()
        kept.relay = PipeRelay(session, input_r, output_w, first if resumed else b"")
        kept.client, client.kept = client, kept
        client.send({"ok": True, "pid": session.pid, "resumed": resumed}, [input_w, output_r])
        os.close(input_w)
        os.close(output_r)
        self._watch(kept)

    def _release(self, kept: KeptSession) -> None:
        """Detach ``kept`` from its connection, if any: its shell goes on unwatched."""
        if kept.client is not None:
            kept.client.kept = None
            kept.client = None
        if kept.relay is not None:
            self._unwatch(kept)
            kept.relay.close()
            kept.relay = None
            kept.session.detach()
        self._watch(kept)

    def _watch(self, kept: KeptSession) -> None:
        """Wait for what ``kept`` can do next: its relay's events, or reading the master."""
        if kept.status is not None and kept.relay is None and kept.session.master < 0:
            return
        if kept.relay is not None:
            wanted = kept.relay.interest()
        else:
            wanted = {kept.session.master: kept.session.read_interest()}
        for fd in kept.watched - wanted.keys():
            self.selector.unregister(fd)
        kept.watched -= kept.watched - wanted.keys()
        for fd, events in wanted.items():
            if fd in kept.watched and events:
                self.selector.modify(fd, events, kept)
            elif fd in kept.watched:
                self.selector.unregister(fd)
                kept.watched.discard(fd)
            elif events:
                self.selector.register(fd, events, kept)
                kept.watched.add(fd)

    def _unwatch(self, kept: KeptSession) -> None:
        for fd in kept.watched:
            self.selector.unregister(fd)
        kept.watched.clear()

    def _on_session(self, kept: KeptSession, fd: int, events: int) -> None:
        if fd not in kept.watched:  # dropped earlier in this turn of the loop
            return
        try:
            if kept.relay is not None:
                if not kept.relay.on_ready(fd, events):
                    self._release(kept)
            else:
                kept.session.read_master()
        except OSError:  # not the terminal's hang-up (EIO), which reads as its end
            traceback.print_exc()
            self._release(kept)
        self._watch(kept)

    def _next_timeout(self) -> float | None:
        """Seconds until :meth:`_tick` has work: a drain, a kill after a hang-up, an expiry."""
        now, wall = time.monotonic(), time.time()
        due = [kept.finish_at + (FLUSH_WAIT_S if kept.flushing else 0.0) - now
               for kept in self.kept.values() if kept.status is not None]
        due += [kept.session.hung_up_at + HANGUP_GRACE_S - wall for kept in self.kept.values()
                if kept.session.hung_up_at is not None and not kept.killed]
        due += [at - now for at in self.hung_up.values()]
        expiry = self.sessions.next_expiry()
        if expiry is not None:
            due.append(expiry - wall + 0.01)
        return max(0.0, min(due)) if due else None

    def _tick(self) -> None:
        now, wall = time.monotonic(), time.time()
        for pid, at in list(self.hung_up.items()):
            if now >= at:  # not reaped yet, so the pid is still that process's
                del self.hung_up[pid]
                _hang_up_group(pid)
        for session in self.sessions.expired(wall):
            session.hang_up(wall)
        for pid, kept in list(self.kept.items()):
            hung_up = kept.session.hung_up_at
            if hung_up is not None and not kept.killed and wall - hung_up >= HANGUP_GRACE_S:
                kept.killed = True
                kept.session.kill()
            if kept.status is not None and now >= kept.finish_at:
                self._finish(pid, kept)

    def _finish(self, pid: int, kept: KeptSession) -> None:
        """The shell of ``kept`` was reaped: its last output, then its exit status, to the
        caller; while the caller is slow to take that output, at most ``FLUSH_WAIT_S`` later
        (on a turn of the loop, never blocking it)."""
        assert kept.status is not None
        relay = kept.relay
        if relay is not None and relay.drain_terminal() \
                and time.monotonic() < kept.finish_at + FLUSH_WAIT_S:
            kept.flushing = True
            self._watch(kept)
            return
        del self.kept[pid]
        self._unwatch(kept)
        client = kept.client
        if relay is not None:
            relay.close()
            kept.relay = None
        kept.session.close()
        if client is not None:
            client.kept = None
            client.send({"exit": kept.status})

    def _become(self, request: dict[str, Any], env: dict[str, str],
                stdio: tuple[int, int, int], report_w: int) -> NoReturn:
        """In the forked child: become the requested process, or the file service on stdio.

        Never returns. Whatever fails before that is reported on ``report_w``.
        """
        try:
            signal.set_wakeup_fd(-1)
            _default_signals()
            os.setsid()
            if request.get("pty") is not None:
                fcntl.ioctl(stdio[0], termios.TIOCSCTTY, 0)
            for target, fd in enumerate(stdio):
                os.dup2(fd, target)
            os.closerange(3, report_w)
            os.closerange(report_w + 1, self.max_fd)
            for cap in range(self.last_cap + 1):
                if cap not in KEEP_CAPS:
                    _prctl(PR_CAPBSET_DROP, cap)
            os.setgroups(request.get("groups") or [request["gid"]])
            os.setgid(request["gid"])
            os.setuid(request["uid"])
            os.umask(0o022)
            try:
                os.chdir(request["cwd"])
            except OSError as exc:
                os.write(2, f"Could not chdir to home directory {request['cwd']}: "
                            f"{exc.strerror}\n".encode())
                os.chdir("/")
            if request["op"] == "helper":
                serve = HELPERS[request["helper"]]
                os.close(report_w)
                try:
                    serve(0, 1)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            program, argv = request["program"], request["argv"]
            if "/" in program:
                os.execve(program, argv, env)
            os.execvpe(program, argv, env)
        except BaseException as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            try:
                what = request.get("program") or f"{request.get('helper')} helper"
                os.write(report_w, f"{what}: {reason}".encode())
            finally:
                os._exit(127)

    def stop(self) -> None:
        """End every process of the sandbox, then exit (the kernel tears the namespaces down)."""
        if self.stopping:
            return
        self.stopping = True
        deadline = time.monotonic() + HANGUP_GRACE_S
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGTERM)
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
        os._exit(0)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Start the jail described by ``$MSB_PROXY_JAIL``.

    That JSON object holds ``name``, ``rootfs``, ``dir`` (the sandbox directory), ``ready_fd``
    (where to write ``ready`` or ``error: ...``) and ``protocol`` (the version of the proxy
    starting us, echoed by ping). It comes in the environment rather than argv so that the
    guest's ``ps`` (our /proc/1/cmdline) shows no host paths.
    """
    settings = json.loads(os.environ.pop("MSB_PROXY_JAIL"))
    ready = int(settings["ready_fd"])

    def fail(message: str) -> NoReturn:
        os.write(ready, f"error: {message}\n".encode())
        os._exit(1)

    try:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET
                             | CLONE_NEWPID | CLONE_NEWCGROUP), "unshare")
    except OSError as exc:
        fail(str(exc.strerror or exc))
    pid = os.fork()
    if pid:
        with open(os.path.join(settings["dir"], "init.pid"), "w") as handle:
            handle.write(f"{pid}\n")
        os._exit(0)

    try:
        build(settings["name"], settings["rootfs"], settings["dir"], settings.get("volumes", []))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock_path = "../init.sock"  # relative to the overlay mount: unix paths are short
        if os.path.lexists(sock_path):
            os.unlink(sock_path)
        listener.bind(sock_path)
        os.chmod(sock_path, 0o600)
        listener.listen(128)
        pivot()
        _prctl(PR_SET_DUMPABLE, 0)
        _libc.prctl(PR_SET_NAME, b"msb-init", 0, 0, 0)
        init = Init(listener, int(settings["protocol"]))
    except Exception as exc:
        traceback.print_exc()
        fail(str(exc))
    os.write(ready, b"ready\n")
    os.close(ready)
    init.serve()


if __name__ == "__main__":
    main()
