"""The Makefile's set-up steps that the README's two commands rely on."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _make(target: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "-C", str(REPO), target],
                          env=dict(os.environ, HOME=str(home)), capture_output=True,
                          text=True, timeout=60, check=False)


def test_client_key_is_made_for_a_user_without_one_and_only_once(tmp_path: Path) -> None:
    first = _make("client-key", tmp_path)
    assert (first.returncode, first.stderr) == (0, "")
    assert "created" in first.stdout
    key = tmp_path / ".ssh" / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    made = key.read_bytes()
    again = _make("client-key", tmp_path)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert key.read_bytes() == made


def test_client_key_leaves_a_user_with_a_key_alone(tmp_path: Path) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_rsa").write_text("theirs\n")
    done = _make("client-key", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert sorted(p.name for p in (tmp_path / ".ssh").iterdir()) == ["id_rsa"]
