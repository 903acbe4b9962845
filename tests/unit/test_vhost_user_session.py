"""The vhost-user session over a real socket pair, against a recording back end.

Each refused request must leave the session serving (the next request still answered) and its old
state in place.
"""

import gc
import os
import socket
import threading

import pytest

from vhostfs.testing.frontend import Frontend
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user.connection import Connection
from vhostfs.vhost_user.handler import SESSION_PROTOCOL_FEATURES, Session
from vhostfs.virtqueue import split

R = m.Request
REPLY_ACK = 1 << m.VHOST_USER_PROTOCOL_F_REPLY_ACK


class RecordingBackend:
    max_queues = 2
    features = 1 << m.VIRTIO_F_VERSION_1 | 1 << m.VIRTIO_RING_F_EVENT_IDX | 1 << m.VHOST_F_LOG_ALL
    protocol_features = 1 << m.VHOST_USER_PROTOCOL_F_CONFIG
    check_ring_size = staticmethod(split.check_queue_size)
    check_ring_addresses = staticmethod(split.check_ring_addresses)

    def __init__(self):
        self.events = []
        self.memory = None
        self.logs = {}

    def start_queue(self, index, vring, memory, features, log=None):
        self.events.append(("start", index, vring.base))
        self.logs[index] = log

    def stop_queue(self, index):
        self.events.append(("stop", index))
        return 42

    def set_call_fd(self, index, fd):
        self.events.append(("call", index))

    def set_memory(self, memory):
        self.memory = memory

    def config(self):
        return b"tag".ljust(36, b"\0") + (1).to_bytes(4, "little")

    def reset(self):
        self.events.append(("reset",))


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    backend = RecordingBackend()
    session = Session(backend)
    t = threading.Thread(target=session.serve, args=(Connection(b),), daemon=True)
    t.start()
    fe = Frontend(a, mem_size=1 << 20)
    fe.sock.settimeout(10)
    yield fe, session, backend, t
    fe.close()
    t.join(5)
    assert not t.is_alive()


def acked(fe):
    fe.negotiate(protocol_features=SESSION_PROTOCOL_FEATURES | RecordingBackend.protocol_features)
    return fe


def test_negotiation_and_queue_lifecycle(pair):
    fe, session, backend, _ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2
    assert fe.call_u64(R.VHOST_USER_GET_MAX_MEM_SLOTS) >= 509
    fe.add_ring(0, 64, enable=False)
    fe.sync()
    assert backend.events == []  # protocol features negotiated: rings start disabled
    fe.send(R.VHOST_USER_SET_VRING_ENABLE, m.VRING_STATE.pack(0, 1))
    fe.sync()
    assert backend.events == [("start", 0, 0)]
    state = fe.call(R.VHOST_USER_GET_VRING_BASE, m.VRING_STATE.pack(0, 0))
    assert m.VRING_STATE.unpack(state) == (0, 42)
    assert backend.events[-1] == ("stop", 0)


def test_ring_starts_on_kick_without_protocol_features(pair):
    fe, _, backend, _ = pair
    fe.negotiate(features=RecordingBackend.features)
    assert fe.set_mem_table() == 0
    fe.add_ring(0, 64, enable=False)
    fe.sync()
    assert ("start", 0, 0) in backend.events


def test_disconnect_resets_backend(pair):
    fe, _, backend, t = pair
    acked(fe)
    fe.sock.close()
    t.join(5)
    assert backend.events[-1] == ("reset",)


def test_header_size_over_4096_disconnects(pair):
    fe, *_ = pair
    fe.raw(m.HEADER.pack(R.VHOST_USER_GET_FEATURES, 1, 4097))
    assert fe.closed_by_peer()


def test_wrong_version_disconnects(pair):
    fe, *_ = pair
    fe.raw(m.HEADER.pack(R.VHOST_USER_GET_FEATURES, 0x2, 0))
    assert fe.closed_by_peer()


def test_reserved_flag_bits_disconnect(pair):
    fe, *_ = pair
    fe.raw(m.HEADER.pack(R.VHOST_USER_GET_FEATURES, 1 | 0x100, 0))
    assert fe.closed_by_peer()


