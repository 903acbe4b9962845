"""Guest file locks held on the host: POSIX record locks as OFD locks, flock on the handle's fd.

POSIX record locks (fcntl F_SETLK and friends in the guest) belong to a *lock owner*: the guest
kernel sends one 64-bit owner id per process (per open file for the guest's own OFD locks). The host
must make locks of different owners conflict and locks of one owner merge, whichever guest fd they
came through. Host OFD locks (fcntl(2) F_OFD_SETLK, Linux 3.15) belong to an open file description,
so the table opens one host open file description per (nodeid, owner) and takes that owner's locks
on it. They then conflict with other guest owners and with host processes' locks as on one kernel.

Lifetime, as the guest kernel expects (FUSE protocol, fuse_flush/fuse_release in linux/fs/fuse):
- FLUSH, sent on every close(2) in the guest, carries the closing process's owner; closing any fd of a
  file drops all of that process's POSIX locks on it, so the owner's description is closed then.
- RELEASE, sent when the last reference to a guest open file goes, drops the descriptions used
  through that handle that are still open (the guest's own OFD locks, whose owner is the open file).

flock(2) locks belong to a guest open file, which is exactly one FUSE handle, so they are taken with
flock(2) on the handle's own host fd and go away with it.

A blocking request (SETLKW, and flock without LOCK_NB) waits as long as the lock is held, on the
thread the transport gave it (vhostfs.device serves such requests apart from the queue's worker, so
the request that releases the lock still gets through). The wait retries the non-blocking call with
growing pauses rather than sleeping in F_OFD_SETLKW, because a thread blocked in the kernel cannot be
woken from Python, and the wait must end on demand:
- EINTR when the request's interrupt event (`Context.interrupt`) is set: FUSE_INTERRUPT, the session
  ending, the queue stopping;
- EBADF when the description it waits on is dropped (FLUSH of its owner, RELEASE of its handle, the
  session's `clear`), as fcntl(2) answers a lock request that raced with close(2);
- EDEADLK after `wait_limit` seconds when a limit is set (by default there is none).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time

from vhostfs.fuse.filesystem import fs_error

#: fcntl(2) commands for open-file-description locks (<fcntl.h>, Linux).
F_OFD_GETLK = 36
F_OFD_SETLK = 37
F_OFD_SETLKW = 38
#: The end offset FUSE uses for "to the end of the file" (the kernel's OFFSET_MAX).
OFFSET_MAX = (1 << 63) - 1
LOCK_TYPES = (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK)

# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid, padding.
FLOCK = struct.Struct("=hh4xqqi4x")
assert FLOCK.size == 32

_SLEEP_FIRST = 0.001
_SLEEP_MAX = 0.05


def _range(start: int, end: int) -> tuple[int, int]:
    """FUSE's inclusive [start, end] as flock's (l_start, l_len); EINVAL for an inverted range."""
    if not 0 <= start <= end <= OFFSET_MAX:
        raise fs_error(errno.EINVAL)
    return start, 0 if end == OFFSET_MAX else end - start + 1


def _end(start: int, length: int) -> int:
    return OFFSET_MAX if length == 0 else start + length - 1


def parse_fdinfo_locks(text: str) -> list[tuple[str, int, int, int]]:
    """The locks that /proc/PID/fdinfo/FD lists as held through that open file ("lock:" lines, as
    fs/locks.c lock_get_status prints them): (class, type, start, end) each, class being "OFDLCK",
    "POSIX" or "FLOCK", type F_RDLCK or F_WRLCK, end inclusive (OFFSET_MAX for "EOF"). Lines of
    waiting requests ("->") and of other kinds (leases) are skipped."""
    out = []
    for line in text.splitlines():
        if not line.startswith("lock:") or "->" in line:
            continue
        words = line[5:].split()
        cls = next((w for w in words if w in ("OFDLCK", "POSIX", "FLOCK")), None)
        kind = next((w for w in words if w in ("READ", "WRITE")), None)
        if cls is None or kind is None or len(words) < 2:
            continue
        try:
            start = int(words[-2])
            end = OFFSET_MAX if words[-1] == "EOF" else int(words[-1])
        except ValueError:
            continue
        out.append((cls, fcntl.F_WRLCK if kind == "WRITE" else fcntl.F_RDLCK, start, end))
    return out


def wait_until(attempt, interrupt: threading.Event | None, gone, wait_limit: float | None) -> None:
    """Calls `attempt()` until it stops raising EAGAIN/EACCES (see the module doc).

    Raises EINTR once `interrupt` is set, EBADF once `gone()` is true (checked after a successful
    attempt too: a lock taken on a dropped description is not held), EDEADLK after `wait_limit`
    seconds unless it is None.
    """
    deadline = None if wait_limit is None else time.monotonic() + wait_limit
    pause = _SLEEP_FIRST
    while True:
        if interrupt is not None and interrupt.is_set():
            raise fs_error(errno.EINTR)
        try:
            attempt()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        else:
            if gone():
                raise fs_error(errno.EBADF)
            return
        if gone():
            raise fs_error(errno.EBADF)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise fs_error(errno.EDEADLK)
            pause = min(pause, left)
        if interrupt is not None:
            interrupt.wait(pause)
        else:
            time.sleep(pause)
        pause = min(pause * 2, _SLEEP_MAX)


class _FlockWait:
    """A flock request waiting on handle `fh`; `gone` once the handle is released."""

    __slots__ = ("fh", "gone")

    def __init__(self, fh: int) -> None:
        self.fh = fh
        self.gone = False


class _OwnerFile:
    """The host open file description holding one guest owner's POSIX locks on one node."""

    __slots__ = ("fd", "pid", "fhs", "users", "closed")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pid = 0
        self.fhs: set[int] = set()
        self.users = 0
        self.closed = False


