"""The ``msb-proxy`` commands other than ``stdio``, one module each with ``run(config, args)``.

They are imported only when invoked, so that ``msb-proxy stdio`` stays fast.
"""
