"""The cluster IPAM (cnvmd.ipam) wired to a peer transport and to disk.

`cnvmd.ipam.Ipam` is the claim protocol; this module gives it what it needs:
`ask` = ask every up member over the peer RPC (`ipam.claim`), `commit`/`abandon`
= tell them, and persistence of the addresses known to be in use, so a restarted
node does not forget (and hand out again) addresses other nodes committed.

The transport is a `PeerSet` (protocol): the daemon adapts the peer mesh
(`MeshPeers`); unit tests connect several ClusterIpams in-process.

Owners are cnvm names (an address follows its cnvm through teleports and is
released only on `rm`); a node's own expose address is owned by "node:<name>".

Partition safety (cnvmd.ipamring): once a node has peers, every address belongs to
a range owned by one node. An automatic address comes from this node's own ranges
(a reachable owner hands a part of its ranges over when they are empty or full);
a specific address is granted by the owner of its range only, and refused with
``unavailable`` (naming the owner) while that owner cannot be reached. A node alone
(no other member) decides alone, as before. Upgrade: a store without a ring keeps
its address table; the ring starts empty and is founded by the lowest-named member
when a second member is seen (or at the first hand-over request), the addresses
already in use staying in use (every owner checks the table). Until the founder is
reachable, a clustered node without a range answers ``unavailable`` (never guesses).
The ranges of a removed member (``cluster remove``: an operator's word that it is
gone for good) are taken by the node that ran the removal, in one step; addresses
its cnvms held stay in the table, so none is handed out again while one might
still answer on the overlay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cnvmd.ipam import Ipam, IpamError, Subnet
from cnvmd.ipamring import Ring, RingError
from cnvmd.state import StateStore
from proto.messages import ErrorCode

from .names import NetworkError

log = logging.getLogger("cnvmd.network")

STATE_KIND = "network"
STATE_NAME = "ipam"
PEER_OPS = ("ipam.claim", "ipam.commit", "ipam.abandon", "ipam.release", "ipam.table",
            "ipam.ring", "ipam.handover", "ipam.grant")


class PeerSet(Protocol):
    """What the IPAM needs from the mesh: who is up, and a request/response call."""

    def up_peers(self) -> list[str]: ...

    async def call(self, node: str, op: str, args: dict[str, Any]) -> Any: ...


class NoPeers:
    """A node alone (no cluster yet): every claim is decided locally."""

    def up_peers(self) -> list[str]:
        return []

    async def call(self, node: str, op: str, args: dict[str, Any]) -> Any:
        raise NetworkError(f"no peer mesh to reach {node}", ErrorCode.UNAVAILABLE)


class MeshPeers:
    """Adapter over cnvmd.peers.PeerService: members not judged down are asked."""

    def __init__(self, svc: Any, timeout: float = 10.0) -> None:
        self.svc = svc
        self.timeout = timeout

    def up_peers(self) -> list[str]:
        from cnvmd.peers.membership import DOWN

        ms = self.svc.membership
        ms.tick()
        return sorted(m.name for m in ms.peers() if ms.state_of(m.name) != DOWN)

    def members(self) -> list[str]:
        """Every other active member, up or not."""
        return sorted(m.name for m in self.svc.membership.peers())

    async def call(self, node: str, op: str, args: dict[str, Any]) -> Any:
        return await self.svc.call(node, op, args, timeout=self.timeout)


class ClusterIpam:
    """One node's IPAM: allocate/release for cnvms, peer-op handlers, persistence."""

    def __init__(self, node: str, subnet: Subnet, *, store: StateStore | None = None,
                 peers: PeerSet | None = None) -> None:
        self.node = node
        self.ipam = Ipam(node, subnet)
        self.store = store
        self.peers: PeerSet = peers or NoPeers()
        self._save_lock = asyncio.Lock()
        self._owner_locks: dict[str, asyncio.Lock] = {}
        self.on_released: list[Callable[[str, str], Awaitable[None]]] = []
        """Callbacks (owner, ip) after an address was released anywhere (exposes go)."""
        self.mine: set[str] = set()
        """Owners whose address was claimed through this node (deploy may use them)."""
        self.ring = Ring.for_subnet(subnet.network)
        self.accepted: set[int] = set()
        """Tokens of our own ranges whose addresses in use we were told (we founded
        the ring, or a hand-over answer listed them): only these are allocated from.
        A range seen as ours in gossip only (its hand-over answer lost) waits."""
        self._ring_lock = asyncio.Lock()
        if store is not None:
            rec = store.load(STATE_KIND, STATE_NAME) or {}
            self.ipam.load((str(ip), str(o)) for ip, o in (rec.get("in_use") or {}).items())
            self.mine = {str(o) for o in rec.get("mine") or []}
            try:  # a store from before the ring has none: it starts empty (upgrade)
                self.ring.merge(self.ring.parse(rec.get("ring") or {}))
                self.accepted = {int(ipaddress.IPv4Address(x))
                                 for x in rec.get("accepted") or [] if isinstance(x, str)}
            except (RingError, ValueError) as exc:
                log.error("ipam: stored ring unreadable (%s); learning it from peers", exc)

    @property
    def subnet(self) -> Subnet:
        return self.ipam.subnet

    # ---- queries

    def table(self) -> dict[str, str]:
        """ip -> owner of every address known to be in use in the cluster."""
        return dict(sorted(self.ipam.in_use.items()))

    def ip_of(self, owner: str) -> str | None:
        for ip, o in self.ipam.in_use.items():
            if o == owner:
                return ip
        return None

    def owner_of(self, ip: str) -> str | None:
        return self.ipam.in_use.get(ip)

    def ranges_view(self) -> list[dict[str, str]]:
        """[{first, last, owner}] of the ring, in address order (empty: no ranges yet)."""
        return [{"first": str(ipaddress.IPv4Address(a)), "last": str(ipaddress.IPv4Address(b - 1)),
                 "owner": o} for a, b, o in self.ring.ranges()]

    # ---- persistence

    async def save(self) -> None:
        """Persist the table (and `mine`) off the loop."""
        if self.store is None:
            return
        async with self._save_lock:
            data = {"in_use": self.table(), "mine": sorted(self.mine),
                    "ring": self.ring.to_wire(),
                    "accepted": [str(ipaddress.IPv4Address(x)) for x in sorted(self.accepted)]}
            await asyncio.to_thread(self.store.save, STATE_KIND, STATE_NAME, data)

    # ---- allocate / release

    async def allocate(self, owner: str, want: str | None = None) -> str:
        """An address for `owner` that no other owner in the cluster has.

        Idempotent: an owner that already holds one gets it back (a deploy retried
        after a crash); asking for a different one is refused. Serialised per owner,
        so two concurrent requests for one owner cannot claim two addresses.
        """
        async with self._owner_locks.setdefault(owner, asyncio.Lock()):
            return await self._allocate(owner, want)

    async def _allocate(self, owner: str, want: str | None) -> str:
        have = self.ip_of(owner)
        if have is not None:
            if want is not None and str(self._check(want)) != have:
                raise NetworkError(f"{owner} already has address {have}", ErrorCode.CONFLICT)
            if owner not in self.mine:
                self.mine.add(owner)
                await self.save()
            return have
        if want is not None:
            holder = self.ipam.in_use.get(str(self._check(want)))
            if holder is not None:
                raise NetworkError(f"{want} is already in use (by {holder})",
                                   ErrorCode.ALREADY_EXISTS)
        if self._others():
            ip = await self._allocate_ranged(owner, want)
            self.mine.add(owner)
            await self.save()
            await self._commit_for(owner)(ip)
            return ip
        try:
            ip = await self.ipam.allocate(owner, self._ask_for(owner), self._commit_for(owner),
                                          self._abandon, want=want)
        except IpamError as exc:
            code = ErrorCode.ALREADY_EXISTS if "already in use" in str(exc) else ErrorCode.FAILED
            raise NetworkError(str(exc), code) from None
        self.mine.add(owner)
        await self.save()
        return ip

    # ---- ranges (partition-safe allocation once there are peers)

    def _others(self) -> list[str]:
        members = getattr(self.peers, "members", None)
        return list(members()) if members is not None else self.peers.up_peers()

    async def reclaim(self, dead: str) -> list[str]:
        """Take the ranges of `dead`, just removed from the cluster by this node
        (cnvmd.peers.enrol.remove); they reach the others by the ring's exchange."""
        taken = self.ring.reclaim(dead, self.node)
        if not taken:
            return []
        self.accepted.update(taken)
        await self.save()
        log.warning("ipam: %s takes the address ranges of removed member %s (%d)",
                    self.node, dead, len(taken))
        with contextlib.suppress(Exception):
            await self.refresh_ring()
        return [str(ipaddress.IPv4Address(k)) for k in taken]

    def _founder(self) -> bool:
        """The lowest-named member founds the ring (cluster init, or an upgrade)."""
        return all(self.node < o for o in self._others())

    def _used(self) -> set[int]:
        return {int(ipaddress.IPv4Address(ip)) for ip in self.ipam.in_use} | {
            int(ipaddress.IPv4Address(ip)) for ip in self.ipam.pending} | {
            int(a) for a in self.ipam.subnet.reserved}

    async def _found(self) -> bool:
        """Found the ring if it is empty and we are the founder. Whether it changed."""
        if self.ring.empty and self._founder():
            self.ring.claim_all(self.node)
            self.accepted.add(self.ring.lo)
            log.info("ipam: %s founds the address ring (%s)", self.node,
                     self.ipam.subnet.network)
            await self.save()
            return True
        return False

    def _free_own(self) -> str | None:
        used = self._used()
        for a, b in self.ring.owned(self.node):
            if a not in self.accepted:
                continue
            for x in range(a, b):
                if x not in used:
                    return str(ipaddress.IPv4Address(x))
        return None

    async def _allocate_ranged(self, owner: str, want: str | None) -> str:
        if self.ring.empty:
            await self.refresh_ring()
        if want is not None:
            ip = str(self._check(want))
            holder = self.ring.owner_of(int(ipaddress.IPv4Address(ip)))
            if holder is None:
                raise NetworkError(f"cannot claim {ip}: no address ranges known yet (no "
                                   "member reachable)", ErrorCode.UNAVAILABLE)
            if holder == self.node:
                async with self._ring_lock:
                    if ip in self.ipam.in_use or ip in self.ipam.pending:
                        raise NetworkError(f"{ip} is already in use (by "
                                           f"{self.ipam.in_use.get(ip, 'a deploy')})",
                                           ErrorCode.ALREADY_EXISTS)
                    self.ipam.in_use[ip] = owner
                return ip
            return await self._claim_remote(ip, owner, holder)
        for _ in range(8):  # a rival may take what was handed over: ask again
            async with self._ring_lock:
                ip_or_none = self._free_own()
                if ip_or_none is not None:
                    self.ipam.in_use[ip_or_none] = owner
                    return ip_or_none
            if not await self._request_handover():
                break
        raise NetworkError(f"no free address in the ranges of {self.node}, and no reachable "
                           "member could hand one over", ErrorCode.UNAVAILABLE)

    async def _claim_remote(self, ip: str, owner: str, holder: str) -> str:
        """Ask the owner of ip's range for it. An owner that does not know the range is
        its own yet (a hand-over still on its way to it, right after a join) answers
        "not_owner": merge the rings and ask again, a few times, before giving up."""
        for attempt in range(8):
            if holder == self.node:
                return await self._allocate_ranged(owner, ip)
            if holder not in self.peers.up_peers():
                raise NetworkError(f"cannot claim {ip}: its range is owned by {holder}, "
                                   f"which is unreachable (down); retry when {holder} is "
                                   "back, or deploy without --ip", ErrorCode.UNAVAILABLE)
            try:
                ok = await self.peers.call(holder, "ipam.grant", {"ip": ip, "owner": owner})
            except Exception as exc:
                raise NetworkError(f"cannot claim {ip}: its range is owned by {holder}, "
                                   f"which is unreachable ({exc}); retry when {holder} is "
                                   "back, or deploy without --ip", ErrorCode.UNAVAILABLE) \
                    from None
            if ok is True:
                self.ipam.on_commit(ip, owner)
                return ip
            if ok != "not_owner":
                raise NetworkError(f"{ip} is already in use (its owner {holder} says so)",
                                   ErrorCode.ALREADY_EXISTS)
            await asyncio.sleep(0.05 * (attempt + 1))
            await self.refresh_ring()
            holder = self.ring.owner_of(int(ipaddress.IPv4Address(ip))) or holder
        raise NetworkError(f"cannot claim {ip}: {holder} and this node disagree on who owns "
                           "its range; retry in a moment", ErrorCode.UNAVAILABLE)

    async def refresh_ring(self, nodes: list[str] | None = None) -> None:
        """Merge the rings of reachable members (sending ours); found it if nobody has."""
        for n in nodes if nodes is not None else self.peers.up_peers():
            try:
                raw = await self.peers.call(n, "ipam.ring", {"ring": self.ring.to_wire()})
                if self.ring.merge(self.ring.parse(raw)):
                    await self.save()
            except (RingError, Exception) as exc:
                log.debug("ipam: no ring from %s: %s", n, exc)
        await self._found()

    async def _request_handover(self) -> bool:
        """Ask reachable owners (largest first) to hand part of their ranges over."""
        owners = sorted({o for _, _, o in self.ring.ranges()} - {self.node},
                        key=lambda o: -self.ring.size_of(o))
        up = set(self.peers.up_peers())
        for o in [*(x for x in owners if x in up), *sorted(up - set(owners))]:
            try:
                ans = await self.peers.call(o, "ipam.handover", {"to": self.node})
                tokens = self.ring.parse(ans.get("ring") if isinstance(ans, dict) else None)
            except (RingError, Exception) as exc:
                log.warning("ipam: hand-over from %s failed: %s", o, exc)
                continue
            async with self._ring_lock:
                self.ring.merge(tokens)
                for ip, who in (ans.get("in_use") or {}).items():
                    if isinstance(ip, str) and isinstance(who, str) \
                            and ip not in self.ipam.in_use:
                        self.ipam.on_commit(ip, who)
                # the answer listed what is in use in every range of ours it knows
                self.accepted |= {k for k, e in tokens.items() if e.owner == self.node}
            await self.save()
            if self._free_own() is not None:
                log.info("ipam: %s handed %s addresses over to %s", o,
                         self.ring.size_of(self.node), self.node)
                return True
        return False

    async def ensure_range(self) -> None:
        """Own a range (founding the ring, or asking for a hand-over) when in a cluster."""
        if not self._others():
            return
        await self.refresh_ring()
        if not self.ring.empty and not self.ring.size_of(self.node):
            await self._request_handover()

    def _check(self, want: str) -> Any:
        try:
            return self.ipam.subnet.check(want)
        except IpamError as exc:
            raise NetworkError(str(exc), ErrorCode.INVALID_ARGUMENT) from None

    def _ask_for(self, owner: str) -> Callable[[str], Awaitable[bool]]:
        async def ask(ip: str) -> bool:
            peers = self.peers.up_peers()
            if not peers:
                return True
            args = {"ip": ip, "claimant": self.node, "owner": owner}
            res = await asyncio.gather(*(self.peers.call(p, "ipam.claim", args) for p in peers),
                                       return_exceptions=True)
            failed = [p for p, r in zip(peers, res, strict=True) if isinstance(r, BaseException)]
            if failed:
                await self._abandon(ip, [p for p, r in zip(peers, res, strict=True)
                                         if r is True])
                why = "; ".join(f"{p}: {r}" for p, r in zip(peers, res, strict=True)
                                if isinstance(r, BaseException))
                raise NetworkError(f"cannot claim {ip}: peer(s) unreachable ({why}); "
                                   "retry once they are up or marked down",
                                   ErrorCode.UNAVAILABLE)
            return all(r is True for r in res)

        return ask

    def _commit_for(self, owner: str) -> Callable[[str], Awaitable[None]]:
        async def commit(ip: str) -> None:
            await self._broadcast("ipam.commit", {"ip": ip, "owner": owner})

        return commit

    async def _abandon(self, ip: str, peers: list[str] | None = None) -> None:
        targets = self.peers.up_peers() if peers is None else peers
        await self._broadcast("ipam.abandon", {"ip": ip, "claimant": self.node}, targets)

    async def _broadcast(self, op: str, args: dict[str, Any],
                         targets: list[str] | None = None) -> None:
        """Best effort: a member that misses it catches up through `sync_from`."""
        peers = self.peers.up_peers() if targets is None else targets
        res = await asyncio.gather(*(self.peers.call(p, op, args) for p in peers),
                                   return_exceptions=True)
        for p, r in zip(peers, res, strict=True):
            if isinstance(r, BaseException):
                log.warning("ipam: %s to %s failed: %s", op, p, r)

    async def release(self, owner: str) -> str | None:
        """Free `owner`'s address cluster-wide (cnvm rm). Returns it, or None."""
        ip = self.ip_of(owner)
        if ip is None:
            return None
        self.ipam.on_release(ip, owner)
        self.mine.discard(owner)
        await self.save()
        await self._released(owner, ip)
        await self._broadcast("ipam.release", {"ip": ip, "owner": owner})
        return ip

    async def _released(self, owner: str, ip: str) -> None:
        for cb in self.on_released:
            try:
                await cb(owner, ip)
            except Exception:
                log.exception("ipam release callback failed")

    # ---- peer-op handlers (registered on the mesh as PEER_OPS)

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        ip = str(args.get("ip", ""))
        if op == "ipam.claim":
            return self.ipam.on_claim(ip, str(args["claimant"]), str(args["owner"]))
        if op == "ipam.commit":
            self.ipam.on_commit(ip, str(args["owner"]))
            await self.save()
            return True
        if op == "ipam.abandon":
            self.ipam.on_abandon(ip, str(args["claimant"]))
            return True
        if op == "ipam.release":
            owner = str(args["owner"])
            known = self.ipam.in_use.get(ip) == owner
            self.ipam.on_release(ip, owner)
            self.mine.discard(owner)
            if known:
                await self.save()
                await self._released(owner, ip)
            return True
        if op == "ipam.table":
            return self.table()
        if op == "ipam.ring":
            try:
                if self.ring.merge(self.ring.parse(args.get("ring") or {})):
                    await self.save()
            except RingError as exc:
                raise NetworkError(str(exc), ErrorCode.INVALID_ARGUMENT) from None
            await self._found()
            return self.ring.to_wire()
        if op == "ipam.handover":
            return await self._give(args.get("to"))
        if op == "ipam.grant":
            return await self._grant(args)
        raise NetworkError(f"unknown ipam op {op}", ErrorCode.INVALID_ARGUMENT)

    async def _give(self, to: Any) -> dict[str, Any]:
        from cnvmd.peers.membership import NAME_RE

        if not isinstance(to, str) or not NAME_RE.fullmatch(to) or to == self.node:
            raise NetworkError("ipam.handover: bad receiver", ErrorCode.INVALID_ARGUMENT)
        async with self._ring_lock:
            await self._found()
            got = self.ring.hand_over(self.node, to, self._used())
            if got is not None:
                await self.save()
        # what we know in use in every range of the receiver (this one, and any whose
        # hand-over answer was lost): the receiver allocates from them from now on
        theirs = self.ring.owned(to)
        out = {ip: o for ip, o in self.ipam.in_use.items()
               if any(a <= int(ipaddress.IPv4Address(ip)) < b for a, b in theirs)}
        if got is not None:
            a, b = got
            log.info("ipam: handed %s-%s over to %s", ipaddress.IPv4Address(a),
                     ipaddress.IPv4Address(b - 1), to)
        return {"ring": self.ring.to_wire(), "in_use": out}

    async def _grant(self, args: dict[str, Any]) -> bool | str:
        """A member wants a specific address of one of our ranges for cnvm `owner`:
        True, False (in use) or "not_owner" (our ring does not give us that range)."""
        ip, owner = args.get("ip"), args.get("owner")
        if not isinstance(owner, str) or not 0 < len(owner) <= 128:
            raise NetworkError("ipam.grant: bad owner", ErrorCode.INVALID_ARGUMENT)
        try:
            addr = self.ipam.subnet.check(str(ip))
        except IpamError as exc:
            raise NetworkError(str(exc), ErrorCode.INVALID_ARGUMENT) from None
        key = str(addr)
        async with self._ring_lock:
            if self.ring.owner_of(int(addr)) != self.node:
                return "not_owner"
            cur = self.ipam.in_use.get(key)
            if (cur is not None and cur != owner) or key in self.ipam.pending:
                return False
            self.ipam.in_use[key] = owner
        await self.save()
        return True

    async def sync_from(self, node: str) -> int | None:
        """Learn the addresses `node` knows to be in use (after either side was down).

        Union only: a release missed while down keeps an address busy here (leaks,
        never doubles) until that owner's release is seen again. None if unreachable.
        """
        try:
            table = await self.peers.call(node, "ipam.table", {})
        except Exception as exc:
            log.debug("ipam: cannot sync from %s: %s", node, exc)
            return None
        with contextlib.suppress(Exception):
            await self.refresh_ring([node])
            if not self.ring.empty and not self.ring.size_of(self.node):
                await self._request_handover()
        added = 0
        for ip, owner in (table or {}).items():
            cur = self.ipam.in_use.get(ip)
            if cur is None:
                self.ipam.on_commit(str(ip), str(owner))
                added += 1
            elif cur != owner:
                log.error("ipam: %s is owned by %s here but by %s on %s", ip, cur, owner, node)
        if added:
            await self.save()
        return added
