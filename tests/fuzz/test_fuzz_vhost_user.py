"""Fuzzing the vhost-user message parser and the Session handler over a real socket pair.

Random sequences of messages (known and unknown request codes, valid and broken headers, structured
and random payloads, 0..3 fds each) go to a `Session` serving a recording back end. Whatever arrives,
the session must not raise, every reply must be a well-formed reply header (to a request that was
sent, while the framing holds), every fd it was given must be closed once it is done, and a final
GET_QUEUE_NUM is answered unless the framing itself was broken (then the session closes the connection).
"""

from __future__ import annotations

import gc
import os
import socket
import threading

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz.vhost_user_corpus import (
    FD_KINDS,
    GPA2,
    MEM_SIZE,
    REFUSED,
    SEED,
    SHMEM_SIZE,
    UVA,
    VALID_FLAGS,
    WITH_REPLY,
    Msg,
    Peer,
    RecordingBackend,
)
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user.connection import Connection
from vhostfs.vhost_user.handler import Session

R = m.Request


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


def _check_replies(replies: bytes, sent: set[int], framing_ok: bool, reset: bool) -> None:
    """Every reply is well framed and answers a request that was sent; with the framing intact, the
    last request (GET_QUEUE_NUM) was answered and the session ended cleanly."""
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

    _check_replies(replies, sent, framing_ok, reset)
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


# -- the structure-aware fuzzer -------------------------------------------------------------------

def test_seed_session_is_served_request_by_request():
    """Unmutated, the seed session gets the answers a VMM expects, and reaches every request the
    session serves with a successful reply (SET_CONFIG excepted: refused by design)."""
    # Collected first and last: what a reference cycle holds is closed whenever the collector runs,
    # possibly in another example; what stays referenced is a leak either way. (Refused regions are
    # closed at once whatever the collector does: test_vhost_user_session.py checks that with it off.)
    gc.collect()
    before = _open_fds()
    peer = Peer()
    succeeded = set()
    try:
        for msg in SEED:
            assert peer.send(msg)
            if msg.request == R.VHOST_USER_SET_PROTOCOL_FEATURES:
                succeeded.add(msg.request)  # REPLY_ACK is not negotiated before this request returns
                continue
            reply = peer.reply(msg.request)
            if msg.request in WITH_REPLY:
                assert reply, f"{R(msg.request).name}: empty reply (a refusal)"
                expected = {
                    R.VHOST_USER_GET_FEATURES: m.U64.pack(RecordingBackend.features
                                                          | 1 << m.VHOST_USER_F_PROTOCOL_FEATURES),
                    R.VHOST_USER_GET_QUEUE_NUM: m.U64.pack(2),
                    R.VHOST_USER_GET_VRING_BASE: m.VRING_STATE.pack(1, 7),
                    R.VHOST_USER_GET_CONFIG: m.CONFIG_HEADER.pack(0, 40, 0) + RecordingBackend().config(),
                }.get(msg.request)
                if expected is not None:
                    assert reply == expected, R(msg.request).name
                if msg.request == R.VHOST_USER_GET_SHMEM_CONFIG:
                    assert m.SHMEM_CONFIG.unpack(reply)[:3] == (1, 0, SHMEM_SIZE)
                succeeded.add(msg.request)
                continue
            status = m.U64.unpack(reply)[0]
            if msg.request == R.VHOST_USER_SET_DEVICE_STATE_FD:
                status &= 0xFF  # bit 8: the back end sends no fd back
            if msg.request in REFUSED:
                assert status != 0, REFUSED[msg.request]
            else:
                assert status == 0, f"{R(msg.request).name} refused"
                succeeded.add(msg.request)
        served = set(peer.session._handlers) - set(REFUSED)
        assert served - succeeded == set(), sorted(R(r).name for r in served - succeeded)
        events = peer.backend.events
        # The ring started, restarted with a dirty log once LOG_ALL was acked, and stopped at 7.
        assert ("start", 1, False) in events and ("start", 1, True) in events and ("stop", 1) in events
        assert ("channel", True) in events and ("save",) in events
    finally:
        peer.close()
    assert not peer.errors, peer.errors
    assert _open_fds() <= before


