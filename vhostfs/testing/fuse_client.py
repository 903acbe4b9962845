"""A FUSE client over the test front end: what the guest kernel's virtio-fs driver sends, in Python.

Replies with an error raise OSError(errno); the others are decoded into plain tuples and bytes.
"""

from __future__ import annotations

import errno
import itertools
import os

from vhostfs.fuse import abi
from vhostfs.testing.frontend import Frontend

#: The request queue (queue 0 is the high-priority one, virtio 1.2, 5.11.2).
REQUEST_QUEUE = 1


#: Guest memory each client owns for its request and reply buffers.
ARENA_SIZE = 3 << 20


class FuseClient:
    """Sends FUSE requests on one queue of `frontend`; one client per thread."""

    def __init__(self, frontend: Frontend, queue: int = REQUEST_QUEUE, uid: int = 0, gid: int = 0) -> None:
        self.fe = frontend
        self.arena = frontend.alloc(ARENA_SIZE, 4096)
        self.queue = queue
        self.uid = uid
        self.gid = gid
        self._unique = itertools.count(1)

    def message(self, opcode: int, nodeid: int, body: bytes = b"", unique: int | None = None) -> bytes:
        unique = next(self._unique) if unique is None else unique
        return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, unique, nodeid, self.uid, self.gid,
                                  os.getpid(), 0, 0) + body

    def raw(self, opcode: int, nodeid: int, body: bytes = b"", reply_size: int = 4096,
            queue: int | None = None) -> bytes:
        """Sends one request and returns the whole reply (out header included)."""
        return self.fe.request(self.queue if queue is None else queue, self.message(opcode, nodeid, body),
                               reply_size, arena=self.arena)

    def call(self, opcode: int, nodeid: int, body: bytes = b"", reply_size: int = 4096) -> bytes:
        """Sends a request and returns the reply body; raises OSError for an error reply."""
        reply = self.raw(opcode, nodeid, body, reply_size)
        length, error, _ = abi.OUT_HEADER.unpack_from(reply)
        if length != len(reply):
            raise AssertionError(f"reply header says {length} bytes, {len(reply)} were written")
        if error:
            raise OSError(-error, os.strerror(-error))
        return reply[abi.OUT_HEADER.size:]

    # -- operations -----------------------------------------------------------------------------
    def init(self, flags: int = 0, max_readahead: int = 1 << 20) -> tuple:
        body = abi.INIT_IN.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, max_readahead,
                                flags | abi.FUSE_INIT_EXT, 0)
        return abi.INIT_OUT.unpack_from(self.call(abi.FUSE_INIT, 0, body))

    def lookup(self, parent: int, name: bytes) -> tuple:
        """Returns the fuse_entry_out fields: (nodeid, generation, ..., attr fields)."""
        return abi.ENTRY_OUT.unpack_from(self.call(abi.FUSE_LOOKUP, parent, name + b"\0"))

    def getattr(self, nodeid: int) -> tuple:
        return abi.ATTR_OUT.unpack_from(self.call(abi.FUSE_GETATTR, nodeid, abi.GETATTR_IN.pack(0, 0)))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> tuple:
        body = abi.MKDIR_IN.pack(mode, 0) + name + b"\0"
        return abi.ENTRY_OUT.unpack_from(self.call(abi.FUSE_MKDIR, parent, body))

    def create(self, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_RDWR) -> tuple:
        """Returns (entry fields, (fh, open_flags))."""
        body = abi.CREATE_IN.pack(flags, mode, 0, 0) + name + b"\0"
        reply = self.call(abi.FUSE_CREATE, parent, body)
        fh, open_flags, _ = abi.OPEN_OUT.unpack_from(reply, abi.ENTRY_OUT.size)
        return abi.ENTRY_OUT.unpack_from(reply), (fh, open_flags)

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return abi.OPEN_OUT.unpack_from(self.call(abi.FUSE_OPEN, nodeid, abi.OPEN_IN.pack(flags, 0)))[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        body = abi.READ_IN.pack(fh, offset, size, 0, 0, os.O_RDONLY)
        return self.call(abi.FUSE_READ, nodeid, body, reply_size=size + abi.OUT_HEADER.size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        body = abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, os.O_RDWR) + data
        return abi.WRITE_OUT.unpack_from(self.call(abi.FUSE_WRITE, nodeid, body))[0]

    def release(self, nodeid: int, fh: int) -> None:
        self.call(abi.FUSE_RELEASE, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def unlink(self, parent: int, name: bytes) -> None:
        self.call(abi.FUSE_UNLINK, parent, name + b"\0")

    def statfs(self) -> tuple:
        return abi.STATFS_OUT.unpack_from(self.call(abi.FUSE_STATFS, abi.ROOT_ID))

    def forget(self, nodeid: int, nlookup: int, queue: int = 0) -> None:
        """FORGET gets no reply: the chain comes back with nothing written."""
        reply = self.raw(abi.FUSE_FORGET, nodeid, abi.FORGET_IN.pack(nlookup), reply_size=0, queue=queue)
        if reply:
            raise AssertionError("FORGET was answered")

    def readdir_names(self, nodeid: int, size: int = 4096) -> list[bytes]:
        fh = abi.OPEN_OUT.unpack_from(self.call(abi.FUSE_OPENDIR, nodeid, abi.OPEN_IN.pack(0, 0)))[0]
        names, offset = [], 0
        while True:
            data = self.call(abi.FUSE_READDIR, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0),
                             reply_size=size + abi.OUT_HEADER.size)
            if not data:
                break
            pos = 0
            while pos < len(data):
                _, offset, namelen, _ = abi.DIRENT.unpack_from(data, pos)
                start = pos + abi.DIRENT.size
                names.append(data[start:start + namelen])
                pos += (abi.DIRENT.size + namelen + 7) & ~7
        self.call(abi.FUSE_RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))
        return names


def expect_errno(err: int, fn, *args) -> None:
    """Asserts that fn(*args) fails with `err`."""
    try:
        fn(*args)
    except OSError as e:
        assert e.errno == err, f"expected {errno.errorcode[err]}, got {errno.errorcode.get(e.errno)}"
    else:
        raise AssertionError(f"expected {errno.errorcode[err]}, got success")
