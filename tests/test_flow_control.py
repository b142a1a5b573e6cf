"""Flow control end to end: a slow side stalls the stream instead of growing msb-proxy's memory.

Each test drives the real ``ssh`` client, finds the ``msb-proxy stdio`` process it started as its
ProxyCommand, and reads that process's resident memory from ``/proc`` while one end of the stream
is not reading. Like sshd, msb-proxy must hold only bounded buffers and let SSH's channel windows
and the pipes' own limits push back on the fast side; once the slow side reads again, every byte
must arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import asyncssh
from conftest import Env

MIB = 1 << 20
RSS_LIMIT = 150 * MIB  # msb-proxy idles at ~45 MiB; the stall must not add more than buffers
RSS_GROWTH_LIMIT = 4 * MIB  # between samples taken while the stream is stalled
STALL_CPU_LIMIT_S = 0.5  # a stalled proxy waits; it does not poll or spin
STALL_SAMPLES = 4
WAIT_S = 120  # the machine is shared: bounds every wait generously


def _ssh(msb: Env, sandbox: str, command: str, stdin: int | IO[bytes] | None,
         stdout: int | IO[bytes] | None) -> subprocess.Popen[bytes]:
    # In-process serving (MSB_PROXY_WARM=0): the process ssh starts is the one that serves.
    return subprocess.Popen(["ssh", "-F", str(msb.cold_config), msb.host(sandbox), command],
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


def _proxy_of(client: int) -> int:
    """The PID of the ``msb-proxy stdio`` process that process ``client`` runs as its
    ProxyCommand."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != client:
                    continue
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if any(arg.endswith(b"msb-proxy") for arg in argv) and b"stdio" in argv:
                    return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"process {client} started no msb-proxy within {WAIT_S} s")


def _rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _cpu_s(pid: int) -> float:
    """User plus system CPU time ``pid`` has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stalled(proxy: int) -> tuple[list[int], float]:
    """``STALL_SAMPLES`` readings of the proxy's RSS, one a second, and the CPU time it used."""
    samples = [_rss(proxy)]
    cpu = _cpu_s(proxy)
    for _ in range(STALL_SAMPLES):
        time.sleep(1.0)
        samples.append(_rss(proxy))
    return samples, _cpu_s(proxy) - cpu


def _read_exactly(stream: IO[bytes], size: int) -> Iterator[bytes]:
    left = size
    while left:
        chunk = stream.read(min(left, 4 * MIB))
        assert chunk, f"stream ended with {left} of {size} bytes unread"
        left -= len(chunk)
        yield chunk


@contextlib.contextmanager
def _ended(msb: Env, sandbox: str, client: subprocess.Popen[bytes],
           guest_command: str) -> Iterator[None]:
    """Kill ``client`` afterwards and wait for ``guest_command`` to be gone from the sandbox."""
    try:
        yield
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
        for stream in (client.stdout, client.stderr):
            if stream is not None:
                stream.close()
        deadline = time.monotonic() + 30
        while (msb.ssh(sandbox, f"pgrep -fx '{guest_command}'").returncode == 0
               and time.monotonic() < deadline):
            time.sleep(0.2)
        msb.ssh(sandbox, f"pkill -fx '{guest_command}'")


def test_slow_reader_stalls_a_download_without_growing_the_proxy(msb: Env, sandbox: str) -> None:
    command = "cat /dev/zero"
    client = _ssh(msb, sandbox, command, subprocess.DEVNULL, subprocess.PIPE)
    with _ended(msb, sandbox, client, command):
        proxy = _proxy_of(client.pid)
        assert client.stdout is not None
        assert client.stdout.read(MIB) == bytes(MIB)  # flowing; now stop reading
        time.sleep(1.0)  # let every buffer on the way fill up
        samples, cpu = _stalled(proxy)
        read = 0
        for chunk in _read_exactly(client.stdout, 256 * MIB):
            assert chunk.count(0) == len(chunk)
            read += len(chunk)
        after = _rss(proxy)
    assert max(samples) < RSS_LIMIT, samples
    assert max(samples) - min(samples) < RSS_GROWTH_LIMIT, samples
    assert cpu < STALL_CPU_LIMIT_S
    assert read == 256 * MIB
    assert after < RSS_LIMIT


