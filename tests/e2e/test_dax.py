"""DAX in a real guest: QEMU 11.1's shared memory regions (the "forky" stack: QEMU 11.1, Linux 7.2).

The guest's virtiofs driver maps host files into the window QEMU reserves for vhostfs and reads and
writes them there, with no FUSE READ or WRITE. Each boot runs a whole workload and the tests below
check its parts, as test_guest.py does: one boot with dax=always (and a reboot after unmounting),
one with dax=inode and the per-file attribute, one that reboots with mappings live. The daemon runs
with --sandbox namespace --seccomp kill, as virtiofsd's defaults, and records its vhost-user
session, which shows the window's mappings from the outside.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from vhostfs.vhost_user import messages as m

from .conftest import _images
from .guest import DEFAULT_DAEMON, GuestResult, boot_guest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

STACK = "forky"
#: Small enough that the reclaim workload maps more than it holds, in 2 MiB ranges (FUSE_DAX_SZ).
WINDOW = "32M"
WINDOW_BYTES = 32 << 20
SMALL = b"written on the host, 40 bytes long....\n"
#: Files that together map more than the window holds: the guest must reclaim ranges to read them.
RECLAIM_FILES = 3
RECLAIM_SIZE = 16 << 20
#: A file whose size is not a multiple of the page size: its last page reaches the guest as a copy.
RAGGED_SIZE = 3_000_001
MAPPED_SIZE = 16384
TRUNCATED = "truncated.bin"
#: <linux/fs.h>: the inode flags ioctl and chattr's +x (the file wants DAX).
FS_IOC_GETFLAGS = 0x80086601
FS_DAX_FL = 0x02000000


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _daemon(record: Path) -> list[str]:
    return [*DEFAULT_DAEMON, "--sandbox", "namespace", "--seccomp", "kill", "--record-vhost-user",
            str(record)]


@pytest.fixture(scope="module")
def forky() -> str:
    _images(STACK)
    return STACK


def _check_lines(result: GuestResult) -> dict[str, str]:
    """The guest's CHECK <name> <verdict...> lines, by name."""
    checks = {}
    for line in result.lines_starting("CHECK "):
        name, _, verdict = line.partition(" ")
        checks[name] = verdict
    return checks


def _backend_requests(record: Path, name: str) -> list[str]:
    return [line for line in record.read_text().splitlines() if line.startswith(f"back=>front {name} ")]


# -- dax=always ------------------------------------------------------------------------------------
ALWAYS = r"""
set -u
check() {{ if eval "$2" >/dev/null 2>&1; then echo "CHECK $1 ok"; else echo "CHECK $1 FAIL"; fi; }}
if [ -f second-boot ]; then
    echo "BOOT 2"
    check remount "grep -q 'dax=always' /proc/mounts"
    check reread_ragged "[ \"\$(md5sum ragged.bin | cut -d' ' -f1)\" = {ragged_md5} ]"
    check reread_guest_file "[ \"\$(md5sum guest-big.bin | cut -d' ' -f1)\" = \"\$(cat guest-big.md5)\" ]"
    rm second-boot
    exit 0
fi
echo "BOOT 1"
check mounted_dax "grep -q 'dax=always' /proc/mounts"
check window_found "dmesg | grep -q 'Cache len: 0x{window:x}'"
check small_host_file "[ \"\$(cat small.txt)\" = \"$(printf %s '{small}')\" ]"
check ragged_host_file "[ \"\$(md5sum ragged.bin | cut -d' ' -f1)\" = {ragged_md5} ]"
echo "guest line" > guest-small.txt
dd if=/dev/urandom of=guest-big.bin bs=1M count=6 2>/dev/null
md5sum guest-big.bin | cut -d' ' -f1 > guest-big.md5
check guest_big_reread "[ \"\$(md5sum guest-big.bin | cut -d' ' -f1)\" = \"\$(cat guest-big.md5)\" ]"
echo "appended by the guest" >> small.txt
check append_seen "tail -n 1 small.txt | grep -q 'appended by the guest'"
xfs_io -c "mmap -rw 0 {mapped}" -c "mwrite -S 0x5a 4096 100" -c "msync -s 0 {mapped}" -c munmap mapped.bin
check shared_mmap_write "[ \"\$(od -A n -t x1 -j 4096 -N 4 mapped.bin | tr -d ' ')\" = 5a5a5a5a ]"
check private_mmap "mmap-probe private private.bin"
check fio_verify "fio --name=v --filename=fio.bin --size=8M --bs=64k --rw=randwrite --ioengine=psync \
    --verify=crc32c --do_verify=1 --output=/dev/null"
check fio_mmap_verify "fio --name=m --filename=fio-mmap.bin --size=4M --bs=16k --rw=write --ioengine=mmap \
    --verify=md5 --do_verify=1 --output=/dev/null"
for i in $(seq 0 $(({reclaim_files} - 1))); do md5sum reclaim-$i.bin; done | sed 's/^/RECLAIM /'
for i in $(seq 0 $(({reclaim_files} - 1))); do md5sum reclaim-$i.bin; done | sed 's/^/RECLAIM2 /'
echo "SIGBUS $(mmap-probe sigbus {truncated} truncate-please truncate-done 2>&1 | tail -n 1)"
check after_sigbus "[ \"\$(cat small.txt | head -n 1)\" = \"$(printf %s '{small}')\" ]"
touch second-boot
cd /
sync
umount /mnt && echo "UNMOUNTED-FOR-REBOOT"
reboot -f
"""


