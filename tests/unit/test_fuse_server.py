"""FuseServer.handle driven with hand-built request bytes against the in-memory example file system."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import select
import stat
import struct
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhostfs import native
from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import (
    LINUX_DIRENT64,
    STATX_BASIC_STATS,
    STATX_BTIME,
    TIME_NOW,
    ConnectionInfo,
    Context,
    DirEntry,
    Entry,
    HostDirents,
    SetAttr,
    Stat,
    Statx,
)
from vhostfs.fuse.server import DEFAULT_WANT, FuseServer
from vhostfs.iov import Reader, Writer

# examples/ is not a package: load the example file system by path.
_MEMFS_PATH = Path(__file__).resolve().parents[2] / "examples" / "memfs.py"
_spec = importlib.util.spec_from_file_location("memfs", _MEMFS_PATH)
memfs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memfs)
MemFS = memfs.MemFS

OFFERED = DEFAULT_WANT | abi.FUSE_EXPLICIT_INVAL_DATA | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_POSIX_LOCKS


# -- request building and reply parsing -----------------------------------------------------------
def request(opcode: int, body: bytes = b"", nodeid: int = 1, unique: int = 77, length: int | None = None,
            extlen: int = 0, uid: int = 1000, gid: int = 1000, pid: int = 42) -> bytes:
    size = 40 + len(body) if length is None else length
    return abi.IN_HEADER.pack(size, opcode, unique, nodeid, uid, gid, pid, extlen, 0) + body


def init_body(major: int = 7, minor: int = 38, flags: int = OFFERED, flags2: int = 0,
              max_readahead: int = 128 * 1024) -> bytes:
    if minor < 36:
        return abi.INIT_IN_COMPAT.pack(major, minor, max_readahead, flags)
    return abi.INIT_IN.pack(major, minor, max_readahead, flags | abi.FUSE_INIT_EXT, flags2)


def split(data: bytes | bytearray, step: int) -> list[memoryview]:
    """`data` as views of separate buffers of `step` bytes, as a scattered descriptor chain has it."""
    return [memoryview(bytearray(data[i:i + step])) for i in range(0, len(data), step)]


@dataclass
class Reply:
    length: int        # what handle() returned
    error: int         # negated errno from the header (0 = success)
    unique: int
    body: bytes        # the bytes after the header
    raw: bytes         # the whole writer buffer


class Session:
    def __init__(self, fs: MemFS | None = None, **kwargs: object) -> None:
        self.fs = fs if fs is not None else MemFS()
        self.server = FuseServer(self.fs, **kwargs)
        self.unique = 100

    def send(self, data: bytes, room: int = 1 << 17, fill: int = 0, step: int | None = None) -> Reply:
        """Hands `data` to the server with `room` writable bytes (pre-filled with `fill`)."""
        if step:
            reader_segs, writer_segs = split(data, step), split(bytes([fill]) * room, step)
        else:
            reader_segs, writer_segs = [memoryview(bytearray(data))], [memoryview(bytearray([fill]) * room)]
        n = self.server.handle(Reader(reader_segs), Writer(writer_segs))
        raw = b"".join(bytes(s) for s in writer_segs)
        if n == 0:
            assert raw == bytes([fill]) * room, "nothing may be written when no reply is sent"
            return Reply(0, 0, 0, b"", raw)
        length, error, unique = abi.OUT_HEADER.unpack_from(raw)
        assert length == n
        return Reply(n, -error, unique, raw[16:n], raw)

    def call(self, opcode: int, body: bytes = b"", nodeid: int = 1, **kwargs: object) -> Reply:
        self.unique += 1
        reply = self.send(request(opcode, body, nodeid, self.unique), **kwargs)
        if reply.length:
            assert reply.unique == self.unique
        return reply

    def init(self, **kwargs: object) -> Reply:
        reply = self.call(abi.FUSE_INIT, init_body(**kwargs))
        assert reply.error == 0
        return reply

    # Helpers returning parsed results, asserting success.
    def ok(self, opcode: int, body: bytes = b"", nodeid: int = 1, **kwargs: object) -> bytes:
        reply = self.call(opcode, body, nodeid, **kwargs)
        assert reply.error == 0, os.strerror(reply.error)
        return reply.body

    def entry(self, opcode: int, body: bytes, nodeid: int = 1) -> tuple:
        data = self.ok(opcode, body, nodeid)
        assert len(data) == 128
        return abi.ENTRY_OUT.unpack(data)

    def mkdir(self, name: bytes, parent: int = 1, mode: int = 0o755) -> int:
        return self.entry(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(mode, 0o022) + name + b"\0", parent)[0]

    def create(self, name: bytes, parent: int = 1, flags: int = os.O_RDWR) -> tuple[int, int]:
        data = self.ok(abi.FUSE_CREATE, abi.CREATE_IN.pack(flags, 0o644, 0o022, 0) + name + b"\0", parent)
        assert len(data) == 144
        nodeid = abi.ENTRY_OUT.unpack_from(data)[0]
        fh, _, _ = abi.OPEN_OUT.unpack_from(data, 128)
        return nodeid, fh

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        body = abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, os.O_RDWR) + data
        return abi.WRITE_OUT.unpack(self.ok(abi.FUSE_WRITE, body, nodeid))[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int, **kwargs: object) -> bytes:
        return self.ok(abi.FUSE_READ, abi.READ_IN.pack(fh, offset, size, 0, 0, 0), nodeid, **kwargs)

    def getattr(self, nodeid: int) -> tuple:
        data = self.ok(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), nodeid)
        return abi.ATTR_OUT.unpack(data)


def attr_of(entry_or_attr_out: tuple, offset: int) -> dict[str, int]:
    names = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec", "ctimensec",
             "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags")
    return dict(zip(names, entry_or_attr_out[offset:], strict=True))


def parse_dirents(data: bytes, plus: bool) -> list[tuple]:
    """[(name, ino, off, type, entry_out tuple or None)] from a READDIR(PLUS) reply, checking padding."""
    out, pos = [], 0
    while pos < len(data):
        entry = None
        if plus:
            entry = abi.ENTRY_OUT.unpack_from(data, pos)
            pos += abi.ENTRY_OUT.size
        ino, off, namelen, typ = abi.DIRENT.unpack_from(data, pos)
        name_at = pos + abi.DIRENT.size
        name = data[name_at:name_at + namelen]
        end = (name_at + namelen + 7) & ~7
        assert data[name_at + namelen:end] == bytes(end - name_at - namelen), "dirent padding not zeroed"
        out.append((name, ino, off, typ, entry))
        pos = end
    assert pos == len(data)
    return out


@pytest.fixture
def s() -> Session:
    session = Session()
    session.init()
    return session


# -- INIT -----------------------------------------------------------------------------------------
def test_init_negotiates_flags_and_limits() -> None:
    sess = Session()
    reply = sess.call(abi.FUSE_INIT, init_body(flags2=abi.FUSE_HAS_INODE_DAX >> 32))
    assert reply.error == 0 and reply.length == 16 + 64
    (major, minor, max_readahead, flags, max_bg, congestion, max_write, time_gran, max_pages, map_alignment,
     flags2, _, _) = abi.INIT_OUT.unpack(reply.body)
    assert (major, minor) == (7, 38)
    assert max_readahead == 128 * 1024
    assert flags == DEFAULT_WANT
    assert not flags & abi.FUSE_EXPLICIT_INVAL_DATA and not flags & abi.FUSE_WRITEBACK_CACHE
    assert flags2 == 0, "HAS_INODE_DAX is offered but not wanted by default"
    assert (max_write, time_gran, max_pages) == (1 << 20, 1, 256)
    assert (max_bg, congestion, map_alignment) == (0, 0, 0)
    assert sess.server.initialized


def test_init_reply_only_holds_offered_flags() -> None:
    sess = Session()
    reply = sess.call(abi.FUSE_INIT, init_body(flags=abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES))
    flags = abi.INIT_OUT.unpack(reply.body)[3]
    assert flags == abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES | abi.FUSE_INIT_EXT


def test_init_answers_an_older_client_with_its_minor() -> None:
    sess = Session()
    reply = sess.call(abi.FUSE_INIT, init_body(minor=31, flags=OFFERED & ~abi.FUSE_INIT_EXT))
    assert reply.error == 0 and reply.length == 16 + 64
    major, minor = abi.INIT_OUT.unpack(reply.body)[:2]
    assert (major, minor) == (7, 31)
    assert not abi.INIT_OUT.unpack(reply.body)[3] & abi.FUSE_INIT_EXT, "7.31 has no INIT_EXT"


def test_init_minor_below_27_is_eproto() -> None:
    sess = Session()
    assert sess.call(abi.FUSE_INIT, init_body(minor=26)).error == errno.EPROTO
    assert not sess.server.initialized


def test_init_major_below_7_is_eproto() -> None:
    sess = Session()
    assert sess.call(abi.FUSE_INIT, init_body(major=6, minor=38)).error == errno.EPROTO


def test_init_major_8_is_answered_with_7_and_a_retry_succeeds() -> None:
    sess = Session()
    reply = sess.call(abi.FUSE_INIT, struct.pack("<II", 8, 0))
    assert reply.error == 0 and reply.length == 24
    assert struct.unpack("<II", reply.body) == (7, abi.KERNEL_MINOR_VERSION)
    assert not sess.server.initialized
    sess.init()
    assert sess.server.initialized


def test_request_before_init_is_eio() -> None:
    sess = Session()
    assert sess.call(abi.FUSE_LOOKUP, b"x\0").error == errno.EIO
    assert sess.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0)).error == errno.EIO


def test_forget_before_init_gets_no_reply() -> None:
    sess = Session()
    assert sess.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid=5).length == 0


def test_second_init_starts_a_new_session() -> None:
    ended: list[bool] = []

    class Recording(MemFS):
        def destroy(self) -> None:
            ended.append(True)

    sess = Session(Recording())
    sess.init()
    sess.mkdir(b"d")
    # A rebooted guest's driver starts over with INIT: the old session ends, the new one serves.
    assert sess.call(abi.FUSE_INIT, init_body()).error == 0
    assert ended == [True]
    assert sess.entry(abi.FUSE_LOOKUP, b"d\0")[0] > 0


def test_truncated_init_is_einval() -> None:
    sess = Session()
    assert sess.call(abi.FUSE_INIT, struct.pack("<III", 7, 38, 0)).error == errno.EINVAL


def test_filesystem_adjusts_want_and_max_write() -> None:
    seen: list[ConnectionInfo] = []

    class Tuned(MemFS):
        def init(self, conn: ConnectionInfo) -> None:
            seen.append(conn)
            conn.want |= abi.FUSE_WRITEBACK_CACHE
            conn.want &= ~abi.FUSE_ASYNC_READ
            conn.max_write = 64 * 1024

    sess = Session(Tuned())
    reply = sess.init()
    out = abi.INIT_OUT.unpack(reply.body)
    assert out[3] & abi.FUSE_WRITEBACK_CACHE and not out[3] & abi.FUSE_ASYNC_READ
    assert out[6] == 64 * 1024
    conn = seen[0]
    assert conn.capable & abi.FUSE_EXPLICIT_INVAL_DATA and conn.proto_minor == 38
    # The lowered max_write is enforced on WRITE.
    nodeid, fh = sess.create(b"f")
    big = abi.WRITE_IN.pack(fh, 0, 64 * 1024 + 1, 0, 0, 0) + bytes(64 * 1024 + 1)
    assert sess.call(abi.FUSE_WRITE, big, nodeid).error == errno.EINVAL


def test_extra_want_reaches_flags2_and_map_alignment_is_sent() -> None:
    sess = Session(extra_want=abi.FUSE_HAS_INODE_DAX, map_alignment=12)
    offered = OFFERED | abi.FUSE_MAP_ALIGNMENT
    reply = sess.init(flags=offered, flags2=(abi.FUSE_HAS_INODE_DAX | abi.FUSE_SECURITY_CTX) >> 32)
    out = abi.INIT_OUT.unpack(reply.body)
    assert out[3] & abi.FUSE_MAP_ALIGNMENT and out[9] == 12
    assert out[10] == abi.FUSE_HAS_INODE_DAX >> 32


def test_destroy_ends_the_session_and_init_starts_another(s: Session) -> None:
    assert s.call(abi.FUSE_DESTROY).length == 16
    assert s.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0)).error == errno.EIO
    s.init()
    assert s.getattr(1)


# -- names and attributes -------------------------------------------------------------------------
def test_lookup_and_getattr(s: Session) -> None:
    d = s.mkdir(b"dir")
    entry = s.entry(abi.FUSE_LOOKUP, b"dir\0")
    assert entry[0] == d
    assert (entry[2], entry[4]) == (1, 0), "entry_valid 1.0 s"
    assert stat.S_ISDIR(attr_of(entry, 6)["mode"])
    attr = attr_of(s.getattr(d), 2)
    assert attr["ino"] == d and attr["nlink"] == 2 and attr["uid"] == 1000, "context uid reaches the fs"
    assert s.call(abi.FUSE_LOOKUP, b"missing\0").error == errno.ENOENT


def test_lookup_accepts_dot_and_dotdot(s: Session) -> None:
    d = s.mkdir(b"d")
    assert s.entry(abi.FUSE_LOOKUP, b"..\0", d)[0] == 1
    assert s.entry(abi.FUSE_LOOKUP, b".\0", d)[0] == d


def test_entry_timeouts_are_split_into_sec_and_nsec() -> None:
    sess = Session(MemFS(timeout=2.25))
    sess.init()
    entry = sess.entry(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"d\0")
    assert entry[2:6] == (2, 2, 250_000_000, 250_000_000)
    attr_out = sess.getattr(entry[0])
    assert attr_out[:2] == (2, 250_000_000)


def test_getattr_passes_fh_only_with_the_flag(s: Session) -> None:
    seen = []
    real = s.fs.getattr
    s.fs.getattr = lambda ctx, nodeid, fh: seen.append(fh) or real(ctx, nodeid, fh)
    s.ok(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 9))
    s.ok(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(abi.FUSE_GETATTR_FH, 9))
    assert seen == [None, 9]


def test_forget_drops_lookup_references(s: Session) -> None:
    nodeid, fh = s.create(b"f")
    s.entry(abi.FUSE_LOOKUP, b"f\0")
    assert s.fs.nodes[nodeid].nlookup == 2
    assert s.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid).length == 0
    assert s.fs.nodes[nodeid].nlookup == 1
    s.ok(abi.FUSE_UNLINK, b"f\0")
    s.ok(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)
    s.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid)
    assert nodeid not in s.fs.nodes


def test_batch_forget(s: Session) -> None:
    a = s.mkdir(b"a")
    b = s.mkdir(b"b")
    body = abi.BATCH_FORGET_IN.pack(2) + abi.FORGET_ONE.pack(a, 1) + abi.FORGET_ONE.pack(b, 1)
    assert s.call(abi.FUSE_BATCH_FORGET, body).length == 0
    assert s.fs.nodes[a].nlookup == 0 and s.fs.nodes[b].nlookup == 0


def test_batch_forget_count_larger_than_body_uses_only_what_is_there(s: Session) -> None:
    a = s.mkdir(b"a")
    body = abi.BATCH_FORGET_IN.pack(0xFFFFFFFF) + abi.FORGET_ONE.pack(a, 1) + b"\x01\x02"
    assert s.call(abi.FUSE_BATCH_FORGET, body).length == 0
    assert s.fs.nodes[a].nlookup == 0


def setattr_body(valid: int, *, fh: int = 0, size: int = 0, atime: int = 0, mtime: int = 0,
                 atimensec: int = 0, mtimensec: int = 0, mode: int = 0, uid: int = 0, gid: int = 0) -> bytes:
    return abi.SETATTR_IN.pack(valid, fh, size, 0, atime, mtime, 0, atimensec, mtimensec, 0, mode, uid, gid)


def test_setattr_truncate_chmod_and_times(s: Session) -> None:
    nodeid, fh = s.create(b"f")
    s.write(nodeid, fh, 0, b"0123456789")
    valid = abi.FATTR_SIZE | abi.FATTR_MODE | abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_UID
    out = s.ok(abi.FUSE_SETATTR, setattr_body(valid, size=4, mode=0o600, atime=100, atimensec=5,
                                              mtime=200, mtimensec=6, uid=7), nodeid)
    attr = attr_of(abi.ATTR_OUT.unpack(out), 2)
    assert attr["size"] == 4 and stat.S_IMODE(attr["mode"]) == 0o600 and stat.S_ISREG(attr["mode"])
    assert (attr["atime"], attr["atimensec"], attr["mtime"], attr["mtimensec"]) == (100, 5, 200, 6)
    assert attr["uid"] == 7
    assert s.read(nodeid, fh, 0, 100) == b"0123"


def test_setattr_translates_now_fh_and_kill_suidgid(s: Session) -> None:
    seen: list[SetAttr] = []
    real = s.fs.setattr
    s.fs.setattr = lambda ctx, nodeid, changes: seen.append(changes) or real(ctx, nodeid, changes)
    nodeid, fh = s.create(b"f")
    valid = (abi.FATTR_ATIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME | abi.FATTR_MTIME_NOW | abi.FATTR_FH
             | abi.FATTR_KILL_SUIDGID)
    s.ok(abi.FUSE_SETATTR, setattr_body(valid, fh=fh, atime=1, mtime=2), nodeid)
    assert seen[0] == SetAttr(atime_ns=TIME_NOW, mtime_ns=TIME_NOW, fh=fh, kill_suidgid=True)


def test_symlink_and_readlink(s: Session) -> None:
    entry = s.entry(abi.FUSE_SYMLINK, b"link\0../some/where\0")
    assert stat.S_ISLNK(attr_of(entry, 6)["mode"])
    assert s.ok(abi.FUSE_READLINK, nodeid=entry[0]) == b"../some/where"


def test_mknod_link_unlink(s: Session) -> None:
    entry = s.entry(abi.FUSE_MKNOD, abi.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0) + b"n\0")
    nodeid = entry[0]
    linked = s.entry(abi.FUSE_LINK, abi.LINK_IN.pack(nodeid) + b"n2\0")
    assert linked[0] == nodeid and attr_of(linked, 6)["nlink"] == 2
    s.ok(abi.FUSE_UNLINK, b"n\0")
    assert attr_of(s.getattr(nodeid), 2)["nlink"] == 1
    assert s.call(abi.FUSE_LOOKUP, b"n\0").error == errno.ENOENT


def test_mkdir_rmdir(s: Session) -> None:
    d = s.mkdir(b"d")
    s.mkdir(b"sub", parent=d)
    assert s.call(abi.FUSE_RMDIR, b"d\0").error == errno.ENOTEMPTY
    s.ok(abi.FUSE_RMDIR, b"sub\0", d)
    s.ok(abi.FUSE_RMDIR, b"d\0")
    assert s.call(abi.FUSE_LOOKUP, b"d\0").error == errno.ENOENT


def test_rename_and_rename2_flags(s: Session) -> None:
    a, _ = s.create(b"a")
    d = s.mkdir(b"d")
    s.ok(abi.FUSE_RENAME, abi.RENAME_IN.pack(d) + b"a\0b\0")
    assert s.entry(abi.FUSE_LOOKUP, b"b\0", d)[0] == a
    c, _ = s.create(b"c")
    noreplace = abi.RENAME2_IN.pack(d, abi.RENAME_NOREPLACE) + b"c\0b\0"
    assert s.call(abi.FUSE_RENAME2, noreplace).error == errno.EEXIST
    s.ok(abi.FUSE_RENAME2, abi.RENAME2_IN.pack(d, abi.RENAME_EXCHANGE) + b"c\0b\0")
    assert s.entry(abi.FUSE_LOOKUP, b"b\0", d)[0] == c
    assert s.entry(abi.FUSE_LOOKUP, b"c\0")[0] == a


# -- files ----------------------------------------------------------------------------------------
def test_create_write_read_flush_release(s: Session) -> None:
    nodeid, fh = s.create(b"file")
    assert s.write(nodeid, fh, 0, b"hello ") == 6
    assert s.write(nodeid, fh, 6, b"world") == 5
    assert s.read(nodeid, fh, 0, 4096) == b"hello world"
    assert s.read(nodeid, fh, 6, 3) == b"wor"
    assert s.read(nodeid, fh, 100, 10) == b"", "reading past the end is a short (empty) reply"
    s.ok(abi.FUSE_FLUSH, abi.FLUSH_IN.pack(fh, 0), nodeid)
    s.ok(abi.FUSE_FSYNC, abi.FSYNC_IN.pack(fh, abi.FUSE_FSYNC_FDATASYNC), nodeid)
    s.ok(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0), nodeid)
    assert s.call(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 10, 0, 0, 0), nodeid).error == errno.EBADF


def test_open_with_o_trunc(s: Session) -> None:
    nodeid, fh = s.create(b"f")
    s.write(nodeid, fh, 0, b"data")
    out = s.ok(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, 0), nodeid)
    fh2, open_flags, backing = abi.OPEN_OUT.unpack(out)
    assert fh2 != fh and (open_flags, backing) == (0, 0)
    assert attr_of(s.getattr(nodeid), 2)["size"] == 0


def test_read_and_write_through_scattered_buffers(s: Session) -> None:
    nodeid, fh = s.create(b"f")
    data = bytes(range(256)) * 40
    body = abi.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0) + data
    reply = s.send(request(abi.FUSE_WRITE, body, nodeid), step=100)
    assert reply.error == 0 and abi.WRITE_OUT.unpack(reply.body)[0] == len(data)
    reply = s.send(request(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, len(data), 0, 0, 0), nodeid), step=7,
                   room=16 + len(data))
    assert reply.error == 0 and reply.body == data


def test_read_size_is_capped_by_the_reply_room(s: Session) -> None:
    nodeid, fh = s.create(b"f")
    s.write(nodeid, fh, 0, b"x" * 10000)
    sizes = []
    real = s.fs.read
    s.fs.read = lambda ctx, n, f, off, size: sizes.append(size) or real(ctx, n, f, off, size)
    data = s.read(nodeid, fh, 0, 0xFFFFFFFF, room=4096)
    assert sizes == [4096 - 16] and data == b"x" * (4096 - 16)


def test_read_is_capped_by_max_read() -> None:
    sess = Session(max_read=4096)
    sess.init()
    nodeid, fh = sess.create(b"f")
    sess.write(nodeid, fh, 0, b"y" * 10000)
    assert len(sess.read(nodeid, fh, 0, 8192)) == 4096


NEGATIVE = (1 << 64) - 1  # loff_t -1: to preadv2/pwritev2 that would mean "at the file position"


@pytest.mark.parametrize("offset", [NEGATIVE, 1 << 63])
def test_offsets_beyond_loff_t_are_einval_and_change_nothing(s: Session, offset: int) -> None:
    nodeid, fh = s.create(b"f")
    s.write(nodeid, fh, 0, b"abcdef")
    requests = [
        (abi.FUSE_READ, abi.READ_IN.pack(fh, offset, 4, 0, 0, 0)),
        (abi.FUSE_WRITE, abi.WRITE_IN.pack(fh, offset, 3, 0, 0, 0) + b"xyz"),
        (abi.FUSE_FALLOCATE, abi.FALLOCATE_IN.pack(fh, offset, 10, 0)),
        (abi.FUSE_FALLOCATE, abi.FALLOCATE_IN.pack(fh, 0, offset, 0)),
        (abi.FUSE_COPY_FILE_RANGE, abi.COPY_FILE_RANGE_IN.pack(fh, offset, nodeid, fh, 0, 3, 0)),
        (abi.FUSE_COPY_FILE_RANGE, abi.COPY_FILE_RANGE_IN.pack(fh, 0, nodeid, fh, offset, 3, 0)),
        (abi.FUSE_SETATTR, abi.SETATTR_IN.pack(abi.FATTR_SIZE, 0, offset, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    ]
    for opcode, body in requests:
        assert s.call(opcode, body, nodeid).error == errno.EINVAL, abi.OPCODE_NAMES[opcode]
    assert s.read(nodeid, fh, 0, 100) == b"abcdef"


def test_setattr_times_beyond_64_bit_nanoseconds_are_einval(s: Session) -> None:
    nodeid, _ = s.create(b"f")
    for sec, nsec in (((1 << 63) - 1, 0), (-(1 << 63), 0), (0, 10**9)):
        body = abi.SETATTR_IN.pack(abi.FATTR_MTIME, 0, 0, 0, 0, sec, 0, 0, nsec, 0, 0, 0, 0)
        assert s.call(abi.FUSE_SETATTR, body, nodeid).error == errno.EINVAL


def test_fallocate_lseek_copy_file_range(s: Session) -> None:
    src, fh_src = s.create(b"src")
    dst, fh_dst = s.create(b"dst")
    s.write(src, fh_src, 0, b"abcdef")
    s.ok(abi.FUSE_FALLOCATE, abi.FALLOCATE_IN.pack(fh_dst, 0, 8192, 0), dst)
    assert attr_of(s.getattr(dst), 2)["size"] == 8192
    out = s.ok(abi.FUSE_LSEEK, abi.LSEEK_IN.pack(fh_src, 2, os.SEEK_HOLE), src)
    assert abi.LSEEK_OUT.unpack(out) == (6,)
    assert s.call(abi.FUSE_LSEEK, abi.LSEEK_IN.pack(fh_src, 6, os.SEEK_DATA), src).error == errno.ENXIO
    body = abi.COPY_FILE_RANGE_IN.pack(fh_src, 1, dst, fh_dst, 0, 3, 0)
    assert abi.WRITE_OUT.unpack(s.ok(abi.FUSE_COPY_FILE_RANGE, body, src)) == (3,)
    assert s.read(dst, fh_dst, 0, 4) == b"bcd\0"


def test_statfs(s: Session) -> None:
    reply = s.call(abi.FUSE_STATFS)
    assert reply.error == 0 and reply.length == 16 + 80
    blocks, _, _, files, _, bsize, namelen, frsize = abi.KSTATFS.unpack(reply.body)
    assert (blocks, files, bsize, namelen, frsize) == (1 << 20, 1 << 20, 4096, 255, 4096)


def test_access_syncfs_fsyncdir(s: Session) -> None:
    s.ok(abi.FUSE_ACCESS, abi.ACCESS_IN.pack(os.R_OK))
    s.ok(abi.FUSE_SYNCFS, abi.SYNCFS_IN.pack())
    fh = abi.OPEN_OUT.unpack(s.ok(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0)))[0]
    s.ok(abi.FUSE_FSYNCDIR, abi.FSYNC_IN.pack(fh, 0))
    s.ok(abi.FUSE_RELEASEDIR, abi.RELEASE_IN.pack(fh, 0, 0, 0))
    assert s.call(abi.FUSE_ACCESS, abi.ACCESS_IN.pack(os.R_OK), nodeid=999).error == errno.ENOENT


# -- extended attributes --------------------------------------------------------------------------
def test_xattr_round_trip(s: Session) -> None:
    s.ok(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(5, 0) + b"user.a\0value")
    s.ok(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(2, 0) + b"user.b\0xy")
    size = abi.GETXATTR_OUT.unpack(s.ok(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(0) + b"user.a\0"))
    assert size == (5,)
    assert s.ok(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(5) + b"user.a\0") == b"value"
    assert s.call(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(4) + b"user.a\0").error == errno.ERANGE
    assert abi.GETXATTR_OUT.unpack(s.ok(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(0))) == (14,)
    assert s.ok(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(100)) == b"user.a\0user.b\0"
    assert s.call(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(13)).error == errno.ERANGE
    s.ok(abi.FUSE_REMOVEXATTR, b"user.a\0")
    assert s.call(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(64) + b"user.a\0").error == errno.ENODATA


def test_setxattr_ext_layout_when_negotiated() -> None:
    sess = Session(extra_want=abi.FUSE_SETXATTR_EXT)
    sess.init(flags=OFFERED | abi.FUSE_SETXATTR_EXT)
    sess.ok(abi.FUSE_SETXATTR, abi.SETXATTR_IN.pack(3, 0, abi.FUSE_SETXATTR_ACL_KILL_SGID) + b"user.x\0abc")
    assert sess.ok(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(3) + b"user.x\0") == b"abc"


def test_xattr_huge_sizes_are_bounded_by_the_value(s: Session) -> None:
    s.ok(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.a\0abc")
    assert s.ok(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(0xFFFFFFFF) + b"user.a\0") == b"abc"
    assert s.ok(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(0xFFFFFFFF)) == b"user.a\0"


def test_xattr_value_larger_than_reply_room_is_erange(s: Session) -> None:
    s.ok(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(100, 0) + b"user.a\0" + b"v" * 100)
    reply = s.call(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(0xFFFFFFFF) + b"user.a\0", room=64)
    assert reply.error == errno.ERANGE and reply.length == 16


def test_setxattr_size_must_match_the_value(s: Session) -> None:
    assert s.call(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(9, 0) + b"user.a\0abc").error == errno.EINVAL


# -- directories ----------------------------------------------------------------------------------
def readdir(s: Session, fh: int, offset: int, size: int, plus: bool, nodeid: int = 1,
            **kwargs: object) -> Reply:
    opcode = abi.FUSE_READDIRPLUS if plus else abi.FUSE_READDIR
    return s.call(opcode, abi.READ_IN.pack(fh, offset, size, 0, 0, 0), nodeid, **kwargs)


def opendir(s: Session, nodeid: int = 1) -> int:
    return abi.OPEN_OUT.unpack(s.ok(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid))[0]


def dirent_record(name: bytes, ino: int, dtype: int, reclen: int | None = None) -> bytes:
    """A linux_dirent64 record as getdents64(2) gives it."""
    reclen = reclen or (LINUX_DIRENT64.size + len(name) + 1 + 7) & ~7
    record = LINUX_DIRENT64.pack(ino, 12345, reclen, dtype) + name
    return record + bytes(reclen - len(record))


@pytest.fixture(params=["DirEntry", "HostDirents"])
def ds(request: pytest.FixtureRequest, s: Session) -> Session:
    """A session whose file system answers a plain readdir with DirEntry objects, or with the same
    entries as HostDirents (the server packs those natively: both must give the same replies)."""
    if request.param == "HostDirents":
        real = s.fs.readdir

        def readdir(ctx, nodeid, fh, offset, plus):
            if plus:
                return real(ctx, nodeid, fh, offset, plus)
            entries = list(real(ctx, nodeid, fh, 0, plus))
            assert [e.offset for e in entries] == list(range(1, len(entries) + 1))
            records = [dirent_record(e.name, e.ino, e.type) for e in entries]
            starts = [sum(map(len, records[:i])) for i in range(len(records))]
            return HostDirents(b"".join(records), array("I", starts), offset)

        s.fs.readdir = readdir
    return s


def test_host_dirents_index_leaves_out_dots_and_iterates_as_dir_entries() -> None:
    data = b"".join([dirent_record(b".", 2, 4), dirent_record(b"..", 2, 4), dirent_record(b"a", 7, 8),
                     dirent_record(b"b" * 255, 9, 10), dirent_record(b"..c", 11, 1, reclen=64)])
    offsets = native.index_dirents(data)
    assert list(offsets) == [48, 72, 352]
    assert [(d.name, d.ino, d.type, d.offset) for d in HostDirents(data, offsets, 1)] == [
        (b"b" * 255, 9, 10, 2), (b"..c", 11, 1, 3)]


@pytest.mark.parametrize("bad", [
    dirent_record(b"a", 1, 8)[:20],  # cut short
    LINUX_DIRENT64.pack(1, 0, 8, 8) + b"ab\0" + bytes(5),  # d_reclen below the header
    LINUX_DIRENT64.pack(1, 0, 24, 8) + b"abcde",  # no NUL within the record
    dirent_record(b"a", 1, 8)[:16] + struct.pack("<H", 0x4000) + dirent_record(b"a", 1, 8)[18:],  # runs past
])
def test_host_dirents_index_refuses_malformed_records(bad: bytes) -> None:
    with pytest.raises(ValueError):
        native.index_dirents(dirent_record(b"ok", 1, 8) + bad)


def test_readdir_lists_everything_with_aligned_zero_padded_records(ds: Session) -> None:
    names = [b"a", b"bb", b"exactly8", b"nine_char"]
    for name in names:
        ds.create(name)
    fh = opendir(ds)
    reply = readdir(ds, fh, 0, 4096, False, fill=0xFF)
    entries = parse_dirents(reply.body, plus=False)
    assert [e[0] for e in entries] == [b".", b"..", *names]
    assert [e[2] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[2][3] == stat.S_IFREG >> 12 and entries[0][3] == stat.S_IFDIR >> 12
    assert readdir(ds, fh, 6, 4096, False).body == b"", "end of directory is an empty reply"


def test_readdir_stops_when_the_next_record_does_not_fit_and_resumes(ds: Session) -> None:
    for i in range(10):
        ds.create(b"file%d" % i)
    fh = opendir(ds)
    seen, offset = [], 0
    while True:
        reply = readdir(ds, fh, offset, 100, False)
        assert reply.length - 16 <= 100
        batch = parse_dirents(reply.body, plus=False)
        if not batch:
            break
        seen += [e[0] for e in batch]
        offset = batch[-1][2]
    assert seen == [b".", b".."] + [b"file%d" % i for i in range(10)]


def test_readdir_is_limited_by_the_reply_room(ds: Session) -> None:
    for i in range(10):
        ds.create(b"f%d" % i)
    reply = readdir(ds, opendir(ds), 0, 0xFFFFFFFF, False, room=16 + 100)
    assert reply.error == 0 and len(parse_dirents(reply.body, plus=False)) == 3


def test_readdir_buffer_too_small_for_one_entry_is_einval(ds: Session) -> None:
    assert readdir(ds, opendir(ds), 0, 20, False).error == errno.EINVAL


@pytest.mark.parametrize("cookie", [7, 1 << 32, (1 << 64) - 1])
def test_readdir_from_a_cookie_past_the_end_is_the_end(ds: Session, cookie: int) -> None:
    ds.create(b"a")
    fh = opendir(ds)
    readdir(ds, fh, 0, 4096, False)
    reply = readdir(ds, fh, cookie, 4096, False)
    assert reply.error == 0 and reply.body == b""


def test_readdirplus_counts_only_entries_sent(s: Session) -> None:
    ids = [s.create(b"f%d" % i)[0] for i in range(5)]
    before = {i: s.fs.nodes[i].nlookup for i in [1, *ids]}
    fh = opendir(s)
    # Room for ".", "..", f0, f1 (160 bytes each): f2 is produced but does not fit.
    reply = readdir(s, fh, 0, 160 * 4 + 100, True, fill=0xFF)
    entries = parse_dirents(reply.body, plus=True)
    assert [e[0] for e in entries] == [b".", b"..", b"f0", b"f1"]
    assert entries[0][4][0] == 0 and entries[1][4][0] == 0, "no node info for . and .."
    assert entries[2][4][0] == ids[0] and stat.S_ISREG(attr_of(entries[2][4], 6)["mode"])
    after = {i: s.fs.nodes[i].nlookup for i in [1, *ids]}
    assert after == {**before, ids[0]: before[ids[0]] + 1, ids[1]: before[ids[1]] + 1}


def test_readdirplus_from_a_list_forgets_every_unsent_entry(s: Session) -> None:
    ids = [s.create(b"f%d" % i)[0] for i in range(5)]
    before = {i: s.fs.nodes[i].nlookup for i in ids}
    real = s.fs.readdir
    s.fs.readdir = lambda *args: list(real(*args))
    reply = readdir(s, opendir(s), 2, 170, True)
    assert [e[0] for e in parse_dirents(reply.body, plus=True)] == [b"f0"]
    assert {i: s.fs.nodes[i].nlookup for i in ids} == {**before, ids[0]: before[ids[0]] + 1}


# -- replies, dispatch, errors --------------------------------------------------------------------
def test_interrupt_and_notify_reply_get_no_reply(s: Session) -> None:
    assert s.call(abi.FUSE_INTERRUPT, abi.INTERRUPT_IN.pack(5)).length == 0
    assert s.call(abi.FUSE_INTERRUPT, b"\1").length == 0  # truncated: dropped
    assert s.call(abi.FUSE_NOTIFY_REPLY, bytes(40)).length == 0


class WaitingLocks:
    """setlk/flock that, asked to wait, wait until the request is interrupted, as a lock never freed."""

    def __init__(self, s: Session) -> None:
        self.contexts: list[Context] = []
        self.waiting = threading.Event()
        s.fs.setlk = lambda ctx, nodeid, fh, owner, lock, wait: self.lock(ctx, wait)
        s.fs.flock = lambda ctx, nodeid, fh, owner, kind, wait: self.lock(ctx, wait)

    def lock(self, ctx: Context, wait: bool) -> None:
        self.contexts.append(ctx)
        if not wait:
            raise OSError(errno.EAGAIN, "held")
        self.waiting.set()
        ctx.interrupt.wait()
        raise OSError(errno.EINTR, "interrupted")


def lk_request(opcode: int, unique: int, flags: int = 0) -> bytes:
    return request(opcode, abi.LK_IN.pack(3, 9, 0, 100, 1, 42, flags), 2, unique)


def setlkw_in_thread(s: Session, unique: int, flags: int = 0) -> tuple[threading.Thread, list[Reply]]:
    replies: list[Reply] = []
    t = threading.Thread(target=lambda: replies.append(s.send(lk_request(abi.FUSE_SETLKW, unique, flags))))
    t.start()
    return t, replies


@pytest.mark.parametrize("flags", [0, abi.FUSE_LK_FLOCK])
def test_interrupt_ends_a_waiting_setlkw_with_eintr(s: Session, flags: int) -> None:
    locks = WaitingLocks(s)
    t, replies = setlkw_in_thread(s, 500, flags)
    locks.waiting.wait()
    # Other requests go on meanwhile, and an interrupt naming another request changes nothing.
    assert s.send(lk_request(abi.FUSE_SETLK, 501, flags)).error == errno.EAGAIN
    assert s.send(request(abi.FUSE_INTERRUPT, abi.INTERRUPT_IN.pack(499), unique=502)).length == 0
    assert not locks.contexts[0].interrupt.is_set()
    assert s.send(request(abi.FUSE_INTERRUPT, abi.INTERRUPT_IN.pack(500), unique=503)).length == 0
    t.join()
    assert [(r.unique, r.error) for r in replies] == [(500, errno.EINTR)]
    # Only the waiting request carries an interrupt event.
    assert locks.contexts[1].interrupt is None
    assert (locks.contexts[0].uid, locks.contexts[0].pid) == (1000, 42)


def test_interrupt_that_overtakes_its_setlkw_still_counts(s: Session) -> None:
    locks = WaitingLocks(s)
    assert s.server.interrupt(600) is False
    assert s.send(lk_request(abi.FUSE_SETLKW, 600)).error == errno.EINTR
    assert locks.contexts[0].interrupt.is_set()
    # Remembered once: a later request with that unique waits again.
    t, replies = setlkw_in_thread(s, 600)
    locks.waiting.wait()
    assert s.server.interrupt(600) is True
    t.join()
    assert replies[0].error == errno.EINTR


@pytest.mark.parametrize("how", ["reset", "destroy", "init"])
def test_the_end_of_the_session_ends_waiting_setlkws(s: Session, how: str) -> None:
    locks = WaitingLocks(s)
    t, replies = setlkw_in_thread(s, 700)
    locks.waiting.wait()
    if how == "reset":
        s.server.reset()
    elif how == "destroy":
        assert s.call(abi.FUSE_DESTROY).error == 0
    else:
        s.init()
    t.join()
    assert replies[0].error == errno.EINTR


@pytest.mark.parametrize("opcode", [abi.FUSE_GETLK, abi.FUSE_SETLKW, abi.FUSE_SETUPMAPPING, abi.FUSE_TMPFILE,
                                    abi.FUSE_STATX, 7, 99, abi.CUSE_INIT, 0xFFFFFFFF])
def test_unsupported_opcodes_are_enosys(s: Session, opcode: int) -> None:
    reply = s.call(opcode, bytes(64))
    assert reply.error == errno.ENOSYS and reply.length == 16


def test_filesystem_bug_is_logged_and_answered_eio(s: Session, caplog: pytest.LogCaptureFixture) -> None:
    def broken(ctx: Context, nodeid: int, fh: int | None) -> None:
        raise KeyError("oops")

    s.fs.getattr = broken
    with caplog.at_level(logging.ERROR, logger="vhostfs.fuse"):
        assert s.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0)).error == errno.EIO
    assert any(r.levelno == logging.ERROR and "FUSE_GETATTR" in r.getMessage() for r in caplog.records)


def test_oserror_without_errno_is_eio(s: Session) -> None:
    def broken(ctx: Context, nodeid: int, fh: int | None) -> None:
        raise OSError("no errno")

    s.fs.getattr = broken
    assert s.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0)).error == errno.EIO


def test_reply_padding_is_zeroed(s: Session) -> None:
    reply = s.call(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), fill=0xFF)
    assert reply.body[12:16] == bytes(4)
    reply = s.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), fill=0xFF)
    assert reply.body[12:16] == bytes(4), "fuse_attr_out.dummy"
    assert reply.body[-4:] == bytes(4), "fuse_attr.flags"
    reply = s.call(abi.FUSE_STATFS, fill=0xFF)
    assert reply.body[52:] == bytes(28)


# -- hostile requests -----------------------------------------------------------------------------
def test_request_shorter_than_unique_is_dropped(s: Session) -> None:
    assert s.send(request(abi.FUSE_GETATTR)[:15]).length == 0


def test_truncated_header_is_einval(s: Session) -> None:
    reply = s.send(request(abi.FUSE_GETATTR, unique=1234)[:20])
    assert (reply.error, reply.unique, reply.length) == (errno.EINVAL, 1234, 16)


@pytest.mark.parametrize("length", [0, 16, 39, 41, 1000, 0xFFFFFFFF])
def test_header_len_must_match_the_bytes_present(s: Session, length: int) -> None:
    reply = s.send(request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), length=length))
    assert reply.error == errno.EINVAL


def test_extension_length_beyond_the_request_is_einval(s: Session) -> None:
    assert s.send(request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), extlen=3)).error == errno.EINVAL


def test_malformed_forget_gets_no_reply(s: Session) -> None:
    assert s.send(request(abi.FUSE_FORGET, b"\0" * 8, length=60)).length == 0
    assert s.call(abi.FUSE_FORGET, b"\1\0").length == 0


@pytest.mark.parametrize(("opcode", "body"), [
    (abi.FUSE_GETATTR, b"\0" * 8),
    (abi.FUSE_SETATTR, b"\0" * 87),
    (abi.FUSE_OPEN, b"\0" * 4),
    (abi.FUSE_READ, b"\0" * 39),
    (abi.FUSE_WRITE, b"\0" * 24),
    (abi.FUSE_RELEASE, b"\0" * 16),
    (abi.FUSE_FLUSH, b""),
    (abi.FUSE_MKDIR, b"\0" * 4),
    (abi.FUSE_CREATE, b"\0" * 12),
    (abi.FUSE_READDIRPLUS, b"\0" * 20),
    (abi.FUSE_LSEEK, b"\0" * 16),
    (abi.FUSE_COPY_FILE_RANGE, b"\0" * 48),
    (abi.FUSE_GETXATTR, b"\0" * 4),
    (abi.FUSE_BATCH_FORGET, b""),
])
def test_truncated_bodies(s: Session, opcode: int, body: bytes) -> None:
    reply = s.call(opcode, body)
    if opcode == abi.FUSE_BATCH_FORGET:
        assert reply.length == 0
    else:
        assert reply.error == errno.EINVAL


@pytest.mark.parametrize("declared", [0, 3, 5, 0xFFFFFFFF])
def test_write_size_must_equal_the_payload(s: Session, declared: int) -> None:
    nodeid, fh = s.create(b"f")
    body = abi.WRITE_IN.pack(fh, 0, declared, 0, 0, 0) + b"four"
    assert s.call(abi.FUSE_WRITE, body, nodeid).error == errno.EINVAL
    assert attr_of(s.getattr(nodeid), 2)["size"] == 0


@pytest.mark.parametrize(("name", "err"), [
    (b"noterminator", errno.EINVAL),
    (b"\0", errno.EINVAL),
    (b"a/b\0", errno.EINVAL),
    (b"/\0", errno.EINVAL),
    (b"x" * 256 + b"\0", errno.ENAMETOOLONG),
    (b".\0", errno.EINVAL),
    (b"..\0", errno.EINVAL),
])
def test_bad_names(s: Session, name: bytes, err: int) -> None:
    assert s.call(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + name).error == err
    assert s.call(abi.FUSE_UNLINK, name).error == err
    assert s.call(abi.FUSE_CREATE, abi.CREATE_IN.pack(0, 0o644, 0, 0) + name).error == err
    assert list(s.fs.nodes[1].children) == []


def test_name_of_255_bytes_is_fine(s: Session) -> None:
    s.mkdir(b"x" * 255)


@pytest.mark.parametrize("name", [b"", b"a/b", b"x" * 256])
def test_lookup_rejects_bad_names_but_not_dots(s: Session, name: bytes) -> None:
    assert s.call(abi.FUSE_LOOKUP, name + b"\0").error in (errno.EINVAL, errno.ENAMETOOLONG)


def test_rename_needs_both_names_terminated(s: Session) -> None:
    s.create(b"a")
    assert s.call(abi.FUSE_RENAME, abi.RENAME_IN.pack(1) + b"a\0b").error == errno.EINVAL
    assert s.call(abi.FUSE_RENAME, abi.RENAME_IN.pack(1) + b"a\0..\0").error == errno.EINVAL


def test_symlink_target_needs_terminator(s: Session) -> None:
    assert s.call(abi.FUSE_SYMLINK, b"l\0target").error == errno.EINVAL


def test_reply_larger_than_the_room_is_erange_and_gives_the_reference_back(s: Session) -> None:
    d = s.mkdir(b"d")
    before = s.fs.nodes[d].nlookup
    reply = s.call(abi.FUSE_LOOKUP, b"d\0", room=100)
    assert reply.error == errno.ERANGE and reply.length == 16
    assert s.fs.nodes[d].nlookup == before


def test_create_reply_that_does_not_fit_releases_and_forgets(s: Session) -> None:
    reply = s.call(abi.FUSE_CREATE, abi.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"f\0", room=100)
    assert reply.error == errno.ERANGE
    nodeid = s.fs.nodes[1].children[b"f"]
    assert s.fs.nodes[nodeid].nlookup == 0 and s.fs.handles == {}


def test_no_room_even_for_the_header_drops_the_reply(s: Session) -> None:
    assert s.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), room=15).length == 0
    nodeid, fh = s.create(b"f")
    assert s.call(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 10, 0, 0, 0), nodeid, room=8).length == 0


def test_unknown_nodeid_is_an_error_not_a_crash(s: Session) -> None:
    assert s.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), nodeid=0xDEADBEEF).error == errno.ENOENT
    assert s.call(abi.FUSE_READ, abi.READ_IN.pack(0xFFFFFFFFFFFFFFFF, 0, 10, 0, 0, 0)).error == errno.EBADF


def test_readdirplus_failing_midway_gives_back_the_entries_it_counted(s: Session) -> None:
    ids = [s.create(b"f%d" % i)[0] for i in range(3)]
    before = {i: s.fs.nodes[i].nlookup for i in ids}
    real = s.fs.readdir

    def failing(*args: object) -> Iterator[DirEntry]:
        inner = real(*args)
        for _ in range(3):  # ".", "..", f0
            yield next(inner)
        raise OSError(errno.EIO, "disk on fire")

    s.fs.readdir = failing
    assert readdir(s, opendir(s), 0, 4096, True).error == errno.EIO
    assert {i: s.fs.nodes[i].nlookup for i in ids} == before


def test_entry_with_unpackable_attributes_is_eio_and_not_counted(s: Session,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    d = s.mkdir(b"d")
    before = s.fs.nodes[d].nlookup
    s.fs.nodes[d].attr.st_nlink = -1
    with caplog.at_level(logging.CRITICAL, logger="vhostfs.fuse"):
        assert s.call(abi.FUSE_LOOKUP, b"d\0").error == errno.EIO
    assert s.fs.nodes[d].nlookup == before


def test_negative_lookup_entry_is_cached_with_nodeid_0(s: Session) -> None:
    s.fs.lookup = lambda ctx, parent, name: Entry(0, Stat(), entry_timeout=5.5)
    entry = s.entry(abi.FUSE_LOOKUP, b"ghost\0")
    assert entry[:6] == (0, 0, 5, 0, 500_000_000, 0)
    assert set(entry[6:]) == {0}


# -- BMAP, IOCTL, POLL, STATX -----------------------------------------------------------------------
class Recorder(MemFS):
    """MemFS plus bmap, ioctl and statx that record their arguments and answer what a test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.ioctl_answer: tuple[int, bytes] = (0, b"")

    def bmap(self, ctx: Context, nodeid: int, block: int, blocksize: int) -> int:
        self.calls.append(("bmap", nodeid, block, blocksize))
        return block * 8 + 3

    def ioctl(self, ctx: Context, nodeid: int, fh: int, flags: int, cmd: int, arg: int, in_data: bytes,
              out_size: int) -> tuple[int, bytes]:
        self.calls.append(("ioctl", nodeid, fh, flags, cmd, arg, in_data, out_size))
        return self.ioctl_answer

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> tuple[Statx, float]:
        self.calls.append(("statx", nodeid, fh, flags, mask))
        attr, _ = self.getattr(ctx, nodeid, fh)
        sx = Statx.from_attr(attr)
        sx.mask |= STATX_BTIME
        sx.btime_ns = 1_500_000_000_123
        return sx, 2.25


