"""Test-only: the msb-proxy process started with this directory on ``PYTHONPATH`` and
``MSB_PROXY_TEST_STANDIN=DIR`` gets the SDK stand-in (``tests/microsandbox_standin.py``, state in
DIR) as its microsandbox SDK, so the real ``ssh`` client can drive the microsandbox backend on
a machine where microVMs cannot boot (and ``MSB_PROXY_TEST_GUEST_RUN=DIR``, the guest run
directory of named sessions' keeper). Python imports ``sitecustomize`` at start-up."""

import os

_STATE = os.environ.get("MSB_PROXY_TEST_STANDIN")
if _STATE:
    from pathlib import Path

    from microsandbox_standin import StandInSDK

    from msb_proxy.backends.microsandbox import backend as _backend

    _directory = Path(_STATE)

    def _standin() -> StandInSDK:
        return StandInSDK(_directory)

    _backend._load_sdk = _standin
    # The stand-in's guest processes share the host's file system: the session keeper's socket
    # goes where the test says (MSB_PROXY_TEST_GUEST_RUN), not to the host's /run.
    _run = os.environ.get("MSB_PROXY_TEST_GUEST_RUN")
    if _run:
        _backend.MicrosandboxSandbox.guest_run_dir = _run
