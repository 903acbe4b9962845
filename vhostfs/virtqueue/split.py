"""The split virtqueue, device side (virtio 1.2, 2.7 "Split Virtqueues").

The rings live in guest memory and are reached through memoryviews; the guest may change any of it at
any time, so every index and address read from it is checked before use. `SplitQueue.pop()` returns the
next available chain as a `DescriptorChain` whose `reader`/`writer` are views of the guest buffers
(no copy); `push()` returns it on the used ring; `notify_needed()` applies EVENT_IDX or the
NO_INTERRUPT flag to decide whether the driver wants an interrupt.

Guest memory is any object with `region_views()`, the (guest address, view) of each of its regions,
which do not overlap.
"""

from __future__ import annotations

import struct
import sys

from vhostfs import native
from vhostfs._native_build import WALK_ERRORS
from vhostfs.iov import Reader, Writer

# Descriptor flags (2.7.5 "The Virtqueue Descriptor Table").
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags (2.7.6, 2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# The ring's 16-bit fields are shared with a driver running at the same time, so each is read and
# written with one 2-byte access through a memoryview cast to "H" (a single load or store), never
# with struct.pack_into, which clears the bytes before it writes them (a driver could read 0). The
# cast is native-endian; virtio 1.x rings are little-endian.
assert sys.byteorder == "little", "vhostfs's virtqueues assume a little-endian host"

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
assert DESC.size == 16
U16 = struct.Struct("<H")
assert U16.size == 2
USED_ELEM = struct.Struct("<II")  # id, len
assert USED_ELEM.size == 8

#: Alignment of the rings (2.7: descriptor table 16, available ring 2, used ring 4).
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
#: Largest split virtqueue (2.7: Queue Size is at most 32768).
MAX_QUEUE_SIZE = 32768


class ChainError(Exception):
    """A malformed descriptor chain: it is returned unused (length 0) and the queue goes on."""


class QueueBroken(Exception):
    """The driver broke the ring itself (e.g. avail idx ran ahead by more than the queue size)."""


def check_queue_size(num: int) -> None:
    """Raises ValueError unless `num` is a valid split queue size: a power of two in 1..32768 (2.7)."""
    if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
        raise ValueError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")


def check_ring_addresses(desc: int, avail: int, used: int) -> None:
    """Raises ValueError unless the ring addresses have the alignment 2.7 requires."""
    for value, align, what in ((desc, DESC_ALIGN, "descriptor table"), (avail, AVAIL_ALIGN, "avail ring"),
                               (used, USED_ALIGN, "used ring")):
        if value % align:
            raise ValueError(f"{what} address {value:#x} is not {align}-byte aligned")


def desc_table_size(num: int) -> int:
    return DESC.size * num


def avail_ring_size(num: int) -> int:
    return 4 + 2 * num + 2  # flags, idx, ring[num], used_event


def used_ring_size(num: int) -> int:
    return 4 + USED_ELEM.size * num + 2  # flags, idx, ring[num], avail_event


class DescriptorChain:
    """One request: the head index, and its device-readable and device-writable buffers as views.

    `writable_ranges` holds the (guest address, length) of each device-writable descriptor, in order,
    when the walk was asked to record them (dirty-page logging), else None.
    """

    __slots__ = ("head", "reader", "writer", "writable_ranges")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 writable_ranges: list[tuple[int, int]] | None = None) -> None:
        self.head = head
        self.reader = Reader(readable)
        self.writer = Writer(writable)
        self.writable_ranges = writable_ranges


#: ChainError messages by the walker's error code (defined with the native helper's source).
_WALK_ERRORS = dict(enumerate(WALK_ERRORS.values(), 1))
_WALK_FULL = list(WALK_ERRORS).index("VQ_E_FULL") + 1
#: Buffers one chain may have: far more than a FUSE request needs (a 1 MiB one has ~260), and a bound
#: on what a driver can make the device allocate for it.
MAX_CHAIN_SEGMENTS = 1 << 16


