"""What one fuzz case is, how hypothesis draws it, how it is played, and what must hold after it.

A :class:`Case` is a stage to reach properly and then steps to send mutated:

* ``version``: the client's identification line itself, mutated (old versions, no CR, over
  255 bytes, lines before it, binary), maybe followed by clear packets;
* ``kexinit``: a proper version exchange, then clear packets: KEXINIT with broken or hostile
  name-lists, ECDH_INIT with keys of the wrong size or a low-order point, NEWKEYS too early,
  unknown types, damaged framing;
* ``newkeys``: keys exchanged, then mutated service and authentication requests;
* ``connection``: authenticated, then connection-layer messages: channel opens of every type
  with any window and packet size, channel requests with bad strings, data past the window,
  extended data, EOF and CLOSE out of order, window adjustments that overflow, global
  requests, channel ids out of range, unknown message types, messages repeated up to a few
  thousand times; then a probe (a fresh channel running ``echo``).

Any packet may also be damaged as it is sealed (:class:`~fuzz.client.Mutation`: bit flips,
truncation, its length field, its padding length) or have its payload cut or lengthened.

The oracles (:func:`play`): the server side ends within a bound once the client has closed its
side; no exception escapes into asyncssh or the event loop (what ``msb-proxy stdio`` reports as
"internal error"); everything it writes is SSH (framing, padding, MAC check); a connection that
was only sent well-formed messages (what sshd and asyncssh both accept) is still alive after
them and runs the probe correctly; and, through the real process, an exit status that is not
70, stderr lines that start ``msb-proxy:`` and do not say "internal error", and a bounded
peak RSS.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from hypothesis import strategies as st

from fuzz import client as ssh
from fuzz.client import Client, Mutation, NotSsh, SshEnded, Stalled, UserKey
from fuzz.servers import Connection, Server

__all__ = ["STAGES", "Case", "Result", "Step", "cases", "connect", "describe", "play", "warm_up"]

STAGES = ("version", "kexinit", "newkeys", "connection")
END_BOUND_S = 10.0  # the server side must end within this once the client is gone
WAIT_S = 10.0  # the longest the client waits for an answer the server owes it
MAY_END_WAIT_S = 1.0  # the same once a step was sent that may end the connection
MAX_RSS_KIB = 200 * 1024  # the real process's peak RSS, any case


@dataclass(frozen=True)
class Step:
    """One message (or ``repeat`` copies of it) as the case sends it.

    ``kind`` says what it is (see :func:`_payloads`); ``chan`` which of the case's channels it
    is for (an index, modulo how many it opened; -1: the literal id ``raw_chan``);
    ``well_formed`` whether its body has the shape its type requires, so that sshd and
    asyncssh both take it without ending the connection.
    """

    kind: str
    chan: int = 0
    raw_chan: int = 0
    name: bytes = b""
    body: bytes = b""
    want_reply: bool = False
    window: int = ssh.CLIENT_WINDOW
    max_packet: int = ssh.CLIENT_MAX_PACKET
    size: int = 0
    code: int = 0
    well_formed: bool = True
    repeat: int = 1
    mutation: Mutation | None = None
    cut_payload: int | None = None
    append: bytes = b""


@dataclass(frozen=True)
class Case:
    seed: int
    stage: str
    fast: bool
    cipher: str
    mac: str
    strict: bool
    version: bytes | None
    steps: tuple[Step, ...]
    probe: bool
    abort: bool  # end by closing both our ends at once (else: our EOF, then read to its end)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_bytes_to_json, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Case:
        raw = json.loads(text, object_hook=_json_to_bytes)
        steps = tuple(Step(**dict(step, mutation=Mutation(**step["mutation"])
                                  if step["mutation"] else None)) for step in raw["steps"])
        return cls(**dict(raw, steps=steps))


def _bytes_to_json(value: object) -> object:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    raise TypeError(type(value).__name__)


def _json_to_bytes(value: dict[str, Any]) -> object:
    if set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    return value


# Where asyncssh ends the whole connection on a message that is well formed (RFC 4254, OpenSSH's
# PROTOCOL) and sshd answers with a failure or ignores: asyncssh's behaviour, not msb-proxy's.
# A case that meets one counts it (the summary lists them) instead of reporting a finding.
ASYNCSSH_DISCONNECTS = {
    "TCP/IP listener not found": "cancel-tcpip-forward of a forward that does not exist; "
                                 "sshd replies REQUEST_FAILURE",
    "UNIX domain listener not found": "cancel-streamlocal-forward of a forward that does not "
                                      "exist; sshd replies REQUEST_FAILURE",
    "Invalid TCP/IP forward request": "a tcpip-forward address that is not UTF-8; sshd "
                                      "replies REQUEST_FAILURE",
    "Invalid TCP/IP cancel forward request": "likewise for cancel-tcpip-forward",
    "Invalid UNIX domain socket forward request": "a streamlocal-forward path that is not "
                                                  "UTF-8; sshd replies REQUEST_FAILURE",
    "Invalid UNIX domain cancel forward request": "likewise for its cancel",
    "Invalid direct TCP/IP channel open request": "a direct-tcpip host that is not UTF-8; "
                                                  "sshd answers OPEN_FAILURE",
    "Invalid direct UNIX domain channel open request": "a direct-streamlocal path that is not "
                                                       "UTF-8; sshd answers OPEN_FAILURE",
    "Invalid channel open request": "a channel type that is not ASCII; sshd answers "
                                    "OPEN_FAILURE (unknown channel type)",
    "Invalid global request": "a global request name that is not ASCII; sshd replies "
                              "REQUEST_FAILURE",
    "Invalid debug message": "an SSH_MSG_DEBUG text that is not UTF-8; sshd ignores it",
}


# Bugs of asyncssh the fuzzer meets, by what it reports (a text of the finding); a case that
# meets one counts it, and the end of the connection that follows, instead of failing.
ASYNCSSH_BUGS = {
    "queued channel request after close": (
        "asyncssh.channel",
        "a channel request that asyncssh answers in a task (auth-agent-req@openssh.com, "
        "x11-req) finishes after its channel closed, and asyncssh serves the requests queued "
        "behind it (pty-req, env, exec ...) with the channel's connection gone (channel.py, "
        "_report_response -> _service_next_request): an AttributeError on None ends the whole "
        "connection"),
    "connection request after close": (
        "asyncssh.connection",
        "a request asyncssh finishes in a task (tcpip-forward, streamlocal-forward, a userauth "
        "request awaiting reload_config) goes on after the connection closed (connection.py, "
        "_finish_port_forward, _finish_path_forward, _finish_userauth with _owner gone): an "
        "AttributeError on None, logged on a connection that is ending anyway"),
}


HANDSHAKE_ERROR = "internal error on a hostile handshake"


def _innermost(finding: str) -> str:
    """The module an "uncaught" finding's exception was raised in (its last frame)."""
    return finding.rsplit(" > ", 1)[-1].rsplit(" at ", 1)[-1].split(":", maxsplit=1)[0]


