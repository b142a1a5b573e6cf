"""Private msb-proxy installations for tests that write their own ``config.toml``.

Each one has its own ``MSB_PROXY_HOME``, ``$HOME``, client key, runtime directory (so its own
warm server) and ssh configs, under a short directory in ``/tmp``: ssh's ControlPath and the warm
server's socket are unix sockets, whose paths are limited to 107 bytes. The session's shared
installation is left alone, so templates written here reach no other test.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from conftest import PROXY, Env, Run, install, stop_warm_servers, write_ssh_config


def make_installation(msb: Env, config_toml: str = "") -> Env:
    """A fresh installation sharing only the session's rootfs and backend.

    ``config_toml`` becomes ``MSB_PROXY_HOME/config.toml`` when given. Its ssh config passes
    ``--quiet``; :func:`loud` gives the same installation with progress shown.
    """
    root = Path(tempfile.mkdtemp(prefix="msbl-", dir="/tmp"))
    env = install(root, msb.backend, msb.rootfs, comment="lifecycle")
    if config_toml:
        (env.home / "config.toml").write_text(config_toml)
    return env


def configure(env: Env, text: str) -> Path:
    """Write ``text`` as the installation's ``config.toml``; its path."""
    path = env.home / "config.toml"
    path.write_text(text)
    return path


def loud(env: Env) -> Env:
    """``env`` with a ProxyCommand that shows progress (no ``--quiet``); same sandboxes list."""
    path = env.root / "ssh_config.loud"
    if not path.exists():
        write_ssh_config(env, quiet=False, path=path)
    return replace(env, config=path)


def remove_installation(env: Env) -> None:
    """Stop the installation's ssh masters, sandboxes and warm server; delete its files."""
    for name in env.sandboxes:
        subprocess.run(["ssh", "-F", str(env.config), "-O", "exit", f"msb-{name}"],
                       stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=10)
        env.msb_proxy("rm", name)
    stop_warm_servers(env.runtime_dir)
    shutil.rmtree(env.root, ignore_errors=True)


def init_pid(env: Env, name: str) -> int:
    """Host PID of the jail init of local sandbox ``name``."""
    return int((env.home / "sandboxes" / name / "init.pid").read_text())


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (never existed, reaped, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except FileNotFoundError:
        return True


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> float | None:
    """Seconds until ``condition()`` held, polling every ``step``; None if it never did."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(step)


def children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def proxy_of(ssh_pid: int, timeout: float = 30) -> int:
    """PID of the ``msb-proxy stdio`` ProxyCommand that the ssh client ``ssh_pid`` runs."""
    found: list[int] = []

    def started() -> bool:
        for child in children(ssh_pid):
            with contextlib.suppress(OSError):
                if b"stdio" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                    found.append(child)
                    return True
        return False

    assert wait_until(started, timeout) is not None, "the ProxyCommand never started"
    return found[0]


def one_line(run: Run) -> str:
    """The single line stderr must consist of (without its newline); fails on anything else."""
    assert run.err.count("\n") == 1 and run.err.endswith("\n"), run.err
    return run.err[:-1]


def proxy_stdio(env: Env, host: str, timeout: float = 60) -> Run:
    """``msb-proxy stdio --host-prefix msb- HOST`` run by hand with ``env``'s state, its stdin
    already at end of file (a client that went away)."""
    done = subprocess.run([str(PROXY), "stdio", "--host-prefix", "msb-", host], input=b"",
                          capture_output=True, timeout=timeout, check=False,
                          env=env.proxy_env())
    return Run(done.returncode, done.stdout, done.stderr)
