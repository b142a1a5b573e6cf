"""Nothing lost (issue 12): a transfer that cannot complete is reported failed, never as done.

Through the real scp (SFTP mode and ``scp -O``), sftp, rsync and ``ssh ... cat``, into two
sandboxes: ``tools``, which has OpenSSH's sftp-server and scp, and ``native``, where both are
hidden so msb-proxy serves SFTP and ``scp -t``/``scp -f`` itself over its guest file helper.

* A full disk (a 1 MiB tmpfs mounted on the host and given to the sandbox as a volume) during
  an upload: the client's exit status and words are those it gives against OpenSSH's sshd (the
  same clients were run against ``sshd -i`` in the same jail for these expectations), and every
  file left under its final name is either whole or named as failed.
* A guest process killed in the middle of a transfer (sftp-server, scp, rsync or cat, or the
  file helper standing in for the first two): the client fails, and what it kept, or what the
  guest kept, is a true prefix of the file: short, never padded, never wrong.
* A sandbox whose jail init is killed, or that ``msb-proxy stop`` or ``rm`` takes away, ends
  every connection to it, one that only holds a tunnel (``ssh -N -L``) too, with one line.

Local backend only: the tmpfs volume, the jail's processes and its init are inspected on the
host.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_BACKEND, Env, Run
from installations import configure, init_pid, make_installation, remove_installation, wait_until
from transfer_helpers import GUEST_SCP, SFTP_SERVER, hide_programs, rsync_argv, scp_argv

pytestmark = pytest.mark.skipif(
    TEST_BACKEND != "local",
    reason="fills a tmpfs volume and kills the jail's processes, seen from the host")

FULL = "/mnt/full"  # 1 MiB of tmpfs: what does not fit fails with ENOSPC
ROOMY = "/mnt/roomy"  # a host directory: what arrives there is read on the host
FULL_SIZE = 1 << 20
UPLOAD_SIZE = 4 << 20
TREE_FILES = 4  # 400 KiB each: two fit, the third is cut short, the fourth does not start
TREE_FILE_SIZE = 400 << 10
BIG = "/root/big.bin"  # what downloads read
BIG_SIZE = 32 << 20
KILL_AFTER = 2 << 20  # bytes moved before the guest process is killed
SCP_KBIT = "20000"  # slow enough that a kill lands in the middle: 32 MiB take 13 s
RSYNC_KIB = "2500"
CLIENT_TIMEOUT_S = 60.0
ENDED_WITHIN_S = 10.0
SSH_GAVE_UP = 255
BOXES = ("tools", "native")


@dataclass
class Lab:
    """The installation, its two sandboxes, and the host's view of their volumes."""

    env: Env
    full: Path  # host side of FULL
    roomy: Path  # host side of ROOMY
    data: Path  # host files the tests send
    big: bytes  # the content of BIG in both sandboxes

    def empty_volumes(self) -> None:
        for volume in (self.full, self.roomy):
            for entry in volume.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


@pytest.fixture(scope="module")
def lab(msb: Env) -> Iterator[Lab]:
    full = Path(tempfile.mkdtemp(prefix="msb-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FULL_SIZE},mode=0777", "tmpfs",
                    str(full)], check=True)
    env = make_installation(msb)
    try:
        roomy = env.root / "roomy"
        roomy.mkdir()
        configure(env, f'[defaults]\nvolumes = ["{full}:{FULL}", "{roomy}:{ROOMY}"]\n')
        data = env.root / "data"
        data.mkdir()
        (data / "upload.bin").write_bytes(secrets.token_bytes(UPLOAD_SIZE))
        tree = data / "tree"
        tree.mkdir()
        for number in range(1, TREE_FILES + 1):
            (tree / f"f{number}").write_bytes(secrets.token_bytes(TREE_FILE_SIZE))
        big = secrets.token_bytes(BIG_SIZE)
        (data / "big.bin").write_bytes(big)
        for box in BOXES:
            seeded = env.ssh(box, f"cat > {BIG}", input=big)
            assert seeded.returncode == 0, seeded.err
        hide_programs(env, "native", [SFTP_SERVER, GUEST_SCP])
        yield Lab(env, full, roomy, data, big)
    finally:
        remove_installation(env)
        subprocess.run(["umount", "-l", str(full)], check=False)
        full.rmdir()


