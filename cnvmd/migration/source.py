"""The source side of a teleport: it drives the whole move and owns the rollback.

Phases (events ``progress`` with phase, round, bytes, rate, eta):

    preflight  refuse what cannot work (own node, unknown node, stopped cnvm, no IP)
    prepare    target: preflight, netns (same IP/MAC, pre-locked, links down)
    layers     image blobs the target lacks, by digest
    upper      overlay upper dir, level-0 tar while the cnvm runs (+ console log)
    precopy    (precopy/hybrid, needs soft-dirty) pre-dump rounds until converged
    freeze     the cnvm stops: veth down, then per mode
                 stop-copy  runc pause; checkpoint --leave-running, pages streamed into
                            the target's page server through the SSH relay
                 postcopy   checkpoint --lazy-pages (frozen at the status byte), then
                            runc pause (so that whatever CRIU does next, the tasks stay
                            frozen until we decide)
               + final upper delta, CRIU images, log tail
    restore    target restores, brings its links up, GARP: the target owns the cnvm
    commit     source releases: container, netns, bundle, record; history moves along

Safety: until `restore` returns success the source is the owner. Any failure or
cancel before that resumes the source: CRIU stopped (it already let go, or it is
killed while the cgroup is frozen), TCP sockets taken out of repair mode
(tcprepair), CRIU's network lock removed, veth up, runc resume; the target is told
to abort (and aborts by itself when its lease runs out, if it cannot be told).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnvmd import netlink
from cnvmd.migration import link as links
from cnvmd.migration import netmove, precopy, tcprepair, treesync
from cnvmd.migration.policy import Convergence, Decision, Mode, ModeUnavailable, choose_mode
from cnvmd.migration.report import RoundReport, TeleportReport, keep_logs
from cnvmd.migration.target import (
    KIND_CNVMS,
    KIND_REPORTS,
    cpu_flags,
    live_caps,
    load_reports,
    save_reports,
)
from cnvmd.runtime import Runc, RuncError, _umount_under
from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.teleport")

Emit = Callable[[str, dict[str, Any]], None]
PREDUMP_ATTEMPTS = 3  # per pre-copy round: a pre-dump can lose a race with exiting tasks


class TeleportError(ProtoError):
    """A teleport failed; `report` says how far it got and that the source resumed."""

    def __init__(self, code: ErrorCode, message: str, report: TeleportReport) -> None:
        super().__init__(code, message, {"report": report.to_dict()})
        self.report = report


@dataclass
class Options:
    mode: str = "auto"
    max_downtime: float = 0.3
    max_rounds: int = 8
    lease: float = 30.0
    hold: dict[str, float] = field(default_factory=dict)
    """Test hook: sleep this long at the start of a phase (fault tests cut links then)."""
    fail_restore: bool = False
    """Test hook: the target corrupts the shipped images before restoring."""
    baseline: bool = False
    """Bench only: the seed's method (dump everything to disk, then copy it, then
    restore) instead of streaming pages, to compare against in the same run."""


class Teleport:
    """One teleport of cnvm `name` from this node to `target`."""

    def __init__(self, daemon: Any, name: str, target: str, opts: Options,
                 emit: Emit | None = None) -> None:
        self.daemon = daemon
        self.name = name
        self.target = target
        self.opts = opts
        self._emit = emit or (lambda _e, _d: None)
        self.node = daemon.config.node_name
        self.sid = f"{name}-{uuid.uuid4().hex[:10]}"
        self.dir = Path(daemon.config.state_dir) / "teleport" / "out" / self.sid
        cfg = daemon.config
        criu = daemon.services.get("teleport.criu") or cfg.criu
        self.runc = Runc(cfg.runc_root, cfg.runc, criu)
        self.report = TeleportReport(name, self.node, target)
        self.link: links.NodeLink | None = None
        self.committed = False
        self.lazy_port: int | None = None
        self.phase = "preflight"
        self._t0 = time.monotonic()
        self._phase_t = self._t0
        self._ck: asyncio.Task[None] | None = None
        self._ck_ready = False  # CRIU finished dumping (the rest is serving pages)
        self._paused = False
        self._isolated = False
        self._prepared = False
        self._relay: Any = None
        self._parent: list[str] = []  # --parent-path of the final dump after pre-dumps
        self._last_round: int | None = None  # the final dump's parent dir round-K
        self._last_dir: int | None = None  # the last good pre-dump dir (round-K)
        self._seq = 0  # pre-dump dirs made (attempts, also failed ones)
        self.wire = 0
        self.netns = ""
        self.host_veth: str | None = None
        self.neigh: list[dict[str, str]] = []
        self.vteps: dict[str, str] = {}

    # ---- events

    def emit_progress(self, **data: Any) -> None:
        data.setdefault("phase", self.phase)
        data.setdefault("elapsed", round(time.monotonic() - self._t0, 3))
        self._emit("progress", data)

    def enter(self, phase: str) -> None:
        now = time.monotonic()
        self.report.phases[self.phase] = round(
            self.report.phases.get(self.phase, 0.0) + now - self._phase_t, 4)
        self.phase, self._phase_t = phase, now
        self.emit_progress(phase=phase)

    async def _hold(self, phase: str) -> None:
        secs = self.opts.hold.get(phase)
        if secs:
            self.emit_progress(phase=phase, hold=secs)
            await asyncio.sleep(secs)

    # ---- streams

    async def _stream(self, args: dict[str, Any], produce: Callable[[Any], Any]) -> int:
        """Open a data stream to the target, let `produce(stream)` write, check trailer."""
        assert self.link is not None
        stream = await self.link.open_stream({"sid": self.sid, **args})
        try:
            await produce(stream)
            stream.write_eof()
            ans = await stream.read_frame()
        finally:
            stream.close()
        if not ans or not ans.get("ok"):
            raise ProtoError.from_wire((ans or {}).get("error") or {
                "code": "unavailable", "message": f"{self.target}: stream {args} cut"})
        n = int(ans.get("bytes", 0))
        self.wire += n
        return n

    async def send_tree(self, what: str, src: Path, snapshot: Path, total: int = 0) -> int:
        sent = 0
        t0 = time.monotonic()

        async def produce(stream: Any) -> None:
            nonlocal sent

            async def sink(data: bytes) -> None:
                nonlocal sent
                await stream.write(data)
                sent += len(data)
                dt = time.monotonic() - t0
                rate = sent / dt if dt > 0 else 0
                eta = (total - sent) / rate if rate and total > sent else 0
                self.emit_progress(done=sent, total=total or None, unit="bytes",
                                   rate=round(rate), eta=round(eta, 2), what=what)

            if what == "images":  # plain tar: must not delete the pages already there
                await pack_plain(src, sink)
            else:
                await treesync.pack(src, snapshot, sink)

        return await self._stream({"what": what}, produce)

    async def send_file(self, what: str, path: Path, offset: int, end: int,
                        extra: dict[str, Any] | None = None) -> int:
        async def produce(stream: Any) -> None:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
            try:
                pos = offset
                while pos < end:
                    data = await asyncio.to_thread(os.pread, fd, min(links.CHUNK, end - pos),
                                                   pos)
                    if not data:
                        break
                    await stream.write(data)
                    pos += len(data)
                    self.emit_progress(done=pos, total=end, unit="bytes", what=what)
            finally:
                os.close(fd)

        return await self._stream({"what": what, "offset": offset, **(extra or {})}, produce)

    # ---- the teleport

    async def run(self) -> TeleportReport:
        r = self.report
        try:
            await self._run()
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            r.error = "cancelled" if cancelled else (
                exc.message if isinstance(exc, ProtoError) else f"{type(exc).__name__}: {exc}")
            if not self.committed and (self._prepared or self._ck is not None):
                await asyncio.shield(self._rollback())
            r.total_seconds = round(time.monotonic() - self._t0, 4)
            await asyncio.shield(self._keep_report(moved=False))
            if cancelled:
                raise TeleportError(ErrorCode.CANCELLED, f"teleport of {self.name} cancelled; "
                                    f"it keeps running on {self.node}", r) from None
            if isinstance(exc, ProtoError) and exc.code in (ErrorCode.INVALID_ARGUMENT,
                                                            ErrorCode.NOT_FOUND,
                                                            ErrorCode.CONFLICT) \
                    and not self._prepared:
                raise
            where = f"; {self.name} keeps running on {self.node}" if r.rolled_back else ""
            code = exc.code if isinstance(exc, ProtoError) else ErrorCode.FAILED
            raise TeleportError(code, f"teleport of {self.name} to {self.target} failed: "
                                f"{r.error}{where}", r) from None
        finally:
            await asyncio.shield(self._close())
        return r

    async def _close(self) -> None:
        if self._relay is not None:
            with contextlib.suppress(Exception):
                await self._relay.close()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(keep_logs, self.dir, self.daemon.config.state_dir,
                                    self.name, "source")
        await asyncio.to_thread(_umount_under, self.dir)
        await asyncio.to_thread(shutil.rmtree, self.dir, True)

    async def _run(self) -> None:
        r = self.report
        d = self.daemon
        life = d.services.get("lifecycle")
        if self.target == self.node:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             f"{self.name} already runs on {self.node}: pick another node")
        svc = links.peer_service(d)
        if self.target not in links.member_names(svc):
            raise ProtoError(ErrorCode.NOT_FOUND,
                             f"unknown node {self.target!r}: not a member of this cluster "
                             "(see `cnvmctl nodes`)")
        if life is None:
            raise ProtoError(ErrorCode.UNAVAILABLE, "the lifecycle service is not running")
        rec = await life.record(self.name)
        if rec is None:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no cnvm named {self.name!r} on {self.node}")
        st = await self.runc.state(self.name)
        if st is None or st.status != "running":
            raise ProtoError(ErrorCode.CONFLICT,
                             f"cnvm {self.name} is {st.status if st else 'stopped'}: only a "
                             "running cnvm can be teleported (start it first)")
        paths = life.paths(self.name)
        self.netns = rec.get("netns") or ""
        if not self.netns:
            raise ProtoError(ErrorCode.FAILED, f"cnvm {self.name} has no network namespace")
        info = await netmove.describe(self.netns)
        if info is None:
            raise ProtoError(ErrorCode.FAILED, f"cnvm {self.name} has no IPv4 address on eth0: "
                             "nothing to keep reachable")
        self.host_veth = await netmove.host_peer(self.netns)
        config = await asyncio.to_thread(lambda: json.loads(paths.config.read_text()))
        img = life.images.resolve(rec["image_id"])
        image = {"id": img.id, "manifest": img.manifest_digest, "config": img.config_digest,
                 "layers": [x.digest for x in img.layers],
                 "name": img.names[0] if img.names else None}
        pids = await asyncio.to_thread(tcprepair.pids_in_netns, self.netns)
        mem = await asyncio.to_thread(_rss, pids)
        upper_size = await asyncio.to_thread(_du, paths.upper)
        src_caps = live_caps(d)
        self.link = links.PeerLink(svc, self.target)
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)

        # ---- prepare on the target
        self.enter("prepare")
        # A harmless round trip first: a cached SSH connection that died (link cut,
        # peer restarted) fails here and is replaced on the retry.
        for attempt in range(3):
            try:
                await self.link.call("teleport.status", {"sid": self.sid}, timeout=5)
                break
            except ProtoError as exc:
                if attempt == 2 or exc.code != ErrorCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.2)
        prep = await self.link.call("teleport.prepare", {
            "sid": self.sid, "name": self.name, "source": self.node, "mode": self.opts.mode,
            "criu_version": src_caps.get("criu_version"), "memory": mem,
            "disk": upper_size + mem + (16 << 20), "net": info.to_wire(), "record": rec,
            "config": config, "image": image, "lease": self.opts.lease,
            "cpu_flags": await asyncio.to_thread(cpu_flags)}, timeout=60)
        self._prepared = True
        try:
            mode, why = choose_mode(self.opts.mode, src_caps, prep["caps"])
        except ModeUnavailable as exc:
            raise ProtoError(ErrorCode.FAILED, f"mode {self.opts.mode}: {exc}") from None
        r.mode, r.mode_reason = str(mode), why
        self.emit_progress(mode=str(mode), why=why)

        # ---- image layers the target lacks
        missing = list(prep.get("missing_blobs") or [])
        if missing:
            self.enter("layers")
            for dg in missing:
                p = life.images.blob_path(dg)
                size = (await asyncio.to_thread(p.stat)).st_size
                await self.send_file("blob", p, 0, size, {"digest": dg})
            await self.link.call("teleport.image", {"sid": self.sid}, timeout=120)

        # ---- upper dir round 0 and the log so far, while the cnvm runs
        self.enter("upper")
        snap = self.dir / "upper.snar"
        t = time.monotonic()
        n0 = await self.send_tree("upper", paths.upper, snap, upper_size)
        r.rounds.append(RoundReport("upper0", n0, round(time.monotonic() - t, 4)))
        log_path = Path(rec.get("log") or paths.console_log)
        log_off = await asyncio.to_thread(_size, log_path)
        if log_off:
            await self.send_file("log", log_path, 0, log_off)

        if mode in (Mode.PRECOPY, Mode.HYBRID):
            await self._precopy(mode, src_caps, prep["caps"])

        await self._hold("transfer")
        if mode in (Mode.STOP_COPY, Mode.PRECOPY) and not self.opts.baseline:
            # the target's page server and our relay to it, before the cnvm stops
            ps = await self.link.call("teleport.pages", self._pages_args(), timeout=30)
            self._relay = await self.link.relay(ps["port"])
        # ---- freeze and final copy
        self.enter("freeze")
        t_freeze = time.monotonic()
        if self.opts.baseline:
            r.mode, r.mode_reason = "seed", "baseline: dump to disk, copy, restore"
            await self._freeze_dump(paths, snap, stream_pages=False)
        elif mode is Mode.POSTCOPY or (mode is Mode.HYBRID):
            await self._freeze_lazy(paths, snap)
        else:
            await self._freeze_dump(paths, snap)
        size_now = await asyncio.to_thread(_size, log_path)
        if size_now > log_off:
            await self.send_file("log", log_path, log_off, size_now)
        await self._hold("frozen")

        # ---- restore on the target: the switchover
        self.enter("restore")
        res = await self._restore(mode)
        self.committed = True
        t_run = time.monotonic()
        r.frozen_seconds = round(t_run - t_freeze, 4)
        r.phases["restore_target"] = res.get("timings", {})  # type: ignore[assignment]
        self.emit_progress(phase="running", node=self.target, frozen=r.frozen_seconds)

        # ---- commit: the source lets go
        self.enter("commit")
        # Past the switchover a cancel can only leave garbage behind: finish the release.
        rel = asyncio.ensure_future(self._release(mode, paths))
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
        self.enter("done")
        await self._keep_report(moved=True)

    # ---- precopy rounds (needs soft-dirty tracking on both nodes)

    async def _precopy(self, mode: Mode, src: dict[str, Any], dst: dict[str, Any]) -> None:
        if not (src.get("mem_dirty_track") and dst.get("mem_dirty_track")):
            raise ProtoError(ErrorCode.FAILED, f"{mode} needs dirty-memory tracking on both "
                             "nodes")
        assert self.link is not None
        self.enter("precopy")
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
        pargs: dict[str, Any] = {"sid": self.sid, "round": k}
        extra = ["--pre-dump"]
        if parent is not None:
            pargs["parent"] = f"round-{parent}"
            extra += ["--parent-path", f"../round-{parent}"]
        ps = await self.link.call("teleport.pages", pargs, timeout=30)
        relay = await self.link.relay(ps["port"])
        work = self.dir / f"work-{k}"
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
        ans = await self.link.call("teleport.pagemaps", {"sid": self.sid, "round": k},
                                   timeout=60)
        files = {str(n): bytes(b) for n, b in dict(ans.get("files") or {}).items()}
        d = self.dir / f"round-{k}"

        def write() -> None:
            for n, b in files.items():
                if "/" in n or not n.startswith("pagemap-"):
                    continue
                (d / n).write_bytes(b)

        await asyncio.to_thread(write)
        self.wire += sum(len(b) for b in files.values())

    def _pages_args(self) -> dict[str, Any]:
        """The final dump's page server: parented on the last pre-dump, if any."""
        args: dict[str, Any] = {"sid": self.sid}
        if self._last_round is not None:
            args["parent"] = f"round-{self._last_round}"
        return args

    # ---- freeze variants

    async def _freeze_dump(self, paths: Any, snap: Path, stream_pages: bool = True) -> None:
        """Stop-and-copy: the dump streams its pages into the target's page server."""
        assert self.link is not None
        if stream_pages and self._relay is None:
            ps = await self.link.call("teleport.pages", self._pages_args(), timeout=30)
            self._relay = await self.link.relay(ps["port"])
        await self._grab_neighbors()
        await netmove.isolate(self.host_veth)
        self._isolated = True
        await self.runc._simple("pause", self.name, ["pause", self.name])
        self._paused = True
        t = time.monotonic()
        self._ck = asyncio.create_task(self.runc.checkpoint(
            self.name, self.dir / "images", work_dir=self.dir / "work", tcp_established=True,
            leave_running=True,
            page_server=f"127.0.0.1:{self._relay.port}" if self._relay else None,
            extra_args=self._parent, timeout=300))
        delta = asyncio.create_task(self.send_tree("upper", paths.upper, snap))
        try:
            await asyncio.gather(asyncio.shield(self._ck), delta)
        except BaseException:
            delta.cancel()
            raise
        self._ck_ready = True
        if self._relay is not None:
            await _settle(self._relay)
        pages = self._relay.bytes_up if self._relay else 0
        self.wire += pages + (self._relay.bytes_down if self._relay else 0)
        self.report.rounds.append(RoundReport("dump", pages, round(time.monotonic() - t, 4)))
        n = await self.send_tree("images", self.dir / "images", self.dir / "images.snar")
        self.report.rounds.append(RoundReport("images", n, 0.0))

    async def _freeze_lazy(self, paths: Any, snap: Path) -> None:
        """Post-copy: CRIU dumps all but the pages and then serves them on demand."""
        self.lazy_port = links.free_port()
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        t = time.monotonic()
        try:
            self._ck = asyncio.create_task(self.runc.checkpoint(
                self.name, self.dir / "images", work_dir=self.dir / "work",
                tcp_established=True, lazy_pages=True,
                page_server=f"127.0.0.1:{self.lazy_port}", status_fd=wfd,
                extra_args=self._parent, timeout=None))
            ready = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().add_reader(
                rfd, lambda: ready.done() or ready.set_result(None))
            try:
                done, _ = await asyncio.wait({self._ck, ready},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                asyncio.get_running_loop().remove_reader(rfd)
            if ready not in done:
                self._ck.result()  # raises the checkpoint's error
                raise ProtoError(ErrorCode.FAILED, "checkpoint ended before the status byte")
            data = b""
            with contextlib.suppress(BlockingIOError):
                data = os.read(rfd, 1)
            if data != b"\0":
                await asyncio.wait({self._ck}, timeout=5)
                if self._ck.done():
                    self._ck.result()
                raise ProtoError(ErrorCode.FAILED, "CRIU did not report its images ready")
        finally:
            os.close(rfd)
            os.close(wfd)
        self._ck_ready = True
        self.report.rounds.append(RoundReport("dump", 0, round(time.monotonic() - t, 4)))
        await self._grab_neighbors()
        await netmove.isolate(self.host_veth)
        self._isolated = True

        async def pause() -> None:
            await self.runc._simple("pause", self.name, ["pause", self.name])
            self._paused = True

        results = await asyncio.gather(
            pause(), self.send_tree("upper", paths.upper, snap),
            self.send_tree("images", self.dir / "images", self.dir / "images.snar"))
        self.report.rounds.append(RoundReport("images", results[2], 0.0))

    async def _grab_neighbors(self) -> None:
        try:
            self.neigh = await netmove.neighbors(self.netns)
            self.vteps = await netmove.vteps([e["mac"] for e in self.neigh])
        except Exception as exc:
            log.warning("cannot read the neighbours of %s: %s", self.name, exc)

    async def _restore(self, mode: Mode) -> dict[str, Any]:
        """Ask the target to restore. If the answer is lost, ask again before deciding."""
        assert self.link is not None
        args: dict[str, Any] = {"sid": self.sid, "neighbors": self.neigh,
                                "vteps": self.vteps}
        if self.lazy_port:
            args["lazy_port"] = self.lazy_port
        if self.opts.fail_restore:
            args["fail_restore"] = True
        # A cheap round trip first: a target that is gone (daemon dead, link cut) is
        # found out here, before any restore request could have reached it, so the
        # rollback needs no waiting for an unknown outcome.
        await self.link.call("teleport.status", {"sid": self.sid}, timeout=3)
        try:
            return dict(await self.link.call("teleport.restore", args, timeout=60))
        except ProtoError as exc:
            if exc.code != ErrorCode.UNAVAILABLE or "unreachable" in exc.message:
                raise  # refused, failed, or never sent (no connection): not restored
            # Unknown outcome (connection lost): the target may have restored. Ask until
            # its lease has surely run out; a target that never heard of the restore
            # aborts by itself by then.
            deadline = time.monotonic() + self.opts.lease + 5
            while time.monotonic() < deadline:
                try:
                    st = await self.link.call("teleport.status", {"sid": self.sid},
                                              timeout=3)
                except ProtoError:
                    await asyncio.sleep(1)
                    continue
                if st.get("status") in ("restored", "committed"):
                    return {"status": "running", "recovered": True}
                if st.get("status") == "restoring":
                    await asyncio.sleep(0.5)
                    continue
                break
            raise

    # ---- after the switchover

    async def _release(self, mode: Mode, paths: Any) -> None:
        """The target runs the cnvm: free everything here (the frozen copy first)."""
        if self._ck is not None and not self._ck.done():
            # postcopy: CRIU still serves pages; thaw so that it can end the tasks.
            with contextlib.suppress(RuncError):
                await self.runc._simple("resume", self.name, ["resume", self.name])
            t = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(self._ck), 300)
                self.report.phases["pages_after_restore"] = round(time.monotonic() - t, 4)
            except (TimeoutError, RuncError) as exc:
                log.error("lazy page server on %s ended badly: %s", self.node, exc)
                self._ck.cancel()
        with contextlib.suppress(Exception):
            await self.runc.destroy(self.name)
        self.daemon.adopted.pop(self.name, None)
        with contextlib.suppress(Exception):  # the IP stays the cnvm's: no IPAM release
            await netmove.plumbing(self.daemon).destroy(self.name)
        if self.host_veth:
            with contextlib.suppress(Exception):
                await netlink.link_del(self.host_veth)
        await netlink.netns_del(os.path.basename(self.netns))
        from cnvmd import bundle

        with contextlib.suppress(Exception):
            await bundle.unmount_rootfs(paths)
        await asyncio.to_thread(shutil.rmtree, paths.dir, True)
        await asyncio.to_thread(self.daemon.state.delete, KIND_CNVMS, self.name)
        assert self.link is not None
        hist = await asyncio.to_thread(load_reports, self.daemon.state, self.name)
        self.report.total_seconds = round(time.monotonic() - self._t0, 4)
        self.report.ok = True
        try:
            ans = await self.link.call("teleport.commit", {
                "sid": self.sid, "reports": [*hist, self._wire_report()]}, timeout=120)
            lazy = int(ans.get("relay_bytes", 0))  # lazy pages, pulled by the target
            self.wire += lazy
            if mode is Mode.POSTCOPY or mode is Mode.HYBRID:
                self.report.rounds.append(RoundReport(
                    "lazy", lazy, self.report.phases.get("pages_after_restore", 0.0)))
        except ProtoError as exc:
            log.warning("commit on %s failed (the cnvm runs there): %s", self.target, exc)

    def _wire_report(self) -> dict[str, Any]:
        self.report.wire_bytes = self.wire
        return self.report.to_dict()

    async def _keep_report(self, moved: bool) -> None:
        self.report.wire_bytes = self.wire
        if moved:
            await asyncio.to_thread(self.daemon.state.delete, KIND_REPORTS, self.name)
            return
        hist = await asyncio.to_thread(load_reports, self.daemon.state, self.name)
        if self._prepared:  # refusals before contacting the target are not teleports
            await asyncio.to_thread(save_reports, self.daemon.state, self.name,
                                    [*hist, self.report.to_dict()])

    # ---- rollback

    async def _rollback(self) -> None:
        """Resume the cnvm here with its state and connections; clean the target."""
        r = self.report
        steps: list[str] = []
        try:
            if self._ck is not None and not self._ck.done():
                if not self._ck_ready:
                    # CRIU is inside the dump (parasite code in the tasks): let it end by
                    # itself (a cut page-server link makes it fail cleanly). A lazy dump
                    # never ends by itself (it then serves pages): its dump part is short.
                    await asyncio.wait({self._ck}, timeout=10 if self.lazy_port else 120)
                if not self._ck.done():
                    if not self._paused:
                        with contextlib.suppress(Exception):
                            await self.runc._simple("pause", self.name, ["pause", self.name])
                            self._paused = True
                    self._ck.cancel()  # kills runc + CRIU: the tasks stay frozen
                    steps.append("criu stopped")
                with contextlib.suppress(BaseException):
                    await self._ck
            if self._relay is not None:
                with contextlib.suppress(Exception):
                    await self._relay.close()
                self._relay = None
            # Order matters: lock off and link up first, neighbours back (carrier loss
            # flushed them; a peer off the flood list could never answer a new ARP),
            # then repair off, whose window probe now reaches the peer.
            if self.netns and self._ck is not None:
                await netlink.unlock(os.path.basename(self.netns))
                steps.append("network unlocked")
            if self._isolated:
                await netmove.reconnect(self.host_veth)
                steps.append("veth up")
                if self.neigh:
                    with contextlib.suppress(Exception):
                        await netmove.add_neighbors(self.netns, self.neigh)
            if self.netns and self._ck is not None:
                pids = await asyncio.to_thread(tcprepair.pids_in_netns, self.netns)
                n = await asyncio.to_thread(tcprepair.repair_off, pids)
                steps.append(f"repair off on {n} socket(s)")
            st = await self.runc.state(self.name)
            if st is not None and st.status == "paused":
                await self.runc._simple("resume", self.name, ["resume", self.name])
                steps.append("resumed")
            st = await self.runc.state(self.name)
            r.rolled_back = st is not None and st.status == "running"
            if not r.rolled_back:
                log.error("rollback of %s: container is %s", self.name, st)
        except Exception as exc:
            log.exception("rollback of %s failed", self.name)
            r.error += f"; rollback failed: {exc}"
        if self._prepared and self.link is not None:
            try:
                await self.link.call("teleport.abort", {"sid": self.sid}, timeout=10)
                steps.append("target cleaned")
            except ProtoError as exc:
                steps.append(f"target unreachable ({exc.message}); it cleans up when its "
                             "lease ends")
        r.phases["rollback"] = round(time.monotonic() - self._phase_t, 4)
        log.warning("teleport of %s to %s rolled back: %s", self.name, self.target,
                    ", ".join(steps))
        self.emit_progress(phase="rolled back", steps=steps)


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
