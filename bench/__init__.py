"""msb-proxy's benchmark: msb-proxy against OpenSSH's own sshd, serving the same jail.

``make bench`` (``python -m bench``) starts one local-backend sandbox through msb-proxy, sets up
``sshd -i`` inside it, and times the real ``ssh`` client against both side by side, printing a
Markdown table of medians and msb-proxy/sshd ratios. ``rows`` holds what is measured,
``harness`` the two sides and their clean-up, ``report`` the table. ``forks``
(``python -m bench.forks``, run by ``make bench`` too) times a shell in a fresh fork, which
sshd has no counterpart of.
"""
