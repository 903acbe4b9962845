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

Without file handles ("never", or "prefer" where the share makes none), each node remembers where it
was last seen: its parent's nodeid and its name there (kept up to date by lookups, renames and
unlinks through the table's `moved` and `removed`). Such a node keeps its O_PATH fd while fds are
plentiful; when the budget runs short (`shrink`), the least recently used of the idle ones that have
no open file (`pin`) are closed, and `use` finds them again by opening the name in the parent (itself
found again the same way if need be), checked like a handle's reopen to be the node's own file:
ESTALE when the name is gone or now names another file. So a walk over a tree far larger than the
fd limit never runs out of fds, whatever the mode; a node with an open file, or one whose name is not
known (reached through ".." or an unnamed O_TMPFILE), keeps its fd.

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
# How far `use` climbs parents to find a node again by name (deeper, or a loop: ESTALE).
_MAX_NAME_DEPTH = 4096


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

    `parent` and `name` say where the node was last seen (parent nodeid, name in it), None when not
    known; `opens` counts the open files of the node (`InodeTable.pin`).
    """

    __slots__ = ("nodeid", "fd", "key", "kind", "handle", "nlookup", "users", "parent", "name", "opens",
                 "_table")

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
        self.parent: int | None = None
        self.name: bytes | None = None
        self.opens = 0

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
        # Idle nodes without a handle that can be found again by name, least recently used first.
        self._idle_named: OrderedDict[Inode, None] = OrderedDict()
        self._by_location: dict[tuple[int, bytes], Inode] = {}
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
        #: nodeid -> nlookup of nodes a loaded session knows but whose file was not found again
        #: (migration with on-error "guest-error"): their requests get EIO until they are forgotten.
        self._lost: dict[int, int] = {}

    @property
    def file_handles(self) -> str:
        """The mode in effect: "never" when "prefer" found no file handle support."""
        return self._mode

    def describe(self) -> str:
        """How nodes are held, for the log at start."""
        if self._mode == "never":
            return (f"inodes are held by O_PATH fds, at most {self._budget} open: idle ones are closed "
                    "when fds run short and found again by parent and name")
        return (f"inodes are held by file handles ({self._mode}), with {self._cache_size} idle fds cached; "
                "a file system without handles keeps fds, found again by parent and name")

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
        """Closes the fds of all idle nodes that hold file handles, and of the least recently used
        eighth of the budget (at least 16) of the idle ones found again by name; returns how many were
        closed."""
        with self._lock:
            idle = list(self._idle)
            self._idle.clear()
            named = self._idle_named
            for _ in range(min(len(named), max(16, self._budget // 8))):
                idle.append(named.popitem(last=False)[0])
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

    def _rest(self, inode: Inode) -> list[int]:
        """Files idle open `inode` (no request uses it) where it may be closed later; with the lock held.
        Returns fds to close after unlocking."""
        if inode.handle is not None:
            return self._park(inode)
        if inode.parent is not None and not inode.opens:
            self._idle_named[inode] = None
            self._idle_named.move_to_end(inode)
        return []

    # -- where nodes were seen ------------------------------------------------------------------------
    def _locate(self, inode: Inode, parent: int | None, name: bytes | None) -> None:
        """Records that `inode` was seen as `name` in `parent`; with the lock held."""
        if parent is None or name is None or inode is self.root:
            return
        if inode.parent == parent and inode.name == name:
            return
        self._unlocate(inode)
        old = self._by_location.get((parent, name))
        if old is not None and old is not inode:
            self._forget_location(old)
        inode.parent, inode.name = parent, name
        self._by_location[(parent, name)] = inode

    def _unlocate(self, inode: Inode) -> None:
        if inode.parent is not None and self._by_location.get((inode.parent, inode.name)) is inode:
            del self._by_location[(inode.parent, inode.name)]

    def _forget_location(self, inode: Inode) -> None:
        """`inode` is no longer where it was seen: it keeps its fd (if open) until seen again."""
        self._unlocate(inode)
        inode.parent = inode.name = None
        self._idle_named.pop(inode, None)

    def moved(self, parent: int, name: bytes, newparent: int, newname: bytes, exchange: bool = False) -> None:
        """`name` in `parent` was renamed to `newname` in `newparent` (with `exchange`, the two swapped)."""
        with self._lock:
            node = self._by_location.get((parent, name))
            other = self._by_location.get((newparent, newname))
            for inode in (node, other):
                if inode is not None:
                    self._unlocate(inode)
                    inode.parent = inode.name = None
            if node is not None:
                self._locate(node, newparent, newname)
            if other is not None:
                if exchange:
                    self._locate(other, parent, name)
                else:
                    self._idle_named.pop(other, None)

    def removed(self, parent: int, name: bytes) -> None:
        """`name` in `parent` was unlinked (or rmdir'ed)."""
        with self._lock:
            inode = self._by_location.get((parent, name))
            if inode is not None:
                self._forget_location(inode)

    def pin(self, nodeid: int) -> None:
        """Counts one more open file of `nodeid`: a node with open files keeps its fd (it may be
        unlinked, and then not found again by name). EBADF if unknown."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                raise ebadf()
            inode.opens += 1
            self._idle_named.pop(inode, None)

    def unpin(self, nodeid: int) -> None:
        """Ends one `pin` (an unknown nodeid, forgotten meanwhile, is ignored)."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None or inode.opens <= 0:
                return
            inode.opens -= 1
            if not inode.opens and not inode.users and inode.fd >= 0 and inode.handle is None:
                self._rest(inode)

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

    def add(self, fd: int, st: os.stat_result, parent: int | None = None, name: bytes | None = None,
            mnt: int | None = None) -> Inode:
        """Registers a lookup of the host file open as O_PATH `fd` with attributes `st`, seen as `name`
        in directory node `parent` when they are given; `mnt` is the file's mount id if the caller
        knows it (asked of the kernel otherwise).

        Takes ownership of `fd`. If the file is already known (same st_dev, st_ino and mount) its
        `nlookup` goes up by one and `fd` is closed, or kept as its cached fd if it had none; otherwise
        a new nodeid is made with `nlookup` 1. With "mandatory" file handles, raises the error of a
        file that has no handle (and closes `fd`).
        """
        try:
            key = (st.st_dev, st.st_ino, mount_id(fd, self._proc_fd) if mnt is None else mnt)
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
                self._locate(inode, parent, name)
                if inode.fd < 0:
                    # An idle node's new cached fd; or, while a `use` is reopening it, the fd that
                    # reopen will find and take instead of its own.
                    inode.fd = fd
                    if not inode.users:
                        close = self._rest(inode)
                else:
                    close.append(fd)
                if handle is not None:
                    self._mounts.release(key[2])
            else:
                inode = Inode(self, self._next, fd, key, kind, handle)
                self._next += 1
                self._by_id[inode.nodeid] = inode
                self._by_key[key] = inode
                self._locate(inode, parent, name)
                close = self._rest(inode)
        for old in close:
            os.close(old)
        return inode

    def _known(self, key: tuple[int, int, int]) -> Inode | None:
        with self._lock:
            return self._by_key.get(key)

    def ref_known(self, key: tuple[int, int, int], parent: int | None = None,
                  name: bytes | None = None) -> Inode | None:
        """Counts one more kernel reference to the node of host file `key` (st_dev, st_ino, mount id)
        if the table knows it, seen as `name` in `parent` if given; None otherwise (then `add` an fd
        of the file)."""
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None:
                inode.nlookup += 1
                self._locate(inode, parent, name)
            return inode

    def ref_known_many(self, keys: list[tuple[int, int, int] | None], parent: int,
                       names: list[bytes]) -> list[Inode | None]:
        """`ref_known` of each key (None: not asked) with its name in `parent`, under one lock."""
        out: list[Inode | None] = []
        with self._lock:
            by_key = self._by_key
            for key, name in zip(keys, names, strict=True):
                inode = by_key.get(key) if key is not None else None
                if inode is not None:
                    inode.nlookup += 1
                    if inode.parent != parent or inode.name != name:
                        self._locate(inode, parent, name)
                out.append(inode)
        return out

    def ref(self, nodeid: int) -> Inode:
        """Counts one more kernel reference to known `nodeid` (a lookup of "." or ".."); EBADF if unknown."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                raise fs_error(errno.EIO) if nodeid in self._lost else ebadf()
            inode.nlookup += 1
            return inode

    def use(self, nodeid: int, _depth: int = 0) -> Inode:
        """Returns the live Inode of `nodeid` with its fd open until its `with` block ends; EBADF if
        unknown. A node whose fd was closed is reopened from its handle, or by its name in its parent:
        ESTALE when its file is gone (or the handle or name reached another file), EMFILE over the fd
        budget."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                raise fs_error(errno.EIO) if nodeid in self._lost else ebadf()
            inode.users += 1
            self._idle.pop(inode, None)
            self._idle_named.pop(inode, None)
            if inode.fd >= 0:
                return inode
            location = (inode.parent, inode.name)
        # Reopened without the lock (open_fd may shrink the cache); users > 0 keeps the node's fd
        # from being closed by anyone else meanwhile, and a concurrent reopen of it is dropped below.
        try:
            fd = self._reopen(inode) if inode.handle is not None else self._reopen_named(inode, location,
                                                                                         _depth)
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
        return self._check_same(inode, fd)

    def _reopen_named(self, inode: Inode, location: tuple[int | None, bytes | None], depth: int) -> int:
        """A new O_PATH fd of `inode` by its name in its parent (`location`), checked to be the same file."""
        parent, name = location
        if parent is None or name is None or depth >= _MAX_NAME_DEPTH:
            raise fs_error(errno.ESTALE)
        try:
            parent_inode = self.use(parent, depth + 1)
        except OSError as e:
            raise fs_error(errno.ESTALE if e.errno == errno.EBADF else e.errno) from None
        with parent_inode:
            try:
                fd = self.open_fd(lambda: os.open(name, _O_PATH | os.O_NOFOLLOW, dir_fd=parent_inode.fd))
            except FileNotFoundError:
                raise fs_error(errno.ESTALE) from None
        return self._check_same(inode, fd)

    def _check_same(self, inode: Inode, fd: int) -> int:
        """`fd` if it is `inode`'s own file (closed, and ESTALE, if not)."""
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
            else:
                close = self._rest(inode)
        for fd in close:
            os.close(fd)

    def _drop(self, inode: Inode) -> int:
        """Takes forgotten `inode` out of the cache and its mount; with the lock held. Returns the fd
        to close after unlocking, or -1 when it stays open for a request still using it (or is closed)."""
        self._idle.pop(inode, None)
        self._forget_location(inode)
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
            if inode is None and nodeid in self._lost:
                left = self._lost[nodeid] - nlookup
                if left > 0:
                    self._lost[nodeid] = left
                else:
                    del self._lost[nodeid]
                return
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
            self._lost.clear()
            self._by_id = {ROOT_ID: self.root}
            self._by_key = {self.root.key: self.root}
            fds = []
            for inode in dropped:
                inode.nlookup = 0
                fds.append(self._drop(inode))
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    # -- moving the session (fs/migration.py) ----------------------------------------------------
    def saved_nodes(self) -> tuple[int, list[tuple[int, int, int, FileHandle | None]]]:
        """The next nodeid and (nodeid, nlookup, file type, file handle or None) of every node but
        the root, for saving the session; a lost node has type 0."""
        with self._lock:
            nodes = [(i.nodeid, i.nlookup, i.kind, i.handle) for i in self._by_id.values()
                     if i is not self.root]
            nodes += [(nodeid, nlookup, 0, None) for nodeid, nlookup in self._lost.items()]
            return self._next, nodes

    def restore(self, nodes: list[tuple[int, int, int, os.stat_result]], lost: dict[int, int],
                next_id: int, *, more: bool = False) -> None:
        """Installs the nodes of a loaded session: (nodeid, nlookup, O_PATH fd, stat) each, taking
        ownership of the fds, and the `lost` ones (nodeid -> nlookup, their requests get EIO).

        The table must know the root alone, unless `more` adds a further batch of one session (`clear`
        undoes them all). Raises ValueError (closing every fd of `nodes`) when two nodes name one host
        file or one nodeid, or a nodeid is not below `next_id`; with file handles, the error of a file
        that has none under "mandatory"."""
        made: list[Inode] = []
        try:
            with self._lock:
                if not more and (len(self._by_id) != 1 or self._lost):
                    raise ValueError("a session is already running")
                seen: set[int] = set(lost) | set(self._by_id)
                keys: set[tuple[int, int, int]] = set(self._by_key)
            for nodeid, nlookup, fd, st in nodes:
                if nodeid in seen or not ROOT_ID < nodeid < next_id:
                    raise ValueError(f"nodeid {nodeid} is repeated or out of range")
                seen.add(nodeid)
                key = (st.st_dev, st.st_ino, mount_id(fd, self._proc_fd))
                if key in keys:
                    raise ValueError(f"nodeid {nodeid} names a host file another node names")
                keys.add(key)
                kind = stat.S_IFMT(st.st_mode)
                handle = self._handle_for(fd, kind, key[2]) if self._mode != "never" else None
                inode = Inode(self, nodeid, fd, key, kind, handle)
                inode.nlookup = nlookup
                made.append(inode)
        except BaseException:
            for inode in made:
                if inode.handle is not None:
                    self._mounts.release(inode.handle.mount_id)
            for _, _, fd, _ in nodes:
                os.close(fd)
            raise
        close: list[int] = []
        with self._lock:
            for inode in made:
                self._by_id[inode.nodeid] = inode
                self._by_key[inode.key] = inode
                if inode.handle is not None:
                    close += self._park(inode)
            self._lost = dict(lost)
            self._next = max(self._next, next_id)
        for fd in close:
            os.close(fd)
