"""Least privilege: the daemon keeps only the capabilities the passthrough uses (capabilities(7)).

The passthrough, running as root, creates files as the guest's caller (setfsuid/setfsgid need
CAP_SETUID and CAP_SETGID), gives them their owner (CAP_CHOWN), and must read, write and change files
of any owner the way the guest's own kernel allows them (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID),
make device nodes (CAP_MKNOD) and set file capabilities (CAP_SETFCAP). Opening files by handle
(open_by_handle_at(2)) needs CAP_DAC_READ_SEARCH as well. Everything else is dropped from the
effective, permitted and inheritable sets, the ambient set is cleared, and the bounding set is cut
to the same list where the process may (CAP_SETPCAP), so no later execve(2) could regain the rest.

Capabilities are per thread (capset(2) acts on the calling thread) and threads inherit them from
the thread that creates them: `drop` runs in the main thread before any worker thread exists.

`--modcaps=+sys_admin:-mknod` adjusts the list as virtiofsd's option does: capability names with or
without the `CAP_` prefix, in any case, each preceded by `+` (keep it too) or `-` (drop it),
separated by colons.
"""

from __future__ import annotations

import logging

from vhostfs import native

log = logging.getLogger("vhostfs.caps")

#: Capability numbers, <linux/capability.h>.
CAPABILITIES = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23, "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
_NAMES = {number: name for name, number in CAPABILITIES.items()}

#: What the passthrough needs (see the module doc).
PASSTHROUGH_CAPABILITIES = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETGID", "CAP_SETUID", "CAP_MKNOD",
    "CAP_SETFCAP",
})
#: Added when files are opened by handle (open_by_handle_at(2) checks it).
FILE_HANDLE_CAPABILITY = "CAP_DAC_READ_SEARCH"
#: Added when an overlay keeps its markers in trusted.* attributes, which the kernel lets only
#: CAP_SYS_ADMIN read or write (xattr(7)).
TRUSTED_XATTR_CAPABILITY = "CAP_SYS_ADMIN"

# <linux/prctl.h>
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class CapabilityError(Exception):
    """A --modcaps list that does not parse, or capabilities that could not be set."""


def capability_name(text: str) -> str:
    """The canonical `CAP_*` name of `text` ("sys_admin", "CAP_SYS_ADMIN"); raises CapabilityError."""
    name = text.strip().upper()
    if not name.startswith("CAP_"):
        name = "CAP_" + name
    if name not in CAPABILITIES:
        raise CapabilityError(f"unknown capability {text!r}")
    return name


def parse_modcaps(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """Parses a --modcaps list such as "+sys_admin:-chown" into (added, removed) `CAP_*` names.

    Raises CapabilityError for an empty item, an item without its `+` or `-`, an unknown name, or a
    capability both added and removed.
    """
    added: set[str] = set()
    removed: set[str] = set()
    for item in text.split(":"):
        if len(item) < 2 or item[0] not in "+-":
            raise CapabilityError(f"--modcaps: {item!r} is not +name or -name")
        (added if item[0] == "+" else removed).add(capability_name(item[1:]))
    if added & removed:
        raise CapabilityError(f"--modcaps: {', '.join(sorted(added & removed))} both added and removed")
    return frozenset(added), frozenset(removed)


def wanted(modcaps: str | None = None, file_handles: bool = False,
           trusted_xattrs: bool = False) -> tuple[frozenset[str], frozenset[str]]:
    """The capabilities the daemon keeps, and those of them --modcaps asked for (which must be held).

    The passthrough's list, plus CAP_DAC_READ_SEARCH with `file_handles` and CAP_SYS_ADMIN with
    `trusted_xattrs`, adjusted by `modcaps`; raises CapabilityError for a bad `modcaps`.
    """
    keep = set(PASSTHROUGH_CAPABILITIES)
    if file_handles:
        keep.add(FILE_HANDLE_CAPABILITY)
    if trusted_xattrs:
        keep.add(TRUSTED_XATTR_CAPABILITY)
    added: frozenset[str] = frozenset()
    if modcaps:
        added, removed = parse_modcaps(modcaps)
        keep = (keep | added) - removed
    return frozenset(keep), added


def mask(names: frozenset[str] | set[str]) -> int:
    """The bit mask of capability `names` (capability n is bit n)."""
    bits = 0
    for name in names:
        bits |= 1 << CAPABILITIES[name]
    return bits


def names(bits: int) -> list[str]:
    """The `CAP_*` names of the capabilities set in `bits`, by number (unknown ones as the number)."""
    return [_NAMES.get(n, str(n)) for n in range(bits.bit_length()) if bits >> n & 1]


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return max(CAPABILITIES.values())


def drop(keep: frozenset[str], required: frozenset[str] = frozenset()) -> None:
    """Reduces the calling thread's capabilities to `keep` (see the module doc); raises CapabilityError.

    Capabilities are never gained: `keep` is trimmed to what the process is permitted (a container
    may withhold some), except that the `required` ones (those --modcaps added) must all be held.
    A process that holds no capability at all (not root) is left as it is.
    """
    effective, permitted, _ = native.capget()
    lacking = names(mask(required) & ~permitted)
    if lacking:
        raise CapabilityError(f"--modcaps: the daemon does not hold {', '.join(lacking)}")
    if not permitted:
        log.debug("no capabilities held: nothing to drop")
        return
    keep_bits = mask(keep) & permitted
    # The bounding set first: dropping from it needs CAP_SETPCAP, which the capset below removes.
    if effective >> CAPABILITIES["CAP_SETPCAP"] & 1:
        for cap in range(_last_cap() + 1):
            if not keep_bits >> cap & 1 and native.prctl(PR_CAPBSET_READ, cap) == 1:
                try:
                    native.prctl(PR_CAPBSET_DROP, cap)
                except OSError as e:
                    raise CapabilityError(
                        f"cannot drop {_NAMES.get(cap, cap)} from the bounding set: {e}") from e
    else:
        log.info("no CAP_SETPCAP: the capability bounding set is left as it is")
    try:
        native.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        native.capset(keep_bits, keep_bits, 0)
    except OSError as e:
        raise CapabilityError(f"cannot reduce capabilities to {', '.join(names(keep_bits))}: {e}") from e
    log.info("capabilities: %s", ", ".join(names(keep_bits)) or "none")
