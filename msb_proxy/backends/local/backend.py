"""The ``local`` backend: each sandbox is a persistent Linux namespace jail over a rootfs directory.

A sandbox ``NAME`` lives in ``MSB_PROXY_HOME/sandboxes/<slug>/``::

    name        the sandbox name (the directory is named by a slug of it)
    upper/      its writable layer; the base rootfs is mounted read-only beneath it
    work/       overlayfs scratch space
    lower/ root/  mount points, used only inside the jail's own mount namespace
    init.sock   the jail init's control socket (0600)
    init.pid    host PID of the jail init
    init.log    what the init printed

The jail is started by the first connection and reused by later ones; ``msb-proxy stop`` ends
it, ``msb-proxy rm`` also deletes the writable layer. All jail work is done by the init
(``jail.py``); this module only starts it and talks to it. Processes are forked by the init inside
the jail, and their pipes or terminal are handed to us, so guest output flows straight from the
guest's pipe to our SSH channel. Needs root (mounts and namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from msb_proxy.backends.base import (
    Backend,
    Check,
    CheckStatus,
    GuestProcess,
    GuestUser,
    ProcessListener,
    ProcessSpec,
    Sandbox,
    SandboxInfo,
    SandboxState,
    SessionInfo,
    SessionListener,
)
from msb_proxy.backends.local.control import (
    LocalProcess,
    connect,
    exchange,
    ping,
    process_request,
    request,
)
from msb_proxy.backends.local.forks import copy_sandbox, forget, thaw_abandoned
from msb_proxy.backends.locking import retire_lock, sandbox_lock
from msb_proxy.config import (
    IMAGE_OPTION,
    NETWORK_OPTION,
    VOLUMES_OPTION,
    Config,
    Option,
    SandboxTemplate,
)
from msb_proxy.errors import (
    BackendUnavailableError,
    ConfigError,
    SandboxError,
    SandboxNotFoundError,
    UnknownUserError,
)
from msb_proxy.progress import Progress
from msb_proxy.state import StateDir, faults_of

if TYPE_CHECKING:
    from msb_proxy.backends.links import Link

__all__ = ["LocalBackend", "LocalSandbox"]

# The jail init speaks the protocol of the proxy that started it; bump this whenever a message
# changes meaning, so a newer proxy never talks past an older init still running.
PROTOCOL = 6
START_TIMEOUT_S = 30.0
LOCK_WAIT_S = 120.0
STOP_TIMEOUT_S = 10.0


class LocalBackend(Backend):
    """Sandboxes as namespace jails over a base rootfs directory.

    On connect: a running jail is used; a stopped (or crashed) one is started; a missing one is
    created from its template when the template allows it, or, when the template names a
    ``fork_of``, made as a fork of that sandbox (``forks.py``). A jail another connection is
    bringing up is waited for (the per-sandbox lock), at most ``LOCK_WAIT_S``. Its template
    options: ``image``, a root file system directory (default: ``rootfs``); ``volumes``;
    ``network``, which can only be ``none``. There are no cgroups to hold ``cpus`` or
    ``memory``, so the config file refuses those for it.
    """

    name = "local"
    options: ClassVar[Mapping[str, Option]] = {
        "image": IMAGE_OPTION, "volumes": VOLUMES_OPTION, "network": NETWORK_OPTION}

    def __init__(self, state: StateDir, rootfs: Path) -> None:
        self.state = state
        self.rootfs = rootfs

    @classmethod
    def from_config(cls, config: Config) -> LocalBackend:
        return cls(StateDir(config.home), config.rootfs)

    @classmethod
    def checks(cls, config: Config) -> list[Check]:
        """Root, overlayfs and the base rootfs."""
        root = os.geteuid() == 0
        overlay = _has_overlay()
        rootfs = config.rootfs
        usable = _is_rootfs(rootfs)
        return [
            Check("root", CheckStatus.OK if root else CheckStatus.FAIL,
                  "running as root" if root else
                  "the local backend mounts and creates namespaces: run msb-proxy as root"),
            Check("overlayfs", CheckStatus.OK if overlay else CheckStatus.FAIL,
                  "the kernel has overlayfs" if overlay else
                  "the kernel lacks overlayfs: load it with 'modprobe overlay'"),
            Check("rootfs", CheckStatus.OK if usable else CheckStatus.FAIL,
                  str(rootfs) if usable else
                  f"no root file system at {rootfs}: build one with 'make rootfs' or set "
                  "MSB_PROXY_ROOTFS"),
        ]

    def _lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        hint = f"see {self.state.sandbox_dir(name) / 'init.log'}"
        return sandbox_lock(self.state.lock_file(name), name, LOCK_WAIT_S, hint)

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise BackendUnavailableError(
                "the local backend needs root (it mounts and creates namespaces); run as root"
            )

    def _base_rootfs(self, name: str, template: SandboxTemplate) -> Path:
        network = self.option(template, "network")
        if network not in (None, "none"):
            raise ConfigError(
                f"sandbox {name!r}: the local backend gives a sandbox its own loopback and no "
                f"other network; network = {network!r} needs the microsandbox backend"
            )
        image = self.option(template, "image")
        if image is not None and not image.startswith("/"):
            raise ConfigError(
                f"sandbox {name!r}: the local backend boots a root file system directory, not "
                f"the image {image!r}; set image to a directory or use the microsandbox backend"
            )
        rootfs = Path(image) if image is not None else self.rootfs
        if not _is_rootfs(rootfs):
            raise BackendUnavailableError(
                f"no rootfs at {rootfs}; build one with 'make rootfs' or point "
                "MSB_PROXY_ROOTFS (or image in the config file) at a root file system directory"
            )
        return rootfs

    async def open(self, name: str, template: SandboxTemplate, progress: Progress) -> LocalSandbox:
        """Return the running jail ``name``, starting or creating it as its state needs."""
        self._check_host()
        directory = self.state.sandbox_dir(name)
        socket_path = directory / "init.sock"
        volumes = self.option(template, "volumes")
        created = False
        async with self._lock(name):
            thaw_abandoned(self.state, name)  # a frozen init would not even answer the ping
            protocol = await ping(socket_path)
            started = protocol is None
            if protocol is None:
                settings = _read_settings(directory)
                if settings is None:
                    if template.fork_of is not None:
                        _check_volumes(name, volumes)
                        await self.fork(template.fork_of, name, progress)
                        settings = _read_settings(directory) or {}
                    else:
                        if not template.create:
                            raise SandboxNotFoundError(
                                f"there is no sandbox {name!r} and its template does not "
                                f"allow creating it; set create = true for it in "
                                f"{self.state.config_file}"
                            )
                        rootfs = self._base_rootfs(name, template)
                        _check_volumes(name, volumes)
                        progress.step(f"creating sandbox {name!r} from {rootfs} ...")
                        settings = self._create(name, directory, rootfs)
                    created = True
                    try:
                        await self._start(name, directory, settings, volumes)
                    except BaseException:
                        # A sandbox that never started is not left half made.
                        shutil.rmtree(directory, ignore_errors=True)
                        raise
                else:
                    progress.step(f"starting sandbox {name!r} ...")
                    _check_volumes(name, volumes)
                    await self._start(name, directory, settings, volumes)
            elif protocol != PROTOCOL:
                raise SandboxError(
                    f"sandbox {name!r} runs a jail from another msb-proxy version; restart it "
                    f"with 'msb-proxy stop {name}' (its files are kept)"
                )
        if started:
            progress.done(f"sandbox {name!r} ready")
        run_id = str(_read_pid(directory / "init.pid"))
        sandbox = LocalSandbox(name, socket_path, run_id=run_id, started=started)
        sandbox.created = created
        return sandbox

    async def fork(self, parent: str, child: str, progress: Progress) -> None:
        """A new jail's directory over a copy of ``parent``'s writable layer, taken while
        ``parent``'s processes are frozen (see ``forks.py``); ``parent`` keeps running, or
        stays stopped. Holds ``parent``'s lock meanwhile, so that it is not started, stopped
        or removed under the copy."""
        source = self.state.sandbox_dir(parent)
        if _read_settings(source) is None:
            raise SandboxNotFoundError(f"there is no sandbox {parent!r} to fork")
        progress.step(f"forking sandbox {parent!r} as {child!r} ...")
        async with self._lock(parent):
            running = await ping(source / "init.sock") is not None
            await copy_sandbox(parent, source, child, self.state.sandbox_dir(child),
                               init_pid=_read_pid(source / "init.pid") if running else None,
                               state=self.state, progress=progress)

    def _create(self, name: str, directory: Path, rootfs: Path) -> dict[str, str]:
        self.state.ensure("sandboxes")
        settings = {"name": name, "rootfs": str(rootfs)}
        with faults_of(directory, "make the sandbox's directory"):
            directory.mkdir(mode=0o700, exist_ok=True)
            # The base a writable layer was made on is part of the sandbox: later starts keep it.
            (directory / "sandbox.json").write_text(json.dumps(settings), encoding="utf-8")
            (directory / "name").write_text(name + "\n", encoding="utf-8",
                                            errors="surrogateescape")
        return settings

    async def _start(self, name: str, directory: Path, settings: dict[str, str],
                     volumes: Sequence[str]) -> None:
        ready_r, ready_w = os.pipe()
        with open(directory / "init.log", "ab") as log:
            jail = {"name": name, "rootfs": settings["rootfs"], "dir": str(directory),
                    "ready_fd": ready_w, "protocol": PROTOCOL, "volumes": list(volumes)}
            # The guest sees the init as PID 1: argv[0] "msb-init" and no host paths in argv.
            # Only msb_proxy and the standard library are imported there, so PYTHONPATH is all
            # it needs of this installation.
            process = subprocess.Popen(
                # -P and cwd "/": no module from wherever ssh was run can stand in for ours.
                ["msb-init", "-P", "-m", "msb_proxy.backends.local.jail"],
                executable=sys.executable,
                cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                     "MSB_PROXY_JAIL": json.dumps(jail),
                     "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
                     # argv[0] is no path Python could find its standard library from
                     "PYTHONHOME": sys.base_prefix},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                pass_fds=(ready_w,), start_new_session=True,
            )
        os.close(ready_w)
        try:
            reply = await asyncio.wait_for(_read_all(ready_r), START_TIMEOUT_S)
        except TimeoutError:
            _kill_group(process.pid)
            raise SandboxError(
                f"sandbox {name!r} did not start within {START_TIMEOUT_S:.0f} s; "
                f"see {directory / 'init.log'}"
            ) from None
        except asyncio.CancelledError:
            # The client left while the jail was coming up: take it down rather than leave an
            # init that no msb-proxy waited for (and that `rm` could miss while it had no pid).
            _kill_group(process.pid)
            raise
        finally:
            os.close(ready_r)
            await asyncio.get_running_loop().run_in_executor(None, process.wait)
        text = reply.decode(errors="replace").strip()
        if text != "ready":
            reason = text.removeprefix("error: ") or "the jail init exited"
            raise SandboxError(f"cannot start sandbox {name!r}: {reason}")

    async def sessions(self, name: str) -> Sequence[SessionInfo]:
        """Asked of the jail init (which keeps them), when it runs."""
        from msb_proxy.backends.local import sessions

        return await sessions.list_sessions(self._init_socket(name))

    async def kill_session(self, name: str, session: str) -> bool:
        """The jail init hangs the shell up, and kills it after a grace."""
        from msb_proxy.backends.local import sessions

        return await sessions.kill_session(self._init_socket(name), session)

    def _init_socket(self, name: str) -> Path:
        """The control socket of sandbox ``name``'s init (which may not be running)."""
        self._check_host()
        directory = self.state.sandbox_dir(name)
        if _read_settings(directory) is None:
            raise SandboxNotFoundError(f"there is no sandbox {name!r}")
        return directory / "init.sock"

    async def state_of(self, name: str) -> SandboxState | None:
        directory = self.state.sandbox_dir(name)
        if _read_settings(directory) is None:
            return None
        return await _state(directory)

    async def current_run(self, name: str) -> str | None:
        directory = self.state.sandbox_dir(name)
        if await ping(directory / "init.sock") is None:
            return None
        return str(_read_pid(directory / "init.pid"))

    async def list(self) -> list[SandboxInfo]:
        found = []
        for directory in sorted((self.state.home / "sandboxes").glob("*")):
            settings = _read_settings(directory)
            if settings is not None:
                found.append(SandboxInfo(name=settings["name"], backend=self.name,
                                         state=await _state(directory)))
        return found

    async def stop(self, name: str) -> bool:
        directory = self.state.sandbox_dir(name)
        socket_path = directory / "init.sock"
        if os.geteuid() != 0:
            raise BackendUnavailableError("the local backend needs root to stop sandboxes")
        if _read_settings(directory) is None and not (directory / "init.pid").exists():
            raise SandboxNotFoundError(f"there is no sandbox {name!r}")
        async with self._lock(name):
            pid = _read_pid(directory / "init.pid")
            try:
                await request(socket_path, {"op": "stop"})
            except OSError:
                if pid is None or not _alive(pid):
                    return False
            if pid is not None:
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while _alive(pid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            return True

    async def remove(self, name: str) -> bool:
        directory = self.state.sandbox_dir(name)
        if not directory.exists():
            return False
        with contextlib.suppress(SandboxNotFoundError):
            await self.stop(name)
        async with self._lock(name):
            for mount_point in (directory / "root", directory / "lower"):
                if mount_point.is_mount():
                    raise SandboxError(f"{mount_point} is still mounted; not deleting {name!r}")
            shutil.rmtree(directory)
            forget(self.state, name)
            retire_lock(self.state.lock_file(name))
        return True


async def _state(directory: Path) -> SandboxState:
    """A jail answers on its socket while it runs; one that died is just stopped (its writable
    layer is all it has, and the next connection starts it again)."""
    running = await ping(directory / "init.sock") is not None
    return SandboxState.RUNNING if running else SandboxState.STOPPED


def _is_rootfs(path: Path) -> bool:
    return (path / "bin").exists() or (path / "usr" / "bin").is_dir()


def _has_overlay() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text().split()
    except OSError:
        return False


def _check_volumes(name: str, volumes: Sequence[str]) -> None:
    for volume in volumes:
        host = volume.split(":")[0]
        if not os.path.isdir(host) and not os.path.isfile(host):
            raise ConfigError(f"sandbox {name!r}: volume {volume!r}: {host} does not exist")


def _read_settings(directory: Path) -> dict[str, str] | None:
    """The sandbox's creation settings, or None when there is no such sandbox."""
    try:
        data = json.loads((directory / "sandbox.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in data.items()}


class LocalSandbox(Sandbox):
    """One connection's view of a running jail: requests go to its init's socket."""

    def __init__(self, name: str, socket_path: Path, run_id: str = "",
                 started: bool = False) -> None:
        self.name = name
        self.socket_path = socket_path
        self.run_id = run_id
        self.started = started
        self._users: dict[str, GuestUser] = {}
        self._end_watchers: list[Callable[[], None]] = []
        self._ended = False
        self._watch: socket.socket | None = None  # a connection to the init, idle until it dies
        self._watch_task: asyncio.Task[None] | None = None

    def watch_end(self, ended: Callable[[], None]) -> None:
        """Through a connection to the init that carries nothing: it reads end of file the
        moment the init exits, whoever ended it. A process whose control connection reads end
        of file first says so too, before its exit is reported."""
        if self._ended:
            asyncio.get_running_loop().call_soon(ended)
            return
        self._end_watchers.append(ended)
        if self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_init())

    async def _watch_init(self) -> None:
        try:
            self._watch = await connect(self.socket_path)
        except OSError:  # the init is gone already
            self._init_gone()
            return
        asyncio.get_running_loop().add_reader(self._watch.fileno(), self._on_watch)

    def _on_watch(self) -> None:
        assert self._watch is not None
        try:
            if self._watch.recv(1):
                return  # the init sends nothing unasked; nothing to act on
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._init_gone()

    def _init_gone(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._stop_watching()
        watchers, self._end_watchers = self._end_watchers, []
        for ended in watchers:
            ended()

    def _stop_watching(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._watch is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._watch.fileno())
            self._watch.close()
            self._watch = None

    async def close(self) -> None:
        self._end_watchers.clear()
        self._stop_watching()

    async def lookup_user(self, name: str) -> GuestUser:
        if name in self._users:
            return self._users[name]
        reply, _ = await request(self.socket_path, {"op": "user", "name": name})
        found = reply.get("user")
        if not found:
            raise UnknownUserError(f"sandbox {self.name!r} has no user {name!r}")
        user = GuestUser(
            name=found["name"], uid=found["uid"], gid=found["gid"], home=found["home"],
            shell=found["shell"], groups=tuple(found["groups"]),
        )
        self._users[name] = user
        return user

    async def find_program(self, user: GuestUser, candidates: Sequence[str]) -> str | None:
        reply, _ = await request(self.socket_path, {"op": "which", "paths": list(candidates)})
        found = reply.get("path")
        return str(found) if found else None

    async def tcp_socket(self, family: int) -> socket.socket | None:
        """From the jail init, which makes it in the sandbox's network namespace."""
        if family not in (socket.AF_INET, socket.AF_INET6):
            return None
        name = "inet6" if family == socket.AF_INET6 else "inet"
        try:
            reply, fds = await request(self.socket_path, {"op": "socket", "family": name})
        except (OSError, ValueError):
            return None
        if not reply.get("ok") or len(fds) != 1:  # an init from before the op: the helper
            for fd in fds:
                os.close(fd)
            return None
        return socket.socket(fileno=fds[0])

    async def start_helper(self, user: GuestUser, helper: str) -> Link:
        """The helper forked from the jail init as ``user``: no Python needed in the guest."""
        from msb_proxy.backends.links import SocketLink

        control = await connect(self.socket_path)
        try:
            reply, fds = await exchange(control, {
                "op": "helper", "helper": helper, "uid": user.uid, "gid": user.gid,
                "groups": list(user.groups), "cwd": user.home or "/"})
        except BaseException:
            control.close()
            raise
        if not reply.get("ok") or not fds:
            control.close()
            raise SandboxError(f"cannot start the guest {helper} helper: "
                               f"{reply.get('error', '?')}")
        # The init ends the helper when this control connection closes.
        _, link = await asyncio.get_running_loop().create_connection(
            lambda: SocketLink(keep=control), sock=socket.socket(fileno=fds[0]))
        return link

    async def spawn(self, spec: ProcessSpec, listener: ProcessListener) -> GuestProcess:
        return await self._start_process(process_request("spawn", spec), listener,
                                         spec.pty is not None, LocalProcess)

    async def attach_session(self, session: str, spec: ProcessSpec, listener: SessionListener,
                             timeout: float) -> GuestProcess:
        """The jail init keeps the session's terminal (see ``jail.py``); we get its input and
        output pipes, and detach by closing them and the control connection."""
        from msb_proxy.backends.local.sessions import SessionProcess

        request = {**process_request("attach", spec), "session": session,
                   "user": spec.user.name, "timeout": timeout}
        return await self._start_process(request, listener, True, SessionProcess)

    async def _start_process(self, request: dict[str, Any], listener: ProcessListener,
                             pty: bool, kind: type[LocalProcess]) -> LocalProcess:
        sock = await connect(self.socket_path)
        try:
            reply, fds = await exchange(sock, request)
        except BaseException:
            sock.close()
            raise
        if not reply.get("ok"):
            sock.close()
            if reply.get("refused"):
                raise SandboxError(str(reply.get("error")))
            raise SandboxError(f"cannot start {reply.get('error', 'the process')}")
        process = kind(sock, fds, listener, pty=pty, init_gone=self._init_gone)
        await process.start()
        return process


async def _read_all(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _read_until_eof, fd)


def _read_until_eof(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_group(pgid: int) -> None:
    """SIGKILL the jail launcher's process group: the launcher and the init it forks (the
    init stays in the group until it serves), and with the init its whole PID namespace."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie we are not the parent of still answers kill(0)
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
