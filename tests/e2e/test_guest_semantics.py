"""File system semantics as a real guest kernel sees them through the daemon, checked on the host.

A few boots, each running a guest script that exercises many system calls with ordinary programs
(busybox, and from the host: xfs_io, util-linux's flock and setpriv, attr, acl, sqlite3; see
scripts/build-guest.sh) and prints one tagged line per check, "SEM KEY VALUE". The host then checks
the results, mostly on the host directory itself:

- the main boot (the daemon's default options): links, FIFOs, renames, truncation, preallocation and
  holes, copy_file_range, fsync, writes past 4 GiB, O_APPEND, nanosecond times, statfs; files of a guest
  user belong to that user on the host, set-group-ID directories, set-user-ID cleared by a write;
  flock(2) and POSIX locks between guest processes and against a host process; symlinks that point out
  of the share are resolved by the guest in its own namespace;
- --xattr --posix-acl: extended attributes, access and default ACLs;
- --readonly, --announce-submounts, --cache never and --cache always: what each changes for the guest.

While a script runs, it can ask the host to act at a precise point (take or release a lock, change a
file): it creates .steps/NAME.req in the share and waits for .steps/NAME.done (see HostSteps).
"""

import errno
import fcntl
import os
import sqlite3
import stat
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .guest import GuestImages, GuestResult, boot_guest, daemon_command, skip_unless_ci

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

#: The host programs the checks use in the guest, and their Debian packages.
GUEST_TOOLS = {
    "xfs_io": "xfsprogs",
    "flock": "util-linux",
    "setpriv": "util-linux",
    "sqlite3": "sqlite3",
    "getfattr": "attr",
    "setfattr": "attr",
    "getfacl": "acl",
    "setfacl": "acl",
}

USER = 1000  # the unprivileged guest user (setpriv --reuid/--regid)
OTHER_USER = 1001
SGID_GROUP = 2000  # the group of the set-group-ID directory; USER is not in it

# 2001-02-03 04:05:06 UTC, with nanoseconds that no coarser clock or conversion would keep.
MTIME_NS = 981173106_123456789
ATIME_NS = 981173100_111111111

# Everything a script starts with: the step helper, `run`, and the list of the programs it has.
GUEST_PRELUDE = r"""
set -u
cat >/tmp/step.sh <<'EOF'
# step.sh NAME: asks the host to do NAME and waits, for two minutes at most, until it has.
: >"/mnt/.steps/$1.req"
n=0
while [ ! -e "/mnt/.steps/$1.done" ]; do
    n=$((n + 1))
    if [ "$n" -gt 600 ]; then echo "SEM step-timeout $1"; exit 1; fi
    sleep 0.2
done
EOF
# run KEY CMD...: runs CMD and prints "SEM KEY rc=STATUS OUTPUT", its output and errors on one line.
run() {
    key=$1
    shift
    out=$("$@" 2>&1)
    rc=$?
    echo "SEM $key rc=$rc $(printf '%s' "$out" | tr '\n' ' ')"
}
have() { case " $tools " in *" $1 "*) return 0 ;; esac; return 1; }
# busybox's sh runs its own applets before anything on PATH, and its setpriv has no --reuid: util-linux's
# is called by its path (build-guest.sh puts the host's programs in /bin).
as_user() { id=$1; shift; /bin/setpriv --reuid "$id" --regid "$id" --clear-groups "$@"; }
tools=""
for tool in xfs_io flock sqlite3 getfattr setfattr getfacl setfacl; do
    command -v "$tool" >/dev/null && tools="$tools $tool"
done
/bin/setpriv --reuid 0 --regid 0 --clear-groups true 2>/dev/null && tools="$tools setpriv"
echo "SEM tools$tools"
"""


# -- reading the results ---------------------------------------------------------------------------
def _value(result: GuestResult, key: str) -> str:
    """The value of the one "SEM KEY VALUE" line (empty when the line has no value)."""
    values = [line.partition(" ")[2] for line in result.lines_starting("SEM ") if line.split(" ")[0] == key]
    assert len(values) == 1, f"expected one SEM {key} line, got {len(values)}\n{result.describe()}"
    return values[0].strip()


def _run(result: GuestResult, key: str) -> tuple[int, str]:
    """The exit status and output of the guest's `run KEY ...`."""
    rc, _, output = _value(result, key).partition(" ")
    assert rc.startswith("rc="), f"SEM {key} is not a run line\n{result.describe()}"
    return int(rc.removeprefix("rc=")), output.strip()


def _ok(result: GuestResult, key: str) -> str:
    """The output of `run KEY ...`, which must have succeeded."""
    rc, output = _run(result, key)
    assert rc == 0, f"{key} failed in the guest (status {rc}): {output}\n{result.describe()}"
    return output


