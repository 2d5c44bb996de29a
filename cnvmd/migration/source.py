"""The source side of a teleport: it drives the whole move and owns the rollback.

An explicit state machine. Phases (`Phase`, reported as ``progress`` events):

    preflight  refuse what cannot work (own node, unknown node, stopped cnvm, no IP)
    prepare    target: preflight, netns (same IP/MAC, pre-locked, links down)
    layers     image blobs the target lacks, by digest
    upper      overlay upper dir, level-0 tar while the cnvm runs (+ console log)
    precopy    (precopy/hybrid, needs soft-dirty) pre-dump rounds until converged
    freeze     the cnvm stops: paused (cgroup frozen), veth down, then CRIU dumps
               (stop-copy: pages streamed into the target's page server; postcopy:
               all but the pages, which CRIU then serves on demand), final upper
               delta, CRIU images, log tail
    restore    the target restores it *fenced* (frozen, host veth down); from here the
               cnvm stays frozen here until the outcome is known (cnvmd.migration.outcome)
    confirm    the target said "fenced": the source lets go; the target runs it
    switched   the switchover: the target owns the cnvm (one logged transition)
    commit     forward cleanup only: container, netns, bundle, record go; history moves

Each side effect pushes its undo onto an `UndoStack` as it is made (and onto the
session journal first, so a restarted daemon can finish the job:
cnvmd.migration.recovery). Until the switchover any failure or cancel unwinds the
stack: CRIU stopped while the cgroup stays frozen, network unlocked, veth up,
neighbours back, TCP sockets out of repair mode, cgroup thawed, target aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnvmd import criu, events, netlink, proc
from cnvmd.migration import journal, netmove, outcome, precopy, tcprepair, treesync, wire
from cnvmd.migration import link as links
from cnvmd.migration.policy import Convergence, Decision, Mode, ModeUnavailable, choose_mode
from cnvmd.migration.report import (
    DUMP_STAGES,
    RoundReport,
    Step,
    TeleportReport,
    criu_stages,
    keep_logs,
    load_reports,
    save_reports,
)
from cnvmd.migration.undo import UndoStack
from cnvmd.peers.transport import release_memory
from cnvmd.runtime import Runc, RuncError, _umount_under
from cnvmd.services import LIFECYCLE, PEERS
from proto.messages import ErrorCode, ProtoError

if TYPE_CHECKING:
    from cnvmd.lifecycle import Lifecycle

log = logging.getLogger("cnvmd.teleport")

Emit = Callable[[str, dict[str, Any]], None]
PREDUMP_ATTEMPTS = 3  # per pre-copy round: a pre-dump can lose a race with exiting tasks


class Phase(enum.StrEnum):
    PREFLIGHT = "preflight"
    PREPARE = "prepare"
    LAYERS = "layers"
    UPPER = "upper"
    PRECOPY = "precopy"
    FREEZE = "freeze"
    RESTORE = "restore"
    CONFIRM = "confirm"
    SWITCHED = "switched"
    COMMIT = "commit"
    DONE = "done"
    ROLLED_BACK = "rolled_back"


class Effect(enum.StrEnum):
    """Side effects of the source, each with its undo (see `SourceUndo`)."""

    TARGET_PREPARED = "target_prepared"
    PREDUMPING = "predumping"  # pre-copy rounds: a killed pre-dump can leave it frozen
    PAUSED = "paused"
    ISOLATED = "isolated"
    CRIU = "criu"


class Milestone(enum.StrEnum):
    """Milestones without an undo of their own; fault hooks may fail right after them."""

    UPPER_SENT = "upper_sent"
    PAGE_RELAY = "page_relay"
    DUMPED = "dumped"
    IMAGES_SENT = "images_sent"


FAULT_POINTS = tuple(str(x) for x in (*Effect, *Milestone))
LOSS_POINTS = ("restore_reply_lost", "confirm_reply_lost")
"""Test hooks: the target acts on the request, its answer never reaches the source."""


class TeleportError(ProtoError):
    """A teleport failed; `report` says how far it got and that the source resumed."""

    def __init__(self, code: ErrorCode | str, message: str, report: TeleportReport) -> None:
        super().__init__(code, message, {"report": report.to_dict()})
        self.report = report


@dataclass
class Options:
    mode: str = "auto"
    max_downtime: float = 0.3
    max_rounds: int = 8
    lease: float = 30.0
    hold: dict[str, float] = field(default_factory=dict)
    """Test hook: sleep this long at a phase boundary (fault tests cut links then)."""
    fail_restore: bool = False
    """Test hook: the target corrupts the shipped images before restoring."""
    fail_at: str | None = None
    """Test hook: fail right after this source effect/step (or, prefixed ``target:``,
    after that step on the target)."""
    baseline: bool = False
    """Bench only: the seed's method (dump everything to disk, then copy it, then
    restore) instead of streaming pages, to compare against in the same run."""


class SourceUndo:
    """The undo of every source effect, from data a journal also holds: the live
    engine and a restarted daemon (recovery) unwind with these same functions."""

    def __init__(self, runc: Runc, j: journal.SourceJournal, sdir: Path,
                 link: links.NodeLink | None) -> None:
        self.runc = runc
        self.j = j
        self.dir = sdir
        self.link = link
        self.ck: asyncio.Task[None] | None = None
        self.ck_dumped = False  # CRIU finished dumping (a lazy dump then serves pages)
        self.relay: links.Relay | None = None

    def undo(self, effect: str) -> Callable[[], Awaitable[None]]:
        fn = {Effect.TARGET_PREPARED: self.abort_target, Effect.PREDUMPING: self.resume,
              Effect.PAUSED: self.resume,
              Effect.ISOLATED: self.reconnect, Effect.CRIU: self.stop_criu}[Effect(effect)]
        return fn

    async def stop_criu(self) -> None:
        """CRIU lets go of the tasks; the cgroup stays frozen (PAUSED is undone later),
        and CRIU's network lock goes."""
        ck = self.ck
        if ck is not None and not ck.done():
            if not self.ck_dumped:
                # Inside the dump (parasite code in the tasks): let it end by itself (a
                # cut page-server link fails it cleanly). A lazy dump never ends by itself
                # (it then serves pages): its dump part is short.
                await asyncio.wait({ck}, timeout=10 if self.j.lazy else 120)
            if not ck.done():
                # CRIU thawed the cgroup after seizing the tasks: freeze it again, so
                # that they stay frozen when killing CRIU lets them go.
                await self.runc.freeze(self.j.name)
                ck.cancel()  # kills runc + CRIU (process group)
            with contextlib.suppress(BaseException):
                await ck
        elif ck is None:
            # a restarted daemon: runc checkpoint / CRIU of this session may still run
            await self.runc.freeze(self.j.name)
            await asyncio.to_thread(kill_session_procs, self.dir)
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await self.relay.close()
            self.relay = None
        if self.j.netns:
            await netlink.unlock(os.path.basename(self.j.netns))

    async def reconnect(self) -> None:
        """veth up, neighbours back (carrier loss flushed them; a peer off the flood list
        could never answer a new ARP), then TCP repair off, whose window probe now
        reaches the peer (it makes the client retransmit at once)."""
        await netmove.reconnect(self.j.host_veth or None)
        if self.j.neighbors and self.j.netns:
            with contextlib.suppress(Exception):
                await netmove.add_neighbors(self.j.netns, self.j.neighbors)
        if self.j.netns:
            pids = await asyncio.to_thread(tcprepair.pids_in_netns, self.j.netns)
            n = await asyncio.to_thread(tcprepair.repair_off, pids)
            if n:
                log.info("teleport %s: repair off on %d socket(s)", self.j.sid, n)

    async def resume(self) -> None:
        st = await self.runc.state(self.j.name)
        if st is not None and st.status == "paused":
            await self.runc.resume(self.j.name)

    async def abort_target(self) -> None:
        if self.link is None:
            return
        try:
            await self.link.call("teleport.abort", wire.SessionRef(self.j.sid).to_wire(),
                                 timeout=10)
        except ProtoError as exc:
            log.warning("teleport %s: target %s not told to abort (%s); it aborts when its "
                        "lease ends", self.j.sid, self.j.target, exc.message)