@pytest.fixture
def empty(lab: Lab) -> Iterator[Lab]:
    """``lab`` with both volumes emptied before the test and after it."""
    lab.empty_volumes()
    yield lab
    lab.empty_volumes()


# ---- running clients, and the guest processes behind them


@contextlib.contextmanager
def started(argv: list[str], **popen: object) -> Iterator[subprocess.Popen[bytes]]:
    """A client in its own process group, killed with its ssh and ProxyCommand if it is still
    running when the block ends."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    popen.setdefault("stdout", subprocess.DEVNULL)
    client = subprocess.Popen(argv, stderr=subprocess.PIPE, start_new_session=True,
                              **popen)  # type: ignore[call-overload]
    try:
        yield client
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
        client.communicate()


def finish(client: subprocess.Popen[bytes], timeout: float = CLIENT_TIMEOUT_S) -> Run:
    try:
        stdout, stderr = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{client.args!r} still runs after {timeout:.0f} s") from None
    return Run(client.returncode, stdout or b"", stderr or b"")


def run(argv: list[str]) -> Run:
    with started(argv) as client:
        return finish(client)


def guest_processes(env: Env, box: str, name: str) -> list[int]:
    """Host PIDs of the processes called ``name`` in ``box``, its jail init left out. The file
    helper is forked from the init without an exec, so it goes by the init's name."""
    init = init_pid(env, box)
    namespace = os.readlink(f"/proc/{init}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == init:
            continue
        with contextlib.suppress(OSError):
            if (os.readlink(entry / "ns" / "pid") == namespace
                    and (entry / "comm").read_text().strip() == name):
                found.append(int(entry.name))
    return found


def kill_mid_transfer(env: Env, box: str, name: str, moved: Callable[[], int],
                      client: subprocess.Popen[bytes]) -> None:
    """Once ``moved()`` says ``KILL_AFTER`` bytes have gone across, SIGKILL the guest's
    ``name`` processes."""
    assert wait_until(lambda: moved() >= KILL_AFTER or client.poll() is not None,
                      CLIENT_TIMEOUT_S, step=0.02) is not None
    assert client.poll() is None, f"the transfer ended before {KILL_AFTER} bytes were moved"
    victims = guest_processes(env, box, name)
    assert victims, f"no {name} runs in sandbox {box!r}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)


def size_of(path: Path) -> Callable[[], int]:
    """The size of ``path``, or of the largest file in its directory starting with its name or
    its dot-name (rsync's temporary file); 0 while there is none."""
    def size() -> int:
        sizes = [entry.stat().st_size for entry in path.parent.iterdir()
                 if entry.name.startswith((path.name, f".{path.name}"))]
        return max(sizes, default=0)
    return size


def assert_true_prefix(got: bytes, whole: bytes) -> None:
    assert len(got) < len(whole), "the interrupted transfer has the whole file"
    assert got == whole[:len(got)], "the interrupted transfer holds bytes the file does not"


def lines(run: Run) -> list[str]:
    return run.err.splitlines()


def helper_or(box: str, program: str) -> str:
    """The guest process a transfer runs: ``program``, or in ``native`` the file helper."""
    return program if box == "tools" else "msb-init"


# ---- a full disk


@pytest.mark.parametrize("box", BOXES)
def test_scp_upload_to_a_full_disk_fails_as_with_sshd(empty: Lab, box: str) -> None:
    source, target = empty.data / "upload.bin", f"{FULL}/upload.bin"
    done = run(scp_argv(empty.env, str(source), f"msb-{box}:{target}"))
    assert (done.returncode, lines(done)) == (1, [
        f'scp: write remote "{target}": Failure',
        f"scp: failed to upload file {source} to {target}"])
    assert (empty.full / "upload.bin").read_bytes() != source.read_bytes()


@pytest.mark.parametrize("box", BOXES)
def test_legacy_scp_upload_to_a_full_disk_fails_as_with_sshd(empty: Lab, box: str) -> None:
    source, target = empty.data / "upload.bin", f"{FULL}/upload.bin"
    done = run(scp_argv(empty.env, str(source), f"msb-{box}:{target}", legacy=True))
    assert (done.returncode, lines(done)) == (1, [f"scp: {target}: No space left on device"])
    assert (empty.full / "upload.bin").read_bytes() != source.read_bytes()


@pytest.mark.parametrize("box", BOXES)
def test_sftp_put_to_a_full_disk_fails_as_with_sshd(empty: Lab, box: str) -> None:
    source, target = empty.data / "upload.bin", f"{FULL}/upload.bin"
    done = _sftp(empty, box, [f"put {source} {target}"])
    assert (done.returncode, lines(done)) == (1, [f'write remote "{target}": Failure'])
    assert (empty.full / "upload.bin").read_bytes() != source.read_bytes()


def _sftp(lab: Lab, box: str, commands: list[str], *options: str) -> Run:
    batch = lab.env.root / f"batch-{secrets.token_hex(4)}"
    batch.write_text("".join(f"{line}\n" for line in commands))
    return run(["sftp", "-F", str(lab.env.config), *options, "-b", str(batch), f"msb-{box}"])


# rsync's own error lines; whether its sender also reports the broken pipe is a race of its own
# (it is the same against sshd).
RSYNC_FILE_IO = re.compile(r"rsync error: error in file IO \(code 11\) at receiver\.c\(\d+\) "
                           r"\[receiver=[\d.]+\]")
RSYNC_BROKEN_PIPE = "rsync: [sender] write error: Broken pipe (32)"


@pytest.mark.parametrize("inplace", [False, True], ids=["temporary-file", "inplace"])
def test_rsync_upload_to_a_full_disk_fails_as_with_sshd(empty: Lab, inplace: bool) -> None:
    source, target = empty.data / "upload.bin", f"{FULL}/upload.bin"
    done = run(rsync_argv(empty.env, *(["--inplace"] if inplace else []), str(source),
                          f"msb-tools:{target}"))
    assert done.returncode == 11, done.err
    said = lines(done)
    if said:  # or nothing at all, as against sshd (see the tree test below)
        first, second, *rest = said
        assert first == (f'rsync: [receiver] write failed on "{target}": '
                         "No space left on device (28)")
        assert RSYNC_FILE_IO.fullmatch(second), second
        assert rest in ([], [RSYNC_BROKEN_PIPE])
    left = [entry.name for entry in empty.full.iterdir()]
    assert left == (["upload.bin"] if inplace else [])  # a temporary file is removed
    if inplace:
        assert (empty.full / "upload.bin").read_bytes() != source.read_bytes()


@pytest.mark.parametrize("program", ["cat", "dd of={target} bs=64k status=none"])
def test_shell_upload_to_a_full_disk_fails_as_with_sshd(empty: Lab, program: str) -> None:
    source, target = empty.data / "upload.bin", f"{FULL}/upload.bin"
    command = f"cat > {target}" if program == "cat" else program.format(target=target)
    done = empty.env.ssh("tools", command, input=source.read_bytes())
    expected = ("cat: write error: No space left on device" if program == "cat" else
                f"dd: error writing '{target}': No space left on device")
    assert (done.returncode, lines(done)) == (1, [expected])
    assert (empty.full / "upload.bin").stat().st_size == FULL_SIZE


# What names a file as failed, per client; every other line must be one of the client's
# summaries of the same failures.
TREE_FAILURES = {
    "scp": (re.compile(r'scp: write remote "(.+)": Failure'),
            re.compile(r'scp: upload ".+/f\d" to ".+" failed|'
                       r"scp: failed to upload directory .+/tree to .+")),
    "scp-O": (re.compile(r"scp: (.+): No space left on device"), None),
    "sftp": (re.compile(r'write remote "(.+)": Failure'),
             re.compile(r'upload ".*tree/f\d" to ".+" failed')),
    "rsync": (re.compile(r'rsync: \[receiver\] write failed on "(.+)": '
                         r"No space left on device \(28\)"),
              re.compile(f"{RSYNC_FILE_IO.pattern}|{re.escape(RSYNC_BROKEN_PIPE)}")),
}
TREE_EXIT = {"scp": 1, "scp-O": 1, "sftp": 1, "rsync": 11}


@pytest.mark.parametrize(("box", "client"), [
    ("tools", "scp"), ("native", "scp"), ("tools", "scp-O"), ("native", "scp-O"),
    ("tools", "sftp"), ("native", "sftp"), ("tools", "rsync")])
def test_tree_upload_to_a_full_disk_leaves_no_short_file_unreported(
    empty: Lab, box: str, client: str
) -> None:
    tree = empty.data / "tree"
    host = f"msb-{box}"
    if client == "scp":
        done = run(scp_argv(empty.env, "-r", str(tree), f"{host}:{FULL}/"))
    elif client == "scp-O":
        done = run(scp_argv(empty.env, "-r", str(tree), f"{host}:{FULL}/", legacy=True))
    elif client == "sftp":
        done = _sftp(empty, box, [f"lcd {empty.data}", f"put -r tree {FULL}/tree"])
    else:
        done = run(rsync_argv(empty.env, "-a", str(tree), f"{host}:{FULL}/"))
    assert done.returncode == TREE_EXIT[client], done.err
    names_failure, summary = TREE_FAILURES[client]
    failed = set()
    for line in lines(done):
        if match := names_failure.fullmatch(line):
            failed.add(os.path.normpath(match[1]))
        else:
            assert summary is not None and summary.fullmatch(line), line
    # rsync's receiver names the file through the protocol stream, which its client may never
    # read before it dies writing to the ssh that has gone: the same against sshd (7 of 30
    # runs print nothing but exit 11). It renames only whole files, so none is named short.
    assert failed or client == "rsync", f"no file was reported failed: {done.err}"
    for entry in sorted((empty.full / "tree").iterdir()):
        if entry.name.startswith("."):
            continue  # rsync's temporary file: it never had the file's name
        whole = (tree / entry.name).read_bytes() == entry.read_bytes()
        assert whole or f"{FULL}/tree/{entry.name}" in failed, \
            f"{entry.name} arrived short and the client did not say so: {done.err}"


# ---- a guest process killed in the middle


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-mode", "legacy"])
def test_scp_download_whose_guest_side_is_killed_fails_with_a_true_prefix(
    empty: Lab, box: str, legacy: bool
) -> None:
    local = empty.env.root / f"down-{box}-{legacy}.bin"
    argv = scp_argv(empty.env, "-l", SCP_KBIT, f"msb-{box}:{BIG}", str(local), legacy=legacy)
    with started(argv) as client:
        kill_mid_transfer(empty.env, box, helper_or(box, "scp" if legacy else "sftp-server"),
                          size_of(local), client)
        done = finish(client)
    expected = (["scp: the guest file service ended"] if legacy and box == "native" else [])
    assert (done.returncode, lines(done)) == (1, [*expected, "lost connection"])
    assert_true_prefix(local.read_bytes(), empty.big)


@pytest.mark.parametrize("box", BOXES)
def test_sftp_get_whose_guest_side_is_killed_fails_with_a_true_prefix(
    empty: Lab, box: str
) -> None:
    local = empty.env.root / f"get-{box}.bin"
    batch = empty.env.root / f"get-{box}.batch"
    batch.write_text(f"get {BIG} {local}\n")
    argv = ["sftp", "-F", str(empty.env.config), "-l", SCP_KBIT, "-b", str(batch), f"msb-{box}"]
    with started(argv) as client:
        kill_mid_transfer(empty.env, box, helper_or(box, "sftp-server"), size_of(local), client)
        done = finish(client)
    # sftp dies of SIGPIPE writing its next request to the ssh that has gone, or reads that
    # ssh's reset first: the same race against sshd.
    assert done.returncode in (-signal.SIGPIPE, SSH_GAVE_UP), done.err
    assert_true_prefix(local.read_bytes(), empty.big)


def test_rsync_download_whose_guest_side_is_killed_fails_with_a_true_prefix(empty: Lab) -> None:
    local = empty.env.root / "rsync-down.bin"
    argv = rsync_argv(empty.env, f"--bwlimit={RSYNC_KIB}", "--partial", f"msb-tools:{BIG}",
                      str(local))
    with started(argv) as client:
        kill_mid_transfer(empty.env, "tools", "rsync", size_of(local), client)
        done = finish(client)
    assert done.returncode in (12, SSH_GAVE_UP), done.err
    assert "rsync: connection unexpectedly closed" in done.err
    assert_true_prefix(local.read_bytes(), empty.big)  # --partial keeps what came


def test_cat_download_whose_cat_is_killed_fails_with_a_true_prefix(empty: Lab) -> None:
    argv = ["ssh", "-F", str(empty.env.config), "msb-tools", f"exec cat {BIG}"]
    got = bytearray()
    with started(argv, stdout=subprocess.PIPE) as client:
        assert client.stdout is not None
        while len(got) < KILL_AFTER:  # ssh blocks on the pipe we do not read: so does cat
            chunk = os.read(client.stdout.fileno(), 1 << 16)
            assert chunk, "the download ended before the kill"
            got += chunk
        (cat,) = guest_processes(empty.env, "tools", "cat")
        os.kill(cat, signal.SIGKILL)
        got += client.stdout.read()
        done = finish(client)
    assert (done.returncode, done.err) == (SSH_GAVE_UP, "")
    assert_true_prefix(bytes(got), empty.big)


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("client_name", ["scp", "scp-O", "sftp"])
def test_upload_whose_guest_side_is_killed_leaves_a_true_prefix(
    empty: Lab, box: str, client_name: str
) -> None:
    source, target = empty.data / "big.bin", f"{ROOMY}/big.bin"
    host = f"msb-{box}"
    if client_name == "sftp":
        batch = empty.env.root / f"put-{box}.batch"
        batch.write_text(f"put {source} {target}\n")
        argv = ["sftp", "-F", str(empty.env.config), "-l", SCP_KBIT, "-b", str(batch), host]
    else:
        argv = scp_argv(empty.env, "-l", SCP_KBIT, str(source), f"{host}:{target}",
                        legacy=client_name == "scp-O")
    guest = "scp" if client_name == "scp-O" else "sftp-server"
    with started(argv) as client:
        kill_mid_transfer(empty.env, box, helper_or(box, guest), size_of(empty.roomy / "big.bin"),
                          client)
        done = finish(client)
    if client_name == "sftp":
        assert done.returncode in (-signal.SIGPIPE, SSH_GAVE_UP), done.err
    else:
        native_legacy = client_name == "scp-O" and box == "native"
        expected = ["scp: the guest file service ended"] if native_legacy else []
        assert (done.returncode, lines(done)) == (1, [*expected, "lost connection"])
    assert_true_prefix((empty.roomy / "big.bin").read_bytes(), empty.big)


@pytest.mark.parametrize("program", ["rsync", "cat"])
def test_shell_upload_whose_guest_side_is_killed_leaves_a_true_prefix(
    empty: Lab, program: str
) -> None:
    source, target = empty.data / "big.bin", f"{ROOMY}/big.bin"
    if program == "rsync":
        argv = rsync_argv(empty.env, f"--bwlimit={RSYNC_KIB}", "--inplace", str(source),
                          f"msb-tools:{target}")
        with started(argv) as client:
            kill_mid_transfer(empty.env, "tools", "rsync", size_of(empty.roomy / "big.bin"),
                              client)
            done = finish(client)
        assert done.returncode == SSH_GAVE_UP, done.err
    else:
        argv = ["ssh", "-F", str(empty.env.config), "msb-tools", f"exec cat > {target}"]
        with started(argv, stdin=subprocess.PIPE) as client:
            assert client.stdin is not None
            view = memoryview(empty.big)
            sent = 0
            while sent < KILL_AFTER + (1 << 20):  # a little more than the guest will have
                client.stdin.write(view[sent:sent + (1 << 16)])
                client.stdin.flush()
                sent += 1 << 16
            assert wait_until(lambda: size_of(empty.roomy / "big.bin")() >= KILL_AFTER,
                              CLIENT_TIMEOUT_S, step=0.02) is not None
            (cat,) = guest_processes(empty.env, "tools", "cat")
            os.kill(cat, signal.SIGKILL)
            with contextlib.suppress(BrokenPipeError):
                client.stdin.write(view[sent:])
                client.stdin.close()
            done = finish(client)
        assert (done.returncode, done.err) == (SSH_GAVE_UP, "")
    assert_true_prefix((empty.roomy / "big.bin").read_bytes(), empty.big)


# ---- the sandbox goes away under its connections


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``, seen without connecting (a connection
    would open a channel: this connection must hold only the tunnel)."""
    address = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(row.split()[1] == address and row.split()[3] == "0A" for row in rows)


def _end_by_kill(env: Env, box: str) -> None:
    os.kill(init_pid(env, box), signal.SIGKILL)


def _end_by(command: str) -> Callable[[Env, str], None]:
    def end(env: Env, box: str) -> None:
        done = env.msb_proxy(command, box)
        assert (done.returncode, done.err) == (0, "")
    return end


ENDINGS = {"init-killed": _end_by_kill, "stop": _end_by("stop"), "rm": _end_by("rm")}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_sandbox_that_goes_away_ends_every_connection_with_one_line(
    lab: Lab, ending: str
) -> None:
    env, box = lab.env, f"gone-{ending}"
    assert env.ssh(box, "true").returncode == 0
    port = _free_port()
    session_argv = ["ssh", "-F", str(env.config), env.host(box), "echo up; exec sleep 600"]
    tunnel_argv = ["ssh", "-F", str(env.config), "-N", "-L", f"127.0.0.1:{port}:127.0.0.1:9",
                   env.host(box)]
    with started(session_argv, stdout=subprocess.PIPE) as session, \
            started(tunnel_argv) as tunnel:
        assert session.stdout is not None
        assert session.stdout.readline() == b"up\n"
        assert wait_until(lambda: _listening(port) or tunnel.poll() is not None, 30) is not None
        assert tunnel.poll() is None, "ssh -N -L ended before the sandbox did"
        began = time.monotonic()
        ENDINGS[ending](env, box)
        ended = {name: finish(client, ENDED_WITHIN_S)
                 for name, client in (("session", session), ("tunnel", tunnel))}
        took = time.monotonic() - began
    message = (f"Received disconnect from UNKNOWN port 65535:11: msb-proxy: sandbox {box!r} is "
               "no longer running; connect again to start it")
    for name, done in ended.items():
        assert (done.returncode, lines(done)) == (SSH_GAVE_UP, [message]), name
    print(f"{ending}: both clients ended {took:.2f} s after it")  # for the record, not a bound
    again = env.ssh(box, "echo back")
    assert (again.returncode, again.out) == (0, "back\n")
