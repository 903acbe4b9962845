"""The overlay (--overlay-lower) served over virtio-fs to a real guest, against the host kernel's
overlayfs: one boot.

The same shell script of operations runs in the guest on the overlay vhostfs serves, and on the host on
a kernel overlayfs mount of an identical copy of the layers. Then what each step did, the two upper
directories (whiteouts and opaque markers included) and the kernel's view of the upper the guest
wrote must agree. The daemon runs with --sandbox namespace --seccomp kill, the lower layers outside
the shared directory.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration.overlay_reference import differences, make_layers, snapshot

from .guest import boot_guest, daemon_command, running_in_ci

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

#: The operations, for busybox's sh in the guest and the host's sh alike; $M is the merged view. The
#: umask is set: the host's sh would inherit whatever this process has.
SCRIPT = r"""
umask 022
r() { key=$1; shift; if "$@" >/dev/null 2>&1; then echo "OVL $key ok"; else echo "OVL $key fail"; fi; }
command -v setfattr >/dev/null && echo "OVL have-setfattr"
r create sh -c "echo hello > $M/new.txt"
r append sh -c "echo appended >> $M/file"
r truncate truncate -s 3 $M/trunc
r chmod chmod 4750 $M/modes
r chmod-dir chmod 700 $M/d1
r chown chown 4321:8765 $M/owned
r lchown chown -h 1234:5678 $M/lsym
r setxattr setfattr -n user.new -v newvalue $M/xf
r removexattr setfattr -x user.old $M/xf
r unlink rm $M/gone
r unlink-in-dir rm $M/d1/inner
r unlink-copied-up rm $M/trunc
r rmdir-non-empty rmdir $M/rmd
r unlink-a rm $M/rmd/a
r rmdir rmdir $M/rmd
r mkdir-over-whiteout mkdir $M/rmd
r file-in-rmd sh -c "echo b > $M/rmd/b"
r rm-file rm $M/tofdir
r dir-for-file mkdir $M/tofdir
r mv mv $M/mvsrc $M/mvdst
r mv-over mv $M/mvover $M/victim
r mv-into-dir mv $M/new.txt $M/merged/new.txt
r mv-lower-dir mv $M/ldir $M/ldir2
r mkdir mkdir $M/newdir
r file-in-newdir sh -c "echo n > $M/newdir/f"
r mv-new-dir mv $M/newdir $M/d1/newdir
r link ln $M/hl_a $M/hl_b
r write-link sh -c "echo via-hl_b >> $M/hl_b"
r write-lower-link sh -c "echo via-pre1 >> $M/pre1"
r symlink ln -s file $M/sl
r mkfifo mkfifo $M/fifo
r mknod-whiteout mknod $M/forged c 0 0
r set-opaque setfattr -n trusted.overlay.opaque -v y $M/d2
as_user() { $SETPRIV --reuid 1234 --regid 5678 --clear-groups "$@"; }
r user-append as_user sh -c "echo by-user >> $M/userfile"
r user-create as_user sh -c "echo u > $M/d1/byuser"
r user-mkdir as_user mkdir $M/d1/userdir
r user-denied as_user sh -c "echo no >> $M/file"
echo "OVL d2 $(ls $M/d2)"
echo "OVL hl_a $(cat $M/hl_a | tr '\n' ' ')"
echo "OVL pre2 $(cat $M/pre2 | tr '\n' ' ')"
echo "OVL hidden $(ls $M/opq) $(ls $M | grep -c '^hidden$')"
sync
"""


def _steps(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.startswith("OVL ")]


def test_guest_overlay_matches_the_kernels(guest_images, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        message = "the kernel overlay on the host, whiteouts and the sandbox need root"
        if running_in_ci():
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
    top = tmp_path / "tmpfs"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(top)], check=True)
    try:
        k_upper, k_lowers = make_layers(top / "k")
        v_upper, v_lowers = make_layers(top / "v")
        options = ["--sandbox", "namespace", "--seccomp", "kill", "--xattr"]
        for lower in v_lowers:
            options += ["--overlay-lower", str(lower)]
        # busybox's setpriv has no --reuid: the guest has util-linux's as /bin/setpriv.
        result = boot_guest("M=/mnt SETPRIV=/bin/setpriv\n" + SCRIPT, v_upper, [*daemon_command(), *options],
                            timeout=900)
        assert result.mounted and result.exit_status == 0, result.describe()
        guest_steps = _steps(result.console_output)
        assert "OVL have-setfattr" in guest_steps, "the guest has no setfattr (package attr)"

        # The guest user must reach the mount point, which pytest's private directory would hide.
        k_mnt = Path(tempfile.mkdtemp(prefix="vhostfs-overlay-"))
        k_mnt.chmod(0o755)
        _kernel_mount(k_upper, k_lowers, top / "k" / "work", k_mnt)
        try:
            host = subprocess.run(["sh", "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "M": str(k_mnt), "SETPRIV": "setpriv"})
            k_view = snapshot(k_mnt)
        finally:
            subprocess.run(["umount", str(k_mnt)], check=True)
            k_mnt.rmdir()
        assert guest_steps == _steps(host.stdout), result.describe()
        assert "OVL mknod-whiteout fail" in guest_steps
        assert differences(snapshot(v_upper, upper=True), snapshot(k_upper, upper=True)) == []
        c_mnt = top / "v" / "kmnt"
        _kernel_mount(v_upper, v_lowers, top / "v" / "work", c_mnt)
        try:
            assert differences(snapshot(c_mnt), k_view) == []
        finally:
            subprocess.run(["umount", str(c_mnt)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)


def _kernel_mount(upper: Path, lowers: list[Path], work: Path, mnt: Path) -> None:
    work.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
