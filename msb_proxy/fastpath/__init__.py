"""The fast path: the only code that reaches into asyncssh's and asyncio's private state.

asyncssh's general machinery costs more per packet than the cipher on bulk transfers and most
of a small-file transfer's time (see ``receive``, ``send``, ``umac`` and ``relay``). This
package takes channel data past it while it can. It is one layer with one entry:

* :func:`install` is called once per connection, as the server's
  :attr:`~msb_proxy.server.options.SshServerOptions.connection_hooks`, and returns the
  :class:`~msb_proxy.server.hooks.ConnectionHooks` the connection's sessions call. Nothing in
  ``server/`` or ``transport/`` imports from here; they expose the hooks it attaches to.
* It runs only where :mod:`~msb_proxy.fastpath.gate` says it may: the asyncssh and Python
  versions it was tested with, and every private name it uses in place. Otherwise the plain
  hooks (asyncssh's own path) serve the connection and the reason is logged once (``--debug``).
* Any exception of ours inside it takes it off that connection (:meth:`FastPath.fail`) and
  hands the bytes in flight back to asyncssh's path, in order.
* Whether it runs is decided per connection by whoever builds the server: the CLI reads
  ``MSB_PROXY_FASTPATH`` (``0`` turns it off) and ``MSB_PROXY_RELAY`` (``python``: the
  relay's Python loop instead of the C one) into its config for every connection, the warm
  server's children included. Everything works, byte for byte, with it off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncssh

from msb_proxy.fastpath import gate, relay, umac
from msb_proxy.fastpath.receive import Receiver
from msb_proxy.fastpath.send import Sender
from msb_proxy.server.hooks import ConnectionHooks, RelayedSession
from msb_proxy.transport.batching import after_batch

__all__ = ["RELAY_LOOPS", "FastPath", "install"]

#: What ``relay_loop`` may be: the C loop where it was built (else Python), or Python.
RELAY_LOOPS = ("c", "python")

_log = logging.getLogger("msb_proxy.fastpath")
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        _log.debug("fast path off: %s; asyncssh's own path serves the connection", reason)


def install(conn: asyncssh.SSHServerConnection, *, relay_loop: str = "c") -> ConnectionHooks:
    """The data-path hooks for ``conn``, a connection whose ``connection_made`` is running:
    a :class:`FastPath` when the gate allows it, else the plain hooks (asyncssh's path)."""
    refusal = gate.connection_refusal(conn)
    if refusal is not None:
        _say_once(refusal)
        return ConnectionHooks()
    return FastPath(conn, relay_loop=relay_loop)


class FastPath(ConnectionHooks):
    """The fast path of one connection: receive and send paths from the start, the relay for
    the first session whose process offers plain pipes, on a pipe transport."""

    def __init__(self, conn: asyncssh.SSHServerConnection, *, relay_loop: str = "c") -> None:
        self._conn = conn
        self._relay_loop = relay_loop
        self.active = True
        self.receiver = Receiver(conn, self.fail)
        self.sender = Sender(conn, self.fail)
        self.receiver.install()
        self.sender.install()
        self.umac = umac.attach(conn)
        self.relay: relay.Relay | None = None
        self._relay_refused = False
        _log.debug("fast path on (cached-key UMAC: %s)", "yes" if self.umac else "no")

    def fail(self, reason: str) -> None:
        """Take the fast path off this connection for good: asyncssh's own path from now on.

        Called by the parts when our code fails; they hand back what they hold themselves."""
        if not self.active:
            return
        self.active = False
        _log.debug("fast path off for this connection after a fault: %s", reason)
        if self.relay is not None:
            self.relay.detach()
            client: Any = self._conn._transport  # the stdio transport the relay hooked
            if getattr(client, "after_read", None) == self.relay.run:
                client.after_read = None
        self.sender.uninstall()
        self.receiver.uninstall()
        umac.detach(self._conn)

    # ---- ConnectionHooks
    def write_channel(self, chan: asyncssh.SSHServerChannel[bytes], data: bytes,
                      datatype: int | None) -> None:
        if self.active:
            self.sender.write_channel(chan, data, datatype)
        else:
            chan.write(data, datatype)

    def process_started(self, session: RelayedSession, chan: asyncssh.SSHServerChannel[bytes],
                        process: Any) -> None:
        try:
            relay = self._relay()
            if relay is not None and gate.channel_refusal(chan) is None:
                relay.attach(session, chan, process)
        except Exception as exc:  # the session goes on, on asyncssh's path
            self.fail(f"{type(exc).__name__}: {exc}")

    def process_ended(self, session: RelayedSession) -> None:
        if self.relay is not None:
            self.relay.detach(session)

    def output_delivered(self) -> None:
        relay = self.relay
        if relay is not None and relay.attached:
            after_batch(relay.run)  # once what the output wrote has been flushed

    def _relay(self) -> relay.Relay | None:
        """The connection's relay, made on first use (the transport is fully attached only
        once the connection is under way), when it runs over pipes on an epoll loop."""
        if self.relay is not None or self._relay_refused or not self.active:
            return self.relay
        self._relay_refused = True
        # Over stdio, our pipe-pair transport (transport/stdio.py: pipes(), after_read).
        client: Any = self._conn._transport
        pipes = getattr(client, "pipes", None)
        loop = asyncio.get_running_loop()
        if not callable(pipes) or pipes() is None or not hasattr(client, "after_read"):
            return None
        refusal = gate.loop_refusal(loop)
        if refusal is not None:
            _say_once(refusal)
            return None
        native = relay.compiled_loop() if self._relay_loop == "c" else None
        self.relay = relay.Relay(self._conn, loop=loop, receiver=self.receiver,
                                 sender=self.sender, client=client, native=native,
                                 failed=self.fail)
        self._relay_refused = False
        client.after_read = self.relay.run
        _log.debug("relay on, %s loop", "C" if native is not None else "Python")
        return self.relay
