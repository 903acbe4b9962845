"""The seed corpus of the FUSE server fuzzer: one valid session that uses every opcode the server
serves, built from the ABI structs, and the code that plays a (possibly mutated) session.

A step names the node and file handle it works on by the label of the earlier step whose reply gave
them out (`Ref`), the way a kernel reuses what LOOKUP, CREATE and OPEN returned; unmutated, every step
succeeds (tests/fuzz/test_fuzz_fuse_server.py checks it), so mutations start from requests that reach
deep into each handler instead of failing at the first check.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import struct
from dataclasses import dataclass, field

from vhostfs.dax import DaxFilesystem, DaxWindow
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.server import FuseServer
from vhostfs.iov import Reader, Writer

PAGE = 4096
#: FS_IOC_GETFLAGS as 64-bit callers encode it (linux/fs.h).
FS_IOC_GETFLAGS = 0x80086601
INIT_FLAGS = (abi.FUSE_INIT_EXT | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS | abi.FUSE_DO_READDIRPLUS
              | abi.FUSE_MAP_ALIGNMENT | abi.FUSE_EXPORT_SUPPORT | abi.FUSE_ATOMIC_O_TRUNC)
NO_REPLY = {abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET, abi.FUSE_INTERRUPT, abi.FUSE_NOTIFY_REPLY}
ENTRY_REPLIES = {abi.FUSE_LOOKUP, abi.FUSE_MKDIR, abi.FUSE_MKNOD, abi.FUSE_SYMLINK, abi.FUSE_LINK,
                 abi.FUSE_CREATE, abi.FUSE_TMPFILE}
#: Where a reply carries a file handle.
HANDLE_AT = {abi.FUSE_OPEN: 0, abi.FUSE_OPENDIR: 0, abi.FUSE_CREATE: abi.ENTRY_OUT.size,
             abi.FUSE_TMPFILE: abi.ENTRY_OUT.size}


@dataclass(frozen=True)
class Ref:
    """The node id (or, with `fh`, the file handle) an earlier step's reply gave out."""

    label: str
    fh: bool = False


ROOT = abi.ROOT_ID


@dataclass(frozen=True)
class Step:
    """One request: `parts` are (Struct, values) pairs, names (bytes, sent NUL-terminated) and raw data
    (bytearray, sent as it is); values and the node may be Refs."""

    label: str
    opcode: int
    node: int | Ref
    parts: tuple = ()
    #: Bytes of reply room.
    room: int = 1 << 16


def _s(st: struct.Struct, *values) -> tuple:
    assert len(values) == len(_fields(st)), (st.format, values)
    return (st, values)


def _fields(st: struct.Struct) -> list[str]:
    out = []
    count = ""
    for c in st.format[1:]:
        if c.isdigit():
            count += c
            continue
        if c != "x":
            out.extend([c] * int(count or 1))
        count = ""
    return out


F, FH, D, DFH = Ref("file"), Ref("file", True), Ref("dir"), Ref("dir.open", True)
OWNER = 0x1234
DATA = bytearray(b"hello, world\n" * 40)


def _setattr(valid: int, fh=0, size=0, mode=0, uid=0, gid=0, atime=0, mtime=0) -> tuple:
    return _s(abi.SETATTR_IN, valid, fh, size, 0, atime, mtime, 0, 0, 0, 0, mode, uid, gid)


