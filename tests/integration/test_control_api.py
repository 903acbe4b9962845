"""The daemon with several --mount and its control API, sandboxed (--sandbox namespace --seccomp kill).

The front end plays the guest; the API is driven over the real socket, with the directory fds passed by
SCM_RIGHTS, as `vhostfs ctl` does.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, stop_daemon
from vhostfs import control
from vhostfs.testing.fuse_client import FuseClient, expect_errno

ROOT = 1
SANDBOX = ("--sandbox", "namespace", "--seccomp", "kill")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the namespace sandbox needs root")


def start(tmp_path: Path, *args: str) -> tuple[Daemon, str]:
    sock = str(tmp_path / "vfs.sock")
    api = str(tmp_path / "api.sock")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vhostfs", "--socket-path", sock, "--api-socket", api,
                                 *args], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (os.path.exists(sock) and "control API on" in log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return Daemon(proc, sock, tmp_path, log), api


def served_pid(d: Daemon) -> int:
    """The process that serves: the sandboxed child of the outer one in namespace mode."""
    children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
    return int(children[0]) if children else d.proc.pid


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fd_count(pid: int, want: int, timeout: float = 5.0) -> int:
    """The daemon's fd count once it equals `want` or `timeout` passed (the API closes its connection
    just after answering)."""
    deadline = time.monotonic() + timeout
    while (n := fd_count(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def mount(api: str, path: str, host: Path, **options) -> tuple[int, dict]:
    fd = os.open(host, os.O_PATH | os.O_DIRECTORY)
    try:
        return control.request(api, "PUT", {"mountpoint": path, "source": str(host), "options": options},
                               fds=[fd])
    finally:
        os.close(fd)


@pytest.fixture
def dirs(tmp_path):
    made = {}
    for name in ("one", "two", "three", "canary"):
        d = tmp_path / name
        d.mkdir()
        (d / "file").write_bytes(name.encode())
        made[name] = d
    return made


@pytest.fixture
def daemon(tmp_path, dirs):
    d, api = start(tmp_path, "--mount", f"/a={dirs['one']}", "--mount", f"/b/c={dirs['two']}:ro,cache=never",
                   "--max-mounts", "3", *SANDBOX)
    yield d, api
    stop_daemon(d)
    assert "Traceback" not in d.log_text(), d.log_text()
    assert (dirs["canary"] / "file").read_bytes() == b"canary"
    assert sorted(p.name for p in dirs["canary"].iterdir()) == ["file"]


def entry(client: FuseClient, parent: int, name: bytes) -> int:
    return client.lookup(parent, name)[0]


def test_mounts_at_start_and_at_run_time(daemon, dirs):
    d, api = daemon
    with d.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        client.init()
        status, answer = control.request(api, "GET")
        assert status == 200
        listed = {m["mountpoint"]: m for m in answer["mounts"]}
        assert set(listed) == {"/a", "/b/c"}
        assert listed["/a"]["source"] == str(dirs["one"]) and listed["/a"]["type"] == "passthrough"
        assert listed["/b/c"]["options"]["readonly"] is True and listed["/b/c"]["options"]["cache"] == "never"
        assert listed["/a"]["counters"]["open_handles"] == 0
        a = entry(client, ROOT, b"a")
        c = entry(client, entry(client, ROOT, b"b"), b"c")
        fa = entry(client, a, b"file")
        fh = client.open(fa)
        assert client.read(fa, fh, 0, 100) == b"one"
        client.release(fa, fh)
        expect_errno(errno.EROFS, client.create, c, b"new")

        pid = served_pid(d)
        time.sleep(0.5)  # the last API connection closes
        before = fd_count(pid)
        # A third mount while the guest runs: it reads and writes it.
        status, answer = mount(api, "/x", dirs["three"])
        assert status == 201, answer
        assert answer["mountpoint"] == "/x" and answer["source"] == str(dirs["three"])
        x = entry(client, ROOT, b"x")
        new_entry, (wfh, _) = client.create(x, b"new")
        new = new_entry[0]
        assert client.write(new, wfh, 0, b"written in /x") == 13
        assert (dirs["three"] / "new").read_bytes() == b"written in /x"
        assert client.read(new, wfh, 0, 100) == b"written in /x"
        listed = {m["mountpoint"]: m for m in control.request(api, "GET")[1]["mounts"]}
        assert listed["/x"]["counters"]["open_handles"] == 1

        # Busy while a file is open; forced, the old node ids and handle get ESTALE.
        status, answer = control.request(api, "DELETE", {"mountpoint": "/x"})
        assert (status, answer["errno"]) == (409, "EBUSY")
        assert client.read(new, wfh, 0, 100) == b"written in /x"
        status, _ = control.request(api, "DELETE", {"mountpoint": "/x", "force": True})
        assert status == 204
        expect_errno(errno.ESTALE, client.read, new, wfh, 0, 100)
        expect_errno(errno.ESTALE, client.getattr, x)
        expect_errno(errno.ENOENT, client.lookup, ROOT, b"x")
        client.release(new, wfh)
        # Every fd the daemon held for that mount is closed.
        assert settled_fd_count(pid, before) == before
        assert (dirs["three"] / "new").read_bytes() == b"written in /x"

        # Mounted again there, old ids still name nothing of the new mount.
        assert mount(api, "/x", dirs["three"])[0] == 201
        x2 = entry(client, ROOT, b"x")
        assert x2 != x
        expect_errno(errno.ESTALE, client.getattr, new)
        assert control.request(api, "DELETE", {"mountpoint": "/x"})[0] == 204
        assert settled_fd_count(pid, before) == before


def test_api_errors(daemon, dirs, tmp_path):
    d, api = daemon
    cases = [
        (control.request(api, "DELETE", {"mountpoint": "/nothing"}), 404, "ENOENT"),
        (mount(api, "/d/../a", dirs["three"]), 400, "EINVAL"),
        (mount(api, "/a/file", dirs["three"]), 409, "ENOTDIR"),
        (mount(api, "/a", dirs["three"]), 409, "EEXIST"),
        (mount(api, "/b", dirs["three"]), 409, "EBUSY"),
        (mount(api, "relative", dirs["three"]), 400, "EINVAL"),
    ]
    for (status, answer), want_status, want_errno in cases:
        assert (status, answer.get("errno")) == (want_status, want_errno), answer
    # The limit (--max-mounts 3: two at start).
    assert mount(api, "/third", dirs["three"])[0] == 201
    status, answer = mount(api, "/fourth", dirs["three"])
    assert (status, answer["errno"]) == (507, "ENOSPC")
    # Requests the API itself refuses.
    assert control.request(api, "PUT", {"mountpoint": "/nofd"})[0] == 400
    assert mount(api, "/bad", dirs["three"], nosuch=True)[0] == 400
    assert mount(api, "/bad", dirs["three"], readonly="yes")[0] == 400
    file_fd = os.open(dirs["three"] / "file", os.O_RDONLY)
    try:
        status, answer = control.request(api, "PUT", {"mountpoint": "/f"}, fds=[file_fd])
    finally:
        os.close(file_fd)
    assert status == 400 and "Not a directory" in answer["error"]
    bad_json = b"PUT /api/v1/mounts HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"mountp"
    assert control.request(api, "PUT", raw=bad_json)[0] == 400
    not_object = b"PUT /api/v1/mounts HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]"
    assert control.request(api, "PUT", raw=not_object)[0] == 400
    huge = b"PUT /api/v1/mounts HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n" + b" " * 100
    assert control.request(api, "PUT", raw=huge)[0] == 413
    assert control.request(api, "GET", raw=b"GET /x HTTP/1.1\r\n" + b"X: y\r\n" * 3000 + b"\r\n")[0] == 413
    assert control.request(api, "GET", raw=b"garbage\r\n\r\n")[0] == 400
    assert control.request(api, "GET", path="/api/v1/other")[0] == 404
    assert control.request(api, "POST")[0] == 405
    assert control.request(api, "DELETE", {"mountpoint": "/third", "force": "yes"})[0] == 400
    # A client that sends half a request and goes away.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(api)
        s.sendall(b"PUT /api/v1/mounts HTTP/1.1\r\nContent-Len")
    # A peer that is not the daemon's owner, on a socket opened up to everyone (and linked into a
    # directory others may search: the test's own are not).
    os.chmod(api, 0o666)
    public = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
    public.chmod(0o755)
    os.link(api, public / "api.sock")
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            status, answer = control.request(str(public / "api.sock"), "GET")
            os._exit(0 if status == 403 and "mounts" not in answer else 1)
        except BaseException:
            os._exit(2)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    shutil.rmtree(public)
    assert code == 0
    # After all that the daemon is up and its mounts unchanged.
    status, answer = control.request(api, "GET")
    assert status == 200 and [m["mountpoint"] for m in answer["mounts"]] == ["/a", "/b/c", "/third"]
    assert d.proc.poll() is None


def test_api_socket_is_for_the_owner_only(daemon):
    _, api = daemon
    st = os.stat(api)
    assert st.st_mode & 0o077 == 0 and st.st_uid == os.geteuid()


def test_ctl_command(daemon, dirs):
    _, api = daemon

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vhostfs", "ctl", "--api-socket", api, *args],
                              capture_output=True, text=True, timeout=60)

    done = ctl("mount", "/y", str(dirs["three"]), "-o", "ro,no_submount")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["options"]["readonly"] is True
    listed = json.loads(ctl("list").stdout)["mounts"]
    assert [m["mountpoint"] for m in listed] == ["/a", "/b/c", "/y"]
    assert {m["mountpoint"]: m for m in listed}["/y"]["options"]["submount"] is False
    failed = ctl("umount", "/nothing")
    assert failed.returncode == 1 and "ENOENT" in failed.stdout
    assert ctl("umount", "/y").returncode == 0
    assert ctl("mount", "/z", str(dirs["three"]), "-o", "bogus").returncode == 2


def test_mount_replaces_shared_dir_and_checks_specs(tmp_path, dirs):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vhostfs", "--socket-path", str(tmp_path / "s"), *args],
                              capture_output=True, text=True, timeout=60)

    for args in (("--shared-dir", str(dirs["one"]), "--mount", f"/a={dirs['two']}"),
                 ("--mount", "nonsense"), ("--mount", f"/a={tmp_path / 'missing'}"),
                 ("--mount", f"/a={dirs['one']}:bogus_option"),
                 ("--mount", f"/a={dirs['one']}", "--max-mounts", "0")):
        done = run(*args)
        assert done.returncode == 2, (args, done.stderr)
    done = run("--mount", f"/a={dirs['one']}", "--mount", f"/a={dirs['two']}")
    assert done.returncode != 0 and "mounted already" in done.stderr
