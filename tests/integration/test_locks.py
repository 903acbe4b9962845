"""Blocking lock requests through the daemon: a SETLKW that waits holds up nothing else.

The front end posts a FUSE_SETLKW whose lock another owner (or a host process) holds and, without
waiting for it, more requests on the same request queue: they come back first, in the used ring,
while the SETLKW stays out until the lock is released or the request is interrupted.
"""

from __future__ import annotations

import errno
import fcntl
import os

from vhostfs.fs.locks import F_OFD_SETLK, FLOCK, OFFSET_MAX
from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import REQUEST_QUEUE, FuseClient
from vhostfs.vhost_user import messages as m

R = m.Request

OWNER_A, OWNER_B = 0xA0A0, 0xB0B0
WR, UN = fcntl.F_WRLCK, fcntl.F_UNLCK


class Pending:
    """One request posted on a queue of the test front end, its reply not yet collected."""

    def __init__(self, client: FuseClient, queue: int, data: bytes, reply_size: int = 4096) -> None:
        fe = client.fe
        self.fe, self.ring = fe, fe.rings[queue]
        self.unique = abi.IN_HEADER.unpack_from(data)[2]
        src = fe.alloc(len(data))
        self.dst = fe.alloc(reply_size)
        fe.view[src:src + len(data)] = data
        self.head = fe.make_chain(self.ring, [(src, len(data))], [(self.dst, reply_size)])
        fe.publish(self.ring, self.head)

    def reply(self, length: int) -> tuple[int, bytes]:
        """(errno, body) of the reply `length` bytes long that the device wrote."""
        data = bytes(self.fe.view[self.dst:self.dst + length])
        out_len, error, unique = abi.OUT_HEADER.unpack_from(data)
        assert out_len == length and unique == self.unique
        return -error, data[abi.OUT_HEADER.size:]


def next_used(client: FuseClient, queue: int = REQUEST_QUEUE) -> tuple[int, int]:
    """The next (head, length) the device returned on `queue`."""
    fe = client.fe
    return fe.wait_used(fe.rings[queue], timeout=30)


def lk_body(fh: int, owner: int, kind: int) -> bytes:
    return abi.LK_IN.pack(fh, owner, 0, OFFSET_MAX, kind, os.getpid(), 0)


def setup_file(client: FuseClient) -> tuple[int, int, int]:
    """INIT with POSIX locks; a file "f" holding b"data" opened twice: (nodeid, fh_a, fh_b)."""
    client.init(abi.FUSE_POSIX_LOCKS)
    entry, (fh_a, _) = client.create(abi.ROOT_ID, b"f")
    nodeid = entry[0]
    assert client.write(nodeid, fh_a, 0, b"data") == 4
    return nodeid, fh_a, client.open(nodeid, os.O_RDWR)


def blocked_setlkw(client: FuseClient, nodeid: int, fh: int) -> Pending:
    """Posts owner B's SETLKW of a whole-file write lock, then checks that GETATTR and READ posted
    after it on the same queue are answered while it waits."""
    setlkw = Pending(client, REQUEST_QUEUE, client.message(abi.FUSE_SETLKW, nodeid, lk_body(fh, OWNER_B, WR)))
    getattr_req = Pending(client, REQUEST_QUEUE, client.message(abi.FUSE_GETATTR, nodeid,
                                                                  abi.GETATTR_IN.pack(0, 0)))
    head, length = next_used(client)
    assert head == getattr_req.head, "the queue waited for the blocked SETLKW"
    err, body = getattr_req.reply(length)
    assert err == 0 and abi.ATTR_OUT.unpack_from(body)[3] == 4  # st_size
    read_req = Pending(client, REQUEST_QUEUE, client.message(
        abi.FUSE_READ, nodeid, abi.READ_IN.pack(fh, 0, 4096, 0, 0, os.O_RDWR)), reply_size=4096 + 16)
    head, length = next_used(client)
    assert head == read_req.head
    assert read_req.reply(length) == (0, b"data")
    return setlkw


