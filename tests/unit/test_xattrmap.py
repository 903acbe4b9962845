"""--xattrmap rules: parsing, guest -> host names, host -> guest listing."""

from __future__ import annotations

import errno

import pytest

from vhostfs.fs.xattrmap import Rule, XattrMap, parse


def refused(m: XattrMap, name: bytes) -> int:
    with pytest.raises(OSError) as ei:
        m.to_host(name)
    return ei.value.errno


def test_parse_rules_with_any_separator_and_blanks():
    rules = parse("  :prefix:client:trusted.:user.virtiofs.:  /ok/all///\n|bad|server|x|y|")
    assert rules == [
        Rule("prefix", True, False, b"trusted.", b"user.virtiofs."),
        Rule("ok", True, True, b"", b""),
        Rule("bad", False, True, b"x", b"y"),
    ]


@pytest.mark.parametrize("text, why", [
    ("", "no rules"),
    ("   ", "no rules"),
    (":prefix:client:a:", "separator"),
    (":nope:all:::", "unknown rule type"),
    (":ok:everyone:::", "unknown scope"),
    (":map::user.x.: :ok:all:::", "last rule"),
])
def test_malformed_rules_are_refused(text, why):
    with pytest.raises(ValueError, match=why):
        parse(text)


def test_prefix_ok_bad_unsupported():
    m = XattrMap.parse(":prefix:all:trusted.:user.virtiofs.: :bad:client:security.:: "
                       ":unsupported:all:system.:: :ok:client:user.:: :bad:server:user.hidden.::")
    assert m.to_host(b"trusted.overlay.opaque") == b"user.virtiofs.trusted.overlay.opaque"
    assert m.to_host(b"user.mine") == b"user.mine"
    assert refused(m, b"security.selinux") == errno.EPERM
    assert refused(m, b"system.posix_acl_access") == errno.ENOTSUP
    assert refused(m, b"other.name") == errno.EPERM  # no rule matches: refused
    assert m.to_guest(b"user.virtiofs.trusted.overlay.opaque") == b"trusted.overlay.opaque"
    assert m.to_guest(b"system.posix_acl_access") is None
    assert m.to_guest(b"user.hidden.x") is None
    assert m.to_guest(b"user.mine") is None  # the only "ok" rule is client-side: hidden when listed
    assert m.capability_name is None  # security.capability is refused, not remapped


def test_map_with_a_key():
    m = XattrMap.parse(":map:trusted.:user.virtiofs.:")
    assert m.to_host(b"trusted.x") == b"user.virtiofs.trusted.x"
    assert m.to_host(b"user.plain") == b"user.plain"
    assert refused(m, b"user.virtiofs.trusted.x") == errno.EPERM  # the storage prefix is off limits
    assert m.to_guest(b"user.virtiofs.trusted.x") == b"trusted.x"
    assert m.to_guest(b"trusted.host.own") is None  # a host trusted.* is not the guest's
    assert m.to_guest(b"user.plain") == b"user.plain"


def test_map_everything_and_capability_name():
    m = XattrMap.parse(":map::user.virtiofs.:")
    assert m.to_host(b"security.capability") == b"user.virtiofs.security.capability"
    assert m.capability_name == b"user.virtiofs.security.capability"
    assert m.to_guest(b"user.virtiofs.security.capability") == b"security.capability"
    assert m.to_guest(b"user.virtiofs.") is None
    assert m.to_guest(b"security.selinux") is None  # every host name without the prefix is hidden
