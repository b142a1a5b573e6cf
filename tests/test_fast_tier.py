"""``make test-fast``: the rootless tier, on the fake backend, still runs a real share of the suite.

A suite's tests are skipped on the fake backend when they carry ``needs_guest``; a change that
marked too much (or a whole module) would leave a tier that passes by running nothing. This
collects the tier as ``make test-fast`` runs it and counts what is left to run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

# What the tier ran when it was made: 116 tests, 44 skipped (16 of them where the host has no
# sftp-server to stand in for the guest's).
MIN_TESTS = 100


def _fast_tests() -> list[str]:
    """``FAST_TESTS`` of the Makefile, without this file."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    found = re.search(r"^FAST_TESTS\s*:=(.*)$", text, re.MULTILINE)
    assert found is not None, "the Makefile has no FAST_TESTS"
    return [path for path in found.group(1).split() if not path.endswith("test_fast_tier.py")]


def test_the_fast_tier_runs_every_suite_it_names_and_a_meaningful_number_of_tests() -> None:
    files = _fast_tests()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSB_PROXY_")}
    env["MSB_PROXY_TEST_BACKEND"] = "fake"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "not needs_guest", *files],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    tests = [line for line in collected.stdout.splitlines() if "::" in line]
    per_file = {path: sum(1 for test in tests if test.startswith(f"{path}::")) for path in files}
    assert all(per_file.values()), per_file
    assert len(tests) >= MIN_TESTS, per_file
