"""The file handle table: the fh numbers the guest gets from open, opendir and create.

Like nodeids, fhs are the daemon's own counters, never host fds. A handle's fd is closed only when the
handle has been released *and* no request is using it, so a RELEASE racing with a READ on another
thread cannot make the read hit a closed or recycled fd.
"""

from __future__ import annotations

import errno
import os
import threading

from vhostfs.fs.inodes import ebadf
from vhostfs.fuse.filesystem import HostDirents, fs_error


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
        #: fhs of a loaded session whose file was not found again (on-error "guest-error"): EIO.
        self._lost: set[int] = set()

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
                if fh in self._lost:
                    raise fs_error(errno.EIO)
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

    def remove(self, fh: int) -> Handle | None:
        """Releases `fh` and returns its Handle: it is unknown from now on, and its fd closes once no
        request uses it. A lost fh (a moved session's, see `restore`) is forgotten and gives None."""
        with self._lock:
            handle = self._by_fh.pop(fh, None)
            if handle is None:
                if fh in self._lost:
                    self._lost.discard(fh)
                    return None
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
            self._lost.clear()
            for handle in handles:
                handle.released = True
            idle = [h for h in handles if h.users == 0]
        for handle in idle:
            os.close(handle.fd)

    # -- moving the session (fs/migration.py) ----------------------------------------------------
    def saved_handles(self) -> tuple[int, list[Handle], set[int]]:
        """The next fh, every open Handle and the lost fhs, for saving the session."""
        with self._lock:
            return self._next, list(self._by_fh.values()), set(self._lost)

    def restore(self, handles: list[Handle], lost: set[int], next_fh: int) -> None:
        """Installs the handles of a loaded session (made with `make`) and the lost fhs; the table
        must be empty. Raises ValueError for a repeated fh or one not below `next_fh`."""
        with self._lock:
            if self._by_fh or self._lost:
                raise ValueError("a session is already running")
            seen = set(lost)
            for h in handles:
                if h.fh in seen or not 0 < h.fh < next_fh:
                    raise ValueError(f"fh {h.fh} is repeated or out of range")
                seen.add(h.fh)
            self._by_fh = {h.fh: h for h in handles}
            self._lost = set(lost)
            self._next = max(self._next, next_fh)

    def make(self, fh: int, fd: int, nodeid: int, is_dir: bool) -> Handle:
        """A Handle of this table not yet installed (for `restore`)."""
        return Handle(self, fh, fd, nodeid, is_dir)
