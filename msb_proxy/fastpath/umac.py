"""UMAC for the SSH packet MAC with the key set once per direction, not once per packet.

OpenSSH clients pick ``umac-64-etm@openssh.com`` first whenever the server offers it. asyncssh
computes it through nettle like this: a fresh 4 KiB context, ``set_key`` (UMAC's key setup runs
AES to derive about 1 KiB of subkeys), ``set_nonce``, ``update``, ``digest``, for every packet.
The key never changes within a direction, so everything up to the nonce can be done once; that
is what OpenSSH does. Per packet it is then three nettle calls, which halves the cost of a
small packet (the per-packet work that decides small-file transfers, ``git`` and interactive
use) and trims bulk transfers.

:func:`attach` gives one connection this MAC: asyncssh's table of MAC algorithms gets, once per
process, a dispatcher for the UMAC entries that makes ours during that connection's key changes
and asyncssh's own for every other connection. When nettle or those entries are missing it
leaves asyncssh's own, which compute the same MAC (the tests check the two agree byte for
byte).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hmac
import struct
import threading
from typing import Any

from msb_proxy.fastpath import gate

__all__ = ["JOIN_BELOW", "CachedKeyUMAC", "attach", "detach", "load"]

_CONTEXT_SIZE = 4096  # nettle's umac128_ctx is about 2.5 KiB; asyncssh allots the same 4 KiB
_PACK_SEQ = struct.Struct(">Q").pack
_SEQ_MASK = (1 << 64) - 1
JOIN_BELOW = 4096  # bytes; parts of a packet up to this size are MACed as one
_ALGORITHMS = {  # asyncssh name -> (nettle prefix, tag bytes)
    b"umac-64-etm@openssh.com": ("nettle_umac64_", 8),
    b"umac-128-etm@openssh.com": ("nettle_umac128_", 16),
    b"umac-64@openssh.com": ("nettle_umac64_", 8),
    b"umac-128@openssh.com": ("nettle_umac128_", 16),
}
_SONAME = "libnettle.so.8"
_installed = False


def _nettle() -> ctypes.CDLL | None:
    # PyDLL: the calls keep the GIL, which costs less than releasing and taking it back
    # around a call that takes well under a microsecond. The soname nettle has had since 2020
    # first: find_library runs ldconfig in a subprocess.
    with contextlib.suppress(OSError):
        return ctypes.PyDLL(_SONAME)
    for name in ("nettle", "libnettle"):
        found = ctypes.util.find_library(name)
        if found:
            with contextlib.suppress(OSError):
                return ctypes.PyDLL(found)
    return None


def _function(library: ctypes.CDLL, name: str) -> Any:
    """A nettle ``f(ctx, size_t, bytes)`` function with its argument types declared (faster
    to call, and the length passed as a full size_t)."""
    function = getattr(library, name)
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    function.restype = None
    return function


def _address(function: Any) -> int:
    """Where a ctypes function points."""
    return int(ctypes.cast(function, ctypes.c_void_p).value or 0)


class CachedKeyUMAC:
    """An asyncssh MAC handler (``sign``/``verify``) for one direction of one connection."""

    def __init__(self, key: bytes, hash_size: int, library: ctypes.CDLL, prefix: str) -> None:
        self._keyed = ctypes.create_string_buffer(_CONTEXT_SIZE)
        getattr(library, prefix + "set_key")(self._keyed, key)
        self._context = ctypes.addressof(self._keyed)
        self._set_nonce = _function(library, prefix + "set_nonce")
        self._update = _function(library, prefix + "update")
        self._digest = _function(library, prefix + "digest")
        self._tag = ctypes.create_string_buffer(hash_size)
        self._hash_size = hash_size
        # The sequence number the context's nonce is at after the last digest (-1: unknown);
        # C code that computes tags on this context hands it back here.
        self.next_seq = -1
        # For that C code: (context, set_nonce, update, digest, tag bytes), as addresses.
        self.native = (self._context, _address(self._set_nonce), _address(self._update),
                       _address(self._digest), hash_size)

    def sign(self, seq: int, packet: bytes) -> bytes:
        """The tag of ``packet``."""
        return self._tag_of(seq, (packet,))

    def sign_parts(self, seq: int, *parts: bytes) -> bytes:
        """The tag of the parts joined; large parts are not copied to join them."""
        if sum(map(len, parts)) <= JOIN_BELOW:
            return self._tag_of(seq, (b"".join(parts),))  # a copy costs less than a call
        return self._tag_of(seq, parts)

    def _tag_of(self, seq: int, parts: tuple[bytes, ...]) -> bytes:
        # The nonce is the packet's 64-bit sequence number (RFC 4418 as OpenSSH uses it).
        # digest() resets the hash and increments the nonce, the key untouched: packets come
        # in sequence, so the nonce is set only for the first one and after a gap.
        context = self._context
        if seq != self.next_seq:
            self._set_nonce(context, 8, _PACK_SEQ(seq))
        for part in parts:
            self._update(context, len(part), part)
        self._digest(context, self._hash_size, self._tag)
        self.next_seq = seq + 1 if seq < _SEQ_MASK else -1
        return self._tag.raw

    def verify(self, seq: int, packet: bytes, sig: bytes) -> bool:
        return hmac.compare_digest(self.sign(seq, packet), sig)


class _Keying(threading.local):
    """Per thread (each runs its own event loop): how deep a key change of a connection with
    the fast path is running; only then do asyncssh's UMAC entries make a CachedKeyUMAC."""

    depth = 0


