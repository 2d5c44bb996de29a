"""API ops of the overlay and the daemon hooks that build the Network service.

The daemon starts this plug-in after the peer mesh (declared in ``plugin``): the
service, provided as NETWORK (deploy, rm and teleport use it), attaches to the
mesh's membership at start, before the peer port opens.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from cnvmd.api import Args, Context, Router
from cnvmd.services import NETWORK, PEERS, Plugin
from proto.messages import ProtoError

from .expose import refuse_node_port
from .names import NetworkError, parse_port_spec
from .service import Network

log = logging.getLogger("cnvmd.network")
router = Router()

_OWNER = r"(node:)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"


def _net(ctx: Context) -> Network:
    return ctx.daemon.services.require(NETWORK)


def _underlay_local(config: Any) -> str | None:
    """The VXLAN's local address: the peer mesh's listen address when it is a specific
    IPv4 address. Why: with no default route (VM-lab guests, whose only other NIC is
    the harness's ssh NIC) the underlay would be guessed from the first address found;
    the address the peers talk to is the one the tunnels must use."""
    addr = str(getattr(config, "listen_address", "") or "")
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError:
        return None
    return None if ip.is_unspecified or ip.is_loopback else addr


def _proto(exc: NetworkError) -> ProtoError:
    return ProtoError(exc.code, exc.message)


async def start_network(daemon: Any) -> None:
    """Create the service; repair what a previous daemon built. Never fails the daemon."""
    try:
        net = Network(daemon.config, store=daemon.state, local=_underlay_local(daemon.config))
    except NetworkError as exc:
        log.error("overlay network disabled: %s", exc)
        daemon.services.failed(NETWORK, str(exc))
        return
    daemon.services.provide(NETWORK, net)
    try:
        notes = await net.start()
        if notes:
            log.info("network reconciled", extra={"notes": notes})
    except Exception:
        log.exception("overlay network: repair at start failed; `cnvmctl net up` retries")

    peers = daemon.services.get(PEERS)
    if peers is not None:
        net.attach_peers(peers)


async def stop_network(daemon: Any) -> None:
    net = daemon.services.remove(NETWORK)
    if net is not None:
        await net.close()


async def _run(coro: Any) -> Any:
    try:
        return await coro
    except NetworkError as exc:
        raise _proto(exc) from None


@router.op("net.status")
async def net_status(ctx: Context, args: Args) -> dict[str, Any]:
    """The node's overlay: datapath, flood list, expose address, cnvm netns, ports."""
    args.reject_unknown()
    return await _run(_net(ctx).status())


@router.op("net.up")
async def net_up(ctx: Context, args: Args) -> dict[str, Any]:
    """Build or repair the overlay datapath (and, with expose, the node's address)."""
    expose = args.str("expose", None)
    args.reject_unknown()
    net = _net(ctx)
    await _run(net.ensure())
    if expose is not None:
        await _run(net.set_expose_address(expose))
    notes = await _run(net.reconcile())
    return {**await _run(net.status()), "notes": notes}


@router.op("net.down")
async def net_down(ctx: Context, args: Args) -> dict[str, Any]:
    """Remove published ports and the datapath; refused while cnvm networks exist."""
    force = args.bool("force", False)
    args.reject_unknown()
    return {"notes": await _run(_net(ctx).teardown(force=force))}


@router.op("net.host")
async def net_host(ctx: Context, args: Args) -> dict[str, Any]:
    """Give this node an overlay address (`ip`: an address or "auto"), or remove it."""
    ip = args.str("ip", "auto")
    remove = args.bool("remove", False)
    args.reject_unknown()
    addr = await _run(_net(ctx).set_expose_address(ip, remove=remove))
    return {"node": ctx.daemon.node_name, "expose_ip": addr}


@router.op("net.flood")
async def net_flood(ctx: Context, args: Args) -> dict[str, Any]:
    """Add/remove underlay addresses of overlay hosts outside the cluster (flooded to)."""
    add = args.list("add", [], of=str)
    remove = args.list("remove", [], of=str)
    args.reject_unknown()
    return {"extra_flood": await _run(_net(ctx).set_extra_flood(add, remove))}


@router.op("net.ipam")
async def net_ipam(ctx: Context, args: Args) -> dict[str, Any]:
    """Addresses in use in the cluster as this node knows them (ip -> owner), and the
    address ranges each node owns (partition-safe allocation: cnvmd.ipamring)."""
    args.reject_unknown()
    net = _net(ctx)
    return {"subnet": net.config.subnet, "in_use": net.ipam.table(),
            "ranges": net.ipam.ranges_view()}


@router.op("expose")
async def expose(ctx: Context, args: Args) -> dict[str, Any]:
    """Forward HOSTPORT on this node to PORT of cnvm NAME (spec HOSTPORT:PORT[/tcp|udp])."""
    name = args.name("name")
    spec = args.str("spec", max_len=32)
    args.reject_unknown()
    try:
        ps = parse_port_spec(spec)
        refuse_node_port(ps, ctx.daemon.config)
    except NetworkError as exc:
        raise _proto(exc) from None
    fwd = await _run(_net(ctx).expose(name, ps))
    return {**fwd.to_dict(), "node": ctx.daemon.node_name}


@router.op("unexpose")
async def unexpose(ctx: Context, args: Args) -> dict[str, Any]:
    """Stop forwarding HOSTPORT[/tcp|udp] of this node to cnvm NAME."""
    name = args.name("name")
    port = args.str("port", max_len=16)
    args.reject_unknown()
    fwd = await _run(_net(ctx).unexpose(name, port))
    return {**fwd.to_dict(), "node": ctx.daemon.node_name}


@router.op("exposes")
async def exposes(ctx: Context, args: Args) -> dict[str, Any]:
    """Published ports of this node (optionally only those of cnvm NAME)."""
    name = args.name("name", None)
    args.reject_unknown()
    return {"node": ctx.daemon.node_name,
            "exposes": [f.to_dict() for f in _net(ctx).exposes(name)]}


@router.op("net.allocate")
async def net_allocate(ctx: Context, args: Args) -> dict[str, Any]:
    """Reserve a cluster-unique overlay address for cnvm NAME (IP to claim one).

    NAME may also be `node:HOST` for a host outside the daemon's control (a client
    host joining the overlay by hand).
    """
    name = args.str("name", pattern=_OWNER)
    ip = args.str("ip", None, max_len=64)
    args.reject_unknown()
    return {"name": name, "ip": await _run(_net(ctx).allocate(name, ip))}


@router.op("net.release")
async def net_release(ctx: Context, args: Args) -> dict[str, Any]:
    """Free NAME's overlay address cluster-wide (what rm does); its published ports go."""
    name = args.str("name", pattern=_OWNER)
    args.reject_unknown()
    return {"name": name, "ip": await _run(_net(ctx).release(name))}


plugin = Plugin("network", requires=("peers",), router=router, start=start_network,
                stop=stop_network)
