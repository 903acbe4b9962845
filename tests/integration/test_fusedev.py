"""Real /dev/fuse mounts: the host kernel's FUSE client drives the FUSE server and the file systems.

Each mount runs in a subprocess (`python -m vhostfs mount`, or an example's __main__) or in
threads of this process, and every fixture takes its mount down in teardown, lazily if it must, so
that a failing test leaves no stale mount behind. The waits have generous limits only to turn a hang
into a failure; nothing here measures time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.needs import skip_unless_ci
from vhostfs.fuse import fusedev

REPO = Path(__file__).resolve().parents[2]

if not os.path.exists("/dev/fuse"):
    pytest.skip("needs /dev/fuse (the fuse kernel module)", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("needs root to mount FUSE file systems with mount(2)", allow_module_level=True)

# Only a guard against hangs; the mounts normally come up in well under a second.
_WAIT = 120.0


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path field with its octal escapes (\\040 for a space) undone."""
    return field.encode().decode("unicode_escape")


def mounted(path: Path | str) -> bool:
    """Whether a FUSE file system is mounted at `path`, from mountinfo (not touching the mount)."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == path and fields[sep + 1].startswith("fuse"):
                return True
    return False


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + _WAIT
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}) before {what}:\n{_text(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}:\n{_text(log)}")
        time.sleep(0.05)


def _text(log: Path | None) -> str:
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


def _take_down(mountpoint: Path, proc: subprocess.Popen | None = None) -> None:
    """Teardown: ends the server, then makes sure nothing stays mounted at `mountpoint`."""
    if proc is not None and proc.poll() is None:
        proc.terminate()  # the server unmounts on SIGTERM
        try:
            proc.wait(_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()  # closing its /dev/fuse fd aborts the connection
            proc.wait()
    while mounted(mountpoint):
        try:
            fusedev.unmount(str(mountpoint))
        except OSError:
            fusedev.unmount(str(mountpoint), lazy=True)


@dataclass
class Mount:
    proc: subprocess.Popen
    mountpoint: Path
    log: Path

    def log_text(self) -> str:
        return _text(self.log)

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(_WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit:\n{self.log_text()}") from None


def start(argv: list[str], mountpoint: Path, log: Path, probe: bool = True) -> Mount:
    """Starts a mounting server process and waits until it has mounted (and, with `probe`, until its
    file system answers root)."""
    mountpoint.mkdir(exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    _wait_for(lambda: mounted(mountpoint), f"the mount at {mountpoint}", proc, log)
    if probe:
        os.stat(mountpoint)  # the first request through the kernel: INIT, then GETATTR of the root
    return Mount(proc, mountpoint, log)


def mount_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vhostfs", "mount", *args]


#: How requests and file data travel: /dev/fuse reads and writes with the data served by the daemon,
#: file data passed through to the host files by the kernel, requests on io_uring queues, and both.
DATA_PATHS = {
    "served": ["--no-fuse-passthrough", "--no-io-uring"],
    "fuse-passthrough": ["--fuse-passthrough", "--no-io-uring"],
    "io-uring": ["--no-fuse-passthrough", "--io-uring"],
    "io-uring+passthrough": ["--fuse-passthrough", "--io-uring"],
}
_ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")


@contextlib.contextmanager
def uring_enabled(on: bool = True):
    """The fuse module's enable_uring parameter set for the block, and put back after it."""
    if not _ENABLE_URING.exists():
        pytest.skip("the kernel has no FUSE over io_uring (Linux 6.14+, no enable_uring parameter)")
    old = _ENABLE_URING.read_text().strip()
    _ENABLE_URING.write_text("Y" if on else "N")
    try:
        yield
    finally:
        _ENABLE_URING.write_text(old)


def check_data_path(path: str, log: str) -> None:
    """Asserts that a mount started with DATA_PATHS[path] said at INIT that it uses that path."""
    assert ("FUSE passthrough is on" in log) == ("passthrough" in path), log
    assert ("FUSE over io_uring: " in log) == ("io-uring" in path), log


