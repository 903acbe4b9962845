"""Passthrough: serves a host directory (the shared dir) to an untrusted guest.

Security model (see docs/architecture.md, "Security model"):

- Every node the guest knows is an O_PATH fd held in the `InodeTable`; host paths are only ever
  resolved as one component relative to such a directory fd, with O_NOFOLLOW / AT_SYMLINK_NOFOLLOW.
  Names are checked again here (no b"/", not empty, no NUL, b"." and b".." only in lookup) even
  though the server validates them, and b".." of the root is the root.
- Symlinks in the share are data: readlink returns the target bytes and nothing ever follows one.
- Files are opened by reopening the node's O_PATH fd through /proc/self/fd/N, as virtiofsd does, after
  checking the node's type: only regular files (open) and directories (opendir) are opened. Device
  nodes, FIFOs and sockets are refused with EBADF, because opening them on the host could block the
  daemon (FIFOs) or reach host devices; the guest kernel serves such nodes itself and never sends OPEN
  for them. Symlinks get ELOOP, as open(2) with O_NOFOLLOW would give.
  Reopening through the magic link is safe for exactly this reason: the link jumps to the inode the
  O_PATH fd holds, and that inode is checked to be a regular file or directory first. Operations
  that take a path (chmod, chown, utimes, xattrs) also go through /proc/self/fd/N; for an O_PATH fd
  of a symlink the magic link lands on the symlink itself, never on its target. The xattr calls take
  no dir_fd and name the link relative to /proc as the calling thread's working directory
  (`_proc_as_cwd`), so they work in every sandbox.
- A directory that a host process moves out of the share while the guest holds it keeps being served,
  and its b".." then leads outside; confining that is the job of the mount-namespace sandbox, as in
  virtiofsd. The guest alone cannot cause it: it can only rename within the share.
- nodeids and fhs are the daemon's own counters (`InodeTable`, `HandleTable`); unknown or forgotten
  ones get EBADF.

Credentials: when the daemon runs as root, the calls that create a node (mknod, mkdir, symlink,
create) run with the thread's fsuid/fsgid switched to the caller's (`_as_caller`), so new files belong
to the guest user and the host checks the guest user's permission to create them (a setgid directory
passes its group on, and a set-group-ID bit the guest user may not set is dropped, as on the host).
The process must hold no supplementary groups, which would otherwise count as the guest user's in
those checks (`prepare_process`). Everything else runs with the daemon's credentials; the guest kernel mounts
virtio-fs with default_permissions and checks access itself.

Locks: POSIX record locks and flock(2) locks are held on the host (locks.py), so they conflict between
guest processes and with host processes alike.

The process umask must be 0 (`prepare_process`): the guest has already applied its own umask (or
passes it to be applied here), and the daemon's umask must not change the modes a second time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import stat
import struct
import threading
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from vhostfs import native
from vhostfs.fs.handles import Handle, HandleTable
from vhostfs.fs.idmap import IdMap, IdTranslation, parse_proc_id_map
from vhostfs.fs.inodes import Inode, InodeTable
from vhostfs.fs.locks import LockTable
from vhostfs.fs.migration import SessionMover
from vhostfs.fs.xattrmap import XattrMap
from vhostfs.fuse.abi import (
    FOPEN_CACHE_DIR,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FUSE_ATTR_SUBMOUNT,
    FUSE_DIRECT_IO_ALLOW_MMAP,
    FUSE_DO_READDIRPLUS,
    FUSE_DONT_MASK,
    FUSE_FLOCK_LOCKS,
    FUSE_HANDLE_KILLPRIV_V2,
    FUSE_PASSTHROUGH,
    FUSE_POSIX_ACL,
    FUSE_POSIX_LOCKS,
    FUSE_READDIRPLUS_AUTO,
    FUSE_SECURITY_CTX,
    FUSE_SETXATTR_EXT,
    FUSE_SUBMOUNTS,
    FUSE_WRITE_KILL_SUIDGID,
    FUSE_WRITEBACK_CACHE,
)
from vhostfs.fuse.filesystem import (
    LINUX_DIRENT64,
    ROOT_ID,
    SETUPMAPPING_NO_FH,
    TIME_NOW,
    Attr,
    ConnectionInfo,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    HostDirents,
    HostDirentsPlus,
    Lock,
    Open,
    SetAttr,
    StatVfs,
    Statx,
    check_access,
    check_name,
    fs_error,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vhostfs.iov import Reader, Writer

log = logging.getLogger("vhostfs.passthrough")

#: Cache policy -> (entry/attr timeout in seconds, FOPEN flags for files, FOPEN flags for directories),
#: the meanings virtiofsd gives its --cache values.
CACHE_POLICIES: dict[str, tuple[float, int, int]] = {
    "never": (0.0, FOPEN_DIRECT_IO, 0),
    "metadata": (86400.0, FOPEN_DIRECT_IO, 0),
    "auto": (1.0, 0, 0),
    "always": (86400.0, FOPEN_KEEP_CACHE, FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR),
}

# open(2) flags a guest may have passed on to the host file. Everything else is dropped: O_CREAT and
# O_EXCL (open never creates; create adds them itself), O_DIRECTORY and O_PATH (the node type decides),
# O_NOCTTY, O_TMPFILE; O_DIRECT unless allow_direct_io (the guest's buffers need not meet host alignment
# rules, and bypassing the host page cache is the host's choice, as in virtiofsd), and O_NOATIME unless
# preserve_noatime (the host refuses it with EPERM to anyone but the file's owner).
_OPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
               | os.O_LARGEFILE)
_RENAME_EXCHANGE = 2
_RENAME_FLAGS = 1 | _RENAME_EXCHANGE | 4  # RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DT_DIR = stat.S_IFDIR >> 12
_DT_REG = stat.S_IFREG >> 12
_DT_LNK = stat.S_IFLNK >> 12
_DOTS = (b".", b"..")
#: Where the host refuses to open a file for writing that it would open for reading (DAX mappings).
_READ_ONLY_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY})
# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (<linux/fs.h>, chattr(1)'s inode flags), as _IOR/_IOW('f', n, long)
# encodes them for 64-bit callers and for 32-bit ones (FS_IOC32_*). Whatever the encoding says, the
# flags travel as a 4-byte unsigned int: the guest kernel sends them so (fuse_fileattr_get/set) and
# the host kernel reads and writes that much.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IOC32_GETFLAGS = 0x80046601
_FS_IOC32_SETFLAGS = 0x40046602
#: The FS_IOC_GETFLAGS bit of a file that wants DAX (<linux/fs.h> FS_DAX_FL; chattr +x).
_FS_DAX_FL = 0x02000000
_IOC_FLAGS = struct.Struct("<I")
# FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR (_IOR/_IOW('X', 31/32, struct fsxattr)): the same inode flags as
# FS_XFLAG_* bits with extent size, project id and CoW extent size hints. Linux's FUSE client asks for
# both forms when a flag is changed (vfs_fileattr_set reads the old attributes), and xfs_io's chattr
# uses this one. struct fsxattr: fsx_xflags, fsx_extsize, fsx_nextents, fsx_projid, fsx_cowextsize,
# 8 bytes of padding.
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FSXATTR = struct.Struct("<IIIII8x")
assert _FSXATTR.size == 28
# A regular file or a directory on the host is always ready for reading and writing.
_ALWAYS_READY = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM
# What posix_acl negotiates, all or nothing: ACLs in the guest (FUSE_POSIX_ACL), the umask left to the
# daemon so that a default ACL can override it (FUSE_DONT_MASK), and fuse_setxattr_in.setxattr_flags,
# which carries FUSE_SETXATTR_ACL_KILL_SGID (FUSE_SETXATTR_EXT). Without the last, the guest could not
# ask for the set-group-ID bit to be cleared on an ACL change, so ACLs are then not offered at all.
_ACL_FLAGS = FUSE_POSIX_ACL | FUSE_DONT_MASK | FUSE_SETXATTR_EXT
_ACL_DEFAULT = "system.posix_acl_default"
_CLONE_FS = 0x200  # <sched.h>: unshare(2) the working directory, root and umask
class _PlusListing(HostDirentsPlus):
    """A READDIRPLUS listing of directory node `nodeid` of passthrough `fs`, from `listing`'s records."""

    __slots__ = ("_fs", "_nodeid")

    def __init__(self, fs: Passthrough, nodeid: int, listing: HostDirents) -> None:
        super().__init__(listing.data, listing.offsets, listing.start)
        self._fs = fs
        self._nodeid = nodeid

    def __iter__(self) -> Iterator[DirEntry]:
        return self._fs._entries(self._nodeid, HostDirents(self.data, self.offsets, self.start))

    def lookup(self, first: int, count: int) -> tuple[bytearray, array, float, float]:
        stats, nodeids = self._fs._lookup_listed(self._nodeid, self, first, count)
        return stats, nodeids, self._fs._timeout, self._fs._timeout


