"""Gossip: how every member's table converges and liveness is judged.

Why a layer of its own: it only *spreads* what enrolment decided (records, the
cluster epoch) and heartbeats; it never pins a key. Every ``gossip_interval`` a node
bumps its heartbeat and does a push-pull of its whole table (``peer.gossip``) with
two random live peers, and with a down one every third round; liveness is local
(membership.py). A tombstone about ourselves means we were removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

from cnvmd.api import Args, Context, Router
from proto.messages import ProtoError

from . import trust
from .membership import ACTIVE, DOWN, REMOVED, MemberEvent
from .transport import Transport

if TYPE_CHECKING:
    from .service import PeerService

log = logging.getLogger("cnvmd.peers")


class Gossip:
    """The gossip loop, the ``peer.gossip`` op and reactions to member events."""

    def __init__(self, svc: PeerService, transport: Transport, router: Router,
                 interval: float) -> None:
        self.svc = svc
        self.transport = transport
        self.interval = interval
        self._busy: set[str] = set()
        self._round = 0
        self._task: asyncio.Task[None] | None = None
        router.op("peer.gossip")(self._gossip_op)

    def start(self) -> None:
        self.svc.membership.add_listener(self._on_member_event)
        self._task = asyncio.create_task(self._loop(), name="peers-gossip")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def payload(self) -> dict[str, Any]:
        assert self.svc.cluster is not None
        return {"cluster": self.svc.cluster.to_wire(), "members": self.svc.membership.wire()}

    def absorb(self, payload: dict[str, Any], source: str) -> None:
        """Merge a peer's table (and a newer cluster epoch) into ours."""
        svc = self.svc
        cluster = svc.cluster
        if cluster is None:
            return
        try:
            theirs = trust.Cluster.from_wire(payload.get("cluster") or {})
        except ValueError as exc:
            log.warning("gossip from %s: %s", source, exc)
            return
        if theirs.cluster_id != cluster.cluster_id:
            log.error("gossip from %s is for cluster %s, we are in %s: ignored", source,
                      theirs.cluster_id, cluster.cluster_id)
            return
        if theirs.epoch > cluster.epoch:
            svc.cluster = theirs
            svc.membership.dirty = True
        about_me = svc.membership.merge(payload.get("members") or [])
        for m in about_me:
            me = svc.membership.get(svc.name)
            if m.admin == REMOVED and (me is None or m.epoch >= me.epoch):
                svc.enrolment.leave(f"gossip from {source}")
                return
            if me is not None and m.pubkey != me.pubkey:
                log.error("another node enrolled under our name %s (key %s) and won; this "
                          "node must be removed and re-join under another name", svc.name,
                          trust.fingerprint(m.pubkey))
                continue
            if me is not None and m.admin == ACTIVE and m.order() > me.order():
                # Someone remembers a newer us (state lost?): outbid it.
                svc.membership.update_self(incarnation=max(me.incarnation, m.incarnation) + 1,
                                           version=0, epoch=max(me.epoch, m.epoch))
        if svc.membership.dirty:
            svc.spawn(svc.save())

    def now(self) -> None:
        """Gossip with every member not judged down, at once (after a change)."""
        for m in self.svc.membership.peers():
            if self.svc.membership.state_of(m.name) != DOWN:
                self.svc.spawn(self._with(m.name))

    async def _with(self, node: str) -> None:
        svc = self.svc
        if node in self._busy or svc.cluster is None:
            return
        self._busy.add(node)
        try:
            ans = await svc.call(node, "peer.gossip", self.payload(),
                                 timeout=svc.tuning.connect_timeout + 3)
            if isinstance(ans, dict):
                self.absorb(ans, node)
        except ProtoError as exc:
            log.debug("gossip with %s failed: %s", node, exc)
        finally:
            self._busy.discard(node)

    async def _loop(self) -> None:
        """Heartbeat + push-pull with 2 random live peers, and a down one now and then."""
        svc = self.svc
        while True:
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))
            try:
                if svc.cluster is None:
                    continue
                self._round += 1
                svc.membership.heartbeat()
                svc.membership.tick()
                live = [m.name for m in svc.membership.peers()
                        if svc.membership.state_of(m.name) != DOWN]
                dead = [m.name for m in svc.membership.peers(DOWN)]
                targets = random.sample(live, min(2, len(live)))
                if dead and (not live or self._round % 3 == 0):
                    targets.append(random.choice(dead))
                for t in targets:
                    svc.spawn(self._with(t))
                if svc.membership.dirty:
                    svc.spawn(svc.save())
            except Exception:
                log.exception("gossip round failed")

    async def _gossip_op(self, ctx: Context, args: Args) -> dict[str, Any] | None:
        """Push-pull: absorb the caller's table, answer with ours."""
        self.absorb(dict(args), ctx.node or "?")
        return self.payload() if self.svc.cluster else None

    def _on_member_event(self, ev: MemberEvent) -> None:
        if ev.kind == "removed" and ev.name != self.svc.name:
            self.transport.close_member(ev.name)
