"""Isolation and security of the local backend's jail, probed from inside through real ssh.

A sandbox must look like a small machine of its own (PID, mount, UTS, IPC and network
namespaces; a private writable layer over a base rootfs that is never modified) and must not be
escapable through paths, symlinks, device nodes, mounts or ``/proc``, even for its root user.
Escape attempts that succeed only in harmless ways are written so that success changes nothing
on the host (they write back the value already there).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import Env

CAP_DAC_READ_SEARCH = 2
CAP_SYS_MODULE = 16
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_MKNOD = 27


@pytest.fixture(autouse=True)
def _local_only(msb: Env) -> None:
    if msb.backend != "local":
        pytest.skip("probes the local backend's jail")


@pytest.fixture
def second_sandbox(msb: Env) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    msb.host(name)
    return name


def _sh(msb: Env, sandbox: str, command: str, user: str | None = None) -> str:
    """Run ``command`` in ``sandbox``; it must succeed. Returns its stdout."""
    run = msb.ssh(sandbox, command, user=user)
    assert run.returncode == 0, f"{command!r} exited {run.returncode}: {run.err}"
    return run.out


def _init_pid(msb: Env, sandbox: str) -> int:
    return int((msb.home / "sandboxes" / sandbox / "init.pid").read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _connects(msb: Env, sandbox: str, port: int) -> bool:
    """Whether a TCP connection to the sandbox's own 127.0.0.1:``port`` is accepted."""
    run = msb.ssh(sandbox, f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected")
    return run.out == "connected\n"


def _pids_in_namespace(namespace: str) -> list[int]:
    """Host PIDs of the live processes whose PID namespace is ``namespace`` (``pid:[N]``).

    Zombies are left out: they are dead, and reaping an orphaned init is the host's PID 1's job.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                    continue
                with open(f"/proc/{entry}/stat") as handle:
                    state = handle.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in {"Z", "X"}:
                found.append(int(entry))
    return found


# ---- namespaces


def test_sandbox_sees_only_its_own_processes_under_the_jail_init(
    msb: Env, fresh_sandbox: str
) -> None:
    listing = _sh(msb, fresh_sandbox, "ps -e -o pid=,ppid=,comm=; :")
    rows = [line.split() for line in listing.splitlines()]
    assert rows[0] == ["1", "0", "msb-init"]
    assert {row[2] for row in rows} == {"msb-init", "bash", "ps"}
    assert len(rows) == 3


def test_hostname_is_the_sandbox_name(msb: Env, fresh_sandbox: str) -> None:
    assert _sh(msb, fresh_sandbox, "hostname; uname -n") == f"{fresh_sandbox}\n" * 2


def test_sandbox_namespaces_are_not_the_hosts(msb: Env, fresh_sandbox: str) -> None:
    kinds = ("pid", "mnt", "uts", "ipc", "net")
    inside = _sh(msb, fresh_sandbox,
                 " ".join(["readlink"] + [f"/proc/self/ns/{kind}" for kind in kinds]))
    ours = [os.readlink(f"/proc/self/ns/{kind}") for kind in kinds]
    for mine, theirs in zip(ours, inside.splitlines(), strict=True):
        assert mine != theirs


def test_loopback_server_in_one_sandbox_is_reachable_only_there(
    msb: Env, fresh_sandbox: str, second_sandbox: str
) -> None:
    port = _free_port()
    server = (f"nohup python3 -c 'import socket, time; s = socket.socket(); "
              f"s.bind((\"127.0.0.1\", {port})); s.listen(); time.sleep(600)' "
              ">/dev/null 2>&1 &")
    _sh(msb, fresh_sandbox, server)
    _sh(msb, fresh_sandbox,
        f"for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; "
        "sleep 0.1; done; exit 1")
    assert _connects(msb, fresh_sandbox, port)
    assert not _connects(msb, second_sandbox, port)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_hosts_loopback_server_is_not_reachable_from_the_sandbox(
    msb: Env, fresh_sandbox: str
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            pass  # the listener works from the host
        assert not _connects(msb, fresh_sandbox, port)


def test_sysv_ipc_objects_are_private_to_a_sandbox(
    msb: Env, fresh_sandbox: str, second_sandbox: str
) -> None:
    created = _sh(msb, fresh_sandbox, "ipcmk -Q >/dev/null && ipcs -q | grep -c '^0x'")
    assert created == "1\n"
    seen = msb.ssh(second_sandbox, "ipcs -q | grep -c '^0x'")
    assert seen.out == "0\n"


def test_shared_memory_directory_is_private_to_a_sandbox(
    msb: Env, fresh_sandbox: str, second_sandbox: str
) -> None:
    _sh(msb, fresh_sandbox, "echo secret > /dev/shm/segment")
    assert msb.ssh(second_sandbox, "ls -A /dev/shm").out == ""
    assert not Path("/dev/shm/segment").exists()


# ---- file systems


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``directory`` with its mode, size and mtime."""
    snapshot = {}
    for path in [directory, *directory.rglob("*")]:
        info = path.lstat()
        snapshot[str(path.relative_to(directory))] = (info.st_mode, info.st_size,
                                                      info.st_mtime_ns)
    return snapshot


def test_writes_stay_in_the_sandboxs_own_layer(
    msb: Env, fresh_sandbox: str, second_sandbox: str
) -> None:
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    etc = msb.rootfs / "etc"
    before = _snapshot(etc)
    _sh(msb, fresh_sandbox,
        f"echo mine > /etc/{marker}; echo changed >> /etc/debian_version; "
        "rm /etc/hostname; mkdir /etc/newdir; chmod 600 /etc/issue")
    assert _sh(msb, fresh_sandbox, f"cat /etc/{marker}") == "mine\n"

    other = msb.ssh(second_sandbox,
                    f"test -e /etc/{marker} || echo absent; tail -n 1 /etc/debian_version; "
                    "test -e /etc/hostname && echo present; stat -c %a /etc/issue")
    assert other.out == "absent\n" + (etc / "debian_version").read_text().splitlines()[-1] + \
        "\npresent\n644\n"
    assert not (etc / marker).exists()
    assert _snapshot(etc) == before


def test_tmp_is_world_writable_and_sticky(msb: Env, sandbox: str) -> None:
    assert _sh(msb, sandbox, "stat -c %a /tmp") == "1777\n"


def test_dev_has_the_usual_nodes(msb: Env, sandbox: str) -> None:
    found = _sh(msb, sandbox,
                "for n in null zero random urandom tty ptmx pts shm; do "
                "test -e /dev/$n && echo $n; done")
    assert found.split() == ["null", "zero", "random", "urandom", "tty", "ptmx", "pts", "shm"]
    assert _sh(msb, sandbox, "head -c 4 /dev/zero | od -An -tx1") == " 00 00 00 00\n"


def test_proc_sys_is_read_only_for_the_sandboxs_root(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox,
                  "cat /proc/sys/vm/swappiness > /proc/sys/vm/swappiness && echo wrote")
    assert run.returncode == 1
    assert run.out == ""
    assert "Read-only file system" in run.err
    options = _sh(msb, sandbox, "awk '$2 == \"/proc/sys\" {print $4}' /proc/mounts")
    assert options.split(",")[0] == "ro"


# ---- escape attempts, as the sandbox's root


def test_mounting_is_refused(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "mount -t tmpfs x /mnt")
    assert run.returncode != 0
    assert _sh(msb, sandbox, "awk '$2 == \"/mnt\"' /proc/mounts") == ""


def test_device_nodes_cannot_be_made(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "mknod /tmp/sda b 8 0")
    assert run.returncode == 1
    assert "Operation not permitted" in run.err
    assert msb.ssh(sandbox, "test -e /tmp/sda").returncode == 1


def test_the_inits_root_and_environment_are_out_of_reach(msb: Env, sandbox: str) -> None:
    for command in ("ls -A /proc/1/root/", "ls -A /proc/1/cwd/", "cat /proc/1/environ",
                    "head -c 1 /proc/1/mem", "cat /proc/1/root/etc/hostname"):
        run = msb.ssh(sandbox, command)
        assert run.returncode != 0, command
        assert run.out == "", command
        assert "Permission denied" in run.err, command


def test_kernel_knobs_cannot_be_written(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox,
                  "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern "
                  "&& echo wrote")
    assert run.returncode == 1
    assert run.out == ""
    for path in ("/proc/sysrq-trigger", "/sys/kernel/uevent_helper"):
        run = msb.ssh(sandbox, f"echo > {path} && echo wrote")
        assert run.out == "", path


def test_dot_dot_stays_at_the_sandbox_root(msb: Env, sandbox: str) -> None:
    root = _sh(msb, sandbox, "ls -A /")
    assert _sh(msb, sandbox, "cd /; cd ..; cd ../../..; pwd; ls -A") == "/\n" + root
    assert _sh(msb, sandbox, "ls -A /../../..") == root


def test_chroot_escape_trick_stays_in_the_sandbox(msb: Env, sandbox: str) -> None:
    root = _sh(msb, sandbox, "ls -A / | sort")
    escape = (
        "python3 -c \"import os; os.makedirs('/tmp/jail', exist_ok=True); "
        "os.chroot('/tmp/jail'); [os.chdir('..') for _ in range(64)]; os.chroot('.'); "
        "print('\\n'.join(sorted(os.listdir('/'))))\""
    )
    assert _sh(msb, sandbox, escape) == root


def test_symlinks_to_host_paths_lead_nowhere(msb: Env, sandbox: str) -> None:
    home = str(msb.home)
    probe = (
        f"ln -sfn /work /tmp/w; ln -sfn / /tmp/r; ln -sfn {home} /tmp/h; "
        "test -e /tmp/w/main/pyproject.toml && echo via-work; "
        "test -e /tmp/r/work/main/pyproject.toml && echo via-root; "
        f"test -e /tmp/h/authorized_keys && echo via-home; "
        f"test -e {home} && echo home-path; "
        "test -e /work/main/pyproject.toml && echo repo-path; "
        "ls -A /tmp/w/ 2>/dev/null; :"
    )
    assert _sh(msb, sandbox, probe) == ""


def test_host_paths_are_not_visible(msb: Env, sandbox: str) -> None:
    repo = Path(__file__).resolve().parent.parent
    paths = [repo / "pyproject.toml", msb.home, msb.home / "sandboxes", msb.rootfs, msb.root]
    run = msb.ssh(sandbox, "; ".join(f"test -e {path} && echo {path}" for path in paths) + "; :")
    assert (run.returncode, run.out) == (0, "")
    mounts = _sh(msb, sandbox, "cat /proc/self/mountinfo")
    for path in (str(msb.home), str(msb.rootfs), str(repo)):
        assert path not in mounts


def _capability_bounding_set(msb: Env, sandbox: str, user: str | None = None) -> int:
    line = _sh(msb, sandbox, "grep CapBnd /proc/self/status", user=user)
    return int(line.split()[1], 16)


@pytest.mark.parametrize("user", ["root", "dev"])
def test_dangerous_capabilities_are_not_in_the_bounding_set(
    msb: Env, sandbox: str, user: str
) -> None:
    bounding = _capability_bounding_set(msb, sandbox, user)
    for cap in (CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_MKNOD, CAP_SYS_MODULE):
        assert not bounding & (1 << cap), f"capability {cap} is in CapBnd {bounding:#x}"


# ---- users


def test_unprivileged_user_cannot_write_to_root_or_etc(msb: Env, sandbox: str) -> None:
    run = msb.ssh(sandbox, "touch /root/x; touch /etc/x; echo x >> /etc/passwd", user="dev")
    assert run.err.splitlines() == [
        "touch: cannot touch '/root/x': Permission denied",
        "touch: cannot touch '/etc/x': Permission denied",
        "bash: line 1: /etc/passwd: Permission denied",
    ]
    assert msb.ssh(sandbox, "test -e /root/x || test -e /etc/x").returncode == 1


def test_root_can_give_a_file_to_the_unprivileged_user(msb: Env, sandbox: str) -> None:
    name = f"/tmp/given-{uuid.uuid4().hex[:6]}"
    _sh(msb, sandbox, f"echo hi > {name}; chmod 600 {name}; chown dev:dev {name}")
    assert _sh(msb, sandbox, f"stat -c %U:%G {name}") == "dev:dev\n"
    assert _sh(msb, sandbox, f"cat {name}; rm {name}", user="dev") == "hi\n"


# ---- lifetime of sandbox processes


def test_background_process_lives_until_stop_and_nothing_is_left_after(
    msb: Env, fresh_sandbox: str
) -> None:
    _sh(msb, fresh_sandbox, "nohup sleep 1000 >/dev/null 2>&1 &")
    init = _init_pid(msb, fresh_sandbox)
    namespace = os.readlink(f"/proc/{init}/ns/pid")
    assert _sh(msb, fresh_sandbox, "pgrep -x sleep >/dev/null && echo alive") == "alive\n"
    on_host = _pids_in_namespace(namespace)
    assert init in on_host
    commands = {Path(f"/proc/{pid}/cmdline").read_bytes() for pid in on_host}
    assert b"sleep\x001000\x00" in commands

    stop = msb.msb_proxy("stop", fresh_sandbox)
    assert (stop.returncode, stop.err) == (0, "")
    assert _pids_in_namespace(namespace) == []


def test_guest_processes_get_default_signals_whoever_started_the_sandbox(
    msb: Env, fresh_sandbox: str
) -> None:
    """Ignored signals survive exec: the jail init must not pass on what the process that
    first started the sandbox ignored (here as a script's `nohup ... &` job would)."""
    if msb.backend != "local":
        pytest.skip("the jail init is the local backend's")

    def as_a_background_job() -> None:
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    # Served in the ProxyCommand itself, so the sandbox's init descends from that job.
    done = subprocess.run(
        ["ssh", "-F", str(msb.cold_config), msb.host(fresh_sandbox),
         "grep -E '^Sig(Blk|Ign):' /proc/self/status"],
        preexec_fn=as_a_background_job, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    fields = done.stdout.split()
    assert fields[0::2] == ["SigBlk:", "SigIgn:"]
    # Signals 32 and 33 are glibc's own (thread cancellation, setxid): no program can change
    # their action or mask through libc (what this machine's session started with stays),
    # and they are not the user's to send.
    blocked, ignored = (int(mask, 16) & ~(0b11 << 31) for mask in fields[1::2])
    assert (blocked, ignored) == (0, 0), fields
