/* CRIU wrapper for runc (`runc --criu THIS`): answers runc's VERSION and FEATURE_CHECK
 * requests from a cache, runs the real CRIU for everything else.
 *
 * Why: runc 1.1 starts a whole `criu swrk` for its VERSION query on every checkpoint and
 * restore, and another for a FEATURE_CHECK (lazy pages, memory tracking) on a lazy or
 * pre-dump checkpoint: 5-8 ms each here, all inside a teleport's frozen window. The
 * answers only change with CRIU and the kernel, so cnvmd asks the real CRIU once per
 * daemon start (criushim.make_swrk_cache) and keeps its answers in CACHE_DIR:
 * `version` (the VERSION response) and `feature-HEX` (the response to a FEATURE_CHECK
 * whose `features` field is HEX). This program peeks (MSG_PEEK) at the request on the
 * swrk socket: a cached kind is answered and the program exits; anything else (a dump,
 * a restore, an unknown request, no cache, any error) leaves the request unread in the
 * socket and execs the real CRIU (CRIU_CMD) with the wrapper's environment
 * (CRIU_CONFIG_FILE, LD_PRELOAD), which then reads it as usual.
 *
 * runc restore writes its RESTORE request only after moving CRIU into the cnvm's
 * cgroups (5-15 ms here): CRIU is exec'd at once there (a parent run with a `restore`
 * argument and the swrk fd 3, the one runc's own swrk calls use) so that its start
 * still overlaps that work; otherwise it waits at most WAIT_MS for the request.
 *
 * Built by cnvmd (criushim.py) with -D CRIU_CMD, CACHE_DIR and optionally CRIU_PRE (the
 * arguments that go before the caller's: CRIU_CMD may be the loader of a private CRIU
 * bundle, exec'd directly instead of through the bundle's shell wrapper), CONFIG_FILE
 * and PRELOAD (C string literals). With PRIVATE_RUN (a directory on a tmpfs) it is the
 * wrapper of the lazy-pages daemon instead: CRIU runs in a private mount namespace whose
 * /run is that directory, where it keeps its kernel-feature cache (see criushim.py);
 * done here rather than by `unshare` + `sh` + `mount` (5 more programs, ~10 ms).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef WAIT_MS
#define WAIT_MS 20
#endif

enum { REQ_FEATURE_CHECK = 9, REQ_VERSION = 10 };

static void run_criu(char **argv) {
    char *args[256];
    int n = 0;
    args[n++] = (char *)CRIU_CMD;
#ifdef CRIU_PRE
    static const char *const pre[] = {CRIU_PRE};
    for (size_t i = 0; i < sizeof(pre) / sizeof(pre[0]); i++) args[n++] = (char *)pre[i];
#endif
    for (int i = 1; argv[i] && n < 255; i++) args[n++] = argv[i];
    args[n] = NULL;
#ifdef CONFIG_FILE
    setenv("CRIU_CONFIG_FILE", CONFIG_FILE, 1);
#endif
#ifdef PRELOAD
    {
        const char *old = getenv("LD_PRELOAD");
        char buf[4096];
        if (old && *old) {
            snprintf(buf, sizeof(buf), "%s:%s", PRELOAD, old);
            setenv("LD_PRELOAD", buf, 1);
        } else {
            setenv("LD_PRELOAD", PRELOAD, 1);
        }
    }
#endif
#ifdef PRIVATE_RUN
    if (mkdir(PRIVATE_RUN, 0755) && errno != EEXIST) perror("swrk shim: mkdir " PRIVATE_RUN);
    if (unshare(CLONE_NEWNS) || mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) ||
        mount(PRIVATE_RUN, "/run", NULL, MS_BIND, NULL)) {
        perror("swrk shim: private /run");
        _exit(126);
    }
#endif
    execv(CRIU_CMD, args);
    perror("swrk shim: exec " CRIU_CMD);
    _exit(127);
}

/* One varint at *p (bounded by end); -1 on a malformed one. */
static int varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) { *v = x; return 0; }
    }
    return -1;
}