def _truncate_on_request(root: Path, stop: threading.Event) -> None:
    """The host's part of the SIGBUS check: truncates the file the guest has mapped when it asks."""
    while not stop.is_set():
        if (root / "truncate-please").exists():
            os.truncate(root / TRUNCATED, 4096)
            (root / "truncate-done").write_text("")
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def always(forky: str, tmp_path_factory: pytest.TempPathFactory):
    """(result, share, record, host data) of the dax=always boot."""
    root = tmp_path_factory.mktemp("dax-always-share")
    rec = tmp_path_factory.mktemp("dax-always") / "session.txt"
    ragged = os.urandom(RAGGED_SIZE)
    reclaim = [os.urandom(RECLAIM_SIZE) for _ in range(RECLAIM_FILES)]
    (root / "small.txt").write_bytes(SMALL)
    (root / "ragged.bin").write_bytes(ragged)
    (root / "mapped.bin").write_bytes(bytes(MAPPED_SIZE))
    (root / "private.bin").write_bytes(b"S" * MAPPED_SIZE)
    (root / TRUNCATED).write_bytes(os.urandom(8 << 20))
    for i, data in enumerate(reclaim):
        (root / f"reclaim-{i}.bin").write_bytes(data)
    script = ALWAYS.format(window=WINDOW_BYTES, small=SMALL.decode().rstrip("\n"), ragged_md5=_md5(ragged),
                           mapped=MAPPED_SIZE, reclaim_files=RECLAIM_FILES, truncated=TRUNCATED)
    stop = threading.Event()
    helper = threading.Thread(target=_truncate_on_request, args=(root, stop), daemon=True)
    helper.start()
    try:
        result = boot_guest(script, root, _daemon(rec), stack=forky, dax_window_size=WINDOW, reboot=True,
                            timeout=1200)
    finally:
        stop.set()
        helper.join()
    return result, root, rec, {"reclaim": [_md5(d) for d in reclaim]}


ALWAYS_CHECKS = ["mounted_dax", "window_found", "small_host_file", "ragged_host_file", "guest_big_reread",
                 "append_seen", "shared_mmap_write", "fio_verify", "fio_mmap_verify"]


@pytest.mark.parametrize("check", ALWAYS_CHECKS)
def test_dax_always_workload(always, check):
    result, _, _, _ = always
    checks = _check_lines(result)
    assert checks.get(check) == "ok", result.describe()


