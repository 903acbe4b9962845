"""Fuzzing the descriptor-chain walker and SplitQueue over random descriptor tables and memory layouts.

Guest memory is 1..3 regions of anonymous memory at random page-aligned guest addresses (with holes
between them); the descriptor table, the avail ring and the indirect tables hold random entries whose
addresses cluster around region edges, where the bounds checks live. Every walk must either return
views that lie inside guest memory, at the guest addresses the chain names, or raise ChainError;
the queue may also raise QueueBroken for an avail index that ran ahead. Nothing else may escape.

The walker is compared with a reference walk written out here from the spec: it reads the table with
its own struct and translates guest addresses through the test's own list of mappings, so that it
shares no code with what it checks. The queue fuzzer starts from a seed ring of valid chains
(direct, longer, indirect, write-only, read-only) and mutates descriptors, ring entries and indices;
the chains it pops are walked through SplitQueue and returned on the used ring.
"""

from __future__ import annotations

import mmap
import struct

from hypothesis import event, given
from hypothesis import strategies as st

from vhostfs.native import ffi
from vhostfs.vhost_user.memory import GuestMemory, MappedRegion
from vhostfs.virtqueue.split import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    ChainError,
    ChainWalker,
    QueueBroken,
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

PAGE = 4096


def _address(view: memoryview) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(view)))


class Layout:
    """Regions (gpa, size) mapped from anonymous memory, as a GuestMemory."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        regions = []
        for gpa, size in spans:
            mapping = mmap.mmap(-1, size)
            regions.append(MappedRegion(gpa, size, gpa + (1 << 40), 0, mapping, memoryview(mapping)))
        self.regions = regions
        self.memory = GuestMemory(regions)

    def contains(self, view: memoryview) -> bool:
        start = _address(view)
        for r in self.regions:
            base = _address(r.view)
            if base <= start and start + len(view) <= base + r.size:
                return True
        return False

    def edges(self) -> list[int]:
        """Guest addresses where bounds checks matter: region starts and ends, and their neighbours."""
        out = [0, 1 << 63, (1 << 64) - 1]
        for r in self.regions:
            out += [r.gpa, r.gpa + 8, r.gpa_end - 16, r.gpa_end - 1, r.gpa_end, r.gpa - 1]
        return [a for a in out if 0 <= a < 1 << 64]


@st.composite
def layouts(draw) -> Layout:
    spans, gpa = [], draw(st.integers(0, 4)) * PAGE
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, 4)) * PAGE
        spans.append((gpa, size))
        gpa += size + draw(st.integers(0, 2)) * PAGE  # 0: adjacent regions, a buffer may cross them
    return Layout(spans)


def descriptors(draw, layout: Layout, count: int) -> list[tuple[int, int, int, int]]:
    edges = layout.edges()
    near_edge = st.builds(lambda a, d: min(max(0, a + d), (1 << 64) - 1), st.sampled_from(edges),
                          st.integers(-64, 64))
    addr = st.one_of(st.sampled_from(edges), near_edge, st.integers(0, (1 << 64) - 1))
    length = st.one_of(st.sampled_from([0, 1, 16, 32, 48, PAGE, 2 * PAGE, 0xFFFFFFFF]),
                       st.integers(0, 3 * PAGE))
    flags = st.one_of(st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                       VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT,
                                       VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT]), st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, count + 1), st.integers(0, 0xFFFF))
    return draw(st.lists(st.tuples(addr, length, flags, nxt), min_size=count, max_size=count))


def _fill(layout: Layout, gpa: int, data: bytes) -> None:
    """Writes `data` at `gpa` if it fits in guest memory (descriptor tables placed by the fuzzer)."""
    try:
        views = layout.memory.views(gpa, len(data))
    except Exception:
        return
    pos = 0
    for v in views:
        v[:] = data[pos:pos + len(v)]
        pos += len(v)


def check_chain(layout: Layout, chain) -> None:
    """The chain's views lie in guest memory, and its writable views are the guest ranges it names."""
    readable = chain.reader.views(chain.reader.remaining)
    writable = chain.writer.views(chain.writer.available)
    assert all(layout.contains(v) for v in readable + writable)
    assert chain.writable_ranges is not None
    assert sum(n for _, n in chain.writable_ranges) == sum(map(len, writable))
    # The writable views are exactly the host memory of the guest ranges the chain names, in order
    # (compared as merged (address, length) spans: descriptors may legally overlap).
    named = [v for gpa, n in chain.writable_ranges if n for v in ref_views(layout, gpa, n)]
    assert _spans(writable) == _spans(named)


def _spans(views: list[memoryview]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in views:
        start = _address(v)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + len(v))
        else:
            out.append((start, len(v)))
    return out


#: struct virtq_desc (virtio 1.2, 2.7.5): le64 addr, le32 len, le16 flags, le16 next.
REF_DESC = struct.Struct("<QIHH")
REF_NEXT, REF_WRITE, REF_INDIRECT = 1, 2, 4


