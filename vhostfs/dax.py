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

import errno
import logging
import os
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import Context, Entry, Filesystem, Open, SetAttr
from vhostfs.fuse.session_state import Encoder, StateError, section

log = logging.getLogger("vhostfs.dax")

#: The virtio-fs DAX window's shared memory region id (virtio 1.2, 5.11.5).
VIRTIO_FS_SHMCAP_ID_CACHE = 0
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

    def fd_for_mapping(self, nodeid: int, fh: int) -> AbstractContextManager[tuple[int, bool]]:
        """The host fd of open file `fh` of `nodeid` and whether it is open for writing, kept open for
        the `with` block; EBADF for an unknown handle or one of another node."""


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


def _einval(why: str) -> OSError:
    return OSError(errno.EINVAL, why)


class DaxWindow:
    """The bookkeeping of one DAX window of `size` bytes whose mappings are `alignment`-aligned.

    `mapper` is None until the front end provides a back-end channel; without one every mapping
    request fails with EIO. Thread-safe: one lock orders every change, requests to the front end
    included, so the window and the front end's view never disagree about a range.
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
        self.shmid = shmid
        self.mapper: Mapper | None = None
        self._lock = threading.Lock()
        self._maps: dict[int, Mapping] = {}
        self._by_node: dict[int, set[int]] = {}

    @property
    def alignment_log2(self) -> int:
        """fuse_init_out.map_alignment: log2 of the alignment (FUSE_MAP_ALIGNMENT)."""
        return self.alignment.bit_length() - 1

    def mappings(self) -> list[Mapping]:
        """The live mappings, by window offset."""
        with self._lock:
            return sorted(self._maps.values(), key=lambda mp: mp.moffset)

    def _check_range(self, moffset: int, length: int) -> None:
        if length == 0:
            raise _einval("mapping of length 0")
        if moffset % self.alignment or length % self.alignment:
            raise _einval(f"window range {moffset:#x}+{length:#x} is not {self.alignment}-aligned")
        if moffset + length > self.size:
            raise _einval(f"window range {moffset:#x}+{length:#x} beyond the {self.size:#x}-byte window")

    # -- requests -------------------------------------------------------------------------------
    def setup(self, nodeid: int, fd: int, foffset: int, length: int, moffset: int, writable: bool,
              fd_writable: bool) -> None:
        """Maps `length` bytes of `fd` (node `nodeid`) from `foffset` at window offset `moffset`.

        EINVAL for a range outside the window, unaligned or empty, or a file range beyond off_t;
        EACCES for a writable mapping of a file not open for writing (as mmap(2) answers); EIO when
        the front end refuses or is not there. Live mappings the new one overlaps are removed first
        (the Linux driver reuses window ranges this way, and SHMEM_MAP may not map over a mapping).
        """
        self._check_range(moffset, length)
        if foffset % self.alignment:
            raise _einval(f"file offset {foffset:#x} is not {self.alignment}-aligned")
        if foffset + length > _OFF_MAX:
            raise _einval(f"file range {foffset:#x}+{length:#x} overflows")
        if writable and not fd_writable:
            raise OSError(errno.EACCES, "writable mapping of a file not open for writing")
        with self._lock:
            mapper = self._mapper()
            self._remove_overlapping(moffset, length)
            try:
                mapper.shmem_map(self.shmid, fd, foffset, moffset, length, writable)
            except OSError as e:
                log.error("the front end did not map %#x+%#x: %s", moffset, length, e)
                raise OSError(errno.EIO, "the front end refused the mapping") from None
            self._maps[moffset] = Mapping(moffset, length, nodeid, foffset, writable)
            self._by_node.setdefault(nodeid, set()).add(moffset)

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

    # -- cleanup --------------------------------------------------------------------------------
    def remove_node(self, nodeid: int) -> None:
        """Unmaps every mapping of `nodeid`."""
        with self._lock:
            for moffset in sorted(self._by_node.get(nodeid, ())):
                self._unmap(self._maps[moffset])

    def remove_beyond(self, nodeid: int, size: int) -> None:
        """Unmaps the mappings of `nodeid` that start at or beyond file size `size` (rounded up to the
        alignment): after a truncate their pages no longer exist, and touching them would fault in
        the VMM. A mapping across the new end stays, as its head still holds the file's data."""
        limit = -(-size // self.alignment) * self.alignment
        with self._lock:
            for moffset in sorted(self._by_node.get(nodeid, ())):
                if self._maps[moffset].foffset >= limit:
                    self._unmap(self._maps[moffset])

    def clear(self) -> None:
        """Unmaps everything (DESTROY: the guest is done with the window)."""
        with self._lock:
            for moffset in sorted(self._maps):
                self._unmap(self._maps[moffset])

    def forget_all(self) -> None:
        """Drops the bookkeeping without asking the front end: on device reset or disconnect the front
        end unmaps the whole window itself (vhost-user.rst, SHMEM_MAP)."""
        with self._lock:
            self._maps.clear()
            self._by_node.clear()

    # -- internals (lock held) ------------------------------------------------------------------
    def _mapper(self) -> Mapper:
        if self.mapper is None:
            raise OSError(errno.EIO, "no back-end channel to map the DAX window with")
        return self.mapper

    def _remove_overlapping(self, moffset: int, length: int) -> None:
        end = moffset + length
        for mp in [mp for mp in self._maps.values() if mp.moffset < end and moffset < mp.end]:
            self._unmap(mp)

    def _unmap(self, mp: Mapping) -> None:
        # The mapping leaves the bookkeeping even when the front end fails to unmap it: it can no
        # longer be trusted, and a later mapping over it is refused by the front end, not here.
        del self._maps[mp.moffset]
        node = self._by_node[mp.nodeid]
        node.discard(mp.moffset)
        if not node:
            del self._by_node[mp.nodeid]
        try:
            self._mapper().shmem_unmap(self.shmid, mp.moffset, mp.length)
        except OSError as e:
            log.error("the front end did not unmap %#x+%#x: %s", mp.moffset, mp.length, e)
            raise OSError(errno.EIO, "the front end refused to unmap") from None


class DaxFilesystem(Filesystem):
    """Serves `fs` and its files' DAX mappings in `window`.

    Every operation goes straight to `fs` except SETUPMAPPING/REMOVEMAPPING, served here with the
    host fds `fs.fd_for_mapping` lends, and those after which mappings must go:

    - setattr that truncates: mappings beyond the new size (`DaxWindow.remove_beyond`);
    - unlink of the last name of a file that no handle keeps open, and release of the last handle of
      a file without names: nobody in the guest can reach the file any more. A file that is only
      closed keeps its mappings, as the guest driver keeps using them for the next open;
    - DESTROY: every mapping.
    """

    _OWN = frozenset({"init", "destroy", "setattr", "unlink", "open", "create", "release", "setupmapping",
                      "removemapping", "save_state", "load_state"})

    def __init__(self, fs: Filesystem, window: DaxWindow) -> None:
        if not hasattr(fs, "fd_for_mapping"):
            raise TypeError(f"{type(fs).__name__} cannot lend fds for mapping (no fd_for_mapping)")
        self.fs = fs
        self.window = window
        self._open_lock = threading.Lock()
        self._open: dict[int, int] = {}
        # Everything else is the wrapped file system's own bound method: no per-request indirection.
        for name in dir(Filesystem):
            if not name.startswith("_") and name not in self._OWN and callable(getattr(Filesystem, name)):
                setattr(self, name, getattr(fs, name))

    # -- session --------------------------------------------------------------------------------
    def init(self, conn) -> None:
        self.fs.init(conn)

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
        with mappable.fd_for_mapping(nodeid, fh) as (fd, fd_writable):
            self.window.setup(nodeid, fd, foffset, length, moffset,
                              bool(flags & abi.FUSE_SETUPMAPPING_FLAG_WRITE), fd_writable)

    def removemapping(self, ctx: Context, mappings: list[tuple[int, int]]) -> None:
        self.window.remove(mappings)

    # -- operations that end mappings -----------------------------------------------------------
    def setattr(self, ctx: Context, nodeid: int, changes: SetAttr):
        if changes.size is not None:
            self.window.remove_beyond(nodeid, changes.size)
        return self.fs.setattr(ctx, nodeid, changes)

    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        handle = self.fs.open(ctx, nodeid, flags)
        self._opened(nodeid)
        return handle

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int) -> tuple[Entry, Open]:
        entry, handle = self.fs.create(ctx, parent, name, mode, flags, umask)
        self._opened(entry.nodeid)
        return entry, handle

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
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
