"""UID/GID translation between the guest and the host (--translate-uid, --translate-gid, --uid-map).

Pure: strings and bytes in, values out; nothing here touches a file.

`IdMap` holds the rules of one kind of ID (UIDs or GIDs), with virtiofsd's spellings and meanings:

- ``guest:G:H:N``: guest IDs [G, G+N) become host IDs [H, H+N) (guest to host only);
- ``host:H:G:N``: host IDs [H, H+N) become guest IDs [G, G+N) (host to guest only);
- ``squash-guest:G:H:N``: every guest ID in [G, G+N) becomes host ID H;
- ``squash-host:H:G:N``: every host ID in [H, H+N) becomes guest ID G;
- ``forbid-guest:G:N``: guest IDs in [G, G+N) may not be given to anything (EPERM);
- ``map:G:H:N``: both ``guest:G:H:N`` and ``host:H:G:N``.

The two directions are independent; an ID no rule of its direction covers stays as it is. The source
ranges of one direction must not overlap (each ID has one meaning), N is at least 1 and no range runs
past 2**32 - 1, the largest ID (which itself means "no ID" to chown(2) and is never one).

`IdTranslation` applies a UID map and a GID map to everything that carries IDs across: request
credentials, owners given by SETATTR, attribute replies, and the IDs inside the POSIX ACL extended
attributes (system.posix_acl_access/default, <linux/posix_acl_xattr.h>) and the root ID of a v3 file
capability (security.capability, struct vfs_ns_cap_data in <linux/capability.h>). It also knows which
host IDs the daemon can use at all: inside a user namespace only those its uid_map/gid_map cover
(`parse_proc_id_map`); a guest ID that would become any other is refused with EPERM, where the host
kernel would answer EINVAL. Host IDs the daemon cannot see, the kernel already reports as the overflow
ID (/proc/sys/kernel/overflowuid, 65534); a host-to-guest rule that lands on 2**32 - 1 gives it too.

`NamespaceMapping` is one line of a user namespace's uid_map or gid_map (--uid-map, --gid-map:
``:inside:outside:count:``, the separator being the first character, as virtiofsd spells it).
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

#: IDs are 32-bit; (u32)-1 is "no ID" (chown(2)'s "leave it"), never a real one.
ID_LIMIT = 1 << 32
NO_ID = ID_LIMIT - 1
#: What an ID that has no name on the other side is shown as (the kernel's default overflowuid/gid).
OVERFLOW_ID = 65534

KINDS = ("guest", "host", "squash-guest", "squash-host", "forbid-guest", "map")

# <linux/posix_acl_xattr.h>: a little-endian header, then entries (tag, perm, id).
ACL_XATTR_HEADER = struct.Struct("<I")
ACL_XATTR_ENTRY = struct.Struct("<HHI")
assert ACL_XATTR_HEADER.size == 4 and ACL_XATTR_ENTRY.size == 8
ACL_XATTR_VERSION = 2
ACL_USER = 0x02  # e_id is a UID
ACL_GROUP = 0x08  # e_id is a GID
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")

# <linux/capability.h>: struct vfs_ns_cap_data, a v3 capability with the namespace's root UID.
VFS_NS_CAP_DATA = struct.Struct("<IIIIII")
assert VFS_NS_CAP_DATA.size == 24
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_3 = 0x03000000
CAPABILITY_NAME = b"security.capability"


class IdMapError(ValueError):
    """A rule that does not parse or that conflicts with another; the message names the rule."""


def _eperm() -> OSError:
    return OSError(errno.EPERM, os.strerror(errno.EPERM))


@dataclass(frozen=True)
class _Range:
    """Source IDs [start, start + count) become `target` + (id - start), or `target` itself for a
    squash; `target` None refuses them (forbid-guest). `rule` is the text it came from."""

    start: int
    count: int
    target: int | None
    squash: bool
    rule: str

    def apply(self, value: int) -> int:
        if self.target is None:
            raise _eperm()
        return self.target if self.squash else self.target + (value - self.start)


def _number(text: str, rule: str, what: str) -> int:
    if not text.isdigit():
        raise IdMapError(f"{rule!r}: {what} {text!r} is not a number")
    value = int(text)
    if value >= ID_LIMIT:
        raise IdMapError(f"{rule!r}: {what} {value} is not a 32-bit ID")
    return value


def _check_span(start: int, count: int, rule: str, what: str) -> None:
    if count < 1:
        raise IdMapError(f"{rule!r}: the count must be at least 1")
    if start + count > ID_LIMIT:
        raise IdMapError(f"{rule!r}: the {what} range [{start}, {start + count}) runs past {ID_LIMIT - 1}")


def parse_rule(rule: str) -> tuple[list[_Range], list[_Range]]:
    """One --translate-uid/--translate-gid rule -> (its guest-to-host ranges, its host-to-guest ranges).

    Raises IdMapError, naming the rule, for an unknown type, a wrong number of fields, a field that is
    not a decimal 32-bit number, a count of 0 or a range past 2**32 - 1.
    """
    kind, _, rest = rule.partition(":")
    if kind not in KINDS:
        raise IdMapError(f"{rule!r}: unknown type {kind!r} (expected one of {', '.join(KINDS)})")
    fields = rest.split(":")
    if kind == "forbid-guest":
        if len(fields) != 2:
            raise IdMapError(f"{rule!r}: expected forbid-guest:<guest base>:<count>")
        base = _number(fields[0], rule, "guest base")
        count = _number(fields[1], rule, "count")
        _check_span(base, count, rule, "guest")
        return [_Range(base, count, None, False, rule)], []
    if len(fields) != 3:
        raise IdMapError(f"{rule!r}: expected {kind}:<source>:<target>:<count>")
    source = _number(fields[0], rule, "source")
    target = _number(fields[1], rule, "target")
    count = _number(fields[2], rule, "count")
    if kind in ("guest", "host", "map"):
        _check_span(source, count, rule, "source")
        _check_span(target, count, rule, "target")
    else:
        _check_span(source, count, rule, "source")
    if kind == "guest":
        return [_Range(source, count, target, False, rule)], []
    if kind == "host":
        return [], [_Range(source, count, target, False, rule)]
    if kind == "squash-guest":
        return [_Range(source, count, target, True, rule)], []
    if kind == "squash-host":
        return [], [_Range(source, count, target, True, rule)]
    # map: guest [source, +count) <-> host [target, +count)
    return [_Range(source, count, target, False, rule)], [_Range(target, count, source, False, rule)]


class _Direction:
    """The ranges of one direction, sorted, with their overlaps refused."""

    def __init__(self, ranges: list[_Range], option: str, side: str) -> None:
        ranges = sorted(ranges, key=lambda r: r.start)
        for before, after in pairwise(ranges):
            end = min(before.start + before.count, after.start + after.count)
            if after.start < end:
                raise IdMapError(f"{option}: {after.rule!r} overlaps {before.rule!r} ({side} IDs "
                                 f"{after.start} to {end - 1})")
        self._ranges = ranges
        self._starts = [r.start for r in ranges]

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def apply(self, value: int) -> int:
        i = bisect.bisect_right(self._starts, value) - 1
        if i >= 0:
            r = self._ranges[i]
            if value < r.start + r.count:
                return r.apply(value)
        return value


class IdMap:
    """The --translate-uid (or --translate-gid) rules `rules`, checked together (see the module doc).

    `option` names the option in error messages. Raises IdMapError for a rule that does not parse or
    whose source range overlaps another's in the same direction. Without rules every ID maps to itself.
    """

    def __init__(self, rules: Iterable[str] = (), option: str = "--translate-uid") -> None:
        self.rules = tuple(rules)
        to_host: list[_Range] = []
        to_guest: list[_Range] = []
        for rule in self.rules:
            try:
                g, h = parse_rule(rule)
            except IdMapError as e:
                raise IdMapError(f"{option}: {e}") from None
            to_host += g
            to_guest += h
        self._to_host = _Direction(to_host, option, "guest")
        self._to_guest = _Direction(to_guest, option, "host")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and self.rules == other.rules

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"IdMap({list(self.rules)!r})"

    @property
    def identity(self) -> bool:
        """Whether no rule changes anything."""
        return not self._to_host and not self._to_guest

    def to_host(self, guest_id: int) -> int:
        """The host ID of `guest_id`; OSError(EPERM) if a forbid-guest rule covers it."""
        return self._to_host.apply(guest_id)

    def to_guest(self, host_id: int) -> int:
        """The guest ID of `host_id` (2**32 - 1 from a rule shows as OVERFLOW_ID)."""
        value = self._to_guest.apply(host_id)
        return OVERFLOW_ID if value == NO_ID else value


def parse_proc_id_map(text: str) -> list[tuple[int, int]]:
    """The (first, count) ranges of IDs a process can use, from its /proc/PID/uid_map or gid_map
    ("inside outside count" lines); the initial namespace's is [(0, 4294967295)]."""
    ranges = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            ranges.append((int(fields[0]), int(fields[2])))
    return sorted(ranges)


