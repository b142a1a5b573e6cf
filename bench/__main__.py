"""``python -m bench``: options, the measuring loop, and where the report goes.

Prints the Markdown report on stdout and writes it to ``bench/results/latest.md``; progress
and errors go to stderr, one line each, prefixed ``bench:``. Exits 1 when the benchmark could
not run, a workload failed on a side (the report says which and why), or it left something
behind (missing targets are reported, not an error).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from msb_proxy.fastpath import relay

from .harness import SIDES, BenchError, Harness, check_host
from .report import Machine, cpu_busy, machine_cpu_seconds, render, size_words
from .rows import CONNECTIONS, FETCHES, READY_LINES, ROWS, WORKLOADS, Row, Sample, Workload

FULL_SIZE = 1 << 30
QUICK_SIZE = 256 << 20
FULL_FILES = 10_000  # in the small-files tree
QUICK_FILES = 2_000
FULL_RUNS = (5, 3)  # (latency-type workloads, heavy workloads)
QUICK_RUNS = (3, 2)
LIGHT_TIMEOUT_S = 30.0
HEAVY_TIMEOUT_S = 300.0
BUSY_WARNING = 0.15
DEFAULT_ROOTFS = Path("/var/cache/msb-proxy/rootfs/bookworm-v1")
RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare msb-proxy (local backend) with OpenSSH's sshd -i in the same jail.")
    parser.add_argument("--rows", metavar="KEY,...",
                        help="only these rows: " + ", ".join(row.key for row in ROWS))
    parser.add_argument("--runs", type=int, metavar="N",
                        help="runs per side for every row (default: 5 for latency rows, "
                             "3 for payload rows, 1 for the file and tunnel transfers; "
                             "--quick: 3, 2 and 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: a {size_words(QUICK_SIZE)} payload instead of "
                             f"{size_words(FULL_SIZE)}, a tree of {QUICK_FILES:,} small files "
                             f"instead of {FULL_FILES:,}, and fewer runs")
    return parser


def _select(spec: str | None) -> list[Row]:
    if spec is None:
        return list(ROWS)
    wanted = [key.strip() for key in spec.split(",") if key.strip()]
    known = {row.key for row in ROWS}
    unknown = [key for key in wanted if key not in known]
    if unknown or not wanted:
        raise BenchError(f"--rows: unknown row {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(row.key for row in ROWS)}")
    return [row for row in ROWS if row.key in wanted]


def _read_in_guest(workloads: Sequence[Workload]) -> set[str]:
    """The data sets some workload reads from the guest's copy."""
    return {work.data for work in workloads if work.data and "{guest_data}" in " ".join(
        (work.command, work.setup, work.background, work.check))}


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """How big and how many: the payload size, the tree's file count, and the runs per side
    (latency-type workloads, heavy ones); ``capped``: a workload's ``max_runs`` applies (no
    ``--runs`` given)."""

    size: int
    files: int
    runs: tuple[int, int]
    capped: bool

    def runs_of(self, work: Workload) -> int:
        count = self.runs[1] if work.heavy else self.runs[0]
        if self.capped and work.max_runs is not None:
            return min(count, work.max_runs)
        return count


Samples = dict[tuple[str, str], list[Sample]]  # by (workload key, side)
Failures = dict[tuple[str, str], str]  # (workload key, side) -> what went wrong


def _measure(harness: Harness, workloads: Sequence[Workload], rows: Sequence[Row],
             plan: Plan) -> tuple[Samples, Failures]:
    """Every run of every workload; a side whose run fails gets no figure for that workload
    (its other runs are skipped), so a broken transfer never yields a number."""
    samples: Samples = {(work.key, side): [] for work in workloads for side in SIDES}
    failures: Failures = {}
    rated = {key for row in rows if row.metric.unit == "MB/s" for key in row.workloads}
    size = plan.size
    for work in workloads:
        count = plan.runs_of(work)
        timeout = HEAVY_TIMEOUT_S if work.heavy or work.connections else LIGHT_TIMEOUT_S
        for number in range(count):
            # Alternate which side goes first, so drift in the machine's load hits both alike.
            order = SIDES if number % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                if (work.key, side) in failures:
                    continue
                try:
                    if work.connections:
                        taken = harness.concurrent(side, work, timeout)
                    else:
                        taken = [harness.timed(side, work, size, timeout, check=number == 0)]
                except BenchError as exc:
                    failures[(work.key, side)] = str(exc)
                    samples[(work.key, side)].clear()
                    _progress(f"{work.key} {number + 1}/{count} {side}: failed: {exc}")
                    continue
                samples[(work.key, side)] += taken
                if work.connections:
                    unique = sorted(sample.uss_kib or 0 for sample in taken)
                    _progress(f"{work.key} {number + 1}/{count} {side}: {len(taken)} "
                              f"connections, unique memory median "
                              f"{statistics.median(unique) / 1024:.1f} MiB, largest "
                              f"{unique[-1] / 1024:.1f} MiB")
                    continue
                sample = taken[0]
                rate = f", {size / sample.seconds / 1e6:.0f} MB/s" if work.key in rated else ""
                checked = ", checked" if number == 0 and work.check else ""
                _progress(f"{work.key} {number + 1}/{count} {side}: "
                          f"{sample.seconds * 1000:.0f} ms{rate}{checked}")
    return samples, failures


