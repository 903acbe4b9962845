"""cffi build script for vhostfs._native: memory fences and the Linux syscalls Python lacks.

Python has no memory barriers, and the virtio ring protocol needs them (virtio 1.2, 2.7.7 and 2.7.13):
these helpers compile to single fence instructions.
"""

import hashlib

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
int vhostfs_capget(uint32_t data[6]);
int vhostfs_capset(const uint32_t data[6]);
int vhostfs_prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
                  unsigned long arg5);
int vhostfs_seccomp_filter(unsigned int flags, const void *filter, unsigned short count);
int vhostfs_mount_id(int fd, const char *name, unsigned long long *mnt_id);
int vhostfs_name_to_handle(int fd, unsigned char *buf, unsigned int size, int *handle_type, int *mount_id);
int vhostfs_open_by_handle(int mount_fd, const unsigned char *buf, unsigned int size, int handle_type,
                           int flags);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <linux/stat.h>
#include <stdio.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <sys/prctl.h>

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
/* capget(2)/capset(2) of the calling thread, _LINUX_CAPABILITY_VERSION_3: data holds the two
 * 32-bit halves of each set as {effective, permitted, inheritable} for capabilities 0-31, then 32-63. */
int vhostfs_capget(uint32_t data[6])
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[2];
    if (syscall(SYS_capget, &header, caps) < 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        data[3 * i] = caps[i].effective;
        data[3 * i + 1] = caps[i].permitted;
        data[3 * i + 2] = caps[i].inheritable;
    }
    return 0;
}
int vhostfs_capset(const uint32_t data[6])
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[2];
    for (int i = 0; i < 2; i++) {
        caps[i].effective = data[3 * i];
        caps[i].permitted = data[3 * i + 1];
        caps[i].inheritable = data[3 * i + 2];
    }
    return syscall(SYS_capset, &header, caps);
}
int vhostfs_prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
                  unsigned long arg5)
{
    return prctl(option, arg2, arg3, arg4, arg5);
}
/* seccomp(SECCOMP_SET_MODE_FILTER, flags, prog) with a classic BPF program of `count` struct
 * sock_filter entries (8 bytes each) at `filter`. */
int vhostfs_seccomp_filter(unsigned int flags, const void *filter, unsigned short count)
{
    struct sock_fprog prog = {count, (struct sock_filter *)filter};
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}
/* The mount id of fd (statx(2) STATX_MNT_ID, Linux 5.8): 0 with *mnt_id set, 1 when the kernel does not
 * report it (the caller falls back to /proc/self/fdinfo), -1 with errno on failure. */
int vhostfs_mount_id(int fd, const char *name, unsigned long long *mnt_id)
{
    struct statx stx;
    int flags = AT_SYMLINK_NOFOLLOW | (name[0] ? 0 : AT_EMPTY_PATH);
    if (syscall(SYS_statx, fd, name, flags, STATX_MNT_ID, &stx) < 0)
        return -1;
    if (!(stx.stx_mask & STATX_MNT_ID))
        return 1;
    *mnt_id = stx.stx_mnt_id;
    return 0;
}
/* name_to_handle_at(2) of the file fd itself (AT_EMPTY_PATH, so an O_PATH fd of a symlink names the
 * symlink): copies the opaque handle into buf and returns its length, -1 with errno on failure. */
int vhostfs_name_to_handle(int fd, unsigned char *buf, unsigned int size, int *handle_type, int *mount_id)
{
    union { struct file_handle fh; unsigned char raw[sizeof(struct file_handle) + MAX_HANDLE_SZ]; } h;
    h.fh.handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(fd, "", &h.fh, mount_id, AT_EMPTY_PATH) < 0)
        return -1;
    if (h.fh.handle_bytes > size) {
        errno = EOVERFLOW;
        return -1;
    }
    memcpy(buf, h.fh.f_handle, h.fh.handle_bytes);
    *handle_type = h.fh.handle_type;
    return (int)h.fh.handle_bytes;
}
/* open_by_handle_at(2) of a handle from vhostfs_name_to_handle; mount_fd is an fd (not O_PATH) on the
 * file's mount. Needs CAP_DAC_READ_SEARCH. */
