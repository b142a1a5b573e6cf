"""``python -m msb_proxy`` is the ``msb-proxy`` command."""

from msb_proxy.cli.main import main

main()
