"""Faults of msb-proxy's own state (``MSB_PROXY_HOME``) are one line each, never "internal error".

Every file and directory a connection reads or writes (the host key and its directory,
known_hosts and its lock, authorized_keys, the locks and idle files, config.toml, the local
backend's sandbox directories) is broken in each way that can be made as root: a read-only
file system (a read-only bind mount), a full one (a tiny tmpfs), an immutable directory
(``chattr +i``), a directory where a file belongs or a file where a directory belongs, a
symbolic link loop, corrupt content. Each is then met three ways:

* ``ssh`` through the real (warm) ProxyCommand: the one ``msb-proxy:`` line reaches the user;
* ``msb-proxy stdio`` run by ssh in-process (``MSB_PROXY_WARM=0``), its own exit status and
  stderr recorded: exactly that line, and an exit status that is not 70 (internal error);
* ``msb-proxy stdio`` run by hand with no client: the same, for the faults met before a client
  is served; nothing at all for those a connection only meets once it logs in; and never
  anything but SSH on stdout.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PROXY, Env, Run, install, stop_warm_servers, warm_servers
from installations import remove_installation, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="faults are made with mounts and "
                                                          "chattr, which need root")

NAME = "state"  # the sandbox every case connects to
ROFS = "Read-only file system; make that file system writable, or point MSB_PROXY_HOME at a " \
       "directory that is"
FULL = "No space left on device; free some space there, or point MSB_PROXY_HOME at another " \
       "file system"
IMMUTABLE = "Operation not permitted; check the owner, mode and attributes (lsattr) of it and " \
            "of its directory"
IS_DIR = "Is a directory; it is a directory where a file belongs: remove it"
LOOP = "Too many levels of symbolic links; a symbolic link on the way loops: remove it"
FILE_FOR_DIR = "Not a directory; it is a file where a directory belongs: remove it"
AUTHORIZE = "add one with 'msb-proxy authorize --file ~/.ssh/id_ed25519.pub'"


class Faults:
    """Mounts and attributes made for one case, undone afterwards."""

    def __init__(self) -> None:
        self._undo: list[list[str]] = []

    def read_only(self, path: Path) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        self._run(["mount", "--bind", "-o", "ro", str(path), str(path)], ["umount", str(path)])

    def full(self, path: Path, inodes: int | None = None) -> None:
        """A 4 KiB tmpfs at ``path``, filled (or with ``inodes`` inodes, all but one used)."""
        path.mkdir(mode=0o700, exist_ok=True)
        options = "size=4k,mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
        self._run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                  ["umount", str(path)])
        if inodes is None:
            (path / "filler").write_bytes(b"x" * 4096)

    def immutable(self, path: Path) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        self._run(["chattr", "+i", str(path)], ["chattr", "-i", str(path)])

    def _run(self, argv: list[str], undo: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True)
        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            subprocess.run(self._undo.pop(), check=False, capture_output=True)


def _corrupt_host_key(home: Path) -> None:
    (home / "host_keys").mkdir(mode=0o700)
    (home / "host_keys" / NAME).write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    (home / "host_keys" / NAME).chmod(0o600)


def _host_key_loop(home: Path) -> None:
    (home / "host_keys").mkdir(mode=0o700)
    (home / "host_keys" / NAME).symlink_to(NAME)


def _home_is_a_file(home: Path) -> None:
    shutil.rmtree(home)
    home.write_text("x")


def _replace_with_directory(path: Path) -> None:
    if path.exists():
        path.unlink()
    path.mkdir(parents=True)


@dataclass(frozen=True)
class Case:
    """A fault: how it is made in a fresh ``MSB_PROXY_HOME``, the one line it must give (None:
    it is no fault, the connection works), and when a connection meets it."""

    make: Callable[[Path, Faults], object]
    line: Callable[[Path], str | None]
    code: int = 1  # msb-proxy's exit status
    with_client: bool = False  # met only once a client has logged in (not by a bare run)
    after_session: bool = False  # met once the session is over: the session itself works
    local_only: bool = False


CASES = {
    "host-keys-read-only": Case(
        lambda home, faults: faults.read_only(home / "host_keys"),
        lambda home: f"{home}/host_keys/{NAME}: cannot write: {ROFS}"),
    "host-keys-full": Case(
        lambda home, faults: faults.full(home / "host_keys"),
        lambda home: f"{home}/host_keys/{NAME}: cannot write: {FULL}"),
    "host-keys-immutable": Case(
        lambda home, faults: faults.immutable(home / "host_keys"),
        lambda home: f"{home}/host_keys/{NAME}: cannot write: {IMMUTABLE}"),
    "host-key-corrupt": Case(
        lambda home, faults: _corrupt_host_key(home),
        lambda home: f"{home}/host_keys/{NAME}: not a usable host key (Missing PEM footer); "
                     "remove it, and the next connection makes a new one (clients that knew "
                     "the old one will see a changed host key)"),
    "host-key-is-a-directory": Case(
        lambda home, faults: (home / "host_keys" / NAME).mkdir(parents=True),
        lambda home: f"{home}/host_keys/{NAME}: cannot read the host key: {IS_DIR}"),
    "host-key-symlink-loop": Case(
        lambda home, faults: _host_key_loop(home),
        lambda home: f"{home}/host_keys/{NAME}: cannot read the host key: {LOOP}"),
    "host-keys-is-a-file": Case(
        lambda home, faults: (home / "host_keys").write_text("x"),
        lambda home: f"{home}/host_keys: cannot make the directory: {FILE_FOR_DIR}"),
    "home-read-only": Case(
        lambda home, faults: faults.read_only(home),
        lambda home: f"{home}/host_keys: cannot make the directory: {ROFS}"),
    "home-is-a-file": Case(
        lambda home, faults: _home_is_a_file(home),
        lambda home: f"{home}/config.toml: cannot read: Not a directory; one of the "
                     "directories on its path is a file: remove that file", code=2),
    "known-hosts-is-a-directory": Case(
        lambda home, faults: (home / "known_hosts").mkdir(),
        lambda home: f"{home}/known_hosts: cannot read: {IS_DIR}"),
    "known-hosts-lock-is-a-directory": Case(
        lambda home, faults: (home / "known_hosts.lock").mkdir(),
        lambda home: f"{home}/known_hosts.lock: cannot lock: {IS_DIR}"),
    "known-hosts-corrupt": Case(  # kept as it is, as OpenSSH skips lines it cannot parse
        lambda home, faults: (home / "known_hosts").write_bytes(b"\xff\xfe\0garbage\n[\n"),
        lambda home: None, code=0),
    "authorized-keys-is-a-directory": Case(
        lambda home, faults: _replace_with_directory(home / "authorized_keys"),
        lambda home: f"no usable authorized key: {home}/authorized_keys: skipped: Is a "
                     f"directory; it is a directory where a file belongs: remove it, or "
                     f"{AUTHORIZE}"),
    "authorized-keys-corrupt": Case(
        lambda home, faults: (home / "authorized_keys").write_text(
            "garbage\nssh-ed25519 AAAAnot-base64\n"),
        lambda home: f"no usable authorized key: {home}/authorized_keys:1: skipped: not a "
                     f"public key (and 1 more skipped); {AUTHORIZE}"),
    "locks-read-only": Case(
        lambda home, faults: faults.read_only(home / "locks"),
        lambda home: f"{home}/locks/{NAME}.active: cannot lock: {ROFS}"),
    "locks-is-a-file": Case(
        lambda home, faults: (home / "locks").write_text("x"),
        lambda home: f"{home}/locks: cannot make the directory: {FILE_FOR_DIR}"),
    "sandbox-lock-is-a-directory": Case(
        lambda home, faults: (home / "locks" / f"{NAME}.lock").mkdir(parents=True),
        lambda home: f"{home}/locks/{NAME}.lock: cannot lock: {IS_DIR}", with_client=True),
    "locks-out-of-inodes": Case(  # room for the idle tracker's file, none for the lock
        lambda home, faults: faults.full(home / "locks", inodes=2),
        lambda home: f"{home}/locks/{NAME}.lock: cannot lock: {FULL}", with_client=True),
    "idle-run-file-is-a-directory": Case(
        lambda home, faults: (home / "locks" / f"{NAME}.ours").mkdir(parents=True),
        lambda home: f"{home}/locks/{NAME}.ours: cannot write: {IS_DIR}", with_client=True,
        after_session=True),
    "config-corrupt": Case(
        lambda home, faults: (home / "config.toml").write_text("[[[\n"),
        lambda home: f"{home}/config.toml: not valid TOML: Invalid initial character for a "
                     "key part (at line 1, column 3)", code=2),
    "config-is-a-directory": Case(
        lambda home, faults: (home / "config.toml").mkdir(),
        lambda home: f"{home}/config.toml: cannot read: {IS_DIR}", code=2),
    "sandboxes-read-only": Case(
        lambda home, faults: faults.read_only(home / "sandboxes"),
        lambda home: f"{home}/sandboxes/{NAME}: cannot make the sandbox's directory: {ROFS}",
        with_client=True, local_only=True),
}


@pytest.fixture(scope="module")
def runtime(msb: Env) -> Iterator[Path]:
    """One runtime directory, and so one warm server, for every case's installation: the
    faults are met by a warm server's child, as every connection but a user's first is."""
    warmup = install(Path(tempfile.mkdtemp(prefix="msbw-", dir="/tmp")), msb.backend,
                     msb.rootfs)
    try:
        # A bare run serves itself and starts the warm server for the connections after it.
        first = subprocess.run([str(PROXY), "stdio", "--host-prefix", "msb-", "msb-warmup"],
                               input=b"", capture_output=True, env=warmup.proxy_env(),
                               timeout=60, check=False)
        assert first.returncode == 255, first.stderr  # no login: as sshd -i
        sockets = warmup.runtime_dir / "msb-proxy"
        assert wait_until(lambda: bool(warm_servers(warmup.runtime_dir))
                          and any(sockets.glob("warm-*.sock")), 30) is not None
        yield warmup.runtime_dir
    finally:
        stop_warm_servers(warmup.runtime_dir)
        shutil.rmtree(warmup.root, ignore_errors=True)


@dataclass
class Installation:
    env: Env
    recorded: Path  # the ssh config whose ProxyCommand records msb-proxy's status and stderr

    def ssh(self, config: Path) -> Run:
        return self.env.run(["ssh", "-F", str(config), f"msb-{NAME}", "echo in"])


@pytest.fixture
def installation(msb: Env, runtime: Path) -> Iterator[Installation]:
    root = Path(tempfile.mkdtemp(prefix="msbf-", dir="/tmp"))
    env = install(root, msb.backend, msb.rootfs)
    env.runtime_dir.rmdir()
    env.runtime_dir.symlink_to(runtime)  # the shared warm server serves this one too
    env.host(NAME)  # removed with the installation
    status, stderr = root / "proxy.status", root / "proxy.stderr"
    command = shlex.join(env.proxy_command(warm=False))
    # ssh sends its ProxyCommand SIGHUP as it exits; the shell must outlive it to record the
    # status (msb-proxy then ends on its stdin's EOF).
    wrapper = (f'trap "" HUP; {command} "$0" 2>{shlex.quote(str(stderr))}; '
               f'echo $? >{shlex.quote(str(status))}')
    recorded = root / "ssh_config.recorded"
    recorded.write_text("".join(
        f"  ProxyCommand sh -c {shlex.quote(wrapper)} %n\n" if line.strip().startswith(
            "ProxyCommand") else line for line in env.config.read_text().splitlines(True)))
    try:
        yield Installation(env, recorded)
    finally:
        remove_installation(env)


def _proxy_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("msb-proxy:")]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_state_fault_is_one_line_naming_the_file_never_an_internal_error(
    installation: Installation, case: Case
) -> None:
    env = installation.env
    if case.local_only and env.backend != "local":
        pytest.skip("the local backend's sandbox directories")
    faults = Faults()
    try:
        case.make(env.home, faults)
        line = case.line(env.home)
        wanted = [] if line is None else [f"msb-proxy: {line}"]
        session = (0, "in\n") if line is None or case.after_session else (255, "")

        # ssh through the real ProxyCommand, served by the warm server's child
        run = installation.ssh(env.config)
        assert ((run.returncode, run.out), _proxy_lines(run.err)) == (session, wanted)

        # msb-proxy stdio in-process, run by ssh: its own status and stderr
        if case.after_session:  # the fault is met when a connection starts the sandbox
            assert env.msb_proxy("stop", NAME).returncode == 0
        run = installation.ssh(installation.recorded)
        assert (run.returncode, run.out) == session, run.err
        proxy_err = (env.root / "proxy.stderr").read_text()
        proxy_code = int((env.root / "proxy.status").read_text())
        assert (proxy_code, proxy_err) == (case.code, "".join(f"{w}\n" for w in wanted))

        # msb-proxy stdio by hand, no client: nothing but SSH on stdout
        bare = env.run([str(PROXY), "stdio", "--quiet", "--host-prefix", "msb-", f"msb-{NAME}"],
                       input=b"", env={**env.proxy_env(), "MSB_PROXY_WARM": "0"})
        if line is None or case.with_client:
            assert (bare.returncode, bare.err) == (255, "")  # no login, as sshd -i
            assert bare.stdout.startswith(b"SSH-2.0-") and bare.stdout.count(b"\n") == 1
        else:
            assert (bare.returncode, bare.err, bare.stdout) == (case.code, wanted[0] + "\n", b"")
    finally:
        faults.undo()

