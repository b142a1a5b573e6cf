"""The ``fake`` backend: sandboxes without isolation, for running the test suite without root.

A sandbox ``NAME`` is a directory, ``MSB_PROXY_HOME/fake/<slug>/``::

    sandbox.json   its name, its state (created, running, stopped) and the id of its run
    sessions       the sessions its processes were started in, by run, for ``stop``
    home/          the login user's home directory and every session's working directory
    tmp/           a scratch directory of its own, where a real guest has a /tmp of its own (the
                   test suite puts its files there; processes are not told about it)
    hidden         optional: absolute paths of programs the sandbox pretends not to have,
                   one a line (a test takes the guest's sftp-server away with it, where it would
                   rename the program in a real guest)

Every process runs on this host as the user running msb-proxy, in a session of its own, with
pipes or a terminal that msb-proxy holds, exactly as the local backend's jail hands them over;
so the SSH side (sessions, terminals, signals, flow control, SFTP, scp, tunnels) runs the same
code it runs for a real sandbox. State is kept in the directory, under the per-sandbox lock every
backend takes, so ``ls``, ``stop``, ``rm`` and start-on-connect work across msb-proxy processes.
Needs nothing but a POSIX host: no root, no namespaces, no rootfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import termios
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from msb_proxy.backends.base import (
    Backend,
    Check,
    CheckStatus,
    ExitStatus,
    GuestProcess,
    GuestUser,
    ProcessListener,
    ProcessSpec,
    Sandbox,
    SandboxInfo,
    SandboxState,
)
from msb_proxy.backends.local import terminal
from msb_proxy.backends.locking import retire_lock, sandbox_lock
from msb_proxy.backends.processes import PipedProcess, enlarge_pipe
from msb_proxy.config import Config, SandboxTemplate
from msb_proxy.errors import SandboxError, SandboxNotFoundError
from msb_proxy.progress import Progress
from msb_proxy.state import StateDir, slug

__all__ = ["RUN_VARIABLE", "FakeBackend", "FakeSandbox", "sandbox_directory"]

LOCK_WAIT_S = 30.0
# Every process of a run carries the run's id in this variable, and so does everything it
# starts: with the sessions they were started in, that is how `stop` finds a sandbox's
# processes without namespaces or cgroups.
RUN_VARIABLE = "MSB_PROXY_FAKE_RUN"
LOGIN_UMASK = 0o022  # what sshd's login gives, whatever msb-proxy's own umask is
STOP_ROUNDS = 50
STOP_PAUSE_S = 0.02
END_POLL_S = 0.5  # how soon a connection holding only tunnels learns its run is over


def _sandboxes(state: StateDir) -> Path:
    return state.home / "fake"


def _directory(state: StateDir, name: str) -> Path:
    return _sandboxes(state) / slug(name)


def sandbox_directory(home: Path, name: str) -> Path:
    """The directory of sandbox ``name`` (see the module docstring) under the ``MSB_PROXY_HOME``
    ``home``, whether or not the sandbox exists yet."""
    return _directory(StateDir(home), name)


class FakeBackend(Backend):
    """Sandboxes that are directories of this host, their processes this user's processes.

    What it does not model, against a real guest:

    * no isolation at all: a process sees and may change this host's files, processes and
      network as the invoking user; absolute paths (``/etc``, ``/tmp``) are the host's, and only
      the home directory is the sandbox's own;
    * one user: every login name is the invoking user (``root`` too), with the sandbox's
      ``home/`` as home and the user's login shell from this host's passwd database (``/bin/sh``
      when it has none); there is no ``/etc/passwd`` of the guest, and no privilege to drop;
    * the sandbox's network is the host's: ``tcp_socket`` hands out plain host sockets, and a
      guest listener listens on the host's loopback;
    * ``stop`` kills the processes in the sessions the run's processes were started in, and
      those whose environment holds the run's :data:`RUN_VARIABLE`; a process that starts a
      session of its own and clears its environment outlives it;
    * no template options: no image, volumes, network, cpus or memory.
    """

    name = "fake"

    def __init__(self, state: StateDir) -> None:
        self.state = state

    @classmethod
    def from_config(cls, config: Config) -> FakeBackend:
        return cls(StateDir(config.home))

    @classmethod
    def checks(cls, config: Config) -> list[Check]:
        """One row: there is no isolation, by design."""
        return [Check("isolation", CheckStatus.WARN,
                      "none: processes run on this host as the user running msb-proxy (a test "
                      "backend; choose local or microsandbox for real sandboxes)")]

    def _lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return sandbox_lock(self.state.lock_file(name), name, LOCK_WAIT_S,
                            f"see {_directory(self.state, name)}")

    async def open(self, name: str, template: SandboxTemplate, progress: Progress) -> FakeSandbox:
        directory = _directory(self.state, name)
        async with self._lock(name):
            record = _read_record(directory)
            if record is None:
                if not template.create:
                    raise SandboxNotFoundError(
                        f"there is no sandbox {name!r} and its template does not allow "
                        f"creating it; set create = true for it in {self.state.config_file}"
                    )
                progress.step(f"creating sandbox {name!r} ...")
                self.state.ensure("fake")
                directory.mkdir(mode=0o700, exist_ok=True)
                for part in ("home", "tmp"):
                    (directory / part).mkdir(mode=0o700, exist_ok=True)
                record = {"name": name, "state": SandboxState.CREATED.value, "run": ""}
                _write_record(directory, record)
            started = record["state"] != SandboxState.RUNNING.value
            if started:
                progress.step(f"starting sandbox {name!r} ...")
                record = {**record, "state": SandboxState.RUNNING.value, "run": uuid.uuid4().hex}
                _write_record(directory, record)
        if started:
            progress.done(f"sandbox {name!r} ready")
        return FakeSandbox(name, directory, run_id=record["run"], started=started)

    async def state_of(self, name: str) -> SandboxState | None:
        record = _read_record(_directory(self.state, name))
        return None if record is None else SandboxState(record["state"])

    async def current_run(self, name: str) -> str | None:
        record = _read_record(_directory(self.state, name))
        if record is None or record["state"] != SandboxState.RUNNING.value:
            return None
        return record["run"]

    async def list(self) -> list[SandboxInfo]:
        found = []
        for directory in sorted(_sandboxes(self.state).glob("*")):
            record = _read_record(directory)
            if record is not None:
                found.append(SandboxInfo(name=record["name"], backend=self.name,
                                         state=SandboxState(record["state"])))
        return found

    async def stop(self, name: str) -> bool:
        directory = _directory(self.state, name)
        if _read_record(directory) is None:
            raise SandboxNotFoundError(f"there is no sandbox {name!r}")
        async with self._lock(name):
            record = _read_record(directory)
            if record is None or record["state"] != SandboxState.RUNNING.value:
                return False
            # Stopped first: a connection still open spawns nothing into a dying run.
            _write_record(directory, {**record, "state": SandboxState.STOPPED.value})
            await _kill_run(directory, record["run"])
            with contextlib.suppress(FileNotFoundError):
                (directory / "sessions").unlink()
            return True

    async def remove(self, name: str) -> bool:
        directory = _directory(self.state, name)
        if not directory.exists():
            return False
        with contextlib.suppress(SandboxNotFoundError):
            await self.stop(name)
        async with self._lock(name):
            shutil.rmtree(directory, ignore_errors=True)
            retire_lock(self.state.lock_file(name))
        return True


def _read_record(directory: Path) -> dict[str, str] | None:
    """The sandbox's ``sandbox.json``, or None when there is no such sandbox."""
    try:
        data = json.loads((directory / "sandbox.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in data.items()}


def _write_record(directory: Path, record: dict[str, str]) -> None:
    # Whole or not at all: other msb-proxy processes read it without the lock.
    tmp = directory / f".sandbox.json.{os.getpid()}"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, directory / "sandbox.json")


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from the third (the state) on, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _record_session(directory: Path, run: str, pid: int) -> None:
    """Note that the session led by ``pid`` (each process is spawned into one of its own)
    belongs to run ``run``, with the leader's start time, which tells it from a later process
    that gets the same pid."""
    fields = _stat(pid)
    if fields is not None:
        with open(directory / "sessions", "a", encoding="ascii") as sessions:
            sessions.write(f"{run} {pid} {fields[19]}\n")


def _run_sessions(directory: Path, run: str) -> set[str]:
    """The ids of the sessions of run ``run`` that may still have processes in them.

    A session's id cannot be given to a new process while any process is in that session, so
    one whose id has gone to a new process (a leader with another start time) is over.
    """
    try:
        lines = (directory / "sessions").read_text(encoding="ascii").splitlines()
    except OSError:
        return set()
    live = set()
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[0] != run or not parts[1].isdigit():
            continue
        sid, started = parts[1:]
        leader = _stat(sid)
        if leader is None or leader[19] == started:
            live.add(sid)
    return live


def _run_processes(directory: Path, run: str) -> list[int]:
    """PIDs of this user's processes that belong to run ``run``: those in one of its sessions,
    and those that carry its marker in their environment (they may have left the session)."""
    sessions = _run_sessions(directory, run)
    marker = f"{RUN_VARIABLE}={run}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)
        if fields is not None and fields[3] in sessions:
            found.append(int(entry.name))
            continue
        # Not readable for a process that made itself undumpable (sftp-server, ssh-agent):
        # those are found by their session.
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


async def _kill_run(directory: Path, run: str) -> None:
    """SIGKILL every process of run ``run``, again while any forks new ones, as a VM's end
    would take them all at once."""
    for _ in range(STOP_ROUNDS):
        pids = _run_processes(directory, run)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(STOP_PAUSE_S)


def _login_shell(entry: pwd.struct_passwd | None) -> str:
    shell = entry.pw_shell if entry is not None else ""
    return shell if shell and os.access(shell, os.X_OK) else "/bin/sh"


class FakeSandbox(Sandbox):
    """One connection's view of a fake sandbox: processes forked right here."""

    def __init__(self, name: str, directory: Path, run_id: str, started: bool = False) -> None:
        self.name = name
        self.directory = directory
        self.run_id = run_id
        self.started = started
        self._end_watchers: list[Callable[[], None]] = []
        self._ended = False
        self._poll: asyncio.TimerHandle | None = None

    def watch_end(self, ended: Callable[[], None]) -> None:
        """By reading ``sandbox.json`` every ``END_POLL_S``, and whenever one of the run's
        processes exits: ``stop`` marks the run stopped before it kills them, so the end is
        seen before their deaths are reported."""
        loop = asyncio.get_running_loop()
        if self._ended:
            loop.call_soon(ended)
            return
        self._end_watchers.append(ended)
        if self._poll is None:
            self._poll = loop.call_later(END_POLL_S, self._poll_end)

    def _poll_end(self) -> None:
        self._poll = None
        self._check_end()
        if not self._ended and self._end_watchers:
            self._poll = asyncio.get_running_loop().call_later(END_POLL_S, self._poll_end)

    def _check_end(self) -> None:
        if self._ended or self._running():
            return
        self._ended = True
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        watchers, self._end_watchers = self._end_watchers, []
        for ended in watchers:
            ended()

    async def close(self) -> None:
        self._end_watchers.clear()
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    async def lookup_user(self, name: str) -> GuestUser:
        """Every ``name`` is the invoking user: its name, uid, gid and groups as this host's
        passwd database and this process have them, ``home/`` of the sandbox as its home, its
        login shell from passwd (``/bin/sh`` when that is empty or not executable).

        A real guest looks ``name`` up in its own ``/etc/passwd``, may answer with another user
        for each name (``root``, ``dev``), and raises ``UnknownUserError`` for a name it lacks;
        this never raises, and never answers with anyone else.
        """
        uid = os.getuid()
        try:
            entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
        except KeyError:  # a uid without a passwd entry (some containers)
            entry = None
        return GuestUser(name=entry.pw_name if entry is not None else str(uid), uid=uid,
                         gid=os.getgid(), home=str(self.directory / "home"),
                         shell=_login_shell(entry), groups=tuple(os.getgroups()))

    def _hidden(self) -> set[str]:
        try:
            lines = (self.directory / "hidden").read_text(encoding="utf-8").splitlines()
        except OSError:
            return set()
        return {os.path.realpath(line) for line in lines if line}

    def _visible(self, path: str, hidden: set[str]) -> bool:
        return os.path.realpath(path) not in hidden

    async def find_program(self, user: GuestUser, candidates: Sequence[str]) -> str | None:
        hidden = self._hidden()
        for path in candidates:
            if os.path.isfile(path) and os.access(path, os.X_OK) and self._visible(path, hidden):
                return path
        return None

    async def tcp_socket(self, family: int) -> socket.socket | None:
        """A plain socket of this host: the sandbox has no network of its own."""
        if family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    def _running(self) -> bool:
        """Whether this connection's run is still the sandbox's."""
        record = _read_record(self.directory)
        return record is not None and record["state"] == SandboxState.RUNNING.value \
            and record["run"] == self.run_id

    def _check_running(self) -> None:
        if not self._running():
            raise SandboxError(f"sandbox {self.name!r} was stopped; connect again to start it")

    def _program(self, spec: ProcessSpec) -> str:
        """The file ``spec`` runs, looked up in its ``PATH`` as exec does."""
        program = spec.program
        if "/" not in program:
            program = shutil.which(program, path=spec.env.get("PATH", os.defpath)) or program
        if "/" not in program or not self._visible(program, self._hidden()):
            raise SandboxError(f"cannot start {spec.program}: No such file or directory")
        return program

    async def spawn(self, spec: ProcessSpec, listener: ProcessListener) -> GuestProcess:
        self._check_running()
        program = self._program(spec)
        env = {**spec.env, RUN_VARIABLE: self.run_id}
        cwd, note = spec.cwd, b""
        if not os.path.isdir(cwd):
            # as sshd does with a missing home directory, on the session's own stderr
            note = f"Could not chdir to home directory {cwd}: No such file or directory\n".encode()
            cwd = "/"
        if spec.pty is not None:
            master, slave = os.openpty()
            stdio, ours, theirs = (slave, slave, slave), [master], [slave]
            try:
                terminal.apply_modes(slave, spec.pty.modes)
                terminal.set_window_size(master, spec.pty.cols, spec.pty.rows,
                                         spec.pty.pixel_width, spec.pty.pixel_height)
                env["SSH_TTY"] = os.ttyname(slave)
            except (OSError, termios.error) as exc:
                for fd in (master, slave):
                    os.close(fd)
                raise SandboxError(f"cannot set up a terminal for {spec.program}: {exc}") from None
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            enlarge_pipe(in_w)
            enlarge_pipe(out_w)
            stdio, ours, theirs = (in_r, out_w, err_w), [in_w, out_r, err_r], [in_r, out_w, err_w]
        prepare = _become_terminal_owner if spec.pty is not None else _default_signals
        try:
            # The hooks call only signal() and ioctl() between fork and exec: no lock another
            # thread could hold at the fork is taken there.
            child = subprocess.Popen(
                list(spec.argv) or [program], executable=program, stdin=stdio[0],
                stdout=stdio[1], stderr=stdio[2], cwd=cwd, env=env, start_new_session=True,
                umask=LOGIN_UMASK, preexec_fn=prepare,  # noqa: PLW1509
            )
        except OSError as exc:
            for fd in ours:
                os.close(fd)
            raise SandboxError(f"cannot start {spec.program}: {exc.strerror or exc}") from None
        finally:
            for fd in theirs:
                os.close(fd)
        _record_session(self.directory, self.run_id, child.pid)
        if note:
            listener.output_received(note, spec.pty is None)
        process = FakeProcess(child, ours, listener, pty=spec.pty is not None,
                              exiting=self._check_end)
        await process.start()
        return process


def _default_signals() -> None:
    """In the child, before exec: every signal back to its default action and unblocked.

    Ignored signals survive exec, so a guest process would otherwise inherit what msb-proxy
    happened to ignore (a shell's background job ignores SIGINT and SIGQUIT).
    """
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _become_terminal_owner() -> None:
    """In the child, after ``setsid`` and before exec: the terminal on stdin becomes the new
    session's controlling terminal, so Ctrl-C and job control reach its foreground group."""
    _default_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class FakeProcess(PipedProcess):
    """A process forked by msb-proxy itself; its end is seen through a pidfd."""

    def __init__(self, child: subprocess.Popen[bytes], fds: list[int],
                 listener: ProcessListener, pty: bool,
                 exiting: Callable[[], None] | None = None) -> None:
        super().__init__(fds, listener, pty)
        self._child = child
        self._pidfd = -1
        self._exiting = exiting

    async def start(self) -> None:
        await super().start()
        try:
            self._pidfd = os.pidfd_open(self._child.pid)
        except OSError:  # a kernel before 5.3: wait in a thread instead
            waited = self._loop.run_in_executor(None, os.waitpid, self._child.pid, 0)
            waited.add_done_callback(self._waited)
            return
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        try:
            status = os.waitpid(self._child.pid, 0)[1]
        except ChildProcessError:  # reaped behind our back (SIGCHLD ignored): no status left
            status = signal.SIGKILL
        self._reaped(status)

    def _waited(self, future: asyncio.Future[tuple[int, int]]) -> None:
        self._reaped(future.result()[1])

    def _reaped(self, status: int) -> None:
        # Told to Popen too, so that it never waits for the pid again (it may be reused).
        self._child.returncode = os.waitstatus_to_exitcode(status)
        if self._exiting is not None:  # a stop's victim: the connection says why first
            self._exiting()
        self.exited(ExitStatus.from_wait_status(status))

    def _signal_group(self, signum: int) -> None:
        if self._child.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._child.pid, signum)

    def send_signal(self, signum: int) -> None:
        self._signal_group(signum)

    def hangup(self) -> None:
        # As the jail does: SIGCONT after it (a stopped job must wake up to see the SIGHUP); a
        # terminal process hung up by its master's close alone, as with sshd (signals beside
        # it race bash's hang-up: see backends/local/jail.py).
        if not self._pty:
            self._signal_group(signal.SIGHUP)
            self._signal_group(signal.SIGCONT)
        self.close_pipes()

