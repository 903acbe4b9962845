"""The UID/GID translation rules (vhostfs.fs.idmap): parsing, both directions, squash, forbid, overflow,
the IDs inside ACLs and file capabilities, and user-namespace map lines."""

from __future__ import annotations

import errno
import struct

import pytest

from vhostfs.fs.idmap import (
    ACL_GROUP,
    ACL_USER,
    NO_ID,
    OVERFLOW_ID,
    IdMap,
    IdMapError,
    IdTranslation,
    NamespaceMapping,
    check_namespace_mappings,
    parse_proc_id_map,
)

ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x04, 0x10, 0x20


def _eperm(call, *args):
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == errno.EPERM


def test_no_rules_is_the_identity():
    ids = IdMap()
    assert ids.identity
    assert [ids.to_host(i) for i in (0, 1000, NO_ID - 1)] == [0, 1000, NO_ID - 1]
    assert ids.to_guest(12345) == 12345


def test_map_is_both_directions_and_leaves_the_rest():
    ids = IdMap(["map:1000:101000:100"])
    assert not ids.identity
    assert ids.to_host(1000) == 101000
    assert ids.to_host(1099) == 101099
    assert ids.to_host(1100) == 1100  # past the range: unchanged
    assert ids.to_host(999) == 999
    assert ids.to_guest(101050) == 1050
    assert ids.to_guest(1050) == 1050  # a host ID no host-side rule names


def test_guest_and_host_rules_are_one_way():
    ids = IdMap(["guest:0:5000:10"])
    assert ids.to_host(3) == 5003
    assert ids.to_guest(5003) == 5003
    ids = IdMap(["host:5000:0:10"])
    assert ids.to_guest(5003) == 3
    assert ids.to_host(3) == 3


def test_squash_both_ways():
    # virtiofsd's README example: every guest ID becomes the daemon's, which the guest sees as 1000.
    ids = IdMap(["squash-guest:0:1001:4294967295", "host:1001:1000:1"])
    assert ids.to_host(0) == ids.to_host(1000) == ids.to_host(NO_ID - 1) == 1001
    assert ids.to_guest(1001) == 1000
    assert ids.to_guest(0) == 0
    ids = IdMap(["squash-host:100000:0:65536"])
    assert ids.to_guest(100000) == ids.to_guest(165535) == 0
    assert ids.to_guest(165536) == 165536


def test_forbid_guest_refuses_with_eperm():
    ids = IdMap(["forbid-guest:5000:10", "map:0:100000:5000"])
    _eperm(ids.to_host, 5000)
    _eperm(ids.to_host, 5009)
    assert ids.to_host(5010) == 5010
    assert ids.to_host(4999) == 104999
    assert ids.to_guest(5005) == 5005  # forbidding says nothing about host IDs


def test_host_rule_onto_the_last_id_shows_the_overflow_id():
    ids = IdMap([f"host:10:{NO_ID - 1}:2"])
    assert ids.to_guest(10) == NO_ID - 1
    assert ids.to_guest(11) == OVERFLOW_ID


def test_rules_touching_but_not_overlapping_are_fine():
    ids = IdMap(["map:0:100000:1000", "map:1000:5000:1", "squash-guest:1001:7:10"])
    assert ids.to_host(999) == 100999
    assert ids.to_host(1000) == 5000
    assert ids.to_host(1005) == 7


@pytest.mark.parametrize("rules, named", [
    (["map:0:100000:1000", "guest:999:1:5"], "'guest:999:1:5' overlaps 'map:0:100000:1000'"),
    (["squash-guest:0:1:10", "forbid-guest:5:1"], "'squash-guest:0:1:10'"),
    (["host:100:0:10", "map:0:105:1"], "overlaps"),  # host side: 100-109 and 105
    (["map:0:0:10", "map:0:0:10"], "overlaps"),
])
def test_overlapping_sources_are_refused_naming_the_rules(rules, named):
    with pytest.raises(IdMapError) as info:
        IdMap(rules, option="--translate-uid")
    assert named in str(info.value)
    assert str(info.value).startswith("--translate-uid: ")


def test_same_target_from_two_directions_is_not_an_overlap():
    # Sources overlap per direction only: a guest range and a host range may cover the same numbers.
    ids = IdMap(["guest:0:1000:10", "host:0:1000:10"])
    assert ids.to_host(5) == 1005 and ids.to_guest(5) == 1005


@pytest.mark.parametrize("rule, message", [
    ("bogus:0:0:1", "unknown type 'bogus'"),
    ("map:0:0", "expected map:<source>:<target>:<count>"),
    ("map:0:0:1:2", "expected map"),
    ("forbid-guest:0:1:2", "expected forbid-guest:<guest base>:<count>"),
    ("map:a:0:1", "source 'a' is not a number"),
    ("map:-1:0:1", "is not a number"),
    ("map:0:0:0", "the count must be at least 1"),
    ("map:4294967295:0:2", "runs past"),
    ("guest:0:4294967290:10", "the target range"),
    ("squash-guest:0:4294967296:1", "not a 32-bit ID"),
    ("", "unknown type ''"),
])
def test_malformed_rules_are_refused_naming_the_rule(rule, message):
    with pytest.raises(IdMapError) as info:
        IdMap([rule], option="--translate-gid")
    assert message in str(info.value)
    assert repr(rule) in str(info.value) and "--translate-gid" in str(info.value)


def test_squash_of_every_id_is_accepted():
    # [0, 2**32 - 1): every ID but "no ID".
    assert IdMap(["squash-guest:0:7:4294967295"]).to_host(NO_ID - 1) == 7


