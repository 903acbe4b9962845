"""The FUSE kernel ABI: opcodes, flag bits and wire structs (include/uapi/linux/fuse.h, protocol 7.38+).

Every struct is a little-endian `struct.Struct` whose size is asserted against the C layout, so a
typo in a format string fails at import time rather than on the wire. Field order in each format
follows the C struct; the comment above each one names the fields. Reserved and padding fields are
`x` pad bytes where the server never reads them, so packing always writes them as zeros.

Time fields of `fuse_attr` are declared `__u64` in fuse.h but the kernel stores them into signed
`time64_t`; they are packed as signed `q` so that pre-1970 times travel as two's complement.
"""

from __future__ import annotations

import struct

#: Protocol version this server speaks (fuse.h FUSE_KERNEL_VERSION / FUSE_KERNEL_MINOR_VERSION).
KERNEL_VERSION = 7
#: 7.39 added FUSE_DIRECT_IO_ALLOW_MMAP (an INIT flag the server passes through) and FUSE_STATX.
KERNEL_MINOR_VERSION = 39
#: First minor whose clients know FUSE_STATX.
STATX_MINOR_VERSION = 39
#: First minor whose clients mark request extensions with fuse_in_header.total_extlen. Clients of 7.36
#: and 7.37 append the security context (FUSE_SECURITY_CTX) to the arguments without saying so.
EXT_MINOR_VERSION = 38
#: Oldest client minor served. Older clients are refused with EPROTO rather than answered with the
#: truncated compat layouts (e.g. the 24-byte fuse_init_out before 7.23) this server does not build.
MIN_KERNEL_MINOR_VERSION = 27

ROOT_ID = 1

# -- opcodes (enum fuse_opcode) -------------------------------------------------------------------
FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_READLINK = 5
FUSE_SYMLINK = 6
FUSE_MKNOD = 8
FUSE_MKDIR = 9
FUSE_UNLINK = 10
FUSE_RMDIR = 11
FUSE_RENAME = 12
FUSE_LINK = 13
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_SETXATTR = 21
FUSE_GETXATTR = 22
FUSE_LISTXATTR = 23
FUSE_REMOVEXATTR = 24
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_READDIR = 28
FUSE_RELEASEDIR = 29
FUSE_FSYNCDIR = 30
FUSE_GETLK = 31
FUSE_SETLK = 32
FUSE_SETLKW = 33
FUSE_ACCESS = 34
FUSE_CREATE = 35
FUSE_INTERRUPT = 36
FUSE_BMAP = 37
FUSE_DESTROY = 38
FUSE_IOCTL = 39
FUSE_POLL = 40
FUSE_NOTIFY_REPLY = 41
FUSE_BATCH_FORGET = 42
FUSE_FALLOCATE = 43
FUSE_READDIRPLUS = 44
FUSE_RENAME2 = 45
FUSE_LSEEK = 46
FUSE_COPY_FILE_RANGE = 47
FUSE_SETUPMAPPING = 48
FUSE_REMOVEMAPPING = 49
FUSE_SYNCFS = 50
FUSE_TMPFILE = 51
FUSE_STATX = 52
CUSE_INIT = 4096

#: Opcode -> spec name, for logs.
OPCODE_NAMES: dict[int, str] = {
    value: name for name, value in globals().items()
    if name.startswith(("FUSE_", "CUSE_")) and isinstance(value, int)
}

# -- request extension types (enum fuse_ext_type; fuse_ext_header.type) ------------------------------
#: Types 0..FUSE_MAX_NR_SECCTX are the security context extension, the type being its nr_secctx.
FUSE_MAX_NR_SECCTX = 31
FUSE_EXT_GROUPS = 32

# -- INIT flags (fuse_init_in/out.flags; bits 32..63 travel in flags2 when FUSE_INIT_EXT is set) ---
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_CREATE_SUPP_GROUP = 1 << 34
FUSE_HAS_EXPIRE_ONLY = 1 << 35
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36
FUSE_PASSTHROUGH = 1 << 37
FUSE_NO_EXPORT_SUPPORT = 1 << 38
FUSE_HAS_RESEND = 1 << 39
FUSE_ALLOW_IDMAP = 1 << 40
FUSE_OVER_IO_URING = 1 << 41
FUSE_REQUEST_TIMEOUT = 1 << 42

