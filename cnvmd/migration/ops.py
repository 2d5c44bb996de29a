"""Teleport API ops, the target-side ops the source calls through the peer mesh,
the `teleport.data` stream kind, and the daemon start hook.

Client ops:  teleport, teleport.cancel, teleport.reports
Target ops:  teleport.prepare / image / pages / restore / commit / abort / status
             (ordinary API ops: the source runs them on the target with the peer
             mesh's `forward`, so they get validation, events and cancellation)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from cnvmd import criu
from cnvmd.api import Args, Context, Router
from cnvmd.migration import link as links
from cnvmd.migration.policy import Mode
from cnvmd.migration.source import Options, Teleport, TeleportError
from cnvmd.migration.target import TargetSide, load_reports
from cnvmd.peers.streams import splice
from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.teleport")
router = Router()

MODES = tuple(m.value for m in Mode)


class SourceSide:
    """Teleports leaving this node, by cnvm name and by session id."""

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[Teleport, asyncio.Task[Any]]] = {}

    def by_sid(self, sid: str) -> Teleport | None:
        for t, _ in self.by_name.values():
            if t.sid == sid:
                return t
        return None


def _sides(daemon: Any) -> tuple[SourceSide, TargetSide]:
    src = daemon.services.get("teleport.source")
    tgt = daemon.services.get("teleport.target")
    if src is None or tgt is None:
        src = daemon.services.setdefault("teleport.source", SourceSide())
        tgt = daemon.services.setdefault("teleport.target", TargetSide(daemon))
    _register_stream(daemon)
    return src, tgt


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
    import dataclasses

    daemon.caps = dataclasses.replace(caps, pipe_max_size=criu.read_pipe_max_size())
    log.info("raised fs.pipe-max-size from %d to %d for lazy pages", cur,
             daemon.caps.pipe_max_size)


@router.on_startup
async def start_teleport(daemon: Any) -> None:
    await ensure_pipe_max_size(daemon)
    from cnvmd.migration import criushim

    daemon.services["teleport.criu"], daemon.services["teleport.criu_lazy"] = \
        await criushim.criu_for_teleport(daemon.config.criu, daemon.config.state_dir)
    _, tgt = _sides(daemon)

    from cnvmd.peers.ops import on_peers

    on_peers(daemon, lambda svc: _register_stream(daemon, svc))

    async def wait_peers() -> None:
        # The network and the peer mesh start after us (hooks run in module order):
        # clean interrupted arrivals once the network service can take back its netns.
        for _ in range(600):
            if daemon.services.get("peers") is not None:
                break
            await asyncio.sleep(0.05)
        try:
            await tgt.recover()
        except Exception:
            log.exception("cleaning interrupted teleports failed")

    daemon.services["teleport.init"] = asyncio.create_task(wait_peers())


@router.on_shutdown
async def stop_teleport(daemon: Any) -> None:
    t = daemon.services.pop("teleport.init", None)
    if t is not None:
        t.cancel()


def _register_stream(daemon: Any, svc: Any = None) -> bool:
    svc = svc if svc is not None else daemon.services.get("peers")
    if svc is None:
        return False
    if getattr(svc, "_cnvm_teleport_stream", False):
        return True

    async def handler(stream: Any, args: dict[str, Any]) -> None:
        await serve_data(daemon, stream, args)

    svc.register_stream(links.STREAM_KIND, handler)
    svc._cnvm_teleport_stream = True
    return True


async def serve_data(daemon: Any, stream: Any, args: dict[str, Any]) -> None:
    src, tgt = _sides(daemon)
    if args.get("what") == "pages":
        # A postcopy target's lazy-pages daemon, relayed to our lazy page server.
        t = src.by_sid(str(args.get("sid")))
        if t is None or not t.lazy_port:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no lazy teleport {args.get('sid')} here")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", t.lazy_port,
                                                          limit=links.CHUNK)
        except OSError as exc:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"lazy page server: {exc}") from None
        await stream.write_frame({"ok": True})
        await splice(stream, reader, writer, clean_eof=lambda: t.committed)
        return
    await tgt.serve_data(stream, args)


# --------------------------------------------------------------------------- client ops


@router.op("teleport", cancel_on_disconnect=False)
async def teleport(ctx: Context, args: Args) -> dict[str, Any]:
    """Move a running cnvm to another node, live (memory, TCP connections, IP, files)."""
    name = args.name("name")
    target = args.str("target", max_len=128)
    opts = Options(
        mode=args.str("mode", "auto", choices=MODES),
        max_downtime=args.float("max_downtime", 0.3, min=0.001, max=600),
        max_rounds=args.int("max_rounds", 8, min=1, max=100),
        lease=args.float("lease", 30.0, min=2, max=3600),
        hold={str(k): float(v) for k, v in (args.map("hold", {}) or {}).items()},
        fail_restore=args.bool("fail_restore", False),
        baseline=args.bool("baseline", False),
    )
    args.reject_unknown()
    if (opts.hold or opts.fail_restore) and not ctx.daemon.config.fault_injection:
        raise ProtoError(ErrorCode.PERMISSION_DENIED,
                         "teleport test hooks (hold, fail_restore) are off on this node; "
                         "they are for test labs (fault_injection = true in cnvmd.toml)")
    src, _ = _sides(ctx.daemon)
    if name in src.by_name:
        t0 = src.by_name[name][0]
        raise ProtoError(ErrorCode.BUSY, f"{name} is already being teleported to {t0.target} "
                         f"(phase {t0.phase}); wait, or `cnvmctl teleport --cancel {name}`")
    tp = Teleport(ctx.daemon, name, target, opts, ctx.emit)
    life = ctx.daemon.services.get("lifecycle")
    task = asyncio.current_task()
    assert task is not None
    src.by_name[name] = (tp, task)
    try:
        lock = life.lock(name) if life is not None else contextlib.nullcontext()
        if life is not None and lock.locked():
            raise ProtoError(ErrorCode.BUSY, f"{name} is busy with another operation")
        async with lock:
            report = await tp.run()
    finally:
        src.by_name.pop(name, None)
    return report.to_dict()


@router.op("teleport.cancel")
async def teleport_cancel(ctx: Context, args: Args) -> dict[str, Any]:
    """Cancel a teleport in flight: the cnvm is resumed where it was (if not yet moved)."""
    name = args.name("name")
    args.reject_unknown()
    src, _ = _sides(ctx.daemon)
    entry = src.by_name.get(name)
    if entry is None:
        raise ProtoError(ErrorCode.NOT_FOUND, f"no teleport of {name} in flight on "
                         f"{ctx.daemon.node_name}")
    tp, task = entry
    if tp.committed:
        raise ProtoError(ErrorCode.CONFLICT, f"{name} already runs on {tp.target}; the "
                         "teleport is only cleaning up")
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait({task}, timeout=120)
    return {"name": name, "cancelled": True, "phase": tp.phase,
            "rolled_back": tp.report.rolled_back}


@router.op("teleport.reports")
async def teleport_reports(ctx: Context, args: Args) -> dict[str, Any]:
    """The kept teleport reports of a cnvm (they travel with it)."""
    name = args.name("name")
    args.reject_unknown()
    return {"name": name,
            "reports": await asyncio.to_thread(load_reports, ctx.daemon.state, name)}


# --------------------------------------------------------------------------- target ops


def _tgt(ctx: Context) -> TargetSide:
    return _sides(ctx.daemon)[1]


@router.op("teleport.prepare", summary="(peer) target: preflight and prepare a session")
async def t_prepare(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).prepare(dict(args))


@router.op("teleport.image", summary="(peer) target: register the shipped image, mount rootfs")
async def t_image(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).image(args.str("sid"))


@router.op("teleport.pages", summary="(peer) target: start a CRIU page server")
async def t_pages(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).pages(args.str("sid"), args.int("round", None, min=0),
                                 args.str("parent", None, pattern=r"round-[0-9]+"))


@router.op("teleport.restore", cancel_on_disconnect=False,
           summary="(peer) target: restore the cnvm and take it over")
async def t_restore(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).restore(dict(args))


@router.op("teleport.commit", summary="(peer) target: the source let go; keep the history")
async def t_commit(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).commit(args.str("sid"), args.list("reports", [], of=dict))


@router.op("teleport.abort", summary="(peer) target: undo a session")
async def t_abort(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).abort(args.str("sid"))


@router.op("teleport.pagemaps", summary="(peer) target: a pre-dump round's pagemap images")
async def t_pagemaps(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).pagemaps(args.str("sid"), args.int("round", min=0))


@router.op("teleport.status", summary="(peer) target: where a session stands")
async def t_status(ctx: Context, args: Args) -> dict[str, Any]:
    return await _tgt(ctx).status(args.str("sid"))


__all__ = ["TeleportError", "router"]
