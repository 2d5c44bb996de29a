"""The node's event stream: lifecycle, teleport and membership events (`cnvmctl events`).

Why a bus of its own: the places where things happen (deploy, a cnvm's exit, a
teleport's switchover, a member going down) should not know who listens. They call
``EventBus.emit`` (synchronous, never blocks, one line at each place); the bus keeps
the last RING_SIZE events in memory (``--since``) and copies each to every live
subscriber's bounded queue. A subscriber that falls QUEUE_SIZE events behind is cut
off with a ``lost`` marker rather than slowing the daemon down.

Event shape (the ``event`` API event's data and ``cnvmctl events --json``)::

    {"seq": 12, "time": 1764629000.1, "node": "n1", "type": "cnvm",
     "action": "die", "name": "web", "attrs": {"exit_code": 1}}

Types and actions:
- ``cnvm``: deploy, start, stop, die (exit_code), restart (restarts, delay), rm
- ``teleport``: start (target, mode), phase (phase), committed, rolled_back (reason)
- ``node``: joined, up, suspect, down, removed (membership, as this node sees it)

Nothing persists: the ring is lost with the daemon (like `docker events`, whose
daemon keeps a bounded in-memory log too).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cnvmd.api import Args, Context, Router
from cnvmd.services import EVENTS, PEERS, Plugin
from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.events")

RING_SIZE = 1000
"""Events kept for ``--since`` (all types together)."""
QUEUE_SIZE = 1000
"""Events a subscriber may lag behind before it is cut off."""
EVT_EVENT = "event"
"""API event of the ``events`` op: data is one `Event` as a map."""
TYPES = ("cnvm", "teleport", "node")
MAX_FILTERS = 16
_FILTER = re.compile(r"(type|name|action)=([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})")


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    node: str
    type: str
    action: str
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Lost(Exception):
    """The subscriber fell too far behind: its stream ends."""


class EventBus:
    """Bounded ring of recent events plus live subscribers (the EVENTS service)."""

    def __init__(self, node: str, ring: int = RING_SIZE, queue: int = QUEUE_SIZE) -> None:
        self.node = node
        self._ring: deque[Event] = deque(maxlen=ring)
        self._queue_size = queue
        self._subs: set[asyncio.Queue[Event | None]] = set()
        self._seq = itertools.count(1)

    def emit(self, type: str, action: str, name: str, **attrs: Any) -> Event:
        """Record and publish one event; cheap and synchronous (call it anywhere)."""
        ev = Event(next(self._seq), time.time(), self.node, type, action, name,
                   {k: v for k, v in attrs.items() if v is not None})
        self._ring.append(ev)
        for q in list(self._subs):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:  # too slow: cut it off, keep the daemon going
                self._subs.discard(q)
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                q.put_nowait(None)
        return ev

    def recent(self, since: float | None = None) -> list[Event]:
        """Kept events at or after wall-clock time `since` (all with None)."""
        return [e for e in self._ring if since is None or e.time >= since]

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event | None]]:
        """A queue of every event emitted from now on (None: cut off for lagging)."""
        q: asyncio.Queue[Event | None] = asyncio.Queue(self._queue_size)
        self._subs.add(q)
        try:
            yield q
        finally:
            self._subs.discard(q)

    @property
    def subscribers(self) -> int:
        return len(self._subs)


def parse_filters(raw: Iterable[str]) -> dict[str, set[str]]:
    """``type=cnvm``, ``name=web``, ``action=die`` (repeatable; same key = any of)."""
    out: dict[str, set[str]] = {}
    items = list(raw)
    if len(items) > MAX_FILTERS:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"at most {MAX_FILTERS} filters")
    for f in items:
        m = _FILTER.fullmatch(f) if isinstance(f, str) else None
        if m is None:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             f"bad filter {str(f)[:80]!r}: use type=cnvm|teleport|node, "
                             "name=NAME or action=ACTION")
        key, value = m.groups()
        if key == "type" and value not in TYPES:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             f"unknown event type {value!r}: one of {', '.join(TYPES)}")
        out.setdefault(key, set()).add(value)
    return out


def matches(ev: Event, filters: dict[str, set[str]]) -> bool:
    return all(getattr(ev, k) in vals for k, vals in filters.items())


def member_listener(bus: EventBus) -> Any:
    """A membership listener turning MemberEvents into ``node`` events."""
    def on_member(ev: Any) -> None:
        if ev.kind == "added":
            bus.emit("node", "joined", ev.name, state=ev.state)
        elif ev.kind == "removed" or (ev.kind == "state" and ev.state == "removed"):
            bus.emit("node", "removed", ev.name)
        elif ev.kind == "state" and ev.state in ("alive", "suspect", "down"):
            bus.emit("node", "up" if ev.state == "alive" else ev.state, ev.name,
                     was=ev.old_state)
    return on_member


# --------------------------------------------------------------------------- plug-in

router = Router()


async def start_events(daemon: Any) -> None:
    daemon.services.provide(EVENTS, EventBus(daemon.node_name))


async def serve_events(daemon: Any) -> None:
    """Membership events, once the peer mesh (if any) is up."""
    bus = daemon.services.get(EVENTS)
    peers = daemon.services.get(PEERS)
    membership = getattr(peers, "membership", None)
    if bus is not None and membership is not None:
        membership.add_listener(member_listener(bus))


@router.op("events")
async def events(ctx: Context, args: Args) -> dict[str, Any]:
    """Stream this node's events (``event`` events): the kept ones since `since`
    (epoch seconds), then live ones until the caller goes away (or not, without
    `follow`). `filters`: ``type=…``, ``name=…``, ``action=…``."""
    since = args.float("since", None, min=0)
    follow = args.bool("follow", True)
    filters = parse_filters(args.list("filters", []))
    args.reject_unknown()
    bus = ctx.daemon.services.require(EVENTS)
    sent = 0
    async with bus.subscribe() as q:
        last = 0
        if since is not None:
            for ev in bus.recent(since):
                last = ev.seq
                if matches(ev, filters):
                    ctx.emit(EVT_EVENT, ev.to_dict())
                    sent += 1
            await ctx.drain()
        while follow:
            item = await q.get()
            if item is None:
                return {"sent": sent, "ended": "lost: the client read too slowly"}
            if item.seq <= last or not matches(item, filters):
                continue
            ctx.emit(EVT_EVENT, item.to_dict())
            sent += 1
            await ctx.drain()
    return {"sent": sent}


plugin = Plugin("events", router=router, start=start_events, serve=serve_events)


def emit(daemon: Any, type: str, action: str, name: str, **attrs: Any) -> None:
    """Emit on `daemon`'s bus if it has one (tests drive parts without a daemon)."""
    bus = daemon.services.get(EVENTS) if daemon is not None else None
    if bus is not None:
        bus.emit(type, action, name, **attrs)
