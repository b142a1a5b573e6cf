"""A short seeded slice of the fuzzer (``tests/fuzz``, ``make fuzz`` runs the long one).

Mutated SSH streams, before and after key exchange, from a client that controls every byte:
each case must end within a bound with no uncaught exception, nothing but SSH on the server's
output, well-formed messages never ending the connection, and, through the real
``msb-proxy stdio``, no exit 70, only ``msb-proxy:`` lines on stderr and a bounded peak RSS.
A failing case is shrunk by hypothesis and printed as the ``Case`` to replay.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from conftest import TEST_BACKEND, Env, install
from fuzz import client as ssh
from fuzz.cases import Case, cases, connect, play, warm_up
from fuzz.client import UserKey
from fuzz.servers import InProcessServer, ProcessServer
from hypothesis import HealthCheck, given, settings
from leaks import guest_processes, settle

pytestmark = pytest.mark.needs_guest("the local jail: the fuzzer serves a local sandbox itself")

SLICE = settings(derandomize=True, database=None, deadline=None,
                 suppress_health_check=list(HealthCheck))
KEY = UserKey(12)
NOT_LOGGED_IN = 255  # sshd -i: a connection that ended before a login


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory, msb: Env) -> Iterator[tuple[Env, str]]:
    """An installation of its own whose authorized_keys also holds the fuzz client's key, and
    its sandbox, created once."""
    env = install(tmp_path_factory.mktemp("fuzz"), TEST_BACKEND, msb.rootfs)
    with (env.home / "authorized_keys").open("a") as keys:
        keys.write(KEY.openssh + "\n")
    sandbox = f"fuzz-{uuid.uuid4().hex[:6]}"
    env.sandboxes.append(sandbox)
    yield env, sandbox
    env.msb_proxy("rm", sandbox)


@pytest.fixture(scope="module")
def in_process(fuzz_env: tuple[Env, str]) -> Iterator[InProcessServer]:
    env, sandbox = fuzz_env
    server = InProcessServer(env.home, env.rootfs, sandbox, KEY.openssh)
    warm_up(server, KEY)
    yield server
    server.close()


@pytest.fixture(scope="module")
def process(fuzz_env: tuple[Env, str], in_process: InProcessServer) -> ProcessServer:
    env, sandbox = fuzz_env
    return ProcessServer(env.proxy_env(), sandbox)


@settings(SLICE, max_examples=200)
@given(case=cases())
def test_mutated_streams_end_cleanly_in_process(case: Case,
                                                in_process: InProcessServer) -> None:
    assert play(case, in_process, KEY).findings == []


@settings(SLICE, max_examples=12)
@given(case=cases())
def test_mutated_streams_end_cleanly_through_msb_proxy_stdio(case: Case,
                                                             process: ProcessServer) -> None:
    assert play(case, process, KEY).findings == []


def test_a_packet_without_payload_ends_the_connection_without_internal_error(
        process: ProcessServer) -> None:
    """asyncssh fails to decode it before its protocol-error handling; msb-proxy reported
    "internal error: PacketDecodeError", exit 70 (found by the fuzzer). Now a protocol error
    like any other: one line, and sshd -i's 255 for a connection that never logged in."""
    client, conn = connect(process)
    client.send(b"")
    client.close_write()
    client.drain(10)
    ending = conn.finish(10)
    assert (ending.ended, ending.exit_code) == (True, NOT_LOGGED_IN)
    assert re.fullmatch(r"msb-proxy: protocol error from the client: [^\n]+\n", ending.stderr)


def test_a_kexinit_with_non_ascii_names_ends_the_connection_without_internal_error(
        process: ProcessServer) -> None:
    """asyncssh's UnicodeDecodeError on the name-list was reported as "internal error", exit 70
    (found by the fuzzer)."""
    client, conn = connect(process)
    kexinit = client.kexinit_payload(cipher="aes128-ctr", mac="hmac-sha2-256", strict=False,
                                     kex=[b"curve25519-sha256", "\u00e9".encode()])
    client.send(kexinit)
    client.close_write()
    client.drain(10)
    ending = conn.finish(10)
    # The client's end of file may be read before the name-list is decoded: then the
    # connection was lost, which is no line.
    assert (ending.ended, ending.exit_code) == (True, NOT_LOGGED_IN)
    assert ending.stderr == "" or re.fullmatch(
        r"msb-proxy: protocol error from the client: [^\n]+\n", ending.stderr), ending.stderr


