"""The Makefile's set-up steps that the README's two commands rely on."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


# scripts/install-system-deps, run for real against stand-ins for dpkg-query and apt-get: the
# stand-in dpkg-query reports every package installed except the ones a test calls missing (until
# the stand-in apt-get has installed them), and apt-get records how it was called.

SCRIPT = REPO / "scripts" / "install-system-deps"
SETPRIV = ["/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs the script as root and as nobody")

_DPKG_QUERY = """#!/bin/bash
# Prints "NAME installed" for each package (the script's -f format), exit 1 for unknown ones.
status=0
for arg in "$@"; do
  case $arg in -*) continue ;; esac
  if [[ " $(<"{world}/missing") " == *" $arg "* && ! -e "{world}/installed.$arg" ]]; then
    echo "dpkg-query: no packages found matching $arg" >&2; status=1
  else
    echo "$arg installed"
  fi
done
exit $status
"""
_APT_GET = """#!/bin/bash
echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >>"{world}/apt.log"
if [[ -e "{world}/apt-fails" ]]; then echo "E: Unable to locate package $*" >&2; exit 100; fi
if [[ " $* " == *" install "* ]]; then
  for arg in "$@"; do case $arg in -*|install|*=*) ;; *) : >"{world}/installed.$arg" ;; esac; done
