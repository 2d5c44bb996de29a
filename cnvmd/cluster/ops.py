"""The cluster plug-in: the directory (DIRECTORY service), any-node routing of the
ops that name a cnvm, placement, cordon, and their API and peer ops.

Any-node routing: at start the plug-in wraps the API ops listed in `ROUTED` (and
`deploy`) in this daemon's router. A request from a local client for a cnvm that
has no record here but that the directory places on another node is forwarded to
that node over the peer mesh (``PeerService.forward``: events such as ``logs -f``
output and teleport progress are relayed, a cancel reaches the far handler); the
answer carries ``node``. A request that arrived from a peer is never forwarded again
(no loops). `expose` is not routed: it publishes a port on the node it is asked of,
which forwards to the cnvm wherever it runs.

API ops:  cluster.ls, cordon, uncordon, place (and evacuate, cnvmd.cluster.evacuate)
Peer ops: dir.push (a node's own document), dir.claim, dir.abandon (name claims)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from cnvmd import bundle, inventory
from cnvmd.api import Args, Context, Handler, OpSpec, Router
from cnvmd.services import DIRECTORY, PEERS, Plugin
from cnvmd.state import StateError
from proto.messages import ErrorCode, ProtoError

from . import placement
from .directory import NAME_RE, NODE_RE, Entry
from .service import ClusterService

log = logging.getLogger("cnvmd.cluster")
router = Router()
peer_router = Router()

ROUTED = ("inspect", "logs", "exec", "stop", "start", "rm", "teleport", "teleport.cancel",
          "teleport.reports")
"""API ops that name a cnvm (arg ``name``) and are carried out by the node running it."""


def _svc(ctx: Context) -> ClusterService:
    return ctx.daemon.services.require(DIRECTORY)


def _bad(msg: str, **details: Any) -> ProtoError:
    return ProtoError(ErrorCode.INVALID_ARGUMENT, msg, details or None)


def _tag(res: Any, node: str) -> Any:
    if isinstance(res, dict) and "node" not in res:
        return {**res, "node": node}
    return res


async def _has_record(daemon: Any, name: str) -> bool:
    try:
        return await asyncio.to_thread(daemon.state.load, "cnvms", name) is not None
    except StateError:
        return True  # a corrupt record is still this node's business


def check_target(cl: ClusterService, target: str, *, what: str, strict: bool = True) -> None:
    """A node new cnvms may land on: not cordoned, and (`strict`) a member, alive.
    (A teleport checks only the cordon here: the engine says the rest in its words.)"""
    r = cl.dir.resources(target)
    if r is not None and r.cordoned:
        raise ProtoError(ErrorCode.CONFLICT, f"{target} is cordoned: no new cnvm lands on it "
                         f"({what}; `cnvmctl uncordon {target}` lifts it)", {"node": target})
    if not strict:
        return
    if target != cl.node and (cl.peers is None or cl.peers.membership.get(target) is None):
        raise ProtoError(ErrorCode.NOT_FOUND, f"no member named {target!r}")
    if cl.member_state(target) == "down":
        raise ProtoError(ErrorCode.UNAVAILABLE, f"{target} is down")


def auto_target(cl: ClusterService, *, need: int | None, image_id: str | None,
                exclude: tuple[str, ...] = (), teleport: bool = False) -> str:
    """`auto`: the best node by free memory against the limit, capabilities and spread."""
    want = need or placement.DEFAULT_NEED
    cands = placement.candidates(cl.dir, need=want, exclude=exclude, image_id=image_id,
                                 alive=lambda n: cl.member_state(n) == "alive",
                                 capable=cl.teleport_capable if teleport else None)
    for node, why in cands:
        if why is None:
            return node
    raise ProtoError(ErrorCode.UNAVAILABLE, "no node fits: " + "; ".join(
        f"{n}: {w}" for n, w in cands) if cands else "no node known")


# --------------------------------------------------------------------------- routing


def _routed(spec: OpSpec) -> Handler:
    orig = spec.handler

    async def handler(ctx: Context, args: Args) -> Any:
        d = ctx.daemon
        cl = d.services.get(DIRECTORY)
        name = args.get("name")
        if cl is None or ctx.node is not None or not isinstance(name, str) \
                or not NAME_RE.fullmatch(name):
            return _tag(await orig(ctx, args), d.node_name)
        raw = dict(args)
        local = await _has_record(d, name)
        e = None if local else cl.dir.lookup(name)
        where = d.node_name if e is None or e.node == d.node_name else e.node
        if spec.name == "teleport":
            raw["target"] = _teleport_target(cl, raw.get("target"), where, e, name)
        if where == d.node_name:
            return _tag(await orig(ctx, Args(raw)), where)
        peers = d.services.require(PEERS)
        res = await peers.forward(where, spec.name, raw, on_event=ctx.emit)
        return _tag(res, where)

    return handler


def _teleport_target(cl: ClusterService, target: Any, source: str, e: Entry | None,
                     name: str) -> Any:
    if not isinstance(target, str):
        return target  # the op's own validation says what is wrong
    if target == "auto":
        if e is None:
            e = next((x for x in cl.dir.where(name) if x.node == source), None)
        return auto_target(cl, need=e.memory if e else None, image_id=e.image_id if e else None,
                           exclude=(source,), teleport=True)
    if NODE_RE.fullmatch(target) and target != source:
        check_target(cl, target, what=f"teleport of {name}", strict=False)
    return target


def _deploy(spec: OpSpec) -> Handler:
    orig = spec.handler

    async def handler(ctx: Context, args: Args) -> Any:
        d = ctx.daemon
        cl = d.services.get(DIRECTORY)
        raw = dict(args)
        where = raw.pop("node", None)
        if where is not None and (not isinstance(where, str) or not (
                where == "auto" or NODE_RE.fullmatch(where))):
            raise _bad("node must be a node name or 'auto'", arg="node")
        if cl is None:
            if where not in (None, d.node_name):
                raise ProtoError(ErrorCode.UNAVAILABLE, "the cluster directory is not running "
                                 "on this node: deploy here only")
            return await orig(ctx, Args(raw))
        if ctx.node is None and where not in (None, d.node_name):
            if where == "auto":
                where = auto_target(cl, need=_memory(raw.get("memory")), image_id=None)
            else:
                check_target(cl, where, what=f"deploy of {raw.get('name')}")
            if where != d.node_name:
                from .images import ensure_image

                await ensure_image(d, where, raw.get("image"), ctx)
                res = await d.services.require(PEERS).forward(where, "deploy", raw,
                                                              on_event=ctx.emit)
                return _tag(res, where)
        if cl.cordoned:
            raise ProtoError(ErrorCode.CONFLICT, f"{d.node_name} is cordoned: no new cnvm "
                             f"lands on it (`cnvmctl uncordon {d.node_name}` lifts it)",
                             {"node": d.node_name})
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            bundle.check_name(name)  # the usual invalid_argument
        async with cl.claim(str(name)):
            res = await orig(ctx, Args(raw))
        return _tag(res, d.node_name)

    return handler


def _memory(v: Any) -> int | None:
    if v in (None, ""):
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    try:
        return bundle.parse_memory(v)
    except Exception:
        raise _bad(f"bad memory {str(v)[:32]!r}", arg="memory") from None


def _prepare_guard(spec: OpSpec) -> Handler:
    orig = spec.handler

    async def handler(ctx: Context, args: Args) -> Any:
        cl = ctx.daemon.services.get(DIRECTORY)
        if cl is not None and cl.cordoned:
            raise ProtoError(ErrorCode.CONFLICT, f"{cl.node} is cordoned: no new cnvm lands "
                             "on it", {"node": cl.node})
        return await orig(ctx, args)

    return handler


def install_routing(daemon: Any) -> None:
    """Wrap the routed ops of this daemon's routers (once)."""
    ops = daemon.router.ops
    for name in ROUTED:
        spec = ops.get(name)
        if spec is not None and not getattr(spec.handler, "_cluster_routed", False):
            h = _routed(spec)
            h._cluster_routed = True  # type: ignore[attr-defined]
            ops[name] = dataclasses.replace(spec, handler=h)
    spec = ops.get("deploy")
    if spec is not None and not getattr(spec.handler, "_cluster_routed", False):
        h = _deploy(spec)
        h._cluster_routed = True  # type: ignore[attr-defined]
        ops["deploy"] = dataclasses.replace(spec, handler=h)
    pops = daemon.peer_router.ops
    spec = pops.get("teleport.prepare")
    if spec is not None and not getattr(spec.handler, "_cluster_routed", False):
        h = _prepare_guard(spec)
        h._cluster_routed = True  # type: ignore[attr-defined]
        pops["teleport.prepare"] = dataclasses.replace(spec, handler=h)