def _known_bug(finding: str, stage: str = "connection") -> str | None:
    """Which of ASYNCSSH_BUGS an "uncaught" finding is: an AttributeError on None raised in
    asyncssh's own code; or, before authentication, any exception raised in asyncssh's own
    code (HANDSHAKE_ERROR): nothing need survive a hostile handshake, and msb-proxy's end of it
    is checked by the "serve raised" finding and, through the process, its exit status."""
    if not finding.startswith("uncaught: asyncssh: "):
        return None
    innermost = _innermost(finding)
    if "AttributeError: 'NoneType' object has no attribute" in finding:
        for name, (module, _) in ASYNCSSH_BUGS.items():
            if innermost == module:
                return name
    if stage != "connection" and innermost.startswith("asyncssh."):
        return HANDSHAKE_ERROR
    return None


@dataclass
class Result:
    """What one case did: ``findings`` lists what did not hold (empty: all held)."""

    findings: list[str] = field(default_factory=list)
    asyncssh_disconnects: list[str] = field(default_factory=list)  # see ASYNCSSH_DISCONNECTS
    asyncssh_bugs: list[str] = field(default_factory=list)  # see ASYNCSSH_BUGS
    end: str = ""  # how the server ended it (its disconnect reason), when it did
    decode_errors: int = 0  # packets asyncssh failed to decode in its own code
    ended_early: bool = False  # the connection ended before all steps were sent
    probed: bool = False  # the probe ran and was right
    max_rss_kib: int | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Strategies

U32_EDGES = (0, 1, 2, 4, 255, 256, 32767, 32768, 35000, 65535, 65536, 262144, 2**31 - 1,
             2**31, 2**32 - 2, 2**32 - 1)
u32s = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
BAD_STRINGS = (b"", b"\0", b"a\0b", b"\xff\xfe\xfd", "\u00e9\u4e2d".encode(), b"\xc3", b"\r\n",
               b"A" * 5000, b"../../../../etc/shadow", b"%s%n%x", b"$(id)`id`", b"-rf /",
               b"\x1b[2J", b" " * 300, b"\x00" * 1000)
bad_strings = st.one_of(st.sampled_from(BAD_STRINGS), st.binary(max_size=64),
                        st.binary(min_size=1000, max_size=20000))
ascii_names = st.text(st.characters(min_codepoint=33, max_codepoint=126),
                      min_size=1, max_size=40).map(str.encode)
# Commands run in the sandbox (its own jail, no network). All end by themselves or when their
# channel or connection goes; some ignore the hang-up and end shortly after.
COMMANDS = (b"cat", b"echo hi", b"true", b"exit 3", b"sleep 0.3", b"cat >/dev/null",
            b"head -c 200000 /dev/zero", b"yes | head -c 300000", b"kill -9 $$",
            b"kill -TERM $$", b"read x; echo $x", b"env", b"exec 1>&-; sleep 0.2",
            b"trap '' HUP; sleep 0.5", b"exec 0<&-; echo closed", b"printf '%s' abc >&2",
            b"sleep 0.2 & echo bg", b"scp -t /tmp", b"scp -f /etc/hostname",
            b"rsync --server -e.LsfxC . /tmp/", b"/usr/lib/openssh/sftp-server")
