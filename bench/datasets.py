"""The data sets the transfer rows move, made on the host once per bench run.

``file``   the payload: ``size`` random bytes
``tree``   ``files`` small files of random bytes, 256 bytes to 4 KiB each, in 100 directories
``page``   a 1 KiB file, served over HTTP in the guest for the tunnel-open row

The harness makes them in the bench's temporary root, copies them into the guest through
msb-proxy so that both sides read the very same bytes there, and checks each copy against the
host's digest. A digest is what ``sha256sum`` prints for a file on its standard input (printed
by ``peer.py digest``), or for a tree what ``TREE_DIGEST`` prints when run in it (it covers every
file's path and content).
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["DIRECTORIES", "KINDS", "PAGE_BYTES", "TREE_DIGEST", "digest_command", "make"]

KINDS = ("file", "tree", "page")
DIRECTORIES = 100
PAGE_BYTES = 1024
SMALLEST, LARGEST = 256, 4096
SEED = 20240503
TREE_DIGEST = "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum"


def make(kind: str, root: Path, size: int, files: int) -> None:
    """Write data set ``kind`` under ``root`` (``root/file``, ``root/tree/``, ``root/www/page``)."""
    if kind == "file":
        with open("/dev/urandom", "rb") as random_bytes, open(root / "file", "wb") as out:
            left = size
            while left:
                chunk = random_bytes.read(min(left, 8 << 20))
                out.write(chunk)
                left -= len(chunk)
    elif kind == "tree":
        rng = random.Random(SEED)
        for number in range(files):
            directory = root / "tree" / f"d{number % 10}" / f"e{number // 10 % 10}"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"f{number:05}.dat").write_bytes(
                rng.randbytes(rng.randint(SMALLEST, LARGEST)))
    elif kind == "page":
        (root / "www").mkdir()
        (root / "www" / "page").write_bytes(random.Random(SEED).randbytes(PAGE_BYTES))
    else:
        raise ValueError(f"unknown data set {kind!r}")


def digest_command(kind: str, root: str, peer: str) -> str:
    """A shell command that prints the digest of data set ``kind`` as found under ``root``;
    ``peer`` runs peer.py there."""
    if kind == "tree":
        return f"cd {root}/tree && {TREE_DIGEST}"
    return f"{peer} digest <{root}/{'www/page' if kind == 'page' else 'file'}"
