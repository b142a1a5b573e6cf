"""``msb-proxy authorize``: public keys from a file, the command line or stdin.

Every key it adds must then log in through the real ``ssh``; nothing else authorizes the test's
keys (its HOME has no ``~/.ssh/*.pub`` and no microsandbox keys). A line that is not a usable
public key stops the command before anything is written.
"""

from __future__ import annotations

import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Env, Run, stop_warm_servers, write_ssh_config

# ---- helpers


@pytest.fixture
def private(msb: Env, tmp_path: Path) -> Iterator[Env]:
    """An installation of this test's own with no authorized key at all (not even its home)."""
    user_home = tmp_path / "user"
    (user_home / ".ssh").mkdir(parents=True)
    env = Env(root=tmp_path, home=tmp_path / "home", user_home=user_home,
              key=_keygen(tmp_path / "id_ed25519", "first"), config=tmp_path / "ssh_config",
              backend=msb.backend, rootfs=msb.rootfs)
    env.runtime_dir.mkdir(mode=0o700)
    write_ssh_config(env)
    yield env
    for name in env.sandboxes:
        env.msb_proxy("rm", name)
    stop_warm_servers(env.runtime_dir)


def _keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True)
    return path


def _public(key: Path) -> str:
    """The ``type base64 comment`` line of ``key``, without its newline."""
    return key.with_suffix(".pub").read_text().strip()


def _authorized(env: Env) -> Path:
    return env.home / "authorized_keys"


def _logs_in(env: Env, sandbox: str) -> bool:
    run = env.ssh(sandbox, "echo in")
    if run.returncode == 0:
        assert run.out == "in\n"
        return True
    assert (run.returncode, run.out) == (255, ""), run.err
    return False


def _one_error_line(run: Run) -> str:
    """The single ``msb-proxy:`` line that stderr must consist of."""
    assert run.err.endswith("\n") and run.err.count("\n") == 1, run.err
    return run.err[:-1]


# ---- each source


@pytest.mark.parametrize("source", ["--file", "--key", "--stdin"])
def test_key_from_each_source_is_added_and_logs_in(private: Env, source: str) -> None:
    sandbox = f"az-{uuid.uuid4().hex[:6]}"
    assert not _logs_in(private, sandbox)

    line = _public(private.key)
    if source == "--file":
        run = private.msb_proxy("authorize", "--file", str(private.key.with_suffix(".pub")))
    elif source == "--key":
        run = private.msb_proxy("authorize", "--key", line)
    else:
        run = private.msb_proxy("authorize", "--stdin", input=f"{line}\n".encode())
    assert (run.returncode, run.err) == (0, "")
    assert run.out == f"added 1 key to {_authorized(private)}; 0 keys already there\n"
    assert _authorized(private).read_text() == f"{line}\n"
    assert stat.S_IMODE(private.home.stat().st_mode) == 0o700
    assert stat.S_IMODE(_authorized(private).stat().st_mode) == 0o600

    assert _logs_in(private, sandbox)


def test_every_key_line_of_a_file_is_added_comments_and_blank_lines_skipped(
    private: Env,
) -> None:
    second = _keygen(private.root / "second", "second")
    keys = private.root / "keys"
    keys.write_text(f"# my keys\n\n{_public(private.key)}\n  {_public(second)}  \n")

    run = private.msb_proxy("authorize", "--file", str(keys))
    assert (run.returncode, run.err) == (0, "")
    assert run.out == f"added 2 keys to {_authorized(private)}; 0 keys already there\n"
    assert _authorized(private).read_text() == f"{_public(private.key)}\n{_public(second)}\n"

    config = private.root / "ssh_config-second"
    config.write_text(private.config.read_text().replace(str(private.key), str(second)))
    sandbox = f"az-{uuid.uuid4().hex[:6]}"
    assert _logs_in(private, sandbox)
    run_second = private.run(["ssh", "-F", str(config), private.host(sandbox), "echo in"])
    assert (run_second.returncode, run_second.out) == (0, "in\n"), run_second.err


# ---- deduplication


