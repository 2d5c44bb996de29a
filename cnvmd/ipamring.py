"""Address ranges owned by nodes: the partition-safe half of the IPAM.

Why: a claim that asks "every member that is up" lets both sides of a split cluster
hand out one address (each side thinks the other is down). Here, as in Weave's IPAM
ring, every address of the subnet lies in a range owned by exactly one node, and a
node allocates only inside its own ranges, so the two sides of a split can never
pick the same address. Ownership moves only by an explicit hand-over made by the
current owner (it splits one of its ranges and gives a part away), never by a
node taking what it does not own, so views cannot conflict; they only lag.

The ring is a map ``token -> (owner, version)``: the range of a token runs up to
the next token. Tokens are never removed; a hand-over of a whole range bumps its
version. Views merge by taking, per token, the higher version (gossiped with the
address table: ``ipam.ring``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

MAX_TOKENS = 4096


class RingError(Exception):
    pass


@dataclass(frozen=True)
class Entry:
    owner: str
    version: int


@dataclass
class Ring:
    """One node's view of who owns which addresses of [lo, hi] (ints, inclusive)."""

    lo: int
    hi: int
    tokens: dict[int, Entry] = field(default_factory=dict)

    @classmethod
    def for_subnet(cls, network: ipaddress.IPv4Network) -> Ring:
        return cls(int(network.network_address) + 1, int(network.broadcast_address) - 1)

    @property
    def empty(self) -> bool:
        return not self.tokens

    def ranges(self) -> list[tuple[int, int, str]]:
        """(start, end exclusive, owner), in address order."""
        keys = sorted(self.tokens)
        return [(k, keys[i + 1] if i + 1 < len(keys) else self.hi + 1, self.tokens[k].owner)
                for i, k in enumerate(keys)]

    def owner_of(self, ip: int) -> str | None:
        best = None
        for k in self.tokens:
            if k <= ip and (best is None or k > best):
                best = k
        return None if best is None else self.tokens[best].owner

    def owned(self, node: str) -> list[tuple[int, int]]:
        return [(a, b) for a, b, o in self.ranges() if o == node]

    def size_of(self, node: str) -> int:
        return sum(b - a for a, b in self.owned(node))

    def claim_all(self, node: str) -> None:
        """The first owner of everything (cluster founder, or the upgrade rule)."""
        if self.tokens:
            raise RingError("the ring already has owners")
        self.tokens[self.lo] = Entry(node, 1)

    def merge(self, other: dict[int, Entry]) -> bool:
        """Take every token we lack or hold at a lower version. Returns whether changed."""
        changed = False
        for k, e in other.items():
            if not self.lo <= k <= self.hi:
                continue
            cur = self.tokens.get(k)
            if cur is None or e.version > cur.version or (
                    e.version == cur.version and e.owner < cur.owner and e != cur):
                # equal versions with two owners cannot come from hand-overs (only an
                # owner changes its tokens); pick one deterministically all the same
                if len(self.tokens) >= MAX_TOKENS and cur is None:
                    continue
                self.tokens[k] = e
                changed = True
        return changed

    def hand_over(self, giver: str, receiver: str, used: set[int]) -> tuple[int, int] | None:
        """`giver` gives `receiver` part of its range with the most free addresses: the
        upper part holding half of them (or the whole range, if its first address is
        its only free one). None: nothing free."""
        best: tuple[int, int, int] | None = None
        for a, b in self.owned(giver):
            free = sum(1 for x in range(a, b) if x not in used)
            if free and (best is None or free > best[2]):
                best = (a, b, free)
        if best is None:
            return None
        a, b, free = best
        if b - a >= 2:
            # split so that the free addresses are shared: the upper half of them goes
            frees = [x for x in range(a, b) if x not in used]
            mid = frees[len(frees) // 2] if free >= 2 else frees[0]
            if mid == a:  # the one free address opens the range: give it all
                self.tokens[a] = Entry(receiver, self.tokens[a].version + 1)
                return a, b
            self.tokens[mid] = Entry(receiver, 1)
            return mid, b
        self.tokens[a] = Entry(receiver, self.tokens[a].version + 1)
        return a, b

    def reclaim(self, dead: str, taker: str) -> list[int]:
        """`taker` takes every range of `dead`, a member an operator removed for good
        (Weave's ``rmpeer``): each token's version goes up, so every view adopts the
        new owner on merge. Only the node that ran the removal calls this (one
        decision, not one per node). Returns the tokens taken."""
        out = []
        for k, e in sorted(self.tokens.items()):
            if e.owner == dead:
                self.tokens[k] = Entry(taker, e.version + 1)
                out.append(k)
        return out

    # ---- wire / disk

    def to_wire(self) -> dict[str, list[Any]]:
        return {str(ipaddress.IPv4Address(k)): [e.owner, e.version]
                for k, e in sorted(self.tokens.items())}

    def parse(self, raw: Any) -> dict[int, Entry]:
        """A peer's (or the store's) ring, checked: bounded, in the subnet, typed."""
        from cnvmd.peers.membership import NAME_RE

        if not isinstance(raw, dict) or len(raw) > MAX_TOKENS:
            raise RingError("ring: not a bounded map")
        out: dict[int, Entry] = {}
        for k, v in raw.items():
            try:
                ip = int(ipaddress.IPv4Address(k))
            except (ValueError, TypeError):
                raise RingError(f"ring: bad token {str(k)[:40]!r}") from None
            if not self.lo <= ip <= self.hi:
                raise RingError(f"ring: token {k} outside the subnet")
            if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                    and NAME_RE.fullmatch(v[0]) and isinstance(v[1], int)
                    and not isinstance(v[1], bool) and 0 < v[1] < 1 << 62):
                raise RingError(f"ring: bad entry for {k}")
            out[ip] = Entry(v[0], v[1])
        return out
