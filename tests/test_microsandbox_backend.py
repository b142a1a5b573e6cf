"""The microsandbox backend, driven through a stand-in of the SDK.

microVMs cannot boot here, so ``MicrosandboxBackend`` gets ``microsandbox_standin`` as its SDK:
the same calls, statuses, pull events and error messages, its state shared through a directory
so that separate processes race for real, and each guest process played by a real host process
(see that module for where it differs). Every test runs its own event loop and fails if the loop
reports an error, such as a task exception nobody retrieved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import termios
import time
import tracemalloc
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import Env, Run, install
from installations import children, proxy_of, wait_until
from microsandbox_standin import (
    BOOT_FAILURE_KVM,
    MicrosandboxError,
    Network,
    NetworkProfile,
    PullSession,
    RuntimeNotInstalledError,
    SandboxHandle,
    SandboxNotRunningError,
    SandboxStatus,
    StandInSDK,
)

from msb_proxy.backends.base import (
    ExitStatus,
    GuestProcess,
    GuestUser,
    ProcessSpec,
    PtySpec,
    SandboxInfo,
    SandboxState,
)
from msb_proxy.backends.microsandbox.backend import (
    LABELS,
    MicrosandboxBackend,
    MicrosandboxCloudBackend,
    MicrosandboxSandbox,
)
from msb_proxy.config import SandboxTemplate
from msb_proxy.errors import (
    BackendUnavailableError,
    ConfigError,
    SandboxError,
    SandboxNotFoundError,
    UnknownUserError,
)
from msb_proxy.progress import Progress
from msb_proxy.state import StateDir

T = TypeVar("T")
ExecEventSummary = tuple[str, int | None]

TIMEOUT_S = 10.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ROOT = GuestUser(name="root", uid=0, gid=0, home="/root", shell="/bin/sh")
LOCAL_HINT = "use the local backend instead: --backend local or MSB_PROXY_BACKEND=local"
MIB = 1 << 20
IMAGE = "alpine:3.20"
TEMPLATE = SandboxTemplate(options={"image": IMAGE})
READY = re.compile(r"msb-proxy: sandbox '(\w+)' ready in \d+\.\d s")
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


class Shown:
    """A ``Progress`` on a string, and the lines it wrote."""

    def __init__(self, interactive: bool = False, quiet: bool = False) -> None:
        self.stream = io.StringIO()
        self.progress = Progress(self.stream, quiet=quiet, interactive=interactive)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[str]:
        """The plain lines, the last one (``ready in N s``) with its time replaced by N."""
        lines = self.text.splitlines()
        if lines and READY.fullmatch(lines[-1]):
            lines[-1] = re.sub(r"in \S+ s$", "in N s", lines[-1])
        return lines


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandInSDK]:
    sdk = StandInSDK(tmp_path / "runtime")
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
def home(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "home")


@pytest.fixture
def backend(standin: StandInSDK, guest_root: Path, home: StateDir) -> MicrosandboxBackend:
    standin.add_sandbox("api", guest_root)
    standin.add_image(IMAGE, guest_root, layers=(3 * MIB, MIB))
    return MicrosandboxBackend(home, sdk=standin, wait_s=5.0)


def open_sandbox(backend: MicrosandboxBackend, name: str = "api",
                 template: SandboxTemplate = TEMPLATE,
                 progress: Progress | None = None) -> MicrosandboxSandbox:
    return run(backend.open(name, template, progress or Progress(quiet=True)))


def command(script: str, *args: str, pty: PtySpec | None = None, cwd: str = "/") -> ProcessSpec:
    """``/bin/sh -c script`` as root, the way an SSH exec request arrives."""
    return ProcessSpec(program="/bin/sh", argv=["sh", "-c", script, "sh", *args],
                       env={"PATH": PATH}, cwd=cwd, user=ROOT, pty=pty)


async def spawn(backend: MicrosandboxBackend, spec: ProcessSpec
                ) -> tuple[GuestProcess, Recorder]:
    sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
    recorder = Recorder()
    return await sandbox.spawn(spec, recorder), recorder


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def lifecycle_calls(standin: StandInSDK) -> list[tuple[str, str]]:
    return [(call["call"], call["name"]) for call in standin.calls()]


# ---- open: each status


def test_open_connects_to_a_running_sandbox_and_starts_nothing(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    shown = Shown()
    sandbox = open_sandbox(backend, progress=shown.progress)
    assert isinstance(sandbox, MicrosandboxSandbox)
    assert (sandbox.name, sandbox.started) == ("api", False)
    handle = run(standin.Sandbox.get("api"))
    assert sandbox.run_id == f"{handle.id}@{handle.updated_at!r}"
    assert lifecycle_calls(standin) == []
    assert shown.text == ""


@pytest.mark.parametrize("status", [SandboxStatus.STOPPED, SandboxStatus.CRASHED,
                                    SandboxStatus.CREATED])
def test_open_starts_a_stopped_crashed_or_created_sandbox_detached(
        backend: MicrosandboxBackend, standin: StandInSDK, status: SandboxStatus) -> None:
    standin.set_status("api", status)
    shown = Shown()
    sandbox = open_sandbox(backend, progress=shown.progress)
    assert sandbox.started is True
    assert standin.status_of("api") == SandboxStatus.RUNNING
    assert standin.calls() == [{"call": "start", "name": "api", "pid": os.getpid(),
                                "detached": True}]
    assert shown.lines() == ["msb-proxy: starting sandbox 'api' ...",
                             "msb-proxy: sandbox 'api' ready in N s"]


def test_open_resumes_a_paused_sandbox(backend: MicrosandboxBackend,
                                       standin: StandInSDK) -> None:
    async def pause() -> None:
        await (await standin.Sandbox.get("api")).pause()

    run(pause())
    assert standin.status_of("api") == SandboxStatus.PAUSED
    shown = Shown()
    sandbox = open_sandbox(backend, progress=shown.progress)
    assert sandbox.started is True
    assert standin.status_of("api") == SandboxStatus.RUNNING
    assert lifecycle_calls(standin) == [("pause", "api"), ("resume", "api")]
    assert shown.lines() == ["msb-proxy: resuming sandbox 'api' ...",
                             "msb-proxy: sandbox 'api' ready in N s"]


def test_open_waits_for_a_sandbox_another_tool_is_starting(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_status("api", SandboxStatus.STARTING, then=SandboxStatus.RUNNING, after=0.3)
    shown = Shown()
    began = time.monotonic()
    sandbox = open_sandbox(backend, progress=shown.progress)
    assert time.monotonic() - began >= 0.3
    assert sandbox.started is False  # the other tool started it
    assert lifecycle_calls(standin) == []
    assert shown.lines() == ["msb-proxy: waiting for sandbox 'api' to finish starting ...",
                             "msb-proxy: sandbox 'api' ready in N s"]


def test_open_waits_for_a_draining_sandbox_to_stop_and_then_starts_it(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_status("api", SandboxStatus.DRAINING, then=SandboxStatus.STOPPED, after=0.3)
    shown = Shown()
    sandbox = open_sandbox(backend, progress=shown.progress)
    assert sandbox.started is True
    assert lifecycle_calls(standin) == [("start", "api")]
    assert shown.lines() == ["msb-proxy: waiting for sandbox 'api' to finish stopping ...",
                             "msb-proxy: starting sandbox 'api' ...",
                             "msb-proxy: sandbox 'api' ready in N s"]


@pytest.mark.parametrize(("status", "message"), [
    (SandboxStatus.STARTING, "sandbox 'api' is still starting after 0.3 s; see 'msb logs api', "
                             "or stop it with 'msb stop --force api' and connect again"),
    (SandboxStatus.DRAINING, "sandbox 'api' is still stopping after 0.3 s; "
                             "stop it with 'msb stop --force api' and connect again"),
])
def test_open_gives_up_on_a_sandbox_that_never_finishes_starting_or_stopping(
        standin: StandInSDK, guest_root: Path, home: StateDir, status: SandboxStatus,
        message: str) -> None:
    standin.add_sandbox("api", guest_root, status)
    backend = MicrosandboxBackend(home, sdk=standin, wait_s=0.3)
    with pytest.raises(SandboxError) as caught:
        open_sandbox(backend)
    assert str(caught.value) == message
    assert standin.status_of("api") == status
    assert lifecycle_calls(standin) == []


def test_open_creates_a_missing_sandbox_from_its_template(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    async def scenario() -> tuple[MicrosandboxSandbox, GuestUser]:
        sandbox = await backend.open("web", TEMPLATE, Progress(quiet=True))
        return sandbox, await sandbox.lookup_user("alice")

    sandbox, alice = run(scenario())
    assert (sandbox.name, sandbox.started) == ("web", True)
    assert alice.uid == 1000
    assert standin.status_of("web") == SandboxStatus.RUNNING
    [create] = standin.calls("create")
    assert (create["name"], create["image"], create["detached"]) == (
        "web", {"kind": "oci", "reference": IMAGE}, True)
    handle = run(standin.Sandbox.get("web"))
    assert sandbox.run_id == f"{handle.id}@{handle.updated_at!r}"


def test_open_refuses_to_create_a_sandbox_its_template_does_not_allow(
        backend: MicrosandboxBackend, standin: StandInSDK, home: StateDir) -> None:
    with pytest.raises(SandboxNotFoundError) as caught:
        open_sandbox(backend, "web", SandboxTemplate(create=False, options={"image": IMAGE}))
    assert str(caught.value) == (
        "there is no sandbox 'web' and its template does not allow creating it; "
        f"set create = true for it in {home.home}/config.toml")
    assert lifecycle_calls(standin) == []


def test_open_says_how_to_name_an_image_when_the_template_has_none(
        backend: MicrosandboxBackend, standin: StandInSDK, home: StateDir) -> None:
    with pytest.raises(ConfigError) as caught:
        open_sandbox(backend, "web", SandboxTemplate())
    assert str(caught.value) == (
        "there is no sandbox 'web' and its template names no image to create it from; set "
        'image (an OCI image such as "debian:bookworm", or a root file system directory) for '
        f"it in {home.home}/config.toml")
    assert lifecycle_calls(standin) == []


# ---- open: what the template asks for


@pytest.mark.parametrize(("network", "policy"), [
    (None, None),
    ("none", Network.none()._to_dict()),
    ("public", Network.from_profiles(NetworkProfile.PUBLIC)._to_dict()),
    ("private", Network.from_profiles(NetworkProfile.PRIVATE)._to_dict()),
    ("host", Network.from_profiles(NetworkProfile.HOST)._to_dict()),
])
def test_template_options_reach_create_with_progress(
        backend: MicrosandboxBackend, standin: StandInSDK, tmp_path: Path,
        network: str | None, policy: dict[str, Any] | None) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "data").mkdir()
    template = SandboxTemplate(env={"APP_ENV": "dev", "EMPTY": ""}, options={
        "image": IMAGE, "cpus": 2, "memory": 1536, "workdir": "/srv/app", "network": network,
        "volumes": (f"{tmp_path}/work:/work", f"{tmp_path}/data:/data:ro")})
    open_sandbox(backend, "web", template)
    [create] = standin.calls("create")
    assert create == {
        "call": "create", "name": "web", "pid": os.getpid(), "detached": True,
        "image": {"kind": "oci", "reference": IMAGE}, "cpus": 2, "memory": 1536,
        "env": {"APP_ENV": "dev", "EMPTY": ""}, "workdir": "/srv/app",
        "volumes": {
            "/work": {"bind": f"{tmp_path}/work", "readonly": False, "noexec": False,
                      "nosuid": False, "nodev": False},
            "/data": {"bind": f"{tmp_path}/data", "readonly": True, "noexec": False,
                      "nosuid": False, "nodev": False},
        },
        "network": policy, "labels": LABELS, "idle_timeout": None,
    }


def test_unset_template_options_are_left_to_the_sdk(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    open_sandbox(backend, "web")
    [create] = standin.calls("create")
    assert {key: create[key] for key in ("cpus", "memory", "env", "workdir", "volumes",
                                          "network")} == dict.fromkeys(
        ("cpus", "memory", "env", "workdir", "volumes", "network"))


def test_a_directory_image_is_bound_as_the_root_file_system_without_a_pull(
        backend: MicrosandboxBackend, standin: StandInSDK, guest_root: Path) -> None:
    shown = Shown()
    sandbox = open_sandbox(backend, "web", SandboxTemplate(options={"image": str(guest_root)}),
                           shown.progress)
    assert sandbox.started is True
    [create] = standin.calls("create")
    assert create["image"] == {"kind": "bind", "path": str(guest_root)}
    assert shown.lines() == [f"msb-proxy: creating sandbox 'web' from {guest_root} ...",
                             "msb-proxy: sandbox 'web' ready in N s"]


def test_a_volume_whose_host_directory_is_missing_is_named(
        backend: MicrosandboxBackend, standin: StandInSDK, tmp_path: Path) -> None:
    template = SandboxTemplate(options={"image": IMAGE, "volumes": (f"{tmp_path}/gone:/data",)})
    with pytest.raises(ConfigError) as caught:
        open_sandbox(backend, "web", template)
    assert str(caught.value) == (
        f"sandbox 'web': volume '{tmp_path}/gone:/data': {tmp_path}/gone does not exist")
    assert lifecycle_calls(standin) == []


def test_a_template_the_sdk_refuses_is_a_config_error(
        backend: MicrosandboxBackend, standin: StandInSDK, home: StateDir,
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        open_sandbox(backend, "web", SandboxTemplate(options={"image": f"{tmp_path}/no-rootfs"}))
    assert str(caught.value) == (
        "sandbox 'web': the microsandbox SDK refuses its template (rootfs bind path does not "
        f"exist: {tmp_path}/no-rootfs); fix it in {home.home}/config.toml")
    assert standin.status_of("web") is None


# ---- open: image pulls shown


def test_pull_progress_is_plain_lines_by_the_quarter_off_a_terminal(
        backend: MicrosandboxBackend) -> None:
    shown = Shown()
    open_sandbox(backend, "web", progress=shown.progress)
    assert shown.lines() == [
        f"msb-proxy: creating sandbox 'web' from {IMAGE} ...",
        # bytes: a 3 MiB layer then a 1 MiB one, a quarter of a layer per event
        f"msb-proxy: pulling image {IMAGE}: 18%",
        f"msb-proxy: pulling image {IMAGE}: 37%",
        f"msb-proxy: pulling image {IMAGE}: 56%",
        f"msb-proxy: pulling image {IMAGE}: 75%",
        f"msb-proxy: pulling image {IMAGE}: 100%",
        "msb-proxy: starting sandbox 'web' ...",
        "msb-proxy: sandbox 'web' ready in N s",
    ]


def test_pull_progress_is_a_bar_redrawn_in_place_on_a_terminal(
        backend: MicrosandboxBackend) -> None:
    shown = Shown(interactive=True)
    open_sandbox(backend, "web", progress=shown.progress)
    redraws = shown.text.split("\r\x1b[K")
    assert redraws[0] == ""
    assert redraws[1] == f"msb-proxy: creating sandbox 'web' from {IMAGE} ..."
    bars = redraws[2:-2]
    assert bars[0] == f"msb-proxy: pulling image {IMAGE} [####....................]  18%"
    assert bars[-1] == f"msb-proxy: pulling image {IMAGE} [########################] 100%"
    assert len(bars) == 11  # 8 progress events, 2 layers complete, the pull complete
    assert redraws[-2] == "msb-proxy: starting sandbox 'web' ..."
    assert READY.fullmatch(redraws[-1].removesuffix("\n"))
    assert shown.text.count("\n") == 1  # one line, redrawn, ended once


def test_pull_progress_counts_layers_when_the_registry_gives_no_sizes(
        backend: MicrosandboxBackend, standin: StandInSDK, guest_root: Path) -> None:
    standin.add_image("busybox:1", guest_root, layers=(MIB, MIB), sizes_known=False)
    shown = Shown()
    open_sandbox(backend, "web", SandboxTemplate(options={"image": "busybox:1"}), shown.progress)
    assert [line for line in shown.lines() if "pulling" in line] == [
        "msb-proxy: pulling image busybox:1: 0%",
        "msb-proxy: pulling image busybox:1: 50%",
        "msb-proxy: pulling image busybox:1: 100%",
    ]


def test_an_image_already_pulled_shows_no_pull(backend: MicrosandboxBackend) -> None:
    open_sandbox(backend, "web")
    shown = Shown()
    open_sandbox(backend, "web2", progress=shown.progress)
    assert shown.lines() == [f"msb-proxy: creating sandbox 'web2' from {IMAGE} ...",
                             "msb-proxy: sandbox 'web2' ready in N s"]


def test_quiet_progress_shows_nothing_at_all(backend: MicrosandboxBackend,
                                             standin: StandInSDK) -> None:
    shown = Shown(interactive=True, quiet=True)
    open_sandbox(backend, "web", progress=shown.progress)
    standin.set_status("api", SandboxStatus.STOPPED)
    open_sandbox(backend, "api", progress=shown.progress)
    assert shown.text == ""


def test_an_image_that_cannot_be_pulled_is_named(
        backend: MicrosandboxBackend, standin: StandInSDK, home: StateDir) -> None:
    with pytest.raises(SandboxError) as caught:
        open_sandbox(backend, "web", SandboxTemplate(options={"image": "nope:1"}))
    # The SDK says so in a plain MicrosandboxError, not ImagePullFailedError.
    assert str(caught.value) == (
        "cannot pull image 'nope:1' for sandbox 'web' (image error: registry error: error "
        "sending request for url (https://registry-1.docker.io/v2/nope/manifests/1)); check the "
        f"image name and the network, or set another image in {home.home}/config.toml")
    assert standin.status_of("web") is None


# ---- open: errors and races with other tools


@pytest.mark.parametrize("error", [
    RuntimeNotInstalledError("no complete host runtime pair could be found"),
    MicrosandboxError("cannot open /dev/kvm: No such file or directory"),
])
def test_open_says_vms_cannot_run_here_and_names_the_local_backend(
        backend: MicrosandboxBackend, standin: StandInSDK, error: MicrosandboxError) -> None:
    standin.set_error("get", error)
    with pytest.raises(BackendUnavailableError) as caught:
        open_sandbox(backend)
    assert str(caught.value) == f"microVMs cannot run on this host ({error}); {LOCAL_HINT}"


def test_a_vm_that_kvm_cannot_run_names_the_local_backend_on_create_and_on_start(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.fail_boot(BOOT_FAILURE_KVM)
    for _ in range(2):  # created, and left stopped; then started again
        with pytest.raises(BackendUnavailableError) as caught:
            open_sandbox(backend, "web")
        assert str(caught.value) == (
            "microVMs cannot run on this host: sandbox 'web' died while booting "
            "(msb_krun_vmm::linux::vstate: Received KVM_EXIT_INTERNAL_ERROR signal); "
            f"{LOCAL_HINT}")
        assert standin.status_of("web") == SandboxStatus.STOPPED
    assert lifecycle_calls(standin) == [("create", "web"), ("start", "web")]


def test_a_vm_that_dies_booting_for_its_own_reasons_is_not_blamed_on_the_host(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_status("api", SandboxStatus.STOPPED)
    standin.fail_boot(["INFO microsandbox_runtime::runner::vm: guest kernel started",
                       "ERROR microsandbox_runtime::runner::vm: guest init exited: status 127",
                       "INFO msb_krun_vmm: Vmm is stopping."])
    with pytest.raises(SandboxError) as caught:
        open_sandbox(backend)
    assert str(caught.value) == (
        "sandbox 'api' failed to boot: microsandbox_runtime::runner::vm: guest init exited: "
        "status 127; see 'msb logs api'")


def test_a_boot_failure_without_a_reason_in_the_log_says_what_the_sdk_said(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.fail_boot([])
    with pytest.raises(SandboxError) as caught:
        open_sandbox(backend, "web")
    assert str(caught.value) == (
        "sandbox 'web' failed to boot: failed to start \"web\": sandbox process exited (exit "
        "status: 1) before agent relay became available; see 'msb logs web'")


def test_open_reports_any_other_sdk_error_on_one_line(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_error("get", MicrosandboxError("database is locked\n  retry later"))
    with pytest.raises(SandboxError) as caught:
        open_sandbox(backend)
    assert str(caught.value) == "sandbox 'api': database is locked retry later"


def test_open_starts_a_sandbox_that_stopped_while_it_was_connecting(
        backend: MicrosandboxBackend, standin: StandInSDK,
        monkeypatch: pytest.MonkeyPatch) -> None:
    get = standin.Sandbox.get
    stopped: list[str] = []

    async def get_then_stop(name: str) -> SandboxHandle:
        handle = await get(name)
        if not stopped:
            stopped.append(name)
            standin.set_status(name, SandboxStatus.STOPPED)  # by some other tool
        return handle

    monkeypatch.setattr(standin.Sandbox, "get", get_then_stop)
    # connect() on the stale handle dials a relay that is gone: a generic SDK error, told
    # apart from a real failure by reading the status again.
    sandbox = open_sandbox(backend)
    assert sandbox.started is True
    assert lifecycle_calls(standin) == [("start", "api")]


def test_open_uses_a_sandbox_another_tool_created_while_it_was_creating_it(
        backend: MicrosandboxBackend, standin: StandInSDK, guest_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    create = standin.Sandbox.create_with_progress

    def created_elsewhere_first(name: str, **options: Any) -> PullSession:
        standin.add_sandbox(name, guest_root)
        return create(name, **options)

    monkeypatch.setattr(standin.Sandbox, "create_with_progress", created_elsewhere_first)
    sandbox = open_sandbox(backend, "web")
    assert sandbox.started is False
    assert standin.status_of("web") == SandboxStatus.RUNNING


def test_open_gives_up_on_a_sandbox_that_keeps_changing_under_it(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_error("connect", SandboxNotRunningError(
        "sandbox 'api' is not running (status: Stopped)"))
    with pytest.raises(SandboxError) as caught:
        open_sandbox(backend)
    assert str(caught.value) == (
        "sandbox 'api' kept changing state while msb-proxy brought it up (is another tool "
        "starting and stopping it?); try again")


def test_open_says_when_it_waits_for_another_msb_proxy(
        backend: MicrosandboxBackend, home: StateDir) -> None:
    holder = os.open(home.lock_file("api"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    shown = Shown()

    async def scenario() -> MicrosandboxSandbox:
        asyncio.get_running_loop().call_later(0.8, os.close, holder)
        return await backend.open("api", TEMPLATE, shown.progress)

    assert run(scenario()).started is False
    assert shown.lines() == [
        "msb-proxy: waiting for another msb-proxy to bring up sandbox 'api' ...",
        "msb-proxy: sandbox 'api' ready in N s"]


def test_open_gives_up_on_a_lock_held_too_long(
        standin: StandInSDK, guest_root: Path, home: StateDir) -> None:
    standin.add_sandbox("api", guest_root)
    backend = MicrosandboxBackend(home, sdk=standin, lock_wait_s=0.2)
    holder = os.open(home.lock_file("api"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(SandboxError) as caught:
            open_sandbox(backend)
    finally:
        os.close(holder)
    assert str(caught.value) == (
        "sandbox 'api' is still being created, started or stopped by another msb-proxy after "
        "0.2 s; try again later, or see 'msb logs api'")


# ---- open: many processes at once

_CONNECT = """
import asyncio, json, os, sys, time
from pathlib import Path
from microsandbox_standin import StandInSDK
from msb_proxy.backends.microsandbox.backend import MicrosandboxBackend
from msb_proxy.config import SandboxTemplate
from msb_proxy.progress import Progress
from msb_proxy.state import StateDir