#: The seed session, in order; INIT is played before it and DESTROY after it.
SEED: tuple[Step, ...] = (
    Step("dir", abi.FUSE_MKDIR, ROOT, (_s(abi.MKDIR_IN, 0o755, 0), b"d")),
    Step("file", abi.FUSE_CREATE, D, (_s(abi.CREATE_IN, os.O_RDWR, stat.S_IFREG | 0o644, 0o022, 0), b"f")),
    Step("write", abi.FUSE_WRITE, F, (_s(abi.WRITE_IN, FH, 0, len(DATA), 0, 0, os.O_RDWR), DATA)),
    Step("read", abi.FUSE_READ, F, (_s(abi.READ_IN, FH, 0, 4096, 0, 0, os.O_RDWR),)),
    Step("lookup", abi.FUSE_LOOKUP, D, (b"f",)),
    Step("lookup-dot", abi.FUSE_LOOKUP, D, (b"..",)),
    Step("getattr", abi.FUSE_GETATTR, F, (_s(abi.GETATTR_IN, abi.FUSE_GETATTR_FH, FH),)),
    Step("setattr", abi.FUSE_SETATTR, F, (_setattr(abi.FATTR_SIZE | abi.FATTR_FH | abi.FATTR_MODE, FH,
                                                   size=2 * PAGE, mode=0o640),)),
    Step("setattr-times", abi.FUSE_SETATTR, F, (_setattr(abi.FATTR_ATIME | abi.FATTR_MTIME, atime=10,
                                                         mtime=20),)),
    Step("statx", abi.FUSE_STATX, F, (_s(abi.STATX_IN, 0, 0, 0, 0x7FF),)),
    Step("fsync", abi.FUSE_FSYNC, F, (_s(abi.FSYNC_IN, FH, 0),)),
    Step("flush", abi.FUSE_FLUSH, F, (_s(abi.FLUSH_IN, FH, OWNER),)),
    Step("fallocate", abi.FUSE_FALLOCATE, F, (_s(abi.FALLOCATE_IN, FH, 0, PAGE, 0),)),
    Step("lseek", abi.FUSE_LSEEK, F, (_s(abi.LSEEK_IN, FH, 0, os.SEEK_DATA),)),
    Step("getlk", abi.FUSE_GETLK, F, (_s(abi.LK_IN, FH, OWNER, 0, 99, fcntl.F_WRLCK, 1, 0),)),
    Step("setlk", abi.FUSE_SETLK, F, (_s(abi.LK_IN, FH, OWNER, 0, 99, fcntl.F_WRLCK, 1, 0),)),
    Step("setlkw", abi.FUSE_SETLKW, F, (_s(abi.LK_IN, FH, OWNER, 100, 199, fcntl.F_RDLCK, 1, 0),)),
    Step("flock", abi.FUSE_SETLK, F, (_s(abi.LK_IN, FH, OWNER, 0, 0, fcntl.F_WRLCK, 1, abi.FUSE_LK_FLOCK),)),
    Step("ioctl", abi.FUSE_IOCTL, F, (_s(abi.IOCTL_IN, FH, 0, FS_IOC_GETFLAGS, 0, 0, 4),)),
    Step("poll", abi.FUSE_POLL, F, (_s(abi.POLL_IN, FH, 0, 0, select.POLLIN),)),
    Step("bmap", abi.FUSE_BMAP, F, (_s(abi.BMAP_IN, 0, 512),)),
    Step("map", abi.FUSE_SETUPMAPPING, F, (_s(abi.SETUPMAPPING_IN, FH, 0, PAGE,
                                              abi.FUSE_SETUPMAPPING_FLAG_READ, 0),)),
    Step("unmap", abi.FUSE_REMOVEMAPPING, ROOT, (_s(abi.REMOVEMAPPING_IN, 1),
                                                _s(abi.REMOVEMAPPING_ONE, 0, PAGE))),
    Step("other", abi.FUSE_CREATE, ROOT, (_s(abi.CREATE_IN, os.O_RDWR | os.O_EXCL, stat.S_IFREG | 0o600, 0,
                                                0), b"g")),
    Step("copy", abi.FUSE_COPY_FILE_RANGE, F, (_s(abi.COPY_FILE_RANGE_IN, FH, 0, Ref("other"),
                                                  Ref("other", True), 0, 100, 0),)),
    Step("reopen", abi.FUSE_OPEN, F, (_s(abi.OPEN_IN, os.O_RDONLY, 0),)),
    Step("reread", abi.FUSE_READ, F, (_s(abi.READ_IN, Ref("reopen", True), 10, 20, 0, 0, os.O_RDONLY),)),
    Step("release-reopen", abi.FUSE_RELEASE, F, (_s(abi.RELEASE_IN, Ref("reopen", True), os.O_RDONLY, 0,
                                                    0),)),
    Step("setxattr", abi.FUSE_SETXATTR, F, (_s(abi.SETXATTR_IN_COMPAT, 3, 0), b"user.k", bytearray(b"v1v"))),
    Step("getxattr", abi.FUSE_GETXATTR, F, (_s(abi.GETXATTR_IN, 100), b"user.k")),
    Step("getxattr-size", abi.FUSE_GETXATTR, F, (_s(abi.GETXATTR_IN, 0), b"user.k")),
    Step("listxattr", abi.FUSE_LISTXATTR, F, (_s(abi.GETXATTR_IN, 100),)),
    Step("removexattr", abi.FUSE_REMOVEXATTR, F, (b"user.k",)),
    Step("symlink", abi.FUSE_SYMLINK, D, (b"l", b"f")),
    Step("readlink", abi.FUSE_READLINK, Ref("symlink")),
    Step("link", abi.FUSE_LINK, D, (_s(abi.LINK_IN, F), b"hard")),
    Step("rename", abi.FUSE_RENAME, D, (_s(abi.RENAME_IN, ROOT), b"hard", b"moved")),
    Step("rename2", abi.FUSE_RENAME2, ROOT, (_s(abi.RENAME2_IN, ROOT, 1), b"moved", b"moved2")),  # NOREPLACE
    Step("mknod", abi.FUSE_MKNOD, D, (_s(abi.MKNOD_IN, stat.S_IFIFO | 0o600, 0, 0), b"fifo")),
    Step("tmpfile", abi.FUSE_TMPFILE, D, (_s(abi.CREATE_IN, os.O_RDWR, stat.S_IFREG | 0o600, 0, 0), b"/")),
    Step("access", abi.FUSE_ACCESS, F, (_s(abi.ACCESS_IN, os.R_OK | os.W_OK),)),
    Step("statfs", abi.FUSE_STATFS, ROOT),
    Step("dir.open", abi.FUSE_OPENDIR, D, (_s(abi.OPEN_IN, os.O_RDONLY | os.O_DIRECTORY, 0),)),
    Step("readdir", abi.FUSE_READDIR, D, (_s(abi.READ_IN, DFH, 0, 4096, 0, 0, 0),)),
    Step("readdirplus", abi.FUSE_READDIRPLUS, D, (_s(abi.READ_IN, DFH, 0, 4096, 0, 0, 0),)),
    Step("fsyncdir", abi.FUSE_FSYNCDIR, D, (_s(abi.FSYNC_IN, DFH, 0),)),
    Step("releasedir", abi.FUSE_RELEASEDIR, D, (_s(abi.RELEASE_IN, DFH, 0, 0, 0),)),
    Step("unlink", abi.FUSE_UNLINK, D, (b"l",)),
    Step("empty", abi.FUSE_MKDIR, ROOT, (_s(abi.MKDIR_IN, 0o700, 0), b"e")),
    Step("rmdir", abi.FUSE_RMDIR, ROOT, (b"e",)),
    Step("syncfs", abi.FUSE_SYNCFS, ROOT, (_s(abi.SYNCFS_IN),)),
    Step("interrupt", abi.FUSE_INTERRUPT, 0, (_s(abi.INTERRUPT_IN, 5),)),
    Step("notify-reply", abi.FUSE_NOTIFY_REPLY, 0, (bytearray(8),)),
    Step("release", abi.FUSE_RELEASE, F, (_s(abi.RELEASE_IN, FH, os.O_RDWR, abi.FUSE_RELEASE_FLUSH, OWNER),)),
    Step("forget", abi.FUSE_FORGET, Ref("symlink"), (_s(abi.FORGET_IN, 1),)),
    Step("batch-forget", abi.FUSE_BATCH_FORGET, 0, (_s(abi.BATCH_FORGET_IN, 2),
                                                    _s(abi.FORGET_ONE, Ref("mknod"), 1),
                                                    _s(abi.FORGET_ONE, Ref("tmpfile"), 1))),
)