@pytest.fixture
def r() -> Session:
    session = Session(Recorder())
    session.init(minor=39)
    return session


def ioctl_body(fh: int = 5, flags: int = 0, cmd: int = 0x80046601, arg: int = 0xDEAD, data: bytes = b"",
               in_size: int | None = None, out_size: int = 4) -> bytes:
    return abi.IOCTL_IN.pack(fh, flags, cmd, arg, len(data) if in_size is None else in_size, out_size) + data


def test_init_speaks_7_39_to_a_newer_client() -> None:
    reply = Session().call(abi.FUSE_INIT, init_body(minor=45))
    assert abi.INIT_OUT.unpack(reply.body)[:2] == (7, 39)


@pytest.mark.parametrize(("opcode", "body"), [
    (abi.FUSE_BMAP, abi.BMAP_IN.pack(0, 4096)),
    (abi.FUSE_IOCTL, abi.IOCTL_IN.pack(0, 0, 0x80046601, 0, 0, 4)),
    (abi.FUSE_STATX, abi.STATX_IN.pack(0, 0, 0, 0)),
])
def test_bmap_ioctl_statx_default_to_enosys(opcode: int, body: bytes) -> None:
    sess = Session()
    sess.init(minor=39)
    assert sess.call(opcode, body).error == errno.ENOSYS