int vhostfs_open_by_handle(int mount_fd, const unsigned char *buf, unsigned int size, int handle_type,
                           int flags)
{
    union { struct file_handle fh; unsigned char raw[sizeof(struct file_handle) + MAX_HANDLE_SZ]; } h;
    if (size > MAX_HANDLE_SZ) {
        errno = EINVAL;
        return -1;
    }
    h.fh.handle_bytes = size;
    h.fh.handle_type = handle_type;
    memcpy(h.fh.f_handle, buf, size);
    return open_by_handle_at(mount_fd, &h.fh, flags);
}
"""

#: The descriptor-chain walker of vhostfs/virtqueue/split.py (virtio 1.2, 2.7.5). A request's chain
#: can hold hundreds of descriptors (a 1 MiB read is one per 4 KiB page); walked in Python that was
#: most of the cost of a large request, here it is one call.
#: The chain walker's error codes, in order from 1 (vhostfs_walk_chain returns them negated), with
#: the ChainError message of each; VQ_E_FULL is not an error but asks for larger output arrays.
WALK_ERRORS = {
    "VQ_E_HEAD": "head index >= queue size",
    "VQ_E_LOOP": "descriptor chain loops or is longer than its table",
    "VQ_E_INDIRECT_FEATURE": "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC",
    "VQ_E_INDIRECT_NESTED": "nested indirect descriptor table",
    "VQ_E_INDIRECT_NEXT": "indirect descriptor with VIRTQ_DESC_F_NEXT",
    "VQ_E_INDIRECT_LENGTH": "indirect table length is not a non-zero multiple of 16",
    "VQ_E_INDIRECT_MEMORY": "indirect table outside guest memory",
    "VQ_E_TOO_LONG": "descriptor chain longer than 4 GiB",
    "VQ_E_ORDER": "device-readable descriptor after a device-writable one",
    "VQ_E_MEMORY": "buffer outside guest memory",
    "VQ_E_NEXT": "next index >= table size",
    "VQ_E_FULL": "more buffers than the output arrays hold",
}

VIRTQUEUE_CDEF = """
struct vhostfs_region { uint64_t gpa; uint64_t size; const uint8_t *host; };
int vhostfs_walk_chain(const uint8_t *table, uint32_t num, uint32_t head, int indirect_ok,
                       const struct vhostfs_region *regions, uint32_t nregions, uint64_t *segs,
                       uint32_t max_segs, uint32_t *nreadable, uint64_t *ranges, uint32_t *nranges);
int vhostfs_poll_u16(const uint16_t *p, uint16_t value, const uint32_t *wake, uint64_t timeout_ns);
"""

VIRTQUEUE_SOURCE = r"""
#include <time.h>

struct vhostfs_region { uint64_t gpa; uint64_t size; const uint8_t *host; };

static uint64_t vq_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Waits up to timeout_ns for the 16-bit field at p (an avail ring index the driver writes) to differ
 * from value; returns 1 if it did, 0 on timeout or once *wake is non-zero (another thread wants the
 * poller back). Called without the GIL, so polling a ring costs the daemon's other threads nothing;
 * each turn yields the CPU to whatever else is runnable. */
int vhostfs_poll_u16(const uint16_t *p, uint16_t value, const uint32_t *wake, uint64_t timeout_ns)
{
    uint64_t deadline = vq_now_ns() + timeout_ns;
    for (;;) {
        if (__atomic_load_n(p, __ATOMIC_ACQUIRE) != value)
            return 1;
        if (__atomic_load_n(wake, __ATOMIC_ACQUIRE) || vq_now_ns() > deadline)
            return 0;
        sched_yield();
    }
}

#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_DESC_F_INDIRECT 4

/* Error codes, negated (WALK_ERRORS: the enum is generated from it). */
@WALK_ERRORS_ENUM@

/* The index of the region holding gpa (regions sorted by gpa, not overlapping), or -1. *hint is the
 * last region found: consecutive buffers almost always share one. */