# --------------------------------------------------------------------------- start/stop


async def start_cluster(daemon: Any) -> None:
    svc = ClusterService(daemon)
    await svc.start()
    daemon.services.provide(DIRECTORY, svc)
    install_routing(daemon)


async def stop_cluster(daemon: Any) -> None:
    svc = daemon.services.remove(DIRECTORY)
    if svc is not None:
        await svc.stop()


# --------------------------------------------------------------------------- API ops


def node_rows(cl: ClusterService, nodes: list[dict[str, Any]]) -> None:
    """Add the directory's view (cnvm count, memory, CPUs, load, cordon) to `nodes`."""
    for n in nodes:
        name = n.get("name")
        doc = cl.dir.docs.get(name) if isinstance(name, str) else None
        if doc is None:  # no document from it yet: unknown, not 0
            n.update({"cnvm_count": None, "cordoned": None})
            continue
        r = doc.resources
        n.update({"cnvm_count": len(doc.entries), "mem_total": r.mem_total,
                  "mem_free": r.mem_free, "cpus": r.cpus, "load": r.load,
                  "cordoned": r.cordoned, "link_mbps": r.link_mbps,
                  "directory_version": list(doc.order())})


@router.op("cluster.ls")
async def cluster_ls(ctx: Context, args: Args) -> dict[str, Any]:
    """Every cnvm of the cluster with its node (`node` filters): this node's rows live
    (as `ls`: pid, uptime, adoption, unmanaged containers), the others' from the
    directory (node_state says whether their node answers)."""
    node = args.str("node", None, pattern=NODE_RE.pattern)
    args.reject_unknown()
    cl = _svc(ctx)
    await cl.refresh()
    dups = cl.dir.duplicates()
    rows: list[dict[str, Any]] = []
    if node is None or node == cl.node:
        mine = cl.dir.mine.entries
        for r in await inventory.snapshot(ctx.daemon):
            e = mine.get(r["name"])
            rows.append({**r, "node": cl.node, "node_state": "alive",
                         "mem_use": e.mem_use if e else None,
                         "duplicate": r["name"] in dups})
    for e in cl.dir.entries():
        if e.node == cl.node or (node is not None and e.node != node):
            continue
        rows.append({**e.to_dict(), "pid": None, "managed": True, "adopted": False,
                     "uptime": None, "node_state": cl.member_state(e.node),
                     "duplicate": e.name in dups})
    rows.sort(key=lambda r: (r["name"], r["node"]))
    return {"node": cl.node, "cluster": cl.peers is not None, "cnvms": rows,
            "duplicates": dups}


