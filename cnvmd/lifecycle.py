"""Images and the cnvm lifecycle: images import/ls/inspect/rm, deploy, stop, start, rm,
exec, logs (``ls``/``inspect`` of cnvms are in `cnvmd.inventory`).

`Lifecycle` holds the logic as async methods so it can be driven without the daemon
(tests, the teleport engine); the ops at the bottom only parse args and call it.

State: one StateStore record per cnvm (kind ``cnvms``, fields documented in
`cnvmd.inventory`), written before anything is created so a crash mid-deploy leaves
something `rm` can clean, and updated after each transition. The runc container,
the overlay mount and the netns are re-derivable from the record, so everything
survives a daemon restart (running containers are adopted by the inventory).

The cnvm's network namespace is a pluggable step: another subsystem publishes an
object with ``attach``/``detach`` (see `Network`) as the NETWORK service (cnvmd.services).
Until one is there, `LocalNetns` gives each cnvm its own namespace with only
loopback (no IP).

One operation per cnvm at a time (`Lifecycle.lock`), also for teleport.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cnvmd import bundle, execs, logstore, proc, restart, seccomp
from cnvmd.api import Args, Context, Router
from cnvmd.execs import ExecTable
from cnvmd.images import ImageStore
from cnvmd.runtime import ContainerState, LogPipe, Runc, RuncError, start_log_shim
from cnvmd.services import EVENTS, LIFECYCLE, NETWORK, Plugin
from cnvmd.state import StateStore
from proto.messages import EVT_PROGRESS, ErrorCode, ProtoError

if TYPE_CHECKING:
    from cnvmd.events import EventBus

KIND = "cnvms"


class Network(Protocol):
    """What deploy needs from the network subsystem (the NETWORK service)."""

    async def attach(self, name: str, *, ip: str | None, record: dict[str, Any]
                     ) -> dict[str, Any]:
        """Ensure the cnvm's netns exists and is wired (idempotent: start calls it again).

        Returns at least ``{"netns": PATH}``; ``ip``/``mac``/... are stored in the record.
        """
        ...

    async def detach(self, name: str, record: dict[str, Any]) -> None:
        """Release what attach made (netns, veth, IP); no error if already gone."""
        ...


class LocalNetns:
    """Minimal default: one netns per cnvm with loopback only."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def netns_name(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def attach(self, name: str, *, ip: str | None, record: dict[str, Any]
                     ) -> dict[str, Any]:
        if ip:
            raise ProtoError(ErrorCode.UNAVAILABLE,
                             "no network engine is loaded on this node: --ip is unavailable")
        ns = self.netns_name(name)
        path = Path("/run/netns") / ns
        if not await asyncio.to_thread(path.exists):
            await proc.run(["ip", "netns", "add", ns], timeout=20)
            await proc.run(["ip", "-n", ns, "link", "set", "lo", "up"], timeout=20)
        return {"netns": str(path), "ip": None}

    async def detach(self, name: str, record: dict[str, Any]) -> None:
        await proc.run(["ip", "netns", "del", self.netns_name(name)], check=False, timeout=20)


