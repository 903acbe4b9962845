"""/dev/fuse at the kernel's speed over real mounts: FUSE passthrough, FUSE over io_uring, and walks
over trees far larger than the fd limit.

Most sessions run in threads of this process, so the tests can count what reached the daemon: with
passthrough, data written through the mount is on the host file while the file system's read_into and
write_from were never called; with io_uring, requests were answered through the rings. The fallbacks
(no CAP_SYS_ADMIN, a backing file the kernel refuses, enable_uring off, the features turned off)
serve the same data through the daemon and /dev/fuse. fio --verify runs through `vhostfs mount` on
every data path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_fusedev import (
    DATA_PATHS,
    REPO,
    _take_down,
    _wait_for,
    check_data_path,
    mount_cli,
    mounted,
    start,
    uring_enabled,
)
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import fusedev, uring
from vhostfs.fuse.server import FuseServer

_WAIT = 60.0


class Counting(Passthrough):
    """The passthrough, counting the data requests that reach it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads = self.writes = 0

    def read_into(self, *args, **kwargs) -> int:
        self.reads += 1
        return super().read_into(*args, **kwargs)

    def write_from(self, *args, **kwargs) -> int:
        self.writes += 1
        return super().write_from(*args, **kwargs)


class Served:
    """A mounted in-process session of `Counting` on src, with its server and transport."""

    def __init__(self, src: Path, mnt: Path, passthrough: bool = True, max_stack_depth: int = 1,
                 io_uring: bool = False, **opts) -> None:
        self.src, self.mnt = src, mnt
        self.fs = Counting(str(src), **opts)
        self.server = FuseServer(self.fs)
        self.fd = fusedev.mount(str(mnt))
        self.session = fusedev.FuseDevSession(self.server, self.fd, threads=2, mountpoint=str(mnt),
                                              passthrough=passthrough, max_stack_depth=max_stack_depth,
                                              io_uring=io_uring)
        self.thread = threading.Thread(target=self.session.serve)
        self.thread.start()
        os.stat(mnt)  # INIT done

    def close(self) -> None:
        try:
            self.session.stop()
            self.thread.join(_WAIT)
        finally:
            _take_down(self.mnt)
            self.thread.join(_WAIT)
            os.close(self.fd)
            self.fs.close()

    @property
    def reads(self) -> int:
        return self.fs.reads

    @property
    def writes(self) -> int:
        return self.fs.writes

    def backing_ids(self) -> int:
        return len(self.server.backing) if self.server.backing is not None else 0

    def wait_released(self) -> None:
        """RELEASE is sent in the background after close(2): waits for the backing ids to go."""
        _wait_for(lambda: self.backing_ids() == 0, "the backing ids to be closed")


