"""``make stress``: many connections at once, then many one after another, and nothing left behind.

Through the real ProxyCommand (the warm server on, as users run it) of a private installation
on the local backend, in one sandbox:

1. ``--concurrent`` workers (50) for ``--seconds`` (60): each, round after round, opens one
   SSH connection (a ControlMaster) and carries over it an ``exec`` of a random payload
   checked by SHA-256 both ways (``sha256sum`` and ``cat``), an ``sftp`` put and get, an
   ``scp`` upload and download (each file checked by digest), and an ``ssh -L`` tunnel (a local
   unix socket forwarded to an echo server in the guest, the bytes checked), then closes it.
   While they run, the unique memory (USS) of every process serving a connection is sampled.
2. ``--sequential`` connections (1,000) of ``ssh host true`` one after another, each exiting 0
   with nothing on stdout or stderr.

Before and after (after a settling wait) it counts, all of this installation only: host
processes (``msb-proxy``, warm server, jail, ``ssh``), the warm server's descriptors, files
under ``MSB_PROXY_HOME`` (the sandbox's own layer left out) and processes in the guest. They
must be equal. Prints a Markdown report; exits 1 when anything failed or was left behind.

Traffic goes only to the sandbox (its own loopback, through the tunnels) and to unix sockets.
Run as root (the local backend), with ``tests`` on ``sys.path``: ``python tests/stress.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import DEFAULT_ROOTFS, Env, install, stop_warm_servers, warm_servers
from leaks import cmdline, guest_processes, open_descriptors, settle, state_files, unique_kib

ECHO_PORT = 7007
OP_TIMEOUT_S = 180.0  # one operation under the full load of a 2-core machine
SETTLE_S = 15.0  # less than the warm server's idle exit (20 s): it must still be there
PAYLOAD = 1 << 20
TUNNEL_PAYLOAD = 256 << 10


@dataclass
class Tally:
    """What was tried and what held, by kind; failures with what went wrong."""

    tried: collections.Counter[str] = field(default_factory=collections.Counter)
    held: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.tried[kind] += 1
            if ok:
                self.held[kind] += 1
            else:
                self.failures.append(f"{kind}: {detail}"[:400])


class Round:
    """One SSH connection of a worker (a ControlMaster) and the operations it carries."""

    def __init__(self, env: Env, sandbox: str, work: Path, tally: Tally) -> None:
        self.env = env
        self.host = env.host(sandbox)
        self.work = work
        self.tally = tally
        self.control = work / "ctl"
        self.master: subprocess.Popen[bytes] | None = None

    def ssh(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ssh", "-F", str(self.env.config), "-S", str(self.control),
                               *args], input=input, capture_output=True, timeout=OP_TIMEOUT_S,
                              check=False, stdin=None if input is not None else
                              subprocess.DEVNULL)

    def open(self) -> bool:
        self.master = subprocess.Popen(
            ["ssh", "-F", str(self.env.config), "-S", str(self.control), "-M", "-N",
             "-o", "ControlPersist=no", self.host], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + OP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                break
            if self.ssh("-O", "check", self.host).returncode == 0:
                self.tally.record("connection", True)
                return True
            time.sleep(0.05)
        stderr = b""
        if self.master.poll() is not None and self.master.stderr is not None:
            stderr = self.master.stderr.read()
        self.tally.record("connection", False, f"master not up: {stderr[-300:]!r}")
        return False

    def close(self) -> None:
        if self.master is None:
            return
        self.ssh("-O", "exit", self.host)
        try:
            self.master.wait(OP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.master.kill()
            self.master.wait()
            self.tally.record("connection closed", False, "master did not exit")
            return
        self.tally.record("connection closed", True)

    def exec_checksum(self) -> None:
        data = os.urandom(PAYLOAD)
        done = self.ssh(self.host, "sha256sum", input=data)
        expected = hashlib.sha256(data).hexdigest()
        ok = done.returncode == 0 and done.stdout.split()[:1] == [expected.encode()]
        self.tally.record("exec sha256sum", ok, f"exit {done.returncode} {done.stderr[-200:]!r}")
        done = self.ssh(self.host, "cat", input=data)
        ok = done.returncode == 0 and done.stdout == data
        self.tally.record("exec cat", ok, f"exit {done.returncode}, {len(done.stdout)} bytes "
                                          f"back, {done.stderr[-200:]!r}")

    def _files(self, name: str) -> tuple[Path, Path, bytes]:
        """A local file of random bytes to send, where to fetch it back to, and its bytes."""
        data = os.urandom(PAYLOAD)
        local = self.work / f"{name}.up"
        local.write_bytes(data)
        return local, self.work / f"{name}.down", data

    def sftp(self) -> None:
        local, back, data = self._files("sftp")
        remote = f"/tmp/stress-{self.work.name}.sftp"
        batch = self.work / "batch"
        batch.write_text(f"put {local} {remote}\nget {remote} {back}\nrm {remote}\n")
        done = subprocess.run(["sftp", "-F", str(self.env.config), "-o",
                               f"ControlPath={self.control}", "-b", str(batch), self.host],
                              capture_output=True, timeout=OP_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL)
        ok = done.returncode == 0 and back.exists() and back.read_bytes() == data
        self.tally.record("sftp put+get", ok, f"exit {done.returncode} {done.stderr[-200:]!r}")
        back.unlink(missing_ok=True)

    def scp(self) -> None:
        local, back, data = self._files("scp")
        remote = f"{self.host}:/tmp/stress-{self.work.name}.scp"
        base = ["scp", "-q", "-F", str(self.env.config), "-o", f"ControlPath={self.control}"]
        up = subprocess.run([*base, str(local), remote], capture_output=True,
                            timeout=OP_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
        down = subprocess.run([*base, remote, str(back)], capture_output=True,
                              timeout=OP_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
        ok = up.returncode == down.returncode == 0 and back.exists() and back.read_bytes() == data
        self.tally.record("scp up+down", ok, f"exit {up.returncode}/{down.returncode} "
                                             f"{(up.stderr + down.stderr)[-200:]!r}")
        self.ssh(self.host, f"rm -f /tmp/stress-{self.work.name}.scp")
        back.unlink(missing_ok=True)

    def tunnel(self) -> None:
        path = self.work / "tunnel.sock"
        spec = f"{path}:127.0.0.1:{ECHO_PORT}"
        forward = self.ssh("-O", "forward", "-L", spec, self.host)
        if forward.returncode != 0:
            self.tally.record("ssh -L echo", False, f"forward: {forward.stderr[-200:]!r}")
            return
        data = os.urandom(TUNNEL_PAYLOAD)
        try:
            back = _echo(path, data)
            self.tally.record("ssh -L echo", back == data, f"{len(back)} bytes back")
        except OSError as exc:
            self.tally.record("ssh -L echo", False, str(exc))
        finally:
            self.ssh("-O", "cancel", "-L", spec, self.host)
            path.unlink(missing_ok=True)


def _echo(path: Path, data: bytes) -> bytes:
    """Send ``data`` through the unix socket at ``path``, end it, and read what comes back."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(OP_TIMEOUT_S)
        sock.connect(str(path))

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
        sender.join()
        return b"".join(chunks)