static int vq_region(const struct vhostfs_region *r, uint32_t n, uint64_t gpa, uint32_t *hint)
{
    uint32_t lo = 0, hi = n;
    if (*hint < n && gpa - r[*hint].gpa < r[*hint].size && gpa >= r[*hint].gpa)
        return (int)*hint;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (r[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || gpa - r[lo - 1].gpa >= r[lo - 1].size)
        return -1;
    *hint = lo - 1;
    return (int)(lo - 1);
}

/* Whether [gpa, gpa + len) lies in guest memory (it may run across adjacent regions). */
static int vq_mapped(const struct vhostfs_region *r, uint32_t n, uint64_t gpa, uint64_t len,
                     uint32_t *hint)
{
    if (len > UINT64_MAX - gpa)
        return 0;
    while (len) {
        int i = vq_region(r, n, gpa, hint);
        uint64_t left;
        if (i < 0)
            return 0;
        left = r[i].size - (gpa - r[i].gpa);
        if (left >= len)
            return 1;
        gpa += left;
        len -= left;
    }
    return 1;
}

/* Copies a 16-byte descriptor at gpa out of guest memory (the caller checked it is mapped). */
static void vq_copy(const struct vhostfs_region *r, uint32_t n, uint64_t gpa, uint8_t *out,
                    uint32_t *hint)
{
    uint64_t len = 16;
    while (len) {
        int i = vq_region(r, n, gpa, hint);
        uint64_t off = gpa - r[i].gpa;
        uint64_t k = r[i].size - off < len ? r[i].size - off : len;
        memcpy(out, r[i].host + off, k);
        out += k;
        gpa += k;
        len -= k;
    }
}

/* Walks the chain at head. Each buffer becomes segments (region index, start, end offset in the
 * region), three u64 each in segs, device-readable ones first; a buffer that continues the previous
 * one of the same kind in the same region extends it. With ranges (capacity max_segs pairs), the
 * guest address and length of every device-writable descriptor are stored there too. Returns the
 * number of segments, or a negated VQ_E_* code. Each descriptor is read from guest memory exactly
 * once, so a driver changing the table meanwhile cannot make a checked value change. */
int vhostfs_walk_chain(const uint8_t *table, uint32_t num, uint32_t head, int indirect_ok,
                       const struct vhostfs_region *regions, uint32_t nregions, uint64_t *segs,
                       uint32_t max_segs, uint32_t *nreadable, uint64_t *ranges, uint32_t *nranges)
{
    uint32_t n = 0, nr = 0, nw = 0, hint = 0, count = 0, limit = num, idx = head;
    uint64_t total = 0, indirect = 0;
    int in_indirect = 0, writing = 0;
    uint8_t d[16];

    if (head >= num)
        return -VQ_E_HEAD;
    for (;;) {
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;

        if (++count > limit)
            return -VQ_E_LOOP;
        if (in_indirect)
            vq_copy(regions, nregions, indirect + 16 * (uint64_t)idx, d, &hint);
        else
            memcpy(d, table + 16 * (size_t)idx, 16);
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & VQ_DESC_F_INDIRECT) {
            if (!indirect_ok)
                return -VQ_E_INDIRECT_FEATURE;
            if (in_indirect)
                return -VQ_E_INDIRECT_NESTED;
            if (flags & VQ_DESC_F_NEXT)
                return -VQ_E_INDIRECT_NEXT;
            if (len == 0 || len % 16)
                return -VQ_E_INDIRECT_LENGTH;
            if (!vq_mapped(regions, nregions, addr, len, &hint))
                return -VQ_E_INDIRECT_MEMORY;
            in_indirect = 1;
            indirect = addr;
            limit = len / 16;
            idx = 0;
            count = 0;
            continue;
        }
        total += len;
        if (total >= (1ULL << 32))
            return -VQ_E_TOO_LONG;
        if (flags & VQ_DESC_F_WRITE) {
            writing = 1;
            if (ranges) {
                if (nw == max_segs)
                    return -VQ_E_FULL;
                ranges[2 * nw] = addr;
                ranges[2 * nw + 1] = len;
                nw++;
            }
        } else if (writing) {
            return -VQ_E_ORDER;
        }
        if (len) {
            uint64_t left = len;
            if (len > UINT64_MAX - addr)
                return -VQ_E_MEMORY;
            while (left) {
                int i = vq_region(regions, nregions, addr, &hint);
                uint64_t off, k;
                if (i < 0)
                    return -VQ_E_MEMORY;
                off = addr - regions[i].gpa;
                k = regions[i].size - off < left ? regions[i].size - off : left;
                if (n > (writing ? nr : 0) && segs[3 * n - 3] == (uint64_t)i && segs[3 * n - 1] == off) {
                    segs[3 * n - 1] = off + k;
                } else {
                    if (n == max_segs)
                        return -VQ_E_FULL;
                    segs[3 * n] = (uint64_t)i;
                    segs[3 * n + 1] = off;
                    segs[3 * n + 2] = off + k;
                    n++;
                }
                addr += k;
                left -= k;
            }
        }
        if (!writing)
            nr = n;
        if (!(flags & VQ_DESC_F_NEXT)) {
            *nreadable = nr;
            if (nranges)
                *nranges = nw;
            return (int)n;
        }
        idx = next;
        if (idx >= limit)
            return -VQ_E_NEXT;
    }
}
"""

#: What stat(2) and statx(2) STATX_MNT_ID say of one file, declared once for the cdef and the source.
VHOSTFS_STAT = """struct vhostfs_stat {
    uint64_t dev; uint64_t ino; uint64_t mnt_id; uint64_t size; uint64_t blocks;
    int64_t atime; int64_t mtime; int64_t ctime;
    uint32_t atimensec; uint32_t mtimensec; uint32_t ctimensec; uint32_t mode; uint32_t nlink;
    uint32_t uid; uint32_t gid; uint32_t rdev; uint32_t blksize; uint32_t attr_flags;
    int32_t err; uint32_t has_mnt_id;
};"""

#: Directory listings: getdents64(2), and linux_dirent64 records turned into fuse_dirent ones (fuse.h)
#: for a plain READDIR, so that listing a large directory costs a call per request, not per entry.
DIRENT_CDEF = """
long vhostfs_getdents(int fd, uint8_t *buf, size_t size);
int vhostfs_index_dirents(const uint8_t *data, size_t start, size_t len, uint32_t *offsets, uint32_t max);
uint32_t vhostfs_pack_dirents(const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                              uint32_t count, uint8_t *out, uint32_t size, uint32_t *next);
@VHOSTFS_STAT@
uint32_t vhostfs_direntplus_fit(const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                                uint32_t count, uint32_t size);
void vhostfs_stat_dirents(int dirfd, const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                          uint32_t count, struct vhostfs_stat *out);
uint32_t vhostfs_pack_direntplus(const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                                 uint32_t count, const struct vhostfs_stat *st, const uint64_t *nodeids,
                                 uint64_t entry_sec, uint32_t entry_nsec, uint64_t attr_sec,
                                 uint32_t attr_nsec, uint8_t *out, uint32_t size, uint32_t *packed);
