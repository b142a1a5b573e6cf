"""``msb-proxy connect NAME [--user U] [-t|-T] [--detach-keys KEYS] [--session SESSION]
[COMMAND ...]``: msb-proxy's own SSH client, without OpenSSH. No COMMAND attaches this terminal
to a login shell (as ``SshClient.attach``), with ``--session`` to that named session, which
the detach keys then leave running; a COMMAND runs with stdin forwarded and stdout/stderr
passed through, and the exit status is the one ``ssh`` would give."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

import asyncssh

from msb_proxy.client.attach import attach, parse_detach_keys
from msb_proxy.client.namespace import SandboxSsh
from msb_proxy.client.session import SshClient
from msb_proxy.client.status import status_of
from msb_proxy.config import Config, sandbox_name_from_host, session_name
from msb_proxy.errors import UserError

__all__ = ["run"]

_READ_SIZE = 65536


def run(config: Config, args: argparse.Namespace) -> int:
    name = sandbox_name_from_host(args.name, None)
    if args.detach_keys is not None:
        try:
            parse_detach_keys(args.detach_keys)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    session = None if args.session is None else session_name(args.session, "--session")
    if session is not None and args.remote_command:
        raise UserError("--session names a shell: give no COMMAND with it")
    words = args.remote_command
    # One word is a shell command line as it is (``connect NAME 'a | b'``); several are
    # quoted back into one, so that each stays one argument.
    command = shlex.join(words) if len(words) > 1 else "".join(words)

    async def connect() -> int:
        client = await SandboxSsh(name, config=config).connect(user=args.user)
        async with client:
            if not command or (args.tty and os.isatty(sys.stdin.fileno())):
                # A shell, or -t from a terminal: raw mode, window changes, detach keys
                return await attach(client.connection(), term=client.term,
                                    detach_keys=args.detach_keys, pty=args.tty,
                                    command=command or None, session=session)
            return await _exec(client, command, tty=bool(args.tty))

    return asyncio.run(connect())


async def _exec(client: SshClient, command: str, *, tty: bool) -> int:
    """``command`` with this process's stdin, stdout and stderr, as ``ssh host COMMAND``."""
    process = await client.connection().create_process(
        command, request_pty=tty, term_type=client.term if tty else None,
        stdin=asyncssh.PIPE, encoding=None)
    loop = asyncio.get_running_loop()

    stdin = sys.stdin.fileno()

    def forward() -> None:
        data = os.read(stdin, _READ_SIZE)
        if data:
            process.stdin.write(data)
        else:
            loop.remove_reader(stdin)
            process.stdin.write_eof()

    try:
        loop.add_reader(stdin, forward)
    except PermissionError:  # a regular file: always readable, so read it whole now
        while data := os.read(stdin, _READ_SIZE):
            process.stdin.write(data)
        process.stdin.write_eof()

    async def drain(stream: asyncssh.SSHReader[bytes], fd: int) -> None:
        while data := await stream.read(_READ_SIZE):
            os.write(fd, data)

    try:
        await asyncio.gather(drain(process.stdout, sys.stdout.fileno()),
                             drain(process.stderr, sys.stderr.fileno()))
        await process.wait_closed()
    finally:
        loop.remove_reader(stdin)
    return status_of(process.exit_status, process.exit_signal)[0]
