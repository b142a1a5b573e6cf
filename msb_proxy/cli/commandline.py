"""One ``msb-proxy`` command line carried out in this process: argument parsing, the
:class:`~msb_proxy.config.Config` it is validated into, exit codes and one-line errors.

Called by the console script (``main.py``) and by the warm server's children (``warm.py``).
Only ``stdio`` imports asyncssh and a backend, and in that mode stdout belongs to the SSH
protocol: nothing else is ever written there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from msb_proxy.client import DEFAULT_SSH_HOST, DEFAULT_SSH_PORT
from msb_proxy.errors import BackendUnavailableError, ConfigError, UserError
from msb_proxy.version import __version__

if TYPE_CHECKING:
    import asyncio
    from pathlib import Path

    from msb_proxy.config import Config, SandboxTemplate
    from msb_proxy.state import StateDir

__all__ = ["run"]

# Commands that live in msb_proxy/cli/commands/, each a module with run(config, args) -> int.
COMMAND_MODULES = {"config": "ssh_config", "authorize": "authorize", "doctor": "doctor",
                   "ls": "ls", "serve": "serve", "connect": "connect", "audit": "audit",
                   "sessions": "sessions"}
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_NOT_LOGGED_IN = 255  # sshd -i: the connection ended before the client logged in


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _print_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    from msb_proxy.backends.registry import backend_names
    from msb_proxy.config import DEFAULT_BACKEND

    common = _Parser(add_help=False)
    # Not argparse's choices: load_config names a wrong one as it does a wrong MSB_PROXY_BACKEND.
    common.add_argument("--backend", metavar="{" + ",".join(backend_names()) + "}",
                        help="sandbox runtime (default: config file, $MSB_PROXY_BACKEND, "
                             f"else {DEFAULT_BACKEND})")
    common.add_argument("--debug", action="store_true",
                        help="log the SSH protocol and show tracebacks on stderr")

    parser = _Parser(prog="msb-proxy", description="SSH into microsandbox sandboxes.")
    parser.add_argument("--version", action="version", version=f"msb-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    stdio = commands.add_parser(
        "stdio", parents=[common],
        help="serve one SSH connection on stdin/stdout (use as an OpenSSH ProxyCommand)",
        description="Serve one SSH connection on stdin/stdout, then exit. Use it as "
                    "'ProxyCommand msb-proxy stdio --host-prefix msb- %%n'.")
    stdio.add_argument("--host-prefix", default="", metavar="PREFIX",
                       help="strip PREFIX from HOST to get the sandbox name")
    stdio.add_argument("-q", "--quiet", action="store_true",
                       help="print no progress while a sandbox is created or started")
    stdio.add_argument("host", metavar="HOST", help="the host name OpenSSH was given (%%n)")

    for name, text in (("stop", "stop a sandbox"),
                       ("rm", "stop and delete a sandbox (its host key is kept)")):
        sub = commands.add_parser(name, parents=[common], help=text, description=text + ".")
        sub.add_argument("name", metavar="NAME", help="sandbox name")

    config = commands.add_parser(
        "config", parents=[common], help="print or install the ssh_config block for msb-proxy",
        description="Print the ssh_config block that makes 'ssh PREFIXNAME' reach sandbox NAME, "
                    "or install it: an include file in ~/.ssh plus one Include line at the top "
                    "of ~/.ssh/config.")
    action = config.add_mutually_exclusive_group()
    action.add_argument("--install", action="store_true",
                        help="install the block (idempotent; ~/.ssh/config is backed up first)")
    action.add_argument("--uninstall", action="store_true",
                        help="remove exactly what --install added")
    config.add_argument("--prefix", default="msb-", help="host name prefix (default: msb-)")
    config.add_argument("--user", default="root", help="guest user to log in as (default: root)")
    config.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra ssh_config option for these hosts (repeatable)")
    config.add_argument("--listener", metavar="NAME",
                        help="print instead a block for 'msb-proxy serve NAME': host "
                             "PREFIXNAME-listener, checked against the sandbox's pinned key")
    config.add_argument("--listen-host", default=DEFAULT_SSH_HOST, metavar="HOST",
                        help=f"with --listener: where it listens (default: {DEFAULT_SSH_HOST})")
    config.add_argument("--listen-port", type=_port, default=DEFAULT_SSH_PORT, metavar="PORT",
                        help=f"with --listener: its port (default: {DEFAULT_SSH_PORT})")

    authorize = commands.add_parser(
        "authorize", parents=[common], help="allow a public key to log in to every sandbox",
        description="Add public keys to $MSB_PROXY_HOME/authorized_keys (deduplicated, 0600).")
    source = authorize.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", metavar="PATH",
                        help="a public key file (e.g. ~/.ssh/id_ed25519.pub)")
    source.add_argument("--key", metavar="KEY", help="a public key line")
    source.add_argument("--stdin", action="store_true", help="public key lines from stdin")

    commands.add_parser(
        "doctor", parents=[common], help="check that everything msb-proxy needs is in place",
        description="Check the backend, keys, config and ssh_config, and per sandbox the guest "
                    "tools that features need; exit non-zero when something essential is missing.")

    _add_client_commands(commands.add_parser, common)

    ls = commands.add_parser("ls", parents=[common], help="list sandboxes",
                             description="List sandboxes with their state, backend and ssh alias.")
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ls.add_argument("--all", action="store_true",
                    help="also sandboxes that other tools made (microsandbox's msb ...)")

    audit = commands.add_parser(
        "audit", parents=[common], help="show a sandbox's audit log",
        description="Show the audit log of sandbox NAME (audit = true in its template): "
                    "connections, commands, transfers, tunnels and exit statuses, oldest first.")
    audit.add_argument("name", metavar="NAME", help="sandbox name")
    audit.add_argument("-f", "--follow", action="store_true",
                       help="keep printing events as they are logged, until interrupted")
    audit.add_argument("--json", action="store_true", help="print the JSON lines as logged")

    sessions = commands.add_parser(
        "sessions", parents=[common], help="list or end a sandbox's named sessions",
        description="List the named sessions of sandbox NAME (ssh msb-NAME+SESSION, or "
                    "SetEnv=MSB_SESSION=SESSION): user, age, idle time, terminal size.")
    sessions.add_argument("name", metavar="NAME", help="sandbox name")
    sessions.add_argument("--kill", metavar="SESSION", help="end named session SESSION")
    sessions.add_argument("--json", action="store_true", help="print a JSON list of objects")
    return parser


def _add_client_commands(add_parser: Callable[..., argparse.ArgumentParser],
                         common: _Parser) -> None:
    serve = add_parser(
        "serve", parents=[common], help="serve a sandbox on a TCP port (ssh -p PORT)",
        description="Listen on HOST:PORT and serve every connection to sandbox NAME with the "
                    "server 'stdio' runs, until SIGINT or SIGTERM.")
    serve.add_argument("name", metavar="NAME", help="sandbox name")
    serve.add_argument("--host", default=DEFAULT_SSH_HOST,
                       help=f"address to listen on (default: {DEFAULT_SSH_HOST})")
    serve.add_argument("--port", type=_port, default=DEFAULT_SSH_PORT,
                       help=f"port to listen on, 0 for any free one (default: {DEFAULT_SSH_PORT})")
    serve.add_argument("-q", "--quiet", action="store_true",
                       help="print no progress while a sandbox is created or started")

    connect = add_parser(
        "connect", parents=[common], help="a shell or a command in a sandbox, without OpenSSH",
        description="Run COMMAND in sandbox NAME, or attach this terminal to a login shell "
                    "(detach with the detach keys), with msb-proxy's own SSH client.")
    connect.add_argument("name", metavar="NAME", help="sandbox name")
    connect.add_argument("--user", default="root", help="guest user (default: root)")
    tty = connect.add_mutually_exclusive_group()
    tty.add_argument("-t", dest="tty", action="store_const", const=True,
                     help="request a PTY for COMMAND")
    tty.add_argument("-T", dest="tty", action="store_const", const=False,
                     help="no PTY, even for a shell")
    connect.add_argument("--detach-keys", metavar="KEYS",
                         help="detach sequence, Docker's format (default: ctrl-p,ctrl-q)")
    connect.add_argument("--session", metavar="SESSION",
                         help="attach the shell to named session SESSION, which detaching "
                              "leaves running (as ssh msb-NAME+SESSION)")
    connect.add_argument("-q", "--quiet", action="store_true",
                         help="print no progress while a sandbox is created or started")
    connect.add_argument("remote_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                         help="command to run (default: attach a login shell)")


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: not 0-65535")
    return int(text)


def run(arguments: Sequence[str]) -> int:
    """Carry out one ``msb-proxy`` command line in this process; return its exit status."""
    try:
        args = _parser().parse_args(arguments)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 0
    debug = bool(getattr(args, "debug", False))
    from msb_proxy.backends import registry
    from msb_proxy.config import load_config

    home: Path | None = None
    try:
        try:
            config = load_config(os.environ, registry, backend=args.backend, debug=debug,
                                 quiet=bool(getattr(args, "quiet", False)))
        except ConfigError as exc:
            if args.command != "doctor":
                raise
            args.config_error = exc  # doctor reports it as a check and looks at the rest
            config = load_config(os.environ, registry, backend=args.backend, debug=debug,
                                 use_file=False)
        home = config.home
        if args.command == "stdio":
            code = _stdio(config, args.host, args.host_prefix)
        elif args.command in ("stop", "rm"):
            code = _lifecycle(config, args.command, args.name)
        else:
            import importlib

            module = importlib.import_module(f".commands.{COMMAND_MODULES[args.command]}",
                                             __package__)
            code = int(module.run(config, args))
    except UserError as exc:
        if not getattr(exc, "reported", False):
            _print_error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        fault = _state_fault(exc, home)
        if fault is not None:
            _print_error(str(fault))
            code = fault.exit_code
        else:
            _print_error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
                         "the traceback)")
            code = EXIT_INTERNAL
    return code


def _state_fault(exc: Exception, home: Path | None) -> UserError | None:
    """``exc`` as the fault of a file under ``MSB_PROXY_HOME`` it is, where no layer below
    said so: a full or read-only disk is no bug of ours, whoever met it."""
    if not isinstance(exc, OSError) or home is None or not exc.filename:
        return None
    from pathlib import Path

    from msb_proxy.state import state_error

    path = Path(os.fsdecode(exc.filename))
    return state_error(path, exc, "use") if path.is_relative_to(home) else None


def _print_error(message: str) -> None:
    print(f"msb-proxy: {message}", file=sys.stderr, flush=True)


def _stdio(config: Config, host: str, prefix: str) -> int:
    import asyncio
    import signal

    from msb_proxy.config import parse_host, throwaway_parent

    target = parse_host(host, prefix)
    name = target.sandbox
    # Anything printed by accident must not corrupt the protocol on fd 1.
    sys.stdout = sys.stderr
    _setup_logging(config.debug)
    _more_open_files()

    from msb_proxy.backends.base import Backend
    from msb_proxy.backends.idle import ConnectionTracker
    from msb_proxy.backends.registry import open_backend
    from msb_proxy.client.namespace import data_path, default_authorized_keys
    from msb_proxy.progress import Progress
    from msb_proxy.server.endpoint import ConnectionOutcome, SshServer, SshServerOptions
    from msb_proxy.server.known_hosts import pin
    from msb_proxy.state import StateDir
    from msb_proxy.transport.stdio import SshStdioStream

    state = StateDir(config.home)
    parent = target.fork_of or throwaway_parent(name)
    if parent is not None:
        # A throwaway fork reached by its own name (msb-api.fork.1a2b3c4d) is still one.
        throwaway = target.ephemeral_fork or target.fork_of is None
        name, template, host_key = _fork_target(config, state, parent, throwaway, name,
                                                fresh=target.ephemeral_fork)
    else:
        template, host_key = config.template(name), state.host_key(name)
    options = SshServerOptions(host_key_path=host_key,
                               authorized_keys_paths=default_authorized_keys(config),
                               template=template, progress=Progress(quiet=config.quiet),
                               connection_hooks=data_path(config), session=target.session,
                               home=config.home)

    def report(error: UserError) -> None:
        error.reported = True  # type: ignore[attr-defined]
        _print_error(str(error))

    async def serve(tracker: ConnectionTracker) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_exception_handler(config.debug))
        # OpenSSH sends its ProxyCommand SIGHUP when it is done: wind down, don't just die.
        hangup = asyncio.Event()
        for signum in (signal.SIGHUP, signal.SIGTERM):
            loop.add_signal_handler(signum, hangup.set)
        backend = open_backend(config, template.backend)
        if template.fork_of is not None and type(backend).fork is Backend.fork:
            raise BackendUnavailableError(
                f"the {backend.name} backend cannot fork sandboxes ({host}); use the local or "
                "microsandbox backend for forks")
        if template.ephemeral and await backend.state_of(name) is None:
            tracker.expect_creation()
        server = await SshServer.prepare(backend, name, options)
        # Pinned before the client can see the key: StrictHostKeyChecking yes never prompts.
        public = server.host_key.export_public_key("openssh").decode().split()
        pin(state.known_hosts, host, " ".join(public[:2]))
        sandbox = await server.serve(SshStdioStream(), on_error=report, hangup=hangup,
                                     outcome=outcome)
        if sandbox is not None:
            tracker.sandbox_opened(sandbox)

    outcome = ConnectionOutcome()
    with ConnectionTracker(state, name, template, os.environ) as tracker:
        asyncio.run(serve(tracker))
    if outcome.protocol_error is not None:
        _print_error(f"protocol error from the client: {outcome.protocol_error}")
    # As sshd -i: 255 for a connection that ended before the client logged in.
    return 0 if outcome.logged_in else EXIT_NOT_LOGGED_IN


def _fork_target(config: Config, state: StateDir, parent: str, throwaway: bool,
                 name: str, *, fresh: bool) -> tuple[str, SandboxTemplate, Path]:
    """The sandbox, template and host key file of a connection to a fork of ``parent``.

    A throwaway fork (``NAME.fork``) is a sandbox of this connection's own (``fresh``),
    ``NAME.fork.<8 hex>``, removed after its last connection and never idle-stopped; it
    presents the parent's host key from the parent's own file, reached by that name
    too. A kept fork (``NAME.fork-KEPT``, ``name``) is
    sandbox ``kept``, which is given a copy of the parent's key the first time, so that it
    keeps presenting it, and is never ephemeral. Both take the parent's template; the
    backend's ``open`` makes the fork when the sandbox is missing.
    """
    from dataclasses import replace

    from msb_proxy.config import THROWAWAY_INFIX
    from msb_proxy.state import write_private

    parent_key = state.host_key(parent)
    if throwaway:
        if fresh:
            name = f"{parent}{THROWAWAY_INFIX}{os.urandom(4).hex()}"
        return name, replace(config.template(parent), fork_of=parent, ephemeral=True,
                             stop_after_idle=0.0), parent_key
    own_key = state.host_key(name)
    if not own_key.exists():
        with contextlib.suppress(FileNotFoundError):
            write_private(own_key, parent_key.read_bytes())
    return name, replace(config.template(parent), fork_of=parent, ephemeral=False), own_key


def _more_open_files() -> None:
    """Lift this process's soft limit on open files to its hard one: a connection may hold
    max_channels tunnels (1,024 by default), each a socket, and the usual soft limit is 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _lifecycle(config: Config, command: str, name: str) -> int:
    import asyncio

    from msb_proxy.config import sandbox_name_from_host

    name = sandbox_name_from_host(name, None)
    from msb_proxy.backends.registry import open_backend

    backend = open_backend(config)
    if command == "stop":
        if not asyncio.run(backend.stop(name)):
            _print_error(f"sandbox {name!r} is not running")
        return 0
    if not asyncio.run(backend.remove(name)):
        raise ConfigError(f"there is no sandbox {name!r}")
    from msb_proxy.backends.idle import forget
    from msb_proxy.state import StateDir

    forget(StateDir(config.home), name)
    return 0


def _setup_logging(debug: bool) -> None:
    import logging

    if debug:
        logging.basicConfig(stream=sys.stderr, level=logging.DEBUG,
                            format="msb-proxy: debug: %(name)s: %(message)s")
        import asyncssh

        asyncssh.set_debug_level(2)
    else:
        logging.getLogger("asyncssh").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _quiet_exception_handler(debug: bool):  # type: ignore[no-untyped-def]
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if debug:
            loop.default_exception_handler(context)
            return
        exc = context.get("exception")
        detail = f"{type(exc).__name__}: {exc}" if exc else context.get("message")
        _print_error(f"internal error: {detail} (rerun with --debug for the traceback)")

    return handle
