"""msb-proxy's version, in a module of its own so that any layer can name it without importing
the package's public API (``msb_proxy/__init__.py``), which names every layer."""

__version__ = "0.1.0"