def _other_work(harness: Harness, since: tuple[float, float, float]) -> float:
    """The share of the machine's CPU time that went to work other than the benchmark's since
    ``since`` (a ``_cpu_snapshot``): a high share means noisy numbers."""
    busy, total, ours = _cpu_snapshot(harness)
    elapsed = total - since[1]
    other = (busy - since[0]) - (ours - since[2])
    return max(0.0, other / elapsed) if elapsed else 0.0


def _cpu_snapshot(harness: Harness) -> tuple[float, float, float]:
    busy, total = machine_cpu_seconds()
    return busy, total, harness.cpu_seconds()


def _notes(plan: Plan, busy: float, harness: Harness, workloads: Sequence[Workload],
           samples: Samples) -> list[str]:
    runs, size, files = plan.runs, plan.size, plan.files
    fewer: dict[int, list[str]] = {}
    for work in workloads:
        if not work.connections and plan.runs_of(work) < (runs[1] if work.heavy else runs[0]):
            fewer.setdefault(plan.runs_of(work), []).append(work.key)
    notes = [
        f"median (min..max) over {runs[0]} runs per side for latency rows and {runs[1]} for "
        "payload rows"
        + "".join(f"; {count} for {', '.join(keys)}" for count, keys in fewer.items())
        + (" (to keep `make bench` within ten minutes; `--runs N` gives every row N)"
           if fewer else "")
        + "; the sides alternate run by run",
        "times are wall clock from ssh client start to exit, connection set-up included; "
        "MB = 10^6 bytes",
        "both sides: /usr/bin/ssh with one -F config and a ProxyCommand under /usr/bin/time; "
        "msb-proxy: `msb-proxy stdio --backend local`, from a copy of msb_proxy/ taken at "
        "start; sshd: `nsenter -t <init> -m -p -u -i -n "
        "-r -w /usr/sbin/sshd -i` into the same sandbox (checked: same hostname and namespaces)",
        "peak RSS: /usr/bin/time %M, the largest single process of the ProxyCommand: msb-proxy "
        "is one process; for sshd it is the largest of nsenter, the sshd monitor, its session "
        "child and the guest command",
        "server CPU: user+system time of the ProxyCommand and all it waited for, plus the guest "
        "commands the sandbox's init reaped during the run, so both sides include the guest's "
        "`cat`/`head`; 10 ms clock ticks",
        "msb-proxy's relay loop: " + (
            "Python (MSB_PROXY_RELAY=python)" if os.environ.get("MSB_PROXY_RELAY") == "python"
            else "C (msb_proxy.fastpath._relay)" if relay.compiled_loop() is not None
            else "**Python: the C extension was not built (make install builds it)**"),
    ]
    mine, theirs = (harness.handshakes.get(side) for side in SIDES)
    if mine and theirs and (mine.cipher, mine.kex) != (theirs.cipher, theirs.kex):
        notes.append("**the client negotiated different algorithms with the two sides (see "
                     "below): the rows compare what a user gets, not one cipher**")
    keys = {work.key for work in workloads}
    if any(work.data in ("file", "tree") and not work.background for work in workloads):
        notes.append(
            f"file transfer rows: a {size_words(size)} file of random bytes and a tree of "
            f"{files:,} files of 256 bytes to 4 KiB in 100 directories, made once on the host "
            "and copied into the guest through msb-proxy, so both sides read the same bytes; "
            "each run writes a new file or tree (the destination is removed before it and the "
            "disks synced, untimed); after the first run of each row on each side the "
            "destination is checked: sha256 of the file, or of every path and content of the tree")
    if keys & {"forward-up", "forward-down", "forward-open"}:
        notes.append(
            "`ssh -L` rows: each run starts a listener in the guest (bench/peer.py under the "
            "guest's python3: it discards, sends or serves over HTTP) and an `ssh -N -L` "
            "before the clock, and ends both after it; the tunnel's ProxyCommand (and "
            "msb-proxy's guest tunnel helper) counts for the run's RSS and CPU, the guest "
            "listener on neither side. The timed command is the host end (peer.py), which exits "
            "once the other end holds every byte: the sink answers the count after end of "
            "file. Byte counts are checked on every run, the sha256 after the first run on "
            "each side (through a tunnel of its own)")
    if "forward-open" in keys:
        notes.append(
            f"tunnel open: each run times {FETCHES} sequential `curl`s through one `ssh -L` "
            "(each a new TCP connection, so a new direct-tcpip channel, to python's "
            "http.server in the guest); the figure is the run's time per curl, curl's own "
            "start-up included; msb-proxy's warm server serves that tunnel")
    if any(work.connections for work in workloads):
        notes.append(
            f"memory rows: {CONNECTIONS} `ssh` clients at once, each running a session that "
            f"prints a line a second (one such run per side unless `--runs` says otherwise, "
            f"each connection a sample); once each has printed {READY_LINES} lines, "
            "/proc/PID/smaps_rollup of the processes serving each connection: USS = "
            "Private_Clean + Private_Dirty (what the connection costs the machine: pages "
            "shared with the warm server it was forked from are not counted), PSS = Pss; "
            "median (min..max) over the connections. msb-proxy: the warm server's child "
            "(matched to its client by the pipe it serves); sshd: the sshd processes below "
            "the connection's nsenter. The guest's processes count on neither side")
    untimed = {work.key for work in workloads if work.connections}
    lingers = {side: [sample.linger * 1000 for (key, each), taken in samples.items()
                      if each == side and key not in untimed for sample in taken]
               for side in SIDES}
    if all(lingers.values()):
        notes.append(
            "after the ssh client exited, its ProxyCommand took a further median "
            + " and ".join(f"{statistics.median(lingers[side]):.0f} ms ({side})"
                           for side in SIDES)
            + " to end on its own (runs shield it from ssh's SIGHUP); not in any timing")
    load = f"other work on this machine used {busy:.0%} of its CPU time while we measured"
    notes.append(f"**{load}: expect noise**" if busy > BUSY_WARNING else load)
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # so the sandbox is still removed

    signal.signal(signal.SIGTERM, terminate)
    runs = QUICK_RUNS if args.quick else FULL_RUNS
    if args.runs is not None:
        if args.runs < 1:
            _progress("--runs must be at least 1")
            return 2
        runs = (args.runs, args.runs)
    plan = Plan(size=QUICK_SIZE if args.quick else FULL_SIZE,
                files=QUICK_FILES if args.quick else FULL_FILES, runs=runs,
                capped=args.runs is None)
    rootfs = Path(os.environ.get("MSB_PROXY_ROOTFS") or DEFAULT_ROOTFS)
    proxy = Path(sys.executable).parent / "msb-proxy"
    try:
        rows = _select(args.rows)
        needed = {key for row in rows for key in row.workloads}
        workloads = [work for work in WORKLOADS if work.key in needed]
        check_host(rootfs, proxy)
        idle_check = cpu_busy(1.0)
        if idle_check > BUSY_WARNING:
            _progress(f"warning: the CPUs are {idle_check:.0%} busy with other work; "
                      "expect noise")
        machine = Machine.here()
        harness = Harness(rootfs, proxy)
        problems: list[str] = []
        try:
            _progress(f"starting sandbox {harness.name} and sshd in it")
            harness.start()
            kinds = {work.data for work in workloads if work.data}
            if kinds:
                _progress(f"making data sets {', '.join(sorted(kinds))}, in the guest too")
                harness.prepare(sorted(kinds), sorted(_read_in_guest(workloads)), plan.size,
                                plan.files)
            before = _cpu_snapshot(harness)
            samples, failures = _measure(harness, workloads, rows, plan)
            busy = _other_work(harness, before)
        finally:
            _progress(f"removing sandbox {harness.name}")
            problems = harness.close()
            for problem in problems:
                _progress(f"error: {problem}")
    except BenchError as exc:
        _progress(str(exc))
        return 1
    except KeyboardInterrupt:
        _progress("interrupted")
        return 130
    report = render(machine, harness.handshakes, rows, samples=samples, failures=failures,
                    size=plan.size, files=plan.files,
                    notes=_notes(plan, busy, harness, workloads, samples))
    print(report, end="", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(report)
    _progress(f"written to {RESULTS}")
    return 1 if problems or failures else 0


if __name__ == "__main__":
    sys.exit(main())
