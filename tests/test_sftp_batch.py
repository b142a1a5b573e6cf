"""``sftp -b``: every OpenSSH sftp command that reaches the server, with its exact outcome.

Runs against the guest's own sftp-server (the reference: what sshd users get) and against
msb-proxy's native SFTP server (the guest's sftp-server hidden). The expected transcripts are
OpenSSH 9.2's: in batch mode sftp echoes each command as ``sftp> LINE`` on stdout and prints
errors on stderr as ``fx2txt(status)`` of the server's reply ("No such file or directory",
"Permission denied", "Failure"), so the status code a server picks is visible here. A line
starting with ``-`` may fail; any other failing line ends the batch with exit status 1.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_BACKEND, Env, Run
from transfer_helpers import EPOCH, SFTP_SERVER, guest_manifest, hide_programs, sftp

# ls -l prints times in the client's zone and locale; mtimes are EPOCH (2020-09-13).
CLIENT_ENV = dict(os.environ, TZ="UTC", LC_ALL="C")
OLD = "Sep 13  2020"
# The guest user dev's part, where there is one (not on the fake backend)
_DEV_SEED = """
chown dev:dev long/a.txt
mkdir -p /home/dev/batch && echo mine > /home/dev/batch/mine && chown -R dev:dev /home/dev/batch
"""


def _seed(base: str, dev: bool) -> str:
    """The shell script that lays out the tests' files under ``base``; it prints ``$HOME``."""
    return f"""
set -e
mkdir -p {base} && cd {base}
mkdir -p nav/dir ls/sub long mk/existing rd/empty rd/full rm/dir mv/dir ln attr stop resume
echo file > nav/file
printf 'hello\\n' > ls/a.txt; printf '#!/bin/sh\\n' > ls/b.sh; chmod 755 ls/b.sh
echo hidden > ls/.hidden; ln -s a.txt ls/link
printf 'hello\\n' > long/a.txt; ln -s a.txt long/link
echo file > mk/file
echo x > rd/full/x; echo file > rd/file
echo one > rm/f1; echo g1 > rm/g1; echo g2 > rm/g2; echo keep > rm/keep
echo a > mv/a; echo c > mv/c; echo d > mv/d
echo file > ln/file; ln -s file ln/existing-link
echo attr > attr/f
{_DEV_SEED if dev else ""}
find {base} -exec touch -h -d @{EPOCH} {{}} +
echo "$HOME"
"""


@dataclass(frozen=True)
class Box:
    name: str
    label: str
    base: str  # the directory the tests work in: /srv/batch in a real guest
    home: str  # the login user's home, where sftp starts


def _make_box(msb: Env, label: str) -> Box:
    name = f"batch-{label}-{uuid.uuid4().hex[:6]}"
    msb.host(name)
    if label == "native":
        hide_programs(msb, name, [SFTP_SERVER])
    # The fake backend's /srv is the host's: there the files go to the sandbox's own tmp/.
    fake = msb.backend == "fake"
    base = f"{msb.guest_tmp(name)}/batch" if fake else "/srv/batch"
    run = msb.ssh(name, _seed(base, dev=not fake))
    assert run.returncode == 0, run.err
    return Box(name, label, base, home=run.out.strip())


@pytest.fixture(scope="module", params=[
    pytest.param("guest-sftp-server", marks=pytest.mark.skipif(
        TEST_BACKEND == "fake" and not os.path.exists(SFTP_SERVER),
        reason=f"fake backend: the host has no {SFTP_SERVER} to stand in for the guest's")),
    "native"])
def box(request: pytest.FixtureRequest, msb: Env) -> Box:
    return _make_box(msb, str(request.param))


def batch(msb: Env, box: Box, *lines: str, user: str | None = None) -> Run:
    return sftp(msb, box.name, lines, user=user, env=CLIENT_ENV)


def transcript(*entries: str | tuple[str, ...]) -> str:
    """What sftp prints on stdout: each command echoed, then its output lines."""
    out = []
    for entry in entries:
        command, *output = (entry,) if isinstance(entry, str) else entry
        out += [f"sftp> {command}", *output]
    return "".join(f"{line}\n" for line in out)