@pytest.fixture(params=list(DATA_PATHS))
def passthrough(request, tmp_path):
    """The passthrough of tmp_path/src mounted at tmp_path/mnt, once for each of DATA_PATHS:
    yields (src, mnt, Mount)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    uring = uring_enabled() if "io-uring" in request.param else contextlib.nullcontext()
    with uring:
        m = start(mount_cli("--shared-dir", str(src), str(mnt), "--threads", "4", "--xattr", "-o",
                            "fsname=srcshare,noatime", *DATA_PATHS[request.param]),
                  mnt, tmp_path / "server.log")
        try:
            yield src, mnt, m
        finally:
            _take_down(mnt, m.proc)
    assert "Traceback" not in m.log_text(), m.log_text()
    # The mount was probed, so INIT ran and said which paths it uses.
    check_data_path(request.param, m.log_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _same_stat(a: os.stat_result, b: os.stat_result) -> None:
    for name in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size"):
        assert getattr(a, name) == getattr(b, name), name


# -- the passthrough through the kernel --------------------------------------------------------------

def test_files_through_the_kernel(passthrough):
    src, mnt, _ = passthrough
    with open("/proc/self/mounts") as f:
        source, _, fstype, opts = next(ln for ln in f if ln.split()[1] == str(mnt)).split()[:4]
    assert (source, fstype) == ("srcshare", "fuse.vhostfs")
    assert {"noatime", "allow_other", "default_permissions"} <= set(opts.split(","))
    f = mnt / "a.txt"
    f.write_bytes(b"hello world")
    assert (src / "a.txt").read_bytes() == b"hello world"
    assert f.read_bytes() == b"hello world"
    _same_stat(os.stat(f), os.stat(src / "a.txt"))

    with open(f, "r+b") as fh:  # writes at an offset, then reads back through the same open file
        fh.seek(6)
        fh.write(b"there")
        fh.seek(0)
        assert fh.read() == b"hello there"
    assert (src / "a.txt").read_bytes() == b"hello there"

    os.truncate(f, 5)
    assert (src / "a.txt").read_bytes() == b"hello"
    assert os.stat(f).st_size == 5
    os.chmod(f, 0o640)
    assert stat.S_IMODE(os.stat(src / "a.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640

    (mnt / "dir").mkdir()
    (mnt / "dir" / "sub").mkdir()
    assert (src / "dir" / "sub").is_dir()
    os.rename(f, mnt / "dir" / "b.txt")
    assert not (src / "a.txt").exists()
    assert (src / "dir" / "b.txt").read_bytes() == b"hello"

    os.symlink("b.txt", mnt / "dir" / "link")
    assert os.readlink(src / "dir" / "link") == "b.txt"
    assert os.readlink(mnt / "dir" / "link") == "b.txt"
    assert (mnt / "dir" / "link").read_bytes() == b"hello"
    assert stat.S_ISLNK(os.lstat(mnt / "dir" / "link").st_mode)

    os.link(mnt / "dir" / "b.txt", mnt / "hard")
    assert os.stat(mnt / "hard").st_nlink == 2
    assert os.stat(mnt / "hard").st_ino == os.stat(mnt / "dir" / "b.txt").st_ino
    assert os.stat(src / "hard").st_ino == os.stat(src / "dir" / "b.txt").st_ino
    _same_stat(os.stat(mnt / "hard"), os.stat(src / "hard"))

    os.unlink(mnt / "hard")
    assert not (src / "hard").exists()
    assert os.stat(mnt / "dir" / "b.txt").st_nlink == 1

    with pytest.raises(OSError) as exc:
        os.rmdir(mnt / "dir")
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        (mnt / "dir").mkdir()
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    os.rmdir(mnt / "dir" / "sub")
    assert not (src / "dir" / "sub").exists()
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(src)) == ["dir"]
    assert sorted(os.listdir(mnt / "dir")) == sorted(os.listdir(src / "dir")) == ["b.txt", "link"]

    os.setxattr(mnt / "dir" / "b.txt", "user.color", b"blue")
    assert os.getxattr(src / "dir" / "b.txt", "user.color") == b"blue"
    assert "user.color" in os.listxattr(mnt / "dir" / "b.txt")

    st = os.statvfs(mnt)
    assert st.f_blocks == os.statvfs(src).f_blocks


def test_readdir_of_2000_entries(passthrough):
    src, mnt, _ = passthrough
    (mnt / "many").mkdir()
    names = {f"entry-{i:04d}-{'x' * (i % 50)}" for i in range(2000)}
    for name in names:
        (mnt / "many" / name).write_bytes(name.encode())
    listed = os.listdir(mnt / "many")
    assert len(listed) == 2000  # no entry lost or repeated across the READDIR(PLUS) calls
    assert set(listed) == names == set(os.listdir(src / "many"))
    with os.scandir(mnt / "many") as it:
        entries = list(it)
    assert all(e.is_file(follow_symlinks=False) for e in entries)
    assert {e.inode() for e in entries} == {os.stat(src / "many" / e.name).st_ino for e in entries}
    assert (mnt / "many" / "entry-1999-" f"{'x' * 49}").read_bytes() == b"entry-1999-" + b"x" * 49


def test_20mb_copy_keeps_every_byte(passthrough):
    src, mnt, _ = passthrough
    data = os.urandom(20 << 20)
    (src / "big").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert _sha256(mnt / "big") == digest
    shutil.copyfile(mnt / "big", mnt / "big.copy")  # read and write through the kernel
    assert _sha256(src / "big.copy") == digest
    with open(mnt / "written", "wb") as f:  # unaligned writes of assorted sizes
        for start in range(0, len(data), 777_777):
            f.write(data[start:start + 777_777])
    assert _sha256(src / "written") == digest
    assert os.stat(mnt / "written").st_size == 20 << 20


def test_readonly_passthrough_refuses_changes(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    m = start(mount_cli("--shared-dir", str(src), str(mnt), "--readonly"), mnt, tmp_path / "server.log")
    try:
        assert (mnt / "f").read_bytes() == b"data"
        for change in (lambda: (mnt / "f").write_bytes(b"x"), lambda: (mnt / "new").write_bytes(b"x"),
                       lambda: (mnt / "d").mkdir(), lambda: os.unlink(mnt / "f"),
                       lambda: os.chmod(mnt / "f", 0o600)):
            with pytest.raises(OSError) as exc:
                change()
            assert exc.value.errno == errno.EROFS
        assert os.listdir(src) == ["f"] and (src / "f").read_bytes() == b"data"
    finally:
        _take_down(mnt, m.proc)


# -- the server's life cycle --------------------------------------------------------------------------

def test_sigterm_unmounts_cleanly(passthrough):
    src, mnt, m = passthrough
    (mnt / "f").write_bytes(b"kept")
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait_exit() == 0, m.log_text()
    assert not mounted(mnt)
    assert (src / "f").read_bytes() == b"kept"
    assert not (mnt / "f").exists()  # the mount point is the empty directory again


def test_sigterm_with_a_busy_mount_still_ends_the_server(passthrough):
    _, mnt, m = passthrough
    (mnt / "f").write_bytes(b"x")
    busy = open(mnt / "f", "rb")  # an open file keeps the mount busy: the server aborts and detaches it
    try:
        m.proc.send_signal(signal.SIGTERM)
        assert m.wait_exit() == 0, m.log_text()
        assert not mounted(mnt)
    finally:
        try:
            busy.close()
        except OSError as exc:  # FLUSH on the aborted connection
            assert exc.errno == errno.ENOTCONN


def test_umount_makes_the_server_exit(passthrough):
    _, mnt, m = passthrough
    (mnt / "f").write_bytes(b"x")
    subprocess.run(["umount", str(mnt)], check=True)
    assert m.wait_exit() == 0, m.log_text()
    assert not mounted(mnt)


def test_mount_cli_reports_a_failed_mount(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    done = subprocess.run(mount_cli("--shared-dir", str(src), str(tmp_path / "absent")),
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert done.returncode == 1
    assert b"absent" in done.stderr


# -- the examples ------------------------------------------------------------------------------------

def test_memfs_example(tmp_path):
    mnt = tmp_path / "mnt"
    m = start([sys.executable, str(REPO / "examples" / "memfs.py"), str(mnt)], mnt, tmp_path / "memfs.log")
    try:
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"in memory" * 1000)
        os.rename(mnt / "d" / "f", mnt / "g")
        os.symlink("g", mnt / "s")
        os.setxattr(mnt / "g", "user.k", b"v")
        assert (mnt / "s").read_bytes() == b"in memory" * 1000
        assert os.getxattr(mnt / "g", "user.k") == b"v"
        assert sorted(os.listdir(mnt)) == ["d", "g", "s"]
        assert os.listdir(mnt / "d") == []
        subprocess.run(["umount", str(mnt)], check=True)
        assert m.wait_exit() == 0, m.log_text()
    finally:
        _take_down(mnt, m.proc)
    assert "Traceback" not in m.log_text(), m.log_text()


def test_readonlyfs_example(tmp_path):
    mnt = tmp_path / "mnt"
    m = start([sys.executable, str(REPO / "examples" / "readonlyfs.py"), str(mnt)], mnt,
              tmp_path / "readonlyfs.log")
    try:
        assert (mnt / "hello.txt").read_bytes() == b"Hello, world!\n"
        assert sorted(os.listdir(mnt)) == ["docs", "hello-link", "hello.txt"]
        assert sorted(os.listdir(mnt / "docs")) == ["README", "empty", "numbers.txt"]
        assert os.readlink(mnt / "hello-link") == "hello.txt"
        numbers = (mnt / "docs" / "numbers.txt").read_bytes()
        assert numbers.splitlines()[-1] == b"9999"
        for change in (lambda: (mnt / "hello.txt").write_bytes(b"x"), lambda: (mnt / "new").write_bytes(b"x"),
                       lambda: (mnt / "d").mkdir(), lambda: os.unlink(mnt / "hello.txt"),
                       lambda: os.rename(mnt / "hello.txt", mnt / "moved"),
                       lambda: os.chmod(mnt / "hello.txt", 0o666)):
            with pytest.raises(OSError) as exc:
                change()
            assert exc.value.errno in (errno.EROFS, errno.EACCES)
        m.proc.send_signal(signal.SIGINT)
        assert m.wait_exit() == 0, m.log_text()
        assert not mounted(mnt)
    finally:
        _take_down(mnt, m.proc)
    assert "Traceback" not in m.log_text(), m.log_text()


# -- the library API, in this process -----------------------------------------------------------------

def _readonlyfs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readonlyfs", REPO / "examples" / "readonlyfs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_session_in_threads_and_stop(tmp_path):
    from vhostfs.fuse.server import FuseServer

    ro = _readonlyfs()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fd = fusedev.mount(str(mnt), fsname="ro-example", subtype="ro", options="noexec,noatime")
    session = fusedev.FuseDevSession(FuseServer(ro.ReadOnlyFS(ro.TREE), max_write=1 << 17), fd, threads=3,
                                     max_write=1 << 17, mountpoint=str(mnt))
    runner = threading.Thread(target=session.serve)
    runner.start()
    try:
        with open("/proc/self/mounts") as f:
            line = next(ln for ln in f if ln.split()[1] == str(mnt))
        source, _, fstype, opts = line.split()[:4]
        assert (source, fstype) == ("ro-example", "fuse.ro")
        assert {"noexec", "noatime", "nosuid", "nodev", "allow_other", "default_permissions"} <= set(
            opts.split(","))
        assert (mnt / "docs" / "numbers.txt").read_bytes() == ro.TREE["docs"]["numbers.txt"]
        session.stop()
        runner.join(_WAIT)
        assert not runner.is_alive()
        assert not mounted(mnt)
    finally:
        _take_down(mnt)
        runner.join(_WAIT)
        os.close(fd)


def test_serve_filesystem_returns_after_unmount(tmp_path):
    ro = _readonlyfs()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    destroyed = threading.Event()

    class Tracked(ro.ReadOnlyFS):
        def destroy(self) -> None:
            destroyed.set()

    runner = threading.Thread(target=fusedev.serve_filesystem, args=(Tracked({"f": b"1"}), str(mnt)),
                              kwargs={"threads": 2, "default_permissions": False})
    runner.start()
    try:
        _wait_for(lambda: mounted(mnt), "the mount")
        assert (mnt / "f").read_bytes() == b"1"
        fusedev.unmount(str(mnt))
        runner.join(_WAIT)
        assert not runner.is_alive()
        assert destroyed.is_set()  # the session ended with Filesystem.destroy()
    finally:
        _take_down(mnt)
        runner.join(_WAIT)


def test_mount_refuses_what_it_sets_itself(tmp_path):
    with pytest.raises(ValueError):
        fusedev.mount(str(tmp_path), options="fd=0")
    with pytest.raises(ValueError):
        fusedev.mount(str(tmp_path), fsname="a,b")
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_bytes(b"")
        fusedev.mount(str(tmp_path / "file"))
    assert not mounted(tmp_path)


def test_session_refuses_buffers_smaller_than_the_writes_offered():
    from vhostfs.fuse.server import FuseServer

    with pytest.raises(ValueError):
        fusedev.FuseDevSession(FuseServer(_readonlyfs().ReadOnlyFS({}), max_write=1 << 20), -1,
                               max_write=1 << 16)


# -- a non-root user through fusermount3 -----------------------------------------------------------

# The test interpreter may live where other users cannot read (/root/.pyenv): the server starts as
# root, imports everything it needs, and only then becomes the user.
_AS_USER = """
import os, sys
import vhostfs.native
from vhostfs import mount_cli
uid = int(sys.argv[1])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
sys.exit(mount_cli.main(sys.argv[2:]))
"""


def _as_user(uid: int, work) -> None:
    """Runs `work()` in a child process with the credentials of `uid`; raises if it failed."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            work()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.stat("/dev/fuse").st_mode & 0o006 != 0o006,
                    reason="/dev/fuse is not read-writable by others, and fusermount3 opens it as the user")
