"""Shared fixtures: a private MSB_PROXY_HOME, a client key, and the real OpenSSH client.

Every end-to-end test drives ``/usr/bin/ssh`` (or scp, sftp, rsync) with a generated ``-F``
config whose ProxyCommand is the real ``msb-proxy stdio``, exactly as a user's ``~/.ssh/config``
would. The backend is the local jail unless ``MSB_PROXY_TEST_BACKEND`` selects another:
``microsandbox`` (which needs a host where microVMs boot; elsewhere those tests are skipped with
the reason shown) or ``fake`` (processes on this host as the invoking user: no root and no rootfs
needed, ``make test-fast``). A test that needs a real guest (its users, its files, its isolation)
is marked ``needs_guest("why")`` and skipped on ``fake`` with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROXY = Path(sys.executable).parent / "msb-proxy"
DEFAULT_ROOTFS = Path("/var/cache/msb-proxy/rootfs/bookworm-v1")
TEST_BACKEND = os.environ.get("MSB_PROXY_TEST_BACKEND", "local")
TEST_BACKENDS = ("local", "microsandbox", "fake")
WARM_IDLE_S = 20


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_guest(reason): needs a real guest (the local jail or a microVM): its "
        "users, its /etc, its isolation or its rootfs; skipped on the fake backend")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"msb-proxy test backend: {TEST_BACKEND} (MSB_PROXY_TEST_BACKEND)"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the fake backend, skip what needs a real guest, saying what it needs."""
    if TEST_BACKEND != "fake":
        return
    for item in items:
        mark = item.get_closest_marker("needs_guest")
        if mark is not None:
            reason = mark.args[0] if mark.args else "a real guest"
            item.add_marker(pytest.mark.skip(reason=f"fake backend: needs {reason}"))


# It leaves by os._exit, as msb-proxy does (cli/main.py): the SDK's runtime threads can panic
# and abort the process when Python is finalized under them.
_CREATE_MICROSANDBOX = """
import asyncio, os, sys, traceback, microsandbox as m
async def main() -> None:
    try:
        sb = await m.Sandbox.create(sys.argv[1], image=m.Image.bind(sys.argv[2]), replace=True)
        if len(sys.argv) > 3:
            await sb.stop()
    finally:
        if len(sys.argv) > 3:
            try:
                await m.Sandbox.remove(sys.argv[1])
            except m.MicrosandboxError:
                pass
try:
    asyncio.run(main())
    code = 0
except BaseException:
    traceback.print_exc()
    code = 1
sys.stderr.flush()
os._exit(code)
"""


def create_microsandbox(
    name: str, rootfs: Path, *, probe: bool = False
) -> subprocess.CompletedProcess[str]:
    """Create (and start) microsandbox sandbox ``name`` booting the test rootfs.

    The microsandbox backend only connects to running sandboxes, so the suite creates them.
    """
    argv = [sys.executable, "-c", _CREATE_MICROSANDBOX, name, str(rootfs)]
    if probe:
        argv.append("probe")
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def microsandbox_unavailable_reason(rootfs: Path) -> str | None:
    """Why microVMs cannot run here, or None when they can (checked once, by booting one)."""
    if not Path("/dev/kvm").exists():
        return "no /dev/kvm: microVMs cannot boot on this host"
    probe = create_microsandbox(f"msb-proxy-probe-{os.getpid()}", rootfs, probe=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"microsandbox cannot boot a VM here: {last}"
    return None


@dataclass
class Run:
    """What a client command did."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


@dataclass
class Env:
    """One private msb-proxy installation as a user would have it, plus the clients to drive it."""

    root: Path
    home: Path  # MSB_PROXY_HOME
    user_home: Path  # $HOME of the proxy's invoking user
    key: Path
    config: Path
    backend: str
    rootfs: Path
    sandboxes: list[str] = field(default_factory=list)

    @property
    def runtime_dir(self) -> Path:
        """This installation's XDG_RUNTIME_DIR: where its warm server listens."""
        return self.root / "run"

    @property
    def cold_config(self) -> Path:
        """An ssh config whose ProxyCommand serves in-process (MSB_PROXY_WARM=0), for tests
        that watch the serving process itself."""
        return self.root / "ssh_config.cold"

    def proxy_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSB_PROXY_")}
        env.update(HOME=str(self.user_home), MSB_PROXY_HOME=str(self.home),
                   MSB_PROXY_ROOTFS=str(self.rootfs), MSB_PROXY_BACKEND=self.backend,
                   XDG_RUNTIME_DIR=str(self.runtime_dir), MSB_PROXY_WARM_IDLE_S=str(WARM_IDLE_S))
        return env

    def proxy_command(self, *, warm: bool = True, quiet: bool = True) -> list[str]:
        """The ProxyCommand as an argv, without the trailing host.

        ``quiet``: no progress lines when a sandbox is created or started, so that tests can
        hold stderr to exactly what the command printed (tests of progress turn it off).
        """
        return ["env", f"HOME={self.user_home}", f"MSB_PROXY_HOME={self.home}",
                f"MSB_PROXY_ROOTFS={self.rootfs}", f"XDG_RUNTIME_DIR={self.runtime_dir}",
                f"MSB_PROXY_WARM={'1' if warm else '0'}",
                # Warm servers of the suite's many installations must not outlive it by long.
                f"MSB_PROXY_WARM_IDLE_S={WARM_IDLE_S}", str(PROXY), "stdio",
                "--backend", self.backend, "--host-prefix", "msb-",
                *(["--quiet"] if quiet else [])]

    def guest_tmp(self, sandbox: str) -> str:
        """A directory for the test's files in ``sandbox``: the guest's /tmp, which a real
        guest has to itself; on the fake backend, whose /tmp is the host's, the sandbox's own
        ``tmp/``, removed with the sandbox."""
        if self.backend != "fake":
            return "/tmp"
        from msb_proxy.backends.fake import sandbox_directory

        return str(sandbox_directory(self.home, sandbox) / "tmp")

    def guest_user(self, login: str) -> str:
        """Who a session logged in as ``login`` runs as (``id -un``): that user in a real guest;
        on the fake backend, which takes every login name as the user running msb-proxy (this
        test process's), that user."""
        if self.backend != "fake":
            return login
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name

    def host(self, sandbox: str) -> str:
        """The ssh host name of ``sandbox``; the sandbox is removed when the session ends."""
        if sandbox not in self.sandboxes:
            self.sandboxes.append(sandbox)
            if self.backend == "microsandbox":
                created = create_microsandbox(sandbox, self.rootfs)
                assert created.returncode == 0, created.stderr
        return f"msb-{sandbox}"

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> Run:
        done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                              check=False, env=env, stdin=None if input is not None else
                              subprocess.DEVNULL)
        return Run(done.returncode, done.stdout, done.stderr)

    def ssh(self, sandbox: str, *args: str, input: bytes | None = None, timeout: float = 60,
            user: str | None = None, options: Sequence[str] = ()) -> Run:
        """``ssh -F CONFIG [OPTIONS] [USER@]msb-SANDBOX ARGS...``."""
        target = self.host(sandbox) if user is None else f"{user}@{self.host(sandbox)}"
        return self.run(["ssh", "-F", str(self.config), *options, target, *args],
                        input=input, timeout=timeout)

    def msb_proxy(self, *args: str, input: bytes | None = None, timeout: float = 60) -> Run:
        return self.run([str(PROXY), *args], input=input, timeout=timeout,
                        env=self.proxy_env())