def test_bmap_round_trip(r: Session) -> None:
    nodeid, _ = r.create(b"f")
    reply = r.call(abi.FUSE_BMAP, abi.BMAP_IN.pack(7, 4096), nodeid, fill=0xFF)
    assert reply.error == 0 and abi.BMAP_OUT.unpack(reply.body) == (59,)
    assert r.fs.calls == [("bmap", nodeid, 7, 4096)]


def test_ioctl_round_trip(r: Session) -> None:
    r.fs.ioctl_answer = (3, b"\x01\x02\x03\x04")
    flags = abi.FUSE_IOCTL_DIR | abi.FUSE_IOCTL_32BIT | abi.FUSE_IOCTL_COMPAT
    reply = r.call(abi.FUSE_IOCTL, ioctl_body(9, flags, 0x40046602, 0x1234, b"\xaa\xbb\xcc\xdd", out_size=4),
                   nodeid=2, fill=0xFF)
    assert reply.error == 0 and reply.length == 16 + 16 + 4
    assert abi.IOCTL_OUT.unpack_from(reply.body) == (3, 0, 0, 0)
    assert reply.body[16:] == b"\x01\x02\x03\x04"
    assert r.fs.calls == [("ioctl", 2, 9, flags, 0x40046602, 0x1234, b"\xaa\xbb\xcc\xdd", 4)]