runtime, home, barrier = map(Path, sys.argv[1:4])
backend = MicrosandboxBackend(StateDir(home), sdk=StandInSDK(runtime))
(barrier / str(os.getpid())).touch()
while not (barrier / "go").exists():
    time.sleep(0.001)

async def connect():
    template = SandboxTemplate(options={"image": sys.argv[4]})
    sandbox = await backend.open("race", template, Progress(quiet=True))
    user = await sandbox.lookup_user("alice")
    return {"started": sandbox.started, "run_id": sandbox.run_id, "uid": user.uid}

print(json.dumps(asyncio.run(connect())))
"""


@pytest.mark.parametrize("status", [None, SandboxStatus.STOPPED])
def test_sixteen_processes_at_once_create_or_start_a_sandbox_exactly_once(
        standin: StandInSDK, guest_root: Path, tmp_path: Path,
        status: SandboxStatus | None) -> None:
    standin.add_image(IMAGE, guest_root)
    if status is not None:
        standin.add_sandbox("race", guest_root, status)
    # Long enough that all the others arrive while the first is still at it.
    standin.set_delay("create", 0.5)
    standin.set_delay("start", 0.5)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    processes = [
        subprocess.Popen([sys.executable, "-c", _CONNECT, str(tmp_path / "runtime"),
                          str(tmp_path / "home"), str(barrier), IMAGE],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for _ in range(16)]
    try:
        deadline = time.monotonic() + 60
        while len(list(barrier.iterdir())) < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        (barrier / "go").touch()
        outcomes = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert [(process.returncode, stderr) for process, (_, stderr) in
            zip(processes, outcomes, strict=True)] == [(0, "")] * 16
    results = [json.loads(stdout) for stdout, _ in outcomes]
    assert sorted(result["started"] for result in results) == [False] * 15 + [True]
    assert len({result["run_id"] for result in results}) == 1
    assert {result["uid"] for result in results} == {1000}
    expected = "create" if status is None else "start"
    assert lifecycle_calls(standin) == [(expected, "race")]
    assert standin.status_of("race") == SandboxStatus.RUNNING


# ---- run ids, state, list, stop, remove


def test_run_id_is_kept_while_running_and_changes_with_every_start(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    first = open_sandbox(backend)
    assert first.run_id
    assert open_sandbox(backend).run_id == first.run_id
    assert run(backend.current_run("api")) == first.run_id
    assert run(backend.stop("api")) is True
    assert run(backend.current_run("api")) is None
    second = open_sandbox(backend)
    assert (second.started, second.run_id != first.run_id) == (True, True)
    assert run(backend.current_run("api")) == second.run_id
    assert run(backend.remove("api")) is True
    assert run(backend.current_run("api")) is None
    third = open_sandbox(backend)  # made again under the same name
    assert third.started is True
    assert third.run_id not in (first.run_id, second.run_id)


@pytest.mark.parametrize("status", list(SandboxStatus))
def test_state_of_spells_every_status(backend: MicrosandboxBackend, standin: StandInSDK,
                                      status: SandboxStatus) -> None:
    standin.set_status("api", status)
    assert run(backend.state_of("api")) == status.value
    assert run(backend.state_of("nope")) is None


def test_list_gives_the_sandboxes_msb_proxy_made_by_name_across_pages(
        backend: MicrosandboxBackend, standin: StandInSDK, guest_root: Path) -> None:
    standin.add_sandbox("db", guest_root, SandboxStatus.STOPPED, labels=LABELS)
    standin.add_sandbox("cache", guest_root, SandboxStatus.PAUSED, labels=LABELS)
    standin.add_sandbox("web", guest_root, SandboxStatus.CRASHED, labels=LABELS)
    standin.set_page_size(2)
    open_sandbox(backend, "new")  # created by msb-proxy: labelled
    assert run(backend.list()) == [
        SandboxInfo(name="cache", state=SandboxState.PAUSED, backend="microsandbox"),
        SandboxInfo(name="db", state=SandboxState.STOPPED, backend="microsandbox"),
        SandboxInfo(name="new", state=SandboxState.RUNNING, backend="microsandbox"),
        SandboxInfo(name="web", state=SandboxState.CRASHED, backend="microsandbox"),
    ]


def test_list_all_adds_the_sandboxes_other_tools_made(
        backend: MicrosandboxBackend, standin: StandInSDK, guest_root: Path) -> None:
    standin.add_sandbox("db", guest_root, SandboxStatus.STOPPED, labels=LABELS)
    assert [info.name for info in run(backend.list())] == ["db"]
    assert [info.name for info in run(backend.list_all())] == ["api", "db"]


def test_stop_stops_a_running_sandbox_once_and_names_a_missing_one(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    assert run(backend.stop("api")) is True
    assert standin.status_of("api") == SandboxStatus.STOPPED
    assert run(backend.stop("api")) is False
    with pytest.raises(SandboxNotFoundError) as caught:
        run(backend.stop("nope"))
    assert str(caught.value) == "there is no sandbox 'nope'"
    assert lifecycle_calls(standin) == [("stop", "api")]


def test_stop_stops_a_paused_sandbox(backend: MicrosandboxBackend,
                                     standin: StandInSDK) -> None:
    standin.set_status("api", SandboxStatus.PAUSED)
    assert run(backend.stop("api")) is True
    assert standin.status_of("api") == SandboxStatus.STOPPED


def test_remove_stops_and_deletes_a_sandbox(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    assert run(backend.remove("api")) is True
    assert standin.status_of("api") is None
    assert run(backend.remove("api")) is False
    assert lifecycle_calls(standin) == [("stop", "api"), ("remove", "api")]


# ---- users


def test_lookup_user_reads_the_guests_passwd_and_group(
        backend: MicrosandboxBackend, guest_root: Path) -> None:
    async def scenario() -> tuple[GuestUser, GuestUser]:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        first = await sandbox.lookup_user("alice")
        (guest_root / "etc" / "passwd").unlink()
        return first, await sandbox.lookup_user("alice")

    first, cached = run(scenario())
    assert first == GuestUser(name="alice", uid=1000, gid=1000, home="/home/alice",
                              shell="/bin/bash", groups=(4, 27, 1000))
    assert cached == first


def test_a_guest_without_passwd_has_no_users_and_without_group_no_extra_groups(
        backend: MicrosandboxBackend, guest_root: Path) -> None:
    (guest_root / "etc" / "group").unlink()

    async def scenario() -> GuestUser:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        alice = await sandbox.lookup_user("alice")
        (guest_root / "etc" / "passwd").unlink()
        with pytest.raises(UnknownUserError):  # the SDK's FilesystemError, understood
            await sandbox.lookup_user("root")
        return alice

    assert run(scenario()).groups == (1000,)


def test_a_guest_passwd_that_cannot_be_read_is_a_sandbox_error(
        backend: MicrosandboxBackend, guest_root: Path) -> None:
    (guest_root / "etc" / "passwd").unlink()
    (guest_root / "etc" / "passwd").mkdir()

    async def scenario() -> None:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        await sandbox.lookup_user("root")

    with pytest.raises(SandboxError) as caught:
        run(scenario())
    assert str(caught.value) == ("sandbox 'api': cannot read /etc/passwd: sandbox fs error: "
                                 "open: Is a directory (os error 21)")


def test_file_reads_while_a_process_starts_never_meet_a_busy_sandbox(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> tuple[GuestUser, ExitStatus]:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        recorder = Recorder()
        # The SDK's fs getter raises "sandbox is busy" while an exec_stream is in flight.
        _, user = await asyncio.gather(sandbox.spawn(command("exit 0"), recorder),
                                       sandbox.lookup_user("alice"))
        return user, await recorder.exited

    user, status = run(scenario())
    assert (user.uid, status) == (1000, ExitStatus(code=0))


def test_lookup_user_rejects_a_user_the_guest_does_not_have(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> None:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        await sandbox.lookup_user("mallory")

    with pytest.raises(UnknownUserError) as caught:
        run(scenario())
    assert str(caught.value) == "sandbox 'api' has no user 'mallory'"


# ---- processes: through the guest agent, or (a guest without python3) one exec each


@pytest.fixture(params=["agent", "direct"])
def either(request: pytest.FixtureRequest, backend: MicrosandboxBackend,
           standin: StandInSDK) -> MicrosandboxBackend:
    """The backend, on a guest with python3 (the agent) and on one without (direct)."""
    if request.param == "direct":
        standin.remove_program("python3")
    return backend


def through(request: pytest.FixtureRequest) -> str:
    """Which of ``either``'s two a test runs with: "agent" or "direct"."""
    mode: str = request.node.callspec.params["either"]
    return mode


