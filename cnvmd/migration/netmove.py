"""Network handover of a teleport: same IP and MAC on the target, no double answers.

Source side: the cnvm's eth0 is described (IP/prefix/MAC) from the live netns,
and at freeze its host-side veth is set down. Carrier loss keeps the cnvm's
routes and sockets intact but nothing reaches or leaves it: a source kept as the
fallback (frozen, or unlocked by CRIU after ``--leave-running``) can never ACK
a client packet the target's image does not know, and never answers ARP for the
address the target is about to own. Rollback sets it up again.

Target side: a fresh netns with the same IP/MAC, CRIU's lock rules loaded before
any link exists, links down until switchover (`bring_up`), then a gratuitous ARP.

The per-cnvm plumbing is the network subsystem's (`CnvmNet` from
``cnvmd.network``) when the daemon publishes one; otherwise `BridgeNet` does the
same with the netlink primitives on a ``cnvm0`` bridge (labs without the overlay
service). The IP stays owned by the cnvm in IPAM: nothing here allocates or
releases addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import zlib
from dataclasses import dataclass
from typing import Any

from cnvmd import netlink

IFNAME = "eth0"
BRIDGE = "cnvm0"


@dataclass(frozen=True)
class NetInfo:
    ip: str
    prefixlen: int
    mac: str
    gateway: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"ip": self.ip, "prefixlen": self.prefixlen, "mac": self.mac,
                "gateway": self.gateway}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> NetInfo:
        return cls(str(d["ip"]), int(d["prefixlen"]), str(d["mac"]), d.get("gateway"))


async def describe(netns: str) -> NetInfo | None:
    """IPv4 address, prefix and MAC of the cnvm's eth0; None if it has none."""
    link = await netlink.link_get(IFNAME, netns)
    if link is None or not link.mac:
        return None
    for a in await netlink.addrs(netns, IFNAME):
        iface = ipaddress.ip_interface(a)
        if iface.version == 4:
            return NetInfo(str(iface.ip), iface.network.prefixlen, link.mac)
    return None


async def host_peer(netns: str, node_netns: str | None = None) -> str | None:
    """Name of the host-side end of the cnvm's eth0 veth (in the node's netns)."""

    async def peer_index(ipr: Any) -> int | None:
        found = await ipr.link_lookup(ifname=IFNAME)
        if not found:
            return None
        res = await ipr.link("get", index=found[0])
        msgs = res if isinstance(res, list | tuple) else [m async for m in res]
        for m in msgs:
            peer = m.get("IFLA_LINK")
            return int(peer) if peer is not None else None
        return None

    idx = await netlink.with_rtnl(netns, peer_index)
    if not idx:
        return None
    for link in await netlink.links(node_netns):
        if link.index == idx:
            return link.ifname
    return None


NUD_REACHABLE = 0x02
NTF_SELF = 0x02
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # reachable stale delay probe noarp perm


async def neighbors(netns: str) -> list[dict[str, str]]:
    """The cnvm's IPv4 neighbours on eth0 (ip, mac) that are usable right now."""

    async def fn(ipr: Any) -> list[dict[str, str]]:
        found = await ipr.link_lookup(ifname=IFNAME)
        if not found:
            return []
        res = await ipr.neigh("dump", ifindex=found[0], family=2)
        msgs = res if isinstance(res, list | tuple) else [m async for m in res]
        out = []
        for m in msgs:
            ip, mac = m.get("NDA_DST"), m.get("NDA_LLADDR")
            if ip and mac and m["state"] & NUD_USABLE:
                out.append({"ip": str(ip), "mac": str(mac)})
        return out

    return await netlink.with_rtnl(netns, fn)