commands = st.one_of(st.sampled_from(COMMANDS), bad_strings)
SIGNALS = ("INT", "TERM", "KILL", "HUP", "USR1", "STOP", "CONT", "WINCH", "QUIT", "PIPE",
           "ALRM", "SEGV", "SIGINT", "0", "", "NOPE", "KILL@openssh.com", "RTMIN+3")
# Bytes an scp or shell on the other end reads (protocol lines, their errors).
STREAMS = (b"C0644 5 fuzz\nhello\0", b"D0755 0 fuzzdir\n", b"E\n", b"T1 0 2 0\n", b"\0",
           b"\x01warning\n", b"\x02fatal\n", b"C0644 99999999999 big\n", b"C0644 5 ../up\n",
           b"C0644 5 a/b\n", b"exit\n", b"echo ok\n", b"\x03\x04", b"\x1b[A")


def _rare(rare: st.SearchStrategy[Any], common: st.SearchStrategy[Any],
          one_in: int) -> st.SearchStrategy[Any]:
    """``rare`` once in ``one_in`` draws, ``common`` otherwise."""
    return st.integers(0, one_in - 1).flatmap(lambda n: rare if n == 0 else common)


mutations = st.one_of(
    st.builds(Mutation, flip=st.integers(0, 1 << 20)),
    st.builds(Mutation, cut=st.integers(0, 1 << 16)),
    st.builds(Mutation, length=u32s),
    st.builds(Mutation, padding=st.integers(0, 255)),
)
maybe_mutation = _rare(mutations, st.none(), 25)
repeats = _rare(st.sampled_from([2, 3, 10, 130, 300, 1100, 3000]), st.just(1), 8)
# (cut_payload, append): most payloads as they are
payload_damage = _rare(st.one_of(st.tuples(st.integers(0, 64), st.just(b"")),
                                 st.tuples(st.none(), st.binary(min_size=1, max_size=16))),
                       st.just((None, b"")), 30)


def _modes_parse(modes: bytes) -> bool:
    """Whether a pty-req's modes parse as RFC 4254 8 says (opcode and uint32 pairs, 0 or an
    opcode from 160 on ends them)."""
    pos = 0
    while pos < len(modes):
        opcode = modes[pos]
        pos += 1
        if opcode == 0 or opcode >= 160:
            return True
        if pos + 4 > len(modes):
            return False
        pos += 4
    return True


def _ascii(value: bytes) -> bool:
    return value.isascii()