# -- the translation at the crossings --------------------------------------------------------------
def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _entries(value: bytes) -> list[tuple[int, int, int]]:
    return [struct.unpack_from("<HHI", value, off) for off in range(4, len(value), 8)]


def _translation(**kw) -> IdTranslation:
    return IdTranslation(IdMap(["map:1000:101000:100", "forbid-guest:2000:1"], option="--translate-uid"),
                         IdMap(["map:1000:201000:100"], option="--translate-gid"), **kw)


def test_acl_ids_are_translated_both_ways_and_only_user_and_group_entries():
    ids = _translation()
    guest = _acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 6, 1001), (ACL_GROUP_OBJ, 4, NO_ID),
                 (ACL_GROUP, 4, 1002), (ACL_MASK, 6, NO_ID), (ACL_OTHER, 4, NO_ID))
    host = ids.xattr_to_host(b"system.posix_acl_access", guest)
    assert _entries(host) == [(ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 6, 101001), (ACL_GROUP_OBJ, 4, NO_ID),
                              (ACL_GROUP, 4, 201002), (ACL_MASK, 6, NO_ID), (ACL_OTHER, 4, NO_ID)]
    assert ids.xattr_to_guest(b"system.posix_acl_access", host) == guest
    assert ids.xattr_to_guest(b"system.posix_acl_default", ids.xattr_to_host(
        b"system.posix_acl_default", guest)) == guest


def test_acl_naming_a_forbidden_or_unusable_id_is_refused():
    ids = _translation(usable_uids=[(0, 150000)])
    _eperm(ids.xattr_to_host, b"system.posix_acl_access", _acl((ACL_USER, 6, 2000)))
    # 1099 -> 101099 is usable, 160000 (unmapped, so itself) is not in the namespace.
    ids.xattr_to_host(b"system.posix_acl_access", _acl((ACL_USER, 6, 1099)))
    _eperm(ids.xattr_to_host, b"system.posix_acl_access", _acl((ACL_USER, 6, 160000)))


@pytest.mark.parametrize("value", [b"", b"\x02\0\0", _acl((ACL_USER, 6, 1))[:-1], struct.pack("<I", 1)])
def test_malformed_acl_is_einval_never_stored_untranslated(value):
    with pytest.raises(OSError) as info:
        _translation().xattr_to_host(b"system.posix_acl_access", value)
    assert info.value.errno == errno.EINVAL
    # From the host, what is not an ACL is passed on as it is.
    assert _translation().xattr_to_guest(b"system.posix_acl_access", value) == value


def _cap_v3(rootid: int) -> bytes:
    return struct.pack("<IIIIII", 0x03000000 | 1, 0x400, 0, 0, 0, rootid)


def test_v3_capability_root_id_is_translated():
    ids = _translation()
    host = ids.xattr_to_host(b"security.capability", _cap_v3(1005))
    assert host == _cap_v3(101005)
    assert ids.xattr_to_guest(b"security.capability", host) == _cap_v3(1005)
    _eperm(ids.xattr_to_host, b"security.capability", _cap_v3(2000))


def test_v2_capability_and_other_attributes_are_left_alone():
    ids = _translation()
    v2 = struct.pack("<IIIII", 0x02000000 | 1, 0x400, 0, 0, 0)
    assert ids.xattr_to_host(b"security.capability", v2) == v2
    assert ids.xattr_to_host(b"user.acl", _acl((ACL_USER, 6, 1001))) == _acl((ACL_USER, 6, 1001))


def test_credentials_outside_the_namespace_are_eperm():
    uid_map = parse_proc_id_map("         0       1000          1\n         1     100000      65536\n")
    assert uid_map == [(0, 1), (1, 65536)]
    ids = IdTranslation(IdMap(), IdMap(), usable_uids=uid_map, usable_gids=uid_map)
    assert not ids.identity
    assert ids.uid_to_host(0) == 0 and ids.uid_to_host(65536) == 65536
    _eperm(ids.uid_to_host, 65537)
    _eperm(ids.gid_to_host, 70000)
    _eperm(ids.uid_to_host, NO_ID)


def test_initial_namespace_is_no_restriction():
    full = parse_proc_id_map("         0          0 4294967295\n")
    assert IdTranslation(IdMap(), IdMap(), full, full).identity


# -- --uid-map / --gid-map lines -------------------------------------------------------------------
def test_namespace_mapping_spellings():
    assert NamespaceMapping.parse(":0:100000:65536:") == NamespaceMapping(0, 100000, 65536)
    assert NamespaceMapping.parse("/1/2/3") == NamespaceMapping(1, 2, 3)
    assert str(NamespaceMapping(0, 1000, 1)) == "0-0 -> 1000-1000"


@pytest.mark.parametrize("text", ["", ":", ":0:1:", ":0:1:2:3:", ":a:1:1:", ":0:1:0:", ":4294967295:0:2:"])
def test_bad_namespace_mappings(text):
    with pytest.raises(IdMapError) as info:
        NamespaceMapping.parse(text, option="--gid-map")
    assert "--gid-map" in str(info.value)


def test_overlapping_namespace_mappings():
    check_namespace_mappings([NamespaceMapping(0, 1000, 1), NamespaceMapping(1, 100000, 65536)], "--uid-map")
    with pytest.raises(IdMapError, match="inside"):
        check_namespace_mappings([NamespaceMapping(0, 1000, 2), NamespaceMapping(1, 100000, 5)], "--uid-map")
    with pytest.raises(IdMapError, match="outside"):
        check_namespace_mappings([NamespaceMapping(0, 1000, 2), NamespaceMapping(5, 1001, 5)], "--uid-map")
