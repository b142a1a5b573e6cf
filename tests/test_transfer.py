"""File transfer integrity (issue 3) through the real scp, sftp and rsync and the ProxyCommand.

Every transfer is checked on both ends: ``sha256sum`` and ``stat`` in the guest against
``hashlib`` and ``os.lstat`` on the host. Each test runs against two sandboxes:

* ``guest-tools``: the guest has OpenSSH's sftp-server and scp, and rsync (bridged as they are);
* ``native``: all three are hidden in the sandbox, so msb-proxy serves SFTP and ``scp -t``/
  ``scp -f`` itself, and rsync must fail with a line naming what is missing and where.

What arrives follows OpenSSH's own rules: ``scp -r`` (both protocols) copies what a link points
to; ``sftp put -r``/``get -r`` skip links; ``rsync -a`` keeps them as links.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_BACKEND, Env
from transfer_helpers import (
    ABSOLUTE_LINK_TARGET,
    BIG_SIZE,
    EPOCH,
    GUEST_RSYNC,
    GUEST_SCP,
    SFTP_SERVER,
    DataSets,
    Manifest,
    contents,
    differences,
    guest_digest,
    guest_manifest,
    hide_programs,
    host_manifest,
    legacy_scp_names,
    make_datasets,
    modes_and_mtimes,
    rsync,
    rsync_argv,
    run_client,
    scp,
    scp_argv,
    seed_guest,
    sftp,
    sftp_argv,
    sha256_file,
    target,
    under,
    without_links,
)

# In the sandbox's home on the fake backend, whose /srv is the host's; every client and guest
# command resolves a relative path from the login user's home, as it does there.
SRV = "srv" if TEST_BACKEND == "fake" else "/srv"
SRC = f"{SRV}/src"  # the data sets, as tar put them in the guest
CHECKSUM_SRC = f"{SRV}/rsync-c/same.txt"  # for rsync -c down: the host's copy differs
DEST = f"{SRV}/dest"  # upload targets, one directory per test
STALE = "stale.txt"
SAME_SIZE_AND_TIME = 1000
# Slow enough that a transfer of big.bin is still running when we cut it off.
SLOW_SCP_KBIT = "64000"
SLOW_RSYNC_KIB = "8000"

_DEST_DIRS = ("scp", "scp-legacy", "sftp", "rsync", "rsync-z", "rsync-partial", "interrupted")
_GUEST_SETUP = " && ".join([
    f"mkdir -p {' '.join(f'{DEST}/{d}' for d in _DEST_DIRS)}",
    # rsync --delete: a copy of names/ with things the source does not have
    f"cp -a {SRC}/core/names {DEST}/rsync-delete",
    f"echo stale > {DEST}/rsync-delete/{STALE}",
    f"mkdir {DEST}/rsync-delete/stale-dir",
    # rsync -c: same size and mtime as the host's file, other bytes (and the reverse for -c down)
    f"mkdir {DEST}/rsync-c",
    f"head -c {SAME_SIZE_AND_TIME} /dev/zero | tr '\\0' B > {DEST}/rsync-c/same.txt",
    f"mkdir {SRV}/rsync-c",
    f"head -c {SAME_SIZE_AND_TIME} /dev/zero | tr '\\0' G > {CHECKSUM_SRC}",
    f"touch -d @{EPOCH} {DEST}/rsync-c/same.txt {CHECKSUM_SRC}",
])


@dataclass(frozen=True)
class Box:
    """A sandbox under test, with the guest's own view of the data sets in it."""

    name: str
    label: str  # "guest-tools" or "native"
    source: Manifest  # SRC, links as links
    source_followed: Manifest  # SRC, links read as what they point to

    @property
    def has_guest_tools(self) -> bool:
        return self.label == "guest-tools"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataSets:
    return make_datasets(tmp_path_factory.mktemp("data"))


def _make_box(msb: Env, data: DataSets, label: str) -> Box:
    name = f"xfer-{label}-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    if label == "native":
        hide_programs(msb, name, [SFTP_SERVER, GUEST_SCP, GUEST_RSYNC])
    seed_guest(msb, name, data, SRC, then=_GUEST_SETUP)
    source = guest_manifest(msb, name, SRC)
    followed = guest_manifest(msb, name, SRC, follow=True)
    # The guest's copy is the host's, byte for byte, before any tool under test has run.
    assert differences(contents(host_manifest(data.root)), contents(source)) == []
    return Box(name, label, source, followed)


