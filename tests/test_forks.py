"""Forks through the real ProxyCommand: ``ssh msb-api.fork`` (throwaway), ``ssh
msb-api.fork-NAME`` (kept until ``msb-proxy rm``), and ``ephemeral = true`` templates.

A fork starts as a copy of its parent's files, taken while the parent's processes are frozen,
and from then on the two are apart both ways; the parent's processes run on. A throwaway fork
goes once its last connection ends, also when its client was killed, and a fork whose msb-proxy
was killed is swept by the next ``msb-proxy ls``. Every fork presents its parent's pinned host
key under its own alias, so strict host key checking never warns. The local backend is
inspected directly (its sandbox directories, cgroups), so these tests run on it only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import TEST_BACKEND, Env, Run, write_ssh_config
from installations import (
    configure,
    gone,
    init_pid,
    loud,
    make_installation,
    proxy_of,
    remove_installation,
    wait_until,
)
from tunnel_helpers import host_port, tunnel

pytestmark = pytest.mark.skipif(
    TEST_BACKEND != "local", reason="inspects the local backend's sandbox directories")

SSH_GAVE_UP = 255
GONE_WITHIN_S = 60  # polling bound for a removal that happens in the background
FORK_NAME = re.compile(r"api\.fork\.[0-9a-f]{8}")
FREEZER_GROUPS = (Path("/sys/fs/cgroup/unified/msb-proxy"), Path("/sys/fs/cgroup/msb-proxy"),
                  Path("/sys/fs/cgroup/freezer/msb-proxy"))


@pytest.fixture
def private(msb: Env) -> Iterator[Env]:
    """An installation of this test's own with a running sandbox ``api``; every sandbox it
    holds at the end (forks included) is removed."""
    env = make_installation(msb)
    write_ssh_config(env, warm=False, path=env.cold_config)
    made = _ssh(env, "msb-api", "echo parent > /root/from-parent")
    assert (made.returncode, made.out, made.err) == (0, "", "")
    env.sandboxes.append("api")
    yield env
    for name in _sandboxes(env):
        if name not in env.sandboxes:
            env.sandboxes.append(name)
    remove_installation(env)


def _ssh(env: Env, host: str, *command: str, options: Sequence[str] = (),
         config: Path | None = None, timeout: float = 120) -> Run:
    return env.run(["ssh", "-F", str(config or env.config), *options, host, *command],
                   timeout=timeout)


def _popen(env: Env, host: str, command: str, config: Path | None = None,
           ) -> subprocess.Popen[bytes]:
    """``ssh HOST COMMAND`` left running, its stdin and stdout pipes in our hands."""
    return subprocess.Popen(["ssh", "-F", str(config or env.config), host, command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _sandboxes(env: Env) -> list[str]:
    """The names of the installation's local sandboxes, sorted."""
    root = env.home / "sandboxes"
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir() if (path / "sandbox.json").exists())


def _throwaway_forks(env: Env) -> list[str]:
    return [name for name in _sandboxes(env) if FORK_NAME.fullmatch(name)]


def _no_throwaway_forks(env: Env) -> bool:
    """True once no throwaway fork of ``api`` is left, not even a directory of one."""
    root = env.home / "sandboxes"
    return not [path for path in root.iterdir() if path.name.startswith("api.fork.")]


def _traces(env: Env, name: str) -> list[str]:
    """Whatever of sandbox ``name`` is left in the installation: its directory, lock files,
    markers (a removed throwaway fork leaves none)."""
    return sorted(str(path.relative_to(env.home)) for path in env.home.rglob(f"{name}*"))


def _group(env: Env) -> str:
    """The name of the cgroup that freezes ``api`` of ``env``'s installation: the sandbox and
    the installation's home, so that two installations' ``api`` never share one."""
    home = hashlib.sha256(os.path.realpath(env.home).encode()).hexdigest()[:8]
    return f"api@{home}"


def _strict(env: Env) -> list[str]:
    return ["-o", "StrictHostKeyChecking=yes", "-o",
            f"UserKnownHostsFile={env.home / 'known_hosts'}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=INFO"]


# ---- what a fork holds


