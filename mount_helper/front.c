/* mount.layerfs's front end in C: the thin request of layerfs/forkclient.py without Python.
 *
 * With a fork server up in the caller's namespace, a mount is the thin request: the command
 * line, environment, umask and working directory sent to the server, whose child parses,
 * checks, mounts and serves it, then answers "ok" (with the warnings to print). The Python
 * front end (mount_helper/main.py) spends ~10 ms of CPU starting Python for that round trip;
 * this program makes it in well under a millisecond. Everything else it leaves to the Python
 * front end, exec'd with the same arguments: no server (the first mount of a namespace starts
 * it), a declined request (an error to report, --help, the foreground, mount -f), anything
 * unexpected. So the messages, exit codes and options are all the Python front end's; this
 * program parses no option and prints nothing but the warnings the child sends.
 *
 * mount_helper/launcher.py builds it (gcc), with a header defining the Python front end's path
 * (FRONT_PYTHON) and the parts of the fork server's address that are fixed when it is built
 * (IDENT_EXECUTABLE, IDENT_VERSION, IDENT_PKG: sys.executable, sys.version and the directory
 * of layerfs/forkclient.py as that Python front end sees them). The rest of the address is
 * computed here as forkclient.address() does: any difference gives another name, no server
 * answers it, and the Python front end does the mount (slower, never wrong).
 *
 * The Python front end is told by LAYERFS_FRONT_ARGV0 (our argv[0], which the "#!" exec
 * replaces) that the thin request was tried: it does not try it again.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef FRONT_PYTHON
#error "built by mount_helper/launcher.py, which defines FRONT_PYTHON and IDENT_*"
#endif

extern char **environ;

#define REPLY_MAX (1 << 16) /* forkclient.ask's recv */

struct parts {
    char **v;
    size_t n, cap;
};

static int add(struct parts *p, char *s)
{
    if (s == NULL)
        return -1;
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        char **v = realloc(p->v, cap * sizeof *v);
        if (v == NULL)
            return -1;
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n++] = s;
    return 0;
}

static char *format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *format(const char *fmt, ...)
{
    va_list ap;
    char *s;
    va_start(ap, fmt);
    int r = vasprintf(&s, fmt, ap);
    va_end(ap);
    return r < 0 ? NULL : s;
}

static long long ns(const struct timespec *t)
{
    return (long long)t->tv_sec * 1000000000LL + t->tv_nsec;
}

/* forkclient._code_identity's modules: WHERE/NAME:MTIME_NS:SIZE for each *.py and *.so. */
static int add_modules(struct parts *p, const char *where)
{
    DIR *d = opendir(where);
    if (d == NULL)
        return 0; /* as scandir's OSError: skipped */
    struct dirent *e;
    int r = 0;
    while (r == 0 && (e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len < 3 || (strcmp(e->d_name + len - 3, ".py") && strcmp(e->d_name + len - 3, ".so")))
            continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, 0) < 0)
            r = -1; /* DirEntry.stat()'s OSError: the Python front end gives up the request */
        else
            r = add(p, format("%s/%s:%lld:%lld", where, e->d_name, ns(&st.st_mtim),
                              (long long)st.st_size));
    }
    closedir(d);
    return r;
}

static int by_bytes(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b); /* UTF-8: code point order */
}

static uint32_t crc32(const unsigned char *s, size_t n)
{
    uint32_t c = 0xffffffffu;
    while (n--) {
        c ^= *s++;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & -(c & 1));
    }
    return ~c;
}

/* forkclient._code_identity(): 0 and *CRC, or -1. */
static int identity(uint32_t *crc)
{
    struct parts p = {0};
    const char *pkg = IDENT_PKG, *compiled = getenv("LAYERFS_COMPILED");
    const char *slash = strrchr(pkg, '/');
    int parent = slash ? (int)(slash - pkg) : 0;
    struct stat st;
    if (add(&p, strdup(IDENT_EXECUTABLE)) || add(&p, strdup(IDENT_VERSION)) ||
        add(&p, strdup(pkg)) || add(&p, format("compiled=%s", compiled ? compiled : "")))
        return -1;
    char *manifest = format("%.*s/build/mypyc/MANIFEST", parent, pkg);
    if (manifest == NULL)
        return -1;
    if (stat(manifest, &st) == 0 && add(&p, format("%lld", ns(&st.st_mtim))))
        return -1;
    char *helper = format("%.*s/mount_helper", parent, pkg);
    if (helper == NULL || add_modules(&p, pkg) || add_modules(&p, helper))
        return -1;
    qsort(p.v, p.n, sizeof *p.v, by_bytes);
    size_t len = 0;
    for (size_t i = 0; i < p.n; i++)
        len += strlen(p.v[i]) + 1;
    char *joined = malloc(len + 1), *at = joined;
    if (joined == NULL)
        return -1;
    for (size_t i = 0; i < p.n; i++) {
        size_t n = strlen(p.v[i]);
        memcpy(at, p.v[i], n);
        at += n;
        *at++ = '\0';
    }
    *crc = crc32((const unsigned char *)joined, p.n ? len - 1 : 0);
    return 0; /* the process ends soon: nothing freed */
}

