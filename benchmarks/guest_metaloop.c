/* metaloop DIR COUNT: in DIR (which it makes), creates COUNT empty files, stats them, opens and closes
 * them, renames them and unlinks them, and prints "META phase ops/s" for each phase. The guest side of
 * benchmarks/parallel_guest.py, which runs several at once; a static C program, so that the loop costs
 * the guest no interpreter and no fork per file, as the figures are the file system's. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void name(char *buf, size_t size, const char *dir, char prefix, int i) {
    snprintf(buf, size, "%s/%c%d", dir, prefix, i);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: metaloop DIR COUNT\n");
        return 2;
    }
    const char *dir = argv[1];
    int count = atoi(argv[2]);
    char path[4096], other[4096];
    struct stat st;
    if (count <= 0 || mkdir(dir, 0755) != 0) {
        perror(dir);
        return 1;
    }
    const char *phases[] = {"create", "stat", "open_close", "rename", "unlink"};
    for (int phase = 0; phase < 5; phase++) {
        double start = now();
        for (int i = 0; i < count; i++) {
            int fd, ok = 1;
            name(path, sizeof path, dir, phase < 4 ? 'f' : 'g', i);
            switch (phase) {
            case 0:
                fd = open(path, O_CREAT | O_WRONLY, 0644);
                ok = fd >= 0 && close(fd) == 0;
                break;
            case 1:
                ok = stat(path, &st) == 0;
                break;
            case 2:
                fd = open(path, O_RDONLY);
                ok = fd >= 0 && close(fd) == 0;
                break;
            case 3:
                name(other, sizeof other, dir, 'g', i);
                ok = rename(path, other) == 0;
                break;
            case 4:
                ok = unlink(path) == 0;
                break;
            }
            if (!ok) {
                perror(path);
                return 1;
            }
        }
        printf("META %s %.0f\n", phases[phase], count / (now() - start));
        fflush(stdout);
    }
    return rmdir(dir) == 0 ? 0 : 1;
}