def errors(run: Run) -> list[str]:
    return run.err.replace("\r", "").splitlines()


def guest(msb: Env, box: Box, command: str) -> str:
    run = msb.ssh(box.name, command)
    assert run.returncode == 0, run.err
    return run.out


def test_pwd_and_cd_resolve_paths_and_refuse_missing_and_non_directories(
    msb: Env, box: Box
) -> None:
    run = batch(msb, box, "pwd", f"cd {box.base}/nav", "pwd", "cd dir", "pwd", "cd ..", "pwd",
                "-cd nonexistent", "-cd file", "pwd")
    assert run.returncode == 0
    assert run.out == transcript(
        ("pwd", f"Remote working directory: {box.home}"),
        f"cd {box.base}/nav", ("pwd", f"Remote working directory: {box.base}/nav"),
        "cd dir", ("pwd", f"Remote working directory: {box.base}/nav/dir"),
        "cd ..", ("pwd", f"Remote working directory: {box.base}/nav"),
        "-cd nonexistent", "-cd file", ("pwd", f"Remote working directory: {box.base}/nav"))
    assert errors(run) == [
        "stat remote: No such file or directory",
        f'Can\'t change directory: "{box.base}/nav/file" is not a directory',
    ]


def test_ls_lists_names_hidden_entries_and_one_per_line(msb: Env, box: Box) -> None:
    run = batch(msb, box, f"cd {box.base}/ls", "ls", "ls -a", "ls -1", "ls -1r", "ls sub",
                "-ls nothere")
    assert run.returncode == 0
    assert run.out == transcript(
        f"cd {box.base}/ls",
        ("ls", "a.txt  b.sh   link   sub    "),
        # OpenSSH's sftp sizes the columns by the longest name it was sent, "." and ".." too
        ("ls -a", ".         ..        .hidden   a.txt     b.sh      link      sub       "),
        ("ls -1", "a.txt", "b.sh", "link", "sub"),
        ("ls -1r", "sub", "link", "b.sh", "a.txt"),
        "ls sub",
        "-ls nothere",
    )
    assert errors(run) == [f'Can\'t ls: "{box.base}/ls/nothere" not found']


@pytest.mark.needs_guest("the guest user dev")
def test_ls_long_shows_lstat_of_links_in_a_listing_and_stat_of_a_named_link(
    msb: Env, box: Box
) -> None:
    run = batch(msb, box, f"cd {box.base}/long", "ls -l", "ls -l link", "ls -lh")
    assert (run.returncode, run.err) == (0, "")
    assert run.out == transcript(
        f"cd {box.base}/long",
        ("ls -l", f"-rw-r--r--    ? dev      dev             6 {OLD} a.txt",
                  f"lrwxrwxrwx    ? root     root            5 {OLD} link"),
        # a named path is globbed and stat()ed: the link's target's attributes, the link's name
        ("ls -l link", f"-rw-r--r--    ? dev      dev             6 {OLD} link"),
        ("ls -lh", f"-rw-r--r--    ? dev      dev            6B {OLD} a.txt",
                   f"lrwxrwxrwx    ? root     root           5B {OLD} link"),
    )


def test_mkdir_makes_one_level_and_fails_on_existing_names_and_missing_parents(
    msb: Env, box: Box
) -> None:
    run = batch(msb, box, f"cd {box.base}/mk", "mkdir new", "-mkdir new", "-mkdir existing",
                "-mkdir file", "-mkdir a/b/c")
    assert run.returncode == 0
    assert errors(run) == [
        f'remote mkdir "{box.base}/mk/new": Failure',
        f'remote mkdir "{box.base}/mk/existing": Failure',
        f'remote mkdir "{box.base}/mk/file": Failure',
        f'remote mkdir "{box.base}/mk/a/b/c": No such file or directory',
    ]
    got = guest_manifest(msb, box.name, f"{box.base}/mk")
    assert {path: entry.kind for path, entry in got.items()} == {
        "new": "dir", "existing": "dir", "file": "file"}
    assert got["new"].mode == 0o755  # 0777 from the client, less the guest's umask 022