/* The request's type (field 1) and features (field 5, raw bytes); -1 if malformed. */
static int parse(const uint8_t *p, const uint8_t *end, uint64_t *type,
                 const uint8_t **feat, size_t *feat_len) {
    *type = 0;
    *feat = NULL;
    *feat_len = 0;
    while (p < end) {
        uint64_t key, v;
        if (varint(&p, end, &key)) return -1;
        switch (key & 7) {
        case 0:
            if (varint(&p, end, &v)) return -1;
            if (key >> 3 == 1) *type = v;
            break;
        case 1:
            if (end - p < 8) return -1;
            p += 8;
            break;
        case 2:
            if (varint(&p, end, &v) || v > (uint64_t)(end - p)) return -1;
            if (key >> 3 == 5) { *feat = p; *feat_len = v; }
            p += v;
            break;
        case 5:
            if (end - p < 4) return -1;
            p += 4;
            break;
        default:
            return -1;
        }
    }
    return 0;
}

/* Did our parent get a plain `restore` argument (runc restore)? */
static int parent_restores(void) {
    char path[64], buf[8192];
    snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)getppid());
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    for (char *s = buf; s < buf + n; s += strlen(s) + 1)
        if (strcmp(s, "restore") == 0) return 1;
    return 0;
}

/* Take the request and send the cached answer in `name`: 0 sent, 1 no such answer (the
 * request is left for CRIU), -1 failed after taking the request. The request
 * must be read first: a unix socket closed with unread data makes the peer's next read
 * fail with ECONNRESET, even with our answer queued. */
static int answer(int sk, const char *name) {
    char path[512];
    static uint8_t resp[65536];
    snprintf(path, sizeof(path), "%s/%s", CACHE_DIR, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1;
    ssize_t n = read(fd, resp, sizeof(resp));
    close(fd);
    if (n <= 0 || n == (ssize_t)sizeof(resp)) return 1;
    if (recv(sk, path, sizeof(path), MSG_DONTWAIT | MSG_TRUNC) < 0) return -1;
    return send(sk, resp, (size_t)n, MSG_NOSIGNAL) == n ? 0 : -1;
}

int main(int argc, char **argv) {
    static uint8_t req[65536];
    if (argc != 3 || strcmp(argv[1], "swrk") != 0) run_criu(argv);
    char *endp;
    long sk = strtol(argv[2], &endp, 10);
    if (*argv[2] == 0 || *endp != 0 || sk < 0 || sk > 1 << 20) run_criu(argv);
    if (sk == 3 && parent_restores()) run_criu(argv);

    struct pollfd pfd = {.fd = (int)sk, .events = POLLIN};
    if (poll(&pfd, 1, WAIT_MS) != 1 || !(pfd.revents & POLLIN)) run_criu(argv);
    struct iovec iov = {.iov_base = req, .iov_len = sizeof(req)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n = recvmsg((int)sk, &mh, MSG_PEEK | MSG_DONTWAIT);
    if (n <= 0 || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) run_criu(argv);

    uint64_t type;
    const uint8_t *feat;
    size_t feat_len;
    if (parse(req, req + n, &type, &feat, &feat_len)) run_criu(argv);
    int rc = 1;
    if (type == REQ_VERSION) {
        rc = answer((int)sk, "version");
    } else if (type == REQ_FEATURE_CHECK && feat != NULL && feat_len > 0 && feat_len <= 64) {
        char name[8 + 2 * 64 + 1] = "feature-";
        for (size_t i = 0; i < feat_len; i++) sprintf(name + 8 + 2 * i, "%02x", feat[i]);
        rc = answer((int)sk, name);
    }
    if (rc == 0) return 0;
    if (rc < 0) _exit(1);  /* the request may be gone: CRIU would wait for it forever */
    run_criu(argv);
}