@pytest.fixture
def direct(backend: MicrosandboxBackend, standin: StandInSDK) -> MicrosandboxBackend:
    """The backend on a guest without python3: one exec_stream per process."""
    standin.remove_program("python3")
    return backend


def python(code: str, *args: str, pty: PtySpec | None = None, cwd: str = "/",
           env: dict[str, str] | None = None) -> ProcessSpec:
    """``python3 -c code`` in the guest, by absolute path (no PATH lookup; and as its argv[0],
    from which Python finds its own library)."""
    return ProcessSpec(program=sys.executable, argv=[sys.executable, "-c", code, *args],
                       env=env if env is not None else {"PATH": PATH}, cwd=cwd, user=ROOT,
                       pty=pty)


async def finished(backend: MicrosandboxBackend, spec: ProcessSpec) -> Recorder:
    _, recorder = await spawn(backend, spec)
    await recorder.exited
    return recorder


def test_exec_keeps_stdout_and_stderr_apart_and_reports_the_exit_code(
        either: MicrosandboxBackend) -> None:
    recorder = run(finished(either, command("echo to-out; echo to-err >&2; exit 3")))
    assert (bytes(recorder.stdout), bytes(recorder.stderr)) == (b"to-out\n", b"to-err\n")
    assert recorder.exited.result() == ExitStatus(code=3)


def test_exit_signal_is_reported_when_an_ssh_signal_kills_a_silent_process(
        either: MicrosandboxBackend) -> None:
    async def scenario() -> ExitStatus:
        process, recorder = await spawn(either, command("echo ready; exec sleep 30"))
        await recorder.stdout_contains(b"ready\n")
        process.send_signal(signal.SIGTERM)  # while the process is silent
        return await recorder.exited

    assert run(scenario()) == ExitStatus(signal=signal.SIGTERM)


FATAL_SIGNALS = [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGILL, signal.SIGTRAP,
                 signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGKILL, signal.SIGUSR1,
                 signal.SIGSEGV, signal.SIGUSR2, signal.SIGPIPE, signal.SIGALRM, signal.SIGTERM,
                 signal.SIGXCPU, signal.SIGXFSZ, signal.SIGVTALRM, signal.SIGPROF,
                 signal.SIGSYS]