@pytest.fixture(scope="module")
def guest_tools_box(msb: Env, data: DataSets) -> Box:
    return _make_box(msb, data, "guest-tools")


@pytest.fixture(scope="module")
def native_box(msb: Env, data: DataSets) -> Box:
    return _make_box(msb, data, "native")


@pytest.fixture(scope="module", params=["guest-tools", "native"])
def box(request: pytest.FixtureRequest) -> Box:
    fixture = "guest_tools_box" if request.param == "guest-tools" else "native_box"
    result: Box = request.getfixturevalue(fixture)
    return result


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Path]:
    """A download directory of this test's own."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # up to 130 MB per test


def _assert_same(want: Manifest, got: Manifest, *, times: bool, kinds: tuple[str, ...] = ("file",)
                 ) -> None:
    assert differences(contents(want), contents(got)) == []
    if times:
        assert differences(modes_and_mtimes(want, kinds), modes_and_mtimes(got, kinds)) == []


# ---- scp, SFTP mode (the default)


def test_scp_recursive_upload_is_byte_exact_and_keeps_modes_and_mtimes(
    msb: Env, data: DataSets, box: Box
) -> None:
    run = scp(msb, "-r", "-p", str(data.core), str(data.small),
              target(msb, box.name, f"{DEST}/scp"))
    assert (run.returncode, run.err) == (0, ""), run.err
    got = guest_manifest(msb, box.name, f"{DEST}/scp")
    _assert_same(host_manifest(data.root, follow=True), got, times=True)


def test_scp_recursive_download_is_byte_exact_and_keeps_modes_and_mtimes(
    msb: Env, box: Box, local: Path
) -> None:
    run = scp(msb, "-r", "-p", target(msb, box.name, f"{SRC}/core"),
              target(msb, box.name, f"{SRC}/small"), str(local))
    assert (run.returncode, run.err) == (0, ""), run.err
    _assert_same(box.source_followed, host_manifest(local), times=True)


def test_scp_copies_what_links_point_to_as_openssh_does(msb: Env, data: DataSets, box: Box,
                                                        local: Path) -> None:
    links = data.core / "links"
    copy = f"{msb.guest_tmp(box.name)}/scp-links"
    run = scp(msb, "-r", str(links), target(msb, box.name, copy))
    assert run.returncode == 0, run.err
    got = guest_manifest(msb, box.name, copy)
    assert {path: entry.kind for path, entry in got.items()} == {
        "target.txt": "file", "rel-link": "file", "abs-link": "file", "sub": "dir",
        "sub/up-link": "file"}
    assert got["abs-link"].data == sha256_file(Path(ABSOLUTE_LINK_TARGET))
    run = scp(msb, "-r", target(msb, box.name, f"{SRC}/core/links"), str(local))
    assert run.returncode == 0, run.err
    assert contents(host_manifest(local / "links")) == contents(
        under(box.source_followed, "core/links"))
    assert not any(p.is_symlink() for p in (local / "links").rglob("*"))


# ---- scp -O (legacy protocol: scp -t / scp -f in the guest, or msb-proxy's own)


def test_legacy_scp_recursive_upload_is_byte_exact_and_keeps_modes_and_mtimes(
    msb: Env, data: DataSets, box: Box
) -> None:
    run = scp(msb, "-r", "-p", str(data.core), str(data.small),
              target(msb, box.name, f"{DEST}/scp-legacy"), legacy=True)
    assert (run.returncode, run.err) == (0, ""), run.err
    got = guest_manifest(msb, box.name, f"{DEST}/scp-legacy")
    _assert_same(legacy_scp_names(host_manifest(data.root, follow=True)), got, times=True)


def test_legacy_scp_recursive_download_is_byte_exact_and_keeps_modes_and_mtimes(
    msb: Env, box: Box, local: Path
) -> None:
    run = scp(msb, "-r", "-p", target(msb, box.name, f"{SRC}/core"),
              target(msb, box.name, f"{SRC}/small"), str(local), legacy=True)
    assert (run.returncode, run.err) == (0, ""), run.err
    _assert_same(legacy_scp_names(box.source_followed), host_manifest(local), times=True)


# ---- sftp put / get through batch files


def test_sftp_recursive_put_is_byte_exact_keeps_modes_and_mtimes_and_skips_links(
    msb: Env, data: DataSets, box: Box
) -> None:
    run = sftp(msb, box.name, [f"put -r -p {data.core} {DEST}/sftp"])
    assert run.returncode == 0, run.err
    got = guest_manifest(msb, box.name, f"{DEST}/sftp/core")
    _assert_same(without_links(host_manifest(data.core)), got, times=True)


def test_sftp_recursive_get_is_byte_exact_keeps_modes_and_mtimes_and_skips_links(
    msb: Env, box: Box, local: Path
) -> None:
    run = sftp(msb, box.name, [f"get -r -p {SRC}/core {local}"])
    assert run.returncode == 0, run.err
    _assert_same(without_links(under(box.source, "core")), host_manifest(local / "core"),
                 times=True)


def test_sftp_single_file_put_and_get_without_p_carry_bytes_not_times(
    msb: Env, data: DataSets, box: Box, local: Path
) -> None:
    tmp = msb.guest_tmp(box.name)
    run = sftp(msb, box.name, [f"put {data.every_byte} {tmp}/sftp-every-byte.bin",
                               f"put {data.core / 'empty'} {tmp}/sftp-empty",
                               f"get {tmp}/sftp-every-byte.bin {local}/every-byte.bin",
                               f"get {tmp}/sftp-empty {local}/empty"])
    assert run.returncode == 0, run.err
    assert guest_digest(msb, box.name, f"{tmp}/sftp-every-byte.bin") == sha256_file(data.every_byte)
    assert (local / "every-byte.bin").read_bytes() == data.every_byte.read_bytes()
    assert (local / "empty").read_bytes() == b""
    assert int((local / "every-byte.bin").stat().st_mtime) > EPOCH + 10_000_000


# ---- rsync


def test_rsync_archive_upload_keeps_bytes_links_modes_and_mtimes(
    msb: Env, data: DataSets, guest_tools_box: Box
) -> None:
    name = guest_tools_box.name
    run = rsync(msb, "-a", str(data.core), str(data.small), target(msb, name, f"{DEST}/rsync/"))
    assert (run.returncode, run.err) == (0, ""), run.err
    got = guest_manifest(msb, name, f"{DEST}/rsync")
    _assert_same(host_manifest(data.root), got, times=True, kinds=("file", "dir"))
    assert got["core/links/abs-link"].data == ABSOLUTE_LINK_TARGET


def test_rsync_archive_download_keeps_bytes_links_modes_and_mtimes(
    msb: Env, guest_tools_box: Box, local: Path
) -> None:
    box = guest_tools_box
    run = rsync(msb, "-a", target(msb, box.name, f"{SRC}/core"),
                target(msb, box.name, f"{SRC}/small"), f"{local}/")
    assert (run.returncode, run.err) == (0, ""), run.err
    got = host_manifest(local)
    _assert_same(box.source, got, times=True, kinds=("file", "dir"))
    assert got["core/links/sub/up-link"].data == "../target.txt"


def test_rsync_compressed_upload_and_download_are_byte_exact(
    msb: Env, data: DataSets, guest_tools_box: Box, local: Path
) -> None:
    box = guest_tools_box
    run = rsync(msb, "-az", str(data.core), target(msb, box.name, f"{DEST}/rsync-z/"))
    assert (run.returncode, run.err) == (0, ""), run.err
    _assert_same(host_manifest(data.core), guest_manifest(msb, box.name, f"{DEST}/rsync-z/core"),
                 times=True)
    run = rsync(msb, "-az", target(msb, box.name, f"{SRC}/core"), f"{local}/")
    assert (run.returncode, run.err) == (0, ""), run.err
    _assert_same(under(box.source, "core"), host_manifest(local / "core"), times=True)


def test_rsync_delete_upload_removes_what_the_source_lacks(
    msb: Env, data: DataSets, guest_tools_box: Box
) -> None:
    name = guest_tools_box.name
    run = rsync(msb, "-a", "--delete", f"{data.core / 'names'}/",
                target(msb, name, f"{DEST}/rsync-delete/"))
    assert (run.returncode, run.err) == (0, ""), run.err
    got = guest_manifest(msb, name, f"{DEST}/rsync-delete")
    _assert_same(host_manifest(data.core / "names"), got, times=True)


def test_rsync_delete_download_removes_what_the_source_lacks(
    msb: Env, data: DataSets, guest_tools_box: Box, local: Path
) -> None:
    box = guest_tools_box
    shutil.copytree(data.core / "names", local / "names", symlinks=True)
    (local / "names" / STALE).write_text("stale\n")
    (local / "names" / "stale-dir").mkdir()
    run = rsync(msb, "-a", "--delete", target(msb, box.name, f"{SRC}/core/names/"),
                f"{local}/names/")
    assert (run.returncode, run.err) == (0, ""), run.err
    _assert_same(under(box.source, "core/names"), host_manifest(local / "names"), times=True)


def test_rsync_checksum_mode_replaces_files_with_equal_size_and_mtime(
    msb: Env, guest_tools_box: Box, local: Path
) -> None:
    name = guest_tools_box.name
    upload = local / "up" / "same.txt"
    upload.parent.mkdir()
    upload.write_bytes(b"H" * SAME_SIZE_AND_TIME)
    os.utime(upload, (EPOCH, EPOCH))
    run = rsync(msb, "-a", str(upload), target(msb, name, f"{DEST}/rsync-c/"))
    assert (run.returncode, run.err) == (0, ""), run.err
    # the premise: rsync's quick check (size and mtime) sees nothing to do
    assert guest_digest(msb, name, f"{DEST}/rsync-c/same.txt") == hashlib.sha256(
        b"B" * SAME_SIZE_AND_TIME).hexdigest()
    run = rsync(msb, "-a", "-c", str(upload), target(msb, name, f"{DEST}/rsync-c/"))
    assert (run.returncode, run.err) == (0, ""), run.err
    assert guest_digest(msb, name, f"{DEST}/rsync-c/same.txt") == sha256_file(upload)

    download = local / "down" / "same.txt"
    download.parent.mkdir()
    download.write_bytes(b"L" * SAME_SIZE_AND_TIME)
    os.utime(download, (EPOCH, EPOCH))
    run = rsync(msb, "-a", "-c", target(msb, name, CHECKSUM_SRC), str(download))
    assert (run.returncode, run.err) == (0, ""), run.err
    assert download.read_bytes() == b"G" * SAME_SIZE_AND_TIME


def _interrupt(argv: list[str], after: float) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` in its own process group and Ctrl-C the group (client, ssh, proxy)."""
    client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(after)
        assert client.poll() is None, "the transfer ended before it could be interrupted"
        os.killpg(client.pid, signal.SIGINT)
        stdout, stderr = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.communicate()
    return subprocess.CompletedProcess(argv, client.returncode, stdout, stderr)


