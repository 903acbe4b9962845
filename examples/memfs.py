"""An in-memory file system: a small, complete example of the vhostfs Filesystem API.

Directories, regular files, symlinks, hard links, extended attributes and renames (including
RENAME_NOREPLACE and RENAME_EXCHANGE) all live in Python dicts. Nodes stay alive while a name or a
kernel lookup reference points at them, which is what the lookup counts in the API are for.

Serve it over /dev/fuse or virtio-fs like any other Filesystem, e.g.
`FuseServer(MemFS())`. The unit tests of the FUSE server use it as their file system.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import stat
import threading
import time
from collections.abc import Iterator

from vhostfs.fuse.filesystem import (
    ROOT_ID,
    TIME_NOW,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Open,
    SetAttr,
    Stat,
    StatVfs,
)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Node:
    """One inode: its attributes plus the contents that fit its type."""

    __slots__ = ("attr", "data", "children", "target", "parent", "nlookup", "xattrs")

    def __init__(self, attr: Stat, parent: int) -> None:
        self.attr = attr
        self.data = bytearray()
        self.children: dict[bytes, int] = {}
        self.target = b""
        self.parent = parent
        self.nlookup = 0
        self.xattrs: dict[bytes, bytes] = {}

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attr.st_mode)


class MemFS(Filesystem):
    """A Filesystem kept entirely in memory; one lock serialises every operation.

    `timeout` is the entry and attribute cache timeout handed to the guest.
    """

    def __init__(self, timeout: float = 1.0) -> None:
        self.timeout = timeout
        self.lock = threading.RLock()
        self.nodes: dict[int, Node] = {}
        self.handles: dict[int, int] = {}
        self._next_id = ROOT_ID
        self._next_fh = 1
        root = self._new(stat.S_IFDIR | 0o755, ROOT_ID, Context(0, 0, 0))
        root.attr.st_nlink = 2

    # -- helpers --------------------------------------------------------------------------------
    def _new(self, mode: int, parent: int, ctx: Context) -> Node:
        nodeid = self._next_id
        self._next_id += 1
        now = time.time_ns()
        attr = Stat(st_ino=nodeid, st_mode=mode, st_uid=ctx.uid, st_gid=ctx.gid, st_atime_ns=now,
                    st_mtime_ns=now, st_ctime_ns=now)
        node = Node(attr, parent)
        self.nodes[nodeid] = node
        return node

    def _node(self, nodeid: int) -> Node:
        node = self.nodes.get(nodeid)
        if node is None:
            raise _err(errno.ENOENT)
        return node

    def _dir(self, nodeid: int) -> Node:
        node = self._node(nodeid)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        return node

    def _entry(self, nodeid: int) -> Entry:
        """An Entry for `nodeid`, counting the lookup reference it gives the kernel."""
        node = self.nodes[nodeid]
        node.nlookup += 1
        return Entry(nodeid, dataclasses.replace(node.attr), 0, self.timeout, self.timeout)

    def _maybe_drop(self, nodeid: int) -> None:
        node = self.nodes.get(nodeid)
        if node is not None and nodeid != ROOT_ID and node.nlookup <= 0 and node.attr.st_nlink <= 0:
            del self.nodes[nodeid]

    def _touch(self, node: Node, *, data: bool = False) -> None:
        now = time.time_ns()
        node.attr.st_ctime_ns = now
        if data:
            node.attr.st_mtime_ns = now

    def _set_size(self, node: Node, size: int) -> None:
        if len(node.data) > size:
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))
        node.attr.st_size = size
        node.attr.st_blocks = (size + 511) // 512

    def _create_child(self, ctx: Context, parent: int, name: bytes, mode: int) -> Node:
        pdir = self._dir(parent)
        if name in pdir.children:
            raise _err(errno.EEXIST)
        node = self._new(mode, parent, ctx)
        pdir.children[name] = node.attr.st_ino
        self._touch(pdir, data=True)
        return node

    def _unlink_child(self, pdir: Node, name: bytes) -> None:
        nodeid = pdir.children.pop(name)
        node = self.nodes[nodeid]
        if node.is_dir:
            pdir.attr.st_nlink -= 1
            node.attr.st_nlink = 0
        else:
            node.attr.st_nlink -= 1
        self._touch(node)
        self._touch(pdir, data=True)
        self._maybe_drop(nodeid)

    # -- names ----------------------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        with self.lock:
            pdir = self._dir(parent)
            if name == b".":
                return self._entry(parent)
            if name == b"..":
                return self._entry(pdir.parent)
            nodeid = pdir.children.get(name)
            if nodeid is None:
                raise _err(errno.ENOENT)
            return self._entry(nodeid)

    def forget(self, nodeid: int, nlookup: int) -> None:
        with self.lock:
            node = self.nodes.get(nodeid)
            if node is not None:
                node.nlookup -= nlookup
                self._maybe_drop(nodeid)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Stat, float]:
        with self.lock:
            return dataclasses.replace(self._node(nodeid).attr), self.timeout

    def setattr(self, ctx: Context, nodeid: int, changes: SetAttr) -> tuple[Stat, float]:
        with self.lock:
            node = self._node(nodeid)
            attr = node.attr
            now = time.time_ns()
            if changes.size is not None:
                if node.is_dir:
                    raise _err(errno.EISDIR)
                if not stat.S_ISREG(attr.st_mode):
                    raise _err(errno.EINVAL)
                self._set_size(node, changes.size)
                attr.st_mtime_ns = now
            if changes.mode is not None:
                attr.st_mode = stat.S_IFMT(attr.st_mode) | stat.S_IMODE(changes.mode)
            if changes.uid is not None:
                attr.st_uid = changes.uid
            if changes.gid is not None:
                attr.st_gid = changes.gid
            if changes.kill_suidgid:
                attr.st_mode &= ~(stat.S_ISUID | stat.S_ISGID)
            if changes.atime_ns is not None:
                attr.st_atime_ns = now if changes.atime_ns == TIME_NOW else changes.atime_ns
            if changes.mtime_ns is not None:
                attr.st_mtime_ns = now if changes.mtime_ns == TIME_NOW else changes.mtime_ns
            attr.st_ctime_ns = changes.ctime_ns if changes.ctime_ns is not None else now
            return dataclasses.replace(attr), self.timeout

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        with self.lock:
            node = self._node(nodeid)
            if not stat.S_ISLNK(node.attr.st_mode):
                raise _err(errno.EINVAL)
            return node.target

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        with self.lock:
            node = self._create_child(ctx, parent, name, stat.S_IFLNK | 0o777)
            node.target = target
            node.attr.st_size = len(target)
            return self._entry(node.attr.st_ino)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        with self.lock:
            node = self._create_child(ctx, parent, name, mode & ~(umask & 0o777))
            node.attr.st_rdev = rdev
            return self._entry(node.attr.st_ino)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        with self.lock:
            node = self._create_child(ctx, parent, name, stat.S_IFDIR | (stat.S_IMODE(mode) & ~umask))
            node.attr.st_nlink = 2
            self.nodes[parent].attr.st_nlink += 1
            return self._entry(node.attr.st_ino)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        with self.lock:
            pdir = self._dir(parent)
            nodeid = pdir.children.get(name)
            if nodeid is None:
                raise _err(errno.ENOENT)
            if self.nodes[nodeid].is_dir:
                raise _err(errno.EISDIR)
            self._unlink_child(pdir, name)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        with self.lock:
            pdir = self._dir(parent)
            nodeid = pdir.children.get(name)
            if nodeid is None:
                raise _err(errno.ENOENT)
            node = self.nodes[nodeid]
            if not node.is_dir:
                raise _err(errno.ENOTDIR)
            if node.children:
                raise _err(errno.ENOTEMPTY)
            self._unlink_child(pdir, name)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        with self.lock:
            if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
                raise _err(errno.EINVAL)
            src, dst = self._dir(parent), self._dir(newparent)
            nodeid = src.children.get(name)
            if nodeid is None:
                raise _err(errno.ENOENT)
            target = dst.children.get(newname)
            for moving, into in ((nodeid, newparent), (target, parent)):
                if moving is not None and self._is_ancestor(moving, into):
                    raise _err(errno.EINVAL)
            if flags & RENAME_EXCHANGE:
                if target is None:
                    raise _err(errno.ENOENT)
                src.children[name], dst.children[newname] = target, nodeid
                self._reparent(target, src, parent)
                self._reparent(nodeid, dst, newparent)
                return
            if target == nodeid:
                return
            node = self.nodes[nodeid]
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise _err(errno.EEXIST)
                old = self.nodes[target]
                if old.is_dir and not node.is_dir:
                    raise _err(errno.EISDIR)
                if node.is_dir and not old.is_dir:
                    raise _err(errno.ENOTDIR)
                if old.children:
                    raise _err(errno.ENOTEMPTY)
                self._unlink_child(dst, newname)
            del src.children[name]
            dst.children[newname] = nodeid
            if node.is_dir and parent != newparent:
                src.attr.st_nlink -= 1
                dst.attr.st_nlink += 1
            node.parent = newparent
            self._touch(node)
            self._touch(src, data=True)
            self._touch(dst, data=True)

    def _is_ancestor(self, nodeid: int, of: int) -> bool:
        """True if directory `nodeid` is `of` or contains it (a rename there would make a loop)."""
        while True:
            if of == nodeid:
                return True
            if of == ROOT_ID:
                return False
            of = self.nodes[of].parent

    def _reparent(self, nodeid: int, old: Node, newparent: int) -> None:
        node = self.nodes[nodeid]
        if node.is_dir and node.parent != newparent:
            old.attr.st_nlink -= 1
            self.nodes[newparent].attr.st_nlink += 1
        node.parent = newparent
        self._touch(node)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        with self.lock:
            node = self._node(nodeid)
            if node.is_dir:
                raise _err(errno.EPERM)
            dst = self._dir(newparent)
            if newname in dst.children:
                raise _err(errno.EEXIST)
            dst.children[newname] = nodeid
            node.attr.st_nlink += 1
            self._touch(node)
            self._touch(dst, data=True)
            return self._entry(nodeid)

    # -- files ----------------------------------------------------------------------------------
    def _open_handle(self, nodeid: int) -> Open:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = nodeid
        return Open(fh)

    def _file(self, fh: int) -> Node:
        nodeid = self.handles.get(fh)
        if nodeid is None:
            raise _err(errno.EBADF)
        return self.nodes[nodeid]

    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        with self.lock:
            node = self._node(nodeid)
            if node.is_dir:
                raise _err(errno.EISDIR)
            if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
                self._set_size(node, 0)
                self._touch(node, data=True)
            return self._open_handle(nodeid)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int) -> tuple[Entry, Open]:
        with self.lock:
            pdir = self._dir(parent)
            existing = pdir.children.get(name)
            if existing is not None:
                if flags & os.O_EXCL:
                    raise _err(errno.EEXIST)
                handle = self.open(ctx, existing, flags)
                return self._entry(existing), handle
            node = self._create_child(ctx, parent, name, stat.S_IFREG | (stat.S_IMODE(mode) & ~umask))
            return self._entry(node.attr.st_ino), self._open_handle(node.attr.st_ino)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        with self.lock:
            return bytes(self._file(fh).data[offset:offset + size])

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: bytes, flags: int) -> int:
        with self.lock:
            node = self._file(fh)
            end = offset + len(data)
            if end > len(node.data):
                self._set_size(node, end)
            node.data[offset:end] = data
            self._touch(node, data=True)
            return len(data)

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self.lock:
            self._file(fh)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        with self.lock:
            if mode:
                raise _err(errno.EOPNOTSUPP)
            node = self._file(fh)
            if offset + length > len(node.data):
                self._set_size(node, offset + length)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        with self.lock:
            size = len(self._file(fh).data)
            if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
                raise _err(errno.EINVAL)
            if offset >= size:
                raise _err(errno.ENXIO)
            # No holes are kept: all data up to the end, and the one hole is the end of file.
            return offset if whence == os.SEEK_DATA else size

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        with self.lock:
            data = bytes(self._file(fh_in).data[off_in:off_in + length])
            return self.write(ctx, nodeid_out, fh_out, off_out, data, 0)

    def poll(self, ctx: Context, nodeid: int, fh: int, kh: int, flags: int, events: int) -> int:
        # Memory is always ready to be read and written; nothing ever changes that, so no readiness
        # notification would be due even if the server could send one.
        with self.lock:
            self._file(fh)
        return events & (select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM)

    # -- directories ----------------------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Open:
        with self.lock:
            self._dir(nodeid)
            return self._open_handle(nodeid)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool) -> Iterator[DirEntry]:
        """Entries of a snapshot of the directory; cookie i+1 resumes after the i-th entry."""
        with self.lock:
            node = self._dir(nodeid)
            listing = [(b".", nodeid), (b"..", node.parent), *node.children.items()]
        for index in range(offset, len(listing)):
            name, child = listing[index]
            with self.lock:
                if child not in self.nodes:
                    continue
                mode = self.nodes[child].attr.st_mode
                entry = self._entry(child) if plus else None
            yield DirEntry(name, child, stat.S_IFMT(mode) >> 12, index + 1, entry)

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self.lock:
            self._dir(nodeid)

    # -- file system ----------------------------------------------------------------------------
    def statfs(self, ctx: Context, nodeid: int) -> StatVfs:
        with self.lock:
            used = sum(len(n.data) for n in self.nodes.values()) // 4096
            return StatVfs(f_blocks=1 << 20, f_bfree=(1 << 20) - used, f_bavail=(1 << 20) - used,
                           f_files=1 << 20, f_ffree=(1 << 20) - len(self.nodes))

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        with self.lock:
            self._node(nodeid)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """Nothing to flush: memory is the storage."""

    # -- extended attributes --------------------------------------------------------------------
    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        with self.lock:
            xattrs = self._node(nodeid).xattrs
            if flags & XATTR_CREATE and name in xattrs:
                raise _err(errno.EEXIST)
            if flags & XATTR_REPLACE and name not in xattrs:
                raise _err(errno.ENODATA)
            xattrs[name] = bytes(value)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        with self.lock:
            value = self._node(nodeid).xattrs.get(name)
            if value is None:
                raise _err(errno.ENODATA)
            return value

    def listxattr(self, ctx: Context, nodeid: int) -> list[bytes]:
        with self.lock:
            return list(self._node(nodeid).xattrs)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        with self.lock:
            if self._node(nodeid).xattrs.pop(name, None) is None:
                raise _err(errno.ENODATA)


if __name__ == "__main__":
    import sys

    from vhostfs.fuse.fusedev import serve_filesystem

    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MOUNTPOINT   (as root; vhostfs importable, e.g. PYTHONPATH=.)")
    serve_filesystem(MemFS(), sys.argv[1])