def test_fork_starts_as_the_parents_files_and_then_neither_sees_the_others_writes(
    private: Env,
) -> None:
    # Overlayfs keeps deletions and replaced directories of the base as whiteouts and opaque
    # directories (special files and trusted.* attributes): the fork must keep them too.
    setup = _ssh(private, "msb-api", "rm /etc/motd && rm -rf /etc/apt && mkdir /etc/apt && "
                 "echo only > /etc/apt/only && echo linked > /root/a && ln /root/a /root/b && "
                 "truncate -s 1G /root/sparse")
    assert (setup.returncode, setup.err) == (0, "")

    fork = _popen(private, "msb-api.fork",
                  "cat /root/from-parent; test -e /etc/motd || echo motd-gone; ls /etc/apt; "
                  "stat -c %h /root/b; du -k /root/sparse | cut -f1; "
                  "echo fork > /root/from-fork; echo ready; read go; "
                  "cat /root/after-fork 2>/dev/null || echo after-fork-absent")
    assert fork.stdout is not None and fork.stdin is not None
    seen = [fork.stdout.readline() for _ in range(6)]
    assert seen == [b"parent\n", b"motd-gone\n", b"only\n", b"2\n", b"0\n", b"ready\n"]

    parent = _ssh(private, "msb-api",
                  "test -e /root/from-fork || echo from-fork-absent; echo p > /root/after-fork")
    assert (parent.returncode, parent.out, parent.err) == (0, "from-fork-absent\n", "")
    out, err = fork.communicate(b"go\n", timeout=60)
    assert (fork.returncode, out, err) == (0, b"after-fork-absent\n", b"")


def test_parents_processes_run_on_through_a_fork_and_are_not_left_frozen(private: Env) -> None:
    started = _ssh(private, "msb-api",
                   "nohup sleep 1000 >/dev/null 2>&1 & echo $! > /root/sleep.pid; "
                   "nohup sh -c 'while :; do echo t >> /root/ticks; sleep 0.05; done' "
                   ">/dev/null 2>&1 &")
    assert (started.returncode, started.err) == (0, "")
    pid = init_pid(private, "api")

    fork = _ssh(private, "msb-api.fork", "test -e /root/sleep.pid && echo copied")
    assert (fork.returncode, fork.out, fork.err) == (0, "copied\n", "")

    def ticks() -> int:
        run = _ssh(private, "msb-api", "wc -l < /root/ticks")
        assert run.returncode == 0, run.err
        return int(run.out)

    before = ticks()
    assert wait_until(lambda: ticks() > before + 2, 30) is not None, "the parent stays frozen"
    alive = _ssh(private, "msb-api",
                 "p=$(cat /root/sleep.pid); kill -0 $p && grep ^State: /proc/$p/status")
    assert (alive.returncode, alive.out) == (0, "State:\tS (sleeping)\n")
    assert init_pid(private, "api") == pid
    # Thawed and put back where they were: no cgroup of msb-proxy's holds them any more.
    assert not any((group / _group(private)).exists() for group in FREEZER_GROUPS)


# ---- throwaway forks go with their last connection


def test_throwaway_fork_is_removed_once_its_last_connection_ends(private: Env) -> None:
    first = _popen(private, "msb-api.fork", "echo up; read line; echo $line")
    assert first.stdout is not None and first.stdin is not None
    assert first.stdout.readline() == b"up\n"
    [name] = _throwaway_forks(private)

    # A second connection to the same fork, by its own name, while the first is open.
    second = _popen(private, f"msb-{name}", "echo second; read line; echo $line")
    assert second.stdout is not None
    assert second.stdout.readline() == b"second\n"
    out, err = first.communicate(b"bye\n", timeout=60)
    assert (first.returncode, out, err) == (0, b"bye\n", b"")
    still = _ssh(private, f"msb-{name}", "cat /root/from-parent")
    assert (still.returncode, still.out) == (0, "parent\n"), "removed while a connection was open"

    out, err = second.communicate(b"done\n", timeout=60)
    assert (second.returncode, out, err) == (0, b"done\n", b"")
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None
    assert _sandboxes(private) == ["api"]
    assert _traces(private, name) == []