@pytest.mark.parametrize("signum", FATAL_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_every_death_by_a_signal_nobody_sent_is_an_exit_signal(
        backend: MicrosandboxBackend, signum: int) -> None:
    # Python's own SIGPIPE and SIGINT handling undone: the death is the kernel's default.
    default = "" if signum == signal.SIGKILL else f"signal.signal({int(signum)}, signal.SIG_DFL); "
    kill_itself = ("import os, resource, signal; resource.setrlimit(resource.RLIMIT_CORE, "
                   f"(0, 0)); {default}os.kill(os.getpid(), {int(signum)})")
    assert run(finished(backend, python(kill_itself))).exited.result() == \
        ExitStatus(signal=signum)


def test_a_core_dump_is_reported_with_its_flag(backend: MicrosandboxBackend,
                                               tmp_path: Path) -> None:
    if Path("/proc/sys/kernel/core_pattern").read_text().startswith("|"):
        pytest.skip("cores go to a helper program here: whether one is dumped is its choice")
    spec = command("ulimit -c unlimited; kill -QUIT $$", cwd=str(tmp_path))
    assert run(finished(backend, spec)).exited.result() == \
        ExitStatus(signal=signal.SIGQUIT, core_dumped=True)


def test_without_the_agent_a_death_by_a_signal_nobody_sent_is_exit_status_255(
        direct: MicrosandboxBackend) -> None:
    """The runtime's agent reports every death by signal as -1 (crates/agentd/lib/process.rs):
    the signal is lost, and 255 is what OpenSSH's client itself exits with after one."""
    assert run(finished(direct, command("kill -KILL $$"))).exited.result() == \
        ExitStatus(code=255)


def test_stdin_data_and_end_of_input_reach_the_process(either: MicrosandboxBackend) -> None:
    async def scenario() -> Recorder:
        process, recorder = await spawn(either, command("cat; echo done"))
        process.write_stdin(b"hello\n")
        process.write_stdin(b"world")
        process.close_stdin()
        process.write_stdin(b"after the end")
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert bytes(recorder.stdout) == b"hello\nworlddone\n"
    assert recorder.exited.result() == ExitStatus(code=0)


def test_stdin_backpressure_pauses_and_resumes_the_client(either: MicrosandboxBackend) -> None:
    size = 1 << 20

    async def scenario() -> Recorder:
        process, recorder = await spawn(either, command("sleep 0.3; wc -c"))
        for _ in range(size // (32 << 10)):
            process.write_stdin(bytes(32 << 10))
        assert recorder.flow == ["paused"]  # at once: the guest has taken nothing yet
        process.close_stdin()
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert recorder.flow == ["paused", "resumed"]
    assert bytes(recorder.stdout).strip() == str(size).encode()


def test_login_shell_gets_its_dash_argv0(backend: MicrosandboxBackend) -> None:
    spec = ProcessSpec(program="/bin/bash", argv=["-bash"], env={"PATH": PATH}, cwd="/",
                       user=ROOT)

    async def scenario() -> Recorder:
        process, recorder = await spawn(backend, spec)
        process.write_stdin(b'echo "$0"; shopt -q login_shell && echo login-shell\n')
        process.close_stdin()
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert recorder.stdout.endswith(b"-bash\nlogin-shell\n")
    assert recorder.exited.result() == ExitStatus(code=0)


def test_without_the_agent_a_login_shell_is_started_with_dash_l(
        direct: MicrosandboxBackend) -> None:
    spec = ProcessSpec(program="/bin/bash", argv=["-bash"], env={"PATH": PATH}, cwd="/",
                       user=ROOT)

    async def scenario() -> Recorder:
        process, recorder = await spawn(direct, spec)
        process.write_stdin(b'echo "$0"; shopt -q login_shell && echo login-shell\n')
        process.close_stdin()
        await recorder.exited
        return recorder

    assert run(scenario()).stdout.endswith(b"/bin/bash\nlogin-shell\n")


def test_the_session_gets_exactly_its_environment(either: MicrosandboxBackend,
                                                  request: pytest.FixtureRequest) -> None:
    spec = python("import os; print(sorted(os.environ.items()))",
                  env={"PATH": PATH, "LANG": "C.UTF-8"}) if through(request) == "agent" \
        else command("echo $PATH")
    printed = bytes(run(finished(either, spec)).stdout).decode().strip()
    if through(request) == "agent":
        assert printed == repr(sorted({"PATH": PATH, "LANG": "C.UTF-8"}.items()))
    else:  # the runtime's agent puts its scripts first (crates/agentd/lib/agent.rs)
        assert printed == f"/.msb/scripts:{PATH}"


def test_missing_working_directory_falls_back_to_root_with_sshds_note(
        either: MicrosandboxBackend) -> None:
    recorder = run(finished(either, command("pwd", cwd="/home/ghost")))
    assert bytes(recorder.stderr) == (
        b"Could not chdir to home directory /home/ghost: No such file or directory\n")
    assert bytes(recorder.stdout) == b"/\n"


def test_missing_working_directory_on_a_terminal_says_so_there(
        backend: MicrosandboxBackend) -> None:
    recorder = run(finished(backend, command("pwd", cwd="/home/ghost", pty=pty())))
    assert bytes(recorder.stdout) == (
        b"Could not chdir to home directory /home/ghost: No such file or directory\r\n/\r\n")


def test_a_program_that_cannot_start_raises_sandbox_error(
        either: MicrosandboxBackend, request: pytest.FixtureRequest) -> None:
    spec = ProcessSpec(program="/nonexistent/prog", argv=["prog"], env={}, cwd="/", user=ROOT)
    with pytest.raises(SandboxError) as caught:
        run(spawn(either, spec))
    reason = "No such file or directory" if through(request) == "agent" else \
        'spawn "/nonexistent/prog": No such file or directory (os error 2)'
    assert str(caught.value) == f"sandbox 'api' cannot start /nonexistent/prog: {reason}"


def test_a_program_missing_on_a_terminal_raises_sandbox_error(
        backend: MicrosandboxBackend) -> None:
    spec = ProcessSpec(program="nonexistent-prog", argv=["prog"], env={"PATH": PATH}, cwd="/",
                       user=ROOT, pty=pty())
    with pytest.raises(SandboxError) as caught:
        run(spawn(backend, spec))
    assert str(caught.value) == \
        "sandbox 'api' cannot start nonexistent-prog: No such file or directory"


def test_hangup_ends_the_process_and_is_safe_to_repeat(either: MicrosandboxBackend) -> None:
    async def scenario() -> tuple[int, Recorder]:
        process, recorder = await spawn(either, command("echo $$; exec sleep 30"))
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
        either: MicrosandboxBackend, tmp_path: Path) -> None:
    finished_marker = tmp_path / "input-ended"

    async def scenario() -> None:
        process, recorder = await spawn(
            either, command('trap "" HUP; echo ready; cat >/dev/null; touch "$1"',
                            str(finished_marker)))
        await recorder.stdout_contains(b"ready\n")
        process.write_stdin(b"some input")
        process.hangup()
        for _ in range(100):
            if finished_marker.exists():
                break
            await asyncio.sleep(0.02)

    run(scenario())
    assert finished_marker.exists()


def test_hangup_after_exit_does_nothing(either: MicrosandboxBackend) -> None:
    async def scenario() -> ExitStatus:
        process, recorder = await spawn(either, command("exit 0"))
        status = await recorder.exited
        process.hangup()
        process.send_signal(signal.SIGTERM)
        process.write_stdin(b"ignored")
        await asyncio.sleep(0.05)
        return status

    assert run(scenario()) == ExitStatus(code=0)


def test_close_output_makes_the_next_write_fail_with_sigpipe(backend: MicrosandboxBackend
                                                             ) -> None:
    async def scenario() -> ExitStatus:
        process, recorder = await spawn(backend, command("while :; do echo y; done"))
        await recorder.stdout_contains(b"y\n")
        process.close_output()  # eow@openssh.com: 'ssh host yes | head -1'
        return await recorder.exited

    assert run(scenario()) == ExitStatus(signal=signal.SIGPIPE)


# ---- processes on a terminal


def pty(**modes: int) -> PtySpec:
    return PtySpec(term="xterm", cols=100, rows=30, modes={int(k[1:]): v for k, v in modes.items()})


def test_terminal_has_the_requested_size_and_follows_resizes(
        either: MicrosandboxBackend) -> None:
    script = "stty size; trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done"

    async def scenario() -> Recorder:
        process, recorder = await spawn(either, command(script, pty=pty()))
        await recorder.stdout_contains(b"ready")
        process.resize(120, 40)
        await recorder.stdout_contains(b"40 120")
        process.send_signal(signal.SIGKILL)
        await recorder.exited
        return recorder

    recorder = run(scenario())
    assert bytes(recorder.stdout).startswith(b"30 100\r\nready\r\n")
    assert recorder.exited.result() == ExitStatus(signal=signal.SIGKILL)


_SHOW_TERMINAL = """
import fcntl, os, struct, sys, termios
rows, cols, px, py = struct.unpack("HHHH", fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8)))
attrs = termios.tcgetattr(0)
print(rows, cols, px, py, bool(attrs[3] & termios.ECHO), attrs[6][termios.VINTR],
      bool(attrs[0] & 0o040000), os.environ.get("SSH_TTY") == os.ttyname(0),
      os.getpgrp() == os.getsid(0) == os.tcgetpgrp(0))
"""


def test_terminal_size_pixels_and_modes_are_set_without_stty_or_a_shell(
        backend: MicrosandboxBackend) -> None:
    """The agent's own openpty: nothing from the guest's PATH is needed."""
    terminal = PtySpec(term="xterm", cols=100, rows=30, pixel_width=800, pixel_height=600,
                       modes={53: 0, 1: 7, 42: 1})  # ECHO off, VINTR ^G, IUTF8 on
    printed = bytes(run(finished(backend, python(_SHOW_TERMINAL, pty=terminal,
                                                 env={"PATH": "/nonexistent"}))).stdout)
    # size, pixels, echo, intr, iutf8, SSH_TTY, session leader and foreground of its terminal
    assert printed == b"30 100 800 600 False b'\\x07' True True True\r\n"


def test_terminal_sets_ssh_tty_to_its_own_path(either: MicrosandboxBackend) -> None:
    recorder = run(finished(either, command('echo "$SSH_TTY"; tty', pty=pty())))
    ssh_tty, tty = bytes(recorder.stdout).decode().split()
    assert ssh_tty == tty
    assert ssh_tty.startswith("/dev/pts/")


def test_ctrl_c_on_a_terminal_interrupts_the_foreground_job(backend: MicrosandboxBackend
                                                            ) -> None:
    async def scenario() -> ExitStatus:
        process, recorder = await spawn(backend, command("echo ready; exec sleep 30",
                                                         pty=pty()))
        await recorder.stdout_contains(b"ready")
        process.write_stdin(b"\x03")
        return await recorder.exited

    assert run(scenario()) == ExitStatus(signal=signal.SIGINT)


def test_a_break_is_sent_on_a_terminal_only(backend: MicrosandboxBackend) -> None:
    async def scenario() -> tuple[bool, bool]:
        on_terminal, _ = await spawn(backend, command("exec sleep 30", pty=pty()))
        on_pipes, _ = await spawn(backend, command("exec sleep 30"))
        sent = on_terminal.send_break(300), on_pipes.send_break(300)
        on_terminal.hangup()
        on_pipes.hangup()
        return sent

    assert run(scenario()) == (True, False)


def test_without_the_agent_terminal_modes_come_from_the_guests_stty(
        direct: MicrosandboxBackend) -> None:
    settings = bytes(run(finished(direct, command(
        "stty -a", pty=pty(m53=0, m1=7, m42=1)))).stdout).decode()
    assert "intr = ^G;" in settings
    assert "rows 30; columns 100;" in settings
    assert {"-echo", "iutf8"} <= set(settings.split())


def test_without_the_agent_terminal_modes_are_applied_one_by_one_when_stty_refuses_one(
        direct: MicrosandboxBackend, tmp_path: Path) -> None:
    shim = tmp_path / "bin" / "stty"  # an stty that does not know iutf8, like some do not
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\nfor a; do [ "$a" = iutf8 ] && exit 1; done\n'
                    'exec /bin/stty "$@"\n')
    shim.chmod(0o755)
    spec = command("stty -a", pty=pty(m53=0, m1=7, m42=1))
    spec = ProcessSpec(program=spec.program, argv=spec.argv, cwd="/", user=ROOT, pty=spec.pty,
                       env={"PATH": f"{shim.parent}:{PATH}"})
    settings = bytes(run(finished(direct, spec)).stdout).decode()
    assert "intr = ^G;" in settings
    assert "rows 30; columns 100;" in settings
    assert "-echo" in settings.split()


