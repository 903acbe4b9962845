"""FUSE over io_uring (protocol 7.42, Linux 6.14): the kernel's requests and the replies on io_uring queues.

Instead of one read(2) and one write(2) on /dev/fuse per request, each ring entry is a pair of buffers
registered with the kernel by an IORING_OP_URING_CMD (FUSE_IO_URING_CMD_REGISTER) on the /dev/fuse fd:
the kernel completes the command when it puts a request into them, and the server answers with one
FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which hands the reply over and offers the entry for the next
request in the same io_uring_enter(2). There is one queue per possible CPU (the kernel queues a
request on the queue of the CPU its caller runs on, and uses the rings only once every queue has an
entry), each served by `threads_per_queue` threads pinned to that CPU, each thread with its own
io_uring and one entry. FORGET and INTERRUPT still come through /dev/fuse, so the session's /dev/fuse
workers keep reading.

An entry (include/uapi/linux/fuse.h, struct fuse_uring_req_header): a 288-byte header buffer holding
fuse_in_header (then fuse_out_header) in its first 128 bytes, the request's fixed per-opcode argument
in the next 128 and struct fuse_uring_ent_in_out after them; and a payload buffer of at least the
kernel's largest transfer, holding the rest of the request's arguments (names, WRITE data) and then
the reply's body. The server sees the request as the bytes /dev/fuse would have given it (header,
argument, payload) and writes its reply as it would to /dev/fuse; only the split between the buffers
differs.

Needs the fuse module's enable_uring parameter (/sys/module/fuse/parameters/enable_uring, off by
default) and io_uring itself (the kernel.io_uring_disabled sysctl may forbid it).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable

from vhostfs import native
from vhostfs.fuse import abi
from vhostfs.iov import Reader, Writer

log = logging.getLogger("vhostfs.fuse.uring")

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
#: enum fuse_uring_cmd: the cmd_op of an IORING_OP_URING_CMD on /dev/fuse.
FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2
#: struct fuse_uring_cmd_req (in the SQE's 80-byte command area): flags, commit_id, qid, padding.
URING_CMD_REQ = struct.Struct("<QQH6x")
assert URING_CMD_REQ.size == 24
#: struct fuse_uring_ent_in_out: flags, commit_id, payload_sz, padding, reserved.
URING_ENT_IN_OUT = struct.Struct("<QQI4xQ")
assert URING_ENT_IN_OUT.size == 32
FUSE_URING_IN_OUT_HEADER_SZ = 128
FUSE_URING_OP_IN_OUT_SZ = 128
_ENT_IN_OUT_OFFSET = FUSE_URING_IN_OUT_HEADER_SZ + FUSE_URING_OP_IN_OUT_SZ
#: sizeof(struct fuse_uring_req_header)
URING_REQ_HEADER_SIZE = _ENT_IN_OUT_OFFSET + URING_ENT_IN_OUT.size
assert URING_REQ_HEADER_SIZE == 288
# struct iovec[2]: header buffer, payload buffer.
_IOVECS = struct.Struct("=QQQQ")
# Completions that mean the connection is gone (unmounted, aborted) or the ring is being torn down.
_GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV)
_IN_HDR = abi.IN_HEADER.size
# len, opcode, unique: the start of fuse_in_header.
_IN_PREFIX = struct.Struct("<IIQ")
_OUT_HDR = abi.OUT_HEADER.size


def possible_cpus() -> int:
    """The kernel's num_possible_cpus(), the number of queues it expects (sysfs cpu/possible)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def unavailable() -> str | None:
    """Why FUSE over io_uring cannot be used here, or None when it can: the fuse module parameter is
    on and an io_uring can be created."""
    try:
        with open(ENABLE_URING) as f:
            enabled = f.read().strip() == "Y"
    except OSError:
        return "the kernel has no FUSE over io_uring (no enable_uring parameter of the fuse module)"
    if not enabled:
        return f"the fuse module's enable_uring parameter is off ({ENABLE_URING})"
    try:
        native.Uring(1).close()
    except OSError as exc:
        return f"io_uring is not available ({exc.strerror})"
    return None


class _Entry:
    """One ring entry's buffers and its iovec array (mmap'd, so their addresses stay put)."""

    def __init__(self, payload_size: int) -> None:
        self.header = mmap.mmap(-1, mmap.PAGESIZE)
        self.payload = mmap.mmap(-1, payload_size)
        self.iov = mmap.mmap(-1, mmap.PAGESIZE)
        self.hv = memoryview(self.header)
        self.pv = memoryview(self.payload)
        _IOVECS.pack_into(self.iov, 0, native.buffer_address(self.header), URING_REQ_HEADER_SIZE,
                          native.buffer_address(self.payload), payload_size)
        self.iov_addr = native.buffer_address(self.iov)

    def close(self) -> None:
        """Unmaps the buffers; one a request's view still holds is left to the garbage collector."""
        self.hv.release()
        self.pv.release()
        for m in (self.header, self.payload, self.iov):
            try:
                m.close()
            except BufferError:
                pass