def test_a_key_already_there_under_another_comment_is_not_added_again(private: Env) -> None:
    kind, blob, _ = _public(private.key).split()
    private.home.mkdir(mode=0o700)
    _authorized(private).write_text(f"{kind} {blob} laptop")  # no final newline
    before = _authorized(private).read_bytes()

    run = private.msb_proxy("authorize", "--key", f"{kind} {blob} desktop")
    assert (run.returncode, run.err) == (0, "")
    assert run.out == f"added 0 keys to {_authorized(private)}; 1 key already there\n"
    assert _authorized(private).read_bytes() == before

    # The same key twice in one input counts once; a new key goes on a line of its own.
    second = _keygen(private.root / "second", "second")
    stdin = f"{kind} {blob} again\n{_public(second)}\n{_public(second)}\n".encode()
    run = private.msb_proxy("authorize", "--stdin", input=stdin)
    assert (run.returncode, run.err) == (0, "")
    assert run.out == f"added 1 key to {_authorized(private)}; 2 keys already there\n"
    assert _authorized(private).read_text() == f"{kind} {blob} laptop\n{_public(second)}\n"


def test_an_existing_authorized_keys_is_made_0600(private: Env) -> None:
    private.home.mkdir(mode=0o700)
    _authorized(private).write_text(f"{_public(private.key)}\n")
    _authorized(private).chmod(0o644)
    run = private.msb_proxy("authorize", "--file", str(private.key.with_suffix(".pub")))
    assert (run.returncode, run.err) == (0, "")
    assert run.out == f"added 0 keys to {_authorized(private)}; 1 key already there\n"
    assert stat.S_IMODE(_authorized(private).stat().st_mode) == 0o600


# ---- bad input


@pytest.mark.parametrize(("source", "text", "message"), [
    ("--file", "{good}\nnot a key\n",
     "{file}:2 'not a key': not a public key; expected 'TYPE BASE64 [COMMENT]' as in "
     "~/.ssh/id_ed25519.pub; nothing was added"),
    ("--file", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n",
     "{file}:1 '-----BEGIN OPENSSH PRIVATE KEY-----': this is a private key; give its public "
     "half, the .pub file; nothing was added"),
    ("--key", "ssh-ed25519 AAAAnotbase64",
     "--key 'ssh-ed25519 AAAAnotbase64': the key data is not valid; nothing was added"),
    ("--key", "ssh-ed25519",
     "--key 'ssh-ed25519': the key data is missing; nothing was added"),
    ("--key", "restrict {good}",
     "--key {shown}: options before the key are not supported; remove them; nothing was added"),
    ("--stdin", "{good}\nssh-foo AAAA x\n",
     "stdin:2 'ssh-foo AAAA x': unsupported key type 'ssh-foo'; nothing was added"),
    ("--stdin", "# only a comment\n\n",
     "stdin holds no public key; expected 'TYPE BASE64 [COMMENT]' as in ~/.ssh/id_ed25519.pub"),
])
def test_an_unusable_line_is_a_one_line_error_and_nothing_is_written(
    private: Env, source: str, text: str, message: str,
) -> None:
    private.home.mkdir(mode=0o700)
    _authorized(private).write_text("# kept as it is\n")
    good = _public(private.key)
    text = text.format(good=good)
    keys = private.root / "keys.pub"
    keys.write_text(text)
    shown = repr(f"restrict {good}"[:40] + "...")

    if source == "--file":
        run = private.msb_proxy("authorize", "--file", str(keys))
    elif source == "--key":
        run = private.msb_proxy("authorize", "--key", text)
    else:
        run = private.msb_proxy("authorize", "--stdin", input=text.encode())
    assert (run.returncode, run.out) == (1, "")
    assert _one_error_line(run) == "msb-proxy: " + message.format(file=keys, shown=shown)
    assert _authorized(private).read_text() == "# kept as it is\n"
    assert not _logs_in(private, f"az-{uuid.uuid4().hex[:6]}")


def test_a_missing_key_file_is_a_one_line_error(private: Env) -> None:
    missing = private.root / "nowhere.pub"
    run = private.msb_proxy("authorize", "--file", str(missing))
    assert (run.returncode, run.out) == (1, "")
    assert _one_error_line(run) == (f"msb-proxy: cannot read {missing}: No such file or "
                                    "directory; give a public key file such as "
                                    "~/.ssh/id_ed25519.pub")
    assert not private.home.exists()