class LockTable:
    """(nodeid, owner) -> host open file description with that owner's OFD locks. Thread-safe.

    `reopen(fd, flags)` opens a new description of the file open as `fd` (the passthrough reopens
    through /proc/self/fd). `wait_limit`, if not None, bounds a blocking request, in seconds.
    Also serves flock(2) on a handle's own fd (`flock`), so that RELEASE ends its waits too.
    """

    def __init__(self, reopen, wait_limit: float | None = None) -> None:
        self._reopen = reopen
        self.wait_limit = wait_limit
        self._lock = threading.Lock()
        self._owners: dict[tuple[int, int], _OwnerFile] = {}
        self._flock_waits: set[_FlockWait] = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._owners)

    def _use(self, nodeid: int, owner: int, fh: int, fd: int) -> _OwnerFile:
        key = (nodeid, owner)
        with self._lock:
            entry = self._owners.get(key)
            if entry is not None:
                entry.users += 1
                entry.fhs.add(fh)
                return entry
        # Read-write so that both lock types can be taken on it; the guest kernel has already
        # refused a write lock through an fd not open for writing. A file the daemon may not open
        # for writing still takes read locks.
        try:
            new_fd = self._reopen(fd, os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.ETXTBSY, errno.EPERM):
                raise
            new_fd = self._reopen(fd, os.O_RDONLY)
        with self._lock:
            entry = self._owners.get(key)
            if entry is None:
                entry = self._owners[key] = _OwnerFile(new_fd)
                new_fd = -1
            entry.users += 1
            entry.fhs.add(fh)
        if new_fd >= 0:
            os.close(new_fd)  # another thread made the owner's description first
        return entry

    def _unuse(self, entry: _OwnerFile) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.users == 0 and entry.closed
        if close:
            os.close(entry.fd)

    def _drop(self, entries: list[_OwnerFile]) -> None:
        """Closes descriptions already taken out of the table (their locks go with them)."""
        with self._lock:
            idle = []
            for entry in entries:
                entry.closed = True
                if entry.users == 0:
                    idle.append(entry)
        for entry in idle:
            os.close(entry.fd)

    def getlk(self, nodeid: int, owner: int, fh: int, fd: int, start: int, end: int,
              kind: int) -> tuple[int, int, int, int]:
        """F_OFD_GETLK for `owner`: (start, end, type, pid) of a conflicting lock, or type F_UNLCK.

        The pid is the guest pid that took the lock when one other guest owner alone holds it, and
        0 otherwise (a host process's lock, or several readers).
        """
        if kind not in LOCK_TYPES:
            raise fs_error(errno.EINVAL)
        l_start, l_len = _range(start, end)
        entry = self._use(nodeid, owner, fh, fd)
        try:
            res = fcntl.fcntl(entry.fd, F_OFD_GETLK, FLOCK.pack(kind, os.SEEK_SET, l_start, l_len, 0))
        finally:
            self._unuse(entry)
        r_type, _, r_start, r_len, _ = FLOCK.unpack(res)
        if r_type == fcntl.F_UNLCK:
            return start, end, fcntl.F_UNLCK, 0
        return r_start, _end(r_start, r_len), r_type, self._holder_pid(nodeid, owner, r_type, r_start, r_len)

    def _holder_pid(self, nodeid: int, owner: int, kind: int, start: int, length: int) -> int:
        # An owner X holds the conflicting lock if asking from X's description finds no conflict: a
        # write lock excludes everyone else from the range, so X's read probe is free exactly when X
        # holds it; for a read lock, X's write probe is free only when X is its only holder.
        probe = fcntl.F_RDLCK if kind == fcntl.F_WRLCK else fcntl.F_WRLCK
        with self._lock:
            others = [e for (n, o), e in self._owners.items() if n == nodeid and o != owner and not e.closed]
            for e in others:
                e.users += 1
        pid = 0
        try:
            for e in others:
                res = fcntl.fcntl(e.fd, F_OFD_GETLK, FLOCK.pack(probe, os.SEEK_SET, start, length, 0))
                if FLOCK.unpack(res)[0] == fcntl.F_UNLCK:
                    pid = e.pid
                    break
        finally:
            for e in others:
                self._unuse(e)
        return pid

    def setlk(self, nodeid: int, owner: int, fh: int, fd: int, start: int, end: int, kind: int,
              pid: int, wait: bool, interrupt: threading.Event | None = None) -> None:
        """F_OFD_SETLK of [start, end] for `owner` (EAGAIN on conflict); `wait` waits until the lock
        is free, ended by `interrupt` or by the owner's description being dropped (see module doc)."""
        if kind not in LOCK_TYPES:
            raise fs_error(errno.EINVAL)
        l_start, l_len = _range(start, end)
        if kind == fcntl.F_UNLCK:
            with self._lock:
                if (nodeid, owner) not in self._owners:
                    return  # nothing held: unlocking is a no-op, as on the host
        entry = self._use(nodeid, owner, fh, fd)
        arg = FLOCK.pack(kind, os.SEEK_SET, l_start, l_len, 0)
        try:
            if wait:
                wait_until(lambda: fcntl.fcntl(entry.fd, F_OFD_SETLK, arg), interrupt,
                           lambda: entry.closed, self.wait_limit)
            else:
                fcntl.fcntl(entry.fd, F_OFD_SETLK, arg)
            if kind != fcntl.F_UNLCK:
                entry.pid = pid
        finally:
            self._unuse(entry)

    def flock(self, fh: int, fd: int, op: int, wait: bool, interrupt: threading.Event | None = None) -> None:
        """flock(2) `op` (LOCK_SH, LOCK_EX, LOCK_UN) on `fd`, handle `fh`'s own; EAGAIN on conflict
        unless `wait`, which waits as `setlk` does and ends with EBADF when `fh` is released."""
        if not wait:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        waiter = _FlockWait(fh)
        with self._lock:
            self._flock_waits.add(waiter)
        try:
            wait_until(lambda: fcntl.flock(fd, op | fcntl.LOCK_NB), interrupt, lambda: waiter.gone,
                       self.wait_limit)
        finally:
            with self._lock:
                self._flock_waits.discard(waiter)

    def flush(self, nodeid: int, owner: int) -> None:
        """Drops every POSIX lock of `owner` on `nodeid` (a close(2) by that guest process)."""
        with self._lock:
            entry = self._owners.pop((nodeid, owner), None)
        if entry is not None:
            self._drop([entry])

    def release(self, fh: int) -> None:
        """Drops the descriptions still open that were used through handle `fh` (it is being released)."""
        with self._lock:
            keys = [k for k, e in self._owners.items() if fh in e.fhs]
            entries = [self._owners.pop(k) for k in keys]
            for waiter in self._flock_waits:
                if waiter.fh == fh:
                    waiter.gone = True
        self._drop(entries)

    def clear(self) -> None:
        """Drops every lock (the session ended)."""
        with self._lock:
            entries = list(self._owners.values())
            self._owners.clear()
            for waiter in self._flock_waits:
                waiter.gone = True
        self._drop(entries)

    def saved(self) -> list[tuple[int, int, int, int, list[int]]]:
        """(nodeid, owner, pid, host fd, fhs used) of every owner's description, for saving the session
        (the caller reads the locks each holds from fdinfo; no request runs meanwhile)."""
        with self._lock:
            return [(n, o, e.pid, e.fd, sorted(e.fhs)) for (n, o), e in self._owners.items()
                    if not e.closed]
