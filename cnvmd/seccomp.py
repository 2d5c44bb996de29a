"""A cnvm's sandbox: the default seccomp profile and the per-cnvm security options.

The profile is Docker's default (moby ``profiles/seccomp/default.json``), resolved for
this host the way dockerd resolves it before it hands the OCI spec to runc: every
rule's conditions (capabilities the cnvm holds, architecture, minimum kernel) are
decided here, and only the rules that apply go into ``linux.seccomp``.

Shape: default action ``SCMP_ACT_ERRNO`` with EPERM; an allowlist of ordinary
syscalls (`ALLOWED`); a few syscalls allowed only with arguments that cannot hurt
(`socket` except AF_VSOCK, `personality` only for the harmless personas, `clone`
only without namespace flags); `clone3` answers ENOSYS so libc falls back to `clone`,
whose flags a filter can see. Syscalls gated by a capability (`CAP_GATED`) are
allowed only when the cnvm holds that capability: with the cnvm capability set
(`cnvmd.bundle.CAPS`, Docker's default set) that allows `chroot` and nothing else.

Denied, and why (as in Docker):

- new namespaces: `unshare`, `setns`, `clone`/`clone3` with CLONE_NEW* flags. A user
  namespace gives its creator every capability inside it, and with them the kernel
  surface an unprivileged process never reaches (nf_tables, mounts of many file
  systems), the root of most container escapes of recent years;
- kernel keyrings: `keyctl`, `add_key`, `request_key` (not namespaced);
- `perf_event_open`, `bpf` (kernel attack surface, host-wide information leaks),
  `io_uring_setup/enter/register` (a large, often-exploited surface that also
  bypasses syscall filtering of the operations it submits), `userfaultfd` (makes
  kernel races easy to win);
- mounts (`mount`, `umount2`, the new mount API, `pivot_root`), kernel modules,
  `kexec_*`, `reboot`, `swapon/off`, `acct`, the clock (`settimeofday`, `clock_settime`),
  `ioperm`/`iopl`, NUMA policy calls, `kcmp`/`pidfd_getfd`/`process_madvise`,
  `open_by_handle_at`, `lookup_dcookie`, `quotactl`, `syslog`, `vhangup`, and the
  obsolete `uselib`, `ustat`, `sysfs`, `_sysctl`, `vm86`, `nfsservctl`, ... .

Like Docker (since kernel 4.8 closed the seccomp bypass through ptrace), `ptrace`,
`process_vm_readv` and `process_vm_writev` are allowed: strace and gdb work inside a
cnvm as they do in a Docker container. (A cnvm with a traced process cannot be
teleported while it is traced: CRIU needs to be its tracer.)

CRIU needs no allowance: it suspends a task's filter while its parasite runs inside
that task (PTRACE_O_SUSPEND_SECCOMP) at dump, and at restore it installs the dumped
filter as the last step of each task's restore, after sockets (TCP repair), memory
and the lazy-pages userfaultfd were set up from the restorer. The restored cnvm
runs under exactly the filter it was dumped with.

Per-cnvm options (`parse_security_opt`, Docker's spelling): ``seccomp=unconfined``
runs the cnvm without a filter; ``no-new-privileges[=true|false]`` overrides the
node's `cnvm_no_new_privileges`. They are part of the cnvm's record and travel with
a teleport (`cnvmd.migration.wire.CnvmSpec.security_opt`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proto.messages import ErrorCode, ProtoError

# ------------------------------------------------------------------ the profile

ALLOWED: tuple[str, ...] = (
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "cachestat",
    "capget", "capset", "chdir", "chmod", "chown", "chown32", "clock_adjtime",
    "clock_adjtime64", "clock_getres", "clock_getres_time64", "clock_gettime",
    "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range",
    "connect", "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create",
    "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2",
    "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "execve", "execveat", "exit",
    "exit_group", "faccessat", "faccessat2", "fadvise64", "fadvise64_64", "fallocate",
    "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchmodat2", "fchown", "fchown32",
    "fchownat", "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fork",
    "fremovexattr", "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64",
    "fsync", "ftruncate", "ftruncate64", "futex", "futex_requeue", "futex_time64",
    "futex_wait", "futex_waitv", "futex_wake", "futimesat", "getcpu", "getcwd", "getdents",
    "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32",
    "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid", "getpgrp", "getpid",
    "getppid", "getpriority", "getrandom", "getresgid", "getresgid32", "getresuid",
    "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid", "getsockname",
    "getsockopt", "get_thread_area", "gettid", "gettimeofday", "getuid", "getuid32",
    "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch",
    "io_cancel", "ioctl", "io_destroy", "io_getevents", "io_pgetevents",
    "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup", "io_submit", "ipc",
    "kill", "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
    "lchown", "lchown32", "lgetxattr", "link", "linkat", "listen", "listxattr", "llistxattr",
    "_llseek", "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64", "madvise",
    "map_shadow_stack", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir",
    "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2",
    "mprotect", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "mremap",
    "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall", "munmap",
    "name_to_handle_at", "nanosleep", "newfstatat", "_newselect", "open", "openat",
    "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc",
    "pkey_free", "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64",
    "preadv", "preadv2", "prlimit64", "process_mrelease", "pselect6", "pselect6_time64",
    "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat",
    "readv", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg",
    "remap_file_pages", "removexattr", "rename", "renameat", "renameat2", "restart_syscall",
    "rmdir", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler",
    "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity",
    "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp",
    "select", "semctl", "semget", "semop", "semtimedop", "semtimedop_time64", "send",
    "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsgid32",
    "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups", "setgroups32", "setitimer",
    "setpgid", "setpriority", "setregid", "setregid32", "setresgid", "setresgid32",
    "setresuid", "setresuid32", "setreuid", "setreuid32", "setrlimit", "set_robust_list",
    "setsid", "setsockopt", "set_thread_area", "set_tid_address", "setuid", "setuid32",
    "setxattr", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack", "signalfd",
    "signalfd4", "sigprocmask", "sigreturn", "socketcall", "socketpair", "splice", "stat",
    "stat64", "statfs", "statfs64", "statx", "symlink", "symlinkat", "sync",
    "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time", "timer_create",
    "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64",
    "timer_settime", "timer_settime64", "timerfd_create", "timerfd_gettime",
    "timerfd_gettime64", "timerfd_settime", "timerfd_settime64", "times", "tkill",
    "truncate", "truncate64", "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "utime",
    "utimensat", "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid",
    "waitpid", "write", "writev",
)
"""Allowed for every cnvm: what ordinary programs need, nothing that widens the
kernel surface beyond what an unprivileged process already has."""

CAP_GATED: dict[str, tuple[str, ...]] = {
    "CAP_SYS_ADMIN": ("bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount",
                      "fsopen", "fspick", "lookup_dcookie", "mount", "mount_setattr",
                      "move_mount", "open_tree", "perf_event_open", "quotactl",
                      "quotactl_fd", "setdomainname", "sethostname", "setns", "syslog",
                      "umount", "umount2", "unshare"),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv",
                       "process_vm_writev", "ptrace"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
}
"""Allowed only to a cnvm that holds the capability (Docker's ``includes.caps``): the
kernel checks the same capability, the filter removes the surface before that check."""

MIN_KERNEL_GATED: dict[tuple[int, int], tuple[str, ...]] = {
    (4, 8): ("process_vm_readv", "process_vm_writev", "ptrace"),
}
"""Allowed on kernels that closed the seccomp bypass through ptrace (4.8)."""

ARCH_SPECIFIC: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (frozenset({"amd64", "x32"}), ("arch_prctl",)),
    (frozenset({"amd64", "x32", "386"}), ("modify_ldt",)),
    (frozenset({"arm", "arm64"}), ("arm_fadvise64_64", "arm_sync_file_range",
                                   "sync_file_range2", "breakpoint", "cacheflush",
                                   "set_tls")),
    (frozenset({"ppc64le"}), ("sync_file_range2", "swapcontext")),
    (frozenset({"s390x"}), ("s390_pci_mmio_read", "s390_pci_mmio_write",
                            "s390_runtime_instr")),
    (frozenset({"riscv64"}), ("riscv_flush_icache",)),
)
"""Per-architecture calls libc needs there (Go architecture names, as in moby)."""

ARCHES: dict[str, tuple[str, ...]] = {
    "amd64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "386": ("SCMP_ARCH_X86",),
    "arm64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "arm": ("SCMP_ARCH_ARM",),
    "ppc64le": ("SCMP_ARCH_PPC64LE",),
    "s390x": ("SCMP_ARCH_S390X", "SCMP_ARCH_S390"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}
"""The filter's architectures: the native one and the compat ABIs the kernel runs
(a 32-bit syscall entry must not be a way around the 64-bit rules)."""

_MACHINES = {"x86_64": "amd64", "i686": "386", "i386": "386", "aarch64": "arm64",
             "armv7l": "arm", "armv8l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
             "riscv64": "riscv64"}

AF_VSOCK = 40
PERSONALITIES = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)
"""PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the query: the
personas that do not turn off ASLR (ADDR_NO_RANDOMIZE) or change the ABI."""
CLONE_NAMESPACE_FLAGS = 0x7E020000
"""CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET."""


def native_arch(machine: str | None = None) -> str:
    """This host's architecture in Go's spelling (the keys of `ARCHES`)."""
    m = machine or os.uname().machine
    return _MACHINES.get(m, m)


def _kernel(release: str | None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _rule(names: Iterable[str], action: str = "SCMP_ACT_ALLOW",
          args: Sequence[dict[str, Any]] = (), errno_ret: int | None = None
          ) -> dict[str, Any]:
    rule: dict[str, Any] = {"names": sorted(set(names)), "action": action}
    if args:
        rule["args"] = list(args)
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    return rule


def _arg(index: int, op: str, value: int, value_two: int | None = None) -> dict[str, Any]:
    a: dict[str, Any] = {"index": index, "value": value, "op": op}
    if value_two is not None:
        a["valueTwo"] = value_two
    return a


def default_profile(caps: Iterable[str], *, arch: str | None = None,
                    kernel: str | None = None) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` section for a cnvm holding `caps` on this host.

    `arch` (Go spelling, default: this host's) and `kernel` (a release string,
    default: the running kernel) are parameters for tests. The result is stable
    (sorted names) so that config.json only changes when the policy does.
    """
    capset = set(caps)
    goarch = arch or native_arch()
    release = _kernel(kernel)
    allowed = set(ALLOWED)
    for cap, names in CAP_GATED.items():
        if cap in capset:
            allowed.update(names)
    for (major, minor), names in MIN_KERNEL_GATED.items():
        if release >= (major, minor):
            allowed.update(names)
    for arches, names in ARCH_SPECIFIC:
        if goarch in arches:
            allowed.update(names)
    rules = [_rule(allowed)]
    rules.append(_rule(["socket"], args=[_arg(0, "SCMP_CMP_NE", AF_VSOCK)]))
    rules += [_rule(["personality"], args=[_arg(0, "SCMP_CMP_EQ", p)]) for p in PERSONALITIES]
    if "CAP_SYS_ADMIN" not in capset:
        # clone's flags are its first argument, except on s390 (second)
        flags_at = 1 if goarch == "s390x" else 0
        rules.append(_rule(["clone"], args=[
            _arg(flags_at, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0)]))
        # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc
        # fall back to clone, whose flags the rule above checks
        rules.append(_rule(["clone3"], action="SCMP_ACT_ERRNO", errno_ret=errno.ENOSYS))
    architectures = list(ARCHES.get(goarch, ()))
    profile: dict[str, Any] = {"defaultAction": "SCMP_ACT_ERRNO",
                               "defaultErrnoRet": errno.EPERM, "syscalls": rules}
    if architectures:
        profile["architectures"] = architectures
    return profile


def allowed_names(profile: dict[str, Any]) -> set[str]:
    """Every syscall name some rule of `profile` allows (with or without conditions)."""
    return {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
            for n in r["names"]}


# ------------------------------------------------------------------ per-cnvm options

SECCOMP_UNCONFINED = "seccomp=unconfined"
NNP_TRUE = "no-new-privileges=true"
NNP_FALSE = "no-new-privileges=false"
SECURITY_OPT_RE = re.compile(r"seccomp=unconfined|no-new-privileges=(true|false)")
"""The canonical spelling of each option: records and the teleport wire hold only these."""
MAX_SECURITY_OPTS = 2

_ALIASES = {"seccomp=unconfined": SECCOMP_UNCONFINED, "seccomp:unconfined": SECCOMP_UNCONFINED,
            "no-new-privileges": NNP_TRUE, "no-new-privileges=true": NNP_TRUE,
            "no-new-privileges:true": NNP_TRUE, "no-new-privileges=false": NNP_FALSE,
            "no-new-privileges:false": NNP_FALSE}


@dataclass(frozen=True)
class Sandbox:
    """What a cnvm's processes run under (the runc config's seccomp and
    noNewPrivileges), resolved from the node's policy and the cnvm's options."""

    seccomp: bool = True
    no_new_privileges: bool = True

    @classmethod
    def resolve(cls, security_opt: Iterable[str] = (), *,
                no_new_privileges: bool = True) -> Sandbox:
        """The node default `no_new_privileges`, overridden by the cnvm's options."""
        opts = set(parse_security_opt(list(security_opt)))
        nnp = no_new_privileges
        if NNP_TRUE in opts:
            nnp = True
        elif NNP_FALSE in opts:
            nnp = False
        return cls(seccomp=SECCOMP_UNCONFINED not in opts, no_new_privileges=nnp)


def parse_security_opt(values: Any) -> tuple[str, ...]:
    """Deploy's `security_opt` (Docker's `--security-opt`) → canonical options, sorted.

    Accepted: ``seccomp=unconfined``, ``no-new-privileges`` and
    ``no-new-privileges=true|false`` (``:`` works for ``=`` as in Docker). Anything
    else — other seccomp profiles, AppArmor/SELinux labels — is refused, never ignored.
    """
    if values is None:
        return ()
    if isinstance(values, str) or not isinstance(values, list | tuple):
        raise _bad(f"security_opt must be a list of strings, got {type(values).__name__}")
    out: dict[str, str] = {}
    for v in values:
        if not isinstance(v, str) or len(v) > 64:
            raise _bad(f"bad security option {str(v)[:64]!r}")
        canon = _ALIASES.get(v)
        if canon is None:
            raise _bad(f"unsupported security option {v!r}: use seccomp=unconfined or "
                       "no-new-privileges=true|false")
        key = canon.split("=", 1)[0]
        if out.get(key, canon) != canon:
            raise _bad(f"conflicting security options for {key}: {out[key]} and {canon}")
        out[key] = canon
    return tuple(sorted(out.values()))


def _bad(msg: str) -> ProtoError:
    return ProtoError(ErrorCode.INVALID_ARGUMENT, msg)