def install(root: Path, backend: str, rootfs: Path, *, authorized: bool = True,
            comment: str = "test") -> Env:
    """A private msb-proxy installation under ``root``: its own MSB_PROXY_HOME, $HOME, client
    key (authorized in MSB_PROXY_HOME unless ``authorized`` is False), runtime directory and
    ssh config."""
    user_home = root / "user"
    (user_home / ".ssh").mkdir(parents=True)
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(key)], check=True)
    home = root / "home"
    home.mkdir(mode=0o700)
    if authorized:
        (home / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    env = Env(root=root, home=home, user_home=user_home, key=key, config=root / "ssh_config",
              backend=backend, rootfs=rootfs)
    env.runtime_dir.mkdir(mode=0o700)
    write_ssh_config(env)
    return env


def write_ssh_config(env: Env, extra: str = "", *, warm: bool = True, quiet: bool = True,
                     path: Path | None = None) -> None:
    proxy = " ".join(shlex.quote(part) for part in env.proxy_command(warm=warm, quiet=quiet))
    (path or env.config).write_text(
        "Host msb-*\n"
        f"  ProxyCommand {proxy} %n\n"
        f"  IdentityFile {env.key}\n"
        "  IdentitiesOnly yes\n"
        "  User root\n"
        "  BatchMode yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n"
        f"  ControlPath {env.root}/cm-%C\n"
        + extra
    )


@pytest.fixture(scope="session")
def msb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The session's msb-proxy installation; its sandboxes are removed at the end."""
    rootfs = Path(os.environ.get("MSB_PROXY_ROOTFS") or DEFAULT_ROOTFS)
    if TEST_BACKEND not in TEST_BACKENDS:
        raise pytest.UsageError(
            f"MSB_PROXY_TEST_BACKEND={TEST_BACKEND!r}: use {', '.join(TEST_BACKENDS)}")
    if TEST_BACKEND != "fake" and not (rootfs / "usr" / "bin").is_dir():
        pytest.fail(f"no test rootfs at {rootfs}: run 'make rootfs' first", pytrace=False)
    if TEST_BACKEND == "microsandbox":
        reason = microsandbox_unavailable_reason(rootfs)
        if reason:
            pytest.skip(f"MSB_PROXY_TEST_BACKEND=microsandbox: {reason}")
    env = install(tmp_path_factory.mktemp("msb"), TEST_BACKEND, rootfs)
    write_ssh_config(env, warm=False, path=env.cold_config)
    yield env
    for name in env.sandboxes:
        env.msb_proxy("rm", name, timeout=60)
    stop_warm_servers(env.runtime_dir)


def warm_servers(runtime_dir: Path) -> list[int]:
    """PIDs of the warm servers listening in ``runtime_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"msb_proxy.cli.warm" in argv and any(
                        arg.startswith(str(runtime_dir).encode()) for arg in argv):
                    found.append(int(entry.name))
    return found


def stop_warm_servers(runtime_dir: Path) -> None:
    for pid in warm_servers(runtime_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def sandbox(msb: Env) -> str:
    """A sandbox shared by the tests that only run commands in it."""
    name = f"shared-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    return name


@pytest.fixture
def fresh_sandbox(msb: Env) -> str:
    """A sandbox of this test's own."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    msb.host(name)
    return name


def have(program: str) -> bool:
    return shutil.which(program) is not None
