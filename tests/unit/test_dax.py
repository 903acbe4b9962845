"""DaxWindow bookkeeping and validation against a recording mapper, and the back-end channel over a
socket pair."""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest

from vhostfs.dax import DaxFilesystem, DaxWindow, Mapping
from vhostfs.fuse.filesystem import Filesystem
from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user.backend_channel import BackendChannel

PAGE = 4096
SIZE = 64 * PAGE
#: A file size past every range these tests map: all of a mapping is backed by whole file pages.
BIG = 1 << 40


class RecordingMapper:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def shmem_map(self, shmid, fd, fd_offset, shm_offset, length, writable):
        self.calls.append(("map", shm_offset, length, fd_offset, writable))
        if self.fail:
            raise OSError(errno.EIO, "refused")

    def shmem_unmap(self, shmid, shm_offset, length):
        self.calls.append(("unmap", shm_offset, length))


@pytest.fixture
def window() -> DaxWindow:
    w = DaxWindow(SIZE, PAGE)
    w.mapper = RecordingMapper()
    return w


def test_setup_records_and_maps(window: DaxWindow) -> None:
    window.setup(7, 3, PAGE, 2 * PAGE, 4 * PAGE, True, True, BIG)
    assert window.mappings() == [Mapping(4 * PAGE, 2 * PAGE, 7, PAGE, True)]
    assert window.mapper.calls == [("map", 4 * PAGE, 2 * PAGE, PAGE, True)]
    assert window.alignment_log2 == 12


@pytest.mark.parametrize(("foffset", "length", "moffset", "writable", "fd_writable", "err"), [
    (0, 0, 0, False, False, errno.EINVAL),
    (0, PAGE, SIZE, False, False, errno.EINVAL),
    (0, 2 * PAGE, SIZE - PAGE, False, False, errno.EINVAL),
    (0, PAGE, 1, False, False, errno.EINVAL),
    (1, PAGE, 0, False, False, errno.EINVAL),
    (0, PAGE + 1, 0, False, False, errno.EINVAL),
    ((1 << 63) - PAGE, 2 * PAGE, 0, False, False, errno.EINVAL),
    (0, PAGE, 0, True, False, errno.EACCES),
])
def test_invalid_requests_change_nothing(window, foffset, length, moffset, writable, fd_writable, err):
    with pytest.raises(OSError) as exc:
        window.setup(1, 3, foffset, length, moffset, writable, fd_writable, BIG)
    assert exc.value.errno == err
    assert window.mappings() == [] and window.mapper.calls == []


def test_overlap_replaces_every_mapping_it_touches(window: DaxWindow) -> None:
    window.setup(1, 3, 0, 2 * PAGE, 0, False, False, BIG)
    window.setup(1, 3, 0, 2 * PAGE, 2 * PAGE, False, False, BIG)
    window.setup(1, 3, 0, 10 * PAGE, 10 * PAGE, False, False, BIG)
    window.setup(2, 4, 0, 2 * PAGE, PAGE, False, False, BIG)
    assert [(mp.moffset, mp.nodeid) for mp in window.mappings()] == [(PAGE, 2), (10 * PAGE, 1)]
    assert window.mapper.calls[-3:] == [("unmap", 0, 2 * PAGE), ("unmap", 2 * PAGE, 2 * PAGE),
                                        ("map", PAGE, 2 * PAGE, 0, False)]


def test_refused_map_leaves_no_mapping(window: DaxWindow) -> None:
    window.mapper.fail = True
    with pytest.raises(OSError) as exc:
        window.setup(1, 3, 0, PAGE, 0, False, False, BIG)
    assert exc.value.errno == errno.EIO
    assert window.mappings() == []


