/*
 * guest-mmap-probe: the memory-mapping checks of the DAX guest tests (tests/e2e/test_dax.py) that
 * busybox and xfs_io cannot make. build-guest.sh builds it statically into the guest as /bin/mmap-probe.
 *
 *   mmap-probe private FILE
 *       maps FILE private and writable, writes through the mapping, and checks that the mapping shows
 *       the write while the file (read(2) and a second, shared mapping) does not.
 *   mmap-probe sigbus FILE ASK DONE
 *       maps FILE shared, reads all of it, creates the file ASK and waits for the file DONE (the host
 *       truncates FILE to one page meanwhile), stats FILE, then touches the mapping past the new end:
 *       prints "SIGBUS" if that raises SIGBUS (exit 0), "no SIGBUS" otherwise (exit 1).
 * Exit status 2: a system call failed (the message says which).
 */
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static int private_mapping(const char *path)
{
    int fd = open(path, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die(path);
    size_t len = st.st_size;
    char *priv = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    char *shared = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    if (priv == MAP_FAILED || shared == MAP_FAILED)
        die("mmap");
    char before = shared[0];
    memset(priv, 'P', len);
    char got;
    if (pread(fd, &got, 1, 0) != 1)
        die("pread");
    int ok = priv[0] == 'P' && priv[len - 1] == 'P' && got == before && shared[0] == before;
    printf("private mapping: mapped '%c', file '%c', shared mapping '%c'\n", priv[0], got, shared[0]);
    return ok ? 0 : 1;
}

static sigjmp_buf env;

static void on_sigbus(int sig)
{
    (void)sig;
    siglongjmp(env, 1);
}

static int sigbus_after_truncate(const char *path, const char *ask, const char *done)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die(path);
    size_t len = st.st_size;
    volatile char *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        die("mmap");
    unsigned sum = 0;
    for (size_t i = 0; i < len; i += 4096)
        sum += map[i];
    int afd = open(ask, O_WRONLY | O_CREAT, 0644);
    if (afd < 0)
        die(ask);
    close(afd);
    for (int i = 0; access(done, F_OK) != 0; i++) {
        if (i == 600) {
            fprintf(stderr, "%s never came\n", done);
            return 2;
        }
        usleep(100000);
    }
    /* The guest learns the new size from the daemon (the attribute timeout is 1 s by default). */
    sleep(2);
    if (stat(path, &st) < 0)
        die(path);
    printf("size now %lld (checksum %u)\n", (long long)st.st_size, sum);
    signal(SIGBUS, on_sigbus);
    if (sigsetjmp(env, 1)) {
        puts("SIGBUS");
        return 0;
    }
    sum += map[len - 1];
    printf("no SIGBUS (read %u)\n", sum);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "private") == 0)
        return private_mapping(argv[2]);
    if (argc == 5 && strcmp(argv[1], "sigbus") == 0)
        return sigbus_after_truncate(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: mmap-probe private FILE | sigbus FILE ASK DONE\n");
    return 2;
}
