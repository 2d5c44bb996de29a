"""outcome.settle over a scripted link: the source's side of the switchover protocol."""

from __future__ import annotations

import asyncio
import time

import pytest

from cnvmd.migration import outcome
from cnvmd.migration.wire import TargetStatus as TS
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit
SID = "t" + "a" * 20


class Link:
    """Answers per op from a script; None in a script: the call breaks (unknown)."""

    def __init__(self, **script: list[str | None]) -> None:
        self.script = script
        self.calls: list[str] = []

    async def call(self, op: str, args: dict, *, timeout: float | None = None) -> dict:
        name = op.removeprefix("teleport.")
        self.calls.append(name)
        seq = self.script.get(name) or [None]
        ans = seq.pop(0) if len(seq) > 1 else seq[0]
        if ans is None:
            raise ProtoError(ErrorCode.UNAVAILABLE, "cut", {"delivery": "unknown"})
        return {"status": ans}


async def settle(link: Link, *, first=None, confirm_sent=False, down=False,
                 lease_over=False, lose=False) -> tuple[outcome.Verdict, list[str]]:
    journaled: list[str] = []

    async def before() -> None:
        journaled.append("confirm")

    v = await outcome.settle(link, SID, first=first, confirm_sent=confirm_sent,
                             lease_end=time.time() - 1 if lease_over else time.time() + 60,
                             target_down=lambda: down, before_confirm=before,
                             lose_confirm_reply=lose, pause=0.01)
    return v, journaled


async def test_lost_restore_reply_is_asked_then_confirmed():
    link = Link(status=["fenced"], confirm=["restored"])
    v, j = await settle(link)
    assert v is outcome.Verdict.TARGET and link.calls == ["status", "confirm"] and j == ["confirm"]


async def test_lost_confirm_reply_is_asked_again():
    link = Link(confirm=["restored"], status=["restored"])
    v, _ = await settle(link, first=TS.FENCED, lose=True)
    assert v is outcome.Verdict.TARGET and link.calls == ["confirm", "status"]


async def test_an_expired_fenced_copy_lets_the_source_resume():
    link = Link(confirm=["unknown"])
    v, _ = await settle(link, first=TS.FENCED)
    assert v is outcome.Verdict.SOURCE


async def test_a_prepared_target_is_aborted_first():
    link = Link(status=["prepared"], abort=["aborted"])
    v, _ = await settle(link)
    assert v is outcome.Verdict.SOURCE and link.calls == ["status", "abort"]


async def test_silence_resumes_only_without_confirm_and_when_down_past_the_lease():
    v, _ = await settle(Link(), down=True, lease_over=True)
    assert v is outcome.Verdict.SOURCE
    for kw in ({"down": True}, {"lease_over": True},
               {"down": True, "lease_over": True, "confirm_sent": True}):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(settle(Link(), **kw), 0.3)


async def test_a_target_cut_off_from_the_source_answers_through_another_member():
    """An asymmetric partition: the target never answers directly, but a member that
    reaches it relays its status: "fenced" makes the source confirm (which cannot
    arrive), then the fence deadline makes it "unknown" and the source resumes —
    although membership never calls the target down."""
    link = Link(status=[None], confirm=[None])
    relayed = ["fenced", "fenced", "unknown"]
    asked: list[str] = []

    async def relay() -> TS | None:
        asked.append("relay")
        return TS(relayed.pop(0)) if len(relayed) > 1 else TS(relayed[0])

    journaled: list[str] = []

    async def before() -> None:
        journaled.append("confirm")

    v = await outcome.settle(link, SID, first=None, confirm_sent=False,
                             lease_end=time.time() + 60, target_down=lambda: False,
                             before_confirm=before, pause=0.01, relay=relay)
    assert v is outcome.Verdict.SOURCE and journaled == ["confirm"]
    assert "confirm" in link.calls and len(asked) == 3


async def test_no_relay_answer_keeps_asking_the_target():
    link = Link(status=[None, None, "restored"])

    async def relay() -> TS | None:
        return None

    v = await outcome.settle(link, SID, first=None, confirm_sent=False,
                             lease_end=time.time() + 60, target_down=lambda: False,
                             before_confirm=_nothing, pause=0.01, relay=relay)
    assert v is outcome.Verdict.TARGET and link.calls == ["status"] * 3


async def _nothing() -> None:
    return None