def test_ioctl_unrestricted_is_enosys_without_asking_the_filesystem(r: Session) -> None:
    assert r.call(abi.FUSE_IOCTL, ioctl_body(flags=abi.FUSE_IOCTL_UNRESTRICTED)).error == errno.ENOSYS
    assert r.fs.calls == []


@pytest.mark.parametrize("in_size", [0, 3, 5, 0xFFFFFFFF])
def test_ioctl_in_size_must_equal_the_payload(r: Session, in_size: int) -> None:
    assert r.call(abi.FUSE_IOCTL, ioctl_body(data=b"four", in_size=in_size)).error == errno.EINVAL
    assert r.fs.calls == []


def test_ioctl_huge_out_size_is_bounded(r: Session) -> None:
    r.call(abi.FUSE_IOCTL, ioctl_body(out_size=0xFFFFFFFF), room=1 << 17)
    r.call(abi.FUSE_IOCTL, ioctl_body(out_size=0xFFFFFFFF), room=4 << 20)
    assert [c[-1] for c in r.fs.calls] == [(1 << 17) - 32, 1 << 20]


def test_ioctl_out_size_is_cut_to_the_reply_room(r: Session) -> None:
    r.fs.ioctl_answer = (0, b"12345678")
    reply = r.call(abi.FUSE_IOCTL, ioctl_body(out_size=100), room=32 + 8)
    assert reply.error == 0 and reply.body[16:] == b"12345678"
    assert r.fs.calls[-1][-1] == 8
    assert r.call(abi.FUSE_IOCTL, ioctl_body(out_size=100), room=20).error == errno.ERANGE