def test_throwaway_fork_is_removed_after_its_client_is_killed(private: Env) -> None:
    client = _popen(private, "msb-api.fork", "echo up; sleep 1000")
    assert client.stdout is not None
    assert client.stdout.readline() == b"up\n"
    [name] = _throwaway_forks(private)
    fork_init = init_pid(private, name)

    client.send_signal(signal.SIGKILL)
    client.wait(30)
    # The watcher removes the sandbox, then its lock files: wait for both (CI once looked
    # between the two).
    assert wait_until(lambda: _no_throwaway_forks(private) and not _traces(private, name),
                      GONE_WITHIN_S) is not None, _traces(private, name)
    assert gone(fork_init), "the fork's jail (and its sleep) outlived the fork"
    assert _sandboxes(private) == ["api"]


def test_fork_whose_msb_proxy_was_killed_is_swept_by_ls(private: Env) -> None:
    client = _popen(private, "msb-api.fork", "echo up; sleep 1000", config=private.cold_config)
    assert client.stdout is not None
    assert client.stdout.readline() == b"up\n"
    [name] = _throwaway_forks(private)
    fork_init = init_pid(private, name)
    os.kill(proxy_of(client.pid), signal.SIGKILL)
    client.wait(30)
    assert not gone(fork_init)  # nothing was left to remove it

    listed = private.msb_proxy("ls")
    assert listed.returncode == 0, listed.err
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None
    assert gone(fork_init)
    assert _sandboxes(private) == ["api"]


# ---- kept forks


def test_kept_fork_survives_its_connections_carries_scp_and_goes_with_rm(private: Env) -> None:
    payload = private.root / "payload"
    payload.write_bytes(os.urandom(1 << 20))
    put = private.run(["scp", "-q", "-F", str(private.config), str(payload),
                       "msb-api.fork-keep:/root/payload"])
    assert (put.returncode, put.err) == (0, "")
    write = _ssh(private, "msb-api.fork-keep", "cat /root/from-parent; echo kept > /root/kept")
    assert (write.returncode, write.out, write.err) == (0, "parent\n", "")
    assert _sandboxes(private) == ["api", "api.fork-keep"]

    again = _ssh(private, "msb-api.fork-keep", "cat /root/kept")
    assert (again.returncode, again.out, again.err) == (0, "kept\n", "")
    back = private.root / "back"
    get = private.run(["scp", "-q", "-F", str(private.config), "msb-api.fork-keep:/root/payload",
                       str(back)])
    assert (get.returncode, get.err) == (0, "")
    assert back.read_bytes() == payload.read_bytes()
    parent = _ssh(private, "msb-api", "test -e /root/kept || test -e /root/payload || echo clean")
    assert (parent.returncode, parent.out) == (0, "clean\n")

    removed = private.msb_proxy("rm", "api.fork-keep")
    assert (removed.returncode, removed.out, removed.err) == (0, "", "")
    assert _sandboxes(private) == ["api"]
    # Its host key stays, as every removed sandbox's does: made again, it is the same host.
    assert _traces(private, "api.fork-keep") == ["host_keys/api.fork-keep"]
    fresh = _ssh(private, "msb-api.fork-keep", "test -e /root/kept || echo forked-anew")
    assert (fresh.returncode, fresh.out) == (0, "forked-anew\n")


def test_forks_record_and_audit_as_their_parents_template_and_rm_leaves_the_record(
    private: Env,
) -> None:
    configure(private, '[sandbox."api"]\nrecord = true\naudit = true\n')
    shown = _ssh(private, "msb-api.fork", "-tt", "echo in-the-fork")
    assert (shown.returncode, shown.err) == (0, "")
    assert "in-the-fork" in shown.out
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None
    logs = sorted(path.name for path in (private.home / "audit").glob("api.fork.*.jsonl"))
    assert len(logs) == 1 and FORK_NAME.fullmatch(logs[0].removesuffix(".jsonl")), logs
    fork = logs[0].removesuffix(".jsonl")
    logged = [json.loads(line) for line in (private.home / "audit" / logs[0]).read_text()
              .splitlines()]
    assert [event["event"] for event in logged] == ["connect", "exec", "exit", "disconnect"]
    assert {event["sandbox"] for event in logged} == {fork}
    casts = list((private.home / "recordings" / fork).glob("*.cast"))
    assert len(casts) == 1, casts
    assert "in-the-fork" in casts[0].read_text()

    kept = _ssh(private, "msb-api.fork-k", "true")
    assert (kept.returncode, kept.err) == (0, "")
    removed = private.msb_proxy("rm", "api.fork-k")
    assert (removed.returncode, removed.err) == (0, "")
    assert _traces(private, "api.fork-k") == [
        "audit/api.fork-k.jsonl", "audit/api.fork-k.jsonl.lock", "host_keys/api.fork-k"]
    assert "exec" in (private.home / "audit" / "api.fork-k.jsonl").read_text()


