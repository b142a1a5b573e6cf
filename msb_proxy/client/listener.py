"""A TCP listener for one sandbox (``msb-proxy serve``, the seed's CLI adapter): every accepted
connection is served by the same :class:`~msb_proxy.server.endpoint.SshServer` that
``ssh msb-NAME`` reaches over stdio, any number of them at once."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Callable

from msb_proxy.errors import UserError
from msb_proxy.server.endpoint import SshServer

__all__ = ["is_loopback", "listen"]

CLOSE_GRACE_S = 3.0  # what open connections get to wind down after a stop, within 5 s


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def listen(server: SshServer, host: str, port: int, stop: asyncio.Event, *,
                 on_listening: Callable[[str, int], None] | None = None) -> None:
    """Serve connections on ``host``:``port`` until ``stop`` is set; then stop accepting,
    end every open connection (its guest processes with it) and return.

    Raises :class:`UserError` when the address cannot be listened on. A connection's own
    failure (the sandbox cannot be opened, no such user) is one line on stderr.
    """
    hangup = asyncio.Event()
    connections: set[asyncio.Task[object]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await server.serve((reader, writer), on_error=_report, hangup=hangup)
        except UserError:
            pass  # already reported while the client was connected
        finally:
            connections.discard(task)
            writer.close()

    try:
        listener = await asyncio.start_server(serve, host, port)
    except OSError as exc:
        # asyncio's own message repeats the address; the errno's text is the reason
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if isinstance(exc, socket.gaierror):
            reason = exc.strerror or str(exc)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    async with listener:
        if on_listening is not None:
            bound = listener.sockets[0].getsockname()
            on_listening(str(bound[0]), int(bound[1]))
        await stop.wait()
        listener.close()
        hangup.set()
        if connections:
            await asyncio.wait(set(connections), timeout=CLOSE_GRACE_S)
        for task in set(connections):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*connections, return_exceptions=True)


def _report(error: UserError) -> None:
    print(f"msb-proxy: {error}", file=sys.stderr, flush=True)
