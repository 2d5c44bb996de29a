"""CRIU for hosts where root lacks CAP_SYS_RESOURCE (like these lab machines).

CRIU reads every task's rlimits with prlimit(2), which the kernel refuses for a
task of another user without CAP_SYS_RESOURCE: a cnvm running, say, an sshd
session as a normal user cannot be dumped. `prlimit_shim.c` (LD_PRELOAD) answers
such reads from /proc/PID/limits. Built once per daemon start into the state dir
when a C compiler is present and the capability is missing; the engine then runs
CRIU through a tiny wrapper that preloads it. Without a compiler, teleports of
cnvms with processes of several users fail cleanly (and roll back).

A second wrapper gives the lazy-pages daemon CRIU's kernel-feature cache where /run
is not a tmpfs (as here): CRIU keeps what it probes of the kernel in /run/criu.kdat
only on a tmpfs, else it probes again at every start (~30 ms, measured), and a
postcopy target starts that daemon inside the frozen window. The wrapper runs it in
a private mount namespace whose /run is a directory on /dev/shm (a tmpfs that
outlives the call, so the cache persists); nothing is mounted on the host. Not for
CRIU under runc: a /run of its own hides everything under the host's /run from it —
runc's work paths and the cnvm's run dir, where CRIU mounts its cgroup yard (hence
the EINVAL seen when that was tried). CRIU *loads* /run/criu.kdat on any filesystem,
though; it only refuses to *write* it off a tmpfs. So at start the daemon makes the
cache once in the private /run (this boot's, on /dev/shm) and copies it to the
host's /run/criu.kdat, which every CRIU run under runc then loads (~35 ms less per
run, on each side of a teleport). A reboot empties /dev/shm and the next start makes
it anew, so a cache from another kernel is never copied.

A third, for runc: `swrk_shim.c`, a small static program given to runc as its CRIU.
runc 1.1 starts a whole `criu swrk` to ask CRIU's version on every checkpoint and
restore, and another for a feature check on a lazy checkpoint (5-8 ms each here, in
the frozen window). The shim answers those two from the answers the real CRIU gave
once at daemon start (`make_swrk_cache`) and execs the real CRIU, with the wrapper's
environment, for everything else. Built when a C compiler is present; else the shell
wrapper is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from cnvmd import proc

log = logging.getLogger("cnvmd.teleport")
SRC = Path(__file__).with_name("prlimit_shim.c")
SWRK_SRC = Path(__file__).with_name("swrk_shim.c")
# The requests whose answers the swrk shim replays (name in the cache dir, request): runc
# 1.1's VERSION (type 10), its FEATURE_CHECK (type 9) for lazy pages (`features` =
# lazy_pages: true, as Go's protobuf encodes it) and for memory tracking (pre-dump).
# A FEATURE_CHECK carries options; CRIU needs the field, empty is fine.
SWRK_REQUESTS = (("version", b"\x08\x0a"),
                 ("feature-1001", b"\x08\x09\x12\x00\x2a\x02\x10\x01"),
                 ("feature-0801", b"\x08\x09\x12\x00\x2a\x02\x08\x01"))
CAP_SYS_RESOURCE = 24


def has_sys_resource() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return True


KDAT_DIR = Path("/dev/shm/cnvm-criu-run")

NFT_CONFIG = """\
# Written by cnvmd (cnvmd/migration/criushim.py). CRIU locks a dumped cnvm's network
# with one nftables table made in-process (libnftables), and its restore unlocks it
# the same way: with iptables, the restore's network-unlock ran iptables-restore five
# times (plus a shell) inside the frozen window, 90-105 ms measured here. A restore
# follows the method the dump recorded, so images dumped either way still restore.
network-lock nftables
"""


def _fstype(path: str) -> str | None:
    """The filesystem type of the mount holding `path` (longest mountinfo prefix)."""
    best, kind = "", None
    try:
        with open("/proc/self/mountinfo") as f:
            for ln in f:
                left, _, right = ln.partition(" - ")
                mp = left.split()[4]
                if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                    best, kind = mp, right.split()[0]
    except OSError:
        return None
    return kind


def wrapper_text(criu: str, preload: Path | None, kdat_dir: Path | None,
                 config: Path | None = None) -> str:
    """The wrapper script: optional LD_PRELOAD of the prlimit shim, optional private
    /run on a tmpfs directory (kdat cache), optional CRIU config file (read by CRIU
    also when runc drives it over RPC: runc 1.1 passes no network-lock option)."""
    lines = ["#!/bin/sh", "# CRIU for cnvmd teleports (see cnvmd/migration/criushim.py)"]
    if config is not None:
        lines.append(f'CRIU_CONFIG_FILE="{config}"; export CRIU_CONFIG_FILE')
    if preload is not None:
        lines.append(f'LD_PRELOAD="{preload}${{LD_PRELOAD:+:$LD_PRELOAD}}"; export LD_PRELOAD')
    if kdat_dir is not None:
        lines += [f'mkdir -p "{kdat_dir}" 2>/dev/null',
                  "exec unshare --mount --propagation private sh -c "
                  f"'mount --bind \"{kdat_dir}\" /run && exec \"$0\" \"$@\"' \"{criu}\" \"$@\""]
    else:
        lines.append(f'exec "{criu}" "$@"')
    return "\n".join(lines) + "\n"


async def criu_for_teleport(criu: str, state_dir: Path) -> tuple[str, str]:
    """The CRIU commands the engine should use: (for runc, for the lazy-pages daemon).

    `criu` itself, or wrappers: the prlimit shim where CAP_SYS_RESOURCE is missing;
    for the lazy-pages daemon also the kdat cache where /run is no tmpfs; with `nft`
    installed, a config that makes dumps lock the network with nftables (see
    NFT_CONFIG). With a C compiler the wrappers are compiled (swrk_shim.c: for runc
    with the swrk cache; the lazy-pages daemon's with its private /run)."""
    preload = await _build_shim(state_dir) if not has_sys_resource() else None
    kdat = None
    run_fs, shm_fs = await asyncio.to_thread(lambda: (_fstype("/run"),
                                                      _fstype(str(KDAT_DIR.parent))))
    if run_fs != "tmpfs" and shm_fs == "tmpfs" and shutil.which("unshare"):
        kdat = KDAT_DIR
    d = Path(state_dir) / "teleport"

    def write(name: str, text: str, mode: int = 0o755) -> str:
        d.mkdir(parents=True, exist_ok=True)
        tmpw = d / f".{name}.tmp"
        tmpw.write_text(text)
        tmpw.chmod(mode)
        os.replace(tmpw, d / name)
        return str(d / name)

    try:
        conf = None
        if shutil.which("nft"):
            await asyncio.to_thread(write, "criu.conf", NFT_CONFIG, 0o644)
            conf = d / "criu.conf"
        main = criu if preload is None and conf is None else await asyncio.to_thread(
            write, "criu", wrapper_text(criu, preload, None, conf))
        shim = await _build_swrk_shim(d, criu, preload, conf)
        if shim is not None and await make_swrk_cache(shim, d / "swrk-cache"):
            main = str(shim)
        lazy = main if kdat is None else await asyncio.to_thread(
            write, "criu-lazy", wrapper_text(criu, preload, kdat, conf))
        shim_lazy = None if kdat is None else await _build_swrk_shim(
            d, criu, preload, conf, name="criu-lazy-bin", private_run=kdat)
        if shim_lazy is not None:  # the same in one program (no unshare, sh, mount)
            lazy = str(shim_lazy)
    except OSError as exc:
        log.warning("cannot write the CRIU wrappers (%s): using plain CRIU", exc)
        return criu, criu
    if kdat is not None:
        await seed_kdat(lazy, kdat / "criu.kdat", Path("/run/criu.kdat"))
    return main, lazy


async def seed_kdat(criu_private_run: str, made: Path, host: Path) -> bool:
    """Make this boot's kdat cache (a `criu check` in the private /run) if missing and
    copy it to the host's /run, where CRIU under runc loads it."""
    if not await asyncio.to_thread(made.exists):
        try:
            await proc.run([criu_private_run, "check"], timeout=60, check=False)
        except proc.CommandError as exc:
            log.warning("cannot make CRIU's kdat cache: %s", exc)
            return False

    def copy() -> bool:
        if not made.exists():
            return False
        tmp = host.with_name(f".{host.name}.cnvm{os.getpid()}")
        shutil.copyfile(made, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, host)
        return True

    try:
        ok = await asyncio.to_thread(copy)
    except OSError as exc:
        log.warning("cannot place CRIU's kdat cache in %s: %s", host.parent, exc)
        return False
    if ok:
        log.info("CRIU kdat cache placed in %s (probes the kernel once per boot)", host)
    return ok


async def _build_shim(state_dir: Path) -> Path | None:
    """Compile prlimit_shim.so into the state dir (once per source change)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not SRC.exists():
        log.warning("no CAP_SYS_RESOURCE and no C compiler: cnvms with processes of "
                    "several users cannot be teleported from this node")
        return None
    d = Path(state_dir) / "teleport"
    so = d / "prlimit_shim.so"
    try:
        await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True)
        fresh = so.exists() and so.stat().st_mtime >= SRC.stat().st_mtime
        if not fresh:
            tmp = d / f".prlimit_shim.{os.getpid()}.so"
            await proc.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SRC)],
                           timeout=60)
            await asyncio.to_thread(os.replace, tmp, so)
    except (proc.CommandError, OSError) as exc:
        log.warning("cannot build the CRIU prlimit shim (%s): using plain CRIU", exc)
        return None
    return so


# The entry point of a private CRIU bundle, as scripts/install-deps writes it.
_BUNDLE_EXEC = re.compile(
    r'exec "(?P<ld>/[^"$`\\]+)" --library-path "(?P<lp>[^"$`\\]+)" "(?P<bin>/[^"$`\\]+)" "\$@"')


def criu_argv(criu: str) -> list[str]:
    """The command that runs `criu`: for the bundle's shell entry point (install-deps),
    its loader line itself (one shell less at each CRIU start); else `criu`."""
    try:
        with open(criu, "rb") as f:
            head = f.read(4096)
    except OSError:
        return [criu]
    if not head.startswith(b"#!/bin/sh\n"):
        return [criu]
    lines = [ln for ln in head.decode(errors="replace").splitlines()[1:]
             if ln.strip() and not ln.lstrip().startswith("#")]
    m = _BUNDLE_EXEC.fullmatch(lines[0].strip()) if len(lines) == 1 else None
    if m is None or not all(os.path.isfile(m[k]) for k in ("ld", "bin")):
        return [criu]
    return [m["ld"], "--library-path", m["lp"], m["bin"]]


def _c_str(s: str) -> str:
    """A C string literal for a path (compile-time define)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _build_swrk_shim(d: Path, criu: str, preload: Path | None, conf: Path | None,
                           *, name: str = "criu-swrk",
                           private_run: Path | None = None) -> Path | None:
    """Compile swrk_shim.c into d/NAME for this CRIU command, environment and cache dir
    (again only when one of them or the source changed); with `private_run`, the
    lazy-pages daemon's wrapper (see wrapper_text's kdat_dir). None without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not SWRK_SRC.exists():
        return None
    criu_path = criu if os.path.isabs(criu) else shutil.which(criu)
    if criu_path is None:
        return None
    cmd = await asyncio.to_thread(criu_argv, criu_path)
    defs = [f"-DCRIU_CMD={_c_str(cmd[0])}", f"-DCACHE_DIR={_c_str(str(d / 'swrk-cache'))}"]
    if len(cmd) > 1:
        defs.append("-DCRIU_PRE=" + ",".join(_c_str(a) for a in cmd[1:]))
    if conf is not None:
        defs.append(f"-DCONFIG_FILE={_c_str(str(conf))}")
    if preload is not None:
        defs.append(f"-DPRELOAD={_c_str(str(preload))}")
    if private_run is not None:
        defs.append(f"-DPRIVATE_RUN={_c_str(str(private_run))}")
    out, stamp = d / name, d / f"{name}.stamp"
    try:
        src = await asyncio.to_thread(SWRK_SRC.read_bytes)
        key = hashlib.sha256(src + "\0".join(defs).encode()).hexdigest()

        def fresh() -> bool:
            return out.exists() and stamp.exists() and stamp.read_text() == key
        if await asyncio.to_thread(fresh):
            return out
        await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True)
        tmp = d / f".{name}.{os.getpid()}"
        base = [cc, "-O2", "-o", str(tmp), *defs, str(SWRK_SRC)]
        try:  # static: no loader and libc to map at each of runc's CRIU starts
            await proc.run([*base[:2], "-static", *base[2:]], timeout=60)
        except proc.CommandError:
            await proc.run(base, timeout=60)
        await asyncio.to_thread(os.replace, tmp, out)
        await asyncio.to_thread(stamp.write_text, key)
    except (proc.CommandError, OSError) as exc:
        log.warning("cannot build the CRIU swrk shim (%s): runc asks CRIU itself", exc)
        return None
    return out


def _swrk_call(cmd: str, request: bytes, timeout: float) -> bytes | None:
    """One request to `cmd swrk FD` over a socketpair, as runc sends it; the answer if
    CRIU says success for the same request type. Blocking (run in a thread)."""
    import subprocess

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with a, b:
            p = subprocess.Popen([cmd, "swrk", str(b.fileno())], pass_fds=(b.fileno(),),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            b.close()
            try:
                a.settimeout(timeout)
                a.sendall(request)
                resp = a.recv(65536)
            except OSError:
                resp = b""
            finally:
                a.close()
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    except OSError:
        return None
    # field 1 (type) must match the request's, field 2 (success) must be true
    if len(resp) < 4 or resp[:2] != request[:2] or resp[2:4] != b"\x10\x01":
        return None
    return resp


async def make_swrk_cache(shim: Path, cache: Path) -> bool:
    """Ask the real CRIU (through the shim, whose cache is emptied first) the requests
    the shim replays and keep its answers; False if CRIU did not answer its version."""
    def make() -> bool:
        cache.mkdir(parents=True, exist_ok=True)
        for f in cache.iterdir():
            with contextlib.suppress(OSError):
                f.unlink()
        for name, req in SWRK_REQUESTS:
            resp = _swrk_call(str(shim), req, 30.0)
            if resp is None:
                if name == "version":
                    return False
                continue
            tmp = cache / f".{name}.tmp"
            tmp.write_bytes(resp)
            os.replace(tmp, cache / name)
        return True

    try:
        ok = await asyncio.to_thread(make)
    except OSError as exc:
        log.warning("cannot make the CRIU swrk cache (%s): runc asks CRIU itself", exc)
        return False
    if not ok:
        log.warning("CRIU did not answer its version over swrk: runc asks CRIU itself")
    return ok
