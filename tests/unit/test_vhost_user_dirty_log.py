"""The dirty-page log bitmap, and what a queue logs through it."""

import mmap
import os
import threading

import pytest

from vhostfs.vhost_user.dirty_log import VHOST_LOG_PAGE, DirtyLog, QueueLog
from vhostfs.vhost_user.memory import GuestMemory, map_region
from vhostfs.vhost_user.messages import MemoryRegion, VhostUserError
from vhostfs.virtqueue.split import DESC, U16, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, SplitQueue

LOG_SIZE = 64  # 512 pages: 2 MiB of guest memory


@pytest.fixture
def logfile():
    fd = os.memfd_create("log")
    os.ftruncate(fd, 0x2000)
    view = mmap.mmap(fd, 0x2000)
    yield fd, view
    view.close()
    os.close(fd)


def dirty_pages(view, offset=0, size=LOG_SIZE):
    return {i for i in range(size * 8) if view[offset + i // 8] & (1 << i % 8)}


def test_mark_sets_one_bit_per_page_touched(logfile):
    fd, view = logfile
    log = DirtyLog(fd, LOG_SIZE, 0)
    log.mark(0x1FFF, 2)  # last byte of page 1, first of page 2
    log.mark(9 * VHOST_LOG_PAGE, VHOST_LOG_PAGE)  # exactly page 9
    log.mark(20 * VHOST_LOG_PAGE, 0)  # nothing written, nothing logged
    assert dirty_pages(view) == {1, 2, 9}


def test_log_at_an_offset_in_its_file(logfile):
    fd, view = logfile
    log = DirtyLog(fd, LOG_SIZE, 0x1010)
    log.mark(0, 1)
    assert view[0x1010] == 1 and dirty_pages(view) == set()


def test_range_beyond_the_log_is_not_marked(logfile):
    fd, view = logfile
    log = DirtyLog(fd, LOG_SIZE, 0)
    log.mark(LOG_SIZE * 8 * VHOST_LOG_PAGE - 1, 2)  # ends one page past the log
    log.mark(1 << 60, 8)
    assert dirty_pages(view, size=LOG_SIZE + 8) == set()


def test_log_must_fit_its_file(logfile):
    fd, _ = logfile
    with pytest.raises(VhostUserError):
        DirtyLog(fd, 0x1000, 0x1001)
    with pytest.raises(VhostUserError):
        DirtyLog(fd, 0, 0)


def test_concurrent_marks_in_one_byte_are_all_kept(logfile):
    fd, view = logfile
    log = DirtyLog(fd, LOG_SIZE, 0)

    def mark(page):
        for _ in range(2000):
            log.mark(page * VHOST_LOG_PAGE, 1)

    threads = [threading.Thread(target=mark, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert view[0] == 0xFF


def test_queue_log_marks_only_the_bytes_written(logfile):
    fd, view = logfile
    qlog = QueueLog(DirtyLog(fd, LOG_SIZE, 0), used_log_addr=None)
    # Three writable buffers; the reply filled the first and 1 byte of the second.
    qlog.mark_written([(0x10000, 0x1000), (0x30000, 0x2000), (0x50000, 0x1000)], 0x1001)
    qlog.mark_used(0, 8)  # no used-ring logging asked for
    assert dirty_pages(view) == {0x10, 0x30}


def test_split_queue_logs_used_ring_and_records_writable_ranges(logfile):
    fd, view = logfile
    mem_fd = os.memfd_create("guest")
    os.ftruncate(mem_fd, 0x100000)
    try:
        memory = GuestMemory([map_region(MemoryRegion(0, 0x100000, 0x7F0000000000, 0), mem_fd)])
    finally:
        os.close(mem_fd)
    num, desc, avail, used = 8, 0x1000, 0x2000, 0x3000
    q = SplitQueue(memory, num, memory.view(desc, 16 * num), memory.view(avail, 6 + 2 * num),
                   memory.view(used, 6 + 8 * num), event_idx=True)
    used_log = 0x40000  # the ring's log_guest_addr: a different address than its own on purpose
    q.log = QueueLog(DirtyLog(fd, LOG_SIZE, 0), used_log_addr=used_log)
    guest = memory.view(0, 0x100000)
    DESC.pack_into(guest, desc, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1)
    DESC.pack_into(guest, desc + 16, 0x9000, 0x3000, VIRTQ_DESC_F_WRITE, 0)
    U16.pack_into(guest, avail + 4, 0)
    U16.pack_into(guest, avail + 2, 1)
    chain = q.chain(q.pop_head())
    assert chain.writable_ranges == [(0x9000, 0x3000)]
    q.log.mark_written(chain.writable_ranges, 0x1100)
    q.push(chain.head, 0x1100)
    q.enable_kicks()
    assert dirty_pages(view) == {9, 0xA, 0x40}
