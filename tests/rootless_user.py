"""A throw-away unprivileged host user with subordinate IDs, for the tests of a rootless daemon.

`host_user()` makes one (useradd, usermod --add-subuids/--add-subgids) and removes it again;
`daemon_command()` is the command line that runs this checkout's vhostfs as that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBORDINATE_COUNT = 65536


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def unavailable(message: str) -> None:
    """Skips, or fails under CI=true, where scripts/test.sh installs what is missing."""
    if _in_ci():
        pytest.fail(f"CI must run the rootless tests, but {message}")
    pytest.skip(message)


def _free_subordinate_start() -> int:
    """A start for SUBORDINATE_COUNT IDs that no entry of /etc/subuid or /etc/subgid uses."""
    end = 1_000_000
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


@dataclass(frozen=True)
class HostUser:
    name: str
    uid: int
    gid: int
    sub: int  # the first subordinate ID (uids and gids alike)
    home: Path  # a directory of the user's, its HOME for the daemon


@contextmanager
def host_user() -> Iterator[HostUser]:
    """A new system user with SUBORDINATE_COUNT subordinate UIDs and GIDs, deleted afterwards (skips
    unless the tests run as root with useradd, newuidmap and setpriv)."""
    if os.geteuid() != 0:
        pytest.skip("making a host user for the rootless daemon needs the tests to run as root")
    for tool in ("useradd", "usermod", "userdel", "newuidmap", "newgidmap", "setpriv"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing (packages passwd, uidmap, util-linux; scripts/test.sh installs "
                        "uidmap)")
    name = f"vhfs-t{os.getpid()}"
    home = Path(tempfile.mkdtemp(prefix="vhostfs-home-", dir="/tmp"))
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        start = _free_subordinate_start()
        span = f"{start}-{start + SUBORDINATE_COUNT - 1}"
        subprocess.run(["usermod", "--add-subuids", span, "--add-subgids", span, name], check=True,
                       capture_output=True)
        entry = pwd.getpwnam(name)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield HostUser(name, entry.pw_uid, entry.pw_gid, start, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True)
        # userdel of older shadow versions leaves the subordinate ranges behind.
        for path in ("/etc/subuid", "/etc/subgid"):
            p = Path(path)
            if p.exists():
                lines = p.read_text().splitlines(keepends=True)
                kept = [line for line in lines if not line.startswith(f"{name}:")]
                p.write_text("".join(kept))


def daemon_command(user: HostUser) -> list[str]:
    """The argv prefix that runs `python -m vhostfs` of this checkout as `user`: with this interpreter,
    or the system's python3 of the same version given this one's packages, whichever `user` may run
    (this one may live where other users cannot reach, such as root's home)."""
    from vhostfs import native

    # The native helper as this process loaded it (built into its own cache when the checkout's is
    # older than the source), copied to where the user's daemon looks (see vhostfs/native.py).
    built = Path(native._mod.__file__)
    cache = user.home / ".cache"
    if built.parent.parent.name == "vhostfs" and not built.is_relative_to(REPO):
        target = cache / "vhostfs" / built.parent.name / built.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
        target.chmod(0o755)
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(cache)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    env = ["env", f"PYTHONPATH={REPO}:{purelib}", "PYTHONDONTWRITEBYTECODE=1", f"HOME={user.home}",
           f"XDG_CACHE_HOME={cache}"]
    candidates = [os.path.realpath(sys.executable)]
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system:
        candidates.append(system)
    check = f"import sys; assert sys.version_info[:2] == {sys.version_info[:2]}; import vhostfs.native"
    for python in candidates:
        argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", *env, python]
        if subprocess.run([*argv, "-c", check], cwd="/", capture_output=True).returncode == 0:
            return [*argv, "-m", "vhostfs"]
    unavailable(f"no Python interpreter that the unprivileged user {user.name} can run imports vhostfs "
                f"(tried {', '.join(candidates)})")
    raise AssertionError("unreachable")