@st.composite
def _channel_request(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """(name, body, well formed) of a channel request."""
    s, u, b = ssh.string, ssh.u32, ssh.boolean
    kind = draw(st.sampled_from([
        "pty-req", "env", "exec", "shell", "subsystem", "window-change", "signal", "break",
        "x11-req", "auth-agent-req@openssh.com", "eow@openssh.com", "keepalive@openssh.com",
        "exit-status", "exit-signal", "xon-xoff", "unknown", "malformed"]))
    if kind == "pty-req":
        term = draw(st.one_of(st.sampled_from([b"xterm", b"vt100", b"dumb", b""]), bad_strings))
        modes = draw(st.one_of(
            st.lists(st.tuples(st.integers(1, 159), u32s), max_size=40).map(
                lambda pairs: b"".join(bytes([op]) + u(v) for op, v in pairs) + b"\0"),
            st.binary(max_size=64)))
        size = [draw(u32s) for _ in range(4)]
        body = s(term) + b"".join(u(v) for v in size) + s(modes)
        return b"pty-req", body, _ascii(term) and _modes_parse(modes)
    if kind == "env":
        name = draw(st.one_of(st.sampled_from([b"LANG", b"LC_ALL", b"TERM", b"PATH",
                                               b"LD_PRELOAD", b"MY_APP_X"]), bad_strings))
        return b"env", s(name) + s(draw(bad_strings)), True
    if kind == "exec":
        return b"exec", s(draw(commands)), True
    if kind == "shell":
        return b"shell", b"", True
    if kind == "subsystem":
        return b"subsystem", s(draw(st.one_of(st.just(b"sftp"), bad_strings))), True
    if kind == "window-change":
        return b"window-change", b"".join(u(draw(u32s)) for _ in range(4)), True
    if kind == "signal":
        name = draw(st.one_of(st.sampled_from(SIGNALS).map(str.encode), bad_strings))
        return b"signal", s(name), True
    if kind == "break":
        return b"break", u(draw(u32s)), True
    if kind == "x11-req":
        return (b"x11-req", b(draw(st.booleans())) + s(b"MIT-MAGIC-COOKIE-1") + s(b"00" * 16)
                + u(draw(u32s)), True)
    if kind in ("auth-agent-req@openssh.com", "eow@openssh.com", "keepalive@openssh.com"):
        return kind.encode(), b"", True
    if kind == "exit-status":
        return b"exit-status", u(draw(u32s)), True
    if kind == "exit-signal":
        return (b"exit-signal", s(b"KILL") + b(False) + s(draw(bad_strings)) + s(b""), True)
    if kind == "xon-xoff":
        return b"xon-xoff", b(draw(st.booleans())), True
    if kind == "unknown":
        name = draw(st.one_of(ascii_names, st.just(b"fuzz@example.com")))
        return name, draw(st.binary(max_size=64)), True
    name = draw(st.sampled_from([b"pty-req", b"env", b"exec", b"signal", b"window-change",
                                 b"subsystem", b"break", b"eow@openssh.com"]))
    return name, draw(st.binary(max_size=24)), False


@st.composite
def _channel_open(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """(channel type, what follows the window and packet size, well formed)."""
    s, u = ssh.string, ssh.u32
    kind = draw(st.sampled_from(["session", "session", "session", "direct-tcpip",
                                 "direct-streamlocal@openssh.com", "x11",
                                 "auth-agent@openssh.com", "forwarded-tcpip", "unknown",
                                 "malformed"]))
    # Only loopback names and names that cannot resolve: the guest has no other network, and
    # no other address is ever a target here.
    hosts = st.sampled_from([b"127.0.0.1", b"localhost", b"::1", b"127.0.0.2", b"",
                             b"\x00", b"%", b"x" * 300 + b".invalid", b"[::1]", b"0"])
    if kind == "session":
        return b"session", b"", True
    if kind in ("direct-tcpip", "forwarded-tcpip"):
        extra = s(draw(hosts)) + u(draw(u32s)) + s(b"127.0.0.1") + u(draw(u32s))
        return kind.encode(), extra, True
    if kind == "direct-streamlocal@openssh.com":
        path = draw(st.one_of(st.sampled_from([b"/tmp/none.sock", b"/run/x", b"",
                                               b"/etc/passwd", b"\0"]), bad_strings))
        return kind.encode(), s(path) + s(b"") + u(0), True
    if kind == "x11":
        return b"x11", s(b"127.0.0.1") + u(6000), True
    if kind == "auth-agent@openssh.com":
        return kind.encode(), b"", True
    if kind == "unknown":
        return draw(st.one_of(ascii_names, bad_strings)), draw(st.binary(max_size=32)), True
    return (draw(st.sampled_from([b"session", b"direct-tcpip",
                                  b"direct-streamlocal@openssh.com"])),
            draw(st.binary(min_size=1, max_size=24)), False)


@st.composite
def _global_request(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    s, u = ssh.string, ssh.u32
    kind = draw(st.sampled_from(["tcpip-forward", "cancel-tcpip-forward",
                                 "streamlocal-forward@openssh.com",
                                 "cancel-streamlocal-forward@openssh.com",
                                 "no-more-sessions@openssh.com", "keepalive@openssh.com",
                                 "hostkeys-prove-00@openssh.com", "unknown", "malformed"]))
    if kind in ("tcpip-forward", "cancel-tcpip-forward"):
        # Listeners inside the guest only, on its loopback.
        host = draw(st.sampled_from([b"127.0.0.1", b"localhost", b"", b"::1", b"\0"]))
        port = draw(st.one_of(st.just(0), st.integers(1024, 65535), u32s))
        return kind.encode(), s(host) + u(port), True
    if kind.startswith(("streamlocal", "cancel-streamlocal")):
        path = draw(st.one_of(st.sampled_from([b"/tmp/fuzz.sock", b"", b"/"]), bad_strings))
        return kind.encode(), s(path), True
    if kind in ("no-more-sessions@openssh.com", "keepalive@openssh.com"):
        return kind.encode(), b"", True
    if kind == "hostkeys-prove-00@openssh.com":
        return kind.encode(), b"".join(s(blob) for blob in draw(
            st.lists(st.binary(max_size=64), max_size=3))), True
    if kind == "unknown":
        return draw(ascii_names), draw(st.binary(max_size=64)), True
    return (draw(st.sampled_from([b"tcpip-forward", b"streamlocal-forward@openssh.com"])),
            draw(st.binary(max_size=5)), False)


def _step(draw: st.DrawFn, kind: str, **values: Any) -> Step:
    cut, append = draw(payload_damage)
    return Step(kind, mutation=draw(maybe_mutation), cut_payload=cut, append=append,
                repeat=values.pop("repeat", None) or draw(repeats), **values)


@st.composite
def _connection_step(draw: st.DrawFn) -> Step:
    chan = draw(_rare(st.just(-1), st.integers(0, 7), 30))
    raw_chan = draw(u32s)
    kind = draw(st.sampled_from([
        "open", "open", "request", "request", "request", "request", "data", "data", "ext",
        "eof", "close", "adjust", "global", "raw", "ignore", "debug", "unimplemented",
        "sync"]))
    where = {"chan": chan, "raw_chan": raw_chan}
    if kind == "open":
        name, extra, ok = draw(_channel_open())
        return _step(draw, "open", name=name, body=extra, well_formed=ok,
                     window=draw(st.one_of(st.just(ssh.CLIENT_WINDOW), u32s)),
                     max_packet=draw(st.one_of(st.just(ssh.CLIENT_MAX_PACKET), u32s)))
    if kind == "request":
        name, body, ok = draw(_channel_request())
        return _step(draw, "request", name=name, body=body, well_formed=ok,
                     want_reply=draw(st.booleans()), **where)
    if kind in ("data", "ext"):
        content = draw(st.one_of(st.just(b""), st.sampled_from(STREAMS)))
        return _step(draw, kind, body=content, code=draw(st.sampled_from([1, 1, 2, 0, 2**32 - 1])),
                     size=draw(_rare(st.sampled_from([32768, 32769, 65536, 1 << 20]),
                                     st.integers(0, 4096), 8)), **where)
    if kind == "adjust":
        return _step(draw, "adjust", size=draw(u32s), **where)
    if kind == "global":
        name, body, ok = draw(_global_request())
        return _step(draw, "global", name=name, body=body, well_formed=ok,
                     want_reply=draw(st.booleans()))
    if kind == "raw":
        code = draw(st.one_of(st.integers(128, 255), st.integers(0, 127)))
        return _step(draw, "raw", code=code, body=draw(st.binary(max_size=48)))
    if kind in ("ignore", "debug"):
        return _step(draw, kind, body=draw(bad_strings))
    if kind == "unimplemented":
        return _step(draw, kind, size=draw(u32s))
    if kind == "sync":
        return Step("sync")
    return _step(draw, kind, **where)


@st.composite
def _kexinit(draw: st.DrawFn) -> bytes:
    """A KEXINIT payload, good or hostile."""
    good = {"kex": [ssh.KEX, ssh.STRICT_KEX], "host": [ssh.HOST_KEY],
            "cipher": [b"aes128-ctr"], "mac": [b"hmac-sha2-256"], "comp": [b"none"],
            "lang": []}
    lists = dict(good)
    for key in draw(st.lists(st.sampled_from(sorted(good)), max_size=3, unique=True)):
        lists[key] = draw(st.one_of(
            st.lists(st.one_of(ascii_names, bad_strings), max_size=4),
            st.just([b"x" * 200] * 3000),  # a huge list
            st.just([b""]), st.just([b"none"]), st.just([b"zlib@openssh.com", b"zlib"])))
    return (bytes([ssh.KEXINIT]) + draw(st.binary(min_size=16, max_size=16))
               + ssh.name_list(lists["kex"]) + ssh.name_list(lists["host"])
               + ssh.name_list(lists["cipher"]) * 2 + ssh.name_list(lists["mac"]) * 2
               + ssh.name_list(lists["comp"]) * 2 + ssh.name_list(lists["lang"]) * 2
               + ssh.boolean(draw(st.booleans())) + ssh.u32(draw(u32s)))


@st.composite
def _clear_step(draw: st.DrawFn) -> Step:
    """A packet in clear, before keys are exchanged."""
    kind = draw(st.sampled_from(["kexinit", "kexinit", "ecdh", "newkeys", "raw", "ignore",
                                 "service"]))
    if kind == "kexinit":
        body = draw(_kexinit())
    elif kind == "ecdh":
        key = draw(st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40),
                             st.just(b"\0" * 32), st.just(b"\x01" + b"\0" * 31),
                             st.just(b"\xff" * 32)))
        body = bytes([ssh.KEX_ECDH_INIT]) + ssh.string(key)
    elif kind == "newkeys":
        body = bytes([ssh.NEWKEYS])
    elif kind == "service":
        body = bytes([ssh.SERVICE_REQUEST]) + ssh.string(b"ssh-userauth")
    elif kind == "ignore":
        body = bytes([ssh.IGNORE]) + ssh.string(draw(bad_strings))
    else:
        body = bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=48))
    return _step(draw, "packet", body=body)


