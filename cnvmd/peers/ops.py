"""API ops of the peer mesh and the daemon start/stop hooks.

Discovered by the daemon through ``cnvmd.peers.router``. The PeerService is
published as ``daemon.services["peers"]`` for other subsystems (overlay FDB,
teleport) to use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from cnvmd.api import Args, Context, Router, Session
from proto.framing import FrameDecoder, encode_frame
from proto.messages import ErrorCode, ProtoError, hello, request

from .service import PeerService
from .trust import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL

log = logging.getLogger("cnvmd.peers")

router = Router()


def _svc(ctx: Context) -> PeerService:
    svc = ctx.daemon.services.get("peers")
    if svc is None:
        why = ctx.daemon.services.get("peers_error")
        raise ProtoError(ErrorCode.UNAVAILABLE, "the peer mesh is not running on this node"
                         + (f": {why}" if why else ""))
    return svc


PEER_HOOKS = "peers.hooks"


def on_peers(daemon: Any, attach: Callable[[PeerService], None]) -> None:
    """Call `attach(svc)` with the peer service before it serves (or now, if it does)."""
    svc = daemon.services.get("peers")
    if svc is not None:
        attach(svc)
    else:
        daemon.services.setdefault(PEER_HOOKS, []).append(attach)


@router.on_startup
async def start_peers(daemon: Any) -> None:
    caps: dict[str, Any] = {}
    if getattr(daemon, "caps", None) is not None:
        try:
            caps = dict(daemon.caps.to_dict())
        except Exception:
            caps = {}
    caps.update({k: v for k, v in (getattr(daemon, "versions", {}) or {}).items() if v})
    svc = PeerService(daemon.config, capabilities=_msgpackable(caps))
    svc.set_forward_handler(lambda op, args, emit: run_local_op(daemon, op, args, emit))
    # Subsystems register their peer ops and streams before the port opens, so a peer
    # never meets a member that answers "unknown peer op" while it starts.
    for attach in daemon.services.pop(PEER_HOOKS, []):
        attach(svc)
    try:
        await svc.start()
    except OSError as exc:
        # The node's cnvms must not suffer for a busy port: serve local ops, say why.
        log.error("peer mesh not started: cannot listen on %s:%s: %s",
                  daemon.config.listen_address, daemon.config.peer_port, exc)
        daemon.services["peers_error"] = str(exc)
        await svc.stop()
        return
    daemon.services["peers"] = svc


@router.on_shutdown
async def stop_peers(daemon: Any) -> None:
    svc = daemon.services.pop("peers", None)
    if svc is not None:
        await svc.stop()


def _msgpackable(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in d.items()
            if isinstance(v, str | int | float | bool | type(None) | list)}


async def run_local_op(daemon: Any, op: str, args: dict[str, Any],
                       emit: Callable[[str, dict[str, Any]], None]) -> Any:
    """Run an API op of this daemon for a peer, through a private api.Session, so the
    op sees exactly what a local client would cause (validation, events, cancel)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    dec = FrameDecoder()

    def write(data: bytes) -> None:
        for msg in dec.feed(data):
            t = msg.get("t")
            if t == "evt":
                emit(str(msg.get("event")), msg.get("data") or {})
            elif t == "res" and not fut.done():
                if msg.get("ok"):
                    fut.set_result(msg.get("result"))
                else:
                    fut.set_exception(ProtoError.from_wire(msg.get("error")))

    def close() -> None:
        if not fut.done():
            fut.set_exception(ProtoError(ErrorCode.INTERNAL, "session closed"))

    sess = Session(daemon.router, daemon, write, close)
    sess.feed(encode_frame(hello("cnvmd-peer")))
    sess.feed(encode_frame(request(1, op, args)))
    try:
        return await fut
    finally:
        sess.lost()


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
    return await _svc(ctx).remove(node)


@router.op("nodes")
async def nodes(ctx: Context, args: Args) -> dict[str, Any]:
    """Members as this node sees them: address, state, last seen, cnvms, capabilities."""
    args.reject_unknown()
    svc = _svc(ctx)
    return {"node": svc.name, "cluster_id": svc.cluster.cluster_id if svc.cluster else None,
            "nodes": svc.nodes()}


@router.op("forward")
async def forward(ctx: Context, args: Args) -> Any:
    """Run API op OP with ARGS on node NODE over the peer mesh (events are relayed)."""
    node = args.str("node")
    op = args.str("op")
    op_args = args.map("args", {})
    timeout = args.float("timeout", None, min=0.0)
    args.reject_unknown()
    svc = _svc(ctx)
    if node == svc.name:
        return await run_local_op(ctx.daemon, op, op_args, ctx.emit)
    return await svc.forward(node, op, op_args, timeout=timeout, on_event=ctx.emit)
