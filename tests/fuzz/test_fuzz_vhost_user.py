"""Fuzzing the vhost-user message parser and the Session handler over a real socket pair.

Random sequences of messages (known and unknown request codes, valid and broken headers, structured
and random payloads, 0..3 fds each) go to a `Session` serving a recording back end. Whatever arrives,
the session must not raise, every reply must be a well-formed reply header (to a request that was
sent, while the framing holds), every fd it was given must be closed once it is done, and a final
GET_QUEUE_NUM is answered unless the framing itself was broken (then the session closes the connection).
"""

from __future__ import annotations

import os
import socket
import threading

from hypothesis import given
from hypothesis import strategies as st

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user.connection import Connection
from vhostfs.vhost_user.handler import Session
from vhostfs.virtqueue import split

R = m.Request
MEM_SIZE = 1 << 20
VALID_FLAGS = m.VHOST_USER_VERSION


class RecordingBackend:
    """A back end that accepts everything and remembers nothing but the calls."""

    max_queues = 2
    features = 1 << m.VIRTIO_F_VERSION_1 | 1 << m.VIRTIO_RING_F_EVENT_IDX | 1 << m.VHOST_F_LOG_ALL
    protocol_features = 1 << m.VHOST_USER_PROTOCOL_F_CONFIG
    check_ring_size = staticmethod(split.check_queue_size)
    check_ring_addresses = staticmethod(split.check_ring_addresses)

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start_queue(self, index, vring, memory, features, log=None):
        self.events.append(("start", index))

    def stop_queue(self, index):
        self.events.append(("stop", index))
        return 0

    def set_call_fd(self, index, fd):
        self.events.append(("call", index))

    def set_memory(self, memory):
        self.events.append(("memory", len(memory.regions)))

    def config(self):
        return b"tag".ljust(36, b"\0") + (1).to_bytes(4, "little")

    def reset(self):
        self.events.append(("reset",))