def _guest_size_and_digest(msb: Env, sandbox: str, path: str, wait: float = 15) -> tuple[int, str]:
    deadline = time.monotonic() + wait
    while True:
        run = msb.ssh(sandbox, f"stat -c %s {path} && sha256sum {path}")
        if run.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert run.returncode == 0, run.err
    size, digest = run.out.split()[:2]
    return int(size), digest


def test_interrupted_rsync_partial_upload_fails_keeps_a_prefix_and_resumes(
    msb: Env, data: DataSets, guest_tools_box: Box
) -> None:
    name = guest_tools_box.name
    dest = f"{DEST}/rsync-partial/big.bin"
    argv = rsync_argv(msb, "-a", "--partial", f"--bwlimit={SLOW_RSYNC_KIB}", str(data.big),
                      target(msb, name, dest))
    cut = _interrupt(argv, after=3)
    assert cut.returncode != 0
    size, digest = _guest_size_and_digest(msb, name, dest)
    assert 0 < size < BIG_SIZE
    assert digest == hashlib.sha256(data.big.read_bytes()[:size]).hexdigest()
    run = rsync(msb, "-a", "--partial", str(data.big), target(msb, name, dest))
    assert (run.returncode, run.err) == (0, ""), run.err
    assert guest_digest(msb, name, dest) == sha256_file(data.big)


