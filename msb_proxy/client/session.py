"""The native in-process SSH client of one sandbox (the seed SDK's ``SshClient``): an asyncssh
client over an in-memory stream to our own server, which runs as a task beside it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncssh

from msb_proxy.client.status import status_of
from msb_proxy.errors import UserError
from msb_proxy.transport.memory import duplex_pair

if TYPE_CHECKING:
    from msb_proxy.backends.base import Sandbox
    from msb_proxy.backends.idle import ConnectionTracker
    from msb_proxy.server.endpoint import SshServer

__all__ = ["SshClient", "SshOutput"]


@dataclass(frozen=True)
class SshOutput:
    """What one exec request gave: ``status`` (128 + N when it died of signal N, then
    ``signal`` is its SSH name, e.g. ``"KILL"``), and the bytes of ``stdout`` and ``stderr``
    (with a PTY, stderr is folded into stdout and ``stderr`` is empty)."""

    status: int
    stdout: bytes
    stderr: bytes
    signal: str | None = None

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    @property
    def success(self) -> bool:
        return self.status == 0


class SshClient:
    """A connected SSH session with one sandbox. Use it as an async context manager, or call
    :meth:`close`; any use after that raises :class:`UserError`."""

    def __init__(self, conn: asyncssh.SSHClientConnection, server_task: asyncio.Task[Any], *,
                 errors: list[UserError], tracker: ConnectionTracker, term: str,
                 name: str) -> None:
        self._conn: asyncssh.SSHClientConnection | None = conn
        self._server_task = server_task
        self._errors = errors
        self._tracker = tracker
        self.term = term
        self.sandbox = name

    @classmethod
    async def open(cls, server: SshServer, key: asyncssh.SSHKey, *, user: str, term: str,
                   tracker: ConnectionTracker) -> SshClient:
        """Serve one connection of ``server`` over an in-memory stream and log in to it."""
        server_end, client_end = duplex_pair()
        errors: list[UserError] = []
        tracker.__enter__()
        task = asyncio.get_running_loop().create_task(
            server.serve(server_end, on_error=errors.append))
        try:
            # The host name stands in for a peer address, which an in-memory stream lacks.
            conn = await asyncssh.connect(
                server.sandbox, 0, tunnel=client_end, config=None, known_hosts=None, username=user,
                client_keys=[key], agent_path=None, preferred_auth="publickey",
                encoding=None, keepalive_interval=0)
        except (asyncssh.Error, OSError) as exc:
            failure = await _finish(task, tracker)
            raise failure or UserError(
                f"cannot connect to sandbox {server.sandbox!r}: {exc}") from None
        except BaseException:
            task.cancel()
            await _finish(task, tracker)
            raise
        return cls(conn, task, errors=errors, tracker=tracker, term=term, name=server.sandbox)

    def connection(self) -> asyncssh.SSHClientConnection:
        """The asyncssh connection underneath, for what this API does not cover (port
        forwarding, processes with streams of their own)."""
        if self._conn is None:
            raise UserError(f"this SSH client of sandbox {self.sandbox!r} is closed; "
                            "connect again")
        return self._conn

    def _refused(self, exc: asyncssh.Error, what: str) -> UserError:
        if self._errors:
            return self._errors[0]
        return UserError(f"sandbox {self.sandbox!r} refused {what}: {exc.reason}")

    async def exec(self, command: str) -> SshOutput:
        """Run ``command`` through the login shell, as ``ssh host COMMAND``, stdin empty."""
        return await self.exec_with(command)

    async def exec_with(self, command: str, *, tty: bool = False,
                        stdin: bytes | None = None) -> SshOutput:
        """:meth:`exec` with a PTY (``tty``: stderr then arrives in stdout) and ``stdin``
        bytes sent and then closed."""
        conn = self.connection()
        try:
            result = await conn.run(command, input=stdin, request_pty=tty,
                                    term_type=self.term if tty else None)
        except asyncssh.ChannelOpenError as exc:
            raise self._refused(exc, "the session") from None
        except asyncssh.Error as exc:
            raise UserError(f"sandbox {self.sandbox!r}: {exc.reason}") from None
        return _output(result)

    async def sftp(self) -> asyncssh.SFTPClient:
        """An SFTP client on this connection (the server's ``sftp`` subsystem)."""
        conn = self.connection()
        try:
            return await conn.start_sftp_client()
        except asyncssh.Error as exc:
            raise self._refused(exc, "SFTP") from None

    async def attach(self) -> int:
        """The local terminal on an interactive login shell until it exits or the default
        detach keys (``ctrl-p,ctrl-q``) are typed; returns the shell's exit status."""
        return await self.attach_with()

    async def attach_with(self, *, term: str | None = None,
                          detach_keys: str | None = None) -> int:
        """:meth:`attach` with terminal name ``term`` and Docker-format ``detach_keys``."""
        from msb_proxy.client.attach import attach

        return await attach(self.connection(), term=term or self.term,
                            detach_keys=detach_keys)

    async def close(self) -> None:
        """End the connection and its server; closing twice is harmless."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.close()
        with contextlib.suppress(asyncssh.Error, OSError):
            await conn.wait_closed()
        await _finish(self._server_task, self._tracker)

    async def __aenter__(self) -> SshClient:
        self.connection()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def _finish(task: asyncio.Task[Any], tracker: ConnectionTracker) -> UserError | None:
    """Wait for the server's side of the connection, record the sandbox run it used, and
    hand back the error it ended with, if it was one for the user."""
    failure: UserError | None = None
    sandbox: Sandbox | None = None
    try:
        sandbox = await task
    except UserError as exc:
        failure = exc
    except asyncio.CancelledError:
        pass
    try:
        if sandbox is not None:
            tracker.sandbox_opened(sandbox)
    finally:
        tracker.__exit__(None, None, None)
    return failure


def _output(result: asyncssh.SSHCompletedProcess) -> SshOutput:
    stdout = result.stdout if isinstance(result.stdout, bytes) else b""
    stderr = result.stderr if isinstance(result.stderr, bytes) else b""
    status, name = status_of(result.exit_status, result.exit_signal)
    return SshOutput(status, stdout, stderr, name)