def test_without_the_agent_the_size_comes_from_the_sdk_when_stty_cannot_set_it(
        direct: MicrosandboxBackend, tmp_path: Path) -> None:
    shim = tmp_path / "bin" / "stty"  # an stty that can only report
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\n[ "$1" = size ] && exec /bin/stty size\nexit 1\n')
    shim.chmod(0o755)
    # The SDK's resize lands just after the start, so poll past its initial 24x80.
    script = ('for i in $(seq 100); do size=$(stty size); [ "$size" != "24 80" ] && break; '
              'sleep 0.02; done; echo "$size"')
    spec = ProcessSpec(program="/bin/sh", argv=["sh", "-c", script], cwd="/", user=ROOT,
                       pty=pty(), env={"PATH": f"{shim.parent}:{PATH}"})
    assert bytes(run(finished(direct, spec)).stdout) == b"30 100\r\n"


# ---- flow control and scale: what only the agent gives

# msb-proxy's memory per process, through the agent: WINDOW (256 KiB) of output in flight
# between the agent and us, or our stdin queue up to its high-water mark, plus bookkeeping.
MEMORY_BOUND = 1 << 20


class SlowReader(Recorder):
    """A client that takes output a chunk at a time and comes back for more a little later,
    keeping count (not the bytes) until it has had ``wanted``."""

    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.wanted = wanted
        self.taken = 0
        self.process: GuestProcess | None = None
        self.enough: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def output_received(self, data: bytes, stderr: bool) -> None:
        self.taken += len(data)
        assert self.process is not None
        self.process.pause_output()
        if self.taken >= self.wanted:
            if not self.enough.done():
                self.enough.set_result(None)
            return
        asyncio.get_running_loop().call_later(0.0005, self.process.resume_output)


async def memory_while(work: Coroutine[Any, Any, T]) -> tuple[T, int]:
    """``work``'s result, and how far this process's memory rose above where it was."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = await work
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


async def slow_read(backend: MicrosandboxBackend, wanted: int) -> int:
    sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
    reader = SlowReader(wanted)
    reader.process = await sandbox.spawn(command("exec cat /dev/zero"), reader)
    await reader.enough
    reader.process.hangup()
    return reader.taken


def test_a_slow_reader_of_cat_dev_zero_holds_memory_to_the_window(
        backend: MicrosandboxBackend) -> None:
    taken, rise = run(memory_while(slow_read(backend, 32 << 20)))
    assert taken >= 32 << 20
    assert rise < MEMORY_BOUND


def test_without_the_agent_a_slow_reader_lets_memory_grow_with_the_guest(
        direct: MicrosandboxBackend) -> None:
    """The SDK drains the guest into an unbounded channel: the gap the agent closes."""
    taken, rise = run(memory_while(slow_read(direct, 8 << 20)))
    assert rise > taken  # the producer ran ahead into our memory


def test_a_guest_never_reading_a_gibibyte_of_stdin_holds_memory_to_the_high_water_mark(
        backend: MicrosandboxBackend) -> None:
    chunk = 64 << 10

    async def offer_a_gibibyte() -> tuple[int, list[str]]:
        process, recorder = await spawn(backend, command("echo ready; exec sleep 3600"))
        await recorder.stdout_contains(b"ready\n")
        offered = 0
        while offered < 1 << 30 and recorder.flow != ["paused"]:  # as SSH's window would
            process.write_stdin(bytes(chunk))
            offered += chunk
            await asyncio.sleep(0)
        process.hangup()
        return offered, recorder.flow

    (offered, flow), rise = run(memory_while(offer_a_gibibyte()))
    assert flow == ["paused"]
    # The agent took WINDOW, our queue the high-water mark: then the client was stopped.
    assert offered <= 2 * MEMORY_BOUND
    assert rise < MEMORY_BOUND


def test_a_process_that_never_reads_stdin_does_not_slow_other_sessions(
        backend: MicrosandboxBackend) -> None:
    async def scenario() -> tuple[bytes, bytes, bool]:
        stuck, stuck_recorder = await spawn(backend, command("echo ready; exec sleep 3600"))
        await stuck_recorder.stdout_contains(b"ready\n")
        for _ in range(32):  # 2 MiB it never reads
            stuck.write_stdin(bytes(64 << 10))
        same = await finished(backend, command("echo same connection"))
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        other = Recorder()
        await sandbox.spawn(command("echo other connection"), other)
        await other.exited
        running = not stuck_recorder.exited.done()
        stuck.hangup()
        return bytes(same.stdout), bytes(other.stdout), running

    assert run(scenario()) == (b"same connection\n", b"other connection\n", True)


def test_without_the_agent_a_process_that_never_reads_stdin_stalls_the_sandbox(
        direct: MicrosandboxBackend, standin: StandInSDK) -> None:
    """The runtime's agent writes stdin in its one loop and waits until the process has
    taken it all (crates/agentd/lib/agent.rs): until then nothing else in the sandbox runs."""

    async def scenario() -> tuple[bool, bytes]:
        stuck, stuck_recorder = await spawn(direct, command("echo $$; exec sleep 3600"))
        await stuck_recorder.stdout_contains(b"\n")
        for _ in range(32):
            stuck.write_stdin(bytes(64 << 10))
        sandbox = await direct.open("api", TEMPLATE, Progress(quiet=True))
        other = Recorder()
        starting = asyncio.ensure_future(sandbox.spawn(command("echo other"), other))
        while standin.agent_backlog("api") < 2:  # the stuck write, and the new request
            await asyncio.sleep(0.01)
        stalled = not starting.done()
        os.kill(int(stuck_recorder.stdout), signal.SIGKILL)  # from outside the SDK
        await starting
        await other.exited
        return stalled, bytes(other.stdout)

    assert run(scenario()) == (True, b"other\n")


def test_256_channels_on_one_connection_are_one_relay_client(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    async def scenario() -> tuple[int, list[tuple[bytes, ExitStatus]]]:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        recorders = [Recorder() for _ in range(256)]
        processes = await asyncio.gather(*(sandbox.spawn(command("cat"), recorder)
                                           for recorder in recorders))
        clients = standin.relay_clients("api")
        for index, process in enumerate(processes):
            process.write_stdin(f"channel {index}\n".encode())
            process.close_stdin()
        statuses = await asyncio.gather(*(recorder.exited for recorder in recorders))
        return clients, [(bytes(r.stdout), status) for r, status in zip(recorders, statuses,
                                                                         strict=True)]

    clients, outcomes = run(scenario())
    assert clients == 2  # the connected sandbox, and its one agent
    assert outcomes == [(f"channel {index}\n".encode(), ExitStatus(code=0))
                        for index in range(256)]


def test_four_connections_at_once_on_one_sandbox_each_have_their_agent(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    async def connection(index: int) -> list[bytes]:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        recorders = [Recorder() for _ in range(64)]
        await asyncio.gather(*(sandbox.spawn(command(f"echo {index}-{n}"), recorder)
                               for n, recorder in enumerate(recorders)))
        await asyncio.gather(*(recorder.exited for recorder in recorders))
        return [bytes(recorder.stdout) for recorder in recorders]

    async def scenario() -> tuple[list[list[bytes]], int]:
        outputs = await asyncio.gather(*(connection(index) for index in range(4)))
        return outputs, standin.relay_clients("api")

    outputs, clients = run(scenario())
    assert outputs == [[f"{index}-{n}\n".encode() for n in range(64)] for index in range(4)]
    assert clients <= 8  # four connected sandboxes and four agents, whatever was collected


def test_without_the_agent_the_relay_refuses_the_129th_client(
        direct: MicrosandboxBackend, standin: StandInSDK) -> None:
    async def scenario() -> tuple[int, int, str]:
        sandbox = await direct.open("api", TEMPLATE, Progress(quiet=True))
        processes = []
        while True:
            try:
                processes.append(await sandbox.spawn(command("exec sleep 60"), Recorder()))
            except SandboxError as exc:
                clients = standin.relay_clients("api")
                for process in processes:
                    process.hangup()
                return len(processes), clients, str(exc)

    started, clients, error = run(scenario())
    # The relay was full when it refused: 128 clients, the processes and the connected
    # sandbox's own (one more when a handle the test no longer holds is not yet collected).
    assert clients == 128
    assert started in (126, 127)
    assert error == ("sandbox 'api' cannot start /bin/sh: agent client error: the agent relay "
                     "closed the connection during the handshake")


# ---- the agent's own life


def test_closing_the_connection_ends_its_agent_and_hangs_up_its_processes(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    async def scenario() -> tuple[int, int, bool]:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        recorder = Recorder()
        await sandbox.spawn(command("echo $$; exec sleep 3600"), recorder)
        await recorder.stdout_contains(b"\n")
        pid = int(recorder.stdout)
        before = standin.relay_clients("api")
        await sandbox.close()
        for _ in range(200):
            if not alive(pid):
                break
            await asyncio.sleep(0.02)
        return before, pid, alive(pid)

    before, _, still_alive = run(scenario())
    assert before == 2
    assert still_alive is False


def test_processes_end_with_their_agent_and_the_next_spawn_starts_another(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    async def scenario() -> tuple[ExitStatus, bytes]:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        recorder = Recorder()
        await sandbox.spawn(command("exec sleep 3600"), recorder)
        [agent] = [handle for handle in standin.processes if handle.process is not None
                   and isinstance(handle.process.args, list)
                   and handle.process.args[:3] == ["python3", "-E", "-S"]]
        assert agent.process is not None
        agent.process.kill()  # the agent dies (killed in the guest, say)
        status = await recorder.exited
        again = Recorder()
        await sandbox.spawn(command("echo again"), again)
        await again.exited
        return status, bytes(again.stdout)

    assert run(scenario()) == (ExitStatus(signal=signal.SIGKILL), b"again\n")


def test_doctor_says_whether_a_sandbox_runs_the_agent(
        either: MicrosandboxBackend, request: pytest.FixtureRequest) -> None:
    async def scenario() -> list[tuple[str, str, str]]:
        sandbox = await either.open("api", TEMPLATE, Progress(quiet=True))
        rows = [(check.what, check.status.value, check.detail)
                for check in await sandbox.checks()]
        await sandbox.close()
        return rows

    [(what, status, detail)] = run(scenario())
    assert what == "guest agent"
    if through(request) == "agent":
        assert status == "ok"
        assert re.fullmatch(r"python 3\.\d+\.\d+: one agent per connection forks every process",
                            detail)
    else:
        assert status == "warn"
        assert detail.startswith('none (cannot run python3: spawn "python3": No such file or '
                                 "directory (os error 2)): each process is an exec of its own")


def test_the_agent_is_python_3_6_and_fits_in_one_argument() -> None:
    import ast

    from msb_proxy.backends.microsandbox import guest_agent

    ast.parse(guest_agent.SOURCE, feature_version=(3, 6))
    assert len(guest_agent.SOURCE.encode()) < 128 * 1024  # Linux's MAX_ARG_STRLEN


def test_a_guest_whose_python3_cannot_run_the_agent_gets_one_exec_per_process(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    # An old python3 (before 3.6) stops at the agent's first f-string.
    standin.substitute_program("python3", [
        "/bin/sh", "-c", "echo 'SyntaxError: invalid syntax' >&2; exit 1", "python3"])

    async def scenario() -> tuple[ExitStatus, str]:
        sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
        recorder = Recorder()
        await sandbox.spawn(command("kill -TERM $$"), recorder)
        [check] = await sandbox.checks()
        return await recorder.exited, check.detail

    status, detail = run(scenario())
    assert status == ExitStatus(code=255)  # the direct path's
    assert detail.startswith("none (python3 exited with status 1: SyntaxError: invalid "
                             "syntax): each process is an exec of its own")


# ---- end to end: the real ssh client, msb-proxy on the microsandbox backend, the stand-in
# loaded into the msb-proxy process by tests/standin_site/sitecustomize.py

E2E_PASSWD = PASSWD + "ghost:x:0:0:no home:/home/ghost-has-none:/bin/sh\n"


@pytest.fixture(scope="module")
def over_ssh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """An msb-proxy installation on the microsandbox backend whose SDK is the stand-in, with
    running sandbox "e2e" (its guest passwd: root and alice with bash, ghost without a home)."""
    root = tmp_path_factory.mktemp("over-ssh")
    guest = root / "guest"
    (guest / "etc").mkdir(parents=True)
    (guest / "etc" / "passwd").write_text(E2E_PASSWD)
    (guest / "etc" / "group").write_text(GROUP)
    sdk = StandInSDK(root / "runtime")
    sdk.add_sandbox("e2e", guest, labels=LABELS)
    env = install(root / "install", "microsandbox", guest)
    proxy = " ".join(shlex.quote(part) for part in on_the_standin(env, "stdio"))
    env.config.write_text(env.config.read_text().replace(
        env.config.read_text().splitlines()[1], f"  ProxyCommand {proxy} %n"))
    yield env
    end_keeper(root / "guest-run")
    sdk.close()


def on_the_standin(env: Env, command: str, *args: str) -> list[str]:
    """``msb-proxy COMMAND ARGS...`` of the ``over_ssh`` installation (ProxyCommand's options
    for ``stdio``), its SDK the stand-in, its guest run directory the installation's own."""
    site = Path(__file__).parent
    root = env.root.parent
    argv = env.proxy_command(warm=False)
    start = argv.index("stdio")
    tail = argv[start + 1:] if command == "stdio" else [*args]
    return ["env", f"PYTHONPATH={site / 'standin_site'}:{site}",
            f"MSB_PROXY_TEST_STANDIN={root / 'runtime'}",
            f"MSB_PROXY_TEST_GUEST_RUN={root / 'guest-run'}", "MSB_PROXY_BACKEND=microsandbox",
            *argv[:start], command, *tail]