def test_kept_fork_and_the_parent_of_an_ephemeral_template_are_kept(private: Env) -> None:
    configure(private, '[sandbox."api"]\nephemeral = true\n')
    # A sandbox that was there before its template was ephemeral is not its to remove.
    used = _ssh(private, "msb-api", "true")
    assert (used.returncode, used.err) == (0, "")
    assert not (private.home / "locks" / "api.ephemeral").exists()
    made = _ssh(private, "msb-api.fork-k", "echo kept > /root/kept")
    assert (made.returncode, made.err) == (0, "")
    throwaway = _ssh(private, "msb-api.fork", "true")
    assert throwaway.returncode == 0, throwaway.err
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None
    # The watcher the throwaway fork's end started has removed it: nothing else was marked.
    assert not list((private.home / "locks").glob("*.ephemeral"))
    again = _ssh(private, "msb-api.fork-k", "cat /root/kept")
    assert (again.returncode, again.out) == (0, "kept\n")
    assert _sandboxes(private) == ["api", "api.fork-k"]


def test_16_simultaneous_connections_to_a_kept_fork_fork_it_once(private: Env) -> None:
    clients = 16
    env = loud(private)
    start = threading.Barrier(clients)

    def connect(_: int) -> Run:
        start.wait()
        return _ssh(env, "msb-api.fork-herd", "readlink /proc/self/ns/pid", options=_strict(env))

    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(connect, range(clients)))

    assert [run.returncode for run in runs] == [0] * clients, [run.err for run in runs]
    assert len({run.out for run in runs}) == 1
    lines = sorted(line for run in runs for line in run.err.splitlines())
    assert len(lines) == 2, lines
    assert lines[0] == "msb-proxy: forking sandbox 'api' as 'api.fork-herd' ..."
    assert re.fullmatch(r"msb-proxy: sandbox 'api\.fork-herd' ready in \d+\.\d s", lines[1])
    assert _sandboxes(private) == ["api", "api.fork-herd"]


def test_simultaneous_throwaway_forks_of_one_parent_are_each_their_own_and_all_go(
    private: Env,
) -> None:
    clients = 6
    start = threading.Barrier(clients)

    def connect(number: int) -> Run:
        start.wait()
        return _ssh(private, "msb-api.fork", f"cat /root/from-parent; echo {number} > /root/me; "
                    "sleep 1; cat /root/me; readlink /proc/self/ns/mnt")

    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(connect, range(clients)))

    assert [run.returncode for run in runs] == [0] * clients, [run.err for run in runs]
    assert [run.out.splitlines()[:2] for run in runs] == [
        ["parent", str(number)] for number in range(clients)]
    assert len({run.out.splitlines()[2] for run in runs}) == clients
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None
    assert _sandboxes(private) == ["api"]
    parent = _ssh(private, "msb-api", "test -e /root/me || echo untouched")
    assert (parent.returncode, parent.out) == (0, "untouched\n")


# ---- host keys


def test_forks_present_the_parents_pinned_key_with_strict_checking_and_no_warning(
    private: Env,
) -> None:
    for host in ("msb-api", "msb-api.fork", "msb-api.fork-k", "msb-api.fork"):
        run = _ssh(private, host, "echo in", options=_strict(private))
        assert (run.returncode, run.out, run.err) == (0, "in\n", ""), host
    public = subprocess.run(["ssh-keygen", "-y", "-f", str(private.home / "host_keys" / "api")],
                            capture_output=True, text=True, check=True).stdout.split()
    key = f"{public[0]} {public[1]}"
    assert sorted((private.home / "known_hosts").read_text().splitlines()) == [
        f"msb-api {key}", f"msb-api.fork {key}", f"msb-api.fork-k {key}"]
    kept_key = private.home / "host_keys" / "api.fork-k"
    assert kept_key.read_bytes() == (private.home / "host_keys" / "api").read_bytes()
    assert kept_key.stat().st_mode & 0o777 == 0o600


