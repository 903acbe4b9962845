"""The daemon end to end over its socket: vhost-user set-up, virtqueues and FUSE against a host dir."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import FuseClient, expect_errno
from vhostfs.virtqueue.split import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

from .conftest import check_statfs, start_daemon, stop_daemon

ROOT = abi.ROOT_ID


def test_file_round_trip_visible_on_host(session):
    client, daemon = session
    entry, (fh, _) = client.create(ROOT, b"hello.txt")
    nodeid = entry[0]
    assert client.write(nodeid, fh, 0, b"hello, host\n") == 12
    client.release(nodeid, fh)
    assert (daemon.shared / "hello.txt").read_bytes() == b"hello, host\n"
    fh = client.open(nodeid)
    assert client.read(nodeid, fh, 7, 100) == b"host\n"
    client.release(nodeid, fh)


def test_lookup_getattr_match_host(session):
    client, daemon = session
    (daemon.shared / "f").write_bytes(b"x" * 1234)
    entry = client.lookup(ROOT, b"f")
    attr = client.getattr(entry[0])
    st = os.stat(daemon.shared / "f")
    ino, size = attr[2], attr[3]
    assert (ino, size) == (st.st_ino, 1234)
    expect_errno(errno.ENOENT, client.lookup, ROOT, b"missing")


def test_mkdir_readdir_unlink(session):
    client, daemon = session
    d = client.mkdir(ROOT, b"dir")[0]
    for i in range(300):
        (daemon.shared / "dir" / f"n{i}").touch()
    names = set(client.readdir_names(d))
    assert names == {b".", b".."} | {f"n{i}".encode() for i in range(300)}
    client.unlink(d, b"n7")
    assert not (daemon.shared / "dir" / "n7").exists()


def test_large_read_is_served_in_one_request(session):
    client, daemon = session
    data = os.urandom(1 << 20)
    (daemon.shared / "big").write_bytes(data)
    nodeid = client.lookup(ROOT, b"big")[0]
    fh = client.open(nodeid)
    assert client.read(nodeid, fh, 0, 1 << 20) == data
    client.release(nodeid, fh)


def test_indirect_chain_request(session):
    client, _ = session
    reply = client.fe.request(1, client.message(abi.FUSE_STATFS, ROOT), 4096, indirect=True)
    assert abi.OUT_HEADER.unpack_from(reply)[1] == 0


def test_bad_chain_is_returned_empty_and_queue_goes_on(session):
    client, _ = session
    fe = client.fe
    ring = fe.rings[1]
    # A chain whose second descriptor points outside guest memory.
    head = ring.free_head
    fe.write_desc(ring, head, fe.alloc(64), 64, VIRTQ_DESC_F_NEXT, (head + 1) % ring.num)
    fe.write_desc(ring, (head + 1) % ring.num, fe.mem_size + 4096, 64, VIRTQ_DESC_F_WRITE, 0)
    ring.free_head = (head + 2) % ring.num
    fe.publish(ring, head)
    assert fe.wait_used(ring) == (head, 0)
    check_statfs(client, session[1].shared)


def test_forget_on_hiprio_queue_gets_no_reply(session):
    client, daemon = session
    (daemon.shared / "f").touch()
    nodeid = client.lookup(ROOT, b"f")[0]
    client.forget(nodeid, 1, queue=0)
    assert client.lookup(ROOT, b"f")[0] > 0


def test_two_request_queues_served_concurrently(daemon):
    with daemon.connect() as fe:
        fe.setup(queues=3)
        FuseClient(fe).init()
        errors = []

        def worker(queue: int) -> None:
            try:
                c = FuseClient(fe, queue=queue)
                for _ in range(50):
                    c.lookup(ROOT, b".")
                    check_statfs(c, daemon.shared)
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(q,)) for q in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


def test_front_end_disconnect_stops_daemon(tmp_path):
    d = start_daemon(tmp_path)
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            FuseClient(fe).init()
        assert d.wait(10) == 0
        assert not os.path.exists(d.socket)
    finally:
        stop_daemon(d)


def test_sigterm_exits_cleanly(tmp_path):
    d = start_daemon(tmp_path)
    with d.connect() as fe:
        fe.setup(queues=2)
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(10) == 0
    assert "Traceback" not in d.log_text()


@pytest.mark.parametrize("after_a_session", [False, True])
def test_sigterm_while_waiting_for_a_front_end_exits_cleanly(tmp_path, after_a_session):
    d = start_daemon(tmp_path, "--keep-listening")
    if after_a_session:
        with d.connect() as fe:
            fe.setup(queues=2)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(10) == 0
    assert "terminated by signal" in d.log_text()
    assert not os.path.exists(d.socket)
    assert "Traceback" not in d.log_text()


def test_second_daemon_on_same_socket_refused(tmp_path):
    d = start_daemon(tmp_path)
    try:
        r = subprocess.run([sys.executable, "-m", "vhostfs", "--socket-path", d.socket, "--shared-dir",
                            str(d.shared)], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert "already served" in r.stderr
    finally:
        stop_daemon(d)


def test_print_capabilities():
    r = subprocess.run([sys.executable, "-m", "vhostfs", "--print-capabilities"], capture_output=True,
                       text=True, timeout=30, check=True)
    assert json.loads(r.stdout)["type"] == "fs"


def test_thread_pool_serves_requests_and_stops_cleanly(tmp_path):
    d = start_daemon(tmp_path, "--thread-pool-size", "4")
    try:
        (d.shared / "f").write_bytes(b"pool" * 1000)
        with d.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            nodeid = client.lookup(ROOT, b"f")[0]
            fh = client.open(nodeid)
            # Several requests in flight at once on one queue, completed by different threads.
            ring = fe.rings[1]
            heads = {}
            for i in range(16):
                buf = fe.alloc(4096 + 16)
                src = fe.alloc(80)
                msg = client.message(abi.FUSE_READ, nodeid, abi.READ_IN.pack(fh, i * 100, 100, 0, 0, 0))
                fe.view[src:src + len(msg)] = msg
                head = fe.make_chain(ring, [(src, len(msg))], [(buf, 4096 + 16)])
                heads[head] = (buf, i)
                fe.publish(ring, head)
            for _ in range(16):
                head, length = fe.wait_used(ring)
                buf, i = heads.pop(head)
                assert length == 116
                assert fe.view[buf + 16:buf + 116] == (b"pool" * 1000)[i * 100:i * 100 + 100]
            assert not heads
        assert d.wait(10) == 0
    finally:
        stop_daemon(d)
    assert "Traceback" not in d.log_text()


def _post_getattr(fe, client, ring, kick: bool) -> tuple[int, int]:
    src, dst = fe.alloc(80), fe.alloc(256)
    msg = client.message(abi.FUSE_GETATTR, ROOT, abi.GETATTR_IN.pack(0, 0))
    fe.view[src:src + len(msg)] = msg
    head = fe.make_chain(ring, [(src, len(msg))], [(dst, 256)])
    fe.publish(ring, head, kick=kick)
    return head, dst


def test_polling_queue_serves_requests_posted_without_a_kick(tmp_path):
    """While a queue that just ran dry polls, the driver need not kick: its request is served anyway."""
    d = start_daemon(tmp_path, "--poll-us", "30000000")
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            ring = fe.rings[1]
            for _ in range(3):
                head, dst = _post_getattr(fe, client, ring, kick=False)
                got, length = fe.wait_used(ring)
                assert got == head
                assert length == 16 + abi.ATTR_OUT.size
                assert abi.OUT_HEADER.unpack_from(fe.view, dst)[1] == 0
        assert d.wait(10) == 0
    finally:
        stop_daemon(d)
    assert "Traceback" not in d.log_text()