# Which threads have their own working directory (see Passthrough._proc_as_cwd).
_own_fs = threading.local()
_FLOCK_OPS = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_UNLCK: fcntl.LOCK_UN}


#: Every FALLOC_FL_* bit of linux/falloc.h: KEEP_SIZE, PUNCH_HOLE, NO_HIDE_STALE, COLLAPSE_RANGE,
#: ZERO_RANGE, INSERT_RANGE, UNSHARE_RANGE.
_FALLOC_FL_ALL = 0x7F


#: Whether prepare_process ran in this process.
_prepared = False


def prepare_process() -> None:
    """Makes the process-wide settings the passthrough relies on (see the module doc): umask 0 and,
    when running as root, no supplementary groups.

    A program that serves a Passthrough calls it once at start-up, before building one: the daemon
    and `vhostfs mount` do. The constructor changes nothing in the process (and makes no system call
    for it, so that a file system mounted at run time under the seccomp filter needs none); as root
    it warns if this did not run.
    """
    global _prepared
    if os.geteuid() == 0 and os.getgroups():
        # Root's supplementary groups would count for every guest user once fsuid/fsgid are switched
        # (the host checks group membership with them), so the daemon holds none.
        try:
            os.setgroups([])
        except PermissionError:
            # A user namespace whose setgroups is "deny" (one gid mapped, no newgidmap): the daemon
            # keeps the groups its user has on the host, and can switch to no other gid.
            with open("/proc/self/setgroups") as f:
                if f.read().strip() != "deny":
                    raise
    os.umask(0)
    _prepared = True


def _negotiation_mode(option: str, value: bool | str) -> str:
    """"never", "auto" or "always" from a mode or a bool (True: "auto"); ValueError otherwise."""
    if value is True or value is False:
        return "auto" if value else "never"
    if value not in ("never", "auto", "always"):
        raise ValueError(f"{option} must be never, auto or always, not {value!r}")
    return value


def _dirent_record(name: bytes, ino: int) -> bytes:
    """A linux_dirent64 record of directory `name` (for b"." and b"..", which the daemon lists itself)."""
    reclen = (LINUX_DIRENT64.size + len(name) + 1 + 7) & ~7
    record = LINUX_DIRENT64.pack(ino, 0, reclen, _DT_DIR) + name
    return record + bytes(reclen - len(record))


class _GuestAttr:
    """The attributes `st` with the owner and group the guest sees (an `Attr`)."""

    __slots__ = ("_st", "st_uid", "st_gid")

    def __init__(self, st: os.stat_result, uid: int, gid: int) -> None:
        self._st = st
        self.st_uid = uid
        self.st_gid = gid

    def __getattr__(self, name: str) -> object:
        return getattr(self._st, name)


def _fd_name(fd: int) -> str:
    """The name of our `fd` relative to /proc: its magic link, which reaches the file even when
    the path it was opened by is gone or was never reachable (O_PATH fds)."""
    return f"self/fd/{fd}"