class FuzzPassthrough(Passthrough):
    """The passthrough, plus an answer to BMAP (which a passthrough of an ordinary directory cannot
    give): the server's BMAP path then has a file system that supports it."""

    def bmap(self, ctx, nodeid: int, block: int, blocksize: int) -> int:
        self._inodes.unuse(self._inodes.use(nodeid))  # EBADF for an unknown node
        return block


class RecordingMapper:
    """Plays the VMM side of the DAX window: accepts every mapping."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def shmem_map(self, shmid, fd, fd_offset, shm_offset, length, writable) -> None:
        self.calls.append(("map", shm_offset, length))

    def shmem_unmap(self, shmid, shm_offset, length) -> None:
        self.calls.append(("unmap", shm_offset, length))


def make_server(share: str, **options) -> tuple[FuseServer, Passthrough]:
    """The server of a fuzzed session: the passthrough of `share` with a 1 MiB DAX window."""
    fs = FuzzPassthrough(share, xattr=True, lock_wait=0.05, **options)
    window = DaxWindow(256 * PAGE, PAGE)
    window.mapper = RecordingMapper()
    return FuseServer(DaxFilesystem(fs, window), map_alignment=window.alignment_log2), fs


@dataclass
class Session:
    """Plays steps against a server and remembers what the replies gave out."""

    server: FuseServer
    labels: dict[str, int] = field(default_factory=dict)
    unique: int = 0
    replies: list[tuple[int, int, int]] = field(default_factory=list)  # (opcode, reply length, errno)

    def resolve(self, value):
        if isinstance(value, Ref):
            return self.labels.get(value.label + (".fh" if value.fh else ""), 0xDEAD)
        return value

    def encode(self, step: Step) -> bytes:
        body = b""
        for part in step.parts:
            if isinstance(part, tuple):
                st, values = part
                body += pack_lenient(st, [self.resolve(v) for v in values])
            elif isinstance(part, bytearray):
                body += bytes(part)
            else:
                body += part + b"\0"
        return body

    def play(self, step: Step, *, split: bool = False,
             header_len: int | None = None) -> tuple[int, int, bytes]:
        """Sends `step`; returns (reply length, errno, reply body) and checks the reply's framing."""
        self.unique += 1
        body = self.encode(step)
        length = abi.IN_HEADER.size + len(body) if header_len is None else header_len
        data = abi.IN_HEADER.pack(length & 0xFFFFFFFF, step.opcode & 0xFFFFFFFF, self.unique,
                                  self.resolve(step.node) & (1 << 64) - 1, 0, 0, 4242, 0, 0) + body
        out = bytearray(b"\xaa" * step.room)
        if split and step.room > 32 and len(data) > 30:
            # Scattered buffers, as a guest's descriptor chain has them.
            segs = [memoryview(out)[:24], memoryview(out)[24:]]
            reader = Reader([memoryview(bytearray(data[:30])), memoryview(bytearray(data[30:]))])
        else:
            segs = [memoryview(out)]
            reader = Reader([memoryview(bytearray(data))])
        n = self.server.handle(reader, Writer(segs))
        if n == 0:
            assert out == b"\xaa" * step.room, "bytes written without a reply"
            self.replies.append((step.opcode, 0, 0))
            return 0, 0, b""
        assert abi.OUT_HEADER.size <= n <= step.room
        got_len, error, got_unique = abi.OUT_HEADER.unpack_from(out)
        assert got_len == n and got_unique == self.unique
        assert -4095 <= error <= 0
        assert error == 0 or n == abi.OUT_HEADER.size, "an error reply carries no body"
        reply = bytes(out[abi.OUT_HEADER.size:n])
        if error == 0:
            if step.opcode in ENTRY_REPLIES and len(reply) >= 8:
                self.labels[step.label] = abi.ENTRY_OUT.unpack_from(reply)[0]
            if step.opcode in HANDLE_AT and len(reply) >= HANDLE_AT[step.opcode] + 8:
                self.labels[step.label + ".fh"] = abi.OPEN_OUT.unpack_from(reply, HANDLE_AT[step.opcode])[0]
        self.replies.append((step.opcode, n, -error))
        return n, -error, reply

    def init(self, flags: int = INIT_FLAGS) -> int:
        n, err, reply = self.play(Step("init", abi.FUSE_INIT, 0, (_s(abi.INIT_IN, abi.KERNEL_VERSION,
                                                                      abi.KERNEL_MINOR_VERSION, 1 << 20,
                                                                      flags, 0),)))
        assert err == 0 and n
        return abi.INIT_OUT.unpack_from(reply)[3]


def pack_lenient(st: struct.Struct, values: list[int]) -> bytes:
    """`st.pack(*values)` with every value wrapped into its field's range (mutations go anywhere)."""
    out = []
    for code, v in zip(_fields(st), values, strict=True):
        bits = struct.calcsize(code) * 8
        v &= (1 << bits) - 1
        if code.islower() and v >= 1 << (bits - 1):
            v -= 1 << bits
        out.append(v)
    return st.pack(*out)
