"""The native io_uring and the FUSE-over-io_uring entry layout, without a mount.

The ring is driven with URING_CMDs to /dev/null (whose driver completes any command with 0); the
entries are filled the way fs/fuse/dev_uring.c fills them and answered by a real FuseServer.
Over a real mount: tests/integration/test_fuse_fast.py.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from tests.unit.test_fuse_server import MemFS, init_body
from vhostfs import native
from vhostfs.fuse import abi, uring
from vhostfs.fuse.server import FuseServer
from vhostfs.iov import Reader, Writer

try:
    native.Uring(1).close()
except OSError as exc:
    pytest.skip(f"io_uring is not available here ({exc.strerror})", allow_module_level=True)


def test_commands_complete_with_their_user_data():
    ring = native.Uring(4)
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        for ud in (7, 8, 9):
            ring.cmd(fd, 1, 0, 0, ud, b"\1" * 24)
        assert sorted(ring.wait() for _ in range(3)) == [(7, 0), (8, 0), (9, 0)]
        # A file without URING_CMD support answers each command with an error, not the ring.
        r, w = os.pipe()
        ring.cmd(r, 1, 0, 0, 10, b"")
        assert ring.wait() == (10, -errno.EOPNOTSUPP)
        os.close(r)
        os.close(w)
    finally:
        os.close(fd)
        ring.close()


def test_a_full_ring_and_oversized_command_data_are_refused():
    ring = native.Uring(2)
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            ring.cmd(fd, 1, 0, 0, 1, bytes(81))
        assert exc.value.errno == errno.EINVAL
        for ud in range(ring.entries):
            ring.cmd(fd, 1, 0, 0, ud, bytes(80))
        with pytest.raises(OSError) as exc:
            ring.cmd(fd, 1, 0, 0, 99, b"")
        assert exc.value.errno == errno.EBUSY
        assert sorted(ring.wait()[0] for _ in range(ring.entries)) == list(range(ring.entries))
    finally:
        os.close(fd)
        ring.close()
        ring.close()  # idempotent


def test_possible_cpus_counts_the_ranges():
    assert uring.possible_cpus() >= 1


# -- entries as the kernel fills them ---------------------------------------------------------------

@pytest.fixture
def queues():
    fs = MemFS()
    server = FuseServer(fs, max_write=1 << 17)
    out = bytearray(4096)
    assert server.handle(Reader([memoryview(bytearray(
        abi.IN_HEADER.pack(40 + 64, abi.FUSE_INIT, 1, 0, 0, 0, 0, 0, 0) + init_body(minor=42)))]),
        Writer([memoryview(out)]))
    q = uring.UringQueues(-1, server.handle, 1 << 17, queues=1)
    entry = uring._Entry(1 << 17)
    yield q, entry
    entry.close()


def fill(entry: uring._Entry, opcode: int, unique: int, arg: bytes, payload: bytes, nodeid: int = 1) -> None:
    """Puts a request into `entry` as fuse_uring_args_to_ring does: header, first argument, the rest."""
    entry.hv[:40] = abi.IN_HEADER.pack(40 + len(arg) + len(payload), opcode, unique, nodeid, 0, 0, 1, 0, 0)
    entry.hv[128:128 + len(arg)] = arg
    entry.pv[:len(payload)] = payload
    uring.URING_ENT_IN_OUT.pack_into(entry.hv, 256, 0, unique, len(payload), 0)


def reply(entry: uring._Entry) -> tuple[int, int, bytes]:
    """(error, unique, body) of the reply committed in `entry`."""
    _, error, unique = abi.OUT_HEADER.unpack_from(entry.hv)
    _, commit_id, size, _ = uring.URING_ENT_IN_OUT.unpack_from(entry.hv, 256)
    assert commit_id == unique
    return error, unique, bytes(entry.pv[:size])


def test_a_request_with_a_name_in_the_payload(queues):
    q, entry = queues
    fill(entry, abi.FUSE_MKDIR, 11, abi.MKDIR_IN.pack(0o755, 0), b"dir\0")
    assert q._answer(entry) == 11
    error, unique, body = reply(entry)
    assert (error, unique, len(body)) == (0, 11, abi.ENTRY_OUT.size)
    nodeid = abi.ENTRY_OUT.unpack(body)[0]
    fill(entry, abi.FUSE_LOOKUP, 12, b"", b"dir\0")
    q._answer(entry)
    assert abi.ENTRY_OUT.unpack(reply(entry)[2])[0] == nodeid


def test_write_data_in_the_payload_and_read_data_back_into_it(queues):
    q, entry = queues
    fill(entry, abi.FUSE_CREATE, 20, abi.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0), b"f\0")
    q._answer(entry)
    body = reply(entry)[2]
    nodeid = abi.ENTRY_OUT.unpack_from(body)[0]
    fh = abi.OPEN_OUT.unpack_from(body, abi.ENTRY_OUT.size)[0]
    data = os.urandom(100_000)
    fill(entry, abi.FUSE_WRITE, 21, abi.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0), data, nodeid)
    q._answer(entry)
    error, _, body = reply(entry)
    assert error == 0 and abi.WRITE_OUT.unpack(body)[0] == len(data)
    fill(entry, abi.FUSE_READ, 22, abi.READ_IN.pack(fh, 0, len(data), 0, 0, 0), b"", nodeid)
    q._answer(entry)
    assert reply(entry) == (0, 22, data)


def test_an_error_reply_has_no_body(queues):
    q, entry = queues
    fill(entry, abi.FUSE_LOOKUP, 30, b"", b"missing\0")
    q._answer(entry)
    assert reply(entry) == (-errno.ENOENT, 30, b"")


def test_a_layout_the_kernel_never_sends_is_answered_eio(queues):
    q, entry = queues
    fill(entry, abi.FUSE_LOOKUP, 40, b"", b"x\0")
    struct.pack_into("<I", entry.hv, 0, 40 + 2 + 200)  # a first argument longer than op_in
    q._answer(entry)
    assert reply(entry) == (-errno.EIO, 40, b"")
