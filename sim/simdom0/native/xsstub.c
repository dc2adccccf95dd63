/*
 * LD_PRELOAD stub that lets Debian's oxenstored run without a hypervisor.
 *
 * Used only by simdom0.xenstored (tests, demo, benchmarks). It supplies:
 *   - xc_interface_open/close and the few libxenctrl calls oxenstored makes on
 *     its start/error paths, backed by a dummy handle (no /dev/xen/privcmd);
 *   - xenevtchn_* backed by an eventfd that never fires (no /dev/xen/evtchn);
 *   - setrlimit clamped to the hard limit (oxenstored raises RLIMIT_NOFILE to
 *     fs.nr_open, which needs CAP_SYS_RESOURCE);
 *   - path redirection: every file or AF_UNIX socket path under the host's
 *     xenstored/xen run and log directories is rewritten into the instance
 *     directory, so parallel instances are isolated and the host's
 *     /var/run/xenstored is never touched.
 *
 * Environment:
 *   PCIBACKD_XS_RUNDIR  instance directory (required; without it every
 *                       protected path fails with EACCES: fail closed)
 *   PCIBACKD_XS_SOCKET  read-write socket path (default RUNDIR/socket);
 *                       the read-only socket becomes PCIBACKD_XS_SOCKET_ro
 *   PCIBACKD_XS_PARENT_PID  if set, the daemon gets SIGKILL when the thread
 *                       that spawned it dies (PR_SET_PDEATHSIG), and exits at
 *                       once if that parent is already gone. Set here rather
 *                       than in a Python preexec_fn, which is unsafe in a
 *                       process with threads.
 */
/* build-flags: -ldl */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

/* ---------------------------------------------------------- parent death */

__attribute__((constructor)) static void xsstub_init(void)
{
    const char *parent = getenv("PCIBACKD_XS_PARENT_PID");

    if (parent == NULL || parent[0] == '\0')
        return;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
        _exit(126);
    /* The parent may have died between fork and this point. */
    if (getppid() != (pid_t)strtol(parent, NULL, 10))
        _exit(126);
}

/* ---------------------------------------------------------------- paths */

/* Host directories oxenstored may write to; all map to the instance dir. */
static const char *const protected_prefixes[] = {
    "/var/run/xenstored", "/run/xenstored", "/var/run/xen", "/run/xen",
    "/var/log/xen",       "/var/lib/xenstored", "/var/lib/xen",
};
#define N_PREFIXES (sizeof(protected_prefixes) / sizeof(protected_prefixes[0]))

/* Length of the matching protected prefix (a whole path component), or 0. */
static size_t protected_prefix(const char *path)
{
    size_t i, n;

    if (path == NULL || path[0] != '/')
        return 0;
    for (i = 0; i < N_PREFIXES; i++) {
        n = strlen(protected_prefixes[i]);
        if (strncmp(path, protected_prefixes[i], n) == 0 &&
            (path[n] == '\0' || path[n] == '/'))
            return n;
    }
    return 0;
}

/* The daemon's listening sockets: .../xenstored/socket and socket_ro. */
static int is_socket_path(const char *path)
{
    static const char *const names[] = {
        "/var/run/xenstored/socket", "/var/run/xenstored/socket_ro",
        "/run/xenstored/socket",     "/run/xenstored/socket_ro",
    };
    size_t i;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(path, names[i]) == 0)
            return 1;
    return 0;
}

/*
 * Rewrite a protected path into buf. Returns the path to use, or NULL with
 * errno set when the path is protected but cannot be redirected.
 */
static const char *redirect(const char *path, char *buf, size_t size)
{
    const char *rundir, *sock, *rest;
    size_t n = protected_prefix(path);
    int len;

    if (n == 0)
        return path;
    rundir = getenv("PCIBACKD_XS_RUNDIR");
    if (rundir == NULL || rundir[0] != '/') {
        errno = EACCES;
        return NULL;
    }
    rest = path + n;
    sock = getenv("PCIBACKD_XS_SOCKET");
    if (sock != NULL && sock[0] == '/' && is_socket_path(path))
        len = snprintf(buf, size, "%s%s", sock, rest + strlen("/socket"));
    else
        len = snprintf(buf, size, "%s%s", rundir, rest);
    if (len < 0 || (size_t)len >= size) {
        errno = ENAMETOOLONG;
        return NULL;
    }
    return buf;
}

