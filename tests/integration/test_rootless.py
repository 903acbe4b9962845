"""The daemon started without root: its default sandbox is a user namespace (mapping the user as 0 and
its subordinate IDs from 1), under the default seccomp filter, driven by the project's front end; and
the start-up errors that say which option to change."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import rootless_user
from tests.rootless_user import HostUser
from vhostfs.fuse import abi
from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient, expect_errno

ROOT = abi.ROOT_ID


@pytest.fixture(scope="module")
def user() -> Iterator[HostUser]:
    with rootless_user.host_user() as made:
        yield made


@pytest.fixture
def place(user) -> Iterator[Path]:
    """A directory of the user's (in /tmp: pytest's own directories are closed to other users)."""
    path = Path(tempfile.mkdtemp(prefix="vhostfs-rootless-", dir="/tmp"))
    os.chown(path, user.uid, user.gid)
    (path / "share").mkdir()
    os.chown(path / "share", user.uid, user.gid)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _start(user: HostUser, place: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = place / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*rootless_user.daemon_command(user), "--socket-path", str(place / "s"),
                                 "--shared-dir", str(place / "share"), *args], cwd="/", stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, log


def _wait_socket(proc: subprocess.Popen, place: Path, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not (place / "s").exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_unprivileged_daemon_serves_in_a_user_namespace(user, place):
    proc, log = _start(user, place, "--xattr")
    try:
        _wait_socket(proc, place, log)
        with Frontend.connect(str(place / "s")) as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            (inner,) = _children(proc.pid)
            with open(f"/proc/{inner}/uid_map") as f:
                uid_map = [tuple(map(int, line.split())) for line in f]
            assert uid_map == [(0, user.uid, 1), (1, user.sub, 65536)]
            with open(f"/proc/{inner}/status") as f:
                status = dict(line.rstrip("\n").split(":\t", 1) for line in f)
            assert status["Seccomp"] == "2", "the default filter (--seccomp=kill)"
            assert status["Uid"].split()[0] == str(user.uid), "the daemon is the user, not the host's root"
            entry, (fh, _) = client.create(ROOT, b"by-guest-root")
            assert client.write(entry[0], fh, 0, b"rootless") == 8
            client.release(entry[0], fh)
            # Guest uid 7 is namespace uid 7, the user's subordinate uid sub + 6.
            body = abi.SETATTR_IN.pack(abi.FATTR_UID | abi.FATTR_GID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 8)
            client.call(abi.FUSE_SETATTR, entry[0], body)
            # Guest uid 70000 has no host ID in the namespace.
            expect_errno(errno.EPERM, client.call, abi.FUSE_SETATTR, entry[0],
                         abi.SETATTR_IN.pack(abi.FATTR_UID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 70000, 0))
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    share = place / "share"
    assert (share / "by-guest-root").read_bytes() == b"rootless"
    st = (share / "by-guest-root").stat()
    assert (st.st_uid, st.st_gid) == (user.sub + 6, user.sub + 7)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert f"sandbox namespace (confined to {share}), user namespace uid 0-0 -> {user.uid}-{user.uid}" in text
    assert not (place / "s").exists(), "the outer process removes the socket"


@pytest.mark.parametrize("args, message", [
    (("--sandbox=chroot",), "--sandbox=chroot needs root (CAP_SYS_CHROOT): use --sandbox=namespace"),
    (("--uid-map=:0:1:65536:",), "newuidmap"),  # IDs the user does not own: newuidmap refuses
    (("--uid-map=:0:5:1", "--sandbox=none"), "they need --sandbox=namespace"),
    (("--gid-map=:0:x:1:",), "--gid-map: ':0:x:1:'"),
])
def test_unprivileged_start_errors_say_what_to_change(user, place, args, message):
    proc, log = _start(user, place, *args)
    assert proc.wait(60) != 0
    text = log.read_text()
    assert message in text, text
    assert "Traceback" not in text, text
    assert not (place / "s").exists()


def test_uid_map_as_root_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    result = subprocess.run([sys.executable, "-m", "vhostfs", "--socket-path", str(tmp_path / "s"),
                             "--shared-dir", str(tmp_path), "--uid-map=:0:100000:65536:"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "use --translate-uid" in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()


def test_own_ids_only_mapping_needs_no_helper(user, place):
    """virtiofsd's README example: only the user's own IDs, as 0; written without newuidmap (setgroups
    is then denied, and the daemon keeps the groups it has)."""
    proc, log = _start(user, place, f"--uid-map=:0:{user.uid}:1:", f"--gid-map=:0:{user.gid}:1:")
    try:
        _wait_socket(proc, place, log)
        with Frontend.connect(str(place / "s")) as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            (inner,) = _children(proc.pid)
            with open(f"/proc/{inner}/setgroups") as f:
                assert f.read().strip() == "deny"
            entry, (fh, _) = client.create(ROOT, b"mine")
            client.release(entry[0], fh)
            assert entry[17:19] == (0, 0), "the guest sees the user as root (fuse_attr uid, gid)"
            # Guest user 1000 has no ID in this namespace: creating as it is refused.
            expect_errno(errno.EPERM, FuseClient(fe, uid=1000, gid=1000).create, ROOT, b"theirs")
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    st = (place / "share" / "mine").stat()
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    assert not (place / "share" / "theirs").exists()
    assert "Traceback" not in log.read_text()
