"""``python -m bench.forks``: time to a shell in a fresh fork (issue 15), local backend.

A sandbox gets ``--size`` MiB (1 GiB) of random bytes written to its writable layer, then each
run times, alternating which goes first, ``ssh msb-forkbench true`` (the running sandbox) and
``ssh msb-forkbench.fork true`` (a fresh throwaway fork each time: the parent frozen, its layer
copied, the fork's jail started, the session run). The fork's removal after its connection
is not timed: before each run the last fork is waited for until it is gone, and the disks are
synced. Needs root and the test rootfs; uses an installation of its own under /tmp. Prints
the Markdown rows on stdout and writes them to ``bench/results/forks.md``; progress and
errors go to stderr, one line each, prefixed ``bench:``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .report import cpu_busy

__all__ = ["main"]

DEFAULT_ROOTFS = Path("/var/cache/msb-proxy/rootfs/bookworm-v1")
RESULTS = Path(__file__).resolve().parent / "results" / "forks.md"
PROXY = Path(sys.executable).parent / "msb-proxy"
PARENT = "forkbench"
RUN_TIMEOUT_S = 300.0
GONE_TIMEOUT_S = 120.0


class _Installation:
    """A private MSB_PROXY_HOME, client key and ssh config, as a user would have them."""

    def __init__(self, root: Path, rootfs: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(mode=0o700)
        (root / "run").mkdir(mode=0o700)
        key = root / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        (self.home / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        self.environ = {"HOME": str(root), "MSB_PROXY_HOME": str(self.home),
                        "MSB_PROXY_ROOTFS": str(rootfs), "XDG_RUNTIME_DIR": str(root / "run"),
                        "MSB_PROXY_WARM_IDLE_S": "30"}
        proxy = ["env", *(f"{k}={v}" for k, v in self.environ.items()), str(PROXY), "stdio",
                 "--backend", "local", "--host-prefix", "msb-", "--quiet"]
        self.config = root / "ssh_config"
        self.config.write_text(
            f"Host msb-*\n  ProxyCommand {shlex.join(proxy)} %n\n  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n  User root\n  BatchMode yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")

    def ssh(self, host: str, command: str) -> float:
        """Seconds ``ssh HOST COMMAND`` took; a failure is fatal."""
        began = time.perf_counter()
        done = subprocess.run(["ssh", "-F", str(self.config), host, command],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=RUN_TIMEOUT_S, check=False)
        taken = time.perf_counter() - began
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()
            raise SystemExit(f"bench: ssh {host} {command!r} failed: "
                             f"{detail[-1] if detail else done.returncode}")
        return taken

    def forks_left(self) -> bool:
        return any(path.name.startswith(f"{PARENT}.fork.")
                   for path in (self.home / "sandboxes").iterdir())

    def settle(self) -> None:
        """Wait until the last throwaway fork is gone, then sync the disks."""
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while self.forks_left():
            if time.monotonic() > deadline:
                raise SystemExit("bench: a throwaway fork was not removed after its connection")
            time.sleep(0.05)
        os.sync()

    def remove(self) -> None:
        """``msb-proxy rm`` the parent; a failure is fatal, as a jail left running would be."""
        done = subprocess.run([str(PROXY), "rm", "--backend", "local", PARENT],
                              env={**os.environ, **self.environ}, capture_output=True,
                              timeout=RUN_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise SystemExit(f"bench: msb-proxy rm {PARENT} failed: "
                             f"{done.stderr.decode(errors='replace').strip()}")


def _figure(samples: Sequence[float]) -> str:
    ms = sorted(sample * 1000 for sample in samples)
    return f"{statistics.median(ms):.0f} ms ({ms[0]:.0f}..{ms[-1]:.0f})"


def _file_system(path: Path) -> str:
    done = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True,
                          check=False)
    return done.stdout.split()[-1] if done.returncode == 0 and done.stdout.split() else "?"


def main(arguments: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forks", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, metavar="N", help="runs per row (5)")
    parser.add_argument("--size", type=int, default=1024, metavar="MIB",
                        help="MiB written to the parent's layer (1024)")
    args = parser.parse_args(arguments)
    rootfs = Path(os.environ.get("MSB_PROXY_ROOTFS") or DEFAULT_ROOTFS)
    if os.geteuid() != 0 or not (rootfs / "usr" / "bin").is_dir() or not PROXY.exists():
        print("bench: needs root, 'make rootfs' and 'make install'", file=sys.stderr)
        return 1
    idle_load = cpu_busy(1.0)  # others' work: the figures are only as quiet as the machine
    root = Path(tempfile.mkdtemp(prefix="msbf-", dir="/tmp"))
    env = _Installation(root, rootfs)
    try:
        env.ssh(f"msb-{PARENT}", f"head -c {args.size}M /dev/urandom > /root/layer")
        plain: list[float] = []
        forked: list[float] = []
        for number in range(args.runs):
            order = ((plain, f"msb-{PARENT}"), (forked, f"msb-{PARENT}.fork"))
            for samples, host in order if number % 2 == 0 else reversed(order):
                env.settle()
                samples.append(env.ssh(host, "true"))
            print(f"bench: fork {number + 1}/{args.runs}: {plain[-1] * 1000:.0f} ms plain, "
                  f"{forked[-1] * 1000:.0f} ms in a fresh fork", file=sys.stderr, flush=True)
        env.settle()
    finally:
        env.remove()
        shutil.rmtree(root, ignore_errors=True)
    size = f"{args.size} MiB" if args.size % 1024 else f"{args.size // 1024} GiB"
    text = "\n".join([
        "| row | msb-proxy (local backend) |",
        "| --- | --- |",
        f"| `ssh host true`, the running sandbox | {_figure(plain)} |",
        f"| `ssh host.fork true`: time to a shell in a fresh fork of a sandbox with {size} "
        f"written to its layer | {_figure(forked)} |",
        "",
        f"median (min..max) over {args.runs} runs each, alternating; wall clock from ssh client "
        "start to exit; the fork's removal after it is not timed; the layer on "
        f"{_file_system(Path(tempfile.gettempdir()))} (cp --reflink=auto copies where the file "
        "system has no reflinks); the warm server serves both; before we measured, other "
        f"work kept {idle_load:.0%} of the machine's CPU busy",
        "",
    ])
    print(text, end="")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
