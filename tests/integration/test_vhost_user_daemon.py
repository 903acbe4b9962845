"""The daemon's vhost-user side under the requests a VMM sends while the guest runs: dirty-page
logging for live migration, stopping and resuming rings, memory and call fds changing under load."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys

from vhostfs.fuse import abi
from vhostfs.testing.frontend import PAGE
from vhostfs.testing.fuse_client import FuseClient
from vhostfs.vhost_user import messages as m

from .conftest import check_statfs

R = m.Request
LOG_ALL = 1 << m.VHOST_F_LOG_ALL


def pages(start: int, length: int) -> set[int]:
    return set(range(start // PAGE, (start + length - 1) // PAGE + 1))


def post(fe, index: int, data: bytes, reply_size: int) -> tuple[int, int]:
    """Writes a request chain (one readable, one writable buffer) without publishing it."""
    ring = fe.rings[index]
    src = fe.alloc(len(data))
    dst = fe.alloc(reply_size, PAGE)
    fe.view[src:src + len(data)] = data
    return fe.make_chain(ring, [(src, len(data))], [(dst, reply_size)]), dst


def test_dirty_log_marks_reply_buffers_and_used_ring(daemon):
    data = os.urandom(20000)
    (daemon.shared / "f").write_bytes(data)
    with daemon.connect() as fe:
        offered = fe.call_u64(R.VHOST_USER_GET_FEATURES)
        assert offered & LOG_ALL
        assert fe.call_u64(R.VHOST_USER_GET_PROTOCOL_FEATURES) & 1 << m.VHOST_USER_PROTOCOL_F_LOG_SHMFD
        # As QEMU does: logging off at first, then log base, LOG_ALL and the rings' log flag.
        fe.negotiate(features=offered & ~LOG_ALL)
        assert fe.set_mem_table() == 0
        for i in range(2):
            fe.add_ring(i)
        client = FuseClient(fe)
        client.init()
        nodeid = client.lookup(abi.ROOT_ID, b"f")[0]
        fh = client.open(nodeid)

        log_size = fe.mem_size // PAGE // 8
        log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(log_fd, log_size)
        bitmap = mmap.mmap(log_fd, log_size)
        try:
            fe.send(R.VHOST_USER_SET_LOG_BASE, m.LOG.pack(log_size, 0), [log_fd])
            assert m.U64.unpack(fe.recv_reply(R.VHOST_USER_SET_LOG_BASE))[0] == 0
            assert fe.ack(R.VHOST_USER_SET_FEATURES, m.U64.pack(fe.features | LOG_ALL)) == 0
            ring = fe.rings[1]
            # log_guest_addr: where the used ring is logged (here, its own guest address).
            assert fe.ack(R.VHOST_USER_SET_VRING_ADDR, m.VRING_ADDR.pack(
                1, 1 << m.VHOST_VRING_F_LOG, fe.uva(ring.desc), fe.uva(ring.used), fe.uva(ring.avail),
                ring.used)) == 0
            bitmap[:] = bytes(log_size)  # the VMM syncs and clears the log before copying

            reply_size = 64 << 10  # far more than the reply: only what is written is logged
            request = client.message(abi.FUSE_READ, nodeid, abi.READ_IN.pack(fh, 0, len(data), 0, 0,
                                                                              os.O_RDONLY))
            head, dst = post(fe, 1, request, reply_size)
            fe.publish(ring, head)
            assert fe.wait_used(ring) == (head, abi.OUT_HEADER.size + len(data))
            assert fe.view[dst + abi.OUT_HEADER.size:dst + abi.OUT_HEADER.size + len(data)] == data

            dirty = {i for i in range(log_size * 8) if bitmap[i // 8] & 1 << i % 8}
            assert dirty == pages(dst, abi.OUT_HEADER.size + len(data)) | pages(ring.used, 8)
        finally:
            bitmap.close()
            os.close(log_fd)


def test_logging_off_leaves_the_log_alone(daemon):
    (daemon.shared / "f").write_bytes(b"x" * 5000)
    with daemon.connect() as fe:
        fe.negotiate(features=fe.call_u64(R.VHOST_USER_GET_FEATURES) & ~LOG_ALL)
        assert fe.set_mem_table() == 0
        for i in range(2):
            fe.add_ring(i)
        log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        log_size = fe.mem_size // PAGE // 8
        os.ftruncate(log_fd, log_size)
        try:
            fe.send(R.VHOST_USER_SET_LOG_BASE, m.LOG.pack(log_size, 0), [log_fd])
            assert m.U64.unpack(fe.recv_reply(R.VHOST_USER_SET_LOG_BASE))[0] == 0
            client = FuseClient(fe)
            client.init()
            nodeid = client.lookup(abi.ROOT_ID, b"f")[0]
            assert client.read(nodeid, client.open(nodeid), 0, 5000) == b"x" * 5000
            assert os.pread(log_fd, log_size, 0) == bytes(log_size)
        finally:
            os.close(log_fd)


def test_get_vring_base_stops_ring_and_set_vring_base_resumes(daemon):
    with daemon.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        client.init()
        for _ in range(3):
            client.statfs()
        ring = fe.rings[1]
        state = fe.call(R.VHOST_USER_GET_VRING_BASE, m.VRING_STATE.pack(1, 0))
        # INIT and three STATFS were consumed: the next avail index is 4.
        assert m.VRING_STATE.unpack(state) == (1, 4)

        # Requests posted while the ring is stopped stay unserved...
        heads = []
        for _ in range(2):
            head, _ = post(fe, 1, client.message(abi.FUSE_STATFS, abi.ROOT_ID), 4096)
            fe.publish(ring, head)
            heads.append(head)
        fe.sync()
        assert fe.used_idx(ring) == 4

        # ... until the VMM restarts it where it stopped, with a new kick fd.
        fe.send(R.VHOST_USER_SET_VRING_BASE, m.VRING_STATE.pack(1, 4))
        os.close(ring.kick)
        ring.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fe.send(R.VHOST_USER_SET_VRING_KICK, m.U64.pack(1), [ring.kick])
        assert [fe.wait_used(ring)[0] for _ in heads] == heads
        check_statfs(client, daemon.shared)


def test_kick_before_ring_is_enabled_is_ignored(daemon):
    with daemon.connect() as fe:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        fe.add_ring(0)
        ring = fe.add_ring(1, enable=False)
        client = FuseClient(fe)
        head, _ = post(fe, 1, client.message(abi.FUSE_STATFS, abi.ROOT_ID), 4096)
        fe.publish(ring, head)  # kicks a ring that is not enabled
        fe.sync()
        assert fe.used_idx(ring) == 0
        fe.send(R.VHOST_USER_SET_VRING_ENABLE, m.VRING_STATE.pack(1, 1))
        assert fe.wait_used(ring)[0] == head


def test_memory_added_while_queues_run(daemon):
    with daemon.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        client.init()
        # A second region (as memory hot-plug adds one), holding the next request's buffers.
        extra_gpa, extra_size = 1 << 32, 1 << 20
        extra_fd = os.memfd_create("hotplug", os.MFD_CLOEXEC)
        os.ftruncate(extra_fd, extra_size)
        extra = mmap.mmap(extra_fd, extra_size)
        try:
            region = bytes(8) + m.MEMORY_REGION.pack(extra_gpa, extra_size, 0x7E00_0000_0000, 0)
            assert fe.ack(R.VHOST_USER_ADD_MEM_REG, region, [extra_fd]) == 0
            check_statfs(client, daemon.shared)
            request = client.message(abi.FUSE_STATFS, abi.ROOT_ID)
            extra[:len(request)] = request
            ring = fe.rings[1]
            head = fe.make_chain(ring, [(extra_gpa, len(request))], [(extra_gpa + PAGE, PAGE)])
            fe.publish(ring, head)
            _, length = fe.wait_used(ring)
            assert abi.OUT_HEADER.unpack_from(extra, PAGE)[:2] == (length, 0)
        finally:
            extra.close()
            os.close(extra_fd)


def test_call_fd_replaced_while_running(daemon):
    with daemon.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        client.init()
        ring = fe.rings[1]
        old = ring.call
        ring.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        assert fe.ack(R.VHOST_USER_SET_VRING_CALL, m.U64.pack(1), [ring.call]) == 0
        try:
            check_statfs(client, daemon.shared)  # wait_used waits on the new call fd
            try:
                os.eventfd_read(old)
                signalled_old = True
            except BlockingIOError:
                signalled_old = False
            assert not signalled_old
        finally:
            os.close(old)


def test_a_state_transfer_while_a_queue_runs_is_refused(daemon):
    """The daemon migrates (migrate-precopy, DEVICE_STATE), but only once every ring is stopped
    (vhost-user.rst, "Migrating back-end state"): a front end that asks for the state while a queue
    runs is told no, and the device goes on serving."""
    caps = json.loads(subprocess.run([sys.executable, "-m", "vhostfs", "--print-capabilities"],
                                     capture_output=True, text=True, timeout=60, check=True).stdout)
    with daemon.connect() as fe:
        fe.setup(queues=2)
        offered = fe.call_u64(R.VHOST_USER_GET_PROTOCOL_FEATURES)
        offers_state = offered >> m.VHOST_USER_PROTOCOL_F_DEVICE_STATE & 1
        assert bool(offers_state) == ("migrate-precopy" in caps["features"])
        client = FuseClient(fe)
        client.init()
        read_end, write_end = os.pipe()
        try:
            # struct VhostUserTransferDeviceState: direction SAVE (0), phase STOPPED (0).
            fe.send(R.VHOST_USER_SET_DEVICE_STATE_FD, struct.pack("=II", 0, 0), [write_end],
                    need_reply=True)
            reply = fe.recv_reply(R.VHOST_USER_SET_DEVICE_STATE_FD)
            assert reply == b"" or m.U64.unpack(reply)[0] != 0
            assert fe.ack(R.VHOST_USER_CHECK_DEVICE_STATE) != 0
        finally:
            os.close(read_end)
            os.close(write_end)
        check_statfs(client, daemon.shared)
