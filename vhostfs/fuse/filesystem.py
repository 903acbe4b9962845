"""The Filesystem API: what a file system served by vhostfs implements.

Subclass `Filesystem` and override the operations your file system supports; the rest answer ENOSYS.
The FUSE server calls these methods with already-validated arguments:

- Nodes are identified by *nodeids* (ints) that the file system itself hands out in `Entry.nodeid`.
  `ROOT_ID` (1) is the root and always exists. The kernel keeps a lookup count per nodeid: every
  `Entry` returned by lookup, mknod, mkdir, symlink, link, create and readdirplus adds one, and
  `forget(nodeid, n)` takes n away; at zero the file system may drop the node.
- Names are `bytes`: a single path component, never empty, never containing b"/" or NUL, at most
  255 bytes. `lookup` may also receive b"." and b"..".
- File handles (`fh`) are ints the file system returns from open/opendir/create and gets back on
  read, write, release and the like. They are the file system's own keys, never trusted pointers.
- Errors: raise `OSError(errno.X, ...)`; the guest sees -X. Any other exception is a bug in the file
  system: the server logs it and answers EIO.
- `ctx` carries the caller's uid, gid and pid (as the guest kernel reports them).

Methods may be called concurrently from several threads (one per queue or worker). A blocking lock
request (`setlk`/`flock` with `wait`) may wait as long as the lock is held, on a thread of its own, as
long as it gives up with EINTR once `ctx.interrupt` is set (see `Context`).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from vhostfs.iov import Reader, Writer

ROOT_ID = 1


@dataclass(frozen=True, slots=True)
class Context:
    """Who is asking: the credentials the guest kernel sent with the request.

    `interrupt` is set only for a request that may wait without bound (a blocking lock: `setlk` or
    `flock` with `wait`): an event the server sets when the request must stop waiting, because the
    client interrupted it (FUSE_INTERRUPT), the session ended (reset, DESTROY, a new INIT) or the
    transport is stopping. A file system that waits polls it or sleeps in `interrupt.wait(timeout)`,
    and once it is set gives up and raises EINTR. It is None for every other request, which the
    server does not track and which must not wait without bound.

    `security_context` is the security label the guest's LSM chose for the node a `create`, `mkdir`,
    `mknod`, `symlink` or `tmpfile` makes: (extended attribute name, value), such as
    (b"security.selinux", b"system_u:object_r:tmp_t:s0\0"). The name is 1 to 255 bytes without NUL,
    the value 1 byte or more, both as the client sent them. The client sends one only once `init` has
    added FUSE_SECURITY_CTX to `conn.want` (and its LSM has a label to give); it is None otherwise and
    for every other request. A file system that asked for it labels the new node before it answers,
    and if it cannot, removes the node again and raises the error.
    """

    uid: int
    gid: int
    pid: int
    interrupt: threading.Event | None = None
    security_context: tuple[bytes, bytes] | None = None


class Attr(Protocol):
    """File attributes, as `os.stat_result` has them (an `os.stat_result` is an `Attr`).

    `st_ino` is what the guest sees as the inode number; it need not equal the nodeid.
    """

    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blocks: int
    st_blksize: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int


@dataclass(slots=True)
class Stat:
    """A plain `Attr` for file systems that do not start from os.stat().

    `attr_flags` are the fuse_attr.flags bits of a getattr or setattr reply (FUSE_ATTR_DAX: the file
    is to be mapped by a guest mounted dax=inode); an `os.stat_result` has none.
    """

    st_ino: int = 0
    st_mode: int = 0
    st_nlink: int = 1
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blocks: int = 0
    st_blksize: int = 4096
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0
    attr_flags: int = 0


@dataclass(slots=True)
class Entry:
    """The answer to lookup and to the calls that create a node.

    The server counts one kernel reference on `nodeid` for each Entry it sends back.
    `entry_timeout` and `attr_timeout` (seconds) say how long the guest may cache the name and the
    attributes. A negative lookup can be cached by returning nodeid 0 (instead of raising ENOENT).
    `attr_flags` are fuse_attr.flags bits such as FUSE_ATTR_SUBMOUNT (a directory that is the root of
    another host file system, which the guest then shows as a submount with its own st_dev).
    """

    nodeid: int
    attr: Attr
    generation: int = 0
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    attr_flags: int = 0


@dataclass(slots=True)
class StatVfs:
    """File system statistics for statfs (the fields of statvfs(3))."""

    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_bsize: int = 4096
    f_namemax: int = 255
    f_frsize: int = 4096


@dataclass(slots=True)
class DirEntry:
    """One directory entry for readdir/readdirplus.

    `offset` is the cookie that resumes the listing *after* this entry (it is passed back as `offset`
    to the next readdir call); it must be non-zero and unique within the directory stream.
    `ino` and `type` (the S_IFMT bits >> 12, as in d_type) fill the plain readdir record.
    For readdirplus, `entry` carries the lookup result (it counts as a lookup); None means the
    guest gets the name only.
    """

    name: bytes
    ino: int
    type: int
    offset: int
    entry: Entry | None = None


#: linux_dirent64 (getdents64(2)): d_ino, d_off, d_reclen, d_type; the NUL-terminated name follows.
LINUX_DIRENT64 = struct.Struct("<QqHB")
assert LINUX_DIRENT64.size == 19


class HostDirents:
    """Directory entries in the host kernel's own format, which `readdir` may return as it is.

    `data` holds linux_dirent64 records as getdents64(2) returns them (d_off is not used) and
    `offsets` the offset in `data` of each record to list, in listing order: entry i has cookie
    i + 1. The listing begins at entry `start`. Iterating yields the DirEntry objects this stands
    for, so any consumer can use it as one; the FUSE server also packs a plain READDIR reply from it
    in one native call, without an object per entry. It carries no lookups: readdirplus needs
    DirEntry objects with `entry` set.
    """

    __slots__ = ("data", "offsets", "start")

    def __init__(self, data: bytes, offsets: array, start: int = 0) -> None:
        self.data = data
        self.offsets = offsets
        self.start = start

    def __iter__(self) -> Iterator[DirEntry]:
        data = self.data
        offsets = self.offsets
        for index in range(max(self.start, 0), len(offsets)):
            off = offsets[index]
            ino, _, reclen, dtype = LINUX_DIRENT64.unpack_from(data, off)
            name_at = off + LINUX_DIRENT64.size
            yield DirEntry(data[name_at:data.index(b"\0", name_at, off + reclen)], ino, dtype, index + 1)


class HostDirentsPlus(HostDirents):
    """A READDIRPLUS listing of host records whose lookups the file system makes in batches.

    The FUSE server packs a reply from it in native calls, without an object per entry: it works out
    how many entries from `start` fit and asks `lookup(first, count)` for them (and for more while
    room is left). Iterating yields DirEntry
    objects with their `entry` set, a lookup counted as each one is pulled, for any other consumer
    (such as a file system that wraps this one and changes the entries).
    """

    __slots__ = ()

    def lookup(self, first: int, count: int) -> tuple[bytearray, array, float, float]:
        """Counts a lookup of each of entries first..first+count (entry i has cookie i + 1) and
        returns (stats, nodeids,
        entry_timeout, attr_timeout): `stats` holds `count` `vhostfs.native.STAT` records (their
        `err` set for an entry that vanished, which counts nothing and is not listed) and `nodeids`
        (array "Q") the node of each, 0 for b"." and b".." (listed without a node). Raises OSError,
        with nothing counted, for an error other than a vanished entry."""
        raise NotImplementedError


#: SetAttr.atime/mtime value meaning "now" (UTIME_NOW).
TIME_NOW = -1


@dataclass(slots=True)
class SetAttr:
    """The attributes a setattr call changes; None means unchanged.

    `atime_ns`/`mtime_ns` are nanoseconds since the epoch, or `TIME_NOW` for the current time.
    `fh` is set when the guest passed an open file handle (ftruncate, fchmod, ...).
    `kill_suidgid` asks the file system to clear set-user-ID/set-group-ID bits (FATTR_KILL_SUIDGID).
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    fh: int | None = None
    kill_suidgid: bool = False