# -- fuse_setattr_in.valid ------------------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# -- fuse_open_out.open_flags ---------------------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# -- per-request flag fields ----------------------------------------------------------------------
FUSE_RELEASE_FLUSH = 1 << 0          # fuse_release_in.release_flags
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_GETATTR_FH = 1 << 0             # fuse_getattr_in.getattr_flags: fh is valid
FUSE_LK_FLOCK = 1 << 0               # fuse_lk_in.lk_flags
FUSE_WRITE_CACHE = 1 << 0            # fuse_write_in.write_flags
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_READ_LOCKOWNER = 1 << 1         # fuse_read_in.read_flags
FUSE_FSYNC_FDATASYNC = 1 << 0        # fuse_fsync_in.fsync_flags
FUSE_ATTR_SUBMOUNT = 1 << 0          # fuse_attr.flags
FUSE_ATTR_DAX = 1 << 1
FUSE_OPEN_KILL_SUIDGID = 1 << 0      # fuse_open_in/fuse_create_in.open_flags
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0  # fuse_setxattr_in.setxattr_flags
FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ = 1 << 1
FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0  # fuse_poll_in.flags

# fuse_ioctl_in.flags / fuse_ioctl_out.flags
FUSE_IOCTL_COMPAT = 1 << 0           # 32-bit compat ioctl on a 64-bit kernel
FUSE_IOCTL_UNRESTRICTED = 1 << 1     # not restricted to well-formed ioctls (CUSE), retry allowed
FUSE_IOCTL_RETRY = 1 << 2            # reply: retry with the in/out iovecs that follow
FUSE_IOCTL_32BIT = 1 << 3            # 32-bit ioctl
FUSE_IOCTL_DIR = 1 << 4              # on a directory
FUSE_IOCTL_COMPAT_X32 = 1 << 5       # x32 compat ioctl on a 64-bit kernel

# renameat2(2) flags carried in fuse_rename2_in.flags (linux/fs.h)
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

#: Dirent records are padded to 8 bytes (FUSE_REC_ALIGN).
DIRENT_ALIGN = 8
#: Request extensions, and each security context within one, are padded to 8 bytes too (FUSE_REC_ALIGN).
EXT_ALIGN = 8
#: Largest single path component the protocol carries (NAME_MAX) and largest symlink target.
NAME_MAX = 255
PATH_MAX = 4096
#: Smallest reply buffer the kernel promises for /dev/fuse reads (FUSE_MIN_READ_BUFFER).
MIN_READ_BUFFER = 8192

# -- headers --------------------------------------------------------------------------------------
# fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen (8-byte units), padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
assert IN_HEADER.size == 40
# fuse_out_header: len, error (negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
assert OUT_HEADER.size == 16

# -- common records -------------------------------------------------------------------------------
# fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
# uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
assert ATTR.size == 88
# fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
KSTATFS = struct.Struct("<QQQQQIII28x")
assert KSTATFS.size == 80
# fuse_file_lock: start, end, type, pid
FILE_LOCK = struct.Struct("<QQII")
assert FILE_LOCK.size == 24

