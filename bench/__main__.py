"""``python -m bench``: options, the measuring loop, and where the report goes.

Prints the Markdown report on stdout and writes it to ``bench/results/latest.md``; progress
and errors go to stderr, one line each, prefixed ``bench:``. Exits 1 when the benchmark could
not run or left something behind (missing targets are reported, not an error).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from .harness import SIDES, BenchError, Harness, check_host
from .report import Machine, cpu_busy, machine_cpu_seconds, render, size_words
from .rows import ROWS, WORKLOADS, Row, Sample, Workload

FULL_SIZE = 1 << 30
QUICK_SIZE = 256 << 20
FULL_RUNS = (5, 3)  # (latency-type workloads, heavy workloads)
QUICK_RUNS = (3, 2)
LIGHT_TIMEOUT_S = 30.0
HEAVY_TIMEOUT_S = 120.0
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
                             "3 for payload rows; --quick: 3 and 2)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: a {size_words(QUICK_SIZE)} payload instead of "
                             f"{size_words(FULL_SIZE)}, and fewer runs")
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


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _measure(harness: Harness, workloads: Sequence[Workload], runs: tuple[int, int],
             size: int) -> dict[tuple[str, str], list[Sample]]:
    samples: dict[tuple[str, str], list[Sample]] = {
        (work.key, side): [] for work in workloads for side in SIDES}
    for work in workloads:
        count = runs[1] if work.heavy else runs[0]
        timeout = HEAVY_TIMEOUT_S if work.heavy else LIGHT_TIMEOUT_S
        for number in range(count):
            # Alternate which side goes first, so drift in the machine's load hits both alike.
            order = SIDES if number % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                sample = harness.timed(side, work.command, size, timeout, work.warm)
                samples[(work.key, side)].append(sample)
                rate = f", {size / sample.seconds / 1e6:.0f} MB/s" if work.heavy else ""
                _progress(f"{work.key} {number + 1}/{count} {side}: "
                          f"{sample.seconds * 1000:.0f} ms{rate}")
    return samples


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


def _notes(runs: tuple[int, int], size: int, busy: float, harness: Harness,
           samples: dict[tuple[str, str], list[Sample]]) -> list[str]:
    notes = [
        f"median (min..max) over {runs[0]} runs per side for latency rows and {runs[1]} for "
        f"{size_words(size)} rows; the sides alternate run by run",
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
    ]
    mine, theirs = (harness.handshakes.get(side) for side in SIDES)
    if mine and theirs and (mine.cipher, mine.kex) != (theirs.cipher, theirs.kex):
        notes.append("**the client negotiated different algorithms with the two sides (see "
                     "below): the rows compare what a user gets, not one cipher**")
    lingers = {side: [sample.linger * 1000 for (_, each), taken in samples.items()
                      if each == side for sample in taken] for side in SIDES}
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
    size = QUICK_SIZE if args.quick else FULL_SIZE
    runs = QUICK_RUNS if args.quick else FULL_RUNS
    if args.runs is not None:
        if args.runs < 1:
            _progress("--runs must be at least 1")
            return 2
        runs = (args.runs, args.runs)
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
            before = _cpu_snapshot(harness)
            samples = _measure(harness, workloads, runs, size)
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
    report = render(machine, harness.handshakes, rows, samples=samples, size=size,
                    notes=_notes(runs, size, busy, harness, samples))
    print(report, end="", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(report)
    _progress(f"written to {RESULTS}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
