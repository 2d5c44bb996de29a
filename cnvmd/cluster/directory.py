"""The cluster-wide directory of cnvms and node resources, and the name claims.

Why a structure of its own (not the membership record): the membership table is
gossiped whole every second and each record is signed by its owner; a cnvm list with
IPs, memory and images would make every round heavy and every deploy re-sign it.
Here each node is the only *author* of its own document (its cnvms and resources,
with a version); it pushes the document straight to every member when it changes and
again when a member comes back (restart, partition healed: see cnvmd.cluster.ops), so
a peer holds exactly what the author said, authenticated by the SSH channel it came
on (``ctx.node``), never relayed by a third node. Documents are ordered by
``(incarnation, version)``: the incarnation is the author's start time (ns), so a
restarted node always supersedes what it said before.

Everything a peer sends is validated like local input (`parse_doc`): full-match
patterns for names, images and node names, IPv4 addresses parsed, numbers bounded,
at most `MAX_ENTRIES` cnvms; a malformed document is refused whole.

**Names are unique cluster-wide** (claim protocol, as `cnvmd.ipam` does for
addresses). A node deploying NAME first checks its directory (NAME on any node, down
ones included, is a `conflict`), then *claims* NAME from every member it believes is
up; it deploys only if all of them grant. A member refuses when NAME is in its
directory on another node (``exists``: final), when it granted NAME to another
claimant less than `GRANT_TTL` ago, or when it is claiming NAME itself and the
claimant does not have priority (``busy``). Priority is the node name (lower wins),
so of two concurrent claimants at most one can collect every grant: each would have
to grant the other, and the one with priority never grants the other while claiming.
A claimant whose own claim loses (it granted a higher-priority one) or that meets a
``busy`` abandons (its grants are dropped at once), backs off and retries; an
``exists`` ends it with `conflict`. The claim is held from the grant until the cnvm
is in the directory (or the deploy failed and the claim is abandoned), and a grant
lapses once the name shows up in the claimant's document. A member that cannot be
reached fails the deploy (`unavailable`), unless the mesh already judges it down: a
partition can then create one name on both sides; when it heals, `duplicates()`
lists such names and `ls` shows them, nothing is removed automatically.

For a resolver (DNS, issue 15 item 5): `lookup(name)` gives the entry (ip, node),
`entries()` all of them, and `add_listener(cb)` / `wait_change()` say when to reload.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_ENTRIES = 10_000
MAX_IMAGES = 512
GRANT_TTL = 30.0
"""A grant not followed by the name in the claimant's document lapses after this."""
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
"""cnvm names are DNS labels (cnvmd.bundle.check_name); runc-only ids are not listed."""
NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
IMAGE_ID_RE = re.compile(r"(sha256:)?[0-9a-f]{64}")
STATES = ("running", "paused", "stopped", "created", "creating", "missing", "corrupt",
          "unknown")
_MAX_BYTES = 1 << 52
_MAX_NS = 1 << 62


