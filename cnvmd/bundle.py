"""A cnvm's runc bundle: overlayfs rootfs over image layers, and its config.json.

Per cnvm, under ``config.cnvms_dir/<name>/`` (the runc bundle directory)::

    config.json   generated here (`runc_config`)
    rootfs/       overlayfs mount point: image layers (lower) + upper/ + work/
    upper/        everything the cnvm changed: what teleport syncs to the target
    work/         overlayfs scratch (same filesystem as upper/)

Why these choices:

- The rootfs is an overlay, not a copy: deploy costs one mount; the upper dir is
  exactly the cnvm's own changes, so teleport ships only those (the layers travel
  by digest, once per node). ``redirect_dir=off,index=off,metacopy=off`` keep the
  upper dir self-contained (no references into lower inodes/file handles that would
  be meaningless on another host).
- The network namespace is given as a *path*: runc then treats it as external, which
  is what CRIU needs to checkpoint it and to restore into a namespace the target
  prepared (same IP/MAC, pre-locked).
- No terminal, and no stdio decisions here: `cnvmd.runtime` gives runc a pipe to a
  detached log shim (CRIU treats the pipe as external and re-plumbs it on restore;
  a host file as stdout would make ``criu dump`` fail). The log file is
  ``<bundle>/console.log`` (`BundlePaths.console_log`), next to the bundle, which
  teleport ships with the upper dir.
- The command is checked against the image at deploy time (PATH lookup inside the
  rootfs, following the image's own symlinks), so a typo fails the deploy with a
  clear message instead of a container that dies at once.
- Capabilities are Docker's default set: enough for sshd (setuid/setgid, chroot for
  privilege separation, audit write) without CAP_SYS_ADMIN. No /sys/fs/cgroup mount:
  on this cgroup-v1 host it would add a mount per controller for CRIU to dump and
  restore, for nothing sshd needs.
- The sandbox (`cnvmd.seccomp.Sandbox`): Docker's default seccomp profile unless the
  cnvm opted out (``seccomp=unconfined``), and noNewPrivileges from the node's
  `cnvm_no_new_privileges` (default on: setuid binaries such as su/sudo cannot raise
  privileges; a cnvm that needs them deploys with ``no-new-privileges=false``). CRIU
  dumps and restores both with the processes. ``oomScoreAdj`` is always written
  (`cnvm_oom_score_adj`, default 0): an unset one would be inherited from cnvmd,
  which the shipped unit runs at -500.
- cgroupsPath is ``/cnvm/<node>/<name>``: during a teleport between two lab nodes
  of one host, source and target copies exist at once.
- The upper dir holds overlayfs whiteouts (0/0 character devices) and
  ``trusted.overlay.*`` xattrs: whatever copies it must keep both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cnvmd import proc, seccomp
from cnvmd.state import atomic_write
from proto.messages import ErrorCode, ProtoError, show

# Validators use fullmatch: `$` would let a trailing newline through to runc.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEM = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(i?b?)\s*", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
MIN_MEMORY = 6 << 20  # below this the kernel OOM-kills runc's own init
CPU_PERIOD = 100_000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPS = [  # Docker's default set
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
OVERLAY_OPTS = "index=off,redirect_dir=off,metacopy=off"
# The new mount API's limit for one option string (fsconfig: 256 bytes with the NUL).
_MAX_FSCONFIG_STRING = 255


class BundleError(ProtoError):
    """Bad deploy parameters or a bundle operation that failed (travels as a ProtoError)."""


def _bad(msg: str) -> BundleError:
    return BundleError(ErrorCode.INVALID_ARGUMENT, msg)


# ------------------------------------------------------------------ validation


def check_name(name: Any) -> str:
    """cnvm names are DNS labels: they become hostnames, runc ids and cgroup names."""
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name):
        raise _bad(
            f"bad cnvm name {show(name)}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_hostname(hostname: Any) -> str:
    if not isinstance(hostname, str) or len(hostname) > 253 or not all(
        _DNS_LABEL.fullmatch(part) for part in hostname.split(".")
    ):
        raise _bad(f"bad hostname {show(hostname)}: dot-separated DNS labels "
                   "(lowercase letters, digits, '-')")
    return hostname


def parse_memory(value: Any) -> int:
    """`256M`, `1G`, `1.5g`, `512MiB`, `1048576` → bytes (K/M/G/T are powers of 1024)."""
    if isinstance(value, bool):
        raise _bad(f"bad memory size {show(value)}")
    if isinstance(value, int):
        n = value
    else:
        m = _MEM.fullmatch(str(value))
        if not m or (m.group(3).lower() == "i" and not m.group(2)):
            raise _bad(f"bad memory size {show(value)}: use a number with an optional K, M, G "
                       "or T suffix, e.g. 256M or 1G")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < MIN_MEMORY:
        raise _bad(f"memory size {show(value)} is too small: at least {MIN_MEMORY >> 20}M")
    if n > 1 << 50:
        raise _bad(f"memory size {show(value)} is too large")
    return n


def parse_cpus(value: Any) -> float:
    """`2`, `0.5`, `500m` (millicores) → CPUs as a float."""
    try:
        s = str(value).strip()
        n = float(s[:-1]) / 1000 if s.endswith("m") else float(s)
    except ValueError:
        raise _bad(f"bad CPU count {show(value)}: use a number like 0.5 or 2, or 500m") from None
    if not 0.01 <= n <= 1024 or n != n:
        raise _bad(f"CPU count {show(value)} is out of range (0.01 to 1024)")
    return n


def parse_env(env: Mapping[str, Any] | Iterable[str] | None) -> dict[str, str]:
    """Deploy env as a dict or `K=V` strings; keys validated."""
    if env is None:
        return {}
    items: list[tuple[str, str]] = []
    if isinstance(env, Mapping):
        items = [(str(k), str(v)) for k, v in env.items()]
    else:
        for kv in env:
            k, sep, v = str(kv).partition("=")
            if not sep:
                raise _bad(f"bad environment entry {show(kv)}: use KEY=VALUE")
            items.append((k, v))
    for k, v in items:
        if not _ENV_KEY.fullmatch(k):
            raise _bad(f"bad environment variable name {show(k)}")
        if "\0" in v:
            raise _bad(f"environment variable {k} holds a NUL character")
    return dict(items)


# ------------------------------------------------------------------ paths


@dataclass(frozen=True)
class BundlePaths:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def console_log(self) -> Path:
        """The cnvm's stdout/stderr (written by runtime's log shim)."""
        return self.dir / "console.log"


def bundle_paths(cnvms_dir: Path, name: str) -> BundlePaths:
    return BundlePaths(Path(cnvms_dir) / check_name(name))


# ------------------------------------------------------------------ mounts


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def is_mounted(path: Path) -> bool:
    """Is something mounted exactly at path (in this mount namespace)?"""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split(" ", 5)
            if len(parts) > 4 and _unescape(parts[4]) == target:
                return True
    return False


def _prepare_dirs(paths: BundlePaths) -> None:
    for d in (paths.dir, paths.upper, paths.work, paths.rootfs):
        d.mkdir(parents=True, exist_ok=True)
    paths.dir.chmod(0o700)


def _kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


def _overlay_options(paths: BundlePaths, layer_dirs: Sequence[Path], *,
                     kernel: str | None = None) -> tuple[str, str | None]:
    """overlayfs mount data, and the cwd to mount from when relative lowerdirs are needed.

    Why three shapes: mount(8) of util-linux >= 2.39 (Debian 13) uses the new mount API,
    which hands each option to the kernel as one string of at most 255 bytes, so a
    plain ``lowerdir=a:b:c`` of three absolute layer paths already fails (EINVAL,
    seen on Debian 13's 6.12 kernel). Kernels >= 6.8 take ``lowerdir+=`` once per
    layer instead, with either mount API. Older kernels get relative layer names
    from the layers directory (containerd's trick) once the list grows long.
    """
    for d in layer_dirs:
        if not Path(d).is_dir():
            raise BundleError(ErrorCode.FAILED,
                              f"image layer {d} is missing; re-import the image")
    lowers = [str(Path(d).resolve()) for d in reversed(layer_dirs)]  # overlay: top first
    cwd = None
    tail = f"upperdir={paths.upper.resolve()},workdir={paths.work.resolve()},{OVERLAY_OPTS}"
    if len("lowerdir=" + ":".join(lowers)) <= _MAX_FSCONFIG_STRING:
        return f"lowerdir={':'.join(lowers)},{tail}", None
    if _kernel_at_least(6, 8, kernel) and not any("," in p for p in lowers):
        return ",".join(f"lowerdir+={p}" for p in lowers) + f",{tail}", None
    parents = {os.path.dirname(p) for p in lowers}
    if len(parents) == 1:
        cwd = parents.pop()
        lowers = [os.path.basename(p) for p in lowers]
    return f"lowerdir={':'.join(lowers)},{tail}", cwd


async def mount_rootfs(paths: BundlePaths, layer_dirs: Sequence[Path]) -> None:
    """Mount the overlay (layers bottom→top as given) at paths.rootfs; idempotent."""
    if not layer_dirs:
        raise _bad("an image needs at least one layer")
    await asyncio.to_thread(_prepare_dirs, paths)
    if await asyncio.to_thread(is_mounted, paths.rootfs):
        return
    opts, cwd = await asyncio.to_thread(_overlay_options, paths, layer_dirs)
    try:
        await proc.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(paths.rootfs)],
                       cwd=cwd, timeout=30)
    except proc.CommandError as exc:
        raise BundleError(ErrorCode.FAILED, f"cannot mount the rootfs of {paths.dir.name}: "
                          f"{exc}") from None


async def unmount_rootfs(paths: BundlePaths, timeout: float = 10.0) -> None:
    """Unmount the overlay; idempotent. Falls back to a lazy unmount if it stays busy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await asyncio.to_thread(is_mounted, paths.rootfs):
        res = await proc.run(["umount", str(paths.rootfs)], check=False, timeout=30)
        if res.returncode == 0:
            continue
        if asyncio.get_running_loop().time() > deadline:
            await proc.run(["umount", "-l", str(paths.rootfs)], check=False, timeout=30)
            return
        await asyncio.sleep(0.1)


async def destroy(paths: BundlePaths) -> None:
    """Unmount and delete the whole bundle directory (upper dir included)."""
    await unmount_rootfs(paths)
    if await asyncio.to_thread(is_mounted, paths.rootfs):
        raise BundleError(ErrorCode.BUSY, f"{paths.rootfs} is still mounted")
    await asyncio.to_thread(shutil.rmtree, paths.dir, True)


async def write_config(paths: BundlePaths, cfg: dict[str, Any]) -> None:
    body = json.dumps(cfg, indent=1).encode() + b"\n"
    await asyncio.to_thread(atomic_write, paths.config, body, 0o600)


async def seed_etc(paths: BundlePaths, hostname: str, ip: str | None = None,
                   resolv: str | None = None) -> None:
    """Write /etc/hostname and an /etc/hosts line through the mounted overlay, and
    /etc/resolv.conf when given (the cnvm resolver's, cnvmd.network.dns)."""

    def work() -> None:
        etc = paths.rootfs / "etc"
        if not etc.is_dir() or etc.is_symlink():
            return
        (etc / "hostname").write_text(hostname + "\n")
        hosts = etc / "hosts"
        if hosts.is_symlink():
            return
        lines = [ln for ln in (hosts.read_text().splitlines() if hosts.exists() else [])
                 if not ln.endswith(" # cnvm")]
        if not any(ln.split()[:1] == ["127.0.0.1"] for ln in lines):
            lines.insert(0, "127.0.0.1\tlocalhost")
        lines.append(f"{ip or '127.0.1.1'}\t{hostname} # cnvm")
        hosts.write_text("\n".join(lines) + "\n")
        rc = etc / "resolv.conf"
        if resolv is not None and not rc.is_symlink():
            rc.write_text(resolv)

    await asyncio.to_thread(work)


# ------------------------------------------------------------------ in-image lookups


def resolve_in_root(root: Path, path: str, max_links: int = 40) -> Path | None:
    """Resolve `path` as the container would (symlinks relative to root); None if absent."""
    parts = list(PurePosixPath(path).parts[1:] if path.startswith("/") else
                 PurePosixPath(path).parts)
    cur = PurePosixPath("/")
    links = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = cur.parent
            continue
        host = root / str(cur / part).lstrip("/")
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                cur = PurePosixPath("/")
            parts = list(PurePosixPath(target).parts[1 if target.startswith("/") else 0:]) + parts
            continue
        cur = cur / part
    return root / str(cur).lstrip("/")


def find_command(root: Path, cmd: str, path_env: str) -> str | None:
    """Absolute in-image path of cmd, searched along PATH like execvp."""
    if "/" in cmd:
        return cmd if resolve_in_root(root, cmd) is not None else None
    for d in path_env.split(":"):
        if not d.startswith("/"):
            continue
        cand = f"{d.rstrip('/')}/{cmd}"
        host = resolve_in_root(root, cand)
        if host is not None and host.is_file() and os.access(host, os.X_OK):
            return cand
    return None


def _entries(root: Path | None, file: str) -> list[list[str]]:
    """Fields of each line of the image's /etc/passwd or /etc/group."""
    if root is None:
        return []
    p = resolve_in_root(root, f"/etc/{file}")
    if p is None or not p.is_file():
        return []
    return [ln.split(":") for ln in p.read_text(errors="replace").splitlines()
            if ln.count(":") >= 3]


def resolve_user(user: str, root: Path | None) -> tuple[int, int]:
    """An image's `User` ("", "uid", "uid:gid", "name", "name:group") → (uid, gid)."""
    if not user:
        return 0, 0
    u, _, g = user.partition(":")
    passwd = _entries(root, "passwd")
    if u.isdigit():
        uid = int(u)
        gid = next((int(f[3]) for f in passwd if f[2] == u and f[3].isdigit()), 0)
    else:
        hit = next((f for f in passwd if f[0] == u and f[2].isdigit() and f[3].isdigit()),
                   None)
        if hit is None:
            raise _bad(f"user {u!r} of the image is not in its /etc/passwd")
        uid, gid = int(hit[2]), int(hit[3])
    if g.isdigit():
        gid = int(g)
    elif g:
        hitg = next((f for f in _entries(root, "group") if f[0] == g and f[2].isdigit()), None)
        if hitg is None:
            raise _bad(f"group {g!r} of the image is not in its /etc/group")
        gid = int(hitg[2])
    return uid, gid


# ------------------------------------------------------------------ config.json


def merge_env(image_env: Iterable[str] | None, env: Mapping[str, str], hostname: str,
              uid: int) -> list[str]:
    """Image Env, then the deploy's (wins per key); PATH/HOSTNAME/HOME defaults."""
    out: dict[str, str] = {}
    for kv in image_env or []:
        k, sep, v = str(kv).partition("=")
        if sep:
            out[k] = v
    out.update(env)
    out.setdefault("PATH", DEFAULT_PATH)
    out.setdefault("HOSTNAME", hostname)
    if uid == 0:
        out.setdefault("HOME", "/root")
    return [f"{k}={v}" for k, v in out.items()]


def command_argv(image_config: Mapping[str, Any], cmd: Sequence[str] | None) -> list[str]:
    """Docker semantics: Entrypoint + (deploy's command, else the image's Cmd)."""
    entry = list(image_config.get("Entrypoint") or [])
    argv = entry + list(cmd if cmd else image_config.get("Cmd") or [])
    if not argv:
        raise _bad("the image defines no command: give one after `--`")
    return [str(a) for a in argv]


CGROUP_ROOT_RE = re.compile(r"(/[A-Za-z0-9_.-]{1,64}){1,4}")


def cgroups_path(node: str, name: str, root: str = "/cnvm") -> str:
    """Per node and cnvm: during a teleport between two lab nodes on one host, both
    copies exist at once and must not share a cgroup; `root` (config cgroup_root)
    keeps labs on one host apart."""
    if not CGROUP_ROOT_RE.fullmatch(root) or "/." in root:
        raise _bad(f"cgroup root {root!r} must be an absolute path of plain names")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node) or "node"
    return f"{root}/{safe}/{check_name(name)}"


def runc_config(
    *,
    name: str,
    image_config: Mapping[str, Any],
    node: str = "local",
    hostname: str | None = None,
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    memory: int | None = None,
    cpus: float | None = None,
    pids_limit: int | None = 4096,
    netns_path: str | None = None,
    rootfs: Path | None = None,
    workdir: str | None = None,
    annotations: Mapping[str, str] | None = None,
    sandbox: seccomp.Sandbox | None = None,
    oom_score_adj: int = 0,
    cgroup_root: str = "/cnvm",
) -> dict[str, Any]:
    """The runc config.json for a cnvm.

    `rootfs` is the mounted overlay on the host: used to check the command exists
    and to resolve the image's User by name.
    `netns_path` None gives the cnvm a fresh, empty network namespace (tests).
    `sandbox` None is the default one (seccomp profile, noNewPrivileges).
    """
    sandbox = sandbox or seccomp.Sandbox()
    if isinstance(oom_score_adj, bool) or not isinstance(oom_score_adj, int) \
            or not -1000 <= oom_score_adj <= 1000:
        raise _bad(f"oom_score_adj {oom_score_adj!r} must be an integer in -1000..1000")
    check_name(name)
    hostname = check_hostname(hostname or name)
    uid, gid = resolve_user(str(image_config.get("User") or ""), rootfs)
    envl = merge_env(image_config.get("Env"), dict(env or {}), hostname, uid)
    argv = command_argv(image_config, cmd)
    path_env = next((e[5:] for e in envl if e.startswith("PATH=")), DEFAULT_PATH)
    if rootfs is not None and find_command(rootfs, argv[0], path_env) is None:
        raise _bad(f"command {argv[0]!r} not found in the image (PATH={path_env})")
    cwd = workdir or str(image_config.get("WorkingDir") or "/")
    if not cwd.startswith("/"):
        raise _bad(f"working directory {cwd!r} must be absolute")

    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory is not None:
        resources["memory"] = {"limit": int(memory)}
    if cpus is not None:
        resources["cpu"] = {"quota": max(1000, int(cpus * CPU_PERIOD)), "period": CPU_PERIOD}
    if pids_limit:
        resources["pids"] = {"limit": int(pids_limit)}

    netns: dict[str, str] = {"type": "network"}
    if netns_path:
        netns["path"] = netns_path if netns_path.startswith("/") else f"/run/netns/{netns_path}"

    cfg: dict[str, Any] = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": argv,
            "env": envl,
            "cwd": cwd,
            "capabilities": {k: list(CAPS) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": sandbox.no_new_privileges,
            "oomScoreAdj": oom_score_adj,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "annotations": {"org.cnvm.name": name, **dict(annotations or {})},
        "linux": {
            "cgroupsPath": cgroups_path(node, name, cgroup_root),
            "resources": resources,
            "namespaces": [{"type": "pid"}, netns, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    if sandbox.seccomp:
        cfg["linux"]["seccomp"] = seccomp.default_profile(CAPS)
    return cfg


async def prepare(
    cnvms_dir: Path,
    name: str,
    layer_dirs: Sequence[Path],
    image_config: Mapping[str, Any],
    *,
    seed: bool = True,
    **kw: Any,
) -> BundlePaths:
    """Create dirs, mount the overlay, seed /etc, write config.json: ready for `runc run`
    (or `runc restore` on a teleport target, with seed=False: the upper dir that
    arrived must not be touched, a restored process may hold its files open).

    On failure the overlay is unmounted again (the dirs stay for the caller's rm).
    """
    paths = bundle_paths(cnvms_dir, name)
    ip = kw.pop("ip", None)
    resolv = kw.pop("resolv", None)
    await mount_rootfs(paths, layer_dirs)
    try:
        cfg = await asyncio.to_thread(lambda: runc_config(
            name=name, image_config=image_config, rootfs=paths.rootfs, **kw))
        if seed:
            await seed_etc(paths, cfg["hostname"], ip, resolv)
        await write_config(paths, cfg)
    except BaseException:
        with contextlib.suppress(Exception):
            await unmount_rootfs(paths)
        raise
    return paths
