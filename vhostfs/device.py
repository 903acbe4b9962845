"""The virtio-fs device: joins the vhost-user session, the virtqueues and the FUSE server.

Queue 0 is the high-priority queue (FORGET, INTERRUPT), queues 1.. are request queues (virtio 1.2,
5.11.2). Each running queue has its own worker thread that waits on the kick eventfd, drains the
available ring through the FUSE server, returns the chains on the used ring and signals the call
eventfd when the driver wants it.

A request queue that runs dry is polled for a while before its worker sleeps: a guest waiting on
each reply (synchronous I/O, metadata loops) puts its next request on the ring soon after the
interrupt, and picking it up by polling saves the driver its kick and the worker its wake-up, the
largest fixed costs of a round trip. Kicks stay disabled while polling (virtio 1.2, 2.7.10), so the
driver does not even notify. How long is adaptive (PollBudget, up to `poll_us`): polling goes on only
while the next request comes within it, so that a guest that pauses longer does not have the worker
spin after every burst, on a core its own vCPU may need.

A request that may wait without bound (FUSE_SETLKW: a lock another owner holds, perhaps one whose
unlock is queued behind it) is served on a thread of its own, so that the queue goes on; the server
says which requests those are (FuseServer.may_wait), so the device never parses a request itself.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from vhostfs import native
from vhostfs.dax import DaxWindow
from vhostfs.iov import Reader
from vhostfs.vhost_user import messages as vu
from vhostfs.vhost_user.backend_channel import BackendChannel
from vhostfs.vhost_user.dirty_log import QueueLog
from vhostfs.vhost_user.handler import Vring
from vhostfs.vhost_user.memory import GuestMemory
from vhostfs.virtqueue.split import (
    ChainError,
    QueueBroken,
    SplitQueue,
    avail_ring_size,
    check_queue_size,
    check_ring_addresses,
    desc_table_size,
    used_ring_size,
)

log = logging.getLogger("vhostfs.device")

#: virtio-fs configuration space (virtio 1.2, 5.11.4): tag[36], num_request_queues (le32).
VIRTIO_FS_CONFIG = struct.Struct("<36sI")
assert VIRTIO_FS_CONFIG.size == 40
VIRTIO_FS_TAG_MAX = 36

#: Request queues a front end may set up (GET_QUEUE_NUM reports one more, for the hiprio queue).
MAX_REQUEST_QUEUES = 16

#: Requests of one queue waiting on threads of their own at a time; later ones queue for a thread.
MAX_WAITING = 64

#: Where an adaptive poll budget starts growing from (as KVM's halt_poll_ns_grow_start).
POLL_GROW_START_NS = 10_000
#: Polls in a row that must find nothing before the budget shrinks.
POLL_PATIENCE = 4


class PollBudget:
    """How long a request queue that ran dry is polled before its worker sleeps, adapted much as KVM's
    halt polling adapts halt_poll_ns (Documentation/virt/kvm/halt-polling.rst).

    A queue that slept reports how long after running dry its next request came (`slept`): sooner
    than `max_ns` means a longer poll would have caught it, so the budget doubles (from
    POLL_GROW_START_NS, up to `max_ns`). Later means the poll only burnt CPU time: once that has
    happened POLL_PATIENCE times without a poll finding a request in between (`hit`), the budget
    halves, and below the start it is 0 (no polling until a request comes soon again). A guest that
    alternates quick requests with longer pauses keeps its polls; one that pauses after every
    request stops them. `max_ns` 0 never polls. Not thread-safe: one queue's worker owns it.
    """

    __slots__ = ("max_ns", "ns", "found", "_misses")

    def __init__(self, max_ns: int) -> None:
        self.max_ns = max_ns
        self.ns = max_ns
        #: Polls that found a request (each saved the driver a kick and the worker a wake-up).
        self.found = 0
        self._misses = 0

    def hit(self) -> None:
        """A poll found a request."""
        self.found += 1
        self._misses = 0

    def slept(self, idle_ns: int) -> None:
        """The queue ran dry, polled `ns` in vain and slept; its next request came `idle_ns` after it
        ran dry."""
        if idle_ns < self.max_ns:
            self._misses = 0
            self.ns = min(self.max_ns, max(self.ns * 2, POLL_GROW_START_NS))
            return
        self._misses += 1
        if self._misses >= POLL_PATIENCE:
            self.ns = self.ns // 2 if self.ns // 2 >= POLL_GROW_START_NS else 0


DEVICE_FEATURES = (
    1 << vu.VIRTIO_F_VERSION_1
    | 1 << vu.VIRTIO_RING_F_INDIRECT_DESC
    | 1 << vu.VIRTIO_RING_F_EVENT_IDX
    | 1 << vu.VHOST_F_LOG_ALL
)


def ring_views(memory: GuestMemory, vring: Vring) -> tuple[memoryview, memoryview, memoryview]:
    """The descriptor table, avail and used rings of `vring`, whose addresses are front-end addresses."""
    assert vring.addr is not None
    num = vring.num
    out = []
    for uva, size in ((vring.addr.desc, desc_table_size(num)), (vring.addr.avail, avail_ring_size(num)),
                      (vring.addr.used, used_ring_size(num))):
        out.append(memory.view(memory.uva_to_gpa(uva, size), size))
    return out[0], out[1], out[2]


class QueueWorker:
    """Serves one virtqueue on its own thread until stopped.

    With `pool_size` > 0 the worker only takes chains off the ring and `pool_size` threads serve
    them, so a request that blocks (a lock, a slow host file system) does not hold up the others and
    system calls of several requests overlap. A head already in flight is never taken (nor
    completed) a second time.

    In either mode a request that may wait without bound (`may_wait(reader)` gives its unique,
    else None) is served on a thread of its
    own (up to MAX_WAITING at a time, then in turn; `waiting` maps its head to its unique). Every
    thread completes its chains through `_complete`, which writes the used ring under `used_lock`.
    `stop` ends those waits with `interrupt(unique)`
    (the server's FuseServer.interrupt: the request answers EINTR) rather than waiting for a lock
    that may never come, and returns once they have completed.
    """

    def __init__(self, index: int, vq: SplitQueue, vring: Vring, handle, pool_size: int = 0,
                 interrupt: Callable[[int], object] | None = None, poll_us: int = 0,
                 may_wait: Callable[[Reader], int | None] = lambda reader: None) -> None:
        self.index = index
        self.may_wait = may_wait
        self.queue = vq
        self.vring = vring
        self.kick_fd = vring.kick_fd
        self.call_fd = vring.call_fd
        self.handle = handle
        self.call_lock = threading.Lock()
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.new_memory: GuestMemory | None = None
        self.broken = False
        self.stopping = False
        #: Descriptor chains taken off the ring (requests) since the queue started.
        self.requests = 0
        self.thread = threading.Thread(target=self._run, name=f"vhostfs-queue{index}", daemon=True)
        self.used_lock = threading.Lock()
        self.in_flight: set[int] = set()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.pool = [threading.Thread(target=self._serve_jobs, name=f"vhostfs-queue{index}-{i}", daemon=True)
                     for i in range(pool_size)]
        self.interrupt = interrupt
        self.waiting: dict[int, int] = {}
        self._backlog: deque = deque()
        self._waiters = 0
        self._waiter_done = threading.Condition(self.used_lock)
        self.poll = PollBudget(poll_us * 1000)
        # When the queue last ran dry and then slept (0: it did not), for the poll budget.
        self._dry_since = 0
        # Set to end a poll early: stop() and a new memory table must not wait for its timeout.
        self._poll_wake = native.ffi.new("uint32_t *")

    def start(self) -> None:
        for t in self.pool:
            t.start()
        self.thread.start()

    def stop(self) -> int:
        """Stops taking requests, finishes those in flight; returns the next avail index."""
        self.stopping = True
        self._poll_wake[0] = 1
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join()
        with self._waiter_done:
            # Interrupted again after each completion: a request taken from the backlog meanwhile
            # may have missed the interrupt (see _serve_waiting).
            while self._waiters:
                if self.interrupt is not None:
                    for unique in self.waiting.values():
                        self.interrupt(unique)
                self._waiter_done.wait()
        for _ in self.pool:
            self.jobs.put(None)
        for t in self.pool:
            t.join()
        os.close(self.stop_fd)
        log.debug("queue %d: %d requests served, %d polls found one", self.index, self.requests,
                  self.poll.found)
        return self.queue.last_avail_idx

    def set_memory(self, memory: GuestMemory) -> None:
        """Has the worker switch to a new memory table before it next touches the ring."""
        self.new_memory = memory
        self._poll_wake[0] = 1

    def set_call_fd(self, fd: int) -> None:
        with self.call_lock:
            self.call_fd = fd

    def _signal(self) -> None:
        with self.call_lock:
            if self.call_fd >= 0:
                os.eventfd_write(self.call_fd, 1)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self.stop_fd, select.POLLIN)
        try:
            # Buffers may already be waiting (a restarted ring, or a kick sent before we listened).
            self._drain()
            while True:
                events = poller.poll()
                if any(fd == self.stop_fd for fd, _ in events):
                    return
                for _fd, ev in events:
                    if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        log.error("queue %d: kick fd failed (events %#x)", self.index, ev)
                        return
                try:
                    os.eventfd_read(self.kick_fd)
                except BlockingIOError:
                    pass
                if self._dry_since:
                    self.poll.slept(time.monotonic_ns() - self._dry_since)
                    self._dry_since = 0
                self._drain()
        except Exception:
            log.exception("queue %d: worker failed", self.index)

    def _drain(self) -> None:
        q = self.queue
        if self.broken:
            return
        handle = self.handle
        try:
            while True:
                if self.new_memory is not None:
                    memory, self.new_memory = self.new_memory, None
                    self._poll_wake[0] = int(self.stopping)
                    q.remap(memory, *ring_views(memory, self.vring))
                q.disable_kicks()
                served = 0
                while not self.stopping and q.pending():
                    head = q.pop_head()
                    self.requests += 1
                    if self.pool:
                        self._dispatch(head)
                        continue
                    if self.waiting and head in self.waiting:
                        log.error("queue %d: descriptor chain %d offered again while in flight", self.index,
                                  head)
                        continue
                    try:
                        chain = q.chain(head)
                    except ChainError as e:
                        log.error("queue %d: bad descriptor chain %d: %s", self.index, head, e)
                        self._complete(head, 0, None, batch=True)
                        served += 1
                        continue
                    unique = self.may_wait(chain.reader)
                    if unique is not None:
                        self._serve_apart(chain, unique)
                        continue
                    self._complete(head, handle(chain.reader, chain.writer), chain.writable_ranges,
                                   batch=True)
                    served += 1
                if served:
                    self._flush()
                if self.stopping:
                    return
                # Kicks stay disabled while polling. Each turn of the poll yields the CPU to whatever
                # else is runnable: on a host with few cores that is often the VMM thread that must
                # deliver the interrupt first. A stop or a new memory table ends the poll.
                dry = time.monotonic_ns() if self.poll.max_ns else 0
                budget = self.poll.ns
                if budget and q.wait_avail(budget, self._poll_wake):
                    self.poll.hit()
                    continue
                if not q.enable_kicks():
                    self._dry_since = dry
                    return
        except QueueBroken as e:
            # virtio 1.2, 2.7.13.3: the ring cannot be trusted any more; stop serving it.
            log.error("queue %d: %s; the queue is stopped until it is reset", self.index, e)
            self.broken = True

    def _complete(self, head: int, length: int, ranges: list[tuple[int, int]] | None, *,
                  batch: bool = False) -> None:
        """Returns chain `head` to the driver with `length` bytes written: the one place where the
        queue's used ring is written, by whichever thread served the request.

        `ranges` are the chain's writable guest ranges when they were recorded (dirty-page logging),
        marked dirty up to `length`. The push happens under `used_lock`, as the worker, the pool and
        the threads of waiting requests may all complete chains, and the head stops being in flight.
        With `batch`, the interrupt is left to `_flush` (the worker signals once per burst).
        """
        q = self.queue
        if ranges is not None:
            assert q.log is not None
            q.log.mark_written(ranges, length)
        with self.used_lock:
            q.push(head, length)
            self.in_flight.discard(head)
            self.waiting.pop(head, None)
            notify = not batch and q.notify_needed()
        if notify:
            self._signal()

    def _flush(self) -> None:
        """Signals the driver if it wants an interrupt for the chains completed with `batch`."""
        with self.used_lock:
            notify = self.queue.notify_needed()
        if notify:
            self._signal()

    def _serve_apart(self, chain, unique: int) -> None:
        """Serves request `unique`, which may wait without bound, on a thread of its own (both modes)."""
        with self.used_lock:
            self.waiting[chain.head] = unique
            if self._waiters >= MAX_WAITING:
                self._backlog.append(chain)
                return
            self._waiters += 1
        threading.Thread(target=self._serve_waiting, args=(chain,), name=f"vhostfs-queue{self.index}-wait",
                         daemon=True).start()

    def _serve_waiting(self, chain) -> None:
        handle = self.handle
        while chain is not None:
            self._complete(chain.head, handle(chain.reader, chain.writer), chain.writable_ranges)
            with self.used_lock:
                chain = self._backlog.popleft() if self._backlog else None
                if chain is None:
                    self._waiters -= 1
                elif self.stopping and self.interrupt is not None:
                    # stop() may have interrupted it before it was taken: once more, now.
                    self.interrupt(self.waiting[chain.head])
                self._waiter_done.notify_all()

    def _dispatch(self, head: int) -> None:
        """Hands chain `head` to the pool (pool mode)."""
        q = self.queue
        with self.used_lock:
            if head in self.in_flight or head in self.waiting:
                # The driver offered a head it has not got back yet (virtio 1.2, 2.7.13.2 forbids
                # it); serving it twice would complete it twice.
                log.error("queue %d: descriptor chain %d offered again while in flight", self.index, head)
                return
            try:
                chain = q.chain(head)
            except ChainError as e:
                log.error("queue %d: bad descriptor chain %d: %s", self.index, head, e)
                chain = None
            else:
                unique = self.may_wait(chain.reader)
                if unique is None:
                    self.in_flight.add(head)
                    self.jobs.put(chain)
                    return
        if chain is None:
            self._complete(head, 0, None)
        else:
            self._serve_apart(chain, unique)

    def _serve_jobs(self) -> None:
        handle = self.handle
        while (chain := self.jobs.get()) is not None:
            self._complete(chain.head, handle(chain.reader, chain.writer), chain.writable_ranges)


class VirtioFsDevice:
    """The vhost-user back end of a virtio-fs device serving `server` (a FuseServer).

    `request_queues` is what the configuration space announces (with a `tag`); the front end may
    set up any number of request queues up to MAX_REQUEST_QUEUES. `thread_pool_size` threads serve
    each request queue (0: the queue's own thread serves its requests one at a time).
    """

    def __init__(self, server, *, tag: str | None = None, request_queues: int = 1,
                 thread_pool_size: int = 0, dax_window: DaxWindow | None = None, poll_us: int = 0) -> None:
        if tag is not None and not 0 < len(tag.encode()) <= VIRTIO_FS_TAG_MAX:
            raise ValueError(f"tag must be 1 to {VIRTIO_FS_TAG_MAX} bytes")
        self.server = server
        self.tag = tag
        self.request_queues = request_queues
        self.thread_pool_size = thread_pool_size
        self.poll_us = poll_us
        self.max_queues = 1 + max(request_queues, MAX_REQUEST_QUEUES)
        self.features = DEVICE_FEATURES
        self.protocol_features = 1 << vu.VHOST_USER_PROTOCOL_F_CONFIG if tag is not None else 0
        # Migration carries the FUSE session as the back end's own state (QEMU 8.2+ "internal"
        # migration of vhost-user-fs).
        self.protocol_features |= 1 << vu.VHOST_USER_PROTOCOL_F_DEVICE_STATE
        self.workers: dict[int, QueueWorker] = {}
        #: The DAX window (shmid 0), mapped by the front end through the back-end channel: offered
        #: only when enabled, so a front end without one never sees VHOST_USER_PROTOCOL_F_SHMEM.
        self.dax_window = dax_window
        self.shmem_regions = [dax_window.size] if dax_window is not None else []
        self._backend_channel: BackendChannel | None = None
        if dax_window is not None:
            self.protocol_features |= 1 << vu.VHOST_USER_PROTOCOL_F_SHMEM

    def _handle(self, reader, writer) -> int:
        try:
            return self.server.handle(reader, writer)
        except Exception:
            log.exception("request failed")
            return 0

    #: The split ring's own rules (virtio 1.2, 2.7), checked as the front end sets a ring up.
    check_ring_size = staticmethod(check_queue_size)
    check_ring_addresses = staticmethod(check_ring_addresses)

    def start_queue(self, index: int, vring: Vring, memory: GuestMemory, features: int,
                    log: QueueLog | None = None) -> None:
        vq = SplitQueue(memory, vring.num, *ring_views(memory, vring), last_avail_idx=vring.base,
                           event_idx=bool(features & 1 << vu.VIRTIO_RING_F_EVENT_IDX),
                           indirect=bool(features & 1 << vu.VIRTIO_RING_F_INDIRECT_DESC))
        # Fixed for the queue's life: the session restarts the queue to change it.
        vq.log = log
        # The hiprio queue only carries FORGET and INTERRUPT, which never block.
        worker = QueueWorker(index, vq, vring, self._handle, self.thread_pool_size if index else 0,
                             self.server.interrupt, self.poll_us if index else 0, self.server.may_wait)
        self.workers[index] = worker
        worker.start()

    def stop_queue(self, index: int) -> int:
        return self.workers.pop(index).stop()

    def set_call_fd(self, index: int, fd: int) -> None:
        self.workers[index].set_call_fd(fd)

    def set_memory(self, memory: GuestMemory) -> None:
        for worker in self.workers.values():
            worker.set_memory(memory)

    def config(self) -> bytes:
        tag = (self.tag or "").encode()
        return VIRTIO_FS_CONFIG.pack(tag, self.request_queues)

    def set_backend_channel(self, channel: BackendChannel | None) -> None:
        """The front end's back-end channel (None when it is gone); the DAX window maps through it."""
        old, self._backend_channel = self._backend_channel, channel
        if self.dax_window is not None:
            self.dax_window.mapper = channel
        if old is not None:
            old.close()

    # -- migration: the FUSE session is the device's state ---------------------------------------
    def save_state(self) -> bytes:
        """The session state (vhostfs.fuse.session_state) while every queue is stopped."""
        if self.workers:
            raise RuntimeError(f"queues {sorted(self.workers)} still run")
        return self.server.save_state()

    def load_state(self, data: bytes) -> None:
        """Takes over a saved session before the queues start."""
        if self.workers:
            raise RuntimeError(f"queues {sorted(self.workers)} already run")
        self.server.load_state(data)

    def resume_after_save(self) -> None:
        self.server.fs.resume_after_save()

    def reset(self) -> None:
        for index in list(self.workers):
            self.stop_queue(index)
        if self.dax_window is not None:
            # The front end unmaps the whole window on reset (vhost-user.rst, SHMEM_MAP).
            self.dax_window.forget_all()
        self.server.reset()
