"""Fuzzing the FUSE server against the passthrough file system in a scratch directory.

Two fuzzers. The structure-aware one plays the seed session of fuse_corpus.py (valid requests built
from the ABI structs, one or more for every opcode the server serves, each naming the nodes and
handles earlier replies gave out) with mutations: steps dropped, repeated or moved, struct fields set
to edge values or to another step's node or handle, names replaced by hostile ones, bodies truncated,
header lengths and reply rooms changed, opcodes swapped. Because most requests stay valid, every
handler is reached past its argument checks, down to the host system calls.

The random one: after a valid INIT, each example sends a random sequence of requests: any opcode
(and unknown ones), argument structs filled with edge values and with the node ids and file handles
earlier replies gave
out, names that try to climb out of the share ("..", "a/b", absolute symlink targets, the canary's
name), truncated and oversized bodies, reply rooms from none to plenty. A canary directory sits next
to the share. The server must never raise, every reply must be a well-formed fuse_out_header with
a negated errno and the request's unique (or nothing at all, leaving the reply room untouched), the
canary must be untouched, nothing may appear beside the share, and closing the file system must
release every fd it opened.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuse_corpus import NO_REPLY as SEED_NO_REPLY
from tests.fuzz.fuse_corpus import SEED, Ref, Session, Step, make_server
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer
from vhostfs.iov import Reader, Writer

# Argument struct and number of NUL-terminated names after it, per opcode.
ARGS: dict[int, tuple[object, int]] = {
    abi.FUSE_LOOKUP: (None, 1), abi.FUSE_FORGET: (abi.FORGET_IN, 0),
    abi.FUSE_GETATTR: (abi.GETATTR_IN, 0), abi.FUSE_SETATTR: (abi.SETATTR_IN, 0),
    abi.FUSE_READLINK: (None, 0), abi.FUSE_SYMLINK: (None, 2), abi.FUSE_MKNOD: (abi.MKNOD_IN, 1),
    abi.FUSE_MKDIR: (abi.MKDIR_IN, 1), abi.FUSE_UNLINK: (None, 1), abi.FUSE_RMDIR: (None, 1),
    abi.FUSE_RENAME: (abi.RENAME_IN, 2), abi.FUSE_RENAME2: (abi.RENAME2_IN, 2),
    abi.FUSE_LINK: (abi.LINK_IN, 1), abi.FUSE_OPEN: (abi.OPEN_IN, 0), abi.FUSE_READ: (abi.READ_IN, 0),
    abi.FUSE_WRITE: (abi.WRITE_IN, 0), abi.FUSE_STATFS: (None, 0), abi.FUSE_RELEASE: (abi.RELEASE_IN, 0),
    abi.FUSE_FSYNC: (abi.FSYNC_IN, 0), abi.FUSE_SETXATTR: (abi.SETXATTR_IN, 2),
    abi.FUSE_GETXATTR: (abi.GETXATTR_IN, 1), abi.FUSE_LISTXATTR: (abi.GETXATTR_IN, 0),
    abi.FUSE_REMOVEXATTR: (None, 1), abi.FUSE_FLUSH: (abi.FLUSH_IN, 0), abi.FUSE_INIT: (abi.INIT_IN, 0),
    abi.FUSE_OPENDIR: (abi.OPEN_IN, 0), abi.FUSE_READDIR: (abi.READ_IN, 0),
    abi.FUSE_RELEASEDIR: (abi.RELEASE_IN, 0), abi.FUSE_FSYNCDIR: (abi.FSYNC_IN, 0),
    abi.FUSE_GETLK: (abi.LK_IN, 0), abi.FUSE_SETLK: (abi.LK_IN, 0), abi.FUSE_SETLKW: (abi.LK_IN, 0),
    abi.FUSE_ACCESS: (abi.ACCESS_IN, 0), abi.FUSE_CREATE: (abi.CREATE_IN, 1),
    abi.FUSE_INTERRUPT: (abi.INTERRUPT_IN, 0), abi.FUSE_BMAP: (abi.BMAP_IN, 0),
    abi.FUSE_DESTROY: (None, 0), abi.FUSE_IOCTL: (abi.IOCTL_IN, 0), abi.FUSE_POLL: (abi.POLL_IN, 0),
    abi.FUSE_BATCH_FORGET: (abi.BATCH_FORGET_IN, 0), abi.FUSE_FALLOCATE: (abi.FALLOCATE_IN, 0),
    abi.FUSE_READDIRPLUS: (abi.READ_IN, 0), abi.FUSE_LSEEK: (abi.LSEEK_IN, 0),
    abi.FUSE_COPY_FILE_RANGE: (abi.COPY_FILE_RANGE_IN, 0), abi.FUSE_SETUPMAPPING: (abi.SETUPMAPPING_IN, 0),
    abi.FUSE_REMOVEMAPPING: (abi.REMOVEMAPPING_IN, 0), abi.FUSE_SYNCFS: (abi.SYNCFS_IN, 0),
    abi.FUSE_TMPFILE: (abi.CREATE_IN, 0), abi.FUSE_STATX: (abi.STATX_IN, 0),
}
#: Replies whose body starts with a fuse_entry_out (a node id to reuse).
ENTRY_REPLIES = {abi.FUSE_LOOKUP, abi.FUSE_MKDIR, abi.FUSE_MKNOD, abi.FUSE_SYMLINK, abi.FUSE_LINK,
                 abi.FUSE_CREATE, abi.FUSE_TMPFILE}
#: Replies that hand out a file handle, and where it sits in the body.
HANDLE_AT = {abi.FUSE_OPEN: 0, abi.FUSE_OPENDIR: 0, abi.FUSE_CREATE: abi.ENTRY_OUT.size,
             abi.FUSE_TMPFILE: abi.ENTRY_OUT.size}
NO_REPLY = {abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET, abi.FUSE_INTERRUPT, abi.FUSE_NOTIFY_REPLY}
CANARY = "canary"

_FIELD = re.compile(r"(\d*)([a-zA-Z])")
_WIDTH = {"B": 8, "H": 16, "I": 32, "Q": 64, "i": 32, "q": 64, "h": 16, "b": 8}

NAMES = [b"a", b"b", b"dir", b".", b"..", b"", b"../" + CANARY.encode(), CANARY.encode(), b"a/b", b"/",
         b"x" * 256, b"\xff\xfe", b"a\0b"]
MODES = [stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFIFO | 0o600, stat.S_IFCHR | 0o600,
         stat.S_IFSOCK | 0o600, stat.S_IFLNK | 0o777, 0o4777, 0]
FLAGS = [os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_CREAT | os.O_EXCL,
         os.O_RDONLY | os.O_DIRECTORY, os.O_PATH, os.O_RDWR | os.O_APPEND, os.O_WRONLY | os.O_NOFOLLOW]


def fields(st_struct) -> list[str]:
    """The value format characters of a struct, one per packed value (padding skipped)."""
    out = []
    for count, code in _FIELD.findall(st_struct.format[1:]):
        if code != "x":
            out.extend([code] * int(count or 1))
    return out


def value(draw, code: str, known: list[int]) -> int:
    bits = _WIDTH[code]
    choice = draw(st.one_of(
        st.sampled_from([0, 1, 2, 3, 7, 4096, 1 << 20, (1 << bits) - 1, 1 << (bits - 1)]),
        st.sampled_from(MODES + FLAGS),
        st.sampled_from(known),
        st.integers(0, (1 << bits) - 1),
    ))
    choice &= (1 << bits) - 1
    if code.islower() and choice >= 1 << (bits - 1):
        choice -= 1 << bits
    return choice


@st.composite
def request(draw, known: list[int]) -> tuple[int, int, bytes, int]:
    """(opcode, nodeid, body, reply room)."""
    opcode = draw(st.one_of(st.sampled_from(sorted(ARGS)), st.integers(0, 0xFFFFFFFF)))
    nodeid = draw(st.one_of(st.sampled_from(known), st.integers(0, (1 << 64) - 1)))
    struct_, nnames = ARGS.get(opcode, (None, draw(st.integers(0, 2))))
    body = b""
    if struct_ is not None:
        body = struct_.pack(*(value(draw, c, known) for c in fields(struct_)))
    for _ in range(nnames):
        name = draw(st.one_of(st.sampled_from(NAMES), st.binary(max_size=20)))
        body += name + (b"\0" if draw(st.integers(0, 9)) else b"")
    if opcode == abi.FUSE_WRITE or draw(st.integers(0, 9)) == 0:
        body += draw(st.binary(max_size=64))
    cut = draw(st.integers(0, 9))
    if cut == 0:
        body = body[:draw(st.integers(0, len(body)))]
    room = draw(st.sampled_from([0, 8, 16, 24, 100, 4096, 1 << 16]))
    return opcode, nodeid, body, room


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about a tree that a write through a path bug would change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + [""]:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            content = Path(path).read_bytes() if stat.S_ISREG(st_.st_mode) else b""
            out[os.path.relpath(path, root)] = (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size,
                                                st_.st_mtime_ns, st_.st_nlink, content)
    return out


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def send(server: FuseServer, opcode: int, nodeid: int, body: bytes, room: int, unique: int,
         split: bool) -> tuple[int, int, bytes]:
    """Hands one request to the server; returns (reply length, negated errno, reply body)."""
    data = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0) + body
    out = bytearray(b"\xaa" * room)
    if split and room > 32:
        # Scattered buffers, as a guest's descriptor chain has them.
        segs = [memoryview(out)[:24], memoryview(out)[24:]]
        reader = Reader([memoryview(bytearray(data[:30])), memoryview(bytearray(data[30:]))])
    else:
        segs = [memoryview(out)]
        reader = Reader([memoryview(bytearray(data))])
    n = server.handle(reader, Writer(segs))
    if n == 0:
        assert out == b"\xaa" * room, "bytes written without a reply"
        return 0, 0, b""
    assert abi.OUT_HEADER.size <= n <= room
    length, error, got_unique = abi.OUT_HEADER.unpack_from(out)
    assert length == n and got_unique == unique
    assert -4095 <= error <= 0
    assert error == 0 or n == abi.OUT_HEADER.size, "an error reply carries no body"
    return n, error, bytes(out[abi.OUT_HEADER.size:n])


class _Bugs(logging.Handler):
    """Collects what the server logs with a traceback: an exception other than OSError, a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.reports.append(self.format(record))


