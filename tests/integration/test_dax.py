"""The DAX window end to end: the daemon with --dax-window-size, the Python front end playing the VMM
(it reserves the window and maps what SHMEM_MAP sends), and FUSE SETUPMAPPING/REMOVEMAPPING."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from vhostfs import native
from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import FuseClient, expect_errno
from vhostfs.vhost_user import messages as m

from .conftest import start_daemon, stop_daemon

ROOT = abi.ROOT_ID
PAGE = os.sysconf("SC_PAGE_SIZE")
WINDOW = 16 << 20
READ = abi.FUSE_SETUPMAPPING_FLAG_READ
WRITE = abi.FUSE_SETUPMAPPING_FLAG_WRITE
#: msync(2) flag (asm-generic/mman-common.h); Python's mmap module does not export it.
MS_SYNC = 4


@pytest.fixture
def dax(tmp_path):
    """(client, front end, daemon) with the window reserved, the back-end channel served and INIT done."""
    daemon = start_daemon(tmp_path, "--dax-window-size", "16M")
    try:
        with daemon.connect() as fe:
            fe.setup(dax_window=WINDOW)
            assert fe.protocol_features & 1 << m.VHOST_USER_PROTOCOL_F_SHMEM
            client = FuseClient(fe)
            client.init(flags=abi.FUSE_MAP_ALIGNMENT)
            yield client, fe, daemon
    finally:
        stop_daemon(daemon)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()


def setupmapping(client: FuseClient, nodeid: int, fh: int, foffset: int, length: int, flags: int,
                 moffset: int) -> None:
    client.call(abi.FUSE_SETUPMAPPING, nodeid, abi.SETUPMAPPING_IN.pack(fh, foffset, length, flags, moffset))


def removemapping(client: FuseClient, ranges: list[tuple[int, int]], count: int | None = None) -> None:
    body = abi.REMOVEMAPPING_IN.pack(len(ranges) if count is None else count)
    body += b"".join(abi.REMOVEMAPPING_ONE.pack(off, n) for off, n in ranges)
    client.call(abi.FUSE_REMOVEMAPPING, 0, body)


def host_file(daemon, name: str, data: bytes) -> None:
    (daemon.shared / name).write_bytes(data)


def open_file(client: FuseClient, name: bytes, flags: int = os.O_RDONLY) -> tuple[int, int]:
    nodeid = client.lookup(ROOT, name)[0]
    return nodeid, client.open(nodeid, flags)


def test_get_shmem_config_reports_the_window(dax):
    _, fe, _ = dax
    assert fe.get_shmem_config() == [WINDOW]


def test_init_announces_page_alignment(tmp_path):
    daemon = start_daemon(tmp_path, "--dax-window-size", "4M")
    try:
        with daemon.connect() as fe:
            fe.setup()
            out = FuseClient(fe).init(flags=abi.FUSE_MAP_ALIGNMENT)
            flags, map_alignment = out[3], out[9]
            assert flags & abi.FUSE_MAP_ALIGNMENT
            assert 1 << map_alignment == PAGE
    finally:
        stop_daemon(daemon)


def test_read_through_the_window_equals_the_host_file(dax):
    client, fe, daemon = dax
    data = os.urandom(3 << 20)
    host_file(daemon, "f", data)
    nodeid, fh = open_file(client, b"f")
    setupmapping(client, nodeid, fh, 0, 2 << 20, READ, 4 << 20)
    setupmapping(client, nodeid, fh, 2 << 20, 2 << 20, READ, 8 << 20)
    assert bytes(fe.window_view(4 << 20, 2 << 20)) == data[:2 << 20]
    # The second mapping reaches past the end of the file: only its first MiB is backed.
    assert bytes(fe.window_view(8 << 20, 1 << 20)) == data[2 << 20:]
    st = os.stat(daemon.shared / "f")
    assert {(mp.st_dev, mp.st_ino, mp.writable) for mp in fe.window_maps.values()} == {
        (st.st_dev, st.st_ino, False)}


def test_writes_through_the_window_land_in_the_host_file(dax):
    client, fe, daemon = dax
    host_file(daemon, "w", bytes(4 * PAGE))
    nodeid, fh = open_file(client, b"w", os.O_RDWR)
    setupmapping(client, nodeid, fh, 0, 4 * PAGE, READ | WRITE, 0)
    view = fe.window_view(0, 4 * PAGE)
    view[PAGE:PAGE + 11] = b"through dax"
    native.msync(fe.window_addr, 4 * PAGE, MS_SYNC)
    assert (daemon.shared / "w").read_bytes()[PAGE:PAGE + 12] == b"through dax\0"
    # And a FUSE READ sees it too.
    assert client.read(nodeid, fh, PAGE, 11) == b"through dax"


def test_removemapping_makes_the_range_unreadable(dax):
    client, fe, daemon = dax
    host_file(daemon, "r", b"x" * (2 * PAGE))
    nodeid, fh = open_file(client, b"r")
    setupmapping(client, nodeid, fh, 0, 2 * PAGE, READ, 0)
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 4 * PAGE)
    assert fe.window_readable(0) and fe.window_readable(4 * PAGE)
    removemapping(client, [(0, 2 * PAGE), (4 * PAGE, PAGE)])
    assert fe.window_maps == {}
    assert not fe.window_readable(0)
    assert not fe.window_readable(PAGE)
    assert not fe.window_readable(4 * PAGE)


def test_a_new_mapping_replaces_the_one_it_overlaps(dax):
    client, fe, daemon = dax
    host_file(daemon, "a", b"a" * (2 * PAGE))
    host_file(daemon, "b", b"b" * PAGE)
    a_node, a_fh = open_file(client, b"a")
    b_node, b_fh = open_file(client, b"b")
    setupmapping(client, a_node, a_fh, 0, 2 * PAGE, READ, 0)
    setupmapping(client, b_node, b_fh, 0, PAGE, READ, PAGE)
    assert bytes(fe.window_view(PAGE, PAGE)) == b"b" * PAGE
    b_ino = os.stat(daemon.shared / "b").st_ino
    assert [(off, mp.st_ino) for off, mp in fe.window_maps.items()] == [(PAGE, b_ino)]
    assert not fe.window_readable(0)


HOSTILE = {
    "beyond the window": (0, PAGE, READ, WINDOW, errno.EINVAL),
    "crossing the window end": (0, 2 * PAGE, READ, WINDOW - PAGE, errno.EINVAL),
    "window offset unaligned": (0, PAGE, READ, 512, errno.EINVAL),
    "file offset unaligned": (100, PAGE, READ, 0, errno.EINVAL),
    "length unaligned": (0, 100, READ, 0, errno.EINVAL),
    "length 0": (0, 0, READ, 0, errno.EINVAL),
    "file range overflows": ((1 << 64) - PAGE, 2 * PAGE, READ, 0, errno.EINVAL),
    "file range beyond off_t": ((1 << 63) - PAGE, 2 * PAGE, READ, 0, errno.EINVAL),
    "window range overflows": (0, 2 * PAGE, READ, (1 << 64) - PAGE, errno.EINVAL),
    "unknown flag": (0, PAGE, READ | 4, 0, errno.EINVAL),
    "write mapping of a read-only open": (0, PAGE, READ | WRITE, 0, errno.EACCES),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_setupmapping_is_refused(dax, case):
    client, fe, daemon = dax
    foffset, length, flags, moffset, err = HOSTILE[case]
    host_file(daemon, "h", b"h" * PAGE)
    nodeid, fh = open_file(client, b"h")
    expect_errno(err, setupmapping, client, nodeid, fh, foffset, length, flags, moffset)
    assert fe.window_maps == {} and fe.backend_log == []


def test_setupmapping_of_unknown_or_foreign_handles_is_refused(dax):
    client, fe, daemon = dax
    host_file(daemon, "h", b"h" * PAGE)
    host_file(daemon, "other", b"o" * PAGE)
    nodeid, fh = open_file(client, b"h")
    other, _ = open_file(client, b"other")
    expect_errno(errno.EBADF, setupmapping, client, nodeid, fh + 100, 0, PAGE, READ, 0)
    expect_errno(errno.EBADF, setupmapping, client, other, fh, 0, PAGE, READ, 0)
    assert fe.window_maps == {}


def test_hostile_removemapping_is_refused(dax):
    client, fe, daemon = dax
    host_file(daemon, "h", b"h" * PAGE)
    nodeid, fh = open_file(client, b"h")
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
    expect_errno(errno.EINVAL, removemapping, client, [(0, PAGE)], 2)  # claims more than it carries
    expect_errno(errno.EINVAL, removemapping, client, [], 0)
    expect_errno(errno.EINVAL, removemapping, client, [(0, 0)])
    expect_errno(errno.EINVAL, removemapping, client, [(WINDOW, PAGE)])
    expect_errno(errno.EINVAL, removemapping, client, [(0, PAGE), ((1 << 64) - PAGE, 2 * PAGE)])
    assert list(fe.window_maps) == [0]


def test_a_front_end_that_refuses_the_map_fails_the_request(dax):
    client, fe, daemon = dax
    host_file(daemon, "n", b"n" * PAGE)
    nodeid, fh = open_file(client, b"n")
    fe.refuse_maps = True
    expect_errno(errno.EIO, setupmapping, client, nodeid, fh, 0, PAGE, READ, 0)
    assert fe.window_maps == {}
    fe.refuse_maps = False
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
    assert bytes(fe.window_view(0, 4)) == b"nnnn"


def _setattr_size(client: FuseClient, nodeid: int, size: int) -> None:
    body = abi.SETATTR_IN.pack(abi.FATTR_SIZE, 0, size, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    client.call(abi.FUSE_SETATTR, nodeid, body, reply_size=256)


def test_truncate_removes_the_mappings_beyond_the_new_end(dax):
    client, fe, daemon = dax
    host_file(daemon, "t", b"t" * (4 * PAGE))
    nodeid, fh = open_file(client, b"t", os.O_RDWR)
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
    setupmapping(client, nodeid, fh, 3 * PAGE, PAGE, READ, PAGE)
    _setattr_size(client, nodeid, PAGE)
    assert list(fe.window_maps) == [0]
    assert not fe.window_readable(PAGE)
    assert os.path.getsize(daemon.shared / "t") == PAGE


def test_unlink_and_release_remove_mappings_of_unreachable_files(dax):
    client, fe, daemon = dax
    host_file(daemon, "u", b"u" * PAGE)
    nodeid, fh = open_file(client, b"u")
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
    client.unlink(ROOT, b"u")
    assert list(fe.window_maps) == [0]  # still open: the guest may still use it
    client.release(nodeid, fh)
    assert fe.window_maps == {}

    # A file that is only closed keeps its mappings (the guest driver reuses them); losing its last
    # name then removes them.
    host_file(daemon, "c", b"c" * PAGE)
    nodeid, fh = open_file(client, b"c")
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
    client.release(nodeid, fh)
    assert list(fe.window_maps) == [0]
    client.unlink(ROOT, b"c")
    assert fe.window_maps == {}


def test_destroy_unmaps_everything(dax):
    client, fe, daemon = dax
    host_file(daemon, "d", b"d" * (2 * PAGE))
    nodeid, fh = open_file(client, b"d")
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
    setupmapping(client, nodeid, fh, PAGE, PAGE, READ, 8 * PAGE)
    client.call(abi.FUSE_DESTROY, 0)
    assert fe.window_maps == {}


def test_reset_forgets_mappings_the_front_end_dropped(dax):
    client, fe, daemon = dax
    host_file(daemon, "s", b"s" * PAGE)
    nodeid, fh = open_file(client, b"s")
    setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
    assert fe.ack(m.Request.VHOST_USER_RESET_DEVICE) == 0
    unmaps = [e for e in fe.backend_log if e[0] == m.BackendRequest.VHOST_USER_BACKEND_SHMEM_UNMAP]
    # The daemon sends no unmap on reset: the VMM drops the window's mappings itself.
    assert unmaps == []


def test_disconnect_with_live_mappings_ends_cleanly(tmp_path):
    daemon = start_daemon(tmp_path, "--dax-window-size", "1M")
    try:
        (daemon.shared / "f").write_bytes(b"f" * PAGE)
        with daemon.connect() as fe:
            fe.reserve_window(1 << 20)
            fe.negotiate()
            assert fe.set_mem_table() == 0
            assert fe.start_backend_channel() == 0
            for i in range(2):
                fe.add_ring(i)
            client = FuseClient(fe)
            client.init()
            nodeid, fh = open_file(client, b"f")
            setupmapping(client, nodeid, fh, 0, PAGE, READ, 0)
            assert list(fe.window_maps) == [0]
        assert daemon.wait() == 0
    finally:
        stop_daemon(daemon)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()


def test_without_the_option_there_is_no_window(session):
    client, daemon = session
    assert not client.fe.protocol_features & 1 << m.VHOST_USER_PROTOCOL_F_SHMEM
    (daemon.shared / "f").write_bytes(b"f" * PAGE)
    nodeid, fh = open_file(client, b"f")
    expect_errno(errno.ENOSYS, setupmapping, client, nodeid, fh, 0, PAGE, READ, 0)
    expect_errno(errno.ENOSYS, removemapping, client, [(0, PAGE)])


def test_a_front_end_that_never_answers_fails_the_request_after_5_s(dax):
    """The back end waits at most 5 s for the reply to SHMEM_MAP (backend_channel.DEFAULT_TIMEOUT), then
    answers EIO and goes on serving."""
    client, fe, daemon = dax
    host_file(daemon, "slow", b"s" * 2 * PAGE)
    nodeid, fh = open_file(client, b"slow")
    fe.silent_backend = True
    start = time.monotonic()
    expect_errno(errno.EIO, setupmapping, client, nodeid, fh, 0, PAGE, READ, 0)
    waited = time.monotonic() - start
    assert 4.5 <= waited < 9, f"the request failed after {waited:.1f} s"
    assert "did not map" in daemon.log_text()
    # A late reply would answer the wrong request, so the channel is closed: later mappings fail at
    # once, and everything else is still served.
    fe.silent_backend = False
    start = time.monotonic()
    expect_errno(errno.EIO, setupmapping, client, nodeid, fh, PAGE, PAGE, READ, PAGE)
    assert time.monotonic() - start < 2
    assert "back-end channel closed" in daemon.log_text()
    assert client.getattr(nodeid)[3] == 2 * PAGE  # fuse_attr.size
    assert client.read(nodeid, fh, 0, 4) == b"ssss"


# -- what Linux and QEMU 11.1 ask for and allow ------------------------------------------------------
NO_FH = (1 << 64) - 1


def test_a_mapping_without_a_handle_opens_the_file_itself(dax):
    """Linux sends SETUPMAPPING with fh -1: its mappings belong to the inode, not to an open."""
    client, fe, daemon = dax
    data = os.urandom(2 << 20)
    host_file(daemon, "n", data)
    nodeid = client.lookup(ROOT, b"n")[0]
    setupmapping(client, nodeid, NO_FH, 0, 2 << 20, READ, 0)
    assert bytes(fe.window_view(0, 2 << 20)) == data
    setupmapping(client, nodeid, NO_FH, 0, 2 << 20, READ | WRITE, 0)
    fe.window_view(0, 5)[:] = b"dax!!"
    native.msync(fe.window_addr, PAGE, MS_SYNC)
    assert (daemon.shared / "n").read_bytes()[:5] == b"dax!!"


def test_the_ragged_end_of_a_file_is_mapped_from_a_copy_and_written_back(dax):
    """The VMM refuses to map past the end of a file (as QEMU 11.1 does): the last partial page comes
    from a copy, and what the guest writes there reaches the file on fsync."""
    client, fe, daemon = dax
    data = os.urandom(PAGE + 10)
    host_file(daemon, "r", data)
    nodeid, fh = open_file(client, b"r", os.O_RDWR)
    setupmapping(client, nodeid, NO_FH, 0, 2 << 20, READ | WRITE, 0)
    assert sorted((off, mp.length) for off, mp in fe.window_maps.items()) == [(0, PAGE), (PAGE, PAGE)]
    assert bytes(fe.window_view(0, PAGE + 10)) == data
    assert bytes(fe.window_view(PAGE + 10, 16)) == bytes(16)
    fe.window_view(PAGE, 10)[:] = b"0123456789"
    client.call(abi.FUSE_FSYNC, nodeid, abi.FSYNC_IN.pack(fh, 0))
    assert (daemon.shared / "r").read_bytes() == data[:PAGE] + b"0123456789"
    # A write through FUSE past the end: the copy is written back first, then the range backed anew.
    fe.window_view(PAGE, 2)[:] = b"AB"
    assert client.write(nodeid, fh, PAGE + 10, b"tail") == 4
    assert (daemon.shared / "r").read_bytes() == data[:PAGE] + b"AB23456789tail"
    assert bytes(fe.window_view(PAGE, 14)) == b"AB23456789tail"


def test_a_file_grown_on_the_host_is_backed_anew_before_the_guest_sees_its_size(dax):
    client, fe, daemon = dax
    host_file(daemon, "g", b"g" * 100)
    nodeid = client.lookup(ROOT, b"g")[0]
    setupmapping(client, nodeid, NO_FH, 0, 2 << 20, READ, 0)
    assert sorted(fe.window_maps) == [0] and fe.window_maps[0].length == PAGE
    with open(daemon.shared / "g", "ab") as f:
        f.write(b"h" * (3 * PAGE))
    size = client.getattr(nodeid)[3]
    assert size == 100 + 3 * PAGE
    assert bytes(fe.window_view(0, size)) == b"g" * 100 + b"h" * (3 * PAGE)


HOSTILE_MORE = {
    "past the end of the file": (2 * PAGE, PAGE, READ, 0, errno.EINVAL),
    "at the end of the file": (PAGE, PAGE, READ, 0, errno.EINVAL),
    "overlapping the window end": (0, 4 * PAGE, READ, WINDOW - 2 * PAGE, errno.EINVAL),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MORE))
def test_more_hostile_setupmappings_map_nothing(dax, case):
    client, fe, daemon = dax
    foffset, length, flags, moffset, err = HOSTILE_MORE[case]
    host_file(daemon, "h", b"h" * PAGE)
    nodeid = client.lookup(ROOT, b"h")[0]
    expect_errno(err, setupmapping, client, nodeid, NO_FH, foffset, length, flags, moffset)
    assert fe.window_maps == {} and fe.backend_log == []


def test_a_closed_handle_or_a_directory_maps_nothing(dax):
    client, fe, daemon = dax
    host_file(daemon, "c", b"c" * PAGE)
    nodeid, fh = open_file(client, b"c")
    client.release(nodeid, fh)
    expect_errno(errno.EBADF, setupmapping, client, nodeid, fh, 0, PAGE, READ, 0)
    (daemon.shared / "d").mkdir()
    dir_node = client.lookup(ROOT, b"d")[0]
    expect_errno(errno.EBADF, setupmapping, client, dir_node, NO_FH, 0, PAGE, READ, 0)
    expect_errno(errno.EBADF, setupmapping, client, 12345, NO_FH, 0, PAGE, READ, 0)
    assert fe.window_maps == {} and fe.backend_log == []


def test_a_symlink_out_of_the_share_maps_nothing(dax, tmp_path):
    client, fe, daemon = dax
    canary = tmp_path / "canary"
    canary.write_bytes(b"secret" * 1000)
    os.symlink(canary, daemon.shared / "link")
    nodeid = client.lookup(ROOT, b"link")[0]
    expect_errno(errno.EBADF, setupmapping, client, nodeid, NO_FH, 0, PAGE, READ, 0)
    assert fe.window_maps == {} and fe.backend_log == []
    assert canary.read_bytes() == b"secret" * 1000


def test_overlapping_mappings_leave_only_the_newest(dax):
    client, fe, daemon = dax
    host_file(daemon, "o", b"o" * (8 * PAGE))
    nodeid = client.lookup(ROOT, b"o")[0]
    setupmapping(client, nodeid, NO_FH, 0, 4 * PAGE, READ, 0)
    setupmapping(client, nodeid, NO_FH, 4 * PAGE, 4 * PAGE, READ, 2 * PAGE)
    assert sorted(fe.window_maps) == [2 * PAGE]
    assert not fe.window_readable(0)


def test_dax_inode_marks_only_files_with_the_attribute(tmp_path):
    """With FUSE_HAS_INODE_DAX (a guest mounted dax=inode), entries and attributes of files that have
    FS_DAX_FL (chattr +x) carry FUSE_ATTR_DAX; other files do not."""
    daemon = start_daemon(tmp_path, "--dax-window-size", "4M")
    try:
        (daemon.shared / "plain").write_bytes(b"p")
        (daemon.shared / "flagged").write_bytes(b"f")
        try:
            subprocess.run(["chattr", "+x", str(daemon.shared / "flagged")], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"cannot set FS_DAX_FL under {tmp_path}: {e}")
        with daemon.connect() as fe:
            fe.setup(dax_window=4 << 20)
            client = FuseClient(fe)
            body = abi.INIT_IN.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, 1 << 20,
                                    abi.FUSE_INIT_EXT | abi.FUSE_MAP_ALIGNMENT, abi.FUSE_HAS_INODE_DAX >> 32)
            out = abi.INIT_OUT.unpack_from(client.call(abi.FUSE_INIT, 0, body))
            assert out[3] & abi.FUSE_INIT_EXT and out[10] << 32 & abi.FUSE_HAS_INODE_DAX
            plain, flagged = client.lookup(ROOT, b"plain"), client.lookup(ROOT, b"flagged")
            assert not plain[-1] & abi.FUSE_ATTR_DAX and flagged[-1] & abi.FUSE_ATTR_DAX
            assert client.getattr(flagged[0])[-1] & abi.FUSE_ATTR_DAX
            assert not client.getattr(plain[0])[-1] & abi.FUSE_ATTR_DAX
    finally:
        stop_daemon(daemon)


def test_on_a_read_only_share_qemu_cannot_map_and_the_read_fails(tmp_path):
    """QEMU 11.1 needs a writable fd even for a read-only mapping; a --readonly share lends none, so
    the mapping fails (EIO) rather than the daemon opening a shared file for writing."""
    daemon = start_daemon(tmp_path, "--dax-window-size", "4M", "--readonly")
    try:
        (daemon.shared / "f").write_bytes(b"f" * PAGE)
        with daemon.connect() as fe:
            fe.setup(dax_window=4 << 20)
            client = FuseClient(fe)
            client.init(flags=abi.FUSE_MAP_ALIGNMENT)
            nodeid = client.lookup(ROOT, b"f")[0]
            expect_errno(errno.EIO, setupmapping, client, nodeid, NO_FH, 0, PAGE, READ, 0)
            expect_errno(errno.EROFS, setupmapping, client, nodeid, NO_FH, 0, PAGE, READ | WRITE, 0)
            assert fe.window_maps == {}
    finally:
        stop_daemon(daemon)
    assert (daemon.shared / "f").read_bytes() == b"f" * PAGE