@st.composite
def _auth_step(draw: st.DrawFn) -> Step:
    """A packet after the keys, before authentication."""
    s, b = ssh.string, ssh.boolean
    kind = draw(st.sampled_from(["service", "userauth", "userauth", "raw", "ignore"]))
    if kind == "service":
        name = draw(st.one_of(st.sampled_from([b"ssh-userauth", b"ssh-connection"]),
                              bad_strings))
        body = bytes([ssh.SERVICE_REQUEST]) + s(name)
    elif kind == "userauth":
        user = draw(st.one_of(st.sampled_from([b"root", b"nobody", b"no-such-user"]),
                              bad_strings))
        service = draw(st.sampled_from([b"ssh-connection", b"ssh-userauth", b"x"]))
        method = draw(st.sampled_from([b"none", b"password", b"publickey",
                                       b"keyboard-interactive", b"hostbased",
                                       b"gssapi-with-mic", b"x"]))
        rest = draw(st.one_of(
            st.just(b""),
            st.builds(lambda blob: b(False) + s(b"ssh-ed25519") + s(blob), st.binary(
                max_size=64)),
            st.builds(lambda blob, sig: b(True) + s(b"ssh-ed25519") + s(blob) + s(sig),
                      st.binary(max_size=64), st.binary(max_size=80)),
            st.builds(lambda pw: b(False) + s(pw), bad_strings),
            st.binary(max_size=32)))
        body = bytes([ssh.USERAUTH_REQUEST]) + s(user) + s(service) + s(method) + rest
    elif kind == "ignore":
        body = bytes([ssh.IGNORE]) + s(draw(bad_strings))
    else:
        body = bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=48))
    return _step(draw, "packet", body=body)


