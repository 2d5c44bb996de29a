"""Event bus (ring, filters, slow subscribers), restart policies and their backoff,
`--since` parsing, and the lazy-page bytes a postcopy target adds to its history."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cnvmctl.commands.events import format_event, parse_since
from cnvmctl.context import CliError
from cnvmd import bundle, events, restart
from cnvmd.api import Context, dispatch
from cnvmd.migration.target import with_lazy_pages
from cnvmd.runtime import ContainerState
from cnvmd.services import EVENTS, Services
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit


def test_ring_is_bounded_and_since_filters_by_time():
    bus = events.EventBus("n1", ring=5)
    for i in range(8):
        bus.emit("cnvm", "deploy", f"c{i}", skip=None)
    kept = bus.recent()
    assert [e.name for e in kept] == ["c3", "c4", "c5", "c6", "c7"]
    assert [e.seq for e in kept] == [4, 5, 6, 7, 8]
    assert "skip" not in kept[0].attrs  # None attributes are left out
    assert bus.recent(kept[-1].time + 1) == []


def test_filters_are_validated_and_match():
    f = events.parse_filters(["type=cnvm", "name=web", "name=db"])
    ev = events.EventBus("n").emit("cnvm", "die", "db", exit_code=1)
    assert events.matches(ev, f)
    assert not events.matches(ev, events.parse_filters(["type=teleport"]))
    for bad in ("type=bogus", "name=../x", "colour=red", "name=", "type=cnvm\n", 3):
        with pytest.raises(ProtoError) as ei:
            events.parse_filters([bad])  # type: ignore[list-item]
        assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ProtoError):
        events.parse_filters(["type=cnvm"] * (events.MAX_FILTERS + 1))


async def test_subscribers_get_live_events_and_a_slow_one_is_cut_off():
    bus = events.EventBus("n", queue=3)
    async with bus.subscribe() as fast, bus.subscribe() as slow:
        bus.emit("cnvm", "start", "a")
        assert (await fast.get()).action == "start"  # type: ignore[union-attr]
        for i in range(5):
            bus.emit("cnvm", "stop", f"x{i}")
            if not fast.empty():
                await fast.get()
        items = [slow.get_nowait() for _ in range(slow.qsize())]
        assert items[-1] is None  # cut off: the stream ends, the daemon goes on
        assert bus.subscribers == 1


def _daemon(bus: events.EventBus) -> Any:
    services = Services()
    services.provide(EVENTS, bus)
    return SimpleNamespace(services=services, node_name="n1")


async def test_events_op_replays_then_streams_filtered():
    bus = events.EventBus("n1")
    bus.emit("cnvm", "deploy", "web")
    bus.emit("cnvm", "deploy", "db")
    got: list[dict[str, Any]] = []
    ctx = Context.local("events", daemon=_daemon(bus),
                        on_event=lambda e, d: got.append(d) if e == "event" else None)
    task = asyncio.ensure_future(dispatch(events.router, ctx, "events",
                                          {"since": 0.0, "filters": ["name=web"]}))
    for _ in range(50):
        await asyncio.sleep(0.01)
        if bus.subscribers:
            break
    bus.emit("cnvm", "die", "db", exit_code=1)
    bus.emit("cnvm", "die", "web", exit_code=3)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(got) == 2:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(d["action"], d["name"]) for d in got] == [("deploy", "web"), ("die", "web")]
    assert got[1]["attrs"] == {"exit_code": 3} and got[1]["node"] == "n1"
    res = await dispatch(events.router, Context.local("events", daemon=_daemon(bus)),
                         "events", {"since": 0.0, "follow": False})
    assert res == {"sent": 4}
    with pytest.raises(ProtoError) as ei:
        await dispatch(events.router, Context.local("events", daemon=_daemon(bus)),
                       "events", {"since": -1.0})
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT


def test_membership_changes_become_node_events():
    bus = events.EventBus("n1")
    on = events.member_listener(bus)
    for kind, state, old in (("added", "alive", None), ("state", "suspect", "alive"),
                             ("state", "down", "suspect"), ("state", "alive", "down"),
                             ("updated", "alive", "alive"), ("removed", "removed", "alive")):
        on(SimpleNamespace(kind=kind, name="n2", state=state, old_state=old))
    assert [e.action for e in bus.recent()] == ["joined", "suspect", "down", "up", "removed"]


@pytest.mark.parametrize(("raw", "text"), [
    (None, "no"), ("", "no"), ("no", "no"), ("always", "always"),
    ("on-failure", "on-failure"), ("on-failure:2", "on-failure:2")])
def test_policies_parse(raw: Any, text: str):
    assert str(restart.parse_policy(raw)) == text


@pytest.mark.parametrize("raw", ["sometimes", "on-failure:0", "on-failure:1001",
                                 "on-failure:-1", "always\n", "ON-FAILURE", 2, ["no"]])
def test_bad_policies_are_invalid_argument(raw: Any):
    with pytest.raises(ProtoError) as ei:
        restart.parse_policy(raw)
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT


def test_policy_decisions():
    no, always = restart.parse_policy("no"), restart.parse_policy("always")
    two, unlimited = restart.parse_policy("on-failure:2"), restart.parse_policy("on-failure")
    assert not no.wants_restart(1, 0)
    assert always.wants_restart(0, 100)
    assert two.wants_restart(1, 0) and two.wants_restart(None, 1)  # unknown = failure
    assert not two.wants_restart(1, 2) and not two.wants_restart(0, 0)
    assert unlimited.wants_restart(137, 10_000)


def test_backoff_doubles_caps_and_resets_after_a_long_run():
    d = restart.next_delay(None, None)
    seen = [d]
    for _ in range(12):
        d = restart.next_delay(d, 0.5)
        seen.append(d)
    assert seen[:4] == [0.1, 0.2, 0.4, 0.8]
    assert max(seen) == restart.BACKOFF_MAX
    assert restart.next_delay(restart.BACKOFF_MAX, restart.RESET_AFTER + 1) == 0.1


def test_since_accepts_durations_times_and_epochs():
    now = 1_000_000.0
    assert parse_since("30s", now) == now - 30
    assert parse_since("10m", now) == now - 600
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("1700000000", now) == 1_700_000_000.0
    assert parse_since("2026-12-01T10:00:00Z", now) == parse_since("2026-12-01T10:00:00", now)
    for bad in ("yesterday", "10 m", "-5s"):
        with pytest.raises(CliError):
            parse_since(bad, now)
    line = format_event({"time": 0, "node": "n1", "type": "cnvm", "action": "die",
                         "name": "web", "attrs": {"exit_code": 1}})
    assert line == "1970-01-01T00:00:00.000Z n1 cnvm die web exit_code=1"


def test_postcopy_history_gets_the_pages_fetched_after_the_switch():
    reports = [{"wire_bytes": 5, "rounds": []},
               {"wire_bytes": 100, "rounds": [{"kind": "dump", "bytes": 0, "seconds": 0.1}],
                "phases": {"pages_after_restore": 1.5}}]
    out = with_lazy_pages(reports, 150 << 20)
    assert out[0] == reports[0]
    assert out[1]["wire_bytes"] == 100 + (150 << 20)
    assert out[1]["rounds"][-1] == {"kind": "lazy", "bytes": 150 << 20, "seconds": 1.5}
    assert with_lazy_pages(out, 7) == out  # already counted (the source sent it)
    assert with_lazy_pages(reports, 0) == reports


class FakeRunc:
    def __init__(self) -> None:
        self.states: dict[str, ContainerState] = {}

    async def state(self, cid: str) -> ContainerState | None:
        return self.states.get(cid)

    async def destroy(self, cid: str) -> None:
        self.states.pop(cid, None)

    async def list(self) -> list[ContainerState]:
        return list(self.states.values())


class FakeLife:
    """What the supervisor uses of Lifecycle: records, locks, runc, restart."""

    def __init__(self, tmp: Path) -> None:
        self.recs: dict[str, dict[str, Any]] = {}
        self.runc = FakeRunc()
        self.tmp = tmp
        self._locks: dict[str, asyncio.Lock] = {}
        self.pid = 1000

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def record(self, name: str) -> dict[str, Any] | None:
        r = self.recs.get(name)
        return dict(r) if r is not None else None

    async def save_record(self, name: str, rec: dict[str, Any]) -> None:
        self.recs[name] = dict(rec)

    def paths(self, name: str) -> Any:
        return bundle.bundle_paths(self.tmp, name)

    async def restart_in_place(self, name: str, rec: dict[str, Any]) -> ContainerState:
        self.pid += 1
        st = ContainerState(name, self.pid, "running", "", "")
        self.runc.states[name] = st
        rec["desired"], rec["started_at"] = "running", time.time()
        return st


def _sup(tmp: Path, policy: str) -> tuple[restart.Supervisor, FakeLife, events.EventBus]:
    life = FakeLife(tmp)
    life.recs["c"] = {"name": "c", "desired": "running", "restart": policy, "restarts": 0,
                      "started_at": time.time()}
    bus = events.EventBus("n")
    sup = restart.Supervisor(life, bus)  # type: ignore[arg-type]
    sup.watch = lambda name, pid: None  # type: ignore[method-assign]  # no real pidfds
    return sup, life, bus


async def exit_once(sup: restart.Supervisor, life: FakeLife, code: int | None) -> None:
    life.runc.states.pop("c", None)
    await sup.handle_exit("c", life.pid, code, time.time())


async def test_on_failure_restarts_n_times_with_growing_backoff(tmp_path: Path):
    sup, life, bus = _sup(tmp_path, "on-failure:2")
    for _ in range(3):
        await exit_once(sup, life, 1)
    rec = life.recs["c"]
    assert rec["desired"] == "exited" and rec["exit_code"] == 1 and rec["restarts"] == 2
    assert [e.action for e in bus.recent()] == ["die", "restart", "die", "restart", "die"]
    assert [e.attrs["delay"] for e in bus.recent() if e.action == "restart"] == [0.1, 0.2]


async def test_no_policy_and_exit_0_under_on_failure_end_it(tmp_path: Path):
    for policy, code in (("no", 3), ("on-failure", 0)):
        sup, life, _ = _sup(tmp_path, policy)
        await exit_once(sup, life, code)
        assert life.recs["c"]["desired"] == "exited" and life.recs["c"]["restarts"] == 0


async def test_a_user_stop_during_the_backoff_wins(tmp_path: Path):
    sup, life, bus = _sup(tmp_path, "always")
    task = asyncio.ensure_future(exit_once(sup, life, 0))
    for _ in range(100):
        await asyncio.sleep(0.005)
        if life.recs["c"]["desired"] == "restarting":
            break
    async with life.lock("c"):  # what `stop` does under the lock
        life.recs["c"]["desired"] = "stopped"
    await task
    assert life.recs["c"]["desired"] == "stopped" and life.recs["c"]["restarts"] == 0
    assert [e.action for e in bus.recent()] == ["die"]


async def test_an_exit_under_a_held_lock_waits_and_respects_the_outcome(tmp_path: Path):
    """A teleport holds the lock while CRIU ends the source's tasks, then drops the
    record: that exit is no exit of the cnvm. A user stop likewise."""
    sup, life, bus = _sup(tmp_path, "always")
    async with life.lock("c"):
        task = asyncio.ensure_future(exit_once(sup, life, 137))
        await asyncio.sleep(0.02)
        assert not task.done()
        del life.recs["c"]
    await task
    assert bus.recent() == []
    sup, life, bus = _sup(tmp_path, "always")
    life.recs["c"]["desired"] = "stopped"
    await exit_once(sup, life, 143)
    assert bus.recent() == [] and life.recs["c"]["desired"] == "stopped"


async def test_a_cnvm_running_again_is_left_alone(tmp_path: Path):
    """A teleport's rollback restored it (a new pid): the old pid's exit is stale."""
    sup, life, bus = _sup(tmp_path, "always")
    life.runc.states["c"] = ContainerState("c", 5555, "running", "", "")
    await sup.handle_exit("c", 1234, 137, time.time())
    assert bus.recent() == [] and life.recs["c"]["desired"] == "running"


async def test_poll_looks_up_only_unwatched_cnvms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Watched cnvms cost no runc call; an arrival gets watched; a cnvm recorded as
    running without a container (it exited while the daemon was down) is handled."""
    monkeypatch.setattr(restart, "_records", lambda life: life.recs)
    sup, life, bus = _sup(tmp_path, "no")
    life.recs["arrived"] = {"name": "arrived", "desired": "running"}
    life.recs["gone"] = {"name": "gone", "desired": "running", "restart": "no",
                         "started_at": time.time()}
    life.recs["off"] = {"name": "off", "desired": "stopped"}
    life.runc.states["arrived"] = ContainerState("arrived", 4321, "running", "", "")
    watched: list[tuple[str, int]] = []
    sup.watch = lambda name, pid: watched.append((name, pid))  # type: ignore[method-assign]
    sup._watch["c"] = (life.pid, -1)  # already followed by its pidfd
    asked: list[str] = []
    real_state = life.runc.state

    async def state(cid: str) -> ContainerState | None:
        asked.append(cid)
        return await real_state(cid)

    life.runc.state = state  # type: ignore[method-assign]
    await sup.poll()
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert watched == [("arrived", 4321)]
    assert "c" not in asked and "off" not in asked
    assert life.recs["gone"]["desired"] == "exited" and life.recs["gone"]["exit_code"] is None
    assert [(e.action, e.name) for e in bus.recent()] == [("die", "gone")]
    sup._watch.clear()
