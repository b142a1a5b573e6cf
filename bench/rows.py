"""What the benchmark measures: the workloads it times and the rows of the table they feed.

A *workload* is one bash command, timed as a whole (wall clock, client start to client exit),
run the same way against both sides: msb-proxy and OpenSSH's ``sshd -i`` in the same jail. Its
text may use these placeholders, filled in per side and shell-quoted:

    {ssh}     ``ssh -F CONFIG HOST``: the OpenSSH client aimed at this side
    {config}  the ssh -F config file (for scp/sftp/rsync: ``scp -F {config} ... {host}:...``)
    {host}    this side's host alias in that config
    {size}    the payload size in bytes (``--quick`` makes it smaller)

A *row* reduces the samples of one or more workloads to one figure per side and compares them,
msb-proxy over sshd. Adding a benchmark is adding a :class:`Workload` to ``WORKLOADS`` and a
:class:`Row` to ``ROWS``; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LATENCY", "PEAK_RSS", "ROWS", "SERVER_CPU", "THROUGHPUT", "WORKLOADS", "Metric",
           "Row", "Sample", "Workload"]


@dataclass(frozen=True)
class Workload:
    """One timed command. ``heavy`` ones move the payload, so they get fewer runs by default.

    ``warm``: msb-proxy may hand the connection to its warm server, as it does by default. Off,
    it serves in the ProxyCommand process itself (``MSB_PROXY_WARM=0``): what a first
    connection costs, and the only way its RSS and CPU are seen by ``/usr/bin/time``.
    """

    key: str
    command: str
    heavy: bool = False
    warm: bool = True


@dataclass(frozen=True)
class Sample:
    """One run of a workload on one side.

    ``seconds`` is wall time until the command (the ssh client) exited. ``rss_kib`` is the
    largest peak RSS among the processes of the ProxyCommands the run started
    (``/usr/bin/time %M``). ``server_cpu`` is the user+system CPU seconds of the server side:
    those ProxyCommands with everything they waited for, plus the guest processes the
    sandbox's init reaped meanwhile (msb-proxy's guest commands are the init's children;
    sshd's are sshd's). Both are None when no ProxyCommand reported. ``linger`` is how long
    after the command exited its ProxyCommand took to end on its own (the bench shields it
    from ssh's SIGHUP): not part of ``seconds``.
    """

    seconds: float
    rss_kib: int | None
    server_cpu: float | None
    linger: float = 0.0


@dataclass(frozen=True)
class Metric:
    """How a sample becomes a figure, and which ratio (msb-proxy / sshd) counts as good.

    ``target`` bounds the ratio from above when ``lower_is_better``, else from below; None
    means the issue set no target for it.
    """

    unit: str
    value: Callable[[Sample, int], float | None]  # (sample, payload bytes) -> figure, if known
    lower_is_better: bool
    target: float | None
    decimals: int = 0


def _milliseconds(sample: Sample, _size: int) -> float:
    return sample.seconds * 1000


def _megabytes_per_second(sample: Sample, size: int) -> float:
    return size / sample.seconds / 1e6


def _rss_mib(sample: Sample, _size: int) -> float | None:
    return None if sample.rss_kib is None else sample.rss_kib / 1024


def _cpu_milliseconds(sample: Sample, _size: int) -> float | None:
    return None if sample.server_cpu is None else sample.server_cpu * 1000


# Targets are the issue's: start-up no slower than sshd, throughput within 10% of it.
LATENCY = Metric("ms", _milliseconds, lower_is_better=True, target=1.0)
THROUGHPUT = Metric("MB/s", _megabytes_per_second, lower_is_better=False, target=0.9)
PEAK_RSS = Metric("MiB", _rss_mib, lower_is_better=True, target=None, decimals=1)
# CPU time barely moves when other work shares the machine, unlike wall time: the rows to
# trust on a busy host.
SERVER_CPU = Metric("ms CPU", _cpu_milliseconds, lower_is_better=True, target=None)


@dataclass(frozen=True)
class Row:
    """One line of the table: ``metric`` over the samples of ``workloads`` (pooled).

    ``label`` may use ``{size}``, the payload size in words (``1 GiB``), and ``{size_arg}``,
    the same as ``head -c`` takes it (``1G``).
    """

    key: str
    label: str
    workloads: tuple[str, ...]
    metric: Metric


WORKLOADS: tuple[Workload, ...] = (
    Workload("true", "{ssh} true"),
    Workload("true-cold", "{ssh} true", warm=False),
    # Served in the measured process, so that the RSS and CPU rows are msb-proxy's own.
    Workload("upload", "head -c {size} /dev/zero | {ssh} 'cat >/dev/null'", heavy=True,
             warm=False),
    Workload("download", "{ssh} 'head -c {size} /dev/zero' | cat >/dev/null", heavy=True,
             warm=False),
)

ROWS: tuple[Row, ...] = (
    Row("true", "`ssh host true` latency", ("true",), LATENCY),
    Row("true-cold", "`ssh host true` latency, first connection (no warm server)",
        ("true-cold",), LATENCY),
    Row("upload", "upload {size}: `head -c {size_arg} /dev/zero | ssh host 'cat >/dev/null'`",
        ("upload",), THROUGHPUT),
    Row("download",
        "download {size}: `ssh host 'head -c {size_arg} /dev/zero' | cat >/dev/null`",
        ("download",), THROUGHPUT),
    Row("rss", "proxy peak RSS (upload + download runs)", ("upload", "download"), PEAK_RSS),
    Row("cpu-true", "server CPU per `ssh host true` (no warm server)", ("true-cold",),
        SERVER_CPU),
    Row("cpu-upload", "server CPU per upload of {size}", ("upload",), SERVER_CPU),
    Row("cpu-download", "server CPU per download of {size}", ("download",), SERVER_CPU),
)

