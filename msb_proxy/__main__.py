"""``python -m msb_proxy`` is the ``msb-proxy`` command."""

from .cli import main

main()
