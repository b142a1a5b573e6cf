"""Agent forwarding (``auth-agent-req@openssh.com``) into the guest.

asyncssh would make the agent socket on this host; ours is a unix listener the tunnel helper
opens in the guest at ``/tmp/ssh-XXXXXXXXXX/agent.N`` (directory 0700, as sshd makes it).
Guest sessions find it in ``SSH_AUTH_SOCK``, and each connection to it comes back to the client
as an ``auth-agent@openssh.com`` channel.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

from msb_proxy.server.tunnels.channel import SessionFactory
from msb_proxy.server.tunnels.listeners import open_to_client
from msb_proxy.server.tunnels.mux import MuxStream, TunnelMux

__all__ = ["open_agent_listener"]


async def open_agent_listener(mux: TunnelMux, create_channel: Callable[[], Any],
                              session: SessionFactory) -> str:
    """Listen for agent clients at a fresh ``/tmp/ssh-XXXXXXXXXX/agent.N``; return its path.
    Each connection becomes an agent channel from ``create_channel`` (the connection's
    ``create_agent_channel``) whose session ``session`` makes."""

    directory = f"/tmp/ssh-{secrets.token_hex(5)}"
    path = f"{directory}/agent.{os.getpid()}"

    async def accept(stream: MuxStream, _host: str, _port: int) -> None:
        await open_to_client(stream, lambda: create_channel().open(
            lambda: session(stream, kind="agent", target=path)))

    await mux.listen(accept, path=path, mode=0o600)
    return path
