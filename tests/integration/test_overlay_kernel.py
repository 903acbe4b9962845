"""vhostfs's overlay against the kernel's overlayfs, as root on the host.

From identical starting layers (tests/integration/overlay_reference.py), the same scripted sequence of
operations runs on a kernel overlayfs mount and on `vhostfs mount --overlay-lower` (over /dev/fuse), or
on the overlay mounted in a Vfs (`vhostfs mount --mount /ovl=UPPER:lowerdir=...`), with the markers in
trusted.overlay.* or (userxattr) user.overlay.*.
Then (a) the two merged views, (b) the two upper directories, whiteouts and opaque markers included,
and (c) the kernel's overlayfs mounting the upper that vhostfs wrote must all agree.

Everything lives on a tmpfs the test mounts: an overlay upper needs a file system with trusted.*
extended attributes, RENAME_WHITEOUT and O_TMPFILE, which the directory the tests run in may lack.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.overlay_reference import differences, make_layers, run_script, snapshot

REPO = Path(__file__).resolve().parents[2]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (overlay and tmpfs mounts, trusted.* attributes)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the host kernel has no overlayfs"
    return None


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    top = tmp_path / "tmpfs"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(top)], check=True)
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)


def kernel_mount(upper: Path, lowers: list[Path], work: Path, mnt: Path, *extra: str) -> None:
    work.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join([opts, *extra]), str(mnt)],
                   check=True)


class VhostfsMount:
    """`vhostfs mount` of an overlay, in a subprocess, until `close`; with `vfs_path`, as the mount at
    that path of a Vfs (`--mount PATH=UPPER:lowerdir=...`)."""

    def __init__(self, upper: Path, lowers: list[Path], mnt: Path, *extra: str, vfs_path: str | None = None,
                 userxattr: bool = False) -> None:
        mnt.mkdir(exist_ok=True)
        self.mnt = mnt
        argv = [sys.executable, "-m", "vhostfs", "mount", "--xattr", *extra]
        if vfs_path is None:
            argv += ["--shared-dir", str(upper), *(["--overlay-userxattr"] if userxattr else [])]
            for lower in lowers:
                argv += ["--overlay-lower", str(lower)]
        else:
            options = "userxattr:" if userxattr else ""
            argv += ["--mount", f"{vfs_path}={upper}:{options}lowerdir={':'.join(map(str, lowers))}"]
        self.proc = subprocess.Popen([*argv, str(mnt)], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"vhostfs mount did not mount: {self.output}")
            time.sleep(0.05)

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=False)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output = out.decode(errors="replace")
        assert "Traceback" not in self.output and "ERROR" not in self.output, self.output


@pytest.mark.parametrize("mode", ["trusted", "userxattr", "vfs", "vfs-userxattr"])
def test_same_tree_as_the_kernels_overlayfs(tmpfs: Path, mode: str) -> None:
    userxattr = mode.endswith("userxattr")
    vfs_path = "/ovl" if mode.startswith("vfs") else None
    prefix = b"user.overlay." if userxattr else b"trusted.overlay."
    kernel_opts = ("userxattr",) if userxattr else ()
    k_upper, k_lowers = make_layers(tmpfs / "k", prefix)
    v_upper, v_lowers = make_layers(tmpfs / "v", prefix)
    assert differences(snapshot(tmpfs / "k"), snapshot(tmpfs / "v")) == []

    k_mnt = tmpfs / "k" / "mnt"
    kernel_mount(k_upper, k_lowers, tmpfs / "k" / "work", k_mnt, *kernel_opts)
    try:
        assert differences(snapshot(k_mnt), snapshot(tmpfs / "k" / "l1")) != [], "the layers do not merge"
        k_results = run_script(k_mnt)
        k_view = snapshot(k_mnt)
    finally:
        subprocess.run(["umount", str(k_mnt)], check=True)

    v_mnt = tmpfs / "v" / "mnt"
    vhostfs = VhostfsMount(v_upper, v_lowers, v_mnt, vfs_path=vfs_path, userxattr=userxattr)
    merged = v_mnt / vfs_path.lstrip("/") if vfs_path else v_mnt
    try:
        v_results = run_script(merged)
        v_view = snapshot(merged)
    finally:
        vhostfs.close()

    # What the script saw: each operation's outcome (EXDEV, EPERM, ENOTEMPTY...) and what it checked.
    assert v_results == k_results
    # (a) the merged views.
    assert differences(v_view, k_view) == []
    # (b) the upper directories, entry by entry, whiteouts and opaque markers included.
    assert differences(snapshot(v_upper, upper=True), snapshot(k_upper, upper=True)) == []
    # (c) the kernel mounting the upper that vhostfs wrote shows the same tree.
    c_mnt = tmpfs / "v" / "kmnt"
    kernel_mount(v_upper, v_lowers, tmpfs / "v" / "work", c_mnt, *kernel_opts)
    try:
        assert differences(snapshot(c_mnt), k_view) == []
    finally:
        subprocess.run(["umount", str(c_mnt)], check=True)
