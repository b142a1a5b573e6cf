"""A fault inside one channel ends that channel only, never the SSH connection.

Each test holds one connection (a ``ControlMaster``) with a session open on it, provokes one
fault in another channel (a guest end that answers and closes before the client's bytes come,
resets, never reads, is refused or vanishes; a ``-R`` target refused on the client's side; a
malformed SFTP packet to the native SFTP server), and then proves the connection lives: the
session opened before still answers, and a new session runs over the same master (with
``ProxyCommand=false``, so it cannot quietly make a connection of its own). The master's
stderr, which carries msb-proxy's, has no ``msb-proxy:`` line at the end.

sshd is the reference: its channels end one by one whatever their sockets do (``nchan.c``,
``chan_shutdown_write``: "shutdown failure is allowed if write failed already").
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import Env
from transfer_helpers import SFTP_SERVER, hide_programs
from tunnel_helpers import (
    WAIT_S,
    Client,
    guest_port,
    guest_server,
    host_port,
    listening,
    socket_exists,
    ssh_argv,
    wait_until,
)

GREETING = b"hello from the guest\n"

FAULT_SERVERS = r'''
"""Guest servers that misbehave: python3 FILE MODE ADDRESS (a port, or a unix socket path)."""
import socket, struct, sys

mode, address = sys.argv[1], sys.argv[2]
if address.isdigit():
    server = socket.create_server(("127.0.0.1", int(address)))  # SO_REUSEADDR, as sshd's
else:
    server = socket.socket(socket.AF_UNIX)
    server.bind(address)
    server.listen()
while True:
    conn, _ = server.accept()
    if mode == "greet-close":  # answer at once and close, before the client says anything
        conn.sendall(b"hello from the guest\n")
    elif mode == "reset":  # take the client's first bytes, then reset the connection
        conn.recv(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # "close-unread": close at once; what the client sends then meets a closed socket
    conn.close()
'''


@pytest.fixture(scope="module")
def guest(msb: Env) -> str:
    """A sandbox for this module: the fault servers' script in it, and no sftp-server, so
    SFTP is msb-proxy's native server."""
    name = f"faults-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    run = msb.ssh(name, f"cat > {msb.guest_tmp(name)}/fault-servers.py",
                  input=FAULT_SERVERS.encode())
    assert run.returncode == 0, run.err
    hide_programs(msb, name, [SFTP_SERVER])
    return name


@dataclass
class Master:
    """A ``ControlMaster`` connection and a session (``cat``) held open on it."""

    msb: Env
    guest: str
    process: Client
    session: Client | None = None

    def argv(self, *options: str, command: str | None = None) -> list[str]:
        """An ssh command line that can only run over the master's connection."""
        return ssh_argv(self.msb, self.guest, "-o", "ControlMaster=no", "-o",
                        "ProxyCommand=false", *options, command=command)

    def forward(self, *forward: str) -> None:
        """Add a forward to the connection (``ssh -O forward``; its listener is up after)."""
        added = self.msb.run(ssh_argv(self.msb, self.guest, "-O", "forward", *forward))
        assert added.returncode == 0, added.err

    def assert_alive(self, mark: str) -> None:
        """The session opened before the fault still echoes, and a new one runs."""
        assert self.session is not None
        self.session.write(f"{mark}\n".encode())
        self.session.wait_for_output(f"^{re.escape(mark)}$")
        fresh = self.msb.run(self.argv(command=f"echo {mark} again"))
        assert (fresh.returncode, fresh.out, fresh.err) == (0, f"{mark} again\n", "")


@pytest.fixture
def master(msb: Env, guest: str) -> Iterator[Master]:
    made = Master(msb, guest, Client(ssh_argv(msb, guest, "-N", "-o", "ControlMaster=yes",
                                              "-o", "ControlPersist=no")))
    check = ssh_argv(msb, guest, "-O", "check")
    try:
        # The master's control socket comes once it has logged in; nothing to wait on but it.
        assert wait_until(lambda: msb.run(check).returncode == 0
                          or made.process.process.poll() is not None), made.process.err
        assert made.process.process.poll() is None, made.process.err
        made.session = Client(made.argv(command="cat"), stdin=True)
        made.assert_alive("before")
        yield made
        made.session.close_stdin()
        assert made.session.wait() == 0, made.session.err
        assert made.process.process.poll() is None, f"the connection ended: {made.process.err}"
    finally:
        if made.session is not None:
            made.session.stop()
        msb.run(ssh_argv(msb, guest, "-O", "exit"))
        made.process.wait()
        made.process.stop()
    assert "msb-proxy:" not in made.process.err, made.process.err


