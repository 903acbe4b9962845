"""The inode table: the daemon's nodeids, each backed by an O_PATH fd on the host.

A nodeid is a counter the table hands out, never an fd or a pointer, so a guest that sends a made-up or
stale nodeid gets EBADF instead of reaching whatever the number happens to name on the host.

Each `Inode` counts two things:

- `nlookup`, the kernel's references (one per Entry sent, taken away by FORGET). At zero the node
  leaves the table: later requests for its nodeid fail, and a new lookup of the same host file gets a
  new nodeid.
- `users`, the requests using its fd right now. The fd is closed only when both are zero, so a
  FORGET racing with a request on another thread (a confused or hostile guest) can never make that
  request use a closed fd, or worse, a recycled fd number that now names some other file.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from vhostfs.fuse.filesystem import ROOT_ID


def ebadf() -> OSError:
    """The error for an unknown or forgotten nodeid or file handle."""
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


class Inode:
    """One host file the guest knows by `nodeid`: its O_PATH fd, (st_dev, st_ino) key and file type.

    `kind` is the S_IFMT part of st_mode; the type of an inode never changes while its fd is held, so
    checks such as "never open a FIFO" use it without another stat. Use it as a context manager
    (from `InodeTable.use`) so that the fd stays open while the `with` block runs.
    """

    __slots__ = ("nodeid", "fd", "key", "kind", "nlookup", "users", "_table")

    def __init__(self, table: InodeTable, nodeid: int, fd: int, key: tuple[int, int], kind: int) -> None:
        self._table = table
        self.nodeid = nodeid
        self.fd = fd
        self.key = key
        self.kind = kind
        self.nlookup = 1
        self.users = 0

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def is_symlink(self) -> bool:
        return self.kind == stat.S_IFLNK

    def __enter__(self) -> Inode:
        return self

    def __exit__(self, *exc: object) -> None:
        self._table.unuse(self)


class InodeTable:
    """nodeid -> Inode, and (st_dev, st_ino) -> Inode for live nodes. Thread-safe.

    The root (`ROOT_ID`) is registered at construction and never forgotten.
    """

    def __init__(self, root_fd: int, root_stat: os.stat_result) -> None:
        self._lock = threading.Lock()
        self._next = ROOT_ID + 1
        self.root = Inode(self, ROOT_ID, root_fd, (root_stat.st_dev, root_stat.st_ino),
                          stat.S_IFMT(root_stat.st_mode))
        self._by_id: dict[int, Inode] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """Registers a lookup of the host file open as O_PATH `fd` with attributes `st`.

        Takes ownership of `fd`. If the file is already known (same st_dev and st_ino) its `nlookup`
        goes up by one and `fd` is closed; otherwise a new nodeid is made with `nlookup` 1.
        """
        key = (st.st_dev, st.st_ino)
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None:
                inode.nlookup += 1
            else:
                inode = Inode(self, self._next, fd, key, stat.S_IFMT(st.st_mode))
                self._next += 1
                self._by_id[inode.nodeid] = inode
                self._by_key[key] = inode
                return inode
        os.close(fd)
        return inode

    def ref(self, nodeid: int) -> Inode:
        """Counts one more kernel reference to known `nodeid` (a lookup of "." or ".."); EBADF if unknown."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                raise ebadf()
            inode.nlookup += 1
            return inode

    def use(self, nodeid: int) -> Inode:
        """Returns the live Inode of `nodeid`, held open until its `with` block ends; EBADF if unknown."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                raise ebadf()
            inode.users += 1
            return inode

    def unuse(self, inode: Inode) -> None:
        """Ends one `use`; closes the fd if the node was forgotten meanwhile and this was the last user."""
        with self._lock:
            inode.users -= 1
            close = inode.users == 0 and inode.nlookup <= 0
        if close:
            os.close(inode.fd)

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Takes `nlookup` kernel references from `nodeid`; at zero the node leaves the table.

        Unknown nodeids and the root are ignored: FORGET has no reply to carry an error.
        """
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None or inode is self.root:
                return
            inode.nlookup -= nlookup
            if inode.nlookup > 0:
                return
            del self._by_id[nodeid]
            del self._by_key[inode.key]
            close = inode.users == 0
        if close:
            os.close(inode.fd)

    def clear(self) -> None:
        """Forgets every node but the root (the session ended; the next one starts from the root alone)."""
        with self._lock:
            dropped = [i for i in self._by_id.values() if i is not self.root]
            for inode in dropped:
                inode.nlookup = 0
            self._by_id = {ROOT_ID: self.root}
            self._by_key = {self.root.key: self.root}
            idle = [i for i in dropped if i.users == 0]
        for inode in idle:
            os.close(inode.fd)
