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
    window.setup(7, 3, PAGE, 2 * PAGE, 4 * PAGE, True, True)
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
        window.setup(1, 3, foffset, length, moffset, writable, fd_writable)
    assert exc.value.errno == err
    assert window.mappings() == [] and window.mapper.calls == []


def test_overlap_replaces_every_mapping_it_touches(window: DaxWindow) -> None:
    window.setup(1, 3, 0, 2 * PAGE, 0, False, False)
    window.setup(1, 3, 0, 2 * PAGE, 2 * PAGE, False, False)
    window.setup(1, 3, 0, 10 * PAGE, 10 * PAGE, False, False)
    window.setup(2, 4, 0, 2 * PAGE, PAGE, False, False)
    assert [(mp.moffset, mp.nodeid) for mp in window.mappings()] == [(PAGE, 2), (10 * PAGE, 1)]
    assert window.mapper.calls[-3:] == [("unmap", 0, 2 * PAGE), ("unmap", 2 * PAGE, 2 * PAGE),
                                        ("map", PAGE, 2 * PAGE, 0, False)]


def test_refused_map_leaves_no_mapping(window: DaxWindow) -> None:
    window.mapper.fail = True
    with pytest.raises(OSError) as exc:
        window.setup(1, 3, 0, PAGE, 0, False, False)
    assert exc.value.errno == errno.EIO
    assert window.mappings() == []


def test_without_a_channel_mapping_fails() -> None:
    with pytest.raises(OSError) as exc:
        DaxWindow(SIZE, PAGE).setup(1, 3, 0, PAGE, 0, False, False)
    assert exc.value.errno == errno.EIO


def test_remove_validates_all_ranges_first(window: DaxWindow) -> None:
    window.setup(1, 3, 0, PAGE, 0, False, False)
    with pytest.raises(OSError):
        window.remove([(0, PAGE), (SIZE, PAGE)])
    assert len(window.mappings()) == 1
    window.remove([(0, PAGE), (8 * PAGE, PAGE)])
    assert window.mappings() == []


def test_cleanup_by_node_size_and_reset(window: DaxWindow) -> None:
    window.setup(1, 3, 0, PAGE, 0, False, False)
    window.setup(1, 3, 4 * PAGE, PAGE, PAGE, False, False)
    window.setup(1, 3, 8 * PAGE, PAGE, 2 * PAGE, False, False)
    window.setup(2, 4, 0, PAGE, 3 * PAGE, False, False)
    window.remove_beyond(1, 4 * PAGE + 1)  # the mapping at file offset 4 pages still holds data
    assert [mp.moffset for mp in window.mappings()] == [0, PAGE, 3 * PAGE]
    window.remove_node(1)
    assert [mp.nodeid for mp in window.mappings()] == [2]
    calls = len(window.mapper.calls)
    window.forget_all()
    assert window.mappings() == [] and len(window.mapper.calls) == calls


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

    def lookup(self, ctx, parent, name):
        self.calls.append(("lookup", parent, name))
        return "entry"

    def statfs(self, ctx, nodeid):
        self.calls.append(("statfs", nodeid))
        return "statvfs"


def test_dax_filesystem_passes_other_operations_through_unchanged(window: DaxWindow) -> None:
    inner = _Mappable()
    fs = DaxFilesystem(inner, window)
    # What an instance does is its class's: nothing is rebound on the instance.
    assert not set(vars(fs)) & set(dir(Filesystem))
    assert fs.lookup(None, 1, b"x") == "entry" and fs.statfs(None, 1) == "statvfs"
    assert inner.calls == [("lookup", 1, b"x"), ("statfs", 1)]
    # Operations the wrapped file system lacks answer as Filesystem's defaults do (ENOSYS).
    with pytest.raises(OSError) as exc:
        fs.readlink(None, 1)
    assert exc.value.errno == errno.ENOSYS
    assert DaxFilesystem.lookup.__doc__ == Filesystem.lookup.__doc__
