"""The ``msb-proxy`` command line: argument parsing, one-line errors and exit codes (``main``),
the warm server that makes ``stdio`` start fast (``warm``), and the other commands
(``commands/``). The top layer: it reads the environment and argv, builds one
:class:`~msb_proxy.config.Config` and hands it down; nothing below imports from here."""
