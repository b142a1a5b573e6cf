"""The installed microsandbox SDK, as far as msb-proxy relies on it, without a VM.

The microsandbox backend is exercised against ``microsandbox_standin``; these tests pin what
that stand-in assumes about the real SDK, so that an SDK upgrade that changes it fails here:

* the signature of every SDK call the backend makes, and the keywords it passes;
* the members of the enums it reads and the error classes it catches;
* what calls that need no VM answer, exception class and message: a missing sandbox, a template
  the SDK refuses, an image that cannot be pulled, the cloud backend without credentials, and,
  where microVMs cannot boot (as on our machines), what a failed boot leaves behind and what
  ``fork`` refuses before it copies anything;
* msb-proxy itself on the real SDK, through the real ``ssh``: an image that cannot be pulled
  and, where microVMs cannot boot, a failed boot, each one line, and what the failed boot
  leaves listed and removed by ``msb-proxy ls`` and ``rm``.

Each scenario runs against the real SDK in a subprocess of its own (``MSB_HOME`` a fresh
directory, so nothing of the user's microsandbox state is read or written, and its environment
read at start-up as the SDK reads it) and, in-process, against the stand-in: both must give the
same observations.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import microsandbox
import pytest
from conftest import DEFAULT_ROOTFS, PROXY, Env, Run, install, write_ssh_config
from microsandbox import errors as sdk_errors
from microsandbox_standin import BOOT_FAILURE_KVM, StandInSDK

from msb_proxy.backends.base import SandboxState

Observations = dict[str, Any]
Scenario = Callable[[Any, Path], Coroutine[Any, Any, Observations]]
HERE = Path(__file__).resolve().parent

POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD = inspect.Parameter.KEYWORD_ONLY
EMPTY = inspect.Parameter.empty


def parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each parameter, ``self`` left out."""
    found = inspect.signature(function).parameters.values()
    return [(p.name, p.kind, p.default) for p in found if p.name != "self"]


# ---- signatures of every call the backend makes

@pytest.mark.parametrize(("function", "expected"), [
    (microsandbox.Sandbox.get, [("name", POSITIONAL, EMPTY)]),
    (microsandbox.Sandbox.remove, [("name", POSITIONAL, EMPTY)]),
    (microsandbox.Sandbox.list_with, [("cursor", KEYWORD, None), ("limit", KEYWORD, None),
                                      ("labels", KEYWORD, None)]),
    (microsandbox.SandboxHandle.refresh, []),
    (microsandbox.SandboxHandle.connect, [("timeout", POSITIONAL, None)]),
    (microsandbox.SandboxHandle.start, [("detached", KEYWORD, False)]),
    (microsandbox.SandboxHandle.resume, []),
    (microsandbox.SandboxHandle.fork, [
        ("name", POSITIONAL, EMPTY), ("record_integrity", KEYWORD, False),
        ("guest_flush", KEYWORD, None), ("volumes", KEYWORD, None)]),
    (microsandbox.Sandbox.detach, []),
    (microsandbox.SandboxHandle.stop, [("timeout", POSITIONAL, None)]),
    (microsandbox.SandboxHandle.logs, [("tail", POSITIONAL, None), ("since_ms", POSITIONAL, None),
                                       ("until_ms", POSITIONAL, None),
                                       ("sources", POSITIONAL, None)]),
    (microsandbox.Sandbox.exec_stream, [
        ("cmd", POSITIONAL, EMPTY), ("args", POSITIONAL, None), ("cwd", KEYWORD, None),
        ("user", KEYWORD, None), ("env", KEYWORD, None), ("timeout", KEYWORD, None),
        ("stdin", KEYWORD, None), ("tty", KEYWORD, False), ("rlimits", KEYWORD, None)]),
    (microsandbox.ExecHandle.take_stdin, []),
    (microsandbox.ExecHandle.recv, []),
    (microsandbox.ExecHandle.signal, [("sig", POSITIONAL, EMPTY)]),
    (microsandbox.ExecHandle.resize, [("rows", POSITIONAL, EMPTY), ("cols", POSITIONAL, EMPTY)]),
    (microsandbox.ExecSink.write, [("data", POSITIONAL, EMPTY)]),
    (microsandbox.ExecSink.close, []),
    (microsandbox.SandboxFsOps.read, [("path", POSITIONAL, EMPTY)]),
    (microsandbox.SandboxFsOps.exists, [("path", POSITIONAL, EMPTY)]),
    (microsandbox.Image.bind, [("path", POSITIONAL, EMPTY)]),
    (microsandbox.set_default_backend, [
        ("kind", POSITIONAL, EMPTY), ("url", KEYWORD, None), ("api_key", KEYWORD, None),
        ("profile", KEYWORD, None)]),
    (microsandbox.backend_scope, [
        ("kind", POSITIONAL, EMPTY), ("url", KEYWORD, None), ("api_key", KEYWORD, None),
        ("profile", KEYWORD, None)]),
], ids=lambda value: getattr(value, "__qualname__", None) or "")
def test_each_sdk_call_the_backend_makes_has_the_signature_it_is_called_with(
        function: Callable[..., Any], expected: list[tuple[str, Any, Any]]) -> None:
    assert parameters(function) == expected


