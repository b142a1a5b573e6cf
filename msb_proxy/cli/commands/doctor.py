"""``msb-proxy doctor``: is everything msb-proxy needs in place? A table, and what to do.

Checks the configured backend (its class's ``checks``: root, overlayfs and the rootfs for
``local``, the SDK, its runtime and KVM for ``microsandbox``), whether the relay's C loop was
built, the config file, the keys that may log in, the ssh_config block, and, in every running
sandbox, the guest tools that features rely on. Each row is ``ok``, ``warn`` (works, with less)
or ``FAIL`` (something essential is missing); any ``FAIL`` makes the exit status 1. Stopped
sandboxes are not started to be checked."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace

from msb_proxy.backends.base import Check, CheckStatus, SandboxState
from msb_proxy.backends.registry import backend_class, open_backend
from msb_proxy.config import Config
from msb_proxy.errors import UserError
from msb_proxy.server.keys import AuthorizedKeys
from msb_proxy.server.session import SFTP_SERVER_PATHS
from msb_proxy.state import StateDir

__all__ = ["run"]

OK, WARN, FAIL = CheckStatus.OK, CheckStatus.WARN, CheckStatus.FAIL
BIN = ("/usr/local/bin", "/usr/bin", "/bin")


def run(config: Config, args: argparse.Namespace) -> int:
    problem = getattr(args, "config_error", None)
    checks = [Check("config", FAIL, str(problem)) if problem is not None else
              Check("config", OK, f"{config.config_file}" if config.config_file.exists() else
                    f"{config.config_file} (absent: built-in defaults)")]
    checks += [*_backend(config), _relay(config), _keys(config), _ssh_config(config)]
    checks += asyncio.run(_sandboxes(config))
    width = max(len(check.what) for check in checks)
    print(f"{'CHECK'.ljust(width)}  STATUS  DETAIL")
    for check in checks:
        print(f"{check.what.ljust(width)}  {check.status.ljust(6)}  {check.detail}")
    failed = [check for check in checks if check.status == FAIL]
    if failed:
        print(f"msb-proxy: {len(failed)} essential check(s) failed; see FAIL above",
              file=sys.stderr)
        return 1
    return 0


def _relay(config: Config) -> Check:
    """Whether the fast path runs and its relay's C loop was built (many small files at sshd's
    speed, not half)."""
    from msb_proxy.fastpath import gate, relay

    if not config.fastpath:
        return Check("relay", OK, "fast path off (MSB_PROXY_FASTPATH=0): asyncssh's own path")
    refusal = gate.version_refusal()
    if refusal is not None:
        return Check("relay", WARN, f"fast path off: {refusal}; transfers use asyncssh's own "
                     "path (correct, slower); install the asyncssh msb-proxy pins")
    if config.relay_loop == "python":
        return Check("relay", OK, "Python loop (MSB_PROXY_RELAY=python)")
    if relay.compiled_loop() is not None:
        return Check("relay", OK, "C loop (msb_proxy.fastpath._relay)")
    return Check("relay", WARN, "Python loop: the C one was not built, so many small files "
                 "transfer slower; apt-get install gcc python3-dev, then reinstall msb-proxy")


def _backend(config: Config) -> list[Check]:
    """The configured backend's own checks, each named after the backend."""
    return [replace(check, what=f"{config.backend}: {check.what}")
            for check in backend_class(config.backend).checks(config)]


def _keys(config: Config) -> Check:
    state = StateDir(config.home)
    sources = [state.authorized_keys,
               config.user_home / ".microsandbox" / "ssh" / "authorized_keys",
               *sorted((config.user_home / ".ssh").glob("*.pub"))]
    keys = AuthorizedKeys()
    for path in sources:
        keys.add_file(path)
    if not keys:
        return Check("authorized keys", FAIL, "no key may log in: run 'msb-proxy authorize "
                     "--file ~/.ssh/id_ed25519.pub' (or create a key with ssh-keygen)")
    return Check("authorized keys", OK, f"{len(keys)} key(s) from {state.authorized_keys}, "
                 "~/.microsandbox/ssh/authorized_keys and ~/.ssh/*.pub")


def _ssh_config(config: Config) -> Check:
    from msb_proxy.cli.commands.ssh_config import BEGIN_MARKER, SshFiles

    files = SshFiles(config.user_home)
    try:
        installed = BEGIN_MARKER in files.config.read_text(errors="replace")
    except OSError:
        installed = False
    if installed and files.include.exists():
        return Check("ssh_config", OK, f"{files.config} includes {files.include}")
    return Check("ssh_config", WARN, "not installed: run 'msb-proxy config --install' to reach "
                 "sandboxes as msb-NAME")


async def _sandboxes(config: Config) -> list[Check]:
    backend = open_backend(config)
    try:
        found = await backend.list()
    except UserError as exc:
        return [Check("sandboxes", WARN, f"cannot list them: {exc}")]
    checks = []
    for info in found:
        if info.state is not SandboxState.RUNNING:
            checks.append(Check(f"{info.name}: tools", OK, f"{info.state}; not checked"))
            continue
        try:
            checks += await _guest_tools(config, info.name)
        except UserError as exc:
            checks.append(Check(f"{info.name}: tools", WARN, f"cannot check: {exc}"))
    return checks


async def _guest_tools(config: Config, name: str) -> list[Check]:
    from msb_proxy.progress import Progress

    template = config.template(name)
    sandbox = await open_backend(config, template.backend).open(name, template,
                                                                Progress(quiet=True))
    root = await sandbox.lookup_user("root")

    async def has(paths: Sequence[str]) -> str | None:
        return await sandbox.find_program(root, paths)

    def everywhere(program: str) -> list[str]:
        return [f"{directory}/{program}" for directory in BIN]

    rows = []
    shell = await has([root.shell or "/bin/sh", "/bin/sh"])
    rows.append(Check(f"{name}: shell", OK if shell else FAIL, shell or
                      "no shell: sessions cannot run; the sandbox needs /bin/sh"))
    tools = [
        ("sftp-server", list(SFTP_SERVER_PATHS), WARN,
         "missing: SFTP is served natively (install openssh-sftp-server for OpenSSH's own)"),
        ("rsync", everywhere("rsync"), WARN, "missing: rsync fails; apt-get install rsync"),
        ("scp", everywhere("scp"), WARN,
         "missing: scp -O is served natively (install openssh-client for OpenSSH's own)"),
        ("python3", everywhere("python3"), WARN,
         "missing: fine on the local backend; elsewhere tunnels fall back to nc/socat"),
        ("nc/socat", everywhere("socat") + everywhere("nc"), WARN,
         "missing: only matters where python3 is missing too"),
    ]
    for label, paths, severity, advice in tools:
        found = await has(paths)
        rows.append(Check(f"{name}: {label}", OK if found else severity, found or advice))
    rows += [replace(check, what=f"{name}: {check.what}") for check in await sandbox.checks()]
    await sandbox.close()
    return rows
