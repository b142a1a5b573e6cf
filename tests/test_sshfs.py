"""sshfs mounted through the ProxyCommand: file system operations land in the guest exactly.

sshfs drives the SFTP subsystem the way a file system does: many small, pipelined, offset reads
and writes, setstat for truncate and chmod, posix-rename, symlink, statvfs. Each operation is
done through the mount and then checked in the guest (``sha256sum``/``stat``/``readlink`` over
ssh), against the guest's own sftp-server and against msb-proxy's native SFTP server.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Env
from transfer_helpers import SFTP_SERVER, hide_programs

FS = "/srv/fs"
MOUNT_TIMEOUT_S = 30


@dataclass(frozen=True)
class Mount:
    sandbox: str
    path: Path  # the mount point on the host, showing FS in the guest


def _fuse_unavailable_reason() -> str | None:
    if shutil.which("sshfs") is None:
        return "sshfs is not installed (Debian package sshfs)"
    if not Path("/dev/fuse").exists():
        subprocess.run(["modprobe", "fuse"], capture_output=True, check=False)
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this host and 'modprobe fuse' did not create it"
    return None


def _unmount(path: Path) -> None:
    unmount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
    if subprocess.run([unmount, "-u", str(path)], capture_output=True, check=False).returncode:
        subprocess.run([unmount, "-u", "-z", str(path)], capture_output=True, check=False)


@pytest.fixture(scope="module", params=["guest-sftp-server", "native"])
def mount(request: pytest.FixtureRequest, msb: Env,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    reason = _fuse_unavailable_reason()
    if reason:
        print(f"skipping sshfs tests: {reason}")
        pytest.skip(reason)
    name = f"sshfs-{request.param}-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    if request.param == "native":
        hide_programs(msb, name, [SFTP_SERVER])
    seed = msb.ssh(name, f"mkdir -p {FS}")
    assert seed.returncode == 0, seed.err
    base = tmp_path_factory.mktemp("sshfs")
    point, log = base / "mnt", base / "sshfs.log"
    point.mkdir()
    with open(log, "wb") as errors:
        # Foreground, so this process is ours to end; no attribute or entry caching, so every
        # check through the mount asks the guest again.
        sshfs = subprocess.Popen(
            ["sshfs", "-f", "-F", str(msb.config), f"{msb.host(name)}:{FS}", str(point),
             "-o", "attr_timeout=0,entry_timeout=0,negative_timeout=0,dir_cache=no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not point.is_mount():
            if sshfs.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshfs did not mount: {log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield Mount(name, point)
    finally:
        _unmount(point)
        try:
            sshfs.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshfs.kill()
            sshfs.wait()


def guest(msb: Env, mount: Mount, command: str) -> str:
    run = msb.ssh(mount.sandbox, f"cd {FS} && {command}")
    assert run.returncode == 0, run.err
    return run.out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_created_file_arrives_byte_exact_and_reads_back(msb: Env, mount: Mount) -> None:
    data = bytes(range(256)) * 1024 + os.urandom(8 << 20)
    (mount.path / "created.bin").write_bytes(data)
    assert guest(msb, mount, "stat -c %s created.bin; sha256sum created.bin").split()[:2] == [
        str(len(data)), sha(data)]
    assert (mount.path / "created.bin").read_bytes() == data


def test_append_adds_at_the_end(msb: Env, mount: Mount) -> None:
    path = mount.path / "appended.txt"
    path.write_bytes(b"first\n")
    with open(path, "ab") as file:
        file.write(b"second\n")
    with open(path, "ab") as file:
        file.write(b"third\n")
    assert guest(msb, mount, "cat appended.txt") == "first\nsecond\nthird\n"


def test_overwrite_in_the_middle_keeps_the_rest(msb: Env, mount: Mount) -> None:
    original = os.urandom(200_000)
    path = mount.path / "middle.bin"
    path.write_bytes(original)
    with open(path, "r+b") as file:
        file.seek(100_000)
        file.write(b"X" * 5000)
    expected = original[:100_000] + b"X" * 5000 + original[105_000:]
    assert guest(msb, mount, "sha256sum middle.bin").split()[0] == sha(expected)
    assert path.read_bytes() == expected


def test_truncate_shrinks_and_extends_with_zeros(msb: Env, mount: Mount) -> None:
    original = os.urandom(50_000)
    path = mount.path / "truncated.bin"
    path.write_bytes(original)
    os.truncate(path, 1000)
    assert guest(msb, mount, "stat -c %s truncated.bin; sha256sum truncated.bin").split()[:2] == [
        "1000", sha(original[:1000])]
    os.truncate(path, 3000)
    expected = original[:1000] + bytes(2000)
    assert guest(msb, mount, "sha256sum truncated.bin").split()[0] == sha(expected)
    with open(path, "r+b") as file:
        file.truncate(0)
    assert guest(msb, mount, "stat -c %s truncated.bin") == "0\n"


def test_rename_replaces_an_existing_file(msb: Env, mount: Mount) -> None:
    (mount.path / "new.txt").write_text("new contents\n")
    (mount.path / "old.txt").write_text("old contents\n")
    os.rename(mount.path / "new.txt", mount.path / "old.txt")
    assert guest(msb, mount, "ls new.txt old.txt 2>&1; cat old.txt") == (
        "ls: cannot access 'new.txt': No such file or directory\nold.txt\nnew contents\n")
    assert (mount.path / "old.txt").read_text() == "new contents\n"


def test_chmod_sets_the_mode_in_the_guest(msb: Env, mount: Mount) -> None:
    path = mount.path / "mode.sh"
    path.write_text("#!/bin/sh\n")
    for mode in (0o751, 0o600, 0o4755):
        os.chmod(path, mode)
        assert guest(msb, mount, "stat -c %a mode.sh") == f"{mode:o}\n"
        assert path.stat().st_mode & 0o7777 == mode


def test_symlinks_are_created_and_read_as_links(msb: Env, mount: Mount) -> None:
    (mount.path / "target.txt").write_text("pointed at\n")
    os.symlink("target.txt", mount.path / "relative-link")
    os.symlink("/etc/hostname", mount.path / "absolute-link")
    assert guest(msb, mount, "readlink relative-link absolute-link; cat relative-link") == (
        "target.txt\n/etc/hostname\npointed at\n")
    assert os.readlink(mount.path / "relative-link") == "target.txt"
    assert (mount.path / "relative-link").read_text() == "pointed at\n"
    assert (mount.path / "relative-link").is_symlink()


def test_directories_and_removal_match_the_guests_view(msb: Env, mount: Mount) -> None:
    top = mount.path / "tree"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "file").write_text("x\n")
    (top / "gone").write_text("y\n")
    (top / "gone").unlink()
    with pytest.raises(OSError) as not_empty:
        (top / "a").rmdir()
    assert not_empty.value.errno == errno.ENOTEMPTY
    assert guest(msb, mount, "find tree | sort") == "tree\ntree/a\ntree/a/b\ntree/a/file\n"
    msb.ssh(mount.sandbox, f"echo from-guest > {FS}/tree/made-in-guest")
    assert sorted(os.listdir(top)) == ["a", "made-in-guest"]
    assert (top / "made-in-guest").read_text() == "from-guest\n"


def test_df_shows_the_guests_file_system(msb: Env, mount: Mount) -> None:
    st = os.statvfs(mount.path)
    blocks, fragment, files = guest(msb, mount, "stat -f -c '%b %S %c' .").split()
    assert st.f_blocks * st.f_frsize == int(blocks) * int(fragment)
    assert st.f_files == int(files)
    df = subprocess.run(["df", "-k", "--output=size", str(mount.path)], capture_output=True,
                        text=True, check=True)
    assert int(df.stdout.split()[-1]) == int(blocks) * int(fragment) // 1024