def _worker(env: Env, sandbox: str, work: Path, tally: Tally, stop_at: float) -> None:
    work.mkdir()
    while time.monotonic() < stop_at:
        round_ = Round(env, sandbox, work, tally)
        try:
            if round_.open():
                for operation in (round_.exec_checksum, round_.sftp, round_.scp, round_.tunnel):
                    operation()
        except subprocess.TimeoutExpired as exc:
            tally.record("timeout", False, f"{exc.cmd[-1]!r} past {OP_TIMEOUT_S:.0f} s")
        finally:
            round_.close()


# ---------------------------------------------------------------------------------------------
# What is there


def _ours(root: Path) -> Callable[[int], bool]:
    """Whether a process belongs to this installation: its argv or environment names ``root``."""
    marker = str(root).encode()

    def check(pid: int) -> bool:
        if any(marker in arg for arg in cmdline(pid)):
            return True
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                return marker in environ.read()
        except OSError:
            return False

    return check


def _kind(argv: list[bytes]) -> str | None:
    joined = b" ".join(argv)
    if b"msb_proxy.backends.local.jail" in joined:
        return "jail processes"
    if b"msb_proxy.cli.warm" in joined:
        return "warm servers"
    if argv and (argv[0].endswith(b"msb-proxy") or b"msb_proxy" in joined):
        return "msb-proxy processes"
    if argv and os.path.basename(argv[0]) in (b"ssh", b"sftp", b"scp"):
        return "ssh clients"
    return None


def snapshot(env: Env, sandbox: str) -> dict[str, int]:
    """The counts that must be the same before and after."""
    ours = _ours(env.root)
    counts: collections.Counter[str] = collections.Counter()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (argv := cmdline(int(entry))):
            kind = _kind(argv)
            if kind is not None and ours(int(entry)):
                counts[kind] += 1
    warm = warm_servers(env.runtime_dir)
    counts["warm server descriptors"] = sum(open_descriptors(pid) for pid in warm)
    counts["files under MSB_PROXY_HOME"] = state_files(env.home)
    counts["guest processes"] = guest_processes(env.home, sandbox) or 0
    for kind in ("jail processes", "warm servers", "msb-proxy processes", "ssh clients"):
        counts.setdefault(kind, 0)
    return dict(counts)


def _serving(env: Env) -> list[int]:
    """The warm server's children: one process serving each connection."""
    found = []
    servers = set(warm_servers(env.runtime_dir))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                if parent in servers:
                    found.append(int(entry))
    return found


def _sample_memory(env: Env, until: threading.Event, samples: list[int],
                   concurrency: list[int]) -> None:
    while not until.wait(2.0):
        pids = _serving(env)
        concurrency.append(len(pids))
        samples.extend(kib for pid in pids if (kib := unique_kib(pid)) is not None)


