"""git over ssh and Ansible, through the ProxyCommand config, as their users run them.

git: ``GIT_SSH_COMMAND="ssh -F <config>"``; clone and push run ``git-upload-pack`` and
``git-receive-pack`` in the sandbox as exec commands, binary-clean both ways.

Ansible: ``ansible -i 'msb-NAME,' all`` with the config in ``ssh_args`` next to the
``ControlMaster=auto``/``ControlPersist`` Ansible itself uses; Ansible picks the ControlPath,
its modules travel over SFTP and run with the guest's python3.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, Run
from tunnel_helpers import short_tmpdir, ssh_argv, wait_until


@pytest.fixture(scope="module")
def guest(msb: Env) -> str:
    name = f"devtools-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    return name


# ---- git


def git(msb: Env, home: Path, *args: str, cwd: Path | None = None) -> Run:
    env = {**os.environ, "HOME": str(home), "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_SSH_COMMAND": f"ssh -F {msb.config}",
           "GIT_AUTHOR_NAME": "Test Author", "GIT_AUTHOR_EMAIL": "author@example.com",
           "GIT_COMMITTER_NAME": "Test Author", "GIT_COMMITTER_EMAIL": "author@example.com",
           "LC_ALL": "C"}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, timeout=120,
                          check=False)
    return Run(done.returncode, done.stdout, done.stderr)


def test_git_clone_and_push_to_a_bare_repository_in_the_sandbox(
    msb: Env, guest: str, tmp_path: Path
) -> None:
    repo = f"/srv/repo-{uuid.uuid4().hex[:6]}.git"
    created = msb.ssh(guest, f"git init -q --bare {repo}")
    assert created.returncode == 0, created.err
    url = f"{msb.host(guest)}:{repo}"

    cloned = git(msb, tmp_path, "clone", url, "first", cwd=tmp_path)
    assert cloned.returncode == 0, cloned.err
    assert "You appear to have cloned an empty repository." in cloned.err
    first = tmp_path / "first"
    data = os.urandom(2 << 20)
    (first / "data.bin").write_bytes(data)
    (first / "README").write_text("pushed through msb-proxy\n")
    assert git(msb, tmp_path, "add", ".", cwd=first).returncode == 0
    assert git(msb, tmp_path, "commit", "-q", "-m", "first commit", cwd=first).returncode == 0
    pushed = git(msb, tmp_path, "push", "-q", "origin", "HEAD:refs/heads/main", cwd=first)
    assert pushed.returncode == 0, pushed.err
    head = git(msb, tmp_path, "rev-parse", "HEAD", cwd=first).out.strip()

    arrived = msb.ssh(guest, f"git -C {repo} log --format='%H %an %s' main && "
                             f"git -C {repo} cat-file blob main:data.bin | sha256sum")
    assert arrived.out == (f"{head} Test Author first commit\n"
                           f"{hashlib.sha256(data).hexdigest()}  -\n"), arrived.err

    again = git(msb, tmp_path, "clone", "-q", "-b", "main", url, "second", cwd=tmp_path)
    assert again.returncode == 0, again.err
    second = tmp_path / "second"
    assert git(msb, tmp_path, "rev-parse", "HEAD", cwd=second).out.strip() == head
    assert (second / "data.bin").read_bytes() == data
    assert (second / "README").read_text() == "pushed through msb-proxy\n"

    # And back: a push from the second clone reaches the first through a pull.
    (second / "README").write_text("second change\n")
    assert git(msb, tmp_path, "commit", "-q", "-am", "second commit", cwd=second).returncode == 0
    assert git(msb, tmp_path, "push", "-q", cwd=second).returncode == 0
    pulled = git(msb, tmp_path, "pull", "-q", "origin", "main", cwd=first)
    assert pulled.returncode == 0, pulled.err
    assert (first / "README").read_text() == "second change\n"
    log = git(msb, tmp_path, "log", "--format=%s", cwd=first)
    assert log.out == "second commit\nfirst commit\n"


# ---- Ansible

ANSIBLE = Path(sys.executable).parent / "ansible"  # ansible-core, a dev dependency


@pytest.fixture
def control_dir(msb: Env, guest: str) -> Iterator[Path]:
    """Ansible's ControlPath directory; every master in it is told to exit afterwards."""
    directory = short_tmpdir()
    try:
        yield directory
    finally:
        for path in directory.iterdir():
            msb.run(ssh_argv(msb, guest, "-o", f"ControlPath={path}", "-O", "exit"))
        assert wait_until(lambda: not any(directory.iterdir()), 10), list(directory.iterdir())
        shutil.rmtree(directory)


def ansible(msb: Env, guest: str, control_dir: Path, work: Path, *args: str) -> dict[str, Any]:
    """``ansible -i 'msb-NAME,' all --one-line ARGS...``; the module's result for the host."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "ANSIBLE_HOME": str(work / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"),
           "ANSIBLE_SSH_ARGS": f"-F {msb.config} -o ControlMaster=auto -o ControlPersist=60s",
           "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False",
           "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
    host = msb.host(guest)
    done = subprocess.run([str(ANSIBLE), "-i", f"{host},", "all", "--one-line", *args],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    found = re.fullmatch(rf"{re.escape(host)} \| (SUCCESS|CHANGED) => (\{{.*\}})\n",
                         done.stdout)
    assert found is not None, done.stdout
    result: dict[str, Any] = json.loads(found.group(2))
    return result


def master_pid(msb: Env, guest: str, control_dir: Path) -> int:
    """The pid of the one ControlMaster Ansible left running in ``control_dir``."""
    sockets = list(control_dir.iterdir())
    assert len(sockets) == 1, sockets
    check = msb.run(ssh_argv(msb, guest, "-o", f"ControlPath={sockets[0]}", "-O", "check"))
    found = re.search(r"Master running \(pid=(\d+)\)", check.err)
    assert found is not None, check.err
    return int(found.group(1))


def test_ansible_ping_and_copy_through_its_control_master(
    msb: Env, guest: str, control_dir: Path, tmp_path: Path
) -> None:
    ping = ansible(msb, guest, control_dir, tmp_path, "-m", "ping")
    assert (ping["ping"], ping["changed"]) == ("pong", False)
    master = master_pid(msb, guest, control_dir)

    content = "".join(f"line {n}: configured by ansible\n" for n in range(2000))
    digest = hashlib.sha256(content.encode()).hexdigest()
    dest = f"/srv/ansible-{uuid.uuid4().hex[:6]}/app.conf"
    args = json.dumps({"content": content, "dest": dest, "mode": "0640", "owner": "dev",
                       "group": "dev"})
    made = msb.ssh(guest, f"mkdir -p {os.path.dirname(dest)}")
    assert made.returncode == 0, made.err
    copied = ansible(msb, guest, control_dir, tmp_path, "-m", "copy", "-a", args)
    assert {key: copied[key] for key in ("changed", "dest", "mode", "owner", "group", "size",
                                         "checksum")} == {
        "changed": True, "dest": dest, "mode": "0640", "owner": "dev", "group": "dev",
        "size": len(content), "checksum": hashlib.sha1(content.encode()).hexdigest()}
    unchanged = ansible(msb, guest, control_dir, tmp_path, "-m", "copy", "-a", args)
    assert (unchanged["changed"], unchanged["dest"]) == (False, dest)
    # Every run went through the one master Ansible started.
    assert master_pid(msb, guest, control_dir) == master

    landed = msb.ssh(guest, f"sha256sum {dest} && stat -c '%U %G %a %s' {dest}")
    assert landed.out == f"{digest}  {dest}\ndev dev 640 {len(content)}\n", landed.err