VERSIONS = (b"SSH-2.0-ok\r\n", b"SSH-2.0-ok\n", b"SSH-1.5-old\r\n", b"SSH-1.99-both\r\n",
            b"SSH-2.0-" + b"A" * 300 + b"\r\n", b"SSH-2.0-ok", b"", b"\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"hello\r\n" * 5 + b"SSH-2.0-late\r\n",
            b"SSH-2.0-\0\xff\r\n", b"SSH-3.0-future\r\n", b"x" * 70000,
            b"SSH-2.0-ok\r\n" * 3)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """One fuzz case (see the module docstring)."""
    stage = draw(st.sampled_from(
        ["version"] * 2 + ["kexinit"] * 3 + ["newkeys"] * 3 + ["connection"] * 12))
    if stage == "version":
        version = draw(st.one_of(st.sampled_from(VERSIONS), st.binary(max_size=300)))
        steps = draw(st.lists(_clear_step(), max_size=2))
    elif stage == "kexinit":
        version, steps = None, draw(st.lists(_clear_step(), min_size=1, max_size=5))
    elif stage == "newkeys":
        version, steps = None, draw(st.lists(_auth_step(), min_size=1, max_size=6))
    else:
        version, steps = None, draw(st.lists(_connection_step(), min_size=1, max_size=6))
    return Case(seed=draw(st.integers(0, 2**32 - 1)), stage=stage, fast=draw(st.booleans()),
                cipher=draw(st.sampled_from(ssh.CIPHERS)), mac=draw(st.sampled_from(ssh.MACS)),
                strict=draw(st.booleans()), version=version, steps=tuple(steps),
                probe=stage == "connection", abort=draw(_rare(st.just(True), st.just(False), 6)))


# ---------------------------------------------------------------------------------------------
# Playing a case