def ssh(env: Env, *args: str, user: str = "root", input: bytes | None = None) -> Run:
    """``ssh -F CONFIG ARGS... user@msb-e2e`` (not ``Env.ssh``, which would make a real
    microsandbox sandbox first)."""
    return env.run(["ssh", "-F", str(env.config), *args[:-1], f"{user}@msb-e2e", *args[-1:]],
                   input=input)


def test_over_ssh_a_death_by_a_signal_is_an_exit_signal(over_ssh: Env) -> None:
    run = ssh(over_ssh, "-v", "kill -9 $$")
    assert run.returncode == 255
    assert "rtype exit-signal" in run.err
    assert "rtype exit-status" not in run.err


def test_over_ssh_a_login_shell_is_dash_bash_and_a_command_gets_exit_status(
        over_ssh: Env) -> None:
    shell = over_ssh.run(["ssh", "-F", str(over_ssh.config), "-T", "msb-e2e"],
                         input=b'echo "$0"; exit 7\n')
    command_run = ssh(over_ssh, "exit 3")
    assert command_run.returncode == 3
    assert (shell.returncode, shell.out) == (7, "-bash\n")


def test_over_ssh_a_missing_home_falls_back_to_root_with_sshds_note(over_ssh: Env) -> None:
    run = ssh(over_ssh, "pwd", user="ghost")
    assert (run.returncode, run.out, run.err) == (
        0, "/\n", "Could not chdir to home directory /home/ghost-has-none: No such file or "
                  "directory\n")


def test_over_ssh_a_terminal_has_the_clients_size_and_ssh_tty_and_ctrl_c_interrupts(
        over_ssh: Env) -> None:
    import pexpect

    child = pexpect.spawn("ssh", ["-F", str(over_ssh.config), "-tt", "msb-e2e",
                                  'echo "size=$(stty size) tty=$(tty) SSH_TTY=$SSH_TTY"; '
                                  "echo ready; exec sleep 30"],
                          dimensions=(33, 111), timeout=TIMEOUT_S)
    child.expect(r"size=(\d+ \d+) tty=(\S+) SSH_TTY=(\S+)\r\n")
    size, tty, ssh_tty = (group.decode() for group in child.match.groups())
    child.expect("ready")
    child.sendcontrol("c")
    child.expect(pexpect.EOF)
    child.close()
    assert (size, ssh_tty == tty, tty.startswith("/dev/pts/")) == ("33 111", True, True)
    assert child.exitstatus == 255  # ssh's status after an exit-signal (SIGINT)


# ---- microsandbox cloud


@pytest.fixture
def no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the SDK's own variables set, whatever the test's environment has."""
    for key in ("MSB_BACKEND", "MSB_API_KEY", "MSB_API_URL", "MSB_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.fixture
def cloud_backend(standin: StandInSDK, guest_root: Path, home: StateDir,
                  no_sdk_environment: pytest.MonkeyPatch) -> MicrosandboxCloudBackend:
    standin.add_image(IMAGE, guest_root)
    return MicrosandboxCloudBackend(home, sdk=standin, wait_s=5.0)


CLOUD = SandboxTemplate(backend="microsandbox-cloud", options={"image": IMAGE})


def test_microsandbox_cloud_takes_the_sdks_api_key_and_keeps_its_sandboxes_apart(
        cloud_backend: MicrosandboxCloudBackend, backend: MicrosandboxBackend,
        standin: StandInSDK, no_sdk_environment: pytest.MonkeyPatch) -> None:
    no_sdk_environment.setenv("MSB_API_KEY", "test-key")

    async def scenario() -> tuple[bytes, ExitStatus, list[str], list[str]]:
        sandbox = await cloud_backend.open("web", CLOUD, Progress(quiet=True))
        recorder = Recorder()
        await sandbox.spawn(command("echo in the cloud; kill -TERM $$"), recorder)
        status = await recorder.exited
        await sandbox.close()
        return (bytes(recorder.stdout), status,
                [info.name for info in await cloud_backend.list()],
                [info.name for info in await backend.list_all()])

    output, status, in_cloud, here = run(scenario())
    assert (output, status) == (b"in the cloud\n", ExitStatus(signal=signal.SIGTERM))
    assert (in_cloud, here) == (["web"], ["api"])
    assert (standin.status_of("web", cloud=True), standin.status_of("web")) == (
        SandboxStatus.RUNNING, None)


def test_a_template_puts_its_sandbox_in_the_cloud_with_a_profile_or_cloud_true(
        backend: MicrosandboxBackend, standin: StandInSDK, guest_root: Path,
        no_sdk_environment: pytest.MonkeyPatch) -> None:
    standin.add_profile("dev")
    open_sandbox(backend, "by-profile", SandboxTemplate(options={"image": IMAGE,
                                                                "profile": "dev"}))
    no_sdk_environment.setenv("MSB_API_KEY", "test-key")
    open_sandbox(backend, "by-flag", SandboxTemplate(options={"image": IMAGE, "cloud": True}))
    open_sandbox(backend, "here", TEMPLATE)
    assert [(name, standin.status_of(name, cloud=True), standin.status_of(name))
            for name in ("by-profile", "by-flag", "here")] == [
        ("by-profile", SandboxStatus.RUNNING, None), ("by-flag", SandboxStatus.RUNNING, None),
        ("here", None, SandboxStatus.RUNNING)]


def test_the_sdks_environment_can_make_the_cloud_the_default_and_cloud_false_stays_here(
        backend: MicrosandboxBackend, standin: StandInSDK,
        no_sdk_environment: pytest.MonkeyPatch) -> None:
    no_sdk_environment.setenv("MSB_BACKEND", "cloud")
    no_sdk_environment.setenv("MSB_API_KEY", "test-key")
    open_sandbox(backend, "web", TEMPLATE)
    open_sandbox(backend, "kept-here", SandboxTemplate(options={"image": IMAGE,
                                                               "cloud": False}))
    assert (standin.status_of("web", cloud=True), standin.status_of("kept-here")) == (
        SandboxStatus.RUNNING, SandboxStatus.RUNNING)
    assert standin.status_of("web") is None


def test_microsandbox_cloud_without_credentials_says_where_they_come_from(
        cloud_backend: MicrosandboxCloudBackend, standin: StandInSDK) -> None:
    with pytest.raises(ConfigError) as caught:
        open_sandbox(cloud_backend, "web", CLOUD)
    assert str(caught.value) == (
        "microsandbox cloud has no credentials here: set MSB_API_KEY (and MSB_API_URL for "
        "another endpoint) or MSB_PROFILE in msb-proxy's environment, or profile = \"NAME\" (a "
        "profile of 'msb login') in the sandbox's template; msb-proxy keeps none itself")
    assert run(cloud_backend.list()) == []  # ls of every backend stays quiet about it
    assert standin.calls() == []


def test_an_unknown_profile_is_named(cloud_backend: MicrosandboxCloudBackend,
                                     home: StateDir) -> None:
    with pytest.raises(ConfigError) as caught:
        open_sandbox(cloud_backend, "web", SandboxTemplate(options={"image": IMAGE,
                                                                    "profile": "nope"}))
    assert str(caught.value) == (
        "microsandbox cloud: profile \"nope\" not found in global config; see 'msb login', or "
        f"the profile named in {home.config_file}")


def test_a_key_the_cloud_refuses_is_one_line(cloud_backend: MicrosandboxCloudBackend,
                                             no_sdk_environment: pytest.MonkeyPatch) -> None:
    no_sdk_environment.setenv("MSB_API_KEY", "not-the-key")
    with pytest.raises(SandboxError) as caught:
        open_sandbox(cloud_backend, "web", CLOUD)
    assert str(caught.value) == "sandbox 'web': cloud HTTP 401: invalid API key"


@pytest.mark.parametrize("refused", [
    ({"image": IMAGE, "volumes": ("/srv:/srv",)},
     "sandbox 'web' is in microsandbox cloud, which cannot bind this host's directories: "
     "remove volumes from its template in CONFIG, or keep it on this host (cloud = false)"),
    ({"image": "/var/lib/rootfs"},
     "sandbox 'web' is in microsandbox cloud, which cannot boot /var/lib/rootfs, a directory "
     "of this host: set image to an OCI image (such as \"debian:bookworm\") in CONFIG, or keep "
     "it on this host (cloud = false)"),
])
def test_what_only_a_local_runtime_has_is_refused_for_a_cloud_sandbox(
        backend: MicrosandboxBackend, standin: StandInSDK, home: StateDir,
        no_sdk_environment: pytest.MonkeyPatch, refused: tuple[dict[str, Any], str]) -> None:
    options, message = refused
    no_sdk_environment.setenv("MSB_API_KEY", "test-key")
    with pytest.raises(ConfigError) as caught:
        open_sandbox(backend, "web", SandboxTemplate(options={**options, "cloud": True}))
    assert str(caught.value) == message.replace("CONFIG", str(home.config_file))
    assert standin.calls() == []


def test_stop_and_rm_reach_the_side_the_sandboxes_template_names(
        standin: StandInSDK, guest_root: Path, home: StateDir,
        no_sdk_environment: pytest.MonkeyPatch) -> None:
    no_sdk_environment.setenv("MSB_API_KEY", "test-key")
    standin.add_sandbox("web", guest_root)
    standin.add_sandbox("web", guest_root, cloud=True)
    in_cloud = SandboxTemplate(options={"cloud": True})
    backend = MicrosandboxBackend(home, sdk=standin, templates=lambda name: in_cloud)
    assert run(backend.stop("web")) is True
    assert (standin.status_of("web", cloud=True), standin.status_of("web")) == (
        SandboxStatus.STOPPED, SandboxStatus.RUNNING)
    assert run(backend.remove("web")) is True
    assert (standin.status_of("web", cloud=True), standin.status_of("web")) == (
        None, SandboxStatus.RUNNING)


def test_msb_proxy_writes_no_cloud_credentials(
        cloud_backend: MicrosandboxCloudBackend, home: StateDir,
        no_sdk_environment: pytest.MonkeyPatch) -> None:
    no_sdk_environment.setenv("MSB_API_KEY", "test-key")
    open_sandbox(cloud_backend, "web", CLOUD)
    written = [path for path in home.home.rglob("*") if path.is_file()
               and b"test-key" in path.read_bytes()]
    assert written == []


def test_the_cloud_backend_takes_neither_volumes_nor_cloud() -> None:
    from msb_proxy.backends import registry

    assert registry.backend_class("microsandbox-cloud") is MicrosandboxCloudBackend
    assert set(registry.backend_options("microsandbox")) - set(
        registry.backend_options("microsandbox-cloud")) == {"volumes", "cloud"}


def doctor_rows(backend: type[MicrosandboxBackend], home: StateDir,
                **defaults: Any) -> list[tuple[str, str, str]]:
    from msb_proxy.backends import registry
    from msb_proxy.config import Config

    config = Config(home=home.home, user_home=home.home, catalogue=registry,
                    backend=backend.name, defaults=SandboxTemplate(options=defaults))
    return [(check.what, check.status.value, check.detail) for check in backend.checks(config)]


def test_doctor_checks_the_clouds_credentials_and_not_kvm(
        standin: StandInSDK, home: StateDir, no_sdk_environment: pytest.MonkeyPatch) -> None:
    from msb_proxy.backends.microsandbox import backend as module

    no_sdk_environment.setattr(module, "_load_sdk", lambda: standin)
    assert doctor_rows(MicrosandboxCloudBackend, home) == [
        ("cloud", "FAIL", str(ConfigError(
            "microsandbox cloud has no credentials here: set MSB_API_KEY (and MSB_API_URL for "
            "another endpoint) or MSB_PROFILE in msb-proxy's environment, or profile = "
            "\"NAME\" (a profile of 'msb login') in the sandbox's template; msb-proxy keeps "
            "none itself")))]
    standin.add_profile("dev", "https://dev.example.invalid")
    assert doctor_rows(MicrosandboxCloudBackend, home, profile="dev") == [
        ("cloud", "ok", "https://dev.example.invalid, credentials from profile 'dev'")]
    no_sdk_environment.setenv("MSB_API_KEY", "test-key")
    no_sdk_environment.setenv("MSB_API_URL", "https://eu.example.invalid")
    assert doctor_rows(MicrosandboxCloudBackend, home) == [
        ("cloud", "ok", "https://eu.example.invalid, credentials from MSB_API_KEY")]
    assert [row[0] for row in doctor_rows(MicrosandboxBackend, home)] == ["runtime", "KVM"]


# ---- forks (ssh msb-api.fork): SandboxHandle.fork, as the stand-in plays it (a copy of the
# parent's guest file system and configuration; see SandboxApi.fork_from there)

FORK_OF_API = dataclasses.replace(TEMPLATE, fork_of="api")


def forked(backend: MicrosandboxBackend, name: str = "api.fork-a",
           template: SandboxTemplate = FORK_OF_API, progress: Progress | None = None) -> bool:
    """Open ``name`` as a fork of api; whether this open created it."""
    sandbox = run(backend.open(name, template, progress or Progress(quiet=True)))
    assert (sandbox.name, sandbox.started) == (name, sandbox.created)
    return sandbox.created


def add_user(root: Path, name: str, uid: int) -> None:
    """What a guest process that adds a user does to the guest's passwd."""
    with (root / "etc" / "passwd").open("a") as passwd:
        passwd.write(f"{name}:x:{uid}:{uid}::/home/{name}:/bin/sh\n")


