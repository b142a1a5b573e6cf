"""``python -m fuzz`` (with ``tests`` on ``sys.path``; ``make fuzz``): the long fuzz run.

Runs ``--cases`` seeded cases in-process, split over ``--workers`` processes (worker ``k``
draws with hypothesis seed ``--seed + k``), then ``--process`` more through the real
``msb-proxy stdio`` process. Each case ends within a bound; every finding is printed with its
reproducer (worker seed and case number) and the case itself is written, one JSON line each, to
``--findings`` (replay them with ``--replay FILE``). At the end the sandbox must hold as many
processes as before the run. Exits 1 when anything did not hold.

Progress and the summary go to stdout; the sandbox used (``fuzz-<pid>``) lives in a temporary
``MSB_PROXY_HOME`` and is removed afterwards.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from leaks import guest_processes, settle

from fuzz.cases import Case, Result, cases, describe, play, warm_up
from fuzz.client import UserKey
from fuzz.servers import PROXY, InProcessServer, ProcessServer, Server

DEFAULT_ROOTFS = Path("/var/cache/msb-proxy/rootfs/bookworm-v1")
DEFAULT_SEED = 20261201
PROCESS_SEED_OFFSET = 1000  # the process slice draws with seed + this
CHUNK = 500  # cases per hypothesis run (see run_cases)
# An in-process worker: the servers of all its connections, one at a time, and hypothesis.
WORKER_MAX_RSS_KIB = 384 * 1024
SETTLE_S = 15.0


def run_cases(count: int, seed: int, each: Callable[[int, Case], None]) -> None:
    """Draw ``count`` cases with hypothesis and call ``each(i, case)``; case ``i`` is drawn in
    chunk ``i // CHUNK``, seeded with ``seed * 1000 + chunk``.

    Generation only (no shrinking: ``each`` records rather than raises, so the run goes on).
    In chunks, because hypothesis keeps a record of every choice it made for the examples of
    one run (~60 KiB a case here): 10,000 in one run would hold ~600 MiB of it.
    """
    for chunk, start in enumerate(range(0, count, CHUNK)):
        _run_chunk(range(start, min(start + CHUNK, count)), seed * 1000 + chunk, each)


def _run_chunk(indices: range, seed: int, each: Callable[[int, Case], None]) -> None:
    counter = iter(indices)

    @settings(max_examples=len(indices), database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @hypothesis_seed(seed)
    @given(cases())
    def one(case: Case) -> None:
        each(next(counter, indices.stop), case)

    one()


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Tally:
    """Counts and findings of one worker, written as JSON lines to ``out``."""

    def __init__(self, out: Path, seed: int, mode: str) -> None:
        self._out = out.open("a", encoding="utf-8")
        self.seed = seed
        self.mode = mode
        self.stats: collections.Counter[str] = collections.Counter()
        self.peak_case_rss = 0
        self.slowest = 0.0

    def record(self, index: int, case: Case, result: Result) -> None:
        self.stats["cases"] += 1
        self.stats[f"stage {case.stage}"] += 1
        self.stats["ended early"] += result.ended_early
        self.stats["probed"] += result.probed
        self.stats["asyncssh decode errors"] += result.decode_errors
        if os.environ.get("FUZZ_ENDS") and result.ended_early:
            self.stats[f"end {case.stage}: {result.end or 'closed'}"] += 1
        for bug in result.asyncssh_bugs:
            self.stats[f"asyncssh bug: {bug}"] += 1
            print(f"asyncssh bug [{self.mode} seed {self.seed} case {index}] {bug} -- "
                  f"{describe(case)}", flush=True)
        for reason in result.asyncssh_disconnects:
            self.stats[f"asyncssh disconnect: {reason}"] += 1
        if result.seconds > 5:
            self.stats["cases over 5 s"] += 1
            print(f"slow [{self.mode} seed {self.seed} case {index}] {result.seconds:.1f} s -- "
                  f"{describe(case)}", flush=True)
        self.slowest = max(self.slowest, result.seconds)
        if result.max_rss_kib:
            self.peak_case_rss = max(self.peak_case_rss, result.max_rss_kib)
        if result.findings:
            self.stats["failed"] += 1
            for finding in result.findings:
                print(f"FINDING [{self.mode} seed {self.seed} case {index}] {finding} -- "
                      f"{describe(case)}", flush=True)
            self._out.write(json.dumps({"mode": self.mode, "seed": self.seed, "index": index,
                                        "findings": result.findings,
                                        "case": json.loads(case.to_json())}) + "\n")
            self._out.flush()

    def close(self) -> None:
        self._out.close()


def worker(args: argparse.Namespace) -> int:
    """One process's share of the run; prints one JSON summary line last."""
    home = Path(args.home)
    key = UserKey(args.seed)
    server: Server
    if args.mode == "process":
        environ = dict(os.environ, MSB_PROXY_HOME=str(home), MSB_PROXY_ROOTFS=str(args.rootfs),
                       HOME=str(home / "user"))
        server = ProcessServer(environ, args.sandbox)
    else:
        server = InProcessServer(home, Path(args.rootfs), args.sandbox, key.openssh)
    tally = Tally(Path(args.findings), args.seed, args.mode)
    started = time.monotonic()
    rss_after_warmup = 0

    def each(index: int, case: Case) -> None:
        nonlocal rss_after_warmup
        tally.record(index, case, play(case, server, key))
        if index == 99:
            rss_after_warmup = rss_kib()
        if (index + 1) % 500 == 0:
            print(f"{args.mode} seed {args.seed}: {index + 1} cases, "
                  f"{time.monotonic() - started:.0f} s", flush=True)

    run_cases(args.cases, args.seed, each)
    tally.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.mode != "process" and peak > WORKER_MAX_RSS_KIB:
        tally.stats["failed"] += 1
        print(f"FINDING [{args.mode} seed {args.seed}] memory: the worker's peak RSS "
              f"{peak // 1024} MiB is over {WORKER_MAX_RSS_KIB // 1024} MiB", flush=True)
    summary = {"mode": args.mode, "seed": args.seed, "stats": dict(tally.stats),
               "seconds": round(time.monotonic() - started, 1),
               "slowest_case_s": round(tally.slowest, 2),
               "rss_after_100_kib": rss_after_warmup, "rss_end_kib": rss_kib(),
               "max_rss_kib": peak,
               "peak_case_rss_kib": tally.peak_case_rss}
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