EDGES = [0, 1, 2, 255, 256, 257, 0x8000, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 63, (1 << 64) - 1, MEM_SIZE,
         MEM_SIZE - 1, UVA, UVA + MEM_SIZE, GPA2]


def mutate(draw, msg: Msg) -> Msg:
    """One structure-aware mutation; the framing stays valid except for the rare "framing" kind."""
    kind = draw(st.sampled_from(["field", "field", "field", "fds", "reply", "request", "truncate", "extra",
                                 "framing"]))
    parts = list(msg.parts)
    if kind == "field" and any(isinstance(p, tuple) for p in parts):
        i = draw(st.sampled_from([i for i, p in enumerate(parts) if isinstance(p, tuple)]))
        st_, values = parts[i]
        values = list(values)
        j = draw(st.integers(0, len(values) - 1))
        values[j] = draw(st.one_of(st.sampled_from(EDGES), st.integers(0, (1 << 64) - 1)))
        parts[i] = (st_, tuple(values))
        return Msg(msg.request, tuple(parts), msg.fds, msg.flags)
    if kind == "fds":
        return Msg(msg.request, msg.parts, tuple(draw(st.lists(st.sampled_from(FD_KINDS), max_size=3))),
                   msg.flags)
    if kind == "reply":
        return Msg(msg.request, msg.parts, msg.fds, msg.flags ^ m.VHOST_USER_NEED_REPLY_MASK)
    if kind == "request":
        other = draw(st.one_of(st.sampled_from([s.request for s in SEED]), st.sampled_from(list(R)),
                               st.integers(0, 0xFFFFFFFF)))
        return Msg(other, msg.parts, msg.fds, msg.flags)
    payload = msg.payload()
    if kind == "truncate":
        return Msg(msg.request, (payload[:draw(st.integers(0, len(payload)))],), msg.fds, msg.flags)
    if kind == "extra":
        return Msg(msg.request, (payload + draw(st.binary(min_size=1, max_size=64)),), msg.fds, msg.flags)
    # "framing": a header the session cannot read past (it closes the connection).
    if draw(st.booleans()):
        return Msg(msg.request, msg.parts, msg.fds, draw(st.integers(0, 0xFFFFFFFF)))
    return Msg(msg.request, msg.parts, msg.fds, msg.flags, draw(st.integers(0, 5000)))


@given(st.data())
def test_session_survives_mutated_seed_sessions(data):
    # Everything is drawn first: hypothesis may end an example in the middle of a draw, which must not
    # leave a session running, and what the session does must not change what is drawn.
    steps = [msg for msg in SEED if data.draw(st.integers(0, 9), label="keep")]
    for _ in range(data.draw(st.integers(0, 3), label="repeats")):
        steps.insert(data.draw(st.integers(0, len(steps))), data.draw(st.sampled_from(SEED)))
    steps = [mutate(data.draw, msg) if data.draw(st.integers(0, 3), label="mutate") == 0 else msg
             for msg in steps]
    before = _open_fds()
    peer = Peer()
    sent = {R.VHOST_USER_GET_QUEUE_NUM}
    framing_ok = True
    try:
        for msg in steps:
            sent.add(msg.request & 0xFFFFFFFF)
            framing_ok = framing_ok and msg.framing_valid()
            if not peer.send(msg):
                framing_ok = False
                break
        if not peer.send(Msg(R.VHOST_USER_GET_QUEUE_NUM, flags=VALID_FLAGS)):
            framing_ok = False
        try:
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            framing_ok = False
        replies, reset = _read_replies(peer.sock)
    finally:
        peer.close()
    assert not peer.errors, peer.errors
    _check_replies(replies, sent, framing_ok, reset)
    event(f"framing intact to the end: {framing_ok}")
    del peer
    gc.collect()
    assert _open_fds() <= before
