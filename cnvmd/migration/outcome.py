"""Resolving a switchover whose outcome the source does not know.

Why: once the restore request has left, the source cannot tell from a broken call
whether the target restored. Resuming blindly could run two copies; discarding
blindly could run none. The protocol (cnvmd/migration/README.md, "The switchover
protocol") makes the *target's* session state the single point of decision:

- a restored cnvm is **fenced** on the target (cgroup frozen, host veth down: not
  network-visible) until the source's ``teleport.confirm`` arrives; under the
  session lock the target then either unfences it (``restored``, final) or, on
  ``teleport.abort`` or its own fence deadline, kills it (the session goes: every
  later question gets ``unknown``, and no restore can follow);
- the source keeps its frozen copy and asks (`settle`) until the target answers;
  it resumes only on an answer that says "no copy there, and never will be"
  (``unknown``/``aborted``), or, if it never sent a confirm, once membership calls
  the target down and its lease has run out (a fenced copy never unfences without
  a confirm, and the target kills it at its deadline, which lies inside the lease).

`decide` is the pure rule (the model check in tests/unit/test_switchover_model.py
runs it against every interleaving of loss, reordering and restarts); `settle`
drives it over a `NodeLink`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cnvmd.migration import wire
from cnvmd.migration.wire import TargetStatus
from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.teleport")

FENCE_SHARE = 0.5
"""The target's fence deadline is this share of the source's lease, from the moment
the restore request reached it: a confirm later than that finds the copy killed."""


class Verdict(enum.StrEnum):
    TARGET = "target"  # the target runs the cnvm: release the local copy
    SOURCE = "source"  # the target holds no copy and never will: resume here


class Action(enum.StrEnum):
    """What the source does next, given what it knows (`decide`)."""

    ASK = "ask"  # ask the target's status (again, after a pause)
    CONFIRM = "confirm"  # the copy there is fenced: tell the target to run it
    ABORT = "abort"  # the target is prepared (the restore never took): make it final
    SWITCH = "switch"  # the target runs it: Verdict.TARGET
    RESUME = "resume"  # no copy there, none can come: Verdict.SOURCE


def decide(status: TargetStatus | None, *, confirm_sent: bool, target_down: bool,
           lease_over: bool) -> Action:
    """The source's rule. `status` is the target's last answer (None: no answer)."""
    if status is None:
        # No answer. Without a confirm sent, a copy there can never unfence: once
        # membership calls the target down and the lease (which outlasts its fence
        # deadline) is over, resuming here is safe. After a confirm, only the
        # target's answer can say that its copy does not run.
        if not confirm_sent and target_down and lease_over:
            return Action.RESUME
        return Action.ASK
    if status in (TargetStatus.RESTORED, TargetStatus.COMMITTED):
        return Action.SWITCH
    if status is TargetStatus.FENCED:
        return Action.CONFIRM
    if status is TargetStatus.PREPARED:
        return Action.ABORT
    if status is TargetStatus.RESTORING:
        return Action.ASK
    return Action.RESUME  # unknown / aborted: the session is gone for good


async def settle(link: Any, sid: str, *, first: TargetStatus | None, confirm_sent: bool,
                 lease_end: float, target_down: Callable[[], bool],
                 before_confirm: Callable[[], Awaitable[None]],
                 lose_confirm_reply: bool = False, pause: float = 1.0,
                 answers: list[dict[str, Any]] | None = None,
                 relay: Callable[[], Awaitable[TargetStatus | None]] | None = None) -> Verdict:
    """Drive `decide` until a verdict. `lease_end` is wall-clock time;
    `before_confirm` journals that a confirm may be sent (a restarted source must
    then not resume on silence); confirm answers are appended to `answers`. Never
    gives up on its own: the cnvm stays frozen here until the target answers (or,
    before any confirm, is down past the lease). When the target does not answer
    a status question, `relay` asks it through another member that still reaches
    it (None: nobody could): its answer is the target's own, so it decides the same
    way (an asymmetric partition then ends at the fence deadline, not never)."""
    status = first
    n = 0
    while True:
        act = decide(status, confirm_sent=confirm_sent, target_down=target_down(),
                     lease_over=time.time() >= lease_end)
        if act is Action.SWITCH:
            return Verdict.TARGET
        if act is Action.RESUME:
            return Verdict.SOURCE
        status = None
        try:
            if act is Action.CONFIRM:
                if not confirm_sent:
                    await before_confirm()
                    confirm_sent = True
                ans = await link.call("teleport.confirm", wire.SessionRef(sid).to_wire(),
                                      timeout=30)
                if lose_confirm_reply:
                    lose_confirm_reply = False
                    raise lost("confirm")
                status = wire.status_from_wire(_status_only(ans))
                if answers is not None:
                    answers.append(ans)
            elif act is Action.ABORT:
                status = wire.status_from_wire(await link.call(
                    "teleport.abort", wire.SessionRef(sid).to_wire(), timeout=30))
            else:
                if n:
                    await asyncio.sleep(pause if n > 1 else 0.2)
                n += 1
                try:
                    status = wire.status_from_wire(await link.call(
                        "teleport.status", wire.StatusQuery(sid).to_wire(), timeout=3))
                except ProtoError:
                    status = await relay() if relay is not None else None
                    if status is None:
                        raise
                    log.info("teleport %s: the target answered through another member: %s",
                             sid, status)
        except ProtoError as exc:
            if n % 10 == 1:
                log.warning("teleport %s: outcome unknown, the cnvm stays frozen here "
                            "(%s): %s", sid, "confirm sent" if confirm_sent else
                            "restore sent", exc.message)
            status = None
            if act is not Action.ASK:
                n += 1
                await asyncio.sleep(pause)


def _status_only(ans: Any) -> dict[str, Any]:
    """A confirm reply's status (its other fields are timings, read elsewhere)."""
    if not isinstance(ans, dict):
        raise wire.bad("confirm reply", "is not a map")
    return {"status": ans.get("status")}


def lost(what: str) -> ProtoError:
    """A reply that never arrived (the fault hooks make this on purpose)."""
    return ProtoError(ErrorCode.UNAVAILABLE, f"{what}: the reply was lost (fault injected)",
                      {"delivery": str(wire.Delivery.UNKNOWN)})
