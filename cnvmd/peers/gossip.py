"""Gossip: how every member's table converges and liveness is judged.

Why a layer of its own: it only *spreads* what enrolment decided (records, the
cluster epoch) and heartbeats; it never pins a key. Every ``gossip_interval`` a node
bumps its heartbeat and does a push-pull of its whole table (``peer.gossip``) with
two random live peers, and with a down one every third round; liveness is local
(membership.py). A tombstone about ourselves means we were removed.

Spreading is not deciding: whatever a member sends, a record is taken only with its
proof (``Proofs``): a new member or a new key needs an admission signed by an active
member (a key of a known member changes only in a later epoch, with the removal of
the old key signed too), a tombstone a removal signed by an active member other than
the removed one, a content update its owner's signature, a new cluster secret a
rotation signed by an active member. Anything else is refused and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cnvmd.api import Args, Context, Router
from proto.messages import ErrorCode, ProtoError

from . import trust
from .membership import ACTIVE, DOWN, REMOVED, Member, MemberEvent, Membership
from .transport import Throttle, Transport

if TYPE_CHECKING:
    from .service import PeerService

log = logging.getLogger("cnvmd.peers")

MAX_MEMBERS = 4096
"""Records accepted in one gossip payload."""
_RETRY = "signer not known (yet)"


class Proofs:
    """Checks of the signatures a record must carry to change the table (see module doc).

    Each check returns None to accept or the reason of a refusal. ``signers`` maps the
    names of active members to their keys: who may admit or remove.
    """

    def __init__(self, cluster_id: str, table: Membership) -> None:
        self.cid = cluster_id
        self.table = table

    def signers(self) -> dict[str, str]:
        return {m.name: m.pubkey for m in self.table.active()}

    def owner_signed(self, m: Member) -> bool:
        return trust.verify(m.pubkey, trust.RECORD, m.signed_fields(self.cid), m.sig)

    def admission(self, m: Member, signers: Mapping[str, str]) -> str | None:
        by = m.cert.get("by", "")
        if by == m.name:
            return "self-admitted"
        if by not in signers:
            return _RETRY
        if not trust.verify(signers[by], trust.ADMIT, m.identity(self.cid), m.cert.get("sig")):
            return f"admission signature of {by} does not verify"
        return None

    def removal(self, m: Member, signers: Mapping[str, str]) -> str | None:
        by = m.removal.get("by", "")
        if not by or by == m.name or by not in signers:
            return f"removal not signed by an active member (by {by!r})"
        if not trust.verify(signers[by], trust.REMOVE, m.identity(self.cid),
                            m.removal.get("sig")):
            return f"removal signature of {by} does not verify"
        return None

    def active(self, m: Member, cur: Member | None, signers: Mapping[str, str]) -> str | None:
        """An active record newer than ``cur`` (ours)."""
        if cur is not None and cur.admin == ACTIVE and cur.epoch == m.epoch:
            if m.pubkey != cur.pubkey:
                return "key change within an enrolment epoch"
            if not self.owner_signed(m):
                return "update not signed by its owner"
            # The owner's signature does not cover the certificates: keep ours, so a
            # relay cannot swap in junk that would make others refuse this member.
            if cur.cert or self.admission(m, signers) is not None:
                m.cert = dict(cur.cert)
            m.prev = dict(cur.prev)
            return None
        # A new identity: unknown name, or a later enrolment epoch.
        why = self.admission(m, signers)
        if why is not None:
            return why
        if cur is not None and cur.admin == ACTIVE:
            # Re-admitted while we still pin the old key: the removal must be proven.
            old = Member(**{**cur.to_wire(), "removal": m.prev})
            why = self.removal(old, {**signers, **self._known()})
            if why is not None:
                return f"no proof that key of epoch {cur.epoch} was removed: {why}"
        if m.sig:
            return None if self.owner_signed(m) else "bad owner signature"
        if m.incarnation > 1 or m.version > 0:
            return "unsigned record that is not a fresh admission"
        return None

    def _known(self) -> dict[str, str]:
        """Keys of every member we know, removed ones included (the signer of an old
        removal may have been removed since)."""
        return {m.name: m.pubkey for m in self.table.records.values()}

    def rotation(self, c: trust.Cluster) -> str | None:
        by, removed = c.proof.get("by", ""), c.proof.get("removed", "")
        key = self.table.pinned_key(by)
        if not by or by == removed or key is None:
            return f"rotation not signed by an active member (by {by!r})"
        if not trust.verify(key, trust.ROTATE, c.rotation_fields(), c.proof.get("sig")):
            return f"rotation signature of {by} does not verify"
        return None


class Gossip:
    """The gossip loop, the ``peer.gossip`` op and reactions to member events."""

    def __init__(self, svc: PeerService, transport: Transport, router: Router,
                 interval: float) -> None:
        self.svc = svc
        self.transport = transport
        self.interval = interval
        self._busy: set[str] = set()
        self._round = 0
        self._signed: list[Any] | None = None
        self._throttle = Throttle()
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
        self.sign_self()
        return {"cluster": self.svc.cluster.to_wire(), "members": self.svc.membership.wire()}

    def sign_self(self) -> None:
        """(Re-)sign our own record if its content changed since it was last signed."""
        svc = self.svc
        me = svc.membership.get(svc.name)
        if me is None or svc.cluster is None or svc.key is None:
            return
        fields = me.signed_fields(svc.cluster.cluster_id)
        if me.sig and fields == self._signed:
            return
        me.sig = trust.sign(svc.key, trust.RECORD, fields)
        self._signed = fields

    def _refuse(self, source: str, name: str, why: str, kind: str = "") -> None:
        """Log a refused record (at most once a minute per source, name and kind)."""
        if self._throttle((source, name, kind or why)):
            log.warning("gossip from %s: record of %s refused: %s", source, name, why[:300])

    def absorb(self, payload: Mapping[str, Any], source: str) -> None:
        """Merge a peer's table (and a newer cluster epoch) into ours, taking only what
        carries its proof (``Proofs``). Never raises on malformed input."""
        svc = self.svc
        cluster = svc.cluster
        if cluster is None:
            return
        try:
            theirs = trust.Cluster.from_wire(payload.get("cluster"))
        except ValueError as exc:
            self._refuse(source, "the cluster", str(exc), "malformed cluster")
            return
        if theirs.cluster_id != cluster.cluster_id:
            if self._throttle((source, "cluster id")):
                log.error("gossip from %s is for cluster %r, we are in %s: ignored", source,
                          theirs.cluster_id[:64], cluster.cluster_id)
            return
        raw = payload.get("members")
        records: list[Member] = []
        for d in raw[:MAX_MEMBERS] if isinstance(raw, list) else []:
            try:
                records.append(Member.from_wire(d))
            except ValueError as exc:
                self._refuse(source, "?", str(exc), "malformed")
        table = svc.membership
        proofs = Proofs(cluster.cluster_id, table)
        mine = [m for m in records if m.name == svc.name]
        others = [m for m in records if m.name != svc.name]
        # Active records first, to a fixpoint: an admission may be signed by a member
        # admitted in this same payload.
        pending = [m for m in others if m.admin == ACTIVE]
        while pending:
            retry: list[Member] = []
            for m in pending:
                if not table.newer(m):
                    continue
                why = proofs.active(m, table.get(m.name), proofs.signers())
                if why is None:
                    table.accept(m)
                elif why == _RETRY:
                    retry.append(m)
                else:
                    self._refuse(source, m.name, why)
            if len(retry) == len(pending):
                for m in retry:
                    self._refuse(source, m.name, f"admitted by {m.cert.get('by')!r}, "
                                 "not an active member")
                break
            pending = retry
        # Tombstones, each checked against the members active before any of them is
        # applied (a chain of removals arrives in one table).
        signers = proofs.signers()
        for m in others:
            if m.admin == REMOVED and table.newer(m):
                why = proofs.removal(m, signers)
                if why is None:
                    table.accept(m)
                else:
                    self._refuse(source, m.name, why)
        for m in mine:
            me = table.get(svc.name)
            if me is None or m.order() <= me.order():
                continue
            if m.admin == REMOVED:
                why = proofs.removal(m, signers)
                if why is None and m.pubkey == me.pubkey:
                    svc.enrolment.leave(f"removed by {m.removal.get('by')}, "
                                        f"via gossip from {source}")
                    return
                self._refuse(source, m.name, why or "tombstone of another key")
                continue
            if m.pubkey != me.pubkey:
                log.error("another node enrolled under our name %s (key %s) and won; this "
                          "node must be removed and re-join under another name", svc.name,
                          trust.fingerprint(m.pubkey))
                continue
            if proofs.owner_signed(m) or (m.epoch > me.epoch
                                          and proofs.admission(m, signers) is None):
                # Someone remembers a newer us (state lost?): outbid it.
                table.update_self(incarnation=max(me.incarnation, m.incarnation) + 1,
                                  version=0, epoch=max(me.epoch, m.epoch))
            else:
                self._refuse(source, m.name, "record of this node not signed by it")
        self._absorb_cluster(theirs, proofs, source)
        if table.dirty:
            svc.spawn(svc.save())

    def _absorb_cluster(self, theirs: trust.Cluster, proofs: Proofs, source: str) -> None:
        """A later epoch (or, at the same epoch, the secret that wins the tie-break, so
        concurrent removals converge) is taken only with a valid rotation proof."""
        svc = self.svc
        ours = svc.cluster
        assert ours is not None
        if theirs.epoch < ours.epoch or theirs.secret == ours.secret:
            return
        if theirs.epoch == ours.epoch and _digest(theirs) <= _digest(ours):
            return
        why = proofs.rotation(theirs)
        if why is not None:
            self._refuse(source, f"cluster epoch {theirs.epoch}", why)
            return
        svc.cluster = theirs
        svc.membership.dirty = True
        log.warning("cluster secret rotated to epoch %d by %s (removal of %s)", theirs.epoch,
                    theirs.proof.get("by"), theirs.proof.get("removed"))

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
        cluster = args.map("cluster")
        members = args.list("members", of=dict)
        if len(members) > MAX_MEMBERS:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"more than {MAX_MEMBERS} records")
        try:
            trust.Cluster.from_wire(cluster)
        except ValueError as exc:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT, str(exc), {"arg": "cluster"}) from None
        args.reject_unknown()
        self.absorb({"cluster": cluster, "members": members}, ctx.node or "?")
        return self.payload() if self.svc.cluster else None

    def _on_member_event(self, ev: MemberEvent) -> None:
        if ev.kind == "removed" and ev.name != self.svc.name:
            self.transport.close_member(ev.name)


def _digest(c: trust.Cluster) -> str:
    return hashlib.sha256(c.secret.encode()).hexdigest()