def test_a_mapping_the_front_end_no_longer_has_does_not_block_a_new_one(window: DaxWindow) -> None:
    window.setup(1, 3, 0, 2 * PAGE, 0, False, False, BIG)

    def gone(shmid, shm_offset, length):
        window.mapper.calls.append(("unmap refused", shm_offset, length))
        raise OSError(errno.EIO, "no such mapping")

    window.mapper.shmem_unmap = gone
    window.setup(2, 4, 0, PAGE, PAGE, False, False, BIG)
    assert [(mp.moffset, mp.nodeid) for mp in window.mappings()] == [(PAGE, 2)]
    assert window.mapper.calls[-2:] == [("unmap refused", 0, 2 * PAGE), ("map", PAGE, PAGE, 0, False)]


def test_without_a_channel_mapping_fails() -> None:
    with pytest.raises(OSError) as exc:
        DaxWindow(SIZE, PAGE).setup(1, 3, 0, PAGE, 0, False, False, BIG)
    assert exc.value.errno == errno.EIO


def test_remove_validates_all_ranges_first(window: DaxWindow) -> None:
    window.setup(1, 3, 0, PAGE, 0, False, False, BIG)
    with pytest.raises(OSError):
        window.remove([(0, PAGE), (SIZE, PAGE)])
    assert len(window.mappings()) == 1
    window.remove([(0, PAGE), (8 * PAGE, PAGE)])
    assert window.mappings() == []


def test_cleanup_by_node_and_reset(window: DaxWindow) -> None:
    window.setup(1, 3, 0, PAGE, 0, False, False, BIG)
    window.setup(1, 3, 4 * PAGE, PAGE, PAGE, False, False, BIG)
    window.setup(2, 4, 0, PAGE, 3 * PAGE, False, False, BIG)
    window.remove_node(1)
    assert [mp.nodeid for mp in window.mappings()] == [2]
    calls = len(window.mapper.calls)
    window.forget_all()
    assert window.mappings() == [] and len(window.mapper.calls) == calls


def test_a_mapping_at_or_past_the_end_of_the_file_is_refused(window: DaxWindow) -> None:
    for foffset in (4 * PAGE, 8 * PAGE):
        with pytest.raises(OSError) as exc:
            window.setup(1, 3, foffset, PAGE, 0, False, False, 4 * PAGE)
        assert exc.value.errno == errno.EINVAL
    assert window.mappings() == [] and window.mapper.calls == []


@pytest.fixture
def ragged(tmp_path):
    """An fd of a file of 2 pages and 100 bytes, and its bytes."""
    data = os.urandom(2 * PAGE + 100)
    path = tmp_path / "ragged"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    yield fd, data
    os.close(fd)


class CopyingMapper(RecordingMapper):
    """Records what each mapped fd holds at its mapping, as the VMM would see it."""

    def __init__(self) -> None:
        super().__init__()
        self.contents: dict[int, bytes] = {}
        self.fds: dict[int, int] = {}

    def shmem_map(self, shmid, fd, fd_offset, shm_offset, length, writable):
        super().shmem_map(shmid, fd, fd_offset, shm_offset, length, writable)
        self.contents[shm_offset] = os.pread(fd, length, fd_offset)
        self.fds[shm_offset] = os.dup(fd)

    def shmem_unmap(self, shmid, shm_offset, length):
        super().shmem_unmap(shmid, shm_offset, length)
        del self.contents[shm_offset]
        os.close(self.fds.pop(shm_offset))


def test_the_last_partial_page_is_a_copy_and_nothing_past_it_is_mapped(ragged) -> None:
    fd, data = ragged
    window = DaxWindow(SIZE, PAGE)
    window.mapper = mapper = CopyingMapper()
    window.setup(1, fd, 0, 16 * PAGE, 0, False, True, len(data))
    # Two whole pages from the file, then one page of the copy: nothing past the end of the file.
    assert [c[:3] for c in mapper.calls] == [("map", 0, 2 * PAGE), ("map", 2 * PAGE, PAGE)]
    assert mapper.contents[0] == data[:2 * PAGE]
    assert mapper.contents[2 * PAGE] == data[2 * PAGE:] + bytes(PAGE - 100)
    assert window.mappings() == [Mapping(0, 16 * PAGE, 1, 0, False)]
    window.remove([(0, 16 * PAGE)])
    assert mapper.calls[-2:] == [("unmap", 0, 2 * PAGE), ("unmap", 2 * PAGE, PAGE)]
    assert mapper.contents == {}