def _need(result: GuestResult, *tools: str) -> None:
    """Skips (fails in CI, where build-guest.sh installs them) unless the guest has `tools`."""
    present = set(_value(result, "tools").split())
    missing = [f"{tool} (package {GUEST_TOOLS[tool]})" for tool in tools if tool not in present]
    if missing:
        message = (
            f"the guest has no {', '.join(missing)}: scripts/build-guest.sh copies them from the "
            "host, which lacks them"
        )
        skip_unless_ci(message)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        skip_unless_ci(f"{what} needs the tests to run as root (to give host files other owners)")


def _booted(result: GuestResult) -> None:
    assert result.mounted, result.describe()
    assert result.exit_status == 0, result.describe()
    assert result.unmounted, result.describe()
    assert not result.lines_starting("SEM step-timeout"), result.describe()


# -- the host's side of a running script ---------------------------------------------------------
class HostSteps:
    """Does host actions when a guest script asks for them, while the guest waits.

    The guest creates .steps/NAME.req in the share; a thread runs actions[NAME]() and then creates
    .steps/NAME.done, which the guest waits for. An action that raises is recorded in `errors` and
    still answered, so that the guest goes on.
    """

    def __init__(self, share: Path, actions: dict[str, Callable[[], None]]) -> None:
        self._dir = share / ".steps"
        self._dir.mkdir()
        self._actions = actions
        self.done: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "HostSteps":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _serve(self) -> None:
        while not self._stop.wait(0.05):
            for name, action in self._actions.items():
                if name in self.done or not (self._dir / f"{name}.req").exists():
                    continue
                try:
                    action()
                except Exception as exc:  # reported by the tests, which see self.errors
                    self.errors.append(f"{name}: {exc!r}")
                self.done.append(name)
                (self._dir / f"{name}.done").touch()


def _boot(
    script: str,
    share: Path,
    *options: str,
    actions: dict[str, Callable[[], None]] | None = None,
) -> tuple[GuestResult, HostSteps]:
    with HostSteps(share, actions or {}) as steps:
        result = boot_guest(GUEST_PRELUDE + script, share, [*daemon_command(), *options], timeout=600)
    return result, steps


def _try_lock(path: Path, lock: Callable[[int], None]) -> str:
    """'acquired' (and released again) or 'blocked': whether this host process can lock `path` now."""
    fd = os.open(path, os.O_RDWR)
    try:
        lock(fd)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return "blocked"
        raise
    finally:
        os.close(fd)  # also drops the lock, if it was taken
    return "acquired"