#define REDIRECT(p)                                                         \
    char redirect_buf_##p[PATH_MAX];                                        \
    const char *r_##p = redirect(p, redirect_buf_##p, sizeof(redirect_buf_##p)); \
    if (r_##p == NULL)                                                      \
        return -1

#define REAL(ret, name, ...)                                                \
    static ret (*real_##name)(__VA_ARGS__);                                 \
    if (real_##name == NULL)                                                \
        real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

static int open_common(const char *sym, const char *path, int flags,
                       mode_t mode)
{
    int (*real)(const char *, int, ...) =
        (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, sym);
    REDIRECT(path);
    return real(r_path, flags, mode);
}

static mode_t open_mode(int flags, va_list ap)
{
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

EXPORT int open(const char *path, int flags, ...)
{
    va_list ap;
    mode_t mode;

    va_start(ap, flags);
    mode = open_mode(flags, ap);
    va_end(ap);
    return open_common("open", path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    va_list ap;
    mode_t mode;

    va_start(ap, flags);
    mode = open_mode(flags, ap);
    va_end(ap);
    return open_common("open64", path, flags, mode);
}

EXPORT int unlink(const char *path)
{
    REAL(int, unlink, const char *);
    REDIRECT(path);
    return real_unlink(r_path);
}

EXPORT int rmdir(const char *path)
{
    REAL(int, rmdir, const char *);
    REDIRECT(path);
    return real_rmdir(r_path);
}

EXPORT int mkdir(const char *path, mode_t mode)
{
    REAL(int, mkdir, const char *, mode_t);
    REDIRECT(path);
    return real_mkdir(r_path, mode);
}

EXPORT int mkfifo(const char *path, mode_t mode)
{
    REAL(int, mkfifo, const char *, mode_t);
    REDIRECT(path);
    return real_mkfifo(r_path, mode);
}

EXPORT int chmod(const char *path, mode_t mode)
{
    REAL(int, chmod, const char *, mode_t);
    REDIRECT(path);
    return real_chmod(r_path, mode);
}

EXPORT int chown(const char *path, uid_t uid, gid_t gid)
{
    REAL(int, chown, const char *, uid_t, gid_t);
    REDIRECT(path);
    return real_chown(r_path, uid, gid);
}

EXPORT int access(const char *path, int mode)
{
    REAL(int, access, const char *, int);
    REDIRECT(path);
    return real_access(r_path, mode);
}

EXPORT int stat(const char *path, struct stat *st)
{
    REAL(int, stat, const char *, struct stat *);
    REDIRECT(path);
    return real_stat(r_path, st);
}

EXPORT int stat64(const char *path, struct stat64 *st)
{
    REAL(int, stat64, const char *, struct stat64 *);
    REDIRECT(path);
    return real_stat64(r_path, st);
}

EXPORT int lstat(const char *path, struct stat *st)
{
    REAL(int, lstat, const char *, struct stat *);
    REDIRECT(path);
    return real_lstat(r_path, st);
}

EXPORT int lstat64(const char *path, struct stat64 *st)
{
    REAL(int, lstat64, const char *, struct stat64 *);
    REDIRECT(path);
    return real_lstat64(r_path, st);
}

EXPORT int truncate64(const char *path, off64_t len)
{
    REAL(int, truncate64, const char *, off64_t);
    REDIRECT(path);
    return real_truncate64(r_path, len);
}

EXPORT int utimes(const char *path, const struct timeval tv[2])
{
    REAL(int, utimes, const char *, const struct timeval *);
    REDIRECT(path);
    return real_utimes(r_path, tv);
}

EXPORT int rename(const char *from, const char *to)
{
    REAL(int, rename, const char *, const char *);
    REDIRECT(from);
    REDIRECT(to);
    return real_rename(r_from, r_to);
}

EXPORT int link(const char *from, const char *to)
{
    REAL(int, link, const char *, const char *);
    REDIRECT(from);
    REDIRECT(to);
    return real_link(r_from, r_to);
}

EXPORT int symlink(const char *target, const char *path)
{
    REAL(int, symlink, const char *, const char *);
    REDIRECT(path);
    return real_symlink(target, r_path);
}

EXPORT DIR *opendir(const char *path)
{
    char buf[PATH_MAX];
    const char *r = redirect(path, buf, sizeof(buf));
    REAL(DIR *, opendir, const char *);

    return r == NULL ? NULL : real_opendir(r);
}

/* AF_UNIX bind/connect: the listening sockets are the whole point. */
static const struct sockaddr *redirect_sun(const struct sockaddr *addr,
                                           socklen_t *len,
                                           struct sockaddr_un *out)
{
    const struct sockaddr_un *sun = (const struct sockaddr_un *)addr;
    char path[sizeof(sun->sun_path) + 1], buf[PATH_MAX];
    const char *r;
    size_t plen;

    if (addr == NULL || addr->sa_family != AF_UNIX ||
        *len <= offsetof(struct sockaddr_un, sun_path))
        return addr;
    plen = *len - offsetof(struct sockaddr_un, sun_path);
    if (plen > sizeof(sun->sun_path))
        plen = sizeof(sun->sun_path);
    memcpy(path, sun->sun_path, plen);
    path[plen] = '\0';
    r = redirect(path, buf, sizeof(buf));
    if (r == path)
        return addr;
    if (r == NULL)
        return NULL;
    if (strlen(r) >= sizeof(out->sun_path)) {
        errno = ENAMETOOLONG;
        return NULL;
    }
    memset(out, 0, sizeof(*out));
    out->sun_family = AF_UNIX;
    strcpy(out->sun_path, r);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(r) + 1);
    return (const struct sockaddr *)out;
}

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    struct sockaddr_un sun;
    const struct sockaddr *a;
    REAL(int, bind, int, const struct sockaddr *, socklen_t);

    a = redirect_sun(addr, &len, &sun);
    return a == NULL ? -1 : real_bind(fd, a, len);
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    struct sockaddr_un sun;
    const struct sockaddr *a;
    REAL(int, connect, int, const struct sockaddr *, socklen_t);

    a = redirect_sun(addr, &len, &sun);
    return a == NULL ? -1 : real_connect(fd, a, len);
}

/* ------------------------------------------------------------- setrlimit */

EXPORT int setrlimit(__rlimit_resource_t resource, const struct rlimit *rl)
{
    struct rlimit cur, clamped;
    REAL(int, setrlimit, __rlimit_resource_t, const struct rlimit *);

    if (real_setrlimit(resource, rl) == 0)
        return 0;
    if (errno != EPERM)
        return -1;
    if (getrlimit(resource, &cur) != 0)
        return -1;
    clamped = *rl;
    if (clamped.rlim_max > cur.rlim_max)
        clamped.rlim_max = cur.rlim_max;
    if (clamped.rlim_cur > clamped.rlim_max)
        clamped.rlim_cur = clamped.rlim_max;
    return real_setrlimit(resource, &clamped);
}

/* ------------------------------------------------------------ libxenctrl */

/* Opaque to the caller; never dereferenced by anything but this stub. */
struct stub_xc {
    int magic;
};
static struct stub_xc the_xc = {0x78737562};

/* Matches the public xc_error layout: int code; char message[1024]. */
struct stub_xc_error {
    int code;
    char message[1024];
};
static struct stub_xc_error last_error = {0, "no hypervisor (pcibackd xsstub)"};

EXPORT void *xc_interface_open(void *logger, void *dombuild_logger,
                               unsigned open_flags)
{
    (void)logger;
    (void)dombuild_logger;
    (void)open_flags;
    return &the_xc;
}

EXPORT int xc_interface_close(void *xch)
{
    (void)xch;
    return 0;
}

EXPORT const struct stub_xc_error *xc_get_last_error(void *xch)
{
    (void)xch;
    return &last_error;
}

EXPORT void xc_clear_last_error(void *xch)
{
    (void)xch;
}

EXPORT const char *xc_error_code_to_desc(int code)
{
    (void)code;
    return "no hypervisor (pcibackd xsstub)";
}

/* Zero domains: nothing to clean up, nobody ever dies. */
EXPORT int xc_domain_getinfolist(void *xch, uint32_t first_domain,
                                 unsigned int max_domains, void *info)
{
    (void)xch;
    (void)first_domain;
    (void)max_domains;
    (void)info;
    return 0;
}

/* Foreign mappings (domain introduction) cannot work without Xen. */
EXPORT void *xc_map_foreign_range(void *xch, uint32_t dom, int size, int prot,
                                  unsigned long mfn)
{
    (void)xch;
    (void)dom;
    (void)size;
    (void)prot;
    (void)mfn;
    errno = ENOSYS;
    return NULL;
}

/* ----------------------------------------------------------- libxenevtchn */

struct stub_evtchn {
    int fd; /* eventfd that never becomes readable */
};

static struct stub_evtchn *evtchn_new(int fd)
{
    struct stub_evtchn *h;

    if (fd < 0)
        return NULL;
    h = calloc(1, sizeof(*h));
    if (h == NULL) {
        close(fd);
        return NULL;
    }
    h->fd = fd;
    return h;
}

EXPORT struct stub_evtchn *xenevtchn_open(void *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return evtchn_new(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
}

/* Live update hands over the old fd; keep our own, it never fires anyway. */
EXPORT struct stub_evtchn *xenevtchn_fdopen(void *logger, int fd,
                                            unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return evtchn_new(fcntl(fd, F_DUPFD_CLOEXEC, 0));
}

EXPORT int xenevtchn_close(struct stub_evtchn *h)
{
    if (h != NULL) {
        close(h->fd);
        free(h);
    }
    return 0;
}

EXPORT int xenevtchn_fd(struct stub_evtchn *h)
{
    return h->fd;
}

EXPORT int xenevtchn_bind_virq(struct stub_evtchn *h, unsigned int virq)
{
    (void)h;
    return (int)(1 + virq % 64);
}

EXPORT int xenevtchn_bind_interdomain(struct stub_evtchn *h, uint32_t domid,
                                      unsigned int port)
{
    (void)h;
    (void)domid;
    (void)port;
    errno = ENOSYS;
    return -1;
}

EXPORT int xenevtchn_unbind(struct stub_evtchn *h, unsigned int port)
{
    (void)h;
    (void)port;
    return 0;
}

EXPORT int xenevtchn_notify(struct stub_evtchn *h, unsigned int port)
{
    (void)h;
    (void)port;
    return 0;
}

EXPORT int xenevtchn_pending(struct stub_evtchn *h)
{
    (void)h;
    errno = EAGAIN;
    return -1;
}

EXPORT int xenevtchn_unmask(struct stub_evtchn *h, unsigned int port)
{
    (void)h;
    (void)port;
    return 0;
}