@dataclass(frozen=True)
class Entry:
    """One cnvm as the directory lists it."""

    name: str
    node: str
    state: str
    ip: str | None = None
    memory: int | None = None
    """The memory limit (bytes) or None (unlimited)."""
    mem_use: int | None = None
    image: str | None = None
    image_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Resources:
    """One node's capacity and state, as its directory document carries it."""

    mem_total: int = 0
    mem_free: int = 0
    cpus: int = 1
    load: float = 0.0
    cordoned: bool = False
    link_mbps: int = 0
    images: list[str] = field(default_factory=list)
    """Image ids present on the node (placement prefers nodes that have the image)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeDoc:
    """What one node says about itself; replaced whole by a newer one."""

    node: str
    incarnation: int
    version: int
    entries: dict[str, Entry]
    resources: Resources
    received: float = 0.0

    def order(self) -> tuple[int, int]:
        return (self.incarnation, self.version)

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node, "incarnation": self.incarnation, "version": self.version,
                "entries": [e.to_dict() for e in self.entries.values()],
                "resources": self.resources.to_dict()}


def _int(v: Any, lo: int, hi: int, what: str, *, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}")
    return v


def _str(v: Any, pattern: re.Pattern[str], what: str, *, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise ValueError(f"bad {what}")
    return v


def parse_entry(d: Any, node: str) -> Entry:
    if not isinstance(d, Mapping):
        raise ValueError("an entry must be a map")
    if set(d) - {f for f in Entry.__dataclass_fields__}:
        raise ValueError("unknown entry fields")
    if d.get("node") != node:
        raise ValueError("an entry of another node")
    ip = d.get("ip")
    if ip is not None:
        if not isinstance(ip, str) or len(ip) > 15:
            raise ValueError("bad ip")
        ip = str(ipaddress.IPv4Address(ip))
    state = d.get("state")
    if state not in STATES:
        raise ValueError("bad state")
    return Entry(
        name=str(_str(d.get("name"), NAME_RE, "cnvm name")), node=node, state=str(state),
        ip=ip,
        memory=_int(d.get("memory"), 0, _MAX_BYTES, "memory", optional=True),
        mem_use=_int(d.get("mem_use"), 0, _MAX_BYTES, "mem_use", optional=True),
        image=_str(d.get("image"), IMAGE_RE, "image", optional=True),
        image_id=_str(d.get("image_id"), IMAGE_ID_RE, "image id", optional=True))


def parse_resources(d: Any) -> Resources:
    if not isinstance(d, Mapping):
        raise ValueError("resources must be a map")
    load = d.get("load", 0.0)
    if isinstance(load, bool) or not isinstance(load, int | float) or not math.isfinite(load) \
            or not 0 <= load <= 1e6:
        raise ValueError("bad load")
    cordoned = d.get("cordoned", False)
    if not isinstance(cordoned, bool):
        raise ValueError("cordoned must be true or false")
    images = d.get("images", [])
    if not isinstance(images, list) or len(images) > MAX_IMAGES:
        raise ValueError("bad images")
    return Resources(
        mem_total=int(_int(d.get("mem_total", 0), 0, _MAX_BYTES, "mem_total") or 0),
        mem_free=int(_int(d.get("mem_free", 0), 0, _MAX_BYTES, "mem_free") or 0),
        cpus=int(_int(d.get("cpus", 1), 1, 1 << 16, "cpus") or 1),
        load=float(load), cordoned=cordoned,
        link_mbps=int(_int(d.get("link_mbps", 0), 0, 1 << 24, "link_mbps") or 0),
        images=[str(_str(i, IMAGE_ID_RE, "image id")) for i in images])


def parse_doc(sender: str, d: Any) -> NodeDoc:
    """A peer's document, validated whole (ValueError says what is wrong). Only the
    sender's own document is accepted: a node speaks for itself."""
    if not isinstance(d, Mapping):
        raise ValueError("a directory document must be a map")
    if d.get("node") != sender:
        raise ValueError(f"document of {str(d.get('node'))[:64]!r} sent by {sender}")
    raw = d.get("entries")
    if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
        raise ValueError(f"entries must be a list of at most {MAX_ENTRIES}")
    entries: dict[str, Entry] = {}
    for x in raw:
        e = parse_entry(x, sender)
        if e.name in entries:
            raise ValueError(f"{e.name} listed twice")
        entries[e.name] = e
    return NodeDoc(node=sender,
                   incarnation=int(_int(d.get("incarnation"), 0, _MAX_NS, "incarnation") or 0),
                   version=int(_int(d.get("version"), 0, _MAX_NS, "version") or 0),
                   entries=entries, resources=parse_resources(d.get("resources")))


@dataclass
class _Grant:
    claimant: str
    expires: float


def priority(node: str) -> tuple[int, str]:
    """Total order among claimants of one name; lower wins (as cnvmd.ipam.priority)."""
    return (0, node)


