"""The project's vhost-user constants and payload layouts against a session QEMU 11.1 really had with
vhostfs (tests/data/qemu-11.1-dax-session.txt, recorded with --record-vhost-user).

The record holds the request numbers and payload bytes as they were on the wire, so these checks do
not lean on vhostfs's own names: what QEMU sent, and what it did with vhostfs's replies and back-end
requests, shows whether the numbers and layouts agree with QEMU's."""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhostfs.vhost_user import messages as m

RECORD = Path(__file__).resolve().parents[1] / "data" / "qemu-11.1-dax-session.txt"
WINDOW = 64 << 20
_LINE = re.compile(r"^(\S+) (\S+) request=(\d+) flags=(0x[0-9a-f]+)(?: NEED_REPLY)?(?: REPLY)? size=(\d+) "
                   r"fds=(\d+) payload=([0-9a-f]*)$")


@dataclass(frozen=True)
class Msg:
    direction: str
    request: int
    flags: int
    payload: bytes
    fds: int


def _record() -> list[Msg]:
    msgs = []
    for line in RECORD.read_text().splitlines():
        if line.startswith("#"):
            continue
        match = _LINE.match(line)
        assert match, line
        direction, _, request, flags, size, fds, data = match.groups()
        payload = bytes.fromhex(data)
        assert len(payload) <= int(size), line
        msgs.append(Msg(direction, int(request), int(flags, 16), payload.ljust(int(size), b"\0"), int(fds)))
    return msgs


@pytest.fixture(scope="module")
def record() -> list[Msg]:
    return _record()


def _requests(record, direction, request):
    return [msg for msg in record if msg.direction == direction and msg.request == request]


def _replies_to(record, direction, request):
    """(request, reply) pairs of requests that asked for a reply, on one channel: a reply follows its
    request there, with messages of the other channel between."""
    reply_dir = {"front->back": "back->front", "back=>front": "front=>back"}[direction]
    pending: collections.deque[Msg] = collections.deque()
    pairs = []
    for msg in record:
        if msg.direction == direction and msg.request == request:
            pending.append(msg)
        elif msg.direction == reply_dir and msg.request == request:
            pairs.append((pending.popleft(), msg))
    assert not pending
    return pairs


def test_qemu_acks_the_shmem_protocol_feature_and_asks_for_the_shmem_config(record):
    (ack,) = _requests(record, "front->back", m.Request.VHOST_USER_SET_PROTOCOL_FEATURES)
    assert m.U64.unpack(ack.payload)[0] & 1 << m.VHOST_USER_PROTOCOL_F_SHMEM
    assert m.VHOST_USER_PROTOCOL_F_SHMEM == 22
    # QEMU 11.1 sends GET_SHMEM_CONFIG only once that bit is negotiated.
    (ask,) = _requests(record, "front->back", m.Request.VHOST_USER_GET_SHMEM_CONFIG)
    assert ask.request == 44 and ask.payload == b"" and not ask.flags & m.VHOST_USER_NEED_REPLY_MASK


def test_the_shmem_config_reply_is_what_qemu_made_the_window_of(record):
    (reply,) = _requests(record, "back->front", m.Request.VHOST_USER_GET_SHMEM_CONFIG)
    assert reply.flags & m.VHOST_USER_REPLY_MASK and len(reply.payload) == m.SHMEM_CONFIG.size
    nregions, _, *sizes = m.SHMEM_CONFIG.unpack(reply.payload)
    assert nregions == 1 and sizes[0] == WINDOW and not any(sizes[1:])
    # QEMU went on to map files there: the window exists (see the next test for where).
    assert _requests(record, "back=>front", m.BackendRequest.VHOST_USER_BACKEND_SHMEM_MAP)


def _window_regions(record, request):
    """The (guest address, size, mmap offset) of the memory regions QEMU added or removed after the
    guest's RAM: the RAM regions come before the first back-end request, the window's after."""
    ram_end = 0
    seen_backend = False
    regions = []
    for msg in record:
        seen_backend = seen_backend or msg.direction == "back=>front"
        if msg.direction != "front->back" or msg.request != request:
            continue
        gpa, size, _uva, mmap_offset = m.MEMORY_REGION.unpack_from(msg.payload, 8)
        if not seen_backend:
            ram_end = max(ram_end, gpa + size)
        else:
            assert gpa >= ram_end
            regions.append((gpa, size, mmap_offset))
    return regions


