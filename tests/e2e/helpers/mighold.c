/* mighold DIR GOFILE: the guest side of the migration test. It holds what a migration must carry
 * (a file open for writing, a file unlinked while open, a working directory, a directory half
 * read with getdents64, a POSIX lock), prints MIGHOLD-READY, waits until GOFILE exists (the host
 * creates it once the VM has moved), then uses each of them and prints MIGHOLD-OK, or
 * MIGHOLD-FAIL with what went wrong, and exits with 0 or 1. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;

static void fail(const char *what) {
    printf("MIGHOLD-FAIL %s: %s\n", what, strerror(errno));
    fflush(stdout);
    failures++;
}

/* Names read from fd with getdents64 into a buffer of bufsize, at most max_calls calls (0: to the end). */
static int list_some(int fd, size_t bufsize, int max_calls, int *count) {
    char buf[65536];
    int calls = 0;
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, bufsize);
        if (n < 0) return -1;
        if (n == 0) return 0;
        for (long pos = 0; pos < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + pos);
            if (strcmp(d->d_name, ".") && strcmp(d->d_name, "..")) (*count)++;
            pos += d->d_reclen;
        }
        if (max_calls && ++calls == max_calls) return 0;
    }
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: mighold DIR GOFILE ENTRIES\n"); return 2; }
    const char *dir = argv[1], *go = argv[2];
    int entries = atoi(argv[3]);
    char path[4096];
    if (chdir(dir)) { fail("chdir"); return 1; }
    int held = open("held", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (held < 0 || write(held, "before\n", 7) != 7) fail("held");
    int tmp = open("tmpfile", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (tmp < 0 || write(tmp, "tmp-before\n", 11) != 11 || unlink("tmpfile")) fail("tmpfile");
    if (mkdir("cwd", 0755) && errno != EEXIST) fail("mkdir cwd");
    int listfd = open("list", O_RDONLY | O_DIRECTORY);
    int seen = 0;
    if (listfd < 0 || list_some(listfd, 1024, 2, &seen)) fail("getdents before");
    int lockfd = open("locked", O_RDWR | O_CREAT, 0644);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100};
    if (lockfd < 0 || fcntl(lockfd, F_SETLK, &fl)) fail("lock");
    if (chdir("cwd")) fail("chdir cwd");
    printf("MIGHOLD-READY listed %d of %d\n", seen, entries);
    fflush(stdout);

    struct stat st;
    while (stat(go, &st)) usleep(100000);

    if (write(held, "after\n", 6) != 6) fail("write held after");
    if (close(held)) fail("close held");
    if (write(tmp, "tmp-after\n", 10) != 10) fail("write tmpfile after");
    char buf[64] = {0};
    if (pread(tmp, buf, sizeof buf - 1, 0) != 21 || strcmp(buf, "tmp-before\ntmp-after\n")) {
        errno = EIO;
        fail("tmpfile content");
    }
    if (!getcwd(path, sizeof path)) fail("getcwd");
    else printf("MIGHOLD-CWD %s\n", path);
    int inside = open("inside", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (inside < 0 || write(inside, "in cwd\n", 7) != 7 || close(inside)) fail("file in cwd");
    if (list_some(listfd, 1024, 0, &seen)) fail("getdents after");
    if (seen != entries) {
        errno = EIO;
        printf("MIGHOLD-FAIL listed %d entries of %d\n", seen, entries);
        failures++;
    }
    pid_t child = fork();
    if (child == 0) {
        /* Another process (another lock owner) must still see the lock. */
        struct flock probe = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 50, .l_len = 1};
        int fd = open("../locked", O_RDWR);
        if (fd < 0 || fcntl(fd, F_GETLK, &probe)) _exit(2);
        _exit(probe.l_type == F_WRLCK ? 0 : 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        errno = EAGAIN;
        printf("MIGHOLD-FAIL the lock is not seen by another owner (status %d)\n", status);
        failures++;
    }
    fl.l_type = F_UNLCK;
    if (fcntl(lockfd, F_SETLK, &fl)) fail("unlock");
    printf(failures ? "MIGHOLD-FAILED\n" : "MIGHOLD-OK\n");
    return failures ? 1 : 0;
}
