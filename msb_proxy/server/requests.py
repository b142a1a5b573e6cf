"""Session channel requests that asyncssh has no public hook for.

asyncssh answers a channel request by calling the channel's ``_process_<name>_request`` method
(``asyncssh/channel.py``, ``_service_next_request``; punctuation mapped by ``map_handler_name``)
and answers any request it has no method for with a failure. Two requests need more than that,
so :func:`install` sets, on each session channel, in this one place:

* ``eow@openssh.com``: OpenSSH sends it (no reply wanted) once the client's stdout has closed,
  as in ``ssh host yes | head -1``. sshd then stops reading the command's output and closes its
  end, so the command gets SIGPIPE and the channel ends with its real status
  (``channels.c``, ``chan_rcvd_eow``); without it the command blocks for ever on a full window.
* ``env``: asyncssh keeps every variable a client sends; sshd keeps at most 128 per session
  (``session.c``, ``session_env_req``) and fails the rest. Here the requests past the limit
  fail and are not kept; the ones below it are asyncssh's own handling.

``scripts/check-private-names`` allows these two names here and nowhere else. Should asyncssh
change how it finds these methods, the requests get its default answer again: a failure
reply for ``eow@openssh.com``, which OpenSSH ignores, and no limit on ``env``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncssh

from msb_proxy.config import DEFAULT_MAX_ENV

__all__ = ["install"]


def install(chan: asyncssh.SSHServerChannel[bytes], eow: Callable[[], None],
            max_env: int = DEFAULT_MAX_ENV) -> None:
    """Answer ``eow@openssh.com`` on ``chan`` by calling ``eow()``, and fail ``env`` requests
    past the ``max_env``-th."""

    def eow_request(packet: Any) -> bool:
        packet.check_end()
        eow()
        return True

    # setattr: these are asyncssh's names, not attributes its type declares.
    setattr(chan, "_process_eow_at_openssh_dot_com_request", eow_request)  # noqa: B010
    process_env = getattr(chan, "_process_env_request", None)
    if not callable(process_env):
        return
    kept = 0

    def env_request(packet: Any) -> bool:
        nonlocal kept
        if kept >= max_env:
            return False
        kept += 1
        return bool(process_env(packet))

    setattr(chan, "_process_env_request", env_request)  # noqa: B010
