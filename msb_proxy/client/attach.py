"""``SshClient.attach``: this process's terminal on an interactive login shell in the sandbox.

With a terminal on stdin: a PTY of its size, raw mode (restored on every way out), SIGWINCH
relayed as window-change, and Docker's detach keys. Without one: the shell's stdin and stdout
are plain pipes, as ``ssh -T`` gives, and the detach keys still apply to what is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty

import asyncssh

from msb_proxy.client.status import status_of
from msb_proxy.config import SESSION_VARIABLE

__all__ = ["DEFAULT_DETACH_KEYS", "attach", "parse_detach_keys"]

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"  # Docker's
_CTRL_PUNCTUATION = {"@": 0, "[": 0x1B, "\\": 0x1C, "]": 0x1D, "^": 0x1E, "_": 0x1F}
_READ_SIZE = 65536
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def parse_detach_keys(spec: str) -> bytes:
    """The bytes of a Docker ``--detach-keys`` spec: comma-separated ``a``-``z`` and
    ``ctrl-a``..``ctrl-z``, ``ctrl-@``, ``ctrl-[``, ``ctrl-\\``, ``ctrl-]``, ``ctrl-^``,
    ``ctrl-_``. Raises ValueError naming a spec that is not one."""
    keys = bytearray()
    for part in spec.split(","):
        key = part.strip().lower()
        if len(key) == 1 and "a" <= key <= "z":
            keys.append(ord(key))
        elif key.startswith("ctrl-") and len(key) == 6 and "a" <= key[5] <= "z":
            keys.append(ord(key[5]) - ord("a") + 1)
        elif key.startswith("ctrl-") and len(key) == 6 and key[5] in _CTRL_PUNCTUATION:
            keys.append(_CTRL_PUNCTUATION[key[5]])
        else:
            raise ValueError(f"bad detach keys {spec!r}: {part!r} is not a-z or ctrl-<a-z, @, "
                             "[, \\, ], ^ or _>")
    return bytes(keys)


class _Detacher:
    """Passes keystrokes on, holding back a possible start of the detach sequence until it is
    either completed (detach) or broken (what was held goes on), as Docker does."""

    def __init__(self, keys: bytes) -> None:
        self._keys = keys
        self._held = 0
        self.detached = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._keys and byte == self._keys[self._held]:
                self._held += 1
                if self._held == len(self._keys):
                    self.detached = True
                    return bytes(out)
                continue
            if self._held:
                out += self._keys[:self._held]
                self._held = 0
                if self._keys and byte == self._keys[0]:
                    self._held = 1
                    continue
            out.append(byte)
        return bytes(out)


async def attach(conn: asyncssh.SSHClientConnection, *, term: str,
                 detach_keys: str | None = None, pty: bool | None = None,
                 command: str | None = None, session: str | None = None) -> int:
    """Run a login shell (or ``command``, as ``ssh -t host COMMAND``) on ``conn`` with this
    process's stdin and stdout; return its exit status (128 + N for signal N), or 0 when the
    detach keys were typed. ``pty`` (default: whether stdin is a terminal) says whether it
    gets a PTY and the terminal raw mode. ``session`` attaches the shell to that named
    session (``MSB_SESSION``), which the detach keys then leave running."""
    detacher = _Detacher(parse_detach_keys(detach_keys or DEFAULT_DETACH_KEYS))
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin) if pty is None else pty and os.isatty(stdin)
    loop = asyncio.get_running_loop()
    env = {SESSION_VARIABLE: session} if session is not None else {}
    if interactive:
        columns, rows = os.get_terminal_size(stdin)
        process = await conn.create_process(command, term_type=term, env=env,
                                            term_size=(columns, rows), encoding=None)
    else:
        process = await conn.create_process(command, request_pty=False, env=env,
                                            encoding=None)
    done = asyncio.Event()
    at_eof = asyncio.Event()
    ended_by: list[int] = []
    saved = termios.tcgetattr(stdin) if interactive else None

    def keystrokes() -> None:
        try:
            data = os.read(stdin, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin)
            process.stdin.write_eof()
            at_eof.set()
            return
        forward = detacher.feed(data)
        if forward:
            process.stdin.write(forward)
        if detacher.detached:
            done.set()

    def resized() -> None:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(stdin)
            process.change_terminal_size(size.columns, size.lines)

    def ended(signum: int) -> None:
        ended_by.append(signum)
        done.set()

    async def output(stream: asyncssh.SSHReader[bytes], fd: int) -> None:
        while data := await stream.read(_READ_SIZE):
            os.write(fd, data)

    pumps = [loop.create_task(output(process.stdout, stdout)),
             loop.create_task(output(process.stderr, sys.stderr.fileno()))]
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
            loop.add_signal_handler(signal.SIGWINCH, resized)
        for signum in _ENDING_SIGNALS:
            loop.add_signal_handler(signum, ended, signum)
        try:
            loop.add_reader(stdin, keystrokes)
        except PermissionError:  # a regular file: always readable, so read it whole now
            while not done.is_set() and not at_eof.is_set():
                keystrokes()
        finished = loop.create_task(process.wait_closed())
        waiter = loop.create_task(done.wait())
        await asyncio.wait({finished, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not finished.done():
            process.close()  # detached, or told to end: the shell's channel goes
            finished.cancel()
            return 128 + ended_by[0] if ended_by else 0
        await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        loop.remove_reader(stdin)
        for signum in (*_ENDING_SIGNALS, signal.SIGWINCH):
            loop.remove_signal_handler(signum)
        for pump in pumps:
            pump.cancel()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    return status_of(process.exit_status, process.exit_signal)[0]