def test_non_root_mount_through_fusermount3():
    if shutil.which("fusermount3") is None:
        skip_unless_ci("needs fusermount3 (Debian package fuse3)")
    nobody = 65534
    # tmp_path lies in a directory only root may enter; this one belongs to the user.
    base = Path(tempfile.mkdtemp(prefix="vhostfs-user-"))
    src, mnt = base / "src", base / "mnt"
    for d in (src, mnt):
        d.mkdir()
    for d in (base, src, mnt):
        os.chown(d, nobody, nobody)
    (src / "f").write_bytes(b"owned by nobody")
    os.chown(src / "f", nobody, nobody)
    log = base / "server.log"
    m = None
    try:
        # Without allow_other, root may not enter the mount: only the user can probe it.
        m = start([sys.executable, "-c", _AS_USER, str(nobody), "--shared-dir", str(src), str(mnt)], mnt, log,
                  probe=False)
        with open("/proc/self/mounts") as f:
            opts = next(ln for ln in f if ln.split()[1] == str(mnt)).split()[3].split(",")
        assert f"user_id={nobody}" in opts and "allow_other" not in opts

        def use() -> None:
            assert (mnt / "f").read_bytes() == b"owned by nobody"
            (mnt / "g").write_bytes(b"new")

        _as_user(nobody, use)
        assert (src / "g").read_bytes() == b"new" and os.stat(src / "g").st_uid == nobody
        m.proc.send_signal(signal.SIGTERM)  # unmounts with fusermount3 -u
        assert m.wait_exit() == 0, m.log_text()
        assert not mounted(mnt)
    finally:
        _take_down(mnt, m.proc if m is not None else None)
        shutil.rmtree(base, ignore_errors=True)
