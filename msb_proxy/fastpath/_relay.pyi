"""Types of the C loop of relay.Relay (msb_proxy/_relay.c); see relay.py for how it is called."""

from collections.abc import Callable

def run(
    fds: tuple[int, int, int, int, int],
    inbound: tuple[Callable[[bytes], bytes], int, int, int, int, int, int, int],
    outbound: tuple[Callable[[bytes], bytes], int, int, int, int, int, int, int],
    limits: tuple[int, int, int, int, int, int, bool, int, int, int, int, int, float, float],
    held: bytes,
) -> tuple[int, tuple[int, int, int, int, int, int, int, int, int], bytes | None, bytes | None,
           bytes | None, bytes | None, bytes | None, bytes | None]: ...

