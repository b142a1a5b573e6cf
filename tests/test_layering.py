"""The package's layering, as `make lint` checks it: import-linter's contracts in pyproject.toml
(`lint-imports`) and scripts/check-private-names (only msb_proxy/fastpath touches other
packages' private names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKER = REPO / "scripts" / "check-private-names"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

FASTPATH = """\
import asyncio


def patch(loop: asyncio.AbstractEventLoop) -> None:
    loop._selector = None  # the one place allowed
"""

SERVER = """\
import asyncio
import os
from asyncio.base_events import _format_handle
from collections import namedtuple


class Buffer:
    __slots__ = ("_slot",)

    def __init__(self) -> None:
        self._data = b""

    def take(self) -> bytes:
        return self._data


class Session(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self._data = data
        print(self._loop)


def peek(buffer: Buffer, loop: asyncio.AbstractEventLoop) -> None:
    print(buffer._data, buffer._slot)
    print(loop._selector)
    print(getattr(loop, "_ready"))
    print(namedtuple("Point", "x")(1)._replace(x=2))
    os._exit(0)
"""


def _check(package: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECKER), package.name], cwd=package.parent,
                          capture_output=True, text=True, timeout=60, check=False)


def _package(tmp_path: Path, server: str) -> Path:
    package = tmp_path / "pkg"
    (package / "fastpath").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "fastpath" / "__init__.py").write_text(FASTPATH)
    (package / "server.py").write_text(server)
    return package


def test_private_names_of_other_packages_are_reported_with_their_lines(tmp_path: Path) -> None:
    done = _check(_package(tmp_path, SERVER))
    why = "(only pkg/fastpath may touch those)"
    assert (done.returncode, done.stderr) == (1, "")
    assert done.stdout.splitlines() == [
        f"pkg/server.py:3: private name _format_handle of another package {why}",
        f"pkg/server.py:20: private name _loop of another package {why}",
        f"pkg/server.py:25: private name _selector of another package {why}",
        f"pkg/server.py:26: private name _ready of another package {why}",
    ]


def test_own_private_names_the_allow_list_and_fastpath_pass(tmp_path: Path) -> None:
    kept = "\n".join(line for line in SERVER.splitlines()
                     if "_format_handle" not in line and "_loop" not in line
                     and "_selector" not in line and "_ready" not in line)
    done = _check(_package(tmp_path, kept + "\n"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_package_touches_no_private_name_of_another_outside_fastpath() -> None:
    done = subprocess.run([sys.executable, str(CHECKER)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_package_keeps_its_import_contracts() -> None:
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    """No import cycles, between packages or within one (import-linter's layers only see the
    first): every strongly connected group of msb_proxy's import graph is one module."""
    import grimp

    graph = grimp.build_graph("msb_proxy", cache_dir=None)
    imports = {module: graph.find_modules_directly_imported_by(module)
               for module in graph.modules}
    cycles = []
    for module in sorted(imports):
        seen, pending = set(), list(imports[module])
        while pending:  # what module reaches; a cycle if that includes module itself
            current = pending.pop()
            if current not in seen:
                seen.add(current)
                pending.extend(imports.get(current, ()))
        if module in seen:
            cycles.append(module)
    assert cycles == [], f"modules in an import cycle: {cycles}"
