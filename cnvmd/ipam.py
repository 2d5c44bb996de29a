"""Cluster-wide IP address management without a central server.

A node that wants an address *claims* it: it asks every member it believes is up
to grant the claim, and the address is its only if all of them do. Each member
answers from what it knows (addresses in use anywhere, claims it has granted and
claims of its own in flight). Two nodes claiming one address at the same moment
are ordered by a fixed priority (node name), so a member holding its own pending
claim grants a competing one only to a higher-priority claimant and then drops its
own. Hence two concurrent claims for one address can never both collect every
grant: the two claimants would each have to grant the other. The loser retries
with another address; candidates are tried in a node-specific order so rivals
rarely collide twice.

Addresses are owned by cnvms, not nodes: an address is kept when its cnvm
teleports, and released on `rm`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

GRANT_TTL = 30.0
"""A grant not confirmed within this many seconds lapses (its claimant died)."""


class IpamError(Exception):
    pass


@dataclass
class Subnet:
    """The overlay subnet and the addresses cnvms may not take."""

    network: ipaddress.IPv4Network
    reserved: frozenset[ipaddress.IPv4Address] = frozenset()

    @classmethod
    def parse(cls, cidr: str, gateway: str | None = None) -> Subnet:
        try:
            net = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise IpamError(f"bad subnet {cidr!r}: {exc}") from None
        res = {net.network_address, net.broadcast_address}
        if gateway:
            res.add(ipaddress.IPv4Address(gateway))
        return cls(net, frozenset(res))

    def check(self, ip: str) -> ipaddress.IPv4Address:
        """Validate a user-supplied address, with an error that says what is wrong."""
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise IpamError(f"{ip!r} is not an IPv4 address") from None
        if addr not in self.network:
            raise IpamError(f"{addr} is outside the cluster subnet {self.network}")
        if addr in self.reserved:
            raise IpamError(f"{addr} is reserved in {self.network} (network, broadcast "
                            "or gateway address)")
        return addr

    def candidates(self, node: str) -> list[ipaddress.IPv4Address]:
        """Usable hosts, rotated by a per-node offset so nodes start apart."""
        hosts = [h for h in self.network.hosts() if h not in self.reserved]
        if not hosts:
            return []
        off = int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big") % len(hosts)
        return hosts[off:] + hosts[:off]


@dataclass
class _Grant:
    claimant: str
    owner: str
    expires: float


@dataclass
class Ipam:
    """One node's view: addresses in use, grants given, own claims in flight."""

    node: str
    subnet: Subnet
    in_use: dict[str, str] = field(default_factory=dict)  # ip -> owning cnvm ("node/name")
    granted: dict[str, _Grant] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # ip -> our cnvm being deployed
    lost: set[str] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _expire(self) -> None:
        now = time.monotonic()
        for ip in [ip for ip, g in self.granted.items() if g.expires < now]:
            del self.granted[ip]

    def _busy(self, ip: str) -> bool:
        self._expire()
        return ip in self.in_use or ip in self.granted or ip in self.pending

    def on_claim(self, ip: str, claimant: str, owner: str) -> bool:
        """Answer a peer's claim (the handler of the `ipam.claim` peer RPC)."""
        self._expire()
        if ip in self.in_use and self.in_use[ip] != owner:
            return False
        g = self.granted.get(ip)
        if g and g.claimant != claimant:
            return False
        if ip in self.pending:
            if priority(claimant) > priority(self.node):
                return False
            self.lost.add(ip)  # a higher-priority node wants it: our own claim loses
        self.granted[ip] = _Grant(claimant, owner, time.monotonic() + GRANT_TTL)
        return True

    def on_commit(self, ip: str, owner: str) -> None:
        """A claim succeeded somewhere (or membership gossip says `ip` is in use)."""
        self.granted.pop(ip, None)
        self.in_use[ip] = owner

    def on_abandon(self, ip: str, claimant: str) -> None:
        g = self.granted.get(ip)
        if g and g.claimant == claimant:
            del self.granted[ip]

    def on_release(self, ip: str, owner: str) -> None:
        if self.in_use.get(ip) == owner:
            del self.in_use[ip]
        g = self.granted.get(ip)
        if g and g.owner == owner:
            del self.granted[ip]

    async def allocate(
        self,
        owner: str,
        ask: Callable[[str], Awaitable[bool]],
        commit: Callable[[str], Awaitable[None]],
        abandon: Callable[[str], Awaitable[None]] | None = None,
        want: str | None = None,
        attempts: int = 32,
    ) -> str:
        """Claim `want` (or any free address) for cnvm `owner` from the whole cluster.

        `ask(ip)` asks every up member and returns True only if all granted;
        `commit(ip)` tells them the claim succeeded; `abandon(ip)` that it failed, so
        their grants lapse at once instead of after GRANT_TTL.
        """
        if want is not None:
            ip = str(self.subnet.check(want))
            if not await self._try(ip, owner, ask, commit, abandon):
                raise IpamError(f"{ip} is already in use in the cluster")
            return ip
        tried = 0
        for addr in self.subnet.candidates(self.node):
            ip = str(addr)
            if self._busy(ip):
                continue
            if await self._try(ip, owner, ask, commit, abandon):
                return ip
            tried += 1
            if tried >= attempts:
                break
        raise IpamError(f"no free address in {self.subnet.network}")

    async def _try(
        self, ip: str, owner: str,
        ask: Callable[[str], Awaitable[bool]], commit: Callable[[str], Awaitable[None]],
        abandon: Callable[[str], Awaitable[None]] | None,
    ) -> bool:
        async with self._lock:
            if self._busy(ip):
                return False
            self.pending[ip] = owner
            self.lost.discard(ip)
        try:
            ok = await ask(ip)
            if ok and ip not in self.lost:
                self.in_use[ip] = owner
                await commit(ip)
                return True
            if abandon is not None:
                await abandon(ip)
            return False
        finally:
            self.pending.pop(ip, None)
            self.lost.discard(ip)

    def load(self, used: Iterable[tuple[str, str]]) -> None:
        """Seed from persisted records and membership (ip, owner) pairs."""
        for ip, owner in used:
            self.in_use[ip] = owner


def priority(node: str) -> tuple[int, str]:
    """Total order among claimants; lower sorts first and wins."""
    return (0, node)
