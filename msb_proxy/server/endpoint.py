"""The SSH server side of one sandbox, as an importable API (the seed SDK's ``SshServer``).

::

    server = await SshServer.prepare(backend, "api", SshServerOptions(host_key_path=...))
    await server.serve(SshStdioStream())      # one connection; call again for the next

``prepare`` loads the host key and the authorized keys once; ``serve`` runs one SSH connection
over any :class:`~msb_proxy.transport.stdio.DuplexStream`. The sandbox is opened while the key
exchange runs, so its start-up overlaps the handshake; the version banner goes out first.
Authentication and channel policy live in :mod:`msb_proxy.server.policy`. Each connection
gets its audit events (:class:`~msb_proxy.server.audit.ConnectionAudit`, written to the
sandbox's log when the template says ``audit = true``) and, with ``record = true``, the
directory its terminal sessions are recorded in.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from msb_proxy.backends.base import Backend, Sandbox
from msb_proxy.errors import UserError
from msb_proxy.progress import Progress
from msb_proxy.server.audit import MIB, AuditLog, ConnectionAudit, audit_log_path
from msb_proxy.server.keys import AuthorizedKeys, load_authorized_keys, load_or_create_host_key
from msb_proxy.server.options import SshServerOptions
from msb_proxy.server.policy import ConnectionPolicy
from msb_proxy.transport.memory import as_duplex_stream
from msb_proxy.transport.stdio import DuplexStream
from msb_proxy.version import __version__

__all__ = ["ConnectionOutcome", "SshServer", "SshServerOptions"]

# OpenSSH's client applies its OpenSSH-only protocol (eow@openssh.com among it, which ends
# `ssh host yes | head -1` as with sshd) only to a server whose version starts "OpenSSH"
# (compat.c); the comment after the space says what we are.
SERVER_VERSION = f"OpenSSH_compatible msb_proxy_{__version__}"
KEEPALIVE_COUNT_MAX = 3  # unanswered keepalives before the client counts as gone, as sshd
# Offered ciphers, best first. asyncssh runs chacha20-poly1305 as three OpenSSL calls per packet,
# which caps a transfer at a third of what AES-GCM or AES-CTR with an EtM MAC reach on a CPU
# with AES instructions; there we leave it out, and OpenSSH clients settle on AES (their next
# choice). Without AES instructions chacha20 is the faster one and goes first.
AES_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr",
               "aes256-ctr"]
CHACHA = "chacha20-poly1305@openssh.com"


# What the client sent that is not SSH as it must be: worth a line, unlike a client that hangs
# up or settles on no algorithm (ssh says so itself).
_BAD_PROTOCOL = (asyncssh.ProtocolError, asyncssh.ProtocolNotSupported, asyncssh.MACError,
                 asyncssh.CompressionError)


@dataclass
class ConnectionOutcome:
    """How one served connection went (``serve(..., outcome=...)`` fills it in): whether the
    client logged in, and what was wrong with what it sent when a protocol error ended it
    before that (None otherwise)."""

    logged_in: bool = False
    protocol_error: str | None = None


class SshServer:
    """A prepared SSH endpoint for one sandbox; reusable for any number of connections."""

    def __init__(self, backend: Backend, sandbox: str, options: SshServerOptions,
                 host_key: asyncssh.SSHKey, authorized: AuthorizedKeys) -> None:
        self.backend = backend
        self.sandbox = sandbox
        self.options = options
        self.host_key = host_key
        self.authorized = authorized

    @classmethod
    async def prepare(cls, backend: Backend, sandbox: str,
                      options: SshServerOptions | None = None) -> SshServer:
        """Load keys for serving ``sandbox`` of ``backend``; the sandbox itself is not touched.

        Raises :class:`UserError` when no authorized key is found or the template asks for
        an audit log or recordings but ``options.home`` is None, and its
        :class:`~msb_proxy.errors.StateError` when the host key cannot be read or made.
        """
        options = options or SshServerOptions()
        template = options.template
        if (template.audit or template.record) and options.home is None:
            wanted = "audit = true" if template.audit else "record = true"
            raise UserError(f"sandbox {sandbox!r}: its template says {wanted}, but this server "
                            "has no state directory to write to (SshServerOptions.home)")
        if options.host_key is not None:
            host_key = options.host_key
        elif options.host_key_path is not None:
            host_key = load_or_create_host_key(options.host_key_path)
        else:
            host_key = asyncssh.generate_private_key("ssh-ed25519")
        authorized = load_authorized_keys(options.authorized_keys_paths, options.authorized_keys)
        return cls(backend, sandbox, options, host_key, authorized)

    async def serve(self, stream: DuplexStream | socket.socket
                    | tuple[asyncio.StreamReader, asyncio.StreamWriter],
                    on_error: Callable[[UserError], None] | None = None,
                    hangup: asyncio.Event | None = None,
                    outcome: ConnectionOutcome | None = None) -> Sandbox | None:
        """Serve one SSH connection over ``stream`` until either side closes it, or ``hangup``
        is set (the client is known to be gone). ``stream`` is a
        :class:`~msb_proxy.transport.stdio.DuplexStream` (``SshStdioStream()``), a connected
        ``socket.socket`` or an ``(asyncio.StreamReader, asyncio.StreamWriter)`` pair; any
        number of connections may be served at once.

        Returns the sandbox the connection used (None if it never got that far).
        ``on_error`` is called as soon as a failure the user should see happens (the sandbox
        cannot be opened, the login user does not exist), while the client is still connected;
        the same error is then raised once the connection is over. A client that simply
        disconnects or fails to authenticate is a normal end; ``outcome``, when given, says
        whether it logged in (``msb-proxy stdio`` exits 255 when not, as ``sshd -i`` does).
        """
        loop = asyncio.get_running_loop()
        options = self.options
        progress = options.progress or Progress(quiet=True)

        def report(error: UserError) -> None:
            progress.close()  # an error must not land on the end of an open progress line
            if on_error is not None:
                on_error(error)

        tunnel = as_duplex_stream(stream)
        audit, recordings = self._observers()
        gate = ConnectionPolicy(options, self.authorized, report, audit=audit,
                                recordings=recordings)
        gate.sandbox_task = loop.create_task(
            self.backend.open(self.sandbox, options.template, progress))
        try:
            conn = await asyncssh.connect_reverse(
                "", 0,
                tunnel=tunnel,
                config=None,
                server_factory=lambda: gate,
                server_host_keys=[self.host_key],
                server_version=SERVER_VERSION,
                encoding=None,
                line_editor=False,
                allow_pty=True,
                x11_forwarding=False,
                agent_forwarding=False,
                allow_scp=False,
                password_auth=False,
                kbdint_auth=False,
                gss_host=None,
                login_timeout=0,  # the policy's login_grace_time, which says why it ended
                keepalive_interval=options.template.keepalive,
                keepalive_count_max=KEEPALIVE_COUNT_MAX,
                encryption_algs=_preferred_ciphers(),
            )
        except (asyncssh.Error, OSError) as exc:
            conn = None
            if outcome is not None and isinstance(exc, _BAD_PROTOCOL):
                outcome.protocol_error = getattr(exc, "reason", "") or str(exc)
        except ValueError as exc:
            if not _malformed_packet(exc):
                raise
            conn = None  # the client's bytes, not our fault: an end like any protocol error
            if outcome is not None:
                outcome.protocol_error = f"a malformed packet ({type(exc).__name__})"
        finally:
            progress.close()
        if conn is not None:
            idle = loop.create_task(gate.close_when_unused(options.template.inactivity_timeout))
            closed = loop.create_task(conn.wait_closed())
            waits: set[asyncio.Task[Any]] = {idle, closed}
            if hangup is not None:
                waits.add(loop.create_task(hangup.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not closed.done():
                conn.abort()
                await conn.wait_closed()
            for task in waits:
                task.cancel()
        if outcome is not None:
            outcome.logged_in = gate.logged_in
        sandbox = await gate.release()
        audit.disconnected()
        if gate.failure is not None:
            raise gate.failure
        return sandbox

    serve_connection = serve  # the seed's alias

    def _observers(self) -> tuple[ConnectionAudit, Path | None]:
        """A new connection's audit events, and where its terminal sessions are recorded
        (None: they are not), as the template says."""
        template, home = self.options.template, self.options.home
        log = None
        if template.audit and home is not None:
            log = AuditLog(audit_log_path(home, self.sandbox), template.audit_max_size * MIB,
                           template.audit_keep)
        recordings = None
        if template.record and home is not None:
            from msb_proxy.server.recording import recordings_dir

            recordings = recordings_dir(home, self.sandbox)
        return ConnectionAudit(log, self.sandbox), recordings


def _malformed_packet(exc: ValueError) -> bool:
    """Whether ``exc`` is asyncssh failing to decode a packet from the client in its own code.

    asyncssh turns most malformed packets into a protocol error, but a few fail before that and
    end the handshake with the decoding error itself: a packet with an empty payload (or a
    padding length that leaves none) raises its PacketDecodeError, a KEXINIT whose name-lists
    are not ASCII a UnicodeDecodeError (both found by the fuzzer, tests/test_fuzz.py). Those
    are the client's bytes, not a fault of ours. PacketDecodeError by name: asyncssh does not
    export it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return (isinstance(exc, UnicodeDecodeError) or type(exc).__name__ == "PacketDecodeError") \
        and str(raised_in).startswith("asyncssh.")


def _preferred_ciphers() -> list[str]:
    if _cpu_has_aes():
        return AES_CIPHERS
    return [CHACHA, *AES_CIPHERS]


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False
