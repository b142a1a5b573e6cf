"""The ``msb-proxy`` console script.

``msb-proxy stdio`` is what OpenSSH runs as a ProxyCommand; it must start fast. It first offers
the connection to the warm server (``warm.py``), which needs almost nothing imported; only when
that declines does this process carry out the command line itself (``commandline.py``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``msb-proxy`` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    code: int | None = None
    if arguments[:1] == ["stdio"] and "--debug" not in arguments:
        from msb_proxy.cli.warm import delegate

        code = delegate(arguments, os.environ)
    if code is None:
        from msb_proxy.cli.commandline import run

        code = run(arguments)
    # Leave without interpreter finalization: the microsandbox SDK's runtime threads may still
    # be winding down and would print a panic if Python were torn down under them.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)