# -- replies --------------------------------------------------------------------------------------
# fuse_entry_out: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec, attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
assert ENTRY_OUT.size == 128
# fuse_attr_out: attr_valid, attr_valid_nsec, dummy, attr
ATTR_OUT = struct.Struct("<QI4x" + ATTR.format[1:])
assert ATTR_OUT.size == 104
# fuse_open_out: fh, open_flags, backing_id (padding before 7.40)
OPEN_OUT = struct.Struct("<QIi")
assert OPEN_OUT.size == 16
# fuse_write_out: size, padding (also the reply of COPY_FILE_RANGE)
WRITE_OUT = struct.Struct("<I4x")
assert WRITE_OUT.size == 8
# fuse_statfs_out: st
STATFS_OUT = KSTATFS
# fuse_getxattr_out: size, padding
GETXATTR_OUT = struct.Struct("<I4x")
assert GETXATTR_OUT.size == 8
# fuse_lk_out: lk
LK_OUT = FILE_LOCK
# fuse_bmap_out: block
BMAP_OUT = struct.Struct("<Q")
assert BMAP_OUT.size == 8
# fuse_lseek_out: offset
LSEEK_OUT = struct.Struct("<Q")
assert LSEEK_OUT.size == 8
# fuse_poll_out: revents, padding
POLL_OUT = struct.Struct("<I4x")
assert POLL_OUT.size == 8
# fuse_ioctl_out: result, flags, in_iovs, out_iovs
IOCTL_OUT = struct.Struct("<iIII")
assert IOCTL_OUT.size == 16
# fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2, max_stack_depth (7.40), request_timeout (7.43), unused
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
assert INIT_OUT.size == 64
# The first two fields alone: the answer to a client whose major is newer than ours
# (FUSE_COMPAT_INIT_OUT_SIZE), which it takes as "retry with this major".
INIT_OUT_VERSION = struct.Struct("<II")
assert INIT_OUT_VERSION.size == 8
# fuse_dirent: ino, off, namelen, type, then the name and zero padding to 8 bytes
DIRENT = struct.Struct("<QQII")
assert DIRENT.size == 24
# fuse_direntplus: entry_out, dirent
DIRENTPLUS = struct.Struct(ENTRY_OUT.format + DIRENT.format[1:])
assert DIRENTPLUS.size == 152
# fuse_sx_time: tv_sec, tv_nsec, reserved
SX_TIME_FMT = "qIi"
# fuse_statx: mask, blksize, attributes, nlink, uid, gid, mode, spare0, ino, size, blocks,
# attributes_mask, atime, btime, ctime, mtime, rdev_major, rdev_minor, dev_major, dev_minor, spare2[14]
STATX = struct.Struct("<IIQIIIH2xQQQQ" + SX_TIME_FMT * 4 + "IIII112x")
assert STATX.size == 256
# fuse_statx_out: attr_valid, attr_valid_nsec, flags, spare[2], stat
STATX_OUT = struct.Struct("<QII16x" + STATX.format[1:])
assert STATX_OUT.size == 288

