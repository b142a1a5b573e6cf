"""Test-only: the msb-proxy process started with this directory on ``PYTHONPATH`` and
``MSB_PROXY_TEST_STANDIN=DIR`` gets the SDK stand-in (``tests/microsandbox_standin.py``, state in
DIR) as its microsandbox SDK, so the real ``ssh`` client can drive the microsandbox backend on
a machine where microVMs cannot boot. Python imports ``sitecustomize`` at start-up."""

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