class _Connection:
    """The client of one case, with what it sent that may end the connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.opened: list[ssh.Channel] = []  # channels of this case, in order
        self.may_end: str | None = None  # the first step sshd or asyncssh may disconnect on
        self.no_more_sessions = False

    def suspect(self, why: str) -> None:
        if self.may_end is None:
            self.may_end = why

    def target(self, step: Step) -> tuple[ssh.Channel | None, int]:
        """The channel a step is for and the recipient id to send."""
        if step.chan < 0 or not self.opened:
            return None, step.raw_chan
        chan = self.opened[step.chan % len(self.opened)]
        return chan, chan.remote if chan.remote is not None else step.raw_chan


def _payloads(conn: _Connection, step: Step, index: int) -> Iterator[bytes]:
    """The payloads a connection-stage step sends, one at a time (a few thousand of a MiB
    each must not be held at once); marks what may end the connection."""
    client = conn.client
    kind = step.kind
    if not step.well_formed:
        conn.suspect(f"step {index}: malformed {kind} {step.name!r}")
    if kind == "open":
        if step.max_packet == 0:
            conn.suspect(f"step {index}: channel open with a maximum packet size of 0")
        for _ in range(step.repeat):
            fresh = client.new_channel()
            conn.opened.append(fresh)
            yield client.open_payload(fresh, step.name, step.body, window=step.window,
                                      max_packet=step.max_packet)
        return
    if kind == "global":
        if step.name == b"no-more-sessions@openssh.com":
            conn.no_more_sessions = True
        yield from [bytes([ssh.GLOBAL_REQUEST]) + ssh.string(step.name)
                    + ssh.boolean(step.want_reply) + step.body] * step.repeat
        return
    if kind == "raw":
        if step.code < 128:
            conn.suspect(f"step {index}: message type {step.code} with a body of our own")
        yield from [bytes([step.code]) + step.body] * step.repeat
        return
    if kind == "ignore":
        yield from [bytes([ssh.IGNORE]) + ssh.string(step.body)] * step.repeat
        return
    if kind == "debug":
        yield from [bytes([ssh.DEBUG]) + ssh.boolean(False) + ssh.string(step.body)
                    + ssh.string(b"")] * step.repeat
        return
    if kind == "unimplemented":
        yield from [bytes([ssh.UNIMPLEMENTED]) + ssh.u32(step.size)] * step.repeat
        return
    chan, recipient = conn.target(step)
    if chan is None or chan.remote is None:
        conn.suspect(f"step {index}: {kind} for channel {recipient}, which is not open")
    elif chan.we_closed or chan.closed:
        conn.suspect(f"step {index}: {kind} on channel {chan.local} after its close")
    head = ssh.u32(recipient)
    if kind == "request":
        if not step.name.isascii():
            conn.suspect(f"step {index}: a request name that is not ASCII")
        yield from [bytes([ssh.CHANNEL_REQUEST]) + head + ssh.string(step.name)
                + ssh.boolean(step.want_reply) + step.body] * step.repeat
        return
    if kind in ("data", "ext"):
        for _ in range(step.repeat):
            data = step.body or client.rng.randbytes(step.size)
            if chan is not None:
                if chan.we_eof:
                    conn.suspect(f"step {index}: {kind} after our EOF")
                if len(data) > chan.window or len(data) > chan.max_packet:
                    conn.suspect(f"step {index}: {len(data)} bytes of {kind} past the window "
                                 f"({chan.window}) or packet size ({chan.max_packet})")
                chan.window = max(0, chan.window - len(data))
            if kind == "ext":
                conn.suspect(f"step {index}: extended data from the client")
                yield (bytes([ssh.EXTENDED_DATA]) + head + ssh.u32(step.code)
                       + ssh.string(data))
            else:
                yield bytes([ssh.CHANNEL_DATA]) + head + ssh.string(data)
        return
    if kind == "eof":
        if chan is not None:
            if chan.we_eof or step.repeat > 1:
                conn.suspect(f"step {index}: a second EOF")
            chan.we_eof = True
        yield from [bytes([ssh.CHANNEL_EOF]) + head] * step.repeat
        return
    if kind == "close":
        if chan is not None:
            if step.repeat > 1:
                conn.suspect(f"step {index}: a second close")
            chan.we_closed = True
        yield from [bytes([ssh.CHANNEL_CLOSE]) + head] * step.repeat
        return
    if kind == "adjust":
        if chan is not None:
            total = chan.our_window + step.size * step.repeat
            if total > 2**32 - 1:
                conn.suspect(f"step {index}: a window adjustment past 2^32")
            chan.our_window = min(total, 2**32 - 1)
        yield from [bytes([ssh.WINDOW_ADJUST]) + head + ssh.u32(step.size)] * step.repeat
        return
    raise ValueError(f"unknown step kind {kind!r}")


def _damaged(step: Step, payload: bytes) -> bytes:
    if step.cut_payload is not None:
        return payload[:step.cut_payload]
    return payload + step.append


def _send(conn: _Connection, step: Step, payloads: Iterable[bytes], index: int) -> None:
    client = conn.client
    if step.mutation is not None:
        conn.suspect(f"step {index}: framing damaged ({step.mutation})")
    if step.cut_payload is not None or step.append:
        conn.suspect(f"step {index}: payload cut or lengthened")
    for payload in payloads:
        if client.write_broken:
            return  # the server has stopped reading: the rest would go nowhere
        client.send(_damaged(step, payload), step.mutation)


def _sync(client: Client) -> None:
    """Wait until the server has handled everything sent so far (a keepalive it answers)."""
    before = len(client.global_replies)
    client.send(bytes([ssh.GLOBAL_REQUEST]) + ssh.string("keepalive@openssh.com")
                + ssh.boolean(True))
    client.pump(lambda: len(client.global_replies) > before)


def _connection_stage(case: Case, client: Client, result: Result) -> None:
    conn = _Connection(client)
    conn.opened.append(client.open_session())  # most steps are for a channel: one is there
    for index, step in enumerate(case.steps):
        try:
            if step.kind == "sync":
                _sync(client)
                continue
            payloads = _payloads(conn, step, index)
            _send(conn, step, payloads, index)
            if step.kind == "open" and conn.may_end is None:
                # Its answers first, so that later steps know the channels' ids and windows.
                fresh = conn.opened[-step.repeat:]
                client.pump(lambda fresh=fresh: all(  # type: ignore[misc]
                    c.remote is not None or c.failed is not None for c in fresh))
            client.poll()
        except SshEnded as exc:
            result.ended_early = True
            if conn.may_end is None:
                _ended(result, exc, f"after well-formed step {index} ({step.kind} "
                                    f"{step.name!r})")
            return
        except Stalled:
            if conn.may_end is None:
                raise
            return
        if conn.may_end is not None:
            # Whatever the server makes of it now (a desynchronised stream waits for bytes
            # that never come) says nothing more: a short wait, then on to the end.
            client.wait_s = MAY_END_WAIT_S
    if case.probe:
        _probe(conn, result)


def _ended(result: Result, exc: SshEnded, where: str) -> None:
    """The connection ended though it was only sent well-formed messages."""
    if isinstance(exc, ssh.Disconnected) and exc.reason in ASYNCSSH_DISCONNECTS:
        result.asyncssh_disconnects.append(exc.reason)
    else:
        result.findings.append(f"connection-ended: {where}: {exc}")


def _probe(conn: _Connection, result: Result) -> None:
    """A fresh channel runs ``echo``; a connection that was only sent well-formed messages
    must run it right."""
    client = conn.client
    try:
        for chan in conn.opened:
            if chan.remote is not None and not chan.we_closed:
                chan.we_closed = True
                client.send(bytes([ssh.CHANNEL_CLOSE]) + ssh.u32(chan.remote))
        client.pump(lambda: all(c.closed or c.remote is None for c in conn.opened))
        if conn.no_more_sessions:
            _sync(client)
            result.probed = True
            return
        token = f"probe-{client.rng.randrange(1 << 30)}".encode()
        chan = client.run(b"echo " + token)
    except SshEnded as exc:
        result.ended_early = True
        if conn.may_end is None:
            _ended(result, exc, "the probe after well-formed steps")
        return
    except Stalled as exc:
        if conn.may_end is None:
            result.findings.append(f"hang: the probe after well-formed steps: {exc}")
        return
    if bytes(chan.data) == token + b"\n" and chan.exit_status == 0:
        result.probed = True
    elif conn.may_end is None:
        result.findings.append(f"probe-wrong: stdout {bytes(chan.data)[:80]!r}, stderr "
                               f"{bytes(chan.stderr)[:200]!r}, exit {chan.exit_status}, "
                               f"signal {chan.exit_signal}")


def _drive(case: Case, client: Client, key: UserKey, result: Result) -> None:
    if case.stage == "version":
        client.send_raw(case.version or b"")
        for step in case.steps:
            _send(_Connection(client), step, [step.body] * step.repeat, 0)
        return
    client.exchange_versions()
    if case.stage == "kexinit":
        for step in case.steps:
            _send(_Connection(client), step, [step.body] * step.repeat, 0)
        return
    client.key_exchange(cipher=case.cipher, mac=case.mac, strict=case.strict)
    if case.stage == "newkeys":
        for step in case.steps:
            _send(_Connection(client), step, [step.body] * step.repeat, 0)
            client.poll()
        return
    client.authenticate(key)
    _connection_stage(case, client, result)


def play(case: Case, server: Server, key: UserKey, *, bound_s: float = END_BOUND_S) -> Result:
    """Play ``case`` against a new connection of ``server``; what did not hold is in the
    result's ``findings``."""
    started = time.monotonic()
    result = Result()
    conn = server.connect(case.fast)
    client = Client(conn.read_fd, conn.write_fd, random.Random(case.seed), wait_s=WAIT_S)
    try:
        _drive(case, client, key, result)
    except Stalled as exc:
        result.findings.append(f"hang: {exc}")
    except NotSsh as exc:
        result.findings.append(f"not-ssh: {exc}")
    except SshEnded:
        result.ended_early = True
    if client.disconnect is not None:
        result.end = client.disconnect.reason
    client.close_write()
    if case.abort:
        conn.close_read()
    else:
        try:
            client.drain(bound_s)
        except Stalled:
            result.findings.append(f"hang: the server's output still open {bound_s:.0f} s "
                                   "after our end of file")
        except NotSsh as exc:
            result.findings.append(f"not-ssh: {exc}")
    ending = conn.finish(bound_s)
    if not ending.ended:
        result.findings.append(f"hang: the server side did not end within {bound_s:.0f} s "
                               "of our end of file")
    result.findings += [f"uncaught: {error}" for error in ending.errors]
    known = [bug for finding in result.findings
             if (bug := _known_bug(finding, case.stage)) is not None]
    if known:
        # The bug, and the end of the connection it causes, are asyncssh's.
        result.asyncssh_bugs = sorted(set(known))
        result.findings = [finding for finding in result.findings
                           if _known_bug(finding, case.stage) is None
                           and not finding.startswith("connection-ended:")]
    result.decode_errors = ending.decode_errors
    if ending.exit_code is not None:
        if ending.exit_code == 70 or ending.exit_code < 0:
            result.findings.append(f"exit: msb-proxy exited with {ending.exit_code}")
        for line in ending.stderr.splitlines():
            if not line.startswith("msb-proxy:") or "internal error" in line:
                result.findings.append(f"stderr: {line[:300]}")
    result.max_rss_kib = ending.max_rss_kib
    if ending.max_rss_kib is not None and ending.max_rss_kib > MAX_RSS_KIB:
        result.findings.append(f"memory: peak RSS {ending.max_rss_kib // 1024} MiB, over "
                               f"{MAX_RSS_KIB // 1024} MiB")
    result.seconds = time.monotonic() - started
    return result