def kill_session_procs(sdir: Path) -> int:
    """Kill the process groups (runc + its CRIU) of commands naming this session dir:
    what a killed daemon left running. Blocking."""
    pids = proc.pids_with_arg(str(sdir).encode())
    mine = os.getpgrp()
    for pid in pids:
        with contextlib.suppress(OSError):
            pgid = os.getpgid(pid)
            if pgid != mine:
                os.killpg(pgid, 9)
            else:
                os.kill(pid, 9)
    return len(pids)


class Teleport:
    """One teleport of cnvm `name` from this node to `target`."""

    def __init__(self, daemon: Any, name: str, target: str, opts: Options,
                 emit: Emit | None = None, criu_bin: str | None = None) -> None:
        self.daemon = daemon
        self.name = name
        self.target = target
        self.opts = opts
        self._emit = emit or (lambda _e, _d: None)
        self.node: str = daemon.config.node_name
        self.sid = wire.new_sid()
        self.dir = Path(daemon.config.state_dir) / "teleport" / "out" / self.sid
        cfg = daemon.config
        self.runc = Runc(cfg.runc_root, cfg.runc, criu_bin or cfg.criu)
        self.report = TeleportReport(name, self.node, target)
        self.link: links.NodeLink | None = None
        self.phase = Phase.PREFLIGHT
        self.j = journal.SourceJournal(sid=self.sid, name=name, target=target)
        src_fail = opts.fail_at if opts.fail_at and not opts.fail_at.startswith("target:") \
            else None
        self.stack = UndoStack(self._journal_effects, fail_at=src_fail)
        self.u = SourceUndo(self.runc, self.j, self.dir, None)
        self.lazy_port: int | None = None
        self._t0 = time.monotonic()
        self._phase_t = self._t0
        self._parent: list[str] = []  # --parent-path of the final dump after pre-dumps
        self._last_round: int | None = None  # the final dump's parent round
        self._last_dir: int | None = None  # the last good pre-dump round
        self._seq = 0  # pre-dump dirs made (attempts, also failed ones)
        self.wire = 0
        self.vteps: dict[str, str] = {}
        self._t_freeze: float | None = None  # monotonic: the frozen window's start
        self._t_criu: float | None = None  # when the final CRIU run was started
        self._held = 0.0  # test-hook sleeps inside the frozen window (not frozen time)
        # The live view: bytes in flight (streams, page relays) not yet in self.wire,
        # what had moved when the phase began, and what the phase should move.
        self._moving: dict[str, Callable[[], int]] = {}
        self._phase_wire = 0
        self._phase_total: int | None = None

    @property
    def switched(self) -> bool:
        return self.phase in (Phase.SWITCHED, Phase.COMMIT, Phase.DONE)

    @property
    def settling(self) -> bool:
        """The restore request left: only the target's answer decides now."""
        return self.phase in (Phase.RESTORE, Phase.CONFIRM)

    # ---- events and journal

    def count_lazy(self, reader: Any) -> None:
        """Show the lazy pages being served (counted for real at commit)."""
        self._moving["pages-lazy"] = lambda: int(reader.n)

    def moved(self) -> int:
        """Every byte sent or received so far, also those of transfers in flight."""
        return self.wire + sum(f() for f in list(self._moving.values()))

    def tick(self, what: str | None = None) -> None:
        """Progress of the phase: the bytes that moved in it (pages, files, trees) of
        its expected total (never below what moved)."""
        done = self.moved() - self._phase_wire
        total = self._phase_total
        self.emit_progress(done=done, total=max(total, done) if total else None,
                           unit="bytes", what=what)

    async def _ticker(self) -> None:
        """While a page relay runs (its bytes come from CRIU, not from us), show it."""
        last = -1
        while True:
            await asyncio.sleep(0.25)
            if self._moving and self.phase is not Phase.PRECOPY:  # that one: per round
                n = self.moved()
                if n != last:
                    last = n
                    self.tick("pages" if any(k.startswith("pages") for k in self._moving)
                              else None)

    def emit_progress(self, **data: Any) -> None:
        data.setdefault("phase", str(self.phase))
        data.setdefault("elapsed", round(time.monotonic() - self._t0, 3))
        self._emit("progress", data)

    async def enter(self, phase: Phase) -> None:
        if self._moving:  # the phase's last figure, so a live view misses no bytes
            self.tick("pages" if any(k.startswith("pages") for k in self._moving) else None)
        now = time.monotonic()
        self.report.phases[str(self.phase)] = round(
            self.report.phases.get(str(self.phase), 0.0) + now - self._phase_t, 4)
        self.phase, self._phase_t = phase, now
        self._phase_wire, self._phase_total = self.moved(), None
        self.j.phase = str(phase)
        if await asyncio.to_thread(self.dir.is_dir):
            await asyncio.to_thread(journal.save, self.dir, self.j)
        self.emit_progress(phase=str(phase))
        events.emit(self.daemon, "teleport", "phase", self.name, phase=str(phase), sid=self.sid)
        await self._hold(str(phase))

    async def _journal_effects(self, effects: list[str]) -> None:
        self.j.effects = effects
        await asyncio.to_thread(journal.save, self.dir, self.j)

    def timeline(self, side: str, step: str, t0: float, t1: float | None = None) -> None:
        """Record one step of the frozen window (our clock)."""
        if self._t_freeze is None:
            return
        end = time.monotonic() if t1 is None else t1
        self.report.timeline.append(Step(side, step, round((t0 - self._t_freeze) * 1000, 2),
                                         round((end - t0) * 1000, 2)))

    async def _criu_timeline(self) -> None:
        """CRIU's own stages of the final dump, from its log's timestamps."""
        if self._t_freeze is None or self._t_criu is None:
            return
        text = await asyncio.to_thread(_read_text, self.dir / "work" / "dump.log")
        if text:
            self.report.timeline += criu_stages(
                text, DUMP_STAGES, "source", (self._t_criu - self._t_freeze) * 1000)

    async def effect(self, e: Effect) -> None:
        await self.stack.push(str(e), self.u.undo(e))

    async def _hold(self, phase: str) -> None:
        secs = self.opts.hold.get(phase)
        if secs:
            self.emit_progress(phase=phase, hold=secs)
            await asyncio.sleep(secs)

    # ---- streams

    async def _stream(self, hdr: wire.DataHeader, produce: Callable[[Any], Any]) -> int:
        """Open a data stream to the target, let `produce(stream)` write, check trailer."""
        assert self.link is not None
        stream = await self.link.open_stream(hdr.to_wire())
        try:
            await produce(stream)
            stream.write_eof()
            ans = await stream.read_frame()
        finally:
            stream.close()
        if not ans or not ans.get("ok"):
            raise ProtoError.from_wire((ans or {}).get("error") or {
                "code": "unavailable", "message": f"{self.target}: {hdr.what} stream cut"})
        n = int(ans.get("bytes", 0))
        self.wire += n
        return n

    async def send_tree(self, what: wire.DataKind, src: Path, snapshot: Path) -> int:
        sent = 0
        key = f"{what}-{id(src)}-{time.monotonic()}"

        async def produce(stream: Any) -> None:
            async def sink(data: bytes) -> None:
                nonlocal sent
                await stream.write(data)
                sent += len(data)
                self.tick(str(what))

            if what is wire.DataKind.IMAGES:  # plain tar: keep the pages already there
                await pack_plain(src, sink)
            else:
                await treesync.pack(src, snapshot, sink)

        self._moving[key] = lambda: sent
        try:
            return await self._stream(wire.DataHeader(self.sid, what), produce)
        finally:
            del self._moving[key]

    async def send_file(self, what: wire.DataKind, path: Path, offset: int, end: int,
                        digest: str | None = None) -> int:
        pos = offset
        key = f"{what}-{path}-{offset}"

        async def produce(stream: Any) -> None:
            nonlocal pos
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
            try:
                while pos < end:
                    data = await asyncio.to_thread(os.pread, fd, min(links.CHUNK, end - pos),
                                                   pos)
                    if not data:
                        break
                    await stream.write(data)
                    pos += len(data)
                    self.tick(str(what))
            finally:
                os.close(fd)

        self._moving[key] = lambda: pos - offset
        try:
            return await self._stream(wire.DataHeader(self.sid, what, offset, digest), produce)
        finally:
            del self._moving[key]

    # ---- the teleport

    async def run(self) -> TeleportReport:
        r = self.report
        events.emit(self.daemon, "teleport", "start", self.name, target=self.target,
                    mode=self.opts.mode, sid=self.sid)
        ticker = asyncio.create_task(self._ticker())
        try:
            await self._run()
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            r.error = "cancelled" if cancelled else (
                exc.message if isinstance(exc, ProtoError) else f"{type(exc).__name__}: {exc}")
            prepared = str(Effect.TARGET_PREPARED) in self.stack
            if not self.switched:
                await asyncio.shield(self._rollback())
            events.emit(self.daemon, "teleport", "rolled_back" if r.rolled_back else "failed",
                        self.name, target=self.target, sid=self.sid, reason=r.error)
            r.total_seconds = round(time.monotonic() - self._t0, 4)
            await asyncio.shield(self._keep_report(moved=False, prepared=prepared))
            if cancelled:
                raise TeleportError(ErrorCode.CANCELLED, f"teleport of {self.name} cancelled; "
                                    f"it keeps running on {self.node}", r) from None
            if isinstance(exc, ProtoError) and exc.code in (
                    ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND, ErrorCode.CONFLICT,
                    ErrorCode.UNSUPPORTED_VERSION) and not prepared:
                raise
            where = f"; {self.name} keeps running on {self.node}" if r.rolled_back else ""
            code = exc.code if isinstance(exc, ProtoError) else ErrorCode.FAILED
            raise TeleportError(code, f"teleport of {self.name} to {self.target} failed: "
                                f"{r.error}{where}", r) from None
        finally:
            ticker.cancel()
            await asyncio.shield(self._close())
        return r

    async def _close(self) -> None:
        if self.u.relay is not None:
            with contextlib.suppress(Exception):
                await self.u.relay.close()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(keep_logs, self.dir, self.daemon.config.state_dir,
                                    self.name, "source")
        await asyncio.to_thread(_umount_under, self.dir)
        await asyncio.to_thread(shutil.rmtree, self.dir, True)
        await asyncio.to_thread(release_memory)  # the pages went through our buffers

    async def _run(self) -> None:
        r = self.report
        d = self.daemon
        if self.target == self.node:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             f"{self.name} already runs on {self.node}: pick another node")
        svc = d.services.require(PEERS)
        if self.target not in links.member_names(svc):
            raise ProtoError(ErrorCode.NOT_FOUND,
                             f"unknown node {self.target!r}: not a member of this cluster "
                             "(see `cnvmctl nodes`)")
        life: Lifecycle = d.services.require(LIFECYCLE)
        rec = await life.record(self.name)
        if rec is None:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no cnvm named {self.name!r} on {self.node}")
        st = await self.runc.state(self.name)
        if st is None or st.status != "running":
            raise ProtoError(ErrorCode.CONFLICT,
                             f"cnvm {self.name} is {st.status if st else 'stopped'}: only a "
                             "running cnvm can be teleported (start it first)")
        paths = life.paths(self.name)
        netns = str(rec.get("netns") or "")
        if not netns:
            raise ProtoError(ErrorCode.FAILED, f"cnvm {self.name} has no network namespace")
        info = await netmove.describe(netns)
        if info is None:
            raise ProtoError(ErrorCode.FAILED, f"cnvm {self.name} has no IPv4 address on eth0: "
                             "nothing to keep reachable")
        self.j.netns = netns
        self.j.host_veth = await netmove.host_peer(netns) or ""
        try:
            spec = wire.CnvmSpec.from_record(rec)
        except ProtoError as exc:
            raise ProtoError(ErrorCode.FAILED, f"cnvm {self.name}'s record cannot travel: "
                             f"{exc.message}") from None
        img = life.images.resolve(rec["image_id"])
        image = wire.ImageRef(id=img.id, manifest=img.manifest_digest,
                              config=img.config_digest,
                              layers=tuple(x.digest for x in img.layers),
                              name=img.names[0] if img.names else None)
        pids = await asyncio.to_thread(tcprepair.pids_in_netns, netns)
        mem = await asyncio.to_thread(_rss, pids)
        upper_size = await asyncio.to_thread(_du, paths.upper)
        src_caps = criu.live_caps(d.caps, d.caps_error)
        self.link = links.PeerLink(svc, self.target)
        self.u.link = self.link
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(journal.save, self.dir, self.j)

        # ---- prepare on the target
        await self.enter(Phase.PREPARE)
        # A harmless round trip first: a cached SSH connection that died (link cut,
        # peer restarted) fails here and is replaced on the retry.
        for attempt in range(3):
            try:
                await self.link.call("teleport.status", wire.SessionRef(self.sid).to_wire(),
                                     timeout=5)
                break
            except ProtoError as exc:
                if attempt == 2 or exc.code != ErrorCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.2)
        prep_msg = wire.Prepare(
            sid=self.sid, mode=Mode(self.opts.mode), spec=spec, image=image, net=info,
            criu_version=str(src_caps.get("criu_version") or "0"), memory=mem,
            disk=upper_size + mem + (16 << 20), lease=self.opts.lease,
            cpu_flags=tuple(await asyncio.to_thread(criu.cpu_flags)),
            cgroup=await asyncio.to_thread(task_cgroup, st.pid))
        await self.effect(Effect.TARGET_PREPARED)
        prep = wire.PrepareReply.from_wire(
            await self.link.call("teleport.prepare", prep_msg.to_wire(), timeout=60))
        self.stack.done(Effect.TARGET_PREPARED)
        try:
            mode, why = choose_mode(self.opts.mode, src_caps, prep.caps)
        except ModeUnavailable as exc:
            raise ProtoError(ErrorCode.FAILED, f"mode {self.opts.mode}: {exc}") from None
        r.mode, r.mode_reason = str(mode), why
        self.j.mode = str(mode)
        self.j.lazy = mode in (Mode.POSTCOPY, Mode.HYBRID) and not self.opts.baseline
        self.emit_progress(mode=str(mode), why=why)

        # ---- image layers the target lacks
        if prep.missing_blobs:
            await self.enter(Phase.LAYERS)
            for dg in prep.missing_blobs:
                p = life.images.blob_path(dg)
                size = (await asyncio.to_thread(p.stat)).st_size
                await self.send_file(wire.DataKind.BLOB, p, 0, size, dg)
            await self.link.call("teleport.image", wire.SessionRef(self.sid).to_wire(),
                                 timeout=120)

        # ---- upper dir round 0 and the log so far, while the cnvm runs
        await self.enter(Phase.UPPER)
        snap = self.dir / "upper.snar"
        t = time.monotonic()
        self._phase_total = upper_size + await asyncio.to_thread(_size, paths.console_log)
        n0 = await self.send_tree(wire.DataKind.UPPER, paths.upper, snap)
        r.rounds.append(RoundReport("upper0", n0, round(time.monotonic() - t, 4)))
        log_path = paths.console_log
        log_off = await asyncio.to_thread(_size, log_path)
        if log_off:
            await self.send_file(wire.DataKind.LOG, log_path, 0, log_off)
        self.stack.done(Milestone.UPPER_SENT)

        if mode in (Mode.PRECOPY, Mode.HYBRID):
            await self._precopy(mode, src_caps, prep.caps)

        await self._hold("transfer")
        stream_pages = mode in (Mode.STOP_COPY, Mode.PRECOPY) and not self.opts.baseline
        if stream_pages:
            # the target's page server and our relay to it, before the cnvm stops
            ps = await self.link.call("teleport.pages", self._pages_msg().to_wire(),
                                      timeout=30)
            self.u.relay = await self.link.relay(_port(ps))
            self.stack.done(Milestone.PAGE_RELAY)

        # ---- freeze and final copy
        # The neighbours the target seeds its netns with, read while the cnvm still
        # runs (a netlink dump, ~10 ms): one learnt in the last milliseconds is ARPed.
        await self._grab_neighbors()
        await self.enter(Phase.FREEZE)
        if not self.j.lazy:  # its memory goes now (postcopy: after the switchover)
            self._phase_total = mem if mode is Mode.STOP_COPY else None
        t_freeze = self._t_freeze = time.monotonic()
        if self.opts.baseline:
            r.mode, r.mode_reason = "seed", "baseline: dump to disk, copy, restore"
        await self._freeze(paths, snap, lazy=self.j.lazy)
        t = time.monotonic()
        size_now = await asyncio.to_thread(_size, log_path)
        if size_now > log_off:
            await self.send_file(wire.DataKind.LOG, log_path, log_off, size_now)
            self.timeline("source", "console log tail", t)
        t = time.monotonic()
        await self._hold("frozen")
        self._held += time.monotonic() - t

        # ---- restore on the target (fenced), confirm: the switchover
        self.j.lease = self.opts.lease
        self.j.restore_sent = time.time()  # the lease runs from here (journaled next)
        await self.enter(Phase.RESTORE)
        t = time.monotonic()
        # From the request on, a cancel cannot resume the cnvm blindly: the outcome
        # is settled first (and decides).
        res = await _uncancelled(self._switchover(t))
        await self._switch()
        t_run = time.monotonic()
        r.frozen_seconds = round(t_run - t_freeze - self._held, 4)
        r.phases["restore_target"] = res.get("timings", {})
        self.report.timeline += _target_steps(res.get("timeline"), (t - t_freeze) * 1000)
        await self._criu_timeline()
        self.emit_progress(phase="running", node=self.target, frozen=r.frozen_seconds,
                           timeline=[asdict(x) for x in self.report.timeline])

        # ---- commit: the source lets go (forward only)
        await self.enter(Phase.COMMIT)
        # Past the switchover a cancel can only leave garbage behind: finish the release.
        rel = asyncio.ensure_future(self._release(mode, life))
        while not rel.done():
            try:
                await asyncio.shield(rel)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        rel.result()
        r.ok = True
        r.total_seconds = round(time.monotonic() - self._t0, 4)
        await self.enter(Phase.DONE)
        await self._keep_report(moved=True, prepared=True)
        events.emit(self.daemon, "teleport", "committed", self.name, target=self.target,
                    sid=self.sid, mode=r.mode, frozen=r.frozen_seconds, wire=r.wire_bytes)

    async def _switchover(self, t: float) -> dict[str, Any]:
        """Restore request, then settle its outcome (cnvmd.migration.outcome): confirm
        a fenced copy, abort a merely prepared target, ask while nobody answers."""
        assert self.link is not None
        first: wire.TargetStatus | None = None
        res: dict[str, Any] = {}
        try:
            res = await self._restore()
            first = wire.status_from_wire({"status": res.get("status")})
        except ProtoError as exc:
            if wire.delivery(exc) is not wire.Delivery.UNKNOWN:
                raise  # refused, failed, or never sent: nothing runs there
            log.warning("teleport %s: restore outcome unknown (%s); %s stays frozen here "
                        "until %s answers", self.sid, exc.message, self.name, self.target)
            self.emit_progress(outcome="unknown", why=exc.message)
        self.timeline("source", "restore request (round trip)", t)
        t = time.monotonic()
        answers: list[dict[str, Any]] = []
        verdict = await outcome.settle(
            self.link, self.sid, first=first, confirm_sent=False,
            lease_end=self.j.restore_sent + self.opts.lease,
            target_down=lambda: target_down(self.daemon, self.target),
            before_confirm=lambda: self.enter(Phase.CONFIRM),
            lose_confirm_reply=self.opts.fail_at == "confirm_reply_lost", answers=answers,
            relay=lambda: relay_status(self.daemon, self.target, self.sid))
        self.timeline("source", "confirm (round trip)", t)
        if answers and self._t_freeze is not None:
            self.report.timeline += _target_steps(answers[-1].get("timeline"),
                                                  (t - self._t_freeze) * 1000)
        if verdict is outcome.Verdict.SOURCE:
            raise ProtoError(ErrorCode.FAILED, f"{self.target} holds no copy of {self.name} "
                             "(restore not taken, aborted, or fenced copy expired)")
        return res

    async def _switch(self) -> None:
        """The one transition after which the target owns the cnvm: nothing is undone
        any more (the stack is dropped), only forward cleanup follows."""
        self.stack.forget()
        self.j.effects = []
        await self.enter(Phase.SWITCHED)
        log.info("teleport %s: switchover: %s now runs on %s", self.sid, self.name,
                 self.target, extra={"cnvm": self.name, "sid": self.sid})

    # ---- freeze

    async def _freeze(self, paths: Any, snap: Path, *, lazy: bool) -> None:
        """Pause (cgroup frozen), isolate, then CRIU: stop-copy streams pages into the
        target's page server; postcopy (lazy) dumps all but the pages and then serves
        them on demand. The order makes the unwind right: CRIU lets go first while
        the tasks stay frozen, then veth up + repair off, then thaw."""
        assert self.link is not None
        # Pushed first so that they unwind last: CRIU lets go, then veth up + repair off,
        # then thaw (each undo is safe whether or not its effect was made yet).
        await self.effect(Effect.PAUSED)
        await self.effect(Effect.ISOLATED)

        async def hold_still() -> None:
            # The cgroup frozen directly, polled every millisecond: CRIU then finds it
            # frozen and skips its own freezer wait (100 ms steps, criu/seize.c). It runs
            # while runc starts and asks CRIU for its version and features (two CRIU
            # runs, 20-30 ms here) before the dump itself seizes the tasks.
            t = time.monotonic()
            if not await self.runc.freeze(self.name):
                await self.runc.pause(self.name)  # no freezer path known: let runc do it
            self.timeline("source", "freeze cgroup", t)
            self.stack.done(Effect.PAUSED)
            t = time.monotonic()
            await netmove.isolate(self.j.host_veth or None)
            self.timeline("source", "isolate veth", t)
            self.stack.done(Effect.ISOLATED)

        t = time.monotonic()
        if lazy:
            await self._overlap(hold_still(), self._dump_lazy())
            self.timeline("source", "criu dump (runc checkpoint, until images ready)", t)
            self.report.rounds.append(RoundReport("dump", 0, round(time.monotonic() - t, 4)))
            t = time.monotonic()
            _, n_img = await asyncio.gather(
                self.send_tree(wire.DataKind.UPPER, paths.upper, snap),
                self.send_tree(wire.DataKind.IMAGES, self.dir / "images",
                               self.dir / "images.snar"))
            self.timeline("source", "send upper delta + images", t)
        else:
            await self._overlap(hold_still(), self._dump_streamed(paths, snap))
            self.timeline("source", "criu dump (runc checkpoint, pages streamed)", t)
            self.report.rounds.append(RoundReport("dump", self._relay_bytes(),
                                                  round(time.monotonic() - t, 4)))
            t = time.monotonic()
            n_img = await self.send_tree(wire.DataKind.IMAGES, self.dir / "images",
                                         self.dir / "images.snar")
            self.timeline("source", "send images", t)
        self.report.rounds.append(RoundReport("images", n_img, 0.0))
        self.stack.done(Milestone.IMAGES_SENT)

    @staticmethod
    async def _overlap(first: Awaitable[None], dump: Awaitable[None]) -> None:
        """Run the dump while `first` (freeze + isolate) completes; if `first` fails,
        the dump is stopped before the error goes on to the unwind."""
        task = asyncio.ensure_future(dump)
        try:
            await first
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        await task

    def _relay_bytes(self) -> int:
        rl = self.u.relay
        return rl.bytes_up if rl is not None else 0

    async def _dump_streamed(self, paths: Any, snap: Path) -> None:
        """Stop-and-copy: the dump streams its pages into the target's page server
        (or, for the baseline, to local disk first)."""
        relay = self.u.relay
        await self.effect(Effect.CRIU)
        self._t_criu = time.monotonic()
        if relay is not None:
            self._moving["pages"] = lambda: relay.bytes_up + relay.bytes_down
        self.u.ck = asyncio.create_task(self.runc.checkpoint(
            self.name, self.dir / "images", work_dir=self.dir / "work", tcp_established=True,
            leave_running=True,
            page_server=f"127.0.0.1:{relay.port}" if relay is not None else None,
            extra_args=self._parent, timeout=300))
        self.stack.done(Effect.CRIU)
        delta = asyncio.create_task(self.send_tree(wire.DataKind.UPPER, paths.upper, snap))
        try:
            await asyncio.gather(asyncio.shield(self.u.ck), delta)
        except BaseException:
            delta.cancel()
            raise
        self.u.ck_dumped = True
        if relay is not None:
            await _settle(relay)
            self.wire += relay.bytes_up + relay.bytes_down
            self._moving.pop("pages", None)
        self.stack.done(Milestone.DUMPED)

    async def _dump_lazy(self) -> None:
        """Post-copy: CRIU dumps all but the pages and then serves them on demand; we go
        on at its status byte (images ready)."""
        self.lazy_port = links.free_port()
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        loop = asyncio.get_running_loop()
        try:
            await self.effect(Effect.CRIU)
            self._t_criu = time.monotonic()
            ck = self.u.ck = asyncio.create_task(self.runc.checkpoint(
                self.name, self.dir / "images", work_dir=self.dir / "work",
                tcp_established=True, lazy_pages=True,
                page_server=f"127.0.0.1:{self.lazy_port}", status_fd=wfd,
                extra_args=self._parent, timeout=None))
            self.stack.done(Effect.CRIU)
            ready: asyncio.Future[None] = loop.create_future()
            def on_ready() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(rfd, on_ready)
            try:
                done, _ = await asyncio.wait({ck, ready}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(rfd)
            if ready not in done:
                ck.result()  # raises the checkpoint's error
                raise ProtoError(ErrorCode.FAILED, "checkpoint ended before the status byte")
            data = b""
            with contextlib.suppress(BlockingIOError):
                data = os.read(rfd, 1)
            if data != b"\0":
                await asyncio.wait({ck}, timeout=5)
                if ck.done():
                    ck.result()
                raise ProtoError(ErrorCode.FAILED, "CRIU did not report its images ready")
        finally:
            os.close(rfd)
            os.close(wfd)
        self.u.ck_dumped = True
        self.stack.done(Milestone.DUMPED)

    async def _grab_neighbors(self) -> None:
        try:
            self.j.neighbors = await netmove.neighbors(self.j.netns)
            self.vteps = await netmove.vteps([e["mac"] for e in self.j.neighbors])
        except Exception as exc:
            self.vteps = {}
            log.warning("cannot read the neighbours of %s: %s", self.name, exc)

    # ---- the switchover request

    async def _restore(self) -> dict[str, Any]:
        """Ask the target to restore (it answers ``fenced``)."""
        assert self.link is not None
        fail_at = self.opts.fail_at
        msg = wire.Restore(
            sid=self.sid,
            neighbors=tuple(wire.Neighbor.from_wire(n) for n in self.j.neighbors
                            if _neighbor_ok(n)),
            vteps=tuple(sorted(self.vteps.items())), lazy=self.j.lazy,
            fail_restore=self.opts.fail_restore,
            fail_at=fail_at.removeprefix("target:") if fail_at and
            fail_at.startswith("target:") else None)
        # No extra round trip while frozen: a target that is gone fails this call with
        # delivery "not_sent"; one that may have seen it is asked afterwards (settle).
        ans = dict(await self.link.call("teleport.restore", msg.to_wire(), timeout=60))
        if fail_at == "restore_reply_lost":
            raise outcome.lost("restore")
        return ans

    # ---- after the switchover

    async def _release(self, mode: Mode, life: Lifecycle) -> None:
        """The target runs the cnvm: free everything here (the frozen copy first)."""
        ck = self.u.ck
        if ck is not None and not ck.done():
            # postcopy: CRIU still serves pages; thaw so that it can end the tasks.
            with contextlib.suppress(RuncError):
                await self.runc.resume(self.name)
            t = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(ck), 300)
                self.report.phases["pages_after_restore"] = round(time.monotonic() - t, 4)
            except (TimeoutError, RuncError) as exc:
                log.error("lazy page server on %s ended badly: %s", self.node, exc)
                ck.cancel()
        await life.release(self.name)
        self.daemon.adopted.pop(self.name, None)
        with contextlib.suppress(Exception):  # the IP stays the cnvm's: no IPAM release
            await netmove.plumbing(self.daemon).destroy(self.name)
        if self.j.host_veth:
            with contextlib.suppress(Exception):
                await netlink.link_del(self.j.host_veth)
        await netlink.netns_del(os.path.basename(self.j.netns))
        assert self.link is not None
        hist = await asyncio.to_thread(load_reports, self.daemon.state, self.name)
        self.report.total_seconds = round(time.monotonic() - self._t0, 4)
        self.report.ok = True
        try:
            ans = await self.link.call("teleport.commit", wire.Commit(
                self.sid, tuple([*hist, self._wire_report()][-wire.MAX_REPORTS:])).to_wire(),
                timeout=120)
            lazy = int(ans.get("relay_bytes", 0))  # lazy pages, pulled by the target
            self.wire += lazy
            self._moving.pop("pages-lazy", None)
            if mode is Mode.POSTCOPY or mode is Mode.HYBRID:
                self.report.rounds.append(RoundReport(
                    "lazy", lazy, self.report.phases.get("pages_after_restore", 0.0)))
        except ProtoError as exc:
            log.warning("commit on %s failed (the cnvm runs there): %s", self.target, exc)

    def _wire_report(self) -> dict[str, Any]:
        self.report.wire_bytes = self.wire
        return self.report.to_dict()

    async def _keep_report(self, *, moved: bool, prepared: bool) -> None:
        self.report.wire_bytes = self.wire
        state = self.daemon.state
        hist = await asyncio.to_thread(load_reports, state, self.name)
        if moved or prepared:  # both nodes keep it; a refusal before the target is none
            await asyncio.to_thread(save_reports, state, self.name,
                                    [*hist, self.report.to_dict()])

    # ---- rollback

    async def _rollback(self) -> None:
        """Unwind the stack: the cnvm runs here again with its state and connections."""
        r = self.report
        t = time.monotonic()
        steps = await self.stack.unwind()
        st = await self.runc.state(self.name)
        r.rolled_back = st is not None and st.status == "running"
        if not r.rolled_back:
            log.error("rollback of %s: container is %s", self.name, st)
        r.phases["rollback"] = round(time.monotonic() - t, 4)
        self.phase = Phase.ROLLED_BACK
        log.warning("teleport %s of %s to %s rolled back: undid %s", self.sid, self.name,
                    self.target, ", ".join(steps) or "nothing")
        self.emit_progress(phase="rolled back", steps=steps)

    # ---- precopy rounds (needs soft-dirty tracking on both nodes)

    async def _precopy(self, mode: Mode, src: dict[str, Any], dst: dict[str, Any]) -> None:
        if not (src.get("mem_dirty_track") and dst.get("mem_dirty_track")):
            raise ProtoError(ErrorCode.FAILED, f"{mode} needs dirty-memory tracking on both "
                             "nodes")
        assert self.link is not None
        await self.enter(Phase.PRECOPY)
        await self.effect(Effect.PREDUMPING)
        self.stack.done(Effect.PREDUMPING)
        conv = Convergence(max_downtime=self.opts.max_downtime, max_rounds=self.opts.max_rounds)

        async def dump_round(i: int) -> int:
            for attempt in range(PREDUMP_ATTEMPTS):
                try:
                    return await self._predump(i)
                except RuncError as exc:
                    # A task that exits while CRIU seizes the tree ("Unseizable
                    # non-zombie") fails the whole pre-dump; the cnvm runs on untouched.
                    if attempt + 1 == PREDUMP_ATTEMPTS:
                        raise
                    self.report.phases["predump_retries"] = (
                        self.report.phases.get("predump_retries", 0) + 1)
                    log.warning("teleport %s: pre-dump round %d failed, retrying%s: %s",
                                self.sid, i, "" if self._last_dir is not None
                                else " as a full round", exc.why)
            raise AssertionError("unreachable")

        def on_round(i: int, rnd: Any, decision: Decision) -> None:
            self.report.rounds.append(RoundReport("predump", rnd.bytes, round(rnd.seconds, 4)))
            self.emit_progress(round=i, done=rnd.bytes, unit="bytes",
                               rate=round(rnd.bandwidth), decision=str(decision))

        if mode is Mode.HYBRID:
            fetch = self._fetch_pagemaps

            async def dump_and_fetch(i: int) -> int:
                n = await dump_round(i)
                await fetch()
                return n

            res = await precopy.run_rounds(dump_and_fetch, conv, on_round)
        else:
            res = await precopy.run_rounds(dump_round, conv, on_round)
        self.report.phases["precopy_converged"] = 1.0 if res.converged else 0.0
        self._last_round = self._last_dir
        if self._last_dir is not None:
            self._parent = ["--parent-path", f"../round-{self._last_dir}"]

    async def _predump(self, i: int) -> int:
        """One pre-dump into a fresh ``round-K`` dir on both sides, parented on the last
        good one. Returns the page bytes the round shipped.

        After a failed attempt that may already have reset the soft-dirty bits of some
        task, pages clean since then exist only in the failed round's (discarded)
        images: the next attempt must then be a full, parentless round.
        """
        assert self.link is not None
        k = self._seq
        self._seq += 1
        parent = self._last_dir
        extra = ["--pre-dump"]
        if parent is not None:
            extra += ["--parent-path", f"../round-{parent}"]
        ps = await self.link.call("teleport.pages",
                                  wire.Pages(self.sid, k, parent).to_wire(), timeout=30)
        relay = await self.link.relay(_port(ps))
        work = self.dir / f"work-{k}"
        self._moving["pages-predump"] = lambda: relay.bytes_up + relay.bytes_down
        try:
            await self.runc.checkpoint(self.name, self.dir / f"round-{k}", work_dir=work,
                                       tcp_established=False,
                                       page_server=f"127.0.0.1:{relay.port}",
                                       extra_args=extra, timeout=300)
            await _settle(relay)
        except RuncError:
            text = await asyncio.to_thread(_read_text, work / "dump.log")
            if text is None or "dirty tracking" in text:
                self._last_dir = None
            raise
        finally:
            await relay.close()
            self.wire += relay.bytes_up + relay.bytes_down
            self._moving.pop("pages-predump", None)
        self._last_dir = k
        return relay.bytes_up

    async def _fetch_pagemaps(self) -> None:
        """Copy the last round's pagemaps from the target into the local round dir.

        Why: the lazy (hybrid) final dump is not streamed to a page server; it reads
        its parent locally to mark pages unchanged since the last round as "in the
        parent" (restored from the target's round dirs) instead of lazy. Without
        them every page would be lazy and the rounds wasted (still correct).
        """
        assert self.link is not None and self._last_dir is not None
        k = self._last_dir
        files = wire.pagemap_files_from_wire(await self.link.call(
            "teleport.pagemaps", wire.Pagemaps(self.sid, k).to_wire(), timeout=60))
        d = self.dir / f"round-{k}"

        def write() -> None:
            for n, b in files.items():  # names checked by pattern: pagemap-N.img
                (d / n).write_bytes(b)

        await asyncio.to_thread(write)
        self.wire += sum(len(b) for b in files.values())

    def _pages_msg(self) -> wire.Pages:
        """The final dump's page server: parented on the last pre-dump, if any."""
        return wire.Pages(self.sid, None, self._last_round)

