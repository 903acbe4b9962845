/* holdopen DIR COUNT GOFILE: opens the first COUNT files named f* in the directories DIR/dN, prints
 * HOLDOPEN-READY, waits until GOFILE exists, then checks that each is still readable and prints
 * HOLDOPEN-DONE with the number that are. The guest side of benchmarks/migration.py. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int count = atoi(argv[2]), opened = 0, ok = 0;
    int *fds = calloc(count, sizeof *fds);
    char path[4096];
    for (int d = 0; opened < count; d++) {
        snprintf(path, sizeof path, "%s/d%d", argv[1], d);
        DIR *dir = opendir(path);
        if (!dir) break;
        struct dirent *e;
        while (opened < count && (e = readdir(dir))) {
            if (e->d_name[0] != 'f') continue;
            snprintf(path, sizeof path, "%s/d%d/%s", argv[1], d, e->d_name);
            int fd = open(path, O_RDONLY);
            if (fd >= 0) fds[opened++] = fd;
        }
        closedir(dir);
    }
    printf("HOLDOPEN-READY %d\n", opened);
    fflush(stdout);
    struct stat st;
    while (stat(argv[3], &st)) usleep(100000);
    char c;
    for (int i = 0; i < opened; i++)
        if (pread(fds[i], &c, 1, 0) == 1) ok++;
    printf("HOLDOPEN-DONE %d\n", ok);
    return ok == opened ? 0 : 1;
}
