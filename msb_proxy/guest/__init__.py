"""Code that runs inside the guest, shipped as package data and started through the backend.

Each module here uses the standard library only and runs on old Python 3 versions, because it
may be executed by whatever ``python3`` the guest has.
"""
