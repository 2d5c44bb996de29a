"""The target side of a teleport: a session per incoming cnvm, driven by its source.

The source calls these peer-only ops (cnvmd.migration.ops.peer_router; never on the
API socket) with typed messages (cnvmd.migration.wire), and streams data on
``teleport.data`` channels:

    prepare  preflight (CRIU version, CPU flags, free disk/memory, name free),
             session dir + journal, netns (same IP/MAC, pre-locked, links DOWN),
             which image blobs are missing; the rootfs if none is
    image    register the image from the shipped blobs, mount the overlay rootfs
    data     upper-dir tar streams (round 0 and final delta), CRIU images, log, blobs
    pages    (stop-copy, pre-copy) a `criu page-server`; the source's dump streams in
    restore  config.json built here from the cnvm's spec, links up but the host
             veth down, (postcopy) lazy-pages daemon + relay to the source,
             `runc restore`, kept frozen: the copy is *fenced* (unreachable, silent)
    confirm  the switchover: record, veth up, window probes + RTO nudge, thaw,
             GARP; the target owns the cnvm (an abort, the fence deadline or a
             restart before it kills the fenced copy: cnvmd.migration.outcome)
    commit   keep the teleport history; forget the session
    abort    unwind the session (also on lease expiry: a source that vanished never
             leaves a half-made cnvm behind)

Only the member that prepared a session may act on it. Every path is derived from
this node's state dir and validated ids. Each side effect pushes its undo
(`TargetUndo`) onto the session's stack and journal, so an abort, a lease expiry and
a restarted daemon (cnvmd.migration.recovery) unwind the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnvmd import bundle, criu, events, netlink, proc
from cnvmd.migration import criuimg, journal, netmove, outcome, tcprepair, treesync, wire
from cnvmd.migration import link as links
from cnvmd.migration.lazyrelay import PrefetchRelay
from cnvmd.migration.policy import Mode
from cnvmd.migration.report import RESTORE_STAGES, criu_stages, keep_logs, save_reports
from cnvmd.migration.undo import UndoStack
from cnvmd.peers.streams import TcpRelay
from cnvmd.peers.transport import release_memory
from cnvmd.runtime import Runc, RuncError, _umount_under, start_log_shim
from cnvmd.services import LIFECYCLE, PEERS
from proto.messages import ErrorCode, ProtoError

if TYPE_CHECKING:
    from cnvmd.lifecycle import Lifecycle

log = logging.getLogger("cnvmd.teleport")

RESTORE_TIMEOUT = 30.0
PAGE_SERVER_WAIT = 20.0


class TEffect(enum.StrEnum):
    """Side effects of a target session, each undone by `TargetUndo`."""

    SESSION_DIR = "session_dir"
    NETNS = "netns"
    BUNDLE = "bundle"
    HELPERS = "helpers"  # criu page-server / lazy-pages processes, relays
    RESTORED = "restored"  # runc restore ran: a container may exist
    RECORD = "record"


class TStep(enum.StrEnum):
    """Target milestones a fault hook (``fail_at: target:<step>``) may fail after."""

    CONFIG = "config"
    LINKS_UP = "links_up"
    LAZY = "lazy"
    FENCED = "fenced"  # restored, frozen and cut off: a fault here unwinds it too


TARGET_FAULT_POINTS = (str(TStep.CONFIG), str(TStep.LINKS_UP), str(TStep.LAZY),
                       str(TStep.FENCED))
HOLD_REPLY = "hold_reply"
"""Test hook (``fail_at: target:hold_reply``): the restore answer waits this long after
the fenced restore, so that a test can cut the underlay with the request taken and the
answer not yet sent."""
HOLD_REPLY_SECONDS = 5.0


def _arriving_cgroup(cg: str | None, root: str, name: str) -> str | None:
    """The source's cgroup for the tasks of `name`, if it is one cnvmd makes:
    `<cgroup_root>/<node>/<name>` with this node's cgroup_root (the same on every member);
    anything else is refused, so no other cgroup can be named from the wire."""
    if cg is None:
        return None
    m = re.fullmatch(re.escape(root.rstrip("/")) + r"/([A-Za-z0-9_.-]{1,63})/" + re.escape(name),
                     cg)
    if m is None or m.group(1).startswith("."):
        raise _err(ErrorCode.INVALID_ARGUMENT, f"prepare.cgroup {cg[:80]!r} is not "
                   f"{root}/<node>/{name}")
    return cg


def _err(code: ErrorCode, msg: str) -> ProtoError:
    return ProtoError(code, msg)


@dataclass
class Session:
    sid: str
    name: str
    source: str
    mode: Mode
    dir: Path
    lease: float
    net: netmove.NetInfo
    spec: wire.CnvmSpec
    image: wire.ImageRef
    j: journal.TargetJournal
    stack: UndoStack
    status: wire.TargetStatus = wire.TargetStatus.PREPARED
    netns_path: str = ""
    page_server: asyncio.subprocess.Process | None = None
    page_log: Path | None = None
    lazy: asyncio.subprocess.Process | None = None
    relay: TcpRelay | PrefetchRelay | None = None
    last_seen: float = field(default_factory=time.monotonic)
    busy: int = 0
    watchdog: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wire_bytes: int = 0
    fence_deadline: float | None = None  # monotonic: a fenced copy is killed then
    neighbors: list[dict[str, str]] = field(default_factory=list)
    pid: int = 0
    cgroup: str | None = None  # where the tasks are on the source (Prepare.cgroup)

    @property
    def images(self) -> Path:
        return self.dir / "images"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    def touch(self) -> None:
        self.last_seen = time.monotonic()


class TargetUndo:
    """Undo of each target effect from journal data only (live and after a restart)."""

    def __init__(self, side: TargetSide, name: str, sdir: Path,
                 session: Session | None = None) -> None:
        self.side = side
        self.name = name
        self.dir = sdir
        self.s = session

    def undo(self, effect: str) -> Any:
        return {TEffect.SESSION_DIR: self.session_dir, TEffect.NETNS: self.netns,
                TEffect.BUNDLE: self.bundle, TEffect.HELPERS: self.helpers,
                TEffect.RESTORED: self.restored, TEffect.RECORD: self.record}[TEffect(effect)]

    async def session_dir(self) -> None:
        await self.side.keep_session_logs(self.name, self.dir)
        await asyncio.to_thread(_umount_under, self.dir)
        await asyncio.to_thread(shutil.rmtree, self.dir, True)

    async def netns(self) -> None:
        await netmove.plumbing(self.side.daemon).destroy(self.name)

    async def bundle(self) -> None:
        await self.side.life.drop_bundle(self.name)

    async def helpers(self) -> None:
        if self.s is not None:
            await self.side.stop_helpers(self.s)
        else:
            await asyncio.to_thread(kill_criu_helpers, self.dir)

    async def restored(self) -> None:
        """A restored copy must never talk: cut its link, then remove the container
        (its TCP sockets go silently: no RST reaches the client)."""
        with contextlib.suppress(Exception):
            await netmove.isolate(netmove.plumbing(self.side.daemon).host_veth(self.name))
        with contextlib.suppress(RuncError):
            await self.side.runc.destroy(self.name)

    async def record(self) -> None:
        await self.side.life.forget_record(self.name, teleport_sid=self.dir.name)


class TargetSide:
    """All incoming teleports of this node."""

    def __init__(self, daemon: Any, criu_bin: str, criu_lazy: str) -> None:
        self.daemon = daemon
        cfg = daemon.config
        self.node: str = cfg.node_name
        self.base = Path(cfg.state_dir) / "teleport" / "in"
        self.criu = criu_bin
        self.criu_lazy = criu_lazy
        self.runc = Runc(cfg.runc_root, cfg.runc, self.criu)
        self.sessions: dict[str, Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def life(self) -> Lifecycle:
        life: Lifecycle = self.daemon.services.require(LIFECYCLE)
        return life

    def get(self, sid: str, caller: str | None) -> Session:
        """The session `sid` of member `caller` (another member's is not found)."""
        s = self.sessions.get(sid)
        if s is None or (caller is not None and s.source != caller):
            raise _err(ErrorCode.NOT_FOUND, f"{self.node}: no teleport session {sid}")
        s.touch()
        return s

    async def _journal(self, s: Session, effects: list[str] | None = None) -> None:
        if effects is not None:
            s.j.effects = effects
        s.j.phase = str(s.status)
        if TEffect.SESSION_DIR in s.stack or s.status is not wire.TargetStatus.ABORTED:
            await asyncio.to_thread(journal.save, s.dir, s.j)

    async def keep_session_logs(self, name: str, sdir: Path) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(keep_logs, sdir, self.daemon.config.state_dir, name,
                                    "target")

    # ---- prepare

    async def prepare(self, msg: wire.Prepare, caller: str) -> wire.PrepareReply:
        name = msg.spec.name
        life = self.life
        if msg.sid in self.sessions or await asyncio.to_thread((self.base / msg.sid).exists):
            raise _err(ErrorCode.CONFLICT, f"{self.node}: session {msg.sid} exists")
        if any(s.name == name for s in self.sessions.values()):
            raise _err(ErrorCode.BUSY, f"{self.node}: a teleport of {name} is already arriving")
        if await life.record(name) is not None or await self.runc.state(name) is not None:
            raise _err(ErrorCode.ALREADY_EXISTS, f"a cnvm named {name!r} already exists on "
                       f"{self.node}")
        paths = life.paths(name)
        if await asyncio.to_thread(paths.dir.exists):
            raise _err(ErrorCode.CONFLICT, f"{self.node}: leftover bundle of {name} exists")
        caps = await self.preflight(msg, caller)
        sdir = self.base / msg.sid
        j = journal.TargetJournal(sid=msg.sid, name=name, source=caller, lease=msg.lease)
        s = Session(sid=msg.sid, name=name, source=caller, mode=msg.mode, dir=sdir,
                    lease=msg.lease, net=msg.net, spec=msg.spec, image=msg.image, j=j,
                    stack=UndoStack(), cgroup=_arriving_cgroup(
                        msg.cgroup, self.daemon.config.cgroup_root, name))
        s.stack = UndoStack(lambda eff: self._journal(s, eff))
        u = TargetUndo(self, name, sdir, s)
        self.sessions[msg.sid] = s
        try:
            await asyncio.to_thread(_mkdirs, self.base)
            await asyncio.to_thread(os.mkdir, sdir, 0o700)
            await s.stack.push(TEffect.SESSION_DIR, u.session_dir)
            await asyncio.to_thread(_mkdirs, s.images, s.work)
            s.watchdog = asyncio.create_task(self._watch(s))
            await s.stack.push(TEffect.NETNS, u.netns)
            s.netns_path = await netmove.plumbing(self.daemon).create(name, s.net)
            missing = await asyncio.to_thread(life.images.missing_blobs, s.image.blobs)
            if not missing:
                await self._image(s)
        except BaseException:
            await asyncio.shield(self._unwind(s, "prepare failed"))
            raise
        return wire.PrepareReply(missing_blobs=tuple(missing), caps=caps)

    async def preflight(self, msg: wire.Prepare, source: str) -> dict[str, Any]:
        """Refuse early what would fail later: CRIU, CPU, memory, disk."""
        caps = criu.live_caps(self.daemon.caps, self.daemon.caps_error)
        if "error" in caps:
            raise _err(ErrorCode.UNAVAILABLE, f"{self.node}: CRIU unusable: {caps['error']}")
        mine = criu.parse_version(f"Version: {caps.get('criu_version', '0')}") or (0,)
        theirs = criu.parse_version(f"Version: {msg.criu_version}") or (0,)
        if mine < theirs:
            raise _err(ErrorCode.FAILED, f"{self.node} has CRIU {caps.get('criu_version')}, "
                       f"older than the source's {msg.criu_version}: images may not "
                       "restore; upgrade CRIU on the target")
        if not caps.get("tcp_repair"):
            raise _err(ErrorCode.FAILED, f"{self.node}: CRIU cannot restore TCP connections")
        missing = sorted(set(msg.cpu_flags) - set(await asyncio.to_thread(criu.cpu_flags)))
        if msg.cpu_flags and missing:
            raise _err(ErrorCode.FAILED, f"{self.node}'s CPU lacks flags the cnvm may use "
                       f"(from {source}): {' '.join(missing[:12])}")
        avail = await asyncio.to_thread(_mem_available)
        if msg.memory and avail and avail < msg.memory + (64 << 20):
            raise _err(ErrorCode.FAILED, f"{self.node}: not enough free memory "
                       f"({avail >> 20} MiB available, the cnvm uses {msg.memory >> 20} MiB)")
        await asyncio.to_thread(_mkdirs, self.base)
        st = await asyncio.to_thread(os.statvfs, self.base)
        free = st.f_bavail * st.f_frsize
        if free < msg.disk + (64 << 20):
            raise _err(ErrorCode.FAILED, f"{self.node}: not enough free disk "
                       f"({free >> 20} MiB free, {msg.disk >> 20} MiB needed)")
        return caps

    async def image(self, sid: str, caller: str) -> dict[str, Any]:
        s = self.get(sid, caller)
        await self._image(s)
        return {"ok": True}

    async def _image(self, s: Session) -> None:
        store = self.life.images
        try:
            img = store.resolve(s.image.id)
        except ProtoError:
            img = await store.register(s.image.manifest, s.image.name)
        if img.id != s.image.id:
            raise _err(ErrorCode.INVALID_ARGUMENT, f"{self.node}: the shipped image is "
                       f"{img.id[:12]}, not the announced {s.image.id[:12]}")
        if TEffect.BUNDLE in s.stack:
            return
        await s.stack.push(TEffect.BUNDLE, TargetUndo(self, s.name, s.dir, s).bundle)
        await self.life.mount_arriving(s.name, img.id)
        # config.json now, while the source still runs, not in the frozen window.
        # CRIU puts the tasks back into the cgroup they were dumped from (on cgroup v2
        # runc's cgroup-root remap does not apply): runc must track that same cgroup, or
        # its pause and the next teleport's freeze miss the tasks. So the cgroup the
        # tasks are in on the source (which, after an earlier hop, is not the source's
        # own per-node path: a cnvm that came lv2 -> lv1 -> lv2 lived in lv1's path on
        # lv2, so runc tracked an empty cgroup and the next pre-dump could not seize it —
        # found by the VM lane), except where that cgroup exists here (lab nodes sharing
        # one host's cgroups): there each copy needs its own, this node's per-node path.
        src_cg = s.cgroup or bundle.cgroups_path(s.source, s.name,
                                                 self.daemon.config.cgroup_root)
        cg = None if await asyncio.to_thread(_cgroup_exists, src_cg) else src_cg
        life = self.life
        await life.write_restore_config(s.name, _record_of(s, self.node, life.paths(s.name)),
                                        netns_path=s.netns_path, cgroups_path=cg)

    # ---- data streams

    async def serve_data(self, stream: Any, hdr: wire.DataHeader, caller: str) -> None:
        if hdr.what is wire.DataKind.PAGES:
            raise _err(ErrorCode.INVALID_ARGUMENT, "pages are served by the source side")
        s = self.get(hdr.sid, caller)
        if s.status is not wire.TargetStatus.PREPARED:
            raise _err(ErrorCode.CONFLICT, f"{self.node}: session {s.sid} is {s.status}")
        s.busy += 1
        try:
            await stream.write_frame({"ok": True})
            n = 0
            paths = self.life.paths(s.name)
            if hdr.what in (wire.DataKind.UPPER, wire.DataKind.IMAGES):
                dst = paths.upper if hdr.what is wire.DataKind.UPPER else s.images
                un: treesync.Unpacker | ImagesUnpacker = await (
                    treesync.Unpacker.start(dst) if hdr.what is wire.DataKind.UPPER
                    else ImagesUnpacker.start(dst))
                try:
                    while data := await stream.read(links.CHUNK):
                        await un.feed(data)
                    await un.finish()
                except BaseException:
                    un.abort()
                    raise
                n = un.bytes
            elif hdr.what is wire.DataKind.LOG:
                n = await _receive_append(stream, paths.console_log, hdr.offset)
            else:  # BLOB, digest checked by the store
                assert hdr.digest is not None
                tmp = s.dir / "blob.part"
                n = await _receive_append(stream, tmp, 0)
                await self.life.images.add_blob(tmp, hdr.digest)
                await asyncio.to_thread(tmp.unlink)
            s.wire_bytes += n
            await stream.write_frame({"ok": True, "bytes": n})
        except ProtoError as exc:
            with contextlib.suppress(Exception):
                await stream.write_frame({"ok": False, "error": exc.to_wire()})
        except Exception as exc:
            with contextlib.suppress(Exception):
                await stream.write_frame({"ok": False, "error": {
                    "code": "failed", "message": f"{self.node}: {hdr.what}: {exc}"}})
        finally:
            s.busy -= 1
            s.touch()
            stream.write_eof()

    # ---- pages (stop-copy, pre-copy)

    async def pages(self, msg: wire.Pages, caller: str) -> dict[str, Any]:
        """Start a page server for the final dump, or for pre-dump round `msg.round`.

        `msg.parent` is the previous pre-dump: the page server links it as ``parent``
        in its images dir (``--prev-images-dir``) so that it answers the dumper's "has
        parent" and the restore finds the pages that this round skipped.
        """
        s = self.get(msg.sid, caller)
        images = s.images if msg.round is None else s.dir / f"round-{msg.round}"
        await asyncio.to_thread(_mkdirs, images)
        if s.page_server is not None and s.page_server.returncode is None:
            # The previous round's server exits once its dumper hung up (a failed
            # pre-dump's may linger): a moment, then it goes.
            try:
                await asyncio.wait_for(s.page_server.wait(), 5)
            except TimeoutError:
                proc.kill_group(s.page_server.pid)
                await s.page_server.wait()
        parent = None if msg.parent is None else f"round-{msg.parent}"
        if parent is not None and not await asyncio.to_thread((s.dir / parent).is_dir):
            raise _err(ErrorCode.FAILED, f"{self.node}: no pre-dump {parent} to build on")
        if TEffect.HELPERS not in s.stack:
            await s.stack.push(TEffect.HELPERS, TargetUndo(self, s.name, s.dir, s).helpers)
        port = links.free_port()
        logname = f"page-server{'' if msg.round is None else f'-{msg.round}'}.log"
        argv = [self.criu, "page-server", "--images-dir", str(images), "--address",
                "127.0.0.1", "--port", str(port), "--work-dir", str(s.work),
                "--log-file", logname, "-v2"]
        if parent is not None:
            argv += ["--prev-images-dir", f"../{parent}"]
        s.page_log = s.work / logname
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

    async def pagemaps(self, msg: wire.Pagemaps, caller: str) -> dict[str, Any]:
        """The pagemap images of pre-dump round `msg.round` (small: one entry per run of
        pages). A hybrid source needs them: its lazy dump decides per page "in the
        parent" from its local parent images, whose pages stay here."""
        s = self.get(msg.sid, caller)
        d = s.dir / f"round-{msg.round}"
        if s.page_server is not None and s.page_server.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.page_server.wait(), PAGE_SERVER_WAIT)

        def read() -> dict[str, bytes]:
            return {p.name: p.read_bytes() for p in d.glob("pagemap-*.img")
                    if wire.PAGEMAP_RE.fullmatch(p.name) and not p.is_symlink()}

        files = await asyncio.to_thread(read)
        if not files:
            raise _err(ErrorCode.NOT_FOUND, f"{self.node}: no pagemaps in {d.name}")
        return {"files": files}

    # ---- restore: the switchover

    async def restore(self, msg: wire.Restore, caller: str) -> dict[str, Any]:
        s = self.get(msg.sid, caller)
        async with s.lock:
            if s.status is not wire.TargetStatus.PREPARED:
                raise _err(ErrorCode.CONFLICT, f"{self.node}: session {s.sid} is {s.status}")
            s.status = wire.TargetStatus.RESTORING
            s.busy += 1
            try:
                return await self._restore(s, msg)
            except BaseException:
                if s.status is wire.TargetStatus.RESTORING:
                    s.status = wire.TargetStatus.PREPARED  # the source decides: abort
                raise
            finally:
                s.busy -= 1
                s.touch()

    async def _restore(self, s: Session, msg: wire.Restore) -> dict[str, Any]:
        t0 = time.monotonic()
        life = self.life
        paths = life.paths(s.name)
        fault = msg.fail_at if self.daemon.config.fault_injection else None
        s.stack.fail_at = fault
        timings: dict[str, float] = {}
        steps: list[dict[str, Any]] = []

        def mark(step: str, t: float, clock: str = "cnvmd") -> None:
            steps.append({"step": step, "start_ms": round((t - t0) * 1000, 2),
                          "ms": round((time.monotonic() - t) * 1000, 2), "clock": clock})

        log.info("teleport %s: restoring %s from %s", s.sid, s.name, s.source)
        if TEffect.BUNDLE not in s.stack:
            raise _err(ErrorCode.CONFLICT, f"{self.node}: session {s.sid} has no image yet")
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
            mark("wait for the page server to finish", t0)
        s.stack.done(TStep.CONFIG)
        if msg.fail_restore and self.daemon.config.fault_injection:
            await asyncio.to_thread(_break_images, s.images)  # a real broken image set
        net = netmove.plumbing(self.daemon)

        async def network() -> None:
            t = time.monotonic()
            await self._lock_as_dumped(s)
            mark("network lock as the dump made it", t)
            t = time.monotonic()
            await net.bring_up(s.name, s.net)
            if msg.vteps:
                mine = await asyncio.to_thread(_own_addresses)
                try:
                    await netmove.learn_vteps({m: d for m, d in msg.vteps if d not in mine})
                except Exception as exc:
                    log.warning("teleport %s: cannot learn neighbour VTEPs: %s", s.sid, exc)
            s.neighbors = [n.to_wire() for n in msg.neighbors]
            # The fence: the host end of the veth stays down until the source confirms,
            # so the restored copy can neither be reached nor send (its window probes
            # are lost; new ones are sent when it is unfenced).
            await netmove.isolate(net.host_veth(s.name))
            mark("links up (fenced: host veth down), VTEPs", t)
            s.stack.done(TStep.LINKS_UP)

        async def lazy_daemon() -> None:
            t = time.monotonic()
            link = links.PeerLink(self.daemon.services.require(PEERS), s.source)
            # the prefetch holds until the cnvm runs here (released in `confirm`)
            s.relay = await links.stream_relay(
                link, wire.DataHeader(s.sid, wire.DataKind.PAGES).to_wire(), s.images,
                hold=True)
            lazy_dir = s.dir / "lazy"
            await asyncio.to_thread(_mkdirs, lazy_dir)
            argv = [self.criu_lazy, "lazy-pages", "--page-server", "--address", "127.0.0.1",
                    "--port", str(s.relay.port), "--images-dir", str(s.images),
                    "--work-dir", str(lazy_dir), "--log-file", "lazy-pages.log", "-v2"]
            s.lazy = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
            sock = lazy_dir / "lazy-pages.socket"
            for _ in range(2500):  # 1 ms steps: the restore waits for this (frozen window)
                if await asyncio.to_thread(sock.exists) or s.lazy.returncode is not None:
                    break
                await asyncio.sleep(0.001)
            if s.lazy.returncode is not None:
                raise _err(ErrorCode.FAILED, f"{self.node}: criu lazy-pages exited: "
                           + _tail(lazy_dir / "lazy-pages.log"))
            timings["lazy_daemon"] = time.monotonic() - t0
            mark("start the lazy-pages daemon", t)
            s.stack.done(TStep.LAZY)

        # The network handover and the lazy-pages daemon (its relay channel, a CRIU
        # start) do not depend on each other: both run at once in the frozen window.
        work = s.work
        if msg.lazy:
            if TEffect.HELPERS not in s.stack:
                await s.stack.push(TEffect.HELPERS, TargetUndo(self, s.name, s.dir, s).helpers)
            work = s.dir / "lazy"
            got = await asyncio.gather(network(), lazy_daemon(), return_exceptions=True)
            for res in got:
                if isinstance(res, BaseException):
                    raise res
        else:
            await network()
        pipe = await start_log_shim(paths.console_log)
        t_r = time.monotonic()
        await s.stack.push(TEffect.RESTORED, TargetUndo(self, s.name, s.dir, s).restored)
        try:
            st = await self.runc.restore(s.name, paths.dir, s.images, work_dir=work,
                                         stdio=pipe.write_fd, tcp_established=True,
                                         lazy_pages=msg.lazy, timeout=RESTORE_TIMEOUT,
                                         oom_score_adj=self.daemon.config.cnvm_oom_score_adj)
        except RuncError as exc:
            raise _err(ErrorCode.FAILED, f"restore on {self.node} failed: {exc}") from None
        finally:
            pipe.close()
        timings["runc_restore"] = time.monotonic() - t_r
        mark("runc restore", t_r)
        if st.status != "paused":  # dumped from a frozen cgroup: restored frozen
            t = time.monotonic()
            if not await self.runc.freeze(s.name):
                await self.runc.pause(s.name)
            mark("freeze (fence)", t)
        s.stack.done(TStep.FENCED)
        # Fenced: frozen and cut off. Only `confirm` (the source let go) runs it; an
        # abort, the fence deadline or a restart kills it (cnvmd.migration.outcome).
        s.pid = st.pid
        s.status = wire.TargetStatus.FENCED
        s.fence_deadline = time.monotonic() + s.lease * outcome.FENCE_SHARE
        await self._journal(s)
        timings["answered"] = time.monotonic() - t0
        log.info("teleport %s: %s restored here, fenced until the source confirms", s.sid,
                 s.name)
        text = await asyncio.to_thread(_read, work / "restore.log")
        for x in criu_stages(text or "", RESTORE_STAGES, "target", (t_r - t0) * 1000):
            steps.append({"step": x.step, "start_ms": x.start_ms, "ms": x.ms, "clock": x.clock})
        if fault == HOLD_REPLY:  # test hook: the fault tests cut the underlay meanwhile
            await asyncio.sleep(HOLD_REPLY_SECONDS)
        return {"status": str(s.status), "pid": st.pid, "node": self.node,
                "timings": timings, "timeline": steps}

    # ---- confirm: the decision point of the switchover

    async def confirm(self, sid: str, caller: str) -> dict[str, Any]:
        """The source let go: run the fenced copy. Idempotent; a session that is gone
        (aborted, expired, restarted) answers ``unknown``: no copy runs here."""
        s = self.sessions.get(sid)
        if s is None or s.source != caller:
            return {"status": str(await self.status(sid, caller))}
        s.touch()
        async with s.lock:
            if s.status is not wire.TargetStatus.FENCED:
                return {"status": str(s.status)}
            t0 = time.monotonic()
            life = self.life
            await s.stack.push(TEffect.RECORD, TargetUndo(self, s.name, s.dir, s).record)
            await life.save_record(s.name, _record_of(s, self.node, life.paths(s.name)))
            # The switchover: journaled before the copy may talk; nothing is undone any more.
            s.status = wire.TargetStatus.RESTORED
            s.stack.forget()
            await self._journal(s, [])
            log.info("teleport %s: switchover: %s runs here", s.sid, s.name)
        steps: list[dict[str, Any]] = []
        try:
            await self._unfence(s, t0, steps)
        finally:  # the cnvm runs: prefetch its pages now (held until here: lazyrelay)
            if isinstance(s.relay, PrefetchRelay):
                s.relay.release()
        return {"status": str(s.status), "timeline": steps}

    async def _unfence(self, s: Session, t0: float, steps: list[dict[str, Any]]) -> None:
        """Veth up, neighbours back, window probes (repair off on every socket) that
        the capture reads to nudge backed-off clients, thaw, then ARP."""

        def mark(step: str, t: float) -> None:
            steps.append({"step": step, "start_ms": round((t - t0) * 1000, 2),
                          "ms": round((time.monotonic() - t) * 1000, 2), "clock": "cnvmd"})

        net = netmove.plumbing(self.daemon)
        t = time.monotonic()
        cap = None
        try:
            await netmove.reconnect(net.host_veth(s.name))
            if s.neighbors:
                with contextlib.suppress(Exception):
                    await netmove.add_neighbors(s.netns_path, s.neighbors)
            mark("unfence: veth up, neighbours", t)
            t = time.monotonic()
            # opened on the link up (bound while down it only reports ENETDOWN),
            # before the probes it is to catch
            cap = await asyncio.to_thread(_capture, net.host_veth(s.name), s.net.ip)
            pids = await asyncio.to_thread(tcprepair.pids_in_netns, s.netns_path)
            await asyncio.to_thread(tcprepair.repair_off, pids)  # a window probe each
            mark("window probes (repair off)", t)
            t = time.monotonic()
            if not await self.runc.thaw(s.name):  # no freezer path known: ask runc
                st = await self.runc.state(s.name)
                if st is not None and st.status == "paused":
                    await self.runc.resume(s.name)
            mark("thaw", t)
        except Exception as exc:
            log.error("teleport %s: unfencing %s: %s", s.sid, s.name, exc)
        if cap is not None:  # clients in RTO backoff retransmit now, not in a second
            t = time.monotonic()
            await asyncio.sleep(0.005)
            try:
                acks = await asyncio.to_thread(cap.acks)
                n = await asyncio.to_thread(tcprepair.nudge, s.netns_path, s.net.ip, acks)
                mark(f"RTO nudge ({n} connection{'s' if n != 1 else ''})", t)
            except OSError as exc:  # the cnvm runs here whatever the nudge does
                log.warning("teleport %s: no RTO nudge: %s", s.sid, exc)
        # ARP after the probes: their first packets already taught the overlay.
        self._spawn(self._announce(s, net, [n["ip"] for n in s.neighbors if "ip" in n]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self, s: Session, net: Any, neighbours: list[str]) -> None:
        """Teach the cnvm its neighbours and send a gratuitous ARP (best effort)."""
        with contextlib.suppress(Exception):
            await netmove.teach(s.netns_path, neighbours)
        with contextlib.suppress(Exception):
            await net.announce(s.name, s.net)

    # ---- commit / abort / status

    async def commit(self, msg: wire.Commit, caller: str) -> dict[str, Any]:
        s = self.get(msg.sid, caller)
        if s.status not in (wire.TargetStatus.RESTORED, wire.TargetStatus.COMMITTED):
            raise _err(ErrorCode.CONFLICT, f"{self.node}: session {s.sid} is {s.status}")
        s.status = wire.TargetStatus.COMMITTED
        if isinstance(s.relay, PrefetchRelay):  # released at the confirm already
            s.relay.release()
        lazy_ok = None
        if s.lazy is not None:
            try:
                await asyncio.wait_for(s.lazy.wait(), 60)
                lazy_ok = s.lazy.returncode == 0
            except TimeoutError:
                lazy_ok = False
        if s.relay is not None:  # its byte counts are final once its connections end
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.relay.wait_idle(), 10)
        relay = s.relay.bytes_up + s.relay.bytes_down if s.relay else 0
        if msg.reports:  # the last one is this teleport's: with the pages fetched since
            await asyncio.to_thread(save_reports, self.daemon.state, s.name,
                                    with_lazy_pages(list(msg.reports), relay))
        events.emit(self.daemon, "teleport", "arrived", s.name, source=s.source, sid=s.sid)
        await self._forget(s)
        return {"ok": True, "lazy_ok": lazy_ok, "relay_bytes": relay,
                "wire_bytes": s.wire_bytes + relay}

    async def _lock_as_dumped(self, s: Session) -> None:
        """CRIU's restore removes the network lock its dump made, by the method and name
        the dump recorded, and assumes a fresh netns holds it already: without it the
        client's retransmissions meet no socket and get a RST. So the lock goes in
        before the links come up: one nftables table (named by the dump's run id) or,
        for images dumped with iptables, CRIU's chain."""
        try:
            method, run_id = await asyncio.to_thread(criuimg.network_lock, s.images)
        except (OSError, ValueError) as exc:
            raise _err(ErrorCode.FAILED, f"{self.node}: cannot read the dump's inventory: "
                       f"{exc}") from None
        if method == criuimg.LOCK_NFTABLES:
            if run_id is None:
                raise _err(ErrorCode.FAILED, f"{self.node}: the dump locked its network "
                           "with nftables but recorded no valid run id")
            await netlink.prelock_nft(s.netns_path, run_id)
        elif method == criuimg.LOCK_IPTABLES:
            await netlink.prelock(s.netns_path)

    async def status(self, sid: str, caller: str | None) -> wire.TargetStatus:
        s = self.sessions.get(sid)
        if s is not None and (caller is None or s.source == caller):
            s.touch()
            return s.status
        # forgotten (committed, or a restart): a record made by this session says so
        if await self.life.arrived_by(sid) is not None:
            return wire.TargetStatus.RESTORED
        return wire.TargetStatus.UNKNOWN

    async def abort(self, sid: str, caller: str | None,
                    why: str = "aborted by the source") -> wire.TargetStatus:
        """Undo the session; a fenced copy is killed (the source has not let go). A
        confirmed (running) cnvm is never aborted: it is ours."""
        s = self.sessions.get(sid)
        if s is None or (caller is not None and s.source != caller):
            return await self.status(sid, caller)
        async with s.lock:  # never while a restore runs: it ends one way or the other
            if s.status in (wire.TargetStatus.RESTORED, wire.TargetStatus.COMMITTED):
                return s.status
            log.warning("teleport %s of %s from %s aborted on the target: %s", sid, s.name,
                        s.source, why)
            await self._unwind(s, why)
        return wire.TargetStatus.ABORTED

    async def _unwind(self, s: Session, why: str) -> None:
        s.status = wire.TargetStatus.ABORTED
        if s.watchdog is not None and s.watchdog is not asyncio.current_task():
            s.watchdog.cancel()
        steps = await s.stack.unwind()
        self.sessions.pop(s.sid, None)
        log.info("teleport %s: target unwound (%s): %s", s.sid, why, ", ".join(steps))

    async def _watch(self, s: Session) -> None:
        """Abort a session whose source went quiet (vanished, link cut) before restore,
        and kill a fenced copy whose confirm did not come by the fence deadline (the
        source's lease outlasts it: after its lease a source may resume)."""
        while s.status in (wire.TargetStatus.PREPARED, wire.TargetStatus.RESTORING,
                           wire.TargetStatus.FENCED):
            await asyncio.sleep(min(1.0, s.lease / 4))
            if s.status is wire.TargetStatus.FENCED:
                if s.fence_deadline is not None and time.monotonic() > s.fence_deadline:
                    with contextlib.suppress(Exception):
                        await self.abort(s.sid, None, f"no confirm from {s.source} within "
                                         f"{s.lease * outcome.FENCE_SHARE:g}s")
                    return
                continue
            if s.busy or s.status is not wire.TargetStatus.PREPARED:
                continue
            if s.page_server is not None and s.page_server.returncode is None:
                # A pre-dump round streams into it (rounds can outlast the lease on a
                # slow link); if the source dies, its relay drops and the server exits.
                s.touch()
                continue
            if time.monotonic() - s.last_seen > s.lease:
                with contextlib.suppress(Exception):
                    await self.abort(s.sid, None, f"no word from {s.source} for {s.lease:g}s")
                return

    async def stop_helpers(self, s: Session) -> None:
        for p in (s.page_server, s.lazy):
            if p is not None and p.returncode is None:
                proc.kill_group(p.pid)
                with contextlib.suppress(Exception):
                    await p.wait()
        if s.relay is not None:
            await s.relay.close()

    async def _forget(self, s: Session) -> None:
        await self.stop_helpers(s)
        if s.watchdog is not None:
            s.watchdog.cancel()
        await self.keep_session_logs(s.name, s.dir)
        await asyncio.to_thread(_umount_under, s.dir)
        await asyncio.to_thread(shutil.rmtree, s.dir, True)
        self.sessions.pop(s.sid, None)
        await asyncio.to_thread(release_memory)  # the pages went through our buffers

    async def shutdown(self) -> None:
        """Daemon stop: stop watching; what is on disk is resolved by the next start."""
        for s in list(self.sessions.values()):
            if s.watchdog is not None:
                s.watchdog.cancel()
        for task in list(self._tasks):
            task.cancel()


