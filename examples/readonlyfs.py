"""A read-only file system built from a dict: the smallest useful example of the Filesystem API.

    python3 examples/readonlyfs.py MOUNTPOINT      (as root; vhostfs importable, e.g. PYTHONPATH=.)

`ReadOnlyFS(tree)` serves `tree`: a dict maps names to bytes (a regular file), str (a symlink with
that target) or another dict (a directory). Nothing ever changes, so nodes live as long as the file
system (forget has nothing to do), no lock is needed, and the kernel may cache everything for long.
Every call that would modify it fails with EROFS. Unmount it with `umount MOUNTPOINT` or SIGTERM.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from vhostfs.fuse.filesystem import (
    ROOT_ID,
    Attr,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Open,
    Stat,
    StatVfs,
)

#: What `python3 examples/readonlyfs.py MOUNTPOINT` serves.
TREE: dict = {
    "hello.txt": b"Hello, world!\n",
    "docs": {
        "README": b"Served by examples/readonlyfs.py: a dict turned into a file system.\n",
        "numbers.txt": b"".join(b"%d\n" % i for i in range(10000)),
        "empty": b"",
    },
    "hello-link": "hello.txt",
}


@dataclass(slots=True)
class _Node:
    attr: Stat
    parent: int
    data: bytes = b""
    children: dict[bytes, int] = field(default_factory=dict)


def _erofs(*args: object) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


class ReadOnlyFS(Filesystem):
    """Serves the fixed tree `tree` (see the module doc), owned by the mounting user.

    `timeout` is the entry and attribute cache time handed to the kernel, in seconds.
    """

    def __init__(self, tree: dict, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.nodes: dict[int, _Node] = {}
        self._now = time.time_ns()
        self._add(tree, ROOT_ID)

    def _add(self, value: dict | bytes | str, parent: int) -> int:
        """Adds `value` as a new node under `parent` (the root is its own parent); returns its nodeid."""
        nodeid = len(self.nodes) + ROOT_ID
        attr = Stat(st_ino=nodeid, st_uid=os.getuid(), st_gid=os.getgid(), st_atime_ns=self._now,
                    st_mtime_ns=self._now, st_ctime_ns=self._now)
        node = _Node(attr, parent)
        self.nodes[nodeid] = node
        if isinstance(value, dict):
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2 + sum(isinstance(child, dict) for child in value.values())
            for name, child in value.items():
                node.children[name.encode()] = self._add(child, nodeid)
            return nodeid
        if isinstance(value, str):
            attr.st_mode = stat.S_IFLNK | 0o777
            node.data = value.encode()
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            node.data = value
        attr.st_size = len(node.data)
        attr.st_blocks = -(-attr.st_size // 512)
        return nodeid

    def _node(self, nodeid: int) -> _Node:
        node = self.nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return node

    def _dir(self, nodeid: int) -> _Node:
        node = self._node(nodeid)
        if not stat.S_ISDIR(node.attr.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return node

    def _entry(self, nodeid: int) -> Entry:
        return Entry(nodeid, self.nodes[nodeid].attr, 0, self.timeout, self.timeout)

    # -- reading --------------------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        node = self._dir(parent)
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            return self._entry(node.parent)
        child = node.children.get(name)
        if child is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return self._entry(child)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        return self._node(nodeid).attr, self.timeout

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        node = self._node(nodeid)
        if not stat.S_ISLNK(node.attr.st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return node.data

    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        node = self._node(nodeid)
        if stat.S_ISDIR(node.attr.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            _erofs()
        # The contents never change: nothing to remember per open file.
        return Open(0)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self._node(nodeid).data[offset:offset + size]

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Open:
        self._dir(nodeid)
        return Open(0)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool) -> Iterator[DirEntry]:
        """".", ".." and the children in insertion order; cookie i + 1 resumes after the i-th."""
        node = self._dir(nodeid)
        names = [(b".", nodeid), (b"..", node.parent), *node.children.items()]
        for index in range(offset, len(names)):
            name, child = names[index]
            # The kernel looks up neither "." nor ".." from readdirplus, so they carry no entry.
            entry = self._entry(child) if plus and index >= 2 else None
            yield DirEntry(name, child, stat.S_IFMT(self.nodes[child].attr.st_mode) >> 12, index + 1, entry)

    def statfs(self, ctx: Context, nodeid: int) -> StatVfs:
        used = sum(node.attr.st_blocks for node in self.nodes.values()) // 8
        return StatVfs(f_blocks=used, f_files=len(self.nodes))

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        self._node(nodeid)
        if mask & os.W_OK:
            _erofs()

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        self._node(nodeid)
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))

    def listxattr(self, ctx: Context, nodeid: int) -> list[bytes]:
        self._node(nodeid)
        return []

    # -- everything that would change the tree ------------------------------------------------------
    setattr = symlink = mknod = mkdir = unlink = rmdir = rename = link = create = write = _erofs
    tmpfile = fallocate = copy_file_range = setxattr = removexattr = _erofs


if __name__ == "__main__":
    from vhostfs.fuse.fusedev import serve_filesystem

    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MOUNTPOINT")
    serve_filesystem(ReadOnlyFS(TREE), sys.argv[1])
