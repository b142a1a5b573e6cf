"""Whether the fast path may run: the versions it was tested with, and every private name it
touches, checked before it touches any.

The fast path reads and writes asyncssh's and asyncio's private state. A private name can be
renamed, or keep its name and change its meaning, in any release: 2.24.1 moved the receive
window accounting into ``_accept_data``, which a copy of the old bookkeeping would have
silently double-counted. So it runs only on the releases in :data:`ASYNCSSH_TESTED` and
:data:`PYTHON_TESTED` (``pyproject.toml`` pins asyncssh to the same range), and even there only
when every name of the tables below is where it expects it. Anything else leaves the
connection on asyncssh's own path, which is complete on its own.

The tables are the whole list: ``tests/test_fastpath_gate.py`` fails when fastpath code uses
a private name of asyncssh or asyncio that is not listed here, and checks that removing any
one of them leaves transfers byte-exact.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import select
import sys
from collections.abc import Callable
from typing import Any

import asyncssh

_log = logging.getLogger("msb_proxy.fastpath")


def _attribute(module: str, name: str) -> Any:
    """``module.name`` of asyncssh, or None: a rename is a refusal below, not an ImportError."""
    try:
        return getattr(importlib.import_module(f"asyncssh.{module}"), name, None)
    except ImportError:
        return None


# The classes it works with.
SSH_CONNECTION: Any = _attribute("connection", "SSHConnection")
SSH_CHANNEL: Any = _attribute("channel", "SSHChannel")
ETM_ENCRYPTION: Any = _attribute("encryption", "ETMEncryption")
#: asyncssh's table of MAC algorithms (``umac.py`` puts the cached-key UMAC in it).
MAC_HANDLERS: Any = _attribute("mac", "_mac_handler")
#: asyncssh's packet-header handler: the receive state between two packets.
RECV_PKTHDR: Any = getattr(SSH_CONNECTION, "_recv_pkthdr", None)
#: asyncssh's CHANNEL_DATA handler of a channel, which a packet taken here stands in for.
PROCESS_DATA: Any = getattr(SSH_CHANNEL, "_packet_handlers", {}).get(asyncssh.MSG_CHANNEL_DATA)

__all__ = [
    "ASYNCSSH_TESTED",
    "CHANNEL_NAMES",
    "CONNECTION_NAMES",
    "ENCRYPTION_NAMES",
    "ETM_ENCRYPTION",
    "LOOP_NAMES",
    "MAC_HANDLERS",
    "PROCESS_DATA",
    "PYTHON_TESTED",
    "RECV_PKTHDR",
    "SSH_CHANNEL",
    "Accepts",
    "channel_refusal",
    "connection_refusal",
    "encryption_refusal",
    "loop_refusal",
    "version_refusal",
]

#: asyncssh releases the fast path was tested with: 2.24.x from 2.24.1 (major, minor, patch).
ASYNCSSH_TESTED = ((2, 24, 1), (2, 25, 0))
#: CPython minor versions whose asyncio internals it was tested with.
PYTHON_TESTED = ((3, 11),)

#: On an SSHServerConnection (all set in its __init__).
CONNECTION_NAMES = (
    "_inpbuf", "_recv_handler", "_recv_encryption", "_recv_seq", "_recv_macsize",
    "_recv_blocksize", "_max_recv_pktlen", "_auth_complete", "_auth_final", "_kex_complete",
    "_decompressor", "_compressor", "_transport", "_channels", "_keepalive_interval",
    "_reset_keepalive_timer", "_send_disconnect", "_force_close", "_send_encryption",
    "_send_seq", "_send_blocksize", "_send_enchdrlen", "_rekey_bytes_sent", "_rekey_bytes",
    "_rekey_seconds", "_rekey_time",
)
#: On each channel object (set by its __init__, ``_write_datatypes`` by the session channel's).
CHANNEL_NAMES = (
    "_conn", "_recv_state", "_recv_window", "_init_recv_window", "_recv_paused", "_recv_buf",
    "_recv_chan", "_send_state", "_send_buf", "_send_window", "_send_pktsize", "_send_paused",
    "_send_chan", "_encoding", "_write_datatypes", "_packet_handlers", "_accept_data",
)
#: On an ETMEncryption object (the cipher's ``_encryptor``/``_decryptor`` are looked up with a
#: fallback to its public ``encrypt``/``decrypt``).
ENCRYPTION_NAMES = ("_cipher", "_mac")
#: On the running event loop; ``_selector._selector`` is its epoll object.
LOOP_NAMES = ("_ready", "_scheduled", "_stopping", "_selector")


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _missing(obj: object, names: tuple[str, ...]) -> str | None:
    for name in names:
        if not hasattr(obj, name):
            return name
    return None


def version_refusal() -> str | None:
    """Why the fast path must stay off in this process (a line for the debug log), or None."""
    low, high = ASYNCSSH_TESTED
    version = getattr(asyncssh, "__version__", "?")
    if not low <= _version(version) < high:
        return f"asyncssh {version} is not a release it was tested with (2.24.1 up to 2.25)"
    if sys.implementation.name != "cpython" or sys.version_info[:2] not in PYTHON_TESTED:
        return f"Python {sys.version.split()[0]} is not a version it was tested with"
    return None


def connection_refusal(conn: Any) -> str | None:
    """Why the fast path must leave ``conn`` alone (a line for the debug log), or None."""
    refusal = version_refusal()
    if refusal is not None:
        return refusal
    if SSH_CONNECTION is None or SSH_CHANNEL is None or ETM_ENCRYPTION is None:
        return "asyncssh's connection, channel or encryption class is not where it was"
    if RECV_PKTHDR is None or PROCESS_DATA is None:
        return "asyncssh's packet-header or channel-data handler is not where it was"
    missing = _missing(conn, CONNECTION_NAMES)
    return None if missing is None else f"asyncssh's connection has no {missing}"


def channel_refusal(chan: Any) -> str | None:
    """Why the fast path must leave channels of ``chan``'s type alone, or None."""
    missing = _missing(chan, CHANNEL_NAMES)
    return None if missing is None else f"asyncssh's channel has no {missing}"


def encryption_refusal(encryption: Any) -> str | None:
    """Why the fast path must leave an encryption of ``encryption``'s type alone, or None."""
    missing = _missing(encryption, ENCRYPTION_NAMES)
    return None if missing is None else f"asyncssh's encryption has no {missing}"


class Accepts:
    """Whether objects of a type pass ``refusal`` (one of the functions above), asked once per
    type: the names it checks are set by the type's ``__init__``, so one object speaks for all.
    A refusal is logged once (``--debug``)."""

    def __init__(self, refusal: Callable[[Any], str | None]) -> None:
        self._refusal = refusal
        self._answers: dict[type, bool] = {}

    def __call__(self, obj: object) -> bool:
        kind = type(obj)
        answer = self._answers.get(kind)
        if answer is None:
            reason = self._refusal(obj)
            answer = self._answers[kind] = reason is None
            if reason is not None:
                _log.debug("fast path off for %s: %s", kind.__name__, reason)
        return answer


def loop_refusal(loop: asyncio.AbstractEventLoop) -> str | None:
    """Why the relay must not serve pipes on ``loop``, or None."""
    missing = _missing(loop, LOOP_NAMES)
    if missing is not None:
        return f"the event loop has no {missing}"
    epoll = getattr(getattr(loop, "_selector", None), "_selector", None)
    if type(epoll) is not select.epoll:
        return "the event loop does not poll with epoll"
    return None
