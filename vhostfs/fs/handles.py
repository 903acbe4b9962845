"""The file handle table: the fh numbers the guest gets from open, opendir and create.

Like nodeids, fhs are the daemon's own counters, never host fds. A handle's fd is closed only when the
handle has been released *and* no request is using it, so a RELEASE racing with a READ on another
thread cannot make the read hit a closed or recycled fd.
"""

from __future__ import annotations

import os
import threading

from vhostfs.fs.inodes import ebadf
from vhostfs.fuse.filesystem import HostDirents


class Handle:
    """An open host file or directory: its fd, the nodeid it was opened from, and a listing for dirs.

    `listing` is the directory snapshot readdir serves cookies from (None until the first readdir, and
    always None for files); `lock` serialises readdir calls on one directory handle.
    """

    __slots__ = ("fh", "fd", "nodeid", "is_dir", "listing", "lock", "users", "released", "_table")

    def __init__(self, table: HandleTable, fh: int, fd: int, nodeid: int, is_dir: bool) -> None:
        self._table = table
        self.fh = fh
        self.fd = fd
        self.nodeid = nodeid
        self.is_dir = is_dir
        self.listing: HostDirents | None = None
        self.lock = threading.Lock() if is_dir else None
        self.users = 0
        self.released = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._table.unuse(self)


class HandleTable:
    """fh -> Handle. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self._by_fh: dict[int, Handle] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_fh)

    def add(self, fd: int, nodeid: int, is_dir: bool) -> int:
        """Takes ownership of the open host `fd` and returns its new fh."""
        with self._lock:
            fh = self._next
            self._next += 1
            self._by_fh[fh] = Handle(self, fh, fd, nodeid, is_dir)
        return fh

    def use(self, fh: int) -> Handle:
        """Returns the Handle of `fh`, kept open until its `with` block ends; EBADF if unknown."""
        with self._lock:
            handle = self._by_fh.get(fh)
            if handle is None:
                raise ebadf()
            handle.users += 1
            return handle

    def unuse(self, handle: Handle) -> None:
        """Ends one `use`; closes the fd if the handle was released meanwhile and this was the last user."""
        with self._lock:
            handle.users -= 1
            close = handle.users == 0 and handle.released
        if close:
            os.close(handle.fd)

    def remove(self, fh: int) -> Handle:
        """Releases `fh` and returns its Handle: it is unknown from now on, and its fd closes once no
        request uses it."""
        with self._lock:
            handle = self._by_fh.pop(fh, None)
            if handle is None:
                raise ebadf()
            handle.released = True
            close = handle.users == 0
        if close:
            os.close(handle.fd)
        return handle

    def clear(self) -> None:
        """Releases every handle."""
        with self._lock:
            handles = list(self._by_fh.values())
            self._by_fh.clear()
            for handle in handles:
                handle.released = True
            idle = [h for h in handles if h.users == 0]
        for handle in idle:
            os.close(handle.fd)
