/* LD_PRELOAD shim for CRIU on hosts where root lacks CAP_SYS_RESOURCE.
 *
 * Why: CRIU dumps each task's rlimits with prlimit(pid, res, NULL, &old). The
 * kernel only lets a process read another's limits if it has the same uids and
 * gids or CAP_SYS_RESOURCE, so a cnvm with a process of another user (an sshd
 * session as `user`) cannot be dumped: "Can't get rlimit 0: Operation not
 * permitted". /proc/PID/limits holds the same numbers and root may read it: on
 * EPERM for a pure read we answer from there. Writes are never emulated.
 * CRIU 4.2 issues prlimit64 through syscall(2), so that is interposed as well.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *const names[RLIM_NLIMITS] = {
    [RLIMIT_CPU] = "Max cpu time", [RLIMIT_FSIZE] = "Max file size",
    [RLIMIT_DATA] = "Max data size", [RLIMIT_STACK] = "Max stack size",
    [RLIMIT_CORE] = "Max core file size", [RLIMIT_RSS] = "Max resident set",
    [RLIMIT_NPROC] = "Max processes", [RLIMIT_NOFILE] = "Max open files",
    [RLIMIT_MEMLOCK] = "Max locked memory", [RLIMIT_AS] = "Max address space",
    [RLIMIT_LOCKS] = "Max file locks", [RLIMIT_SIGPENDING] = "Max pending signals",
    [RLIMIT_MSGQUEUE] = "Max msgqueue size", [RLIMIT_NICE] = "Max nice priority",
    [RLIMIT_RTPRIO] = "Max realtime priority", [RLIMIT_RTTIME] = "Max realtime timeout",
};

static int parse(const char *s, rlim_t *v) {
    if (strncmp(s, "unlimited", 9) == 0) { *v = RLIM_INFINITY; return 0; }
    char *end;
    unsigned long long x = strtoull(s, &end, 10);
    if (end == s) return -1;
    *v = (rlim_t)x;
    return 0;
}

static int from_proc(pid_t pid, int res, struct rlimit *old) {
    char path[64], line[256];
    if (res < 0 || res >= RLIM_NLIMITS || !names[res]) return -1;
    snprintf(path, sizeof(path), "/proc/%d/limits", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    int rc = -1;
    size_t n = strlen(names[res]);
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, names[res], n) != 0 || line[n] != ' ') continue;
        char *p = line + 26; /* fixed-width columns: name, soft, hard, units */
        while (*p == ' ') p++;
        char *q = p;
        while (*q && *q != ' ') q++;
        while (*q == ' ') q++;
        if (parse(p, &old->rlim_cur) == 0 && parse(q, &old->rlim_max) == 0) rc = 0;
        break;
    }
    fclose(f);
    return rc;
}

typedef long (*syscall_fn)(long, ...);

static long real_syscall(long nr, long a, long b, long c, long d, long e, long f) {
    static syscall_fn real;
    if (!real) real = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
    return real(nr, a, b, c, d, e, f);
}

static int shim(pid_t pid, int res, const struct rlimit *new, struct rlimit *old) {
    long r = real_syscall(SYS_prlimit64, pid, res, (long)new, (long)old, 0, 0);
    if (r == 0) return 0;
    if (errno == EPERM && new == NULL && old != NULL && pid > 0 && from_proc(pid, res, old) == 0)
        return 0;
    return -1;
}

/* CRIU 4.2 calls prlimit64 through syscall(2) directly: interpose that too. */
long syscall(long nr, ...) {
    va_list ap;
    long a[6];
    va_start(ap, nr);
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (nr == SYS_prlimit64)
        return shim((pid_t)a[0], (int)a[1], (const struct rlimit *)a[2], (struct rlimit *)a[3]);
    return real_syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}

int prlimit(pid_t pid, __rlimit_resource_t res, const struct rlimit *new, struct rlimit *old) {
    return shim(pid, (int)res, new, old);
}

int prlimit64(pid_t pid, __rlimit_resource_t res, const struct rlimit64 *new,
              struct rlimit64 *old) {
    return shim(pid, (int)res, (const struct rlimit *)new, (struct rlimit *)old);
}
