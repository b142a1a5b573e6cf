"""The fast path: the only code that reaches into asyncssh's and asyncio's private state."""