class ChainWalker:
    """Walks the descriptor chains of one queue's table over one guest memory (2.7.5).

    The walk itself is one call into the native helper, which enforces: indices below the table
    size, no loops (at most as many descriptors as the table holds), readable buffers before
    writable ones, indirect tables only when negotiated, not nested, not combined with NEXT, non-empty
    and a multiple of 16 bytes long, and inside guest memory; every buffer inside guest memory; the
    total length below 2^32 (used.len is 32 bits, 2.7.8). Buffers that continue each other in one
    region come back as one view (a guest's large I/O is often physically contiguous: fewer iovecs
    for preadv).

    Not thread-safe: its output arrays are reused from chain to chain.
    """

    __slots__ = ("num", "_table", "_views", "_regions", "_nregions", "_pins", "_cap",
                 "_segs", "_ranges", "_nreadable", "_nranges")

    def __init__(self, memory, desc_table: memoryview, num: int) -> None:
        if len(desc_table) < desc_table_size(num):
            raise ValueError("descriptor table view is smaller than the queue size needs")
        regions = sorted(memory.region_views(), key=lambda r: r[0])
        self.num = num
        self._views = [view for _, view in regions]
        # The helper reads guest memory through these addresses; holding the buffers keeps the
        # mappings alive for as long as the walker is.
        self._pins = [native.ffi.from_buffer(view) for view in (desc_table, *self._views)]
        self._table = self._pins[0]
        self._regions = native.ffi.new("struct vhostfs_region[]", max(1, len(regions)))
        for c, (gpa, view), pin in zip(self._regions, regions, self._pins[1:], strict=False):
            c.gpa, c.size, c.host = gpa, len(view), pin
        self._nregions = len(regions)
        self._nreadable = native.ffi.new("uint32_t *")
        self._nranges = native.ffi.new("uint32_t *")
        self._grow(1024)

    def _grow(self, cap: int) -> None:
        self._cap = cap
        self._segs = native.ffi.new("uint64_t[]", 3 * cap)
        self._ranges = native.ffi.new("uint64_t[]", 2 * cap)

    def walk(self, head: int, indirect: bool, log: bool = False) -> DescriptorChain:
        """The buffers of the chain at `head` as views; raises ChainError for a malformed chain.

        `indirect`: whether VIRTIO_RING_F_INDIRECT_DESC was negotiated.

        With `log`, the chain also records the guest address and length of each device-writable
        descriptor (`writable_ranges`), for dirty-page logging.
        """
        walk = native.lib.vhostfs_walk_chain
        while True:
            n = walk(self._table, self.num, head, indirect, self._regions, self._nregions, self._segs,
                     self._cap, self._nreadable, self._ranges if log else native.ffi.NULL, self._nranges)
            if n != -_WALK_FULL:
                break
            if self._cap >= MAX_CHAIN_SEGMENTS:
                raise ChainError(f"descriptor chain has more than {MAX_CHAIN_SEGMENTS} buffers")
            self._grow(self._cap * 8)
        if n < 0:
            raise ChainError(f"{_WALK_ERRORS[-n]} (head {head})")
        views = self._views
        segs = native.ffi.unpack(self._segs, 3 * n)
        bufs = [views[segs[k]][segs[k + 1]:segs[k + 2]] for k in range(0, 3 * n, 3)]
        nr = self._nreadable[0]
        ranges = None
        if log:
            flat = native.ffi.unpack(self._ranges, 2 * self._nranges[0])
            ranges = list(zip(flat[::2], flat[1::2], strict=True))
        return DescriptorChain(head, bufs[:nr], bufs[nr:], ranges)