@dataclass(slots=True)
class ConnectionInfo:
    """What the client offered at INIT, and what the file system wants from it.

    `capable` holds the FUSE_* INIT flags the client supports (flags | flags2 << 32). A file system
    may add flags to `want` in `init`; the server sends `want & capable` back. `max_write` and
    `max_readahead` may be lowered.
    """

    proto_major: int
    proto_minor: int
    capable: int
    want: int
    max_write: int
    max_readahead: int
    max_pages: int
    extra: dict = field(default_factory=dict)


@dataclass(slots=True)
class Lock:
    """A POSIX record lock as FUSE carries it (fuse_file_lock).

    `start` and `end` are inclusive byte offsets; `end` 0x7fffffffffffffff (OFFSET_MAX) means "to the
    end of the file". `type` is fcntl's F_RDLCK, F_WRLCK or F_UNLCK; `pid` the guest process that
    holds (or asks for) the lock, 0 when unknown.
    """

    start: int
    end: int
    type: int
    pid: int = 0


#: statx(2) mask bits (<linux/stat.h>) a `Statx` reports in `mask`.
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800


@dataclass(slots=True)
class Statx:
    """The answer to statx: the fields of fuse_statx, which are those of statx(2)'s struct statx.

    `mask` holds the STATX_* bits of the fields that are filled in; the guest kernel refreshes its
    cached attributes only when all of STATX_BASIC_STATS are there. Times are nanoseconds since the
    epoch; `attributes` and `attributes_mask` are STATX_ATTR_* bits. The guest kernel takes the
    device of the node from its own mount, so `dev_major`/`dev_minor` are informative only.
    """

    mask: int = 0
    blksize: int = 4096
    attributes: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mode: int = 0
    ino: int = 0
    size: int = 0
    blocks: int = 0
    attributes_mask: int = 0
    atime_ns: int = 0
    btime_ns: int = 0
    ctime_ns: int = 0
    mtime_ns: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    dev_major: int = 0
    dev_minor: int = 0

    @classmethod
    def from_attr(cls, a: Attr) -> Statx:
        """The STATX_BASIC_STATS of `a` (an `os.stat_result` or `Stat`); no birth time."""
        dev = getattr(a, "st_dev", 0)
        return cls(mask=STATX_BASIC_STATS, blksize=a.st_blksize, nlink=a.st_nlink, uid=a.st_uid, gid=a.st_gid,
                   mode=a.st_mode, ino=a.st_ino, size=a.st_size, blocks=a.st_blocks, atime_ns=a.st_atime_ns,
                   ctime_ns=a.st_ctime_ns, mtime_ns=a.st_mtime_ns, rdev_major=os.major(a.st_rdev),
                   rdev_minor=os.minor(a.st_rdev), dev_major=os.major(dev), dev_minor=os.minor(dev))