async def _cordon(ctx: Context, args: Args, on: bool) -> dict[str, Any]:
    node = args.str("node", pattern=NODE_RE.pattern)
    args.reject_unknown()
    cl = _svc(ctx)
    if node != cl.node:
        if ctx.node is not None:
            raise _bad(f"{node} is not this node ({cl.node})")
        res = await ctx.daemon.services.require(PEERS).forward(
            node, "cordon" if on else "uncordon", {"node": node})
        return _tag(res, node)
    await cl.set_cordoned(on)
    return {"node": cl.node, "cordoned": on, "cnvms": len(cl.dir.mine.entries)}


@router.op("cordon")
async def cordon(ctx: Context, args: Args) -> dict[str, Any]:
    """Cordon NODE: no new cnvm (deploy, teleport) lands on it; its cnvms keep running."""
    return await _cordon(ctx, args, True)


@router.op("uncordon")
async def uncordon(ctx: Context, args: Args) -> dict[str, Any]:
    """Lift the cordon of NODE."""
    return await _cordon(ctx, args, False)


@router.op("place")
async def place(ctx: Context, args: Args) -> dict[str, Any]:
    """Where `auto` would put a cnvm of MEMORY (bytes or "256M"), and why not elsewhere."""
    mem = _memory(args.get("memory"))
    args.str("memory", None) if isinstance(args.get("memory"), str) else args.int(
        "memory", None, min=0)
    args.reject_unknown()
    cl = _svc(ctx)
    cands = placement.candidates(cl.dir, need=mem or placement.DEFAULT_NEED,
                                 alive=lambda n: cl.member_state(n) == "alive")
    best = next((n for n, w in cands if w is None), None)
    return {"node": best, "candidates": [{"node": n, "why_not": w} for n, w in cands]}


# --------------------------------------------------------------------------- peer ops


@peer_router.op("dir.push", summary="a member's directory document (its own only)")
async def dir_push(ctx: Context, args: Args) -> dict[str, Any]:
    if not ctx.node:
        raise ProtoError(ErrorCode.PERMISSION_DENIED, "for members")
    try:
        have = _svc(ctx).absorb(ctx.node, dict(args))
    except (ValueError, TypeError) as exc:
        raise _bad(f"directory document refused: {str(exc)[:200]}") from None
    return {"have": list(have) if have else None}


@peer_router.op("dir.claim", summary="grant or refuse a name claim of the caller")
async def dir_claim(ctx: Context, args: Args) -> dict[str, Any]:
    name = args.str("name", pattern=NAME_RE.pattern, max_len=63)
    args.reject_unknown()
    if not ctx.node:
        raise ProtoError(ErrorCode.PERMISSION_DENIED, "for members")
    return _svc(ctx).dir.on_claim(name, ctx.node)


@peer_router.op("dir.abandon", summary="the caller gives up its claim of a name")
async def dir_abandon(ctx: Context, args: Args) -> dict[str, Any]:
    name = args.str("name", pattern=NAME_RE.pattern, max_len=63)
    args.reject_unknown()
    if not ctx.node:
        raise ProtoError(ErrorCode.PERMISSION_DENIED, "for members")
    _svc(ctx).dir.on_abandon(name, ctx.node)
    return {"ok": True}


from . import evacuate as _evacuate  # noqa: E402  (registers the evacuate op)
from . import images as _images  # noqa: E402

router.include(_evacuate.router)
peer_router.include(_images.peer_router)

plugin = Plugin("cluster", requires=("peers", "lifecycle"), router=router,
                peer_router=peer_router, start=start_cluster, stop=stop_cluster)
