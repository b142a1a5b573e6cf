"""SSH terminal modes (RFC 4254 section 8, RFC 8160) applied to a Linux terminal.

Standard library only: the local backend's jail init imports this before it pivots into the
guest's root, where no other module can be loaded.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Mapping

__all__ = ["apply_modes", "set_window_size"]

# opcode -> index into the control-character array
_CC = {
    1: "VINTR", 2: "VQUIT", 3: "VERASE", 4: "VKILL", 5: "VEOF", 6: "VEOL", 7: "VEOL2",
    8: "VSTART", 9: "VSTOP", 10: "VSUSP", 11: "VDSUSP", 12: "VREPRINT", 13: "VWERASE",
    14: "VLNEXT", 15: "VFLUSH", 16: "VSWTC", 17: "VSTATUS", 18: "VDISCARD",
}
# opcode -> (index of the flag word in the tcgetattr list, flag name)
_IFLAG, _OFLAG, _CFLAG, _LFLAG = 0, 1, 2, 3
_FLAGS = {
    30: (_IFLAG, "IGNPAR"), 31: (_IFLAG, "PARMRK"), 32: (_IFLAG, "INPCK"), 33: (_IFLAG, "ISTRIP"),
    34: (_IFLAG, "INLCR"), 35: (_IFLAG, "IGNCR"), 36: (_IFLAG, "ICRNL"), 37: (_IFLAG, "IUCLC"),
    38: (_IFLAG, "IXON"), 39: (_IFLAG, "IXANY"), 40: (_IFLAG, "IXOFF"), 41: (_IFLAG, "IMAXBEL"),
    42: (_IFLAG, "IUTF8"),
    50: (_LFLAG, "ISIG"), 51: (_LFLAG, "ICANON"), 52: (_LFLAG, "XCASE"), 53: (_LFLAG, "ECHO"),
    54: (_LFLAG, "ECHOE"), 55: (_LFLAG, "ECHOK"), 56: (_LFLAG, "ECHONL"), 57: (_LFLAG, "NOFLSH"),
    58: (_LFLAG, "TOSTOP"), 59: (_LFLAG, "IEXTEN"), 60: (_LFLAG, "ECHOCTL"),
    61: (_LFLAG, "ECHOKE"), 62: (_LFLAG, "PENDIN"),
    70: (_OFLAG, "OPOST"), 71: (_OFLAG, "OLCUC"), 72: (_OFLAG, "ONLCR"), 73: (_OFLAG, "OCRNL"),
    74: (_OFLAG, "ONOCR"), 75: (_OFLAG, "ONLRET"),
    92: (_CFLAG, "PARENB"), 93: (_CFLAG, "PARODD"),
}
_CS7, _CS8, _ISPEED, _OSPEED = 90, 91, 128, 129
_DISABLED = 255  # OpenSSH sends 255 for a disabled control character


def apply_modes(fd: int, modes: Mapping[int, int]) -> None:
    """Set the terminal on ``fd`` to the SSH ``modes``; unknown opcodes are ignored."""
    attrs = termios.tcgetattr(fd)
    cc = attrs[6]
    for opcode, value in modes.items():
        if opcode in _CC:
            index = getattr(termios, _CC[opcode], None)
            if index is not None:
                char = 0 if value == _DISABLED else value & 0xFF
                cc[index] = bytes([char]) if isinstance(cc[index], bytes) else char
        elif opcode in _FLAGS:
            word, name = _FLAGS[opcode]
            flag = getattr(termios, name, None)
            if flag is not None:
                attrs[word] = attrs[word] | flag if value else attrs[word] & ~flag
        elif opcode in (_CS7, _CS8) and value:
            attrs[_CFLAG] = (attrs[_CFLAG] & ~termios.CSIZE) | (
                termios.CS7 if opcode == _CS7 else termios.CS8
            )
        elif opcode in (_ISPEED, _OSPEED):
            speed = getattr(termios, f"B{value}", None)
            if speed is not None:
                attrs[4 if opcode == _ISPEED else 5] = speed
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def set_window_size(fd: int, cols: int, rows: int, pixel_width: int, pixel_height: int) -> None:
    """Set the terminal size on ``fd``; the kernel sends SIGWINCH to its foreground group."""
    clamp = [max(0, min(v, 0xFFFF)) for v in (rows, cols, pixel_width, pixel_height)]
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", *clamp))