def test_body_shorter_than_size_field_then_eof(pair):
    fe, _, backend, t = pair
    fe.raw(m.HEADER.pack(R.VHOST_USER_SET_FEATURES, 1, 8) + b"\0\0")
    fe.sock.shutdown(socket.SHUT_WR)
    t.join(5)
    assert not t.is_alive()
    assert backend.events[-1] == ("reset",)


def test_short_payload_is_refused_and_session_goes_on(pair):
    fe, *_ = pair
    acked(fe)
    assert fe.ack(R.VHOST_USER_SET_VRING_NUM, b"\0\0\0\0") != 0
    assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2


def test_fds_on_request_taking_none_are_closed_and_refused(pair):
    fe, *_ = pair
    acked(fe)
    r, w = os.pipe()
    try:
        assert fe.ack(R.VHOST_USER_SET_VRING_NUM, m.VRING_STATE.pack(0, 64), [w]) != 0
        os.close(w)
        w = -1
        # The daemon closed its copy: the pipe has no writer left.
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def memfd(size):
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    return fd


def mem_table(*regions):
    return m.MEMORY_HEADER.pack(len(regions), 0) + b"".join(m.MEMORY_REGION.pack(*r) for r in regions)


@pytest.mark.parametrize("case", ["fd_count", "size0", "overflow", "overlap", "beyond_file", "zero",
                                  "too_many"])
def test_bad_memory_tables_keep_the_old_one(pair, case):
    fe, session, *_ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    old = session.memory
    before = _open_fds()
    fds = [memfd(0x10000), memfd(0x10000)]
    # A refused region is unmapped at once: its fd must not wait for the garbage collector.
    gc.disable()
    try:
        payload, send = {
            "fd_count": (mem_table((0, 0x10000, 0x1000000, 0)), fds),
            "size0": (mem_table((0, 0, 0x1000000, 0)), fds[:1]),
            "overflow": (mem_table(((1 << 64) - 0x1000, 0x10000, 0x1000000, 0)), fds[:1]),
            "overlap": (mem_table((0, 0x10000, 0x1000000, 0), (0x8000, 0x8000, 0x2000000, 0)), fds),
            "beyond_file": (mem_table((0, 0x10000, 0x1000000, 0x1000)), fds[:1]),
            "zero": (m.MEMORY_HEADER.pack(0, 0), []),
            "too_many": (mem_table(*[(i << 20, 0x1000, 0x1000000 + (i << 20), 0) for i in range(9)]),
                         fds),
        }[case]
        assert fe.ack(R.VHOST_USER_SET_MEM_TABLE, payload, send) != 0
    finally:
        for fd in fds:
            os.close(fd)
        gc.enable()
    assert session.memory is old
    assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2
    assert _open_fds() <= before


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_a_refused_added_region_is_unmapped_at_once(pair):
    """Found by the fuzzer: ADD_MEM_REG overlapping a region kept its mapping (and fd) until the
    garbage collector ran."""
    fe, session, *_ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    old = session.memory
    before = _open_fds()
    fd = memfd(0x10000)
    gc.disable()
    try:
        region = bytes(8) + m.MEMORY_REGION.pack(0, 0x10000, 0x7E00_0000_0000, 0)  # over the table's
        assert fe.ack(R.VHOST_USER_ADD_MEM_REG, region, [fd]) != 0
        os.close(fd)
        assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2
        assert _open_fds() <= before
    finally:
        gc.enable()
    assert session.memory is old


