"""A guest on a daemon serving several file systems (--mount), changed through the control API while it
runs.

One boot on each main stack, with the daemon sandboxed (--sandbox namespace --seccomp kill): the
guest starts with /a (shown as a submount) and /b (no_submount), runs file operations in both and
across them, then waits for marker files that the host side (a thread of this test) creates after each
API call: a third file system is mounted at /c while the guest runs and the guest reads and writes it;
/c is then unmounted under it, busy first (a file is open), then forced, and the guest's open file and
working directory there go stale.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from vhostfs import control

from .conftest import _program
from .guest import GuestResult, boot_guest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

RENAME_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    if (rename(argv[1], argv[2]) != 0) { printf("%s\n", strerror(errno)); return 1; }
    puts("renamed");
    return 0;
}
"""

SCRIPT = r"""
set -u
run() { name=$1; shift; if out=$("$@" 2>&1); then echo "OK $name"; else echo "FAIL $name: $out"; fi; }
wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        sleep 0.2; i=$((i + 1))
        if [ $i -ge 3000 ]; then echo "TIMEOUT $1"; return 1; fi
    done
}
echo "LS1 $(ls /mnt | tr '\n' ' ')"
echo "DEV $(stat -c %d /mnt) $(stat -c %d /mnt/a/file) $(stat -c %d /mnt/b/file)"
echo "INO $(stat -c %i /mnt /mnt/a /mnt/b /mnt/a/file /mnt/b/file | sort -u | wc -l)"
echo "CAT-A $(cat /mnt/a/file)"
echo "CAT-B $(cat /mnt/b/file)"
for m in a b; do
    cd /mnt/$m
    run $m-create sh -c 'echo data > new'
    run $m-append sh -c 'echo more >> new'
    run $m-read test "$(cat new)" = "$(printf 'data\nmore')"
    run $m-truncate truncate -s 2 new
    run $m-size test "$(stat -c %s new)" = 2
    run $m-chmod chmod 600 new
    run $m-mode test "$(stat -c %a new)" = 600
    run $m-mkdir mkdir -p dir/sub
    run $m-symlink ln -s ../new dir/lnk
    run $m-readlink test "$(readlink dir/lnk)" = ../new
    run $m-link ln new dir/hard
    run $m-nlink test "$(stat -c %h new)" = 2
    run $m-rename /renamex dir/hard dir/sub/moved
    run $m-unlink rm dir/lnk
    run $m-rmdir-busy sh -c '! rmdir dir'
    run $m-listing test "$(ls dir/sub)" = moved
done
cd /mnt
echo "XREN-AB $(/renamex /mnt/a/new /mnt/b/from-a)"
echo "XREN-BROOT $(/renamex /mnt/b/new /mnt/from-b)"
echo "XLINK-AB $(link /mnt/a/new /mnt/b/linked 2>&1)"
echo "XLINK-BA $(link /mnt/b/new /mnt/a/linked 2>&1)"
echo "PSEUDO-MKDIR $(mkdir /mnt/newdir 2>&1)"

touch /mnt/a/step1
wait_for /mnt/a/go1 || exit 1
echo "LS2 $(ls /mnt | tr '\n' ' ')"
echo "DEV-C $(stat -c %d /mnt/c/file)"
echo "CAT-C $(cat /mnt/c/file)"
echo "written in c" > /mnt/c/from-guest
echo "BACK-C $(cat /mnt/c/from-guest)"
exec 3< /mnt/c/held
cd /mnt/c
touch /mnt/a/step2
wait_for /mnt/a/go2 || exit 1
echo "HELD $(cat <&3 2>&1)"
echo "CWD $(ls . 2>&1)"
exec 3<&-
cd /mnt
sleep 2
echo "LS3 $(ls /mnt | tr '\n' ' ')"
echo "CAT-C-AFTER $(cat /mnt/c/file 2>&1)"
echo "A-STILL $(cat /mnt/a/file)"
"""


def _children(pid: int) -> int:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(kids[0]) if kids else pid


def _fds(pid: int, under: Path | None = None) -> int:
    """How many fds `pid` holds; with `under`, those of files in that host directory."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
        count += under is None or target == str(under) or target.startswith(f"{under}/")
    return count


class Host:
    """The host side while the guest runs: waits for the guest's markers, calls the API, answers."""

    def __init__(self, api: str, a: Path, c: Path) -> None:
        self.api, self.a, self.c = api, a, c
        self.results: dict[str, object] = {}
        self.thread: threading.Thread | None = None

    def started(self, pid: int) -> None:
        self.thread = threading.Thread(target=self.run, args=(pid,), daemon=True)
        self.thread.start()

    def _wait(self, marker: str, limit: float = 1200) -> bool:
        deadline = time.monotonic() + limit
        while not (self.a / marker).exists():
            if time.monotonic() > deadline:
                self.results[marker] = "timeout"
                return False
            time.sleep(0.2)
        return True

    def run(self, outer: int) -> None:
        try:
            if not self._wait("step1"):
                return
            daemon = _children(outer)
            fd = os.open(self.c, os.O_PATH | os.O_DIRECTORY)
            try:
                self.results["mount"] = control.request(self.api, "PUT", {
                    "mountpoint": "/c", "source": str(self.c), "options": {"cache": "never"}}, fds=[fd])
            finally:
                os.close(fd)
            (self.a / "go1").touch()
            if not self._wait("step2"):
                return
            self.results["listed"] = control.request(self.api, "GET")
            # The guest waits now: only /c's fds may change. Its own are counted by their host paths.
            time.sleep(0.5)
            self.results["fds_before"] = _fds(daemon)
            self.results["c_fds_before"] = _fds(daemon, self.c)
            self.results["busy"] = control.request(self.api, "DELETE", {"mountpoint": "/c"})
            self.results["forced"] = control.request(self.api, "DELETE", {"mountpoint": "/c", "force": True})
            deadline = time.monotonic() + 5
            while _fds(daemon, self.c) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            self.results["c_fds_after"] = _fds(daemon, self.c)
            self.results["fds_after"] = _fds(daemon)
        except Exception as e:  # reported by the test, never left to hang the guest
            self.results["error"] = repr(e)
        finally:
            (self.a / "go1").touch()
            (self.a / "go2").touch()