async def relay_status(daemon: Any, target: str, sid: str) -> wire.TargetStatus | None:
    """Ask `target` where session `sid` stands through the other members (one at a
    time, the first answer wins); None if none of them reaches it."""
    svc = daemon.services.get(PEERS)
    if svc is None:
        return None
    try:
        others = [n["name"] for n in svc.nodes()
                  if n["name"] not in (svc.name, target) and n.get("state") != "down"]
    except Exception:
        return None
    for node in others:
        try:
            ans = await svc.call(node, "teleport.relay_status",
                                 wire.RelayStatus(sid, target).to_wire(), timeout=5)
            return wire.status_from_wire(ans)
        except ProtoError:
            continue
    return None


def target_down(daemon: Any, node: str) -> bool:
    """Membership calls `node` down (no heartbeat for its down_after)."""
    svc = daemon.services.get(PEERS)
    mem = getattr(svc, "membership", None)
    if mem is None:
        return False
    try:
        mem.tick()
        return bool(mem.state_of(node) == "down")
    except Exception:
        return False


async def _uncancelled(coro: Awaitable[Any]) -> Any:
    """Run `coro` to its end even if the caller is cancelled meanwhile (a cancel
    cannot decide a switchover: the target's answer does)."""
    fut = asyncio.ensure_future(coro)
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                break
            cancelled = True
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
    if cancelled:
        log.warning("a teleport cancel came during the switchover; its outcome decided")
    return fut.result()