# -- requests -------------------------------------------------------------------------------------
# fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]
INIT_IN = struct.Struct("<IIIII44x")
assert INIT_IN.size == 64
# fuse_init_in before 7.36 (no FUSE_INIT_EXT): major, minor, max_readahead, flags
INIT_IN_COMPAT = struct.Struct("<IIII")
assert INIT_IN_COMPAT.size == 16
# fuse_forget_in: nlookup
FORGET_IN = struct.Struct("<Q")
assert FORGET_IN.size == 8
# fuse_forget_one: nodeid, nlookup
FORGET_ONE = struct.Struct("<QQ")
assert FORGET_ONE.size == 16
# fuse_batch_forget_in: count, dummy
BATCH_FORGET_IN = struct.Struct("<I4x")
assert BATCH_FORGET_IN.size == 8
# fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<I4xQ")
assert GETATTR_IN.size == 16
# fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec,
# ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("<I4xQQQqqqIIII4xII4x")
assert SETATTR_IN.size == 88
# fuse_mknod_in: mode, rdev, umask, padding
MKNOD_IN = struct.Struct("<III4x")
assert MKNOD_IN.size == 16
# fuse_mkdir_in: mode, umask
MKDIR_IN = struct.Struct("<II")
assert MKDIR_IN.size == 8
# fuse_rename_in: newdir
RENAME_IN = struct.Struct("<Q")
assert RENAME_IN.size == 8
# fuse_rename2_in: newdir, flags, padding
RENAME2_IN = struct.Struct("<QI4x")
assert RENAME2_IN.size == 16
# fuse_link_in: oldnodeid
LINK_IN = struct.Struct("<Q")
assert LINK_IN.size == 8
# fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
assert OPEN_IN.size == 8
# fuse_create_in: flags, mode, umask, open_flags
CREATE_IN = struct.Struct("<IIII")
assert CREATE_IN.size == 16
# fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
assert RELEASE_IN.size == 24
# fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<Q8xQ")
assert FLUSH_IN.size == 24
# fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQI4x")
assert READ_IN.size == 40
# fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQI4x")
assert WRITE_IN.size == 40
# fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("<QI4x")
assert FSYNC_IN.size == 16
# fuse_setxattr_in with FUSE_SETXATTR_EXT: size, flags, setxattr_flags, padding
SETXATTR_IN = struct.Struct("<III4x")
assert SETXATTR_IN.size == 16
# fuse_setxattr_in without FUSE_SETXATTR_EXT (FUSE_COMPAT_SETXATTR_IN_SIZE): size, flags
SETXATTR_IN_COMPAT = struct.Struct("<II")
assert SETXATTR_IN_COMPAT.size == 8
# fuse_getxattr_in: size, padding (also LISTXATTR)
GETXATTR_IN = struct.Struct("<I4x")
assert GETXATTR_IN.size == 8
# fuse_lk_in: fh, owner, lk, lk_flags, padding
LK_IN = struct.Struct("<QQ" + FILE_LOCK.format[1:] + "I4x")
assert LK_IN.size == 48
# fuse_access_in: mask, padding
ACCESS_IN = struct.Struct("<I4x")
assert ACCESS_IN.size == 8
# fuse_interrupt_in: unique
INTERRUPT_IN = struct.Struct("<Q")
assert INTERRUPT_IN.size == 8
# fuse_bmap_in: block, blocksize, padding
BMAP_IN = struct.Struct("<QI4x")
assert BMAP_IN.size == 16
# fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size
IOCTL_IN = struct.Struct("<QIIQII")
assert IOCTL_IN.size == 32
# fuse_poll_in: fh, kh, flags, events
POLL_IN = struct.Struct("<QQII")
assert POLL_IN.size == 24
# fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("<QQQI4x")
assert FALLOCATE_IN.size == 32
# fuse_lseek_in: fh, offset, whence, padding
LSEEK_IN = struct.Struct("<QQI4x")
assert LSEEK_IN.size == 24
# fuse_copy_file_range_in: fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
assert COPY_FILE_RANGE_IN.size == 56
# fuse_setupmapping_in: fh, foffset, len, flags, moffset
SETUPMAPPING_IN = struct.Struct("<QQQQQ")
assert SETUPMAPPING_IN.size == 40
# fuse_removemapping_in: count (then count fuse_removemapping_one); 4 bytes on the wire
REMOVEMAPPING_IN = struct.Struct("<I")
assert REMOVEMAPPING_IN.size == 4
# fuse_removemapping_one: moffset, len
REMOVEMAPPING_ONE = struct.Struct("<QQ")
assert REMOVEMAPPING_ONE.size == 16
# fuse_syncfs_in: padding
SYNCFS_IN = struct.Struct("<8x")
assert SYNCFS_IN.size == 8
# fuse_statx_in: getattr_flags, reserved, fh, sx_flags, sx_mask
STATX_IN = struct.Struct("<I4xQII")
assert STATX_IN.size == 24
# fuse_ext_header: size, type (extensions after the arguments, total_extlen * 8 bytes in all)
EXT_HEADER = struct.Struct("<II")
assert EXT_HEADER.size == 8
# fuse_secctx_header: size (of the whole block, this header included), nr_secctx. It has the layout of
# fuse_ext_header: a security context extension is one whose type is its nr_secctx (enum fuse_ext_type).
SECCTX_HEADER = struct.Struct("<II")
assert SECCTX_HEADER.size == EXT_HEADER.size == 8
# fuse_secctx: size (of the context value), padding; then the NUL-terminated xattr name and the value
SECCTX = struct.Struct("<I4x")
assert SECCTX.size == 8


def dirent_size(namelen: int, plus: bool = False) -> int:
    """Bytes one readdir (or readdirplus) record of a `namelen`-byte name takes, padding included."""
    base = DIRENTPLUS.size if plus else DIRENT.size
    return (base + namelen + DIRENT_ALIGN - 1) & ~(DIRENT_ALIGN - 1)
