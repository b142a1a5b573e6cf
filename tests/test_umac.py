"""The cached-key UMAC computes exactly what asyncssh's per-packet UMAC computes, and only the
connections the fast path is attached to get it."""

from __future__ import annotations

import os
import random

import pytest
from asyncssh import mac as asyncssh_mac

from msb_proxy.fastpath import umac

ALGORITHMS = [b"umac-64-etm@openssh.com", b"umac-128-etm@openssh.com",
              b"umac-64@openssh.com", b"umac-128@openssh.com"]


Reference = tuple[bytes, dict[bytes, asyncssh_mac.MAC]]


class _Connection:
    """Stands in for an asyncssh connection: its key change makes a MAC, as send_newkeys
    does (asyncssh/connection.py), here for one algorithm and key."""

    def __init__(self, name: bytes, key: bytes) -> None:
        self.name, self.key = name, key
        self.made: asyncssh_mac.MAC | None = None

    def send_newkeys(self, k: bytes, h: bytes) -> None:
        self.made = asyncssh_mac.get_mac(self.name, self.key)


def _ours(name: bytes, key: bytes) -> umac.CachedKeyUMAC:
    """The MAC a connection with the fast path attached gets for ``name`` and ``key``."""
    conn = _Connection(name, key)
    assert umac.attach(conn), "nettle's UMAC is not available here"
    conn.send_newkeys(b"", b"")
    assert isinstance(conn.made, umac.CachedKeyUMAC)
    return conn.made


@pytest.fixture(scope="module")
def reference() -> Reference:
    """A key and asyncssh's own handlers for it."""
    key = os.urandom(16)
    made = {name: asyncssh_mac.get_mac(name, key) for name in ALGORITHMS}
    return key, made


@pytest.mark.parametrize("name", ALGORITHMS)
def test_same_tags_as_asyncssh(reference: Reference, name: bytes) -> None:
    key, theirs = reference
    ours = _ours(name, key)
    rng = random.Random(7)
    # In sequence across byte and word boundaries of the nonce, after gaps, and at the wrap.
    runs = [range(300), range(65530, 65542), range(2**32 - 3, 2**32 + 3),
            range(2**64 - 3, 2**64), range(3), [17, 5, 5, 2**40]]
    for seqs in runs:
        for seq in seqs:
            packet = rng.randbytes(rng.choice([0, 1, 16, 1023, 1024, 1025, 32768,
                                               rng.randrange(40000)]))
            expected = theirs[name].sign(seq, packet)
            assert ours.sign(seq, packet) == expected, (seq, len(packet))
            assert ours.verify(seq, packet, expected)
            assert not ours.verify(seq, packet, bytes(len(expected)))


def test_only_attached_connections_get_the_cached_key_umac() -> None:
    key = os.urandom(16)
    attached = _ours(b"umac-64-etm@openssh.com", key)
    other = _Connection(b"umac-64-etm@openssh.com", key)
    other.send_newkeys(b"", b"")  # a connection without the fast path: asyncssh's own
    assert other.made is not None and not isinstance(other.made, umac.CachedKeyUMAC)
    assert attached.sign(3, b"packet") == other.made.sign(3, b"packet")
    again = _Connection(b"umac-64-etm@openssh.com", key)
    assert umac.attach(again) and umac.attach(other)  # attaching twice is harmless
    umac.detach(again)  # and detached, its next key change is asyncssh's again
    again.send_newkeys(b"", b"")
    assert not isinstance(again.made, umac.CachedKeyUMAC)


def test_sign_parts_is_sign_of_the_joined_parts(reference: Reference) -> None:
    key, _ = reference
    ours = _ours(b"umac-64-etm@openssh.com", key)
    rng = random.Random(11)
    for seq in [0, 1, 2, 900, 3, 2**32]:
        parts = [rng.randbytes(rng.choice([0, 4, 31, 1024, 32768])) for _ in range(3)]
        joined = ours.sign(seq, b"".join(parts))
        assert ours.sign_parts(seq, *parts) == joined