@given(st.data())
def test_fuse_server_over_passthrough_survives_any_requests(tmp_path, data):
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    share, canary = base / "share", base / CANARY
    share.mkdir()
    (share / "a").write_bytes(b"hello")
    (share / "dir").mkdir()
    os.symlink("/" + str(canary.relative_to("/")), share / "escape")
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    (canary / "sub").mkdir()
    before_canary = snapshot(canary)
    before_fds = _open_fds()

    fs = Passthrough(str(share), xattr=data.draw(st.booleans()), readonly=data.draw(st.booleans()),
                     lock_wait=0.05)
    server = FuseServer(fs)
    bugs = _Bugs()
    logging.getLogger("vhostfs").addHandler(bugs)
    try:
        init = abi.INIT_IN.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, 1 << 20,
                                abi.FUSE_INIT_EXT | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS, 0)
        _, error, _ = send(server, abi.FUSE_INIT, 0, init, 4096, 1, False)
        assert error == 0
        known = [abi.ROOT_ID]
        for unique in range(2, 2 + data.draw(st.integers(1, 25))):
            opcode, nodeid, body, room = data.draw(request(known))
            n, error, reply = send(server, opcode, nodeid, body, room, unique, data.draw(st.booleans()))
            if n == 0:
                # Nothing but the no-reply opcodes, a reply room below a header, or an unreadable
                # request may go unanswered.
                assert opcode in NO_REPLY or room < abi.OUT_HEADER.size
                continue
            if error == 0 and opcode in ENTRY_REPLIES and len(reply) >= 8:
                known.append(abi.ENTRY_OUT.unpack_from(reply)[0])
            if error == 0 and opcode in HANDLE_AT and len(reply) >= HANDLE_AT[opcode] + 8:
                known.append(abi.OPEN_OUT.unpack_from(reply, HANDLE_AT[opcode])[0])
    finally:
        logging.getLogger("vhostfs").removeHandler(bugs)
        fs.close()
    assert not bugs.reports, bugs.reports[0]
    assert snapshot(canary) == before_canary
    assert sorted(os.listdir(base)) == [CANARY, "share"]
    assert _open_fds() <= before_fds, "the file system leaked fds"