def test_rmdir_removes_an_empty_directory_only(msb: Env, box: Box) -> None:
    run = batch(msb, box, f"cd {box.base}/rd", "rmdir empty", "-rmdir full", "-rmdir nonexistent",
                "-rmdir file")
    assert run.returncode == 0
    assert errors(run) == [
        f'remote rmdir "{box.base}/rd/full": Failure',
        f'remote rmdir "{box.base}/rd/nonexistent": No such file or directory',
        # ENOTDIR, as sftp-server maps it
        f'remote rmdir "{box.base}/rd/file": No such file or directory',
    ]
    assert sorted(guest_manifest(msb, box.name, f"{box.base}/rd")) == ["file", "full", "full/x"]


def test_rm_removes_files_and_globs_and_refuses_directories_and_missing_names(
    msb: Env, box: Box
) -> None:
    run = batch(msb, box, f"cd {box.base}/rm", "rm f1", "rm g*", "-rm nonexistent", "-rm dir")
    assert run.returncode == 0
    assert errors(run) == [
        f"remote delete {box.base}/rm/nonexistent: No such file or directory",
        f"remote delete {box.base}/rm/dir: Failure",
    ]
    assert sorted(guest_manifest(msb, box.name, f"{box.base}/rm")) == ["dir", "keep"]


def test_rename_moves_and_replaces_an_existing_file_via_posix_rename(msb: Env, box: Box) -> None:
    run = batch(msb, box, f"cd {box.base}/mv", "rename a b", "rename c d", "-rename nonexistent x",
                "-rename b dir", "-rename dir d")
    assert run.returncode == 0
    assert errors(run) == [
        f'remote rename "{box.base}/mv/nonexistent" to "{box.base}/mv/x": '
        "No such file or directory",
        f'remote rename "{box.base}/mv/b" to "{box.base}/mv/dir": Failure',  # EISDIR
        # ENOTDIR
        f'remote rename "{box.base}/mv/dir" to "{box.base}/mv/d": No such file or directory',
    ]
    assert guest(msb, box, f"cd {box.base}/mv && ls && cat b d") == "b\nd\ndir\na\nc\n"


def test_ln_makes_hard_and_symbolic_links_and_symlink_is_ln_s(msb: Env, box: Box) -> None:
    run = batch(msb, box, f"cd {box.base}/ln", "ln file hard", "ln -s file soft",
                "symlink file soft2", "ln -s ../ln/file up", "-ln -s file existing-link",
                "-ln nonexistent h2", "-ln file hard")
    assert run.returncode == 0
    assert errors(run) == [
        f'remote symlink file "file" to "{box.base}/ln/existing-link": Failure',
        f'remote link "{box.base}/ln/nonexistent" to "{box.base}/ln/h2": No such file or directory',
        f'remote link "{box.base}/ln/file" to "{box.base}/ln/hard": Failure',
    ]
    out = guest(msb, box, f"cd {box.base}/ln && stat -c '%n %h %F' file hard && "
                          "readlink soft soft2 up existing-link && cat up")
    assert out == ("file 2 regular file\nhard 2 regular file\n"
                   "file\nfile\n../ln/file\nfile\nfile\n")


@pytest.mark.needs_guest("root of the guest, to give a file to another user")
def test_chmod_chown_chgrp_set_mode_and_owner(msb: Env, box: Box) -> None:
    run = batch(msb, box, f"cd {box.base}/attr", "chmod 640 f", "chown 1000 f", "chgrp 100 f",
                "-chmod 600 nonexistent", "-chown 1000 nonexistent")
    assert run.returncode == 0
    assert errors(run) == [
        f'remote setstat "{box.base}/attr/nonexistent": No such file or directory',
        "stat remote: No such file or directory",
    ]
    assert guest(msb, box, f"stat -c '%a %u %g %Y' {box.base}/attr/f") == f"640 1000 100 {EPOCH}\n"