async def add_neighbors(netns: str, entries: list[dict[str, str]]) -> int:
    """Seed the target netns with the source's neighbours, REACHABLE (used at once, without
    a probe whose answer could still go to the old node; re-confirmed by the kernel
    after the reachable time). Why: right after the restore, the cnvm's first
    packets (CRIU's window probe, retransmissions) go out without an ARP round trip,
    which also teaches the peers' bridges where the cnvm's MAC lives now; a peer off
    the nodes' flood list would never even see that ARP request."""

    async def fn(ipr: Any) -> int:
        found = await ipr.link_lookup(ifname=IFNAME)
        if not found:
            return 0
        n = 0
        for e in entries:
            try:
                await ipr.neigh("replace", ifindex=found[0], dst=e["ip"], lladdr=e["mac"],
                                state=NUD_REACHABLE, family=2)
                n += 1
            except Exception:
                continue
        return n

    return await netlink.with_rtnl(netns, fn)


async def _overlay_vxlan(ipr: Any) -> tuple[int, str] | None:
    """(index, name) of the VXLAN device enslaved to the node's cnvm bridge."""
    res = await ipr.link("dump")
    msgs = res if isinstance(res, list | tuple) else [m async for m in res]
    bridge = next((m["index"] for m in msgs if m.get("IFLA_IFNAME") == BRIDGE), None)
    for m in msgs:
        info = m.get("IFLA_LINKINFO")
        if info is not None and info.get("IFLA_INFO_KIND") == "vxlan" and (
                bridge is None or m.get("IFLA_MASTER") == bridge):
            return int(m["index"]), str(m.get("IFLA_IFNAME"))
    return None


async def vteps(macs: list[str], node_netns: str | None = None) -> dict[str, str]:
    """Where this node's VXLAN device sends each of these MACs (learned remote VTEPs)."""
    want = {m.lower() for m in macs}

    async def fn(ipr: Any) -> dict[str, str]:
        vx = await _overlay_vxlan(ipr)
        if vx is None:
            return {}
        res = await ipr.fdb("dump", ifindex=vx[0])
        msgs = res if isinstance(res, list | tuple) else [m async for m in res]
        out = {}
        for m in msgs:
            mac, dst = str(m.get("NDA_LLADDR") or "").lower(), m.get("NDA_DST")
            if mac in want and dst:
                out[mac] = str(dst)
        return out

    return await netlink.with_rtnl(node_netns, fn)


async def learn_vteps(entries: dict[str, str], node_netns: str | None = None) -> int:
    """Teach this node's VXLAN device where the cnvm's neighbours live (as ordinary
    learned entries). Why: a node whose overlay was built after a peer last broadcast
    (e.g. a first-time target) does not know that peer's MAC; the restored cnvm's
    first frames would then be flooded to cluster members only and never reach a
    peer outside the flood list, which keeps sending to the old node."""

    async def fn(ipr: Any) -> int:
        vx = await _overlay_vxlan(ipr)
        if vx is None:
            return 0
        n = 0
        for mac, dst in entries.items():
            try:
                await ipr.fdb("replace", ifindex=vx[0], lladdr=mac, dst=dst,
                              state=NUD_REACHABLE, flags=NTF_SELF)
                n += 1
            except Exception:
                continue
        return n

    return await netlink.with_rtnl(node_netns, fn)


def _teach_sync(netns_path: str, ips: list[str]) -> None:
    import ctypes
    import os
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, 0x40000000) != 0:
            return
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for ip in ips:
                    try:
                        s.sendto(b"cnvm", (ip, 9))  # discard port: nobody answers
                    except OSError:
                        continue
        finally:
            libc.setns(home, 0x40000000)
    finally:
        os.close(target)
        os.close(home)


async def teach(netns_path: str, ips: list[str]) -> None:
    """One unicast datagram from the cnvm to each neighbour. Why: the GARP floods only
    to the cluster's nodes; a frame with the cnvm's MAC arriving from its new node is
    what makes every other bridge on the way (a client host's too) relearn where the
    MAC lives now, before the client's next retransmission goes to the old node."""
    if ips:
        await asyncio.to_thread(_teach_sync, netns_path, ips)


async def isolate(host_veth: str | None, node_netns: str | None = None) -> None:
    if host_veth:
        await netlink.link_down(host_veth, node_netns)


