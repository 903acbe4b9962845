"""`vhostfs mount` with several --mount and the control API, through the host kernel's FUSE client."""

from __future__ import annotations

import errno
import os
import time

import pytest

from tests.integration.test_control_api import fd_count, mount, settled_fd_count
from tests.integration.test_fusedev import _take_down, mount_cli, start
from vhostfs import control


def test_several_mounts_over_dev_fuse(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse (the fuse kernel module)")
    if os.geteuid() != 0:
        pytest.skip("needs root to mount FUSE file systems with mount(2)")
    dirs = {}
    for name in ("one", "two", "three"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "file").write_bytes(name.encode())
    mnt, api = tmp_path / "mnt", str(tmp_path / "api.sock")
    m = start(mount_cli(str(mnt), "--mount", f"/a={dirs['one']}", "--mount", f"/deep/b={dirs['two']}:ro",
                        "--api-socket", api), mnt, tmp_path / "server.log")
    try:
        assert sorted(os.listdir(mnt)) == ["a", "deep"]
        assert os.listdir(mnt / "deep") == ["b"]
        assert (mnt / "a" / "file").read_bytes() == b"one"
        assert (mnt / "deep" / "b" / "file").read_bytes() == b"two"
        # One st_dev over /dev/fuse (no submounts there), so the inode numbers keep mounts apart.
        inos = {os.stat(p).st_ino for p in (mnt, mnt / "a", mnt / "deep", mnt / "deep" / "b",
                                            mnt / "a" / "file", mnt / "deep" / "b" / "file")}
        assert len(inos) == 6
        with pytest.raises(OSError) as e:
            (mnt / "deep" / "b" / "new").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.mkdir(mnt / "pseudo")
        assert e.value.errno == errno.EROFS

        pid = m.proc.pid
        before = fd_count(pid)
        status, answer = mount(api, "/c", dirs["three"])
        assert status == 201, answer
        (mnt / "c" / "made").write_bytes(b"through the kernel")
        assert (dirs["three"] / "made").read_bytes() == b"through the kernel"
        with pytest.raises(OSError) as e:
            os.rename(mnt / "c" / "made", mnt / "a" / "made")
        assert e.value.errno == errno.EXDEV
        with pytest.raises(OSError) as e:
            os.link(mnt / "c" / "made", mnt / "a" / "linked")
        assert e.value.errno == errno.EXDEV
        os.rename(mnt / "c" / "made", mnt / "c" / "renamed")
        assert (dirs["three"] / "renamed").exists()

        held = os.open(mnt / "c" / "renamed", os.O_RDONLY)
        try:
            status, answer = control.request(api, "DELETE", {"mountpoint": "/c"})
            assert (status, answer["errno"]) == (409, "EBUSY")
            assert control.request(api, "DELETE", {"mountpoint": "/c", "force": True})[0] == 204
            with pytest.raises(OSError) as e:
                os.pread(held, 10, 0)
            assert e.value.errno == errno.ESTALE
        finally:
            os.close(held)
        assert settled_fd_count(pid, before) == before
        deadline = time.monotonic() + 5
        while "c" in os.listdir(mnt) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(os.listdir(mnt)) == ["a", "deep"]
        assert (dirs["three"] / "renamed").read_bytes() == b"through the kernel"
        assert [x["mountpoint"] for x in control.request(api, "GET")[1]["mounts"]] == ["/a", "/deep/b"]
    finally:
        _take_down(mnt, m.proc)
    assert "Traceback" not in m.log_text(), m.log_text()
    assert not os.path.exists(api)