def _covers(ranges: Sequence[tuple[int, int]], value: int) -> bool:
    return any(first <= value < first + count for first, count in ranges)


class IdTranslation:
    """A UID map and a GID map applied at every crossing (see the module doc).

    `usable_uids`/`usable_gids` are the host IDs the daemon may give files, as parse_proc_id_map
    returns them (None: all but 2**32 - 1). The `*_to_host` methods raise OSError(EPERM) for a guest
    ID that is forbidden or would become a host ID the daemon cannot use.
    """

    def __init__(self, uids: IdMap, gids: IdMap, usable_uids: Sequence[tuple[int, int]] | None = None,
                 usable_gids: Sequence[tuple[int, int]] | None = None) -> None:
        self.uids = uids
        self.gids = gids
        full = [(0, NO_ID)]
        self._usable_uids = None if usable_uids is None or list(usable_uids) == full else list(usable_uids)
        self._usable_gids = None if usable_gids is None or list(usable_gids) == full else list(usable_gids)

    @property
    def identity(self) -> bool:
        """Whether nothing is translated nor refused beyond what the host kernel does by itself."""
        return (self.uids.identity and self.gids.identity and self._usable_uids is None
                and self._usable_gids is None)

    def uid_to_host(self, uid: int) -> int:
        host = self.uids.to_host(uid)
        if host == NO_ID or (self._usable_uids is not None and not _covers(self._usable_uids, host)):
            raise _eperm()
        return host

    def gid_to_host(self, gid: int) -> int:
        host = self.gids.to_host(gid)
        if host == NO_ID or (self._usable_gids is not None and not _covers(self._usable_gids, host)):
            raise _eperm()
        return host

    def uid_to_guest(self, uid: int) -> int:
        return self.uids.to_guest(uid)

    def gid_to_guest(self, gid: int) -> int:
        return self.gids.to_guest(gid)

    # -- extended attributes carrying IDs ---------------------------------------------------------
    def xattr_to_host(self, name: bytes, value: bytes) -> bytes:
        """`value` of guest attribute `name` with its IDs made host IDs (other attributes unchanged).

        A POSIX ACL that is not in the xattr format is refused with EINVAL, never stored untranslated;
        an ID that may not be given gets EPERM.
        """
        if name in ACL_NAMES:
            return _map_acl(value, self.uid_to_host, self.gid_to_host)
        if name == CAPABILITY_NAME:
            return _map_capability(value, self.uid_to_host)
        return value

    def xattr_to_guest(self, name: bytes, value: bytes) -> bytes:
        """`value` of host attribute `name` (by its guest name) with its IDs made guest IDs."""
        if name in ACL_NAMES:
            try:
                return _map_acl(value, self.uid_to_guest, self.gid_to_guest)
            except OSError:
                return value  # not an ACL the host kernel made: nothing to translate
        if name == CAPABILITY_NAME:
            return _map_capability(value, self.uid_to_guest)
        return value