def _read_to_end(sock: socket.socket) -> bytes:
    """Everything until EOF; a reset ends it as EOF does."""
    got = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            got += chunk
    return bytes(got)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _send_all_then_eof(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` and half-close; the far end going away first is what these tests do."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


def _fault_server(msb: Env, guest: str, mode: str, address: int | str) -> contextlib.\
        AbstractContextManager[None]:
    ready = listening(address) if isinstance(address, int) else socket_exists(address)
    return guest_server(msb, guest, f"python3 {msb.guest_tmp(guest)}/fault-servers.py {mode} "
                                    f"{address}", ready)


# A direct-tcpip channel to an address rides a socket of the sandbox's network namespace (local
# backend), one to a name the guest tunnel helper: both carry each fault.
TARGETS = pytest.mark.parametrize("target", ["127.0.0.1", "localhost"],
                                  ids=["direct-socket", "tunnel-helper"])


@TARGETS
def test_guest_end_that_answers_and_closes_before_the_client_speaks_ends_only_its_channel(
    master: Master, target: str
) -> None:
    gport, port = guest_port(), host_port()
    with _fault_server(master.msb, master.guest, "greet-close", gport):
        master.forward("-L", f"{port}:{target}:{gport}")
        for _ in range(3):
            with _connect(port) as sock:
                greeting = _read_to_end(sock)
                _send_all_then_eof(sock, b"bytes that come too late\n")
                rest = _read_to_end(sock)
            assert (greeting, rest) == (GREETING, b"")
        master.assert_alive("after the early close")


@pytest.mark.parametrize("mode", ["reset", "close-unread"])
@TARGETS
def test_client_data_meeting_a_guest_end_gone_ends_only_its_channel(
    master: Master, target: str, mode: str
) -> None:
    """``reset``: the guest resets the connection after the client's first bytes;
    ``close-unread``: it closes at once and never reads what the client then sends."""
    gport, port = guest_port(), host_port()
    with _fault_server(master.msb, master.guest, mode, gport):
        master.forward("-L", f"{port}:{target}:{gport}")
        with _connect(port) as sock:
            _send_all_then_eof(sock, b"x" * (8 << 20))
            assert _read_to_end(sock) == b""
        master.assert_alive(f"after {mode}")


@TARGETS
def test_tunnel_to_a_guest_port_nothing_listens_on_fails_only_its_channel(
    master: Master, target: str
) -> None:
    port = host_port()
    master.forward("-L", f"{port}:{target}:{guest_port()}")
    with _connect(port) as sock:
        _send_all_then_eof(sock, b"anyone there?\n")
        assert _read_to_end(sock) == b""
    master.assert_alive("after the refusal")


def test_guest_unix_socket_that_vanishes_fails_only_its_channel(master: Master) -> None:
    path = f"{master.msb.guest_tmp(master.guest)}/vanishing-{uuid.uuid4().hex[:8]}.sock"
    port = host_port()
    with _fault_server(master.msb, master.guest, "greet-close", path):
        master.forward("-L", f"{port}:{path}")
        with _connect(port) as sock:
            assert _read_to_end(sock) == GREETING
        gone = master.msb.ssh(master.guest, f"rm {path}")
        assert gone.returncode == 0, gone.err
        with _connect(port) as sock:
            _send_all_then_eof(sock, b"is it still there?\n")
            assert _read_to_end(sock) == b""
        master.assert_alive("after the socket vanished")


def test_remote_forward_whose_client_target_refuses_ends_only_its_channel(
    master: Master
) -> None:
    gport = guest_port()
    master.forward("-R", f"{gport}:127.0.0.1:{host_port()}")  # nothing listens on the host
    # The guest's connection is accepted, then closed once the client refuses the channel.
    # (It sends nothing: bytes left unread in a closed socket would make that a reset.)
    probe = (f"import socket; s = socket.create_connection(('127.0.0.1', {gport}), "
             "timeout=30); print(repr(s.recv(100)))")
    tried = master.msb.run(master.argv(command=f"python3 -c \"{probe}\""))
    assert (tried.returncode, tried.out, tried.err) == (0, "b''\n", "")
    master.assert_alive("after the refused -R target")


def test_malformed_packet_to_native_sftp_ends_that_subsystem_only(master: Master) -> None:
    init = struct.pack(">IBI", 5, 1, 3)
    short_read = struct.pack(">IBI", 7, 5, 1) + b"\0\0"  # READ whose handle is cut short
    sftp = master.msb.run(master.argv("-s", command="sftp"), input=init + short_read)
    # As OpenSSH's sftp-server: the version reply, then exit 255 for the packet it cannot parse.
    assert (sftp.returncode, sftp.err) == (255, "")
    assert struct.unpack_from(">I", sftp.stdout)[0] == len(sftp.stdout) - 4
    assert sftp.stdout[4:9] == struct.pack(">BI", 2, 3)
    master.assert_alive("after the malformed SFTP packet")
