"""The fast path never loses a byte when asyncssh or asyncio change under it.

Every private name it touches is listed in ``msb_proxy/fastpath/gate.py`` (a test reads the
fast path's source to hold the list complete). Each test here renames one of them throughout a
copy of asyncssh (or of asyncio), as a release that renamed it would, serves a real ``ssh``
through ``msb-proxy stdio`` with that copy first on the path, and checks a transfer both ways
byte for byte with the command's exit status. A release outside the tested range turns the
fast path off; so does ``MSB_PROXY_FASTPATH=0``.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import re
import shlex
import shutil
from pathlib import Path

import asyncssh
import pytest
from conftest import Env

from msb_proxy.fastpath import gate

FASTPATH = Path(gate.__file__).parent
ASYNCSSH = Path(asyncssh.__file__).parent
ASYNCIO = Path(asyncio.__file__).parent

# Names the fast path reads through getattr with a fallback to a public method, so that a
# rename slows it down and changes nothing else.
WITH_FALLBACK = ("_encryptor", "_decryptor")
# Names of asyncssh classes and handlers it looks up (gate.py resolves each, or refuses).
CLASSES = ("SSHConnection", "SSHChannel", "ETMEncryption", "_recv_pkthdr")
# Names the cached-key UMAC needs: without them the fast path runs with asyncssh's UMAC.
UMAC = ("_mac_handler", "send_newkeys")
ASYNCSSH_NAMES = sorted({*gate.CONNECTION_NAMES, *gate.CHANNEL_NAMES, *gate.ENCRYPTION_NAMES,
                         *WITH_FALLBACK, *CLASSES, *UMAC})

UPLOAD = 3 << 20
# The guest sums what it reads, then writes 3 MiB of its own and exits 3: both directions of a
# session's data path, and its exit status.
COMMAND = ("sha256sum; head -c 3145728 /dev/zero | tr '\\0' x; exit 3")


def _foreign_names() -> set[str]:
    """Private names the fast path's code uses on objects not of its own making."""
    own: set[str] = set()
    used: set[str] = set()
    for path in FASTPATH.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id == "self":
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                used.add(node.attr)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"_[a-z][a-z_]*", node.value):
                used.add(node.value)  # getattr(obj, "_name", ...)
    # Our own names that asyncssh also has count as asyncssh's where gate.py lists them.
    listed = {*ASYNCSSH_NAMES, *gate.LOOP_NAMES}
    return {name for name in used if name not in own or name in listed}


def test_every_private_name_the_fast_path_uses_is_checked_by_the_gate() -> None:
    known = {*ASYNCSSH_NAMES, *gate.LOOP_NAMES, "_relay"}  # _relay: our own C extension
    unlisted = sorted(_foreign_names() - known)
    assert unlisted == [], f"add these to msb_proxy/fastpath/gate.py's tables: {unlisted}"