def users(backend: MicrosandboxBackend, name: str, *candidates: str) -> list[str]:
    """Which of ``candidates`` the guest of sandbox ``name`` has, as a login looks them up."""
    async def lookups() -> list[str]:
        sandbox = await backend.open(name, TEMPLATE, Progress(quiet=True))
        found = []
        for candidate in candidates:
            try:
                await sandbox.lookup_user(candidate)
            except UnknownUserError:
                continue
            found.append(candidate)
        return found

    return run(lookups())


def fork_calls(standin: StandInSDK) -> list[dict[str, object]]:
    return [{key: call[key] for key in ("name", "parent", "parent_status", "guest_flush")}
            for call in standin.calls("fork")]


def test_a_fork_has_its_parents_files_and_each_keeps_its_own_writes(
        backend: MicrosandboxBackend, standin: StandInSDK, guest_root: Path) -> None:
    add_user(guest_root, "before", 2001)
    assert forked(backend) is True
    add_user(guest_root, "parent-only", 2002)
    add_user(standin.root_of("api.fork-a"), "fork-only", 2003)
    everyone = ("alice", "before", "parent-only", "fork-only")
    assert users(backend, "api", *everyone) == ["alice", "before", "parent-only"]
    assert users(backend, "api.fork-a", *everyone) == ["alice", "before", "fork-only"]


