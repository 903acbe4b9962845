"""Extended attribute name mapping between guest and host: virtiofsd's --xattrmap rule syntax.

A mapping is a list of rules tried in order; the first that matches decides. Each rule is written as
fields separated by a character of the author's choice, the first non-blank character of the rule,
which also ends it:

    :type:scope:key:prepend:

- type `prefix`: a guest name starting with `key` becomes `prepend` + name on the host; a host name
  starting with `prepend` is listed to the guest with `prepend` stripped.
- type `ok`: the name passes unchanged. type `bad`: the guest gets EPERM, the host name is hidden.
  type `unsupported`: the same with ENOTSUP.
- scope `client` applies the rule to names from the guest (get/set/removexattr), matched on `key`;
  `server` to names from the host (listxattr), matched on `prepend`; `all` to both.
- `:map:key:prepend:` is the common case in one rule, and must be the last: guest names starting with
  `key` are stored under `prepend`, host names already carrying `prepend`-like names are kept apart
  from the guest, and everything else passes unchanged. An empty `key` maps every name and hides
  every host name without `prepend`.

A guest name no rule matches is refused with EPERM, and a host name no rule matches is not listed.

When the mapping stores security.capability under another name, the host kernel no longer removes
it when the file is written or changes owner (the capability would survive a modification, which
the kernel forbids); `capability_name` gives that host name so the file system removes it itself.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

TYPES = ("prefix", "ok", "bad", "unsupported")
SCOPES = ("client", "server", "all")
SECURITY_CAPABILITY = b"security.capability"


@dataclass(frozen=True, slots=True)
class Rule:
    """One parsed rule: `type` from TYPES, matching `client`/`server` side, `key` and `prepend`."""

    type: str
    client: bool
    server: bool
    key: bytes
    prepend: bytes


def _fields(text: str, pos: int, sep: str, count: int) -> tuple[list[str], int]:
    """`count` fields each ended by `sep`, starting at `pos`; ValueError if a separator is missing."""
    out = []
    for _ in range(count):
        end = text.find(sep, pos)
        if end < 0:
            raise ValueError(f"xattrmap: rule at offset {pos} is missing a {sep!r} separator")
        out.append(text[pos:end])
        pos = end + 1
    return out, pos


def _map_rules(key: bytes, prepend: bytes) -> list[Rule]:
    """The rules one `:map:key:prepend:` stands for (virtiofsd's expansion)."""
    rules = [Rule("prefix", True, True, key, prepend)]
    if not key:
        # Every guest name is prefixed, so any host name without the prefix is hidden.
        rules.append(Rule("bad", True, True, b"", b""))
    else:
        rules += [
            Rule("bad", False, True, b"", key),      # host names that look like unmapped guest ones
            Rule("bad", True, False, prepend, b""),  # the guest naming the storage prefix directly
            Rule("ok", True, True, b"", b""),
        ]
    return rules


def parse(text: str) -> list[Rule]:
    """Parses a --xattrmap string into rules; ValueError (with the reason) for a malformed one."""
    rules: list[Rule] = []
    pos = 0
    mapped = False
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        if mapped:
            raise ValueError("xattrmap: a 'map' rule must be the last rule")
        sep = text[pos]
        (kind,), pos = _fields(text, pos + 1, sep, 1)
        if kind == "map":
            (key, prepend), pos = _fields(text, pos, sep, 2)
            rules += _map_rules(os.fsencode(key), os.fsencode(prepend))
            mapped = True
            continue
        if kind not in TYPES:
            raise ValueError(f"xattrmap: unknown rule type {kind!r}")
        (scope, key, prepend), pos = _fields(text, pos, sep, 3)
        if scope not in SCOPES:
            raise ValueError(f"xattrmap: unknown scope {scope!r}")
        rules.append(Rule(kind, scope != "server", scope != "client", os.fsencode(key), os.fsencode(prepend)))
    if not rules:
        raise ValueError("xattrmap: no rules")
    return rules


class XattrMap:
    """Maps extended attribute names with `rules` (see the module doc)."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        try:
            host = self.to_host(SECURITY_CAPABILITY)
        except OSError:
            host = None
        #: The host name of a remapped security.capability, else None (see the module doc).
        self.capability_name = host if host is not None and host != SECURITY_CAPABILITY else None

    @classmethod
    def parse(cls, text: str) -> XattrMap:
        """A map from --xattrmap text; ValueError for a malformed one."""
        return cls(parse(text))

    def to_host(self, name: bytes) -> bytes:
        """The host name for guest attribute `name`; EPERM (bad) or ENOTSUP (unsupported) if refused."""
        for rule in self.rules:
            if rule.client and name.startswith(rule.key):
                if rule.type == "prefix":
                    return rule.prepend + name
                if rule.type == "ok":
                    return name
                code = errno.EPERM if rule.type == "bad" else errno.ENOTSUP
                raise OSError(code, os.strerror(code))
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    def to_guest(self, name: bytes) -> bytes | None:
        """The name the guest lists for host attribute `name`, or None to hide it."""
        for rule in self.rules:
            if rule.server and name.startswith(rule.prepend):
                if rule.type == "prefix":
                    stripped = name[len(rule.prepend):]
                    return stripped or None
                return name if rule.type == "ok" else None
        return None