@dataclass(slots=True)
class Open:
    """The answer to open, opendir and create: the handle plus FOPEN_* flags for the guest.

    `backing_fd`, for an open regular file, offers FUSE passthrough (docs/fuse-passthrough.md): an
    open host fd of the very file the handle reads and writes, which the transport may register with
    the kernel (FUSE_DEV_IOC_BACKING_OPEN) so that the kernel reads, writes and mmaps the host file
    itself, without READ and WRITE requests for this handle. -1 (the default) serves the data through
    the file system. Only /dev/fuse can pass files through, and only when INIT negotiated
    FUSE_PASSTHROUGH (a file system that may offer one keeps FUSE_PASSTHROUGH in `conn.want` in
    `init`); elsewhere the field is ignored. The fd must stay open until the reply is sent (the
    kernel holds its own reference from then on); the file system still owns and closes it.

    The kernel requires every open of one node to be passed through while any passed-through open of
    it is live (another open fails with EIO), and all of them to share one backing file: the
    transport reuses the node's backing id, and a file system that offers `backing_fd` for a node
    must offer it for every open of that node until the last such handle is released.
    """

    fh: int
    flags: int = 0
    backing_fd: int = -1


def fs_error(code: int) -> OSError:
    """The exception a Filesystem raises to answer `-code` (an errno value), with its message."""
    return OSError(code, os.strerror(code))


