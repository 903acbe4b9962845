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
each allowed one. Only x86_64 has a table; elsewhere `install` refuses with SeccompError.

SECCOMP_FILTER_FLAG_TSYNC gives the filter to every thread of the process at once; the daemon has
only its main thread by then, but a thread started by a library would otherwise escape it.
No new privileges (PR_SET_NO_NEW_PRIVS) is set first, as an unprivileged filter requires.
"""

from __future__ import annotations

import os
import struct

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

UNSUPPORTED = "the seccomp filter has a system call table for x86_64 only"

#: The allowed system calls, name -> x86_64 number (asm/unistd_64.h). Checked in this order, so the
#: calls of every request come first.
SYSCALLS_X86_64 = {
    # Data: FUSE READ/WRITE (preadv/pwritev; glibc may use the v2 calls), the vhost-user socket's
    # plain reads and writes, logging, COPY_FILE_RANGE, FALLOCATE, SETATTR size, FSYNC, SYNCFS.
    "read": 0, "write": 1, "readv": 19, "writev": 20, "pread64": 17, "pwrite64": 18, "preadv": 295,
    "pwritev": 296, "preadv2": 327, "pwritev2": 328, "lseek": 8, "copy_file_range": 326, "fallocate": 285,
    "ftruncate": 77, "fsync": 74, "fdatasync": 75, "syncfs": 306,
    # The DAX window: a copy of the last partial page of a mapped file (vhostfs.dax).
    "memfd_create": 319,
    # Names and attributes: LOOKUP and every *at call of the passthrough (O_PATH fds, reopening
    # through /proc/self/fd), STATFS, READDIR, READLINK; Python's lazy imports read files too.
    "openat": 257, "openat2": 437, "close": 3, "close_range": 436, "dup": 32, "dup2": 33, "dup3": 292,
    "fcntl": 72, "flock": 73, "ioctl": 16, "fstat": 5, "newfstatat": 262, "statx": 332, "fstatfs": 138,
    "statfs": 137, "getdents64": 217, "readlink": 89, "readlinkat": 267, "faccessat": 269,
    "faccessat2": 439, "getcwd": 79, "chdir": 80, "fchdir": 81, "umask": 95,
    # Changes: MKDIR, MKNOD, SYMLINK, LINK, UNLINK/RMDIR, RENAME(2), SETATTR (mode, owner, times),
    # and file handles (--inode-file-handles).
    "mkdirat": 258, "mknodat": 259, "symlinkat": 266, "linkat": 265, "unlinkat": 263, "renameat": 264,
    "renameat2": 316, "fchmod": 91, "fchmodat": 268, "fchown": 93, "fchownat": 260, "utimensat": 280,
    "name_to_handle_at": 303, "open_by_handle_at": 304,
    # Extended attributes (--xattr, the security.capability mapping).
    "fgetxattr": 193, "fsetxattr": 190, "flistxattr": 196, "fremovexattr": 199, "getxattr": 191,
    "setxattr": 188, "listxattr": 194, "removexattr": 197, "lgetxattr": 192, "lsetxattr": 189,
    "llistxattr": 195, "lremovexattr": 198,
    # ... named relative to /proc as a thread's own working directory (passthrough._proc_as_cwd).
    "unshare": 272,
    # Credentials: per-thread fsuid/fsgid for create-as-caller (passthrough._as_caller); getgroups for
    # a passthrough the control API mounts (it has no supplementary groups to drop by then).
    "setfsuid": 122, "setfsgid": 123, "getuid": 102, "geteuid": 107, "getgid": 104, "getegid": 108,
    "getgroups": 115,
    "getpid": 39, "gettid": 186, "capget": 125,
    # Memory: the allocator, guest memory and DAX window mappings (mmap, msync, munmap).
    "mmap": 9, "munmap": 11, "mremap": 25, "mprotect": 10, "madvise": 28, "brk": 12, "msync": 26,
    # Threads: queue workers and the thread pool (start, wait on locks, exit), sleeps, clocks.
    "futex": 202, "clone": 56, "clone3": 435, "set_robust_list": 273, "rseq": 334, "exit": 60,
    "exit_group": 231, "sched_yield": 24, "sched_getaffinity": 204, "nanosleep": 35,
    "clock_nanosleep": 230, "clock_gettime": 228, "gettimeofday": 96, "getrandom": 318,
    # Signals: SIGTERM/SIGINT handling and Python's signal wake-ups.
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "sigaltstack": 131, "tgkill": 234,
    "restart_syscall": 219,
    # Events and the vhost-user socket: kick/call eventfds, poll/select, SCM_RIGHTS messages.
    "eventfd2": 290, "poll": 7, "ppoll": 271, "select": 23, "pselect6": 270, "epoll_create1": 291,
    "epoll_ctl": 233, "epoll_wait": 232, "epoll_pwait": 281, "recvmsg": 47, "sendmsg": 46, "recvfrom": 45,
    "sendto": 44, "accept": 43, "accept4": 288, "shutdown": 48, "getsockopt": 55, "setsockopt": 54,
    "getsockname": 51, "getpeername": 52,
    # Process information Python and glibc ask for (uname, resource limits, memory size).
    "uname": 63, "sysinfo": 99, "prlimit64": 302, "getrusage": 98,
}

#: Added with --syslog: logging.handlers.SysLogHandler reopens /dev/log when a send fails.
SYSLOG_SYSCALLS_X86_64 = {"socket": 41, "connect": 42}


class SeccompError(Exception):
    """The filter could not be installed (the daemon must not serve without the filter it was asked for)."""


def supported() -> bool:
    """Whether this machine has a system call table here (x86_64)."""
    return os.uname().machine == "x86_64"


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return SOCK_FILTER.pack(code, jt, jf, k)


def program(action: int, syscalls: dict[str, int]) -> bytes:
    """The classic BPF program: `syscalls` (numbers, in order) are allowed, anything else gets `action`.

    A call from another architecture or from the x32 ABI gets `action` too.
    """
    insns = [
        _insn(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH),
        _insn(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, jt=1),
        _insn(BPF_RET | BPF_K, action),
        _insn(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_NR),
        _insn(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, jf=1),
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
    if not supported():
        raise SeccompError(f"--seccomp={mode}: {UNSUPPORTED} (this is {os.uname().machine})")
    syscalls = dict(SYSCALLS_X86_64)
    if syslog:
        syscalls.update(SYSLOG_SYSCALLS_X86_64)
    try:
        native.prctl(PR_SET_NO_NEW_PRIVS, 1)
        failed = native.seccomp_filter(SECCOMP_FILTER_FLAG_TSYNC, program(ACTIONS[mode], syscalls))
    except OSError as e:
        raise SeccompError(f"--seccomp={mode}: cannot install the filter: {e}") from e
    if failed:
        # TSYNC names a thread it could not synchronize (one with a filter of its own).
        raise SeccompError(f"--seccomp={mode}: thread {failed} could not take the filter")
