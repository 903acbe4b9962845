"""The virtio-fs DAX window: host files mapped straight into a range of guest physical memory.

The guest's virtio-fs driver owns a shared memory region, the DAX window (virtio 1.2, 5.11.5: shmid 0,
VIRTIO_FS_SHMCAP_ID_CACHE), that the VMM reserves. FUSE_SETUPMAPPING asks the daemon to map a range of
an open file at an offset in that window, FUSE_REMOVEMAPPING to unmap ranges. The daemon cannot touch
the VMM's address space itself: it sends the file's fd to the front end (vhost-user SHMEM_MAP) and the
front end maps it; SHMEM_UNMAP takes it away again.

`DaxWindow` validates the requests and keeps the bookkeeping; `DaxFilesystem` wraps the served file
system so that FUSE requests reach the window and the operations that must end mappings (truncate,
the last name and handle of a file going, DESTROY) do so. The device joins the window to the
vhost-user back-end channel; this module knows nothing of vhost-user.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import SETUPMAPPING_NO_FH, Context, Entry, Filesystem, Open, SetAttr, Stat
from vhostfs.fuse.session_state import Encoder, StateError, section

log = logging.getLogger("vhostfs.dax")

#: The virtio-fs DAX window's shared memory region id (virtio 1.2, 5.11.5).
VIRTIO_FS_SHMCAP_ID_CACHE = 0
#: The fields of an Attr, in Stat's order.
_STAT_FIELDS = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blocks",
                "st_blksize", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
#: File offsets are off_t: a mapping may not reach beyond 2**63 - 1.
_OFF_MAX = (1 << 63) - 1


def host_page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


class Mapper(Protocol):
    """Whoever maps files into the window on the VMM side (the vhost-user back-end channel)."""

    def shmem_map(self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int,
                  writable: bool) -> None:
        """Maps `length` bytes of `fd` from `fd_offset` at `shm_offset`; raises OSError if refused."""

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """Unmaps one whole mapping made earlier; raises OSError if refused."""


class MappableFilesystem(Protocol):
    """A file system whose open files can be mapped (vhostfs.fs.passthrough.Passthrough)."""

    def wants_dax(self, nodeid: int) -> bool:
        """Whether file `nodeid` carries the per-file DAX attribute (FS_DAX_FL)."""

    def fd_for_mapping(self, nodeid: int, fh: int,
                       writable: bool) -> AbstractContextManager[tuple[int, bool, int]]:
        """A host fd of `nodeid` (of open file `fh`, or opened for the mapping, for writing if
        `writable`, when `fh` is SETUPMAPPING_NO_FH), whether it is open for writing and the file's
        size, kept open for the `with` block; EBADF for an unknown handle or one of another node."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """A live mapping: `length` bytes of node `nodeid` from `foffset`, at `moffset` in the window."""

    moffset: int
    length: int
    nodeid: int
    foffset: int
    writable: bool

    @property
    def end(self) -> int:
        return self.moffset + self.length


@contextlib.contextmanager
def _after(then: Callable[[], None]) -> Iterator[None]:
    """Runs `then` after the block, whether it succeeded or failed."""
    try:
        yield
    finally:
        then()


def _einval(why: str) -> OSError:
    return OSError(errno.EINVAL, why)


@dataclass(slots=True)
class _Backing:
    """What backs a mapping in the VMM: its first `whole` bytes straight from the file and, when the
    range holds the file's last partial page, a copy of that page in `memfd` just after them, of
    which `tail` bytes are the file's. `size` is the file size it was made for. A writable copy keeps
    its memfd and `file_fd` (a duplicate of the file's fd) to write the page back through."""

    size: int
    whole: int = 0
    tail: int = 0
    memfd: int = -1
    file_fd: int = -1


class DaxWindow:
    """The bookkeeping of one DAX window of `size` bytes whose mappings are `alignment`-aligned.

    `mapper` is None until the front end provides a back-end channel; without one every mapping
    request fails with EIO. Thread-safe: one lock orders every change, requests to the front end
    included, so the window and the front end's view never disagree about a range.

    What the guest maps and what the VMM is asked to map differ at the end of a file. Linux maps
    whole 2 MiB ranges (FUSE_DAX_SZ) and touches only the bytes below the file's size, but a VMM
    that maps the fd as guest RAM (QEMU 11.1 does) refuses any page past the end of the file, and
    the last page of a file whose size is not a page multiple is such a page. So a range is backed
    by the file's whole pages below its end, then by a copy of its last partial page (zeros after
    the end, as mmap(2) shows them), and by nothing beyond. A writable copy is written back to the
    file by `write_back` (fsync, close, before the daemon changes the file) and before it goes.
    When the file's size changes, `refresh` backs the node's mappings anew: the guest learns a
    size only from the daemon's replies, so refreshing before they go keeps the window in step.
    """

    def __init__(self, size: int, alignment: int | None = None,
                 shmid: int = VIRTIO_FS_SHMCAP_ID_CACHE) -> None:
        alignment = alignment or host_page_size()
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment {alignment} is not a power of two")
        if size <= 0 or size % alignment:
            raise ValueError(f"window size {size} is not a positive multiple of {alignment}")
        self.size = size
        self.alignment = alignment
        self.page = host_page_size()
        self.shmid = shmid
        self.mapper: Mapper | None = None
        self._lock = threading.Lock()
        self._maps: dict[int, Mapping] = {}
        self._backing: dict[int, _Backing] = {}
        self._by_node: dict[int, set[int]] = {}

    @property
    def alignment_log2(self) -> int:
        """fuse_init_out.map_alignment: log2 of the alignment (FUSE_MAP_ALIGNMENT)."""
        return self.alignment.bit_length() - 1

    def mappings(self) -> list[Mapping]:
        """The live mappings, by window offset."""
        with self._lock:
            return sorted(self._maps.values(), key=lambda mp: mp.moffset)

    def has_node(self, nodeid: int) -> bool:
        """Whether `nodeid` has live mappings (a dict look-up: cheap on every request)."""
        return nodeid in self._by_node

    def stale(self, nodeid: int, file_size: int) -> bool:
        """Whether a mapping of `nodeid` was backed for another file size than `file_size`."""
        with self._lock:
            return any(self._backing[off].size != file_size for off in self._by_node.get(nodeid, ()))

    def writable(self, nodeid: int) -> bool:
        """Whether a mapping of `nodeid` is writable."""
        with self._lock:
            return any(self._maps[off].writable for off in self._by_node.get(nodeid, ()))

    def _check_range(self, moffset: int, length: int) -> None:
        if length == 0:
            raise _einval("mapping of length 0")
        if moffset % self.alignment or length % self.alignment:
            raise _einval(f"window range {moffset:#x}+{length:#x} is not {self.alignment}-aligned")
        if moffset + length > self.size:
            raise _einval(f"window range {moffset:#x}+{length:#x} beyond the {self.size:#x}-byte window")

    # -- requests -------------------------------------------------------------------------------
    def setup(self, nodeid: int, fd: int, foffset: int, length: int, moffset: int, writable: bool,
              fd_writable: bool, file_size: int) -> None:
        """Maps `length` bytes of `fd` (node `nodeid`, `file_size` bytes long) from `foffset` at
        window offset `moffset`.

        EINVAL for a range outside the window, unaligned or empty, a file range beyond off_t or one
        that starts at or past the end of the file (the guest asks only for ranges holding data);
        EACCES for a writable mapping of a file not open for writing (as mmap(2) answers); EIO when
        the front end refuses or is not there. The range may run past the end of the file (see the
        class). Live mappings the new one overlaps are removed first (the Linux driver reuses window
        ranges this way, and SHMEM_MAP may not map over a mapping).
        """
        self._check_range(moffset, length)
        if foffset % self.alignment:
            raise _einval(f"file offset {foffset:#x} is not {self.alignment}-aligned")
        if foffset + length > _OFF_MAX:
            raise _einval(f"file range {foffset:#x}+{length:#x} overflows")
        if foffset >= file_size:
            raise _einval(f"file offset {foffset:#x} at or past the end of the file ({file_size:#x})")
        if writable and not fd_writable:
            raise OSError(errno.EACCES, "writable mapping of a file not open for writing")
        with self._lock:
            self._mapper()
            # An old mapping the front end no longer has (it unmapped the window on a reset the
            # daemon did not see) fails to unmap; the new one is then still worth asking for.
            with contextlib.suppress(OSError):
                self._remove_overlapping(moffset, length)
            mp = Mapping(moffset, length, nodeid, foffset, writable)
            self._maps[moffset] = mp
            self._by_node.setdefault(nodeid, set()).add(moffset)
            try:
                self._back(mp, fd, file_size)
            except OSError:
                with contextlib.suppress(OSError):
                    self._unmap(mp)
                raise

    def remove(self, ranges: list[tuple[int, int]]) -> None:
        """Unmaps every live mapping that overlaps one of the (moffset, length) `ranges`.

        Each range must lie in the window (EINVAL otherwise, before anything is removed); a range
        without mappings is not an error. EIO if the front end refuses an unmap.
        """
        for moffset, length in ranges:
            self._check_range(moffset, length)
        with self._lock:
            for moffset, length in ranges:
                self._remove_overlapping(moffset, length)

    # -- keeping the backing in step with the file ----------------------------------------------
    def write_back(self, nodeid: int) -> None:
        """Writes the writable copies of `nodeid`'s last partial page back to the file."""
        with self._lock:
            for moffset in sorted(self._by_node.get(nodeid, ())):
                self._write_back(self._maps[moffset], self._backing[moffset])

    def refresh(self, nodeid: int, fd: int, file_size: int, *, copies: bool = True) -> None:
        """Backs the mappings of `nodeid` anew for a file now `file_size` bytes long, read through
        `fd` (open for writing if any of them is writable): the ones whose backing changes with the
        size and, with `copies`, every one holding a copy of the last partial page (the daemon just
        changed the file, so the copy may be stale; write_back first if it was writable). EIO if
        the front end refuses; the mapping then stays unbacked."""
        with self._lock:
            for moffset in sorted(self._by_node.get(nodeid, ())):
                mp, backing = self._maps[moffset], self._backing[moffset]
                whole, tail = self._split(mp, file_size)
                if (whole, tail) != (backing.whole, backing.tail) or (copies and backing.tail):
                    # With `copies` the caller wrote the copies back before changing the file.
                    self._unback(mp, backing, write_back=not copies)
                    self._back(mp, fd, file_size)

    # -- cleanup --------------------------------------------------------------------------------
    def remove_node(self, nodeid: int) -> None:
        """Unmaps every mapping of `nodeid`."""
        with self._lock:
            for moffset in sorted(self._by_node.get(nodeid, ())):
                self._unmap(self._maps[moffset])

    def clear(self) -> None:
        """Unmaps everything (DESTROY: the guest is done with the window)."""
        with self._lock:
            for moffset in sorted(self._maps):
                self._unmap(self._maps[moffset])

    def forget_all(self) -> None:
        """Drops the bookkeeping without asking the front end: on device reset or disconnect the front
        end unmaps the whole window itself (vhost-user.rst, BACKEND_SHMEM_MAP). Writable copies of
        last pages are written back first."""
        with self._lock:
            for moffset, backing in self._backing.items():
                self._write_back(self._maps[moffset], backing)
                self._close(backing)
            self._maps.clear()
            self._backing.clear()
            self._by_node.clear()

    # -- internals (lock held) ------------------------------------------------------------------
    def _mapper(self) -> Mapper:
        if self.mapper is None:
            raise OSError(errno.EIO, "no back-end channel to map the DAX window with")
        return self.mapper

    def _split(self, mp: Mapping, file_size: int) -> tuple[int, int]:
        """(whole, tail): the bytes of `mp` the file's whole pages back, and the file's bytes in the
        partial page after them."""
        backed = max(0, min(mp.length, file_size - mp.foffset))
        whole = backed - backed % self.page
        return whole, backed - whole

    def _back(self, mp: Mapping, fd: int, file_size: int) -> None:
        whole, tail = self._split(mp, file_size)
        backing = _Backing(file_size)
        self._backing[mp.moffset] = backing
        try:
            if whole:
                self._map(fd, mp.foffset, mp.moffset, whole, mp.writable)
                backing.whole = whole
            if tail:
                memfd = os.memfd_create("vhostfs-dax-tail", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(memfd, self.page)
                    os.pwrite(memfd, os.pread(fd, tail, mp.foffset + whole), 0)
                    self._map(memfd, 0, mp.moffset + whole, self.page, mp.writable)
                except BaseException:
                    os.close(memfd)
                    raise
                backing.tail = tail
                if mp.writable:
                    backing.memfd = memfd
                    backing.file_fd = os.dup(fd)
                else:
                    os.close(memfd)
        except OSError:
            # What did get mapped is recorded in `backing`, to be unmapped with the mapping.
            raise OSError(errno.EIO, "the front end refused the mapping") from None

    def _map(self, fd: int, fd_offset: int, moffset: int, length: int, writable: bool) -> None:
        try:
            self._mapper().shmem_map(self.shmid, fd, fd_offset, moffset, length, writable)
        except OSError as e:
            log.error("the front end did not map %#x+%#x: %s", moffset, length, e)
            raise

    def _write_back(self, mp: Mapping, backing: _Backing) -> None:
        if backing.file_fd < 0:
            return
        offset = mp.foffset + backing.whole
        try:
            # Never past the file's end as it is now: a file cut shorter meanwhile stays so.
            length = max(0, min(backing.tail, os.fstat(backing.file_fd).st_size - offset))
            if length:
                os.pwrite(backing.file_fd, os.pread(backing.memfd, length, 0), offset)
        except OSError as e:
            log.error("writing back the last page of node %d: %s", mp.nodeid, e)

    @staticmethod
    def _close(backing: _Backing) -> None:
        for fd in (backing.memfd, backing.file_fd):
            if fd >= 0:
                os.close(fd)
        backing.memfd = backing.file_fd = -1

    def _unback(self, mp: Mapping, backing: _Backing, *, write_back: bool = True) -> None:
        if write_back:
            self._write_back(mp, backing)
        self._close(backing)
        pieces = [(mp.moffset, backing.whole)] if backing.whole else []
        if backing.tail:
            pieces.append((mp.moffset + backing.whole, self.page))
        backing.whole = backing.tail = 0
        failed = None
        for moffset, length in pieces:
            try:
                self._mapper().shmem_unmap(self.shmid, moffset, length)
            except OSError as e:
                log.error("the front end did not unmap %#x+%#x: %s", moffset, length, e)
                failed = e
        if failed is not None:
            raise OSError(errno.EIO, "the front end refused to unmap") from None

    def _remove_overlapping(self, moffset: int, length: int) -> None:
        end = moffset + length
        for mp in [mp for mp in self._maps.values() if mp.moffset < end and moffset < mp.end]:
            self._unmap(mp)

    def _unmap(self, mp: Mapping) -> None:
        # The mapping leaves the bookkeeping even when the front end fails to unmap it: it can no
        # longer be trusted, and a later mapping over it is refused by the front end, not here.
        del self._maps[mp.moffset]
        backing = self._backing.pop(mp.moffset)
        node = self._by_node[mp.nodeid]
        node.discard(mp.moffset)
        if not node:
            del self._by_node[mp.nodeid]
        self._unback(mp, backing)


class DaxFilesystem(Filesystem):
    """Serves `fs` and its files' DAX mappings in `window`.

    Every operation goes straight to `fs` except SETUPMAPPING/REMOVEMAPPING, served here with the
    host fds `fs.fd_for_mapping` lends, and those that must keep the window in step with the files
    (see DaxWindow on the last page of a file):

    - write, fallocate, copy_file_range and setattr of a mapped file: the writable copies of its
      last partial page are written back first, and its mappings backed anew after;
    - fsync, flush and release: the writable copies are written back;
    - getattr and lookup that find a mapped file's size changed (on the host): its mappings are
      backed anew before the guest learns the size;
    - lookup, create, readdirplus and getattr, on a connection that negotiated FUSE_HAS_INODE_DAX (a
      guest mounted dax=inode): entries and attributes of files with the per-file DAX attribute get
      FUSE_ATTR_DAX, which is what tells the guest to map them (each asks the host for the flag);
    - unlink of the last name of a file that no handle keeps open, and release of the last handle of
      a file without names: nobody in the guest can reach the file any more. A file that is only
      closed keeps its mappings, as the guest driver keeps using them for the next open;
    - DESTROY: every mapping.
    """

    def __init__(self, fs: Filesystem, window: DaxWindow) -> None:
        if not hasattr(fs, "fd_for_mapping"):
            raise TypeError(f"{type(fs).__name__} cannot lend fds for mapping (no fd_for_mapping)")
        self.fs = fs
        self.window = window
        self._open_lock = threading.Lock()
        self._open: dict[int, int] = {}
        #: FUSE_HAS_INODE_DAX negotiated: the guest maps only the files whose entries say FUSE_ATTR_DAX.
        self._inode_dax = False

    # -- session --------------------------------------------------------------------------------
    def init(self, conn) -> None:
        # A new session of the guest's driver follows a device reset, across which the front end
        # unmapped the whole window (vhost-user.rst, BACKEND_SHMEM_MAP): the window starts empty.
        self.window.forget_all()
        self.fs.init(conn)
        self._inode_dax = bool(conn.capable & abi.FUSE_HAS_INODE_DAX)
        if self._inode_dax:
            conn.want |= abi.FUSE_HAS_INODE_DAX

    def destroy(self) -> None:
        try:
            self.window.clear()
        except OSError as e:
            log.error("DESTROY: %s", e)
        with self._open_lock:
            self._open.clear()
        self.fs.destroy()

    def save_state(self) -> list[tuple[bytes, int, bytes]]:
        """The wrapped file system's sections and the open counts (DAXO). A session with mappings
        cannot move: they are the VMM's mappings of this host's files, and no VMM today carries
        a DAX window across a migration (QEMU's vhost-user-fs-pci has none)."""
        mappings = self.window.mappings()
        if mappings:
            raise OSError(errno.EBUSY, f"{len(mappings)} DAX mappings are in place")
        enc = Encoder()
        with self._open_lock:
            enc.u32(len(self._open))
            for nodeid, count in self._open.items():
                enc.u64(nodeid)
                enc.u32(count)
        return [*self.fs.save_state(), (b"DAXO", 1, enc.payload())]

    def load_state(self, sections: dict) -> None:
        dec = section(sections, b"DAXO", 1)
        opened = {}
        for _ in range(dec.count("open nodes", 12)):
            nodeid = dec.u64("nodeid")
            count = dec.u32("open count")
            if nodeid in opened or not count:
                raise StateError(f"DAXO section: node {nodeid} open {count} times")
            opened[nodeid] = count
        dec.end()
        self.fs.load_state(sections)
        with self._open_lock:
            self._open = opened

    # -- DAX ------------------------------------------------------------------------------------
    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int, flags: int,
                     moffset: int) -> None:
        mappable: MappableFilesystem = self.fs  # type: ignore[assignment]
        writable = bool(flags & abi.FUSE_SETUPMAPPING_FLAG_WRITE)
        with mappable.fd_for_mapping(nodeid, fh, writable) as (fd, fd_writable, size):
            self.window.setup(nodeid, fd, foffset, length, moffset, writable, fd_writable, size)

    def removemapping(self, ctx: Context, mappings: list[tuple[int, int]]) -> None:
        self.window.remove(mappings)

    # -- keeping mappings in step with the files -----------------------------------------------
    def _refresh(self, nodeid: int, *, copies: bool) -> None:
        mappable: MappableFilesystem = self.fs  # type: ignore[assignment]
        try:
            with mappable.fd_for_mapping(nodeid, SETUPMAPPING_NO_FH, self.window.writable(nodeid)) as (
                    fd, _, size):
                self.window.refresh(nodeid, fd, size, copies=copies)
        except OSError as e:
            log.error("backing the mappings of node %d anew: %s", nodeid, e)

    def _changing(self, nodeid: int):
        """A context for an operation of the daemon's own that changes file `nodeid`."""
        if not self.window.has_node(nodeid):
            return contextlib.nullcontext()
        self.window.write_back(nodeid)
        return _after(lambda: self._refresh(nodeid, copies=True))

    def _sizes_seen(self, nodeid: int, size: int) -> None:
        if self.window.has_node(nodeid) and self.window.stale(nodeid, size):
            self._refresh(nodeid, copies=False)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None):
        attr, timeout = self.fs.getattr(ctx, nodeid, fh)
        self._sizes_seen(nodeid, attr.st_size)
        # dax=inode: the guest learns from getattr that a file's attribute changed (chattr +x), and
        # then takes the inode anew from a lookup that says FUSE_ATTR_DAX.
        if self._wants_dax(nodeid, attr):
            attr = Stat(*(getattr(attr, name) for name in _STAT_FIELDS), attr_flags=abi.FUSE_ATTR_DAX)
        return attr, timeout

    def _wants_dax(self, nodeid: int, attr) -> bool:
        mappable: MappableFilesystem = self.fs  # type: ignore[assignment]
        return self._inode_dax and stat.S_ISREG(attr.st_mode) and mappable.wants_dax(nodeid)

    def _mark(self, entry: Entry) -> Entry:
        """Adds FUSE_ATTR_DAX to the entry of a file with the per-file DAX attribute (dax=inode)."""
        if self._wants_dax(entry.nodeid, entry.attr):
            entry.attr_flags |= abi.FUSE_ATTR_DAX
        return entry

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        entry = self.fs.lookup(ctx, parent, name)
        self._sizes_seen(entry.nodeid, entry.attr.st_size)
        return self._mark(entry)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool):
        entries = self.fs.readdir(ctx, nodeid, fh, offset, plus)
        if not (plus and self._inode_dax):
            return entries
        return (self._marked(e) for e in entries)

    def _marked(self, dirent):
        if dirent.entry is not None:
            self._mark(dirent.entry)
        return dirent

    def setattr(self, ctx: Context, nodeid: int, changes: SetAttr):
        if changes.size is None:
            return self.fs.setattr(ctx, nodeid, changes)
        with self._changing(nodeid):
            return self.fs.setattr(ctx, nodeid, changes)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: bytes, flags: int) -> int:
        with self._changing(nodeid):
            return self.fs.write(ctx, nodeid, fh, offset, data, flags)

    def write_from(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, src, flags: int) -> int:
        with self._changing(nodeid):
            return self.fs.write_from(ctx, nodeid, fh, offset, size, src, flags)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        with self._changing(nodeid):
            self.fs.fallocate(ctx, nodeid, fh, offset, length, mode)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        if self.window.has_node(nodeid_in):
            self.window.write_back(nodeid_in)
        with self._changing(nodeid_out):
            return self.fs.copy_file_range(ctx, nodeid_in, fh_in, off_in, nodeid_out, fh_out, off_out,
                                           length, flags)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        if self.window.has_node(nodeid):
            self.window.write_back(nodeid)
        self.fs.fsync(ctx, nodeid, fh, datasync)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        if self.window.has_node(nodeid):
            self.window.write_back(nodeid)
        self.fs.flush(ctx, nodeid, fh, lock_owner)

    # -- operations that end mappings -----------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        handle = self.fs.open(ctx, nodeid, flags)
        self._opened(nodeid)
        return handle

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int) -> tuple[Entry, Open]:
        entry, handle = self.fs.create(ctx, parent, name, mode, flags, umask)
        self._opened(entry.nodeid)
        return self._mark(entry), handle

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        if self.window.has_node(nodeid):
            self.window.write_back(nodeid)
        self.fs.release(ctx, nodeid, fh, flags)
        with self._open_lock:
            left = self._open.get(nodeid, 1) - 1
            if left:
                self._open[nodeid] = left
            else:
                self._open.pop(nodeid, None)
        if not left:
            self._drop_if_unreachable(ctx, nodeid)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        try:
            nodeid = self.fs.lookup(ctx, parent, name).nodeid
        except OSError:
            nodeid = 0
        try:
            self.fs.unlink(ctx, parent, name)
            if nodeid:
                with self._open_lock:
                    still_open = nodeid in self._open
                if not still_open:
                    self._drop_if_unreachable(ctx, nodeid)
        finally:
            if nodeid:
                self.fs.forget(nodeid, 1)

    def _opened(self, nodeid: int) -> None:
        with self._open_lock:
            self._open[nodeid] = self._open.get(nodeid, 0) + 1

    def _drop_if_unreachable(self, ctx: Context, nodeid: int) -> None:
        """Unmaps `nodeid` if it has no names left (it has no open handles either)."""
        try:
            attr, _ = self.fs.getattr(ctx, nodeid, None)
        except OSError:
            return
        if attr.st_nlink == 0:
            self.window.remove_node(nodeid)


def _delegate(name: str):
    """A DaxFilesystem method that calls the wrapped file system's method `name` as it is."""
    def method(self: DaxFilesystem, *args, **kwargs):
        return getattr(self.fs, name)(*args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"DaxFilesystem.{name}"
    method.__doc__ = getattr(Filesystem, name).__doc__
    return method


# Every Filesystem operation that DaxFilesystem does not define itself goes to the wrapped file
# system unchanged: defined once here, on the class, so that the class says what its instances do.
for _name, _value in vars(Filesystem).items():
    if not _name.startswith("_") and callable(_value) and _name not in vars(DaxFilesystem):
        setattr(DaxFilesystem, _name, _delegate(_name))
del _name, _value
