"""The cluster membership table: versioned records, anti-entropy merge, liveness.

Each node owns its own record and is the only one that bumps its ``version`` (every
gossip round, as a heartbeat) and its ``incarnation`` (every daemon start, so a
restarted node always wins over what it said before it died). Liveness is a *local*
judgement: a member whose version has not advanced for ``suspect_after`` seconds is
suspect, after ``down_after`` it is down. Because the heartbeat travels through any
path of the gossip, a node that one peer cannot reach but another can stays alive
(indirect probing for free), and no refutation protocol is needed.

Records are ordered by ``(epoch, removed, incarnation, version, key)``: ``epoch`` is set at
enrolment (a node re-enrolled after removal gets a higher one), and within an epoch a
removal tombstone beats any record, so a stale gossip can never resurrect a revoked
node.

Records also carry signatures (trust.py): ``cert`` (the admission, by the enrolling
member), ``removal`` (on a tombstone, by the removing member), ``prev`` (on a
re-admission: the removal of the previous epoch) and ``sig`` (the owner's, over the
content). This module only stores them; ``merge`` is the trusted, order-only join
(enrolment, disk); gossip checks the signatures before ``accept``-ing a record.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("cnvmd.peers")

ACTIVE = "active"
REMOVED = "removed"

ALIVE = "alive"
SUSPECT = "suspect"
DOWN = "down"

_STRUCTURAL_SKIP = {"version", "incarnation", "sig"}
_PRIVATE = ("pubkey", "sig", "cert", "removal", "prev")
"""Not shown in views and events (keys and signatures are the mesh's business)."""
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MAX_INT = 1 << 62
_MAX_CAPS = 16 * 1024
_MAX_CNVMS = 10_000


def _plain(v: Any, depth: int = 0) -> bool:
    """JSON-safe data (what the state file and every peer can store)."""
    if v is None or isinstance(v, str | bool):
        return True
    if isinstance(v, int):
        return -_MAX_INT <= v < _MAX_INT
    if isinstance(v, float):
        return math.isfinite(v)
    if depth >= 4:
        return False
    if isinstance(v, list):
        return all(_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x, depth + 1) for k, x in v.items())
    return False


def _signed(d: Any, key: str) -> dict[str, str]:
    """A {by, sig} certificate field (empty if absent)."""
    v = d.get(key) or {}
    if not isinstance(v, dict) or len(v) > 2 or not all(
            isinstance(k, str) and isinstance(x, str) and len(x) < 1024 for k, x in v.items()):
        raise ValueError(f"{key} must be a map of strings")
    return dict(v)


@dataclass
class Member:
    """One node as every member sees it (the gossiped part only)."""

    name: str
    addr: str
    port: int
    pubkey: str
    epoch: int = 1
    incarnation: int = 0
    version: int = 0
    admin: str = ACTIVE
    caps: dict[str, Any] = field(default_factory=dict)
    cnvms: list[str] = field(default_factory=list)
    joined: float = 0.0
    cert: dict[str, str] = field(default_factory=dict)
    removal: dict[str, str] = field(default_factory=dict)
    prev: dict[str, str] = field(default_factory=dict)
    sig: str = ""

    def order(self) -> tuple[int, int, int, int, str]:
        """Total order; the key breaks ties so that two members that enrolled the same
        name concurrently (via different peers) converge on one record everywhere."""
        return (self.epoch, 1 if self.admin == REMOVED else 0, self.incarnation, self.version,
                self.pubkey)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    def signed_fields(self, cluster_id: str) -> list[Any]:
        """What the owner's ``sig`` covers: everything but the certificates."""
        return [cluster_id, self.name, self.addr, self.port, self.pubkey, self.epoch,
                self.incarnation, self.version, self.admin, self.caps, self.cnvms, self.joined]

    def identity(self, cluster_id: str) -> list[Any]:
        """What an admission or a removal covers: who, with which key, in which epoch."""
        return [cluster_id, self.name, self.pubkey, self.epoch]

    @classmethod
    def from_wire(cls, d: Any) -> Member:
        """Validate a record received from a peer (or the disk); ValueError if malformed.

        Bounded and JSON-safe: a record is stored, persisted and re-sent by every
        member, so what one member sends must not break the others."""
        try:
            caps = d.get("caps") or {}
            cnvms = d.get("cnvms") or []
            m = cls(
                name=str(d["name"]),
                addr=str(d.get("addr") or ""),
                port=int(d["port"]),
                pubkey=str(d["pubkey"]),
                epoch=int(d.get("epoch", 1)),
                incarnation=int(d.get("incarnation", 0)),
                version=int(d.get("version", 0)),
                admin=str(d.get("admin", ACTIVE)),
                caps=dict(caps),
                cnvms=[x for x in cnvms if isinstance(x, str)],
                joined=float(d.get("joined", 0.0)),
                cert=_signed(d, "cert"),
                removal=_signed(d, "removal"),
                prev=_signed(d, "prev"),
                sig=str(d.get("sig") or ""),
            )
            ok = (NAME_RE.fullmatch(m.name) is not None and m.admin in (ACTIVE, REMOVED)
                  and 0 <= m.port < 65536 and len(m.addr) <= 255 and 0 < len(m.pubkey) <= 4096
                  and len(m.sig) < 1024 and math.isfinite(m.joined)
                  and all(0 <= x < _MAX_INT for x in (m.epoch, m.incarnation, m.version))
                  and isinstance(caps, dict) and _plain(caps) and len(str(caps)) <= _MAX_CAPS
                  and isinstance(cnvms, list) and len(cnvms) == len(m.cnvms) <= _MAX_CNVMS
                  and all(len(x) <= 253 for x in m.cnvms))
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed member record: {exc}") from None
        if not ok:
            raise ValueError(f"malformed member record for {m.name[:64]!r}")
        return m

    def structure(self) -> dict[str, Any]:
        """Everything but the heartbeat: a change here is worth an event and a save."""
        d = self.to_wire()
        for k in _STRUCTURAL_SKIP:
            d.pop(k, None)
        return d