async def pack_plain(src: Path, sink: Callable[[bytes], Any]) -> int:
    """A plain (non-incremental) tar of src, streamed to sink."""
    p = await asyncio.create_subprocess_exec(
        "tar", "-C", str(src), "-cf", "-", ".", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    assert p.stdout is not None and p.stderr is not None
    n = 0
    try:
        while chunk := await p.stdout.read(treesync.CHUNK):
            n += len(chunk)
            await sink(chunk)
        err = await p.stderr.read()
        if await p.wait() != 0:
            raise RuntimeError(f"tar of {src} failed: {err.decode(errors='replace')}")
    except BaseException:
        if p.returncode is None:
            p.kill()
            await p.wait()
        raise
    return n


async def _settle(relay: Any, timeout: float = 10.0) -> None:
    """Let the relayed page-server connection end by itself before reading its byte
    counts: the dump returns once the server acked, but the relay only adds a
    connection's bytes when both directions have closed (closing it earlier would
    cancel the count)."""
    wait = getattr(relay, "wait_idle", None)
    if wait is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait(), timeout)


def _target_steps(raw: Any, offset_ms: float) -> list[Step]:
    """The target's steps of its restore (a peer's answer: checked, bounded), placed
    after the moment the restore request left."""
    out: list[Step] = []
    if not isinstance(raw, list):
        return out
    for x in raw[:64]:
        try:
            r = wire.Reader(x, "timeline step")
            st = Step("target", r.str("step", max_len=80),
                      round(offset_ms + r.float("start_ms", 0, 1e7), 2),
                      round(r.float("ms", 0, 1e7), 2), r.str("clock", max_len=8))
            r.done()
        except ProtoError:
            continue
        out.append(st)
    return out


def _port(ans: Any) -> int:
    """A page-server reply's port, checked (a peer's answer is input too)."""
    r = wire.Reader(ans, "pages reply")
    port: int = r.int("port", 1, 65535)
    r.done()
    return port


def _neighbor_ok(n: Any) -> bool:
    try:
        wire.Neighbor.from_wire(n)
    except ProtoError:
        return False
    return True


def _read_text(p: Path) -> str | None:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def task_cgroup(pid: int) -> str | None:
    """The cgroup task `pid` is in (the unified one, or the freezer's on cgroup v1),
    relative to the cgroup mount; None if unreadable or not plain names."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    by_ctl: dict[str, str] = {}
    for ln in lines:
        _, ctls, path = ln.split(":", 2) if ln.count(":") >= 2 else ("", "", "")
        for c in ctls.split(",") if ctls else [""]:
            by_ctl[c] = path
    found = by_ctl.get("freezer") or by_ctl.get("")
    return found if found and wire.CGROUP_RE.fullmatch(found) else None


def _du(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
