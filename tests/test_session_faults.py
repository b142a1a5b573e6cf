"""A bug of ours inside one session channel ends that channel, never the connection.

asyncssh ends a whole connection when a callback of a session raises; msb-proxy's session
callbacks contain it: the channel gets a one-line ``internal error`` and exit status 1, its
process is hung up, and the connection's other channels go on. Served in-process (see
test_packet_paths) so that a fault can be injected into the backend's process.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncssh
import pytest
from conftest import Env
from test_packet_paths import _connect

from msb_proxy.backends.local.control import LocalProcess


def _raise(*args: object) -> None:
    raise RuntimeError("a fault injected by the test")


@pytest.mark.parametrize(("method", "act"), [
    ("resize", "window-change"),
    ("send_signal", "signal"),
    ("write_stdin", "data"),
])
def test_a_fault_in_a_session_callback_ends_only_that_channel(
    msb: Env, monkeypatch: pytest.MonkeyPatch, method: str, act: str
) -> None:
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    sandbox = f"session-fault-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)

    async def run() -> tuple[int | None, bytes, bytes]:  # status, its output, the next one's
        async with _connect(msb, sandbox, ["aes128-ctr"]) as conn:
            process = await conn.create_process("echo ready; read line; echo read $line",
                                                term_type="xterm", encoding=None)
            assert await process.stdout.readline() == b"ready\r\n"  # the process runs
            monkeypatch.setattr(LocalProcess, method, _raise)
            if act == "window-change":
                process.change_terminal_size(100, 40)
            elif act == "signal":
                process.send_signal("USR1")
            else:
                process.stdin.write(b"x\n")
            await asyncio.wait_for(process.wait_closed(), 30)
            output = await process.stdout.read() + await process.stderr.read()
            monkeypatch.undo()
            after = await asyncio.wait_for(conn.run("echo still here", encoding=None), 30)
            assert isinstance(after.stdout, bytes)
            return process.exit_status, bytes(output), after.stdout

    status, output, after = asyncio.run(run())
    assert status == 1
    assert b"msb-proxy: internal error: RuntimeError: a fault injected by the test" in output
    assert after == b"still here\n"


def test_the_connection_survives_without_asyncssh_s_internal_error(
    msb: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same fault with the containment undone ends the whole connection,
    so the test above proves something."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    from msb_proxy.server import session

    sandbox = f"session-fault-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    plain = session.GuestSession.terminal_size_changed.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(session.GuestSession, "terminal_size_changed", plain)

    async def run() -> None:
        async with _connect(msb, sandbox, ["aes128-ctr"]) as conn:
            process = await conn.create_process("echo ready; sleep 30", term_type="xterm",
                                                encoding=None)
            assert await process.stdout.readline() == b"ready\r\n"
            monkeypatch.setattr(LocalProcess, "resize", _raise)
            process.change_terminal_size(100, 40)
            with pytest.raises((asyncssh.Error, ConnectionError, asyncssh.ChannelOpenError)):
                await asyncio.wait_for(conn.run("echo never", encoding=None), 30)

    asyncio.run(run())


def test_a_bug_while_opening_the_sandbox_is_said_to_the_client(
    msb: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception other than a user-facing error while the login user is resolved: the
    client is disconnected with the reason, not dropped without one."""
    if msb.backend != "local":
        pytest.skip("serves the local backend in-process")
    from msb_proxy.backends.local.backend import LocalSandbox

    sandbox = f"session-fault-{uuid.uuid4().hex[:6]}"
    msb.host(sandbox)
    monkeypatch.setattr(LocalSandbox, "lookup_user", _raise_async)

    async def run() -> None:
        async with _connect(msb, sandbox, ["aes128-ctr"]):
            pass

    with pytest.raises(asyncssh.DisconnectError) as raised:
        asyncio.run(run())
    assert raised.value.reason == (
        "msb-proxy: internal error: RuntimeError: a fault injected by the test")


async def _raise_async(*args: object) -> None:
    raise RuntimeError("a fault injected by the test")
