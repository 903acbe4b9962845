"""A seccomp filter (seccomp(2), --seccomp none|kill|log|trap): the daemon may make only the system
calls on its list; any other is fatal (kill), logged by the kernel's audit log (log) or raises SIGSYS
(trap).

The list, `SYSCALLS_X86_64`, is what a CPython daemon serving the passthrough actually calls once it
serves: it was taken from `strace -f` of the daemon through the integration tests (everything from its
first accept(2) on), completed with the calls of passthrough operations those do not reach (each group
says what needs it), and checked by running the guest tests with --seccomp=kill. Calls that only the
set-up makes (the sandbox's mount, pivot_root; bind, listen; capset, prctl, seccomp) are not on it: the
filter is installed last, right before the daemon accepts a front end. unshare is on it, for the serving
threads' own working directories (CLONE_FS); new namespaces need CAP_SYS_ADMIN, which the daemon drops,
or, for a user namespace, a process with a single thread.

The filter is a classic BPF program (linux/filter.h, linux/seccomp.h) over struct seccomp_data: it
checks the architecture first (a syscall number means something else under another ABI), refuses the
x32 ABI (numbers with __X32_SYSCALL_BIT set reach the same table), then compares the number with
each allowed one. The tables are per architecture (`ARCHITECTURES`, by `os.uname().machine`), and only
x86_64 has one: elsewhere the daemon refuses --seccomp other than none at start-up, naming the
machine, rather than serving without the filter it was asked for.

SECCOMP_FILTER_FLAG_TSYNC gives the filter to every thread of the process at once; the daemon has
only its main thread by then, but a thread started by a library would otherwise escape it.
No new privileges (PR_SET_NO_NEW_PRIVS) is set first, as an unprivileged filter requires.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from vhostfs import native

#: struct sock_filter {u16 code; u8 jt; u8 jf; u32 k;} (linux/filter.h), native byte order.
SOCK_FILTER = struct.Struct("=HBBI")
assert SOCK_FILTER.size == 8

# Classic BPF opcodes (linux/bpf_common.h).
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_JEQ = 0x10
BPF_JGE = 0x30
BPF_K = 0x00

# struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6];} offsets.
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4

# linux/seccomp.h, linux/audit.h, linux/prctl.h, asm/unistd.h.
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_FILTER_FLAG_TSYNC = 1
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
PR_SET_NO_NEW_PRIVS = 38

#: --seccomp modes and what a call off the list does.
ACTIONS = {"kill": SECCOMP_RET_KILL_PROCESS, "log": SECCOMP_RET_LOG, "trap": SECCOMP_RET_TRAP}


#: The allowed system calls, name -> x86_64 number (asm/unistd_64.h). Checked in this order, so the
#: calls of every request come first.
SYSCALLS_X86_64 = {
    "read": 0,  # vhost-user messages, eventfds, FUSE READ through the copying path, Python's file reads
    "write": 1,  # vhost-user replies, eventfds, logging to stderr
    "readv": 19,  # vhost-user messages with their payload
    "writev": 20,  # vhost-user replies with their payload
    "pread64": 17,  # FUSE READ (copying path), reading /proc and the xattrmap
    "pwrite64": 18,  # FUSE WRITE of a single buffer
    "preadv": 295,  # FUSE READ straight into guest memory
    "pwritev": 296,  # FUSE WRITE straight from guest memory
    "preadv2": 327,  # glibc's preadv may be this one
    "pwritev2": 328,  # glibc's pwritev may be this one
    "lseek": 8,  # FUSE LSEEK (SEEK_DATA/SEEK_HOLE), rewinding directories for READDIR
    "copy_file_range": 326,  # FUSE COPY_FILE_RANGE
    "fallocate": 285,  # FUSE FALLOCATE
    "ftruncate": 77,  # SETATTR size on an open file
    "fsync": 74,  # FUSE FSYNC, FSYNCDIR
    "fdatasync": 75,  # FUSE FSYNC with datasync
    "syncfs": 306,  # FUSE SYNCFS
    "memfd_create": 319,  # the DAX window: a copy of the last partial page of a mapped file (vhostfs.dax)
    "openat": 257,  # LOOKUP (O_PATH), OPEN/OPENDIR by reopening /proc/self/fd/N, CREATE
    "openat2": 437,  # resolving names inside the share (RESOLVE_IN_ROOT)
    "close": 3,  # FORGET, RELEASE, short-lived fds
    "close_range": 436,  # closing fds in bulk (Python, glibc)
    "dup": 32,  # Python's socket and file objects
    "dup2": 33,  # Python's socket and file objects
    "dup3": 292,  # Python's socket and file objects
    "fcntl": 72,  # POSIX record locks (GETLK/SETLK/SETLKW), fd flags
    "flock": 73,  # FUSE flock(2) locks
    "ioctl": 16,  # FS_IOC_GETFLAGS/SETFLAGS (chattr), terminal checks of Python's streams
    "fstat": 5,  # GETATTR on O_PATH fds
    "newfstatat": 262,  # LOOKUP, and stat of a name relative to a directory fd
    "statx": 332,  # FUSE STATX, mount ids of looked-up files
    "fstatfs": 138,  # FUSE STATFS
    "statfs": 137,  # FUSE STATFS by name
    "getdents64": 217,  # READDIR, READDIRPLUS
    "readlink": 89,  # FUSE READLINK by path, /proc links
    "readlinkat": 267,  # FUSE READLINK on an O_PATH fd
    "faccessat": 269,  # os.access, Python's imports
    "faccessat2": 439,  # glibc's faccessat may be this one
    "getcwd": 79,  # Python asks (os.getcwd, imports)
    "chdir": 80,  # the xattr calls relative to /proc (passthrough._proc_as_cwd)
    "fchdir": 81,  # the xattr calls relative to /proc (passthrough._proc_as_cwd)
    "umask": 95,  # Python's file creation
    "mkdirat": 258,  # FUSE MKDIR
    "mknodat": 259,  # FUSE MKNOD
    "symlinkat": 266,  # FUSE SYMLINK
    "linkat": 265,  # FUSE LINK
    "unlinkat": 263,  # FUSE UNLINK, RMDIR
    "renameat": 264,  # FUSE RENAME
    "renameat2": 316,  # FUSE RENAME2 with flags
    "fchmod": 91,  # SETATTR mode on an open file
    "fchmodat": 268,  # SETATTR mode through /proc/self/fd, clearing set-group-ID after an ACL change
    "fchown": 93,  # SETATTR owner on an open file
    "fchownat": 260,  # SETATTR owner through /proc/self/fd
    "utimensat": 280,  # SETATTR times
    "name_to_handle_at": 303,  # --inode-file-handles
    "open_by_handle_at": 304,  # --inode-file-handles
    "fgetxattr": 193,  # --xattr on open files
    "fsetxattr": 190,  # --xattr on open files, --security-label on a created file
    "flistxattr": 196,  # --xattr on open files
    "fremovexattr": 199,  # --xattr on open files
    "getxattr": 191,  # GETXATTR through /proc/self/fd, default ACLs of a parent (--posix-acl)
    "setxattr": 188,  # SETXATTR through /proc/self/fd, --security-label
    "listxattr": 194,  # LISTXATTR through /proc/self/fd
    "removexattr": 197,  # REMOVEXATTR through /proc/self/fd
    "lgetxattr": 192,  # xattrs of a name, not followed
    "lsetxattr": 189,  # --security-label on a new symlink
    "llistxattr": 195,  # xattrs of a name, not followed
    "lremovexattr": 198,  # xattrs of a name, not followed
    "unshare": 272,  # CLONE_FS: a serving thread's own working directory for the xattr calls
    "setfsuid": 122,  # creating nodes as the guest's caller (passthrough._as_caller)
    "setfsgid": 123,  # creating nodes as the guest's caller (passthrough._as_caller)
    "getgroups": 115,  # a passthrough the control API mounts (no supplementary groups left to drop)
    "getuid": 102,  # Python and glibc ask
    "geteuid": 107,  # Python and glibc ask
    "getgid": 104,  # Python and glibc ask
    "getegid": 108,  # Python and glibc ask
    "getpid": 39,  # logging, Python's fork checks
    "gettid": 186,  # Python's thread ids
    "capget": 125,  # Python and glibc ask
    "mmap": 9,  # the allocator, guest memory regions, the DAX window
    "munmap": 11,  # the allocator, dropping guest memory regions, DAX REMOVEMAPPING
    "mremap": 25,  # the allocator
    "mprotect": 10,  # the allocator, thread stacks
    "madvise": 28,  # the allocator
    "brk": 12,  # the allocator
    "msync": 26,  # DAX window mappings
    "futex": 202,  # locks between threads
    "clone": 56,  # starting queue workers and the thread pool
    "clone3": 435,  # glibc's pthread_create
    "set_robust_list": 273,  # new threads
    "rseq": 334,  # new threads (glibc)
    "exit": 60,  # a thread ends
    "exit_group": 231,  # the daemon ends
    "sched_yield": 24,  # spinning on locks
    "sched_getaffinity": 204,  # os.cpu_count for the thread pool
    "nanosleep": 35,  # sleeps (polling a ring that ran dry)
    "clock_nanosleep": 230,  # sleeps (polling a ring that ran dry)
    "clock_gettime": 228,  # time stamps, timeouts
    "gettimeofday": 96,  # time stamps
    "getrandom": 318,  # Python's hash seeds and random
    "rt_sigaction": 13,  # SIGTERM/SIGINT handlers
    "rt_sigprocmask": 14,  # signal masks of new threads
    "rt_sigreturn": 15,  # returning from a signal handler
    "sigaltstack": 131,  # Python's faulthandler and new threads
    "tgkill": 234,  # Python's signal wake-ups, pthread_kill
    "restart_syscall": 219,  # a call interrupted by a signal
    "eventfd2": 290,  # kick/call eventfds
    "poll": 7,  # waiting on the socket and eventfds
    "ppoll": 271,  # waiting on the socket and eventfds
    "select": 23,  # waiting on the socket and eventfds
    "pselect6": 270,  # waiting on the socket and eventfds
    "epoll_create1": 291,  # waiting on kick eventfds
    "epoll_ctl": 233,  # waiting on kick eventfds
    "epoll_wait": 232,  # waiting on kick eventfds
    "epoll_pwait": 281,  # waiting on kick eventfds
    "recvmsg": 47,  # vhost-user messages with SCM_RIGHTS fds
    "sendmsg": 46,  # vhost-user replies and backend requests
    "recvfrom": 45,  # vhost-user messages
    "sendto": 44,  # vhost-user replies, syslog
    "accept": 43,  # the next front end (--keep-listening)
    "accept4": 288,  # the next front end (--keep-listening)
    "shutdown": 48,  # SIGTERM ends the session (cli._Stop)
    "getsockopt": 55,  # Python's socket objects
    "setsockopt": 54,  # Python's socket objects
    "getsockname": 51,  # Python's socket objects
    "getpeername": 52,  # Python's socket objects
    "uname": 63,  # Python and glibc ask
    "sysinfo": 99,  # Python and glibc ask
    "prlimit64": 302,  # the fd budget (RLIMIT_NOFILE)
    "getrusage": 98,  # Python and glibc ask
}

#: Added with --syslog: logging.handlers.SysLogHandler reopens /dev/log when a send fails.
SYSLOG_SYSCALLS_X86_64 = {"socket": 41, "connect": 42}




@dataclass(frozen=True)
class Architecture:
    """What the filter needs to know of one system call ABI."""

    #: seccomp_data.arch of its calls (AUDIT_ARCH_*, linux/audit.h).
    audit_arch: int
    #: The allowed calls, name -> number.
    syscalls: dict[str, int]
    #: Added with --syslog.
    syslog_syscalls: dict[str, int]
    #: Numbers with this bit set reach the same table under another ABI (x86_64's x32); 0: none.
    refused_bit: int = 0


#: The architectures with a system call table, by `os.uname().machine`.
ARCHITECTURES = {
    "x86_64": Architecture(AUDIT_ARCH_X86_64, SYSCALLS_X86_64, SYSLOG_SYSCALLS_X86_64, X32_SYSCALL_BIT),
}

UNSUPPORTED = f"the seccomp filter has system call tables for {', '.join(ARCHITECTURES)} only"


class SeccompError(Exception):
    """The filter could not be installed (the daemon must not serve without the filter it was asked for)."""


def architecture() -> Architecture | None:
    """This machine's system call table, or None if there is none here."""
    return ARCHITECTURES.get(os.uname().machine)


