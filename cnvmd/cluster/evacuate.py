"""`evacuate NODE`: cordon a node and teleport every cnvm off it, N at a time.

A daemon op (on the node it is asked of, which need not be NODE), declared
``cancel_on_disconnect=False``: it survives the CLI dying; its progress is streamed
as ``evacuate`` events while a client listens; an explicit cancel (Ctrl-C in
cnvmctl) cancels the teleports in flight, each rolled back by the teleport engine
(the cnvm resumes on NODE). Each teleport is asked of NODE (the source) exactly as
`cnvmctl teleport` would.

Plan: the cnvms listed by NODE itself (not the directory, which may lag), largest
memory first, each to the best node (cnvmd.cluster.placement: memory fit, spread,
skipping cordoned and down ones, only `--to` nodes if given) counting what the plan
already put there. A cnvm that fails keeps running on NODE and is reported; the
others go on; no second target is tried (the failure may be the cnvm's, and a
rerun retries only what is left).

Parallelism (``-j``): default `default_parallel`: a teleport keeps about one core
busy at the source (CRIU dump, tar, SSH cipher) and, while pages stream, about
1 Gbit/s of link; so min(source CPUs, link Gbit/s (1 if unknown), 2 per target).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cnvmd.api import Args, Context, Router, dispatch
from cnvmd.services import DIRECTORY, PEERS
from proto.messages import ErrorCode, ProtoError

from . import placement
from .directory import NODE_RE, Resources

router = Router()
MODES = ("auto", "postcopy", "stop-copy", "precopy", "hybrid")
EVT = "evacuate"
MAX_PARALLEL = 64


def default_parallel(src: Resources | None, targets: int) -> int:
    cpus = src.cpus if src is not None else 1
    link = max(1, (src.link_mbps if src is not None else 0) // 1000) or 1
    return max(1, min(cpus, link, 2 * max(1, targets)))


async def _call(ctx: Context, node: str, op: str, args: dict[str, Any], *,
                on_event: Any = None) -> Any:
    """API op `op` on `node` (this node: in process, with its own Context)."""
    d = ctx.daemon
    if node == d.node_name:
        return await dispatch(d.router, Context.local(op, daemon=d, on_event=on_event), op,
                              args)
    return await d.services.require(PEERS).forward(node, op, args, on_event=on_event)


@router.op("evacuate", cancel_on_disconnect=False)
async def evacuate(ctx: Context, args: Args) -> dict[str, Any]:
    """Cordon NODE and teleport its cnvms to other nodes, at most PARALLEL at once."""
    node = args.str("node", pattern=NODE_RE.pattern)
    to = args.list("to", [], of=str)
    par = args.int("parallel", None, min=1, max=MAX_PARALLEL)
    mode = args.str("mode", "auto", choices=MODES)
    dry = args.bool("dry_run", False)
    args.reject_unknown()
    if len(to) > 256 or not all(NODE_RE.fullmatch(t) for t in to):
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, "--to takes node names")
    cl = ctx.daemon.services.require(DIRECTORY)
    if node != cl.node and (cl.peers is None or cl.peers.membership.get(node) is None):
        raise ProtoError(ErrorCode.NOT_FOUND, f"no member named {node!r}")
    if node in to:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"--to {node}: that is the node to empty")
    for t in to:
        if t != cl.node and (cl.peers is None or cl.peers.membership.get(t) is None):
            raise ProtoError(ErrorCode.NOT_FOUND, f"--to {t}: no such member")
    t0 = time.monotonic()
    if not dry:
        await _call(ctx, node, "cordon", {"node": node})
    listed = await _call(ctx, node, "ls", {})
    rows = [r for r in listed if isinstance(r, dict) and r.get("managed")]
    movable = [r for r in rows if r.get("state") in ("running", "paused")]
    skipped = [r for r in rows if r not in movable]
    movable.sort(key=lambda r: (-(r.get("memory") or 0), r["name"]))
    plan = placement.Plan()
    items: list[dict[str, Any]] = []
    capable = cl.teleport_capable

    def alive(n: str) -> bool:
        return cl.member_state(n) == "alive"

    for r in movable:
        need = r.get("memory") or placement.DEFAULT_NEED
        e = next((x for x in cl.dir.where(r["name"]) if x.node == node), None)
        cands = placement.candidates(cl.dir, need=need, alive=alive, exclude=(node,),
                                     only=to or None, image_id=e.image_id if e else None,
                                     plan=plan, capable=capable)
        target = next((n for n, w in cands if w is None), None)
        item: dict[str, Any] = {"cnvm": r["name"], "from": node, "to": target,
                                "memory": r.get("memory"), "mode": None, "frozen": None,
                                "bytes": None, "seconds": None, "result": "planned",
                                "error": None}
        if target is None:
            item["result"] = "failed"
            item["error"] = "no node fits: " + "; ".join(f"{n}: {w}" for n, w in cands)
        else:
            plan.add(target, need)
        items.append(item)
    for r in skipped:
        items.append({"cnvm": r["name"], "from": node, "to": None, "memory": r.get("memory"),
                      "mode": None, "frozen": None, "bytes": None, "seconds": None,
                      "result": "skipped", "error": f"not running ({r.get('state')}): "
                      "teleport moves running cnvms only"})
    targets = {i["to"] for i in items if i["to"]}
    j = par or default_parallel(cl.dir.resources(node), len(targets))

    def summary(done: bool) -> dict[str, Any]:
        moved = sum(1 for i in items if i["result"] == "moved")
        failed = [i["cnvm"] for i in items if i["result"] in ("failed", "skipped")]
        return {"node": node, "cordoned": not dry, "parallel": j, "mode": mode,
                "dry_run": dry, "items": items, "moved": moved, "failed": len(failed),
                "left": failed if done else None, "total": len(items),
                "seconds": round(time.monotonic() - t0, 3)}

    ctx.emit(EVT, {"kind": "plan", **summary(False)})
    if dry:
        return summary(True)
    sem = asyncio.Semaphore(j)

    async def one(item: dict[str, Any]) -> None:
        async with sem:
            item["result"] = "moving"
            start = time.monotonic()
            ctx.emit(EVT, {"kind": "item", "item": item})

            def on_event(*ev: Any) -> None:
                name, data = (ev[0].name, ev[0].data) if len(ev) == 1 else (ev[0], ev[1])
                if name == "progress" and isinstance(data, dict) and data.get("phase"):
                    item["phase"] = str(data["phase"])[:32]
                    ctx.emit(EVT, {"kind": "item", "item": item})

            try:
                rep = await _call(ctx, node, "teleport",
                                  {"name": item["cnvm"], "target": item["to"], "mode": mode},
                                  on_event=on_event)
                item.update(result="moved" if rep.get("ok", True) else "failed",
                            mode=rep.get("mode"), frozen=rep.get("frozen_seconds"),
                            bytes=rep.get("wire_bytes"))
            except ProtoError as exc:
                rep = (exc.details or {}).get("report") if isinstance(exc.details, dict) \
                    else None
                item.update(result="failed", error=exc.message[:300])
                if isinstance(rep, dict):
                    item.update(mode=rep.get("mode"), frozen=rep.get("frozen_seconds"),
                                bytes=rep.get("wire_bytes"))
            item["seconds"] = round(time.monotonic() - start, 3)
            item.pop("phase", None)
            ctx.emit(EVT, {"kind": "item", "item": item})

    tasks = [asyncio.create_task(one(i)) for i in items if i["result"] == "planned"]
    try:
        if tasks:
            await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        for i in items:
            if i["result"] in ("planned", "moving"):
                i["result"], i["error"] = "cancelled", "evacuation cancelled"
        raise
    out = summary(True)
    ctx.emit(EVT, {"kind": "done", **out})
    return out