def test_put_and_get_carry_bytes_and_p_keeps_mode_and_times(
    msb: Env, box: Box, tmp_path: Path
) -> None:
    local = tmp_path / "local.bin"
    payload = bytes(range(256)) * 1000 + os.urandom(777)
    local.write_bytes(payload)
    local.chmod(0o604)
    os.utime(local, (EPOCH + 5, EPOCH + 5))
    run = batch(msb, box, f"cd {box.base}/resume", f"put {local} plain.bin",
                f"put -p {local} kept.bin", f"get kept.bin {tmp_path}/back.bin",
                f"get -p kept.bin {tmp_path}/back-p.bin")
    assert (run.returncode, run.err) == (0, "")
    out = guest(msb, box, f"cd {box.base}/resume && stat -c '%n %a %s %Y' plain.bin kept.bin && "
                          "cmp plain.bin kept.bin && echo same")
    plain, kept, same = out.splitlines()
    assert plain.split()[:3] == ["plain.bin", "604", str(len(payload))]  # sftp sends the mode
    assert int(plain.split()[3]) > EPOCH + 10_000_000
    assert (kept, same) == (f"kept.bin 604 {len(payload)} {EPOCH + 5}", "same")
    assert (tmp_path / "back.bin").read_bytes() == payload
    back = (tmp_path / "back-p.bin").stat()
    assert (oct(back.st_mode & 0o777), int(back.st_mtime)) == (oct(0o604), EPOCH + 5)


def test_reput_and_reget_resume_at_the_existing_length(
    msb: Env, box: Box, tmp_path: Path
) -> None:
    payload = os.urandom(300_000)
    local = tmp_path / "source.bin"
    local.write_bytes(payload)
    # Different bytes in the part already there prove that it was kept, not sent again.
    stale = b"\xee" * 100_000
    seed = msb.ssh(box.name, f"cat > {box.base}/resume/partial-up.bin", input=stale)
    assert seed.returncode == 0, seed.err
    msb.ssh(box.name, f"cat > {box.base}/resume/whole.bin", input=payload)
    (tmp_path / "partial-down.bin").write_bytes(stale)
    (tmp_path / "longer.bin").write_bytes(payload + b"more")
    run = batch(msb, box, f"cd {box.base}/resume", f"reput {local} partial-up.bin",
                f"reget whole.bin {tmp_path}/partial-down.bin",
                f"-reget whole.bin {tmp_path}/longer.bin")
    assert run.returncode == 0
    assert errors(run) == [
        f'Unable to resume download of "{tmp_path}/longer.bin": local file is larger than remote']
    resumed = stale + payload[len(stale):]
    got = guest_manifest(msb, box.name, f"{box.base}/resume")
    assert got["partial-up.bin"].data == hashlib.sha256(resumed).hexdigest()
    assert (tmp_path / "partial-down.bin").read_bytes() == resumed


def test_df_reports_the_guests_file_system(msb: Env, box: Box) -> None:
    run = batch(msb, box, f"df {box.base}", f"df -i {box.base}")
    assert (run.returncode, run.err) == (0, "")
    lines = run.out.splitlines()
    assert lines[0] == f"sftp> df {box.base}"
    assert lines[1].split() == ["Size", "Used", "Avail", "(root)", "%Capacity"]
    assert lines[3] == f"sftp> df -i {box.base}"
    assert lines[4].split() == ["Inodes", "Used", "Avail", "(root)", "%Capacity"]
    blocks, block_size, inodes = guest(msb, box, f"stat -f -c '%b %S %c' {box.base}").split()
    assert int(lines[2].split()[0]) == int(blocks) * int(block_size) // 1024
    assert int(lines[5].split()[0]) == int(inodes)