def test_create_with_progress_takes_every_keyword_the_backend_passes() -> None:
    # A native **kwargs: the keywords are checked when it is called (see the scenarios).
    assert parameters(microsandbox.Sandbox.create_with_progress) == [
        ("name", POSITIONAL, EMPTY), ("kwargs", inspect.Parameter.VAR_KEYWORD, EMPTY)]
    assert parameters(microsandbox.Image.oci)[0] == ("reference", POSITIONAL, EMPTY)


def test_the_attributes_the_backend_reads_exist() -> None:
    for cls, names in [
        (microsandbox.SandboxHandle, ("name", "id", "status", "created_at", "updated_at")),
        (microsandbox.SandboxPage, ("sandboxes", "next_cursor")),
        (microsandbox.ExecEvent, ("event_type", "pid", "data", "code")),
        (microsandbox.ExecHandle, ("id",)),
        (microsandbox.Sandbox, ("fs", "owns_lifecycle")),
        (microsandbox.PullSession, ("progress", "result", "__aenter__", "__aexit__")),
        (microsandbox.PullEvent, ("event_type", "layer_count", "total_download_bytes",
                                  "layer_index", "downloaded_bytes", "total_bytes")),
        (microsandbox.LogEntry, ("text", "source", "timestamp_ms")),
        (microsandbox.MountConfig, ("kind", "bind", "readonly")),
    ]:
        assert [name for name in names if not hasattr(cls, name)] == [], cls
    info = microsandbox.default_backend_info()
    assert {name: hasattr(info, name) for name in ("kind", "api_url", "profile", "source")} \
        == dict.fromkeys(("kind", "api_url", "profile", "source"), True)
    assert callable(microsandbox.is_runtime_installed)


def test_modify_takes_the_labels_a_fork_is_given() -> None:
    found = {name: (kind, default) for name, kind, default
             in parameters(microsandbox.SandboxHandle.modify)}
    assert found["labels"] == (KEYWORD, None)


def test_the_sdk_value_constructors_the_backend_uses_accept_its_arguments(
        tmp_path: Path) -> None:
    mount = microsandbox.MountConfig(kind=microsandbox.MountKind.BIND, bind=str(tmp_path),
                                     readonly=True)
    assert mount._to_dict()["readonly"] is True
    assert microsandbox.Network.none()._to_dict() is not None
    for profile in microsandbox.NetworkProfile:
        assert microsandbox.Network.from_profiles(profile)._to_dict() is not None
    assert isinstance(microsandbox.Stdin.pipe(), microsandbox.Stdin)


# ---- enums and errors

def test_sandbox_statuses_are_the_states_msb_proxy_shows() -> None:
    assert {status.value for status in microsandbox.SandboxStatus} == \
        {state.value for state in SandboxState}


