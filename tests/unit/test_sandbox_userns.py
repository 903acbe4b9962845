"""The user namespace part of the sandbox, where it cannot be had: each failure says what to change.

The working path (a real unprivileged daemon in a user namespace) is tests/integration/test_rootless.py
and tests/e2e/test_rootless.py; here the machine's refusals are played by replacing unshare(2) and the
lookup of newuidmap, and the subordinate ID files by temporary ones.
"""

from __future__ import annotations

import errno
import os

import pytest

from vhostfs import sandbox
from vhostfs.fs.idmap import NamespaceMapping


def _own() -> tuple[list[NamespaceMapping], list[NamespaceMapping]]:
    uid, gid = os.geteuid(), os.getegid()
    return [NamespaceMapping(uid, uid, 1)], [NamespaceMapping(gid, gid, 1)]


@pytest.mark.parametrize("code, says", [
    (errno.EPERM, "user.max_user_namespaces"),
    (errno.ENOSPC, "--sandbox=none"),
    (errno.EINVAL, "more than one thread"),
])
def test_refused_user_namespace_says_what_to_change(monkeypatch, code, says):
    def refuse(flags: int) -> None:
        assert flags == sandbox.CLONE_NEWUSER
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(sandbox.native, "unshare", refuse)
    with pytest.raises(sandbox.SandboxError) as info:
        sandbox._enter_user_namespace(*_own())
    assert "cannot create a user namespace" in str(info.value)
    assert says in str(info.value)


def test_missing_newuidmap_names_the_package_and_the_fallback_option(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    uid = os.geteuid()
    with pytest.raises(sandbox.SandboxError) as info:
        sandbox._enter_user_namespace([NamespaceMapping(0, uid, 1), NamespaceMapping(1, 100000, 65536)],
                                      _own()[1])
    message = str(info.value)
    assert "newuidmap" in message and "apt install uidmap" in message
    assert f"--uid-map=:{uid}:{uid}:1:" in message


def test_subordinate_ids_by_name_or_uid(tmp_path):
    subuid = tmp_path / "subuid"
    subuid.write_text("other:200000:65536\nalice:100000:65536\n1234:300000:10\nbroken:x:1\nzero:5:0\n")
    assert sandbox._subordinate(str(subuid), "alice", 1000) == (100000, 65536)
    assert sandbox._subordinate(str(subuid), "bob", 1234) == (300000, 10)
    assert sandbox._subordinate(str(subuid), "zero", 1) is None
    assert sandbox._subordinate(str(subuid), "nobody", 1) is None
    assert sandbox._subordinate(str(tmp_path / "missing"), "alice", 1000) is None


def test_default_mapping(monkeypatch):
    ranges = {"/etc/subuid": (100000, 65536), "/etc/subgid": None}
    monkeypatch.setattr(sandbox, "_subordinate", lambda path, name, own: ranges[path])
    uids, gids = sandbox.default_mappings(1000, 1001, "alice")
    # Subordinate uids: the user is 0, its range from 1. No subordinate gids: its own gid as itself.
    assert uids == [NamespaceMapping(0, 1000, 1), NamespaceMapping(1, 100000, 65536)]
    assert gids == [NamespaceMapping(1001, 1001, 1)]
    assert sandbox._needs_helper(uids, 1000) and not sandbox._needs_helper(gids, 1001)


def test_describe_names_the_mapping(tmp_path):
    jail = sandbox.Sandbox("namespace", str(tmp_path))
    jail.user_namespace = ([NamespaceMapping(0, 1000, 1), NamespaceMapping(1, 100000, 65536)],
                           [NamespaceMapping(0, 1000, 1)])
    assert jail.describe() == (f"sandbox namespace (confined to {tmp_path}), user namespace uid 0-0 -> "
                               "1000-1000, 1-65536 -> 100000-165535; gid 0-0 -> 1000-1000 (inside -> host)")
    assert sandbox.Sandbox("none", str(tmp_path)).describe().startswith("sandbox none (not confined)")
