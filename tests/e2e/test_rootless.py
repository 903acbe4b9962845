"""A rootless daemon: started by an unprivileged host user, with ID translation, served to a real guest.

One boot. The tests make a throw-away host user with 65536 subordinate IDs (/etc/subuid, /etc/subgid)
and start the daemon as that user with its defaults, so the sandbox is a user namespace mapping the
user as 0 and its subordinate IDs S, S+1, ... as 1, 2, ...; on top of it
`--translate-uid/--translate-gid map:2000:1000:100` (guest 2000-2099 are namespace 1000-1099) and
`forbid-guest:5000:1`. So a guest ID g becomes host ID:

- g = 0 (the guest's root): the user itself;
- 2000 <= g < 2100: S + (g - 2000 + 1000) - 1;
- other g <= 65536: S + g - 1; g = 5000 is refused; g > 65536 has no host ID and is refused too.

In the guest, root creates files, gives them mapped owners, sets an ACL naming mapped IDs, and runs
pjdfstest-style ownership checks as guest users; the host checks owners and ACL entries. A file of the
host's root (no ID in the namespace) shows as the overflow ID, and the guest's root can neither write
it nor change its mode: it is only ever the unprivileged user.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import rootless_user
from tests.rootless_user import HostUser

from .guest import GuestImages, GuestResult, boot_guest
from .test_guest_semantics import (
    ACL_USER,
    GUEST_PRELUDE,
    _acl_entries,
    _booted,
    _need,
    _ok,
    _run,
    _value,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

ACL_GROUP = 0x08


def _host_id(user: HostUser, guest: int) -> int:
    """The host ID that guest ID `guest` becomes (see the module doc)."""
    inside = guest - 2000 + 1000 if 2000 <= guest < 2100 else guest
    return user.sub + inside - 1


@pytest.fixture(scope="module")
def host_user() -> Iterator[HostUser]:
    with rootless_user.host_user() as user:
        yield user


ROOTLESS_SCRIPT = r"""
# As the guest's root, which is the unprivileged host user.
run create sh -c 'echo by-root >created && stat -c "%u:%g" created'
run chown-mapped sh -c 'cp created owned && chown 2001:2002 owned && stat -c "%u:%g" owned'
run chown-plain sh -c 'cp created plain && chown 3:4 plain && stat -c "%u:%g" plain'
run chown-unmapped chown 70000 created
run chown-forbidden chown 5000 created
run chgrp-unmapped chgrp 70000 created
run owner-after stat -c "%u:%g" created
mkdir -m 777 shared
run mkdir-as-user as_user 2005 sh -c 'mkdir shared/d && echo x >shared/f && ln -s f shared/l &&
    mkfifo shared/p && stat -c "%u:%g" shared/d shared/f'
run create-as-forbidden as_user 5000 sh -c 'echo x >shared/nope'
if have setfacl && have getfacl; then
    run setfacl sh -c 'echo acl >aclfile && setfacl -m u:2003:rw,g:2004:r aclfile'
    run getfacl getfacl -cn aclfile
    run setfacl-default sh -c 'mkdir acldir && setfacl -d -m u:2006:rwx acldir && getfacl -cdn acldir'
    run setfacl-unmapped setfacl -m u:70000:r aclfile
    run setfacl-forbidden setfacl -m u:5000:r aclfile