@pytest.mark.parametrize(("enum", "members"), [
    (microsandbox.ExecEventType, {"STARTED", "STDOUT", "STDERR", "EXITED", "FAILED",
                                  "STDIN_ERROR"}),
    (microsandbox.PullEventType, {"RESOLVED", "LAYER_DOWNLOAD_PROGRESS",
                                  "LAYER_DOWNLOAD_COMPLETE", "COMPLETE"}),
    (microsandbox.NetworkProfile, {"PUBLIC", "PRIVATE", "HOST"}),
    (microsandbox.BackendKind, {"LOCAL", "CLOUD"}),
    (microsandbox.LogReadSource, {"SYSTEM", "ALL"}),
    (microsandbox.MountKind, {"BIND"}),
    (microsandbox.GuestFlush, {"AUTO"}),
])
def test_the_enum_members_the_backend_uses_exist(enum: type[Any], members: set[str]) -> None:
    assert members <= set(enum.__members__)


def test_the_network_names_of_the_config_are_the_sdks_profiles() -> None:
    from msb_proxy.config import NETWORKS

    assert set(NETWORKS) - {"none"} == {profile.value for profile in microsandbox.NetworkProfile}


@pytest.mark.parametrize("name", [
    "SandboxNotFoundError", "SandboxNotRunningError", "SandboxReplacedError",
    "SandboxAlreadyExistsError", "SandboxStillRunningError", "InvalidConfigError",
    "ImagePullFailedError", "ImageNotFoundError", "RuntimeNotInstalledError",
    "RuntimeIncompleteError", "FilesystemError", "PathNotFoundError", "ExecFailedError",
    "UnsupportedError", "CloudHttpError",
])
def test_every_error_class_the_backend_catches_is_a_microsandbox_error(name: str) -> None:
    assert issubclass(getattr(microsandbox, name), sdk_errors.MicrosandboxError)
    assert getattr(microsandbox, name) is getattr(sdk_errors, name)


# ---- what calls answer without a VM: the real SDK and the stand-in alike

async def _outcome(call: Awaitable[Any] | Callable[[], Any]) -> Any:
    """The class and message of what ``call`` raised, or "ok"."""
    try:
        result = call() if callable(call) else call
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return "ok"


async def missing_sandbox(m: Any, scratch: Path) -> Observations:
    page = await m.Sandbox.list_with(labels={"created-by": "msb-proxy"})
    return {
        "get": await _outcome(m.Sandbox.get("nope")),
        "remove": await _outcome(m.Sandbox.remove("nope")),
        "list": [len(page.sandboxes), page.next_cursor],
    }


async def refused_template(m: Any, scratch: Path) -> Observations:
    missing = str(scratch / "no-rootfs")
    observed: Observations = {"bogus keyword": await _outcome(
        lambda: m.Sandbox.create_with_progress("web", image=m.Image.bind(missing), bogus=1))}
    # Every keyword the backend passes is taken; the missing rootfs is what is refused.
    session = m.Sandbox.create_with_progress(
        "web", image=m.Image.bind(missing), cpus=1, memory=512, env={"A": "1"},
        workdir="/srv", labels={"created-by": "msb-proxy"}, detached=True,
        volumes={"/data": m.MountConfig(kind=m.MountKind.BIND, bind=str(scratch),
                                        readonly=True)},
        network=m.Network.from_profiles(m.NetworkProfile.PUBLIC))
    observed["create"] = (await _outcome(session.result()))
    observed["create"][1] = observed["create"][1].replace(missing, "MISSING")
    observed["left behind"] = await _outcome(m.Sandbox.get("web"))
    return observed


async def unpullable_image(m: Any, scratch: Path) -> Observations:
    session = m.Sandbox.create_with_progress(
        "web", image=m.Image.oci("registry.invalid/nope:1"), detached=True)
    events = []
    async with session:
        async for event in session.progress:
            events.append(event.event_type.value)
        outcome = await _outcome(session.result())
    return {"events": events, "class": outcome[0],
            "message": outcome[1].split(" (")[0] if outcome != "ok" else outcome}


async def cloud_without_credentials(m: Any, scratch: Path) -> Observations:
    return {"get": await _outcome(m.Sandbox.get("web")),
            "kind": await _outcome(m.default_backend_kind)}


async def cloud_with_an_unknown_profile(m: Any, scratch: Path) -> Observations:
    return {"get": await _outcome(m.Sandbox.get("web")),
            "set": await _outcome(lambda: m.set_default_backend(m.BackendKind.CLOUD,
                                                                profile="nope"))}