_keying = _Keying()


def _dispatcher(original: Any, library: ctypes.CDLL, prefix: str) -> Any:
    """A MAC handler for asyncssh's table: ours during a key change of a connection
    :func:`attach` was called for, asyncssh's own for every other connection."""

    def make(key: bytes, hash_size: int, *args: Any) -> Any:
        if _keying.depth:
            return CachedKeyUMAC(key, hash_size, library, prefix)
        return original(key, hash_size, *args)

    return make


def _install_table() -> bool:
    """Put the dispatchers in asyncssh's MAC table, once per process; whether they are."""
    global _installed
    if _installed:
        return True
    table = gate.MAC_HANDLERS
    library = _nettle()
    if library is None or not isinstance(table, dict) or not all(
            name in table for name in _ALGORITHMS):
        return False
    for name, (prefix, tag_size) in _ALGORITHMS.items():
        _, hash_size, _ = table[name]
        if hash_size != tag_size:
            return False
        if not all(hasattr(library, prefix + part)
                   for part in ("set_key", "set_nonce", "update", "digest")):
            return False
    for name, (prefix, _) in _ALGORITHMS.items():
        handler, hash_size, args = table[name]
        table[name] = (_dispatcher(handler, library, prefix), hash_size, args)
    _installed = True
    return True


def attach(conn: Any) -> bool:
    """Have ``conn``'s key changes make CachedKeyUMAC for UMAC; whether they will.

    asyncssh makes both directions' MAC objects in ``send_newkeys``; a wrapper on this one
    connection marks that call, so other connections keep asyncssh's own UMAC."""
    if not _install_table() or not callable(getattr(conn, "send_newkeys", None)):
        return False
    original = conn.send_newkeys

    def send_newkeys(k: bytes, h: bytes) -> None:
        _keying.depth += 1
        try:
            original(k, h)
        finally:
            _keying.depth -= 1

    conn.send_newkeys = send_newkeys
    return True


def detach(conn: Any) -> None:
    """Later key changes of ``conn`` make asyncssh's own UMAC (the current one stays: it
    computes the same tags)."""
    if "send_newkeys" in vars(conn):
        del conn.send_newkeys


def load() -> None:
    """Load nettle and fill the table now (the warm server does, once, for its children)."""
    _install_table()