"""

DIRENT_SOURCE = r"""
/* linux_dirent64: u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, then the NUL-terminated name. */
#define VD_NAME 19
/* fuse_dirent: u64 ino, u64 off, u32 namelen, u32 type, then the name padded to 8 bytes. */
#define FD_NAME 24

long vhostfs_getdents(int fd, uint8_t *buf, size_t size)
{
    return syscall(SYS_getdents64, fd, buf, size);
}

/* The length of the name of the record at off, or -1 if the record does not lie within len bytes
 * or has no NUL inside it. */
static long vd_namelen(const uint8_t *data, size_t len, size_t off)
{
    uint16_t reclen;
    const uint8_t *nul;
    if (off > len || len - off < VD_NAME + 1)
        return -1;
    memcpy(&reclen, data + off + 16, 2);
    if (reclen < VD_NAME + 1 || reclen > len - off)
        return -1;
    nul = memchr(data + off + VD_NAME, 0, reclen - VD_NAME);
    return nul ? (long)(nul - (data + off + VD_NAME)) : -1;
}

/* Stores the offset of every record of data[start:len) but "." and ".." in offsets (at most max);
 * returns how many, or -1 for a malformed record. */
int vhostfs_index_dirents(const uint8_t *data, size_t start, size_t len, uint32_t *offsets, uint32_t max)
{
    size_t off = start;
    uint32_t n = 0;
    while (off < len) {
        long namelen = vd_namelen(data, len, off);
        uint16_t reclen;
        const uint8_t *name = data + off + VD_NAME;
        if (namelen < 0 || off > UINT32_MAX)
            return -1;
        memcpy(&reclen, data + off + 16, 2);
        if (!(namelen == 1 && name[0] == '.') && !(namelen == 2 && name[0] == '.' && name[1] == '.')) {
            if (n == max)
                return -1;
            offsets[n++] = (uint32_t)off;
        }
        off += reclen;
    }
    return (int)n;
}