async def cloud_set_without_credentials(m: Any, scratch: Path) -> Observations:
    return {"set": await _outcome(lambda: m.set_default_backend(m.BackendKind.CLOUD))}


async def cloud_refuses_a_host_directory_rootfs(m: Any, scratch: Path) -> Observations:
    with m.backend_scope(m.BackendKind.CLOUD, api_key="test-key",
                         url="http://127.0.0.1:9") as scope:
        assert scope is not None
        info = m.default_backend_info()
        session = m.Sandbox.create_with_progress("web", image=m.Image.bind(str(scratch)))
        outcome = await _outcome(session.result())
    return {"create": outcome, "info": [info.kind, info.api_url, info.source],
            "after the scope": m.default_backend_info().kind}


async def failed_boot(m: Any, scratch: Path) -> Observations:
    """Two sandboxes whose VMs die while booting (only where microVMs cannot run)."""
    (scratch / "root").mkdir()

    async def create(name: str) -> Any:
        session = m.Sandbox.create_with_progress(name, image=m.Image.bind(str(scratch / "root")),
                                                 detached=True)
        async with session:
            return await _outcome(session.result())

    first = asyncio.ensure_future(create("first"))
    while isinstance(await _outcome(m.Sandbox.get("first")), list) and not first.done():
        await asyncio.sleep(0.05)  # until its row exists: the second is then the newer one
    outcomes = [await create("second"), await first]
    if "ok" in outcomes:
        return {"booted": True}
    handle = await m.Sandbox.get("second")
    system = await handle.logs(sources=[m.LogReadSource.SYSTEM])
    page = await m.Sandbox.list()
    return {
        "create": outcomes[0],
        "status": handle.status.value,
        "id": bool(re.fullmatch(r"local:\d+", handle.id)),
        "milliseconds": handle.created_at > 1e12 and handle.updated_at >= handle.created_at,
        "output log": len(await handle.logs()),
        "the system log's ERROR lines": [
            " ".join(entry.text().split()) for entry in system
            if entry.text().startswith("ERROR ")],
        "stop": repr(await handle.stop()),
        "resume": await _outcome(handle.resume()),
        "connect": await _outcome(handle.connect()),
        "newest first": [h.name for h in page.sandboxes],
    }


async def fork_refused(m: Any, scratch: Path) -> Observations:
    """What fork answers before it copies anything, of a sandbox whose VM died booting (only
    where microVMs cannot run): a bad name, a stopped source, a removed one."""
    (scratch / "root").mkdir()
    session = m.Sandbox.create_with_progress("parent", image=m.Image.bind(str(scratch / "root")),
                                             detached=True)
    async with session:
        if await _outcome(session.result()) == "ok":
            return {"booted": True}
    handle = await m.Sandbox.get("parent")
    observed = {"bad name": await _outcome(handle.fork("bad/name")),
                "stopped": await _outcome(handle.fork("child",
                                                      guest_flush=m.GuestFlush.AUTO)),
                "no fork left": await _outcome(m.Sandbox.get("child"))}
    await m.Sandbox.remove("parent")
    observed["removed"] = await _outcome(handle.fork("child"))
    return observed


FORK_REFUSED: Observations = {
    "bad name": ["InvalidConfigError", "invalid config: sandbox name must start with an "
                 "alphanumeric and contain only alphanumeric, dots, hyphens, and underscores: "
                 "bad/name"],
    "stopped": ["SandboxNotRunningError", 'sandbox sandbox "parent" has no live runtime'],
    "no fork left": ["SandboxNotFoundError", "sandbox not found: child"],
    "removed": ["SandboxNotFoundError", "sandbox not found: parent"],
}

