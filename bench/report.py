"""The benchmark's report: the machine and versions it ran with, and the Markdown table.

Owns turning samples into figures (median, min, max per side), the msb-proxy / sshd ratio and
whether it meets the row's target, and the notes a reader needs to trust the numbers.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .harness import SIDES, Handshake
from .rows import Metric, Row, Sample

__all__ = ["Figure", "Machine", "cpu_busy", "figure", "machine_cpu_seconds", "render", "size_arg",
           "size_words"]

FAILED = "**failed**"  # the cell of a side whose run failed


@dataclass(frozen=True)
class Machine:
    """Where and with what the benchmark ran."""

    cpu: str
    cores: int
    kernel: str
    date: str
    openssh_client: str
    asyncssh: str
    python: str
    msb_proxy: str
    source: str

    @classmethod
    def here(cls) -> Machine:
        cpu = "unknown CPU"
        try:
            with open("/proc/cpuinfo") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        client = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
        return cls(
            cpu=cpu, cores=os.cpu_count() or 0, kernel=f"{platform.system()} {platform.release()}",
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            openssh_client=(client.stderr or client.stdout).strip().split(",")[0],
            asyncssh=importlib.metadata.version("asyncssh"),
            python=platform.python_version(),
            msb_proxy=importlib.metadata.version("msb-proxy"),
            source=_source_state(),
        )


def _source_state() -> str:
    """The commit msb-proxy was measured at, and whether its code had changes on top."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    changed = git("status", "--porcelain", "--", "msb_proxy")
    return f"git {commit}" + (" + uncommitted changes in msb_proxy/" if changed else "")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot, from /proc/stat.

    Busy counts steal time too: on a virtual machine that is the host running something else,
    which slows a benchmark just as much as a neighbour process does.
    """
    with open("/proc/stat") as handle:
        # user nice system idle iowait irq softirq steal; guest time is already in user/nice.
        fields = [int(value) for value in handle.readline().split()[1:9]]
    ticks = os.sysconf("SC_CLK_TCK")
    total = sum(fields)
    return (total - fields[3] - fields[4]) / ticks, total / ticks


def cpu_busy(seconds: float) -> float:
    """The share of all CPUs busy over the next ``seconds`` (0..1)."""
    busy_before, total_before = machine_cpu_seconds()
    time.sleep(seconds)
    busy_after, total_after = machine_cpu_seconds()
    total = total_after - total_before
    return (busy_after - busy_before) / total if total else 0.0


@dataclass(frozen=True)
class Figure:
    """One side's figure for one row."""

    median: float
    low: float
    high: float
    runs: int


def figure(metric: Metric, samples: Sequence[Sample], size: int) -> Figure | None:
    """``metric`` over ``samples``; None when any sample lacks what the metric needs."""
    values = [metric.value(sample, size) for sample in samples]
    if not values or any(value is None for value in values):
        return None
    known = [value for value in values if value is not None]
    return Figure(statistics.median(known), min(known), max(known), len(known))


def size_words(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def size_arg(size: int) -> str:
    """``size`` as ``head -c`` would be given it by hand: ``1G``, ``256M``."""
    for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{suffix}"
    return str(size)


def _cell(metric: Metric, value: Figure | None) -> str:
    if value is None:
        return "n/a"
    digits = metric.decimals
    text = f"{value.median:.{digits}f} {metric.unit}"
    if value.runs > 1:
        text += f" ({value.low:.{digits}f}..{value.high:.{digits}f})"
    return text


def _target(metric: Metric) -> str:
    better = "lower is better" if metric.lower_is_better else "higher is better"
    if metric.limit is not None:
        bound = "≤" if metric.lower_is_better else "≥"
        return f"msb-proxy {bound} {metric.limit:g} {metric.unit} each ({better})"
    if metric.target is None:
        return f"none ({better})"
    bound = "≤" if metric.lower_is_better else "≥"
    return f"{bound} {metric.target:.2f} ({better})"


def _met(metric: Metric, ratio: float | None, mine: str, figure: Figure | None) -> str:
    if (metric.target is not None or metric.limit is not None) and mine == FAILED:
        return "**no**"
    if metric.limit is not None:
        if figure is None:
            return "-"
        worst = figure.high if metric.lower_is_better else figure.low
        ok = worst <= metric.limit if metric.lower_is_better else worst >= metric.limit
        return "yes" if ok else "**no**"
    if metric.target is None or ratio is None:
        return "-"
    ok = ratio <= metric.target if metric.lower_is_better else ratio >= metric.target
    return "yes" if ok else "**no**"


def render(machine: Machine, handshakes: Mapping[str, Handshake], rows: Sequence[Row], *,
           samples: Mapping[tuple[str, str], Sequence[Sample]],
           failures: Mapping[tuple[str, str], str], size: int, files: int,
           notes: Sequence[str]) -> str:
    """The whole report as Markdown; ``samples`` and ``failures`` (what went wrong) are keyed
    by (workload key, side). A side that failed a row's workload shows "failed", no figure."""
    lines = [
        "# msb-proxy vs OpenSSH sshd, same jail",
        "",
        f"Machine: {machine.cpu}, {machine.cores} cores, {machine.kernel}, {machine.date}  ",
        f"Versions: {machine.openssh_client} (client); "
        + "; ".join(f"{side}: {handshakes[side].software}" for side in SIDES if side in handshakes)
        + f"; asyncssh {machine.asyncssh}; Python {machine.python}; "
        f"msb-proxy {machine.msb_proxy} ({machine.source})",
        "",
        "| row | msb-proxy | sshd | ratio msb-proxy/sshd | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    words = {"size": size_words(size), "size_arg": size_arg(size), "files": f"{files:,}"}
    for row in rows:
        per_side: dict[str, Figure | None] = {}
        cells: dict[str, str] = {}
        for side in SIDES:
            pooled = [sample for key in row.workloads for sample in samples[(key, side)]]
            per_side[side] = figure(row.metric, pooled, size)
            failed = any((key, side) in failures for key in row.workloads)
            cells[side] = FAILED if failed else _cell(row.metric, per_side[side])
        mine, theirs = per_side["msb-proxy"], per_side["sshd"]
        ratio = mine.median / theirs.median if mine and theirs and theirs.median else None
        lines.append(
            f"| {row.label.format(**words)} | {cells['msb-proxy']} "
            f"| {cells['sshd']} | {'n/a' if ratio is None else f'{ratio:.2f}'} "
            f"| {_target(row.metric)} | {_met(row.metric, ratio, cells['msb-proxy'], mine)} |")
    lines += ["", *(f"- **{key} failed on {side}**: {why}"
                    for (key, side), why in failures.items())]
    lines += [f"- {note}" for note in notes]
    lines += [f"- negotiated with {side}: {handshakes[side].describe()}"
              for side in SIDES if side in handshakes]
    return "\n".join(lines) + "\n"