@dataclass(frozen=True)
class MemberEvent:
    """A membership change: ``kind`` is added | updated | state | removed.

    ``state`` is the local liveness view (alive/suspect/down/removed) after the change;
    a liveness transition always produces a ``state`` event (even if the same merge
    also produced ``updated``), so an FDB can follow ``state`` events alone.
    """

    kind: str
    name: str
    state: str
    old_state: str | None
    member: dict[str, Any]


class Subscription:
    """One subscriber's queue of MemberEvents."""

    def __init__(self, registry: set[asyncio.Queue[MemberEvent]]) -> None:
        self.queue: asyncio.Queue[MemberEvent] = asyncio.Queue()
        self._registry = registry
        registry.add(self.queue)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> MemberEvent:
        if self.queue not in self._registry and self.queue.empty():
            raise StopAsyncIteration
        return await self.queue.get()

    async def aclose(self) -> None:
        self._registry.discard(self.queue)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Membership:
    """The table plus the local liveness view; all methods are synchronous and cheap."""

    def __init__(
        self,
        self_name: str,
        *,
        suspect_after: float = 3.0,
        down_after: float = 6.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_name = self_name
        self.suspect_after = suspect_after
        self.down_after = down_after
        self._clock = clock
        self.records: dict[str, Member] = {}
        self._last_advance: dict[str, float] = {}
        self._state: dict[str, str] = {}
        self._listeners: list[Callable[[MemberEvent], None]] = []
        self._queues: set[asyncio.Queue[MemberEvent]] = set()
        self.dirty = False
        """Set when a structural change should be persisted; the owner clears it."""

    # -- queries ---------------------------------------------------------------------

    def get(self, name: str) -> Member | None:
        return self.records.get(name)

    def state_of(self, name: str) -> str:
        return self._state.get(name, DOWN)

    def active(self) -> list[Member]:
        return [m for m in self.records.values() if m.admin == ACTIVE]

    def pinned_key(self, name: str) -> str | None:
        """The public key an active member must authenticate with, else None."""
        m = self.records.get(name)
        return m.pubkey if m is not None and m.admin == ACTIVE else None

    def peers(self, state: str | None = None) -> list[Member]:
        """Active members other than this node, optionally only those in ``state``."""
        return [
            m for m in self.active()
            if m.name != self.self_name and (state is None or self._state.get(m.name) == state)
        ]

    def view(self) -> list[dict[str, Any]]:
        """What `nodes` prints: the record plus local state and wall-clock last-seen."""
        now_m, now_w = self._clock(), time.time()
        out = []
        for m in sorted(self.records.values(), key=lambda m: m.name):
            d = m.to_wire()
            for k in _PRIVATE:
                d.pop(k, None)
            d["state"] = self._state.get(m.name, DOWN)
            if m.name == self.self_name:
                d["last_seen"] = now_w
            elif m.name in self._last_advance:
                d["last_seen"] = now_w - (now_m - self._last_advance[m.name])
            else:
                d["last_seen"] = None
            d["cnvm_count"] = len(m.cnvms)
            out.append(d)
        return out

    def wire(self) -> list[dict[str, Any]]:
        return [m.to_wire() for m in self.records.values()]

    # -- subscription ----------------------------------------------------------------

    def add_listener(self, cb: Callable[[MemberEvent], None]) -> Callable[[], None]:
        """Call ``cb`` synchronously on every event; returns an unsubscribe function."""
        self._listeners.append(cb)
        return lambda: self._listeners.remove(cb) if cb in self._listeners else None

    def subscribe(self, replay: bool = True) -> Subscription:
        """Async iterator of events, registered at once (no event is missed between this
        call and the first ``anext``). With ``replay`` it first yields one ``added`` per
        current member, so a subscriber (the overlay FDB) can build its state from it.
        Use ``async with`` or ``aclose()`` to unsubscribe."""
        sub = Subscription(self._queues)
        if replay:
            for m in list(self.records.values()):
                sub.queue.put_nowait(self._event("added", m, None))
        return sub

    def _event(self, kind: str, m: Member, old_state: str | None) -> MemberEvent:
        d = m.to_wire()
        for k in _PRIVATE:
            d.pop(k, None)
        return MemberEvent(kind, m.name, self._state.get(m.name, DOWN), old_state, d)

    def _emit(self, ev: MemberEvent) -> None:
        log.info("membership: %s %s state=%s", ev.kind, ev.name, ev.state)
        for cb in list(self._listeners):
            try:
                cb(ev)
            except Exception:
                log.exception("membership listener failed")
        for q in self._queues:
            q.put_nowait(ev)

    # -- mutation --------------------------------------------------------------------

    def load(self, records: Iterable[dict[str, Any]]) -> None:
        """Install persisted records at start-up; peers get a full grace period."""
        now = self._clock()
        for d in records:
            try:
                m = Member.from_wire(d)
            except ValueError as exc:
                log.warning("ignoring persisted record: %s", exc)
                continue
            self.records[m.name] = m
            self._last_advance[m.name] = now
            self._state[m.name] = self._compute_state(m, now)

    def clear(self) -> None:
        for m in list(self.records.values()):
            old = self._state.get(m.name)
            self._state[m.name] = REMOVED
            self._emit(self._event("removed", m, old))
        self.records.clear()
        self._last_advance.clear()
        self._state.clear()
        self.dirty = True

    def put(self, m: Member) -> None:
        """Install a record authored locally (enrolment, tombstone, own record)."""
        old = self.records.get(m.name)
        self.records[m.name] = m
        self._last_advance[m.name] = self._clock()
        self._after_change(old, m)

    def update_self(self, **fields: Any) -> Member:
        """Change our own record (bumps version); returns it."""
        me = self.records[self.self_name]
        old = Member(**{**me.to_wire()})
        for k, v in fields.items():
            setattr(me, k, v)
        me.version += 1
        self._after_change(old, me)
        return me

    def heartbeat(self) -> None:
        me = self.records.get(self.self_name)
        if me is not None:
            me.version += 1
            self._last_advance[self.self_name] = self._clock()

    def merge(self, records: Iterable[dict[str, Any]]) -> list[Member]:
        """Merge a peer's table. Returns incoming records about *this* node that are
        newer than ours (the caller decides: removed, or bump incarnation)."""
        about_me: list[Member] = []
        for d in records:
            try:
                m = Member.from_wire(d)
            except ValueError as exc:
                log.warning("gossip: %s", exc)
                continue
            cur = self.records.get(m.name)
            if m.name == self.self_name:
                if cur is None or m.order() > cur.order():
                    about_me.append(m)
                continue
            self.accept(m)
        return about_me

    def newer(self, m: Member) -> bool:
        """Would ``m`` replace what we hold for its name?"""
        cur = self.records.get(m.name)
        return cur is None or m.order() > cur.order()

    def accept(self, m: Member) -> bool:
        """Install one record of another node if it is newer than ours (the caller has
        checked its signatures where it came from a peer). True if installed."""
        cur = self.records.get(m.name)
        if m.name == self.self_name or (cur is not None and m.order() <= cur.order()):
            return False
        self.records[m.name] = m
        self._last_advance[m.name] = self._clock()
        self._after_change(cur, m)
        return True

    def _after_change(self, old: Member | None, new: Member) -> None:
        old_state = self._state.get(new.name)
        self._state[new.name] = self._compute_state(new, self._clock())
        if old is None:
            self.dirty = True
            self._emit(self._event("added", new, None))
        elif new.admin == REMOVED and old.admin != REMOVED:
            self.dirty = True
            self._emit(self._event("removed", new, old_state))
        else:
            if old.structure() != new.structure():
                self.dirty = True
                self._emit(self._event("updated", new, old_state))
            if old.incarnation != new.incarnation:
                self.dirty = True
            if old_state != self._state[new.name]:
                self._emit(self._event("state", new, old_state))

    def _compute_state(self, m: Member, now: float) -> str:
        if m.admin == REMOVED:
            return REMOVED
        if m.name == self.self_name:
            return ALIVE
        age = now - self._last_advance.get(m.name, now)
        if age >= self.down_after:
            return DOWN
        if age >= self.suspect_after:
            return SUSPECT
        return ALIVE

    def tick(self) -> None:
        """Re-evaluate liveness; emits ``state`` events on transitions."""
        now = self._clock()
        for m in self.records.values():
            new = self._compute_state(m, now)
            old = self._state.get(m.name)
            if new != old:
                self._state[m.name] = new
                if old is not None:
                    self._emit(self._event("state", m, old))