def test_forking_a_running_parent_leaves_it_running_and_the_fork_running_detached(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    updated = run(standin.Sandbox.get("api")).updated_at
    forked(backend)
    assert fork_calls(standin) == [{"name": "api.fork-a", "parent": "api",
                                    "parent_status": "running", "guest_flush": "auto"}]
    assert [call["call"] for call in standin.calls()] == ["fork", "detach", "modify"]
    assert (standin.status_of("api"), standin.status_of("api.fork-a")) == (
        SandboxStatus.RUNNING, SandboxStatus.RUNNING)
    assert run(standin.Sandbox.get("api")).updated_at == updated


def test_forking_a_paused_parent_leaves_it_paused(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_status("api", SandboxStatus.PAUSED)
    forked(backend)
    assert (standin.status_of("api"), standin.status_of("api.fork-a")) == (
        SandboxStatus.PAUSED, SandboxStatus.RUNNING)
    assert [call["parent_status"] for call in standin.calls("fork")] == ["paused"]


def test_a_fork_is_msb_proxys_listed_and_removed_as_any_of_its_sandboxes(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    forked(backend)
    assert standin.labels_of("api.fork-a") == LABELS
    assert run(backend.list()) == [SandboxInfo("api.fork-a", SandboxState.RUNNING,
                                               "microsandbox")]
    assert run(backend.remove("api.fork-a")) is True
    assert (standin.status_of("api.fork-a"), standin.status_of("api")) == (
        None, SandboxStatus.RUNNING)


def test_a_kept_fork_is_forked_once_and_used_again(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    shown = Shown()
    first = forked(backend, progress=shown.progress)
    again = forked(backend)
    assert (first, again, len(standin.calls("fork"))) == (True, False, 1)
    assert [re.sub(r"in \d+\.\d s$", "in N s", line) for line in shown.lines()] == [
        "msb-proxy: forking sandbox 'api' as 'api.fork-a' ...",
        "msb-proxy: sandbox 'api.fork-a' ready in N s"]


def test_forking_a_stopped_parent_is_refused_in_one_line_and_touches_it_not(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_status("api", SandboxStatus.STOPPED)
    with pytest.raises(SandboxError) as caught:
        forked(backend)
    assert str(caught.value) == (
        "cannot fork sandbox 'api': it is stopped, and microsandbox forks only a running or "
        "paused sandbox (the fork copies its memory too); connect to 'api' once to start it, "
        "then fork it again")
    assert (standin.calls(), standin.status_of("api"), standin.status_of("api.fork-a")) == (
        [], SandboxStatus.STOPPED, None)


def test_forking_a_missing_parent_names_it(backend: MicrosandboxBackend,
                                           standin: StandInSDK) -> None:
    with pytest.raises(SandboxNotFoundError) as caught:
        forked(backend, template=dataclasses.replace(TEMPLATE, fork_of="nope"))
    assert str(caught.value) == "there is no sandbox 'nope' to fork"
    assert standin.status_of("api.fork-a") is None


def test_the_seams_fork_makes_the_fork_and_refuses_a_name_that_is_taken(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    run(backend.fork("api", "copy", Progress(quiet=True)))
    with pytest.raises(SandboxError) as caught:
        run(backend.fork("api", "copy", Progress(quiet=True)))
    assert str(caught.value) == ("cannot fork sandbox 'api' as 'copy': there is a sandbox "
                                 "'copy' already")
    assert (standin.status_of("copy"), len(standin.calls("fork"))) == (SandboxStatus.RUNNING, 1)


# ---- named sessions: the guest agent's session keeper, a daemon of the guest (here, as every
# guest process of the stand-in, a real host process) that holds the shells

SHELL = ProcessSpec(program="/bin/bash", argv=["bash", "--norc", "--noprofile", "-i"],
                    env={"PATH": PATH, "PS1": "$ ", "TERM": "dumb"}, cwd="/", user=ROOT,
                    pty=PtySpec(term="dumb", cols=80, rows=24))
CLEAR_SCREEN = b"\x1b[0m\x1b[H\x1b[2J"


class SessionRecorder(Recorder):
    """A SessionListener: a Recorder that is also told of a take-over."""

    def __init__(self) -> None:
        super().__init__()
        self.detached: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def process_detached(self, reason: str) -> None:
        assert not self.detached.done(), "process_detached reported twice"
        self.detached.set_result(reason)


@pytest.fixture
def keeper_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The guest's run directory for the keeper (short: a unix socket's path has 108 bytes);
    the keeper, if one is left, killed at the end."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="msb-keeper-", dir="/tmp") as directory:
        monkeypatch.setattr(MicrosandboxSandbox, "guest_run_dir", directory)
        yield Path(directory)
        end_keeper(Path(directory))


def end_keeper(directory: Path) -> None:
    lock = directory / "sessions.lock"
    text = lock.read_text().strip() if lock.exists() else ""
    if text:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(text), signal.SIGKILL)


async def attach(backend: MicrosandboxBackend, session: str = "work",
                 spec: ProcessSpec = SHELL, timeout: float = 0.0
                 ) -> tuple[GuestProcess, SessionRecorder, MicrosandboxSandbox]:
    """A new connection's attach to ``session``."""
    sandbox = await backend.open("api", TEMPLATE, Progress(quiet=True))
    recorder = SessionRecorder()
    process = await sandbox.attach_session(session, spec, recorder, timeout)
    return process, recorder, sandbox


async def typed(process: GuestProcess, recorder: Recorder, line: str, expect: bytes) -> None:
    """Type ``line`` and wait for ``expect`` in what the terminal shows from then on."""
    del recorder.stdout[:]
    process.write_stdin(line.encode() + b"\n")
    await recorder.stdout_contains(expect)


def test_a_named_session_keeps_its_shell_cwd_variables_and_jobs_for_the_next_connection(
        backend: MicrosandboxBackend, keeper_dir: Path) -> None:
    async def scenario() -> tuple[bytes, ExitStatus, list[tuple[str, bool, int, int]],
                                  list[str]]:
        first, shown, sandbox = await attach(backend)
        await typed(first, shown, "cd /tmp; KEPT=forty-two; sleep 1000 & echo started",
                    b"started\r\n")
        await typed(first, shown, "echo painted-$KEPT", b"painted-forty-two\r\n")
        first.hangup()  # the connection went: detached, the shell goes on
        await sandbox.close()
        wide = dataclasses.replace(SHELL, pty=PtySpec(term="dumb", cols=132, rows=40))
        second, again, other = await attach(backend, spec=wide)
        await again.stdout_contains(b"painted-forty-two\r\n")
        repaint = bytes(again.stdout)
        await typed(second, again, 'echo "state: $PWD $KEPT $(jobs | wc -l) $(stty size)"',
                    b"state: /tmp forty-two 1 40 132\r\n")
        listed = [(info.name, info.attached, info.cols, info.rows)
                  for info in await backend.sessions("api")]
        second.write_stdin(b"kill %1; exit 3\n")
        status = await again.exited
        await other.close()
        listed_after = [info.name for info in await backend.sessions("api")]
        return repaint, status, listed, listed_after

    repaint, status, listed, listed_after = run(scenario())
    assert repaint.startswith(CLEAR_SCREEN)
    assert b"cd /tmp; KEPT=forty-two; sleep 1000 & echo started\r\n" in repaint
    assert b"painted-forty-two\r\n$ " in repaint
    assert status == ExitStatus(code=3)
    assert listed == [("work", True, 132, 40)]
    assert listed_after == []  # its shell exited: the session is gone


def test_a_second_connection_takes_a_named_session_over_and_the_first_is_told_why(
        backend: MicrosandboxBackend, keeper_dir: Path) -> None:
    async def scenario() -> tuple[str, bool, bool]:
        first, shown, sandbox = await attach(backend)
        await typed(first, shown, "echo one", b"one\r\n")
        second, again, other = await attach(backend)
        reason = await shown.detached
        await typed(second, again, "echo two", b"two\r\n")
        killed = await backend.kill_session("api", "work")
        await again.exited
        for connection in (sandbox, other):
            await connection.close()
        return reason, shown.exited.done(), killed

    assert run(scenario()) == ("session 'work' was taken over by another connection", False,
                               True)


def test_a_named_session_detached_past_its_timeout_is_hung_up(
        backend: MicrosandboxBackend, keeper_dir: Path) -> None:
    async def scenario() -> list[str]:
        first, shown, sandbox = await attach(backend, timeout=0.2)
        await typed(first, shown, "echo here", b"here\r\n")
        first.hangup()
        await sandbox.close()
        while await backend.sessions("api"):
            await asyncio.sleep(0.05)
        _, again, other = await attach(backend, timeout=0.2)
        await again.stdout_contains(b"$ ")
        fresh = bytes(again.stdout)
        await backend.kill_session("api", "work")
        await again.exited
        await other.close()
        return [fresh.decode(errors="replace")]

    [fresh] = run(scenario())
    assert "here" not in fresh  # a new shell: nothing of the old one is repainted
    assert not fresh.startswith(CLEAR_SCREEN.decode())


def test_sessions_lists_each_named_session_and_kill_ends_it(
        backend: MicrosandboxBackend, keeper_dir: Path) -> None:
    async def scenario() -> tuple[list[tuple[str, str, bool, int, int]], bool, bool,
                                  ExitStatus, list[str]]:
        first, shown, sandbox = await attach(backend, "alpha")
        await typed(first, shown, "echo a", b"a\r\n")
        second, other, connection = await attach(backend, "beta")
        await typed(second, other, "echo b", b"b\r\n")
        second.hangup()
        listed = [(info.name, info.user, info.attached, info.cols, info.rows)
                  for info in await backend.sessions("api")]
        killed = await backend.kill_session("api", "alpha")
        missing = await backend.kill_session("api", "nope")
        status = await shown.exited
        left = [info.name for info in await backend.sessions("api")]
        await backend.kill_session("api", "beta")
        for each in (sandbox, connection):
            await each.close()
        return listed, killed, missing, status, left

    listed, killed, missing, status, left = run(scenario())
    assert listed == [("alpha", "root", True, 80, 24), ("beta", "root", False, 80, 24)]
    assert (killed, missing, status, left) == (True, False, ExitStatus(signal=signal.SIGHUP),
                                               ["beta"])


def test_sessions_of_a_stopped_sandbox_are_none_and_of_a_missing_one_an_error(
        backend: MicrosandboxBackend, standin: StandInSDK) -> None:
    standin.set_status("api", SandboxStatus.STOPPED)
    assert run(backend.sessions("api")) == []
    with pytest.raises(SandboxNotFoundError):
        run(backend.sessions("nope"))


def test_another_users_named_session_is_refused(
        backend: MicrosandboxBackend, keeper_dir: Path) -> None:
    alice = dataclasses.replace(SHELL, user=GuestUser(name="alice", uid=os.getuid() + 1,
                                                      gid=0, home="/", shell="/bin/bash"))

    async def scenario() -> str:
        first, shown, sandbox = await attach(backend)
        await typed(first, shown, "echo mine", b"mine\r\n")
        try:
            await attach(backend, spec=alice)
        except SandboxError as exc:
            return str(exc)
        finally:
            await backend.kill_session("api", "work")
            await shown.exited
            await sandbox.close()
        return "attached"

    assert run(scenario()) == ("sandbox 'api': named session 'work': session 'work' belongs to "
                               "another user (root); pick another name")


def test_without_python3_named_sessions_are_refused_in_one_line(
        direct: MicrosandboxBackend) -> None:
    with pytest.raises(SandboxError) as caught:
        run(attach(direct))
    assert str(caught.value).startswith(
        "sandbox 'api' cannot keep named session 'work': its guest runs no msb-proxy agent (")
    assert str(caught.value).endswith("); install python3 (3.6 or newer) in the image, or "
                                      "connect without MSB_SESSION or +SESSION")


# ---- end to end, the real ssh client: named sessions and forks on the microsandbox backend

def e2e_runtime(env: Env) -> StandInSDK:
    """The stand-in's runtime of the ``over_ssh`` installation, as the test's own view of it."""
    return StandInSDK(env.root.parent / "runtime")


def named_shell(env: Env, *options: str, host: str = "msb-e2e") -> Any:
    import pexpect

    return pexpect.spawn("ssh", ["-F", str(env.config), "-tt", *options, f"root@{host}"],
                         dimensions=(30, 100), timeout=TIMEOUT_S)


def test_over_ssh_a_named_shell_survives_kill_9_of_the_client_with_cwd_variables_and_jobs(
        over_ssh: Env) -> None:
    import pexpect

    first = named_shell(over_ssh, host="msb-e2e+work")
    first.sendline("cd /tmp; KEPT=kept-$((40+2)); sleep 1000 & echo ready-$((6*7))")
    first.expect("ready-42")
    os.kill(first.pid, signal.SIGKILL)  # the client dies: no goodbye of any kind
    first.expect(pexpect.EOF)
    second = named_shell(over_ssh, "-o", "SetEnv=MSB_SESSION=work")
    second.expect("ready-42")  # the repaint shows what the terminal showed
    second.sendline('echo "state: $PWD $KEPT $(jobs | wc -l) $(stty size)"')
    second.expect(r"state: (\S+) (\S+) (\d+) (\d+ \d+)\r\n")
    state = [group.decode() for group in second.match.groups()]
    second.sendline("kill %1; exit 5")
    second.expect(pexpect.EOF)
    second.close()
    assert state == ["/tmp", "kept-42", "1", "30 100"]
    assert second.exitstatus == 5


def test_over_ssh_a_named_shell_that_exits_as_its_client_sends_gets_its_exit_status(
        over_ssh: Env) -> None:
    """The keeper closes its end of the agent's connection right after the shell's EXIT; a
    frame the client sent in that moment (a window change) must not make that exit a death by
    SIGKILL. The connection's agent is held stopped from before the window change until the
    keeper has closed its end, so that it finds both at once, the window change first."""
    import pexpect

    shell = named_shell(over_ssh, host="msb-e2e+ending")
    shell.sendline("echo shell-$$")
    shell.expect(r"shell-(\d+)\r\n")
    shell_pid = int(shell.match.group(1))
    [agent] = [pid for pid in children(proxy_of(shell.pid))
               if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"python3\0-E\0-S\0")]
    keeper = int((over_ssh.root.parent / "guest-run" / "sessions.lock").read_text())
    shell.sendline("sleep 1000; exit 7")
    assert wait_until(lambda: children(shell_pid) != [], TIMEOUT_S) is not None
    [sleeper] = children(shell_pid)
    assert wait_until(lambda: waiting_in_epoll(agent), TIMEOUT_S) is not None
    keeper_sockets = sockets_of(keeper)
    os.kill(agent, signal.SIGSTOP)
    try:
        shell.setwinsize(31, 101)
        assert wait_until(lambda: pipe_holds_data(f"/proc/{agent}/fd/0"), TIMEOUT_S) is not None
        os.kill(sleeper, signal.SIGTERM)  # the shell goes on to exit 7
        assert wait_until(lambda: sockets_of(keeper) < keeper_sockets, TIMEOUT_S) is not None
    finally:
        os.kill(agent, signal.SIGCONT)
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 7


def waiting_in_epoll(pid: int) -> bool:
    """Whether ``pid`` sleeps in epoll_wait, its select loop idle."""
    return Path(f"/proc/{pid}/wchan").read_text() == "do_epoll_wait"


def sockets_of(pid: int) -> int:
    return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir()
               if os.readlink(fd).startswith("socket:"))


def pipe_holds_data(path: str) -> bool:
    """Whether the pipe at ``path`` (a /proc/PID/fd link) has bytes nobody has read yet."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        count = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    finally:
        os.close(fd)
    return int.from_bytes(count, sys.byteorder) > 0


def test_over_ssh_a_second_client_takes_a_named_shell_over_and_the_first_is_told(
        over_ssh: Env) -> None:
    import pexpect

    first = named_shell(over_ssh, host="msb-e2e+taken")
    first.sendline("echo first-$((1+1))")
    first.expect("first-2")
    second = named_shell(over_ssh, host="msb-e2e+taken")
    second.expect("first-2")
    first.expect("msb-proxy: session 'taken' was taken over by another connection")
    first.expect(pexpect.EOF)
    second.sendline("exit 4")
    second.expect(pexpect.EOF)
    second.close()
    assert second.exitstatus == 4


def test_over_ssh_a_kept_fork_is_a_sandbox_of_its_own_and_the_parent_runs_on(
        over_ssh: Env) -> None:
    made = ssh_to(over_ssh, "msb-e2e.fork-kept", "true")
    sdk = e2e_runtime(over_ssh)
    add_user(sdk.root_of("e2e.fork-kept"), "forker", 0)
    in_fork = ssh_to(over_ssh, "msb-e2e.fork-kept", "true", user="forker")
    in_parent = ssh_to(over_ssh, "msb-e2e", "true", user="forker")
    assert (made.returncode, in_fork.returncode) == (0, 0)
    assert in_parent.returncode == 255
    assert "msb-proxy: sandbox 'e2e' has no user 'forker'" in in_parent.err
    assert (sdk.status_of("e2e"), sdk.status_of("e2e.fork-kept")) == (
        SandboxStatus.RUNNING, SandboxStatus.RUNNING)
    assert [call["name"] for call in sdk.calls("fork")] == ["e2e.fork-kept"]


def test_over_ssh_a_throwaway_fork_is_removed_after_its_connection(over_ssh: Env) -> None:
    sdk = e2e_runtime(over_ssh)
    before = len(sdk.calls("fork"))
    run_ = ssh_to(over_ssh, "msb-e2e.fork", "echo in-the-fork")
    [forked_name] = [call["name"] for call in sdk.calls("fork")[before:]]
    for _ in range(500):  # removed once its connection's msb-proxy has wound down
        if sdk.status_of(forked_name) is None:
            break
        time.sleep(0.02)
    assert (run_.returncode, run_.out) == (0, "in-the-fork\n")
    assert re.fullmatch(r"e2e\.fork\.[0-9a-f]{8}", forked_name)
    assert (sdk.status_of(forked_name), sdk.status_of("e2e")) == (None, SandboxStatus.RUNNING)


def ssh_to(env: Env, host: str, *command: str, user: str = "root") -> Run:
    return env.run(["ssh", "-F", str(env.config), f"{user}@{host}", *command])


def test_msb_proxy_sessions_lists_and_kills_a_named_shell_of_a_microsandbox_sandbox(
        over_ssh: Env) -> None:
    import pexpect

    shell = named_shell(over_ssh, host="msb-e2e+listed")
    shell.sendline("echo up-$((2+3))")
    shell.expect("up-5")
    listed = over_ssh.run(on_the_standin(over_ssh, "sessions", "e2e", "--json"))
    killed = over_ssh.run(on_the_standin(over_ssh, "sessions", "e2e", "--kill", "listed"))
    shell.expect(pexpect.EOF)
    shell.close()
    again = over_ssh.run(on_the_standin(over_ssh, "sessions", "e2e", "--kill", "listed"))
    assert listed.returncode == 0, listed.err
    assert [(row["session"], row["user"], row["attached"], row["cols"], row["rows"])
            for row in json.loads(listed.out)] == [("listed", "root", True, 100, 30)]
    assert (killed.returncode, killed.out, killed.err) == (0, "", "")
    assert shell.signalstatus is None and shell.exitstatus == 255  # hung up: exit-signal HUP
    assert (again.returncode, again.err) == (
        1, "msb-proxy: sandbox 'e2e' has no session 'listed'; 'msb-proxy sessions e2e' lists "
           "them\n")