def supported() -> bool:
    """Whether this machine has a system call table here."""
    return architecture() is not None


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return SOCK_FILTER.pack(code, jt, jf, k)


def program(action: int, syscalls: dict[str, int], arch: Architecture = ARCHITECTURES["x86_64"]) -> bytes:
    """The classic BPF program: `syscalls` (numbers, in order) are allowed, anything else gets `action`.

    A call from another architecture than `arch` or from the ABI its `refused_bit` marks gets `action`
    too.
    """
    insns = [
        _insn(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH),
        _insn(BPF_JMP | BPF_JEQ | BPF_K, arch.audit_arch, jt=1),
        _insn(BPF_RET | BPF_K, action),
        _insn(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_NR),
    ]
    if arch.refused_bit:
        insns += [
            _insn(BPF_JMP | BPF_JGE | BPF_K, arch.refused_bit, jf=1),
            _insn(BPF_RET | BPF_K, action),
        ]
    for number in dict.fromkeys(syscalls.values()):
        # Equal: fall through to ALLOW; otherwise skip it to the next comparison.
        insns.append(_insn(BPF_JMP | BPF_JEQ | BPF_K, number, jf=1))
        insns.append(_insn(BPF_RET | BPF_K, SECCOMP_RET_ALLOW))
    insns.append(_insn(BPF_RET | BPF_K, action))
    return b"".join(insns)


def install(mode: str, syslog: bool = False) -> None:
    """Sets no-new-privileges and installs the filter for `mode` on every thread; raises SeccompError.

    `syslog` allows what --syslog's handler needs on top of the list.
    """
    if mode not in ACTIONS:
        raise SeccompError(f"unknown seccomp mode {mode!r}")
    arch = architecture()
    if arch is None:
        raise SeccompError(f"--seccomp={mode}: {UNSUPPORTED} (this is {os.uname().machine})")
    syscalls = dict(arch.syscalls)
    if syslog:
        syscalls.update(arch.syslog_syscalls)
    try:
        native.prctl(PR_SET_NO_NEW_PRIVS, 1)
        failed = native.seccomp_filter(SECCOMP_FILTER_FLAG_TSYNC, program(ACTIONS[mode], syscalls, arch))
    except OSError as e:
        raise SeccompError(f"--seccomp={mode}: cannot install the filter: {e}") from e
    if failed:
        # TSYNC names a thread it could not synchronize (one with a filter of its own).
        raise SeccompError(f"--seccomp={mode}: thread {failed} could not take the filter")