EXPECTED: dict[str, tuple[Scenario, dict[str, str], Observations]] = {
    "missing sandbox": (missing_sandbox, {}, {
        "get": ["SandboxNotFoundError", "sandbox not found: nope"],
        "remove": ["SandboxNotFoundError", "sandbox not found: nope"],
        "list": [0, None],
    }),
    "refused template": (refused_template, {}, {
        "bogus keyword": ["TypeError", "unexpected keyword argument 'bogus'"],
        "create": ["InvalidConfigError", "invalid config: rootfs bind path does not exist: "
                                         "MISSING"],
        "left behind": ["SandboxNotFoundError", "sandbox not found: web"],
    }),
    "unpullable image": (unpullable_image, {}, {
        "events": ["resolving"], "class": "MicrosandboxError",
        "message": "image error: registry error: error sending request for url",
    }),
    "cloud without credentials": (cloud_without_credentials, {"MSB_BACKEND": "cloud"}, {
        "get": ["InvalidConfigError", "invalid config: MSB_BACKEND=cloud requires a non-empty "
                                      "MSB_API_KEY or a cloud profile"],
        "kind": ["InvalidConfigError", "invalid config: MSB_BACKEND=cloud requires a "
                                       "non-empty MSB_API_KEY or a cloud profile"],
    }),
    "cloud with an unknown profile": (cloud_with_an_unknown_profile, {"MSB_PROFILE": "nope"}, {
        "get": ["InvalidConfigError",
                'invalid config: active profile "nope" not found in global config'],
        "set": ["InvalidConfigError", 'invalid config: profile "nope" not found in global '
                                      "config"],
    }),
    "cloud set without credentials": (cloud_set_without_credentials, {}, {
        "set": ["ValueError", "cloud backend requires api_key or profile"],
    }),
    "cloud refuses a host directory rootfs": (cloud_refuses_a_host_directory_rootfs, {}, {
        "create": ["UnsupportedError", "sandbox.create() is not supported by this backend: the "
                                       "host-directory rootfs option is not accepted here"],
        "info": ["cloud", "http://127.0.0.1:9", "programmatic"],
        "after the scope": "local",
    }),
}
FAILED_BOOT: Observations = {
    "create": ["MicrosandboxError", 'failed to start "second": sandbox process exited (exit '
                                    "status: 1) before agent relay became available"],
    "status": "stopped", "id": True, "milliseconds": True, "output log": 0,
    "the system log's ERROR lines": [BOOT_FAILURE_KVM[0]], "stop": "()",
    "resume": ["SandboxNotRunningError", 'sandbox sandbox "second" has no live runtime'],
    "connect": ["SandboxNotRunningError", "sandbox 'second' is not running (status: Stopped)"],
    "newest first": ["second", "first"],
}

# The scenario's process leaves by os._exit, as msb-proxy does (cli/main.py): when Python is
# finalized, the SDK's runtime threads may still be winding down, and one that then calls into
# the interpreter panics "in a function that cannot unwind" and aborts the process (seen in CI
# after an unpullable image, SIGABRT with the scenario's answer already printed; here 1 of 90
# runs with the two cores busy). The tests at the end run msb-proxy itself on the real SDK.
_REAL = """
import asyncio, json, os, sys
from pathlib import Path
import microsandbox
import test_sdk_contract as contract
scenario = contract.SCENARIOS[sys.argv[1]]
print(json.dumps(asyncio.run(scenario(microsandbox, Path(sys.argv[2])))), flush=True)
os._exit(0)
"""
SCENARIOS: dict[str, Scenario] = {
    **{name: scenario for name, (scenario, _, _) in EXPECTED.items()},
    "failed boot": failed_boot,
    "fork refused": fork_refused,
}
SDK_ENVIRONMENT = ("MSB_BACKEND", "MSB_API_KEY", "MSB_API_URL", "MSB_PROFILE", "MSB_HOME")