def test_add_and_remove_regions(pair):
    fe, session, *_ = pair
    acked(fe)
    fds = [memfd(0x20000) for _ in range(2)]
    try:
        assert fe.ack(R.VHOST_USER_ADD_MEM_REG, bytes(8) + m.MEMORY_REGION.pack(0, 0xA0000 // 8, 0x100000, 0),
                      fds[:1]) == 0
        assert fe.ack(R.VHOST_USER_ADD_MEM_REG, bytes(8) + m.MEMORY_REGION.pack(0xC0000, 0x10000, 0x200000,
                                                                                 0x10000), fds[1:]) == 0
        assert len(session.memory.regions) == 2
        # Overlapping the first one: refused, table unchanged.
        fd = memfd(0x20000)
        assert fe.ack(R.VHOST_USER_ADD_MEM_REG, bytes(8) + m.MEMORY_REGION.pack(0x1000, 0x1000, 0x900000, 0),
                      [fd]) != 0
        os.close(fd)
        assert len(session.memory.regions) == 2
        assert fe.ack(R.VHOST_USER_REM_MEM_REG, bytes(8) + m.MEMORY_REGION.pack(0, 0xA0000 // 8, 0x100000, 0)
                      ) == 0
        assert [r.gpa for r in session.memory.regions] == [0xC0000]
        assert fe.ack(R.VHOST_USER_REM_MEM_REG, bytes(8) + m.MEMORY_REGION.pack(0, 0x1000, 0x100000, 0)) != 0
    finally:
        for fd in fds:
            os.close(fd)


def test_buffer_crossing_regions(pair):
    fe, session, *_ = pair
    acked(fe)
    fds = [memfd(0x10000) for _ in range(2)]
    try:
        for i, fd in enumerate(fds):
            payload = bytes(8) + m.MEMORY_REGION.pack(i * 0x10000, 0x10000, 0x100000 * (i + 1), 0)
            assert fe.ack(R.VHOST_USER_ADD_MEM_REG, payload, [fd]) == 0
    finally:
        for fd in fds:
            os.close(fd)
    views = session.memory.views(0xFFF0, 0x20)
    assert [len(v) for v in views] == [0x10, 0x10]
    assert session.memory.uva_to_gpa(0x200010, 8) == 0x10010


@pytest.mark.parametrize("num", [0, 3, 65536, 1 << 31])
def test_bad_vring_num(pair, num):
    fe, session, *_ = pair
    acked(fe)
    assert fe.ack(R.VHOST_USER_SET_VRING_NUM, m.VRING_STATE.pack(0, num)) != 0
    assert session.vrings[0].num == 0


def test_vring_index_beyond_queue_count(pair):
    fe, *_ = pair
    acked(fe)
    assert fe.ack(R.VHOST_USER_SET_VRING_NUM, m.VRING_STATE.pack(2, 64)) != 0
    assert fe.ack(R.VHOST_USER_SET_VRING_ENABLE, m.VRING_STATE.pack(200, 1)) != 0


@pytest.mark.parametrize("desc,avail,used", [(0x1008, 0x2000, 0x3000), (0x1000, 0x2001, 0x3000),
                                             (0x1000, 0x2000, 0x3002)])
def test_misaligned_ring_addresses(pair, desc, avail, used):
    fe, session, *_ = pair
    acked(fe)
    assert fe.ack(R.VHOST_USER_SET_VRING_ADDR, m.VRING_ADDR.pack(0, 0, desc, used, avail, 0)) != 0
    assert session.vrings[0].addr is None


def test_unmapped_ring_address_does_not_start_queue(pair):
    fe, _, backend, _ = pair
    backend.start_queue = lambda *a: (_ for _ in ()).throw(ValueError("ring outside guest memory"))
    acked(fe)
    assert fe.set_mem_table() == 0
    fe.send(R.VHOST_USER_SET_VRING_NUM, m.VRING_STATE.pack(0, 64))
    fe.send(R.VHOST_USER_SET_VRING_ADDR, m.VRING_ADDR.pack(0, 0, 1 << 50, 1 << 51, 1 << 52, 0))
    kick = os.eventfd(0)
    fe.send(R.VHOST_USER_SET_VRING_KICK, m.U64.pack(0), [kick])
    os.close(kick)
    assert fe.ack(R.VHOST_USER_SET_VRING_ENABLE, m.VRING_STATE.pack(0, 1)) != 0
    assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2


def test_kick_before_ring_ready_is_ignored(pair):
    fe, _, backend, _ = pair
    acked(fe)
    kick = os.eventfd(0)
    fe.send(R.VHOST_USER_SET_VRING_KICK, m.U64.pack(0), [kick])
    os.close(kick)
    fe.send(R.VHOST_USER_SET_VRING_ENABLE, m.VRING_STATE.pack(0, 1))
    fe.sync()
    assert backend.events == []


def test_unknown_request_gets_negative_ack(pair):
    fe, *_ = pair
    acked(fe)
    assert fe.ack(200) != 0
    assert fe.ack(R.VHOST_USER_SET_VRING_ENDIAN, m.VRING_STATE.pack(0, 0)) != 0
    fe.send(201, b"x" * 100)  # no reply wanted: skipped, body and all
    assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2


def test_unoffered_features_refused(pair):
    fe, session, *_ = pair
    acked(fe)
    assert fe.ack(R.VHOST_USER_SET_FEATURES, m.U64.pack(1 << 5)) != 0
    assert fe.ack(R.VHOST_USER_SET_PROTOCOL_FEATURES, m.U64.pack(1 << 60)) != 0


def test_get_config_returns_range(pair):
    fe, *_ = pair
    acked(fe)
    reply = fe.call(R.VHOST_USER_GET_CONFIG, m.CONFIG_HEADER.pack(0, 40, 0) + bytes(40))
    assert reply[12:15] == b"tag" and reply[48:52] == (1).to_bytes(4, "little")
    assert fe.call(R.VHOST_USER_GET_CONFIG, m.CONFIG_HEADER.pack(30, 20, 0) + bytes(20)) == b""
    assert fe.ack(R.VHOST_USER_SET_CONFIG, m.CONFIG_HEADER.pack(0, 4, 0) + b"evil") != 0


def test_reset_device_stops_queues(pair):
    fe, _, backend, _ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    fe.add_ring(0, 64)
    assert fe.ack(R.VHOST_USER_RESET_DEVICE) == 0
    assert backend.events[-2:] == [("stop", 0), ("reset",)]


def set_log_base(fe, fd, size, offset=0, need_reply=False):
    """SET_LOG_BASE with LOG_SHMFD: always answered with a u64 status."""
    fe.send(R.VHOST_USER_SET_LOG_BASE, m.LOG.pack(size, offset), [fd], need_reply=need_reply)
    return m.U64.unpack(fe.recv_reply(R.VHOST_USER_SET_LOG_BASE))[0]


def test_features_and_protocol_features_offer_dirty_logging(pair):
    fe, *_ = pair
    assert fe.call_u64(R.VHOST_USER_GET_FEATURES) & 1 << m.VHOST_F_LOG_ALL
    assert fe.call_u64(R.VHOST_USER_GET_PROTOCOL_FEATURES) & 1 << m.VHOST_USER_PROTOCOL_F_LOG_SHMFD


def test_logging_follows_log_base_log_all_and_vring_flags(pair):
    fe, session, backend, _ = pair
    acked(fe)  # every offered feature, VHOST_F_LOG_ALL included
    assert fe.set_mem_table() == 0
    ring = fe.add_ring(0, 64)
    fe.sync()
    assert backend.logs[0] is None  # no log yet
    fd = memfd(0x1000)
    try:
        assert set_log_base(fe, fd, 0x1000) == 0
    finally:
        os.close(fd)
    fe.sync()
    # The queue was restarted where it stood, now logging its buffers but not its used ring.
    assert backend.events[-2:] == [("stop", 0), ("start", 0, 42)]
    assert backend.logs[0] is not None and backend.logs[0].used_log_addr is None
    addr = m.VRING_ADDR.pack(0, 1 << m.VHOST_VRING_F_LOG, fe.uva(ring.desc), fe.uva(ring.used),
                             fe.uva(ring.avail), ring.used)
    assert fe.ack(R.VHOST_USER_SET_VRING_ADDR, addr) == 0
    assert backend.logs[0].used_log_addr == ring.used
    # LOG_ALL dropped: logging stops.
    assert fe.ack(R.VHOST_USER_SET_FEATURES, m.U64.pack(fe.features & ~(1 << m.VHOST_F_LOG_ALL))) == 0
    assert backend.logs[0] is None
    assert backend.events[-1] == ("start", 0, 42)


def test_vring_addr_may_not_move_a_running_ring(pair):
    fe, session, *_ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    ring = fe.add_ring(0, 64)
    addr = m.VRING_ADDR.pack(0, 0, fe.uva(ring.desc) + 0x1000, fe.uva(ring.used), fe.uva(ring.avail), 0)
    assert fe.ack(R.VHOST_USER_SET_VRING_ADDR, addr) != 0
    assert session.vrings[0].addr.desc == fe.uva(ring.desc)


@pytest.mark.parametrize("case", ["no_fd", "beyond_file", "size0", "short"])
def test_bad_log_base_refused_with_status(pair, case):
    fe, session, *_ = pair
    acked(fe)
    fd = memfd(0x1000)
    try:
        payload, fds = {
            "no_fd": (m.LOG.pack(0x1000, 0), []),
            "beyond_file": (m.LOG.pack(0x1000, 0x1000), [fd]),
            "size0": (m.LOG.pack(0, 0), [fd]),
            "short": (m.LOG.pack(0x1000, 0)[:8], [fd]),
        }[case]
        fe.send(R.VHOST_USER_SET_LOG_BASE, payload, fds)
        assert m.U64.unpack(fe.recv_reply(R.VHOST_USER_SET_LOG_BASE))[0] != 0
    finally:
        os.close(fd)
    assert session.dirty_log is None
    assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2


def test_log_base_without_log_shmfd_refused(pair):
    fe, session, *_ = pair
    fe.negotiate(protocol_features=REPLY_ACK)
    fd = memfd(0x1000)
    try:
        assert fe.ack(R.VHOST_USER_SET_LOG_BASE, m.LOG.pack(0x1000, 0), [fd]) != 0
    finally:
        os.close(fd)
    assert session.dirty_log is None


def test_set_log_fd_takes_and_closes_its_fd(pair):
    fe, *_ = pair
    acked(fe)
    r, w = os.pipe()
    try:
        assert fe.ack(R.VHOST_USER_SET_LOG_FD, b"", [w]) == 0
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # the daemon holds no copy of the write end
        assert fe.ack(R.VHOST_USER_SET_LOG_FD) != 0  # no fd
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _ack_cases(fe):
    """(request, payload, fds) for every request without a reply of its own, each valid here."""
    ring = fe.rings[0]
    kick, call, err = (os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3))
    a, b = socket.socketpair()
    fd_log, fd_log2, fd_reg = memfd(0x1000), memfd(0x1000), memfd(0x10000)
    region = bytes(8) + m.MEMORY_REGION.pack(0x10000000, 0x10000, 0x10000000, 0)
    cases = [
        (R.VHOST_USER_SET_OWNER, b"", []),
        (R.VHOST_USER_SET_PROTOCOL_FEATURES, m.U64.pack(fe.protocol_features), []),
        (R.VHOST_USER_SET_FEATURES, m.U64.pack(fe.features), []),
        (R.VHOST_USER_ADD_MEM_REG, region, [fd_reg]),
        (R.VHOST_USER_REM_MEM_REG, region, []),
        (R.VHOST_USER_SET_VRING_ENABLE, m.VRING_STATE.pack(1, 0), []),
        (R.VHOST_USER_SET_VRING_NUM, m.VRING_STATE.pack(1, 64), []),
        (R.VHOST_USER_SET_VRING_BASE, m.VRING_STATE.pack(1, 0), []),
        (R.VHOST_USER_SET_VRING_ADDR, m.VRING_ADDR.pack(1, 0, fe.uva(ring.desc), fe.uva(ring.used),
                                                        fe.uva(ring.avail), 0), []),
        (R.VHOST_USER_SET_VRING_CALL, m.U64.pack(1), [call]),
        (R.VHOST_USER_SET_VRING_ERR, m.U64.pack(1), [err]),
        (R.VHOST_USER_SET_VRING_KICK, m.U64.pack(1), [kick]),
        (R.VHOST_USER_SET_BACKEND_REQ_FD, b"", [b.fileno()]),
        (R.VHOST_USER_SET_LOG_FD, b"", [fd_log]),
        (R.VHOST_USER_SET_MEM_TABLE, mem_table((0, fe.mem_size, fe.uva(0), 0)), [fe.mem_fd]),
        (R.VHOST_USER_SET_LOG_BASE, m.LOG.pack(0x1000, 0), [fd_log2]),
        (R.VHOST_USER_RESET_DEVICE, b"", []),
        (R.VHOST_USER_RESET_OWNER, b"", []),
    ]
    return cases, [kick, call, err, fd_log, fd_log2, fd_reg], [a, b]


def test_reply_ack_honoured_on_every_request_that_asks(pair):
    fe, *_ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    fe.add_ring(0, 64)
    cases, fds, socks = _ack_cases(fe)
    try:
        for request, payload, send in cases:
            assert fe.ack(request, payload, send) == 0, m.request_name(request)
        # Requests with a reply of their own get that reply only, even with NEED_REPLY set.
        fe.send(R.VHOST_USER_GET_QUEUE_NUM, need_reply=True)
        assert m.U64.unpack(fe.recv_reply(R.VHOST_USER_GET_QUEUE_NUM))[0] == 2
        assert fe.call_u64(R.VHOST_USER_GET_MAX_MEM_SLOTS) >= 509
    finally:
        for fd in fds:
            os.close(fd)
        for sock in socks:
            sock.close()


def test_call_fd_replaced_while_running(pair):
    fe, session, backend, _ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    fe.add_ring(0, 64)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        assert fe.ack(R.VHOST_USER_SET_VRING_CALL, m.U64.pack(0), [call]) == 0
    finally:
        os.close(call)
    assert backend.events[-1] == ("call", 0)
    assert ("stop", 0) not in backend.events


def test_memory_region_added_while_queue_runs(pair):
    fe, session, backend, _ = pair
    acked(fe)
    assert fe.set_mem_table() == 0
    fe.add_ring(0, 64)
    fd = memfd(0x10000)
    try:
        region = bytes(8) + m.MEMORY_REGION.pack(0x10000000, 0x10000, 0x10000000, 0)
        assert fe.ack(R.VHOST_USER_ADD_MEM_REG, region, [fd]) == 0
    finally:
        os.close(fd)
    assert len(backend.memory.regions) == 2
    assert ("stop", 0) not in backend.events


# -- device state ("Migrating back-end state") -----------------------------------------------------
class MigratingBackend(RecordingBackend):
    protocol_features = RecordingBackend.protocol_features | 1 << m.VHOST_USER_PROTOCOL_F_DEVICE_STATE

    def __init__(self, state=b"", fail=None):
        super().__init__()
        self.state = state
        self.fail = fail
        self.loaded = None
        self.resumed = 0

    def save_state(self):
        if self.fail:
            raise OSError(5, self.fail)
        return self.state

    def load_state(self, data):
        if self.fail:
            raise ValueError(self.fail)
        self.loaded = data

    def resume_after_save(self):
        self.resumed += 1


@pytest.fixture
def migrating():
    a, b = socket.socketpair()
    backend = MigratingBackend()
    session = Session(backend)
    t = threading.Thread(target=session.serve, args=(Connection(b),), daemon=True)
    t.start()
    fe = Frontend(a, mem_size=1 << 20)
    fe.sock.settimeout(10)
    fe.negotiate(protocol_features=SESSION_PROTOCOL_FEATURES | MigratingBackend.protocol_features)
    yield fe, backend
    fe.close()
    t.join(5)
    assert not t.is_alive()


def transfer(fe, direction, fd, phase=m.VHOST_TRANSFER_STATE_PHASE_STOPPED):
    payload = m.DEVICE_STATE_PARAMS.pack(direction, phase)
    return m.U64.unpack(fe.call(R.VHOST_USER_SET_DEVICE_STATE_FD, payload, [fd]))[0]


def read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_device_state_parameters_parse():
    assert m.parse_device_state_params(m.DEVICE_STATE_PARAMS.pack(1, 0)) == (1, 0)
    for payload in (m.DEVICE_STATE_PARAMS.pack(2, 0), m.DEVICE_STATE_PARAMS.pack(0, 1), b"\0" * 4):
        with pytest.raises(m.VhostUserError):
            m.parse_device_state_params(payload)


def test_save_writes_the_state_larger_than_a_pipe_then_check_succeeds(migrating):
    fe, backend = migrating
    backend.state = os.urandom(1 << 20)  # far more than a pipe holds: written after the reply
    r, w = os.pipe()
    reply = transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_SAVE, w)
    os.close(w)
    assert reply == m.VHOST_USER_DEVICE_STATE_NO_FD  # success, the front end's pipe is used
    assert read_all(r) == backend.state
    os.close(r)
    assert fe.call_u64(R.VHOST_USER_CHECK_DEVICE_STATE) == 0


