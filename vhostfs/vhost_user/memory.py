"""Guest memory: the regions the front end shares (memfd + offset), mmap'd and looked up by address.

Addresses come in two kinds: guest physical addresses (descriptor buffers) and front-end virtual
addresses (vring addresses, "userspace_addr"). A buffer may cross from one region into the next one;
it then becomes one view per region.

A `GuestMemory` is immutable once built: a new table is a new object, swapped in whole. Old mappings
stay mapped for as long as any view of them is alive (the mmap object outlives its exported views),
so a queue still finishing a request against the old table never touches unmapped memory.
"""

from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass

from vhostfs.vhost_user.messages import MemoryRegion, VhostUserError

#: ADD_MEM_REG slots offered through GET_MAX_MEM_SLOTS (KVM's limit, QEMU's default too).
MAX_MEM_SLOTS = 509


class GuestMemoryError(Exception):
    """An address or length outside guest memory."""


@dataclass(slots=True)
class MappedRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    mapping: mmap.mmap
    view: memoryview

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def unmap(self) -> None:
        """Unmaps a region nothing uses (one that was refused), closing its fd now rather than when
        the garbage collector finds it."""
        self.view.release()
        self.mapping.close()

    def describes(self, region: MemoryRegion) -> bool:
        return (self.gpa, self.size, self.uva) == (
            region.guest_phys_addr, region.memory_size, region.userspace_addr)


def map_region(region: MemoryRegion, fd: int) -> MappedRegion:
    """mmaps `region` from `fd`; the caller still owns `fd`. Raises VhostUserError if it cannot."""
    try:
        file_size = os.fstat(fd).st_size
    except OSError as e:
        raise VhostUserError(f"memory region fd: {e}") from e
    if region.mmap_offset + region.memory_size > file_size:
        raise VhostUserError(
            f"memory region [{region.mmap_offset:#x}, +{region.memory_size:#x}) lies beyond its file "
            f"({file_size:#x} bytes)")
    # mmap needs a page-aligned offset: map from the page below and slice the view.
    page_off = region.mmap_offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(fd, region.memory_size + page_off, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=region.mmap_offset - page_off)
    except (OSError, ValueError, OverflowError) as e:
        raise VhostUserError(f"cannot map memory region: {e}") from e
    view = memoryview(mapping)[page_off:page_off + region.memory_size]
    return MappedRegion(region.guest_phys_addr, region.memory_size, region.userspace_addr,
                        region.mmap_offset, mapping, view)


class GuestMemory:
    """An immutable set of non-overlapping mapped regions."""

    __slots__ = ("regions", "_starts", "_by_uva", "_uva_starts", "_last")

    def __init__(self, regions: list[MappedRegion]) -> None:
        regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(regions, regions[1:], strict=False):
            if a.gpa_end > b.gpa:
                raise VhostUserError(f"memory regions overlap at guest address {b.gpa:#x}")
        by_uva = sorted(regions, key=lambda r: r.uva)
        for a, b in zip(by_uva, by_uva[1:], strict=False):
            if a.uva + a.size > b.uva:
                raise VhostUserError(f"memory regions overlap at user address {b.uva:#x}")
        self.regions = regions
        self._starts = [r.gpa for r in regions]
        self._by_uva = by_uva
        self._uva_starts = [r.uva for r in by_uva]
        self._last = regions[0] if regions else None

    def _region_at(self, gpa: int) -> MappedRegion:
        last = self._last
        if last is not None and last.gpa <= gpa < last.gpa + last.size:
            return last
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self.regions[i]
            if gpa < r.gpa + r.size:
                self._last = r
                return r
        raise GuestMemoryError(f"guest address {gpa:#x} is not mapped")

    def region_views(self) -> list[tuple[int, memoryview]]:
        """The guest address and view of each region, in address order."""
        return [(r.gpa, r.view) for r in self.regions]

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views of `length` bytes at guest physical address `gpa`, one per region crossed."""
        r = self._region_at(gpa)
        off = gpa - r.gpa
        if off + length <= r.size:
            return [r.view[off:off + length]]
        out = []
        while length:
            r = self._region_at(gpa)
            off = gpa - r.gpa
            n = min(length, r.size - off)
            out.append(r.view[off:off + n])
            gpa += n
            length -= n
        return out

    def view(self, gpa: int, length: int) -> memoryview:
        """One contiguous view (raises if the range is not inside a single region)."""
        r = self._region_at(gpa)
        off = gpa - r.gpa
        if off + length > r.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not contiguous")
        return r.view[off:off + length]

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translates a front-end virtual address range (within one region) to a guest address."""
        i = bisect.bisect_right(self._uva_starts, uva) - 1
        if i >= 0:
            r = self._by_uva[i]
            if uva + length <= r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(f"front-end address {uva:#x}+{length:#x} is not mapped")

    def with_region(self, region: MappedRegion) -> GuestMemory:
        return GuestMemory([*self.regions, region])

    def without(self, region: MappedRegion) -> GuestMemory:
        return GuestMemory([r for r in self.regions if r is not region])
