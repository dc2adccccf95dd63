/* cfgloop: the domU's side of the lane's timing figures (built static on the
 * host by run.sh, run by domu-init.sh; busybox has no sub-second clock).
 *
 *   cfgloop read FILE OFFSET COUNT [SECONDS]
 *                                    COUNT 4-byte preads of FILE at OFFSET (a function's
 *                                    sysfs config: one backend op each), fewer if SECONDS
 *                                    pass first (a loaded emulator); reads= says how many
 *   cfgloop write FILE TEXT          one write of TEXT to FILE (a sysfs rescan)
 *
 * Each prints one line of key=value pairs: the figure in microseconds and what
 * was read, so dom0 can parse it from the guest's console.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int loop_read(const char *path, long offset, long count, long seconds)
{
    uint64_t budget = seconds > 0 ? (uint64_t)seconds * 1000000u : UINT64_MAX;
    uint32_t value = 0, first = 0;
    long i, changed = 0;
    uint64_t t0, t1;
    int fd = open(path, O_RDONLY);

    if (fd < 0) { perror(path); return 1; }
    t0 = now_us();
    for (i = 0; i < count; i++) {
        if (pread(fd, &value, sizeof value, offset) != sizeof value) { perror("pread"); return 1; }
        if (i == 0) first = value;
        else if (value != first) changed++;
        /* the clock is read every 100 reads only: it costs nothing next to an op */
        if (i % 100 == 99 && now_us() - t0 >= budget) { i++; break; }
    }
    t1 = now_us();
    close(fd);
    printf("reads=%ld total_us=%llu per_read_us=%.1f value=0x%08x changed=%ld\n", i,
           (unsigned long long)(t1 - t0), i ? (double)(t1 - t0) / i : 0.0, first, changed);
    return 0;
}

static int one_write(const char *path, const char *text)
{
    uint64_t t0, t1;
    ssize_t n;
    int fd = open(path, O_WRONLY);

    if (fd < 0) { perror(path); return 1; }
    t0 = now_us();
    n = write(fd, text, strlen(text));
    t1 = now_us();
    close(fd);
    if (n < 0) { perror("write"); return 1; }
    printf("write_us=%llu\n", (unsigned long long)(t1 - t0));
    return 0;
}

int main(int argc, char **argv)
{
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "read") == 0)
        return loop_read(argv[2], strtol(argv[3], NULL, 0), strtol(argv[4], NULL, 0),
                         argc == 6 ? strtol(argv[5], NULL, 0) : 0);
    if (argc == 4 && strcmp(argv[1], "write") == 0)
        return one_write(argv[2], argv[3]);
    fprintf(stderr, "usage: cfgloop read FILE OFFSET COUNT [SECONDS] | cfgloop write FILE TEXT\n");
    return 2;
}