class SplitQueue:
    """Device side of one split virtqueue.

    Not thread-safe: one worker owns a queue. `memory` may be replaced between chains (a new guest
    memory table); the ring views must then be replaced with it through `remap`.

    `log` is None, or (during live migration) an object with `mark_used(offset, length)` that is told
    of every write to the used ring; chains are then walked with their writable guest ranges recorded
    so that the caller can log the buffers it fills.
    """

    def __init__(self, memory, num: int, desc: memoryview, avail: memoryview, used: memoryview,
                 *, last_avail_idx: int = 0, event_idx: bool = False, indirect: bool = False) -> None:
        check_queue_size(num)
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.remap(memory, desc, avail, used)
        self.used_idx = self._used16[1]
        # Used index when the driver was last notified (EVENT_IDX needs the old value).
        self.signalled_used = self.used_idx
        self.signalled_valid = False
        self.log = None

    def remap(self, memory, desc: memoryview, avail: memoryview, used: memoryview) -> None:
        num = self.num
        if len(desc) < desc_table_size(num) or len(avail) < avail_ring_size(num) or \
                len(used) < used_ring_size(num):
            raise ValueError("ring views are smaller than the queue size needs")
        self.memory = memory
        self.walker = ChainWalker(memory, desc, num)
        self.desc = desc
        self.avail = avail
        self.used = used
        self._avail16 = avail[:avail_ring_size(num)].cast("H")  # flags, idx, ring[num], used_event
        self._avail_pin = native.ffi.from_buffer("uint16_t[]", self._avail16)
        self._avail_idx_ptr = self._avail_pin + 1
        self._used16 = used[:used_ring_size(num)].cast("H")  # flags, idx, ring[2 * num], avail_event
        self._used_event = 2 + num
        self._avail_event = 2 + 4 * num
        self._avail_event_off = 2 * self._avail_event

    def avail_idx(self) -> int:
        """The driver's avail index, read before (and ordered before) the ring entries it covers."""
        idx = self._avail16[1]
        native.rmb()
        return idx

    def pending(self) -> int:
        """How many chains the driver has made available that were not popped yet.

        Raises QueueBroken if that is more than the queue size (2.7.13.3: the driver never has more
        than num in flight, so the ring cannot be trusted any more).
        """
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            raise QueueBroken(f"avail index ran {n} ahead of the device (queue size {self.num})")
        return n

    def wait_avail(self, timeout_ns: int, wake) -> bool:
        """Polls for up to `timeout_ns` for the driver to make buffers available beyond the last pop;
        returns whether it did. Ends early once the cffi `uint32_t *` `wake` holds a non-zero value.
        The GIL is released meanwhile."""
        return bool(native.lib.vhostfs_poll_u16(self._avail_idx_ptr, self.last_avail_idx, wake, timeout_ns))

    def pop_head(self) -> int:
        """Takes the next available head index (call only when `pending()` > 0)."""
        slot = self.last_avail_idx % self.num
        head = self._avail16[2 + slot]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return head

    def chain(self, head: int) -> DescriptorChain:
        """The buffers of the chain at `head` (raises ChainError for a malformed one)."""
        return self.walker.walk(head, self.indirect, self.log is not None)

    def push(self, head: int, length: int) -> None:
        """Returns chain `head` to the driver with `length` bytes written (2.7.8).

        The element is stored before used.idx is advanced, with a write fence between, so the driver
        never sees the index cover an element not yet written.
        """
        slot = self.used_idx % self.num
        USED_ELEM.pack_into(self.used, 4 + USED_ELEM.size * slot, head, length)
        native.wmb()
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx
        if self.log is not None:
            self.log.mark_used(4 + USED_ELEM.size * slot, USED_ELEM.size)
            self.log.mark_used(2, 2)

    def notify_needed(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one (2.7.10)."""
        # Full fence: the used.idx store must be visible before used_event / flags are read.
        native.mb()
        if not self.event_idx:
            return not self._avail16[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        old, new = self.signalled_used, self.used_idx
        valid = self.signalled_valid
        self.signalled_used = new
        self.signalled_valid = True
        if not valid:
            return True
        event = self._avail16[self._used_event]
        # vring_need_event: notify if used_event lies in [old, new).
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def disable_kicks(self) -> None:
        """Asks the driver not to kick while the device is draining the ring anyway."""
        if not self.event_idx:
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY
            if self.log is not None:
                self.log.mark_used(0, 2)

    def enable_kicks(self) -> bool:
        """Asks for a kick on the next buffer; returns True if buffers arrived meanwhile.

        Without the re-check, a buffer added between the last empty check and this call would sleep
        until some later kick (a lost wake-up).
        """
        if self.event_idx:
            self._used16[self._avail_event] = self.last_avail_idx
            if self.log is not None:
                self.log.mark_used(self._avail_event_off, 2)
        else:
            self._used16[0] = 0
            if self.log is not None:
                self.log.mark_used(0, 2)
        native.mb()
        return self.pending() > 0
