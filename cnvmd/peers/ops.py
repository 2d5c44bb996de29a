"""API ops of the peer mesh and the daemon start/stop hooks.

The daemon starts this plug-in (``plugin``) before the subsystems that need the
mesh; the PeerService is provided as PEERS (cnvmd.services) for them (overlay FDB,
IPAM, teleport).
"""

from __future__ import annotations

import logging
from typing import Any

from cnvmd.api import Args, Context, Router, dispatch
from cnvmd.services import DIRECTORY, NETWORK, PEERS, Plugin

from .service import PeerService
from .trust import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL

log = logging.getLogger("cnvmd.peers")

router = Router()


def _svc(ctx: Context) -> PeerService:
    return ctx.daemon.services.require(PEERS)


async def start_peers(daemon: Any) -> None:
    caps: dict[str, Any] = {}
    if getattr(daemon, "caps", None) is not None:
        try:
            caps = dict(daemon.caps.to_dict())
        except Exception:
            caps = {}
    caps.update({k: v for k, v in (getattr(daemon, "versions", {}) or {}).items() if v})
    # Every subsystem's peer ops and stream kinds are in daemon.peer_router before the
    # port opens, so a peer never meets a member that answers "unknown peer op".
    svc = PeerService(daemon.config, capabilities=_msgpackable(caps),
                      router=daemon.peer_router, api_router=daemon.router, daemon=daemon)
    try:
        await svc.start()
    except OSError as exc:
        # The node's cnvms must not suffer for a busy port: serve local ops, say why.
        log.error("peer mesh not started: cannot listen on %s:%s: %s",
                  daemon.config.listen_address, daemon.config.peer_port, exc)
        daemon.services.failed(PEERS, str(exc))
        await svc.stop()
        return
    daemon.services.provide(PEERS, svc)


async def stop_peers(daemon: Any) -> None:
    svc = daemon.services.remove(PEERS)
    if svc is not None:
        await svc.stop()


def _msgpackable(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in d.items()
            if isinstance(v, str | int | float | bool | type(None) | list)}


@router.op("cluster.init")
async def cluster_init(ctx: Context, args: Args) -> dict[str, Any]:
    """Create a new cluster with this node as its first member."""
    args.reject_unknown()
    return await _svc(ctx).cluster_init()


@router.op("cluster.token")
async def cluster_token(ctx: Context, args: Args) -> dict[str, Any]:
    """Mint a single-use join token (default TTL 10 min)."""
    ttl = args.float("ttl", DEFAULT_TOKEN_TTL, min=1.0, max=MAX_TOKEN_TTL)
    args.reject_unknown()
    return await _svc(ctx).mint_token(ttl)


@router.op("join")
async def join(ctx: Context, args: Args) -> dict[str, Any]:
    """Join the cluster of PEER (address[:port]) with a token minted by any member."""
    peer = args.str("peer")
    token = args.str("token")
    args.reject_unknown()
    return await _svc(ctx).join(peer, token)


@router.op("cluster.remove")
async def cluster_remove(ctx: Context, args: Args) -> dict[str, Any]:
    """Revoke a member: its key is unpinned everywhere and the cluster secret rotated."""
    node = args.str("node")
    args.reject_unknown()
    out = await _svc(ctx).remove(node)
    net = ctx.daemon.services.get(NETWORK)
    if net is not None:  # its address ranges come to this node (one decision)
        out["ranges_taken"] = await net.ipam.reclaim(node)
    return out


@router.op("nodes")
async def nodes(ctx: Context, args: Args) -> dict[str, Any]:
    """Members as this node sees them: address, state, last seen, cnvms, capabilities."""
    args.reject_unknown()
    svc = _svc(ctx)
    out = svc.nodes()
    directory = ctx.daemon.services.get(DIRECTORY)
    if directory is not None:  # cnvm counts, memory, CPUs, load, cordon (cnvmd.cluster)
        from cnvmd.cluster.ops import node_rows

        node_rows(directory, out)
    return {"node": svc.name, "cluster_id": svc.cluster.cluster_id if svc.cluster else None,
            "nodes": out}


@router.op("forward")
async def forward(ctx: Context, args: Args) -> Any:
    """Run API op OP with ARGS on node NODE over the peer mesh (events are relayed)."""
    node = args.str("node")
    op = args.str("op")
    op_args = args.map("args", {})
    timeout = args.float("timeout", None, min=0.0)
    args.reject_unknown()
    svc = _svc(ctx)
    if node == svc.name:  # as a request of its own: same events, cancel, errors
        return await dispatch(ctx.daemon.router, ctx.nested(op), op, op_args)
    return await svc.forward(node, op, op_args, timeout=timeout, on_event=ctx.emit)


plugin = Plugin("peers", router=router, start=start_peers, stop=stop_peers)
