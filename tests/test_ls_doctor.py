"""msb-proxy ls and msb-proxy doctor, through the real CLI against the local backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import PROXY, Env


def _cli(msb: Env, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = dict(msb.proxy_env(), **env)
    return subprocess.run([str(PROXY), *args], capture_output=True, text=True, env=environ,
                          timeout=120, check=False)


def test_ls_json_lists_each_sandbox_with_its_state_and_alias(msb: Env, fresh_sandbox: str) -> None:
    assert msb.ssh(fresh_sandbox, "true").returncode == 0
    listed = json.loads(_cli(msb, "ls", "--json", "--backend", "local").stdout)
    mine = [row for row in listed if row["name"] == fresh_sandbox]
    assert mine == [{"name": fresh_sandbox, "state": "running", "backend": "local",
                     "alias": f"msb-{fresh_sandbox}"}]
    assert _cli(msb, "stop", fresh_sandbox).returncode == 0
    listed = json.loads(_cli(msb, "ls", "--json", "--backend", "local").stdout)
    assert [row["state"] for row in listed if row["name"] == fresh_sandbox] == ["stopped"]


def test_ls_prints_a_table(msb: Env, fresh_sandbox: str) -> None:
    assert msb.ssh(fresh_sandbox, "true").returncode == 0
    lines = _cli(msb, "ls", "--backend", "local").stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "BACKEND", "SSH"]
    assert [fresh_sandbox, "running", "local", f"msb-{fresh_sandbox}"] in [
        line.split() for line in lines[1:]]


def _rows(output: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in output.splitlines()[1:]:
        check, status, detail = _split(line)
        rows[check] = (status, detail)
    return rows


def _split(line: str) -> tuple[str, str, str]:
    check, rest = line.split("  ", 1)
    status, _, detail = rest.strip().partition("  ")
    return check.strip(), status.strip(), detail.strip()


def test_doctor_passes_on_a_healthy_setup_and_checks_running_sandboxes(
    msb: Env, fresh_sandbox: str
) -> None:
    assert msb.ssh(fresh_sandbox, "true").returncode == 0
    run = _cli(msb, "doctor", "--backend", "local")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _rows(run.stdout)
    for check in ("config", "local: root", "local: overlayfs", "local: rootfs", "authorized keys"):
        assert rows[check][0] == "ok", (check, rows[check])
    if shutil.which("cc"):  # make install builds it wherever there is a compiler
        assert rows["relay"] == ("ok", "C loop (msb_proxy.fastpath._relay)")
    assert rows[f"{fresh_sandbox}: sftp-server"] == ("ok", "/usr/lib/openssh/sftp-server")
    assert rows[f"{fresh_sandbox}: rsync"] == ("ok", "/usr/bin/rsync")


def test_doctor_names_a_missing_guest_tool_and_what_to_do(msb: Env, fresh_sandbox: str) -> None:
    assert msb.ssh(fresh_sandbox, "mv /usr/bin/rsync /usr/bin/rsync.hidden").returncode == 0
    rows = _rows(_cli(msb, "doctor", "--backend", "local").stdout)
    status, detail = rows[f"{fresh_sandbox}: rsync"]
    assert status == "warn"
    assert "apt-get install rsync" in detail


def test_doctor_fails_on_a_broken_setup_with_what_to_do(msb: Env, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    user_home = tmp_path / "user"
    user_home.mkdir()
    run = _cli(msb, "doctor", "--backend", "local", MSB_PROXY_HOME=str(home),
               HOME=str(user_home), MSB_PROXY_ROOTFS="/nonexistent")
    assert run.returncode == 1
    rows = _rows(run.stdout)
    assert rows["local: rootfs"][0] == "FAIL"
    assert "make rootfs" in rows["local: rootfs"][1]
    assert rows["authorized keys"][0] == "FAIL"
    assert "msb-proxy authorize" in rows["authorized keys"][1]
    assert run.stderr == "msb-proxy: 2 essential check(s) failed; see FAIL above\n"


def test_doctor_reports_a_bad_config_file_and_checks_the_rest(msb: Env, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[defaults]\nstop_after_idle = 'soon'\n")
    (home / "authorized_keys").write_text(msb.key.with_suffix(".pub").read_text())
    run = _cli(msb, "doctor", "--backend", "local", MSB_PROXY_HOME=str(home))
    assert run.returncode == 1
    rows = _rows(run.stdout)
    assert rows["config"][0] == "FAIL"
    assert "defaults.stop_after_idle" in rows["config"][1]
    assert rows["authorized keys"][0] == "ok"
    assert os.path.exists(home / "config.toml")
