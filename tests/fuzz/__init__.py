"""A fuzzer for msb-proxy's SSH server side: mutated SSH streams, before and after key exchange.

* :mod:`fuzz.client`: a small SSH client of our own that controls every byte it sends (its
  version line, each packet's length, padding, payload and MAC), with the key exchange,
  public-key authentication and channel bookkeeping needed to reach any state first.
* :mod:`fuzz.cases`: what one case is (steps drawn by hypothesis strategies) and what must
  hold after it (the oracles): the server ends within a bound once the client is gone, no
  uncaught exception, nothing but SSH on its output, well-formed requests never end the
  connection, memory bounded.
* :mod:`fuzz.servers`: where the server runs: in this process (the ``SshServer`` API over a
  pipe pair, as ``msb-proxy stdio`` serves fd 0/1) or as the real ``msb-proxy stdio`` process.
* ``python -m fuzz`` (run with ``tests`` on ``sys.path``; ``make fuzz``): the long run.
  ``tests/test_fuzz.py`` runs a short seeded slice in ``make test``.
"""