def connect(server: Server, *, fast: bool = True, seed: int = 0, key: UserKey | None = None,
            cipher: str = "aes128-ctr", mac: str = "umac-64-etm@openssh.com",
            strict: bool = True, wait_s: float = WAIT_S) -> tuple[Client, Connection]:
    """A proper client connection to ``server``: versions exchanged; with ``key``, keys
    exchanged and authenticated too."""
    conn = server.connect(fast)
    client = Client(conn.read_fd, conn.write_fd, random.Random(seed), wait_s=wait_s)
    client.exchange_versions()
    if key is not None:
        client.key_exchange(cipher=cipher, mac=mac, strict=strict)
        client.authenticate(key)
    return client, conn


def warm_up(server: Server, key: UserKey, wait_s: float = 120.0) -> None:
    """One proper connection that runs ``true``: the sandbox is created or started by it, before
    any case is timed."""
    client, conn = connect(server, key=key, wait_s=wait_s)
    chan = client.run(b"true")
    client.close_write()
    client.drain(wait_s)
    conn.finish(wait_s)
    if chan.exit_status != 0:
        raise RuntimeError(f"true in the sandbox exited with {chan.exit_status}")


def describe(case: Case) -> str:
    """A short line for a report."""
    kinds = ",".join(f"{s.kind}{'*' + str(s.repeat) if s.repeat > 1 else ''}" for s in case.steps)
    return (f"{case.stage} {'fast' if case.fast else 'plain'} {case.cipher}/{case.mac}"
            f"{' strict' if case.strict else ''} [{kinds}]")