# ---- failures


def test_fork_of_a_missing_sandbox_fails_in_one_line_and_leaves_nothing(private: Env) -> None:
    # With progress shown too: no "forking sandbox 'nope' ..." before the refusal.
    for config in (private.config, loud(private).config):
        for host, parent in (("msb-nope.fork", "nope"), ("msb-nope.fork-k", "nope")):
            run = _ssh(private, host, "true", options=["-o", "LogLevel=QUIET"], config=config)
            assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
            assert run.err == f"msb-proxy: there is no sandbox '{parent}' to fork\n"
    assert _sandboxes(private) == ["api"]
    assert wait_until(lambda: not list((private.home / "locks").glob("*.ephemeral")),
                      GONE_WITHIN_S) is not None


# ---- ephemeral templates


def test_ephemeral_template_removes_what_it_created_after_the_last_connection(
    private: Env,
) -> None:
    configure(private, '[sandbox."eph-*"]\nephemeral = true\n')
    first = _popen(private, "msb-eph-1", "echo up; read line; echo $line")
    assert first.stdout is not None
    assert first.stdout.readline() == b"up\n"
    second = _ssh(private, "msb-eph-1", "echo second > /root/second")
    assert (second.returncode, second.err) == (0, "")
    assert "eph-1" in _sandboxes(private), "removed while a connection was open"

    out, err = first.communicate(b"bye\n", timeout=60)
    assert (first.returncode, out, err) == (0, b"bye\n", b"")
    assert wait_until(lambda: "eph-1" not in _sandboxes(private), GONE_WITHIN_S) is not None
    assert not (private.home / "sandboxes" / "eph-1").exists()
    # The parent, made before any template was ephemeral, is no ephemeral sandbox's.
    assert _sandboxes(private) == ["api"]


def test_ephemeral_sandbox_whose_msb_proxy_was_killed_is_swept_by_ls(private: Env) -> None:
    configure(private, '[sandbox."eph-*"]\nephemeral = true\n')
    client = _popen(private, "msb-eph-3", "echo up; sleep 1000", config=private.cold_config)
    assert client.stdout is not None
    assert client.stdout.readline() == b"up\n"
    os.kill(proxy_of(client.pid), signal.SIGKILL)
    client.wait(30)
    assert "eph-3" in _sandboxes(private)

    listed = private.msb_proxy("ls")
    assert listed.returncode == 0, listed.err
    # Gone from the list as soon as its settings file goes; the directory follows.
    assert wait_until(lambda: "eph-3" not in _sandboxes(private)
                      and not (private.home / "sandboxes" / "eph-3").exists(),
                      GONE_WITHIN_S) is not None


def test_ephemeral_template_with_stop_after_idle_removes_only_after_the_idle_time(
    private: Env,
) -> None:
    configure(private, '[sandbox."eph-*"]\nephemeral = true\nstop_after_idle = "10s"\n')
    run = _ssh(private, "msb-eph-2", "echo made > /root/made")
    assert (run.returncode, run.err) == (0, "")
    again = _ssh(private, "msb-eph-2", "cat /root/made")
    assert (again.returncode, again.out) == (0, "made\n"), "removed before its idle time"
    assert wait_until(lambda: "eph-2" not in _sandboxes(private), GONE_WITHIN_S) is not None


def test_backend_that_cannot_fork_refuses_in_one_line(private: Env) -> None:
    fake = replace(private, backend="fake", config=private.root / "ssh_config.fake")
    write_ssh_config(fake, path=fake.config)
    run = _ssh(fake, "msb-api.fork", "true", options=["-o", "LogLevel=QUIET"])
    assert (run.returncode, run.out) == (SSH_GAVE_UP, "")
    assert run.err == ("msb-proxy: the fake backend cannot fork sandboxes (msb-api.fork); use "
                       "the local or microsandbox backend for forks\n")
    assert not (private.home / "fake").exists()


