"""The local backend's named sessions, host side: a connection's view of a session the jail
init keeps, and asking the init for the list of them or to end one.

The init owns each session's terminal and its shell (``jail.py``, with the bookkeeping of
``msb_proxy/guest/sessions.py``); a connection that attaches gets the terminal's input and
output as two pipes and a control connection, as a spawned process does, so
:class:`SessionProcess` is a :class:`~msb_proxy.backends.local.control.LocalProcess` whose
hang-up only lets go (the init detaches the session), and whose window changes and breaks go
to the init, which holds the terminal.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, cast

from msb_proxy.backends.base import SessionInfo, SessionListener
from msb_proxy.backends.local.control import LocalProcess, request
from msb_proxy.errors import SandboxError

__all__ = ["SessionProcess", "kill_session", "list_sessions"]


class SessionProcess(LocalProcess):
    """The shell of a named session, as attached by this connection."""

    def resize(self, cols: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
        self._send_control({"op": "resize", "cols": cols, "rows": rows,
                            "px": pixel_width, "py": pixel_height})

    def send_break(self, msec: int) -> bool:
        self._send_control({"op": "break"})
        return True

    def _control_message(self, message: dict[str, Any]) -> None:
        """``detached``: another connection took the session over; let go of it, and say why."""
        if "detached" not in message:
            return
        self._close_control()
        self.close_pipes()
        # attach_session() made it with its SessionListener
        cast(SessionListener, self._listener).process_detached(str(message["detached"]))


async def list_sessions(socket_path: Path) -> list[SessionInfo]:
    """The sessions the init at ``socket_path`` keeps; none when it does not run."""
    reply = await _ask(socket_path, {"op": "sessions"})
    if reply is None:
        return []
    return [SessionInfo(name=str(item["name"]), user=str(item["user"]),
                        created=float(item["created"]), idle=float(item["idle"]),
                        cols=int(item["cols"]), rows=int(item["rows"]),
                        attached=bool(item["attached"]),
                        detached_for=float(item["detached_for"]))
            for item in reply["sessions"]]


async def kill_session(socket_path: Path, session: str) -> bool:
    """Have the init at ``socket_path`` hang up session ``session``; False when it has none."""
    reply = await _ask(socket_path, {"op": "kill_session", "session": session})
    return reply is not None and bool(reply["killed"])


async def _ask(socket_path: Path, message: dict[str, Any]) -> dict[str, Any] | None:
    """The init's reply, or None when no init runs there."""
    try:
        reply, _ = await request(socket_path, message)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise
    if not reply.get("ok"):
        raise SandboxError(f"the sandbox's init cannot list sessions: {reply.get('error')}; "
                           "restart the sandbox with 'msb-proxy stop' (files are kept)")
    return reply
