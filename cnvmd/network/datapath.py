"""The kernel datapath of one node: cnvm0 + VXLAN, and each cnvm's netns plumbing.

    underlay ── cnvm0-vx (VXLAN, VNI, UDP port) ─┐
                                                 cnvm0 (bridge, fixed MAC, optional expose IP)
    netns <prefix><name>: eth0 (IP, MAC from IP) ── vcXXXXXXXXXXXX ┘

Head-end replication instead of multicast: one all-zero FDB entry per peer node,
so broadcast/unknown traffic is copied to every peer; learning on, so unicast
follows learnt MACs and a moved cnvm is relearnt from its first packet (GARP).

Everything here is idempotent and derivable from names, so the daemon can find
and repair (or remove) what a crashed predecessor left. `netns` of the node is
the namespace the node's devices live in: None for the daemon's own (production
and lab daemons), a lab host's namespace when a test drives a node from outside.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cnvmd import netlink
from proto.messages import ErrorCode

from .names import (
    BRIDGE,
    CNVM_IF,
    VXLAN,
    NetworkError,
    bridge_mac,
    host_veth,
    host_veth_mac,
    invalid,
    mac_for_ip,
    netns_name,
    overlay_mtu,
    vxlan_mac,
)

log = logging.getLogger("cnvmd.network")

DEFAULT_UNDERLAY_MTU = 1500


# --------------------------------------------------------------------------- FDB logic


def plan_fdb(current: Iterable[str], desired: Iterable[str]) -> tuple[list[str], list[str]]:
    """(to add, to remove) that turn the current flood list into the desired one."""
    cur, want = set(current), set(desired)
    return sorted(want - cur), sorted(cur - want)


async def reconcile_fdb(current: Iterable[str], desired: Iterable[str],
                        add: Callable[[str], Awaitable[Any]],
                        remove: Callable[[str], Awaitable[Any]]) -> tuple[list[str], list[str]]:
    """Apply plan_fdb with the given primitives: adds first, so no peer is ever unflooded."""
    to_add, to_remove = plan_fdb(current, desired)
    for a in to_add:
        await add(a)
    for r in to_remove:
        await remove(r)
    return to_add, to_remove


def peer_addresses(members: Iterable[Any], self_name: str) -> set[str]:
    """Underlay addresses to flood to: every active member but us with a known address.

    Down members stay in the list (a node that comes back is reachable at once;
    flooding a dead address costs one copy of each broadcast); removed ones go.
    Accepts Member objects or their wire dicts.
    """
    out = set()
    for m in members:
        get = m.get if isinstance(m, dict) else (lambda k, _m=m: getattr(_m, k, None))
        if get("name") == self_name or get("admin") not in (None, "active"):
            continue
        addr = get("addr")
        if addr:
            try:
                out.add(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
    return out


# --------------------------------------------------------------------------- node datapath


@dataclass
class NodeState:
    """What `NodeNetwork.status` reports."""

    bridge: bool
    vxlan: bool
    up: bool
    mtu: int | None
    underlay_dev: str | None
    vni: int
    port: int
    peers: list[str]
    expose: str | None


class NodeNetwork:
    """cnvm0 + VXLAN of one node, with the flood list kept equal to `set_peers`."""

    def __init__(self, node: str, *, vni: int, port: int, subnet: str,
                 netns: str | None = None, underlay_dev: str | None = None,
                 local: str | None = None) -> None:
        self.node = node
        self.vni = vni
        self.port = port
        self.subnet = ipaddress.IPv4Network(subnet)
        self.netns = netns
        self.underlay_dev = underlay_dev
        self.local = local
        self.mtu: int | None = None
        self.expose_cidr: str | None = None
        self._peers: set[str] = set()
        self._lock = asyncio.Lock()
        self._ensured = False

    # ---- discovery

    async def _underlay(self) -> tuple[str | None, int]:
        """The underlay device and its MTU: the configured one, the default route's,
        else the first up link holding a non-overlay IPv4 address."""
        subnet = self.subnet

        async def fn(ipr: Any) -> tuple[str | None, int]:
            links = {int(m["index"]): m async for m in await ipr.link("dump")}
            name_of = {i: m.get("IFLA_IFNAME") for i, m in links.items()}
            want: int | None = None
            if self.underlay_dev:
                want = next((i for i, n in name_of.items() if n == self.underlay_dev), None)
                if want is None:
                    raise NetworkError(f"underlay device {self.underlay_dev} does not exist",
                                       ErrorCode.FAILED)
            if want is None:
                async for r in await ipr.route("dump", family=2):
                    if r["dst_len"] == 0 and r.get("RTA_OIF") and r["table"] == 254:
                        want = int(r["RTA_OIF"])
                        break
            if want is None:
                async for a in await ipr.addr("dump", family=2):
                    ip = ipaddress.IPv4Address(a.get("IFA_ADDRESS"))
                    n = name_of.get(int(a["index"]))
                    if ip.is_loopback or ip in subnet or n in (BRIDGE, VXLAN, None):
                        continue
                    if self.local and str(ip) != self.local:
                        continue
                    want = int(a["index"])
                    break
            if want is None:
                return None, DEFAULT_UNDERLAY_MTU
            return name_of[want], int(links[want].get("IFLA_MTU") or DEFAULT_UNDERLAY_MTU)

        return await netlink.with_rtnl(self.netns, fn)

    async def _vxlan_params(self) -> tuple[int, int] | None:
        async def fn(ipr: Any) -> tuple[int, int] | None:
            async for m in await ipr.link("dump"):
                if m.get("IFLA_IFNAME") != VXLAN:
                    continue
                info = m.get("IFLA_LINKINFO")
                data = info.get("IFLA_INFO_DATA") if info else None
                if not data or info.get("IFLA_INFO_KIND") != "vxlan":
                    return (-1, -1)
                return int(data.get("IFLA_VXLAN_ID") or 0), int(data.get("IFLA_VXLAN_PORT") or 0)
            return None

        return await netlink.with_rtnl(self.netns, fn)

    async def own_addresses(self) -> set[str]:
        return {a.split("/")[0] for a in await netlink.addrs(self.netns)}

    # ---- ensure / teardown

    async def ensure(self) -> None:
        """Create or repair the bridge, the VXLAN device and the flood list (idempotent)."""
        async with self._lock:
            dev, umtu = await self._underlay()
            mtu = overlay_mtu(umtu)
            self.mtu = mtu
            ns = self.netns
            br = await netlink.link_get(BRIDGE, ns)
            if br is not None and br.kind != "bridge":
                raise NetworkError(f"{BRIDGE} exists but is a {br.kind}, not a bridge",
                                   ErrorCode.CONFLICT)
            if br is None:
                await netlink.bridge_add(BRIDGE, netns=ns, mtu=mtu, mac=bridge_mac(self.node),
                                         exist_ok=True)
            await netlink.link_set(BRIDGE, netns=ns, mtu=mtu, mac=bridge_mac(self.node))
            params = await self._vxlan_params()
            if params is not None and params != (self.vni, self.port):
                log.warning("recreating %s: has vni/port %s, want %s", VXLAN, params,
                            (self.vni, self.port))
                await netlink.link_del(VXLAN, ns)
                params = None
            if params is None:
                await netlink.vxlan_add(VXLAN, self.vni, netns=ns, local=self.local,
                                        dev=self.underlay_dev, dstport=self.port,
                                        learning=True, mtu=mtu, mac=vxlan_mac(self.node))
            await netlink.link_set(VXLAN, netns=ns, mtu=mtu, mac=vxlan_mac(self.node),
                                    master=BRIDGE, up=True)
            await netlink.link_up(BRIDGE, ns)
            if self.expose_cidr:
                await netlink.addr_add(BRIDGE, self.expose_cidr, netns=ns)
            first, self._ensured = not self._ensured, True
            log.log(logging.INFO if first else logging.DEBUG, "overlay datapath up",
                    extra={"bridge": BRIDGE, "vxlan": VXLAN, "vni": self.vni,
                           "port": self.port, "mtu": mtu, "underlay": dev})
            await self._apply_peers()

    async def is_up(self) -> bool:
        br = await netlink.link_get(BRIDGE, self.netns)
        vx = await netlink.link_get(VXLAN, self.netns)
        return br is not None and vx is not None and br.up and vx.up

    async def teardown(self) -> None:
        """Remove VXLAN and bridge (cnvm veths lose their master but stay)."""
        async with self._lock:
            await netlink.link_del(VXLAN, self.netns)
            await netlink.link_del(BRIDGE, self.netns)
            self._ensured = False

    # ---- peers

    async def set_peers(self, addrs: Iterable[str]) -> tuple[list[str], list[str]]:
        """Make the flood list exactly `addrs` (minus this node's own addresses).

        Remembered, so an `ensure` after a crash or a VXLAN recreate reapplies it;
        a no-op on the kernel until the datapath exists.
        """
        async with self._lock:
            self._peers = {str(ipaddress.ip_address(a)) for a in addrs}
            if not self._ensured and await netlink.link_get(VXLAN, self.netns) is None:
                return [], []
            return await self._apply_peers()

    async def _apply_peers(self) -> tuple[list[str], list[str]]:
        mine = await self.own_addresses()
        desired = self._peers - mine
        current = await netlink.fdb_flood_peers(VXLAN, netns=self.netns)
        added, removed = await reconcile_fdb(
            current, desired,
            lambda a: netlink.fdb_flood_add(VXLAN, a, netns=self.netns),
            lambda a: netlink.fdb_flood_del(VXLAN, a, netns=self.netns))
        if added or removed:
            log.info("overlay flood list changed", extra={"added": added or None,
                                                          "removed": removed or None})
        return added, removed

    @property
    def peers(self) -> set[str]:
        return set(self._peers)

    # ---- expose address

    async def set_expose(self, ip: str | None) -> None:
        """Give the node an address on the overlay (or take it away): `weave expose`."""
        prefix = self.subnet.prefixlen
        async with self._lock:
            old = self.expose_cidr
            self.expose_cidr = f"{ip}/{prefix}" if ip else None
            if old and old != self.expose_cidr and await netlink.link_get(BRIDGE, self.netns):
                await netlink.addr_del(BRIDGE, old, netns=self.netns)
            if self.expose_cidr and await netlink.link_get(BRIDGE, self.netns):
                await netlink.addr_add(BRIDGE, self.expose_cidr, netns=self.netns)

    async def status(self) -> NodeState:
        br = await netlink.link_get(BRIDGE, self.netns)
        vx = await netlink.link_get(VXLAN, self.netns)
        peers = await netlink.fdb_flood_peers(VXLAN, netns=self.netns) if vx else []
        dev, _ = await self._underlay()
        return NodeState(bridge=br is not None, vxlan=vx is not None,
                         up=bool(br and vx and br.up and vx.up), mtu=br.mtu if br else None,
                         underlay_dev=dev, vni=self.vni, port=self.port, peers=sorted(peers),
                         expose=self.expose_cidr.split("/")[0] if self.expose_cidr else None)


# --------------------------------------------------------------------------- per-cnvm plumbing


@dataclass(frozen=True)
class CnvmLink:
    """What a caller needs about a cnvm's network: where runc finds the netns, etc."""

    name: str
    ip: str
    mac: str
    netns: str
    netns_path: str
    host_veth: str
    ifname: str = CNVM_IF


class CnvmNet:
    """Create, bring up, announce and destroy a cnvm's own network namespace."""

    def __init__(self, node: NodeNetwork, *, prefix: str, gateway: str | None = None) -> None:
        self.node = node
        self.prefix = prefix
        self.gateway = gateway or None
        self.prefixlen = node.subnet.prefixlen

    def netns(self, name: str) -> str:
        return netns_name(self.prefix, name)

    def netns_path(self, name: str) -> str:
        """The path to put in runc's config.json (a path makes the netns external)."""
        return str(netlink.netns_path(self.netns(name)))

    def link(self, name: str, ip: str) -> CnvmLink:
        ns = self.netns(name)
        return CnvmLink(name=name, ip=ip, mac=mac_for_ip(ip), netns=ns,
                        netns_path=str(netlink.netns_path(ns)), host_veth=host_veth(name))

    def exists(self, name: str) -> bool:
        return netlink.netns_exists(self.netns(name))

    def list(self) -> list[str]:
        """cnvm names whose netns exists on this node."""
        return [ns[len(self.prefix):] for ns in netlink.netns_list(self.prefix)]

    def check_ip(self, ip: str) -> str:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise invalid(f"{ip!r} is not an IPv4 address") from None
        if addr not in self.node.subnet:
            raise invalid(f"{addr} is outside the cluster subnet {self.node.subnet}")
        return str(addr)

    async def create(self, name: str, ip: str, *, up: bool = True,
                     prelocked: bool = False) -> CnvmLink:
        """A fresh netns for cnvm `name` with eth0 = ip (MAC from ip), veth into cnvm0.

        prelocked: CRIU's lock rules go in before any link exists (teleport target).
        up=False leaves both veth ends down: a target prepared while the source still
        runs must not answer ARP for the same IP/MAC; `bring_up` at switchover.
        Fails (nothing changed) if the netns exists already.
        """
        ip = self.check_ip(ip)
        link = self.link(name, ip)
        if netlink.netns_exists(link.netns):
            raise NetworkError(f"network namespace {link.netns} of cnvm {name} already exists",
                               ErrorCode.ALREADY_EXISTS)
        if self.node.mtu is None:
            raise NetworkError("the overlay datapath is not set up on this node",
                               ErrorCode.UNAVAILABLE)
        node_ns = self.node.netns
        await netlink.netns_add(link.netns)
        try:
            if prelocked:
                await netlink.prelock(link.netns)
            await netlink.link_del(link.host_veth, node_ns)  # a leftover of a crash
            await self._plumb(link, up=up)
        except BaseException:
            await asyncio.shield(self._remove(link))
            raise
        return link

    async def _plumb(self, link: CnvmLink, *, up: bool) -> None:
        """The veth pair (MACs fixed at creation), its bridge port and the cnvm's address."""
        node_ns = self.node.netns
        await netlink.veth_add(link.host_veth, CNVM_IF, netns=node_ns,
                               peer_netns=link.netns, mtu=self.node.mtu, peer_mac=link.mac,
                               mac=host_veth_mac(self.node.node, link.name))
        await netlink.link_set(link.host_veth, netns=node_ns, master=BRIDGE)
        await netlink.addr_add(CNVM_IF, f"{link.ip}/{self.prefixlen}", netns=link.netns)
        if up:
            await self._up(link)

    async def _up(self, link: CnvmLink) -> None:
        await netlink.link_up(link.host_veth, self.node.netns)
        await netlink.link_up(CNVM_IF, link.netns)
        if self.gateway:
            await netlink.route_add("default", netns=link.netns, gateway=self.gateway,
                                    dev=CNVM_IF)

    async def bring_up(self, name: str, ip: str) -> None:
        """Switchover on a teleport target: both veth ends up (+ default route)."""
        link = self.link(name, self.check_ip(ip))
        if not netlink.netns_exists(link.netns):
            raise NetworkError(f"cnvm {name} has no network namespace on this node",
                               ErrorCode.NOT_FOUND)
        await self._up(link)

    async def announce(self, name: str, ip: str, *, count: int = 1) -> None:
        """Gratuitous ARP from the cnvm, so bridges and peers relearn where it is."""
        await netlink.announce(self.netns(name), CNVM_IF, ip, count=count)

    async def _remove(self, link: CnvmLink) -> bool:
        had = netlink.netns_exists(link.netns)
        try:
            await netlink.link_del(link.host_veth, self.node.netns)
        except (netlink.NetlinkError, OSError) as exc:
            if getattr(exc, "errno", None) != errno.ENOENT:
                log.warning("could not delete %s: %s", link.host_veth, exc)
        await netlink.netns_del(link.netns)
        return had

    async def destroy(self, name: str) -> bool:
        """Remove the veth pair and the netns (idempotent). True if the netns existed.

        The veth is deleted explicitly: a netns with a process still in it would
        otherwise keep eth0 (and its IP/MAC) alive on the overlay.
        """
        ns = self.netns(name)
        return await self._remove(CnvmLink(name, "", "", ns, str(netlink.netns_path(ns)),
                                           host_veth(name)))

    async def repair(self, name: str, ip: str, *, up: bool = True) -> str:
        """After a daemon restart: make an existing netns whole again. Returns what it did.

        up=False (a teleport target not switched over yet) keeps recreated links down.
        """
        link = self.link(name, ip)
        node_ns = self.node.netns
        inner = await netlink.link_get(CNVM_IF, link.netns)
        outer = await netlink.link_get(link.host_veth, node_ns)
        if inner is None or outer is None:
            if outer is not None:
                await netlink.link_del(link.host_veth, node_ns)
            if inner is not None:
                await netlink.link_del(CNVM_IF, link.netns)
            await self._plumb(link, up=up)
            return "veth recreated"
        bridge = await netlink.link_get(BRIDGE, node_ns)
        if bridge is not None and outer.master != bridge.index:
            await netlink.link_set(link.host_veth, netns=node_ns, master=BRIDGE)
            return "reattached to bridge"
        return "ok"


def processes_in(netns_paths: Iterable[str]) -> list[int]:
    """Pids living in any of these namespaces (blocking /proc scan: run in a thread)."""
    return netlink.pids_in_netns(netns_paths)