def _safe(s: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-") or "node"


def _err(code: ErrorCode, msg: str, **details: Any) -> ProtoError:
    return ProtoError(code, msg, details or None)


async def _net_call(coro: Any) -> Any:
    """Network errors carry (code, message) but are not ProtoErrors: translate."""
    try:
        return await coro
    except ProtoError:
        raise
    except Exception as exc:
        code, message = getattr(exc, "code", None), getattr(exc, "message", None)
        if isinstance(code, ErrorCode) and isinstance(message, str):
            raise ProtoError(code, message) from None
        raise


class Lifecycle:
    """The node's cnvm operations; one per daemon (the LIFECYCLE service)."""

    def __init__(self, *, node: str, state: StateStore, images: ImageStore, runc: Runc,
                 cnvms_dir: Path, network: Network | None = None,
                 network_lookup: Any = None, no_new_privileges: bool = True,
                 oom_score_adj: int = 0, cgroup_root: str = "/cnvm") -> None:
        if not isinstance(no_new_privileges, bool):
            raise ValueError(f"cnvm_no_new_privileges must be true or false, "
                             f"got {no_new_privileges!r}")
        if isinstance(oom_score_adj, bool) or not isinstance(oom_score_adj, int) \
                or not -1000 <= oom_score_adj <= 1000:
            raise ValueError(f"cnvm_oom_score_adj must be an integer in -1000..1000, "
                             f"got {oom_score_adj!r}")
        self.node = node
        self.no_new_privileges = no_new_privileges
        """The node's noNewPrivileges for cnvms without their own option."""
        self.oom_score_adj = oom_score_adj
        bundle.cgroups_path(node, "x", cgroup_root)  # refuse a bad root at start
        self.cgroup_root = cgroup_root
        self.state = state
        self.images = images
        self.runc = runc
        self.cnvms_dir = Path(cnvms_dir)
        self.cnvms_dir.mkdir(parents=True, exist_ok=True)
        self._network = network or LocalNetns(f"cnvm-{_safe(node)}-")
        self._network_lookup = network_lookup  # () -> Network | None, checked per call
        self._locks: dict[str, asyncio.Lock] = {}
        self.events: EventBus | None = None  # the EVENTS service, when the daemon has one
        self.resolv_conf: str | None = None  # set by cnvmd.network.dns: new cnvms' resolv.conf
        self.supervisor: restart.Supervisor | None = None  # told of each (re)start
        self.execs = ExecTable()
        """The execs running in this node's cnvms (cnvmd.execs)."""

    @property
    def network(self) -> Network:
        if self._network_lookup is not None:
            n = self._network_lookup()
            if n is not None:
                return n
        return self._network

    def lock(self, name: str) -> asyncio.Lock:
        """Serialises operations on one cnvm (deploy/stop/start/rm/teleport)."""
        return self._locks.setdefault(name, asyncio.Lock())

    def paths(self, name: str) -> bundle.BundlePaths:
        return bundle.bundle_paths(self.cnvms_dir, name)

    def sandbox(self, rec: dict[str, Any]) -> seccomp.Sandbox:
        """A cnvm's sandbox here: this node's policy, overridden by the cnvm's own
        `security_opt` (its record; for an arriving cnvm, its teleport spec)."""
        return seccomp.Sandbox.resolve(rec.get("security_opt") or (),
                                       no_new_privileges=self.no_new_privileges)

    def _policy(self, rec: dict[str, Any]) -> dict[str, Any]:
        """The runc_config arguments that come from this node's policy."""
        return {"sandbox": self.sandbox(rec), "oom_score_adj": self.oom_score_adj,
                "cgroup_root": self.cgroup_root}

    # ---- records

    async def record(self, name: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.state.load, KIND, name)

    async def _require(self, name: str) -> dict[str, Any]:
        bundle.check_name(name)
        rec = await self.record(name)
        if rec is None:
            raise _err(ErrorCode.NOT_FOUND, f"no cnvm named {name!r} on {self.node}", name=name)
        return rec

    async def _save(self, name: str, rec: dict[str, Any]) -> None:
        await asyncio.to_thread(self.state.save, KIND, name, rec)

    async def images_in_use(self) -> dict[str, list[str]]:
        """image id → cnvms using it (ImageStore refuses to remove those)."""
        recs = await asyncio.to_thread(self.state.list, KIND)
        out: dict[str, list[str]] = {}
        for name, rec in recs.items():
            if rec.get("image_id"):
                out.setdefault(rec["image_id"], []).append(name)
        return out

    # ---- deploy

    async def deploy(self, name: str, image: str, *, hostname: str | None = None,
                     ip: str | None = None, memory: Any = None, cpus: Any = None,
                     env: Any = None, cmd: list[str] | None = None,
                     security_opt: Any = None, restart_policy: Any = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Create and start a cnvm; on any failure undo everything it made.

        `security_opt` (Docker's spelling: ``seccomp=unconfined``,
        ``no-new-privileges=true|false``) loosens or tightens this cnvm's sandbox; it is
        kept in the record and travels with the cnvm.
        `progress(phase)` is told when each step starts (network, rootfs, start), so a
        client sees where a slow deploy is."""
        step = progress or (lambda _phase: None)
        bundle.check_name(name)
        hostname = bundle.check_hostname(hostname or name)
        mem = bundle.parse_memory(memory) if memory not in (None, "") else None
        ncpu = bundle.parse_cpus(cpus) if cpus not in (None, "") else None
        envd = bundle.parse_env(env)
        secopt = seccomp.parse_security_opt(security_opt)
        policy = restart.parse_policy(restart_policy)
        img = self.images.resolve(image)
        async with self.lock(name):
            if await self.record(name) is not None or await self.runc.state(name) is not None:
                raise _err(ErrorCode.ALREADY_EXISTS, f"cnvm {name!r} already exists on "
                           f"{self.node}", name=name)
            if await asyncio.to_thread(self.paths(name).dir.exists):
                raise _err(ErrorCode.CONFLICT, f"leftover bundle {self.paths(name).dir} "
                           "exists without a record; remove it first", name=name)
            rec: dict[str, Any] = {
                "name": name, "runc_id": name, "node": self.node,
                "image": img.names[0] if img.names else img.short_id, "image_id": img.id,
                "hostname": hostname, "ip": ip, "memory": mem, "cpus": ncpu, "env": envd,
                "cmd": list(cmd or []), "security_opt": list(secopt),
                "restart": str(policy), "restarts": 0,
                "desired": "creating", "created_at": time.time(),
                "bundle": str(self.paths(name).dir), "log": str(self.paths(name).console_log),
            }
            await self._save(name, rec)
            try:
                step("network")
                net = await _net_call(self.network.attach(name, ip=ip, record=rec))
                rec.update({k: v for k, v in net.items() if v is not None})
                rec["netns"] = net["netns"]
                await self._save(name, rec)
                step("rootfs")
                await bundle.prepare(
                    self.cnvms_dir, name, img.layer_dirs, img.config, node=self.node,
                    hostname=hostname, cmd=cmd or None, env=envd, memory=mem, cpus=ncpu,
                    netns_path=rec["netns"], ip=rec.get("ip"), resolv=self.resolv_conf,
                    annotations={"org.cnvm.image": img.id, "org.cnvm.node": self.node},
                    **self._policy(rec))
                step("start")
                st = await self._run(name)
                rec["desired"] = "running"
                rec["started_at"] = time.time()
                await self._save(name, rec)
            except BaseException:
                await asyncio.shield(self._teardown(name, rec))
                raise
            self._started("deploy", name, st, image=rec["image"], restart=rec["restart"])
        return self._summary(rec)

    async def mount_arriving(self, name: str, image_id: str) -> None:
        """The overlay rootfs of a cnvm that is arriving by teleport (its upper dir
        streams in while the source still runs)."""
        img = self.images.resolve(image_id)
        await bundle.mount_rootfs(self.paths(name), img.layer_dirs)

    async def drop_bundle(self, name: str) -> None:
        """Unmount and remove a cnvm's bundle dir (an arrival that is undone)."""
        await bundle.destroy(self.paths(name))

    async def forget_record(self, name: str, *, teleport_sid: str) -> bool:
        """Delete the record of `name` only if teleport `teleport_sid` wrote it."""
        rec = await self.record(name)
        if rec is None or rec.get("teleport_sid") != teleport_sid:
            return False
        await asyncio.to_thread(self.state.delete, KIND, name)
        return True

    async def arrived_by(self, teleport_sid: str) -> str | None:
        """The cnvm whose record teleport `teleport_sid` wrote here, if any."""
        recs = await asyncio.to_thread(self.state.list, KIND)
        return next((n for n, r in recs.items() if r.get("teleport_sid") == teleport_sid),
                    None)

    async def save_record(self, name: str, rec: dict[str, Any]) -> None:
        """Write a cnvm's record (a teleport target adopting a restored cnvm)."""
        bundle.check_name(name)
        await self._save(name, rec)

    async def release(self, name: str) -> None:
        """Forget a cnvm that now lives elsewhere (teleport source after the switchover,
        or a target undoing an arrival): container, overlay, bundle dir, record. The
        network (netns, address) is the network service's; this does not touch it."""
        paths = self.paths(name)
        with contextlib.suppress(Exception):
            await self.runc.destroy(name)
        await bundle.destroy(paths)
        await asyncio.to_thread(self.state.delete, KIND, name)

    async def write_restore_config(self, name: str, rec: dict[str, Any], *, netns_path: str,
                                   cgroups_path: str | None = None) -> None:
        """config.json for `runc restore` of an arriving cnvm, from its record under
        this node's policy (the same builder as deploy; the rootfs is mounted).
        `cgroups_path` overrides the per-node cgroup (the tasks return to the one
        they were dumped from when that exists here).

        The restored processes keep the seccomp filter and noNewPrivileges they were
        dumped with (CRIU restores them); this config's sandbox, from the cnvm's
        `security_opt`, applies to what `exec` starts later. (CRIU restores an
        oom_score_adj only when it is not 0: a 0 comes from `runc restore`'s own.)"""
        img = self.images.resolve(rec["image_id"])
        paths = self.paths(name)
        policy = self._policy(rec)
        cfg = await asyncio.to_thread(lambda: bundle.runc_config(
            name=name, image_config=img.config, node=self.node,
            hostname=rec.get("hostname") or name, cmd=rec.get("cmd") or None,
            env=rec.get("env") or {}, memory=rec.get("memory"), cpus=rec.get("cpus"),
            netns_path=netns_path, rootfs=paths.rootfs,
            annotations={"org.cnvm.image": img.id, "org.cnvm.node": self.node},
            **policy))
        if cgroups_path is not None:
            cfg["linux"]["cgroupsPath"] = cgroups_path
        await bundle.write_config(paths, cfg)

    def _emit(self, action: str, name: str, **attrs: Any) -> None:
        if self.events is not None:
            self.events.emit("cnvm", action, name, **attrs)

    def _started(self, action: str, name: str, st: ContainerState, **attrs: Any) -> None:
        """A cnvm's init runs as `st.pid`: the exit watcher follows it; emit `action`."""
        if self.supervisor is not None and st.pid:
            self.supervisor.watch(name, st.pid)
        self._emit(action, name, pid=st.pid, **attrs)

    async def restart_in_place(self, name: str, rec: dict[str, Any]) -> ContainerState:
        """Start an exited cnvm again from its bundle (restart policy; lock held)."""
        await self.runc.destroy(name)
        img = self.images.resolve(rec["image_id"])
        net = await _net_call(self.network.attach(name, ip=rec.get("ip"), record=rec))
        rec["netns"] = net["netns"]
        paths = self.paths(name)
        await bundle.mount_rootfs(paths, img.layer_dirs)
        st = await self._run(name)
        rec["desired"] = "running"
        rec["started_at"] = time.time()
        return st

    async def _run(self, name: str) -> ContainerState:
        paths = self.paths(name)
        pipe = await _log_shim(paths.console_log)
        try:
            return await self.runc.run(name, paths.dir, stdio=pipe.write_fd)
        except RuncError as exc:
            raise _err(ErrorCode.FAILED, str(exc), name=name) from None
        finally:
            pipe.close()

    async def _teardown(self, name: str, rec: dict[str, Any]) -> None:
        """Remove container, mount, bundle, network and record; tolerate missing parts."""
        paths = self.paths(name)
        with contextlib.suppress(Exception):
            await self.runc.destroy(name)
        await bundle.destroy(paths)
        with contextlib.suppress(Exception):
            await self.network.detach(name, rec)
        await asyncio.to_thread(self.state.delete, KIND, name)

    # ---- stop / start / rm

    async def stop(self, name: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """SIGTERM, then SIGKILL after `timeout`; the overlay is unmounted, upper dir kept."""
        async with self.lock(name):
            rec = await self._require(name)
            await self._stop(name, timeout)
            await bundle.unmount_rootfs(self.paths(name))
            rec["desired"] = "stopped"
            rec["stopped_at"] = time.time()
            await self._save(name, rec)
        self._emit("stop", name)
        return self._summary(rec)

    async def _stop(self, name: str, timeout: float) -> None:
        st = await self.runc.state(name)
        if st is None:
            return
        if st.status in ("running", "created"):  # a paused one cannot act on TERM: KILL
            with contextlib.suppress(RuncError):
                await self.runc.kill(name, "TERM")
            loop = asyncio.get_running_loop()
            end = loop.time() + max(0.0, timeout)
            while loop.time() < end:
                st = await self.runc.state(name)
                if st is None or st.status == "stopped":
                    break
                await asyncio.sleep(0.05)
        await self.runc.destroy(name)  # SIGKILLs whatever is left, deletes the state

    async def start(self, name: str) -> dict[str, Any]:
        """Start a stopped cnvm again from its bundle (same upper dir, same netns)."""
        async with self.lock(name):
            rec = await self._require(name)
            st = await self.runc.state(name)
            if st is not None and st.status in ("running", "paused"):
                raise _err(ErrorCode.CONFLICT, f"cnvm {name!r} is already {st.status}")
            if st is not None:
                await self.runc.destroy(name)  # exited by itself: clear runc's state
            img = self.images.resolve(rec["image_id"])
            net = await _net_call(self.network.attach(name, ip=rec.get("ip"), record=rec))
            rec["netns"] = net["netns"]
            paths = self.paths(name)
            await bundle.mount_rootfs(paths, img.layer_dirs)
            try:
                st = await self._run(name)
            except BaseException:
                await bundle.unmount_rootfs(paths)
                raise
            rec["desired"] = "running"
            rec["started_at"] = time.time()
            rec["restarts"] = 0  # as `docker start`: the policy's count starts over
            await self._save(name, rec)
        self._started("start", name, st)
        return self._summary(rec)

    async def rm(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """Remove a stopped cnvm (running ones only with force); upper dir and log go too."""
        bundle.check_name(name)
        async with self.lock(name):
            rec = await self.record(name)
            st = await self.runc.state(name)
            if rec is None and st is None:
                raise _err(ErrorCode.NOT_FOUND, f"no cnvm named {name!r} on {self.node}")
            if st is not None and st.status in ("running", "paused") and not force:
                raise _err(ErrorCode.CONFLICT, f"cnvm {name!r} is {st.status}: stop it first "
                           "or use --force", name=name)
            await self._teardown(name, rec or {"name": name})
            # the CRIU/runc logs of its last teleports (cnvmd.migration.report.keep_logs)
            await asyncio.to_thread(shutil.rmtree,
                                    self.cnvms_dir.parent / "teleport-logs" / name, True)
        self._emit("rm", name)
        return {"name": name, "removed": True}

    # ---- exec (cnvmd.execs) / logs

    async def exec(self, name: str, argv: list[str], *, input: bytes | None = None,
                   env: list[str] | None = None, cwd: str | None = None,
                   timeout: float | None = 300) -> dict[str, Any]:
        """Run a command in the running cnvm: {exit_code, stdout, stderr[, error]}."""
        return await execs.run(self, name, argv, env=env or [], cwd=cwd, stdin=input,
                               timeout=timeout)

    async def logs(self, name: str, *, tail: int | None = None) -> str:
        """The console log (last `tail` lines, at most logstore.WINDOW bytes)."""
        rec = await self._require(name)
        log = Path(rec.get("log") or self.paths(name).console_log)
        lines, _, _ = await asyncio.to_thread(logstore.read_tail, log, tail=tail)
        return "".join(s for _, s in lines)

    async def follow(self, name: str, *, tail: int | None = None,
                     interval: float = 0.2) -> AsyncIterator[str]:
        """Yield the log, then new output as it comes, until the cnvm leaves this node."""
        async for chunk in logstore.follow(self, name, tail=tail, interval=interval):
            yield "".join(s for _, s in chunk)

    # ---- view

    def _summary(self, rec: dict[str, Any]) -> dict[str, Any]:
        keys = ("name", "node", "image", "image_id", "hostname", "ip", "memory", "cpus",
                "security_opt", "netns", "desired", "bundle", "log", "restart")
        return {k: rec.get(k) for k in keys}


async def _log_shim(path: Path) -> LogPipe:
    """runtime's console-log shim, bounded: a deploy must never hang on it."""
    try:
        return await asyncio.wait_for(start_log_shim(path), 20)
    except (TimeoutError, OSError, RuntimeError) as exc:
        raise _err(ErrorCode.FAILED, f"the log shim for {path} did not start: {exc}"
                   ) from None


# ----------------------------------------------------------------------------- ops

router = Router()
router.include(execs.router)  # exec, exec.input, exec.resize
router.include(logstore.router)  # logs


def _svc(ctx: Context) -> Lifecycle:
    return ctx.daemon.services.require(LIFECYCLE)


async def start_lifecycle(daemon: Any) -> None:
    cfg = daemon.config
    life: Lifecycle | None = None

    async def in_use() -> dict[str, list[str]]:
        return await life.images_in_use() if life is not None else {}

    store = ImageStore.from_config(cfg, in_use=in_use)
    await asyncio.to_thread(store.load)
    runc = Runc(cfg.runc_root, cfg.runc, cfg.criu)
    life = Lifecycle(node=cfg.node_name, state=daemon.state, images=store, runc=runc,
                     cnvms_dir=cfg.cnvms_dir,
                     network_lookup=lambda: daemon.services.get(NETWORK),
                     no_new_privileges=cfg.cnvm_no_new_privileges,
                     oom_score_adj=cfg.cnvm_oom_score_adj, cgroup_root=cfg.cgroup_root)
    life.events = daemon.services.get(EVENTS)
    daemon.services.provide(LIFECYCLE, life)


@router.op("images.import")
async def images_import(ctx: Context, args: Args) -> dict[str, Any]:
    """Import an OCI layout (dir/tar), a docker-save tar or a rootfs tarball."""
    path = args.str("path")
    name = args.str("name", None)
    kind = args.str("format", "auto", choices=("auto", "oci", "docker", "rootfs"))
    args.reject_unknown()
    if not os.path.isabs(path):
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"path {path!r} must be absolute")
    ctx.progress("import", path=path)
    t0 = time.monotonic()
    img = await _svc(ctx).images.import_path(path, name, kind=kind)
    return {**img.summary(), "full_id": img.id, "seconds": round(time.monotonic() - t0, 3)}


@router.op("images.ls")
async def images_ls(ctx: Context, args: Args) -> list[dict[str, Any]]:
    """List the node's images."""
    args.reject_unknown()
    store = _svc(ctx).images
    users = await _svc(ctx).images_in_use()
    return [{**i.summary(), "used_by": sorted(users.get(i.id, []))} for i in store.list()]


@router.op("images.inspect")
async def images_inspect(ctx: Context, args: Args) -> dict[str, Any]:
    """One image: names, digests, layers, config."""
    ref = args.str("image")
    args.reject_unknown()
    return _svc(ctx).images.inspect(ref)


@router.op("images.rm")
async def images_rm(ctx: Context, args: Args) -> dict[str, Any]:
    """Remove an image (refused while a cnvm uses it)."""
    ref = args.str("image")
    args.reject_unknown()
    img = await _svc(ctx).images.remove(ref)
    return {"id": img.short_id, "names": img.names, "removed": True}


@router.op("deploy")
async def deploy(ctx: Context, args: Args) -> dict[str, Any]:
    """Deploy a cnvm from an image and start it."""
    name = args.str("name", max_len=63)
    image = args.str("image")
    hostname = args.str("hostname", None, max_len=253)
    ip = args.str("ip", None, max_len=64)
    # sizes and counts come as text ("256M", "500m") or as numbers
    memory = (args.str("memory", None, max_len=32) if isinstance(args.get("memory"), str)
              else args.int("memory", None, min=0))
    cpus = (args.str("cpus", None, max_len=32) if isinstance(args.get("cpus"), str)
            else args.float("cpus", None))
    env = args.argv("env", [])  # argv rules: no NUL, what execve() would accept
    cmd = args.argv("cmd", [])
    security_opt = args.list("security_opt", [])
    restart_policy = args.str("restart", None, max_len=20)
    args.reject_unknown()
    t0 = time.monotonic()

    def progress(phase: str) -> None:
        ctx.emit(EVT_PROGRESS, {"phase": phase, "elapsed": round(time.monotonic() - t0, 3)})

    return await _svc(ctx).deploy(name, image, hostname=hostname, ip=ip, memory=memory,
                                  cpus=cpus, env=env, cmd=cmd, security_opt=security_opt,
                                  restart_policy=restart_policy, progress=progress)


@router.op("stop")
async def stop(ctx: Context, args: Args) -> dict[str, Any]:
    """Stop a cnvm: SIGTERM, then SIGKILL after --time seconds."""
    name = args.str("name", max_len=63)
    t = args.float("time", 10.0, min=0, max=3600)
    args.reject_unknown()
    return await _svc(ctx).stop(name, timeout=t)


@router.op("start")
async def start(ctx: Context, args: Args) -> dict[str, Any]:
    """Start a stopped cnvm."""
    name = args.str("name", max_len=63)
    args.reject_unknown()
    return await _svc(ctx).start(name)


@router.op("rm")
async def rm(ctx: Context, args: Args) -> dict[str, Any]:
    """Remove a cnvm (running ones only with force)."""
    name = args.str("name", max_len=63)
    force = args.bool("force", False)
    args.reject_unknown()
    return await _svc(ctx).rm(name, force=force)


plugin = Plugin("lifecycle", requires=("events",), router=router, start=start_lifecycle)