/* Packs entries first.. of offsets[0:count) as fuse_dirent records into out (size bytes), entry i
 * with cookie i + 1, as many as fit whole; *next is the first entry not packed. Returns the bytes
 * written. A malformed record ends the packing as if out were full. */
uint32_t vhostfs_pack_dirents(const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                              uint32_t count, uint8_t *out, uint32_t size, uint32_t *next)
{
    uint32_t pos = 0, i;
    for (i = first; i < count; i++) {
        size_t off = offsets[i];
        long namelen = vd_namelen(data, len, off);
        uint32_t rec, type;
        uint64_t ino, cookie = (uint64_t)i + 1;
        if (namelen <= 0)
            break;
        rec = (FD_NAME + (uint32_t)namelen + 7) & ~7u;
        if (rec > size - pos)
            break;
        memcpy(&ino, data + off, 8);
        type = data[off + 18];
        memcpy(out + pos, &ino, 8);
        memcpy(out + pos + 8, &cookie, 8);
        memcpy(out + pos + 16, &namelen, 4);
        memcpy(out + pos + 20, &type, 4);
        memcpy(out + pos + FD_NAME, data + off + VD_NAME, (size_t)namelen);
        memset(out + pos + FD_NAME + namelen, 0, rec - FD_NAME - (uint32_t)namelen);
        pos += rec;
    }
    *next = i;
    return pos;
}

/* struct vhostfs_stat: what stat(2) and statx(2) STATX_MNT_ID say of one file, in host byte order;
 * err is 0 or the errno of the call, has_mnt_id whether the kernel reported the mount id. */
@VHOSTFS_STAT@
/* fuse_direntplus: fuse_entry_out (128 bytes: nodeid, generation, entry_valid, attr_valid, their nsec,
 * fuse_attr) then fuse_dirent. */
#define FDP_ENTRY 128
#define FDP_NAME (FDP_ENTRY + FD_NAME)

static int vd_is_dots(const uint8_t *name, long namelen)
{
    return (namelen == 1 && name[0] == '.') || (namelen == 2 && name[0] == '.' && name[1] == '.');
}

/* How many entries first.. of offsets[0:count) fit whole as fuse_direntplus records in size bytes
 * (fewer where a record is malformed). */
uint32_t vhostfs_direntplus_fit(const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                                uint32_t count, uint32_t size)
{
    uint32_t pos = 0, i;
    for (i = first; i < count; i++) {
        long namelen = vd_namelen(data, len, offsets[i]);
        uint32_t rec;
        if (namelen <= 0)
            break;
        rec = (FDP_NAME + (uint32_t)namelen + 7) & ~7u;
        if (rec > size - pos)
            break;
        pos += rec;
    }
    return i - first;
}

/* statx(2) of each of `count` entries from `first` (not following symlinks) into out[0:count): one
 * system call gives the attributes and the mount id. b"." and b".." are not looked at (zeroed); a
 * malformed record gets EINVAL. */
void vhostfs_stat_dirents(int dirfd, const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                          uint32_t count, struct vhostfs_stat *out)
{
    uint32_t i;
    for (i = 0; i < count; i++) {
        struct vhostfs_stat *s = &out[i];
        size_t off = offsets[first + i];
        long namelen = vd_namelen(data, len, off);
        const char *name = (const char *)data + off + VD_NAME;
        struct statx x;
        memset(s, 0, sizeof(*s));
        if (namelen <= 0) {
            s->err = EINVAL;
            continue;
        }
        if (vd_is_dots((const uint8_t *)name, namelen))
            continue;
        if (syscall(SYS_statx, dirfd, name, AT_SYMLINK_NOFOLLOW | AT_STATX_SYNC_AS_STAT,
                    STATX_BASIC_STATS | STATX_MNT_ID, &x) < 0) {
            s->err = errno;
            continue;
        }
        /* The dev_t encodings of stat(2) (the kernel's new_encode_dev) and glibc's makedev agree
         * for every major below 4096, which is all the kernel has. */
        s->dev = makedev(x.stx_dev_major, x.stx_dev_minor);
        s->ino = x.stx_ino;
        s->mnt_id = x.stx_mnt_id;
        s->has_mnt_id = (x.stx_mask & STATX_MNT_ID) != 0;
        s->size = x.stx_size;
        s->blocks = x.stx_blocks;
        s->atime = x.stx_atime.tv_sec;
        s->mtime = x.stx_mtime.tv_sec;
        s->ctime = x.stx_ctime.tv_sec;
        s->atimensec = x.stx_atime.tv_nsec;
        s->mtimensec = x.stx_mtime.tv_nsec;
        s->ctimensec = x.stx_ctime.tv_nsec;
        s->mode = x.stx_mode;
        s->nlink = x.stx_nlink;
        s->uid = x.stx_uid;
        s->gid = x.stx_gid;
        s->rdev = (uint32_t)makedev(x.stx_rdev_major, x.stx_rdev_minor);
        s->blksize = x.stx_blksize;
    }
}