def test_load_reads_to_end_of_file_then_check_succeeds(migrating):
    fe, backend = migrating
    r, w = os.pipe()
    assert transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_LOAD, r) == m.VHOST_USER_DEVICE_STATE_NO_FD
    os.close(r)
    data = os.urandom(300_000)
    view = memoryview(data)
    while view:
        view = view[os.write(w, view):]
    os.close(w)
    assert fe.call_u64(R.VHOST_USER_CHECK_DEVICE_STATE) == 0
    assert backend.loaded == data


def test_failed_save_and_load_are_reported_by_check(migrating):
    fe, backend = migrating
    backend.fail = "cannot"
    r, w = os.pipe()
    assert transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_SAVE, w) == m.VHOST_USER_DEVICE_STATE_NO_FD
    os.close(w)
    assert read_all(r) == b""
    os.close(r)
    assert fe.call_u64(R.VHOST_USER_CHECK_DEVICE_STATE) == 1
    r, w = os.pipe()
    transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_LOAD, r)
    os.close(r)
    os.write(w, b"garbage")
    os.close(w)
    assert fe.call_u64(R.VHOST_USER_CHECK_DEVICE_STATE) == 1
    assert fe.call_u64(R.VHOST_USER_GET_QUEUE_NUM) == 2  # the session goes on


