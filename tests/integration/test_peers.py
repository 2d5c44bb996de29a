"""The peer mesh through real cnvmd processes: 3 daemons on 127.0.0.1 (distinct ports,
sockets and state dirs), driven over their API sockets exactly as cnvmctl would.

Acceptance of issue 6: init on node1, join node2 via node1 and node3 via node2; all
three list all three within a few seconds; stop cnvmd on node3 → the others mark it
down; restart → up again; refusals leave the cluster undisturbed; an API op runs on
another node through `forward`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proto.client import Client
from proto.messages import ProtoError
from tests.peerdaemon import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[dict[str, Daemon]]:
    ds = {n: Daemon(tmp_path, n) for n in ("node1", "node2", "node3", "node4")}
    try:
        await asyncio.gather(*(d.start() for d in ds.values()))
        yield ds
    finally:
        for d in ds.values():
            d.stop()


async def eventually(check: Any, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(AssertionError, ProtoError):
            await check()
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            await check()  # raise the real assertion
        await asyncio.sleep(0.2)


async def test_cluster_lifecycle_through_cnvmd(daemons: dict[str, Daemon]) -> None:
    n1, n2, n3, out = (daemons[n] for n in ("node1", "node2", "node3", "node4"))
    await n1.call("cluster.init")
    tok = (await n1.call("cluster.token"))["token"]
    await n2.call("join", {"peer": f"127.0.0.1:{n1.port}", "token": tok})
    tok = (await n2.call("cluster.token", {"ttl": 60}))["token"]
    await n3.call("join", {"peer": f"127.0.0.1:{n2.port}", "token": tok})

    everyone = {"node1": "alive", "node2": "alive", "node3": "alive"}

    async def all_see_all() -> None:
        for d in (n1, n2, n3):
            assert await d.states() == everyone

    took = await eventually(all_see_all)
    assert took < 5, f"convergence took {took:.1f}s"

    # Refusals (node4 is no member): a replayed token, a forged one, garbage on the port;
    # the cluster does not notice.
    with pytest.raises(ProtoError, match="already used"):
        await out.call("join", {"peer": f"127.0.0.1:{n1.port}", "token": tok})
    head, payload, tag = tok.split(".")
    with pytest.raises(ProtoError, match="permission_denied"):
        await out.call("join", {"peer": f"127.0.0.1:{n2.port}",
                                "token": f"{head}.{payload}.{tag[::-1]}"})
    assert (await out.call("nodes"))["cluster_id"] is None
    r, w = await asyncio.open_connection("127.0.0.1", n1.port)
    w.write(os.urandom(8192))
    with contextlib.suppress(ConnectionError):
        await w.drain()
        await asyncio.wait_for(r.read(), 15)
    w.close()
    await all_see_all()

    # An API op run on node3, asked on node1 (the path `--node node1 ... --on node3` takes).
    res = await n1.call("forward", {"node": "node3", "op": "ping", "args": {"data": "hi"}})
    assert res == {"node": "node3", "data": "hi"}

    n3.stop()

    async def node3_down() -> None:
        assert (await n1.states())["node3"] == "down"
        assert (await n2.states())["node3"] == "down"

    await eventually(node3_down, timeout=15)
    await n3.start()
    await eventually(all_see_all, timeout=15)


# -- the same acceptance in a real lab: nodes in namespaces spd-node1..3 on 198.18.0.x ----


async def _lab_call(lab: Any, node: str, op: str, args: dict[str, Any] | None = None) -> Any:
    from cnvmlab import paths as labpaths

    async with await Client.connect(labpaths.node_socket(lab.name, node)) as c:
        return await c.call(op, args or {}, timeout=30)


async def _stop_lab_daemon(lab: Any, node: str) -> None:
    """SIGTERM the cnvmd the lab started for `node` (its recorded pid only)."""
    from cnvmlab.lab import _proc_start_time

    rec = lab._load()["pids"][f"cnvmd-{node}"]
    if _proc_start_time(rec["pid"]) != rec["start"]:
        return
    os.kill(rec["pid"], signal.SIGTERM)
    for _ in range(150):
        if _proc_start_time(rec["pid"]) != rec["start"]:
            return
        await asyncio.sleep(0.1)
    os.kill(rec["pid"], signal.SIGKILL)


async def test_lab_three_nodes(lab_factory: Any) -> None:
    lab = await lab_factory("spd", nodes=3, start_daemons=True)
    ip = {n: lab.underlay_ip(n) for n in lab.node_names}
    await _lab_call(lab, "node1", "cluster.init")
    tok = (await _lab_call(lab, "node1", "cluster.token"))["token"]
    await _lab_call(lab, "node2", "join", {"peer": ip["node1"], "token": tok})
    tok = (await _lab_call(lab, "node2", "cluster.token"))["token"]
    await _lab_call(lab, "node3", "join", {"peer": ip["node2"], "token": tok})

    async def view(node: str) -> dict[str, tuple[str, str]]:
        res = await _lab_call(lab, node, "nodes")
        return {n["name"]: (n["addr"], n["state"]) for n in res["nodes"]}

    everyone = {n: (ip[n], "alive") for n in lab.node_names}

    async def all_see_all() -> None:
        for n in lab.node_names:
            assert await view(n) == everyone

    took = await eventually(all_see_all)
    assert took < 5, f"convergence took {took:.1f}s"

    res = await _lab_call(lab, "node1", "forward",
                          {"node": "node3", "op": "ping", "args": {"data": 1}})
    assert res == {"node": "node3", "data": 1}

    await _stop_lab_daemon(lab, "node3")

    async def node3_down() -> None:
        for n in ("node1", "node2"):
            assert (await view(n))["node3"][1] == "down"

    await eventually(node3_down, timeout=15)
    await lab.start_daemon("node3")
    await eventually(all_see_all, timeout=15)