def test_dax_always_maps_files_and_qemu_acknowledges_every_map(always):
    result, _, rec, _ = always
    maps = _backend_requests(rec, "SHMEM_MAP")
    assert maps and all(" flags=0x9 NEED_REPLY " in line for line in maps), result.describe()
    # Every map was acknowledged with status 0 (an empty payload in the record).
    replies = [line for line in rec.read_text().splitlines() if line.startswith("front=>back SHMEM_MAP ")]
    assert len(replies) == len(maps) and all(line.endswith("payload=") for line in replies)


def test_files_written_in_the_guest_are_on_the_host(always):
    result, root, _, _ = always
    assert (root / "guest-small.txt").read_bytes() == b"guest line\n"
    assert _md5((root / "guest-big.bin").read_bytes()) == (root / "guest-big.md5").read_text().strip()
    assert (root / "small.txt").read_bytes() == SMALL + b"appended by the guest\n"


def test_writes_through_a_shared_mapping_reach_the_host_file(always):
    result, root, _, _ = always
    data = (root / "mapped.bin").read_bytes()
    assert data[4096:4196] == b"\x5a" * 100 and data[:4096] == bytes(4096) and len(data) == MAPPED_SIZE


def test_a_private_mapping_keeps_its_writes(always):
    result, root, _, _ = always
    assert _check_lines(result).get("private_mmap") == "ok", result.describe()
    assert (root / "private.bin").read_bytes() == b"S" * MAPPED_SIZE


def test_more_than_the_window_holds_is_read_by_reclaiming(always):
    result, _, rec, host = always
    for prefix in ("RECLAIM ", "RECLAIM2 "):
        sums = [line.split()[0] for line in result.lines_starting(prefix)]
        assert sums == host["reclaim"], result.describe()
    # The guest could only read 96 MiB through a 32 MiB window by giving ranges back.
    assert len(_backend_requests(rec, "SHMEM_UNMAP")) >= (RECLAIM_FILES * RECLAIM_SIZE - WINDOW_BYTES) >> 21


def test_a_file_truncated_on_the_host_under_a_mapping_gives_sigbus(always):
    result, root, _, _ = always
    assert result.lines_starting("SIGBUS ") == ["SIGBUS"], result.describe()
    assert os.path.getsize(root / TRUNCATED) == 4096
    # The daemon went on serving: the guest read on, rebooted and mounted again.
    assert _check_lines(result).get("after_sigbus") == "ok", result.describe()


def test_the_guest_reboots_and_maps_again(always):
    result, root, _, _ = always
    assert "UNMOUNTED-FOR-REBOOT" in result.console_output, result.describe()
    assert result.lines_starting("BOOT ") == ["1", "2"], result.describe()
    checks = _check_lines(result)
    for check in ("remount", "reread_ragged", "reread_guest_file"):
        assert checks.get(check) == "ok", result.describe()
    assert result.exit_status == 0 and result.unmounted, result.describe()
    assert not (root / "second-boot").exists()


def test_the_daemon_logged_no_error(always):
    result, _, _, _ = always
    assert "Traceback" not in result.daemon_log and "[ERROR]" not in result.daemon_log, result.describe()


# -- dax=inode -------------------------------------------------------------------------------------
INODE = r"""
set -u
check() {{ if eval "$2" >/dev/null 2>&1; then echo "CHECK $1 ok"; else echo "CHECK $1 FAIL"; fi; }}
check mounted_inode "grep -q 'dax=inode' /proc/mounts"
check plain_read "[ \"\$(md5sum plain.bin | cut -d' ' -f1)\" = {plain_md5} ]"
echo "MAPS-AFTER-PLAIN"
check chattr_x "/bin/chattr +x flagged.bin"
check lsattr_x "/bin/lsattr flagged.bin | grep -q '^[^ ]*x'"
# The guest sees the attribute in the next getattr (past the 1 s attribute timeout), lets the inode
# go, and takes it anew from a lookup that says DAX.
sleep 2
stat flagged.bin >/dev/null
echo 2 > /proc/sys/vm/drop_caches
check flagged_read "[ \"\$(md5sum flagged.bin | cut -d' ' -f1)\" = {flagged_md5} ]"
xfs_io -c "mmap -rw 0 8192" -c "mwrite -S 0x77 0 16" -c "msync -s 0 8192" -c munmap flagged.bin
check flagged_mmap_write "[ \"\$(od -A n -t x1 -N 2 flagged.bin | tr -d ' ')\" = 7777 ]"
"""