@pytest.fixture
def dirs(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return src, mnt


@pytest.fixture
def served(dirs):
    s = Served(*dirs)
    assert s.server.backing is not None, "this test runs as root, which has CAP_SYS_ADMIN"
    yield s
    s.close()


def test_writes_through_a_passthrough_handle_reach_the_host_file_without_the_daemon(served):
    data = os.urandom(3 << 20)
    with open(served.mnt / "f", "wb") as f:
        f.write(data)
        assert served.backing_ids() == 1
    assert (served.src / "f").read_bytes() == data
    with open(served.mnt / "f", "rb") as f:
        assert f.read() == data
    assert (served.reads, served.writes) == (0, 0)
    # Changes on the host are seen through the mount, and the other way round.
    (served.src / "g").write_bytes(b"from the host")
    assert (served.mnt / "g").read_bytes() == b"from the host"
    assert (served.reads, served.writes) == (0, 0)
    served.wait_released()


def test_truncate_and_setattr_are_seen_on_the_host(served):
    path = served.mnt / "f"
    path.write_bytes(b"x" * 10000)
    with open(path, "r+b") as f:
        f.truncate(100)
        assert os.stat(served.src / "f").st_size == 100
        os.fchmod(f.fileno(), 0o600)
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    os.truncate(path, 50)
    host = os.stat(served.src / "f")
    assert (host.st_size, host.st_mode & 0o777) == (50, 0o600)
    assert os.stat(path).st_size == 50
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(served.src / "f").st_mtime_ns == 2_000_000_000
    assert (served.src / "f").read_bytes() == b"x" * 50
    assert served.writes == 0


def test_mmap_through_a_passthrough_handle(served):
    (served.mnt / "m").write_bytes(bytes(1 << 16))
    with open(served.mnt / "m", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[:5] = b"hello"
        m[-5:] = b"world"
        m.flush()
    data = (served.src / "m").read_bytes()
    assert data[:5] == b"hello" and data[-5:] == b"world"
    with open(served.src / "m", "r+b") as f:
        f.write(b"HOST!")
    with open(served.mnt / "m", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:5] == b"HOST!"
    assert (served.reads, served.writes) == (0, 0)


def test_many_opens_leave_no_backing_id_behind(served):
    for i in range(20):
        (served.src / f"f{i}").write_bytes(b"%d" % i)
    ids: list[int] = []
    backing = served.server.backing
    original = backing.open

    def recording(nodeid: int, fh: int, fd: int) -> int | None:
        result = original(nodeid, fh, fd)
        ids.append(result)
        return result

    backing.open = recording
    for _ in range(10):
        files = [open(served.mnt / f"f{i}", "rb") for i in range(20)]
        twice = [open(served.mnt / f"f{i}", "rb") for i in range(20)]
        assert served.backing_ids() == 20  # one per node, shared by its handles
        for i, f in enumerate(files + twice):
            assert f.read() == b"%d" % (i % 20)
            f.close()
        served.wait_released()
    assert len(ids) == 400 and None not in ids
    # Every id the kernel handed out is closed there: closing it again finds nothing.
    for backing_id in set(ids):
        with pytest.raises(OSError) as exc:
            fcntl.ioctl(served.fd, fusedev.FUSE_DEV_IOC_BACKING_CLOSE, fusedev.BACKING_ID.pack(backing_id))
        assert exc.value.errno == errno.ENOENT
    assert served.reads == 0


def test_without_the_feature_the_daemon_serves_the_data(dirs):
    s = Served(*dirs, passthrough=False)
    try:
        (s.mnt / "f").write_bytes(b"served")
        assert (s.src / "f").read_bytes() == b"served"
        with open(s.mnt / "f", "rb") as f:
            assert os.pread(f.fileno(), 6, 0) == b"served"
        assert s.writes == 1 and s.server.backing is None
    finally:
        s.close()


@pytest.mark.parametrize("opts", [{"cache": "never"}, {"writeback": True}, {"killpriv_v2": True}])
def test_options_that_need_the_daemon_to_see_the_data_keep_it(dirs, opts, caplog):
    caplog.set_level(logging.INFO, "vhostfs")
    s = Served(*dirs, **opts)
    try:
        (s.mnt / "f").write_bytes(b"served")
        assert (s.src / "f").read_bytes() == b"served"
        assert s.writes >= 1 and s.backing_ids() == 0
    finally:
        s.close()
    assert any("FUSE passthrough is off" in r.getMessage() for r in caplog.records)


def test_a_backing_file_the_kernel_refuses_is_served_with_one_log_line(tmp_path, caplog):
    """A share on overlayfs, announced with stack depth 1: the kernel refuses its files (ELOOP)."""
    caplog.set_level(logging.INFO, "vhostfs")
    layers = {n: tmp_path / n for n in ("lower", "upper", "work", "src", "mnt")}
    for d in layers.values():
        d.mkdir()
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}",
                           str(layers["src"])], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"no overlayfs mount here: {done.stderr.strip()}")
    try:
        s = Served(layers["src"], layers["mnt"])
        try:
            for i in range(5):
                (s.mnt / f"f{i}").write_bytes(b"over %d" % i)
                assert (s.mnt / f"f{i}").read_bytes() == b"over %d" % i
            assert s.writes == 5 and s.reads >= 5 and s.backing_ids() == 0
        finally:
            s.close()
        refusals = [r for r in caplog.records if "refused a backing file" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        # With depth 2 the same share is passed through.
        s = Served(layers["src"], layers["mnt"], max_stack_depth=2)
        try:
            (s.mnt / "g").write_bytes(b"through")
            assert (layers["upper"] / "g").read_bytes() == b"through" and s.writes == 0
        finally:
            s.close()
    finally:
        subprocess.run(["umount", str(layers["src"])], check=False)


_WITHOUT_SYS_ADMIN = """
import logging, os, sys, threading
from vhostfs import caps
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import fusedev, uring
from vhostfs.fuse.server import FuseServer
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
src, mnt = sys.argv[1:3]
fd = fusedev.mount(mnt)
caps.drop(caps.PASSTHROUGH_CAPABILITIES)
fs = Passthrough(src)
fusedev.FuseDevSession(FuseServer(fs), fd, threads=1, passthrough=True).serve()
"""


def test_without_cap_sys_admin_the_mount_starts_and_serves_the_data(dirs, tmp_path):
    src, mnt = dirs
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _WITHOUT_SYS_ADMIN, str(src), str(mnt)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        _wait_for(lambda: mounted(mnt), "the mount", proc, log)
        (mnt / "f").write_bytes(b"no passthrough")
        assert (src / "f").read_bytes() == b"no passthrough"
        deadline = time.monotonic() + _WAIT
        while "FUSE passthrough is off: it needs CAP_SYS_ADMIN" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        _take_down(mnt, proc)
        proc.wait(_WAIT)
    assert "Traceback" not in log.read_text(), log.read_text()


# -- fio --verify through `vhostfs mount`, once per data path ---------------------------------------

_FIO_JOBS = (
    # (name, extra fio arguments): buffered and O_DIRECT writes with random offsets, and mmap.
    ("psync", ["--ioengine=psync", "--rw=randwrite", "--bs=4k"]),
    ("direct", ["--ioengine=psync", "--rw=randwrite", "--bs=64k", "--direct=1"]),
    ("mmap", ["--ioengine=mmap", "--rw=randwrite", "--bs=16k"]),
)


@pytest.fixture(params=list(DATA_PATHS))
def cli_mount(request, tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    with uring_enabled() if "io-uring" in request.param else contextlib.nullcontext():
        m = start(mount_cli("--shared-dir", str(src), str(mnt), *DATA_PATHS[request.param]), mnt,
                  tmp_path / "server.log")
        try:
            yield src, mnt, request.param
        finally:
            _take_down(mnt, m.proc)
    assert "Traceback" not in m.log_text(), m.log_text()
    check_data_path(request.param, m.log_text())


@pytest.mark.skipif(shutil.which("fio") is None and os.environ.get("CI") != "true",
                    reason="needs fio (Debian package fio, which scripts/test.sh installs)")
@pytest.mark.parametrize("job, args", _FIO_JOBS, ids=[j for j, _ in _FIO_JOBS])
def test_fio_verify(cli_mount, job, args):
    src, mnt, _ = cli_mount
    done = subprocess.run(["fio", f"--name={job}", f"--directory={mnt}", "--size=8M", "--numjobs=2",
                           "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                           "--group_reporting", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "err= 0" in done.stdout, done.stdout
    # The files fio wrote and verified are the host's.
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in mnt.iterdir())
    assert all(p.stat().st_size == 8 << 20 for p in src.iterdir())


def test_a_users_write_through_passthrough_clears_set_user_id():
    # tmp_path lies in a directory only root may enter; the user must reach this one.
    base = Path(tempfile.mkdtemp(prefix="vhostfs-setid-"))
    os.chmod(base, 0o755)
    src, mnt = base / "src", base / "mnt"
    src.mkdir(mode=0o777)
    mnt.mkdir()
    os.chmod(src, 0o777)
    s = Served(src, mnt)
    try:
        (mnt / "s").write_bytes(b"x")
        os.chmod(mnt / "s", 0o6777)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                with open(mnt / "s", "r+b") as f:
                    f.write(b"y")
                status = 0
            finally:
                os._exit(status)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert stat.S_IMODE(os.stat(src / "s").st_mode) == 0o777
        assert (src / "s").read_bytes() == b"y" and s.writes == 0
    finally:
        s.close()
        shutil.rmtree(base, ignore_errors=True)


# -- a walk over a tree far larger than the fd limit ---------------------------------------------------

@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    for d in range(20):
        sub = root / f"d{d}"
        sub.mkdir()
        for i in range(1000):
            (sub / f"f{i}").write_bytes(b"x" * (i % 4))
    return root


@pytest.mark.parametrize("args, mode", [([], "file handles (prefer)"), (["--inode-file-handles=never"],
                                                                          "O_PATH fds")],
                         ids=["default", "never"])
def test_a_walk_over_20000_files_under_a_1024_fd_limit(big_tree, tmp_path, args, mode):
    import resource

    mnt, log = tmp_path / "mnt", tmp_path / "server.log"
    mnt.mkdir()

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with open(log, "wb") as out:
        proc = subprocess.Popen(mount_cli("--shared-dir", str(big_tree), str(mnt), *args), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=lower,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        _wait_for(lambda: mounted(mnt), "the mount", proc, log)
        seen, sizes = 0, set()
        for top, _dirs, files in os.walk(mnt):
            for name in files:
                st = os.stat(os.path.join(top, name))
                seen += 1
                sizes.add(st.st_size)
        assert seen == 20000 and sizes == {0, 1, 2, 3}
        assert (mnt / "d0" / "f3").read_bytes() == b"xxx"  # the first ones, long closed, come back
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 1024
    finally:
        _take_down(mnt, proc)
        proc.wait(_WAIT)
    text = log.read_text()
    assert "Traceback" not in text and "Too many open files" not in text, text
    assert f"inodes are held by {mode}" in text, text


# -- FUSE over io_uring, in this process ---------------------------------------------------------------

def test_requests_come_on_the_io_uring_queues(dirs):
    with uring_enabled():
        s = Served(*dirs, passthrough=False, io_uring=True)
        try:
            queues = s.session._uring
            assert queues is not None and queues.queues == uring.possible_cpus()
            before = queues.served
            data = os.urandom(3 << 20)
            (s.mnt / "d").mkdir()
            (s.mnt / "d" / "f").write_bytes(data)
            assert (s.src / "d" / "f").read_bytes() == data
            os.sync()
            with open(s.mnt / "d" / "f", "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == data
            assert sorted(os.listdir(s.mnt / "d")) == ["f"]
            os.rename(s.mnt / "d" / "f", s.mnt / "d" / "g")
            os.unlink(s.mnt / "d" / "g")
            os.rmdir(s.mnt / "d")
            # mkdir, create, writes, flush, release, reads, readdir, rename, unlink, rmdir...
            assert queues.served - before >= 10 and s.writes >= 1
        finally:
            s.close()
        # The queue threads ended with the connection.
        assert not any(t.is_alive() for t in queues._threads)


def test_io_uring_and_passthrough_together(dirs):
    with uring_enabled():
        s = Served(*dirs, passthrough=True, io_uring=True)
        try:
            (s.mnt / "f").write_bytes(b"both" * 1000)
            assert (s.src / "f").read_bytes() == b"both" * 1000
            assert s.writes == 0 and s.session._uring.served > 0
            s.wait_released()
        finally:
            s.close()


def test_with_enable_uring_off_requests_come_through_dev_fuse(dirs, caplog):
    caplog.set_level(logging.INFO, "vhostfs")
    with uring_enabled(False):
        s = Served(*dirs, passthrough=False, io_uring=True)
        try:
            (s.mnt / "f").write_bytes(b"plain")
            assert (s.src / "f").read_bytes() == b"plain" and s.session._uring is None
        finally:
            s.close()
    assert any("FUSE over io_uring is off: the fuse module's enable_uring parameter is off" in r.getMessage()
               for r in caplog.records)
