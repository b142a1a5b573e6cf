"""The optional C loop of the relay (msb_proxy/fastpath/_relay.c); everything else is in pyproject.toml.

``optional=True``: where no C compiler or Python headers are found the build goes on without
it and msb-proxy runs the same loop in Python (msb_proxy/fastpath/relay.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("msb_proxy.fastpath._relay", ["msb_proxy/fastpath/_relay.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
