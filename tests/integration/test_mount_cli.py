"""`vhostfs mount`'s passthrough options: the daemon's spellings and `-o` forms, the same Passthrough
configuration, and the ones a host mount can show (ACLs, the xattr map) through a real /dev/fuse mount."""

from __future__ import annotations

import argparse
import errno
import inspect
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_passthrough_options import ALL_RWX, USER_1000_READS
from vhostfs import cli, mount_cli
from vhostfs.fs import passthrough
from vhostfs.fs.idmap import IdMap
from vhostfs.fs.passthrough import Passthrough

MAP = ":map:trusted.:user.virtiofs.:"

#: Each passthrough option as the daemon spells it, in both forms, and the Passthrough keywords it sets.
OPTIONS = [
    (["--cache=never"], {"cache": "never"}),
    (["-o", "cache=none"], {"cache": "never"}),
    (["-o", "cache=always"], {"cache": "always"}),
    (["--readonly"], {"readonly": True}),
    (["--xattr"], {"xattr": True}),
    (["-o", "xattr"], {"xattr": True}),
    (["--posix-acl"], {"posix_acl": "always"}),
    (["--posix-acl=auto"], {"posix_acl": "auto"}),
    (["--posix-acl=always"], {"posix_acl": "always"}),
    (["--posix-acl=never"], {}),
    (["-o", "posix_acl"], {"posix_acl": "always"}),
    (["--writeback"], {"writeback": True}),
    (["-o", "writeback"], {"writeback": True}),
    (["--xattrmap", MAP], {"xattrmap": MAP}),
    (["-o", f"xattrmap={MAP}"], {"xattrmap": MAP}),
    (["--inode-file-handles=prefer"], {"inode_file_handles": "prefer"}),
    (["--announce-submounts"], {"announce_submounts": True}),
    (["-o", "announce_submounts"], {"announce_submounts": True}),
    (["--allow-direct-io"], {"allow_direct_io": True}),
    (["-o", "allow_direct_io"], {"allow_direct_io": True}),
    (["--no-readdirplus"], {"readdirplus": False}),
    (["-o", "no_readdirplus"], {"readdirplus": False}),
    (["--preserve-noatime"], {"preserve_noatime": True}),
    (["--killpriv-v2"], {"killpriv_v2": True}),
    (["-o", "killpriv_v2"], {"killpriv_v2": True}),
    (["--allow-mmap"], {"allow_mmap": True}),
    (["--no-posix-lock"], {"posix_lock": False}),
    (["-o", "no_posix_lock"], {"posix_lock": False}),
    (["--no-flock"], {"flock": False}),
    (["-o", "no_flock"], {"flock": False}),
    (["-o", "xattr,no_xattr,no_posix_acl,posix_acl"], {"posix_acl": "always"}),
    (["--security-label"], {"security_label": "always"}),
    (["--security-label=auto"], {"security_label": "auto"}),
    (["-o", "security_label"], {"security_label": "always"}),
    (["--translate-uid", "map:0:1000:10", "--translate-uid=forbid-guest:10:5"],
     {"translate_uid": IdMap(["map:0:1000:10", "forbid-guest:10:5"])}),
    (["--translate-gid", "squash-guest:0:100:65536"], {"translate_gid": IdMap(["squash-guest:0:100:65536"])}),
]
_DEFAULTS = {name: p.default for name, p in inspect.signature(Passthrough).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _ids(options: list) -> list[str]:
    return [" ".join(argv) for argv, _ in options]


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Runs `vhostfs mount` in this process with Passthrough and the mount replaced by recorders:
    yields run(*args) -> (Passthrough keywords, serve_filesystem keywords)."""
    src = tmp_path / "src"
    src.mkdir()
    seen: dict = {}

    class Recorder:
        def __init__(self, root: str, **kw) -> None:
            seen["fs"] = kw

        def close(self) -> None:
            pass

        def describe_inodes(self) -> str:
            return "recorded"

    def serve(fs, mountpoint: str, **kw) -> None:
        seen["mount"] = kw

    monkeypatch.setattr(passthrough, "Passthrough", Recorder)
    monkeypatch.setattr(mount_cli, "serve_filesystem", serve)

    def run(*args: str) -> tuple[dict, dict]:
        seen.clear()
        assert mount_cli.main(["--shared-dir", str(src), str(tmp_path / "mnt"), *args]) == 0
        return seen["fs"], seen["mount"]

    return run


@pytest.mark.parametrize("argv,expected", OPTIONS, ids=_ids(OPTIONS))
def test_each_passthrough_option_reaches_the_passthrough(recorded, argv, expected):
    kw, mount = recorded(*argv, "-o", "noexec")
    assert set(kw) <= set(_DEFAULTS)  # only Passthrough's own keywords
    # vhostfs mount holds inodes by file handles where it can unless told otherwise (see below).
    assert {name: value for name, value in kw.items() if value != _DEFAULTS[name]} == {
        "inode_file_handles": "prefer"} | expected
    assert mount["options"] == "noexec"  # the passthrough's -o items are not mount options


def test_mount_options_and_ro_still_reach_the_mount(recorded):
    kw, mount = recorded("-o", "ro,fsname=src,no_allow_other,xattr,nosuid")
    assert kw["readonly"] is True and kw["xattr"] is True
    assert mount == {"threads": 4, "fsname": "src", "allow_other": False, "options": "ro,nosuid",
                     "passthrough": True, "io_uring": True}


def test_fuse_passthrough_is_on_unless_turned_off(recorded):
    assert recorded()[1]["passthrough"] is True
    assert recorded("--no-fuse-passthrough")[1]["passthrough"] is False


def _daemon_options(argv: list[str]) -> dict:
    parser = cli.build_parser()
    argv = ["--shared-dir", "/", "--socket-path", "/unused", *argv]
    args = parser.parse_args(cli.negotiated_switches(argv))
    cli._apply_o_options(parser, args)
    cli.translate_maps(parser, args)
    return cli.passthrough_options(args)


def _mount_options(argv: list[str]) -> dict:
    parser = mount_cli.build_parser()
    args = parser.parse_args(cli.negotiated_switches(["--shared-dir", "/", "/mnt", *argv]))
    mount_cli._mount_options(parser, args.o, args)
    cli.translate_maps(parser, args)
    return cli.passthrough_options(args)


@pytest.mark.parametrize("argv", [argv for argv, _ in OPTIONS], ids=_ids(OPTIONS))
def test_the_daemon_and_mount_read_each_option_alike(argv):
    mount, daemon = _mount_options(argv), _daemon_options(argv)
    if "inode_file_handles" not in " ".join(argv).replace("-", "_"):
        assert (mount.pop("inode_file_handles"), daemon.pop("inode_file_handles")) == ("prefer", "never")
    assert mount == daemon


def test_only_the_inode_file_handles_default_differs():
    """A walk on the host reaches far more files than a guest keeps: vhostfs mount prefers file
    handles, the daemon keeps virtiofsd's default, which needs no CAP_DAC_READ_SEARCH."""
    assert _mount_options(["--inode-file-handles=never"]) == _daemon_options([])


def test_every_passthrough_option_of_the_daemon_is_a_mount_option():
    def passthrough_flags(parser: argparse.ArgumentParser) -> set[str]:
        return {flag for action in parser._actions if action.dest in _DEFAULTS
                for flag in action.option_strings}

    daemon = passthrough_flags(cli.build_parser())
    assert {"--posix-acl", "--xattrmap", "--inode-file-handles", "--killpriv-v2"} <= daemon
    assert daemon <= passthrough_flags(mount_cli.build_parser())


def _run_mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostfs", "mount", *args], capture_output=True, text=True,
                          timeout=60)