def on_the_real_sdk(name: str, scratch: Path, env: dict[str, str],
                    timeout: float = 60) -> Observations:
    """Run scenario ``name`` in a fresh process with the real SDK and a fresh MSB_HOME."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in SDK_ENVIRONMENT}
    (scratch / "work").mkdir()
    # A short MSB_HOME: the runtime's unix sockets live under it (108 bytes at most).
    with tempfile.TemporaryDirectory(prefix="msb-", dir="/tmp") as home:
        environment.update(env, MSB_HOME=home, HOME=str(scratch),
                           PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
        done = subprocess.run([sys.executable, "-c", _REAL, name, str(scratch / "work")],
                              capture_output=True, text=True, timeout=timeout,
                              env=environment, check=False)
    assert done.returncode == 0, done.stderr
    observed: Observations = json.loads(done.stdout)
    return observed


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInSDK]:
    for key in SDK_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    sdk = StandInSDK(tmp_path / "runtime")
    yield sdk
    sdk.close()


def on_the_standin(sdk: StandInSDK, name: str, scratch: Path, env: dict[str, str],
                   monkeypatch: pytest.MonkeyPatch) -> Observations:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (scratch / "work").mkdir()
    scenario = SCENARIOS[name]
    return asyncio.run(scenario(_StandInModule(sdk), scratch / "work"))


class _StandInModule(ModuleType):
    """The stand-in as a scenario sees the SDK module."""

    def __init__(self, sdk: StandInSDK) -> None:
        super().__init__("microsandbox")
        self.__dict__.update({k: v for k, v in vars(sdk).items() if not k.startswith("_")})
        for name in ("set_default_backend", "backend_scope", "default_backend_kind",
                     "default_backend_info"):
            setattr(self, name, getattr(sdk, name))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_real_sdk_answers_as_the_standin_assumes(name: str, tmp_path: Path) -> None:
    _, env, expected = EXPECTED[name]
    assert on_the_real_sdk(name, tmp_path, env) == expected


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_standin_answers_as_the_real_sdk_does(
        name: str, standin: StandInSDK, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, env, expected = EXPECTED[name]
    assert on_the_standin(standin, name, tmp_path, env, monkeypatch) == expected


# Scenarios that need a sandbox whose VM died booting: only where microVMs cannot boot (our
# machines: nested KVM); elsewhere skipped. The stand-in is made to fail its boots for them.
ERROR_LINES = "the system log's ERROR lines"
AFTER_A_FAILED_BOOT: dict[str, Observations] = {
    "failed boot": FAILED_BOOT,  # what a failed boot leaves behind
    "fork refused": FORK_REFUSED,  # what fork refuses of the sandbox it left
}


@pytest.mark.parametrize("name", list(AFTER_A_FAILED_BOOT))
def test_after_a_failed_boot_the_real_sdk_answers_as_the_standin_assumes(
        name: str, tmp_path: Path) -> None:
    observed = on_the_real_sdk(name, tmp_path, {}, timeout=300)
    if observed == {"booted": True}:
        pytest.skip("microVMs boot on this host: there is no boot failure to observe")
    expected = AFTER_A_FAILED_BOOT[name]
    if observed.get(ERROR_LINES) == []:
        # Observed (0.7.x, 1 failed boot in 4 on a loaded 2-core machine): the runtime's last
        # lines, the VMM's ERROR among them, are lost as the sandbox process exits; the
        # backend then reports what the SDK said (test_a_boot_failure_without_a_reason_...).
        expected = {**expected, ERROR_LINES: []}
    assert observed == expected


@pytest.mark.parametrize("name", list(AFTER_A_FAILED_BOOT))
def test_after_a_failed_boot_the_standin_answers_as_the_real_sdk_does(
        name: str, standin: StandInSDK, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    standin.fail_boot()
    assert on_the_standin(standin, name, tmp_path, {}, monkeypatch) == AFTER_A_FAILED_BOOT[name]


# ---- msb-proxy itself on the real SDK: the real ssh through a ProxyCommand, no stand-in; what
# needs no VM to run (an image that cannot be pulled) and, where VMs cannot boot, a failed boot.

@pytest.fixture
def real_sdk() -> Iterator[tuple[Env, dict[str, str]]]:
    """An installation on the microsandbox backend and the real SDK, the SDK's MSB_HOME a fresh
    directory; and the environment its ``msb-proxy`` commands run in. Both in short directories:
    ssh's ControlPath and the runtime's sockets are unix sockets (108 bytes at most)."""
    with tempfile.TemporaryDirectory(prefix="msbr-", dir="/tmp") as root, \
            tempfile.TemporaryDirectory(prefix="msb-", dir="/tmp") as sdk_home:
        env = install(Path(root), "microsandbox", DEFAULT_ROOTFS)
        write_ssh_config(env, warm=False)
        env.config.write_text(env.config.read_text().replace(
            "ProxyCommand env ", f"ProxyCommand env MSB_HOME={sdk_home} ", 1))
        environment = {**{key: value for key, value in env.proxy_env().items()
                          if key not in SDK_ENVIRONMENT}, "MSB_HOME": sdk_home}
        yield env, environment


def _ssh(env: Env, host: str) -> Run:
    return env.run(["ssh", "-F", str(env.config), host, "true"], timeout=120)


def _msb_proxy(real_sdk: tuple[Env, dict[str, str]], *args: str) -> Run:
    env, environment = real_sdk
    return env.run([str(PROXY), *args, "--backend", "microsandbox"], timeout=120,
                   env=environment)


def _one_error(run: Run) -> str:
    """The one error of a connection msb-proxy refused: its line on stderr, which ``ssh``
    prints once more as the disconnect's reason; nothing else (no panic of the SDK's runtime
    as msb-proxy exits)."""
    assert (run.returncode, run.out) == (255, ""), run.err
    error, *rest = run.err.splitlines()
    assert error.startswith("msb-proxy: "), run.err
    reason = "Received disconnect from UNKNOWN port 65535:7: "
    assert [line.startswith(reason) and error.startswith(line[len(reason):])
            for line in rest] == [True], run.err
    return error


def test_msb_proxy_on_the_real_sdk_names_an_image_that_cannot_be_pulled(
        real_sdk: tuple[Env, dict[str, str]]) -> None:
    env, _ = real_sdk
    config_toml = env.home / "config.toml"
    config_toml.write_text('[sandbox.web]\nimage = "registry.invalid/nope:1"\n')
    assert _one_error(_ssh(env, "msb-web")) == (
        "msb-proxy: cannot pull image 'registry.invalid/nope:1' for sandbox 'web' (image error: "
        "registry error: error sending request for url (https://registry.invalid/v2/nope/"
        "manifests/1)); check the image name and the network, or set another image in "
        f"{config_toml}")
    listed = _msb_proxy(real_sdk, "ls", "--all")
    assert (listed.returncode, listed.out) == (0, "no sandboxes\n"), listed.err


def test_msb_proxy_on_the_real_sdk_where_vms_cannot_boot_says_so_and_leaves_a_sandbox_to_rm(
        real_sdk: tuple[Env, dict[str, str]]) -> None:
    env, _ = real_sdk
    (env.home / "config.toml").write_text(f'[sandbox.web]\nimage = "{DEFAULT_ROOTFS}"\n')
    created = _ssh(env, "msb-web")
    if created.returncode == 0:
        assert _msb_proxy(real_sdk, "rm", "web").returncode == 0
        pytest.skip("microVMs boot on this host: there is no boot failure to observe")
    # Created, then (the sandbox left STOPPED by the SDK) started again: the same one line.
    for run in (created, _ssh(env, "msb-web")):
        error = _one_error(run)
        cannot_run = re.fullmatch(
            r"msb-proxy: microVMs cannot run on this host: sandbox 'web' died while booting "
            r"\(.*KVM.*\); use the local backend instead: --backend local or "
            r"MSB_PROXY_BACKEND=local", error)
        # The VMM's ERROR line can be lost as the sandbox process exits (see the failed-boot
        # scenarios above): then what the SDK said is all there is.
        without_a_reason = error == (
            "msb-proxy: sandbox 'web' failed to boot: failed to start \"web\": sandbox process "
            "exited (exit status: 1) before agent relay became available; see 'msb logs web'")
        assert cannot_run or without_a_reason, error
    listed = _msb_proxy(real_sdk, "ls")
    assert (listed.returncode, listed.out.split()) == (
        0, ["NAME", "STATE", "BACKEND", "SSH", "web", "stopped", "microsandbox", "msb-web"])
    removed = _msb_proxy(real_sdk, "rm", "web")
    assert (removed.returncode, removed.err) == (0, "")
    listed = _msb_proxy(real_sdk, "ls", "--all")
    assert (listed.returncode, listed.out) == (0, "no sandboxes\n"), listed.err
