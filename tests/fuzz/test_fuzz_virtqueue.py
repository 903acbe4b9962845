"""Fuzzing the descriptor-chain walker and SplitQueue over random descriptor tables and memory layouts.

Guest memory is 1..3 regions of anonymous memory at random page-aligned guest addresses (with holes
between them); the descriptor table, the avail ring and the indirect tables hold random entries whose
addresses cluster around region edges, where the bounds checks live. Every walk must either return
views that lie inside guest memory, at the guest addresses the chain names, or raise ChainError;
the queue may also raise QueueBroken for an avail index that ran ahead. Nothing else may escape.
"""

from __future__ import annotations

import mmap

from hypothesis import given
from hypothesis import strategies as st

from vhostfs.native import ffi
from vhostfs.vhost_user.memory import GuestMemory, MappedRegion
from vhostfs.virtqueue.split import (
    DESC,
    U16,
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
    named = [v for gpa, n in chain.writable_ranges if n for v in layout.memory.views(gpa, n)]
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


def reference_walk(memory: GuestMemory, table: bytes, num: int, head: int, indirect_ok: bool):
    """virtio 1.2, 2.7.5, written out plainly: (readable views, writable views, writable ranges) of
    the chain at `head`, or None for a chain the device must refuse. The walker must agree."""
    if head >= num:
        return None
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    ranges: list[tuple[int, int]] = []
    entries = list(DESC.iter_unpack(table))
    limit, idx, count, total, nested = num, head, 0, 0, False
    while True:
        count += 1
        if count > limit:
            return None
        addr, length, flags, nxt = entries[idx]
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect_ok or nested or flags & VIRTQ_DESC_F_NEXT or length == 0 or length % 16:
                return None
            try:
                entries = list(DESC.iter_unpack(b"".join(memory.views(addr, length))))
            except Exception:
                return None
            limit, idx, count, nested = length // 16, 0, 0, True
            continue
        total += length
        if total >= 1 << 32:
            return None
        if flags & VIRTQ_DESC_F_WRITE:
            ranges.append((addr, length))
        elif ranges:  # even an empty writable descriptor ends the readable part
            return None
        if length:
            try:
                views = memory.views(addr, length)
            except Exception:
                return None
            (writable if flags & VIRTQ_DESC_F_WRITE else readable).extend(views)
        if not flags & VIRTQ_DESC_F_NEXT:
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
    expected = reference_walk(layout.memory, table, num, head, indirect_ok)
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


@given(st.data())
def test_split_queue_pops_any_ring(data):
    layout = data.draw(layouts())
    num = data.draw(st.sampled_from([1, 2, 4, 8]))
    first = layout.regions[0]
    desc_at, avail_at = 0, desc_table_size(num)
    used_at = avail_at + avail_ring_size(num) + 2  # 4-byte aligned: avail ring size is even
    used_at += -used_at % 4
    if used_at + used_ring_size(num) > first.size:
        return
    view = first.view
    table = b"".join(DESC.pack(*d) for d in descriptors(data.draw, layout, num))
    view[desc_at:desc_at + len(table)] = table
    avail = data.draw(st.binary(min_size=avail_ring_size(num), max_size=avail_ring_size(num)))
    view[avail_at:avail_at + len(avail)] = avail
    last = data.draw(st.integers(0, 0xFFFF))
    queue = SplitQueue(layout.memory, num, view[desc_at:avail_at], view[avail_at:avail_at + len(avail)],
                       view[used_at:used_at + used_ring_size(num)], last_avail_idx=last,
                       event_idx=data.draw(st.booleans()), indirect=data.draw(st.booleans()))
    queue.log = None
    try:
        pending = queue.pending()
    except QueueBroken:
        assert (U16.unpack_from(avail, 2)[0] - last) & 0xFFFF > num
        return
    for _ in range(pending):
        head = queue.pop_head()
        try:
            chain = queue.walker.walk(head, queue.indirect, log=True)
        except ChainError:
            queue.push(head, 0)
            continue
        check_chain(layout, chain)
        queue.push(head, chain.writer.available)
    queue.notify_needed()
    assert queue.enable_kicks() is False