_workers: list[subprocess.Popen[str]] = []  # ended with the run, however it ends


def _spawn(args: argparse.Namespace, mode: str, seed: int, count: int,
           home: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "fuzz", "--worker", "--mode", mode, "--seed", str(seed),
            "--cases", str(count), "--home", str(home), "--sandbox", args.sandbox,
            "--rootfs", str(args.rootfs), "--findings", str(args.findings)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    _workers.append(process)
    return process


def _collect(workers: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    summaries = []
    for process in workers:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("SUMMARY "):
                summaries.append(json.loads(line[len("SUMMARY "):]))
            else:
                print(line, end="", flush=True)
        process.wait()
    return summaries


def _prepare(args: argparse.Namespace, home: Path) -> None:
    """authorized_keys for the process slice (the in-process server takes its key directly)
    and the sandbox created once, before any case is timed."""
    (home / "user").mkdir(parents=True)
    home.chmod(0o700)
    seeds = [args.seed + k for k in range(args.workers)]
    seeds += [args.seed + PROCESS_SEED_OFFSET + k for k in range(args.workers)]
    (home / "authorized_keys").write_text("".join(f"{UserKey(s).openssh}\n" for s in seeds))
    key = UserKey(0)
    server = InProcessServer(home, Path(args.rootfs), args.sandbox, key.openssh)
    try:
        warm_up(server, key)
    finally:
        server.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="in-process cases (10,000)")
    parser.add_argument("--process", type=int, default=300,
                        help="cases through the real msb-proxy stdio process (300)")
    parser.add_argument("--workers", type=int, default=2, help="processes in parallel (2)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="hypothesis seed")
    parser.add_argument("--rootfs", type=Path,
                        default=Path(os.environ.get("MSB_PROXY_ROOTFS") or DEFAULT_ROOTFS))
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings.jsonl"),
                        help="where failing cases go, one JSON line each")
    parser.add_argument("--replay", type=Path, metavar="FILE",
                        help="replay the cases of a findings file instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="inprocess", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox", default=f"fuzz-{os.getpid()}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not PROXY.exists():
        print(f"fuzz: no {PROXY}: run 'make install' first", file=sys.stderr)
        return 1
    home = Path(tempfile.mkdtemp(prefix="msb-fuzz-"))
    # Stopped by a signal, the sandbox and its home still go (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        return _run(args, home)
    finally:
        for process in _workers:
            if process.poll() is None:
                process.terminate()
                process.wait()
        subprocess.run([str(PROXY), "rm", args.sandbox], env=dict(
            os.environ, MSB_PROXY_HOME=str(home), MSB_PROXY_BACKEND="local"),
            capture_output=True, check=False, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def _run(args: argparse.Namespace, home: Path) -> int:
    if args.replay:
        return _replay(args, home)
    args.findings.unlink(missing_ok=True)
    _prepare(args, home)
    before = guest_processes(home, args.sandbox)
    started = time.monotonic()
    share = [args.cases // args.workers + (k < args.cases % args.workers)
             for k in range(args.workers)]
    summaries = _collect([_spawn(args, "inprocess", args.seed + k, n, home)
                          for k, n in enumerate(share) if n])
    share = [args.process // args.workers + (k < args.process % args.workers)
             for k in range(args.workers)]
    summaries += _collect([_spawn(args, "process", args.seed + PROCESS_SEED_OFFSET + k, n, home)
                           for k, n in enumerate(share) if n])
    after = settle(lambda: guest_processes(home, args.sandbox), before, SETTLE_S)
    failed = sum(int(s["stats"].get("failed", 0)) for s in summaries)
    total = sum(int(s["stats"].get("cases", 0)) for s in summaries)
    print(f"fuzz: {total} cases in {time.monotonic() - started:.0f} s, {failed} with findings; "
          f"guest processes before {before}, after {after}")
    for summary in summaries:
        print("fuzz: " + json.dumps(summary))
    if after != before:
        print(f"FINDING guest processes left behind: {before} before the run, {after} after")
        failed += 1
    if failed:
        print(f"fuzz: findings in {args.findings}; replay with "
              f"'python -m fuzz --replay {args.findings}'")
    return 1 if failed else 0


def _replay(args: argparse.Namespace, home: Path) -> int:
    _prepare(args, home)
    lines = [json.loads(line) for line in args.replay.read_text().splitlines() if line]
    failed = 0
    for entry in lines:
        case = Case.from_json(json.dumps(entry["case"]))
        key = UserKey(int(entry["seed"]))
        server: Server
        if entry["mode"] == "process":
            (home / "authorized_keys").write_text(key.openssh + "\n")
            server = ProcessServer(dict(os.environ, MSB_PROXY_HOME=str(home),
                                        MSB_PROXY_ROOTFS=str(args.rootfs),
                                        HOME=str(home / "user")), args.sandbox)
        else:
            server = InProcessServer(home, Path(args.rootfs), args.sandbox, key.openssh)
        result = play(case, server, key)
        failed += bool(result.findings)
        known = f" (asyncssh: {', '.join(result.asyncssh_bugs)})" if result.asyncssh_bugs else ""
        print(f"replay seed {entry['seed']} case {entry['index']}: "
              f"{result.findings or 'held'}{known} -- {describe(case)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
