"""The two sides under test, in one private msb-proxy installation, and how one run is timed.

Owns everything the benchmark creates and must clean up: a temporary root holding the client's
``HOME`` (also the proxy's), ``MSB_PROXY_HOME``, the client key, the ``ssh -F`` config and the
data sets; the bench sandbox, started through msb-proxy and removed at the end; OpenSSH's sshd
configured inside that sandbox through msb-proxy itself; the copy of the data sets in the guest;
the check that both sides land in the very same jail; each run's set-up, background tunnel and
teardown; and the guarantee that no process of a run outlives it.

msb-proxy runs from a copy of the ``msb_proxy`` package taken when the benchmark starts (first on
``PYTHONPATH``, with the venv's interpreter and dependencies), so edits made to the tree while it
runs cannot change the code under test halfway, or leave the jail and the proxy speaking
different versions of their protocol.

Both sides are reached the same way: the real ``ssh`` client with a ProxyCommand, so both pay
for a ProxyCommand process. One side's is ``msb-proxy stdio``; the other's is ``nsenter`` into
the sandbox's namespaces running ``sshd -i``. Each is wrapped in ``/usr/bin/time`` for its
peak RSS and CPU time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import datasets
from .rows import FETCHES, READY_LINES, Sample, Workload

__all__ = ["SIDES", "BenchError", "Handshake", "Harness", "check_host"]

SIDES = ("msb-proxy", "sshd")
PACKAGE = Path(__file__).resolve().parent.parent / "msb_proxy"
PEER = Path(__file__).resolve().parent / "peer.py"
GUEST_ROOT = "/root/msb-bench"  # the login user is root
GUEST_DATA = f"{GUEST_ROOT}/data"
GUEST_DEST = f"{GUEST_ROOT}/dest"
GUEST_PEER = f"python3 -I -S {GUEST_DATA}/{PEER.name}"
GUEST_PORT = 47123  # the sandbox has a network namespace of its own: nothing else listens

TIME = Path("/usr/bin/time")
NOHUP = Path("/usr/bin/nohup")
NSENTER = Path("/usr/bin/nsenter")
SSHD = "/usr/sbin/sshd"  # inside the jail
SSHD_CONFIG = "/etc/ssh/msb_bench_sshd_config"
SSHD_HOST_KEY = "/etc/ssh/msb_bench_host_ed25519_key"
SSHD_AUTHORIZED_KEYS = "/etc/ssh/msb_bench_authorized_keys"
NAMESPACES = ("mnt", "pid", "net", "uts", "ipc")
CHECK_BYTES = 64 << 20
SETUP_TIMEOUT_S = 120.0
COPY_TIMEOUT_S = 600.0  # the data sets into the guest: a 1 GiB file at 2 MB/s
REAP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 5.0
LEFTOVER_GRACE_S = 5.0
_PR_SET_CHILD_SUBREAPER = 36

# sshd as Debian ships it, minus what cannot work in the jail (PAM) and plus what the bench needs
# (its own key files). Ciphers, MACs and key exchange are left at OpenSSH's defaults on purpose:
# neither side is tuned, the client picks the same way against both.
SSHD_CONFIG_TEXT = f"""\
# msb-proxy bench: sshd -i started by nsenter in this sandbox's namespaces.
HostKey {SSHD_HOST_KEY}
AuthorizedKeysFile {SSHD_AUTHORIZED_KEYS}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
"""


class BenchError(Exception):
    """Something that stops the benchmark; the message is one line saying what to do."""


def check_host(rootfs: Path, proxy: Path) -> None:
    """Fail early, and with the fix, when something the benchmark needs is missing."""
    if os.geteuid() != 0:
        raise BenchError("needs root: the local backend mounts and creates namespaces")
    if not TIME.exists():
        raise BenchError(
            f"{TIME} is missing (it measures peak RSS and CPU time): apt-get install time")
    if not NSENTER.exists():
        raise BenchError(f"{NSENTER} is missing: apt-get install util-linux")
    for program in ("ssh", "ssh-keygen"):
        if shutil.which(program) is None:
            raise BenchError(f"{program} is missing: apt-get install openssh-client")
    if not proxy.exists():
        raise BenchError(f"{proxy} is missing: run 'make install'")
    if not (rootfs / SSHD.lstrip("/")).exists():
        raise BenchError(f"no {SSHD} in the rootfs {rootfs}: run 'make rootfs'")


@dataclass(frozen=True)
class Handshake:
    """What the client negotiated with one side, from ``ssh -v``."""

    software: str
    kex: str
    host_key: str
    cipher: str

    def describe(self) -> str:
        return f"{self.software}; kex {self.kex}; host key {self.host_key}; cipher {self.cipher}"


@dataclass(frozen=True)
class _Outcome:
    """What one command did: its output, how long until it exited, and how much longer what it
    started (the ProxyCommand) took to end."""

    out: bytes
    err: bytes
    seconds: float
    linger: float


class Harness:
    """One private installation with sandbox ``bench-<random>``; always ``close()`` it."""

    def __init__(self, rootfs: Path, proxy: Path) -> None:
        self.rootfs = rootfs
        self.proxy = proxy
        self.name = f"bench-{secrets.token_hex(4)}"
        self.hosts = {"msb-proxy": f"msb-{self.name}", "sshd": f"sshd-{self.name}"}
        self.cold_host = f"msb-cold-{self.name}"  # msb-proxy serving in its own process
        self.root = Path(tempfile.mkdtemp(prefix="msb-bench-"))
        self.runtime_dir = self.root / "run"  # where msb-proxy's warm server listens
        self.runtime_dir.mkdir(mode=0o700)
        self.user_home = self.root / "user"
        self.home = self.root / "msb-proxy-home"
        self.key = self.root / "id_ed25519"
        self.config = self.root / "ssh_config"
        self.source = self.root / "src"
        self.data = self.root / "data"  # the data sets, and peer.py for both ends of a tunnel
        self.dest = self.root / "dest"  # what downloads write
        self.port = _free_port()  # where a run's `ssh -L` listens
        self.digests: dict[str, str] = {}  # data set -> its digest
        self._background: set[int] = set()  # running `ssh -L`s: reaping must not wait for them
        self._guest_data = False
        self.init_pid: int | None = None
        self.jail_namespaces: dict[str, str] = {}
        self.handshakes: dict[str, Handshake] = {}
        self._runs = 0
        self._started = False

    # ---- setting up
    def start(self) -> None:
        """Start the sandbox through msb-proxy, set sshd up in it, and check both sides."""
        (self.user_home / ".ssh").mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "msb-proxy-bench",
                        "-f", str(self.key)], check=True)
        self.home.mkdir(mode=0o700)
        public_key = self.key.with_suffix(".pub").read_text()
        (self.home / "authorized_keys").write_text(public_key)
        self._write_config()
        shutil.copytree(PACKAGE, self.source / PACKAGE.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
        # Byte-compiled, as pip leaves an installed package: a fresh copy run where
        # PYTHONDONTWRITEBYTECODE is set would otherwise be compiled from source at every
        # start of a ProxyCommand without a warm server (~90 ms on the bench machine).
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(self.source)], check=True)

        self._started = True
        self.capture("msb-proxy", "true")
        self.init_pid = self._read_init_pid()
        install = (
            "set -e; umask 022; mkdir -p /run/sshd; chmod 0755 /run/sshd; "
            f"printf '%s\\n' {shlex.quote(public_key.strip())} >{SSHD_AUTHORIZED_KEYS}; "
            f"rm -f {SSHD_HOST_KEY} {SSHD_HOST_KEY}.pub; "
            f"ssh-keygen -q -t ed25519 -N '' -C msb-bench-sshd -f {SSHD_HOST_KEY}; "
            f"cat >{SSHD_CONFIG}; {SSHD} -t -f {SSHD_CONFIG}"
        )
        self.capture("msb-proxy", install, stdin=SSHD_CONFIG_TEXT.encode())
        self._write_config()
        self.jail_namespaces = {
            ns: os.readlink(f"/proc/{self.init_pid}/ns/{ns}") for ns in NAMESPACES
        }
        # Only now: the jail init was orphaned when it started and must not become our child.
        _become_subreaper()
        self._check_same_jail()
        self._check_data_path()

    def _write_config(self) -> None:
        # time -a appends: a workload that opens several connections gets one figure for each.
        # nohup: ssh sends its ProxyCommand SIGHUP as it exits, and a client that starts ssh
        # itself (rsync) sets SIGHUP back to its default, so our `trap '' HUP` does not reach
        # that far; time must survive to report.
        measure = f"{NOHUP} {TIME} -a -f '%%M %%U %%S' -o \"$MSB_BENCH_TIME\""
        proxy = " ".join(shlex.quote(part) for part in (
            str(self.proxy), "stdio", "--backend", "local", "--host-prefix", "msb-"))
        text = (f"Host {self.hosts['msb-proxy']}\n"
                f"  ProxyCommand {measure} {proxy} %n\n"
                f"Host {self.cold_host}\n"
                f"  ProxyCommand {measure} env MSB_PROXY_WARM=0 {proxy} "
                f"{self.hosts['msb-proxy']}\n")
        if self.init_pid is not None:
            # The PID is fixed here, not read per connection: a `cat init.pid` in the
            # ProxyCommand would be a cost the msb-proxy side does not pay.
            text += (f"Host {self.hosts['sshd']}\n"
                     f"  ProxyCommand {measure} {NSENTER} -t {self.init_pid} -m -p -u -i -n -r -w "
                     f"{SSHD} -i -f {SSHD_CONFIG}\n")
        text += (
            "Host *\n"
            f"  IdentityFile \"{self.key}\"\n"
            "  IdentitiesOnly yes\n"
            "  User root\n"
            "  BatchMode yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            "  ControlMaster no\n"
            "  ControlPath none\n"
        )
        self.config.write_text(text)

    def _read_init_pid(self) -> int:
        path = self.home / "sandboxes" / self.name / "init.pid"
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError) as exc:
            raise BenchError(f"the sandbox's init is not running ({path}: {exc})") from None
        return pid

    def _check_same_jail(self) -> None:
        """Both sides must run commands in the sandbox's namespaces, or nothing is compared."""
        # Never fails: a side outside the jail must reach the comparison, not a bare exit code.
        probe = "hostname; " + "; ".join(
            f"readlink /proc/self/ns/{ns} 2>/dev/null || echo {ns}:unreadable"
            for ns in NAMESPACES)
        seen: dict[str, list[str]] = {}
        for side in SIDES:
            out, err = self.capture(side, probe, verbose=True)
            seen[side] = out.split()
            self.handshakes[side] = _handshake(err)
        hostname = seen["msb-proxy"][0]
        expected = [hostname, *(self.jail_namespaces[ns] for ns in NAMESPACES)]
        for side in SIDES:
            if seen[side] != expected:
                raise BenchError(
                    f"the {side} side is not in the jail of sandbox {self.name}: it reports "
                    f"{' '.join(seen[side])!r}, the jail (init PID {self.init_pid}) is "
                    f"{' '.join(expected)!r}")

    def _check_data_path(self) -> None:
        """Move some bytes each way on each side, so a fast number is never a short transfer."""
        for side in SIDES:
            up, _ = self.capture(side, f"head -c {CHECK_BYTES} /dev/zero | {{ssh}} 'wc -c'")
            down, _ = self.capture(side, f"{{ssh}} 'head -c {CHECK_BYTES} /dev/zero' | wc -c")
            if up.strip() != str(CHECK_BYTES) or down.strip() != str(CHECK_BYTES):
                raise BenchError(
                    f"the {side} side lost data: sent {CHECK_BYTES} bytes each way, the other "
                    f"end counted {up.strip() or '0'} up and {down.strip() or '0'} down")

    # ---- running
    def command(self, side: str, template: str, size: int = 0, warm: bool = True) -> str:
        """``template`` (see rows.py for its placeholders) filled in for ``side``; ``warm``
        False keeps msb-proxy from handing the connection to its warm server."""
        host = self.hosts[side] if warm or side != "msb-proxy" else self.cold_host
        config = _plain(str(self.config))
        peer = f"{sys.executable} -I -S {self.data / PEER.name}"
        return template.format(
            ssh=f"ssh -F {config} {_plain(host)}", config=config, host=host, size=size,
            data=_plain(str(self.data)), dest=_plain(str(self.dest)), guest_data=GUEST_DATA,
            guest_dest=GUEST_DEST, peer=_plain(peer), guest_peer=GUEST_PEER, port=self.port,
            guest_port=GUEST_PORT, fetches=FETCHES, tree_digest=datasets.TREE_DIGEST)

    def capture(self, side: str, template: str, stdin: bytes | None = None,
                verbose: bool = False) -> tuple[str, str]:
        """Run a set-up command on ``side``; ``template`` is a bare remote command unless it
        uses ``{ssh}``. Returns (stdout, stderr); fails on a non-zero exit."""
        if "{ssh}" in template:
            command = self.command(side, template)
        else:
            options = "-v " if verbose else ""
            command = (f"ssh {options}-F {shlex.quote(str(self.config))} "
                       f"{shlex.quote(self.hosts[side])} {shlex.quote(template)}")
        outcome = self._run(command, stdin, SETUP_TIMEOUT_S, side)
        return outcome.out.decode(errors="replace"), outcome.err.decode(errors="replace")

    def prepare(self, kinds: Collection[str], in_guest: Collection[str], size: int,
                files: int) -> None:
        """Make data sets ``kinds`` on the host, and copy those in ``in_guest`` into the guest
        through msb-proxy with ``peer.py``; both copies are checked against the host's digest."""
        self.data.mkdir()
        shutil.copy(PEER, self.data / PEER.name)
        for kind in kinds:
            datasets.make(kind, self.data, size, files)
            self.digests[kind] = _first_word(self._host(
                "msb-proxy", datasets.digest_command(kind, "{data}", "{peer}"), size,
                SETUP_TIMEOUT_S))
        members = [PEER.name, *("www" if kind == "page" else kind for kind in in_guest)]
        self._guest_data = True
        self._host("msb-proxy", f"tar -C {{data}} -cf - {' '.join(members)} | {{ssh}} "
                   f"'rm -rf {GUEST_ROOT} && mkdir -p {GUEST_DATA} && "
                   f"tar -C {GUEST_DATA} -xf -'", size, COPY_TIMEOUT_S)
        for kind in in_guest:
            found = _first_word(self._host(
                "msb-proxy", "{ssh} " + shlex.quote(datasets.digest_command(
                    kind, GUEST_DATA, GUEST_PEER)), size, SETUP_TIMEOUT_S))
            if found != self.digests[kind]:
                raise BenchError(f"the guest's copy of data set {kind} has digest {found}, the "
                                 f"host's {self.digests[kind]}: the copy through msb-proxy "
                                 "is broken")

    def timed(self, side: str, work: Workload, size: int, timeout: float,
              check: bool = False) -> Sample:
        """One run of ``work`` on ``side`` with its set-up, background and teardown: its wall
        time, client start to client exit, and what the server side of it cost. ``check``: then
        also prove it moved the right bytes (see ``Workload.check``)."""
        time_file = self.root / f"time-{self._runs}"
        self._runs += 1
        time_file.touch()
        failed = True
        config = self.home / "config.toml"
        if work.template:
            config.write_text(work.template)
        try:
            if work.setup:
                self._host(side, work.setup, size, SETUP_TIMEOUT_S)
                # The last run's files (and their removal) are still being written back to
                # disk: 10,000 of them take seconds, which would land in this run's time.
                os.sync()
            guest_before = self._init_cpu(children=True)
            guests_before = self._guest_processes()
            with self._backgrounded(side, work, size, time_file):
                outcome = self._run(self.command(side, work.command, size, work.warm), None,
                                    timeout, side, time_file)
            self._settle(guests_before)
            guest = self._init_cpu(children=True) - guest_before
            if check and work.check:
                with self._backgrounded(side, work, size, None):
                    found = _first_word(self._host(side, work.check, size, timeout))
                if found != self.digests.get(work.data):
                    raise BenchError(
                        f"{side}: {work.key} moved the wrong bytes: `{work.check}` printed "
                        f"{found or 'nothing'}, data set {work.data} has "
                        f"{self.digests.get(work.data)}")
            failed = False
        finally:
            try:
                if work.teardown:
                    self._host(side, work.teardown, size, SETUP_TIMEOUT_S)
            except BenchError:
                if not failed:
                    raise
            finally:
                if work.template:
                    config.unlink()
        rss_kib, proxy_cpu = _time_report(time_file)
        return Sample(outcome.seconds, rss_kib,
                      None if proxy_cpu is None else proxy_cpu + guest, outcome.linger)

    def concurrent(self, side: str, work: Workload, timeout: float) -> list[Sample]:
        """``work.connections`` clients of ``work.command`` on ``side`` at once; once each has
        printed ``READY_LINES`` lines, one sample per connection of the memory its server side
        holds (see ``Sample``). All of them are ended before this returns."""
        command = self.command(side, work.command, warm=work.warm)
        clients: list[subprocess.Popen[bytes]] = []
        with tempfile.TemporaryFile() as err:
            try:
                start = time.perf_counter()
                for _ in range(work.connections):
                    # exec: SIGTERM reaches ssh itself, which ends its ProxyCommand in turn.
                    clients.append(subprocess.Popen(
                        ["bash", "-c", f"trap '' HUP; exec {command}"], env=self._env(None),
                        cwd=self.root, start_new_session=True, stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=err))
                try:
                    ready = _lines_printed(clients, start, timeout)
                except BenchError as exc:
                    err.seek(0)
                    last = err.read().decode(errors="replace").strip().splitlines()
                    raise BenchError(f"{side}: `{command}`: {exc} "
                                     f"({last[-1] if last else 'no error output'})") from None
                samples = []
                for client, seconds in zip(clients, ready, strict=True):
                    serving, proxy_command = self._serving(side, client.pid)
                    held = [_memory_kib(pid) for pid in serving]
                    own = _memory_kib(proxy_command)
                    samples.append(Sample(
                        seconds, None, None, uss_kib=sum(uss for uss, _ in held),
                        pss_kib=sum(pss for _, pss in held), command_uss_kib=own[0]))
                return samples
            finally:
                for client in clients:
                    client.terminate()
                for client in clients:
                    client.wait()
                    if client.stdout is not None:
                        client.stdout.close()
                self._reap_orphans(command)

    def _serving(self, side: str, ssh: int) -> tuple[list[int], int]:
        """The processes serving the connection of the ssh client ``ssh``, and its ProxyCommand
        process (under ``time``). msb-proxy's ``stdio`` hands the connection to the warm
        server's child that has the very same pipe as its standard input; sshd's are the
        ``sshd`` processes below nsenter (the guest's, below them, are left out)."""
        timers = _children(ssh)
        proxy_commands = {child for timer in timers for child in _children(timer)}
        if len(proxy_commands) != 1:
            raise BenchError(f"{side}: ssh client {ssh} has {len(proxy_commands)} ProxyCommand "
                             "processes under time, not 1")
        proxy_command = proxy_commands.pop()
        if side == "sshd":
            below = _descendants(proxy_command)
            return [pid for pid in below if _comm(pid) == "sshd"], proxy_command
        stdin = _stdin(proxy_command)
        marker = str(self.runtime_dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != proxy_command:
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    if (b"msb_proxy.cli.warm" in argv and any(a.startswith(marker) for a in argv)
                            and _stdin(int(entry.name)) == stdin):
                        return [int(entry.name)], proxy_command
        raise BenchError(f"{side}: no warm server's child serves the connection of ssh client "
                         f"{ssh}: its ProxyCommand served it itself")

    def _host(self, side: str, template: str, size: int, timeout: float) -> str:
        """Run an untimed host command for ``side`` (remote only through ``{ssh}``, the warm one);
        its standard output; fails on a non-zero exit."""
        outcome = self._run(self.command(side, template, size), None, timeout, side)
        return outcome.out.decode(errors="replace")

    @contextlib.contextmanager
    def _backgrounded(self, side: str, work: Workload, size: int,
                      time_file: Path | None) -> Iterator[None]:
        """Keep ``work.background`` running (if any) while in the block: it is ready once
        something listens on ``self.port``; it is ended with SIGTERM, and its ProxyCommand waited
        for (it reports into ``time_file``), when the block ends."""
        if not work.background:
            yield
            return
        command = self.command(side, work.background, size, work.warm)
        with tempfile.TemporaryFile() as err:
            # exec: SIGTERM reaches ssh itself, which ends its ProxyCommand by closing its stdin
            # (SIGHUP stays ignored: time must survive to report).
            process = subprocess.Popen(
                ["bash", "-c", f"trap '' HUP; exec {command}"], env=self._env(time_file),
                cwd=self.root, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)
            self._background.add(process.pid)
            try:
                self._wait_listening(process, command, side, err)
                yield
            finally:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    _kill_group(process.pid)
                    process.wait()
                self._background.discard(process.pid)
                self._reap_orphans(command)

    def _wait_listening(self, process: subprocess.Popen[bytes], command: str, side: str,
                        err: IO[bytes]) -> None:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not _listening(self.port):
            if process.poll() is not None:
                err.seek(0)
                lines = err.read().decode(errors="replace").strip().splitlines()
                raise BenchError(f"{side}: `{command}` exited with {process.returncode} before "
                                 f"it listened: {lines[-1] if lines else 'no error output'}")
            if time.monotonic() > deadline:
                raise BenchError(f"{side}: `{command}` did not listen on port {self.port} "
                                 f"within {SETUP_TIMEOUT_S:.0f} s")
            time.sleep(0.005)

    def _guest_processes(self) -> set[int]:
        """The jail init's children now: the guest processes msb-proxy started, and orphans."""
        return _children(self.init_pid) if self.init_pid is not None else set()

    def _settle(self, before: set[int]) -> None:
        """Give the guest processes a run started a moment to end, so that the init has reaped
        them (and counted their CPU time) before we read it."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while self._guest_processes() - before and time.monotonic() < deadline:
            time.sleep(0.002)

    def _env(self, time_file: Path | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MSB_PROXY_", "SSH_", "MSB_BENCH_", "PYTHON"))}
        env.update(HOME=str(self.user_home), SHELL="/bin/sh", PYTHONPATH=str(self.source),
                   MSB_PROXY_HOME=str(self.home),
                   MSB_PROXY_ROOTFS=str(self.rootfs), MSB_PROXY_BACKEND="local",
                   XDG_RUNTIME_DIR=str(self.runtime_dir),
                   MSB_BENCH_TIME=str(time_file or os.devnull))
        return env

    def _run(self, command: str, stdin: bytes | None, timeout: float, side: str,
             time_file: Path | None = None) -> _Outcome:
        # ssh sends its ProxyCommand SIGHUP as it exits, which would kill /usr/bin/time before
        # it reports. Ignored here, SIGHUP stays ignored in ssh and the ProxyCommand, which then
        # end on their own at end of file; _reap_orphans waits for that.
        script = f"set -o pipefail; trap '' HUP; {command}"
        # Output goes to files, not pipes: the ProxyCommand inherits ssh's stderr and may
        # outlive ssh, and waiting for end-of-file on a pipe would time its exit, not ssh's.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            process = subprocess.Popen(
                # cwd: `python -m` puts it first on sys.path, ahead of the copied package.
                ["bash", "-c", script], env=self._env(time_file), cwd=self.root,
                start_new_session=True,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=out, stderr=err)
            # Waited for without a timeout, which blocks in waitpid(): with one, subprocess
            # polls with sleeps growing to 50 ms, and every time measured here came out
            # rounded up to the next poll. A timer kills the run instead.
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                _kill_group(process.pid)

            watchdog = threading.Timer(timeout, expire)
            watchdog.start()
            try:
                process.communicate(stdin)
                ended = time.perf_counter()
            except BaseException:
                _kill_group(process.pid)
                process.wait()
                self._reap_orphans(command)
                raise
            finally:
                watchdog.cancel()
            if expired.is_set():
                self._reap_orphans(command)
                raise BenchError(f"{side}: `{command}` did not finish within {timeout:.0f} s")
            linger = self._reap_orphans(command) - ended
            out.seek(0)
            err.seek(0)
            outcome = _Outcome(out.read(), err.read(), ended - start, max(0.0, linger))
        if process.returncode != 0:
            lines = outcome.err.decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else "no error output"
            raise BenchError(f"{side}: `{command}` exited with {process.returncode}: {detail}")
        return outcome

    def _reap_orphans(self, command: str) -> float:
        """Wait for what the run left behind, as ssh does not wait for its ProxyCommand; return
        when the last of it ended (``perf_counter``).

        We are a child subreaper, so the ProxyCommand's ``time`` comes to us once ssh exits;
        waiting for it keeps one run's teardown out of the next run's time. A background
        ``ssh -L`` still running is not waited for.
        """
        last = time.perf_counter()
        if self.init_pid is None:
            return last
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return last
            if pid:
                last = time.perf_counter()
                continue
            if self._background and _children(os.getpid()) <= self._background:
                return last
            if time.monotonic() > deadline:
                raise BenchError(
                    f"a ProxyCommand of `{command}` was still running "
                    f"{REAP_TIMEOUT_S:.0f} s after the ssh client exited")
            time.sleep(0.001)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the benchmark: this process, every run, and every process the
        sandbox's init reaped (the guest commands msb-proxy starts are its children, not ours)."""
        own = os.times()
        return (own.user + own.system + own.children_user + own.children_system
                + self._init_cpu(children=False))

    def _init_cpu(self, children: bool) -> float:
        """CPU seconds of the processes the jail's init has reaped, plus its own unless
        ``children``; 0 before the jail is known or after it is gone."""
        if self.init_pid is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.init_pid}/stat").read_text()
        except OSError:
            return 0.0
        # utime stime cutime cstime are fields 14-17, counted after the ")" ending the name.
        utime, stime, cutime, cstime = (int(v) for v in stat.rsplit(")", 1)[1].split()[11:15])
        ticks = cutime + cstime + (0 if children else utime + stime)
        return ticks / os.sysconf("SC_CLK_TCK")

    # ---- cleaning up
    def close(self) -> list[str]:
        """Remove the data sets, the sandbox and the temporary root; return what could not be
        cleaned up."""
        problems: list[str] = []
        if self._guest_data:
            try:
                self.capture("msb-proxy", f"rm -rf {GUEST_ROOT}")
            except BenchError as exc:
                problems.append(f"could not remove the data sets from the guest: {exc}")
        self._stop_warm_server()
        if self._started:
            removed = subprocess.run(
                [str(self.proxy), "rm", self.name], env=self._env(None), cwd=self.root,
                capture_output=True, text=True, timeout=60, check=False)
            if removed.returncode != 0:
                problems.append(f"msb-proxy rm {self.name} failed: {removed.stderr.strip()}")
            problems += self._end_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _stop_warm_server(self) -> None:
        """End msb-proxy's warm server: it would otherwise idle on for minutes after the run."""
        marker = str(self.runtime_dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    if b"msb_proxy.cli.warm" in argv and any(a.startswith(marker) for a in argv):
                        os.kill(int(entry.name), signal.SIGTERM)

    def _end_leftovers(self) -> list[str]:
        """Find processes of ours still alive after the sandbox is gone, and end them."""
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while (left := self._leftovers()) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        return [f"process {pid} ({cmd}) outlived the sandbox; killed it"
                for pid, cmd in left.items()]

    def _leftovers(self) -> dict[int, str]:
        """Processes in the jail's mount namespace or naming our sandbox or our temporary root."""
        marks = (self.name.encode(), str(self.root).encode())
        found: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                mnt = os.readlink(entry / "ns" / "mnt") if self.jail_namespaces else ""
            except OSError:
                continue
            if not cmdline:  # a zombie or a kernel thread
                continue
            if any(mark in cmdline for mark in marks) or (
                    mnt and mnt == self.jail_namespaces.get("mnt")):
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(
                    errors="replace").strip()
        return found


def _plain(text: str) -> str:
    """``text``, which must need no shell quoting: it goes into templates as it is, also inside
    single-quoted remote commands."""
    if not re.fullmatch(r"[\w./+:@%=,-]+( [\w./+:@%=,-]+)*", text):
        raise BenchError(f"{text!r} has characters the bench does not quote: run it from a "
                         "path without them")
    return text


def _first_word(text: str) -> str:
    words = text.split()
    return words[0] if words else ""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:``port`` in our network namespace."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(fields[1] == local and fields[3] == "0A"
                   for fields in (line.split() for line in table) if len(fields) > 3)


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (all its threads')."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.update(int(child) for child in (task / "children").read_text().split())
    return found


def _lines_printed(clients: list[subprocess.Popen[bytes]], start: float,
                   timeout: float) -> list[float]:
    """Wait until every client has printed ``READY_LINES`` lines on its standard output; when
    each had (seconds since ``start``)."""
    lines = {client.pid: 0 for client in clients}
    when: dict[int, float] = {}
    with selectors.DefaultSelector() as selector:
        for client in clients:
            assert client.stdout is not None
            selector.register(client.stdout, selectors.EVENT_READ, client)
        while len(when) < len(clients):
            left = start + timeout - time.perf_counter()
            if left <= 0:
                raise BenchError(f"{len(clients) - len(when)} of {len(clients)} clients had not "
                                 f"printed {READY_LINES} lines within {timeout:.0f} s")
            for key, _ in selector.select(left):
                pid = key.data.pid
                chunk = os.read(key.fd, 4096)
                if not chunk:
                    raise BenchError(f"a client ended after {lines[pid]} lines")
                lines[pid] += chunk.count(b"\n")
                if lines[pid] >= READY_LINES and pid not in when:
                    when[pid] = time.perf_counter() - start
                    selector.unregister(key.fileobj)
    return [when[client.pid] for client in clients]


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def _stdin(pid: int) -> str:
    """What ``pid``'s standard input is (``pipe:[inode]``), or "" once it is gone."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/fd/0")
    return ""


def _memory_kib(pid: int) -> tuple[int, int]:
    """(USS, PSS) of ``pid`` in KiB, from ``smaps_rollup``: its private pages (clean and
    dirty), and every page it maps divided by the number of processes mapping it."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                name, _, value = line.partition(":")
                if name in ("Private_Clean", "Private_Dirty", "Pss"):
                    fields[name] = int(value.split()[0])
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read the memory of process {pid}: {exc}") from None
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise BenchError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _time_report(path: Path) -> tuple[int | None, float | None]:
    """(largest peak RSS in KiB, total user+system seconds) over the ``%M %U %S`` lines that
    ``time -a`` appended, one per ProxyCommand; it may also append notes on non-zero exits."""
    peaks: list[int] = []
    cpu = 0.0
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            peaks.append(int(fields[0]))
            cpu += float(fields[1]) + float(fields[2])
    return (max(peaks), cpu) if peaks else (None, None)


_VERBOSE_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "software": re.compile(r"remote software version (\S+(?: \S+)?)"),
    "kex": re.compile(r"kex: algorithm: (\S+)"),
    "host_key": re.compile(r"kex: host key algorithm: (\S+)"),
    "c2s": re.compile(r"kex: client->server cipher: (\S+) MAC: (\S+)"),
    "s2c": re.compile(r"kex: server->client cipher: (\S+) MAC: (\S+)"),
}


def _handshake(verbose: str) -> Handshake:
    found: dict[str, str] = {}
    for key, pattern in _VERBOSE_PATTERNS.items():
        match = pattern.search(verbose)
        if match is None:
            raise BenchError(f"ssh -v printed no '{pattern.pattern}' line")
        found[key] = match.group(1) if key in ("software", "kex", "host_key") else (
            match.group(1) if match.group(2) == "<implicit>" else
            f"{match.group(1)} + {match.group(2)}")
    cipher = found["c2s"] if found["c2s"] == found["s2c"] else (
        f"{found['c2s']} up, {found['s2c']} down")
    return Handshake(found["software"], found["kex"], found["host_key"], cipher)
