"""Split virtqueue: chains walked over rings built in an anonymous mmap (virtio 1.2, 2.7)."""

import mmap

import pytest

from vhostfs.virtqueue.split import (
    DESC,
    U16,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    ChainError,
    QueueBroken,
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

MEM_SIZE = 1 << 20
NUM = 8
DESC_AT, AVAIL_AT, USED_AT = 0x1000, 0x2000, 0x3000
R, W, N, IND = 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


class FlatMemory:
    """Guest memory as a list of (gpa, view) regions; gaps are unmapped."""

    def __init__(self, regions):
        self.regions = regions

    def _find(self, gpa):
        for base, view in self.regions:
            if base <= gpa < base + len(view):
                return base, view
        raise ValueError(f"unmapped {gpa:#x}")

    def region_views(self):
        return self.regions

    def views(self, gpa, length):
        out = []
        while length:
            base, view = self._find(gpa)
            off = gpa - base
            n = min(length, len(view) - off)
            out.append(view[off:off + n])
            gpa += n
            length -= n
        return out

    def view(self, gpa, length):
        base, view = self._find(gpa)
        if gpa - base + length > len(view):
            raise ValueError("not contiguous")
        return view[gpa - base:gpa - base + length]


@pytest.fixture
def ring():
    buf = mmap.mmap(-1, MEM_SIZE)
    view = memoryview(buf)
    mem = FlatMemory([(0, view[:MEM_SIZE // 2]), (MEM_SIZE // 2, view[MEM_SIZE // 2:])])
    return Ring(mem, view)


class Ring:
    def __init__(self, mem, view, event_idx=False, indirect=True):
        self.mem, self.view = mem, view
        self.q = SplitQueue(mem, NUM, view[DESC_AT:DESC_AT + desc_table_size(NUM)],
                            view[AVAIL_AT:AVAIL_AT + avail_ring_size(NUM)],
                            view[USED_AT:USED_AT + used_ring_size(NUM)], event_idx=event_idx,
                            indirect=indirect)
        self.avail_idx = 0

    def desc(self, idx, addr, length, flags, nxt=0, table=DESC_AT):
        DESC.pack_into(self.view, table + 16 * idx, addr, length, flags, nxt)

    def offer(self, head):
        U16.pack_into(self.view, AVAIL_AT + 4 + 2 * (self.avail_idx % NUM), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        U16.pack_into(self.view, AVAIL_AT + 2, self.avail_idx)

    def pop(self):
        assert self.q.pending()
        return self.q.chain(self.q.pop_head())


def test_direct_chain_gives_readable_then_writable_views(ring):
    ring.view[0x10000:0x10004] = b"ping"
    ring.desc(0, 0x10000, 4, R | N, 1)
    ring.desc(1, 0x20000, 100, W)
    ring.offer(0)
    chain = ring.pop()
    assert chain.head == 0
    assert chain.reader.read(10) == b"ping"
    chain.writer.write(b"pong")
    assert bytes(ring.view[0x20000:0x20004]) == b"pong"
    assert chain.writer.available == 96


def test_views_alias_guest_memory_without_copy(ring):
    ring.desc(0, 0x10000, 4096, W)
    ring.offer(0)
    chain = ring.pop()
    [v] = chain.writer.views(4096)
    v[0:3] = b"abc"
    assert bytes(ring.view[0x10000:0x10003]) == b"abc"


def test_buffer_spanning_two_regions_is_split(ring):
    start = MEM_SIZE // 2 - 10
    ring.desc(0, start, 30, R)
    ring.offer(0)
    chain = ring.pop()
    assert [len(v) for v in chain.reader.views(30)] == [10, 20]


def test_indirect_chain(ring):
    table = 0x8000
    ring.view[0x10000:0x10003] = b"abc"
    ring.desc(0, 0x10000, 3, R | N, 1, table=table)
    ring.desc(1, 0x20000, 50, W, table=table)
    ring.desc(2, table, 32, IND)
    ring.offer(2)
    chain = ring.pop()
    assert chain.reader.read(3) == b"abc"
    assert chain.writer.available == 50


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_table_length_must_be_nonzero_multiple_of_16(ring, length):
    ring.desc(0, 0x8000, length, IND)
    ring.offer(0)
    with pytest.raises(ChainError):
        ring.pop()


def test_nested_indirect_refused(ring):
    ring.desc(0, 0x9000, 16, IND, table=0x8000)
    ring.desc(0, 0x8000, 16, IND)
    ring.offer(0)
    with pytest.raises(ChainError, match="nested"):
        ring.pop()


def test_indirect_with_next_refused(ring):
    ring.desc(0, 0x10000, 4, R, table=0x8000)
    ring.desc(0, 0x8000, 16, IND | N, 1)
    ring.offer(0)
    with pytest.raises(ChainError):
        ring.pop()


def test_indirect_without_feature_refused(ring):
    ring.q.indirect = False
    ring.desc(0, 0x10000, 4, R, table=0x8000)
    ring.desc(0, 0x8000, 16, IND)
    ring.offer(0)
    with pytest.raises(ChainError):
        ring.pop()


def test_loop_is_refused(ring):
    ring.desc(0, 0x10000, 4, R | N, 1)
    ring.desc(1, 0x10000, 4, R | N, 0)
    ring.offer(0)
    with pytest.raises(ChainError, match="loops"):
        ring.pop()


def test_loop_inside_indirect_table_is_refused(ring):
    ring.desc(0, 0x10000, 4, R | N, 1, table=0x8000)
    ring.desc(1, 0x10000, 4, R | N, 0, table=0x8000)
    ring.desc(0, 0x8000, 32, IND)
    ring.offer(0)
    with pytest.raises(ChainError, match="loops"):
        ring.pop()


def test_next_index_out_of_range(ring):
    ring.desc(0, 0x10000, 4, R | N, NUM)
    ring.offer(0)
    with pytest.raises(ChainError, match="next index"):
        ring.pop()


def test_head_index_out_of_range(ring):
    ring.offer(NUM + 3)
    with pytest.raises(ChainError, match="head index"):
        ring.pop()


def test_readable_after_writable_refused(ring):
    ring.desc(0, 0x10000, 4, W | N, 1)
    ring.desc(1, 0x20000, 4, R)
    ring.offer(0)
    with pytest.raises(ChainError, match="readable"):
        ring.pop()


@pytest.mark.parametrize("addr,length", [(MEM_SIZE - 2, 4), (MEM_SIZE + 100, 1), ((1 << 64) - 2, 4)])
def test_buffer_outside_memory_refused(ring, addr, length):
    ring.desc(0, addr, length, R)
    ring.offer(0)
    with pytest.raises(ChainError, match="outside"):
        ring.pop()


def test_total_length_capped_at_4GiB(ring):
    # The second buffer is refused for the running total before its address is even looked at.
    ring.desc(0, 0x10000, 16, R | N, 1)
    ring.desc(1, 0x10000, 0xFFFFFFFF, R)
    ring.offer(0)
    with pytest.raises(ChainError, match="4 GiB"):
        ring.pop()


def test_avail_index_jump_beyond_queue_size_breaks_queue(ring):
    U16.pack_into(ring.view, AVAIL_AT + 2, NUM + 1)
    with pytest.raises(QueueBroken):
        ring.q.pending()


def test_push_publishes_element_then_index(ring):
    ring.desc(0, 0x20000, 16, W)
    ring.offer(0)
    head = ring.q.pop_head()
    ring.q.push(head, 7)
    assert U16.unpack_from(ring.view, USED_AT + 2)[0] == 1
    assert USED_ELEM.unpack_from(ring.view, USED_AT + 4) == (0, 7)


def test_no_interrupt_flag_without_event_idx(ring):
    ring.q.push(0, 0)
    assert ring.q.notify_needed()
    U16.pack_into(ring.view, AVAIL_AT, VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.q.push(0, 0)
    assert not ring.q.notify_needed()


def test_kick_suppression_without_event_idx(ring):
    ring.q.disable_kicks()
    assert U16.unpack_from(ring.view, USED_AT)[0] == VIRTQ_USED_F_NO_NOTIFY
    assert ring.q.enable_kicks() is False
    assert U16.unpack_from(ring.view, USED_AT)[0] == 0


def test_enable_kicks_rechecks_the_ring(ring):
    ring.desc(0, 0x20000, 16, W)
    ring.offer(0)
    assert ring.q.enable_kicks() is True


def test_event_idx_used_event_suppresses_interrupts():
    buf = mmap.mmap(-1, MEM_SIZE)
    view = memoryview(buf)
    r = Ring(FlatMemory([(0, view)]), view, event_idx=True)
    used_event_at = AVAIL_AT + 4 + 2 * NUM
    r.q.push(0, 0)
    assert r.q.notify_needed()  # first notification always goes out
    U16.pack_into(view, used_event_at, 5)  # driver: interrupt me when used idx passes 5
    r.q.push(0, 0)
    assert not r.q.notify_needed()  # used idx 2
    for _ in range(4):
        r.q.push(0, 0)
    assert r.q.notify_needed()  # used idx 6 crossed 5


def test_event_idx_avail_event_written_on_enable():
    buf = mmap.mmap(-1, MEM_SIZE)
    view = memoryview(buf)
    r = Ring(FlatMemory([(0, view)]), view, event_idx=True)
    r.desc(0, 0x20000, 16, W)
    r.offer(0)
    r.q.pop_head()
    assert r.q.enable_kicks() is False
    assert U16.unpack_from(view, USED_AT + 4 + 8 * NUM)[0] == 1


@pytest.mark.parametrize("num", [0, 3, 65536])
def test_bad_queue_sizes(num):
    view = memoryview(bytearray(1 << 20))
    with pytest.raises(ValueError):
        SplitQueue(FlatMemory([(0, view)]), num, view, view, view)


def test_contiguous_buffers_merge_into_one_view(ring):
    # Three device-writable pages back to back, then a gap: two views, the first covering three.
    for i, addr in enumerate((0x20000, 0x21000, 0x22000, 0x30000)):
        ring.desc(i, addr, 0x1000, W | (N if i < 3 else 0), i + 1)
    ring.offer(0)
    chain = ring.pop()
    views = chain.writer.views(0x4000)
    assert [len(v) for v in views] == [0x3000, 0x1000]
    views[0][0x2FFF:0x3000] = b"!"
    assert ring.view[0x22FFF:0x23000] == b"!"


def test_readable_and_writable_never_merge(ring):
    ring.desc(0, 0x20000, 0x100, R | N, 1)
    ring.desc(1, 0x20100, 0x100, W)
    ring.offer(0)
    chain = ring.pop()
    assert chain.reader.remaining == 0x100 and chain.writer.available == 0x100


def test_buffers_adjacent_across_a_region_boundary_stay_apart(ring):
    half = MEM_SIZE // 2
    ring.desc(0, half - 0x100, 0x100, R | N, 1)
    ring.desc(1, half, 0x100, R)
    ring.offer(0)
    assert [len(v) for v in ring.pop().reader.views(0x200)] == [0x100, 0x100]