@pytest.fixture(scope="module")
def inode(forky: str, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dax-inode-share")
    rec = tmp_path_factory.mktemp("dax-inode") / "session.txt"
    plain, flagged = os.urandom(3 << 20), os.urandom(5 << 20)
    (root / "plain.bin").write_bytes(plain)
    (root / "flagged.bin").write_bytes(flagged)
    script = INODE.format(plain_md5=_md5(plain), flagged_md5=_md5(flagged))
    result = boot_guest(script, root, _daemon(rec), stack=forky, dax_window_size=WINDOW,
                        mount_opts="dax=inode", timeout=900)
    return result, root, rec


@pytest.mark.parametrize("check", ["mounted_inode", "plain_read", "chattr_x", "lsattr_x", "flagged_read",
                                   "flagged_mmap_write"])
def test_dax_inode_workload(inode, check):
    result, _, _ = inode
    assert _check_lines(result).get(check) == "ok", result.describe()


def test_dax_inode_maps_only_the_flagged_file(inode):
    result, root, rec = inode
    assert result.exit_status == 0, result.describe()
    # Only the flagged file was mapped: its 5 MiB are the ranges (file offset, length) below, the
    # plain file's 3 MiB would have been (0, 2 MiB) and (2 MiB, 1 MiB).
    maps = {m.MMAP_REQUEST.unpack(bytes.fromhex(line.rpartition("payload=")[2]).ljust(40, b"\0"))[1:4:2]
            for line in _backend_requests(rec, "SHMEM_MAP")}
    assert maps and maps <= {(0, 2 << 20), (2 << 20, 2 << 20), (4 << 20, 1 << 20)}, result.describe()
    # The flag is the host file's own (FS_DAX_FL, as chattr +x sets it on ext4 or XFS).
    with open(root / "flagged.bin", "rb") as f:
        flags = array.array("l", [0])
        fcntl.ioctl(f.fileno(), FS_IOC_GETFLAGS, flags)
    assert flags[0] & FS_DAX_FL
    assert (root / "flagged.bin").read_bytes()[:16] == b"\x77" * 16


# -- reboot with mappings live ---------------------------------------------------------------------
LIVE_REBOOT = r"""
if [ -f second-boot ]; then
    echo "BOOT 2 $(md5sum live.bin | cut -d' ' -f1)"
    rm second-boot
    exit 0
fi
echo "BOOT 1 $(md5sum live.bin | cut -d' ' -f1)"
touch second-boot
sync
reboot -f
"""


def test_the_guest_reboots_with_mappings_live(forky, tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    data = os.urandom(4 << 20)
    (root / "live.bin").write_bytes(data)
    result = boot_guest(LIVE_REBOOT, root, _daemon(tmp_path / "session.txt"), stack=forky,
                        dax_window_size=WINDOW, reboot=True, timeout=600)
    if "[qemu exited with status -11]" in result.console_output and result.lines_starting("BOOT ") == [
            f"1 {_md5(data)}"]:
        # QEMU 11.1.2 (Debian 1:11.1.2+ds-3) dies of SIGSEGV in a vCPU thread when the guest resets
        # the device with shared memory mappings live (TCG; one mapping is enough). The daemon has no
        # part in it: nothing reaches it between the rings' stop and the crash.
        pytest.xfail("QEMU 11.1 segfaults resetting a device with live shared memory mappings")
    assert result.lines_starting("BOOT ") == [f"1 {_md5(data)}", f"2 {_md5(data)}"], result.describe()