@pytest.fixture(scope="module")
def renamex() -> bytes:
    """A static rename(2) for the guest (busybox's mv copies when rename gives EXDEV)."""
    return _program("renamex", RENAME_C)


@pytest.fixture(scope="module")
def boot(guest_stack: str, renamex: bytes, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[GuestResult, Host, dict[str, Path]]:
    """One boot per main stack (Debian 12's and 13's QEMU and kernel)."""
    base = tmp_path_factory.mktemp(f"vfs-{guest_stack}")
    dirs = {name: base / name for name in ("a", "b", "c", "canary")}
    for name, d in dirs.items():
        d.mkdir()
        (d / "file").write_text(f"file of {name}\n")
    (dirs["c"] / "held").write_text("held open\n")
    api = str(base / "api.sock")
    host = Host(api, dirs["a"], dirs["c"])
    daemon = [sys.executable, "-m", "vhostfs", "--socket-path", "{sock}", "--mount", "/a={dir}",
              "--mount", f"/b={dirs['b']}:no_submount", "--api-socket", api,
              "--sandbox", "namespace", "--seccomp", "kill"]
    result = boot_guest(SCRIPT, dirs["a"], daemon, timeout=1200, daemon_started=host.started,
                        files={"renamex": renamex}, stack=guest_stack)
    if host.thread is not None:
        host.thread.join(10)
    return result, host, dirs


def _one(result: GuestResult, prefix: str) -> str:
    values = result.lines_starting(prefix)
    assert len(values) == 1, f"expected one {prefix!r} line\n{result.describe()}"
    return values[0]


def test_guest_ran(boot):
    result, host, _ = boot
    assert result.mounted and result.exit_status == 0, result.describe()
    assert "error" not in host.results and "timeout" not in host.results.values(), host.results
    assert not result.lines_starting("TIMEOUT"), result.describe()
    assert "Traceback" not in result.daemon_log, result.describe()


def test_two_mounts_at_start(boot):
    result, _, _ = boot
    assert _one(result, "LS1 ").split() == ["a", "b"]
    root, a, b = _one(result, "DEV ").split()
    # /a is a submount with its own st_dev (stat of the mount point itself does not cross into it, as
    # stat(2) never triggers an automount); /b (no_submount) shares the root's.
    assert a != root and b == root, result.describe()
    assert _one(result, "INO ") == "5"
    assert _one(result, "CAT-A ") == "file of a"
    assert _one(result, "CAT-B ") == "file of b"


def test_file_operations_in_each_mount(boot):
    result, _, dirs = boot
    failed = result.lines_starting("FAIL ")
    assert not failed, result.describe()
    assert len(result.lines_starting("OK ")) == 2 * 16, result.describe()
    for m in ("a", "b"):
        assert (dirs[m] / "dir" / "sub" / "moved").exists()
        assert (dirs[m] / "new").stat().st_mode & 0o777 == 0o600


def test_rename_and_link_across_mounts_are_exdev(boot):
    result, _, dirs = boot
    for key in ("XREN-AB ", "XREN-BROOT ", "XLINK-AB ", "XLINK-BA "):
        assert "cross-device" in _one(result, key), result.describe()
    assert "Read-only" in _one(result, "PSEUDO-MKDIR "), result.describe()
    assert not (dirs["b"] / "from-a").exists() and not (dirs["b"] / "linked").exists()
    assert (dirs["a"] / "new").exists() and (dirs["b"] / "new").exists()


def test_mounted_while_running(boot):
    result, host, dirs = boot
    status, answer = host.results["mount"]
    assert status == 201, answer
    assert _one(result, "LS2 ").split() == ["a", "b", "c"]
    assert _one(result, "CAT-C ") == "file of c"
    assert _one(result, "DEV-C ") not in _one(result, "DEV ").split()
    assert _one(result, "BACK-C ") == "written in c"
    assert (dirs["c"] / "from-guest").read_text() == "written in c\n"
    status, listed = host.results["listed"]
    c = {m["mountpoint"]: m for m in listed["mounts"]}["/c"]
    assert c["source"] == str(dirs["c"]) and c["options"]["cache"] == "never"
    assert c["counters"]["open_handles"] >= 1


def test_unmounted_under_the_guest(boot):
    result, host, dirs = boot
    status, answer = host.results["busy"]
    assert (status, answer["errno"]) == (409, "EBUSY")
    assert host.results["forced"][0] == 204
    assert "Stale file handle" in _one(result, "HELD "), result.describe()
    assert "Stale file handle" in _one(result, "CWD "), result.describe()
    assert _one(result, "LS3 ").split() == ["a", "b"]
    assert "file of c" not in _one(result, "CAT-C-AFTER ")
    assert _one(result, "A-STILL ") == "file of a"
    # The daemon closed every fd it held for /c (its root, the directory the guest was in, the open
    # file and its node, /proc's duplicate), and no other.
    c_fds = host.results["c_fds_before"]
    assert c_fds >= 3 and host.results["c_fds_after"] == 0, host.results
    assert host.results["fds_after"] == host.results["fds_before"] - c_fds - 1, host.results
    assert (dirs["canary"] / "file").read_text() == "file of canary\n"
    assert sorted(p.name for p in dirs["canary"].iterdir()) == ["file"]
