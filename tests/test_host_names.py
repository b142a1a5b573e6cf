"""What the host OpenSSH passes names: a sandbox, a fork of one, a named session
(``msb_proxy.config.parse_host``); the bad ones are in test_cli.py's BAD_HOSTS."""

from __future__ import annotations

import pytest

from msb_proxy.config import HostTarget, parse_host
from msb_proxy.errors import ConfigError

HOSTS = {
    "plain": ("msb-api", HostTarget(sandbox="api")),
    "throwaway-fork": ("msb-api.fork",
                       HostTarget(sandbox="api", fork_of="api", ephemeral_fork=True)),
    "kept-fork": ("msb-api.fork-exp", HostTarget(sandbox="api.fork-exp", fork_of="api")),
    "a-kept-fork-used-again-is-that-fork": (
        "msb-api.fork-exp", HostTarget(sandbox="api.fork-exp", fork_of="api")),
    "fork-of-a-kept-fork": ("msb-api.fork-exp.fork",
                            HostTarget(sandbox="api.fork-exp", fork_of="api.fork-exp",
                                       ephemeral_fork=True)),
    "named-session": ("msb-api+work", HostTarget(sandbox="api", session="work")),
    "named-session-in-a-fork": ("msb-api.fork-exp+w.1",
                                HostTarget(sandbox="api.fork-exp", fork_of="api",
                                           session="w.1")),
    "a-name-that-only-contains-fork": ("msb-forklift", HostTarget(sandbox="forklift")),
    "a-throwaway-forks-own-name": ("msb-api.fork.1a2b3c4d",
                                   HostTarget(sandbox="api.fork.1a2b3c4d")),
}


@pytest.mark.parametrize(("host", "target"), HOSTS.values(), ids=HOSTS.keys())
def test_host_names_sandbox_fork_and_session(host: str, target: HostTarget) -> None:
    assert parse_host(host, "msb-") == target


def test_a_bad_session_name_is_one_line_naming_the_host() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_host("msb-api+-x", "msb-")
    assert str(caught.value) == (
        "host 'msb-api+-x': bad session name '-x': 1-64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit")