def test_setlkw_waits_for_the_holder_while_the_queue_goes_on(session):
    client, daemon = session
    nodeid, fh_a, fh_b = setup_file(client)
    client.call(abi.FUSE_SETLK, nodeid, lk_body(fh_a, OWNER_A, WR))
    setlkw = blocked_setlkw(client, nodeid, fh_b)
    # Owner A's unlock goes through the same queue and lets B's SETLKW complete.
    client.call(abi.FUSE_SETLK, nodeid, lk_body(fh_a, OWNER_A, UN))
    head, length = next_used(client)
    assert head == setlkw.head and setlkw.reply(length) == (0, b"")
    try:
        client.call(abi.FUSE_SETLK, nodeid, lk_body(fh_a, OWNER_A, WR))
    except OSError as exc:
        assert exc.errno == errno.EAGAIN  # B holds it now
    else:
        raise AssertionError("owner A took the lock owner B holds")


def test_interrupt_ends_a_blocked_setlkw_with_eintr(session):
    client, daemon = session
    nodeid, fh_a, fh_b = setup_file(client)
    client.call(abi.FUSE_SETLK, nodeid, lk_body(fh_a, OWNER_A, WR))
    setlkw = blocked_setlkw(client, nodeid, fh_b)
    # FUSE_INTERRUPT goes on the high-priority queue and gets no reply.
    interrupt = client.raw(abi.FUSE_INTERRUPT, 0, abi.INTERRUPT_IN.pack(setlkw.unique), reply_size=0, queue=0)
    assert interrupt == b""
    head, length = next_used(client)
    assert head == setlkw.head and setlkw.reply(length) == (errno.EINTR, b"")
    # A still holds the lock, and the daemon goes on serving.
    try:
        client.call(abi.FUSE_SETLK, nodeid, lk_body(fh_b, OWNER_B, WR))
    except OSError as exc:
        assert exc.errno == errno.EAGAIN
    else:
        raise AssertionError("owner B got the lock owner A holds")


def test_a_host_process_releasing_its_lock_unblocks_the_guest(session):
    client, daemon = session
    nodeid, _, fh_b = setup_file(client)
    host = os.open(daemon.shared / "f", os.O_RDWR)
    try:
        fcntl.fcntl(host, F_OFD_SETLK, FLOCK.pack(WR, os.SEEK_SET, 0, 0, 0))
        setlkw = blocked_setlkw(client, nodeid, fh_b)
        fcntl.fcntl(host, F_OFD_SETLK, FLOCK.pack(UN, os.SEEK_SET, 0, 0, 0))
        head, length = next_used(client)
        assert head == setlkw.head and setlkw.reply(length) == (0, b"")
        # The guest owner's lock is a host lock too.
        try:
            fcntl.fcntl(host, F_OFD_SETLK, FLOCK.pack(WR, os.SEEK_SET, 0, 0, 0))
        except OSError as exc:
            assert exc.errno in (errno.EAGAIN, errno.EACCES)
        else:
            raise AssertionError("the host took the lock the guest holds")
    finally:
        os.close(host)


def test_stopping_the_queue_ends_a_blocked_setlkw(daemon):
    """A front end stopping the ring (GET_VRING_BASE) gets its answer although a SETLKW waits: the
    request is answered EINTR, not left to wait for a lock that may never come."""
    with daemon.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        nodeid, fh_a, fh_b = setup_file(client)
        client.call(abi.FUSE_SETLK, nodeid, lk_body(fh_a, OWNER_A, WR))
        setlkw = blocked_setlkw(client, nodeid, fh_b)
        state = fe.call(R.VHOST_USER_GET_VRING_BASE, m.VRING_STATE.pack(REQUEST_QUEUE, 0))
        assert m.VRING_STATE.unpack(state) == (REQUEST_QUEUE, setlkw.ring.next_avail)
        head, length = next_used(client)
        assert head == setlkw.head and setlkw.reply(length) == (errno.EINTR, b"")