/* forkclient.address(): the abstract socket name in ADDR, its length in *LEN; -1 on failure. */
static int address(struct sockaddr_un *addr, socklen_t *len)
{
    struct stat user, mnt;
    uint32_t crc;
    if (stat("/proc/self/ns/user", &user) || stat("/proc/self/ns/mnt", &mnt) || identity(&crc))
        return -1;
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    int n = snprintf(addr->sun_path + 1, sizeof addr->sun_path - 1,
                     "layerfs-forkserver-%u-%llu-%llu-%08x", (unsigned)geteuid(),
                     (unsigned long long)user.st_ino, (unsigned long long)mnt.st_ino, crc);
    if (n < 0 || (size_t)n >= sizeof addr->sun_path - 1)
        return -1;
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    return 0;
}

/* posix.environ's entries: NAME=VALUE with a NAME, the first of each NAME. */
static int first_of_its_name(char **e)
{
    if (**e == '\0')
        return 0;
    const char *eq = strchr(*e + 1, '=');
    if (eq == NULL)
        return 0;
    size_t n = (size_t)(eq - *e) + 1;
    for (char **o = environ; o < e; o++)
        if (strncmp(*o, *e, n) == 0)
            return 0;
    return 1;
}

/* forkclient.ask(): 0 once the mount is live (warnings printed), -1 when nobody took it. */
static int ask(int argc, char **argv)
{
    struct sockaddr_un addr;
    socklen_t addrlen;
    if (address(&addr, &addrlen))
        return -1;
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, addrlen) < 0)
        return -1;
    int cwd = open(".", O_PATH | O_CLOEXEC);
    if (cwd < 0)
        return -1;
    mode_t umask_ = umask(022);
    umask(umask_);

    /* "argv\0" UMASK \0 ARGC \0 ARGV... \0 ENV... (no trailing NUL) */
    size_t cap = 64, len = 0;
    for (int i = 0; i < argc; i++)
        cap += strlen(argv[i]) + 1;
    for (char **e = environ; *e; e++)
        cap += strlen(*e) + 1;
    char *msg = malloc(cap);
    if (msg == NULL)
        return -1;
    len = (size_t)sprintf(msg, "argv%c%u%c%d", 0, (unsigned)umask_, 0, argc);
    for (int i = 0; i < argc; i++)
        len += (size_t)sprintf(msg + len, "%c%s", 0, argv[i]);
    for (char **e = environ; *e; e++)
        if (first_of_its_name(e))
            len += (size_t)sprintf(msg + len, "%c%s", 0, *e);

    struct iovec iov = {msg, len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = sizeof control.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &cwd, sizeof cwd);
    if (sendmsg(s, &mh, MSG_NOSIGNAL) < 0)
        return -1;

    char *reply = malloc(REPLY_MAX + 1);
    if (reply == NULL)
        return -1;
    ssize_t got = recv(s, reply, REPLY_MAX, 0); /* no timeout, as forkclient.ask */
    if (got < 2 || memcmp(reply, "ok", 2) || (got > 2 && reply[2] != '\0'))
        return -1;
    reply[got] = '\0';
    for (char *w = reply + 2; w < reply + got;) { /* each warning follows a NUL */
        w++;
        fprintf(stderr, "mount.layerfs: warning: %s\n", w);
        w += strlen(w);
    }
    return 0;
}

/* Whether the Python front end would import the layerfs this was built for: not when
 * PYTHONHOME is set, nor when PYTHONPATH's first entry is another directory (its entries come
 * before the launcher's paths). */
static int same_code(void)
{
    const char *home = getenv("PYTHONHOME"), *path = getenv("PYTHONPATH"), *pkg = IDENT_PKG;
    if (home && *home)
        return 0;
    if (path == NULL || *path == '\0')
        return 1;
    size_t first = strcspn(path, ":"), parent = (size_t)(strrchr(pkg, '/') - pkg);
    return first == parent && strncmp(path, pkg, parent) == 0;
}

int main(int argc, char **argv)
{
    const char *fs = getenv("LAYERFS_FORKSERVER");
    /* forkclient.enabled() and main._served_elsewhere()'s "a mount names a source and a target" */
    if (argc >= 3 && !(fs && strcmp(fs, "0") == 0) && same_code() && ask(argc, argv) == 0) {
        fflush(stderr);
        _exit(0);
    }
    if (setenv("LAYERFS_FRONT_ARGV0", argc > 0 ? argv[0] : "", 1) == 0) {
        char *python = FRONT_PYTHON;
        argv[0] = python;
        execv(python, argc > 0 ? argv : (char *[]){python, NULL});
    }
    fprintf(stderr, "mount.layerfs: cannot run %s: %m\n", FRONT_PYTHON);
    return 1;
}