def check_name(name: bytes) -> None:
    """Raises EINVAL unless `name` is one ordinary path component (not empty, no b"/" or NUL, not b"."
    or b".."), ENAMETOOLONG past 255 bytes: for file systems that check again what the server checked,
    or that pass names on to others."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise fs_error(errno.EINVAL)
    if len(name) > 255:
        raise fs_error(errno.ENAMETOOLONG)


def check_access(ctx: Context, mode: int, uid: int, gid: int, mask: int) -> None:
    """Raises EACCES unless the caller of `ctx` may do `mask` (R_OK/W_OK/X_OK) to a node with these mode
    bits and owner, by the classic owner/group/other rule: root passes everything but executing a
    file with no execute bit. For file systems that answer FUSE_ACCESS from their own attributes."""
    mask &= os.R_OK | os.W_OK | os.X_OK
    if ctx.uid == 0:
        if mask & os.X_OK and not stat.S_ISDIR(mode) and not mode & 0o111:
            raise fs_error(errno.EACCES)
        return
    if uid == ctx.uid:
        granted = mode >> 6
    elif gid == ctx.gid:
        granted = mode >> 3
    else:
        granted = mode
    if mask & ~granted & 0o7:
        raise fs_error(errno.EACCES)


def _nosys() -> OSError:
    return fs_error(errno.ENOSYS)


#: FUSE_SETUPMAPPING's fh when the request names no open file: Linux always sends it (fs/fuse/dax.c,
#: fuse_setup_one_mapping), mapping by inode.
SETUPMAPPING_NO_FH = (1 << 64) - 1


class Filesystem:
    """Base class of file systems served over virtio-fs or /dev/fuse. Every operation raises ENOSYS.

    Override what your file system supports. Methods that create a node return an `Entry`; those
    that only change state return None. All of them raise OSError(errno) to fail.
    """

    # -- session --------------------------------------------------------------------------------
    def init(self, conn: ConnectionInfo) -> None:
        """Called once after INIT negotiation, before any other request. May adjust `conn.want`."""

    def destroy(self) -> None:
        """Called when the session ends (DESTROY, unmount or device reset). Release everything."""

    def save_state(self) -> list[tuple[bytes, int, bytes]]:
        """The file system's part of a session being moved (live migration, live upgrade): sections
        of (4-byte tag, version, payload) for `vhostfs.fuse.session_state`. Called while no request
        runs; the session goes on here if the move fails. A file system that cannot move its
        session raises OSError saying why (the default: EOPNOTSUPP)."""
        raise OSError(errno.EOPNOTSUPP, f"{type(self).__name__} cannot save its session state")

    def resume_after_save(self) -> None:
        """The session `save_state` saved goes on here after all (the move failed or was cancelled)."""

    def load_state(self, sections: dict) -> None:
        """Takes over a session from the sections `save_state` made (tag -> (version, payload)),
        before any request of it arrives. Must check every count, size, id and name and raise
        `vhostfs.fuse.session_state.StateError` for what it cannot account for, changing nothing."""
        raise OSError(errno.EOPNOTSUPP, f"{type(self).__name__} cannot load a session state")

    # -- names ----------------------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        """Looks `name` up in directory `parent`. Raises ENOENT if it does not exist."""
        raise _nosys()

    def forget(self, nodeid: int, nlookup: int) -> None:
        """The kernel dropped `nlookup` references to `nodeid`. Never answered, so never raises."""

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        """Returns (attributes, attr_timeout in seconds) of `nodeid`; `fh` if the caller has it open."""
        raise _nosys()

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> tuple[Statx, float]:
        """statx(2) of `nodeid`: returns (attributes, attr_timeout in seconds); `fh` if the caller has it
        open.

        `mask` holds the STATX_* fields the caller asks for and `flags` its AT_STATX_SYNC_* bits; as
        with statx(2) the answer may hold more or fewer fields, and says which in `Statx.mask`. The
        guest kernel asks only for fields beyond STATX_BASIC_STATS (a birth time), and on ENOSYS
        stops asking and uses `getattr` from then on. `Statx.from_attr` builds one from a stat result.
        """
        raise _nosys()

    def setattr(self, ctx: Context, nodeid: int, changes: SetAttr) -> tuple[Attr, float]:
        """Applies `changes` to `nodeid` and returns (new attributes, attr_timeout)."""
        raise _nosys()

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        """Returns the target of symlink `nodeid` as bytes (data, never followed)."""
        raise _nosys()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        """Creates symlink `name` in `parent` pointing at `target`."""
        raise _nosys()

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        """Creates a regular file, FIFO, socket or device node `name` (type in `mode`)."""
        raise _nosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        """Creates directory `name` in `parent`. `mode` is already masked unless `umask` is set."""
        raise _nosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        """Removes the non-directory `name` from `parent`."""
        raise _nosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        """Removes the empty directory `name` from `parent`."""
        raise _nosys()

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        """Renames `parent/name` to `newparent/newname`; `flags` are RENAME_* of renameat2(2)."""
        raise _nosys()

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        """Creates hard link `newparent/newname` to `nodeid`."""
        raise _nosys()

    # -- files ----------------------------------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        """Opens `nodeid` with open(2) `flags`; returns the handle the guest will use."""
        raise _nosys()

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int) -> tuple[Entry, Open]:
        """Creates and opens regular file `name` in `parent` (open(2) with O_CREAT)."""
        raise _nosys()

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        """Returns up to `size` bytes at `offset` (fewer only at end of file).

        The simple path; `read_into` calls it unless overridden.
        """
        raise _nosys()

    def read_into(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int,
                  dest: Writer) -> int:
        """Fills `dest` (guest memory, `dest.available` >= size) with up to `size` bytes at `offset`.

        Returns the number of bytes written into `dest`. The zero-copy path: a file system backed by
        an fd calls `dest.read_from_fd(fd, size, offset)`. The default calls `read`.
        """
        data = self.read(ctx, nodeid, fh, offset, size)
        return dest.write(data[:size])

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: bytes, flags: int) -> int:
        """Writes `data` at `offset`; returns the bytes written. The simple path of `write_from`."""
        raise _nosys()

    def write_from(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, src: Reader,
                   flags: int) -> int:
        """Writes the `size` bytes of `src` at `offset`; returns the bytes written.

        The zero-copy path: an fd-backed file system calls `src.write_to_fd(fd, size, offset)`.
        `flags` holds FUSE_WRITE_* bits. The default copies the bytes and calls `write`.
        """
        return self.write(ctx, nodeid, fh, offset, src.read(size), flags)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        """Called on every close(2) of a file descriptor referring to `fh`."""

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        """The last reference to `fh` is gone; free it. Errors are not reported to anyone."""

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        """Flushes `fh` to stable storage (data only when `datasync`)."""
        raise _nosys()

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        """F_GETLK for lock `owner`: a lock that would conflict with `lock`, or `lock` with type F_UNLCK.

        Locks are served here only when `init` adds FUSE_POSIX_LOCKS to `conn.want`; otherwise the
        guest kernel keeps POSIX locks to itself and never calls getlk/setlk.
        """
        raise _nosys()

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock, wait: bool) -> None:
        """F_SETLK (F_SETLKW when `wait`) for lock `owner`: takes or drops (F_UNLCK) a record lock.

        Raises EAGAIN when another owner's lock conflicts and `wait` is false. With `wait`, waits until
        the lock can be taken, or raises EINTR once `ctx.interrupt` is set. Every lock of an owner on
        a node goes when `flush` is called with that owner.
        """
        raise _nosys()

    def flock(self, ctx: Context, nodeid: int, fh: int, owner: int, kind: int, wait: bool) -> None:
        """flock(2) on handle `fh`, `kind` being F_RDLCK (shared), F_WRLCK (exclusive) or F_UNLCK.

        Called only when `init` adds FUSE_FLOCK_LOCKS to `conn.want`. Raises EAGAIN on conflict unless
        `wait`, which waits as `setlk` does (EINTR once `ctx.interrupt` is set). The lock belongs to
        the handle and goes with it, and is dropped before `release` when the guest asks for it
        (FUSE_RELEASE_FLOCK_UNLOCK).
        """
        raise _nosys()

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int, umask: int) -> tuple[Entry, Open]:
        """Creates and opens an unnamed regular file in directory `parent` (open(2) with O_TMPFILE)."""
        raise _nosys()

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        """fallocate(2) on `fh`."""
        raise _nosys()

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE (and plain seeks) on `fh`; returns the resulting offset."""
        raise _nosys()

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        """Copies `length` bytes between two open files on the host side; returns bytes copied."""
        raise _nosys()

    def bmap(self, ctx: Context, nodeid: int, block: int, blocksize: int) -> int:
        """The device block holding logical block `block` (of `blocksize` bytes) of file `nodeid`.

        Meaningful only for a file system on a block device (the guest asks for FIBMAP and swap
        files); others keep the default ENOSYS, which the guest remembers and stops asking.
        """
        raise _nosys()

    def ioctl(self, ctx: Context, nodeid: int, fh: int, flags: int, cmd: int, arg: int, in_data: bytes,
              out_size: int) -> tuple[int, bytes]:
        """ioctl(2) `cmd` on open file (or, with FUSE_IOCTL_DIR in `flags`, directory) `fh`.

        Only restricted ioctls reach a FUSE file system: the guest kernel derives the data from
        `cmd`'s _IOC direction and size, sends what the caller passes in as `in_data`, and copies
        back to the caller at most `out_size` bytes. `arg` is the caller's raw argument (an address
        in guest memory, never to be dereferenced here). Returns (result, out data): `result` is
        ioctl(2)'s non-negative return value (a signed 32-bit int) and the out data at most `out_size`
        bytes. Raise ENOTTY for a `cmd` the file system does not know.

        `flags` are FUSE_IOCTL_* bits: FUSE_IOCTL_COMPAT (the caller is a 32-bit process on a 64-bit
        guest) and FUSE_IOCTL_32BIT (its structs use 32-bit layouts, which `cmd`'s size reflects), and
        FUSE_IOCTL_DIR. The server answers unrestricted ioctls (FUSE_IOCTL_UNRESTRICTED, CUSE only)
        with ENOSYS itself, and never asks the guest to retry (FUSE_IOCTL_RETRY) with other buffers.
        """
        raise _nosys()

    def poll(self, ctx: Context, nodeid: int, fh: int, kh: int, flags: int, events: int) -> int:
        """poll(2) on open file `fh`: returns the POLL* bits of `events` that are ready now.

        `kh` is the guest kernel's handle of the poll and `flags` may hold FUSE_POLL_SCHEDULE_NOTIFY,
        asking to be told (FUSE_NOTIFY_POLL) when readiness changes. This server sends no
        notifications, so a file system answers with the current readiness only; a file that is
        never ready would leave the caller waiting, which is why ordinary files report ready. The
        default ENOSYS makes the guest treat every file as always readable and writable.
        """
        raise _nosys()

    # -- directories ----------------------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Open:
        """Opens directory `nodeid` for listing."""
        raise _nosys()

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool) -> Iterable[DirEntry]:
        """Yields the entries after cookie `offset` (0 starts from the beginning).

        The server stops consuming once the guest's buffer is full and resumes from the last
        accepted entry's `offset` on the next call, so a generator is the natural shape. With
        `plus`, fill `DirEntry.entry`; an entry that did not fit is not counted as a lookup.
        Without `plus`, a `HostDirents` (entries as the host's getdents64 gave them) is the fast
        answer for a file system that lists host directories.
        """
        raise _nosys()

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        """Closes a directory handle from opendir."""

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        """Flushes a directory to stable storage."""
        raise _nosys()

    # -- file system ----------------------------------------------------------------------------
    def statfs(self, ctx: Context, nodeid: int) -> StatVfs:
        """Statistics of the file system containing `nodeid`."""
        raise _nosys()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Checks access(2) `mask` for the caller; raises EACCES when denied."""
        raise _nosys()

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """Flushes the whole file system."""
        raise _nosys()

    # -- extended attributes --------------------------------------------------------------------
    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, *,
                 kill_sgid: bool = False) -> None:
        """Sets extended attribute `name` (XATTR_CREATE/XATTR_REPLACE in `flags`).

        `kill_sgid` is passed (as True) only to a file system whose `init` wants FUSE_POSIX_ACL and
        FUSE_SETXATTR_EXT, when the client sets FUSE_SETXATTR_ACL_KILL_SGID: with system.posix_acl_access,
        whose caller is neither in the file's group nor privileged, so the set-group-ID bit must be
        cleared too.
        """
        raise _nosys()

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        """Returns the value of extended attribute `name`; ENODATA if absent."""
        raise _nosys()

    def listxattr(self, ctx: Context, nodeid: int) -> list[bytes]:
        """Returns the names of the extended attributes of `nodeid`."""
        raise _nosys()

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        """Removes extended attribute `name`."""
        raise _nosys()

    # -- DAX window (virtio-fs) -----------------------------------------------------------------
    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int, flags: int,
                     moffset: int) -> None:
        """Maps `length` bytes of file `nodeid` from `foffset` at offset `moffset` of the DAX window.

        `fh` is an open handle of the file or SETUPMAPPING_NO_FH, which is what Linux sends: its
        mappings belong to the inode, not to an open. `flags` holds FUSE_SETUPMAPPING_FLAG_READ and/or
        FUSE_SETUPMAPPING_FLAG_WRITE; the server has checked that `length` > 0, no other flag is set
        and neither range overflows 64 bits. A mapping the new one overlaps is replaced. EINVAL for a
        range outside the window, not aligned to `map_alignment` or starting at or past the end of the
        file, EACCES for a writable mapping of a handle not open for writing.
        """
        raise _nosys()

    def removemapping(self, ctx: Context, mappings: list[tuple[int, int]]) -> None:
        """Unmaps the (moffset, length) ranges of the DAX window (each non-empty, not overflowing)."""
        raise _nosys()
