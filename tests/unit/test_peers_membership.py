"""Membership table: ordering, tombstones, liveness, events (pure logic, fake clock)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnvmd.peers.membership import ACTIVE, REMOVED, Member, Membership

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def rec(name: str, **kw: object) -> dict:
    base = Member(name=name, addr="127.0.0.1", port=1, pubkey=f"ssh-ed25519 K{name}").to_wire()
    base.update(kw)
    return base


def table(clock: Clock) -> Membership:
    m = Membership("a", suspect_after=3, down_after=6, clock=clock)
    m.put(Member.from_wire(rec("a")))
    return m


def test_merge_newer_wins_and_older_ignored() -> None:
    m = table(Clock())
    m.merge([rec("b", version=5, caps={"x": 1})])
    m.merge([rec("b", version=3, caps={"x": 0})])
    assert m.get("b").caps == {"x": 1}
    m.merge([rec("b", incarnation=1, version=0, caps={"x": 2})])
    assert m.get("b").caps == {"x": 2}, "a higher incarnation beats any version"


def test_tombstone_is_terminal_within_epoch_but_not_across() -> None:
    m = table(Clock())
    m.merge([rec("b", version=5)])
    m.merge([rec("b", version=6, admin=REMOVED)])
    m.merge([rec("b", incarnation=9, version=99)])  # stale gossip from the revoked node
    assert m.get("b").admin == REMOVED
    assert m.pinned_key("b") is None
    m.merge([rec("b", epoch=2, version=0)])  # re-enrolled later
    assert m.get("b").admin == ACTIVE and m.pinned_key("b")


def test_records_about_self_are_returned_not_applied() -> None:
    m = table(Clock())
    about = m.merge([rec("a", incarnation=5)])
    assert [x.incarnation for x in about] == [5]
    assert m.get("a").incarnation == 0


def test_liveness_suspect_then_down_then_alive_again() -> None:
    clock = Clock()
    m = table(clock)
    events: list[tuple[str, str, str]] = []
    m.add_listener(lambda ev: events.append((ev.kind, ev.name, ev.state)))
    m.merge([rec("b", version=1)])
    assert m.state_of("b") == "alive"
    clock.t += 3.5
    m.tick()
    assert m.state_of("b") == "suspect"
    clock.t += 3
    m.tick()
    assert m.state_of("b") == "down"
    m.merge([rec("b", version=1)])  # no progress: still down
    assert m.state_of("b") == "down"
    m.merge([rec("b", version=2)])  # heartbeat advanced
    assert m.state_of("b") == "alive"
    assert events == [("added", "b", "alive"), ("state", "b", "suspect"),
                      ("state", "b", "down"), ("state", "b", "alive")]


def test_heartbeat_only_changes_emit_nothing() -> None:
    m = table(Clock())
    m.merge([rec("b", version=1)])
    seen: list[str] = []
    m.add_listener(lambda ev: seen.append(ev.kind))
    m.merge([rec("b", version=2)])
    assert seen == []
    m.merge([rec("b", version=3, cnvms=["x"])])
    assert seen == ["updated"]


def test_malformed_records_are_ignored() -> None:
    m = table(Clock())
    m.merge([{"name": "b"}, {"garbage": 1}, rec("c", port=70000), rec("d")])
    assert sorted(m.records) == ["a", "d"]


async def test_subscribe_replays_then_streams() -> None:
    clock = Clock()
    m = table(clock)
    it = m.subscribe()
    first = await asyncio.wait_for(anext(it), 1)
    assert (first.kind, first.name) == ("added", "a")
    m.merge([rec("b", version=1)])
    ev = await asyncio.wait_for(anext(it), 1)
    assert (ev.kind, ev.name, ev.state) == ("added", "b", "alive")
    assert "pubkey" not in ev.member
    await it.aclose()


def test_view_reports_last_seen_and_count() -> None:
    clock = Clock()
    m = table(clock)
    m.merge([rec("b", version=1, cnvms=["x", "y"])])
    clock.t += 2
    v = {n["name"]: n for n in m.view()}
    assert v["b"]["cnvm_count"] == 2 and v["b"]["state"] == "alive"
    assert "pubkey" not in v["b"]
    assert v["a"]["last_seen"] - v["b"]["last_seen"] == pytest.approx(2, abs=0.1)


_records = st.lists(
    st.builds(
        lambda name, epoch, removed, inc, ver, key: rec(
            name, epoch=epoch, admin=REMOVED if removed else ACTIVE, incarnation=inc,
            version=ver, pubkey=f"ssh-ed25519 K{key}", cnvms=[f"c{ver}"]),
        st.sampled_from(["b", "c", "d"]), st.integers(1, 2), st.booleans(),
        st.integers(0, 3), st.integers(0, 5), st.integers(0, 1)),
    max_size=12)


@settings(max_examples=200, deadline=None)
@given(_records, st.randoms(use_true_random=False))
def test_merge_converges_in_any_order(records: list[dict], rnd: Any) -> None:
    """Anti-entropy: two nodes that saw the same records in different orders, batches
    and repetitions end with identical tables (merge is a join: order-insensitive,
    idempotent)."""
    a, b = table(Clock()), table(Clock())
    a.merge(records)
    shuffled = list(records) * 2
    rnd.shuffle(shuffled)
    for i in range(0, len(shuffled), 3):
        b.merge(shuffled[i:i + 3])
    assert {m["name"]: m for m in a.wire()} == {m["name"]: m for m in b.wire()}


def test_records_from_the_wire_are_bounded_and_storable() -> None:
    """What one member sends is stored, persisted (JSON) and re-sent by every member:
    values that would break that (huge ints, bytes, NaN, non-names) are refused."""
    m = table(Clock())
    bad = [rec("b", version=1 << 70), rec("c", caps={"x": b"\x00"}), rec("d", joined=float("nan")),
           rec("e", epoch=-1), rec("../f"), rec("g", cnvms="abc"), rec("h", cert=[1]),
           rec("i", caps={"x": {"y": {"z": {"w": {"v": 1}}}}})]
    m.merge([*bad, rec("ok", caps={"criu": "4.2", "n": [1, 2.5, None]})])
    assert sorted(m.records) == ["a", "ok"]