def test_interrupted_rsync_partial_download_fails_keeps_a_prefix_and_resumes(
    msb: Env, data: DataSets, guest_tools_box: Box, local: Path
) -> None:
    name = guest_tools_box.name
    argv = rsync_argv(msb, "-a", "--partial", f"--bwlimit={SLOW_RSYNC_KIB}",
                      target(msb, name, f"{SRC}/core/big.bin"), f"{local}/")
    cut = _interrupt(argv, after=3)
    assert cut.returncode != 0
    kept = (local / "big.bin").read_bytes()
    assert 0 < len(kept) < BIG_SIZE
    assert kept == data.big.read_bytes()[:len(kept)]
    run = rsync(msb, "-a", "--partial", target(msb, name, f"{SRC}/core/big.bin"), f"{local}/")
    assert (run.returncode, run.err) == (0, ""), run.err
    assert sha256_file(local / "big.bin") == sha256_file(data.big)


@pytest.mark.needs_guest("programs hidden from the guest's shell: the fake hides them only from "
                        "msb-proxy's own look-ups")
def test_missing_rsync_is_named_with_the_sandbox(msb: Env, data: DataSets, native_box: Box,
                                                 local: Path) -> None:
    name = native_box.name
    for run in (rsync(msb, "-a", str(data.every_byte), target(msb, name, "/tmp/")),
                rsync(msb, "-a", target(msb, name, f"{SRC}/core/empty"), f"{local}/")):
        assert run.returncode != 0
        assert [line for line in run.err.splitlines() if "rsync" in line and name in line], run.err


