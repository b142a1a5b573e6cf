"""Byte streams an SSH connection runs over (``stdio``: fd 0/1, sockets) and the write
batching of the data path (``batching``). Knows nothing of SSH or of sandboxes."""