def test_each_map_becomes_the_region_its_payload_describes(record):
    """QEMU puts each mapping into guest memory and tells the back end (ADD_MEM_REG) where: at the
    window's base plus shm_offset, len bytes of the fd from fd_offset. That can only hold if QEMU
    reads MMAP_REQUEST's fields where vhostfs writes them, and request 9 as SHMEM_MAP."""
    pairs = _replies_to(record, "back=>front", m.BackendRequest.VHOST_USER_BACKEND_SHMEM_MAP)
    assert len(pairs) >= 3
    maps = collections.Counter()
    for request, reply in pairs:
        assert request.request == 9 and request.fds == 1 and len(request.payload) == m.MMAP_REQUEST.size
        assert reply.flags & m.VHOST_USER_REPLY_MASK and m.U64.unpack(reply.payload) == (0,)
        shmid, fd_offset, shm_offset, length, flags = m.MMAP_REQUEST.unpack(request.payload)
        assert shmid == 0 and flags in (0, m.VHOST_USER_FLAG_MAP_RW)
        assert shm_offset + length <= WINDOW
        maps[shm_offset, length, fd_offset] += 1
    added = _window_regions(record, m.Request.VHOST_USER_ADD_MEM_REG)
    base = min(gpa for gpa, _, _ in added) - min(off for off, _, _ in maps)
    assert collections.Counter((gpa - base, size, off) for gpa, size, off in added) == maps
    # Both kinds of mapping went through: read-only and writable.
    flags = {m.MMAP_REQUEST.unpack(rq.payload)[4] for rq, _ in pairs}
    assert flags == {0, m.VHOST_USER_FLAG_MAP_RW}


def test_each_unmap_removes_the_region_of_its_mapping(record):
    pairs = _replies_to(record, "back=>front", m.BackendRequest.VHOST_USER_BACKEND_SHMEM_UNMAP)
    assert pairs
    unmaps = collections.Counter()
    for request, reply in pairs:
        assert request.request == 10 and request.fds == 0 and len(request.payload) == m.MMAP_REQUEST.size
        assert m.U64.unpack(reply.payload) == (0,)
        shmid, _, shm_offset, length, _ = m.MMAP_REQUEST.unpack(request.payload)
        assert shmid == 0
        unmaps[shm_offset, length] += 1
    added = _window_regions(record, m.Request.VHOST_USER_ADD_MEM_REG)
    removed = _window_regions(record, m.Request.VHOST_USER_REM_MEM_REG)
    maps = collections.Counter(
        m.MMAP_REQUEST.unpack(rq.payload)[2:4]
        for rq, _ in _replies_to(record, "back=>front", m.BackendRequest.VHOST_USER_BACKEND_SHMEM_MAP))
    base = min(gpa for gpa, _, _ in added) - min(off for off, _ in maps)
    assert collections.Counter((gpa - base, size) for gpa, size, _ in removed) == unmaps
    # The guest unmounted: everything mapped was unmapped again.
    assert unmaps == maps


def test_back_end_requests_are_acknowledged_only_when_asked(record):
    backend = m.BackendRequest
    for request in (backend.VHOST_USER_BACKEND_SHMEM_MAP, backend.VHOST_USER_BACKEND_SHMEM_UNMAP):
        sent = _requests(record, "back=>front", request)
        replies = _requests(record, "front=>back", request)
        assert all(msg.flags & m.VHOST_USER_NEED_REPLY_MASK for msg in sent)
        assert len(replies) == len(sent)


def test_every_request_qemu_sent_is_one_vhostfs_knows(record):
    for msg in record:
        if msg.direction == "front->back":
            assert m.Request(msg.request).value == msg.request


def test_the_recorder_writes_what_this_test_reads(tmp_path):
    from vhostfs.vhost_user import record

    out = tmp_path / "r.txt"
    rec = record.Recorder(out.open("w"))
    payload = m.MMAP_REQUEST.pack(0, 0x1000, 0x200000, 0x2000, m.VHOST_USER_FLAG_MAP_RW)
    rec.message(record.BACKEND_REQUEST, m.HEADER.pack(9, 0x9, len(payload)), payload, 1)
    rec.message(record.FRONT_TO_BACK, m.HEADER.pack(44, 0x1, 0), b"")
    rec.close()
    rec.message(record.FRONT_TO_BACK, m.HEADER.pack(1, 0x1, 0), b"")  # after close: dropped
    lines = out.read_text().splitlines()
    assert lines[0].startswith("back=>front SHMEM_MAP request=9 flags=0x9 NEED_REPLY size=40 fds=1 ")
    assert lines[1] == "front->back GET_SHMEM_CONFIG request=44 flags=0x1 size=0 fds=0 payload="
    assert len(lines) == 2
    parsed = [line for line in lines if _LINE.match(line)]
    assert len(parsed) == 2
    data = bytes.fromhex(_LINE.match(lines[0]).group(7)).ljust(40, b"\0")
    assert data == payload
