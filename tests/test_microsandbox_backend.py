"""The microsandbox backend, driven through an in-process stand-in of the SDK.

microVMs cannot boot here, so ``MicrosandboxBackend`` gets ``microsandbox_standin`` as its SDK:
the same calls, event order and error messages, with each guest process played by a real host
process (see that module for where it differs). Every test runs its own event loop and fails if
the loop reports an error, such as a task exception nobody retrieved.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from microsandbox_standin import (
    READ_CHUNK,
    MicrosandboxError,
    RuntimeNotInstalledError,
    SandboxHandle,
    SandboxStatus,
    StandInSDK,
)

from msb_proxy.backends.base import ExitStatus, GuestUser, ProcessSpec, PtySpec
from msb_proxy.backends.microsandbox import (
    MicrosandboxBackend,
    MicrosandboxProcess,
    MicrosandboxSandbox,
)
from msb_proxy.errors import (
    BackendUnavailableError,
    SandboxError,
    SandboxNotRunningError,
    UnknownUserError,
)
from msb_proxy.state import StateDir

T = TypeVar("T")

TIMEOUT_S = 10.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ROOT = GuestUser(name="root", uid=0, gid=0, home="/root", shell="/bin/sh")
LOCAL_HINT = "use the local backend instead: --backend local or MSB_PROXY_BACKEND=local"
PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
"""
GROUP = """\
root:x:0:
adm:x:4:syslog,alice
sudo:x:27:alice,bob
docker:x:999:bob
alice:x:1000:
"""


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on a fresh loop; fail on anything the loop reports as an error."""
    problems: list[dict[str, Any]] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: problems.append(context))
        return await asyncio.wait_for(coroutine, TIMEOUT_S)

    result = asyncio.run(main())
    gc.collect()  # a task whose exception nobody retrieved reports it when collected
    assert problems == []
    return result


class Recorder:
    """A ProcessListener that keeps everything it is told."""

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.flow: list[str] = []
        self.exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._output = asyncio.Event()

    def output_received(self, data: bytes, stderr: bool) -> None:
        (self.stderr if stderr else self.stdout).extend(data)
        self._output.set()

    def stdin_paused(self) -> None:
        self.flow.append("paused")

    def stdin_resumed(self) -> None:
        self.flow.append("resumed")

    def process_exited(self, status: ExitStatus) -> None:
        assert not self.exited.done(), "process_exited reported twice"
        self.exited.set_result(status)

    async def stdout_contains(self, text: bytes) -> None:
        while text not in self.stdout:
            self._output.clear()
            await self._output.wait()


@pytest.fixture
def standin() -> Iterator[StandInSDK]:
    sdk = StandInSDK()
    yield sdk
    sdk.close()


@pytest.fixture
def guest_root(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


@pytest.fixture
def backend(standin: StandInSDK, guest_root: Path, tmp_path: Path) -> MicrosandboxBackend:
    standin.add_sandbox("api", guest_root)
    return MicrosandboxBackend(StateDir(tmp_path / "home"), sdk=standin)


def command(script: str, *args: str, pty: PtySpec | None = None, cwd: str = "/") -> ProcessSpec:
    """``/bin/sh -c script`` as root, the way an SSH exec request arrives."""
    return ProcessSpec(program="/bin/sh", argv=["sh", "-c", script, "sh", *args],
                       env={"PATH": PATH}, cwd=cwd, user=ROOT, pty=pty)


async def spawn(backend: MicrosandboxBackend, spec: ProcessSpec
                ) -> tuple[MicrosandboxProcess, Recorder]:
    sandbox = await backend.open("api")
    recorder = Recorder()
    return await sandbox.spawn(spec, recorder), recorder


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- open, stop, remove


def test_open_connects_to_a_running_sandbox(backend: MicrosandboxBackend) -> None:
    sandbox = run(backend.open("api"))
    assert isinstance(sandbox, MicrosandboxSandbox)
    assert sandbox.name == "api"


@pytest.mark.parametrize(("status", "next_step"), [
    (SandboxStatus.STOPPED, "start it with 'msb start api'"),
    (SandboxStatus.CRASHED, "start it with 'msb start api'"),
    (SandboxStatus.CREATED, "start it with 'msb start api'"),
    (SandboxStatus.PAUSED, "resume it with 'msb resume api'"),
    (SandboxStatus.STARTING, "wait for it to finish starting and try again"),
    (SandboxStatus.DRAINING, "wait for it to stop, then start it with 'msb start api'"),
])
def test_open_refuses_a_sandbox_that_is_not_running_and_does_not_start_it(
        backend: MicrosandboxBackend, standin: StandInSDK, status: SandboxStatus,
        next_step: str) -> None:
    standin.sandboxes["api"].status = status
    with pytest.raises(SandboxNotRunningError) as caught:
        run(backend.open("api"))
    assert str(caught.value) == (f"sandbox 'api' is not running (status: {status.value}); "
                                 f"{next_step}, or use --backend local")
    assert standin.sandboxes["api"].status == status


def test_open_reports_a_sandbox_that_stopped_while_connecting(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    get = standin.Sandbox.get

    async def get_then_stop(name: str) -> SandboxHandle:
        handle = await get(name)
        standin.sandboxes[name].status = SandboxStatus.STOPPED
        return handle

    standin.Sandbox.get = get_then_stop  # type: ignore[method-assign]
    with pytest.raises(SandboxNotRunningError) as caught:
        run(backend.open("api"))
    assert str(caught.value) == ("sandbox 'api' is not running (status: Stopped); "
                                 "start it with 'msb start api', or use --backend local")


def test_open_says_how_to_create_a_missing_sandbox(backend: MicrosandboxBackend) -> None:
    with pytest.raises(SandboxError) as caught:
        run(backend.open("nope"))
    assert type(caught.value) is SandboxError
    assert str(caught.value) == ("sandbox 'nope' does not exist; create it with "
                                 "'msb create --name nope IMAGE', or use --backend local")


@pytest.mark.parametrize("error", [
    RuntimeNotInstalledError("no complete host runtime pair could be found"),
    MicrosandboxError('failed to start "api": sandbox process exited (exit status: 1) '
                      "before agent relay became available"),
    MicrosandboxError("cannot open /dev/kvm: No such file or directory"),
])
def test_open_says_vms_cannot_run_here_and_names_the_local_backend(
        backend: MicrosandboxBackend, standin: StandInSDK, error: MicrosandboxError) -> None:
    standin.get_error = error
    with pytest.raises(BackendUnavailableError) as caught:
        run(backend.open("api"))
    assert str(caught.value) == f"microVMs cannot run on this host ({error}); {LOCAL_HINT}"


def test_open_reports_any_other_sdk_error_on_one_line(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.get_error = MicrosandboxError("database is locked\n  retry later")
    with pytest.raises(SandboxError) as caught:
        run(backend.open("api"))
    assert str(caught.value) == "sandbox 'api': database is locked retry later"


def test_stop_stops_a_running_sandbox_once(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    assert run(backend.stop("api")) is True
    assert standin.sandboxes["api"].status == SandboxStatus.STOPPED
    assert run(backend.stop("api")) is False
    assert run(backend.stop("nope")) is False


def test_remove_stops_and_deletes_a_sandbox(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    assert run(backend.remove("api")) is True
    assert "api" not in standin.sandboxes
    assert run(backend.remove("api")) is False


# ---- users


def test_lookup_user_reads_the_guests_passwd_and_group(
        backend: MicrosandboxBackend, guest_root: Path) -> None:
    async def scenario() -> tuple[GuestUser, GuestUser]:
        sandbox = await backend.open("api")
        first = await sandbox.lookup_user("alice")
        (guest_root / "etc" / "passwd").unlink()
        return first, await sandbox.lookup_user("alice")

    first, cached = run(scenario())
    assert first == GuestUser(name="alice", uid=1000, gid=1000, home="/home/alice",
                              shell="/bin/bash", groups=(4, 27, 1000))
    assert cached == first


def test_lookup_user_rejects_a_user_the_guest_does_not_have(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> None:
        sandbox = await backend.open("api")
        await sandbox.lookup_user("mallory")

    with pytest.raises(UnknownUserError) as caught:
        run(scenario())
    assert str(caught.value) == "sandbox 'api' has no user 'mallory'"


# ---- processes without a terminal


def test_exec_keeps_stdout_and_stderr_apart_and_reports_the_exit_code(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> Recorder:
        _, recorder = await spawn(backend, command("echo to-out; echo to-err >&2; exit 3"))
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert (bytes(recorder.stdout), bytes(recorder.stderr)) == (b"to-out\n", b"to-err\n")
    assert recorder.exited.result() == ExitStatus(code=3)


def test_exit_signal_is_reported_when_an_ssh_signal_kills_a_silent_process(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> ExitStatus:
        process, recorder = await spawn(backend, command("echo ready; exec sleep 30"))
        await recorder.stdout_contains(b"ready\n")
        process.send_signal(signal.SIGTERM)  # while a recv() waits on the silent process
        return await recorder.exited

    assert run(scenario()) == ExitStatus(signal=signal.SIGTERM)


def test_death_by_a_signal_nobody_sent_is_reported_as_exit_status_255(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> ExitStatus:
        _, recorder = await spawn(backend, command("kill -KILL $$"))
        return await recorder.exited

    assert run(scenario()) == ExitStatus(code=255)


def test_stdin_data_and_end_of_input_reach_the_process(backend: MicrosandboxBackend) -> None:
    async def scenario() -> Recorder:
        process, recorder = await spawn(backend, command("cat; echo done"))
        process.write_stdin(b"hello\n")
        process.write_stdin(b"world")
        process.close_stdin()
        process.write_stdin(b"after the end")
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert bytes(recorder.stdout) == b"hello\nworlddone\n"
    assert recorder.exited.result() == ExitStatus(code=0)


def test_output_is_not_pulled_from_the_guest_while_paused(
        backend: MicrosandboxBackend, tmp_path: Path) -> None:
    size = 4 << 20
    finished = tmp_path / "producer-finished"

    async def scenario() -> Recorder:
        process, recorder = await spawn(
            backend, command('head -c "$1" /dev/zero; touch "$2"', str(size), str(finished)))
        process.pause_output()
        delivered = len(recorder.stdout)
        await asyncio.sleep(0.5)
        assert len(recorder.stdout) == delivered <= 2 * READ_CHUNK
        assert not finished.exists()  # the producer is blocked on its full pipe
        assert not recorder.exited.done()
        process.resume_output()
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert bytes(recorder.stdout) == bytes(size)
    assert finished.exists()
    assert recorder.exited.result() == ExitStatus(code=0)


def test_stdin_backpressure_pauses_and_resumes_the_client(backend: MicrosandboxBackend) -> None:
    size = 1 << 20

    async def scenario() -> Recorder:
        process, recorder = await spawn(backend, command("sleep 0.3; wc -c"))
        for _ in range(size // (32 << 10)):
            process.write_stdin(bytes(32 << 10))
        assert recorder.flow == ["paused"]  # at once: nothing has been written yet
        process.close_stdin()
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert recorder.flow == ["paused", "resumed"]
    assert bytes(recorder.stdout).strip() == str(size).encode()


def test_login_shell_is_started_as_a_login_shell(backend: MicrosandboxBackend) -> None:
    spec = ProcessSpec(program="/bin/bash", argv=["-bash"], env={"PATH": PATH}, cwd="/",
                       user=ROOT)

    async def scenario() -> Recorder:
        process, recorder = await spawn(backend, spec)
        process.write_stdin(b"shopt -q login_shell && echo login-shell\n")
        process.close_stdin()
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert b"login-shell\n" in recorder.stdout
    assert recorder.exited.result() == ExitStatus(code=0)


def test_missing_working_directory_falls_back_to_root_with_sshds_note(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> Recorder:
        _, recorder = await spawn(backend, command("pwd", cwd="/home/ghost"))
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert bytes(recorder.stderr) == (
        b"Could not chdir to home directory /home/ghost: No such file or directory\n")
    assert bytes(recorder.stdout) == b"/\n"


def test_a_program_that_cannot_start_raises_sandbox_error(backend: MicrosandboxBackend) -> None:
    spec = ProcessSpec(program="/nonexistent/prog", argv=["prog"], env={}, cwd="/", user=ROOT)
    with pytest.raises(SandboxError) as caught:
        run(spawn(backend, spec))
    assert str(caught.value) == ('sandbox \'api\' cannot start /nonexistent/prog: spawn '
                                 '"/nonexistent/prog": No such file or directory (os error 2)')


def test_hangup_ends_the_process_and_is_safe_to_repeat(backend: MicrosandboxBackend) -> None:
    async def scenario() -> tuple[int, Recorder]:
        process, recorder = await spawn(backend, command("echo $$; exec sleep 30"))
        await recorder.stdout_contains(b"\n")
        pid = int(recorder.stdout)
        process.hangup()
        process.hangup()
        for _ in range(100):
            if not alive(pid):
                break
            await asyncio.sleep(0.02)
        return pid, recorder

    pid, recorder = run(scenario())
    assert not alive(pid)
    assert not recorder.exited.done()  # hung up: nobody is listening any more


def test_hangup_closes_stdin_of_work_that_survives_it(
        backend: MicrosandboxBackend, tmp_path: Path) -> None:
    finished = tmp_path / "input-ended"

    async def scenario() -> None:
        process, recorder = await spawn(
            backend, command('trap "" HUP; echo ready; cat >/dev/null; touch "$1"', str(finished)))
        await recorder.stdout_contains(b"ready\n")
        process.write_stdin(b"some input")
        process.hangup()
        for _ in range(100):
            if finished.exists():
                break
            await asyncio.sleep(0.02)

    run(scenario())
    assert finished.exists()


def test_hangup_after_exit_does_nothing(backend: MicrosandboxBackend) -> None:
    async def scenario() -> ExitStatus:
        process, recorder = await spawn(backend, command("exit 0"))
        status = await recorder.exited
        process.hangup()
        process.send_signal(signal.SIGTERM)
        process.write_stdin(b"ignored")
        await asyncio.sleep(0.05)
        return status

    assert run(scenario()) == ExitStatus(code=0)


# ---- processes on a terminal


def pty(**modes: int) -> PtySpec:
    return PtySpec(term="xterm", cols=100, rows=30, modes={int(k[1:]): v for k, v in modes.items()})


def test_terminal_has_the_requested_size_and_follows_resizes(
        backend: MicrosandboxBackend) -> None:
    script = "stty size; trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done"

    async def scenario() -> Recorder:
        process, recorder = await spawn(backend, command(script, pty=pty()))
        await recorder.stdout_contains(b"ready")
        process.resize(120, 40)
        await recorder.stdout_contains(b"40 120")
        process.send_signal(signal.SIGKILL)
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert bytes(recorder.stdout).startswith(b"30 100\r\nready\r\n")
    assert recorder.exited.result() == ExitStatus(signal=signal.SIGKILL)


def test_terminal_size_is_set_through_the_sdk_when_the_guest_stty_cannot(
        backend: MicrosandboxBackend, tmp_path: Path) -> None:
    shim = tmp_path / "bin" / "stty"  # an stty that can only report
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\n[ "$1" = size ] && exec /bin/stty size\nexit 1\n')
    shim.chmod(0o755)
    # The resize lands just after the start, so poll past the SDK's initial 24x80.
    script = ('for i in $(seq 100); do size=$(stty size); [ "$size" != "24 80" ] && break; '
              'sleep 0.02; done; echo "$size"')
    spec = ProcessSpec(program="/bin/sh", argv=["sh", "-c", script], cwd="/", user=ROOT,
                       pty=pty(), env={"PATH": f"{shim.parent}:{PATH}"})

    async def scenario() -> Recorder:
        _, recorder = await spawn(backend, spec)
        await recorder.exited
        return recorder

    assert bytes(run(scenario()).stdout) == b"30 100\r\n"


def test_terminal_sets_ssh_tty_to_its_own_path(backend: MicrosandboxBackend) -> None:
    async def scenario() -> Recorder:
        _, recorder = await spawn(backend, command('echo "$SSH_TTY"; tty', pty=pty()))
        await recorder.exited
        return recorder

    ssh_tty, tty = bytes(run(scenario()).stdout).decode().split()
    assert ssh_tty == tty
    assert ssh_tty.startswith("/dev/pts/")


def test_terminal_modes_from_pty_req_are_applied(backend: MicrosandboxBackend) -> None:
    modes = pty(m53=0, m1=7, m42=1)  # ECHO off, VINTR ^G, IUTF8 on

    async def scenario() -> Recorder:
        _, recorder = await spawn(backend, command("stty -a", pty=modes))
        await recorder.exited
        return recorder

    settings = bytes(run(scenario()).stdout).decode()
    assert "intr = ^G;" in settings
    assert "rows 30; columns 100;" in settings
    assert {"-echo", "iutf8"} <= set(settings.split())


def test_terminal_modes_are_applied_one_by_one_when_stty_refuses_one(
        backend: MicrosandboxBackend, tmp_path: Path) -> None:
    shim = tmp_path / "bin" / "stty"  # an stty that does not know iutf8, like some do not
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\nfor a; do [ "$a" = iutf8 ] && exit 1; done\n'
                    'exec /bin/stty "$@"\n')
    shim.chmod(0o755)
    spec = command("stty -a", pty=pty(m53=0, m1=7, m42=1))
    spec = ProcessSpec(program=spec.program, argv=spec.argv, cwd="/", user=ROOT, pty=spec.pty,
                       env={"PATH": f"{shim.parent}:{PATH}"})

    async def scenario() -> Recorder:
        _, recorder = await spawn(backend, spec)
        await recorder.exited
        return recorder

    settings = bytes(run(scenario()).stdout).decode()
    assert "intr = ^G;" in settings
    assert "rows 30; columns 100;" in settings
    assert "-echo" in settings.split()


# ---- the SDK behaviour that shapes the design


def test_sdk_handle_signal_waits_behind_a_pending_recv(standin: StandInSDK,
                                                       guest_root: Path) -> None:
    """Why signals and resizes go out of band: the handle's lock is held by ``recv()``."""
    standin.add_sandbox("api", guest_root)

    async def scenario() -> int:
        sandbox = await (await standin.Sandbox.get("api")).connect()
        handle = await sandbox.exec_stream("sleep", ["30"], env={"PATH": PATH})
        await handle.recv()  # STARTED
        pending = asyncio.ensure_future(handle.recv())
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle.signal(signal.SIGTERM), 0.2)
        pending.cancel()
        await handle.signal(signal.SIGTERM)
        code, _ = await handle.wait()
        return code

    assert run(scenario()) == -1  # how the agent reports any death by signal