# ---- large layers


def _fill(env: Env, mib: int) -> None:
    run = _ssh(env, "msb-api", f"head -c {mib}M /dev/zero > /root/big && echo written")
    assert (run.returncode, run.out, run.err) == (0, "written\n", "")


def test_large_layer_shows_progress_and_arrives_whole(private: Env) -> None:
    _fill(private, 256)
    run = _ssh(loud(private), "msb-api.fork", "stat -c %s /root/big; cmp /root/big /dev/zero "
               "2>&1 | grep -c differ")
    assert (run.returncode, run.out) == (1, "268435456\n0\n")  # grep -c: 0 lines, status 1
    lines = run.err.splitlines()
    assert re.fullmatch(r"msb-proxy: forking sandbox 'api' as 'api\.fork\.[0-9a-f]{8}' \.\.\.",
                        lines[0]), lines
    percents = [int(match.group(1)) for line in lines[1:-1] if (match := re.fullmatch(
        r"msb-proxy: copying the writable layer of sandbox 'api': (\d+)%", line))]
    assert len(percents) == len(lines) - 2, lines
    assert percents == sorted(percents) and percents[-1] == 100, lines
    assert re.fullmatch(r"msb-proxy: sandbox 'api\.fork\.[0-9a-f]{8}' ready in \d+\.\d s",
                        lines[-1]), lines


def _freezer_events(env: Env) -> Path | None:
    for group in FREEZER_GROUPS[:2]:
        if (group / _group(env) / "cgroup.events").exists():
            return group / _group(env) / "cgroup.events"
    return None


def _frozen(env: Env) -> bool:
    events = _freezer_events(env)
    try:
        return events is not None and "frozen 1" in events.read_text().splitlines()
    except OSError:
        return False


def test_msb_proxy_killed_mid_copy_leaves_the_parent_running_and_no_fork(private: Env) -> None:
    _fill(private, 2048)
    ticking = _ssh(private, "msb-api", "nohup sh -c 'while :; do echo t >> /root/ticks; "
                   "sleep 0.05; done' >/dev/null 2>&1 &")
    assert ticking.returncode == 0, ticking.err
    client = _popen(private, "msb-api.fork", "echo up", config=private.cold_config)
    proxy = proxy_of(client.pid)
    assert wait_until(lambda: _frozen(private), 60, step=0.005) is not None, (
        "the parent was never frozen")
    os.kill(proxy, signal.SIGKILL)
    client.wait(30)

    # Thawed by the watchdog, not by anything that talks to the parent.
    assert wait_until(lambda: not _frozen(private), 30) is not None, "the parent was left frozen"
    count = _ssh(private, "msb-api", "wc -l < /root/ticks")
    assert count.returncode == 0, count.err
    again = _ssh(private, "msb-api", "wc -l < /root/ticks")
    assert int(again.out) > int(count.out)

    listed = private.msb_proxy("ls")
    assert listed.returncode == 0, listed.err
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None
    assert _sandboxes(private) == ["api"]

    # The next fork takes the processes the killed one left in its cgroup back out of it.
    next_fork = _ssh(private, "msb-api.fork", "cat /root/from-parent")
    assert (next_fork.returncode, next_fork.out) == (0, "parent\n")
    assert not any((group / _group(private)).exists() for group in FREEZER_GROUPS)


def test_stopped_parent_is_forked_as_it_is_and_stays_stopped(private: Env) -> None:
    stop = private.msb_proxy("stop", "api")
    assert (stop.returncode, stop.err) == (0, "")
    got = private.run(["sftp", "-q", "-F", str(private.config), "-b", "-", "msb-api.fork"],
                      input=b"get /root/from-parent " + str(private.root / "got").encode() + b"\n")
    assert (got.returncode, got.err) == (0, "")
    assert (private.root / "got").read_text() == "parent\n"
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None
    listed = private.msb_proxy("ls", "--json", "--backend", "local")
    assert listed.returncode == 0, listed.err
    assert [(row["name"], row["state"]) for row in json.loads(listed.out)] == [("api", "stopped")]


