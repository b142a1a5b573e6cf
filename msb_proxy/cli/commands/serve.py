"""``msb-proxy serve NAME [--host HOST] [--port PORT]``: sandbox NAME on a TCP port, for
clients that cannot run a ProxyCommand (``ssh -p 2222 root@127.0.0.1``, ``sftp -P``,
``scp -P``, ``rsync -e 'ssh -p 2222'``). SIGINT or SIGTERM stops it: no new connections, open
ones closed, exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from msb_proxy.backends.idle import ConnectionTracker
from msb_proxy.client.listener import is_loopback, listen
from msb_proxy.client.namespace import SandboxSsh
from msb_proxy.config import Config, sandbox_name_from_host
from msb_proxy.state import StateDir

__all__ = ["run"]


def run(config: Config, args: argparse.Namespace) -> int:
    name = sandbox_name_from_host(args.name, None)
    if not config.debug:  # a client's protocol errors are its own, as for sshd: not logged
        logging.getLogger("asyncssh").setLevel(logging.CRITICAL)
    if not is_loopback(args.host):
        print(f"msb-proxy: warning: listening on {args.host}, not a loopback address: other "
              "machines can reach sandbox " f"{name!r} (with an authorized key)",
              file=sys.stderr, flush=True)

    def listening(host: str, port: int) -> None:
        print(f"msb-proxy: sandbox {name!r} listening on {host}:{port}", file=sys.stderr,
              flush=True)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        server = await SandboxSsh(name, config=config).server()
        await listen(server, args.host, args.port, stop, on_listening=listening)

    with ConnectionTracker(StateDir(config.home), name, config.template(name), os.environ):
        asyncio.run(serve())
    return 0
