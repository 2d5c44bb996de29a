"""Switchover outcome through another member (issue 18 §1): an asymmetric partition.

Real cnvmd on 3 lab nodes ("hy" lab), runc + CRIU, one live client connection to a
busybox cnvm. The underlay between node1 and node2 is cut right after the target
restored its fenced copy (it holds its answer back), while both still reach node3.
Membership never calls node2 down (node3 vouches for it), so the source could wait
forever on silence; instead it asks node2 through node3 (``teleport.relay_status``):
"fenced" -> its confirm cannot arrive -> node2's fence deadline kills the copy ->
"unknown" through node3 -> the source resumes, while the cut is still in place. The
cnvm runs exactly once, on the source, and the client's connection survives.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import pytest_asyncio

from proto.messages import ProtoError
from tests.integration.test_switchover_unknown import cut, fenced_in, where_running
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="module")]

IP = "10.100.101.43"
NAME = "sw1"
LAB = "hy"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rlab(tmp_path_factory: pytest.TempPathFactory):
    async with TeleLab(LAB, 3).running(tmp_path_factory.mktemp("rlab"), (NAME, IP)) as tl:
        yield tl


async def test_the_outcome_comes_through_a_third_member(rlab: TeleLab):
    lease = 10.0  # node2's fence deadline: lease/2 after its restore
    task = asyncio.create_task(rlab.call("node1", "teleport", {
        "name": NAME, "target": "node2", "mode": "postcopy", "lease": lease,
        "fail_at": "target:hold_reply"}, timeout=300))
    cut_on = False
    try:
        end = time.monotonic() + 120
        while not fenced_in(LAB, "node2"):
            assert not task.done(), task.result()
            assert time.monotonic() < end, "the target never restored"
            await asyncio.sleep(0.05)
        await cut(rlab, "node2", "node1", True)
        cut_on = True
        t_cut = time.monotonic()
        # settled while still cut: through node3, not by waiting for the heal (the
        # restore call itself gives up after 60 s without an answer: outcome unknown)
        done, _ = await asyncio.wait({task}, timeout=60 + lease * 3)
        assert done, "the source did not settle while cut off from the target"
        settled_after = time.monotonic() - t_cut
        try:
            out: Any = task.result()
        except ProtoError as exc:
            out = exc
        nodes = await rlab.call("node1", "nodes", {})
        state = {n["name"]: n["state"] for n in nodes["nodes"]}
        assert state.get("node2") != "down", state  # membership alone would wait on
    finally:
        if cut_on:
            await cut(rlab, "node2", "node1", False)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=60)
    print(f"\nsettled {settled_after:.1f} s after the cut (lease {lease} s)")
    log = rlab.daemon_log("node1")
    assert "the target answered through another member: unknown" in log, log[-3000:]
    assert isinstance(out, ProtoError), out
    assert out.details["report"]["rolled_back"], out
    assert await where_running(rlab) == "node1"
    c = rlab.conn  # type: ignore[attr-defined]
    await c.wait_more(20, timeout=60)
    c.check_sequence()
    assert not c.eof
    assert await rlab.where(NAME) == ["node1"]