GUEST_PORT = 47201
_GREETER = (f"import socket; s = socket.create_server(('127.0.0.1', {GUEST_PORT})); "
            "open('/tmp/ready', 'w').close()\n"
            "while True:\n c, _ = s.accept(); c.sendall(b'hello from the fork\\n'); c.close()")


def _fetch(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        received = b""
        while chunk := conn.recv(4096):
            received += chunk
        return received


def test_tunnel_through_a_fork_reaches_the_forks_own_network(private: Env) -> None:
    started = _ssh(private, "msb-api.fork-net",
                   f"nohup python3 -c \"{_GREETER}\" >/dev/null 2>&1 & "
                   "while ! test -e /tmp/ready; do sleep 0.05; done; echo listening")
    assert (started.returncode, started.out, started.err) == (0, "listening\n", "")
    port = host_port()
    with tunnel(private, "api.fork-net", "-L", f"{port}:127.0.0.1:{GUEST_PORT}", ready=port):
        assert _fetch(port) == b"hello from the fork\n"
    # The parent has a network namespace of its own, where nothing listens on that port.
    with tunnel(private, "api", "-L", f"{port}:127.0.0.1:{GUEST_PORT}", ready=port):
        assert _fetch(port) == b""


def test_without_a_usable_freezer_the_fork_says_so_and_copies_the_running_parent(
    private: Env,
) -> None:
    config = private.root / "ssh_config.cold-loud"
    write_ssh_config(private, warm=False, quiet=False, path=config)
    # In a mount namespace of its own, a tmpfs hides every cgroup file system from the
    # ProxyCommand (and only from it): the hierarchies are still listed, but not usable.
    script = ("mount -t tmpfs none /sys/fs/cgroup && exec ssh -F \"$1\" -o LogLevel=QUIET "
              "msb-api.fork 'cat /root/from-parent'")
    run = private.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                       "sh", str(config)], timeout=120)
    assert (run.returncode, run.out) == (0, "parent\n")
    lines = run.err.splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(r"msb-proxy: forking sandbox 'api' as 'api\.fork\.[0-9a-f]{8}' \.\.\.",
                        lines[0]), lines
    assert re.fullmatch(r"msb-proxy: the cgroup /sys/fs/cgroup/\S+/msb-proxy/"
                        + re.escape(_group(private)) + " has no "
                        r"(cgroup\.freeze|freezer\.state): copying sandbox 'api' while it runs",
                        lines[1]), lines
    assert wait_until(lambda: _no_throwaway_forks(private), GONE_WITHIN_S) is not None


def test_cgroup_v1_freezer_holds_the_parent_where_cgroup_v2_is_hidden(private: Env) -> None:
    v1 = Path("/sys/fs/cgroup/freezer")
    if not (v1 / "freezer.state").exists() and not (v1 / "tasks").exists():
        pytest.skip("this host mounts no cgroup v1 freezer")
    _fill(private, 1024)
    config = private.root / "ssh_config.cold-loud"
    write_ssh_config(private, warm=False, quiet=False, path=config)
    # cgroup2 hidden from the ProxyCommand alone (a mount namespace of its own): it falls
    # back to the v1 freezer, which every namespace shares, so we can watch it from here.
    script = ("for d in /sys/fs/cgroup/unified /sys/fs/cgroup; do "
              "if [ -e $d/cgroup.procs ]; then mount -t tmpfs none $d; fi; done; "
              "exec ssh -F \"$1\" -o LogLevel=QUIET msb-api.fork 'cat /root/from-parent'")
    client = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script, "sh", str(config)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    state = v1 / "msb-proxy" / _group(private) / "freezer.state"

    def frozen() -> bool:
        try:
            return state.read_text().strip() == "FROZEN"
        except OSError:
            return False

    seen = wait_until(lambda: frozen() or client.poll() is not None, 120, step=0.005)
    assert seen is not None and frozen(), "the v1 freezer never held the parent"
    out, err = client.communicate(timeout=120)
    assert (client.returncode, out) == (0, b"parent\n")
    assert b"while it runs" not in err, err
    assert not (v1 / "msb-proxy" / _group(private)).exists()
    alive = _ssh(private, "msb-api", "echo alive")
    assert (alive.returncode, alive.out) == (0, "alive\n")