# ---- the login user


@pytest.mark.needs_guest("the guest user dev")
def test_files_uploaded_as_dev_belong_to_dev(msb: Env, data: DataSets, box: Box) -> None:
    source = str(data.every_byte)
    runs = [
        scp(msb, source, target(msb, box.name, "/home/dev/by-scp", user="dev")),
        scp(msb, source, target(msb, box.name, "/home/dev/by-scp-legacy", user="dev"),
            legacy=True),
        sftp(msb, box.name, [f"put {source} /home/dev/by-sftp"], user="dev"),
    ]
    names = ["by-scp", "by-scp-legacy", "by-sftp"]
    if box.has_guest_tools:
        runs.append(rsync(msb, source, target(msb, box.name, "/home/dev/by-rsync", user="dev")))
        names.append("by-rsync")
    assert [run.returncode for run in runs] == [0] * len(runs), [run.err for run in runs]
    got = guest_manifest(msb, box.name, "/home/dev")
    digest = sha256_file(data.every_byte)
    owners = {name: (got[name].uid, got[name].gid, got[name].data) for name in names}
    assert owners == dict.fromkeys(names, (1000, 1000, digest))


@pytest.mark.needs_guest("the guest user dev and the guest's /etc")
def test_dev_cannot_overwrite_a_root_owned_file_in_etc(msb: Env, data: DataSets, box: Box) -> None:
    before = guest_digest(msb, box.name, "/etc/hostname")
    run = sftp(msb, box.name, [f"put {data.every_byte} /etc/hostname"], user="dev")
    assert run.returncode == 1
    assert run.err.replace("\r", "") == 'dest open "/etc/hostname": Permission denied\n'
    assert guest_digest(msb, box.name, "/etc/hostname") == before


@pytest.mark.needs_guest("the guest users root and dev, at home in /root and /home/dev")
def test_relative_paths_start_in_the_login_users_home(msb: Env, data: DataSets, box: Box) -> None:
    source = str(data.every_byte)
    for user, home in (("root", "/root"), ("dev", "/home/dev")):
        run = sftp(msb, box.name, ["pwd", f"put {source} rel-sftp.bin"], user=user)
        assert run.returncode == 0, run.err
        assert f"Remote working directory: {home}\n" in run.out
        for name, legacy in (("rel-scp.bin", False), ("rel-scp-legacy.bin", True)):
            run = scp(msb, source, target(msb, box.name, name, user=user), legacy=legacy)
            assert run.returncode == 0, run.err
    names = ("rel-sftp.bin", "rel-scp.bin", "rel-scp-legacy.bin")
    digest = sha256_file(data.every_byte)
    for home in ("/root", "/home/dev"):
        got = guest_manifest(msb, box.name, home)
        assert {name: got[name].data for name in names} == dict.fromkeys(names, digest)


# ---- failures are reported as failures