@pytest.mark.parametrize("answer", [(0, b"12345"), (1 << 31, b""), (-(1 << 31) - 1, b"")])
def test_ioctl_answer_beyond_the_limits_is_eio(r: Session, answer: tuple[int, bytes]) -> None:
    r.fs.ioctl_answer = answer
    assert r.call(abi.FUSE_IOCTL, ioctl_body(out_size=4)).error == errno.EIO


def test_poll_reports_readiness_of_an_open_file(s: Session) -> None:
    nodeid, fh = s.create(b"f")
    events = select.POLLIN | select.POLLPRI
    reply = s.call(abi.FUSE_POLL, abi.POLL_IN.pack(fh, 77, abi.FUSE_POLL_SCHEDULE_NOTIFY, events), nodeid,
                   fill=0xFF)
    assert reply.error == 0 and reply.length == 24
    assert abi.POLL_OUT.unpack(reply.body) == (select.POLLIN,)
    assert reply.body[4:] == bytes(4), "fuse_poll_out.padding"
    assert s.call(abi.FUSE_POLL, abi.POLL_IN.pack(fh + 100, 0, 0, events), nodeid).error == errno.EBADF


def test_statx_round_trip(r: Session) -> None:
    nodeid, fh = r.create(b"f")
    r.write(nodeid, fh, 0, b"hello")
    reply = r.call(abi.FUSE_STATX, abi.STATX_IN.pack(abi.FUSE_GETATTR_FH, fh, 0x2000, STATX_BTIME), nodeid,
                   fill=0xFF)
    assert reply.error == 0 and reply.length == 16 + 288
    values = abi.STATX_OUT.unpack(reply.body)
    assert values[:3] == (2, 250_000_000, 0)
    mask, _blksize, _attributes, nlink, uid, gid, mode, ino, size = values[3:12]
    assert mask == STATX_BASIC_STATS | STATX_BTIME
    assert (nlink, uid, gid, stat.S_IFMT(mode), ino, size) == (1, 1000, 1000, stat.S_IFREG, nodeid, 5)
    assert values[17:20] == (1500, 123, 0), "btime"
    assert reply.body[16:32] == bytes(16), "fuse_statx_out.spare"
    assert reply.body[32 + 30:32 + 32] == bytes(2), "fuse_statx.__spare0"
    assert reply.body[32 + 144:] == bytes(112), "fuse_statx.__spare2"
    r.call(abi.FUSE_STATX, abi.STATX_IN.pack(0, fh, 0, 0), nodeid)
    assert r.fs.calls == [("statx", nodeid, fh, 0x2000, STATX_BTIME), ("statx", nodeid, None, 0, 0)]


def test_statx_needs_a_7_39_client() -> None:
    sess = Session(Recorder())
    sess.init(minor=38)
    assert sess.call(abi.FUSE_STATX, abi.STATX_IN.pack(0, 0, 0, 0)).error == errno.ENOSYS
    assert sess.fs.calls == []


@pytest.mark.parametrize(("opcode", "body"), [
    (abi.FUSE_BMAP, b"\0" * 15),
    (abi.FUSE_IOCTL, b"\0" * 31),
    (abi.FUSE_POLL, b"\0" * 23),
    (abi.FUSE_STATX, b"\0" * 23),
])
def test_truncated_bmap_ioctl_poll_statx(r: Session, opcode: int, body: bytes) -> None:
    assert r.call(opcode, body).error == errno.EINVAL
    assert r.fs.calls == []
