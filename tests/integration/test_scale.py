"""The daemon at scale: file handles under a small fd limit, --rlimit-nofile, and refusing to start."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import FuseClient

from .conftest import start_daemon, stop_daemon

ROOT = abi.ROOT_ID


def open_files_limit(pid: int) -> int:
    """The soft "Max open files" limit of process `pid`, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no Max open files line")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def share(tmp_path):
    share = tmp_path / "share"
    (share / "d").mkdir(parents=True)
    for i in range(3000):
        (share / "d" / f"f{i}").write_bytes(b"x" * (i % 5))
    return share


def _lookup_all(client: FuseClient, count: int) -> tuple[list[int], dict[int, int]]:
    d = client.lookup(ROOT, b"d")[0]
    nodes, failures = [], {}
    for i in range(count):
        try:
            nodes.append(client.lookup(d, f"f{i}".encode())[0])
        except OSError as e:
            failures[e.errno] = failures.get(e.errno, 0) + 1
    return nodes, failures


def test_file_handles_keep_the_daemon_within_a_small_fd_limit(tmp_path, share):
    if os.geteuid() != 0:
        pytest.skip("open_by_handle_at(2) needs CAP_DAC_READ_SEARCH (root)")
    daemon = start_daemon(tmp_path, "--inode-file-handles=mandatory", "--rlimit-nofile=512", shared=share)
    try:
        assert open_files_limit(daemon.proc.pid) == 512
        with daemon.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            nodes, failures = _lookup_all(client, 3000)
            assert (len(nodes), failures) == (3000, {})
            assert fd_count(daemon.proc.pid) < 512 - 32
            # the first nodes, long pushed out of the fd cache, are reopened from their handles
            assert [client.getattr(n)[3] for n in nodes[:5]] == [0, 1, 2, 3, 4]
    finally:
        stop_daemon(daemon)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()


@pytest.mark.parametrize("confined", [[], ["--sandbox", "namespace", "--seccomp", "kill"]],
                         ids=["plain", "sandboxed"])
def test_without_file_handles_the_daemon_walks_past_its_fd_limit(tmp_path, share, confined):
    """The default --inode-file-handles never: idle nodes are closed and found again by name."""
    if confined and os.geteuid() != 0:
        pytest.skip("the namespace sandbox needs root")
    daemon = start_daemon(tmp_path, "--rlimit-nofile=512", *confined, shared=share)
    try:
        with daemon.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            nodes, failures = _lookup_all(client, 3000)
            assert (len(nodes), failures) == (3000, {})
            assert fd_count(daemon.proc.pid) < 512
            assert [client.getattr(n)[3] for n in nodes[:5]] == [0, 1, 2, 3, 4]
    finally:
        stop_daemon(daemon)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()
    assert "found again by parent and name" in daemon.log_text()


def test_rlimit_nofile_is_raised_by_default(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1024:
        pytest.skip(f"the hard RLIMIT_NOFILE here is {hard}, too low to see it raised")
    # The daemon inherits a low soft limit (set around the fork only, then restored here).
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        daemon = start_daemon(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert open_files_limit(daemon.proc.pid) == min(hard, 1_000_000)
    finally:
        stop_daemon(daemon)


def test_rlimit_nofile_zero_leaves_the_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(300, hard), hard))
    try:
        daemon = start_daemon(tmp_path, "--rlimit-nofile=0")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert open_files_limit(daemon.proc.pid) == min(300, hard)
    finally:
        stop_daemon(daemon)


def test_mandatory_file_handles_without_support_fail_at_start(tmp_path):
    # procfs makes no file handles.
    result = subprocess.run([sys.executable, "-m", "vhostfs", "--socket-path", str(tmp_path / "s"),
                             "--shared-dir", "/proc", "--inode-file-handles=mandatory"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "file handles" in result.stderr and "/proc" in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()
