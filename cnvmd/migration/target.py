"""The target side of a teleport: a session per incoming cnvm, driven by the source.

The source calls these steps (API ops `teleport.*`, reached through the peer
mesh's `forward`) and streams data (`teleport.data` channels):

    prepare  preflight (CRIU version, free disk/memory, lazy pages, name free),
             session dir + marker, netns (same IP/MAC, pre-locked, links DOWN),
             which image blobs are missing
    image    register the image from the shipped blobs, mount the overlay rootfs
    data     upper-dir tar streams (round 0 and final delta), CRIU images, log
    pages    (stop-copy) start `criu page-server`; the source's dump streams into it
    restore  write config.json, links up, (postcopy) lazy-pages daemon + relay to
             the source, `runc restore`, GARP, cnvm record  -> the target owns it
    commit   keep the teleport history; forget the session
    abort    undo everything of the session (also on lease expiry: a source that
             vanished never leaves a half-made cnvm behind)

Nothing of a session survives an abort: no netns, mount, runc state, record or
directory. A marker file per session lets a restarted daemon finish that job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnvmd import criu, proc
from cnvmd.migration import link as links
from cnvmd.migration import netmove, treesync
from cnvmd.migration.report import keep_logs
from cnvmd.peers.streams import TcpRelay
from cnvmd.runtime import Runc, RuncError, _umount_under, start_log_shim
from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.teleport")

KIND_CNVMS = "cnvms"
KIND_REPORTS = "teleports"
MAX_REPORTS = 10
RESTORE_TIMEOUT = 30.0
PAGE_SERVER_WAIT = 20.0


def _err(code: ErrorCode, msg: str) -> ProtoError:
    return ProtoError(code, msg)


@dataclass
class Session:
    sid: str
    name: str
    source: str
    mode: str
    dir: Path
    lease: float
    net: netmove.NetInfo
    record: dict[str, Any]
    config: dict[str, Any]
    image: dict[str, Any]
    status: str = "prepared"  # prepared | restoring | restored | committed | aborted
    netns_path: str = ""
    bundle_made: bool = False
    mounted: bool = False
    record_written: bool = False
    page_server: asyncio.subprocess.Process | None = None
    page_log: Path | None = None
    lazy: asyncio.subprocess.Process | None = None
    relay: TcpRelay | None = None
    last_seen: float = field(default_factory=time.monotonic)
    busy: int = 0
    watchdog: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wire_bytes: int = 0

    @property
    def images(self) -> Path:
        return self.dir / "images"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    def touch(self) -> None:
        self.last_seen = time.monotonic()


class TargetSide:
    """All incoming teleports of this node (``daemon.services["teleport.target"]``)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        cfg = daemon.config
        self.node = cfg.node_name
        self.base = Path(cfg.state_dir) / "teleport" / "in"
        self.criu = daemon.services.get("teleport.criu") or cfg.criu
        self.criu_lazy = daemon.services.get("teleport.criu_lazy") or self.criu
        self.runc = Runc(cfg.runc_root, cfg.runc, self.criu)
        self.sessions: dict[str, Session] = {}

    # ---- helpers

    @property
    def life(self) -> Any:
        life = self.daemon.services.get("lifecycle")
        if life is None:
            raise _err(ErrorCode.UNAVAILABLE, f"{self.node}: the lifecycle service is not "
                       "running; cannot receive a cnvm")
        return life

    def get(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise _err(ErrorCode.NOT_FOUND, f"{self.node}: no teleport session {sid}")
        s.touch()
        return s

    def _marker(self, s: Session) -> None:
        data = {"sid": s.sid, "name": s.name, "source": s.source, "status": s.status,
                "netns": s.netns_path, "bundle_made": s.bundle_made,
                "record_written": s.record_written, "pid": os.getpid()}
        tmp = s.dir / "session.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, s.dir / "session.json")

    # ---- prepare

    async def prepare(self, a: dict[str, Any]) -> dict[str, Any]:
        sid, name, source = str(a["sid"]), str(a["name"]), str(a["source"])
        life = self.life
        if any(s.name == name and s.status not in ("aborted", "committed")
               for s in self.sessions.values()):
            raise _err(ErrorCode.BUSY, f"{self.node}: a teleport of {name} is already arriving")
        if await life.record(name) is not None or await self.runc.state(name) is not None:
            raise _err(ErrorCode.ALREADY_EXISTS, f"a cnvm named {name!r} already exists on "
                       f"{self.node}")
        paths = life.paths(name)
        if await asyncio.to_thread(paths.dir.exists):
            raise _err(ErrorCode.CONFLICT, f"{self.node}: leftover bundle {paths.dir} exists")
        caps = await self.preflight(a)
        s = Session(sid=sid, name=name, source=source, mode=str(a["mode"]),
                    dir=self.base / sid, lease=float(a.get("lease", 30.0)),
                    net=netmove.NetInfo.from_wire(a["net"]), record=dict(a["record"]),
                    config=dict(a["config"]), image=dict(a["image"]))
        await asyncio.to_thread(_mkdirs, s.images, s.work)
        self.sessions[sid] = s
        await asyncio.to_thread(self._marker, s)
        s.watchdog = asyncio.create_task(self._watch(s))
        try:
            net = netmove.plumbing(self.daemon)
            s.netns_path = await net.create(name, s.net)
            await asyncio.to_thread(self._marker, s)
            images = life.images
            blobs = [s.image["manifest"], s.image["config"], *s.image["layers"]]
            missing = await asyncio.to_thread(images.missing_blobs, blobs)
            if not missing:
                await self._image(s)
        except BaseException:
            await asyncio.shield(self.abort(sid, "prepare failed"))
            raise
        return {"missing_blobs": missing, "caps": caps, "netns": s.netns_path}

    async def preflight(self, a: dict[str, Any]) -> dict[str, Any]:
        """Refuse early what would fail later: CRIU, memory, disk, lazy pages."""
        caps = live_caps(self.daemon)
        if "error" in caps:
            raise _err(ErrorCode.UNAVAILABLE, f"{self.node}: CRIU unusable: {caps['error']}")
        mine = criu.parse_version(f"Version: {caps.get('criu_version', '0')}") or (0,)
        theirs = criu.parse_version(f"Version: {a.get('criu_version', '0')}") or (0,)
        if mine < theirs:
            raise _err(ErrorCode.FAILED, f"{self.node} has CRIU {caps.get('criu_version')}, "
                       f"older than the source's {a.get('criu_version')}: images may not "
                       "restore; upgrade CRIU on the target")
        if not caps.get("tcp_repair"):
            raise _err(ErrorCode.FAILED, f"{self.node}: CRIU cannot restore TCP connections")
        theirs_cpu = set(a.get("cpu_flags") or [])
        missing = sorted(theirs_cpu - set(await asyncio.to_thread(cpu_flags)))
        if theirs_cpu and missing:
            raise _err(ErrorCode.FAILED, f"{self.node}'s CPU lacks flags the cnvm may use "
                       f"(from {a.get('source')}): {' '.join(missing[:12])}")
        need_mem = int(a.get("memory", 0))
        avail = await asyncio.to_thread(_mem_available)
        if need_mem and avail and avail < need_mem + (64 << 20):
            raise _err(ErrorCode.FAILED, f"{self.node}: not enough free memory "
                       f"({avail >> 20} MiB available, the cnvm uses {need_mem >> 20} MiB)")
        need_disk = int(a.get("disk", 0))
        self.base.mkdir(parents=True, exist_ok=True)
        st = await asyncio.to_thread(os.statvfs, self.base)
        free = st.f_bavail * st.f_frsize
        if free < need_disk + (64 << 20):
            raise _err(ErrorCode.FAILED, f"{self.node}: not enough free disk in {self.base} "
                       f"({free >> 20} MiB free, {need_disk >> 20} MiB needed)")
        return caps

    async def image(self, sid: str) -> dict[str, Any]:
        s = self.get(sid)
        await self._image(s)
        return {"ok": True}

    async def _image(self, s: Session) -> None:
        life = self.life
        store = life.images
        try:
            img = store.resolve(s.image["id"])
        except ProtoError:
            img = await store.register(s.image["manifest"], s.image.get("name"))
        paths = life.paths(s.name)
        s.bundle_made = True
        await asyncio.to_thread(self._marker, s)
        from cnvmd import bundle

        await bundle.mount_rootfs(paths, img.layer_dirs)
        s.mounted = True

    # ---- data streams

    async def serve_data(self, stream: Any, args: dict[str, Any]) -> None:
        what = str(args.get("what"))
        if what == "pages":
            raise _err(ErrorCode.INVALID_ARGUMENT, "pages are served by the source side")
        s = self.get(str(args.get("sid")))
        s.busy += 1
        try:
            await stream.write_frame({"ok": True})
            n = 0
            if what in ("upper", "images"):
                dst = self.life.paths(s.name).upper if what == "upper" else s.images
                un = await (treesync.Unpacker.start(dst) if what == "upper"
                            else PlainUnpacker.start(dst))
                try:
                    while data := await stream.read(links.CHUNK):
                        await un.feed(data)
                    await un.finish()
                except BaseException:
                    un.abort()
                    raise
                n = un.bytes
            elif what == "log":
                n = await _receive_append(stream, self.life.paths(s.name).console_log,
                                          int(args.get("offset", 0)))
            elif what == "blob":
                tmp = s.dir / "blob.part"
                n = await _receive_append(stream, tmp, 0)
                await self.life.images.add_blob(tmp, str(args["digest"]))
                await asyncio.to_thread(tmp.unlink)
            else:
                raise _err(ErrorCode.INVALID_ARGUMENT, f"unknown teleport data {what!r}")
            s.wire_bytes += n
            await stream.write_frame({"ok": True, "bytes": n})
        except ProtoError as exc:
            with contextlib.suppress(Exception):
                await stream.write_frame({"ok": False, "error": exc.to_wire()})
        except Exception as exc:
            with contextlib.suppress(Exception):
                await stream.write_frame({"ok": False, "error": {
                    "code": "failed", "message": f"{self.node}: {what}: {exc}"}})
        finally:
            s.busy -= 1
            s.touch()
            stream.write_eof()

    # ---- pages (stop-copy)

    async def pages(self, sid: str, rnd: int | None = None,
                    parent: str | None = None) -> dict[str, Any]:
        """Start a page server for the final dump, or for pre-dump round `rnd`.

        `parent` (``round-K``, a sibling dir) is the previous pre-dump: the page server
        links it as ``parent`` in its images dir (``--prev-images-dir``) so that it
        answers the dumper's "has parent" and the restore finds the pages that this
        round skipped (unchanged since round K) by following the link.
        """
        s = self.get(sid)
        images = s.images if rnd is None else s.dir / f"round-{rnd}"
        await asyncio.to_thread(_mkdirs, images)
        if s.page_server is not None and s.page_server.returncode is None:
            # The previous round's server exits once its dumper hung up (a failed
            # pre-dump's may linger): a moment, then it goes.
            try:
                await asyncio.wait_for(s.page_server.wait(), 5)
            except TimeoutError:
                proc.kill_group(s.page_server.pid)
                await s.page_server.wait()
        if parent is not None and not await asyncio.to_thread((s.dir / parent).is_dir):
            raise _err(ErrorCode.FAILED, f"{self.node}: no pre-dump {parent} to build on")
        port = links.free_port()
        argv = [self.criu, "page-server", "--images-dir", str(images), "--address",
                "127.0.0.1", "--port", str(port), "--work-dir", str(s.work),
                "--log-file", f"page-server{'' if rnd is None else f'-{rnd}'}.log", "-v2"]
        if parent is not None:
            argv += ["--prev-images-dir", f"../{parent}"]
        s.page_log = s.work / argv[argv.index("--log-file") + 1]
        s.page_server = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        for _ in range(200):  # until it listens
            if await asyncio.to_thread(_listening, port):
                break
            if s.page_server.returncode is not None:
                raise _err(ErrorCode.FAILED, f"{self.node}: criu page-server exited: "
                           + _tail(s.page_log))
            await asyncio.sleep(0.01)
        return {"port": port}

    async def pagemaps(self, sid: str, rnd: int) -> dict[str, Any]:
        """The pagemap images of pre-dump round `rnd` (small: one entry per run of
        pages). A hybrid source needs them: its lazy dump decides per page "in the
        parent" from its local parent images, whose pages stay here."""
        s = self.get(sid)
        d = s.dir / f"round-{rnd}"
        if s.page_server is not None and s.page_server.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.page_server.wait(), PAGE_SERVER_WAIT)

        def read() -> dict[str, bytes]:
            return {p.name: p.read_bytes() for p in d.glob("pagemap-*.img")}

        files = await asyncio.to_thread(read)
        if not files:
            raise _err(ErrorCode.NOT_FOUND, f"{self.node}: no pagemaps in {d.name}")
        return {"files": files}

    # ---- restore: the switchover

    async def restore(self, a: dict[str, Any], ctx_emit: Any = None) -> dict[str, Any]:
        s = self.get(str(a["sid"]))
        async with s.lock:
            if s.status != "prepared":
                raise _err(ErrorCode.CONFLICT, f"{self.node}: session {s.sid} is {s.status}")
            s.status = "restoring"
            s.busy += 1
            try:
                return await self._restore(s, a)
            except BaseException:
                if s.status == "restoring":
                    s.status = "prepared"  # the source decides: abort (or retry)
                raise
            finally:
                s.busy -= 1
                s.touch()

    async def _restore(self, s: Session, a: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        life = self.life
        paths = life.paths(s.name)
        timings: dict[str, float] = {}
        log.info("teleport %s: restoring %s from %s", s.sid, s.name, s.source)
        if s.page_server is not None:  # stop-copy: all pages in once it exits by itself
            try:
                await asyncio.wait_for(s.page_server.wait(), PAGE_SERVER_WAIT)
            except TimeoutError:
                raise _err(ErrorCode.FAILED, f"{self.node}: the page server did not finish") \
                    from None
            if s.page_server.returncode != 0:
                raise _err(ErrorCode.FAILED, f"{self.node}: page server failed: "
                           + _tail(s.page_log or s.work / "page-server.log"))
            timings["pages_wait"] = time.monotonic() - t0
        cfg = retarget_config(s.config, node=self.node, name=s.name, netns=s.netns_path)
        src_cg = str((s.config.get("linux") or {}).get("cgroupsPath") or "")
        if src_cg and not await asyncio.to_thread(_cgroup_exists, src_cg):
            # CRIU puts the tasks back into the cgroup they were dumped from (on cgroup
            # v2 runc's cgroup-root remap does not apply): runc must track that same
            # cgroup, or its pause and the next teleport's freeze miss the tasks
            # (pre-dump: "Unseizable non-zombie"). A per-node path only where the
            # source's cgroup exists here (lab nodes sharing one host).
            cfg["linux"]["cgroupsPath"] = src_cg
        await asyncio.to_thread(_write_json, paths.config, cfg)
        if a.get("fail_restore") and self.daemon.config.fault_injection:
            # fault injection for the tests: a real broken image set
            await asyncio.to_thread(_break_images, s.images)
        net = netmove.plumbing(self.daemon)
        await net.bring_up(s.name, s.net)
        if a.get("neighbors"):
            with contextlib.suppress(Exception):
                await netmove.add_neighbors(s.netns_path, list(a["neighbors"]))
        if a.get("vteps"):
            mine = await asyncio.to_thread(_own_addresses)
            try:
                n = await netmove.learn_vteps({m: d for m, d in dict(a["vteps"]).items()
                                               if d not in mine})
                log.debug("teleport %s: %d neighbour VTEP(s) learnt of %s", s.sid, n,
                         a["vteps"])
            except Exception as exc:
                log.warning("teleport %s: cannot learn neighbour VTEPs: %s", s.sid, exc)
        lazy = a.get("lazy_port")
        work = s.work
        if lazy:
            link = links.PeerLink(self.daemon.services["peers"], s.source)
            s.relay = await links.stream_relay(link, {"sid": s.sid, "what": "pages"})
            lazy_dir = s.dir / "lazy"
            await asyncio.to_thread(_mkdirs, lazy_dir)
            argv = [self.criu_lazy, "lazy-pages", "--page-server", "--address", "127.0.0.1",
                    "--port", str(s.relay.port), "--images-dir", str(s.images),
                    "--work-dir", str(lazy_dir), "--log-file", "lazy-pages.log", "-v2"]
            s.lazy = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
            sock = lazy_dir / "lazy-pages.socket"
            for _ in range(500):
                if await asyncio.to_thread(sock.exists) or s.lazy.returncode is not None:
                    break
                await asyncio.sleep(0.005)
            if s.lazy.returncode is not None:
                raise _err(ErrorCode.FAILED, f"{self.node}: criu lazy-pages exited: "
                           + _tail(lazy_dir / "lazy-pages.log"))
            work = lazy_dir
            timings["lazy_daemon"] = time.monotonic() - t0
        pipe = await start_log_shim(paths.console_log)
        t_r = time.monotonic()
        log.info("teleport %s: runc restore", s.sid)
        try:
            st = await self.runc.restore(s.name, paths.dir, s.images, work_dir=work,
                                         stdio=pipe.write_fd, tcp_established=True,
                                         lazy_pages=bool(lazy), timeout=RESTORE_TIMEOUT)
        except RuncError as exc:
            raise _err(ErrorCode.FAILED, f"restore on {self.node} failed: {exc}") from None
        finally:
            pipe.close()
        timings["runc_restore"] = time.monotonic() - t_r
        if st.status == "paused":  # dumped from a frozen cgroup (stop-copy)
            await self.runc._simple("resume", s.name, ["resume", s.name])
        s.status = "restored"
        await asyncio.to_thread(self._marker, s)
        with contextlib.suppress(Exception):
            await netmove.teach(s.netns_path, [e["ip"] for e in a.get("neighbors") or []])
        with contextlib.suppress(Exception):
            await net.announce(s.name, s.net)
        timings["announced"] = time.monotonic() - t0
        rec = dict(s.record)
        rec.update({"node": self.node, "netns": s.netns_path, "bundle": str(paths.dir),
                    "log": str(paths.console_log), "desired": "running",
                    "ip": rec.get("ip") or s.net.ip, "teleported_from": s.source,
                    "teleported_at": time.time()})
        await life._save(s.name, rec)
        s.record_written = True
        await asyncio.to_thread(self._marker, s)
        return {"status": "running", "pid": st.pid, "node": self.node, "timings": timings}

    # ---- commit / abort / status

    async def commit(self, sid: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.get(sid)
        if s.status not in ("restored", "committed"):
            raise _err(ErrorCode.CONFLICT, f"{self.node}: session {sid} is {s.status}")
        s.status = "committed"
        if reports:
            await asyncio.to_thread(save_reports, self.daemon.state, s.name, reports)
        lazy_ok = None
        if s.lazy is not None:
            try:
                await asyncio.wait_for(s.lazy.wait(), 60)
                lazy_ok = s.lazy.returncode == 0
            except TimeoutError:
                lazy_ok = False
        relay = s.relay.bytes_up + s.relay.bytes_down if s.relay else 0
        await self._forget(s)
        return {"ok": True, "lazy_ok": lazy_ok, "relay_bytes": relay,
                "wire_bytes": s.wire_bytes + relay}

    async def status(self, sid: str) -> dict[str, Any]:
        s = self.sessions.get(sid)
        if s is None:
            return {"status": "unknown"}
        s.touch()
        return {"status": s.status}

    async def abort(self, sid: str, why: str = "aborted by the source") -> dict[str, Any]:
        """Undo the session. A restored (running) cnvm is never aborted: it is ours."""
        s = self.sessions.get(sid)
        if s is None:
            return {"status": "unknown"}
        if s.status in ("restored", "committed"):
            return {"status": s.status}
        log.warning("teleport %s of %s from %s aborted on the target: %s", sid, s.name,
                    s.source, why)
        s.status = "aborted"
        await self._cleanup(s)
        return {"status": "aborted"}

    async def _watch(self, s: Session) -> None:
        """Abort a session whose source went quiet (vanished, link cut) before restore."""
        while s.status in ("prepared", "restoring"):
            await asyncio.sleep(min(1.0, s.lease / 4))
            if s.busy or s.status != "prepared":
                continue
            if s.page_server is not None and s.page_server.returncode is None:
                # A pre-dump round streams into it (rounds can outlast the lease on a
                # slow link); if the source dies, its relay drops and the server exits.
                s.touch()
                continue
            if time.monotonic() - s.last_seen > s.lease:
                with contextlib.suppress(Exception):
                    await self.abort(s.sid, f"no word from {s.source} for {s.lease:g}s")
                return

    async def _stop_procs(self, s: Session) -> None:
        for p in (s.page_server, s.lazy):
            if p is not None and p.returncode is None:
                proc.kill_group(p.pid)
                with contextlib.suppress(Exception):
                    await p.wait()
        if s.relay is not None:
            await s.relay.close()

    async def _keep_logs(self, s: Session) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(keep_logs, s.dir, self.daemon.config.state_dir, s.name,
                                    "target")

    async def _cleanup(self, s: Session) -> None:
        await self._stop_procs(s)
        await self._keep_logs(s)
        life = self.daemon.services.get("lifecycle")
        await cleanup_leftovers(self.daemon, s.name, s.dir, bundle_made=s.bundle_made,
                                record_written=s.record_written, life=life, runc=self.runc)
        self.sessions.pop(s.sid, None)

    async def _forget(self, s: Session) -> None:
        await self._stop_procs(s)
        await self._keep_logs(s)
        await asyncio.to_thread(_umount_under, s.dir)
        await asyncio.to_thread(shutil.rmtree, s.dir, True)
        self.sessions.pop(s.sid, None)

    async def recover(self) -> None:
        """At daemon start: finish sessions a crash interrupted (from their markers)."""
        if not self.base.is_dir():
            return
        for d in sorted(self.base.iterdir()):
            if d.name in self.sessions:  # arrived after this start: alive
                continue
            try:
                m = json.loads((d / "session.json").read_text())
            except (OSError, ValueError):
                m = {}
            name = m.get("name")
            if m.get("status") in ("restored", "committed"):
                log.info("teleport %s: %s arrived before the restart; keeping it", d.name, name)
                await asyncio.to_thread(_umount_under, d)
                await asyncio.to_thread(shutil.rmtree, d, True)
                continue
            log.warning("teleport %s of %s was interrupted by a restart: cleaning up",
                        d.name, name)
            if name:
                await cleanup_leftovers(self.daemon, name, d,
                                        bundle_made=bool(m.get("bundle_made")),
                                        record_written=bool(m.get("record_written")),
                                        life=self.daemon.services.get("lifecycle"),
                                        runc=self.runc, kill_in_dir=True)
            else:
                await asyncio.to_thread(_umount_under, d)
                await asyncio.to_thread(shutil.rmtree, d, True)


async def cleanup_leftovers(daemon: Any, name: str, sdir: Path, *, bundle_made: bool,
                            record_written: bool, life: Any, runc: Runc,
                            kill_in_dir: bool = False) -> None:
    """Remove everything a target session may have made; every step tolerates absence."""
    if kill_in_dir:  # CRIU helpers of a crashed daemon: found by their cwd-less argv
        await asyncio.to_thread(_kill_criu_helpers, sdir)
    with contextlib.suppress(Exception):
        await runc.destroy(name)
    with contextlib.suppress(Exception):
        await netmove.plumbing(daemon).destroy(name)
    if life is not None:
        paths = life.paths(name)
        if bundle_made:
            from cnvmd import bundle

            with contextlib.suppress(Exception):
                await bundle.unmount_rootfs(paths)
            await asyncio.to_thread(shutil.rmtree, paths.dir, True)
        if record_written:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(daemon.state.delete, KIND_CNVMS, name)
    await asyncio.to_thread(_umount_under, sdir)
    await asyncio.to_thread(shutil.rmtree, sdir, True)


def _kill_criu_helpers(sdir: Path) -> None:
    """Kill page-server / lazy-pages processes whose argv names this session dir."""
    key = str(sdir).encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if key in argv and (b"page-server" in argv or b"lazy-pages" in argv):
            with contextlib.suppress(OSError):
                os.kill(int(d), 9)


# --------------------------------------------------------------------------- helpers


class PlainUnpacker(treesync.Unpacker):
    """Plain `tar -x` (CRIU images): an incremental extraction would delete the pages
    the page server already wrote into the same directory."""

    @classmethod
    async def start(cls, dst: Path) -> PlainUnpacker:
        await asyncio.to_thread(dst.mkdir, parents=True, exist_ok=True)
        argv = ["tar", "-C", str(dst), "-xf", "-"]
        p = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        return cls(p, argv)


def live_caps(daemon: Any) -> dict[str, Any]:
    """Capabilities with the live pipe-max-size (the daemon may have raised it)."""
    if daemon.caps is None:
        return {"error": daemon.caps_error or "not probed"}
    d = dict(daemon.caps.to_dict())
    live = criu.read_pipe_max_size()
    d["pipe_max_size"] = live
    d["lazy_pages_ready"] = bool(daemon.caps.uffd_noncoop and live >= criu.LAZY_PIPE_MIN)
    return d


def retarget_config(cfg: dict[str, Any], *, node: str, name: str, netns: str) -> dict[str, Any]:
    """The source's config.json for this node: own netns path, own cgroup, node label."""
    out = json.loads(json.dumps(cfg))
    linux = out.setdefault("linux", {})
    for ns in linux.get("namespaces", []):
        if ns.get("type") == "network":
            ns["path"] = netns
    from cnvmd import bundle

    linux["cgroupsPath"] = bundle.cgroups_path(node, name)
    out.setdefault("annotations", {})["org.cnvm.node"] = node
    return out


def save_reports(state: Any, name: str, reports: list[dict[str, Any]]) -> None:
    state.save(KIND_REPORTS, name, {"reports": reports[-MAX_REPORTS:]})


def load_reports(state: Any, name: str) -> list[dict[str, Any]]:
    try:
        d = state.load(KIND_REPORTS, name)
    except Exception:
        return []
    return list((d or {}).get("reports", []))


def _mkdirs(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _break_images(images: Path) -> None:
    """Corrupt an image only the restore reads (the lazy-pages daemon does not)."""
    for p in images.glob("files.img"):
        p.write_bytes(b"\0" * 16)


def _cgroup_exists(path: str) -> bool:
    """Whether cgroup `path` exists here, in the unified or any v1 hierarchy."""
    rel = path.strip("/")
    root = Path("/sys/fs/cgroup")
    if (root / rel).is_dir():
        return True
    try:
        return any((h / rel).is_dir() for h in root.iterdir() if h.is_dir())
    except OSError:
        return False


def _own_addresses() -> set[str]:
    """This netns's IPv4 addresses (a VTEP entry pointing at ourselves is skipped)."""
    out = set()
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "/32 host LOCAL" in line and i > 0:
                out.add(lines[i - 1].split()[-1])
    except OSError:
        pass
    return out


def cpu_flags() -> list[str]:
    """CPU feature flags (x86 `flags`, arm `Features`): a restored process may use any
    instruction the source CPU had, so the target needs at least those."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return val.split()
    except OSError:
        pass
    return []


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _listening(port: int) -> bool:
    """Is something listening on loopback:port? Read /proc/net/tcp: connecting to
    CRIU's page server to find out would start (and end) its one session."""
    want = f":{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1].endswith(want) and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def _tail(path: Path, n: int = 4) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errs = [ln for ln in lines if "Error" in ln] or lines
    return " | ".join(errs[-n:])


async def _receive_append(stream: Any, dest: Path, offset: int) -> int:
    """Write the stream into dest at offset (truncating there); returns bytes."""
    await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
    fd = await asyncio.to_thread(os.open, dest, os.O_WRONLY | os.O_CREAT, 0o644)
    n = 0
    try:
        await asyncio.to_thread(os.ftruncate, fd, offset)
        pos = offset
        while data := await stream.read(links.CHUNK):
            await asyncio.to_thread(os.pwrite, fd, data, pos)
            pos += len(data)
            n += len(data)
    finally:
        os.close(fd)
    return n