u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.one_of(st.integers(0, 0xFFFFFFFFFFFFFFFF), st.sampled_from([0, 1, 4096, MEM_SIZE, 1 << 63]))
small = st.integers(0, 3)
page = st.sampled_from([0, 4096, MEM_SIZE // 2, MEM_SIZE, MEM_SIZE + 4096, 1 << 40])
region = st.tuples(page, page, page, page).map(lambda r: m.MEMORY_REGION.pack(*r))

payloads = st.one_of(
    st.binary(max_size=300),
    u64.map(m.U64.pack),
    st.tuples(small, u32).map(lambda t: m.VRING_STATE.pack(*t)),
    st.tuples(small, st.sampled_from([1, 2, 256, 32768, 3, 0]))
      .map(lambda t: m.VRING_STATE.pack(*t)),
    st.tuples(small, small, u64, u64, u64, u64).map(lambda t: m.VRING_ADDR.pack(*t)),
    st.tuples(st.integers(0, 9), st.lists(region, max_size=3))
      .map(lambda t: m.MEMORY_HEADER.pack(t[0], 0) + b"".join(t[1])),
    region.map(lambda r: bytes(8) + r),
    st.tuples(u32, u32, u32).map(lambda t: m.CONFIG_HEADER.pack(*t)),
    st.tuples(u64, u64).map(lambda t: m.LOG.pack(*t)),
    st.sampled_from([m.U64.pack(0) + m.U64.pack(0), m.U64.pack(0x100)]),
)

requests = st.one_of(st.sampled_from(list(R)), st.integers(0, 0xFFFFFFFF))
flags = st.one_of(st.sampled_from([VALID_FLAGS, VALID_FLAGS | m.VHOST_USER_NEED_REPLY_MASK]), u32)


@st.composite
def message(draw) -> tuple[bytes, int, bool]:
    """(bytes on the wire, number of fds to attach, whether the framing is valid)."""
    request = draw(requests)
    flag = draw(flags)
    payload = draw(payloads)
    size = len(payload) if draw(st.booleans()) else draw(st.integers(0, 5000))
    # A reply flag on a message to the back end breaks the stream as much as a bad version does.
    valid = (flag & m.VHOST_USER_VERSION_MASK == m.VHOST_USER_VERSION and not flag & ~m.VHOST_USER_FLAGS_KNOWN
             and not flag & m.VHOST_USER_REPLY_MASK and size == len(payload))
    return m.HEADER.pack(request, flag, size) + payload, draw(st.integers(0, 3)), valid


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _memfd() -> int:
    fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM_SIZE)
    return fd


def _read_replies(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the session wrote, and whether it reset the connection (closed with input unread)."""
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except ConnectionResetError:
        return b"".join(chunks), True
    return b"".join(chunks), False


@given(st.lists(message(), min_size=1, max_size=8), st.booleans())
def test_session_survives_any_message_sequence(msgs, negotiate):
    before = _open_fds()
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            Session(RecordingBackend()).serve(Connection(theirs))
        except BaseException as e:  # the property under test: nothing escapes serve()
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sent = {R.VHOST_USER_GET_QUEUE_NUM}
    framing_ok = True
    try:
        if negotiate:
            everything = (1 << 64) - 1
            ours.sendall(m.HEADER.pack(R.VHOST_USER_SET_PROTOCOL_FEATURES, VALID_FLAGS, 8)
                         + m.U64.pack(everything & (1 << m.VHOST_USER_PROTOCOL_F_REPLY_ACK
                                                    | 1 << m.VHOST_USER_PROTOCOL_F_LOG_SHMFD
                                                    | 1 << m.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS)))
            sent.add(R.VHOST_USER_SET_PROTOCOL_FEATURES)
        for data, nfds, valid in msgs:
            sent.add(m.HEADER.unpack_from(data)[0])
            framing_ok = framing_ok and valid
            fds = [_memfd() for _ in range(nfds)]
            try:
                if fds:
                    socket.send_fds(ours, [data], fds)
                else:
                    ours.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                framing_ok = False  # the session already closed on a broken header
                break
            finally:
                for fd in fds:
                    os.close(fd)
        try:
            ours.sendall(m.HEADER.pack(R.VHOST_USER_GET_QUEUE_NUM, VALID_FLAGS, 0))
            ours.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            framing_ok = False
        replies, reset = _read_replies(ours)
    finally:
        ours.close()
        thread.join(30)
    assert not thread.is_alive(), "the session did not end after the front end closed"
    assert not errors, errors

    pos, answered = 0, []
    while pos < len(replies):
        assert len(replies) - pos >= m.HEADER.size, "truncated reply header"
        request, flag, size = m.HEADER.unpack_from(replies, pos)
        assert flag == m.VHOST_USER_VERSION | m.VHOST_USER_REPLY_MASK, hex(flag)
        # Once the framing is broken, payload bytes are read as headers: replies may name anything.
        assert request in sent or not framing_ok, request
        assert size <= m.MAX_PAYLOAD and pos + m.HEADER.size + size <= len(replies)
        answered.append((request, replies[pos + m.HEADER.size:pos + m.HEADER.size + size]))
        pos += m.HEADER.size + size
    if framing_ok:
        assert not reset
        assert answered and answered[-1] == (R.VHOST_USER_GET_QUEUE_NUM, m.U64.pack(2))
    # Every fd the session received (memory regions, kick/call fds, logs) is closed by now.
    assert _open_fds() <= before


def test_backend_req_fd_that_is_not_a_socket_is_closed():
    """Found by the fuzzer: SET_BACKEND_REQ_FD with a memfd leaked the fd when it was refused."""
    before = _open_fds()
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=Session(RecordingBackend()).serve, args=(Connection(theirs),))
    thread.start()
    fd = _memfd()
    socket.send_fds(ours, [m.HEADER.pack(R.VHOST_USER_SET_BACKEND_REQ_FD, VALID_FLAGS, 0)], [fd])
    os.close(fd)
    ours.sendall(m.HEADER.pack(R.VHOST_USER_GET_QUEUE_NUM, VALID_FLAGS, 0))
    ours.shutdown(socket.SHUT_WR)
    replies, reset = _read_replies(ours)
    ours.close()
    thread.join(30)
    assert not reset and replies.endswith(m.U64.pack(2))
    assert _open_fds() <= before
