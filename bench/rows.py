"""What the benchmark measures: the workloads it times and the rows of the table they feed.

A *workload* is one bash command, timed as a whole (wall clock, client start to client exit),
run the same way against both sides: msb-proxy and OpenSSH's ``sshd -i`` in the same jail. Its
text may use these placeholders, filled in per side (paths need no quoting):

    {ssh}         ``ssh -F CONFIG HOST``: the OpenSSH client aimed at this side
    {config}      the ssh -F config file (for scp/sftp/rsync: ``scp -F {config} ... {host}:...``)
    {host}        this side's host alias in that config
    {size}        the payload size in bytes (``--quick`` makes it smaller)
    {data}        host directory holding the data sets (``file``, ``tree/``, ``www/page``)
    {dest}        host directory for what a download writes
    {guest_data}  the same data sets in the guest
    {guest_dest}  guest directory for what an upload writes
    {peer}        the host end of a tunnel transfer (``peer.py`` run by the bench's Python)
    {guest_peer}  the same script run by the guest's python3
    {port}        the host TCP port a workload's ``ssh -L`` listens on
    {guest_port}  the guest TCP port it forwards to
    {fetches}     how many fetches the tunnel-open workload makes per run (``FETCHES``)
    {tree_digest} the shell pipeline that prints a tree's digest (see datasets.py)

A workload with ``connections`` is not timed: that many clients of its command run at once,
and once each has printed ``READY_LINES`` lines the memory of every connection's server side is
read, one sample per connection (see :class:`Sample`).

A *row* reduces the samples of one or more workloads to one figure per side and compares them,
msb-proxy over sshd. Adding a benchmark is adding a :class:`Workload` to ``WORKLOADS`` and a
:class:`Row` to ``ROWS``; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["CONNECTIONS", "CONNECTION_MEMORY", "FETCHES", "LATENCY", "OBSERVED", "PEAK_RSS",
           "PROPORTIONAL_MEMORY", "READY_LINES", "RECORDED", "ROWS", "SERVER_CPU", "THROUGHPUT",
           "TREE_TIME", "TUNNEL_OPEN", "TUNNEL_THROUGHPUT", "UNIQUE_MEMORY", "WORKLOADS", "Metric",
           "Row", "Sample", "Workload"]

FETCHES = 50  # curls per run of the tunnel-open workload
CONNECTIONS = 50  # clients at once in the memory workload (issue 12)
READY_LINES = 3  # lines each of them prints before its memory is read: two of slow output
# Runs per side of each 1 GiB and 10,000-file transfer of issues 3 and 5 (--runs overrides): one
# each already takes some eight minutes on a 2-core machine, and `make bench` should take ten.
TRANSFER_RUNS = 1
# The 10,000-file scp -r rows spread most (one run each can land anywhere from 0.9x to 1.7x of
# the other side): three each, for a median.
TREE_RUNS = 3

@dataclass(frozen=True)
class Workload:
    """One timed command. ``heavy`` ones move a payload, so they get fewer runs by default, and
    never more than ``max_runs`` when that is set, unless ``--runs`` says otherwise.

    ``warm``: msb-proxy may hand the connection to its warm server, as it does by default. Off,
    it serves in the ProxyCommand process itself (``MSB_PROXY_WARM=0``): what a first
    connection costs, and the only way its RSS and CPU are seen by ``/usr/bin/time``.

    Around each run, untimed and on the same side (``{ssh}`` there is always the warm one):
    ``setup`` runs first; then ``background`` is started (an ``ssh -N -L`` for the run, with
    the workload's ``warm``) and the run begins once something listens on the host's ``{port}``;
    after the run ``background`` gets SIGTERM and its ProxyCommand is waited for, so its RSS and
    CPU count for the run; ``teardown`` runs last, also after a failed run.

    ``check`` proves the first run on each side moved the right bytes: it runs after that run
    (with a ``background`` of its own, before ``teardown``) and must print the digest of data
    set ``data`` (see datasets.py), the first word of its output compared.

    ``connections``: a memory workload (see the module's docstring); ``command`` must print
    lines on its standard output.

    ``template``: the text of ``MSB_PROXY_HOME/config.toml`` while each run of it lasts, set-up
    and teardown included (none by default; sshd's side ignores it): :data:`RECORDED` runs the
    bench sandbox with session recording on, :data:`OBSERVED` with the audit log too.
    """

    key: str
    command: str
    heavy: bool = False
    warm: bool = True
    max_runs: int | None = None
    data: str = ""
    setup: str = ""
    background: str = ""
    check: str = ""
    teardown: str = ""
    connections: int = 0
    template: str = ""
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

    A memory workload's sample is one connection: ``seconds`` until it had printed
    ``READY_LINES`` lines; ``uss_kib`` and ``pss_kib``, the private memory (USS) and the
    proportional share (PSS, shared pages divided among their users) of the processes that
    serve it (msb-proxy: the warm server's child; sshd: its sshd processes, one for a root
    login, which sshd serves without a privilege-separated child);
    ``command_uss_kib``, the USS of its ProxyCommand process besides (msb-proxy: the ``stdio``
    that handed the connection over and waits for its end; sshd: nsenter).
    """

    seconds: float
    rss_kib: int | None
    server_cpu: float | None
    linger: float = 0.0
    uss_kib: int | None = None
    pss_kib: int | None = None
    command_uss_kib: int | None = None


@dataclass(frozen=True)
class Metric:
    """How a sample becomes a figure, and which ratio (msb-proxy / sshd) counts as good.

    ``target`` bounds the ratio from above when ``lower_is_better``, else from below; None
    means the issue set no target for it. ``limit`` is a target in the metric's own unit
    instead, for msb-proxy's every sample (its largest figure is held to it).
    """

    unit: str
    value: Callable[[Sample, int], float | None]  # (sample, payload bytes) -> figure, if known
    lower_is_better: bool
    target: float | None
    decimals: int = 0
    limit: float | None = None


def _milliseconds(sample: Sample, _size: int) -> float:
    return sample.seconds * 1000


def _megabytes_per_second(sample: Sample, size: int) -> float:
    return size / sample.seconds / 1e6


def _rss_mib(sample: Sample, _size: int) -> float | None:
    return None if sample.rss_kib is None else sample.rss_kib / 1024


def _cpu_milliseconds(sample: Sample, _size: int) -> float | None:
    return None if sample.server_cpu is None else sample.server_cpu * 1000


def _kib_as_mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def _uss_mib(sample: Sample, _size: int) -> float | None:
    return _kib_as_mib(sample.uss_kib)


def _pss_mib(sample: Sample, _size: int) -> float | None:
    return _kib_as_mib(sample.pss_kib)


def _connection_uss_mib(sample: Sample, _size: int) -> float | None:
    if sample.uss_kib is None or sample.command_uss_kib is None:
        return None
    return (sample.uss_kib + sample.command_uss_kib) / 1024


def _seconds(sample: Sample, _size: int) -> float:
    return sample.seconds


def _milliseconds_per_fetch(sample: Sample, _size: int) -> float:
    return sample.seconds * 1000 / FETCHES


# Targets are the issue's: start-up no slower than sshd, throughput within 10% of it.
LATENCY = Metric("ms", _milliseconds, lower_is_better=True, target=1.0)
THROUGHPUT = Metric("MB/s", _megabytes_per_second, lower_is_better=False, target=0.9)
# Issue 3: a tree of small files may take at most 10% longer than with sshd.
TREE_TIME = Metric("s", _seconds, lower_is_better=True, target=1.1, decimals=2)
# Issue 5: a tunnel moves at least 80% of sshd's throughput and opens within 1.5x its time.
TUNNEL_THROUGHPUT = Metric("MB/s", _megabytes_per_second, lower_is_better=False, target=0.8)
TUNNEL_OPEN = Metric("ms per fetch", _milliseconds_per_fetch, lower_is_better=True, target=1.5,
                     decimals=1)
PEAK_RSS = Metric("MiB", _rss_mib, lower_is_better=True, target=None, decimals=1)
# Issue 12: under 15 MiB of its own per connection (what it shares with the warm server is free).
UNIQUE_MEMORY = Metric("MiB", _uss_mib, lower_is_better=True, target=None, decimals=1,
                       limit=15.0)
PROPORTIONAL_MEMORY = Metric("MiB", _pss_mib, lower_is_better=True, target=None, decimals=1)
CONNECTION_MEMORY = Metric("MiB", _connection_uss_mib, lower_is_better=True, target=None,
                           decimals=1)
# CPU time barely moves when other work shares the machine, unlike wall time: the rows to
# trust on a busy host.
SERVER_CPU = Metric("ms CPU", _cpu_milliseconds, lower_is_better=True, target=None)

# Issue 15: every sandbox recorded, or recorded and audited. Recording touches terminal
# sessions only, so the 1 GiB rows without a terminal may lose at most 5% to it. The audit log
# writes per request, but reads every SFTP packet: an audited SFTP channel is off the fast path.
RECORDED = "[defaults]\nrecord = true\n"
OBSERVED = "[defaults]\nrecord = true\naudit = true\n"
_VARIANTS = (("-recorded", RECORDED, ", `record = true`", (THROUGHPUT, SERVER_CPU)),
             ("-observed", OBSERVED, ", `record = true` and `audit = true`",
              (THROUGHPUT, SERVER_CPU)))


@dataclass(frozen=True)
class Row:
    """One line of the table: ``metric`` over the samples of ``workloads`` (pooled).

    ``label`` may use ``{size}``, the payload size in words (``1 GiB``), ``{size_arg}``,
    the same as ``head -c`` takes it (``1G``), and ``{files}``, the number of files in the
    tree (``10,000``).
    """

    key: str
    label: str
    workloads: tuple[str, ...]
    metric: Metric


_FRESH_GUEST = "{ssh} 'rm -rf {guest_dest} && mkdir -p {guest_dest}'"
_CLEAN_GUEST = "{ssh} 'rm -rf {guest_dest}'"
_FRESH_HOST = "rm -rf {dest} && mkdir -p {dest}"
_CLEAN_HOST = "rm -rf {dest}"
_GUEST_DIGEST = {"file": "{ssh} '{guest_peer} digest <{guest_dest}/file'",
                 "tree": "{ssh} 'cd {guest_dest}/tree && {tree_digest}'"}
_HOST_DIGEST = {"file": "{peer} digest <{dest}/file", "tree": "cd {dest}/tree && {tree_digest}"}
_RSYNC = "rsync -e 'ssh -F {config}'"
_FORWARD = ("ssh -F {config} -N -o ExitOnForwardFailure=yes "
            "-L 127.0.0.1:{port}:127.0.0.1:{guest_port} {host}")
_STOP_LISTENER = "{ssh} 'kill $(cat {guest_dest}/peer.pid) && rm -rf {guest_dest}'"
_CURL = "curl -sf --noproxy '*' http://127.0.0.1:{port}/page"


def _listen(what: str) -> str:
    """Set-up that starts ``peer.py WHAT`` as a guest listener in a fresh ``{guest_dest}``."""
    return ("{ssh} 'rm -rf {guest_dest} && mkdir -p {guest_dest} && "
            "{guest_peer} " + what + " {guest_dest}/peer.pid'")


def _upload(key: str, command: str, data: str = "file") -> Workload:
    """Data set ``data`` from the host to a fresh ``{guest_dest}``, checked in the guest."""
    runs = TREE_RUNS if data == "tree" else TRANSFER_RUNS
    return Workload(key, command, heavy=True, warm=False, max_runs=runs, data=data,
                    setup=_FRESH_GUEST, check=_GUEST_DIGEST[data], teardown=_CLEAN_GUEST)


def _download(key: str, command: str, data: str = "file") -> Workload:
    """Data set ``data`` from the guest to a fresh ``{dest}`` on the host, checked there."""
    runs = TREE_RUNS if data == "tree" else TRANSFER_RUNS
    return Workload(key, command, heavy=True, warm=False, max_runs=runs, data=data,
                    setup=_FRESH_HOST, check=_HOST_DIGEST[data], teardown=_CLEAN_HOST)


WORKLOADS: tuple[Workload, ...] = (
    Workload("true", "{ssh} true"),
    Workload("true-cold", "{ssh} true", warm=False),
    # Served in the measured process, so that the RSS and CPU rows are msb-proxy's own; the
    # transfers below too.
    Workload("upload", "head -c {size} /dev/zero | {ssh} 'cat >/dev/null'", heavy=True,
             warm=False),
    Workload("download", "{ssh} 'head -c {size} /dev/zero' | cat >/dev/null", heavy=True,
             warm=False),
    # Issue 3: every destination is new (removed before each run); scp uses SFTP, its default.
    _upload("scp-up", "scp -q -F {config} {data}/file {host}:{guest_dest}/file"),
    _download("scp-down", "scp -q -F {config} {host}:{guest_data}/file {dest}/file"),
    _upload("sftp-up",
            "echo 'put {data}/file {guest_dest}/file' | sftp -q -F {config} -b - {host} "
            ">/dev/null"),
    _download("sftp-down",
              "echo 'get {guest_data}/file {dest}/file' | sftp -q -F {config} -b - {host} "
              ">/dev/null"),
    _upload("rsync-up", _RSYNC + " {data}/file {host}:{guest_dest}/file"),
    _download("rsync-down", _RSYNC + " {host}:{guest_data}/file {dest}/file"),
    _upload("rsync-tree-up", _RSYNC + " -a {data}/tree {host}:{guest_dest}/",
            data="tree"),
    _download("rsync-tree-down", _RSYNC + " -a {host}:{guest_data}/tree {dest}/",
              data="tree"),
    _upload("scp-tree-up", "scp -q -r -F {config} {data}/tree {host}:{guest_dest}/", data="tree"),
    _download("scp-tree-down", "scp -q -r -F {config} {host}:{guest_data}/tree {dest}/",
              data="tree"),
    # Issue 5: a guest listener and an `ssh -N -L` per run, both started before the clock and
    # ended after it; the host end exits only once every byte has arrived at the other end.
    Workload("forward-up", "{peer} push {port} {data}/file {size}", heavy=True, warm=False,
             max_runs=TRANSFER_RUNS, data="file", setup=_listen("sink {guest_port}"),
             background=_FORWARD, check="{peer} push --digest {port} {data}/file {size}",
             teardown=_STOP_LISTENER),
    Workload("forward-down", "{peer} pull {port} {size}", heavy=True, warm=False,
             max_runs=TRANSFER_RUNS, data="file",
             setup=_listen("source {guest_port} {guest_data}/file"), background=_FORWARD,
             check="{peer} pull --digest {port} {size}", teardown=_STOP_LISTENER),
    # One tunnel for the run, as an IDE holds one; each curl opens a channel through it.
    Workload("forward-open",
             "for i in $(seq {fetches}); do " + _CURL + " -o /dev/null || exit 1; done",
             data="page", setup=_listen("page {guest_port} {guest_data}/www"),
             background=_FORWARD, check=_CURL + " | sha256sum", teardown=_STOP_LISTENER),
    # Issue 12: sessions that print a line a second, as a build or a log tail does, all at once.
    Workload("memory", "{ssh} 'echo up; while sleep 1; do echo .; done'", max_runs=1,
             connections=CONNECTIONS),
)
# Issue 15: the 1 GiB rows without a terminal again, recorded, and recorded and audited.
_OBSERVED_KEYS = ("upload", "download", "scp-up", "scp-down", "sftp-up", "sftp-down")
WORKLOADS += tuple(replace(work, key=work.key + suffix, template=template)
                   for suffix, template, _, _ in _VARIANTS
                   for work in WORKLOADS if work.key in _OBSERVED_KEYS)

_TRANSFERS = (
    ("scp-up", "`scp` upload of {size} (SFTP mode), new file", THROUGHPUT),
    ("scp-down", "`scp` download of {size} (SFTP mode), new file", THROUGHPUT),
    ("sftp-up", "`sftp -b` put of {size}, new file", THROUGHPUT),
    ("sftp-down", "`sftp -b` get of {size}, new file", THROUGHPUT),
    ("rsync-up", "`rsync` upload of {size}, new file", THROUGHPUT),
    ("rsync-down", "`rsync` download of {size}, new file", THROUGHPUT),
    ("rsync-tree-up", "`rsync -a` upload of {files} small files", TREE_TIME),
    ("rsync-tree-down", "`rsync -a` download of {files} small files", TREE_TIME),
    ("scp-tree-up", "`scp -r` upload of {files} small files", TREE_TIME),
    ("scp-tree-down", "`scp -r` download of {files} small files", TREE_TIME),
    ("forward-up", "{size} through `ssh -L`, host to guest", TUNNEL_THROUGHPUT),
    ("forward-down", "{size} through `ssh -L`, guest to host", TUNNEL_THROUGHPUT),
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
    *(Row(key, label, (key,), metric) for key, label, metric in _TRANSFERS),
    Row("forward-open", f"time to open a tunnel: one `curl` of a 1 KiB page through an "
        f"established `ssh -L` ({FETCHES} per run)", ("forward-open",), TUNNEL_OPEN),
    Row("rss", "proxy peak RSS (upload + download runs)", ("upload", "download"), PEAK_RSS),
    Row("memory", f"unique memory (USS) per connection of the processes serving it, "
        f"{CONNECTIONS} at once (msb-proxy: the warm server's child; sshd: its sshd)",
        ("memory",), UNIQUE_MEMORY),
    Row("memory-pss", f"PSS per connection of the same processes, {CONNECTIONS} at once",
        ("memory",), PROPORTIONAL_MEMORY),
    Row("memory-all", f"unique memory per connection with its ProxyCommand process "
        f"(msb-proxy stdio; nsenter), {CONNECTIONS} at once", ("memory",), CONNECTION_MEMORY),
    Row("cpu-true", "server CPU per `ssh host true` (no warm server)", ("true-cold",),
        SERVER_CPU),
    Row("cpu-upload", "server CPU per upload of {size}", ("upload",), SERVER_CPU),
    Row("cpu-download", "server CPU per download of {size}", ("download",), SERVER_CPU),
    *(Row(f"cpu-{key}", f"server CPU per {label}", (key,), SERVER_CPU)
      for key, label, _ in _TRANSFERS),
)
ROWS += tuple(
    replace(row, key=row.key + suffix, label=row.label + words,
            workloads=tuple(key + suffix for key in row.workloads))
    for suffix, _, words, metrics in _VARIANTS
    for row in ROWS if row.workloads[0] in _OBSERVED_KEYS and row.metric in metrics)

