"""The backend registry: a backend is chosen by its name in one table, and everything that names
backends (the CLI's ``--backend``, the config file, ``ls``, ``doctor``) asks that table.

A backend that exists only in this module, put in the table at test time, is reached through
the CLI without any other module knowing it: that is the promise "a backend is one module and
one registry line". Wrong names and options of another backend are one line, through the real
``msb-proxy`` where a user would meet them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import PROXY

from msb_proxy.backends import registry
from msb_proxy.backends.base import (
    Backend,
    Check,
    CheckStatus,
    Sandbox,
    SandboxInfo,
    SandboxState,
)
from msb_proxy.cli.commandline import run
from msb_proxy.config import Config, Option, SandboxTemplate, load_config, parse_string
from msb_proxy.errors import ConfigError, SandboxNotFoundError
from msb_proxy.progress import Progress

EXIT_CONFIG = 2
# What ls shows for each state: the words of the SDK's statuses and of the local backend.
STATE_WORDS = ["created", "starting", "running", "paused", "draining", "stopped", "crashed"]


class ThrowawayBackend(Backend):
    """A backend no module of msb_proxy names: it answers from what the test puts in ``listed``
    and records what it is asked to stop."""

    name = "throwaway"
    options: ClassVar[Mapping[str, Option]] = {
        "colour": Option(parse_string, "a colour name", default="grey")}
    listed: ClassVar[list[SandboxInfo]] = []
    stopped: ClassVar[list[str]] = []

    @classmethod
    def from_config(cls, config: Config) -> ThrowawayBackend:
        return cls()

    @classmethod
    def checks(cls, config: Config) -> list[Check]:
        return [Check("paint", CheckStatus.OK, "dry")]

    async def open(self, name: str, template: SandboxTemplate, progress: Progress) -> Sandbox:
        raise SandboxNotFoundError(f"there is no sandbox {name!r}")

    async def state_of(self, name: str) -> SandboxState | None:
        return next((info.state for info in self.listed if info.name == name), None)

    async def current_run(self, name: str) -> str | None:
        return None

    async def list(self) -> list[SandboxInfo]:
        return list(self.listed)

    async def stop(self, name: str) -> bool:
        self.stopped.append(name)
        return True

    async def remove(self, name: str) -> bool:
        return False


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``MSB_PROXY_HOME`` for commands run in this process, no backend forced."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MSB_PROXY_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MSB_PROXY_BACKEND", raising=False)
    return home


@pytest.fixture
def throwaway(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[ThrowawayBackend]]:
    monkeypatch.setitem(registry.BACKENDS, "throwaway", f"{__name__}:ThrowawayBackend")
    ThrowawayBackend.listed = []
    ThrowawayBackend.stopped = []
    yield ThrowawayBackend


def _cli(home: Path, *args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """The installed ``msb-proxy`` with ``home`` as its state and no backend forced."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MSB_PROXY_")}
    env.update(MSB_PROXY_HOME=str(home), HOME=str(home.parent), MSB_PROXY_WARM="0", **environ)
    return subprocess.run([str(PROXY), *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def _configure(home: Path, text: str) -> Path:
    path = home / "config.toml"
    path.write_text(text)
    return path


# ---- names


@pytest.mark.parametrize(("args", "environ", "source"), [
    (["--backend", "nope"], {}, "--backend"),
    ([], {"MSB_PROXY_BACKEND": "nope"}, "MSB_PROXY_BACKEND"),
], ids=["flag", "variable"])
def test_an_unknown_backend_is_one_line_naming_the_known_ones(
        home: Path, args: list[str], environ: dict[str, str], source: str) -> None:
    result = _cli(home, "ls", *args, **environ)
    known = ", ".join(registry.backend_names())
    assert (result.returncode, result.stdout, result.stderr) == (
        EXIT_CONFIG, "",
        f"msb-proxy: {source}: unknown backend 'nope'; expected one of {known}\n")


def test_an_unknown_backend_in_the_config_file_names_the_known_ones(home: Path) -> None:
    config = _configure(home, '[sandbox."web-*"]\nbackend = "nope"\n')
    result = _cli(home, "ls")
    known = ", ".join(registry.backend_names())
    assert (result.returncode, result.stdout, result.stderr) == (
        EXIT_CONFIG, "",
        f"msb-proxy: {config}: sandbox.\"web-*\".backend must be one of {known} (got 'nope')\n")


def test_a_throwaway_backend_is_reached_through_the_cli_once_it_is_in_the_table(
        throwaway: type[ThrowawayBackend], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["stop", "--backend", "throwaway", "box"]) == 0
    assert throwaway.stopped == ["box"]

    run(["doctor", "--backend", "throwaway"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["throwaway:", "paint", "ok", "dry"] in rows

    assert run(["ls", "--help"]) == 0
    assert registry.backend_names()[-1] == "throwaway"
    assert f"--backend {{{','.join(registry.backend_names())}}}" in capsys.readouterr().out


def test_a_throwaway_backend_takes_its_own_options_from_the_config_file(
        throwaway: type[ThrowawayBackend], home: Path) -> None:
    _configure(home, '[defaults]\nbackend = "throwaway"\n\n[sandbox."red-*"]\ncolour = "red"\n'
                     '\n[sandbox."jail-*"]\nbackend = "local"\n')
    config = load_config(os.environ, registry)
    assert config.template("red-1").options == {"colour": "red"}
    assert ThrowawayBackend.option(config.template("other"), "colour") == "grey"
    assert config.template("jail-1").backend == "local"


# ---- states


def test_ls_shows_every_state_in_the_words_it_always_had(
        throwaway: type[ThrowawayBackend], capsys: pytest.CaptureFixture[str]) -> None:
    assert {state.value for state in SandboxState} == set(STATE_WORDS)
    throwaway.listed = [SandboxInfo(name=f"s{number}", state=SandboxState(word),
                                    backend="throwaway")
                        for number, word in enumerate(STATE_WORDS)]

    assert run(["ls", "--backend", "throwaway", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": f"s{number}", "state": word, "backend": "throwaway", "alias": f"msb-s{number}"}
        for number, word in enumerate(STATE_WORDS)]

    assert run(["ls", "--backend", "throwaway"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "NAME  STATE     BACKEND    SSH"
    assert lines[1:] == [f"s{number}    {word.ljust(8)}  throwaway  msb-s{number}"
                         for number, word in enumerate(STATE_WORDS)]


# ---- options of one backend, not another


def test_a_key_of_another_backend_is_refused_naming_file_table_key_and_who_takes_it(
        home: Path) -> None:
    config = _configure(home, '[defaults]\nbackend = "local"\n\n[sandbox."web-*"]\ncpus = 2\n')
    result = _cli(home, "ls", "--backend", "local")
    assert (result.returncode, result.stdout, result.stderr) == (
        EXIT_CONFIG, "",
        f'msb-proxy: {config}: sandbox."web-*".cpus is not an option of the local backend but '
        'of microsandbox, microsandbox-cloud: remove it, or set backend = "microsandbox" in '
        'that table\n')


def test_a_bad_value_is_named_before_the_backend_that_does_not_take_it(home: Path) -> None:
    config = _configure(home, '[defaults]\nbackend = "local"\nmemory = "lots"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(os.environ, registry)
    assert str(caught.value) == (f'{config}: defaults.memory must be MiB as an integer, or a '
                                 "size such as \"2GiB\" (got 'lots')")


def test_a_table_that_names_its_backend_takes_that_backends_options(home: Path) -> None:
    _configure(home, '[defaults]\nbackend = "local"\nimage = "/srv/rootfs"\n\n'
                     '[sandbox."web-*"]\nbackend = "microsandbox"\nimage = "python:3.12"\n'
                     'cpus = 2\nmemory = "2GiB"\nworkdir = "/app"\nnetwork = "public"\n')
    config = load_config(os.environ, registry)
    web = config.template("web-1")
    assert (web.backend, dict(web.options)) == ("microsandbox", {
        "image": "python:3.12", "cpus": 2, "memory": 2048, "workdir": "/app",
        "network": "public"})
    other = config.template("db")
    assert (other.backend, dict(other.options)) == ("local", {"image": "/srv/rootfs"})
    assert config.backends_in_use == ("local", "microsandbox")


def test_tables_of_a_file_that_names_no_backend_are_checked_against_the_chosen_one(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _configure(home, '[sandbox."web-*"]\ncpus = 2\n')
    monkeypatch.setenv("MSB_PROXY_BACKEND", "local")
    with pytest.raises(ConfigError) as caught:
        load_config(os.environ, registry)
    assert str(caught.value) == (
        f'{path}: sandbox."web-*".cpus is not an option of the local backend but of '
        'microsandbox, microsandbox-cloud: remove it, or set backend = "microsandbox" in that '
        'table')
    monkeypatch.delenv("MSB_PROXY_BACKEND")
    assert load_config(os.environ, registry).template("web-1").options == {"cpus": 2}


def test_a_forced_backend_refuses_another_backends_options_for_the_sandboxes_they_reach(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _configure(home, '[sandbox."web-*"]\nbackend = "microsandbox"\ncpus = 2\n')
    monkeypatch.setenv("MSB_PROXY_BACKEND", "local")
    config = load_config(os.environ, registry)  # ls, stop and rm still work
    assert config.template("db").backend == "local"
    with pytest.raises(ConfigError) as caught:
        config.template("web-1")
    assert str(caught.value) == (
        f'{path}: sandbox."web-*".cpus is not an option of the local backend, which sandbox '
        "'web-1' uses (chosen by MSB_PROXY_BACKEND), but of microsandbox, microsandbox-cloud: "
        "remove it, or choose that backend for 'web-1'")


# ---- start-up


def test_a_local_connection_imports_no_other_backend(home: Path) -> None:
    _configure(home, '[defaults]\nbackend = "local"\nvolumes = ["/srv:/srv"]\n')
    script = ("import os, sys\n"
              "from msb_proxy.backends import registry\n"
              "from msb_proxy.config import load_config\n"
              "config = load_config(os.environ, registry)\n"
              "registry.open_backend(config, config.template('api').backend)\n"
              "print(sorted(m for m in sys.modules if 'microsandbox' in m))\n")
    env = dict(os.environ, MSB_PROXY_HOME=str(home))
    env.pop("MSB_PROXY_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=60, check=True)
    assert result.stdout == "[]\n"