def test_a_writable_copy_is_written_back(ragged) -> None:
    fd, data = ragged
    window = DaxWindow(SIZE, PAGE)
    window.mapper = mapper = CopyingMapper()
    window.setup(1, fd, 0, 4 * PAGE, 0, True, True, len(data))
    # The guest writes through the window into the copy, past the end of the file too.
    os.pwrite(mapper.fds[2 * PAGE], b"guest" + bytes(95) + b"beyond the end", 0)
    window.write_back(1)
    assert os.fstat(fd).st_size == len(data)
    assert os.pread(fd, 100, 2 * PAGE) == b"guest" + bytes(95)
    os.pwrite(mapper.fds[2 * PAGE], b"again", 0)
    window.remove([(0, PAGE)])  # unmapping writes back too
    assert os.pread(fd, 5, 2 * PAGE) == b"again"


def test_refresh_follows_the_file_size(ragged) -> None:
    fd, data = ragged
    window = DaxWindow(SIZE, PAGE)
    window.mapper = mapper = CopyingMapper()
    window.setup(1, fd, 0, 8 * PAGE, 0, False, True, len(data))
    assert window.stale(1, len(data) + 1) and not window.stale(1, len(data))
    os.pwrite(fd, b"more" * PAGE, len(data))  # the file grows to 6 pages and 100 bytes
    size = os.fstat(fd).st_size
    window.refresh(1, fd, size, copies=False)
    assert sorted(mapper.contents) == [0, 6 * PAGE]
    assert mapper.contents[0] == os.pread(fd, 6 * PAGE, 0)
    os.ftruncate(fd, PAGE)
    window.refresh(1, fd, PAGE, copies=False)
    assert mapper.contents == {0: os.pread(fd, PAGE, 0)}
    # Past the end now, yet the guest's mapping stays: growing again backs it again.
    assert window.mappings() == [Mapping(0, 8 * PAGE, 1, 0, False)]
    os.ftruncate(fd, 2 * PAGE + 1)
    window.refresh(1, fd, 2 * PAGE + 1, copies=False)
    assert sorted(mapper.contents) == [0, 2 * PAGE]


def test_window_size_must_be_aligned() -> None:
    with pytest.raises(ValueError):
        DaxWindow(PAGE + 1, PAGE)
    with pytest.raises(ValueError):
        DaxWindow(0, PAGE)


# -- the back-end channel -----------------------------------------------------------------------------
FEATURES = (1 << m.VHOST_USER_PROTOCOL_F_SHMEM | 1 << m.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD
            | 1 << m.VHOST_USER_PROTOCOL_F_REPLY_ACK)


def _front_end(sock: socket.socket, status: int | None, seen: list) -> None:
    """Reads one request (and its fds) and answers it with `status` (None: never answers)."""
    data, fds, _, _ = socket.recv_fds(sock, m.HEADER.size + m.MMAP_REQUEST.size, 4)
    request, flags, size = m.HEADER.unpack_from(data)
    seen.append((request, flags, m.MMAP_REQUEST.unpack_from(data, m.HEADER.size), len(fds)))
    for fd in fds:
        os.close(fd)
    if status is not None:
        sock.sendall(m.HEADER.pack(request, m.VHOST_USER_VERSION | m.VHOST_USER_REPLY_MASK, 8)
                     + m.U64.pack(status))