def test_slow_guest_stalls_an_upload_without_growing_the_proxy(msb: Env, sandbox: str) -> None:
    size = 500 * MIB
    command = f"echo started; sleep {STALL_SAMPLES + 3}; wc -c"
    source = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    assert source.stdout is not None
    client = _ssh(msb, sandbox, command, source.stdout, subprocess.PIPE)
    source.stdout.close()
    try:
        with _ended(msb, sandbox, client, f"sleep {STALL_SAMPLES + 3}"):
            proxy = _proxy_of(client.pid)
            assert client.stdout is not None
            assert client.stdout.readline() == b"started\n"  # the guest sleeps, not reading
            time.sleep(1.0)  # let every buffer on the way fill up
            samples, cpu = _stalled(proxy)
            rest, err = client.communicate(timeout=WAIT_S)
    finally:
        if source.poll() is None:
            source.kill()
        source.wait()
    assert max(samples) < RSS_LIMIT, samples
    assert max(samples) - min(samples) < RSS_GROWTH_LIMIT, samples
    assert cpu < STALL_CPU_LIMIT_S
    assert (client.returncode, rest, err) == (0, f"{size}\n".encode(), b"")


def test_upload_sent_while_the_guest_starts_is_still_flow_controlled(
    msb: Env, sandbox: str
) -> None:
    """Input that arrives before the guest process exists is held, then handed over; the
    guest's full stdin must still stop the client. The client writes the moment ``exec`` is
    accepted, while the guest is still being started, so that more than a pipe's worth is
    usually waiting when it starts (how much depends on timing, as with OpenSSH's client)."""
    size = 300 * MIB
    proxy_command = [*msb.proxy_command(warm=False), msb.host(sandbox)]

    async def main() -> tuple[list[int], float, bytes, int | None]:
        async with asyncssh.connect(
            msb.host(sandbox), proxy_command=proxy_command, username="root",
            client_keys=[str(msb.key)], known_hosts=None, config=None,
        ) as conn:
            process = await conn.create_process(
                f"echo started; sleep {STALL_SAMPLES + 3}; wc -c", encoding=None)

            async def upload() -> None:
                block = bytes(MIB)
                for _ in range(size // MIB):
                    process.stdin.write(block)
                    await process.stdin.drain()
                process.stdin.write_eof()

            sender = asyncio.create_task(upload())
            assert await process.stdout.readline() == b"started\n"
            proxy = await asyncio.to_thread(_proxy_of, os.getpid())
            await asyncio.sleep(1.0)  # let every buffer on the way fill up
            samples, cpu = await asyncio.to_thread(_stalled, proxy)
            await asyncio.wait_for(sender, WAIT_S)
            result = await asyncio.wait_for(process.wait(), WAIT_S)
            assert isinstance(result.stdout, bytes)
            return samples, cpu, result.stdout, result.exit_status

    samples, cpu, output, status = asyncio.run(main())
    assert max(samples) < RSS_LIMIT, samples
    assert max(samples) - min(samples) < RSS_GROWTH_LIMIT, samples
    assert cpu < STALL_CPU_LIMIT_S
    assert (status, output) == (0, f"{size}\n".encode())


def test_200_mb_upload_and_download_are_byte_exact(msb: Env, sandbox: str,
                                                   tmp_path: Path) -> None:
    size = 200 * MIB
    original = tmp_path / "original"
    expected = hashlib.sha256()
    with original.open("wb") as handle:
        for _ in range(size // (4 * MIB)):
            block = os.urandom(4 * MIB)
            expected.update(block)
            handle.write(block)
    guest_file = f"/tmp/transfer-{uuid.uuid4().hex[:8]}"
    try:
        with original.open("rb") as handle:
            upload = subprocess.run(
                ["ssh", "-F", str(msb.config), msb.host(sandbox),
                 f"cat > {guest_file} && sha256sum < {guest_file} && stat -c %s {guest_file}"],
                stdin=handle, capture_output=True, timeout=WAIT_S, check=False)
        assert (upload.returncode, upload.stderr) == (0, b"")
        assert upload.stdout == f"{expected.hexdigest()}  -\n{size}\n".encode()

        returned = tmp_path / "returned"
        with returned.open("wb") as handle:
            download = subprocess.run(
                ["ssh", "-F", str(msb.config), msb.host(sandbox), f"cat {guest_file}"],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.PIPE,
                timeout=WAIT_S, check=False)
        assert (download.returncode, download.stderr) == (0, b"")
        received = hashlib.sha256()
        with returned.open("rb") as handle:
            while block := handle.read(4 * MIB):
                received.update(block)
        assert (returned.stat().st_size, received.hexdigest()) == (size, expected.hexdigest())
    finally:
        msb.ssh(sandbox, f"rm -f {guest_file}")