class UringQueues:
    """The io_uring queues of one /dev/fuse connection, serving requests with `handle` (FuseServer.handle).

    Construct before INIT (it creates the rings, so a failure shows before FUSE_OVER_IO_URING is
    offered); `start` after the INIT reply has been written (the kernel registers entries only on an
    initialized connection); `join` once the connection is gone, when the queue threads end.
    `payload_size` must be at least the kernel's largest transfer: max(8192, max_write,
    max_pages * page size) of what INIT negotiated.
    """

    def __init__(self, fd: int, handle: Callable[[Reader, Writer], int], payload_size: int, *,
                 queues: int | None = None, threads_per_queue: int = 1) -> None:
        if threads_per_queue < 1:
            raise ValueError(f"threads_per_queue must be at least 1, not {threads_per_queue}")
        self.fd = fd
        self.handle = handle
        self.queues = queues if queues is not None else possible_cpus()
        self.payload_size = payload_size
        # One ring and one entry per thread; created now so that failures show before INIT.
        self._rings = [native.Uring(2) for _ in range(self.queues * threads_per_queue)]
        self._threads: list[threading.Thread] = []
        self._threads_per_queue = threads_per_queue
        self.served = 0  # requests answered through the rings (for tests and the log)

    def start(self) -> None:
        """Starts the queue threads, which register their entries."""
        for i, ring in enumerate(self._rings):
            qid = i // self._threads_per_queue
            t = threading.Thread(target=self._serve, args=(ring, qid), name=f"fuse-uring-{qid}.{i}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def join(self, timeout: float | None = None) -> None:
        """Waits for the queue threads to end (they do when the connection is gone)."""
        for t in self._threads:
            t.join(timeout)

    def _serve(self, ring: native.Uring, qid: int) -> None:
        try:
            os.sched_setaffinity(0, {qid})  # the kernel queues a caller's request on its CPU's queue
        except OSError:
            pass
        entry = _Entry(self.payload_size)
        try:
            ring.cmd(self.fd, FUSE_IO_URING_CMD_REGISTER, entry.iov_addr, 2, 0, URING_CMD_REQ.pack(0, 0, qid))
            while True:
                _, res = ring.wait()
                if res < 0:
                    if -res not in _GONE:
                        log.error("FUSE io_uring queue %d: the kernel ended an entry with %s", qid,
                                  os.strerror(-res))
                    return
                commit_id = self._answer(entry)
                ring.cmd(self.fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, entry.iov_addr, 2, 0,
                         URING_CMD_REQ.pack(0, commit_id, qid))
        except OSError as exc:
            log.error("FUSE io_uring queue %d stopped: %s", qid, exc)
        finally:
            ring.close()
            entry.close()

    def _answer(self, entry: _Entry) -> int:
        """Serves the request in `entry` and leaves the reply there; returns its commit id."""
        hv, pv = entry.hv, entry.pv
        _, commit_id, payload_sz, _ = URING_ENT_IN_OUT.unpack_from(hv, _ENT_IN_OUT_OFFSET)
        length, _, unique = _IN_PREFIX.unpack_from(hv)
        arg_size = length - _IN_HDR - payload_sz
        if not 0 <= arg_size <= FUSE_URING_OP_IN_OUT_SZ or payload_sz > len(pv):
            # Not what the kernel sends: answer EIO rather than guess at the layout.
            n = 0
        else:
            arg = FUSE_URING_IN_OUT_HEADER_SZ
            reader = Reader([hv[:_IN_HDR], hv[arg:arg + arg_size], pv[:payload_sz]])
            n = self.handle(reader, Writer([hv[:_OUT_HDR], pv]))
        if n < _OUT_HDR:
            # Nothing to send (a request that takes no reply should never come this way), but the
            # entry must be committed to be used again.
            abi.OUT_HEADER.pack_into(hv, 0, _OUT_HDR, -errno.EIO, unique or commit_id)
            n = _OUT_HDR
        URING_ENT_IN_OUT.pack_into(hv, _ENT_IN_OUT_OFFSET, 0, commit_id, n - _OUT_HDR, 0)
        self.served += 1
        return commit_id
