"""Reader/Writer: in-order consumption across segments, zero-copy fd transfers, split_at."""

import os

import pytest

from vhostfs.iov import IOV_MAX, Reader, Writer


def segs(*sizes):
    return [memoryview(bytearray(n)) for n in sizes]


def test_reader_reads_across_segments():
    r = Reader([memoryview(b"abc"), memoryview(b"defg")])
    assert r.read(2) == b"ab"
    assert r.read(3) == b"cde"
    assert r.remaining == 2
    assert r.read(10) == b"fg"
    assert r.read(1) == b""


def test_writer_refuses_more_than_available():
    w = Writer(segs(4))
    with pytest.raises(ValueError):
        w.write(b"12345")
    assert w.written == 0


def test_writer_writes_across_segments():
    s = segs(3, 3)
    w = Writer(s)
    w.write(b"abcd")
    w.write(b"ef")
    assert bytes(s[0]) + bytes(s[1]) == b"abcdef"
    assert w.available == 0 and w.written == 6


def test_split_at_keeps_header_room(tmp_path):
    s = segs(10, 30)
    w = Writer(s)
    data = w.split_at(16)
    data.write(b"x" * 24)
    w.write(b"h" * 16)
    assert bytes(s[0]) == b"h" * 10
    assert bytes(s[1]) == b"h" * 6 + b"x" * 24


def test_fd_round_trip_goes_through_views(tmp_path):
    path = tmp_path / "f"
    payload = os.urandom(10000)
    src = [memoryview(bytearray(payload[i:i + 100])) for i in range(0, 10000, 100)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert Reader(src).write_to_fd(fd, 10000, 5) == 10000
        dst = segs(*([7] * 2000))
        w = Writer(dst)
        assert w.read_from_fd(fd, 20000, 5) == 10000
        assert b"".join(bytes(v) for v in dst)[:10000] == payload
        assert w.written == 10000
    finally:
        os.close(fd)


def test_read_from_fd_batches_beyond_iov_max(tmp_path):
    n = IOV_MAX * 3 + 5
    path = tmp_path / "f"
    payload = os.urandom(n * 2)
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    try:
        dst = segs(*([2] * n))
        assert Writer(dst).read_from_fd(fd, n * 2, 0) == n * 2
        assert b"".join(bytes(v) for v in dst) == payload
    finally:
        os.close(fd)


def test_read_from_fd_stops_at_eof(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"short")
    fd = os.open(path, os.O_RDONLY)
    try:
        w = Writer(segs(3, 100))
        assert w.read_from_fd(fd, 103, 0) == 5
        assert w.written == 5 and w.available == 98
        w.write(b"!")
    finally:
        os.close(fd)


def test_peek_reads_ahead_without_consuming():
    r = Reader([memoryview(b"\x01\x00\x00\x00\x02\x00"), memoryview(b"\x00\x00\x03\x00\x00\x00\x00\x00")])
    assert r.peek_u32(0) == 1
    assert r.peek_u32(4) == 2  # across the two views
    assert r.peek_u64(4) == 2 | 3 << 32
    assert r.peek_u32(12) is None
    assert r.remaining == 14 and r.read(4) == b"\x01\x00\x00\x00"
    assert r.peek_u32(0) == 2