/* Packs entries first..first+count of offsets as fuse_direntplus records into out (size bytes), entry
 * i with cookie i + 1, its node nodeids[i - first] and attributes st[i - first]: a node id of 0 sends
 * no node (the ino and type of the host record), an entry whose err is set is left out. *packed is how
 * many entries were dealt with (count unless out filled or a record was malformed). Returns the bytes
 * written. */
uint32_t vhostfs_pack_direntplus(const uint8_t *data, size_t len, const uint32_t *offsets, uint32_t first,
                                 uint32_t count, const struct vhostfs_stat *st, const uint64_t *nodeids,
                                 uint64_t entry_sec, uint32_t entry_nsec, uint64_t attr_sec,
                                 uint32_t attr_nsec, uint8_t *out, uint32_t size, uint32_t *packed)
{
    uint32_t pos = 0, k;
    for (k = 0; k < count; k++) {
        size_t off = offsets[first + k];
        long namelen = vd_namelen(data, len, off);
        const struct vhostfs_stat *s = &st[k];
        uint8_t *r = out + pos;
        uint32_t rec, type, nl;
        uint64_t ino, cookie = (uint64_t)first + k + 1, nodeid = nodeids[k];
        if (namelen <= 0)
            break;
        if (s->err)
            continue;
        rec = (FDP_NAME + (uint32_t)namelen + 7) & ~7u;
        if (rec > size - pos)
            break;
        memset(r, 0, FDP_ENTRY);
        if (nodeid) {
            uint64_t u64[6] = {nodeid, 0, entry_sec, attr_sec, 0, 0};
            uint32_t u32[2] = {entry_nsec, attr_nsec};
            uint32_t a32[9] = {s->atimensec, s->mtimensec, s->ctimensec, s->mode, s->nlink, s->uid, s->gid,
                               s->rdev, s->blksize};
            memcpy(r, u64, 32);                 /* nodeid, generation, entry_valid, attr_valid */
            memcpy(r + 32, u32, 8);             /* entry_valid_nsec, attr_valid_nsec */
            u64[0] = s->ino; u64[1] = s->size; u64[2] = s->blocks;
            u64[3] = (uint64_t)s->atime; u64[4] = (uint64_t)s->mtime; u64[5] = (uint64_t)s->ctime;
            memcpy(r + 40, u64, 48);            /* fuse_attr: ino, size, blocks, atime, mtime, ctime */
            memcpy(r + 88, a32, 36);            /* their nsec, mode, nlink, uid, gid, rdev, blksize */
            memcpy(r + 124, &s->attr_flags, 4); /* flags */
            ino = s->ino;
            type = (s->mode & S_IFMT) >> 12;
        } else {
            memcpy(&ino, data + off, 8);
            type = data[off + 18];
        }
        nl = (uint32_t)namelen;
        memcpy(r + FDP_ENTRY, &ino, 8);
        memcpy(r + FDP_ENTRY + 8, &cookie, 8);
        memcpy(r + FDP_ENTRY + 16, &nl, 4);
        memcpy(r + FDP_ENTRY + 20, &type, 4);
        memcpy(r + FDP_NAME, data + off + VD_NAME, (size_t)namelen);
        memset(r + FDP_NAME + namelen, 0, rec - FDP_NAME - nl);
        pos += rec;
    }
    *packed = k;
    return pos;
}
"""

#: A minimal io_uring (io_uring_setup(2), io_uring_enter(2)) for FUSE over io_uring: 128-byte SQEs
#: carrying IORING_OP_URING_CMD commands to /dev/fuse, and one completion reaped at a time. The ABI
#: (include/uapi/linux/io_uring.h) is spelled out here, so the build needs no liburing and no recent
#: kernel headers.
URING_CDEF = """
struct vhostfs_uring { int fd; unsigned sq_entries; ...; };
int vhostfs_uring_setup(struct vhostfs_uring *r, unsigned entries);
void vhostfs_uring_close(struct vhostfs_uring *r);
int vhostfs_uring_cmd(struct vhostfs_uring *r, int fd, uint32_t cmd_op, uint64_t addr, uint32_t len,
                      uint64_t user_data, const uint8_t *cmd, uint32_t cmd_len);
