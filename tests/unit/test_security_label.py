"""--security-label: the security context extension of the requests that create a node (FUSE_SECURITY_CTX).

The server's parsing is checked against a file system that records what it is given; the passthrough's
labelling through FuseServer.handle on a temporary share; and, where the host kernel offers
FUSE_SECURITY_CTX, the kernel's own requests through a /dev/fuse mount.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import tempfile
import threading

import pytest

from tests.integration.conftest import start_daemon, stop_daemon
from vhostfs.fuse import abi, fusedev
from vhostfs.fuse.filesystem import ConnectionInfo, Entry, Filesystem, Open, Stat
from vhostfs.fuse.server import DEFAULT_WANT, FuseServer
from vhostfs.iov import Reader, Writer
from vhostfs.testing.fuse_client import FuseClient

LABEL = (b"security.vhostfs", b"system_u:object_r:vhostfs_t:s0\0")


def secctx(name: bytes, value: bytes, nr_secctx: int = 1, size: int | None = None,
           value_len: int | None = None) -> bytes:
    """A security context extension as the kernel builds it (fs/fuse/dir.c get_security_context): the
    header, then one fuse_secctx, the NUL-terminated name and the value, zero-padded to 8 bytes. The
    keywords falsify the header's count and size and the context's length."""
    entry = abi.SECCTX.pack(len(value) if value_len is None else value_len) + name + b"\0" + value
    entry += bytes(-len(entry) % 8)
    total = abi.SECCTX_HEADER.size + len(entry)
    return abi.SECCTX_HEADER.pack(total if size is None else size, nr_secctx) + entry


EMPTY = abi.SECCTX_HEADER.pack(abi.SECCTX_HEADER.size, 0)
CREATE = abi.CREATE_IN.pack(os.O_RDWR, stat.S_IFREG | 0o644, 0, 0)

#: The requests that carry a context, each with the argument body it sends for a node named `name`.
OPS = {
    "create": (abi.FUSE_CREATE, lambda name: CREATE + name + b"\0"),
    "mkdir": (abi.FUSE_MKDIR, lambda name: abi.MKDIR_IN.pack(0o755, 0) + name + b"\0"),
    "mknod": (abi.FUSE_MKNOD, lambda name: abi.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0) + name + b"\0"),
    "symlink": (abi.FUSE_SYMLINK, lambda name: name + b"\0" + b"target\0"),
    "tmpfile": (abi.FUSE_TMPFILE, lambda name: CREATE + b"/\0"),
}


class Client:
    """Hand-built requests through FuseServer.handle, from uid 0."""

    def __init__(self, fs: Filesystem) -> None:
        self.server = FuseServer(fs)
        self.unique = 0

    def init(self, *, minor: int = abi.KERNEL_MINOR_VERSION, offer: bool = True) -> int:
        """INIT offering FUSE_SECURITY_CTX (unless not `offer`); returns the flags the server chose."""
        flags = DEFAULT_WANT | abi.FUSE_INIT_EXT | (abi.FUSE_SECURITY_CTX if offer else 0)
        err, body = self.call(abi.FUSE_INIT, abi.INIT_IN.pack(7, minor, 1 << 17, flags & 0xFFFFFFFF,
                                                              flags >> 32))
        assert err == 0
        out = abi.INIT_OUT.unpack(body)
        return out[3] | out[10] << 32

    def call(self, opcode: int, body: bytes, ext: bytes = b"", nodeid: int = abi.ROOT_ID,
             extlen: int | None = None) -> tuple[int, bytes]:
        """(errno, reply body) of a request with arguments `body` and extensions `ext` (total_extlen
        says len(ext) unless `extlen` is given)."""
        self.unique += 1
        units = len(ext) // 8 if extlen is None else extlen
        data = abi.IN_HEADER.pack(40 + len(body) + len(ext), opcode, self.unique, nodeid, 0, 0, 4242,
                                  units, 0) + body + ext
        out = bytearray(1 << 16)
        n = self.server.handle(Reader([memoryview(bytearray(data))]), Writer([memoryview(out)]))
        length, error, unique = abi.OUT_HEADER.unpack_from(out)
        assert n == length and unique == self.unique
        return -error, bytes(out[16:n])

    def make(self, op: str, name: bytes, ext: bytes = b"", **kw) -> tuple[int, bytes]:
        opcode, body = OPS[op]
        return self.call(opcode, body(name), ext, **kw)


class Recorder(Filesystem):
    """Records the security context each creating call gets; asks for FUSE_SECURITY_CTX if `want`."""

    def __init__(self, want: bool = True) -> None:
        self.want = want
        self.seen: list[tuple[bytes, bytes] | None] = []

    def init(self, conn: ConnectionInfo) -> None:
        if self.want:
            conn.want |= abi.FUSE_SECURITY_CTX

    def _entry(self, ctx) -> Entry:
        self.seen.append(ctx.security_context)
        return Entry(2, Stat(st_ino=2, st_mode=stat.S_IFREG | 0o644))

    def create(self, ctx, parent, name, mode, flags, umask):
        return self._entry(ctx), Open(7)

    def tmpfile(self, ctx, parent, mode, flags, umask):
        return self._entry(ctx), Open(7)

    def mkdir(self, ctx, parent, name, mode, umask):
        return self._entry(ctx)

    def mknod(self, ctx, parent, name, mode, rdev, umask):
        return self._entry(ctx)

    def symlink(self, ctx, parent, name, target):
        return self._entry(ctx)


@pytest.fixture
def recorded() -> tuple[Client, Recorder]:
    fs = Recorder()
    client = Client(fs)
    assert client.init() & abi.FUSE_SECURITY_CTX
    return client, fs


# -- parsing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value", [b"x", b"s0\0", b"system_u:object_r:tmp_t:s0\0", b"1234567", b"12345678"])
def test_each_creating_request_delivers_its_context(recorded, op, value):
    client, fs = recorded
    assert client.make(op, b"new", secctx(b"security.selinux", value))[0] == 0
    assert fs.seen == [(b"security.selinux", value)]


@pytest.mark.parametrize("ext", [b"", EMPTY], ids=["no extension", "empty context"])
def test_no_context_is_none(recorded, ext):
    client, fs = recorded
    assert client.make("mkdir", b"new", ext)[0] == 0
    assert fs.seen == [None]


def test_a_client_before_7_38_appends_the_context_to_the_arguments(recorded):
    fs = Recorder()
    client = Client(fs)
    client.init(minor=37)
    for op in ("create", "mkdir", "mknod", "symlink", "tmpfile"):
        opcode, body = OPS[op]
        assert client.call(opcode, body(b"new") + secctx(*LABEL))[0] == 0
        assert client.call(opcode, body(b"new") + EMPTY)[0] == 0
    assert fs.seen == [LABEL, None] * 5
    # Such a client has no total_extlen: a request that claims extensions is malformed.
    assert client.make("mkdir", b"new", secctx(*LABEL))[0] == errno.EINVAL
    # Nor does anything align the appended context for it: it must be whole, and a multiple of 8.
    mkdir = OPS["mkdir"][1](b"new")
    for tail in (EMPTY[:4], abi.SECCTX_HEADER.pack(12, 0) + bytes(4), secctx(*LABEL)[:-8]):
        assert client.call(abi.FUSE_MKDIR, mkdir + tail)[0] == errno.EINVAL
    assert fs.seen == [LABEL, None] * 5


BAD = {
    # The header claims more than the request holds.
    "truncated": secctx(*LABEL, size=len(secctx(*LABEL)) + 8),
    "size below the header": abi.SECCTX_HEADER.pack(4, 0),
    # The context's length runs past the extension, or leaves more than padding behind.
    "value past the end": secctx(b"security.selinux", b"abc", value_len=64),
    "value shorter than sent": secctx(b"security.selinux", b"abcdefghijklmnop", value_len=4),
    "empty value": secctx(b"security.selinux", b"", value_len=0),
    "empty name": secctx(b"", b"value"),
    "name too long": secctx(b"security." + b"n" * 250, b"value"),
    "name without NUL": abi.SECCTX_HEADER.pack(24, 1) + abi.SECCTX.pack(1) + b"security",
    # nr_secctx disagrees with what follows.
    "count 0 with a context": secctx(*LABEL, nr_secctx=0),
    "count 1 without one": abi.SECCTX_HEADER.pack(8, 1),
    "count 2 with one": secctx(*LABEL, nr_secctx=2),
    "count 31": secctx(*LABEL, nr_secctx=abi.FUSE_MAX_NR_SECCTX),
    "two contexts": secctx(*LABEL) + secctx(*LABEL),
    # Extension types fuse.h defines for INIT flags this server does not negotiate.
    "supplementary groups": abi.EXT_HEADER.pack(16, abi.FUSE_EXT_GROUPS) + struct.pack("<II", 1, 100),
    "groups after the context": secctx(*LABEL) + abi.EXT_HEADER.pack(16, abi.FUSE_EXT_GROUPS)
    + struct.pack("<II", 1, 100),
}


@pytest.mark.parametrize("ext", BAD.values(), ids=BAD.keys())
def test_malformed_extensions_are_einval(recorded, ext):
    client, fs = recorded
    for op in OPS:
        assert client.make(op, b"new", ext)[0] == errno.EINVAL, op
    assert fs.seen == []


def test_arguments_must_end_where_the_extensions_begin(recorded):
    client, fs = recorded
    # Bytes between the name's NUL and the extensions.
    body = abi.MKDIR_IN.pack(0o755, 0) + b"new\0" + bytes(8)
    assert client.call(abi.FUSE_MKDIR, body, secctx(*LABEL))[0] == errno.EINVAL
    assert client.call(abi.FUSE_MKDIR, body)[0] == errno.EINVAL
    # total_extlen larger than the request: the header's length check refuses it.
    assert client.make("mkdir", b"new", secctx(*LABEL), extlen=200)[0] == errno.EINVAL
    assert fs.seen == []


@pytest.mark.parametrize("want, offer", [(False, True), (True, False)],
                         ids=["file system does not ask", "client does not offer"])
def test_without_negotiation_extensions_are_not_read(want, offer):
    fs = Recorder(want=want)
    client = Client(fs)
    assert not client.init(offer=offer) & abi.FUSE_SECURITY_CTX
    assert client.make("mkdir", b"a", secctx(*LABEL))[0] == 0
    assert client.make("create", b"b", BAD["two contexts"])[0] == 0
    assert fs.seen == [None, None]


# -- the passthrough ----------------------------------------------------------------------------------

def _security_xattrs_work() -> str | None:
    """None if security.* extended attributes can be set on a file in the temporary directory (root
    with CAP_SYS_ADMIN, a file system that stores them), else why not."""
    with tempfile.NamedTemporaryFile() as probe:
        try:
            os.setxattr(probe.name, b"security.vhostfs-probe", b"1")
        except OSError as exc:
            return f"setting security.* attributes in {tempfile.gettempdir()} fails: {exc.strerror}"
    return None


security_xattrs = pytest.mark.skipif(_security_xattrs_work() is not None,
                                     reason=str(_security_xattrs_work()))


def _nodeid(reply: bytes) -> int:
    return abi.ENTRY_OUT.unpack_from(reply)[0]


@security_xattrs
@pytest.mark.parametrize("op", OPS)
def test_the_label_is_set_on_the_new_host_node(make, share, op):
    fs = make(security_label=True)
    client = Client(fs)
    assert client.init() & abi.FUSE_SECURITY_CTX
    err, reply = client.make(op, b"new", secctx(*LABEL))
    assert err == 0
    if op != "tmpfile":
        # On the node itself: a symlink's own label, not its (missing) target's.
        assert os.getxattr(share / "new", LABEL[0], follow_symlinks=False) == LABEL[1]
    if op != "symlink":
        # The guest reads it back (security_label implies xattr); the unnamed tmpfile only so.
        getxattr = abi.GETXATTR_IN.pack(256) + LABEL[0] + b"\0"
        assert client.call(abi.FUSE_GETXATTR, getxattr, nodeid=_nodeid(reply)) == (0, LABEL[1])


@security_xattrs
def test_the_label_goes_through_the_xattrmap(make, share):
    client = Client(make(security_label=True, xattrmap=":map:security.:user.virtiofs.:"))
    client.init()
    assert client.make("mkdir", b"dir", secctx(*LABEL))[0] == 0
    assert os.listxattr(share / "dir") == ["user.virtiofs.security.vhostfs"]
    assert os.getxattr(share / "dir", "user.virtiofs.security.vhostfs") == LABEL[1]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("op", OPS)
def test_a_label_the_host_refuses_fails_the_call_and_removes_the_node(make, share, op):
    client = Client(make(security_label=True))
    client.init()
    fds = _fds()
    # No host file system has a "vhostfs." attribute namespace.
    assert client.make(op, b"new", secctx(b"vhostfs.label", b"x"))[0] == errno.EOPNOTSUPP
    assert os.listdir(share) == []
    assert _fds() == fds  # no fd of the new node (or of an unnamed tmpfile) is left open
    # The next request that creates the name finds it free.
    assert client.make(op, b"new", EMPTY)[0] == 0


@pytest.mark.parametrize("op", ["mknod", "symlink"])
def test_a_label_mapped_where_the_node_cannot_hold_it_removes_the_node(make, share, op):
    # user.* attributes exist only on regular files and directories (xattr(7)).
    client = Client(make(security_label=True, xattrmap=":map:security.:user.virtiofs.:"))
    client.init()
    assert client.make(op, b"new", secctx(*LABEL))[0] == errno.EPERM
    assert os.listdir(share) == []


def test_create_of_an_existing_file_labels_nothing(make, share):
    (share / "old").write_bytes(b"kept")
    client = Client(make(security_label=True))
    client.init()
    # Not created by this request, so not labelled, and a refused label does not remove it.
    assert client.make("create", b"old", secctx(b"vhostfs.label", b"x"))[0] == 0
    assert (share / "old").read_bytes() == b"kept"


def test_without_the_option_no_context_is_negotiated_or_applied(make, share):
    client = Client(make())
    assert not client.init() & abi.FUSE_SECURITY_CTX
    # A client that sends one all the same is not listened to.
    assert client.make("mkdir", b"dir", secctx(b"vhostfs.label", b"x"))[0] == 0
    assert (share / "dir").is_dir()
    assert os.listxattr(share / "dir") == []


def test_the_option_asks_for_the_flag_and_implies_xattr(make, share):
    conn = ConnectionInfo(7, 39, abi.FUSE_SECURITY_CTX, 0, 1 << 20, 0, 1)
    make(security_label=True).init(conn)
    assert conn.want & abi.FUSE_SECURITY_CTX
    (share / "f").write_bytes(b"")
    client = Client(make(security_label=True))
    client.init()
    err, reply = client.call(abi.FUSE_LOOKUP, b"f\0")
    assert err == 0
    assert client.call(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(0), nodeid=_nodeid(reply))[0] == 0


# -- the host kernel ----------------------------------------------------------------------------------

class Watched(FuseServer):
    """Records the total_extlen of each request the kernel sends, by opcode."""

    def __init__(self, fs: Filesystem) -> None:
        super().__init__(fs)
        self.extlen: dict[int, set[int]] = {}
        self._lock = threading.Lock()

    def handle(self, reader: Reader, writer: Writer) -> int:
        opcode, word = reader.peek_u32(4), reader.peek_u32(36)
        if opcode is not None and word is not None:
            with self._lock:
                self.extlen.setdefault(opcode, set()).add(word & 0xFFFF)
        return super().handle(reader, writer)


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                    reason="needs /dev/fuse and root to mount")
def test_the_kernels_own_requests_with_the_flag_negotiated(make, share, tmp_path):
    fs = make(security_label=True)
    server = Watched(fs)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fd = fusedev.mount(str(mnt), fsname="vhostfs-secctx")
    session = fusedev.FuseDevSession(server, fd, threads=2, mountpoint=str(mnt))
    runner = threading.Thread(target=session.serve)
    runner.start()
    try:
        os.stat(mnt)  # INIT, then the root
        if not server.conn.want & abi.FUSE_SECURITY_CTX:
            pytest.skip("the host kernel does not offer FUSE_SECURITY_CTX")
        (mnt / "file").write_bytes(b"data")
        (mnt / "dir").mkdir()
        os.mkfifo(mnt / "fifo")
        os.symlink("file", mnt / "link")
        tmp = os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.close(tmp)
        assert sorted(os.listdir(share)) == ["dir", "fifo", "file", "link"]
        assert (share / "file").read_bytes() == b"data"
        # With no LSM giving labels the kernel still sends each an (empty) context extension.
        for opcode in (abi.FUSE_CREATE, abi.FUSE_MKDIR, abi.FUSE_MKNOD, abi.FUSE_SYMLINK, abi.FUSE_TMPFILE):
            assert server.extlen.get(opcode) == {1}, abi.OPCODE_NAMES[opcode]
    finally:
        session.stop()
        runner.join(60)
        os.close(fd)


# -- the command lines --------------------------------------------------------------------------------

def _daemon_call(client: FuseClient, opcode: int, body: bytes, ext: bytes = b"") -> tuple[int, bytes]:
    """(errno, reply body) of a request with extensions, sent to the daemon on the client's queue."""
    data = abi.IN_HEADER.pack(40 + len(body) + len(ext), opcode, 1, abi.ROOT_ID, 0, 0, 4242, len(ext) // 8,
                              0) + body + ext
    reply = client.fe.request(client.queue, data, 4096, arena=client.arena)
    _, error, _ = abi.OUT_HEADER.unpack_from(reply)
    return -error, reply[abi.OUT_HEADER.size:]


