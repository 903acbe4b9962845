"""The same random file operations through the FUSE server on a passthrough and directly on a second
host directory give the same results (values or errno) and leave the same trees.

The direct side is the host kernel with the semantics a FUSE client gets: paths are walked one
component at a time without following symlinks (the client resolves those itself), and files are
opened before they are read, written or truncated, as the kernel does before READ, WRITE and SETATTR.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.server import DEFAULT_WANT, FuseServer
from vhostfs.iov import Reader, Writer

NAMES = ["a", "b", "d", "d/x", "d/y", "d/e", "d/e/z", "e"]
DIRS = ["", "d", "d/e", "e"]
DATA = st.binary(max_size=300)


class FuseSide:
    """File operations as FUSE requests to a server over a passthrough (uid 0, like the test)."""

    def __init__(self, root: str) -> None:
        self.fs = Passthrough(root)
        self.server = FuseServer(self.fs)
        self.unique = 0
        err, _ = self.call(abi.FUSE_INIT, abi.ROOT_ID, abi.INIT_IN.pack(7, 38, 1 << 17,
                                                                        DEFAULT_WANT | abi.FUSE_INIT_EXT, 0))
        assert err == 0

    def call(self, opcode: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
        self.unique += 1
        data = abi.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + body
        out = bytearray(1 << 16)
        n = self.server.handle(Reader([memoryview(bytearray(data))]), Writer([memoryview(out)]))
        length, error, unique = abi.OUT_HEADER.unpack_from(out)
        assert n == length and unique == self.unique
        return -error, bytes(out[16:n])

    def _check(self, result: tuple[int, bytes]) -> bytes:
        err, body = result
        if err:
            raise OSError(err, os.strerror(err))
        return body

    def node(self, path: str) -> int:
        nodeid = abi.ROOT_ID
        for part in filter(None, path.split("/")):
            nodeid = abi.ENTRY_OUT.unpack_from(self._check(self.call(abi.FUSE_LOOKUP, nodeid,
                                                                     part.encode() + b"\0")))[0]
        return nodeid

    def parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return self.node(head), name.encode()

    def _open(self, nodeid: int, flags: int) -> int:
        return abi.OPEN_OUT.unpack_from(self._check(self.call(abi.FUSE_OPEN, nodeid,
                                                              abi.OPEN_IN.pack(flags, 0))))[0]

    def _release(self, nodeid: int, fh: int) -> None:
        self._check(self.call(abi.FUSE_RELEASE, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0)))

    def create(self, path: str, data: bytes) -> None:
        parent, name = self.parent(path)
        body = self._check(self.call(abi.FUSE_CREATE, parent, abi.CREATE_IN.pack(
            os.O_RDWR | os.O_CREAT | os.O_EXCL, stat.S_IFREG | 0o644, 0, 0) + name + b"\0"))
        nodeid = abi.ENTRY_OUT.unpack_from(body)[0]
        fh = abi.OPEN_OUT.unpack_from(body, abi.ENTRY_OUT.size)[0]
        try:
            if data:
                self._write(nodeid, fh, 0, data)
        finally:
            self._release(nodeid, fh)

    def _write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        body = self._check(self.call(abi.FUSE_WRITE, nodeid,
                                     abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, os.O_RDWR) + data))
        return abi.WRITE_OUT.unpack(body)[0]

    def write(self, path: str, offset: int, data: bytes) -> int:
        nodeid = self.node(path)
        fh = self._open(nodeid, os.O_RDWR)
        try:
            return self._write(nodeid, fh, offset, data)
        finally:
            self._release(nodeid, fh)

    def read(self, path: str, offset: int, size: int) -> bytes:
        nodeid = self.node(path)
        fh = self._open(nodeid, os.O_RDONLY)
        try:
            return self._check(self.call(abi.FUSE_READ, nodeid,
                                         abi.READ_IN.pack(fh, offset, size, 0, 0, os.O_RDONLY)))
        finally:
            self._release(nodeid, fh)

    def truncate(self, path: str, size: int) -> None:
        nodeid = self.node(path)
        fh = self._open(nodeid, os.O_WRONLY)
        try:
            self._check(self.call(abi.FUSE_SETATTR, nodeid, abi.SETATTR_IN.pack(
                abi.FATTR_SIZE | abi.FATTR_FH, fh, size, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
        finally:
            self._release(nodeid, fh)

    def mkdir(self, path: str) -> None:
        parent, name = self.parent(path)
        self._check(self.call(abi.FUSE_MKDIR, parent, abi.MKDIR_IN.pack(0o755, 0) + name + b"\0"))

    def rmdir(self, path: str) -> None:
        parent, name = self.parent(path)
        self._check(self.call(abi.FUSE_RMDIR, parent, name + b"\0"))

    def unlink(self, path: str) -> None:
        parent, name = self.parent(path)
        self._check(self.call(abi.FUSE_UNLINK, parent, name + b"\0"))

    def rename(self, src: str, dst: str) -> None:
        sp, sn = self.parent(src)
        dp, dn = self.parent(dst)
        self._check(self.call(abi.FUSE_RENAME, sp, abi.RENAME_IN.pack(dp) + sn + b"\0" + dn + b"\0"))

    def link(self, src: str, dst: str) -> None:
        nodeid = self.node(src)
        dp, dn = self.parent(dst)
        self._check(self.call(abi.FUSE_LINK, dp, abi.LINK_IN.pack(nodeid) + dn + b"\0"))

    def symlink(self, path: str, target: str) -> None:
        parent, name = self.parent(path)
        self._check(self.call(abi.FUSE_SYMLINK, parent, name + b"\0" + target.encode() + b"\0"))

    def stat(self, path: str) -> tuple:
        # fuse_attr_out: attr_valid, attr_valid_nsec, then fuse_attr (ino, size, ..., mode, nlink)
        attr = abi.ATTR_OUT.unpack_from(self._check(self.call(abi.FUSE_GETATTR, self.node(path),
                                                              abi.GETATTR_IN.pack(0, 0))))
        size, mode, nlink = attr[3], attr[11], attr[12]
        return stat.S_IFMT(mode), stat.S_IMODE(mode), size if not stat.S_ISDIR(mode) else 0, nlink

    def readlink(self, path: str) -> bytes:
        return self._check(self.call(abi.FUSE_READLINK, self.node(path)))

    def listdir(self, path: str) -> list[str]:
        nodeid = self.node(path)
        fh = abi.OPEN_OUT.unpack_from(self._check(self.call(abi.FUSE_OPENDIR, nodeid,
                                                            abi.OPEN_IN.pack(os.O_RDONLY, 0))))[0]
        names, offset = [], 0
        try:
            while True:
                body = self._check(self.call(abi.FUSE_READDIR, nodeid,
                                             abi.READ_IN.pack(fh, offset, 4096, 0, 0, 0)))
                if not body:
                    break
                pos = 0
                while pos < len(body):
                    _ino, offset, namelen, _type = abi.DIRENT.unpack_from(body, pos)
                    names.append(body[pos + abi.DIRENT.size:pos + abi.DIRENT.size + namelen].decode())
                    pos += abi.dirent_size(namelen)
        finally:
            self._check(self.call(abi.FUSE_RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0)))
        return sorted(n for n in names if n not in (".", ".."))


class HostSide:
    """The same operations straight on a host directory, walking paths without following symlinks."""

    def __init__(self, root: str) -> None:
        self.root = os.open(root, os.O_PATH | os.O_DIRECTORY)

    def _dir(self, path: str) -> int:
        """An O_PATH fd of directory `path` (the caller closes it)."""
        fd = os.dup(self.root)
        for part in filter(None, path.split("/")):
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            finally:
                os.close(fd)
            fd = nxt
        return fd

    def _at(self, path: str, fn):
        head, _, name = path.rpartition("/")
        fd = self._dir(head)
        try:
            return fn(fd, name)
        finally:
            os.close(fd)

    def _open(self, path: str, flags: int) -> int:
        return self._at(path, lambda d, n: os.open(n, flags | os.O_NOFOLLOW, dir_fd=d))

    def create(self, path: str, data: bytes) -> None:
        fd = self._at(path, lambda d, n: os.open(n, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                                 0o644, dir_fd=d))
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def write(self, path: str, offset: int, data: bytes) -> int:
        fd = self._open(path, os.O_RDWR)
        try:
            return os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def read(self, path: str, offset: int, size: int) -> bytes:
        fd = self._open(path, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def truncate(self, path: str, size: int) -> None:
        fd = self._open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        self._at(path, lambda d, n: os.mkdir(n, 0o755, dir_fd=d))

    def rmdir(self, path: str) -> None:
        self._at(path, lambda d, n: os.rmdir(n, dir_fd=d))

    def unlink(self, path: str) -> None:
        self._at(path, lambda d, n: os.unlink(n, dir_fd=d))

    def rename(self, src: str, dst: str) -> None:
        self._at(src, lambda sd, sn: self._at(dst, lambda dd, dn: os.rename(sn, dn, src_dir_fd=sd,
                                                                           dst_dir_fd=dd)))

    def link(self, src: str, dst: str) -> None:
        self._at(src, lambda sd, sn: self._at(dst, lambda dd, dn: os.link(
            sn, dn, src_dir_fd=sd, dst_dir_fd=dd, follow_symlinks=False)))

    def symlink(self, path: str, target: str) -> None:
        self._at(path, lambda d, n: os.symlink(target, n, dir_fd=d))

    def stat(self, path: str) -> tuple:
        st_ = self._at(path, lambda d, n: os.stat(n or ".", dir_fd=d, follow_symlinks=False))
        size = st_.st_size if not stat.S_ISDIR(st_.st_mode) else 0
        return stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), size, st_.st_nlink

    def readlink(self, path: str) -> bytes:
        return os.fsencode(self._at(path, lambda d, n: os.readlink(n, dir_fd=d)))

    def listdir(self, path: str) -> list[str]:
        fd = self._dir(path)
        try:
            real = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            return sorted(os.listdir(real))
        finally:
            os.close(real)


path = st.sampled_from(NAMES)
operations = st.one_of(
    st.tuples(st.just("create"), path, DATA),
    st.tuples(st.just("write"), path, st.integers(0, 600), DATA.filter(bool)),
    st.tuples(st.just("read"), path, st.integers(0, 600), st.integers(0, 700)),
    st.tuples(st.just("truncate"), path, st.integers(0, 700)),
    st.tuples(st.just("mkdir"), path),
    st.tuples(st.just("rmdir"), path),
    st.tuples(st.just("unlink"), path),
    st.tuples(st.just("rename"), path, path),
    st.tuples(st.just("link"), path, path),
    st.tuples(st.just("symlink"), path, st.sampled_from(["nowhere", "a", "../b", "/abs/target"])),
    st.tuples(st.just("stat"), path),
    st.tuples(st.just("readlink"), path),
    st.tuples(st.just("listdir"), st.sampled_from(DIRS)),
)


def outcome(side, op: tuple):
    try:
        return "ok", getattr(side, op[0])(*op[1:])
    except OSError as e:
        return "error", errno.errorcode.get(e.errno, e.errno)


def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            content = (Path(p).read_bytes() if stat.S_ISREG(st_.st_mode)
                       else os.readlink(p) if stat.S_ISLNK(st_.st_mode) else None)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode),
                                             st_.st_nlink, content)
    return out


@settings(max_examples=40)
@given(st.lists(operations, min_size=1, max_size=30))
def test_fuse_server_on_a_passthrough_does_what_the_host_does(tmp_path_factory, ops):
    served, direct = tmp_path_factory.mktemp("served"), tmp_path_factory.mktemp("direct")
    for root in (served, direct):
        (root / "d").mkdir()
        (root / "a").write_bytes(b"first file\n")
    fuse, host = FuseSide(str(served)), HostSide(str(direct))
    try:
        for i, op in enumerate(ops):
            assert outcome(fuse, op) == outcome(host, op), f"step {i}: {op}"
        assert tree(served) == tree(direct)
    finally:
        fuse.fs.close()
        os.close(host.root)