async def reconnect(host_veth: str | None, node_netns: str | None = None) -> None:
    if host_veth:
        await netlink.link_up(host_veth, node_netns)


def _short(prefix: str, name: str, node: str) -> str:
    return f"{prefix}{zlib.crc32(f'{node}/{name}'.encode()) & 0xffffffff:08x}"[:15]


class BridgeNet:
    """Per-cnvm netns plumbing from netlink primitives (bridge cnvm0 in the node netns)."""

    def __init__(self, node: str, prefix: str | None = None,
                 node_netns: str | None = None) -> None:
        safe = re.sub(r"[^a-z0-9-]+", "-", node.lower()).strip("-") or "node"
        self.prefix = prefix or f"cnvm-{safe}-"
        self.node = node
        self.node_netns = node_netns

    def netns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def host_veth(self, name: str) -> str:
        return _short("tv", name, self.node)

    async def create(self, name: str, info: NetInfo) -> str:
        ns = self.netns(name)
        if netlink.netns_exists(ns):
            raise FileExistsError(f"network namespace {ns} already exists")
        mtu = None
        br = await netlink.link_get(BRIDGE, self.node_netns)
        if br is None:
            raise RuntimeError(f"no {BRIDGE} bridge on {self.node}: the overlay is not set up")
        mtu = br.mtu
        await netlink.netns_add(ns)
        try:
            hv = self.host_veth(name)
            await netlink.link_del(hv, self.node_netns)
            await netlink.veth_add(hv, IFNAME, netns=self.node_netns, peer_netns=ns, mtu=mtu,
                                   peer_mac=info.mac)
            await netlink.link_set(hv, netns=self.node_netns, master=BRIDGE)
            await netlink.addr_add(IFNAME, f"{info.ip}/{info.prefixlen}", netns=ns)
        except BaseException:
            await self.destroy(name)
            raise
        return str(netlink.netns_path(ns))

    async def bring_up(self, name: str, info: NetInfo) -> None:
        await netlink.link_up(self.host_veth(name), self.node_netns)
        await netlink.link_up(IFNAME, self.netns(name))
        if info.gateway:
            await netlink.route_add("default", netns=self.netns(name), gateway=info.gateway,
                                    dev=IFNAME)

    async def announce(self, name: str, info: NetInfo) -> None:
        await netlink.announce(self.netns(name), IFNAME, info.ip)

    async def destroy(self, name: str) -> None:
        await netlink.link_del(self.host_veth(name), self.node_netns)
        await netlink.netns_del(self.netns(name))


class ServiceNet:
    """Adapter to the network subsystem (`cnvmd.network.Network`): it keeps its own
    per-cnvm records, so a restarted daemon repairs what a teleport built."""

    def __init__(self, net: Any) -> None:
        self.net = net

    def host_veth(self, name: str) -> str:
        from cnvmd.network import names

        return names.host_veth(name)

    def netns(self, name: str) -> str:
        return str(self.net.cnvms.netns(name))

    async def create(self, name: str, info: NetInfo) -> str:
        # links stay down until the restore, which first loads the dump's network lock
        link = await self.net.create(name, info.ip, up=False)
        return str(link.netns_path)

    async def bring_up(self, name: str, info: NetInfo) -> None:
        await self.net.bring_up(name)

    async def announce(self, name: str, info: NetInfo) -> None:
        await self.net.announce(name)

    async def destroy(self, name: str) -> None:
        await self.net.destroy(name)


def plumbing(daemon: Any) -> BridgeNet | ServiceNet:
    """The network subsystem's per-cnvm plumbing if published, else BridgeNet."""
    from cnvmd.services import NETWORK

    svc = daemon.services.get(NETWORK)
    if svc is not None and all(hasattr(svc, m) for m in
                               ("create", "bring_up", "announce", "destroy", "cnvms")):
        return ServiceNet(svc)
    return BridgeNet(daemon.config.node_name,
                     getattr(daemon.config, "netns_prefix", None) or None)