class Directory:
    """This node's view of the cluster: one document per node (its own included) and
    the state of name claims. Synchronous and cheap; the plug-in does the I/O."""

    def __init__(self, node: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.clock = clock
        self.docs: dict[str, NodeDoc] = {
            node: NodeDoc(node, time.time_ns(), 0, {}, Resources())}
        self.granted: dict[str, _Grant] = {}
        self.pending: set[str] = set()
        """Names this node is claiming or deploying (held until listed or abandoned)."""
        self.lost: set[str] = set()
        self.deploying: set[str] = set()
        """Names whose claim succeeded here, until the deploy ends (listed or undone)."""
        self._listeners: list[Callable[[set[str]], None]] = []
        self._changed = asyncio.Event()

    # ---- queries

    @property
    def mine(self) -> NodeDoc:
        return self.docs[self.node]

    def entries(self) -> list[Entry]:
        """Every cnvm of every node, sorted by name then node."""
        return sorted((e for d in self.docs.values() for e in d.entries.values()),
                      key=lambda e: (e.name, e.node))

    def where(self, name: str) -> list[Entry]:
        return [d.entries[name] for d in self.docs.values() if name in d.entries]

    def lookup(self, name: str) -> Entry | None:
        """The entry of `name`: this node's if it has it, else a running one, else any
        (during a teleport both nodes may list it for a moment)."""
        found = self.where(name)
        if not found:
            return None
        found.sort(key=lambda e: (e.node != self.node, e.state != "running", e.node))
        return found[0]

    def duplicates(self) -> dict[str, list[str]]:
        """Names listed by more than one node (a partition let both deploy, or a
        teleport is committing right now)."""
        out: dict[str, list[str]] = {}
        for e in self.entries():
            out.setdefault(e.name, []).append(e.node)
        return {k: v for k, v in out.items() if len(v) > 1}

    def resources(self, node: str) -> Resources | None:
        d = self.docs.get(node)
        return d.resources if d is not None else None

    def count(self, node: str) -> int | None:
        d = self.docs.get(node)
        return len(d.entries) if d is not None else None

    # ---- change notification (for a resolver, `ls`, `nodes`)

    def add_listener(self, cb: Callable[[set[str]], None]) -> Callable[[], None]:
        """``cb(names)`` after each change, with the cnvm names whose entry changed."""
        self._listeners.append(cb)
        return lambda: self._listeners.remove(cb) if cb in self._listeners else None

    async def wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self, old: NodeDoc | None, new: NodeDoc | None) -> None:
        a = old.entries if old is not None else {}
        b = new.entries if new is not None else {}
        names = {n for n in a.keys() | b.keys() if a.get(n) != b.get(n)}
        for n in names:
            if n in b and (g := self.granted.get(n)) is not None and g.claimant == b[n].node:
                del self.granted[n]  # the claim came through: the name is listed now
        self._changed.set()
        self._changed = asyncio.Event()
        for cb in list(self._listeners):
            cb(names)

    # ---- documents

    def set_local(self, entries: list[Entry], resources: Resources) -> bool:
        """Replace this node's document; bumps its version if anything changed."""
        cur = self.mine
        new = {e.name: e for e in entries}
        if new == cur.entries and resources == cur.resources:
            return False
        doc = NodeDoc(self.node, cur.incarnation, cur.version + 1, new, resources)
        self.docs[self.node] = doc
        self._notify(cur, doc)
        return True

    def absorb(self, doc: NodeDoc) -> bool:
        """A peer's (validated) document; True if it was newer and taken."""
        if doc.node == self.node:
            return False
        cur = self.docs.get(doc.node)
        if cur is not None and doc.order() <= cur.order():
            return False
        doc.received = self.clock()
        self.docs[doc.node] = doc
        self._notify(cur, doc)
        return True

    def held(self, node: str) -> tuple[int, int] | None:
        d = self.docs.get(node)
        return d.order() if d is not None else None

    def drop(self, node: str) -> None:
        """A member was removed: its cnvms leave the directory."""
        if node != self.node and node in self.docs:
            old = self.docs.pop(node)
            self._notify(old, None)

    # ---- name claims (see the module doc)

    def _expire(self) -> None:
        now = self.clock()
        for n in [n for n, g in self.granted.items() if g.expires < now]:
            del self.granted[n]

    def local_conflict(self, name: str) -> str | None:
        """Why this node may not claim `name` (None: it may ask)."""
        for e in self.where(name):
            return f"a cnvm named {name!r} already exists on {e.node}"
        self._expire()
        g = self.granted.get(name)
        if g is not None:
            return f"{name!r} is being deployed on {g.claimant}"
        if name in self.pending or name in self.deploying:
            return f"{name!r} is being deployed on this node"
        return None

    def on_claim(self, name: str, claimant: str) -> dict[str, Any]:
        """Answer a peer's claim: {"ok": bool, "why": exists|busy, "node": holder}."""
        self._expire()
        for e in self.where(name):
            if e.node != claimant:
                return {"ok": False, "why": "exists", "node": e.node}
        if name in self.deploying:
            return {"ok": False, "why": "exists", "node": self.node}
        g = self.granted.get(name)
        if g is not None and g.claimant != claimant:
            return {"ok": False, "why": "busy", "node": g.claimant}
        if name in self.pending:
            if priority(claimant) > priority(self.node):
                return {"ok": False, "why": "busy", "node": self.node}
            self.lost.add(name)  # a claimant with priority: our own claim loses
        self.granted[name] = _Grant(claimant, self.clock() + GRANT_TTL)
        return {"ok": True}

    def on_abandon(self, name: str, claimant: str) -> None:
        g = self.granted.get(name)
        if g is not None and g.claimant == claimant:
            del self.granted[name]