fi
"""


@dataclass
class World:
    """A directory that can stand first in PATH: bash, and dpkg-query and apt-get stand-ins."""

    root: Path

    def path(self, *, system: bool = True) -> str:
        return f"{self.root}:/usr/bin:/bin" if system else str(self.root)

    def missing(self, *packages: str) -> None:
        (self.root / "missing").write_text(" ".join(packages))

    def apt_calls(self) -> list[str]:
        log = self.root / "apt.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def world() -> Iterator[World]:
    # Not under tmp_path: nobody must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="msb-system-deps-"))
    try:
        root.chmod(0o777)
        (root / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
        for name, text in (("dpkg-query", _DPKG_QUERY), ("apt-get", _APT_GET)):
            (root / name).write_text(text.replace("{world}", str(root)))
            (root / name).chmod(0o755)
        world = World(root)
        world.missing()
        yield world
    finally:
        shutil.rmtree(root)


def _deps(*args: str, path: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [*(SETPRIV if as_nobody else []), str(SCRIPT), *args]
    return subprocess.run(argv, env={"PATH": path, "LC_ALL": "C"}, capture_output=True,
                          text=True, timeout=60, check=False)


def _packages(selection: str) -> list[str]:
    done = subprocess.run([str(SCRIPT), selection, "--list"], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.split()


def test_the_demo_needs_a_part_of_what_the_tests_need() -> None:
    demo, tests = _packages("--demo"), _packages("--test")
    assert {"python3-venv", "debootstrap", "openssh-client", "rsync"} <= set(demo)
    assert set(demo) < set(tests)
    assert {"sshfs", "fuse3", "socat", "time"} <= set(tests) - set(demo)
    assert _packages("--list") == tests  # --test is the default


def test_the_readme_lists_the_packages_the_script_installs() -> None:
    text = (REPO / "README.md").read_text()
    table = text.split("The Debian/Ubuntu packages, by what needs them:")[1].split("\n\n")[1]
    rows = [line.rsplit("|", 2)[1].strip(" `").split() for line in table.splitlines()[2:]]
    assert [name for row in rows[:4] for name in row] == _packages("--demo")
    assert [name for row in rows for name in row] == _packages("--test")


@needs_root
@pytest.mark.parametrize("selection", ["--demo", "--test"])
def test_nothing_missing_is_a_quiet_no_op_without_apt_get_for_root_and_others(
        world: World, selection: str) -> None:
    for as_nobody in (False, True):
        done = _deps(selection, path=world.path(), as_nobody=as_nobody)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert world.apt_calls() == []


@needs_root
def test_with_the_real_dpkg_query_only_what_is_not_installed_is_named() -> None:
    # Where `make test` ran the script first this is the no-op; elsewhere the line must name
    # exactly the packages dpkg does not have.
    done = _deps("--test", path="/usr/bin:/bin", as_nobody=True)
    if done.returncode == 0:
        assert (done.stdout, done.stderr) == ("", "")
        return
    assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1
    named = done.stderr.split("packages: ")[1].split(";")[0].split()
    for package in _packages("--test"):
        status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                                capture_output=True, text=True, check=False).stdout
        assert (package in named) == (status != "installed"), package


@needs_root
def test_missing_packages_as_non_root_are_named_in_one_line(world: World) -> None:
    world.missing("sshfs", "fuse3")
    done = _deps("--test", path=world.path(), as_nobody=True)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("system-deps: missing Debian packages: sshfs fuse3; "
                           "install them as root: apt-get install sshfs fuse3\n")
    assert world.apt_calls() == []


@needs_root
def test_missing_packages_without_apt_get_are_named_in_one_line(world: World) -> None:
    world.missing("debootstrap")
    (world.root / "apt-get").unlink()
    done = _deps("--demo", path=world.path(system=False))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("system-deps: missing Debian packages: debootstrap, and no apt-get "
                           "here to install them: install them by hand\n")


@needs_root
def test_without_dpkg_it_names_the_whole_selection_in_one_line(world: World) -> None:
    (world.root / "dpkg-query").unlink()
    done = _deps("--demo", path=world.path(system=False))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 1 and "no dpkg-query" in done.stderr
    assert " ".join(_packages("--demo")) in done.stderr


@needs_root
def test_as_root_it_installs_just_the_missing_ones_after_one_update(world: World) -> None:
    world.missing("time", "sshfs")
    done = _deps("--test", path=world.path())
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    calls = world.apt_calls()
    assert len(calls) == 2
    assert calls[0].startswith("DEBIAN_FRONTEND=noninteractive ")
    assert calls[0].endswith(" update -qq")
    assert calls[1].endswith(" install -y -qq --no-install-recommends sshfs time")
    assert done.stderr.splitlines() == ["system-deps: installing sshfs time ...",
                                        "system-deps: installed sshfs time"]
    again = _deps("--test", path=world.path())
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert len(world.apt_calls()) == 2


@needs_root
def test_a_failing_apt_get_is_shown_and_ends_in_one_line_naming_the_packages(
        world: World) -> None:
    world.missing("sshfs")
    (world.root / "apt-fails").touch()
    done = _deps("--test", path=world.path())
    assert (done.returncode, done.stdout) == (1, "")
    *shown, last = done.stderr.splitlines()
    assert "E: Unable to locate package" in "\n".join(shown)
    assert last == ("system-deps: apt-get update failed (above), so nothing was installed; "
                    "needed: sshfs")


def test_an_unknown_argument_is_refused() -> None:
    done = subprocess.run([str(SCRIPT), "--everything"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("system-deps: unknown argument '--everything' "
                           "(use --demo, --test or --list)\n")


# The Makefile: which targets install system packages first, and `make help`.

def _dry_run(target: str) -> list[str]:
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), target],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.splitlines()


@pytest.mark.parametrize(("target", "selection"), [("demo", "--demo"), ("test", "--test"),
                                                   ("test-nofastpath", "--test"),
                                                   ("bench", "--test")])
def test_targets_that_need_system_packages_install_them_first(target: str,
                                                              selection: str) -> None:
    assert _dry_run(target)[0] == f"scripts/install-system-deps {selection}"


@pytest.mark.parametrize("target", ["install", "lint", "client-key", "help"])
def test_targets_that_run_as_any_user_leave_system_packages_alone(target: str) -> None:
    assert not [line for line in _dry_run(target) if "install-system-deps" in line]


def test_make_test_runs_the_session_and_transfer_suites_again_without_the_fast_path() -> None:
    lines = _dry_run("test")
    full = lines.index(".venv/bin/pytest")
    again = [line for line in lines if line.startswith("MSB_PROXY_FASTPATH=0 .venv/bin/pytest ")]
    assert len(again) == 1 and lines.index(again[0]) > full
    files = again[0].split()[2:]
    assert files and all((REPO / name).is_file() for name in files)
    assert _dry_run("test-nofastpath")[-1] == again[0]


def test_make_help_lists_every_target() -> None:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    phony = [name for line in text.splitlines() if line.startswith(".PHONY:")
             for name in line.split(":", 1)[1].split()]
    shown = _make("help", REPO).stdout
    assert phony and [name for name in phony if f"make {name} " not in shown] == []


def test_ci_ends_with_the_readmes_test_command() -> None:
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[-1] == "make test"
    assert "scripts/install-system-deps --test" in lines
    assert "make test " in (REPO / "README.md").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (scripts/install-system-deps --test)")
def test_the_shell_scripts_are_shellcheck_clean() -> None:
    scripts = [path for path in [*sorted((REPO / "scripts").iterdir()), REPO / ".ci" / "run"]
               if path.read_text().split("\n", 1)[0] in ("#!/usr/bin/env bash", "#!/bin/bash",
                                                         "#!/bin/sh")]
    assert SCRIPT in scripts
    done = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
