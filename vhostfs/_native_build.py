"""cffi build script for vhostfs._native: memory fences and the Linux syscalls Python lacks.

Python has no memory barriers, and the virtio ring protocol needs them (virtio 1.2, 2.7.7 and 2.7.13):
these helpers compile to single fence instructions.
"""

from cffi import FFI

CDEF = """
void vhostfs_mb(void);
void vhostfs_rmb(void);
void vhostfs_wmb(void);
int setfsuid(unsigned int uid);
int setfsgid(unsigned int gid);
int vhostfs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                      unsigned int flags);
int vhostfs_unshare(int flags);
int vhostfs_pivot_root(const char *new_root, const char *put_old);
int vhostfs_syncfs(int fd);
int vhostfs_fallocate(int fd, int mode, long long offset, long long len);
int vhostfs_log_pages(unsigned char *log, unsigned long long log_size, unsigned long long first,
                      unsigned long long last);
void *vhostfs_mmap(void *addr, size_t length, int prot, int flags, int fd, long long offset);
int vhostfs_munmap(void *addr, size_t length);
int vhostfs_msync(void *addr, size_t length, int flags);
int vhostfs_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
                  const char *data);
int vhostfs_umount2(const char *target, int flags);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <sys/fsuid.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Full fence: orders earlier stores before later loads (needed around EVENT_IDX checks). */
void vhostfs_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/* Read fence: later loads are not satisfied before earlier ones. */
void vhostfs_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/* Write fence: earlier stores become visible before later ones. */
void vhostfs_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

int vhostfs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                      unsigned int flags)
{
    return syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}
int vhostfs_unshare(int flags) { return unshare(flags); }
int vhostfs_pivot_root(const char *new_root, const char *put_old)
{
    return syscall(SYS_pivot_root, new_root, put_old);
}
int vhostfs_syncfs(int fd) { return syncfs(fd); }
int vhostfs_fallocate(int fd, int mode, long long offset, long long len)
{
    return fallocate(fd, mode, offset, len);
}
/* Dirty-page log (vhost-user.rst "Migration"): sets the bits of pages first..last in the bitmap,
 * one bit per page, atomically because the front end reads and clears it concurrently. Returns -1,
 * marking nothing, when the range lies beyond the log. */
int vhostfs_log_pages(unsigned char *log, unsigned long long log_size, unsigned long long first,
                      unsigned long long last)
{
    if (last < first || last / 8 >= log_size)
        return -1;
    for (unsigned long long page = first; page <= last; page++)
        __atomic_fetch_or(&log[page / 8], (unsigned char)(1u << (page % 8)), __ATOMIC_RELAXED);
    return 0;
}
/* mmap(2) at a fixed address (MAP_FIXED), which Python's mmap module cannot do. */
void *vhostfs_mmap(void *addr, size_t length, int prot, int flags, int fd, long long offset)
{
    return mmap(addr, length, prot, flags, fd, offset);
}
int vhostfs_munmap(void *addr, size_t length) { return munmap(addr, length); }
int vhostfs_msync(void *addr, size_t length, int flags) { return msync(addr, length, flags); }
/* mount(2) and umount2(2) for the /dev/fuse transport (os has neither). */
int vhostfs_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
                  const char *data)
{
    return mount(source, target, fstype, flags, data);
}
int vhostfs_umount2(const char *target, int flags) { return umount2(target, flags); }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vhostfs._native", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