def ref_views(layout: Layout, gpa: int, length: int) -> list[memoryview] | None:
    """The test's own translation of guest range gpa+length into slices of its mappings (a range
    running from one region into the next adjacent one becomes two), or None if it leaves memory."""
    out = []
    while length:
        for r in layout.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                n = min(length, r.gpa + r.size - gpa)
                out.append(memoryview(r.mapping)[gpa - r.gpa:gpa - r.gpa + n])
                gpa, length = gpa + n, length - n
                break
        else:
            return None
    return out


def reference_walk(layout: Layout, table: bytes, num: int, head: int, indirect_ok: bool):
    """virtio 1.2, 2.7.5, written out plainly: (readable views, writable views, writable ranges) of
    the chain at `head`, or None for a chain the device must refuse. The walker must agree."""
    if head >= num:
        return None
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    ranges: list[tuple[int, int]] = []
    entries = list(REF_DESC.iter_unpack(table[:REF_DESC.size * num]))
    limit, idx, count, total, nested = num, head, 0, 0, False
    while True:
        count += 1
        if count > limit:
            return None
        addr, length, flags, nxt = entries[idx]
        if flags & REF_INDIRECT:
            if not indirect_ok or nested or flags & REF_NEXT or length == 0 or length % 16:
                return None
            views = ref_views(layout, addr, length)
            if views is None:
                return None
            entries = list(REF_DESC.iter_unpack(b"".join(views)))
            limit, idx, count, nested = length // 16, 0, 0, True
            continue
        total += length
        if total >= 1 << 32:
            return None
        if flags & REF_WRITE:
            ranges.append((addr, length))
        elif ranges:  # even an empty writable descriptor ends the readable part
            return None
        if length:
            views = ref_views(layout, addr, length)
            if views is None:
                return None
            (writable if flags & REF_WRITE else readable).extend(views)
        if not flags & REF_NEXT:
            return readable, writable, ranges
        idx = nxt
        if idx >= limit:
            return None


@given(st.data())
def test_walk_chain_returns_views_in_memory_or_chain_error(data):
    layout = data.draw(layouts())
    num = data.draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = b"".join(DESC.pack(*d) for d in descriptors(data.draw, layout, num))
    # Indirect tables the descriptors may point at: random entries written at region edges.
    for _ in range(data.draw(st.integers(0, 2))):
        gpa = data.draw(st.sampled_from(layout.edges()))
        entries = descriptors(data.draw, layout, data.draw(st.integers(1, 8)))
        _fill(layout, gpa, b"".join(DESC.pack(*d) for d in entries))
    head = data.draw(st.one_of(st.integers(0, num - 1), st.integers(0, 0xFFFF)))
    indirect_ok = data.draw(st.booleans())
    expected = reference_walk(layout, table, num, head, indirect_ok)
    walker = ChainWalker(layout.memory, memoryview(table), num)
    try:
        chain = walker.walk(head, indirect_ok, log=True)
    except ChainError:
        assert expected is None, "a chain the reference walk accepts was refused"
        return
    assert expected is not None, "a chain the reference walk refuses was accepted"
    readable, writable, ranges = expected
    assert chain.writable_ranges == ranges
    assert _spans(chain.reader.views(chain.reader.remaining)) == _spans(readable)
    assert _spans(chain.writer.views(chain.writer.available)) == _spans(writable)
    check_chain(layout, walker.walk(head, indirect_ok, log=True))