# -- the main boot: default options ----------------------------------------------------------------
MAIN_SCRIPT = r"""
cd /mnt/ops
run hardlink ln orig.txt hard.txt
echo "SEM nlink $(stat -c %h orig.txt)"
run symlink ln -s "some/target of the link" sym
echo "SEM readlink-guest $(readlink sym)"
echo "SEM readlink-host $(readlink host-link)"
run mkfifo mkfifo fifo
echo "SEM fifo-type $(stat -c %F fifo)"
# The guest serves a FIFO itself: data passes between two guest processes.
timeout 20 sh -c 'echo through-the-fifo >fifo' &
run fifo-read timeout 20 cat fifo
wait
run rename-over mv replacement.txt replaced.txt
mkdir moved
run rename-dir mv to-move.txt moved/moved.txt
run truncate-shrink truncate -s 100 shrink.bin
run truncate-grow truncate -s 1048576 grow.bin
run touch-d touch -d '2001-02-03 04:05:06' touched.txt
echo "SEM host-times $(stat -c '%y|%x' host-times.txt)"
echo "SEM statfs $(stat -f -c '%b %S %l' .)"
# O_APPEND: the host appends between two appends through one guest fd, whose idea of the size is then
# stale; the second append must still land at the end.
exec 3>>append.txt
echo g1 >&3
sh /tmp/step.sh append
echo g2 >&3
exec 3>&-
if have xfs_io; then
    run falloc xfs_io -f -c 'pwrite -q 0 64k' -c 'pwrite -q 1m 64k' -c 'falloc -k 2m 1m' sparse.bin
    echo "SEM seek-hole-0 $(xfs_io -c 'seek -h 0' sparse.bin | awk '$1 == "HOLE" { print $2 }')"
    echo "SEM seek-data-64k $(xfs_io -c 'seek -d 64k' sparse.bin | awk '$1 == "DATA" { print $2 }')"
    run copy-range xfs_io -f -c 'copy_range -s 4096 -d 0 -l 65536 src.bin' copy.bin
    run fsync xfs_io -f -c 'pwrite -q -S 0x33 0 8k' -c fsync -c fdatasync synced.bin
    run beyond-4g xfs_io -f -c 'pwrite -q -S 0x5a 5g 4k' beyond-4g.bin
    echo "SEM beyond-4g-size $(stat -c %s beyond-4g.bin)"
    : >guest-times.txt
    run utimes xfs_io -c 'utimes 981173100 111111111 981173106 123456789' guest-times.txt
fi

cd /mnt
if have setpriv; then
    echo "SEM umask $(umask)"
    run user-create as_user 1000 sh -c \
        'echo mine >owned/file && mkdir owned/dir && ln -s somewhere owned/link && mkfifo owned/fifo'
    run user-denied as_user 1000 sh -c 'echo intruder >>owned/root-file'
    run sgid-create as_user 1000 sh -c 'echo in-sgid >sgid/file && mkdir sgid/dir'
    run suid-user-write as_user 1000 sh -c 'echo appended >>suid-user.bin'
    run suid-root-write sh -c 'echo appended >>suid-root.bin'
    run suid-user-trunc as_user 1000 sh -c ': >suid-trunc.bin'
fi

if have flock; then
    # Two guest processes: the inner flock runs while the outer one holds the lock.
    run flock-pair flock locks/pair -c 'flock -n locks/pair true; echo "inner=$?"'
    run flock-pair-after flock -n locks/pair true
    # A host process holds host-flock until the step release-flock.
    run flock-host-held flock -n locks/host-flock true
    sh /tmp/step.sh release-flock
    run flock-host-released flock -n locks/host-flock true
    # The guest holds guest-flock while the host tries it.
    run flock-guest-held flock locks/guest-flock sh /tmp/step.sh flock-held
fi

if have sqlite3; then
    # sqlite3 locks its database with POSIX record locks (fcntl F_SETLK). A host process holds a write
    # lock on the whole file until the step release-posix.
    run posix-host-held sqlite3 locks/db.sqlite 'select count(*) from t'
    sh /tmp/step.sh release-posix
    run posix-host-released sqlite3 locks/db.sqlite 'select count(*) from t'
    # The guest holds an exclusive lock while another guest process, then the host, try the file.
    cat >/tmp/posix-held.sh <<'EOF'
sqlite3 /mnt/locks/db.sqlite 'select count(*) from t' >/tmp/posix-pair.out 2>&1
echo "rc=$? $(tr '\n' ' ' </tmp/posix-pair.out)" >/tmp/posix-pair.out
sh /tmp/step.sh posix-held
EOF
    run posix-guest-held sqlite3 locks/db.sqlite 'BEGIN EXCLUSIVE;' '.system sh /tmp/posix-held.sh' 'COMMIT;'
    echo "SEM posix-pair $(cat /tmp/posix-pair.out)"
fi

# Symlinks out of the share: the guest resolves them in its own namespace, where the same paths name
# the guest's own directories.
mkdir -p "$(readlink escape-abs)" /canary
run escape-read cat escape-abs/canary.txt
run escape-abs sh -c 'echo from-guest >escape-abs/canary.txt && cat escape-abs/canary.txt'
run escape-rel sh -c 'echo from-guest >escape-rel/new.txt && cat escape-rel/new.txt'
run escape-ls ls "$(readlink escape-abs)"
# Operations on a symlink itself, which the daemon must not turn into operations on its target.
run escape-link ln escape-file linked-escape
run escape-chown chown -h 1000:1000 escape-file
"""

CANARY = b"the canary, outside the share\n"