int vhostfs_uring_wait(struct vhostfs_uring *r, uint64_t *user_data, int32_t *res);
"""

URING_SOURCE = r"""
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#define VU_SETUP_SQE128 (1u << 10)
#define VU_OP_URING_CMD 46
#define VU_ENTER_GETEVENTS 1u
#define VU_OFF_SQ_RING 0ULL
#define VU_OFF_CQ_RING 0x8000000ULL
#define VU_OFF_SQES 0x10000000ULL
#define VU_SQE_SIZE 128
#define VU_CMD_OFFSET 48
#define VU_CMD_MAX 80

struct vu_sqring_offsets { uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
                           uint64_t resv2; };
struct vu_cqring_offsets { uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
                           uint64_t resv2; };
struct vu_params { uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd,
                   resv[3]; struct vu_sqring_offsets sq_off; struct vu_cqring_offsets cq_off; };
struct vu_cqe { uint64_t user_data; int32_t res; uint32_t flags; };

struct vhostfs_uring {
    int fd;
    unsigned sq_entries;
    unsigned to_submit;
    uint32_t *sq_head, *sq_tail, *sq_mask, *sq_array;
    uint32_t *cq_head, *cq_tail, *cq_mask;
    uint8_t *sqes;
    struct vu_cqe *cqes;
    void *sq_ring, *cq_ring;
    size_t sq_ring_size, cq_ring_size, sqes_size;
};

void vhostfs_uring_close(struct vhostfs_uring *r)
{
    if (r->sqes) munmap(r->sqes, r->sqes_size);
    if (r->cq_ring) munmap(r->cq_ring, r->cq_ring_size);
    if (r->sq_ring) munmap(r->sq_ring, r->sq_ring_size);
    if (r->fd >= 0) close(r->fd);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

/* io_uring_setup(2) with 128-byte SQEs (the URING_CMD area holds fuse_uring_cmd_req) and the rings
 * mapped; 0 or -errno. */
int vhostfs_uring_setup(struct vhostfs_uring *r, unsigned entries)
{
    struct vu_params p;
    uint8_t *sq, *cq;
    int err;
    memset(r, 0, sizeof(*r));
    memset(&p, 0, sizeof(p));
    p.flags = VU_SETUP_SQE128;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0)
        return -errno;
    r->sq_ring_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    r->cq_ring_size = p.cq_off.cqes + p.cq_entries * sizeof(struct vu_cqe);
    r->sqes_size = (size_t)p.sq_entries * VU_SQE_SIZE;
    sq = mmap(NULL, r->sq_ring_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
              VU_OFF_SQ_RING);
    if (sq == MAP_FAILED) goto fail;
    r->sq_ring = sq;
    cq = mmap(NULL, r->cq_ring_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
              VU_OFF_CQ_RING);
    if (cq == MAP_FAILED) goto fail;
    r->cq_ring = cq;
    r->sqes = mmap(NULL, r->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, VU_OFF_SQES);
    if (r->sqes == MAP_FAILED) { r->sqes = NULL; goto fail; }
    r->sq_entries = p.sq_entries;
    r->sq_head = (uint32_t *)(sq + p.sq_off.head);
    r->sq_tail = (uint32_t *)(sq + p.sq_off.tail);
    r->sq_mask = (uint32_t *)(sq + p.sq_off.ring_mask);
    r->sq_array = (uint32_t *)(sq + p.sq_off.array);
    r->cq_head = (uint32_t *)(cq + p.cq_off.head);
    r->cq_tail = (uint32_t *)(cq + p.cq_off.tail);
    r->cq_mask = (uint32_t *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct vu_cqe *)(cq + p.cq_off.cqes);
    return 0;
fail:
    err = -errno;
    if (r->sq_ring == MAP_FAILED) r->sq_ring = NULL;
    if (r->cq_ring == MAP_FAILED) r->cq_ring = NULL;
    vhostfs_uring_close(r);
    return err;
}