def _map_acl(value: bytes, uid: Callable[[int], int], gid: Callable[[int], int]) -> bytes:
    """The ACL `value` (xattr format) with ACL_USER ids through `uid` and ACL_GROUP ids through `gid`."""
    if (len(value) < ACL_XATTR_HEADER.size or (len(value) - ACL_XATTR_HEADER.size) % ACL_XATTR_ENTRY.size
            or ACL_XATTR_HEADER.unpack_from(value)[0] != ACL_XATTR_VERSION):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    out = bytearray(value)
    for offset in range(ACL_XATTR_HEADER.size, len(value), ACL_XATTR_ENTRY.size):
        tag, perm, ident = ACL_XATTR_ENTRY.unpack_from(value, offset)
        if tag == ACL_USER:
            ACL_XATTR_ENTRY.pack_into(out, offset, tag, perm, uid(ident))
        elif tag == ACL_GROUP:
            ACL_XATTR_ENTRY.pack_into(out, offset, tag, perm, gid(ident))
    return bytes(out)


def _map_capability(value: bytes, uid: Callable[[int], int]) -> bytes:
    """A v3 file capability with its root ID through `uid`; other revisions (no ID) unchanged."""
    if len(value) != VFS_NS_CAP_DATA.size:
        return value
    fields = list(VFS_NS_CAP_DATA.unpack(value))
    if fields[0] & VFS_CAP_REVISION_MASK != VFS_CAP_REVISION_3:
        return value
    fields[5] = uid(fields[5])
    return VFS_NS_CAP_DATA.pack(*fields)


@dataclass(frozen=True)
class NamespaceMapping:
    """One uid_map/gid_map line: IDs [inside, inside + count) in the namespace are [outside, ...) outside."""

    inside: int
    outside: int
    count: int

    @classmethod
    def parse(cls, text: str, option: str = "--uid-map") -> NamespaceMapping:
        """Parses ``:inside:outside:count:`` (any separator character, given first; the last one may be
        left out). Raises IdMapError naming the option and the text."""
        if len(text) < 2:
            raise IdMapError(f"{option}: {text!r} is not :inside:outside:count:")
        sep = text[0]
        fields = text[1:].removesuffix(sep).split(sep)
        if len(fields) != 3:
            raise IdMapError(f"{option}: {text!r} is not {sep}inside{sep}outside{sep}count{sep}")
        try:
            inside, outside, count = (_number(f, text, what)
                                      for f, what in zip(fields, ("inside", "outside", "count"), strict=True))
            _check_span(inside, count, text, "inside")
            _check_span(outside, count, text, "outside")
        except IdMapError as e:
            raise IdMapError(f"{option}: {e}") from None
        return cls(inside, outside, count)

    def __str__(self) -> str:
        last = self.count - 1
        return f"{self.inside}-{self.inside + last} -> {self.outside}-{self.outside + last}"


def check_namespace_mappings(mappings: Sequence[NamespaceMapping], option: str) -> None:
    """Raises IdMapError if two lines overlap inside or outside (the kernel refuses such a map)."""
    for side in ("inside", "outside"):
        spans = sorted(mappings, key=lambda m: getattr(m, side))
        for before, after in pairwise(spans):
            if getattr(after, side) < getattr(before, side) + before.count:
                raise IdMapError(f"{option}: {after} overlaps {before} ({side} the namespace)")