def _upload_argv(msb: Env, tool: str, sandbox: str, source: Path, dest: str, *,
                 user: str | None = None, options: list[str] | None = None) -> list[str]:
    extra = options or []
    if tool == "sftp":
        return sftp_argv(msb, sandbox, [f"put {source} {dest}"], user=user, options=extra)
    if tool == "rsync":
        return rsync_argv(msb, *extra, str(source), target(msb, sandbox, dest, user=user))
    return scp_argv(msb, *extra, str(source), target(msb, sandbox, dest, user=user),
                    legacy=tool == "scp-legacy")


@pytest.mark.needs_guest("the guest user dev and the guest's /etc")
@pytest.mark.parametrize("tool", ["scp", "scp-legacy", "sftp", "rsync"])
def test_upload_into_a_directory_the_user_cannot_write_fails_with_the_reason(
    msb: Env, data: DataSets, box: Box, tool: str
) -> None:
    if tool == "rsync" and not box.has_guest_tools:
        pytest.skip("rsync is hidden in this sandbox (see test_missing_rsync_...)")
    run = run_client(_upload_argv(msb, tool, box.name, data.every_byte, "/etc/", user="dev"))
    # OpenSSH's scp -t names the target as "/etc//every-byte.bin"; the slashes don't matter
    lines = run.err.replace("\r", "").replace("//", "/").splitlines()
    if tool == "rsync":
        assert run.returncode == 23
        assert lines[0].startswith('rsync: [receiver] mkstemp "/etc/.every-byte.bin.')
        assert lines[0].endswith('" failed: Permission denied (13)')
    else:
        assert run.returncode == 1
        assert lines == {
            "scp": ['scp: dest open "/etc/every-byte.bin": Permission denied',
                    f"scp: failed to upload file {data.every_byte} to /etc/"],
            "scp-legacy": ["scp: /etc/every-byte.bin: Permission denied"],
            "sftp": ['dest open "/etc/every-byte.bin": Permission denied'],
        }[tool]
    assert msb.ssh(box.name, "test -e /etc/every-byte.bin").returncode == 1


# What OpenSSH's clients print for a missing remote file: scp asks the server for the file
# (legacy: scp -f's error line; SFTP mode: its STAT reply), sftp globs the name first.
MISSING = "/srv/no-such-file"
MISSING_FILE_ERRORS = {
    "scp": f'scp: {MISSING}: No such file or directory',
    "scp-legacy": f"scp: {MISSING}: No such file or directory",
    "sftp": f'File "{MISSING}" not found.',
}


@pytest.mark.parametrize("tool", ["scp", "scp-legacy", "sftp"])
def test_download_of_a_missing_file_fails_with_the_reason(
    msb: Env, box: Box, tool: str, local: Path
) -> None:
    if tool == "sftp":
        run = sftp(msb, box.name, [f"get {MISSING} {local}/"])
    else:
        run = scp(msb, target(msb, box.name, MISSING), str(local), legacy=tool == "scp-legacy")
    assert run.returncode == 1
    assert run.err.replace("\r", "").splitlines() == [MISSING_FILE_ERRORS[tool]]
    assert list(local.iterdir()) == []


# scp's SFTP mode meets the same server as sftp here; its client is covered by the tests above.
@pytest.mark.parametrize("tool", ["scp-legacy", "sftp", "rsync"])
def test_upload_cut_off_by_the_sandbox_stopping_is_reported_as_a_failure(
    msb: Env, data: DataSets, box: Box, tool: str
) -> None:
    if tool == "rsync" and not box.has_guest_tools:
        pytest.skip("rsync is hidden in this sandbox")
    dest = f"{DEST}/interrupted/{tool}.bin"
    slow = [f"--bwlimit={SLOW_RSYNC_KIB}"] if tool == "rsync" else ["-l", SLOW_SCP_KBIT]
    client = subprocess.Popen(_upload_argv(msb, tool, box.name, data.big, dest, options=slow),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(2.5)
        assert client.poll() is None, "the upload ended before the sandbox was stopped"
        stopped = msb.msb_proxy("stop", box.name)
        assert stopped.returncode == 0, stopped.err
        try:
            _, stderr = client.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{tool} still runs 15 s after its sandbox stopped")
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.communicate()
    assert client.returncode != 0, stderr.decode(errors="replace")
    size = msb.ssh(box.name, f"stat -c %s {dest} 2>/dev/null || echo 0").out.strip()
    assert int(size) < BIG_SIZE
