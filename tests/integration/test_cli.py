"""The command line as launchers use it: libvirt's --fd and -o spellings, capabilities, socket
ownership, the pid lock, and serving one front end after another."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from importlib import resources

import pytest

from vhostfs.fuse import abi
from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient

from .conftest import start_daemon, stop_daemon

VHOSTFS = [sys.executable, "-m", "vhostfs"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VHOSTFS, *args], capture_output=True, text=True, timeout=60)


def test_print_capabilities_is_the_backend_json_and_ignores_other_options():
    r = run("--print-capabilities", "--no-such-option")
    assert r.returncode == 0
    caps = json.loads(r.stdout)
    assert caps["type"] == "fs"
    assert "separate-options" in caps["features"]
    # libvirt migrates a VM with a virtiofs device only when its back end says so (virtiofsd 1.13 does).
    assert "migrate-precopy" in caps["features"]


def test_backend_description_file_ships_with_the_package():
    desc = json.loads(resources.files("vhostfs").joinpath("data/50-vhostfs.json").read_text())
    assert desc["type"] == "fs"
    assert os.path.basename(desc["binary"]) == "vhostfs"
    assert desc["description"]


def test_version():
    r = run("-V")
    assert r.returncode == 0 and r.stdout.startswith("vhostfs ")


def test_libvirt_style_invocation_on_an_inherited_socket(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_bytes(b"hello from the host\n")
    path = str(tmp_path / "libvirt.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([*VHOSTFS, f"--fd={fd}", "-o", f"source={share},cache=always,xattr",
                             "--thread-pool-size=2"], pass_fds=[fd], stdout=log, stderr=subprocess.STDOUT)
    listener.close()
    try:
        with Frontend.connect(path) as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            nodeid = client.lookup(abi.ROOT_ID, b"hello")[0]
            fh = client.open(nodeid)
            assert client.read(nodeid, fh, 0, 100) == b"hello from the host\n"
        assert proc.wait(30) == 0  # the front end left: the daemon exits, as virtiofsd does
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


@pytest.mark.parametrize("option,message", [("bogus", "unknown -o option 'bogus'"),
                                            ("writeback_cache", "-o writeback_cache is not supported"),
                                            ("cache=sometimes", "-o cache=sometimes"),
                                            ("log_level=loud", "-o log_level=loud")])
def test_bad_o_options_are_errors(tmp_path, option, message):
    r = run("--socket-path", str(tmp_path / "s"), "-o", f"source={tmp_path},{option}")
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "s").exists()


def test_harmless_o_options_are_accepted_with_a_warning(tmp_path):
    # A missing shared directory stops the daemon right after the options were read.
    r = run("--socket-path", str(tmp_path / "s"), "-o", f"source={tmp_path}/missing,flock,no_posix_lock,"
            "writeback,timeout=5,announce_submounts")
    assert "-o timeout=5 is accepted and has no effect" in r.stderr
    assert "-o flock" not in r.stderr  # a switch vhostfs honours
    assert "is not a directory" in r.stderr


ACL = abi.FUSE_POSIX_ACL | abi.FUSE_DONT_MASK | abi.FUSE_SETXATTR_EXT
OFFERED = (abi.FUSE_DO_READDIRPLUS | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS
           | abi.FUSE_SUBMOUNTS | ACL)


@pytest.mark.parametrize("args,granted,refused", [
    ((), abi.FUSE_DO_READDIRPLUS | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS,
     abi.FUSE_WRITEBACK_CACHE | ACL),
    (("--posix-acl",), ACL, abi.FUSE_WRITEBACK_CACHE),
    (("-o", "posix_acl,no_posix_acl"), 0, ACL),
    (("--no-readdirplus", "--writeback", "--no-posix-lock"), abi.FUSE_WRITEBACK_CACHE | abi.FUSE_FLOCK_LOCKS,
     abi.FUSE_DO_READDIRPLUS | abi.FUSE_POSIX_LOCKS),
    (("-o", "no_readdirplus,writeback,no_flock,announce_submounts,posix_acl"),
     abi.FUSE_WRITEBACK_CACHE | abi.FUSE_POSIX_LOCKS | abi.FUSE_SUBMOUNTS | ACL,
     abi.FUSE_DO_READDIRPLUS | abi.FUSE_FLOCK_LOCKS),
])
def test_switches_reach_the_init_negotiation(tmp_path, args, granted, refused):
    d = start_daemon(tmp_path, *args)
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            flags = FuseClient(fe).init(flags=OFFERED)[3]
        assert flags & granted == granted
        assert flags & refused == 0
    finally:
        stop_daemon(d)


def test_bad_xattrmap_is_a_clear_error(tmp_path):
    r = run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path), "--xattrmap", ":bogus:")
    assert r.returncode != 0
    assert "xattrmap" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_socket_group_owns_the_socket(tmp_path):
    if os.geteuid() != 0:
        group = grp.getgrgid(os.getgid())
    else:
        try:
            group = grp.getgrnam("daemon")
        except KeyError:
            pytest.skip("no 'daemon' group to hand the socket to")
    d = start_daemon(tmp_path, "--socket-group", group.gr_name)
    try:
        st = os.stat(d.socket)
        assert st.st_gid == group.gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660
    finally:
        stop_daemon(d)


def test_unknown_socket_group_is_an_error(tmp_path):
    r = run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path), "--socket-group",
            "no-such-group-here")
    assert r.returncode == 2 and "no group named" in r.stderr


def test_pid_lock_names_the_daemon(tmp_path):
    d = start_daemon(tmp_path)
    try:
        with open(d.socket + ".pid") as f:
            assert int(f.read()) == d.proc.pid
        r = run("--socket-path", d.socket, "--shared-dir", str(d.shared))
        assert r.returncode != 0 and "already served" in r.stderr
    finally:
        stop_daemon(d)
    assert not os.path.exists(d.socket + ".pid")


def test_keep_listening_serves_the_next_front_end_from_scratch(tmp_path):
    d = start_daemon(tmp_path, "--keep-listening")
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            client.create(abi.ROOT_ID, b"first")
        with d.connect() as fe:
            # A fresh session: negotiation, memory and rings again, and a new FUSE INIT.
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            assert client.lookup(abi.ROOT_ID, b"first")[0] > 0
        assert d.proc.poll() is None
    finally:
        stop_daemon(d)
    assert "Traceback" not in d.log_text()


def test_negative_poll_us_is_an_error(tmp_path):
    r = run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path), "--poll-us", "-1")
    assert r.returncode == 2 and "--poll-us: -1 is negative" in r.stderr
    assert not (tmp_path / "s").exists()


def test_the_socket_path_appears_only_once_it_listens(tmp_path):
    """A front end that connects the moment the path exists is never refused: the daemon binds under
    a temporary name and renames the socket into place once it listens."""
    from vhostfs.cli import _listen

    for i in range(100):
        path = str(tmp_path / f"s{i}")
        pid = os.fork()
        if pid == 0:
            try:
                listener, _ = _listen(path)
                time.sleep(5)
                listener.close()
            finally:
                os._exit(0)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                assert time.monotonic() < deadline, "the socket never appeared"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)  # ECONNREFUSED if the path existed before listen(2)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    # Nothing is left under the temporary names.
    assert sorted(os.listdir(tmp_path)) == sorted(f"s{i}{ext}" for i in range(100) for ext in ("", ".pid"))


def test_the_socket_is_for_its_owner_only(tmp_path):
    d = start_daemon(tmp_path)
    try:
        st = os.lstat(d.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
    finally:
        stop_daemon(d)


def test_a_file_that_is_not_a_socket_is_not_replaced(tmp_path):
    (tmp_path / "s").write_bytes(b"keep me")
    r = run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path))
    assert r.returncode != 0 and "is not a socket" in r.stderr
    assert (tmp_path / "s").read_bytes() == b"keep me"


def test_print_capabilities_announces_the_negotiation_modes():
    features = json.loads(run("--print-capabilities").stdout)["features"]
    assert {"posix-acl-negotiation-mode", "security-label-negotiation-mode", "separate-options"} \
        <= set(features)


@pytest.mark.parametrize("option, named", [
    ("--translate-uid=bogus:1:2:3", "'bogus:1:2:3'"),
    ("--translate-gid=map:0:1000:0", "'map:0:1000:0'"),
    ("--translate-uid=forbid-guest:5", "'forbid-guest:5'"),
])
def test_malformed_translation_rules_are_refused_at_start(tmp_path, option, named):
    r = run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path), option)
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and option.split("=")[0] in r.stderr
    assert not (tmp_path / "s").exists()


def test_overlapping_translation_rules_are_refused_naming_both(tmp_path):
    r = run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path),
            "--translate-uid", "map:0:100000:65536", "--translate-uid", "squash-guest:1000:5:1")
    assert r.returncode == 2
    assert "'squash-guest:1000:5:1' overlaps 'map:0:100000:65536'" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("option", ["--posix-acl=sometimes", "--security-label=yes"])
def test_bad_negotiation_mode_is_refused(tmp_path, option):
    r = run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path), option)
    assert r.returncode == 2, r.stderr
    assert "invalid choice" in r.stderr and option.split("=")[0] in r.stderr, r.stderr