def test_a_direct_tcpip_port_past_65535_is_refused_and_the_connection_goes_on(
        process: ProcessServer) -> None:
    """The port is a uint32 on the wire: 70000 reached the socket's connect(), whose
    OverflowError msb-proxy printed as "internal error" (found by the fuzzer). sshd refuses
    it as administratively prohibited; the connection serves on."""
    client, conn = connect(process, key=KEY)
    chan = client.new_channel()
    client.send(client.open_payload(chan, b"direct-tcpip", ssh.string("127.0.0.1")
                                    + ssh.u32(70000) + ssh.string("127.0.0.1") + ssh.u32(1)))
    client.pump(lambda: chan.failed is not None or chan.remote is not None)
    probe = client.run(b"echo up")
    client.close_write()
    client.drain(10)
    ending = conn.finish(10)
    assert (chan.failed, bytes(probe.data), probe.exit_status) == (1, b"up\n", 0)
    assert (ending.ended, ending.exit_code, ending.stderr) == (True, 0, "")


def test_a_forward_requested_as_the_connection_ends_leaves_no_guest_helper(
        fuzz_env: tuple[Env, str], in_process: InProcessServer) -> None:
    """``tcpip-forward`` and at once the end of the connection: the guest tunnel helper
    started for it was left running in a long-lived process serving connections through the
    Python API (found by the leak check below). ``msb-proxy stdio`` exits with its connection,
    which ends the helper too."""
    env, sandbox = fuzz_env
    before = guest_processes(env.home, sandbox)
    for _ in range(3):
        client, conn = connect(in_process, fast=False, key=KEY)
        client.send(bytes([ssh.GLOBAL_REQUEST]) + ssh.string("tcpip-forward")
                    + ssh.boolean(False) + ssh.string("localhost") + ssh.u32(0))
        client.close_write()
        client.drain(10)
        assert conn.finish(10).ended
    assert settle(lambda: guest_processes(env.home, sandbox), before, 15) == before


@pytest.mark.xfail(strict=True, reason="asyncssh 2.24 serves a channel's queued requests "
                   "after the channel closed (channel.py _report_response -> "
                   "_service_next_request, _conn gone): the connection ends")
def test_a_channel_closed_while_its_agent_request_runs_leaves_the_connection_up(
        in_process: InProcessServer) -> None:
    """Two ``auth-agent-req@openssh.com`` on a session, then its close: asyncssh answers the
    first in a task (msb-proxy starts the agent socket in the guest) and, once that is done,
    serves the second on a channel already gone. sshd keeps the connection."""
    client, conn = connect(in_process, key=KEY)
    chan = client.open_session()
    for _ in range(2):
        client.send(client.request(chan, "auth-agent-req@openssh.com"))
    chan.we_closed = True
    client.send(bytes([ssh.CHANNEL_CLOSE]) + ssh.u32(chan.remote or 0))
    try:
        probe = client.run(b"echo up")
    finally:
        client.close_write()
        client.drain(10)
        conn.finish(10)
    assert (bytes(probe.data), probe.exit_status) == (b"up\n", 0)


def test_fuzzed_connections_leave_no_guest_process_behind(
        fuzz_env: tuple[Env, str], in_process: InProcessServer) -> None:
    env, sandbox = fuzz_env
    before = guest_processes(env.home, sandbox)
    ran = 0

    @settings(SLICE, max_examples=40)
    @given(case=cases().filter(lambda case: case.stage == "connection"))
    def run(case: Case) -> None:
        nonlocal ran
        ran += 1
        play(case, in_process, KEY)

    run()
    assert ran == 40
    assert settle(lambda: guest_processes(env.home, sandbox), before, 15) == before


def test_the_fuzz_client_speaks_every_cipher_and_mac_it_offers(
        in_process: InProcessServer) -> None:
    """The client itself: a wrong key or MAC would make every case look like a server fault."""
    for cipher in ssh.CIPHERS:
        for mac in ssh.MACS:
            client, conn = connect(in_process, key=KEY, cipher=cipher, mac=mac,
                                   strict=cipher != "aes256-ctr")
            chan = client.run(b"cat", b"x" * 100_000)
            client.close_write()
            client.drain(10)
            conn.finish(10)
            assert (len(chan.data), chan.exit_status) == (100_000, 0), (cipher, mac)


def test_cases_replay_from_their_json() -> None:
    @settings(SLICE, max_examples=50)
    @given(case=cases())
    def round_trip(case: Case) -> None:
        assert Case.from_json(case.to_json()) == case

    round_trip()