class Passthrough(Filesystem):
    """Serves the host directory `root` (the shared dir): a path, or an open fd of the directory (O_PATH
    is enough), which the passthrough then owns (closed by `close`, and on failure here).

    `cache` is "never", "metadata", "auto" or "always" (see CACHE_POLICIES); `readonly` makes every
    modifying operation fail with EROFS; `xattr` enables the extended attribute calls (ENOSYS
    otherwise). Thread-safe: any number of worker threads may call it at once.

    The other options follow virtiofsd's of the same names:

    - `posix_lock`, `flock`: serve the guest's POSIX record locks and flock(2) locks on the host
      (locks.py); a blocking lock request waits until the lock is free or `ctx.interrupt` is set,
      for at most `lock_wait` seconds if that is not None (then EDEADLK).
    - `readdirplus`: let the guest use READDIRPLUS (off: plain READDIR only); by default on, except
      with cache="never", where the guest would discard the attributes it brings (as virtiofsd).
    - `writeback`: the guest caches writes (FUSE_WRITEBACK_CACHE); files are then opened read-write
      and without O_APPEND on the host, since the guest may read to fill pages and appends itself.
    - `allow_direct_io`: pass the guest's O_DIRECT on to the host (dropped otherwise).
    - `allow_mmap`: let the guest mmap files opened with FOPEN_DIRECT_IO (cache="never").
    - `announce_submounts`: a directory on another host file system than its parent is flagged
      FUSE_ATTR_SUBMOUNT, and the guest shows it as a submount with its own st_dev.
    - `preserve_noatime`: pass the guest's O_NOATIME on (dropped otherwise).
    - `killpriv_v2`: FUSE_HANDLE_KILLPRIV_V2: the guest leaves clearing set-user-ID/set-group-ID bits
      on write, truncate and chown to the daemon (FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID, and an
      O_TRUNC open by a guest user other than root).
    - `posix_acl`: POSIX ACLs in the guest (FUSE_POSIX_ACL; implies `xattr`): "never" (or False),
      "auto" (or True: where the guest can negotiate them) or "always" (`init` fails with EPROTO, and
      so the session, where the guest cannot). The system.posix_acl_*
      attributes go to the host like any other; the guest's umask is applied here (FUSE_DONT_MASK)
      except in a directory with a default ACL, which replaces it as on the host; and an access ACL
      set with `kill_sgid` clears the set-group-ID bit.
    - `security_label`: the security context the guest's LSM gives a new node (FUSE_SECURITY_CTX;
      implies `xattr`; "never", "auto" or "always" as for `posix_acl`) is set on the host node as
      the extended attribute it names (through the xattrmap) right after create, mkdir, mknod,
      symlink and tmpfile make it, with the daemon's credentials (outside SELinux, setting security.*
      needs CAP_SYS_ADMIN); if that fails, the node is removed and the guest gets the error. A
      create that finds the file already there opens it and labels nothing. SELinux's fscreate is
      not used.
    - `xattrmap`: virtiofsd's --xattrmap rules (xattrmap.py), applied to every extended attribute name.
    - `inode_file_handles`: "never", "prefer" or "mandatory": hold the nodes the guest knows by file
      handles rather than fds (inodes.py); "mandatory" raises ValueError when the share cannot.
    - `migration_mode`, `migration_on_error`, `migration_verify_handles`, `migration_confirm_paths`:
      how a moved session (live migration, live upgrade) finds its files again (fs/migration.py).
    - `fd_budget`: how many fds the daemon may hold for the guest (default: RLIMIT_NOFILE less a
      reserve, see inodes.py); near it, idle nodes are closed (found again by handle or by name),
      and only when open files hold the rest do requests that would open one more fail with EMFILE.
    - `passthrough`: offer open regular files for FUSE passthrough (`Open.backing_fd`), where the
      transport can (/dev/fuse) and the options allow it; see `passthrough_refusal` and
      docs/fuse-passthrough.md for when they do not.
    - `translate_uid`, `translate_gid`: `IdMap`s (virtiofsd's --translate-uid/--translate-gid, see
      idmap.py) applied to the caller's credentials, the owners the guest gives, every attribute
      reply and the IDs inside POSIX ACLs and v3 file capabilities. Inside a user namespace, a guest
      ID that would become a host ID the namespace does not map is refused with EPERM.
    - `proc_fd`: an fd of /proc to use (duplicated) instead of opening /proc, for a daemon that can no
      longer name it (its sandbox).
    """

    def __init__(self, root: str | int, *, cache: str = "auto", readonly: bool = False,
                 xattr: bool = False, posix_lock: bool = True, flock: bool = True,
                 lock_wait: float | None = None, readdirplus: bool | None = None, writeback: bool = False,
                 allow_direct_io: bool = False, allow_mmap: bool = False, announce_submounts: bool = False,
                 preserve_noatime: bool = False, killpriv_v2: bool = False, posix_acl: bool | str = "never",
                 xattrmap: str | None = None, inode_file_handles: str = "never",
                 fd_budget: int | None = None, security_label: bool | str = "never",
                 passthrough: bool = True, proc_fd: int | None = None,
                 migration_mode: str = "find-paths", migration_on_error: str = "abort",
                 migration_verify_handles: bool = False, migration_confirm_paths: bool = False,
                 translate_uid: IdMap | None = None, translate_gid: IdMap | None = None) -> None:
        if cache not in CACHE_POLICIES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_POLICIES)}, not {cache!r}")
        if os.geteuid() == 0 and not _prepared:
            # Root's supplementary groups would count for every guest user once fsuid/fsgid are
            # switched (the host checks group membership with them).
            log.warning("prepare_process() was not called: the process's supplementary groups and umask "
                        "apply to what guest users create")
        self._timeout, self._fopen_file, self._fopen_dir = CACHE_POLICIES[cache]
        self._readonly = readonly
        self._acl_mode = _negotiation_mode("posix_acl", posix_acl)
        self._label_mode = _negotiation_mode("security_label", security_label)
        self._posix_acl = self._acl_mode != "never"
        self._security_label = self._label_mode != "never"
        self._xattr = xattr or self._posix_acl or self._security_label
        self._xattrmap = XattrMap.parse(xattrmap) if xattrmap is not None else None
        self._cap_name = self._xattrmap.capability_name if self._xattrmap is not None else None
        self._readdirplus = readdirplus if readdirplus is not None else cache != "never"
        self._writeback = writeback
        self._allow_mmap = allow_mmap
        self._submounts = announce_submounts
        self._killpriv_v2 = killpriv_v2
        self._open_flags = (_OPEN_FLAGS | (os.O_DIRECT if allow_direct_io else 0)
                            | (os.O_NOATIME if preserve_noatime else 0))
        # Held open so that reopening works after the sandbox hides /proc's path (pivot_root, chroot).
        # /proc itself, not /proc/self/fd: "self" is then resolved at each use, so the names stay right
        # in a process forked after the constructor (serve_filesystem's background mode).
        # A daemon in its sandbox can no longer name /proc: it passes an fd of it, duplicated here.
        try:
            self._proc_fd = (os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if proc_fd is None
                             else os.dup(proc_fd))
        except OSError:
            if isinstance(root, int):
                os.close(root)
            raise
        try:
            if isinstance(root, int):
                root_fd = root
                if not stat.S_ISDIR(os.stat(root_fd).st_mode):
                    os.close(root_fd)
                    raise fs_error(errno.ENOTDIR)
            else:
                root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(self._proc_fd)
            raise
        try:
            self._inodes = InodeTable(root_fd, os.stat(root_fd), file_handles=inode_file_handles,
                                      fd_budget=fd_budget, proc_fd=self._proc_fd)
        except OSError as e:
            os.close(root_fd)
            os.close(self._proc_fd)
            raise ValueError(f"inode file handles {inode_file_handles!r} on {root}: {e.strerror}") from None
        except BaseException:
            os.close(root_fd)
            os.close(self._proc_fd)
            raise
        self._handles = HandleTable()
        self._want_passthrough = passthrough
        self._passthrough = False
        # FUSE passthrough, per node with open files: [passed through?, open handles]; and fh -> nodeid.
        self._io_lock = threading.Lock()
        self._io_modes: dict[int, list] = {}
        self._io_handles: dict[int, int] = {}
        self._posix_lock = posix_lock
        self._flock = flock
        self._locks = LockTable(self._reopen_fd, lock_wait)
        self._mover = SessionMover(self._inodes, self._handles, self._locks, self._proc_fd,
                                   mode=migration_mode, on_error=migration_on_error,
                                   verify_handles=migration_verify_handles,
                                   confirm_paths=migration_confirm_paths, flock=flock)
        self._ids = self._translation(translate_uid or IdMap(), translate_gid or IdMap())
        self._creds = (os.geteuid(), os.getegid())
        self._switch_creds = self._creds[0] == 0

    def stats(self) -> dict[str, int]:
        """Counters for listings (vhostfs.fs.vfs): the nodes the client knows and the handles open."""
        return {"nodes": len(self._inodes), "handles": len(self._handles)}

    def _proc_text(self, name: str) -> str:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._proc_fd)
        try:
            return os.read(fd, 65536).decode()
        finally:
            os.close(fd)

    def _translation(self, uids: IdMap, gids: IdMap) -> IdTranslation | None:
        """The ID translation in force: the maps, and the IDs this process's user namespace can use;
        None when nothing needs translating or refusing."""
        ids = IdTranslation(uids, gids, parse_proc_id_map(self._proc_text("self/uid_map")),
                            parse_proc_id_map(self._proc_text("self/gid_map")))
        return None if ids.identity else ids

    def close(self) -> None:
        """Releases every node and handle and closes the root; the object is unusable afterwards."""
        self.destroy()
        self._inodes.close()
        os.close(self._proc_fd)

    # -- helpers ----------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self._readonly:
            raise fs_error(errno.EROFS)

    def _dir(self, nodeid: int) -> Inode:
        """`use`s `nodeid` and checks that it is a directory (ENOTDIR otherwise)."""
        inode = self._inodes.use(nodeid)
        if not inode.is_dir:
            self._inodes.unuse(inode)
            raise fs_error(errno.ENOTDIR)
        return inode

    def _reopen(self, inode: Inode, flags: int) -> int:
        """Opens the host file of O_PATH `inode` with `flags` through /proc/self/fd (see module doc).

        Callers have checked that the inode is a regular file or a directory. O_NOFOLLOW cannot be
        added here: the last component is the /proc magic link itself.
        """
        name = _fd_name(inode.fd)
        return self._inodes.open_fd(lambda: os.open(name, flags | os.O_CLOEXEC, dir_fd=self._proc_fd))

    def _reopen_fd(self, fd: int, flags: int) -> int:
        """A new open file description of the regular file open as `fd` (for lock owners)."""
        return self._inodes.open_fd(lambda: os.open(_fd_name(fd), flags | os.O_CLOEXEC, dir_fd=self._proc_fd))

    def _entry(self, inode: Inode, st: os.stat_result) -> Entry:
        # Checked here, not in _guest_attr: untranslated replies are the hot path of LOOKUP and READDIRPLUS.
        return Entry(inode.nodeid, st if self._ids is None else self._guest_attr(st),
                     entry_timeout=self._timeout, attr_timeout=self._timeout)

    def _guest_attr(self, st: os.stat_result) -> Attr:
        """`st` as the guest sees it: with its owner and group translated (see translate_uid)."""
        ids = self._ids
        if ids is None:
            return st
        return _GuestAttr(st, ids.uid_to_guest(st.st_uid), ids.gid_to_guest(st.st_gid))

    def _lookup_at(self, dir_inode: Inode, name: bytes) -> Entry:
        """Looks up one component `name` (not following it) in directory node `dir_inode` (in use);
        counts a lookup, and notes where the node was seen (not for b"..", see inodes.py).

        A file the table already knows (the common case: the guest looks names up again and again)
        costs two stat calls on the name; only a new one is opened, and then it is known by the
        attributes of the fd it is held by, whatever happened to the name meanwhile.
        """
        dir_fd = dir_inode.fd
        parent, seen = (None, None) if name == b".." else (dir_inode.nodeid, name)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mnt = native.mount_id(dir_fd, name)
        inode = self._inodes.ref_known((st.st_dev, st.st_ino, mnt), parent, seen) if mnt is not None else None
        if inode is None:
            inode, st = self._hold_new(dir_fd, name, parent, seen)
        entry = self._entry(inode, st)
        if self._submounts and stat.S_ISDIR(st.st_mode) and st.st_dev != os.stat(dir_fd).st_dev:
            entry.attr_flags = FUSE_ATTR_SUBMOUNT
        return entry

    def _open_new(self, fd: int, flags: int, dir_inode: Inode,
                  name: bytes | None = None) -> tuple[Entry, Open]:
        """The Entry and file handle of a file just created and open as `fd` (which they then own),
        as `name` in `dir_inode` (not seen there for an unnamed O_TMPFILE)."""
        try:
            # A file just made in a directory is on the directory's mount (it cannot be a mount point).
            entry = self._add_fd(fd, dir_inode.nodeid if name is not None else None, name, dir_inode.key[2])
        except BaseException:
            os.close(fd)
            raise
        return entry, self._opened(self._new_handle(fd, entry.nodeid, False), entry.nodeid, fd, flags)

    def _new_handle(self, fd: int, nodeid: int, is_dir: bool) -> int:
        """A new file handle of `nodeid` open as `fd` (which it then owns); the node keeps its own fd
        while the handle lives (inodes.py: pin)."""
        self._inodes.pin(nodeid)
        return self._handles.add(fd, nodeid, is_dir)

    def _drop_handle(self, fh: int) -> None:
        """Releases `fh` (EBADF if unknown) and its node's pin."""
        handle = self._handles.remove(fh)
        if handle is not None:  # None: a lost handle of a moved session, which pins nothing
            self._inodes.unpin(handle.nodeid)

    def _add_fd(self, fd: int, parent: int | None = None, name: bytes | None = None,
                mnt: int | None = None) -> Entry:
        """Counts a lookup of the file open as `fd` (any open mode), seen as `name` in `parent`, and
        returns its Entry; `mnt` is its mount id if known."""
        path_fd = self._inodes.open_fd(
            lambda: os.open(_fd_name(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc_fd))
        try:
            st = os.stat(path_fd)
        except BaseException:
            os.close(path_fd)
            raise
        return self._entry(self._inodes.add(path_fd, st, parent, name, mnt), st)

    @contextmanager
    def _as_caller(self, ctx: Context) -> Iterator[None]:
        """Runs the block with this thread's fsuid/fsgid set to the caller's, when running as root.

        setfsuid/setfsgid act on the calling thread only, so other workers keep their credentials.
        A switch that did not take effect (an id the kernel refuses) fails the call with EPERM rather
        than creating the file as root.
        """
        uid, gid = ctx.uid, ctx.gid
        if self._ids is not None:
            # A guest ID that is forbidden or has no host ID the daemon can use: EPERM.
            uid, gid = self._ids.uid_to_host(uid), self._ids.gid_to_host(gid)
        if not self._switch_creds or (uid, gid) == self._creds:
            yield
            return
        old_gid = native.setfsgid(gid)
        old_uid = native.setfsuid(uid)
        try:
            # setfsuid(-1) changes nothing and returns the current value: the only way to see failure.
            if native.setfsuid(0xFFFFFFFF) != uid or native.setfsgid(0xFFFFFFFF) != gid:
                raise fs_error(errno.EPERM)
            yield
        finally:
            native.setfsuid(old_uid)
            native.setfsgid(old_gid)

    def _new_mode(self, dir_inode: Inode, mode: int, umask: int) -> int:
        """The permission bits to create a node with in `dir_inode`: `mode & ~umask`, or, with posix_acl,
        `mode` itself where the directory has a default ACL.

        POSIX ACLs (and the host kernel, whose own umask for the daemon is 0) let a default ACL take the
        umask's place. Without FUSE_DONT_MASK the guest sends `mode` already masked, and this changes
        nothing.
        """
        if self._posix_acl:
            try:
                with self._proc_as_cwd():
                    os.getxattr(_fd_name(dir_inode.fd), _ACL_DEFAULT)
                return stat.S_IMODE(mode)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
        return stat.S_IMODE(mode) & ~umask

    def _label(self, ctx: Context, dir_fd: int, name: bytes | None, *, fd: int | None = None,
               directory: bool = False) -> None:
        """With security_label, sets the guest's security context (`ctx.security_context`) on the node
        just created: the one open as `fd`, or else `name` in host directory `dir_fd`, not followed (a
        symlink gets the label itself). If that fails, removes `name` (rmdir for a `directory`) and
        raises; the caller closes `fd`, which is all an unnamed tmpfile needs.

        Set with the daemon's credentials, as virtiofsd does: the guest user may not own the
        attribute's namespace on the host, while the guest kernel already decided the label.
        """
        label = ctx.security_context
        if label is None or not self._security_label:
            return
        attr, value = label
        try:
            host_name = self._host_name(attr)
            if fd is not None:
                os.setxattr(fd, host_name, value)
            else:
                with self._proc_as_cwd():
                    os.setxattr(os.fsencode(_fd_name(dir_fd)) + b"/" + name, host_name, value,
                                follow_symlinks=False)
        except BaseException:
            if name is not None:
                try:
                    if directory:
                        os.rmdir(name, dir_fd=dir_fd)
                    else:
                        os.unlink(name, dir_fd=dir_fd)
                except OSError:
                    pass  # gone already: the error that matters is the label's
            raise

    def describe_inodes(self) -> str:
        """How the nodes the kernel knows are held (file handles or fds), for the log at start."""
        return self._inodes.describe()

    def passthrough_refusal(self) -> str | None:
        """Why the options keep file data away from FUSE passthrough, or None when they allow it.

        With passthrough the kernel reads and writes the host file itself and the daemon never sees
        the data. That breaks what the daemon must do on the way: cache="never" promises the guest
        direct I/O (FOPEN_DIRECT_IO, which the kernel puts above passthrough anyway); the writeback
        cache and passthrough exclude each other in the kernel; killpriv_v2 leaves clearing the
        set-user-ID bits on write to the daemon (FUSE_WRITE_KILL_SUIDGID); and an xattrmap that
        renames security.capability stores it where the host kernel does not drop it on write.
        """
        if not self._want_passthrough:
            return "turned off"
        if self._fopen_file & FOPEN_DIRECT_IO:
            return "--cache never serves every read and write in the daemon"
        if self._writeback:
            return "the kernel does not pass files through with the writeback cache"
        if self._killpriv_v2:
            return "--killpriv-v2 clears set-user-ID bits in the daemon on each write"
        if self._cap_name is not None:
            return "the xattrmap stores security.capability where a host write does not drop it"
        return None

    # -- session ------------------------------------------------------------------------------------
    def init(self, conn: ConnectionInfo) -> None:
        """Asks for the INIT flags the options enable (locks, ACLs, ...), and drops READDIRPLUS if off.

        FUSE_PASSTHROUGH stays wanted (the transport asks for it where it can) when the options allow
        it (`passthrough_refusal`); the decision is logged once per session.
        """
        if conn.want & FUSE_PASSTHROUGH:
            why = self.passthrough_refusal()
            if why is not None:
                conn.want &= ~FUSE_PASSTHROUGH
                log.info("FUSE passthrough is off: %s; file data goes through the daemon", why)
            else:
                log.info("FUSE passthrough is on: the kernel reads and writes regular files itself")
        self._passthrough = bool(conn.want & conn.capable & FUSE_PASSTHROUGH)
        if self._posix_lock:
            conn.want |= FUSE_POSIX_LOCKS
        if self._flock:
            conn.want |= FUSE_FLOCK_LOCKS
        if not self._readdirplus:
            conn.want &= ~(FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO)
        if self._writeback:
            conn.want |= FUSE_WRITEBACK_CACHE
        if self._allow_mmap:
            conn.want |= FUSE_DIRECT_IO_ALLOW_MMAP
        if self._submounts:
            conn.want |= FUSE_SUBMOUNTS
        if self._killpriv_v2:
            conn.want |= FUSE_HANDLE_KILLPRIV_V2
        acl = conn.capable & _ACL_FLAGS == _ACL_FLAGS
        label = bool(conn.capable & FUSE_SECURITY_CTX)
        for mode, offered, what in ((self._acl_mode, acl, "POSIX ACLs"), (self._label_mode, label,
                                                                           "security labels")):
            if mode == "always" and not offered:
                raise OSError(errno.EPROTO, f"{what} are required (\"always\") and the kernel cannot "
                              "negotiate them")
        if self._posix_acl and acl:
            conn.want |= _ACL_FLAGS
        if self._security_label:
            conn.want |= FUSE_SECURITY_CTX

    def save_state(self) -> list[tuple[bytes, int, bytes]]:
        """The nodes, handles and locks of the session (fs/migration.py)."""
        return self._mover.save()

    def load_state(self, sections: dict) -> None:
        """Takes over a saved session: finds every node and handle again (fs/migration.py)."""
        self._mover.load(sections)

    def resume_after_save(self) -> None:
        """The session saved last goes on here (the move failed): drops what the save made."""
        self._mover.discard_copies()

    def destroy(self) -> None:
        """Forgets every node but the root and closes every handle (a new session may follow)."""
        with self._io_lock:
            self._io_modes.clear()
            self._io_handles.clear()
        self._passthrough = False
        self._locks.clear()
        self._handles.clear()
        self._inodes.clear()

    # -- names --------------------------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        """Looks `name` up in `parent` without following symlinks; b".." of the root is the root."""
        if name in _DOTS:
            with self._dir(parent) as dir_inode:
                if name == b"." or parent == ROOT_ID:
                    inode = self._inodes.ref(parent)
                    return self._entry(inode, os.stat(inode.fd))
                return self._lookup_at(dir_inode, b"..")
        check_name(name)
        with self._dir(parent) as dir_inode:
            return self._lookup_at(dir_inode, name)

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drops `nlookup` references; the node's fd closes when none remain and no request uses it."""
        self._inodes.forget(nodeid, nlookup)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        """fstat of the node's O_PATH fd (the same inode as any `fh` opened from it)."""
        with self._inodes.use(nodeid) as inode:
            st = os.stat(inode.fd)
            return (st if self._ids is None else self._guest_attr(st)), self._timeout

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> tuple[Statx, float]:
        """The basic stats of the node (fstat of its O_PATH fd); no birth time, so `mask` says so."""
        with self._inodes.use(nodeid) as inode:
            return Statx.from_attr(self._guest_attr(os.stat(inode.fd))), self._timeout

    def setattr(self, ctx: Context, nodeid: int, changes: SetAttr) -> tuple[Attr, float]:
        """Applies owner, mode, size and times, in that order (chown clears set-id bits; mode wins).

        Uses the open file when `changes.fh` is given, otherwise the O_PATH fd through /proc; a
        symlink's own owner and times change, never its target's, and its mode cannot (EOPNOTSUPP).
        """
        self._check_writable()
        with self._inodes.use(nodeid) as inode:
            if changes.fh is None:
                self._setattr(inode, None, changes)
            else:
                with self._handles.use(changes.fh) as handle:
                    self._setattr(inode, handle.fd, changes)
            return self._guest_attr(os.stat(inode.fd)), self._timeout

    def _setattr(self, inode: Inode, fd: int | None, ch: SetAttr) -> None:
        name = _fd_name(inode.fd)
        proc = self._proc_fd
        if ch.uid is not None or ch.gid is not None:
            uid = -1 if ch.uid is None else ch.uid
            gid = -1 if ch.gid is None else ch.gid
            if self._ids is not None:
                uid = uid if ch.uid is None else self._ids.uid_to_host(uid)
                gid = gid if ch.gid is None else self._ids.gid_to_host(gid)
            try:
                if fd is not None:
                    os.fchown(fd, uid, gid)
                else:
                    os.chown(name, uid, gid, dir_fd=proc)
            except OSError as e:
                # EINVAL: an ID the daemon's user namespace does not map. To the guest, as to a
                # process in that namespace, such an owner is simply not permitted.
                if e.errno == errno.EINVAL:
                    raise fs_error(errno.EPERM) from None
                raise
            if inode.kind == stat.S_IFREG:
                self._drop_capability(fd if fd is not None else inode)
        mode = ch.mode
        if mode is None and ch.kill_suidgid and inode.kind == stat.S_IFREG:
            old = os.stat(inode.fd).st_mode
            mode = old & ~stat.S_ISUID
            if old & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
            if mode == old:
                mode = None
        if mode is not None:
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(mode))
            elif inode.is_symlink:
                raise fs_error(errno.EOPNOTSUPP)
            else:
                os.chmod(name, stat.S_IMODE(mode), dir_fd=proc)
        if ch.size is not None:
            if fd is not None:
                os.ftruncate(fd, ch.size)
            elif inode.kind != stat.S_IFREG:
                raise fs_error(errno.EISDIR if inode.is_dir else errno.EINVAL)
            else:
                wfd = self._reopen(inode, os.O_WRONLY)
                try:
                    os.ftruncate(wfd, ch.size)
                finally:
                    os.close(wfd)
        if ch.atime_ns is not None or ch.mtime_ns is not None:
            self._utimes(inode, fd, ch.atime_ns, ch.mtime_ns)

    def _utimes(self, inode: Inode, fd: int | None, atime: int | None, mtime: int | None) -> None:
        # os.utime has no UTIME_OMIT/UTIME_NOW: "now" is read here and an unchanged time is re-set.
        target: int | str = fd if fd is not None else _fd_name(inode.fd)
        dir_fd = None if fd is not None else self._proc_fd
        if atime == TIME_NOW and mtime == TIME_NOW:
            os.utime(target, dir_fd=dir_fd)
            return
        now = time.time_ns()
        if atime is None or mtime is None:
            st = os.stat(inode.fd)
            atime = st.st_atime_ns if atime is None else atime
            mtime = st.st_mtime_ns if mtime is None else mtime
        ns = (now if atime == TIME_NOW else atime, now if mtime == TIME_NOW else mtime)
        os.utime(target, ns=ns, dir_fd=dir_fd)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        """readlinkat(fd, "") on the symlink's O_PATH fd: the target bytes, never followed."""
        with self._inodes.use(nodeid) as inode:
            if not inode.is_symlink:
                raise fs_error(errno.EINVAL)
            return os.fsencode(os.readlink("", dir_fd=inode.fd))

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        """Creates symlink `name` -> `target` (stored as given; any bytes but NUL, at most PATH_MAX)."""
        self._check_writable()
        check_name(name)
        if not target or b"\0" in target:
            raise fs_error(errno.ENOENT if not target else errno.EINVAL)
        with self._dir(parent) as dir_inode:
            with self._as_caller(ctx):
                os.symlink(target, name, dir_fd=dir_inode.fd)
            self._label(ctx, dir_inode.fd, name)
            return self._lookup_at(dir_inode, name)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        """mknodat(2): regular files, FIFOs, sockets, and device nodes where the host allows them.

        The nodes are created, never opened: the guest kernel serves FIFOs, sockets and devices itself.
        """
        self._check_writable()
        check_name(name)
        with self._dir(parent) as dir_inode:
            perm = self._new_mode(dir_inode, mode, umask)
            with self._as_caller(ctx):
                os.mknod(name, stat.S_IFMT(mode) | perm, rdev, dir_fd=dir_inode.fd)
            self._label(ctx, dir_inode.fd, name)
            return self._lookup_at(dir_inode, name)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        """mkdirat(2) with `mode & ~umask` (see _new_mode for posix_acl)."""
        self._check_writable()
        check_name(name)
        with self._dir(parent) as dir_inode:
            perm = self._new_mode(dir_inode, mode, umask)
            with self._as_caller(ctx):
                os.mkdir(name, perm, dir_fd=dir_inode.fd)
            self._label(ctx, dir_inode.fd, name, directory=True)
            return self._lookup_at(dir_inode, name)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        """unlinkat(2) of a non-directory."""
        self._check_writable()
        check_name(name)
        with self._dir(parent) as dir_inode:
            os.unlink(name, dir_fd=dir_inode.fd)
        self._inodes.removed(parent, name)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        """unlinkat(2) with AT_REMOVEDIR."""
        self._check_writable()
        check_name(name)
        with self._dir(parent) as dir_inode:
            os.rmdir(name, dir_fd=dir_inode.fd)
        self._inodes.removed(parent, name)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        """renameat(2), or renameat2(2) for non-zero RENAME_* `flags` (unknown bits: EINVAL)."""
        self._check_writable()
        check_name(name)
        check_name(newname)
        if flags & ~_RENAME_FLAGS:
            raise fs_error(errno.EINVAL)
        with self._dir(parent) as old_dir, self._dir(newparent) as new_dir:
            if flags:
                native.renameat2(old_dir.fd, name, new_dir.fd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=old_dir.fd, dst_dir_fd=new_dir.fd)
        # With RENAME_WHITEOUT the old name holds a new whiteout node, which nothing knows yet.
        self._inodes.moved(parent, name, newparent, newname, exchange=bool(flags & _RENAME_EXCHANGE))

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        """Hard-links `nodeid` as `newparent/newname` (linkat through /proc, so a symlink links itself)."""
        self._check_writable()
        check_name(newname)
        with self._inodes.use(nodeid) as inode, self._dir(newparent) as dir_inode:
            os.link(_fd_name(inode.fd), newname, src_dir_fd=self._proc_fd, dst_dir_fd=dir_inode.fd,
                    follow_symlinks=True)
            return self._lookup_at(dir_inode, newname)

    # -- files --------------------------------------------------------------------------------------
    def _host_flags(self, flags: int) -> int:
        if self._readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise fs_error(errno.EROFS)
        host = flags & self._open_flags
        if self._writeback:
            # The guest's page cache may read back pages a write-only file fills partly, and it puts
            # appended data at the end of the file itself (virtiofsd does the same).
            if host & os.O_ACCMODE == os.O_WRONLY:
                host = host & ~os.O_ACCMODE | os.O_RDWR
            host &= ~os.O_APPEND
        return host

    def _open_inode(self, inode: Inode, flags: int) -> Open:
        """Opens regular file `inode`; refuses directories (EISDIR), symlinks (ELOOP), others (EBADF)."""
        if inode.kind != stat.S_IFREG:
            if inode.is_dir:
                raise fs_error(errno.EISDIR)
            raise fs_error(errno.ELOOP if inode.is_symlink else errno.EBADF)
        fd = self._reopen(inode, self._host_flags(flags))
        return self._opened(self._new_handle(fd, inode.nodeid, False), inode.nodeid, fd, flags)

    def _opened(self, fh: int, nodeid: int, fd: int, flags: int) -> Open:
        """The Open of new file handle `fh` (host fd `fd`) of `nodeid`, opened with guest `flags`:
        with `backing_fd` where FUSE passthrough was negotiated and this node's data may bypass the
        daemon.

        The node's first open decides for all its opens until the last is released (the kernel wants
        them alike, see `Open`): an O_DIRECT open without allow_direct_io is served (the kernel would
        open the host file O_DIRECT). Set-user-ID bits need nothing here: the kernel clears them before
        a passed-through write as before any other.
        """
        if not self._passthrough:
            return Open(fh, self._fopen_file)
        with self._io_lock:
            mode = self._io_modes.get(nodeid)
            if mode is None:
                direct = flags & os.O_DIRECT and not self._open_flags & os.O_DIRECT
                mode = self._io_modes[nodeid] = [not direct, 0]
            mode[1] += 1
            self._io_handles[fh] = nodeid
        return Open(fh, self._fopen_file, fd if mode[0] else -1)

    def _closed(self, fh: int) -> None:
        """Ends the passthrough bookkeeping of released file handle `fh`."""
        with self._io_lock:
            nodeid = self._io_handles.pop(fh, None)
            if nodeid is None:
                return
            mode = self._io_modes[nodeid]
            mode[1] -= 1
            if not mode[1]:
                del self._io_modes[nodeid]

    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        """Opens regular file `nodeid` with the allowed subset of `flags` (see _OPEN_FLAGS).

        An O_TRUNC open by a guest user other than root clears the set-user-ID bit (and set-group-ID
        with group execute), as truncation by that user would on the host; the daemon itself keeps
        them, having CAP_FSETID. The guest kernel leaves this to the daemon with or without
        killpriv_v2: FUSE_ATOMIC_O_TRUNC hands it the truncation, and no SETATTR follows.
        """
        with self._inodes.use(nodeid) as inode:
            opened = self._open_inode(inode, flags)
            if flags & os.O_TRUNC and ctx.uid != 0:
                with self._handles.use(opened.fh) as handle:
                    self._kill_suidgid(handle, FUSE_WRITE_KILL_SUIDGID)
            return opened

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int) -> tuple[Entry, Open]:
        """Creates and opens regular file `name`; an existing one is opened unless O_EXCL is in `flags`.

        The host call always uses O_CREAT | O_EXCL | O_NOFOLLOW, so it never opens an existing FIFO,
        device or symlink target; an existing name is looked up and opened like `open` instead.
        """
        self._check_writable()
        check_name(name)
        host_flags = self._host_flags(flags)
        with self._dir(parent) as dir_inode:
            perm = self._new_mode(dir_inode, mode, umask)
            try:
                with self._as_caller(ctx):
                    # keep: an exclusive create cannot be repeated once it has made the file.
                    fd = self._inodes.open_fd(lambda: os.open(
                        name, host_flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        perm, dir_fd=dir_inode.fd), keep=True)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                entry = self._lookup_at(dir_inode, name)
                try:
                    with self._inodes.use(entry.nodeid) as inode:
                        opened = self._open_inode(inode, flags)
                except BaseException:
                    self._inodes.forget(entry.nodeid, 1)
                    raise
                return entry, opened
            try:
                self._label(ctx, dir_inode.fd, name, fd=fd)
            except BaseException:
                os.close(fd)
                raise
            return self._open_new(fd, flags, dir_inode, name)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        """pread(2) on `fh` (the copying path; the server uses read_into)."""
        with self._handles.use(fh) as handle:
            return os.pread(handle.fd, size, offset)

    def read_into(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, dest: Writer) -> int:
        """preadv(2) from `fh` straight into `dest` (guest memory)."""
        with self._handles.use(fh) as handle:
            return dest.read_from_fd(handle.fd, size, offset)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: bytes, flags: int) -> int:
        """pwrite(2) on `fh` (the copying path; the server uses write_from)."""
        with self._handles.use(fh) as handle:
            self._kill_suidgid(handle, flags)
            return os.pwrite(handle.fd, data, offset)

    def write_from(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, src: Reader,
                   flags: int) -> int:
        """pwritev(2) to `fh` straight from `src` (guest memory)."""
        with self._handles.use(fh) as handle:
            self._kill_suidgid(handle, flags)
            return src.write_to_fd(handle.fd, size, offset)

    def _drop_capability(self, target: int | Inode) -> None:
        """Removes the remapped security.capability of `target` (an open fd, or a node), if there is one.

        The host kernel drops security.capability itself on write and chown, but not the name an
        xattrmap stores it under (see xattrmap.py).
        """
        if self._cap_name is None:
            return
        try:
            if isinstance(target, Inode):
                with self._proc_as_cwd():
                    os.removexattr(_fd_name(target.fd), self._cap_name)
            else:
                os.removexattr(target, self._cap_name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise

    def _kill_suidgid(self, handle: Handle, flags: int) -> None:
        # The daemon writes with CAP_FSETID, so the host kernel keeps set-id bits a write by the guest
        # user would have cleared; FUSE_WRITE_KILL_SUIDGID asks for that to be done here.
        self._drop_capability(handle.fd)
        if not flags & FUSE_WRITE_KILL_SUIDGID:
            return
        mode = os.fstat(handle.fd).st_mode
        new = mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            new &= ~stat.S_ISGID
        if new != mode:
            os.fchmod(handle.fd, stat.S_IMODE(new))

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        """Closes a duplicate of the host fd, so close(2)-time errors (NFS, quotas) reach the guest."""
        with self._handles.use(fh) as handle:
            self._locks.flush(handle.nodeid, lock_owner)
            os.close(os.dup(handle.fd))

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        """Forgets `fh`, and the lock owners' descriptions used through it; its fd closes once unused."""
        self._drop_handle(fh)
        self._closed(fh)
        self._locks.release(fh)

    @contextmanager
    def fd_for_mapping(self, nodeid: int, fh: int, writable: bool) -> Iterator[tuple[int, bool, int]]:
        """A host fd of regular file `nodeid` to map into the DAX window (vhostfs.dax), kept open for
        the block, with whether it is open for writing and the file's size.

        `fh` is an open handle of the node, or SETUPMAPPING_NO_FH: Linux's driver names none (its
        mappings outlive the opens), and the file is then opened here. It is opened for reading and
        writing even for a read-only mapping where the host allows it, as a VMM that maps the fd as
        shared guest RAM (QEMU 11.1) maps it writable either way and makes only the guest's view
        read-only; on a read-only share, or where the host refuses, a read-only mapping gets a
        read-only fd and a writable one EROFS/EACCES. A handle open read-only decides likewise what may
        be mapped (no writable mapping), and the fd lent is a writable description of its file where
        the host allows one. EBADF for an unknown handle, another node's or a directory's; EBADF too
        for a node that is not a regular file.
        """
        if fh == SETUPMAPPING_NO_FH:
            if writable:
                self._check_writable()
            with self._inodes.use(nodeid) as inode:
                if inode.kind != stat.S_IFREG:
                    raise fs_error(errno.EBADF)
                if self._readonly:
                    fd = self._reopen(inode, os.O_RDONLY)
                else:
                    try:
                        fd = self._reopen(inode, os.O_RDWR)
                    except OSError as e:
                        if writable or e.errno not in _READ_ONLY_ERRORS:
                            raise
                        fd = self._reopen(inode, os.O_RDONLY)
            try:
                fd_writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
                yield fd, fd_writable, os.fstat(fd).st_size
            finally:
                os.close(fd)
            return
        with self._handles.use(fh) as handle:
            if handle.is_dir or handle.nodeid != nodeid:
                raise fs_error(errno.EBADF)
            fd_writable = fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
            fd = -1
            if not fd_writable and not self._readonly:
                # The handle decides what may be mapped; the VMM gets a writable description of the
                # same file where the host allows one (see above).
                with contextlib.suppress(OSError):
                    fd = self._reopen_fd(handle.fd, os.O_RDWR)
            try:
                yield (handle.fd if fd < 0 else fd), fd_writable, os.fstat(handle.fd).st_size
            finally:
                if fd >= 0:
                    os.close(fd)

    def wants_dax(self, nodeid: int) -> bool:
        """Whether regular file `nodeid` has the host inode flag FS_DAX_FL (chattr +x): the file a
        guest mounted with dax=inode maps into its DAX window (vhostfs.dax). False for other kinds of
        node, and where the host file system keeps no such flag."""
        with self._inodes.use(nodeid) as inode:
            if inode.kind != stat.S_IFREG:
                return False
            try:
                fd = self._reopen(inode, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                return False
        try:
            buf = bytearray(8)
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        except OSError:
            return False
        finally:
            os.close(fd)
        return bool(_IOC_FLAGS.unpack_from(buf)[0] & _FS_DAX_FL)

    # -- locks (see locks.py) ---------------------------------------------------------------------
    def _lock_handle(self, fh: int, enabled: bool) -> Handle:
        if not enabled:
            raise fs_error(errno.ENOSYS)
        handle = self._handles.use(fh)
        if handle.is_dir:
            self._handles.unuse(handle)
            raise fs_error(errno.EBADF)
        return handle

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        """F_OFD_GETLK on `owner`'s host description of the file (ENOSYS unless posix_lock)."""
        with self._lock_handle(fh, self._posix_lock) as handle:
            start, end, kind, pid = self._locks.getlk(handle.nodeid, owner, fh, handle.fd, lock.start,
                                                      lock.end, lock.type)
        return Lock(start, end, kind, pid)

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock, wait: bool) -> None:
        """F_OFD_SETLK on `owner`'s host description; `wait` waits until the lock is free, EINTR once
        `ctx.interrupt` is set, EBADF when FLUSH or RELEASE drop the description (see locks.py)."""
        with self._lock_handle(fh, self._posix_lock) as handle:
            self._locks.setlk(handle.nodeid, owner, fh, handle.fd, lock.start, lock.end, lock.type,
                              lock.pid, wait, ctx.interrupt)

    def flock(self, ctx: Context, nodeid: int, fh: int, owner: int, kind: int, wait: bool) -> None:
        """flock(2) on the handle's own host fd, which is the guest's open file (ENOSYS unless flock)."""
        op = _FLOCK_OPS.get(kind)
        with self._lock_handle(fh, self._flock) as handle:
            if op is None:
                raise fs_error(errno.EINVAL)
            self._locks.flock(fh, handle.fd, op, wait, ctx.interrupt)

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int, umask: int) -> tuple[Entry, Open]:
        """openat(2) with O_TMPFILE in directory `parent`: an unnamed file the guest may link later."""
        self._check_writable()
        host_flags = (self._host_flags(flags) & ~os.O_TRUNC) | (flags & os.O_EXCL)
        with self._dir(parent) as dir_inode:
            perm = self._new_mode(dir_inode, mode, umask)
            with self._as_caller(ctx):
                fd = self._inodes.open_fd(lambda: os.open(
                    ".", host_flags | os.O_TMPFILE | os.O_CLOEXEC, perm, dir_fd=dir_inode.fd))
            try:
                self._label(ctx, dir_inode.fd, None, fd=fd)
            except BaseException:
                os.close(fd)
                raise
            return self._open_new(fd, flags, dir_inode)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        """fdatasync(2) or fsync(2) on `fh`."""
        with self._handles.use(fh) as handle:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        """fallocate(2) on `fh` with its FALLOC_FL_* `mode` (bits Linux does not define: EOPNOTSUPP, as
        the host would answer)."""
        self._check_writable()
        if mode & ~_FALLOC_FL_ALL:
            raise fs_error(errno.EOPNOTSUPP)
        with self._handles.use(fh) as handle:
            native.fallocate(handle.fd, mode, offset, length)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        """lseek(2) on `fh` (SEEK_DATA/SEEK_HOLE find data in sparse files)."""
        with self._handles.use(fh) as handle:
            return os.lseek(handle.fd, offset, whence)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        """copy_file_range(2) between two open handles; `flags` must be 0, as the syscall requires."""
        self._check_writable()
        if flags:
            raise fs_error(errno.EINVAL)
        with self._handles.use(fh_in) as src, self._handles.use(fh_out) as dst:
            return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)

    def ioctl(self, ctx: Context, nodeid: int, fh: int, flags: int, cmd: int, arg: int, in_data: bytes,
              out_size: int) -> tuple[int, bytes]:
        """FS_IOC_GETFLAGS and FS_IOC_SETFLAGS (chattr/lsattr inode flags), and FS_IOC_FSGETXATTR and
        FS_IOC_FSSETXATTR (the same flags as FS_XFLAG_*; a change of anything but the flags is
        EOPNOTSUPP) on the host file or directory of `fh`; ENOTTY for every other ioctl, which could
        reach host drivers or file systems in ways the guest must not. The guest kernel has already
        checked that the caller owns the file (and CAP_LINUX_IMMUTABLE for the immutable and
        append-only flags)."""
        with self._handles.use(fh) as handle:
            if handle.nodeid != nodeid:
                raise fs_error(errno.EBADF)
            buf = bytearray(8)
            if cmd in (_FS_IOC_GETFLAGS, _FS_IOC32_GETFLAGS):
                if out_size < _IOC_FLAGS.size:
                    raise fs_error(errno.EINVAL)
                fcntl.ioctl(handle.fd, _FS_IOC_GETFLAGS, buf)
                return 0, bytes(buf[:_IOC_FLAGS.size])
            if cmd in (_FS_IOC_SETFLAGS, _FS_IOC32_SETFLAGS):
                self._check_writable()
                if len(in_data) < _IOC_FLAGS.size:
                    raise fs_error(errno.EINVAL)
                buf[:_IOC_FLAGS.size] = in_data[:_IOC_FLAGS.size]
                fcntl.ioctl(handle.fd, _FS_IOC_SETFLAGS, buf)
                return 0, b""
            if cmd == _FS_IOC_FSGETXATTR:
                if out_size < _FSXATTR.size:
                    raise fs_error(errno.EINVAL)
                fsx = bytearray(_FSXATTR.size)
                fcntl.ioctl(handle.fd, _FS_IOC_FSGETXATTR, fsx)
                return 0, bytes(fsx)
            if cmd == _FS_IOC_FSSETXATTR:
                # Only the flags may change: a project id or extent size hint set from the guest would
                # reach host quotas and allocation, which the guest has no say in.
                self._check_writable()
                if len(in_data) < _FSXATTR.size:
                    raise fs_error(errno.EINVAL)
                current = bytearray(_FSXATTR.size)
                fcntl.ioctl(handle.fd, _FS_IOC_FSGETXATTR, current)
                wanted = _FSXATTR.unpack_from(in_data)
                have = _FSXATTR.unpack_from(current)
                if (wanted[1], wanted[3], wanted[4]) != (have[1], have[3], have[4]):
                    raise fs_error(errno.EOPNOTSUPP)
                _FSXATTR.pack_into(current, 0, wanted[0], *have[1:])
                fcntl.ioctl(handle.fd, _FS_IOC_FSSETXATTR, current)
                return 0, b""
        raise fs_error(errno.ENOTTY)

    def poll(self, ctx: Context, nodeid: int, fh: int, kh: int, flags: int, events: int) -> int:
        """Only regular files and directories are ever opened, and those the host always reports
        ready: the requested ones of POLLIN/POLLOUT (and their RDNORM/WRNORM twins)."""
        with self._handles.use(fh):
            return events & _ALWAYS_READY

    # -- directories --------------------------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Open:
        """Opens directory `nodeid` for reading (ENOTDIR for anything else)."""
        with self._dir(nodeid) as inode:
            fd = self._reopen(inode, os.O_RDONLY | os.O_DIRECTORY)
            return Open(self._new_handle(fd, nodeid, True), self._fopen_dir)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool) -> Iterable[DirEntry]:
        """Lists directory handle `fh` from cookie `offset`, starting with b"." and b"..".

        Offset 0 takes a fresh snapshot of the directory (the guest's opendir or rewinddir); later
        cookies index into that snapshot, so resuming is exact however the directory changes meanwhile.
        Entry i of the snapshot has cookie i + 1. Without `plus` the snapshot itself is the answer
        (HostDirents: the host's own records).

        With `plus`, the answer is a HostDirentsPlus: every entry but b"." and b".." carries a lookup,
        counted when the entry is produced (iterated, or in `lookup` batches); entries never produced
        count nothing, and the consumer forgets a produced entry it did not send (as the server
        does). An entry that vanished before its lookup is skipped. Errors for the handle itself are
        raised here, before any entry is produced.
        """
        with self._handles.use(fh) as handle:
            if not handle.is_dir:
                raise fs_error(errno.ENOTDIR)
            with handle.lock:
                if offset == 0 or handle.listing is None:
                    handle.listing = self._snapshot(handle)
                listing = HostDirents(handle.listing.data, handle.listing.offsets, max(offset, 0))
        return _PlusListing(self, handle.nodeid, listing) if plus else listing

    def _snapshot(self, handle: Handle) -> HostDirents:
        """All entries of directory `handle`, read with getdents64(2) from the start; b"." and b".."
        come first, b".." of the root being the root itself."""
        st = os.stat(handle.fd)
        if handle.nodeid == ROOT_ID:
            parent_ino = st.st_ino
        else:
            parent_ino = os.stat("..", dir_fd=handle.fd, follow_symlinks=False).st_ino
        dots = _dirent_record(b".", st.st_ino) + _dirent_record(b"..", parent_ino)
        os.lseek(handle.fd, 0, os.SEEK_SET)
        data = dots + native.getdents(handle.fd)
        offsets = array("I", (0, len(dots) // 2))
        offsets.extend(native.index_dirents(data, len(dots)))
        return HostDirents(data, offsets)

    def _entries(self, nodeid: int, listing: HostDirents) -> Iterator[DirEntry]:
        # The directory is in use from the first pull until the consumer closes the generator.
        with self._dir(nodeid) as dir_inode:
            for d in listing:
                if d.name in _DOTS:
                    yield d
                    continue
                try:
                    entry = self._lookup_at(dir_inode, d.name)
                except FileNotFoundError:
                    continue
                yield DirEntry(d.name, entry.attr.st_ino, stat.S_IFMT(entry.attr.st_mode) >> 12, d.offset,
                               entry)

    def _lookup_listed(self, nodeid: int, listing: HostDirents, first: int,
                       count: int) -> tuple[bytearray, array]:
        """HostDirentsPlus.lookup of entries first..first+count of `listing` in directory `nodeid`: one
        statx(2) per entry gives the attributes and the key the table knows a node by, the known
        nodes are counted under one lock, and only a new node is opened (as `_lookup_at`)."""
        data, offsets = listing.data, listing.offsets
        with self._dir(nodeid) as dir_inode:
            dir_fd = dir_inode.fd
            stats = native.stat_dirents(dir_fd, data, offsets, first, count)
            size, err_at = native.STAT.size, native.STAT_ERR_OFFSET
            err_of, key_of = native.STAT_ERR, native.STAT_KEY
            keys: list[tuple[int, int, int] | None] = []
            names = []
            for i in range(count):
                name_at = offsets[first + i] + LINUX_DIRENT64.size
                names.append(data[name_at:data.index(b"\0", name_at)])
                err, has_mnt_id = err_of.unpack_from(stats, i * size + err_at)
                if err and err != errno.ENOENT:
                    raise OSError(err, os.strerror(err))
                keys.append(key_of.unpack_from(stats, i * size) if has_mnt_id and not err else None)
            inodes = self._inodes.ref_known_many(keys, nodeid, names)
            counted = [inode.nodeid for inode in inodes if inode is not None]
            nodeids = array("Q", bytes(8 * count))
            try:
                for i, inode in enumerate(inodes):
                    if inode is None:
                        if names[i] in _DOTS or err_of.unpack_from(stats, i * size + err_at)[0]:
                            continue
                        inode = self._add_listed(dir_fd, nodeid, names[i], stats, i * size)
                        if inode is None:
                            continue
                        counted.append(inode.nodeid)
                    nodeids[i] = inode.nodeid
                if self._submounts:
                    self._flag_submounts(dir_fd, stats, count)
                if self._ids is not None:
                    self._guest_ids(stats, nodeids)
            except BaseException:
                for counted_id in counted:
                    self._inodes.forget(counted_id, 1)
                raise
        return stats, nodeids

    def _hold_new(self, dir_fd: int, name: bytes, parent: int | None,
                  seen: bytes | None) -> tuple[Inode, os.stat_result]:
        """Opens `name` below dir_fd with O_PATH (within the fd budget) and counts it as a new child of
        node `parent`, seen as `seen` (see Inodes.add): the node and the attributes of its fd."""
        fd = self._inodes.open_fd(lambda: os.open(name, _O_PATH, dir_fd=dir_fd))
        try:
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._inodes.add(fd, st, parent, seen), st

    def _add_listed(self, dir_fd: int, parent: int, name: bytes, stats: bytearray, at: int) -> Inode | None:
        """Opens and counts a listed entry the table does not know, and writes the attributes of the
        fd it is held by into the STAT record at `at`; None (the record's err ENOENT) if it vanished."""
        try:
            inode, st = self._hold_new(dir_fd, name, parent, name)
        except FileNotFoundError:
            native.STAT_ERR.pack_into(stats, at + native.STAT_ERR_OFFSET, errno.ENOENT, 0)
            return None
        (at_s, at_ns), (mt_s, mt_ns), (ct_s, ct_ns) = (divmod(t, 1_000_000_000) for t in (
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns))
        native.STAT.pack_into(stats, at, st.st_dev, st.st_ino, inode.key[2], st.st_size, st.st_blocks, at_s,
                              mt_s, ct_s, at_ns, mt_ns, ct_ns, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                              st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0, 0, 1)
        return inode

    def _guest_ids(self, stats: bytearray, nodeids: array) -> None:
        """Translates the owner and group of the STAT records of the listed nodes to the guest's
        (see translate_uid), as _guest_attr does for one."""
        ids = self._ids
        assert ids is not None
        owner, at = native.STAT_OWNER, native.STAT_OWNER_OFFSET
        for i, nid in enumerate(nodeids):
            if nid:
                uid, gid = owner.unpack_from(stats, i * native.STAT.size + at)
                owner.pack_into(stats, i * native.STAT.size + at, ids.uid_to_guest(uid),
                                ids.gid_to_guest(gid))

    def _flag_submounts(self, dir_fd: int, stats: bytearray, count: int) -> None:
        """Sets FUSE_ATTR_SUBMOUNT in the STAT records of the directories on another host file
        system than directory `dir_fd` (see announce_submounts)."""
        dev = os.stat(dir_fd).st_dev
        for i in range(count):
            record = native.STAT.unpack_from(stats, i * native.STAT.size)
            if not record[18] and stat.S_ISDIR(record[11]) and record[0] != dev:
                native.STAT.pack_into(stats, i * native.STAT.size, *record[:17], FUSE_ATTR_SUBMOUNT,
                                      *record[18:])

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        """Forgets directory handle `fh` and its snapshot."""
        self._drop_handle(fh)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        """fsync(2) (or fdatasync) on the directory handle."""
        self.fsync(ctx, nodeid, fh, datasync)

    # -- file system --------------------------------------------------------------------------------
    def statfs(self, ctx: Context, nodeid: int) -> StatVfs:
        """fstatvfs(2) of the file system holding `nodeid`."""
        with self._inodes.use(nodeid) as inode:
            v = os.fstatvfs(inode.fd)
        return StatVfs(f_blocks=v.f_blocks, f_bfree=v.f_bfree, f_bavail=v.f_bavail, f_files=v.f_files,
                       f_ffree=v.f_ffree, f_bsize=v.f_bsize, f_namemax=v.f_namemax, f_frsize=v.f_frsize)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Checks R_OK/W_OK/X_OK `mask` for the caller against the mode bits (EACCES when denied).

        The caller's supplementary groups are not known over FUSE, so only its primary gid counts.
        uid 0 passes everything except X_OK on a file no one can execute, as for root on the host.
        """
        with self._inodes.use(nodeid) as inode:
            st = self._guest_attr(os.stat(inode.fd))
        if mask & os.W_OK and self._readonly:
            raise fs_error(errno.EROFS)
        check_access(ctx, st.st_mode, st.st_uid, st.st_gid, mask)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """syncfs(2) of the shared directory's file system (it needs a real fd, not O_PATH)."""
        fd = self._reopen(self._inodes.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            native.syncfs(fd)
        finally:
            os.close(fd)

    # -- extended attributes --------------------------------------------------------------------------
    def _check_xattr(self, name: bytes | None = None, *, modify: bool = False) -> None:
        """ENOSYS unless xattr=True; EROFS for changes to a read-only share; EINVAL for a bad name."""
        if not self._xattr:
            raise fs_error(errno.ENOSYS)
        if modify:
            self._check_writable()
        if name is not None and (not name or b"\0" in name):
            raise fs_error(errno.EINVAL)

    def _host_name(self, name: bytes) -> bytes:
        """The host name of guest attribute `name` under the xattrmap (EPERM/ENOTSUP if refused)."""
        return name if self._xattrmap is None else self._xattrmap.to_host(name)

    @contextmanager
    def _proc_as_cwd(self) -> Iterator[None]:
        """Runs the block with the held /proc as the calling thread's working directory, so that the
        relative name `_fd_name(fd)` reaches the node of O_PATH `fd` in the extended attribute calls.

        getxattr(2) and its kin take a path and no dir_fd; fgetxattr(2) and its kin refuse O_PATH fds;
        and a real fd would mean opening FIFOs and devices, which the passthrough never does. An absolute
        /proc/self/fd/N does not do either: under --sandbox=chroot no /proc is visible, and the name
        resolves inside the share, which the guest controls. Relative to the held /proc the magic link
        works whatever the process root is. The calls follow it (they are not the l*xattr ones) and it
        lands on the inode the O_PATH fd holds: for a symlink, the symlink itself and never its target,
        so a symlink's attributes mean what lgetxattr(2) gives on the host.

        Threads share one working directory unless they unshare(CLONE_FS): a thread does that once,
        before its first change, so no other thread ever sees /proc as its working directory. From then
        on the thread's working directory, root and umask are its own copies: a later chdir, chroot or
        umask by another thread no longer reaches it (the daemon makes those before it serves). The
        previous working directory is restored at the end of the block.
        """
        if not getattr(_own_fs, "done", False):
            native.unshare(_CLONE_FS)
            _own_fs.done = True
        home = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fchdir(self._proc_fd)
            try:
                yield
            finally:
                os.fchdir(home)
        finally:
            os.close(home)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, *,
                 kill_sgid: bool = False) -> None:
        """setxattr(2) with XATTR_CREATE/XATTR_REPLACE `flags` (ENOSYS unless xattr=True).

        `kill_sgid` (FUSE_SETXATTR_ACL_KILL_SGID, sent with an access ACL) clears the set-group-ID bit
        afterwards: the guest found its caller outside the file's group, where the host kernel would
        clear it, but the daemon sets the ACL with CAP_FSETID, which keeps it.
        """
        self._check_xattr(name, modify=True)
        host_name = self._host_name(name)
        if self._ids is not None:
            value = self._ids.xattr_to_host(name, value)
        with self._inodes.use(nodeid) as inode, self._proc_as_cwd():
            os.setxattr(_fd_name(inode.fd), host_name, value, flags)
            if kill_sgid:
                mode = os.stat(inode.fd).st_mode
                if mode & stat.S_ISGID:
                    os.chmod(_fd_name(inode.fd), stat.S_IMODE(mode) & ~stat.S_ISGID, dir_fd=self._proc_fd)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        """getxattr(2): the value, or ENODATA (ENOSYS unless xattr=True)."""
        self._check_xattr(name)
        host_name = self._host_name(name)
        with self._inodes.use(nodeid) as inode, self._proc_as_cwd():
            value = os.getxattr(_fd_name(inode.fd), host_name)
        return value if self._ids is None else self._ids.xattr_to_guest(name, value)

    def listxattr(self, ctx: Context, nodeid: int) -> list[bytes]:
        """listxattr(2): the attribute names, as the xattrmap shows them (ENOSYS unless xattr=True)."""
        self._check_xattr()
        with self._inodes.use(nodeid) as inode, self._proc_as_cwd():
            names = [os.fsencode(n) for n in os.listxattr(_fd_name(inode.fd))]
        if self._xattrmap is None:
            return names
        return [g for g in map(self._xattrmap.to_guest, names) if g is not None]

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        """removexattr(2) (ENOSYS unless xattr=True)."""
        self._check_xattr(name, modify=True)
        host_name = self._host_name(name)
        with self._inodes.use(nodeid) as inode, self._proc_as_cwd():
            os.removexattr(_fd_name(inode.fd), host_name)