def _capture(ifname: str, ip: str) -> tcprepair.Capture | None:
    try:
        return tcprepair.Capture.open(ifname, ip)
    except OSError as exc:
        log.warning("cannot watch %s for window probes (%s): clients may wait for their "
                    "retransmission timeout", ifname, exc)
        return None


def with_lazy_pages(reports: list[dict[str, Any]], relay: int) -> list[dict[str, Any]]:
    """The history with `relay` lazy-page bytes (fetched after the switchover, which the
    source only learns from commit's answer) added to its last report, as the source
    adds them to its own copy."""
    if not relay or not reports or not isinstance(reports[-1], dict):
        return reports
    last = dict(reports[-1])
    if any(isinstance(x, dict) and x.get("kind") == "lazy" for x in last.get("rounds") or []):
        return reports
    last["wire_bytes"] = int(last.get("wire_bytes") or 0) + relay
    secs = (last.get("phases") or {}).get("pages_after_restore", 0.0)
    last["rounds"] = [*(last.get("rounds") or []),
                      {"kind": "lazy", "bytes": relay, "seconds": secs}]
    return [*reports[:-1], last]


def _record_of(s: Session, node: str, paths: bundle.BundlePaths) -> dict[str, Any]:
    """The cnvm's record here, from its validated spec (nothing else of the source's)."""
    sp = s.spec
    return {"name": sp.name, "runc_id": sp.name, "node": node, "image": sp.image,
            "image_id": sp.image_id, "hostname": sp.hostname, "ip": s.net.ip,
            "mac": s.net.mac, "memory": sp.memory, "cpus": sp.cpus, "env": dict(sp.env),
            "cmd": list(sp.cmd), "security_opt": list(sp.security_opt),
            "restart": sp.restart, "restarts": sp.restarts, "desired": "running",
            "created_at": sp.created_at,
            "started_at": sp.started_at, "bundle": str(paths.dir),
            "log": str(paths.console_log), "netns": s.netns_path,
            "teleported_from": s.source, "teleported_at": time.time(),
            "teleport_sid": s.sid}


