"""What the file transfer tests share: data sets, manifests of both sides, and the clients.

A *manifest* maps each path under a tree (relative, ``/``-separated) to what a transfer must
carry: the kind of entry, its mode, mtime and owner, and a sha256 of a file's bytes or a link's
target. The host side is read with ``os.lstat`` and ``hashlib``; the guest side with ``stat`` and
``sha256sum`` run in the sandbox, so every comparison checks both ends independently.
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import signal
import stat
import subprocess
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from conftest import TEST_BACKEND, Env, Run

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
GUEST_SCP = "/usr/bin/scp"
GUEST_RSYNC = "/usr/bin/rsync"

# Preserved times must stand out from "now": every data set file is dated around 2020-09-13.
EPOCH = 1_600_000_000
BIG_SIZE = 64 << 20
# The fast tier (fake backend) keeps to its time budget with a tenth of the many small files.
SMALL_FILES = 200 if TEST_BACKEND == "fake" else 2000
# Names a shell or a protocol line could trip over. Legacy scp sends "new\nline.txt" as
# "new\\^Jline.txt" (OpenSSH's source() strnvis-encodes a name holding a newline).
AWKWARD_NAMES = (
    "with space.txt",
    "single ' quote.txt",
    'double " quote.txt',
    "new\nline.txt",
    "-leading-dash.txt",
    "na\u00efve \u2013 \u65e5\u672c.txt",  # naïve, en dash, Japanese
    "dir with space/inner file.txt",
)
# Exists in the guest rootfs and on a Debian host; its contents differ between the two.
ABSOLUTE_LINK_TARGET = "/etc/debian_version"


@dataclass(frozen=True)
class Entry:
    """One path of a tree, as a transfer should carry it."""

    kind: str  # "file", "dir" or "link"
    mode: int  # permission bits
    mtime: int  # seconds
    uid: int
    gid: int
    size: int
    data: str | None  # sha256 of a file's bytes, a link's target, None for a directory


Manifest = dict[str, Entry]


@dataclass(frozen=True)
class DataSets:
    """The data sets on the host, generated once per test module."""

    root: Path  # holds exactly core/ and small/
    core: Path  # every-byte.bin, empty, big.bin, names/, links/
    small: Path  # SMALL_FILES files of 0..8 KiB in nested directories

    @property
    def big(self) -> Path:
        return self.core / "big.bin"

    @property
    def every_byte(self) -> Path:
        return self.core / "every-byte.bin"


def make_datasets(root: Path) -> DataSets:
    """Write the data sets under ``root``, with distinct modes and old mtimes."""
    rng = random.Random(20260403)
    core, small = root / "core", root / "small"
    stamps = iter(range(EPOCH, EPOCH + 10_000_000, 97))

    def write(path: Path, data: bytes, mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        stamp = next(stamps)
        os.utime(path, (stamp, stamp))

    write(core / "every-byte.bin", bytes(range(256)) * 4096 + os.urandom(300_001), 0o644)
    write(core / "empty", b"", 0o600)
    write(core / "big.bin", os.urandom(BIG_SIZE), 0o640)
    for i, name in enumerate(AWKWARD_NAMES):
        write(core / "names" / name, f"{name}\n".encode() + os.urandom(i * 100), 0o755 if i % 2
              else 0o644)
    links = core / "links"
    write(links / "target.txt", b"the link target\n", 0o604)
    (links / "sub").mkdir()
    (links / "rel-link").symlink_to("target.txt")
    (links / "sub" / "up-link").symlink_to("../target.txt")
    (links / "abs-link").symlink_to(ABSOLUTE_LINK_TARGET)
    for i in range(SMALL_FILES):
        directory = small / f"d{i % 4}" / (f"e{i % 3}" if i % 2 else "")
        write(directory / f"f{i:04d}.dat", rng.randbytes(rng.randint(0, 8192)),
              rng.choice((0o644, 0o600, 0o755, 0o640)))
    (small / "d3" / "e1").chmod(0o750)
    for directory in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()),
                            key=lambda p: -len(p.parts)):
        stamp = next(stamps)
        os.utime(directory, (stamp, stamp))
    return DataSets(root=root, core=core, small=small)


# ---- manifests


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def host_manifest(root: Path, follow: bool = False) -> Manifest:
    """The tree under ``root`` on the host; ``follow`` reads links as what they point to."""
    manifest: Manifest = {}
    for directory, dirnames, filenames in os.walk(root, followlinks=follow):
        for name in dirnames + filenames:
            path = Path(directory, name)
            st = path.stat() if follow else path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                kind, data = "link", os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                kind, data = "dir", None
            else:
                kind, data = "file", sha256_file(path)
            manifest[rel] = Entry(kind, stat.S_IMODE(st.st_mode), int(st.st_mtime), st.st_uid,
                                  st.st_gid, st.st_size, data)
    return manifest


_GUEST_KINDS = {"regular file": "file", "regular empty file": "file", "directory": "dir",
                "symbolic link": "link"}


def guest_manifest(msb: Env, sandbox: str, root: str, follow: bool = False) -> Manifest:
    """The tree under ``root`` in the guest, read there by ``stat``, ``sha256sum``, ``find``."""
    f = "-L " if follow else ""
    script = (
        f"cd -- {shlex.quote(root)} || exit 1; "
        f"find {f}. -mindepth 1 -print0 | xargs -0r stat {f}"
        "--printf '%F\\0%a\\0%Y\\0%u\\0%g\\0%s\\0%n\\0'"
        " || exit 1; printf -- '--sums--\\0'; "
        f"find {f}. -mindepth 1 -type f -print0 | xargs -0r sha256sum -z || exit 1; "
        "printf -- '--links--\\0'; "
        f"find {f}. -mindepth 1 -type l -printf '%p\\0%l\\0'"
    )
    run = msb.ssh(sandbox, script, timeout=120)
    assert run.returncode == 0, f"cannot read {root} in the guest: {run.err}"
    fields = run.stdout.decode("utf-8", "surrogateescape").split("\0")
    sums_at = fields.index("--sums--")
    links_at = fields.index("--links--")
    sums: dict[str, str] = {}
    for record in fields[sums_at + 1:links_at]:
        digest, _, name = record.partition("  ")
        sums[name] = digest
    targets = dict(zip(fields[links_at + 1:-1:2], fields[links_at + 2:-1:2], strict=True))
    manifest: Manifest = {}
    records = fields[:sums_at]
    for i in range(0, len(records), 7):
        kind_text, mode, mtime, uid, gid, size, name = records[i:i + 7]
        kind = _GUEST_KINDS[kind_text]
        data = sums[name] if kind == "file" else targets[name] if kind == "link" else None
        manifest[name.removeprefix("./")] = Entry(kind, int(mode, 8), int(mtime), int(uid),
                                                  int(gid), int(size), data)
    return manifest


def guest_digest(msb: Env, sandbox: str, path: str) -> str:
    """sha256 of one guest file, computed in the guest."""
    run = msb.ssh(sandbox, f"sha256sum -- {shlex.quote(path)}")
    assert run.returncode == 0, run.err
    return run.out.split()[0]


def contents(manifest: Mapping[str, Entry]) -> dict[str, tuple[str, int | None, str | None]]:
    """What a byte-exact copy must reproduce: names, kinds, file sizes and bytes, link targets."""
    return {path: (entry.kind, entry.size if entry.kind == "file" else None, entry.data)
            for path, entry in manifest.items()}


def modes_and_mtimes(manifest: Mapping[str, Entry],
                     kinds: Iterable[str] = ("file",)) -> dict[str, tuple[str, int]]:
    """``stat -c '%a %Y'`` of the entries of ``kinds``, as a preserving copy must reproduce."""
    wanted = set(kinds)
    return {path: (f"{entry.mode:o}", entry.mtime) for path, entry in manifest.items()
            if entry.kind in wanted}


def without_links(manifest: Mapping[str, Entry]) -> Manifest:
    """``sftp put -r``/``get -r``: OpenSSH skips links ("not a regular file")."""
    return {path: entry for path, entry in manifest.items() if entry.kind != "link"}


def legacy_scp_names(manifest: Mapping[str, Entry]) -> Manifest:
    """Legacy scp sends a name holding a newline with the newline written as ``\\^J`` (vis(3))."""
    return {path.replace("\n", "\\^J"): entry for path, entry in manifest.items()}


def under(manifest: Mapping[str, Entry], prefix: str) -> Manifest:
    """The part of ``manifest`` below directory ``prefix``, relative to it."""
    start = prefix.rstrip("/") + "/"
    return {path.removeprefix(start): entry for path, entry in manifest.items()
            if path.startswith(start)}


def differences(want: Mapping[str, object], got: Mapping[str, object],
                limit: int = 12) -> list[str]:
    """A short, readable list of what differs between two views (empty when equal)."""
    lines = [f"missing {path!r}" for path in sorted(want.keys() - got.keys())]
    lines += [f"unexpected {path!r}" for path in sorted(got.keys() - want.keys())]
    lines += [f"{path!r}: want {want[path]!r}, got {got[path]!r}"
              for path in sorted(want.keys() & got.keys()) if want[path] != got[path]]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


# ---- sandboxes


def hide_programs(msb: Env, sandbox: str, paths: Sequence[str]) -> None:
    """Rename guest programs to ``*.hidden`` (in the sandbox's own layer; the rootfs is shared).

    The fake backend's programs are the host's: there they are listed in the sandbox's
    ``hidden`` file instead, which hides them from msb-proxy (not from the guest's shell).
    """
    if msb.backend == "fake":
        from msb_proxy.backends.fake import sandbox_directory

        made = msb.ssh(sandbox, "true")  # the sandbox's directory exists from then on
        assert made.returncode == 0, made.err
        with open(sandbox_directory(msb.home, sandbox) / "hidden", "a", encoding="utf-8") as out:
            out.write("".join(f"{path}\n" for path in paths))
        return
    script = " && ".join(f"mv {p} {p}.hidden" for p in paths)
    run = msb.ssh(sandbox, script)
    assert run.returncode == 0, run.err


def seed_guest(msb: Env, sandbox: str, data: DataSets, target: str, then: str = "true") -> None:
    """Copy the data sets to ``target`` in the guest with tar over exec, then run ``then``."""
    tar = subprocess.Popen(["tar", "-C", str(data.root), "-cf", "-", "core", "small"],
                           stdout=subprocess.PIPE)
    assert tar.stdout is not None
    quoted = shlex.quote(target)
    done = subprocess.run(
        ["ssh", "-F", str(msb.config), msb.host(sandbox),
         f"mkdir -p {quoted} && tar -C {quoted} -xf - && {then}"],
        stdin=tar.stdout, capture_output=True, timeout=300, check=False)
    tar.stdout.close()
    assert tar.wait() == 0
    assert done.returncode == 0, done.stderr.decode(errors="replace")


# ---- the clients

CLIENT_TIMEOUT_S = 60  # the largest transfer here takes about 12 s


def run_client(argv: Sequence[str], timeout: float = CLIENT_TIMEOUT_S,
               env: dict[str, str] | None = None) -> Run:
    """Run a client in its own process group; a client that hangs is killed with its ssh and
    ProxyCommand, and the test fails saying so."""
    client = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        stdout, stderr = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(client.pid, signal.SIGKILL)
        _, stderr = client.communicate()
        raise AssertionError(f"{argv[0]} hung for {timeout:.0f} s; stderr: "
                             f"{stderr.decode(errors='replace')}") from None
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.communicate()
    return Run(client.returncode, stdout, stderr)


def target(msb: Env, sandbox: str, path: str, user: str | None = None) -> str:
    """``[USER@]msb-SANDBOX:PATH`` as scp and rsync take it."""
    host = msb.host(sandbox)
    return f"{user}@{host}:{path}" if user else f"{host}:{path}"


def scp_argv(msb: Env, *args: str, legacy: bool = False) -> list[str]:
    return ["scp", "-F", str(msb.config), *(["-O"] if legacy else []), *args]


def scp(msb: Env, *args: str, legacy: bool = False) -> Run:
    """``scp -F CONFIG [-O] ARGS...``: SFTP mode unless ``legacy``."""
    return run_client(scp_argv(msb, *args, legacy=legacy))


def sftp_argv(msb: Env, sandbox: str, commands: Sequence[str], *, user: str | None = None,
              options: Sequence[str] = ()) -> list[str]:
    batch = msb.root / f"batch-{uuid.uuid4().hex[:8]}"
    batch.write_text("".join(f"{line}\n" for line in commands))
    host = msb.host(sandbox)
    return ["sftp", "-F", str(msb.config), *options, "-b", str(batch),
            f"{user}@{host}" if user else host]


def sftp(msb: Env, sandbox: str, commands: Sequence[str], *, user: str | None = None,
         env: dict[str, str] | None = None) -> Run:
    """``sftp -b BATCH``: one command a line; a line starting with ``-`` may fail."""
    return run_client(sftp_argv(msb, sandbox, commands, user=user), env=env)


def rsync_argv(msb: Env, *args: str) -> list[str]:
    return ["rsync", "-e", f"ssh -F {shlex.quote(str(msb.config))}", *args]


def rsync(msb: Env, *args: str) -> Run:
    """``rsync -e "ssh -F CONFIG" ARGS...``."""
    return run_client(rsync_argv(msb, *args))