def test_bad_transfer_requests_are_refused_with_a_status(migrating):
    fe, backend = migrating
    r, w = os.pipe()
    try:
        refused = 1 | m.VHOST_USER_DEVICE_STATE_NO_FD
        assert transfer(fe, 7, w) == refused  # no such direction
        assert transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_SAVE, w, phase=1) == refused
        params = m.DEVICE_STATE_PARAMS.pack(m.VHOST_TRANSFER_STATE_DIRECTION_SAVE, 0)
        assert fe.call_u64(R.VHOST_USER_SET_DEVICE_STATE_FD, params) == refused  # no fd
        assert fe.call_u64(R.VHOST_USER_CHECK_DEVICE_STATE) == 1  # nothing to check
        # A running queue: the state would not be whole.
        assert fe.set_mem_table() == 0
        fe.add_ring(0, 64)
        fe.sync()
        assert transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_SAVE, w) == refused
        assert ("start", 0, 0) in backend.events
    finally:
        os.close(r)
        os.close(w)


def test_device_state_needs_the_protocol_feature(pair):
    fe, _, _, _ = pair
    acked(fe)  # the recording back end does not offer DEVICE_STATE
    r, w = os.pipe()
    try:
        assert transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_SAVE, w) & 0xFF != 0
        assert fe.call_u64(R.VHOST_USER_CHECK_DEVICE_STATE) != 0
    finally:
        os.close(r)
        os.close(w)


def test_rings_restarted_after_a_save_resume_the_session(migrating):
    fe, backend = migrating
    assert fe.set_mem_table() == 0
    fe.add_ring(0, 64)
    fe.sync()
    fe.call(R.VHOST_USER_GET_VRING_BASE, m.VRING_STATE.pack(0, 0))
    r, w = os.pipe()
    transfer(fe, m.VHOST_TRANSFER_STATE_DIRECTION_SAVE, w)
    os.close(w)
    read_all(r)
    os.close(r)
    assert fe.call_u64(R.VHOST_USER_CHECK_DEVICE_STATE) == 0
    assert backend.resumed == 0
    fe.add_ring(0, 64)  # the migration failed: the source starts its rings again
    fe.sync()
    assert backend.resumed == 1
