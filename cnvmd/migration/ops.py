"""The teleport plug-in: client API ops, peer-only target ops, the data stream kind.

API ops (cnvmctl):  teleport, teleport.cancel, teleport.reports
Peer-only ops:      teleport.prepare / image / pages / pagemaps / restore / confirm /
                    commit / abort / status, and the ``teleport.data`` stream kind. They are
                    on `peer_router`, which the peer mesh serves to authenticated
                    members only; the API socket never sees them. Each parses its
                    message with cnvmd.migration.wire and acts only on sessions the
                    calling member (``ctx.node``) prepared.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any, cast

from cnvmd import criu, metrics_hooks
from cnvmd.api import Args, Context, Router
from cnvmd.migration import link as links
from cnvmd.migration import wire
from cnvmd.migration.policy import Mode
from cnvmd.migration.report import load_reports
from cnvmd.migration.source import FAULT_POINTS, LOSS_POINTS, Options, Teleport, TeleportError
from cnvmd.migration.target import HOLD_REPLY, TARGET_FAULT_POINTS, TargetSide
from cnvmd.peers.streams import splice
from cnvmd.services import LIFECYCLE, PEERS, TELEPORTS, Plugin
from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.teleport")
router = Router()
peer_router = Router()

MODES = tuple(m.value for m in Mode)


class Teleports:
    """This node's teleport engine: outgoing teleports by cnvm name, incoming sessions."""

    def __init__(self, daemon: Any, criu_bin: str, criu_lazy: str) -> None:
        self.daemon = daemon
        self.criu = criu_bin
        self.outgoing: dict[str, tuple[Teleport, asyncio.Task[Any]]] = {}
        self.target = TargetSide(daemon, criu_bin, criu_lazy)
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        """A background job (a restarted source settling an outcome)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def by_sid(self, sid: str) -> Teleport | None:
        for t, _ in self.outgoing.values():
            if t.sid == sid:
                return t
        return None


def _engine(ctx: Context) -> Teleports:
    return ctx.daemon.services.require(TELEPORTS)


# --------------------------------------------------------------------------- start-up


async def ensure_pipe_max_size(daemon: Any) -> None:
    """Lazy pages need fs.pipe-max-size >= 4 MiB here (no CAP_SYS_RESOURCE): raise it."""
    caps = getattr(daemon, "caps", None)
    if caps is None or not caps.uffd_noncoop:
        return
    cur = criu.read_pipe_max_size()
    if cur >= criu.LAZY_PIPE_MIN:
        return

    def write() -> None:
        with open(criu.PIPE_MAX_SIZE_PATH, "w") as f:
            f.write(str(criu.LAZY_PIPE_MIN))

    try:
        await asyncio.to_thread(write)
    except OSError as exc:
        log.warning("cannot raise fs.pipe-max-size to %d (%s): postcopy unavailable",
                    criu.LAZY_PIPE_MIN, exc)
        return
    daemon.caps = dataclasses.replace(caps, pipe_max_size=criu.read_pipe_max_size())
    log.info("raised fs.pipe-max-size from %d to %d for lazy pages", cur,
             daemon.caps.pipe_max_size)


async def start_teleport(daemon: Any) -> None:
    await ensure_pipe_max_size(daemon)
    from cnvmd.migration import criushim, recovery

    criu_bin, criu_lazy = await criushim.criu_for_teleport(daemon.config.criu,
                                                           daemon.config.state_dir)
    engine = Teleports(daemon, criu_bin, criu_lazy)
    daemon.services.provide(TELEPORTS, engine)
    # Sessions a killed daemon left: resolved before this node serves peers again.
    try:
        await recovery.recover(engine)
    except Exception:
        log.exception("resolving interrupted teleports failed")


async def stop_teleport(daemon: Any) -> None:
    engine = daemon.services.remove(TELEPORTS)
    if engine is not None:
        for task in list(engine.tasks):
            task.cancel()
        await engine.target.shutdown()


# --------------------------------------------------------------------------- data stream


@peer_router.stream(links.STREAM_KIND)
async def serve_data(stream: Any, args: dict[str, Any]) -> None:
    """``teleport.data``: bulk data of a session from the member that prepared it."""
    engine: Teleports = stream.daemon.services.require(TELEPORTS)
    hdr = wire.DataHeader.from_wire(args)
    if hdr.what is wire.DataKind.PAGES:
        # A postcopy target's lazy-pages daemon, relayed to our lazy page server.
        t = engine.by_sid(hdr.sid)
        if t is None or not t.lazy_port or t.target != stream.node:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no lazy teleport {hdr.sid} here")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", t.lazy_port,
                                                          limit=links.CHUNK)
        except OSError as exc:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"lazy page server: {exc}") from None
        await stream.write_frame({"ok": True})
        counted = links.CountingReader(reader)
        t.count_lazy(counted)
        await splice(stream, cast(asyncio.StreamReader, counted), writer,
                     clean_eof=lambda: t.switched)
        return
    await engine.target.serve_data(stream, hdr, stream.node)


# --------------------------------------------------------------------------- client ops


@router.op("teleport", cancel_on_disconnect=False)
async def teleport(ctx: Context, args: Args) -> dict[str, Any]:
    """Move a running cnvm to another node, live (memory, TCP connections, IP, files)."""
    name = args.name("name")
    target = args.str("target", pattern=wire.NODE_RE.pattern, max_len=63)
    opts = Options(
        mode=args.str("mode", "auto", choices=MODES),
        max_downtime=args.float("max_downtime", 0.3, min=0.001, max=600),
        max_rounds=args.int("max_rounds", 8, min=1, max=100),
        lease=args.float("lease", 30.0, min=2, max=3600),
        hold={str(k): float(v) for k, v in (args.map("hold", {}) or {}).items()
              if isinstance(v, int | float) and not isinstance(v, bool)},
        fail_restore=args.bool("fail_restore", False),
        fail_at=args.str("fail_at", None, choices=(
            *FAULT_POINTS, *LOSS_POINTS,
            *(f"target:{p}" for p in (*TARGET_FAULT_POINTS, HOLD_REPLY)))),
        baseline=args.bool("baseline", False),
    )
    args.reject_unknown()
    if (opts.hold or opts.fail_restore or opts.fail_at) \
            and not ctx.daemon.config.fault_injection:
        raise ProtoError(ErrorCode.PERMISSION_DENIED,
                         "teleport test hooks (hold, fail_restore, fail_at) are off on this "
                         "node; they are for test labs (fault_injection = true in cnvmd.toml)")
    engine = _engine(ctx)
    if name in engine.outgoing:
        t0 = engine.outgoing[name][0]
        raise ProtoError(ErrorCode.BUSY, f"{name} is already being teleported to {t0.target} "
                         f"(phase {t0.phase}); wait, or `cnvmctl teleport --cancel {name}`")
    tp = Teleport(ctx.daemon, name, target, opts, ctx.emit, criu_bin=engine.criu)
    life = ctx.daemon.services.require(LIFECYCLE)
    task = asyncio.current_task()
    assert task is not None
    engine.outgoing[name] = (tp, task)
    try:
        lock = life.lock(name)
        if lock.locked():
            raise ProtoError(ErrorCode.BUSY, f"{name} is busy with another operation")
        async with lock:
            if life.execs.running(name):  # CRIU cannot dump runc's exec children
                raise ProtoError(ErrorCode.CONFLICT, f"{name} has an exec running "
                                 "(`cnvmctl exec`); teleport it when that ends")
            try:
                report = await tp.run()
            finally:
                metrics_hooks.teleport_finished(ctx.daemon, tp.report)
    finally:
        engine.outgoing.pop(name, None)
    return report.to_dict()


@router.op("teleport.cancel")
async def teleport_cancel(ctx: Context, args: Args) -> dict[str, Any]:
    """Cancel a teleport in flight: the cnvm is resumed where it was (if not yet moved)."""
    name = args.name("name")
    args.reject_unknown()
    entry = _engine(ctx).outgoing.get(name)
    if entry is None:
        raise ProtoError(ErrorCode.NOT_FOUND, f"no teleport of {name} in flight on "
                         f"{ctx.daemon.node_name}")
    tp, task = entry
    if tp.switched:
        raise ProtoError(ErrorCode.CONFLICT, f"{name} already runs on {tp.target}; the "
                         "teleport is only cleaning up")
    if tp.settling:
        raise ProtoError(ErrorCode.CONFLICT, f"the restore request of {name} has left: "
                         f"{tp.target}'s answer decides where it runs (phase {tp.phase})")
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait({task}, timeout=120)
    return {"name": name, "cancelled": True, "phase": str(tp.phase),
            "rolled_back": tp.report.rolled_back}


@router.op("teleport.reports")
async def teleport_reports(ctx: Context, args: Args) -> dict[str, Any]:
    """The kept teleport reports of a cnvm (they travel with it)."""
    name = args.name("name")
    args.reject_unknown()
    return {"name": name,
            "reports": await asyncio.to_thread(load_reports, ctx.daemon.state, name)}


# --------------------------------------------------------------------------- peer ops


def _caller(ctx: Context) -> str:
    node = getattr(ctx, "node", None)
    if not isinstance(node, str) or not node:
        raise ProtoError(ErrorCode.PERMISSION_DENIED, "teleport target ops are for members")
    return node


@peer_router.op("teleport.prepare", summary="target: preflight and prepare a session")
async def t_prepare(ctx: Context, args: Args) -> dict[str, Any]:
    msg = wire.Prepare.from_wire(args)
    return (await _engine(ctx).target.prepare(msg, _caller(ctx))).to_wire()


@peer_router.op("teleport.image", summary="target: register the shipped image, mount rootfs")
async def t_image(ctx: Context, args: Args) -> dict[str, Any]:
    msg = wire.SessionRef.from_wire(args, "image")
    return await _engine(ctx).target.image(msg.sid, _caller(ctx))


@peer_router.op("teleport.pages", summary="target: start a CRIU page server")
async def t_pages(ctx: Context, args: Args) -> dict[str, Any]:
    return await _engine(ctx).target.pages(wire.Pages.from_wire(args), _caller(ctx))


@peer_router.op("teleport.pagemaps", summary="target: a pre-dump round's pagemap images")
async def t_pagemaps(ctx: Context, args: Args) -> dict[str, Any]:
    return await _engine(ctx).target.pagemaps(wire.Pagemaps.from_wire(args), _caller(ctx))


@peer_router.op("teleport.restore", cancel_on_disconnect=False,
                summary="target: restore the cnvm and take it over")
async def t_restore(ctx: Context, args: Args) -> dict[str, Any]:
    return await _engine(ctx).target.restore(wire.Restore.from_wire(args), _caller(ctx))


@peer_router.op("teleport.confirm", summary="target: the source let go; run the fenced copy")
async def t_confirm(ctx: Context, args: Args) -> dict[str, Any]:
    msg = wire.SessionRef.from_wire(args, "confirm")
    return await _engine(ctx).target.confirm(msg.sid, _caller(ctx))


@peer_router.op("teleport.commit", summary="target: the source let go; keep the history")
async def t_commit(ctx: Context, args: Args) -> dict[str, Any]:
    return await _engine(ctx).target.commit(wire.Commit.from_wire(args), _caller(ctx))


@peer_router.op("teleport.abort", summary="target: undo a session")
async def t_abort(ctx: Context, args: Args) -> dict[str, Any]:
    msg = wire.SessionRef.from_wire(args, "abort")
    return {"status": str(await _engine(ctx).target.abort(msg.sid, _caller(ctx)))}


@peer_router.op("teleport.status", summary="target: where a session stands")
async def t_status(ctx: Context, args: Args) -> dict[str, Any]:
    msg = wire.StatusQuery.from_wire(args, "status")
    caller = _caller(ctx)
    # A member relaying the source's question names the source (read-only: a status
    # changes nothing, so a member may ask on another's behalf).
    asker = msg.on_behalf if msg.on_behalf is not None else caller
    return {"status": str(await _engine(ctx).target.status(msg.sid, asker))}


RELAY_TIMEOUT = 3.0
"""Seconds a relaying member waits for the target (the source asks again anyway)."""


@peer_router.op("teleport.relay_status",
                summary="any member: ask a target where a session stands, for its source")
async def t_relay_status(ctx: Context, args: Args) -> dict[str, Any]:
    """Why: a source cut off from its target after the restore request must learn the
    outcome; another member that still reaches the target asks for it. Status only:
    a relayed confirm or abort would let any member decide another's switchover."""
    msg = wire.RelayStatus.from_wire(args)
    caller = _caller(ctx)
    peers = ctx.daemon.services.require(PEERS)
    if msg.target in (caller, peers.name):
        raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                         f"relay_status: target {msg.target!r} is the asker or this node")
    if msg.target not in links.member_names(peers):
        raise ProtoError(ErrorCode.NOT_FOUND, f"relay_status: no member {msg.target!r}")
    ans = await peers.call(msg.target, "teleport.status",
                           wire.StatusQuery(msg.sid, on_behalf=caller).to_wire(),
                           timeout=RELAY_TIMEOUT)
    return {"status": str(wire.status_from_wire(ans))}


plugin = Plugin("migration", requires=("lifecycle", "network", "peers"), router=router,
                peer_router=peer_router, start=start_teleport, stop=stop_teleport)

__all__ = ["TeleportError", "Teleports", "peer_router", "plugin", "router"]
