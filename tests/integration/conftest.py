"""Fixtures: the real daemon in a subprocess, on a real Unix socket, driven by the Python front end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient


@dataclass
class Daemon:
    proc: subprocess.Popen
    socket: str
    shared: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self, **kw) -> Frontend:
        return Frontend.connect(self.socket, **kw)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)


def check_statfs(client: FuseClient, shared: Path) -> None:
    """STATFS through `client` answers with the shared directory's own file system figures."""
    blocks, _bfree, _bavail, files, _ffree, bsize, namelen, frsize = client.statfs()
    host = os.statvfs(shared)
    assert (blocks, files, bsize, namelen, frsize) == (host.f_blocks, host.f_files, host.f_bsize,
                                                       host.f_namemax, host.f_frsize)


def start_daemon(tmp_path: Path, *args: str, shared: Path | None = None) -> Daemon:
    shared = shared or tmp_path / "share"
    shared.mkdir(exist_ok=True)
    sock = str(tmp_path / "vfs.sock")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vhostfs", "--socket-path", sock, "--shared-dir",
                                 str(shared), *args], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon did not create its socket:\n{log.read_text()}")
        time.sleep(0.05)
    return Daemon(proc, sock, shared, log)


def stop_daemon(daemon: Daemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.terminate()
        try:
            daemon.proc.wait(10)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path)
    yield d
    stop_daemon(d)
    # Whatever the test sent, the daemon must never have hit an unexpected exception.
    assert "Traceback" not in d.log_text(), d.log_text()


@pytest.fixture
def session(daemon):
    """A set-up front end (hiprio + one request queue) with FUSE INIT done; yields (client, daemon)."""
    with daemon.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        client.init()
        yield client, daemon
