"""The cluster IPAM (cnvmd.ipam) wired to a peer transport and to disk.

`cnvmd.ipam.Ipam` is the claim protocol; this module gives it what it needs:
`ask` = ask every up member over the peer RPC (`ipam.claim`), `commit`/`abandon`
= tell them, and persistence of the addresses known to be in use, so a restarted
node does not forget (and hand out again) addresses other nodes committed.

The transport is a `PeerSet` (protocol): the daemon adapts the peer mesh
(`MeshPeers`); unit tests connect several ClusterIpams in-process.

Owners are cnvm names (an address follows its cnvm through teleports and is
released only on `rm`); a node's own expose address is owned by "node:<name>".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cnvmd.ipam import Ipam, IpamError, Subnet
from cnvmd.state import StateStore
from proto.messages import ErrorCode

from .names import NetworkError

log = logging.getLogger("cnvmd.network")

STATE_KIND = "network"
STATE_NAME = "ipam"
PEER_OPS = ("ipam.claim", "ipam.commit", "ipam.abandon", "ipam.release", "ipam.table")


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
        return sorted(m.name for m in ms.peers() if ms.state_of(m.name) != DOWN)

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
        if store is not None:
            rec = store.load(STATE_KIND, STATE_NAME) or {}
            self.ipam.load((str(ip), str(o)) for ip, o in (rec.get("in_use") or {}).items())
            self.mine = {str(o) for o in rec.get("mine") or []}

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

    # ---- persistence

    async def save(self) -> None:
        """Persist the table (and `mine`) off the loop."""
        if self.store is None:
            return
        async with self._save_lock:
            data = {"in_use": self.table(), "mine": sorted(self.mine)}
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
        try:
            ip = await self.ipam.allocate(owner, self._ask_for(owner), self._commit_for(owner),
                                          self._abandon, want=want)
        except IpamError as exc:
            code = ErrorCode.ALREADY_EXISTS if "already in use" in str(exc) else ErrorCode.FAILED
            raise NetworkError(str(exc), code) from None
        self.mine.add(owner)
        await self.save()
        return ip

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
        raise NetworkError(f"unknown ipam op {op}", ErrorCode.INVALID_ARGUMENT)

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
