"""SSH terminal modes (RFC 4254 section 8, RFC 8160) applied to a Linux terminal.

The guest agent's own code (``msb_proxy/guest/agent.py``, standard library only), so that a
terminal is set up the same on every backend; the local backend's jail init imports it before
it pivots into the guest's root, where no other module can be loaded.
"""

from __future__ import annotations

from msb_proxy.guest.agent import apply_modes, set_window_size

__all__ = ["apply_modes", "set_window_size"]