class MainBoot:
    """The host side of the main boot, kept for the tests: the share, the data and the host locks."""

    def __init__(self, root: Path) -> None:
        self.share = root / "share"
        self.canary = root / "canary"
        self.ops = self.share / "ops"
        self.src = os.urandom(128 * 1024)
        self.shrink = os.urandom(10000)
        self.lock_results: dict[str, str] = {}
        self._held: dict[str, int] = {}

    def prepare(self) -> None:
        share, ops = self.share, self.ops
        share.mkdir()
        share.chmod(0o755)  # the guest user must get in; mktemp made it 0700
        self.canary.mkdir()
        (self.canary / "canary.txt").write_bytes(CANARY)
        (share / "escape-abs").symlink_to(self.canary)
        (share / "escape-rel").symlink_to("../canary")
        (share / "escape-file").symlink_to(self.canary / "canary.txt")
        ops.mkdir()
        (ops / "orig.txt").write_text("original\n")
        (ops / "host-link").symlink_to("host/target")
        (ops / "replaced.txt").write_text("old\n")
        (ops / "replacement.txt").write_text("new\n")
        (ops / "to-move.txt").write_text("moving\n")
        (ops / "shrink.bin").write_bytes(self.shrink)
        (ops / "src.bin").write_bytes(self.src)
        (ops / "append.txt").write_text("h0\n")
        (ops / "host-times.txt").write_text("times\n")
        os.utime(ops / "host-times.txt", ns=(ATIME_NS, MTIME_NS))
        owned = share / "owned"
        owned.mkdir()
        owned.chmod(0o777)
        (owned / "root-file").write_text("root's\n")
        (owned / "root-file").chmod(0o644)
        if os.geteuid() == 0:
            sgid = share / "sgid"
            sgid.mkdir()
            os.chown(sgid, 0, SGID_GROUP)
            sgid.chmod(0o2777)
            for name, mode in (
                ("suid-user.bin", 0o6777),
                ("suid-root.bin", 0o4755),
                ("suid-trunc.bin", 0o6777),
            ):
                (share / name).write_text("original\n")
                os.chown(share / name, 0, 0)
                (share / name).chmod(mode)
        locks = share / "locks"
        locks.mkdir()
        for name in ("pair", "host-flock", "guest-flock"):
            (locks / name).touch()
        db = sqlite3.connect(locks / "db.sqlite")
        with db:
            db.execute("CREATE TABLE t (x)")
            db.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (3,)])
        db.close()

    def hold_locks(self) -> None:
        """Takes the host's locks that the guest meets first (a flock, and a POSIX write lock)."""
        self._held["flock"] = fd = os.open(self.share / "locks" / "host-flock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._held["posix"] = fd = os.open(self.share / "locks" / "db.sqlite", os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)

    def release(self, kind: str) -> None:
        fd = self._held.pop(kind, None)
        if fd is not None:
            os.close(fd)  # drops the flock of this description, or this process's POSIX locks on the file

    def actions(self) -> dict[str, Callable[[], None]]:
        locks = self.share / "locks"

        def append() -> None:
            with open(self.ops / "append.txt", "a") as f:
                f.write("h1\n")

        def flock_held() -> None:
            self.lock_results["flock"] = _try_lock(
                locks / "guest-flock", lambda fd: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            )

        def posix_held() -> None:
            self.lock_results["posix"] = _try_lock(
                locks / "db.sqlite", lambda fd: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            )

        return {
            "append": append,
            "release-flock": lambda: self.release("flock"),
            "release-posix": lambda: self.release("posix"),
            "flock-held": flock_held,
            "posix-held": posix_held,
        }


@pytest.fixture(scope="module")
def main_boot(
    guest_images: GuestImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[GuestResult, MainBoot]:
    host = MainBoot(tmp_path_factory.mktemp("semantics"))
    host.prepare()
    host.hold_locks()
    try:
        result, steps = _boot(MAIN_SCRIPT, host.share, actions=host.actions())
    finally:
        host.release("flock")
        host.release("posix")
    _booted(result)
    assert not steps.errors, f"host steps failed: {steps.errors}\n{result.describe()}"
    return result, host


def test_hard_link(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _ok(result, "hardlink")
    orig, hard = (host.ops / "orig.txt").stat(), (host.ops / "hard.txt").stat()
    assert (orig.st_ino, orig.st_nlink) == (hard.st_ino, 2)
    assert _value(result, "nlink") == "2"
    assert (host.ops / "hard.txt").read_text() == "original\n"


def test_symlinks(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _ok(result, "symlink")
    assert os.readlink(host.ops / "sym") == "some/target of the link"
    assert _value(result, "readlink-guest") == "some/target of the link"
    assert _value(result, "readlink-host") == "host/target"


def test_fifo(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _ok(result, "mkfifo")
    assert stat.S_ISFIFO((host.ops / "fifo").lstat().st_mode)
    assert _value(result, "fifo-type") == "fifo"
    assert _ok(result, "fifo-read") == "through-the-fifo"


def test_renames(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _ok(result, "rename-over")
    _ok(result, "rename-dir")
    assert not (host.ops / "replacement.txt").exists()
    assert (host.ops / "replaced.txt").read_text() == "new\n"
    assert not (host.ops / "to-move.txt").exists()
    assert (host.ops / "moved" / "moved.txt").read_text() == "moving\n"


def test_truncate(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _ok(result, "truncate-shrink")
    _ok(result, "truncate-grow")
    assert (host.ops / "shrink.bin").read_bytes() == host.shrink[:100]
    grown = host.ops / "grow.bin"
    assert grown.stat().st_size == 1 << 20
    assert grown.read_bytes() == bytes(1 << 20)


def test_append_lands_at_the_end(main_boot: tuple[GuestResult, MainBoot]) -> None:
    _, host = main_boot
    assert (host.ops / "append.txt").read_text() == "h0\ng1\nh1\ng2\n"


def test_timestamps(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _ok(result, "touch-d")
    assert (host.ops / "touched.txt").stat().st_mtime_ns == MTIME_NS // 10**9 * 10**9

    def shown(ns: int) -> str:  # busybox stat's %y and %x, in the guest's UTC
        seconds, fraction = divmod(ns, 10**9)
        return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%d %H:%M:%S}.{fraction:09d} +0000"

    assert _value(result, "host-times") == f"{shown(MTIME_NS)}|{shown(ATIME_NS)}"
    _need(result, "xfs_io")
    _ok(result, "utimes")
    st = (host.ops / "guest-times.txt").stat()
    assert (st.st_mtime_ns, st.st_atime_ns) == (MTIME_NS, ATIME_NS)


def test_statfs(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    blocks, block_size, namemax = map(int, _value(result, "statfs").split())
    vfs = os.statvfs(host.share)
    assert blocks * block_size == vfs.f_blocks * vfs.f_frsize
    assert namemax == vfs.f_namemax


def test_fallocate_and_holes(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need(result, "xfs_io")
    _ok(result, "falloc")
    sparse = host.ops / "sparse.bin"
    st = sparse.stat()
    # Data at [0, 64K) and [1M, 1M + 64K); 1M preallocated past the end (falloc -k keeps the size).
    assert st.st_size == (1 << 20) + (64 << 10)
    assert st.st_blocks * 512 >= (64 << 10) * 2 + (1 << 20)
    fd = os.open(sparse, os.O_RDONLY)
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        data = os.lseek(fd, 64 << 10, os.SEEK_DATA)
    finally:
        os.close(fd)
    if hole == st.st_size:
        skip_unless_ci(f"the host file system of {host.share} reports no holes (SEEK_HOLE)")
    # The guest's SEEK_HOLE/SEEK_DATA are answered by the host's.
    assert int(_value(result, "seek-hole-0")) == hole
    assert int(_value(result, "seek-data-64k")) == data == 1 << 20


def test_copy_file_range(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need(result, "xfs_io")
    _ok(result, "copy-range")
    assert (host.ops / "copy.bin").read_bytes() == host.src[4096 : 4096 + 65536]


def test_fsync(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need(result, "xfs_io")
    assert _ok(result, "fsync") == ""
    assert (host.ops / "synced.bin").read_bytes() == b"\x33" * 8192


def test_write_beyond_4g_is_sparse(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need(result, "xfs_io")
    _ok(result, "beyond-4g")
    path = host.ops / "beyond-4g.bin"
    st = path.stat()
    assert st.st_size == (5 << 30) + 4096
    assert int(_value(result, "beyond-4g-size")) == st.st_size
    assert st.st_blocks * 512 < 1 << 20, "the 5 GiB before the data should be a hole"
    with open(path, "rb") as f:
        f.seek(5 << 30)
        assert f.read() == b"\x5a" * 4096


def test_guest_user_owns_what_it_creates(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need_root("checking the owner of a guest user's files")
    _need(result, "setpriv")
    _ok(result, "user-create")
    owned = host.share / "owned"
    for name in ("file", "dir", "link", "fifo"):
        st = (owned / name).lstat()
        assert (st.st_uid, st.st_gid) == (USER, USER), name
    umask = int(_value(result, "umask"), 8)
    assert stat.S_IMODE((owned / "file").stat().st_mode) == 0o666 & ~umask
    assert (owned / "file").read_text() == "mine\n"


def test_guest_user_cannot_write_root_file(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need(result, "setpriv")
    rc, output = _run(result, "user-denied")
    assert rc != 0 and "Permission denied" in output, output
    assert (host.share / "owned" / "root-file").read_text() == "root's\n"


def test_setgid_directory_passes_its_group_on(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need_root("a set-group-ID directory of another group")
    _need(result, "setpriv")
    _ok(result, "sgid-create")
    sgid = host.share / "sgid"
    made_file, made_dir = (sgid / "file").stat(), (sgid / "dir").stat()
    assert (made_file.st_uid, made_file.st_gid) == (USER, SGID_GROUP)
    assert (made_dir.st_uid, made_dir.st_gid) == (USER, SGID_GROUP)
    assert made_dir.st_mode & stat.S_ISGID, "a directory made in a set-group-ID directory inherits the bit"


def test_write_by_non_owner_clears_setuid(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need_root("a set-user-ID file owned by root")
    _need(result, "setpriv")
    _ok(result, "suid-user-write")
    _ok(result, "suid-root-write")
    user_written = host.share / "suid-user.bin"
    assert user_written.read_text() == "original\nappended\n"
    # Set-user-ID goes, and set-group-ID too since the group may execute (as on a local file system).
    assert stat.S_IMODE(user_written.stat().st_mode) == 0o777
    # Root in the guest has CAP_FSETID: its write keeps the bit.
    assert stat.S_IMODE((host.share / "suid-root.bin").stat().st_mode) == 0o4755


def test_truncating_open_by_non_owner_clears_setuid(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need_root("a set-user-ID file owned by root")
    _need(result, "setpriv")
    _ok(result, "suid-user-trunc")
    truncated = host.share / "suid-trunc.bin"
    assert truncated.stat().st_size == 0
    # As on a local file system: truncation by a process without CAP_FSETID clears both bits.
    assert stat.S_IMODE(truncated.stat().st_mode) == 0o777


def test_flock_between_guest_processes(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, _ = main_boot
    _need(result, "flock")
    assert _ok(result, "flock-pair") == "inner=1", "flock -n on a lock another process holds must fail"
    _ok(result, "flock-pair-after")


def test_flock_between_guest_and_host(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need(result, "flock")
    rc, output = _run(result, "flock-host-held")
    assert rc == 1, f"the guest got a flock the host holds: status {rc} {output}"
    _ok(result, "flock-host-released")
    _ok(result, "flock-guest-held")
    assert host.lock_results.get("flock") == "blocked", "the host got a flock the guest holds"


def test_posix_locks_between_guest_and_host(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _need(result, "sqlite3")
    rc, output = _run(result, "posix-host-held")
    assert rc != 0 and "database is locked" in output, f"status {rc}: {output}"
    assert _ok(result, "posix-host-released") == "3"
    _ok(result, "posix-guest-held")
    assert host.lock_results.get("posix") == "blocked", "the host got a POSIX lock the guest holds"


def test_posix_locks_between_guest_processes(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, _ = main_boot
    _need(result, "sqlite3")
    rc, _, output = _value(result, "posix-pair").partition(" ")
    assert rc != "rc=0" and "database is locked" in output, f"{rc} {output}"


def test_symlinks_out_of_the_share_stay_in_the_guest(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    rc, output = _run(result, "escape-read")
    assert rc != 0 and CANARY.decode().strip() not in output, output
    # The writes succeed, in the guest's own directories of the same names.
    assert _ok(result, "escape-abs") == "from-guest"
    assert _ok(result, "escape-rel") == "from-guest"
    assert _ok(result, "escape-ls") == "canary.txt"
    assert sorted(p.name for p in host.canary.iterdir()) == ["canary.txt"]
    assert (host.canary / "canary.txt").read_bytes() == CANARY


def test_symlink_itself_is_linked_and_chowned(main_boot: tuple[GuestResult, MainBoot]) -> None:
    result, host = main_boot
    _ok(result, "escape-link")
    symlink = (host.share / "escape-file").lstat()
    linked = (host.share / "linked-escape").lstat()
    assert stat.S_ISLNK(linked.st_mode) and linked.st_ino == symlink.st_ino, "a hard link of the symlink"
    canary = (host.canary / "canary.txt").stat()
    assert canary.st_nlink == 1, "the guest hard-linked the file outside the share"
    _need_root("chown to a guest user")
    _ok(result, "escape-chown")
    assert (symlink.st_uid, symlink.st_gid) == (USER, USER)
    assert (canary.st_uid, canary.st_gid) == (0, 0)


# -- extended attributes and ACLs --------------------------------------------------------------------
XATTR_SCRIPT = r"""
cd /mnt
if have setfattr && have getfattr; then
    run setxattr setfattr -n user.color -v blue xattr/guest-set.txt
    run getxattr getfattr --only-values -n user.origin xattr/host-set.txt
    run listxattr getfattr --absolute-names -d xattr/guest-set.txt
    run removexattr setfattr -x user.doomed xattr/removed.txt
fi
if have setfacl && have getfacl && have setpriv; then
    run setfacl setfacl -m u:1000:rw acl/file
    run getfacl getfacl -cn acl/file
    run acl-user-write as_user 1000 sh -c 'echo by-1000 >>acl/file'
    run acl-other-write as_user 1001 sh -c 'echo by-1001 >>acl/file'
    run default-acl setfacl -d -m u:1000:rwx acl/inherit
    # A default ACL takes the place of the umask.
    run inherit-create sh -c 'umask 077 && echo new >acl/inherit/new.txt && mkdir acl/inherit/sub'
    run inherit-getfacl getfacl -cn acl/inherit/new.txt
    run plain-create sh -c 'umask 027 && echo new >acl/plain/new.txt'
    # The owner, outside the file's group, changes its ACL: set-group-ID goes, as on the host.
    run acl-kill-sgid as_user 1000 setfacl -m u:1001:r acl/sgid-file
fi
"""

# The Linux xattr format of system.posix_acl_access/_default (<linux/posix_acl_xattr.h>).
ACL_XATTR_HEADER = struct.Struct("<I")
ACL_XATTR_ENTRY = struct.Struct("<HHI")
assert ACL_XATTR_HEADER.size == 4 and ACL_XATTR_ENTRY.size == 8
ACL_XATTR_VERSION = 2
ACL_USER = 0x02
ACL_MASK = 0x10


def _acl_entries(path: Path, name: str = "system.posix_acl_access") -> set[tuple[int, int, int]]:
    """(tag, perm, id) of each entry of the ACL `name` of `path` on the host."""
    value = os.getxattr(path, name)
    (version,) = ACL_XATTR_HEADER.unpack_from(value)
    assert version == ACL_XATTR_VERSION
    return {
        ACL_XATTR_ENTRY.unpack_from(value, offset)
        for offset in range(ACL_XATTR_HEADER.size, len(value), ACL_XATTR_ENTRY.size)
    }


@pytest.fixture(scope="module")
def xattr_boot(
    guest_images: GuestImages, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GuestResult, Path]:
    share = tmp_path_factory.mktemp("xattr")
    share.chmod(0o755)
    xattr = share / "xattr"
    xattr.mkdir()
    for name in ("guest-set.txt", "host-set.txt", "removed.txt"):
        (xattr / name).write_text(f"{name}\n")
    try:
        os.setxattr(xattr / "host-set.txt", "user.origin", b"host")
        os.setxattr(xattr / "removed.txt", "user.doomed", b"x")
    except OSError as exc:
        skip_unless_ci(f"the host file system of {share} has no user extended attributes: {exc}")
    acl = share / "acl"
    acl.mkdir()
    (acl / "file").write_text("root's\n")
    (acl / "file").chmod(0o644)
    (acl / "inherit").mkdir()
    (acl / "plain").mkdir()
    (acl / "sgid-file").write_text("sgid\n")
    if os.geteuid() == 0:
        os.chown(acl / "sgid-file", USER, SGID_GROUP)
        (acl / "sgid-file").chmod(0o2775)
    result, _ = _boot(XATTR_SCRIPT, share, "--xattr", "--posix-acl")
    _booted(result)
    return result, share


def test_user_xattrs(xattr_boot: tuple[GuestResult, Path]) -> None:
    result, share = xattr_boot
    _need(result, "getfattr", "setfattr")
    _ok(result, "setxattr")
    assert os.getxattr(share / "xattr" / "guest-set.txt", "user.color") == b"blue"
    assert _ok(result, "getxattr") == "host"
    assert 'user.color="blue"' in _ok(result, "listxattr")
    _ok(result, "removexattr")
    assert "user.doomed" not in os.listxattr(share / "xattr" / "removed.txt")


def test_access_acl(xattr_boot: tuple[GuestResult, Path]) -> None:
    result, share = xattr_boot
    _need(result, "setfacl", "getfacl", "setpriv")
    _ok(result, "setfacl")
    path = share / "acl" / "file"
    assert (ACL_USER, 6, USER) in _acl_entries(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664, "the group bits show the ACL mask"
    assert "user:1000:rw-" in _ok(result, "getfacl").split()
    # The guest kernel enforces the ACL: 1000 may write, 1001 (only "other") may not.
    _ok(result, "acl-user-write")
    rc, output = _run(result, "acl-other-write")
    assert rc != 0 and "Permission denied" in output, output
    assert path.read_text() == "root's\nby-1000\n"


def test_default_acl_is_inherited(xattr_boot: tuple[GuestResult, Path]) -> None:
    result, share = xattr_boot
    _need(result, "setfacl", "getfacl", "setpriv")
    _ok(result, "default-acl")
    inherit = share / "acl" / "inherit"
    assert (ACL_USER, 7, USER) in _acl_entries(inherit, "system.posix_acl_default")
    _ok(result, "inherit-create")
    new = inherit / "new.txt"
    entries = _acl_entries(new)
    assert (ACL_USER, 7, USER) in entries and (ACL_MASK, 6, 0xFFFFFFFF) in entries, entries
    # Mode 0666 through the ACL, not the umask 077: the group bits are the mask, rw-.
    assert stat.S_IMODE(new.stat().st_mode) == 0o664
    shown = _ok(result, "inherit-getfacl")
    assert "user:1000:rwx" in shown and "#effective:rw-" in shown, shown
    assert (ACL_USER, 7, USER) in _acl_entries(inherit / "sub", "system.posix_acl_default")


def test_umask_without_default_acl(xattr_boot: tuple[GuestResult, Path]) -> None:
    result, share = xattr_boot
    _need(result, "setfacl", "getfacl", "setpriv")
    _ok(result, "plain-create")
    assert stat.S_IMODE((share / "acl" / "plain" / "new.txt").stat().st_mode) == 0o640


def test_acl_change_clears_setgid(xattr_boot: tuple[GuestResult, Path]) -> None:
    result, share = xattr_boot
    _need_root("a file of another group")
    _need(result, "setfacl", "getfacl", "setpriv")
    _ok(result, "acl-kill-sgid")
    path = share / "acl" / "sgid-file"
    assert (ACL_USER, 4, OTHER_USER) in _acl_entries(path)
    assert not path.stat().st_mode & stat.S_ISGID


# -- options -------------------------------------------------------------------------------------------
READONLY_SCRIPT = r"""
cd /mnt
run ro-read cat kept.txt
run ro-create sh -c 'echo new >new.txt'
run ro-append sh -c 'echo more >>kept.txt'
run ro-truncate truncate -s 0 kept.txt
run ro-remove rm kept.txt
run ro-mkdir mkdir newdir
run ro-touch touch kept.txt
run ro-chmod chmod 600 kept.txt
run ro-rename mv kept.txt renamed.txt
"""


def test_readonly(guest_images: GuestImages, tmp_path: Path) -> None:
    kept = tmp_path / "kept.txt"
    kept.write_text("unchanged\n")
    kept.chmod(0o644)
    before = kept.stat()
    result, _ = _boot(READONLY_SCRIPT, tmp_path, "--readonly")
    _booted(result)
    assert _ok(result, "ro-read") == "unchanged"
    for key in ("create", "append", "truncate", "remove", "mkdir", "touch", "chmod", "rename"):
        rc, output = _run(result, f"ro-{key}")
        assert rc != 0 and "Read-only file system" in output, f"{key}: status {rc} {output}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".steps", "kept.txt"]
    after = kept.stat()
    assert kept.read_text() == "unchanged\n"
    assert (after.st_mode, after.st_mtime_ns, after.st_ino) == (
        before.st_mode,
        before.st_mtime_ns,
        before.st_ino,
    )


SUBMOUNT_SCRIPT = r"""
cd /mnt
# stat(2) does not trigger an automount, a walk into the directory does (as `ls sub` would).
run sub-read cat sub/on-tmpfs.txt
echo "SEM dev-share $(stat -c %d .)"
echo "SEM dev-sub $(stat -c %d sub)"
run sub-write sh -c 'echo from-guest >sub/from-guest.txt'
echo "SEM sub-mounts $(grep -c ' /mnt/sub ' /proc/mounts)"
"""


@pytest.fixture
def tmpfs_in_share(tmp_path: Path) -> Iterator[Path]:
    """tmp_path with a tmpfs mounted on tmp_path/sub (skips unless the tests may mount)."""
    if os.geteuid() != 0:
        skip_unless_ci("mounting a tmpfs inside the share needs root")
    sub = tmp_path / "sub"
    sub.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "vhostfs-e2e", str(sub)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        skip_unless_ci(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield tmp_path
    finally:
        if subprocess.run(["umount", str(sub)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(sub)], check=True)


def test_announce_submounts(guest_images: GuestImages, tmpfs_in_share: Path) -> None:
    share = tmpfs_in_share
    (share / "sub" / "on-tmpfs.txt").write_text("on the tmpfs\n")
    result, _ = _boot(SUBMOUNT_SCRIPT, share, "--announce-submounts")
    _booted(result)
    assert _value(result, "dev-share") != _value(result, "dev-sub"), "the submount has its own st_dev"
    assert _value(result, "sub-mounts") == "1", "the guest lists the submount in /proc/mounts"
    assert _ok(result, "sub-read") == "on the tmpfs"
    _ok(result, "sub-write")
    assert (share / "sub" / "from-guest.txt").read_text() == "from-guest\n"


CACHE_SCRIPT = r"""
cd /mnt
if have setpriv; then
    run suid-user-write as_user 1000 sh -c 'echo appended >>suid.bin'
fi
run read-before cat data.txt
run stat-before stat -c %s gone.txt
sh /tmp/step.sh change
run read-after cat data.txt
run stat-gone stat -c %s gone.txt
run read-appeared cat appeared.txt
sync
echo 3 >/proc/sys/vm/drop_caches
run read-dropped cat data.txt
"""


def _cache_boot(share: Path, policy: str) -> GuestResult:
    share.chmod(0o755)
    (share / "data.txt").write_text("one\n")
    (share / "suid.bin").write_text("original\n")
    (share / "suid.bin").chmod(0o6777)
    (share / "gone.txt").write_text("gone\n")

    def change() -> None:
        # In place and of the same size, as an editor rewriting a byte would.
        with open(share / "data.txt", "r+") as f:
            f.write("two\n")
        (share / "gone.txt").unlink()
        (share / "appeared.txt").write_text("appeared\n")

    result, steps = _boot(CACHE_SCRIPT, share, "--cache", policy, actions={"change": change})
    _booted(result)
    assert steps.done == ["change"] and not steps.errors, f"{steps.errors}\n{result.describe()}"
    return result


@pytest.fixture(scope="module")
def cache_never(
    guest_images: GuestImages, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GuestResult, Path]:
    share = tmp_path_factory.mktemp("cache-never")
    return _cache_boot(share, "never"), share


def test_cache_never_sees_host_changes_at_once(cache_never: tuple[GuestResult, Path]) -> None:
    result, _ = cache_never
    assert _ok(result, "read-before") == "one"
    assert _ok(result, "stat-before") == "5"
    assert _ok(result, "read-after") == "two"
    rc, output = _run(result, "stat-gone")
    assert rc != 0 and "No such file" in output, output
    assert _ok(result, "read-appeared") == "appeared"


def test_direct_write_by_non_owner_clears_setuid(cache_never: tuple[GuestResult, Path]) -> None:
    """With --cache never the guest writes around its page cache and leaves the clearing to the daemon
    (FUSE_WRITE_KILL_SUIDGID), where with caching it sends a SETATTR of the mode itself."""
    result, share = cache_never
    _need(result, "setpriv")
    _ok(result, "suid-user-write")
    assert (share / "suid.bin").read_text() == "original\nappended\n"
    assert stat.S_IMODE((share / "suid.bin").stat().st_mode) == 0o777


def test_cache_always_keeps_data_until_dropped(guest_images: GuestImages, tmp_path: Path) -> None:
    result = _cache_boot(tmp_path, "always")
    assert _ok(result, "read-before") == "one"
    # The guest trusts its page cache: the host's change shows only once the guest drops it.
    assert _ok(result, "read-after") == "one"
    assert _ok(result, "read-dropped") == "two"
    assert _ok(result, "read-appeared") == "appeared"
