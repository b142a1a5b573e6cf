"""The rules of named sessions that every keeper embeds (``msb_proxy/guest/sessions.py``): what
the ring keeps, where the repaint starts, who may attach, when a detached session expires.

The end-to-end behaviour through the real ``ssh`` is in ``test_named_sessions.py``; these pin
the pieces a second keeper (the microsandbox guest agent) reuses, on this host's own terminal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from msb_proxy.guest.sessions import (
    CLEAR_SCREEN,
    OutputRing,
    Session,
    SessionRefused,
    SessionTable,
    repaint,
    take_over_reason,
)


def test_ring_keeps_the_last_bytes_from_the_first_whole_line() -> None:
    ring = OutputRing(10)
    ring.append(b"abc\ndefghij\nkl")  # 15 bytes: "abc\n" dropped, exactly one line
    assert ring.contents() == b"defghij\nkl"
    ring.append(b"mn")  # "de" dropped: the kept start is mid-line, so it starts after it
    assert ring.contents() == b"kl" + b"mn"
    assert repaint(ring) == CLEAR_SCREEN + b"klmn"


def test_a_ring_that_lost_nothing_is_replayed_whole() -> None:
    ring = OutputRing(100)
    ring.append(b"partial line, no newline")
    assert ring.contents() == b"partial line, no newline"


@pytest.fixture
def terminal() -> Iterator[int]:
    master, slave = os.openpty()
    yield master
    os.close(slave)
    os.close(master)


def _session(master: int, uid: int = 1000, timeout: float = 0.0) -> Session:
    return Session("work", user="dev", uid=uid, pid=os.getpid(), master=master, cols=80,
                   rows=24, timeout=timeout, now=100.0)


def test_claiming_a_session_takes_over_an_attached_one_and_refuses_another_user(
    terminal: int,
) -> None:
    table = SessionTable()
    assert table.claim("work", 1000) == (None, False)
    session = _session(terminal)
    table.add(session)
    assert table.claim("work", 1000) == (session, False)
    session.attach(100, 30)
    assert table.claim("work", 1000) == (session, True)
    with pytest.raises(SessionRefused) as refused:
        table.claim("work", 0)
    assert str(refused.value) == "session 'work' belongs to another user (dev); pick another name"
    assert take_over_reason("work") == "session 'work' was taken over by another connection"


def test_a_detached_session_expires_after_its_timeout_only(terminal: int) -> None:
    table = SessionTable()
    session = _session(terminal, timeout=5.0)
    table.add(session)
    session.attach(80, 24)
    assert table.expired(1000.0) == []  # attached: never
    session.detach(now=200.0)
    assert table.next_expiry() == 205.0
    assert table.expired(205.0) == []
    assert table.expired(205.5) == [session]
    assert table.by_name == {}  # the name is free: the next attach starts a new shell


def test_a_session_without_a_timeout_never_expires(terminal: int) -> None:
    table = SessionTable()
    session = _session(terminal)
    table.add(session)
    session.detach(now=200.0)
    assert (table.next_expiry(), table.expired(10.0 ** 9)) == (None, [])


def test_info_is_what_msb_proxy_sessions_lists(terminal: int) -> None:
    session = _session(terminal)
    session.attach(132, 50)
    session.detach(now=160.0)
    info = session.info(now=190.0)
    assert info == {"name": "work", "user": "dev", "created": 100.0, "idle": info["idle"],
                    "cols": 132, "rows": 50, "attached": False, "detached_for": 30.0}