def _renamed_copy(source: Path, target: Path, name: str) -> None:
    """``source`` (a package) copied to ``target`` with ``name`` renamed in every module."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    for path in target.rglob("*.py"):
        text = path.read_text()
        changed = pattern.sub(f"{name}_renamed", text)
        if changed != text:
            path.write_text(changed)


def _transfer(msb: Env, sandbox: str, tmp_path: Path, *, pythonpath: Path | None = None,
              extra_env: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """One ssh connection through a cold (in-process) ``msb-proxy stdio --debug``:
    (exit status, stdout, stderr)."""
    env = [f"PYTHONPATH={pythonpath}"] if pythonpath is not None else []
    env += [f"{key}={value}" for key, value in (extra_env or {}).items()]
    argv = msb.proxy_command(warm=False)
    proxy = " ".join(shlex.quote(part) for part in [argv[0], *env, *argv[1:], "--debug"])
    config = tmp_path / "ssh_config"
    config.write_text(msb.config.read_text().replace(
        next(line for line in msb.config.read_text().splitlines() if "ProxyCommand" in line),
        f"  ProxyCommand {proxy} %n"))
    payload = os.urandom(UPLOAD)
    run = msb.run(["ssh", "-F", str(config), msb.host(sandbox), COMMAND], input=payload,
                  timeout=120)
    expected = hashlib.sha256(payload).hexdigest().encode()
    assert run.stdout.startswith(expected + b"  -\n"), run.err[-2000:]
    assert run.stdout[len(expected) + 4:] == b"x" * (3 << 20)
    return run.returncode, run.stdout, run.err


@pytest.fixture(scope="module")
def gate_sandbox(msb: Env) -> str:
    if msb.backend != "local":
        pytest.skip("renames are checked once, on the local backend (the relay needs its pipes)")
    name = "fastpath-gate"
    msb.host(name)
    return name


def test_the_fast_path_runs_with_asyncssh_as_it_is(msb: Env, gate_sandbox: str,
                                                   tmp_path: Path) -> None:
    """The control: the same transfer with nothing renamed takes the fast path."""
    code, _, err = _transfer(msb, gate_sandbox, tmp_path)
    assert code == 3
    assert "fast path on (cached-key UMAC: yes)" in err
    assert "relay on, C loop" in err
    assert "fast path off" not in err


@pytest.mark.parametrize("name", ASYNCSSH_NAMES)
def test_a_renamed_asyncssh_name_loses_nothing(msb: Env, gate_sandbox: str, tmp_path: Path,
                                               name: str) -> None:
    _renamed_copy(ASYNCSSH, tmp_path / "site" / "asyncssh", name)
    code, _, err = _transfer(msb, gate_sandbox, tmp_path, pythonpath=tmp_path / "site")
    assert code == 3
    assert "internal error" not in err
    if name in UMAC:
        assert "fast path on (cached-key UMAC: no)" in err, err[-2000:]
    elif name not in WITH_FALLBACK:  # the gate saw it and said so
        assert "fast path off" in err, err[-2000:]


@pytest.mark.parametrize("name", gate.LOOP_NAMES)
def test_a_renamed_asyncio_name_loses_nothing(msb: Env, gate_sandbox: str, tmp_path: Path,
                                              name: str) -> None:
    _renamed_copy(ASYNCIO, tmp_path / "site" / "asyncio", name)
    code, _, err = _transfer(msb, gate_sandbox, tmp_path, pythonpath=tmp_path / "site")
    assert code == 3
    assert "internal error" not in err
    assert "fast path off: the event loop has no" in err, err[-2000:]


def test_an_untested_asyncssh_release_turns_the_fast_path_off(msb: Env, gate_sandbox: str,
                                                              tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(ASYNCSSH, site / "asyncssh", ignore=shutil.ignore_patterns("__pycache__"))
    version = site / "asyncssh" / "version.py"
    version.write_text(re.sub(r"__version__ = .*", "__version__ = '2.25.0'", version.read_text()))
    code, _, err = _transfer(msb, gate_sandbox, tmp_path, pythonpath=site)
    assert code == 3
    assert "fast path off: asyncssh 2.25.0 is not a release it was tested with" in err


def test_msb_proxy_fastpath_0_serves_on_asyncssh_s_own_path(msb: Env, gate_sandbox: str,
                                                            tmp_path: Path) -> None:
    code, _, err = _transfer(msb, gate_sandbox, tmp_path, extra_env={"MSB_PROXY_FASTPATH": "0"})
    assert code == 3
    assert "fast path not installed (MSB_PROXY_FASTPATH=0)" in err


def test_mypy_sees_a_private_name_asyncssh_renamed(tmp_path: Path) -> None:
    """The fast path is typed with asyncssh's own classes, so the type check of an upgrade
    already names a private attribute it uses that asyncssh renamed, before any test runs."""
    import subprocess
    import sys

    _renamed_copy(ASYNCSSH, tmp_path / "stubs" / "asyncssh", "_send_seq")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
         str(FASTPATH / "send.py")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "MYPYPATH": str(tmp_path / "stubs")}, cwd=FASTPATH.parents[1])
    assert done.returncode == 1, done.stdout
    assert '"SSHServerConnection" has no attribute "_send_seq"' in done.stdout