# -- the structure-aware fuzzer -------------------------------------------------------------------

LABELS = sorted({step.label for step in SEED})
HOSTILE_NAMES = [b"..", b".", b"", b"a/b", b"/", b"../" + CANARY.encode(), b"escape", b"x" * 256, b"\xff",
                 b"a\0b", b"f", b"d"]
EDGES = [0, 1, 2, 0x7F, 0x80, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 63, (1 << 64) - 1, 4095, 4097, 1 << 20,
         (1 << 63) - 1]


def _scratch(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    share, canary = base / "share", base / CANARY
    share.mkdir()
    (share / "a").write_bytes(b"hello")
    os.symlink(str(canary), share / "escape")
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    (canary / "sub").mkdir()
    return base, share, canary


def test_seed_session_succeeds_at_every_step(tmp_path):
    """The corpus is what the fuzzer's depth rests on: unmutated, every request succeeds, and together
    they reach every opcode the server serves."""
    _, share, _ = _scratch(tmp_path)
    server, fs = make_server(str(share))
    session = Session(server)
    try:
        session.init()
        for step in SEED:
            n, error, _ = session.play(step)
            assert error == 0, f"seed step {step.label}: {os.strerror(error)}"
            assert n or step.opcode in SEED_NO_REPLY, f"seed step {step.label} got no reply"
        n, error, _ = session.play(Step("destroy", abi.FUSE_DESTROY, 0))
        assert (n, error) == (abi.OUT_HEADER.size, 0)
    finally:
        fs.close()
    served = {opcode for opcode, handler in enumerate(server._table) if handler is not None}
    succeeded = {opcode for opcode, n, error in session.replies if error == 0}
    missing = sorted(abi_name(op) for op in served - succeeded)
    assert not missing, f"opcodes the seed session never answers successfully: {missing}"


def abi_name(opcode: int) -> str:
    return next((name for name, value in vars(abi).items() if name.startswith("FUSE_") and value == opcode
                 and not name.startswith(("FUSE_KERNEL", "FUSE_ROOT"))), str(opcode))


def _mutate_value(draw, value):
    return draw(st.one_of(st.sampled_from(EDGES), st.builds(Ref, st.sampled_from(LABELS), st.booleans()),
                          st.integers(0, (1 << 64) - 1), st.just(value)))


def mutate(draw, step: Step) -> tuple[Step, int | None]:
    """One structure-aware mutation of `step`; returns it and a wrong header length, if any."""
    kind = draw(st.sampled_from(["field", "field", "name", "node", "truncate", "room", "opcode", "length",
                                 "data"]))
    parts = list(step.parts)
    if kind == "field" and any(isinstance(p, tuple) and p[1] for p in parts):
        i = draw(st.sampled_from([i for i, p in enumerate(parts) if isinstance(p, tuple) and p[1]]))
        st_, values = parts[i]
        values = list(values)
        j = draw(st.integers(0, len(values) - 1))
        values[j] = _mutate_value(draw, values[j])
        parts[i] = (st_, tuple(values))
    elif kind == "name" and any(isinstance(p, bytes) for p in parts):
        i = draw(st.sampled_from([i for i, p in enumerate(parts) if isinstance(p, bytes)]))
        parts[i] = draw(st.one_of(st.sampled_from(HOSTILE_NAMES), st.binary(max_size=12)))
    elif kind == "node":
        return Step(step.label, step.opcode, _mutate_value(draw, step.node), step.parts, step.room), None
    elif kind == "truncate":
        # Sent as raw bytes, cut anywhere (a body shorter than its struct, a name without its NUL).
        raw = Session(server=None).encode(step)  # Refs become 0xDEAD: no session to resolve them
        parts = [bytearray(raw[:draw(st.integers(0, max(0, len(raw) - 1)))])]
    elif kind == "room":
        return Step(step.label, step.opcode, step.node, step.parts,
                    draw(st.sampled_from([0, 8, 16, 17, 24, 64, 120, 200]))), None
    elif kind == "opcode":
        other = draw(st.one_of(st.sampled_from(SEED).map(lambda s: s.opcode), st.integers(0, 0xFFFFFFFF)))
        return Step(step.label, other, step.node, step.parts, step.room), None
    elif kind == "length":
        return step, draw(st.one_of(st.integers(0, 80), st.integers(0, 0xFFFFFFFF)))
    elif kind == "data":
        parts.append(bytearray(draw(st.binary(min_size=1, max_size=64))))
    return Step(step.label, step.opcode, step.node, tuple(parts), step.room), None


@given(st.data())
def test_fuse_server_survives_mutated_seed_sessions(tmp_path, data):
    base, share, canary = _scratch(tmp_path)
    before_canary = snapshot(canary)
    before_fds = _open_fds()
    # Mostly writable, so that the changing requests get past EROFS.
    server, fs = make_server(str(share), readonly=data.draw(st.integers(0, 5), label="readonly") == 0)
    session = Session(server)
    bugs = _Bugs()
    logging.getLogger("vhostfs").addHandler(bugs)
    try:
        session.init()
        steps = [step for step in SEED if data.draw(st.integers(0, 9), label="keep")]
        for _ in range(data.draw(st.integers(0, 4), label="repeats")):
            steps.insert(data.draw(st.integers(0, len(steps))), data.draw(st.sampled_from(SEED)))
        for step in steps:
            header_len = None
            if data.draw(st.integers(0, 3), label="mutate") == 0:
                step, header_len = mutate(data.draw, step)
            session.play(step, split=data.draw(st.booleans(), label="split"), header_len=header_len)
        session.play(Step("destroy", abi.FUSE_DESTROY, 0))
    finally:
        logging.getLogger("vhostfs").removeHandler(bugs)
        fs.close()
    assert not bugs.reports, bugs.reports[0]
    assert snapshot(canary) == before_canary
    assert sorted(os.listdir(base)) == [CANARY, "share"]
    assert _open_fds() <= before_fds, "the file system leaked fds"