class UsedLog:
    """Records what the queue reports writing to the used ring (the dirty log's view of it)."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, int]] = []

    def mark_used(self, offset: int, length: int) -> None:
        self.marks.append((offset, length))


SEED_NUM = 8
RING_GPA = 0x10000
BUF_GPA = RING_GPA + 4 * PAGE


def seed_ring(indirect: bool) -> tuple[list[tuple[int, int, int, int]], list[int], bytes]:
    """A ring of valid chains: (descriptor table entries, avail ring heads, indirect table bytes)."""
    buf = [BUF_GPA + i * 512 for i in range(16)]
    desc = [
        (buf[0], 40, REF_NEXT, 1), (buf[1], 100, REF_WRITE, 0),                        # request + reply
        (buf[2], 40, REF_NEXT, 3), (buf[3], 8, REF_NEXT, 4), (buf[4], 512, REF_WRITE, 0),  # longer
        (BUF_GPA + 8 * 512, 32, REF_INDIRECT, 0) if indirect else (buf[5], 16, 0, 0),   # indirect
        (buf[6], 64, REF_WRITE, 0),                                                     # write-only
        (buf[7], 24, 0, 0),                                                             # read-only
    ]
    table = REF_DESC.pack(buf[9], 40, REF_NEXT, 1) + REF_DESC.pack(buf[10], 200, REF_WRITE, 0)
    return desc, [0, 2, 5, 6, 7], table


@st.composite
def mutated_rings(draw):
    indirect = draw(st.booleans())
    desc, heads, indirect_table = seed_ring(indirect)
    desc = [list(d) for d in desc]
    edges = [0, 1, 15, 16, 17, SEED_NUM - 1, SEED_NUM, 0xFFFF, RING_GPA - 1, BUF_GPA + 16 * PAGE,
             (1 << 64) - 1, 0xFFFFFFFF]
    for _ in range(draw(st.integers(0, 3))):
        i, f = draw(st.integers(0, SEED_NUM - 1)), draw(st.integers(0, 3))
        desc[i][f] = draw(st.one_of(st.sampled_from(edges), st.integers(0, (1 << (64, 32, 16, 16)[f]) - 1)))
        desc[i][f] &= (1 << (64, 32, 16, 16)[f]) - 1
    for _ in range(draw(st.integers(0, 1))):
        heads[draw(st.integers(0, len(heads) - 1))] = draw(st.sampled_from([1, 3, SEED_NUM, 0xFFFF]))
    count = len(heads) if draw(st.integers(0, 5)) else draw(st.sampled_from([0, 1, SEED_NUM + 1, 0xFFFF]))
    last = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFE]))
    return indirect, [tuple(d) for d in desc], heads, indirect_table, count, last


def _play_ring(layout: Layout, indirect: bool, desc, heads, indirect_table: bytes, count: int, last: int,
               event_idx: bool, logged: bool) -> tuple[int, int]:
    """Lays the ring out in guest memory, pops and serves what the driver made available; returns
    (chains served, chains refused)."""
    ring = layout.regions[0]
    view = memoryview(ring.mapping)
    avail_at = desc_table_size(SEED_NUM)
    used_at = avail_at + avail_ring_size(SEED_NUM) + 2
    used_at += -used_at % 4
    table = b"".join(REF_DESC.pack(*d) for d in desc)
    view[:len(table)] = table
    avail = bytearray(avail_ring_size(SEED_NUM))
    struct.pack_into("<HH", avail, 0, 0, (last + count) & 0xFFFF)
    for i, head in enumerate(heads[:SEED_NUM]):
        struct.pack_into("<H", avail, 4 + 2 * ((last + i) % SEED_NUM), head)
    view[avail_at:avail_at + len(avail)] = avail
    ind = ref_views(layout, BUF_GPA + 8 * 512, len(indirect_table))
    ind[0][:] = indirect_table
    queue = SplitQueue(layout.memory, SEED_NUM, view[:avail_at], view[avail_at:avail_at + len(avail)],
                       view[used_at:used_at + used_ring_size(SEED_NUM)], last_avail_idx=last,
                       event_idx=event_idx, indirect=indirect)
    log = UsedLog() if logged else None
    queue.log = log
    queue.disable_kicks()
    served = refused = 0
    try:
        pending = queue.pending()
    except QueueBroken:
        assert count > SEED_NUM
        return 0, 0
    assert pending == count
    for _ in range(pending):
        head = queue.pop_head()
        expected = reference_walk(layout, table, SEED_NUM, head, indirect)
        try:
            chain = queue.chain(head)
        except ChainError:
            assert expected is None, f"chain {head}: the reference walk accepts it"
            queue.push(head, 0)
            refused += 1
            continue
        assert expected is not None, f"chain {head}: the reference walk refuses it"
        readable, writable, ranges = expected
        assert _spans(chain.reader.views(chain.reader.remaining)) == _spans(readable)
        assert _spans(chain.writer.views(chain.writer.available)) == _spans(writable)
        if logged:
            assert chain.writable_ranges == ranges
        written = chain.writer.write(b"r" * min(8, chain.writer.available))
        queue.push(head, written)
        served += 1
        used_idx, = struct.unpack_from("<H", view, used_at + 2)
        assert used_idx == queue.used_idx
        slot = (queue.used_idx - 1) % SEED_NUM
        assert struct.unpack_from("<II", view, used_at + 4 + 8 * slot) == (head, written)
    queue.notify_needed()
    assert queue.wait_avail(0, ffi.new("uint32_t *", 1)) is False
    assert queue.enable_kicks() is False
    if logged:
        assert log is not None and (2, 2) in log.marks or not pending
    return served, refused


def test_seed_ring_pops_every_chain():
    """Unmutated, the seed ring's chains all pop, walk as the reference walks them, and return."""
    layout = Layout([(RING_GPA, 16 * PAGE)])
    for indirect in (False, True):
        for event_idx in (False, True):
            desc, heads, table = seed_ring(indirect)
            assert _play_ring(layout, indirect, desc, heads, table, len(heads), 0xFFFE, event_idx,
                              logged=True) == (len(heads), 0)


@given(mutated_rings(), st.booleans(), st.booleans())
def test_split_queue_pops_mutated_rings(ring, event_idx, logged):
    indirect, desc, heads, table, count, last = ring
    layout = Layout([(RING_GPA, 12 * PAGE), (RING_GPA + 12 * PAGE, 4 * PAGE)])
    served, refused = _play_ring(layout, indirect, desc, heads, table, count, last, event_idx, logged)
    event(f"chains served: {'some' if served else 'none'}, refused: {'some' if refused else 'none'}")