@contextlib.contextmanager
def _installation(rootfs: Path) -> Iterator[tuple[Env, str]]:
    root = Path(tempfile.mkdtemp(prefix="msb-stress-"))
    env = install(root / "msb", "local", rootfs)
    sandbox = "stress"
    try:
        yield env, sandbox
    finally:
        env.msb_proxy("rm", sandbox, timeout=120)
        stop_warm_servers(env.runtime_dir)
        shutil.rmtree(root, ignore_errors=True)


def _start_echo_server(env: Env, sandbox: str) -> None:
    start = env.ssh(sandbox, f"nohup socat TCP-LISTEN:{ECHO_PORT},bind=127.0.0.1,fork,reuseaddr "
                             "EXEC:cat >/dev/null 2>&1 </dev/null &")
    ready = env.ssh(sandbox, "for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"
                             f"{ECHO_PORT}) 2>/dev/null && exit 0; sleep 0.1; done; exit 1")
    if start.returncode != 0 or ready.returncode != 0:
        raise SystemExit(f"stress: the guest echo server did not start: {start.err}{ready.err}")


def _wait_warm(env: Env, sandbox: str) -> None:
    for _ in range(50):
        env.ssh(sandbox, "true")
        if warm_servers(env.runtime_dir):
            return
        time.sleep(0.2)
    raise SystemExit("stress: no warm server started")


@dataclass
class Run:
    """One stress run, for the report."""

    started: datetime.datetime
    args: argparse.Namespace
    tally: Tally = field(default_factory=Tally)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # by moment
    memory: list[int] = field(default_factory=list)  # USS samples, KiB
    concurrency: list[int] = field(default_factory=list)  # connections served, per sample
    seconds: dict[str, float] = field(default_factory=dict)  # by phase

    @property
    def left_behind(self) -> bool:
        before = self.counts["before"]
        return any(counts != before for counts in self.counts.values())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python tests/stress.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--rootfs", type=Path,
                        default=Path(os.environ.get("MSB_PROXY_ROOTFS") or DEFAULT_ROOTFS))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("stress: the local backend needs root", file=sys.stderr)
        return 1
    run = Run(datetime.datetime.now(datetime.UTC), args)
    with _installation(args.rootfs) as (env, sandbox):
        _wait_warm(env, sandbox)
        _start_echo_server(env, sandbox)
        before = run.counts["before"] = snapshot(env, sandbox)
        _concurrent(run, env, sandbox)
        run.counts["after the concurrent phase"] = settle(
            lambda: snapshot(env, sandbox), before, SETTLE_S)
        started = time.monotonic()
        for _ in range(args.sequential):
            done = env.ssh(sandbox, "true", timeout=OP_TIMEOUT_S)
            run.tally.record("sequential ssh true", (done.returncode, done.stdout, done.stderr)
                             == (0, b"", b""), f"exit {done.returncode} {done.err[-200:]!r}")
        run.seconds["sequential"] = time.monotonic() - started
        run.counts["after all"] = settle(lambda: snapshot(env, sandbox), before, SETTLE_S)
    print(_report(run))
    return 1 if run.tally.failures or run.left_behind else 0


def _concurrent(run: Run, env: Env, sandbox: str) -> None:
    """The workers, for ``--seconds``, with the serving processes' memory sampled."""
    sampling = threading.Event()
    sampler = threading.Thread(target=_sample_memory, args=(env, sampling, run.memory,
                                                            run.concurrency))
    sampler.start()
    started = time.monotonic()
    stop_at = started + run.args.seconds
    workers = [threading.Thread(target=_worker, args=(env, sandbox, env.root / f"w{n}",
                                                      run.tally, stop_at))
               for n in range(run.args.concurrent)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    run.seconds["concurrent"] = time.monotonic() - started
    sampling.set()
    sampler.join()


def _report(run: Run) -> str:
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    args, tally = run.args, run.tally
    moments = list(run.counts)
    lines = [f"# make stress, {run.started:%Y-%m-%d %H:%M} UTC, git {commit or '?'}", "",
             f"{args.concurrent} workers for {args.seconds:.0f} s (took "
             f"{run.seconds['concurrent']:.0f} s), then {args.sequential} sequential "
             f"connections ({run.seconds['sequential']:.0f} s).", "",
             "| what | tried | held |", "|---|---|---|"]
    lines += [f"| {kind} | {tally.tried[kind]} | {tally.held[kind]} |"
              for kind in sorted(tally.tried)]
    lines += ["", "| count | " + " | ".join(moments) + " |",
              "|---|" + "---|" * len(moments)]
    lines += [f"| {kind} | " + " | ".join(str(run.counts[moment].get(kind)) for moment in moments)
              + " |" for kind in sorted(run.counts["before"])]
    if run.memory:
        lines += ["", f"Unique memory (USS) of a process serving a connection, "
                      f"{len(run.memory)} samples, up to {max(run.concurrency)} connections at "
                      f"once: median {statistics.median(run.memory) / 1024:.1f} MiB, max "
                      f"{max(run.memory) / 1024:.1f} MiB."]
    if tally.failures:
        lines += ["", f"{len(tally.failures)} failures:"]
        lines += [f"- {failure}" for failure in tally.failures[:40]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