def test_batch_ends_at_the_first_failing_line_without_a_dash(msb: Env, box: Box) -> None:
    run = batch(msb, box, f"cd {box.base}/stop", "mkdir one", "rm nonexistent", "mkdir two")
    assert run.returncode == 1
    assert run.out == transcript(f"cd {box.base}/stop", "mkdir one", "rm nonexistent")
    assert errors(run) == [f"remote delete {box.base}/stop/nonexistent: No such file or directory"]
    assert sorted(guest_manifest(msb, box.name, f"{box.base}/stop")) == ["one"]


@pytest.mark.needs_guest("the guest user dev and the guest's /etc")
def test_login_user_gets_permission_denied_where_sshd_would_refuse(
    msb: Env, box: Box, tmp_path: Path
) -> None:
    local = tmp_path / "up.txt"
    local.write_text("up\n")
    before = guest(msb, box, "stat -c '%a %u %Y' /etc/hostname; sha256sum /etc/hostname")
    run = batch(msb, box, "pwd", f"put {local} mine-too",
                f"-put {local} /etc/newfile", f"-put {local} /etc/hostname",
                "-rm /etc/hostname", "-mkdir /etc/newdir", "-rmdir /etc/apt",
                "-chmod 777 /etc/hostname", "-chown 1000 /etc/hostname",
                "-rename /etc/hostname /etc/h2", "-symlink /etc/hostname /etc/sl",
                "-ln /etc/hostname /etc/hl", f"-get /etc/shadow {tmp_path}/shadow",
                "-ls /root", "-chown 0 batch/mine",
                user="dev")
    assert run.returncode == 0
    assert "Remote working directory: /home/dev\n" in run.out
    assert errors(run) == [
        'dest open "/etc/newfile": Permission denied',
        'dest open "/etc/hostname": Permission denied',
        "remote delete /etc/hostname: Permission denied",
        'remote mkdir "/etc/newdir": Permission denied',
        'remote rmdir "/etc/apt": Permission denied',
        'remote setstat "/etc/hostname": Permission denied',
        'remote setstat "/etc/hostname": Permission denied',
        'remote rename "/etc/hostname" to "/etc/h2": Permission denied',
        'remote symlink file "/etc/hostname" to "/etc/sl": Permission denied',
        'remote link "/etc/hostname" to "/etc/hl": Permission denied',
        'remote open "/etc/shadow": Permission denied',
        'remote readdir("/root/"): Permission denied',
        'remote setstat "/home/dev/batch/mine": Permission denied',
    ]
    assert not (tmp_path / "shadow").exists()
    after = guest(msb, box, "stat -c '%a %u %Y' /etc/hostname; sha256sum /etc/hostname; "
                            "ls /etc/newfile /etc/newdir /etc/sl /etc/hl /etc/h2 2>&1 | wc -l; "
                            "stat -c '%U %G' /home/dev/mine-too")
    assert after == before + "5\ndev dev\n"


def test_quoted_names_reach_the_server_unchanged(msb: Env, box: Box, tmp_path: Path) -> None:
    local = tmp_path / "it's here.txt"
    local.write_text("quoted\n")
    tmp = msb.guest_tmp(box.name)
    run = batch(msb, box, f'put "{local}" "{tmp}/with space and \'quote\'.txt"',
                f"rename \"{tmp}/with space and 'quote'.txt\" {tmp}/-dash.txt")
    assert (run.returncode, run.err) == (0, "")
    assert guest(msb, box, f"cat -- {shlex.quote(f'{tmp}/-dash.txt')}") == "quoted\n"


@pytest.mark.needs_guest("the guest user dev and the guest's /root")
def test_realpath_through_a_directory_the_user_cannot_search_is_permission_denied(
    msb: Env, box: Box
) -> None:
    # sftp-server's realpath lstat()s each component: EACCES on /root fails the request, where
    # only a missing last component would be allowed.
    run = batch(msb, box, "-cd /root/nonexistent", "-cd /root/.bashrc", user="dev")
    assert run.returncode == 0
    assert errors(run) == ["realpath /root/nonexistent: Permission denied",
                           "realpath /root/.bashrc: Permission denied"]
