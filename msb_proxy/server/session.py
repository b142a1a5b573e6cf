"""SSH ``session`` channels: shell, exec and subsystem requests run as guest processes.

Behaves as OpenSSH's sshd does, request by request:

* ``exec``: ``$SHELL -c COMMAND`` with the login user's shell from the guest's passwd.
* ``shell``: a login shell (``argv[0]`` is ``-bash``), with or without a terminal. Without one it
  is a non-interactive shell reading commands from stdin: no prompt, no echo.
* ``subsystem``: ``sftp`` runs the guest's own sftp-server as the login user; others are refused.
* ``pty-req``: terminal type, size, pixel size and modes; ``window-change`` resizes it.
* ``env``: accepted for ``LANG``, ``LC_*``, the terminal variables and the configured allow-list
  (sshd's ``AcceptEnv``); others are ignored.
* ``signal``: delivered to the process group, by any POSIX signal name; ``break`` on a terminal.
* stdout is channel data, stderr extended data (merged on a terminal), then ``exit-status`` or
  ``exit-signal`` (``SIGNAME@openssh.com``-style names as sshd sends them).
* Client EOF closes the process's stdin; a channel closed while the process runs hangs it up.

One thing sshd has no counterpart for: a shell with a name (``MSB_SESSION`` set by the client,
``ssh -o SetEnv=MSB_SESSION=work``, or the connection's default, ``ssh msb-api+work``) is a
*named session* (:meth:`~msb_proxy.backends.base.Sandbox.attach_session`): a channel that
closes detaches from it instead of hanging it up, and the next shell with that name gets it
back, repainted.

With ``audit = true`` each channel's request (``shell``, ``exec``, ``subsystem``, ``scp``) and
its end (``exit``, ``hangup``, ``detach``) are audit events, and an SFTP channel runs through
the audit log's tap (:mod:`~msb_proxy.server.transfers.sftp_tap`); with ``record = true`` a
session on a terminal is recorded as it goes (:mod:`~msb_proxy.server.recording`).

Data moves through asyncssh's callback API with flow control both ways, so neither a fast guest
nor a fast client can make us buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import posixpath
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar, cast

import asyncssh

from msb_proxy.backends.base import (
    ExitStatus,
    GuestProcess,
    GuestUser,
    ProcessListener,
    ProcessSpec,
    PtySpec,
    Sandbox,
)
from msb_proxy.config import DEFAULT_MAX_ENV, SESSION_VARIABLE, session_name
from msb_proxy.errors import UserError
from msb_proxy.server import requests
from msb_proxy.server.audit import ConnectionAudit
from msb_proxy.server.hooks import ConnectionHooks
from msb_proxy.server.transfers.files import open_files
from msb_proxy.server.transfers.scp import NativeScp, ScpRequest, parse_scp_command

if TYPE_CHECKING:
    from msb_proxy.server.recording import Recording
    from msb_proxy.server.transfers.sftp_tap import SftpTap
    from msb_proxy.server.tunnels import Tunnels

__all__ = ["SFTP_SERVER_PATHS", "Activity", "GuestSession", "Login"]

# Client variables every session accepts, on top of the configured allow-list.
BUILTIN_ACCEPT_ENV = ("LANG", "LANGUAGE", "LC_*", "TERM", "COLORTERM", "TERM_PROGRAM",
                      "TERM_PROGRAM_VERSION")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
# A ProxyCommand has no socket, so there is no peer address: sshd -i reports exactly this.
SSH_CLIENT = "UNKNOWN 65535 65535"
SSH_CONNECTION = "UNKNOWN 65535 UNKNOWN 65535"
# The names RFC 4254 defines; sshd sends other signals as "SIG@openssh.com".
RFC_SIGNALS = frozenset({"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT",
                         "SEGV", "TERM", "USR1", "USR2"})
SFTP_SERVER_PATHS = ("/usr/lib/openssh/sftp-server", "/usr/lib/ssh/sftp-server",
                     "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server",
                     "/usr/lib/sftp-server")
MAX_PENDING_INPUT = 4 << 20
CHANNEL_WRITE_SIZE = 32 * 1024  # OpenSSH's channel packet size


class Activity:
    """The channels open on one connection, for its unused-connection timeout and its
    ``max_channels``."""

    def __init__(self) -> None:
        self._open = 0
        self._since = time.monotonic()

    @property
    def open(self) -> int:
        """How many channels are open."""
        return self._open

    def opened(self) -> None:
        self._open += 1

    def closed(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._since = time.monotonic()

    def unused_for(self) -> float | None:
        """Seconds since the last channel closed, or None while one is open."""
        return None if self._open else time.monotonic() - self._since


@dataclass(frozen=True)
class Login:
    """What every session of one authenticated connection shares.

    ``env`` is the sandbox template's environment, given to every session (as sshd's PAM
    gives ``/etc/environment``). ``audit`` takes the connection's audit events (it logs
    nothing unless the template turned auditing on); ``recordings`` is the directory terminal
    sessions are recorded in, None when they are not.
    """

    sandbox: Sandbox
    user: GuestUser
    accept_env: tuple[str, ...] = ()
    sftp: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    activity: Activity = field(default_factory=Activity)
    tunnels: Tunnels | None = None
    hooks: ConnectionHooks = field(default_factory=ConnectionHooks)
    max_env: int = DEFAULT_MAX_ENV
    session: str | None = None  # the named session shells attach to unless they name one
    session_timeout: float = 0.0
    audit: ConnectionAudit = field(default_factory=ConnectionAudit)
    recordings: Path | None = None

    def environment(self, client_env: Mapping[str, str], term: str | None) -> dict[str, str]:
        """The environment sshd would give a session of this user (see module docstring)."""
        user = self.user
        env = {
            "USER": user.name,
            "LOGNAME": user.name,
            "HOME": user.home,
            "PATH": ROOT_PATH if user.uid == 0 else USER_PATH,
            "MAIL": f"/var/mail/{user.name}",
            "SHELL": self.shell,
        }
        env.update(self.env)
        if term is not None:
            env["TERM"] = term
        patterns = BUILTIN_ACCEPT_ENV + self.accept_env
        for name, value in client_env.items():
            if name and "=" not in name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                env[name] = value
        env["SSH_CLIENT"] = SSH_CLIENT
        env["SSH_CONNECTION"] = SSH_CONNECTION
        if self.tunnels is not None and self.tunnels.agent_path is not None:
            env["SSH_AUTH_SOCK"] = self.tunnels.agent_path
        return env

    async def start_sftp(self, spec: ProcessSpec, listener: ProcessListener) -> GuestProcess:
        """The guest's own sftp-server as the login user, or native SFTP when it has none."""
        server = await self.sandbox.find_program(self.user, SFTP_SERVER_PATHS)
        if server is not None:
            return await self.sandbox.spawn(replace(spec, program=server, argv=[server]), listener)
        from msb_proxy.server.transfers.sftp import NativeSftp

        files = await open_files(self.sandbox, self.user)
        home = (self.user.home or "/").encode("utf-8", "surrogateescape")
        return NativeSftp(files, listener, home)

    async def start_scp(self, request: ScpRequest, spec: ProcessSpec,
                        listener: ProcessListener) -> GuestProcess:
        """The guest's scp when it has one (run as any command is), else native scp."""
        path = spec.env.get("PATH", "")
        candidates = [f"{directory}/scp" for directory in path.split(":") if directory]
        if await self.sandbox.find_program(self.user, candidates) is not None:
            return await self.sandbox.spawn(spec, listener)
        files = await open_files(self.sandbox, self.user)
        return NativeScp(request, files, listener, self.user.home or "/")

    @property
    def shell(self) -> str:
        return self.user.shell or "/bin/sh"

    def command_line(self, command: str | None) -> tuple[str, Sequence[str]]:
        """Program and argv for ``command`` (exec), or for a login shell when it is None."""
        name = posixpath.basename(self.shell)
        if command is None:
            return self.shell, [f"-{name}"]
        return self.shell, [name, "-c", command]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _contained(default: _R) -> Callable[[Callable[Concatenate[GuestSession, _P], _R]],
                                       Callable[Concatenate[GuestSession, _P], _R]]:
    """For a callback asyncssh makes: an exception raised in it ends only this channel, as a
    bug of ours (reported once, one line), where asyncssh would end the whole connection; the
    callback then answers ``default``."""

    def wrap(method: Callable[Concatenate[GuestSession, _P], _R]
             ) -> Callable[Concatenate[GuestSession, _P], _R]:
        def call(self: GuestSession, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                self._broken(exc)
                return default

        call.__name__, call.__doc__ = method.__name__, method.__doc__
        call.__wrapped__ = method  # type: ignore[attr-defined]  # as functools.wraps has it
        return call

    return wrap


class GuestSession(asyncssh.SSHServerSession[bytes]):
    """One SSH session channel, carried by one guest process."""

    def __init__(self, login: Login) -> None:
        self._login = login
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._pty: PtySpec | None = None
        self._program: tuple[str, Sequence[str]] | None = None
        self._sftp = False
        self._command: str | None = None
        self._process: GuestProcess | None = None
        self._starting: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_eof = False
        self._stdin_paused = False
        self._output_paused = False
        self._pending_signals: list[int] = []
        self._pending_resize: tuple[int, int, int, int] | None = None
        self._exited = False
        self._detached = False
        self._closed = False
        self._client_reads = True  # False once the client said eow@openssh.com
        self._channel = -1  # the audit log's number for it
        self._recording: Recording | None = None
        self._tap: SftpTap | None = None
        self._named: str | None = None  # the named session the shell is, if it is one

    # ---- channel set-up requests
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        self._login.activity.opened()
        self._channel = self._login.audit.next_channel()
        chan.set_write_buffer_limits(high=256 * 1024)
        requests.install(chan, eow=self.eow_received, max_env=self._login.max_env)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        cols, rows, pixel_width, pixel_height = term_size
        self._pty = PtySpec(term=term_type, cols=cols, rows=rows, pixel_width=pixel_width,
                            pixel_height=pixel_height, modes=dict(term_modes))
        return True

    def shell_requested(self) -> bool:
        self._program = self._login.command_line(None)
        return True

    def exec_requested(self, command: str) -> bool:
        self._program = self._login.command_line(command)
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        accepted = subsystem == "sftp" and self._login.sftp
        self._login.audit.event("subsystem", channel=self._channel, name=subsystem,
                                accepted=accepted)
        if not accepted:
            return False
        self._sftp = True
        return True

    def session_started(self) -> None:
        self._starting = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        assert self._chan is not None
        program, argv = self._program or ("", [])
        term = self._pty.term if self._pty is not None else None
        spec = ProcessSpec(
            program=program,
            argv=argv,
            env=self._login.environment(self._chan.get_environment(), term),
            cwd=self._login.user.home or "/",
            user=self._login.user,
            pty=self._pty,
        )
        audit = self._login.audit
        try:
            session = self._named = self._session_name()
            self._log_request(session)
            if self._pty is not None and self._login.recordings is not None:
                self._start_recording(self._login.recordings, spec.env.get("SHELL", ""))
            if session is not None:
                spec = replace(spec, env={**spec.env, SESSION_VARIABLE: session})
                process = await self._login.sandbox.attach_session(
                    session, spec, self, self._login.session_timeout)
            elif self._sftp:
                process = await self._login.start_sftp(spec, self)
                if audit.enabled:
                    process = self._tapped(process)
            elif self._command is not None and (scp := parse_scp_command(self._command)):
                audit.event("scp", channel=self._channel,
                            direction="upload" if scp.sink else "download",
                            paths=list(scp.paths), recursive=scp.recursive)
                process = await self._login.start_scp(scp, spec, self)
            else:
                process = await self._login.sandbox.spawn(spec, self)
        except UserError as exc:
            self._fail(f"msb-proxy: {exc}")
            return
        except Exception as exc:  # keep the connection's other channels alive
            self._fail(f"msb-proxy: could not start the session: {exc}")
            return
        if self._closed:  # the channel went while the process started
            self._ended("hangup")
            process.hangup()
            return
        self._process = process
        try:
            self._hand_over(process)
        except Exception as exc:  # a bug of ours: this channel ends, the connection goes on
            self._broken(exc)

    def _log_request(self, session: str | None) -> None:
        """The audit event of the channel's request: ``shell`` or ``exec``."""
        audit = self._login.audit
        if not audit.enabled or self._sftp:
            return  # a subsystem was logged when it was asked for
        if self._command is None:
            audit.event("shell", channel=self._channel, pty=self._pty is not None,
                        session=session)
        else:
            audit.event("exec", channel=self._channel, command=self._command,
                        pty=self._pty is not None)

    def _start_recording(self, directory: Path, shell: str) -> None:
        """Record this terminal session in ``directory``; one line on the terminal when
        the cast cannot be made (the session goes on)."""
        from msb_proxy.server.recording import Recording

        assert self._pty is not None and self._chan is not None
        audit = self._login.audit
        what = self._command if self._command is not None else "shell"
        try:
            self._recording = Recording.start(
                directory, self._channel, cols=self._pty.cols, rows=self._pty.rows,
                term=self._pty.term, shell=shell,
                title=f"{audit.login_user}@{self._login.sandbox.name}: {what}", audit=audit)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._chan.write_stderr(f"msb-proxy: cannot record this session in "
                                        f"{directory}: {exc.strerror or exc}\r\n".encode())

    def _tapped(self, process: GuestProcess) -> GuestProcess:
        """``process``, an SFTP server, behind the audit log's tap."""
        from msb_proxy.server.transfers.sftp_tap import SftpTap, TappedProcess

        audit, channel = self._login.audit, self._channel

        def report(**fields: object) -> None:
            audit.event("sftp", channel=channel, **fields)

        self._tap = SftpTap(report)
        return TappedProcess(process, self._tap)

    def _ended(self, event: str, **fields: object) -> None:
        """The channel's process is done with (``exit``, ``hangup``, ``detach``): log it and
        close its recording and tap."""
        self._login.audit.event(event, channel=self._channel, **fields)
        if self._recording is not None:
            self._recording.close()
            self._recording = None
        if self._tap is not None:
            self._tap.channel_closed()
            self._tap = None

    def _session_name(self) -> str | None:
        """The named session this channel's shell attaches to, if any: the client's
        ``MSB_SESSION``, else the connection's. Only a shell on a terminal is one; a bad name,
        or one without a terminal, is refused (:class:`UserError`)."""
        assert self._chan is not None
        if self._sftp or self._command is not None or self._program is None:
            return None
        client = self._chan.get_environment().get(SESSION_VARIABLE)
        name = client if client else self._login.session
        if name is None:
            return None
        session_name(name, SESSION_VARIABLE if client else "the host's +SESSION")
        if self._pty is None:
            raise UserError(f"named session {name!r} needs a terminal: ssh -t")
        return name

    def _hand_over(self, process: GuestProcess) -> None:
        """What the client asked for before ``process`` ran, now applied to it."""
        assert self._chan is not None
        if self._output_paused:  # the client fell behind before spawn() returned
            process.pause_output()
        if self._pending:
            for chunk in self._pending:
                process.write_stdin(chunk)
            self._pending.clear()
            self._pending_size = 0
            if not self._stdin_paused:  # the backlog may itself have filled the guest's stdin
                self._chan.resume_reading()
        if self._pending_eof:
            process.close_stdin()
        for signum in self._pending_signals:
            process.send_signal(signum)
        self._pending_signals.clear()
        if self._pending_resize is not None:
            process.resize(*self._pending_resize)
        if not self._client_reads:  # eow@openssh.com came before the process started
            process.close_output()
        self._login.hooks.process_started(self, self._chan, process)

    def _fail(self, message: str) -> None:
        self._ended("exit", status=1, error=message.removeprefix("msb-proxy: "))
        if self._chan is not None and not self._closed:
            newline = "\r\n" if self._pty is not None else "\n"
            with contextlib.suppress(OSError):  # the channel sent EOF already (eow)
                self._chan.write_stderr((message + newline).encode())
            self._chan.exit(1)

    def _broken(self, exc: Exception) -> None:
        """A bug of ours in this channel: say so once (the loop's exception handler prints
        one ``internal error`` line), hang the process up and end just this channel."""
        asyncio.get_running_loop().call_exception_handler(
            {"message": "a session channel failed", "exception": exc})
        process = self._process
        if process is not None and not self._exited:
            with contextlib.suppress(Exception):
                process.hangup()
        with contextlib.suppress(Exception):
            self._fail(f"msb-proxy: internal error: {type(exc).__name__}: {exc}")

    # ---- data and requests once running
    @_contained(None)
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._process is not None:
            self._process.write_stdin(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > MAX_PENDING_INPUT and self._chan is not None:
            self._chan.pause_reading()

    @_contained(True)
    def eof_received(self) -> bool:
        if self._process is not None:
            self._process.close_stdin()
        else:
            self._pending_eof = True
        return True

    @_contained(None)
    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        if self._recording is not None:
            self._recording.resize(width, height)
        if self._process is not None:
            self._process.resize(width, height, pixwidth, pixheight)
        else:  # applied once spawn() returns, in case it raced the terminal's creation
            self._pending_resize = (width, height, pixwidth, pixheight)

    @_contained(None)
    def signal_received(self, signal_name: str) -> None:
        signum = signal_number(signal_name)
        if signum is None:
            return
        if self._process is not None:
            self._process.send_signal(signum)
        else:  # the client saw output before spawn() returned; deliver once it has
            self._pending_signals.append(signum)

    @_contained(None)
    def eow_received(self) -> None:
        """``eow@openssh.com``: the client reads no more output. As sshd: drop what comes,
        close the process's output so its next write gets SIGPIPE, and send EOF."""
        if not self._client_reads:
            return
        self._client_reads = False
        if self._process is not None:
            self._process.close_output()
        if self._chan is not None and not self._closed:
            self._chan.write_eof()

    @_contained(False)
    def break_received(self, msec: int) -> bool:
        return self._process is not None and self._process.send_break(msec)

    @_contained(None)
    def pause_writing(self) -> None:
        self._output_paused = True
        if self._process is not None:
            self._process.pause_output()

    @_contained(None)
    def resume_writing(self) -> None:
        self._output_paused = False
        if self._process is not None:
            self._process.resume_output()

    @property
    def closed(self) -> bool:
        """Whether the channel has closed (see :class:`~msb_proxy.server.hooks.RelayedSession`)."""
        return self._closed

    @_contained(None)
    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._process_done()
        self._login.activity.closed()
        if self._process is not None and not self._exited and not self._detached:
            if self._named is not None:
                self._ended("detach", reason="the connection closed")
            else:
                self._ended("hangup")
            self._process.hangup()
        elif self._starting is not None and not self._starting.done():
            pass  # _start hangs the process up as soon as it exists

    def _process_done(self) -> None:
        if self._process is not None:
            self._login.hooks.process_ended(self)

    # ---- ProcessListener
    def output_received(self, data: bytes, stderr: bool) -> None:
        if self._recording is not None:
            self._recording.output(data)
        if self._tap is not None:
            self._tap.from_server(data)
        if self._chan is None or self._closed or not self._client_reads:
            return
        chan, datatype = self._chan, asyncssh.EXTENDED_DATA_STDERR if stderr else None
        hooks = self._login.hooks
        if len(data) <= CHANNEL_WRITE_SIZE:
            hooks.write_channel(chan, data, datatype)
        else:
            # asyncssh sends from the front of each written buffer and shifts the rest down
            # after every packet: packet-sized writes keep a 1 MiB read from costing 16 MiB of
            # copying.
            view = memoryview(data)
            for start in range(0, len(data), CHANNEL_WRITE_SIZE):
                hooks.write_channel(chan, cast(bytes, view[start:start + CHANNEL_WRITE_SIZE]),
                                    datatype)
        hooks.output_delivered()

    def stdin_paused(self) -> None:
        self._stdin_paused = True
        if self._chan is not None and not self._closed:
            self._chan.pause_reading()

    def stdin_resumed(self) -> None:
        self._stdin_paused = False
        if self._chan is not None and not self._closed:
            self._chan.resume_reading()

    def process_detached(self, reason: str) -> None:
        """A named session another connection took over: say why, and close the channel
        without an exit status (the shell did not exit)."""
        self._detached = True
        self._process_done()
        self._ended("detach", reason=reason)
        chan = self._chan
        if chan is None or self._closed:
            return
        newline = "\r\n" if self._pty is not None else "\n"
        with contextlib.suppress(OSError):
            chan.write_stderr(f"{newline}msb-proxy: {reason}{newline}".encode())
        chan.close()

    def process_exited(self, status: ExitStatus) -> None:
        self._exited = True
        self._process_done()
        if status.signal is not None:
            self._ended("exit", signal=signal_label(status.signal),
                        core_dumped=status.core_dumped)
        else:
            self._ended("exit", status=status.code or 0)
        chan = self._chan
        if chan is None or self._closed:
            return
        if status.code == 127 and self._command is not None:
            hint = missing_tool_hint(self._command, self._login.sandbox.name)
            if hint:
                with contextlib.suppress(OSError):  # EOF sent already (eow@openssh.com)
                    chan.write_stderr(hint.encode() + b"\n")
        if self._client_reads:  # as sshd: EOF after the last output, then the status
            chan.write_eof()
        if status.signal is not None:
            chan.exit_with_signal(signal_name(status.signal), status.core_dumped)
        else:
            chan.exit(status.code or 0)


# Programs that client tools run on the server side: the tool a user knows them by, and the
# Debian package that has them.
SERVER_SIDE_TOOLS = {
    "rsync": ("rsync", "rsync"),
    "scp": ("scp", "openssh-client"),
    "git-upload-pack": ("git", "git"),
    "git-receive-pack": ("git", "git"),
    "git-upload-archive": ("git", "git"),
    "sftp-server": ("sftp", "openssh-sftp-server"),
}


def missing_tool_hint(command: str, sandbox: str) -> str | None:
    """A line naming the program a client tool needs when ``command`` could not find it.

    ``rsync``, ``git`` and friends run a program of theirs in the sandbox and only see the shell's
    "command not found"; this says which sandbox lacks what.
    """
    words = command.split(maxsplit=1)
    program = posixpath.basename(words[0]) if words else ""
    if program not in SERVER_SIDE_TOOLS:
        return None
    tool, package = SERVER_SIDE_TOOLS[program]
    return (f"msb-proxy: sandbox {sandbox!r} has no {program}, which {tool} needs there; "
            f"install it in the sandbox (for example: apt-get install {package})")


def signal_number(name: str) -> int | None:
    """The signal a client names (``INT``, ``SIGINT``, ``USR1`` ...), or None if unknown."""
    bare = name.removesuffix("@openssh.com").upper().removeprefix("SIG")
    try:
        return int(signal.Signals[f"SIG{bare}"])
    except KeyError:
        return None


def signal_label(signum: int) -> str:
    """``signum``'s name without ``SIG`` (``KILL``), for the audit log; its number if it has
    none."""
    try:
        return signal.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        return str(signum)


def signal_name(signum: int) -> str:
    """The name sshd reports in ``exit-signal`` for ``signum``."""
    name = signal_label(signum)
    return name if name in RFC_SIGNALS else "SIG@openssh.com"

