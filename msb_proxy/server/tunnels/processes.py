"""Tunnels through a guest process: ``-L`` and ``-D`` where the guest cannot run the tunnel
helper (it has no ``python3``) and the backend hands out no sockets of its namespace.

Each channel is one ``socat``, ``nc`` or ``bash /dev/tcp`` process, the first the guest has,
whose stdin and stdout are the connection; what it prints to stderr when the connect fails
becomes the channel's open failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncssh

from msb_proxy.backends.base import ExitStatus, GuestProcess, GuestUser, ProcessSpec, Sandbox
from msb_proxy.server.tunnels.channel import CONNECT_FAILED, TunnelSession

__all__ = ["connect_with_tool"]

FALLBACK_GRACE_S = 0.3


class ProcessTunnel:
    """``-L``/``-D`` without the tunnel helper: one guest process (socat, nc, bash) per
    channel, its stdin and stdout being the connection."""

    def __init__(self) -> None:
        self.process: GuestProcess | None = None
        self.session: TunnelSession | None = None
        self.exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._early: list[bytes] = []
        self._stderr = bytearray()

    def attach(self, session: TunnelSession) -> None:
        self.session = session
        for data in self._early:
            session.write(data)
        self._early.clear()
        if self.exited.done():
            session.close()

    def send(self, data: bytes) -> None:
        if self.process is not None:
            self.process.write_stdin(data)

    def send_eof(self) -> None:
        if self.process is not None:
            self.process.close_stdin()

    def close(self) -> None:
        if self.process is not None:
            self.process.hangup()

    def channel_paused(self) -> None:
        if self.process is not None:
            self.process.pause_output()

    def channel_resumed(self) -> None:
        if self.process is not None:
            self.process.resume_output()

    def failure(self) -> str:
        """The reason the tool gave, without its own prefix ("nc: connect to ...: Connection
        refused" gives "Connection refused"), as sshd would report it."""
        lines = self._stderr.decode(errors="replace").strip().splitlines()
        return lines[-1].rsplit(": ", 1)[-1] if lines else "the connection failed"

    # ---- ProcessListener
    def output_received(self, data: bytes, stderr: bool) -> None:
        if stderr:
            self._stderr += data[:4096 - len(self._stderr)]
        elif self.session is not None:
            self.session.write(data)
        else:
            self._early.append(data)

    def stdin_paused(self) -> None:
        if self.session is not None:
            self.session.pause_input()

    def stdin_resumed(self) -> None:
        if self.session is not None:
            self.session.resume_input()

    def process_exited(self, status: ExitStatus) -> None:
        if not self.exited.done():
            self.exited.set_result(status)
        if self.session is not None:
            self.session.write_eof()
            self.session.close()


def _socat(tool: str, host: str, port: int) -> list[str]:
    return [tool, "-", f"TCP:{host}:{port}"]


def _nc(tool: str, host: str, port: int) -> list[str]:
    # OpenBSD nc needs -N to pass the client's EOF on; busybox's applet passes it anyway.
    return [*([tool, "nc"] if tool.endswith("busybox") else [tool, "-N"]), host, str(port)]


def _bash(tool: str, host: str, port: int) -> list[str]:
    script = 'exec 3<>"/dev/tcp/$1/$2" && { cat <&3 & cat >&3; kill %1 2>/dev/null; wait; }'
    return [tool, "-c", script, "bash", host, str(port)]


# Tried in order when the guest cannot run the tunnel helper; each connects stdin/stdout to
# the target.
FALLBACK_TOOLS: tuple[tuple[list[str], Callable[[str, str, int], list[str]]], ...] = (
    (["/usr/bin/socat", "/bin/socat", "/usr/local/bin/socat"], _socat),
    (["/usr/bin/nc", "/bin/nc", "/usr/local/bin/nc", "/bin/busybox", "/usr/bin/busybox"], _nc),
    (["/bin/bash", "/usr/bin/bash"], _bash),
)


async def connect_with_tool(sandbox: Sandbox, user: GuestUser, host: str,
                            port: int) -> ProcessTunnel:
    """``host``:``port`` from inside the guest through the first tool it has."""
    for paths, argv in FALLBACK_TOOLS:
        found = await sandbox.find_program(user, paths)
        if found is None:
            continue
        tunnel = ProcessTunnel()
        command = argv(found, host, port)
        spec = ProcessSpec(program=command[0], argv=command,
                           env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, cwd=user.home or "/",
                           user=user)
        tunnel.process = await sandbox.spawn(spec, tunnel)
        # A refused target makes the tool exit at once; give it a moment to say so, as the
        # tunnel helper would have before the channel opened.
        done, _ = await asyncio.wait({tunnel.exited}, timeout=FALLBACK_GRACE_S)
        if done and tunnel.exited.result().code not in (0, None):
            raise asyncssh.ChannelOpenError(CONNECT_FAILED, tunnel.failure())
        return tunnel
    raise asyncssh.ChannelOpenError(
        CONNECT_FAILED, f"sandbox {sandbox.name!r} has neither python3 nor socat, nc or bash "
                        "to make connections with")
