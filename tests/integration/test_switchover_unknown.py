"""Switchover with an unknown outcome (issue 18): exactly one copy, whatever is lost.

Real cnvmd on 2 lab nodes ("hx" lab), runc + CRIU, one live client connection to a
busybox cnvm. The target restores *fenced* (frozen, host veth down) and runs the
cnvm only on the source's confirm (cnvmd/migration/README.md):

1. the restore reply is dropped (the target restored; the source never hears it):
   the source asks, learns "fenced", confirms: the cnvm runs on the target only;
2. the confirm reply is dropped: the source asks again and learns "restored";
3. the underlay between the nodes is cut right after the restore request (the
   target holds its answer until the cut is in place): while cut, the target's copy
   stays fenced (paused, unreachable); its fence deadline kills it, and the source,
   once it hears "unknown" (or sees the target down past its lease), resumes. The
   cnvm runs exactly once, on the source, and the client's connection survives.

In each case: runc state on both nodes shows one copy, the client's connection and
counter carry on (only one copy ever answers on the cnvm's IP: a second answering
copy would break the byte stream the client checks).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import pytest_asyncio

from cnvmlab import paths as labpaths
from proto.messages import ProtoError
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="module")]

IP = "10.100.101.41"
NAME = "sw1"
LAB = "hx"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def slab(tmp_path_factory: pytest.TempPathFactory):
    async with TeleLab(LAB, 2).running(tmp_path_factory.mktemp("slab"), (NAME, IP)) as tl:
        yield tl


async def runc_status(tl: TeleLab, node: str) -> str | None:
    st = await tl.lab.runc(node).state(NAME)
    return None if st is None else st.status


async def where_running(tl: TeleLab) -> str:
    """The one node whose runc runs the cnvm (and the other holds no container)."""
    states = {n: await runc_status(tl, n) for n in tl.lab.node_names}
    running = [n for n, s in states.items() if s == "running"]
    assert len(running) == 1, states
    assert all(s is None for n, s in states.items() if n != running[0]), states
    return running[0]


async def running_once_on(tl: TeleLab, node: str) -> None:
    c = tl.conn  # type: ignore[attr-defined]
    await c.wait_more(20, timeout=60)
    c.check_sequence()
    assert not c.eof
    end = time.monotonic() + 30
    while True:  # the loser's leftovers go asynchronously (deadline, forward cleanup)
        try:
            assert await where_running(tl) == node
            assert await tl.where(NAME) == [node]
            other = "node2" if node == "node1" else "node1"
            assert not await tl.leftovers(other, NAME)
            for n in tl.lab.node_names:
                for side in ("in", "out"):
                    d = labpaths.node_state_dir(LAB, n) / "teleport" / side
                    assert not d.exists() or not any(d.iterdir()), (n, side)
            break
        except AssertionError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.5)
    res = await tl.call(node, "exec", {"name": NAME, "cmd": ["cat", "/data.txt"]})
    assert res["stdout"].strip() == "kept"


async def here(tl: TeleLab) -> tuple[str, str]:
    src = await where_running(tl)
    return src, "node2" if src == "node1" else "node1"


@pytest.mark.parametrize(("mode", "fault"), [
    ("stop-copy", "restore_reply_lost"), ("postcopy", "restore_reply_lost"),
    ("postcopy", "confirm_reply_lost")])
async def test_lost_reply_ends_on_the_target_once(slab: TeleLab, mode: str, fault: str):
    src, dst = await here(slab)
    events: list[dict[str, Any]] = []
    rep = await slab.call(src, "teleport", {"name": NAME, "target": dst, "mode": mode,
                                            "fail_at": fault},
                          on_event=lambda e: events.append(e.data), timeout=180)
    assert rep["ok"], rep
    if fault == "restore_reply_lost":
        assert any(e.get("outcome") == "unknown" for e in events), events
    await running_once_on(slab, dst)


async def cut(tl: TeleLab, a: str, b: str, on: bool) -> None:
    """Drop (or stop dropping) all underlay traffic between nodes a and b, in a's netns."""
    op = "-I" if on else "-D"
    peer = tl.lab.underlay_ip(b)
    for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
        await tl.lab.exec(a, ["iptables", "-w", op, chain, flag, peer, "-j", "DROP"])


def fenced(node: str) -> bool:
    return fenced_in(LAB, node)


def fenced_in(lab: str, node: str) -> bool:
    """A fenced copy sits on `node` of lab `lab` (its session journal says so)."""
    d = labpaths.node_state_dir(lab, node) / "teleport" / "in"
    for j in d.glob("*/session.json") if d.exists() else ():
        try:
            if '"phase": "fenced"' in j.read_text():
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("mode", ["stop-copy", "postcopy"])
async def test_underlay_cut_after_the_restore_request(slab: TeleLab, mode: str):
    src, dst = await here(slab)
    lease = 10.0  # the target's fence deadline: lease/2 after its restore
    task = asyncio.create_task(slab.call(src, "teleport", {
        "name": NAME, "target": dst, "mode": mode, "lease": lease,
        "fail_at": "target:hold_reply"}, timeout=300))
    cut_on = False
    try:
        end = time.monotonic() + 120
        while not fenced(dst):  # the target restored (fenced), its answer held back
            assert not task.done(), task.result()
            assert time.monotonic() < end, "the target never restored"
            await asyncio.sleep(0.05)
        await cut(slab, dst, src, True)
        cut_on = True
        # Fenced: the restored copy is frozen and the client is not answered by it;
        # the source's copy is frozen too (outcome unknown).
        assert await runc_status(slab, dst) == "paused"
        await asyncio.sleep(lease + 2)  # past the fence deadline and the lease
        assert await runc_status(slab, dst) is None  # the fenced copy was killed
        await cut(slab, dst, src, False)
        cut_on = False
        try:
            out: Any = await task
        except ProtoError as exc:
            out = exc
    finally:
        if cut_on:
            await cut(slab, dst, src, False)
        if not task.done():
            await asyncio.wait({task}, timeout=120)
    assert isinstance(out, ProtoError), out
    assert out.details["report"]["rolled_back"], out
    await running_once_on(slab, src)
    # the cluster heals: the next teleport works
    rep = await slab.call(src, "teleport", {"name": NAME, "target": dst, "mode": mode},
                          timeout=180)
    assert rep["ok"]
    await running_once_on(slab, dst)