def test_bad_passthrough_options_are_clear_errors(tmp_path):
    r = _run_mount("--shared-dir", str(tmp_path), str(tmp_path), "-o", "cache=sometimes")
    assert r.returncode == 2 and "-o cache=sometimes" in r.stderr
    r = _run_mount("--shared-dir", str(tmp_path), str(tmp_path), "--xattrmap", ":bogus:")
    assert r.returncode == 1
    assert "xattrmap" in r.stderr and "Traceback" not in r.stderr


# -- through a real /dev/fuse mount ------------------------------------------------------------------

@pytest.fixture
def mount(tmp_path):
    """Mounts tmp_path/src at tmp_path/mnt with `vhostfs mount` and the given options: yields
    start(*args) -> (src, mnt); every mount is taken down afterwards."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse (the fuse kernel module)")
    if os.geteuid() != 0:
        pytest.skip("needs root to mount FUSE file systems with mount(2)")
    from tests.integration.test_fusedev import _take_down, mount_cli, start

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    started = []

    def begin(*args: str) -> tuple[Path, Path]:
        m = start(mount_cli("--shared-dir", str(src), str(mnt), *args), mnt, tmp_path / "server.log")
        started.append(m)
        return src, mnt

    yield begin
    for m in started:
        _take_down(mnt, m.proc)
        assert "Traceback" not in m.log_text(), m.log_text()


def test_posix_acl_through_the_kernel(mount):
    src, mnt = mount("--posix-acl")
    (mnt / "f").write_bytes(b"")
    os.setxattr(mnt / "f", "system.posix_acl_access", USER_1000_READS)  # setfacl -m u:1000:r
    assert os.getxattr(src / "f", "system.posix_acl_access") == USER_1000_READS
    assert os.getxattr(mnt / "f", "system.posix_acl_access") == USER_1000_READS
    # A default ACL replaces the creating process's umask, in the mount as on the host.
    (mnt / "inherit").mkdir()
    os.setxattr(mnt / "inherit", "system.posix_acl_default", ALL_RWX)
    (mnt / "plain").mkdir()
    old = os.umask(0o077)
    try:
        os.close(os.open(mnt / "inherit" / "new", os.O_CREAT | os.O_WRONLY, 0o666))
        os.close(os.open(mnt / "plain" / "new", os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(src / "inherit" / "new").st_mode) == 0o666
    assert stat.S_IMODE(os.stat(src / "plain" / "new").st_mode) == 0o600
    assert os.getxattr(src / "inherit", "system.posix_acl_default") == ALL_RWX


def test_xattrmap_through_the_kernel(mount):
    src, mnt = mount("-o", f"xattr,xattrmap={MAP}")
    (mnt / "f").write_bytes(b"")
    os.setxattr(mnt / "f", "trusted.overlay.opaque", b"y")
    assert os.getxattr(src / "f", "user.virtiofs.trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(src / "f")
    os.setxattr(src / "f", "user.plain", b"p")
    assert sorted(os.listxattr(mnt / "f")) == ["trusted.overlay.opaque", "user.plain"]
    with pytest.raises(OSError) as exc:  # a host name carrying the prefix is not the guest's to name
        os.getxattr(mnt / "f", "user.virtiofs.trusted.overlay.opaque")
    assert exc.value.errno == errno.EPERM


def _acl_ids(value: bytes) -> set[tuple[int, int]]:
    """(tag, id) of each entry of a POSIX ACL in the xattr format."""
    return {struct.unpack_from("<HHI", value, off)[0::2] for off in range(4, len(value), 8)}


def test_translated_ids_through_the_kernel(mount):
    """--translate-uid/--translate-gid over /dev/fuse: the host kernel's callers (root here) are guest
    IDs 0-1999, the source directory's files host IDs 100000-101999 and 200000-201999."""
    src, mnt = mount("--posix-acl", "--translate-uid", "map:0:100000:2000",
                     "--translate-gid", "map:0:200000:2000")
    src.chmod(0o777)
    (mnt / "f").write_bytes(b"x")
    st = os.stat(src / "f")
    assert (st.st_uid, st.st_gid) == (100000, 200000), "made by root, who is host 100000:200000"
    assert (os.stat(mnt / "f").st_uid, os.stat(mnt / "f").st_gid) == (0, 0)
    os.chown(mnt / "f", 1000, 1001)
    st = os.stat(src / "f")
    assert (st.st_uid, st.st_gid) == (101000, 201001)
    assert (os.stat(mnt / "f").st_uid, os.stat(mnt / "f").st_gid) == (1000, 1001)
    os.setxattr(mnt / "f", "system.posix_acl_access", USER_1000_READS)  # setfacl -m u:1000:r
    assert (0x02, 101000) in _acl_ids(os.getxattr(src / "f", "system.posix_acl_access"))
    assert os.getxattr(mnt / "f", "system.posix_acl_access") == USER_1000_READS
    # Guest uid 2000 is past the rules: it stays 2000 on the host; the directory listing agrees.
    os.chown(mnt / "f", 2000, -1)
    assert os.stat(src / "f").st_uid == 2000
    assert [(e.name, e.stat().st_uid) for e in os.scandir(mnt)] == [("f", 2000)]
