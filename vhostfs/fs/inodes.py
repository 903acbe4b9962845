"""The inode table: the daemon's nodeids, each backed by an O_PATH fd or a file handle on the host.

A nodeid is a counter the table hands out, never an fd or a pointer, so a guest that sends a made-up or
stale nodeid gets EBADF instead of reaching whatever the number happens to name on the host.

A host file is known by (st_dev, st_ino, mount id): the same file reached by two paths is one node, and
two mounts showing the same (st_dev, st_ino) (a bind mount, or two mounts of one file system) stay two.

Each `Inode` counts two things:

- `nlookup`, the kernel's references (one per Entry sent, taken away by FORGET). At zero the node
  leaves the table: later requests for its nodeid fail, and a new lookup of the same host file gets a
  new nodeid.
- `users`, the requests using its fd right now. The fd is closed only when no request uses it, so a
  FORGET racing with a request on another thread (a confused or hostile guest) can never make that
  request use a closed fd, or worse, a recycled fd number that now names some other file.

File handles (`file_handles` "prefer" or "mandatory", virtiofsd's --inode-file-handles): a node then
holds a kernel file handle (filehandles.py) and its O_PATH fd only while requests use it, plus in a
bounded cache of recently used idle nodes; `use` reopens the fd from the handle when it was closed,
and checks that the reopened file is the node's own (same st_dev, st_ino, mount id and type). So the
daemon can know far more files than it may hold fds. With "prefer", a node whose file system makes no
handles keeps its fd; with "mandatory" its lookup fails.

The fd budget: every long-lived fd the daemon opens for the guest (nodes, open files) goes through
`open_fd`, which answers EMFILE once the process holds `fd_budget` fds, after first closing the idle
cached ones. The fds between the budget and RLIMIT_NOFILE stay free for the daemon itself (vhost-user
messages carry fds, and requests open short-lived ones), so running out is an error reply for the
guest rather than a failure inside the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable

from vhostfs import native
from vhostfs.fs.filehandles import INODE_FILE_HANDLES, FileHandle, MountFds, make_handle, mount_id, probe
from vhostfs.fuse.filesystem import ROOT_ID, fs_error

log = logging.getLogger(__name__)

_O_PATH = os.O_PATH | os.O_CLOEXEC
_FD_ERRORS = (errno.EMFILE, errno.ENFILE)


def ebadf() -> OSError:
    """The error for an unknown or forgotten nodeid or file handle."""
    return fs_error(errno.EBADF)


def default_fd_budget() -> int:
    """The fd budget for the current RLIMIT_NOFILE: the soft limit less a reserve for the daemon
    itself of 64 fds (a quarter of the limit when that is smaller: the fds the daemon opens at start
    must stay below the budget too)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft - min(64, soft // 4)


class Inode:
    """One host file the guest knows by `nodeid`: its O_PATH fd, (st_dev, st_ino, mount id) key, file
    type and, with file handles, its `handle`.

    `kind` is the S_IFMT part of st_mode; the type of an inode never changes, so checks such as "never
    open a FIFO" use it without another stat. `fd` is valid only while the node is in use: get it from
    `InodeTable.use` and use it as a context manager, so that it stays open while the `with` block runs
    (a node with a handle has fd -1 while it is closed).
    """

    __slots__ = ("nodeid", "fd", "key", "kind", "handle", "nlookup", "users", "_table")

    def __init__(self, table: InodeTable, nodeid: int, fd: int, key: tuple[int, int, int], kind: int,
                 handle: FileHandle | None = None) -> None:
        self._table = table
        self.nodeid = nodeid
        self.fd = fd
        self.key = key
        self.kind = kind
        self.handle = handle
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
    """nodeid -> Inode, and (st_dev, st_ino, mount id) -> Inode for live nodes. Thread-safe.

    The root (`ROOT_ID`, the O_PATH directory `root_fd`) is registered at construction, never
    forgotten and always open. `file_handles` is "never", "prefer" or "mandatory" (see the module doc):
    "mandatory" raises OSError here when the share's file system cannot make and reopen file handles
    (no support, or no CAP_DAC_READ_SEARCH), "prefer" then falls back to fds. `fd_budget` defaults to
    `default_fd_budget()`, `fd_cache` (idle nodes kept open) to a quarter of it, at most 4096.
    `proc_fd` is an fd of /proc, for the mount id fallback after a chroot.
    """

    def __init__(self, root_fd: int, root_stat: os.stat_result, *, file_handles: str = "never",
                 fd_budget: int | None = None, fd_cache: int | None = None,
                 proc_fd: int | None = None) -> None:
        if file_handles not in INODE_FILE_HANDLES:
            raise ValueError(f"inode file handles must be one of {', '.join(INODE_FILE_HANDLES)}, "
                             f"not {file_handles!r}")
        self._lock = threading.Lock()
        self._proc_fd = proc_fd
        self._budget = default_fd_budget() if fd_budget is None else fd_budget
        self._cache_size = max(1, min(4096, self._budget // 4)) if fd_cache is None else fd_cache
        self._idle: OrderedDict[Inode, None] = OrderedDict()
        self._mounts = MountFds()
        self._next = ROOT_ID + 1
        root_mnt = mount_id(root_fd, proc_fd)
        if file_handles != "never":
            try:
                probe(root_fd)
            except OSError as e:
                if file_handles == "mandatory":
                    raise
                log.warning("inode file handles not used, the share keeps one fd per inode: %s", e.strerror)
                file_handles = "never"
        self._mode = file_handles
        if file_handles != "never":
            self._mounts.acquire(root_mnt, root_fd, stat.S_IFDIR)
        self.root = Inode(self, ROOT_ID, root_fd, (root_stat.st_dev, root_stat.st_ino, root_mnt),
                          stat.S_IFMT(root_stat.st_mode))
        self._by_id: dict[int, Inode] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int, int], Inode] = {self.root.key: self.root}

    @property
    def file_handles(self) -> str:
        """The mode in effect: "never" when "prefer" found no file handle support."""
        return self._mode

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def close(self) -> None:
        """Forgets every node and closes the root and the mount fds; the table is unusable afterwards.

        A request still using the root (a file system unmounted under a running session) keeps its fd
        until it ends, as any node's: the fd number cannot meanwhile be reused for another file."""
        self.clear()
        if self._mode != "never":
            self._mounts.release(self.root.key[2])
        with self._lock:
            root = self.root
            root.nlookup = 0
            fd = -1
            if not root.users:
                fd, root.fd = root.fd, -1
        if fd >= 0:
            os.close(fd)

    # -- the fd budget ----------------------------------------------------------------------------
    def open_fd(self, opener: Callable[[], int], *, keep: bool = False) -> int:
        """Runs `opener` (which opens and returns one fd) within the fd budget.

        The kernel hands out the lowest free fd number, so an fd numbered at or above the budget means
        that all the budget's fds are taken: the idle cached node fds are then closed, and the open is
        tried again. Still over budget, the fd is closed and EMFILE raised, as it is when `opener`
        itself fails with EMFILE or ENFILE twice. With `keep` (an open that cannot be repeated, such as
        an exclusive create) an fd over budget is returned all the same, once the cache is emptied.
        """
        for retry in (False, True):
            try:
                fd = opener()
            except OSError as e:
                if e.errno not in _FD_ERRORS or retry:
                    raise
                self.shrink()
                continue
            if fd < self._budget:
                return fd
            self.shrink()
            if keep:
                return fd
            os.close(fd)
        raise fs_error(errno.EMFILE)

    def shrink(self) -> int:
        """Closes the fds of all idle nodes that hold file handles; returns how many were closed."""
        with self._lock:
            idle = list(self._idle)
            self._idle.clear()
            fds = [i.fd for i in idle]
            for inode in idle:
                inode.fd = -1
        for fd in fds:
            os.close(fd)
        return len(fds)

    def _park(self, inode: Inode) -> list[int]:
        """Puts idle open `inode` (which holds a handle) at the new end of the cache; with the lock held.
        Returns the fds of the nodes pushed out of the cache, for the caller to close after unlocking."""
        self._idle[inode] = None
        self._idle.move_to_end(inode)
        evicted = []
        while len(self._idle) > self._cache_size:
            old, _ = self._idle.popitem(last=False)
            evicted.append(old.fd)
            old.fd = -1
        return evicted

    # -- nodes --------------------------------------------------------------------------------------
    def _handle_for(self, fd: int, kind: int, mnt: int) -> FileHandle | None:
        """The file handle for a new node open as `fd`, its mount's fd acquired; None with "prefer"
        when there is none (the node keeps its fd), the error with "mandatory"."""
        try:
            handle = make_handle(fd)
            if handle.mount_id != mnt:
                raise fs_error(errno.ESTALE)
            if not self._mounts.acquire(mnt, fd, kind):
                raise OSError(errno.EOPNOTSUPP, "no directory open on the file's mount")
        except OSError:
            if self._mode == "mandatory":
                raise
            return None
        return handle

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """Registers a lookup of the host file open as O_PATH `fd` with attributes `st`.

        Takes ownership of `fd`. If the file is already known (same st_dev, st_ino and mount) its
        `nlookup` goes up by one and `fd` is closed, or kept as its cached fd if it had none; otherwise
        a new nodeid is made with `nlookup` 1. With "mandatory" file handles, raises the error of a
        file that has no handle (and closes `fd`).
        """
        try:
            key = (st.st_dev, st.st_ino, mount_id(fd, self._proc_fd))
        except BaseException:
            os.close(fd)
            raise
        kind = stat.S_IFMT(st.st_mode)
        handle = None
        if self._mode != "never" and self._known(key) is None:
            try:
                handle = self._handle_for(fd, kind, key[2])
            except BaseException:
                os.close(fd)
                raise
        close: list[int] = []
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None:
                inode.nlookup += 1
                if inode.fd < 0:
                    # An idle node's new cached fd; or, while a `use` is reopening it, the fd that
                    # reopen will find and take instead of its own.
                    inode.fd = fd
                    if not inode.users:
                        close = self._park(inode)
                else:
                    close.append(fd)
                if handle is not None:
                    self._mounts.release(key[2])
            else:
                inode = Inode(self, self._next, fd, key, kind, handle)
                self._next += 1
                self._by_id[inode.nodeid] = inode
                self._by_key[key] = inode
                if handle is not None:
                    close = self._park(inode)
        for old in close:
            os.close(old)
        return inode

    def _known(self, key: tuple[int, int, int]) -> Inode | None:
        with self._lock:
            return self._by_key.get(key)

    def ref_known(self, key: tuple[int, int, int]) -> Inode | None:
        """Counts one more kernel reference to the node of host file `key` (st_dev, st_ino, mount id)
        if the table knows it; None otherwise (then `add` an fd of the file)."""
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None:
                inode.nlookup += 1
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
        """Returns the live Inode of `nodeid` with its fd open until its `with` block ends; EBADF if
        unknown. A node whose fd was closed is reopened from its handle: ESTALE when its file is gone
        (or the handle reached another file), EMFILE over the fd budget."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                raise ebadf()
            inode.users += 1
            self._idle.pop(inode, None)
            if inode.fd >= 0:
                return inode
        # Reopened without the lock (open_fd may shrink the cache); users > 0 keeps the node's fd
        # from being closed by anyone else meanwhile, and a concurrent reopen of it is dropped below.
        try:
            fd = self._reopen(inode)
        except BaseException:
            self.unuse(inode)
            raise
        with self._lock:
            if inode.fd < 0:
                inode.fd = fd
                fd = -1
        if fd >= 0:
            os.close(fd)
        return inode

    def _reopen(self, inode: Inode) -> int:
        """A new O_PATH fd of `inode` from its handle, checked to be the same file."""
        handle = inode.handle
        assert handle is not None
        mount_fd = self._mounts.fd(handle.mount_id)
        fd = self.open_fd(
            lambda: native.open_by_handle_at(mount_fd, handle.handle_type, handle.data, _O_PATH))
        try:
            st = os.stat(fd)
            same = ((st.st_dev, st.st_ino, mount_id(fd, self._proc_fd)) == inode.key
                    and stat.S_IFMT(st.st_mode) == inode.kind)
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            raise fs_error(errno.ESTALE)
        return fd

    def unuse(self, inode: Inode) -> None:
        """Ends one `use`. When no request uses the node any more, its fd is closed if the node was
        forgotten meanwhile, or goes to the idle cache if it holds a handle."""
        close: list[int] = []
        with self._lock:
            inode.users -= 1
            if inode.users or inode.fd < 0:
                return
            if inode.nlookup <= 0:
                close.append(inode.fd)
                inode.fd = -1
            elif inode.handle is not None:
                close = self._park(inode)
        for fd in close:
            os.close(fd)

    def _drop(self, inode: Inode) -> int:
        """Takes forgotten `inode` out of the cache and its mount; with the lock held. Returns the fd
        to close after unlocking, or -1 when it stays open for a request still using it (or is closed)."""
        self._idle.pop(inode, None)
        if inode.handle is not None:
            self._mounts.release(inode.handle.mount_id)
        if inode.users or inode.fd < 0:
            return -1
        fd, inode.fd = inode.fd, -1
        return fd

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
            fd = self._drop(inode)
        if fd >= 0:
            os.close(fd)

    def clear(self) -> None:
        """Forgets every node but the root (the session ended; the next one starts from the root alone)."""
        with self._lock:
            dropped = [i for i in self._by_id.values() if i is not self.root]
            self._by_id = {ROOT_ID: self.root}
            self._by_key = {self.root.key: self.root}
            fds = []
            for inode in dropped:
                inode.nlookup = 0
                fds.append(self._drop(inode))
        for fd in fds:
            if fd >= 0:
                os.close(fd)