fi
# The host root's file: no ID in the user namespace.
run root-owner stat -c "%u:%g" root-file
run root-write sh -c 'echo guest >>root-file'
run root-chmod chmod 666 root-file
run root-chown chown 0:0 root-file
run root-unlink-dir rm -f root-dir/inner
# pjdfstest-style ownership checks (chown/00, chmod/00 in spirit) under the map translation.
mkdir -m 777 own
run pj-create as_user 2010 sh -c 'echo x >own/f && chmod 644 own/f && stat -c "%u:%g %a" own/f'
run pj-giveaway as_user 2010 chown 2011 own/f
run pj-chgrp-other as_user 2010 chgrp 2011 own/f
run pj-chgrp-own as_user 2010 chgrp 2010 own/f
run pj-chmod-nonowner as_user 2011 chmod 666 own/f
run pj-chmod-owner as_user 2010 chmod 640 own/f
run pj-suid sh -c 'chmod 4755 own/f && chown 2012 own/f && stat -c "%u:%g %a" own/f'
run pj-write-denied as_user 2011 sh -c 'echo y >>own/f'
run pj-root-chown sh -c 'chown 2013:2014 own/f && stat -c "%u:%g" own/f'
"""


@pytest.fixture(scope="module")
def rootless_boot(guest_images: GuestImages, host_user: HostUser) -> Iterator[tuple[GuestResult, Path]]:
    share = Path(tempfile.mkdtemp(prefix="vhostfs-rootless-", dir="/tmp"))
    try:
        os.chown(share, host_user.uid, host_user.gid)
        share.chmod(0o755)
        (share / "root-file").write_text("root's\n")
        (share / "root-file").chmod(0o644)
        (share / "root-dir").mkdir(mode=0o755)
        (share / "root-dir" / "inner").write_text("inner\n")
        daemon = [*rootless_user.daemon_command(host_user), "--socket-path", "{sock}", "--shared-dir",
                  "{dir}", "--xattr", "--posix-acl",
                  "--translate-uid", "map:2000:1000:100", "--translate-uid", "forbid-guest:5000:1",
                  "--translate-gid", "map:2000:1000:100", "--translate-gid", "forbid-guest:5000:1"]
        result = boot_guest(GUEST_PRELUDE + ROOTLESS_SCRIPT, share, daemon, timeout=600,
                            run_dir_owner=(host_user.uid, host_user.gid))
        _booted(result)
        yield result, share
    finally:
        shutil.rmtree(share, ignore_errors=True)


def _owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


def test_daemon_ran_unprivileged_in_a_user_namespace(rootless_boot, host_user):
    result, _ = rootless_boot
    line = [line for line in result.daemon_log.splitlines() if "sandbox namespace" in line]
    assert line, result.describe()
    assert (f"user namespace uid 0-0 -> {host_user.uid}-{host_user.uid}, 1-65536 -> {host_user.sub}-"
            f"{host_user.sub + 65535}") in line[0]
    assert "--translate-uid map:2000:1000:100" in line[0]
    assert "Traceback" not in result.daemon_log


def test_guest_root_creates_as_the_host_user(rootless_boot, host_user):
    result, share = rootless_boot
    assert _ok(result, "create") == "0:0"
    assert _owner(share / "created") == (host_user.uid, host_user.gid)


def test_chown_to_mapped_ids_shows_translated_owners_on_the_host(rootless_boot, host_user):
    result, share = rootless_boot
    assert _ok(result, "chown-mapped") == "2001:2002"
    assert _owner(share / "owned") == (_host_id(host_user, 2001), _host_id(host_user, 2002))
    assert _ok(result, "chown-plain") == "3:4"
    assert _owner(share / "plain") == (_host_id(host_user, 3), _host_id(host_user, 4))


def test_guest_user_creates_with_its_translated_ids(rootless_boot, host_user):
    result, share = rootless_boot
    assert _ok(result, "mkdir-as-user").split() == ["2005:2005", "2005:2005"]
    expected = (_host_id(host_user, 2005), _host_id(host_user, 2005))
    for name in ("d", "f", "l", "p"):
        assert _owner(share / "shared" / name) == expected, name


@pytest.mark.parametrize("key", ["chown-unmapped", "chown-forbidden", "chgrp-unmapped",
                                 "create-as-forbidden"])
def test_unmapped_and_forbidden_ids_are_refused(rootless_boot, host_user, key):
    result, share = rootless_boot
    rc, output = _run(result, key)
    assert rc != 0 and "Operation not permitted" in output, output
    assert _value(result, "owner-after") == "rc=0 0:0"
    assert _owner(share / "created") == (host_user.uid, host_user.gid)
    assert not (share / "shared" / "nope").exists()


def test_acl_entries_are_translated(rootless_boot, host_user):
    result, share = rootless_boot
    _need(result, "setfacl", "getfacl")
    _ok(result, "setfacl")
    entries = _acl_entries(share / "aclfile")
    assert (ACL_USER, 6, _host_id(host_user, 2003)) in entries, entries
    assert (ACL_GROUP, 4, _host_id(host_user, 2004)) in entries, entries
    shown = _ok(result, "getfacl").split()
    assert "user:2003:rw-" in shown and "group:2004:r--" in shown, shown
    default = _acl_entries(share / "acldir", "system.posix_acl_default")
    assert (ACL_USER, 7, _host_id(host_user, 2006)) in default, default
    assert "user:2006:rwx" in _ok(result, "setfacl-default").split()
    for key in ("setfacl-unmapped", "setfacl-forbidden"):
        rc, output = _run(result, key)
        assert rc != 0 and "Operation not permitted" in output, (key, output)
    assert {host_user.sub + 70000 - 1, _host_id(host_user, 5000)}.isdisjoint(
        ident for _, _, ident in _acl_entries(share / "aclfile"))


def test_host_root_file_is_overflow_and_out_of_reach(rootless_boot):
    result, share = rootless_boot
    assert _ok(result, "root-owner") == "65534:65534"
    for key, message in (("root-write", "Permission denied"), ("root-chmod", "Operation not permitted"),
                         ("root-chown", "Operation not permitted"),
                         ("root-unlink-dir", "Permission denied")):
        rc, output = _run(result, key)
        assert rc != 0 and message in output, (key, output)
    st = (share / "root-file").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    assert (share / "root-file").read_text() == "root's\n"
    assert (share / "root-dir" / "inner").read_text() == "inner\n"


def test_ownership_rules_under_translation(rootless_boot, host_user):
    result, share = rootless_boot
    assert _ok(result, "pj-create") == "2010:2010 644"
    for key in ("pj-giveaway", "pj-chgrp-other", "pj-chmod-nonowner"):
        rc, output = _run(result, key)
        assert rc != 0 and "Operation not permitted" in output, (key, output)
    _ok(result, "pj-chgrp-own")
    _ok(result, "pj-chmod-owner")
    # chown by root clears set-user-ID (4755 -> 755), as on any Linux file system.
    assert _ok(result, "pj-suid") == "2012:2010 755"
    rc, output = _run(result, "pj-write-denied")
    assert rc != 0 and "Permission denied" in output, output
    assert _ok(result, "pj-root-chown") == "2013:2014"
    assert _owner(share / "own" / "f") == (_host_id(host_user, 2013), _host_id(host_user, 2014))