/* Queues an IORING_OP_URING_CMD for `fd`: cmd_op, addr and len as the command reads them, and cmd_len
 * bytes of command data (at most 80); submitted by the next vhostfs_uring_wait. 0, -EBUSY when the
 * submission ring is full, -EINVAL for too much command data. */
int vhostfs_uring_cmd(struct vhostfs_uring *r, int fd, uint32_t cmd_op, uint64_t addr, uint32_t len,
                      uint64_t user_data, const uint8_t *cmd, uint32_t cmd_len)
{
    uint32_t tail = *r->sq_tail, head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE), idx;
    uint8_t *sqe;
    if (cmd_len > VU_CMD_MAX)
        return -EINVAL;
    if (tail - head >= r->sq_entries)
        return -EBUSY;
    idx = tail & *r->sq_mask;
    sqe = r->sqes + (size_t)idx * VU_SQE_SIZE;
    memset(sqe, 0, VU_SQE_SIZE);
    sqe[0] = VU_OP_URING_CMD;                      /* opcode */
    memcpy(sqe + 4, &fd, 4);                       /* fd */
    memcpy(sqe + 8, &cmd_op, 4);                   /* cmd_op (the union with off) */
    memcpy(sqe + 16, &addr, 8);                    /* addr */
    memcpy(sqe + 24, &len, 4);                     /* len */
    memcpy(sqe + 32, &user_data, 8);               /* user_data */
    memcpy(sqe + VU_CMD_OFFSET, cmd, cmd_len);     /* cmd[] */
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
    return 0;
}

/* Submits what is queued and takes one completion, waiting for it if there is none (the GIL is
 * released meanwhile); 0 with *user_data and *res set, or -errno of io_uring_enter(2). */
int vhostfs_uring_wait(struct vhostfs_uring *r, uint64_t *user_data, int32_t *res)
{
    for (;;) {
        uint32_t head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        unsigned wait = head == tail;
        long n;
        if (!wait && !r->to_submit) {
            struct vu_cqe *cqe = &r->cqes[head & *r->cq_mask];
            *user_data = cqe->user_data;
            *res = cqe->res;
            __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
            return 0;
        }
        n = syscall(__NR_io_uring_enter, r->fd, r->to_submit, wait, wait ? VU_ENTER_GETEVENTS : 0, NULL, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        r->to_submit -= (unsigned)n < r->to_submit ? (unsigned)n : r->to_submit;
        if (!n && r->to_submit && !wait)
            return -EAGAIN;  /* the kernel took none of what is queued: do not spin */
    }
}
"""

_CDEF = CDEF + VIRTQUEUE_CDEF + DIRENT_CDEF.replace("@VHOSTFS_STAT@", VHOSTFS_STAT) + URING_CDEF
_WALK_ENUM = "enum {\n" + "".join(f"    {name} = {code},\n"
                                  for code, name in enumerate(WALK_ERRORS, 1)) + "};"
_SOURCE = (SOURCE + VIRTQUEUE_SOURCE.replace("@WALK_ERRORS_ENUM@", _WALK_ENUM)
           + DIRENT_SOURCE.replace("@VHOSTFS_STAT@", VHOSTFS_STAT) + URING_SOURCE)
#: Names this version of the helper: a library built from other source is never used (see native.py).
BUILD_ID = hashlib.sha256((_CDEF + _SOURCE).encode()).hexdigest()[:16]

ffibuilder = FFI()
ffibuilder.cdef(_CDEF + "const char *vhostfs_build_id(void);\n")
ffibuilder.set_source("vhostfs._native",
                      _SOURCE + f'const char *vhostfs_build_id(void) {{ return "{BUILD_ID}"; }}\n')

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