def _daemon_init(client: FuseClient) -> int:
    flags = DEFAULT_WANT | abi.FUSE_INIT_EXT | abi.FUSE_SECURITY_CTX
    err, body = _daemon_call(client, abi.FUSE_INIT, abi.INIT_IN.pack(7, abi.KERNEL_MINOR_VERSION, 1 << 17,
                                                                    flags & 0xFFFFFFFF, flags >> 32))
    assert err == 0
    out = abi.INIT_OUT.unpack(body)
    return out[3] | out[10] << 32


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the daemon drops capabilities only as root")
@pytest.mark.parametrize("option", [["--security-label"], ["-o", "security_label"]], ids=" ".join)
def test_the_daemon_labels_with_cap_sys_admin_and_refuses_without(tmp_path, option):
    if _security_xattrs_work() is not None:
        pytest.skip(str(_security_xattrs_work()))
    if os.path.isdir("/sys/fs/selinux"):
        pytest.skip("SELinux decides about security.selinux here, not CAP_SYS_ADMIN")
    for modcaps, expected in ((["--modcaps=+sys_admin"], 0), ([], errno.EPERM)):
        run = tmp_path / ("with" if modcaps else "without")
        run.mkdir()
        daemon = start_daemon(run, *option, *modcaps)
        try:
            with daemon.connect() as fe:
                fe.setup(queues=2)
                client = FuseClient(fe)
                assert _daemon_init(client) & abi.FUSE_SECURITY_CTX
                err, _ = _daemon_call(client, abi.FUSE_MKDIR, OPS["mkdir"][1](b"dir"), secctx(*LABEL))
        finally:
            stop_daemon(daemon)
        assert err == expected, daemon.log_text()
        if modcaps:
            assert os.getxattr(daemon.shared / "dir", LABEL[0]) == LABEL[1]
            assert "--security-label" not in daemon.log_text()
        else:
            # Refused by the host: the directory is gone again, and the daemon said why at start.
            assert os.listdir(daemon.shared) == []
            assert "--modcaps=+sys_admin" in daemon.log_text()
        assert "Traceback" not in daemon.log_text()
