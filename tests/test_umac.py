"""The cached-key UMAC computes exactly what asyncssh's per-packet UMAC computes."""

from __future__ import annotations

import os
import random

import pytest
from asyncssh import mac as asyncssh_mac

from msb_proxy.fastpath import umac

ALGORITHMS = [b"umac-64-etm@openssh.com", b"umac-128-etm@openssh.com",
              b"umac-64@openssh.com", b"umac-128@openssh.com"]


Reference = tuple[bytes, dict[bytes, asyncssh_mac.MAC]]


@pytest.fixture(scope="module")
def reference() -> Reference:
    """A key and asyncssh's own handlers for it, made before ours replace them."""
    key = os.urandom(16)
    made = {name: asyncssh_mac.get_mac(name, key) for name in ALGORITHMS}
    assert umac.install(), "nettle's UMAC is not available here"
    return key, made


@pytest.mark.parametrize("name", ALGORITHMS)
def test_same_tags_as_asyncssh(reference: Reference, name: bytes) -> None:
    key, theirs = reference
    ours = asyncssh_mac.get_mac(name, key)
    assert isinstance(ours, umac.CachedKeyUMAC)
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


def test_install_is_idempotent() -> None:
    assert umac.install()
    assert umac.install()
    handler, _, _ = asyncssh_mac._mac_handler[b"umac-64-etm@openssh.com"]
    assert handler is umac.CachedKeyUMAC


def test_sign_parts_is_sign_of_the_joined_parts(reference: Reference) -> None:
    key, _ = reference
    ours = asyncssh_mac.get_mac(b"umac-64-etm@openssh.com", key)
    assert isinstance(ours, umac.CachedKeyUMAC)
    rng = random.Random(11)
    for seq in [0, 1, 2, 900, 3, 2**32]:
        parts = [rng.randbytes(rng.choice([0, 4, 31, 1024, 32768])) for _ in range(3)]
        joined = ours.sign(seq, b"".join(parts))
        assert ours.sign_parts(seq, *parts) == joined
