"""The dirty-page log of live migration (docs/interop/vhost-user.rst, "Migration").

While VHOST_F_LOG_ALL is negotiated, every byte the back end writes into guest memory is reported to
the front end by setting a bit in a shared bitmap: bit `page % 8` of byte `page // 8`, where
`page = guest_address // VHOST_LOG_PAGE`. The front end reads and clears the bitmap while the back end
sets bits, so bits are set with atomic or (a cffi helper), never by read-modify-write from Python.

A `DirtyLog` maps the area the front end passes with SET_LOG_BASE (LOG_SHMFD). It is never unmapped
explicitly: a queue still holding a replaced log keeps it mapped until it lets go, so no write can
land in unmapped memory. `QueueLog` is what one running queue logs through: the buffers it writes
(guest physical addresses) and, when the ring asks for it with VHOST_VRING_F_LOG, its used ring
(offsets from the ring's `log_guest_addr`).
"""

from __future__ import annotations

import logging
import mmap
import os

from vhostfs import native
from vhostfs.vhost_user.messages import VhostUserError

log = logging.getLogger("vhostfs.vhost_user")

#: Size of the page one log bit stands for.
VHOST_LOG_PAGE = 0x1000
_PAGE_SHIFT = 12
assert 1 << _PAGE_SHIFT == VHOST_LOG_PAGE


class DirtyLog:
    """The log bitmap: `size` bytes at `offset` in the file `fd` (the caller keeps owning `fd`)."""

    __slots__ = ("size", "_mapping", "_buffer", "_ptr", "_warned")

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if size == 0:
            raise VhostUserError("dirty log of size 0")
        try:
            file_size = os.fstat(fd).st_size
        except OSError as e:
            raise VhostUserError(f"dirty log fd: {e}") from e
        if offset + size > file_size:
            raise VhostUserError(
                f"dirty log [{offset:#x}, +{size:#x}) lies beyond its file ({file_size:#x} bytes)")
        page_off = offset % mmap.ALLOCATIONGRANULARITY
        try:
            self._mapping = mmap.mmap(fd, size + page_off, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                      offset=offset - page_off)
        except (OSError, ValueError, OverflowError) as e:
            raise VhostUserError(f"cannot map the dirty log: {e}") from e
        self.size = size
        # The buffer cdata keeps the mapping exported (so mapped) for as long as this object lives.
        self._buffer = native.ffi.from_buffer("unsigned char[]", self._mapping)
        self._ptr = self._buffer + page_off
        self._warned = False

    def mark(self, gpa: int, length: int) -> None:
        """Marks the pages of guest range [gpa, gpa + length) dirty (nothing for an empty range).

        A range beyond the log is a front-end error (the log must cover all guest memory): it is
        reported once and otherwise ignored, since the request that caused it was served correctly.
        """
        if length <= 0:
            return
        if native.lib.vhostfs_log_pages(self._ptr, self.size, gpa >> _PAGE_SHIFT,
                                        (gpa + length - 1) >> _PAGE_SHIFT) < 0 and not self._warned:
            self._warned = True
            log.error("dirty log of %d bytes does not cover guest range %#x+%#x", self.size, gpa, length)


class QueueLog:
    """What one queue logs: written buffers always, used-ring writes when `used_log_addr` is set."""

    __slots__ = ("dirty", "used_log_addr")

    def __init__(self, dirty: DirtyLog, used_log_addr: int | None) -> None:
        self.dirty = dirty
        self.used_log_addr = used_log_addr

    def mark(self, gpa: int, length: int) -> None:
        """Logs a write of `length` bytes at guest physical address `gpa`."""
        self.dirty.mark(gpa, length)

    def mark_written(self, ranges: list[tuple[int, int]], written: int) -> None:
        """Logs the first `written` bytes of the device-writable buffers `ranges` ((gpa, length) pairs)."""
        for gpa, length in ranges:
            if written <= 0:
                return
            n = min(length, written)
            self.dirty.mark(gpa, n)
            written -= n

    def mark_used(self, offset: int, length: int) -> None:
        """Logs a write at byte `offset` of the used ring (only when the ring asked for it)."""
        if self.used_log_addr is not None:
            self.dirty.mark(self.used_log_addr + offset, length)