def kill_criu_helpers(sdir: Path) -> None:
    """Kill page-server / lazy-pages processes whose argv names this session dir."""
    for pid in proc.pids_with_arg(str(sdir).encode(), any_of=(b"page-server", b"lazy-pages")):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


# --------------------------------------------------------------------------- helpers


IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PARENT_LINK_RE = re.compile(r"\.\./round-[0-9]{1,5}")
MAX_IMAGE_FILE = 64 << 30


class ImagesUnpacker:
    """CRIU's image files from a tar stream, into the session's images dir only.

    Why not `tar -x`: a peer's archive is input. Only regular files with plain names
    at the top level are taken (no directory, device or path; one link: `parent` to a
    sibling pre-dump round, what CRIU's --parent-path makes), each opened
    beneath the images dir with O_NOFOLLOW, so nothing a stream sent (a symlink in an
    earlier one, say) can make a later write land elsewhere. Not incremental either:
    the page server has already written the pages into the same dir."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.bytes = 0
        rfd, self._w = os.pipe()
        self._r = os.fdopen(rfd, "rb", buffering=1 << 20)
        self._job = asyncio.get_running_loop().run_in_executor(None, self._extract)

    @classmethod
    async def start(cls, dst: Path) -> ImagesUnpacker:
        await asyncio.to_thread(dst.mkdir, parents=True, exist_ok=True)
        return cls(dst)

    def _extract(self) -> None:
        import tarfile

        dfd = os.open(self.dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            with tarfile.open(fileobj=self._r, mode="r|") as tar:
                for m in tar:
                    name = m.name.removeprefix("./")
                    if m.isdir() and name in ("", "."):
                        continue
                    if m.issym() and name == "parent":
                        # a dump on top of pre-dump round K links its parent images;
                        # only that exact sibling link is taken (CRIU follows it)
                        if not PARENT_LINK_RE.fullmatch(m.linkname):
                            raise wire.bad("images", f"has a bad parent link "
                                           f"{m.linkname[:80]!r}")
                        with contextlib.suppress(FileExistsError):
                            os.symlink(m.linkname, "parent", dir_fd=dfd)
                        continue
                    if not m.isfile() or not IMAGE_NAME_RE.fullmatch(name) \
                            or m.size > MAX_IMAGE_FILE:
                        raise wire.bad("images", f"may hold only plain image files, not "
                                       f"{m.name[:80]!r}")
                    src = tar.extractfile(m)
                    assert src is not None
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                                 0o600, dir_fd=dfd)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        finally:
            os.close(dfd)
            for _ in iter(lambda: self._r.read(1 << 20), b""):  # drain: never block feed
                pass
            self._r.close()

    async def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        try:
            await asyncio.to_thread(_write_all, self._w, data)
        except BrokenPipeError:
            await self._job  # the reader gave up: its error says why

    async def finish(self) -> None:
        os.close(self._w)
        self._w = -1
        try:
            await self._job
        except ProtoError:
            raise
        except Exception as exc:
            raise wire.bad("images", f"is not a valid tar stream: {exc}") from None

    def abort(self) -> None:
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        self._job.add_done_callback(lambda f: f.cancelled() or f.exception())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _mkdirs(*dirs: Path) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)


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


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _tail(path: Path, n: int = 4) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errs = [ln for ln in lines if "Error" in ln] or lines
    return " | ".join(errs[-n:])


async def _receive_append(stream: Any, dest: Path, offset: int) -> int:
    """Write the stream into dest at offset (truncating there); returns bytes. The
    offset may not lie past the file's end (no sparse giant from a bad offset), and
    dest is never followed if it is a symlink."""
    await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
    fd = await asyncio.to_thread(os.open, dest, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW,
                                 0o644)
    n = 0
    try:
        size = (await asyncio.to_thread(os.fstat, fd)).st_size
        if offset > size:
            raise _err(ErrorCode.INVALID_ARGUMENT, f"offset {offset} is past the end of "
                       f"{dest.name} ({size} bytes)")
        await asyncio.to_thread(os.ftruncate, fd, offset)
        pos = offset
        while data := await stream.read(links.CHUNK):
            await asyncio.to_thread(os.pwrite, fd, data, pos)
            pos += len(data)
            n += len(data)
    finally:
        os.close(fd)
    return n