def _exchange(status: int | None, timeout: float = 5.0) -> tuple[OSError | None, list, BackendChannel]:
    ours, theirs = socket.socketpair()
    seen: list = []
    t = threading.Thread(target=_front_end, args=(theirs, status, seen))
    t.start()
    channel = BackendChannel(ours, FEATURES, timeout=timeout)
    r, w = os.pipe()
    error = None
    try:
        channel.shmem_map(0, r, PAGE, 2 * PAGE, 3 * PAGE, True)
    except OSError as e:
        error = e
    finally:
        os.close(r)
        os.close(w)
    t.join()
    theirs.close()
    return error, seen, channel


def test_map_request_carries_fd_and_payload_and_waits_for_the_ack() -> None:
    error, seen, channel = _exchange(0)
    assert error is None
    request, flags, payload, nfds = seen[0]
    assert request == m.BackendRequest.VHOST_USER_BACKEND_SHMEM_MAP
    assert flags & m.VHOST_USER_NEED_REPLY_MASK
    assert payload == (0, PAGE, 2 * PAGE, 3 * PAGE, m.VHOST_USER_FLAG_MAP_RW) and nfds == 1
    channel.close()


def test_a_refusal_is_an_error() -> None:
    error, _, channel = _exchange(1)
    assert error is not None and error.errno == errno.EIO
    channel.close()


def test_no_answer_times_out_and_closes_the_channel() -> None:
    error, _, channel = _exchange(None, timeout=0.2)
    assert error is not None and error.errno == errno.EIO
    with pytest.raises(OSError) as exc:
        channel.shmem_unmap(0, 0, PAGE)
    assert exc.value.errno == errno.ENOTCONN


def test_map_needs_the_shmem_feature() -> None:
    ours, theirs = socket.socketpair()
    channel = BackendChannel(ours, 1 << m.VHOST_USER_PROTOCOL_F_REPLY_ACK)
    with pytest.raises(OSError) as exc:
        channel.shmem_map(0, 0, 0, 0, PAGE, False)
    assert exc.value.errno == errno.EOPNOTSUPP
    channel.close()
    theirs.close()


class _Mappable(Filesystem):
    """A file system that records the calls that reach it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def fd_for_mapping(self, nodeid, fh):
        raise OSError(errno.EBADF, "none")

    def readlink(self, ctx, nodeid):
        self.calls.append(("readlink", nodeid))
        return b"target"

    def statfs(self, ctx, nodeid):
        self.calls.append(("statfs", nodeid))
        return "statvfs"


def test_dax_filesystem_passes_other_operations_through_unchanged(window: DaxWindow) -> None:
    inner = _Mappable()
    fs = DaxFilesystem(inner, window)
    # What an instance does is its class's: nothing is rebound on the instance.
    assert not set(vars(fs)) & set(dir(Filesystem))
    assert fs.readlink(None, 1) == b"target" and fs.statfs(None, 1) == "statvfs"
    assert inner.calls == [("readlink", 1), ("statfs", 1)]
    # Operations the wrapped file system lacks answer as Filesystem's defaults do (ENOSYS).
    with pytest.raises(OSError) as exc:
        fs.mknod(None, 1, b"x", 0o644, 0, 0)
    assert exc.value.errno == errno.ENOSYS
    assert DaxFilesystem.statfs.__doc__ == Filesystem.statfs.__doc__


def test_write_back_never_grows_a_file_cut_shorter_meanwhile(ragged) -> None:
    fd, data = ragged
    window = DaxWindow(SIZE, PAGE)
    window.mapper = mapper = CopyingMapper()
    window.setup(1, fd, 0, 4 * PAGE, 0, True, True, len(data))
    os.pwrite(mapper.fds[2 * PAGE], b"z" * 100, 0)
    os.ftruncate(fd, 2 * PAGE + 10)  # on the host, meanwhile
    window.write_back(1)
    assert os.fstat(fd).st_size == 2 * PAGE + 10
    assert os.pread(fd, 10, 2 * PAGE) == b"z" * 10
    os.ftruncate(fd, PAGE)
    window.refresh(1, fd, PAGE, copies=False)
    assert os.fstat(fd).st_size == PAGE
