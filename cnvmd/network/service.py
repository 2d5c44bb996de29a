"""`Network`: the node's overlay as one service (the NETWORK service, cnvmd.services).

Deploy, rm and teleport call this; the API ops (ops.py) are thin wrappers.

    net = daemon.services.require(NETWORK)
    ip = await net.allocate("web", want=None)          # cluster-unique, owner = cnvm name
    link = await net.create("web", ip)                  # netns + veth + eth0, up
    cfg["linux"]["namespaces"][..]["path"] = link.netns_path
    ...
    await net.destroy("web"); await net.release("web")  # rm: netns gone, address freed

    # teleport target, before restore / at switchover / after restore
    link = await net.create(name, ip, up=False, prelocked=True)
    await net.bring_up(name); ...restore...; await net.announce(name)
    # teleport source, after the target runs (address kept: no release)
    await net.destroy(name)

Nothing is built until first used (a daemon that never runs a cnvm leaves the
host's network alone); once built, the fact is persisted and the next daemon
start repairs the datapath, each cnvm netns and the published ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable
from typing import Any

from cnvmd import netlink
from cnvmd.config import Config
from cnvmd.ipam import IpamError, Subnet
from cnvmd.state import StateStore
from proto.messages import ErrorCode

from .addresses import PEER_OPS, STATE_KIND, ClusterIpam, MeshPeers, PeerSet
from .datapath import CnvmLink, CnvmNet, NodeNetwork, peer_addresses, processes_in
from .expose import Exposer, Forward
from .names import NODE_OWNER_PREFIX, NetworkError, PortSpec, host_veth, parse_key, parse_port_spec

log = logging.getLogger("cnvmd.network")

CNVM_KIND = "net-cnvms"


class Network:
    """The overlay of one node: datapath, per-cnvm netns, IPAM and published ports."""

    def __init__(self, config: Config, *, store: StateStore, netns: str | None = None,
                 underlay_dev: str | None = None, local: str | None = None,
                 peers: PeerSet | None = None) -> None:
        self.config = config
        self.name = config.node_name
        self.store = store
        try:
            subnet = Subnet.parse(config.subnet, config.gateway or None)
        except IpamError as exc:
            raise NetworkError(str(exc), ErrorCode.INVALID_ARGUMENT) from None
        self.node = NodeNetwork(self.name, vni=config.vni, port=config.vxlan_port,
                                subnet=config.subnet, netns=netns, underlay_dev=underlay_dev,
                                local=local)
        self.cnvms = CnvmNet(self.node, prefix=config.netns_prefix,
                             gateway=config.gateway or None)
        self.ipam = ClusterIpam(self.name, subnet, store=store, peers=peers)
        self.ipam.on_released.append(self._on_released)
        self.exposer = Exposer(netns)
        self.enabled = False
        self.forwards: dict[str, Forward] = {}
        # Overlay hosts outside the cluster (a client host joined by hand): flooded to
        # like members, else broadcasts from here (ARP) never reach them.
        self.extra_flood: set[str] = set()
        self._peer_svc: Any = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def node_owner(self) -> str:
        return NODE_OWNER_PREFIX + self.name

    # ---- persistence (tiny JSON records; fsync off the loop)

    async def _save(self, kind: str, name: str, data: dict[str, Any] | None) -> None:
        if data is None:
            await asyncio.to_thread(self.store.delete, kind, name)
        else:
            await asyncio.to_thread(self.store.save, kind, name, data)

    async def _save_node(self) -> None:
        await self._save(STATE_KIND, "node", {"enabled": self.enabled,
                                              "expose_ip": self.ipam.ip_of(self.node_owner),
                                              "extra_flood": sorted(self.extra_flood)})

    async def _save_forwards(self) -> None:
        await self._save(STATE_KIND, "exposes",
                         {"forwards": [f.to_dict() for f in sorted(self.forwards.values())]})

    def _records(self) -> dict[str, dict[str, Any]]:
        return self.store.list(CNVM_KIND)

    # ---- start / stop

    async def start(self) -> list[str]:
        """Load state; if this node had its overlay built, repair everything. Returns notes."""
        rec = await asyncio.to_thread(self.store.load, STATE_KIND, "node") or {}
        fw = await asyncio.to_thread(self.store.load, STATE_KIND, "exposes") or {}
        for d in fw.get("forwards") or []:
            try:
                f = Forward.from_dict(d)
                self.forwards[f.key] = f
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring bad expose record %r", d)
        self.enabled = bool(rec.get("enabled"))
        self.extra_flood = set(rec.get("extra_flood") or [])
        await self.node.set_peers(self.extra_flood)
        if not self.enabled:
            return []
        return await self.reconcile()

    async def reconcile(self) -> list[str]:
        """Repair the datapath, cnvm netns and published ports from the records."""
        notes: list[str] = []
        async with self._lock:
            await self.node.set_expose(self.ipam.ip_of(self.node_owner))
            await self.node.ensure()
            records = await asyncio.to_thread(self._records)
            present = set(self.cnvms.list())
            for name, r in records.items():
                if name in present:
                    what = await self.cnvms.repair(name, str(r["ip"]), up=r.get("up", True))
                    if what != "ok":
                        notes.append(f"cnvm {name}: {what}")
                else:  # after a reboot: `attach` (cnvm start) builds it again
                    notes.append(f"cnvm {name}: netns missing (rebuilt when it starts)")
            for name in sorted(present - set(records)):
                # Only a netns plumbed into *our* bridge is provably ours: with a prefix
                # shared by mistake, another node's netns must never be touched.
                ours = await netlink.link_get(host_veth(name), self.node.netns)
                path = self.cnvms.netns_path(name)
                if ours is None:
                    notes.append(f"netns {self.cnvms.netns(name)} has no record and no veth "
                                 "on this node: left alone")
                elif await asyncio.to_thread(processes_in, [path]):
                    notes.append(f"netns {self.cnvms.netns(name)} has processes but no "
                                 "record: kept")
                else:
                    await self.cnvms.destroy(name)
                    notes.append(f"netns {self.cnvms.netns(name)}: orphan removed")
            await self.exposer.apply(self.forwards.values())
        for n in notes:
            log.warning("network reconcile: %s", n)
        return notes

    async def ensure(self) -> None:
        """Build (or repair) the node's datapath and remember that it exists.

        The intent is saved first: a crash mid-build is then repaired at next start.
        """
        if not self.enabled:
            self.enabled = True
            await self._save_node()
        await self.node.ensure()

    async def close(self) -> None:
        """Daemon shutdown: stop following membership. The datapath stays (cnvms run on)."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def teardown(self, *, force: bool = False) -> list[str]:
        """Remove the datapath; with force also cnvm netns, published ports and the
        node's overlay address (all released). Refused without force while any exist."""
        records = await asyncio.to_thread(self._records)
        busy = [f"cnvm networks: {', '.join(sorted(records))}"] if records else []
        if self.forwards:
            busy.append(f"published ports: {', '.join(sorted(self.forwards))}")
        if busy and not force:
            raise NetworkError("still in use (" + "; ".join(busy) + "); use force",
                               ErrorCode.CONFLICT)
        notes = []
        async with self._lock:
            await self.exposer.clear()
            if self.forwards:
                notes.append(f"published ports removed: {', '.join(sorted(self.forwards))}")
                self.forwards = {}
                await self._save_forwards()
            for name in records:
                await self.cnvms.destroy(name)
                await self._save(CNVM_KIND, name, None)
                notes.append(f"cnvm {name}: netns removed (address kept)")
            await self.node.set_expose(None)
            await self.node.teardown()
            self.enabled = False
        if await self.ipam.release(self.node_owner):
            notes.append("node overlay address released")
        await self._save_node()
        return notes

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ---- peers

    def attach_peers(self, svc: Any) -> None:
        """Use the peer mesh: IPAM claims go to every up member; FDB follows membership."""
        self.ipam.peers = MeshPeers(svc)
        self._peer_svc = svc
        from cnvmd.api import Args, Context

        for op in PEER_OPS:
            async def handle(ctx: Context, args: Args, _op: str = op) -> Any:
                return await self.ipam.handle(_op, dict(args))

            svc.router.op(op)(handle)
        self.spawn(self._follow(svc))

    async def _follow(self, svc: Any) -> None:
        from cnvmd.peers.membership import ALIVE

        # Ops are registered before the mesh serves; the membership table is only
        # loaded from disk by start(), so follow it from then on.
        await svc.ready.wait()
        async with svc.membership.subscribe(replay=True) as sub:
            async for ev in sub:
                if ev.name != svc.name and ev.state == ALIVE and ev.old_state != ALIVE:
                    self.spawn(self._sync(ev.name))
                try:
                    await self._apply_flood()
                except Exception:
                    log.exception("could not update the overlay flood list")

    async def _sync(self, node: str) -> None:
        """Pull a (re)joined member's IPAM table; it may not accept us for a moment
        (enrolment still completing on its side), so retry with backoff."""
        for delay in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
            await asyncio.sleep(delay)
            if await self.ipam.sync_from(node) is not None:
                return
        log.warning("ipam: could not pull the address table of %s", node)

    async def set_peers(self, addrs: list[str]) -> tuple[list[str], list[str]]:
        return await self.node.set_peers(addrs)

    async def _apply_flood(self) -> None:
        svc = self._peer_svc
        members = peer_addresses(svc.membership.active(), svc.name) if svc else []
        await self.node.set_peers([*members, *self.extra_flood])

    async def set_extra_flood(self, add: list[str], remove: list[str]) -> list[str]:
        """Add/remove underlay addresses of non-member overlay hosts; returns the set."""
        for a in [*add, *remove]:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise NetworkError(f"{a!r} is not an IP address",
                                   ErrorCode.INVALID_ARGUMENT) from None
        self.extra_flood = (self.extra_flood | set(add)) - set(remove)
        await self._save_node()
        await self._apply_flood()
        return sorted(self.extra_flood)

    # ---- addresses

    async def allocate(self, name: str, want: str | None = None) -> str:
        """A cluster-unique overlay address for cnvm `name` (idempotent per name)."""
        return await self.ipam.allocate(name, want)

    async def release(self, name: str) -> str | None:
        """Free cnvm `name`'s address everywhere (rm); its published ports go too."""
        return await self.ipam.release(name)

    def ip_of(self, name: str) -> str | None:
        ip = self.ipam.ip_of(name)
        if ip is None:
            rec = self.store.load(CNVM_KIND, name)
            ip = rec.get("ip") if rec else None
        return ip

    async def set_expose_address(self, ip: str | None = "auto", *,
                                 remove: bool = False) -> str | None:
        """Give this node an overlay address (`weave expose`), or take it away."""
        owner = self.node_owner
        if remove:
            if self.forwards:
                raise NetworkError("published ports need the node's overlay address; "
                                   "unexpose them first", ErrorCode.CONFLICT)
            await self.node.set_expose(None)
            await self.ipam.release(owner)
            await self._save_node()
            return None
        await self.ensure()
        have = self.ipam.ip_of(owner)
        want = None if ip in (None, "auto") else ip
        if have is not None and want is not None and want != have:
            await self.node.set_expose(None)
            await self.ipam.release(owner)
        addr = await self.ipam.allocate(owner, want)
        await self.node.set_expose(addr)
        await self._save_node()
        return addr

    # ---- per-cnvm plumbing

    async def create(self, name: str, ip: str, *, up: bool = True,
                     prelocked: bool = False) -> CnvmLink:
        """The cnvm's netns with eth0 = ip; see CnvmNet.create. Nothing changes on error."""
        try:
            ip = str(self.ipam.subnet.check(ip))
        except IpamError as exc:
            raise NetworkError(str(exc), ErrorCode.INVALID_ARGUMENT) from None
        owner = self.ipam.owner_of(ip)
        if owner is not None and owner != name:
            raise NetworkError(f"{ip} is in use by {owner}, not by {name}", ErrorCode.CONFLICT)
        link = self.cnvms.link(name, ip)
        if self.cnvms.exists(name):
            raise NetworkError(f"network namespace {link.netns} of cnvm {name} already exists",
                               ErrorCode.ALREADY_EXISTS)
        await self.ensure()
        await self._save(CNVM_KIND, name, {"ip": ip, "mac": link.mac, "netns": link.netns,
                                           "up": up})
        try:
            return await self.cnvms.create(name, ip, up=up, prelocked=prelocked)
        except BaseException:
            await asyncio.shield(self._save(CNVM_KIND, name, None))
            raise

    async def bring_up(self, name: str) -> None:
        rec = await self._record(name)
        await self.cnvms.bring_up(name, rec["ip"])
        await self._save(CNVM_KIND, name, {**rec, "up": True})

    async def announce(self, name: str, *, count: int = 1) -> None:
        rec = await self._record(name)
        await self.cnvms.announce(name, rec["ip"], count=count)

    async def destroy(self, name: str) -> bool:
        """Remove the cnvm's netns and veth (address kept: release separately on rm)."""
        gone = await self.cnvms.destroy(name)
        await self._save(CNVM_KIND, name, None)
        if name in self.ipam.mine:  # it lives elsewhere now (teleport) or is being removed
            self.ipam.mine.discard(name)
            await self.ipam.save()
        return gone

    def netns_path(self, name: str) -> str:
        return self.cnvms.netns_path(name)

    # ---- the lifecycle's Network protocol (cnvmd.lifecycle.Network)

    async def attach(self, name: str, *, ip: str | None, record: dict[str, Any]
                     ) -> dict[str, Any]:
        """deploy/start: address (allocated or claimed) + wired netns; idempotent.

        A netns that already exists (start after stop, daemon restart) is repaired,
        not recreated: a container may live in it.
        """
        mine = await asyncio.to_thread(self.store.load, CNVM_KIND, name)
        held = self.ipam.ip_of(name)
        if (held is not None and mine is None and not self.cnvms.exists(name)
                and name not in self.ipam.mine):
            # Addresses are per cnvm name: a second cnvm of that name elsewhere would
            # get the same IP. (A teleport target calls `create`, not `attach`; an
            # address reserved here with net.allocate may be deployed here.)
            raise NetworkError(f"a cnvm named {name} already holds {held} in the cluster "
                               "(deployed on another node?)", ErrorCode.ALREADY_EXISTS)
        addr = await self.allocate(name, want=ip or record.get("ip") or None)
        if self.cnvms.exists(name):
            await self.ensure()
            link = self.cnvms.link(name, addr)
            rec = await asyncio.to_thread(self.store.load, CNVM_KIND, name)
            if rec is None or rec.get("ip") != addr:
                await self._save(CNVM_KIND, name, {"ip": addr, "mac": link.mac,
                                                   "netns": link.netns, "up": True})
            await self.cnvms.repair(name, addr)
        else:
            try:
                link = await self.create(name, addr)
            except BaseException:
                if held is None:  # claimed just now for this deploy: give it back
                    await asyncio.shield(self.release(name))
                raise
        return {"netns": link.netns_path, "ip": addr, "mac": link.mac}

    async def detach(self, name: str, record: dict[str, Any]) -> None:
        """rm (or a failed deploy): netns gone and the address released cluster-wide.

        Teleport must NOT call this on the source (the address moves with the cnvm):
        it calls `destroy` there.
        """
        ours = (await asyncio.to_thread(self.store.load, CNVM_KIND, name) is not None
                or self.cnvms.exists(name))
        await self.destroy(name)
        if ours:  # never free the address of a same-named cnvm living elsewhere
            await self.release(name)

    def link(self, name: str) -> CnvmLink | None:
        rec = self.store.load(CNVM_KIND, name)
        return self.cnvms.link(name, rec["ip"]) if rec else None

    async def _record(self, name: str) -> dict[str, Any]:
        rec = await asyncio.to_thread(self.store.load, CNVM_KIND, name)
        if rec is None:
            raise NetworkError(f"cnvm {name} has no network on this node", ErrorCode.NOT_FOUND)
        return rec

    # ---- published ports

    async def expose(self, name: str, spec: str | PortSpec) -> Forward:
        """Forward HOSTPORT on this node to cnvm `name` (wherever it runs) — idempotent."""
        ps = spec if isinstance(spec, PortSpec) else parse_port_spec(spec)
        ip = self.ip_of(name)
        if ip is None:
            raise NetworkError(f"no cnvm named {name} has an overlay address",
                               ErrorCode.NOT_FOUND)
        fwd = Forward(name, ps.hostport, ps.port, ps.proto, ip)

        def check() -> bool:
            cur = self.forwards.get(fwd.key)
            if cur is not None and cur != fwd:
                raise NetworkError(f"host port {fwd.key} is already forwarded to {cur.name} "
                                   f"port {cur.port}", ErrorCode.ALREADY_EXISTS)
            return cur == fwd

        if check():
            return fwd
        if self.ipam.ip_of(self.node_owner) is None:
            await self.set_expose_address("auto")
        else:
            await self.ensure()
        async with self._lock:
            if not check():  # again: a concurrent expose may have taken the port
                await self._apply({**self.forwards, fwd.key: fwd})
        return fwd

    async def unexpose(self, name: str, hostport: str | int) -> Forward:
        port, proto = parse_key(str(hostport))
        key = f"{port}/{proto}"
        async with self._lock:
            cur = self.forwards.get(key)
            if cur is None or cur.name != name:
                raise NetworkError(f"cnvm {name} has no published port {key} on {self.name}",
                                   ErrorCode.NOT_FOUND)
            new = {k: v for k, v in self.forwards.items() if k != key}
            await self._apply(new)
        return cur

    async def _apply(self, new: dict[str, Forward]) -> None:
        """Kernel first, then the record; on failure the kernel is put back."""
        try:
            await self.exposer.apply(new.values())
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self.exposer.apply(self.forwards.values())
            raise NetworkError(f"could not program the port forward: {exc}") from None
        self.forwards = new
        await self._save_forwards()

    def exposes(self, name: str | None = None) -> list[Forward]:
        return [f for f in sorted(self.forwards.values()) if name is None or f.name == name]

    async def _on_released(self, owner: str, ip: str) -> None:
        async with self._lock:
            new = {k: f for k, f in self.forwards.items() if f.name != owner}
            if len(new) != len(self.forwards):
                await self._apply(new)

    # ---- status

    async def status(self) -> dict[str, Any]:
        st = await self.node.status()
        records = await asyncio.to_thread(self._records)
        return {
            "node": self.name,
            "enabled": self.enabled,
            "subnet": self.config.subnet,
            "gateway": self.config.gateway or None,
            "datapath": {"bridge": st.bridge, "vxlan": st.vxlan, "up": st.up, "mtu": st.mtu,
                         "underlay": st.underlay_dev, "vni": st.vni, "port": st.port},
            "peers": st.peers,
            "expose_ip": self.ipam.ip_of(self.node_owner),
            "cnvms": [{"name": n, "ip": r.get("ip"), "mac": r.get("mac"),
                       "netns": r.get("netns"),
                       "present": netlink.netns_exists(str(r.get("netns")))}
                      for n, r in sorted(records.items())],
            "exposes": [f.to_dict() for f in self.exposes()],
            "addresses_in_use": len(self.ipam.table()),
        }
