"""Cluster acceptance (issue 15): one namespace of cnvms over 3 real cnvmd nodes (peer
mesh over SSH, overlay, runc + CRIU), nothing mocked.

* The directory: from node3, `cluster.ls` lists node1's and node2's cnvms with their
  nodes; `nodes` shows the right cnvm counts within 2 s of a deploy, teleport, rm.
* Any-node commands: inspect, logs, exec, stop, start and teleport of a cnvm on node1
  asked of node3 are carried out by node1 and say so.
* Placement: `deploy --node node2` from node1 ships the image (node2 has none) by
  digest; `teleport NAME auto` picks a node; a cordoned node is refused.
* Unique names: two concurrent deploys of one name on node1 and node2: exactly one
  succeeds, the other gets `conflict`.
* Evacuate: six cnvms on node1, each with a live client connection; `evacuate node1
  -j 3` with node3's daemon killed mid-way: those bound for node3 stay on node1 and
  are reported failed, the rest move; node3 back, a second evacuate moves the rest:
  node1 is empty and cordoned, the cnvms spread over node2 and node3, every
  connection alive, every counter intact.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from proto.messages import ErrorCode, ProtoError
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def clab(tmp_path: Path):
    tl = TeleLab("hd", 3)
    try:
        await tl.up(tmp_path)
        yield tl
    except BaseException:
        tl.print_logs(40)
        raise
    finally:
        await tl.down()


async def counts_within(tl: TeleLab, asker: str, want: dict[str, int],
                        within: float = 2.0) -> float:
    """`nodes` on `asker` shows `want` cnvm counts within `within` seconds."""
    t0 = time.monotonic()
    got: dict[str, Any] = {}
    while time.monotonic() - t0 < within:
        view = await tl.call(asker, "nodes")
        got = {n["name"]: n.get("cnvm_count") for n in view["nodes"]}
        if all(got.get(k) == v for k, v in want.items()):
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    raise AssertionError(f"nodes on {asker} after {within}s: {got}, want {want}")


async def cnvmctl(*args: str) -> tuple[int, str, str]:
    """The real CLI against a lab node (`--lab hd --node N ...`)."""
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cnvmctl", "--lab", "hd", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 600)
    return int(p.returncode or 0), out.decode(), err.decode()


async def listed(tl: TeleLab, asker: str) -> dict[str, str]:
    res = await tl.call(asker, "cluster.ls")
    return {r["name"]: r["node"] for r in res["cnvms"]}


async def test_directory_any_node_placement_unique_names(clab: TeleLab):
    tl = clab
    await tl.deploy("hdc1", "10.100.101.31", node="node1")
    await counts_within(tl, "node3", {"node1": 1, "node2": 0, "node3": 0})
    # placement: node1 puts c2 on node2, which has no image yet (blobs by digest)
    res = await tl.call("node1", "deploy", {"name": "hdc2", "image": tl.image,
                                            "ip": "10.100.101.32", "node": "node2"})
    assert res["node"] == "node2"
    imgs = await tl.call("node2", "images.ls")
    assert [i for i in imgs if tl.image in i["names"]], imgs
    await counts_within(tl, "node3", {"node1": 1, "node2": 1, "node3": 0})
    assert await listed(tl, "node3") == {"hdc1": "node1", "hdc2": "node2"}
    rows = {r["name"]: r for r in (await tl.call("node3", "cluster.ls"))["cnvms"]}
    assert rows["hdc1"]["state"] == "running" and rows["hdc1"]["ip"] == "10.100.101.31"
    assert rows["hdc1"]["mem_use"] > 0 and rows["hdc1"]["image"] == tl.image, rows

    # bad input is invalid_argument, never internal
    for op, a in [("cluster.ls", {"node": 5}), ("cluster.ls", {"node": "../x"}),
                  ("cordon", {"node": "a b"}), ("uncordon", {}),
                  ("evacuate", {"node": "node1", "to": ["x/y"]}),
                  ("evacuate", {"node": "node1", "parallel": 0}),
                  ("evacuate", {"node": "node1", "mode": "warp"}),
                  ("evacuate", {"node": "node1", "bogus": 1}),
                  ("deploy", {"name": "hdx", "image": tl.image, "node": 5}),
                  ("deploy", {"name": "hdx", "image": tl.image, "node": "a/b"}),
                  ("deploy", {"name": "Bad Name", "image": tl.image}),
                  ("place", {"memory": "lots"}), ("teleport", {"name": "hdc1", "target": 5}),
                  ("inspect", {"name": "Bad Name"}), ("logs", {"name": 7})]:
        with pytest.raises(ProtoError) as ei:
            await tl.call("node3", op, a)
        assert ei.value.code == ErrorCode.INVALID_ARGUMENT, (op, a, ei.value)

    # any-node commands, asked of node3
    info = await tl.call("node3", "inspect", {"name": "hdc1"})
    assert info["node"] == "node1" and info["state"] == "running"
    ex = await tl.call("node3", "exec", {"name": "hdc1", "cmd": ["hostname"]})
    assert ex["exit_code"] == 0 and ex["stdout"].strip() == "hdc1" and ex["node"] == "node1"
    lg = await tl.call("node3", "logs", {"name": "hdc1"})
    assert lg["node"] == "node1"
    st = await tl.call("node3", "stop", {"name": "hdc1", "time": 1})
    assert st["node"] == "node1"
    assert (await tl.call("node1", "inspect", {"name": "hdc1"}))["state"] != "running"
    st = await tl.call("node3", "start", {"name": "hdc1"})
    assert st["node"] == "node1"
    assert (await tl.call("node1", "inspect", {"name": "hdc1"}))["state"] == "running"
    ex = await tl.call("node3", "exec", {"name": "hdc1", "cmd": ["cat"], "stdin": b"via node3"})
    assert ex["stdout"] == "via node3" and ex["node"] == "node1"
    # logs -f through node3: output events relayed from node1
    await tl.call("node1", "exec", {"name": "hdc1",
                                    "cmd": ["sh", "-c", "echo marker > /proc/1/fd/1"]})
    got: list[str] = []
    seen = asyncio.Event()

    def on_out(ev: Any) -> None:
        if ev.name == "output":
            got.append(ev.data.get("data", ""))
            if "marker" in "".join(got):
                seen.set()

    follow = asyncio.create_task(tl.call("node3", "logs", {"name": "hdc1", "follow": True},
                                         on_event=on_out, timeout=None))
    await asyncio.wait_for(seen.wait(), 20)
    follow.cancel()
    # the CLI: whole-cluster ls with a NODE column, nodes with counts, a filter
    rc, out, err = await cnvmctl("--node", "node3", "ls")
    assert rc == 0, err
    lines = [ln.split() for ln in out.splitlines()]
    assert lines[0][:3] == ["NAME", "NODE", "STATE"], out
    assert ["hdc1", "node1"] in [ln[:2] for ln in lines] and ["hdc2", "node2"] in [
        ln[:2] for ln in lines], out
    rc, out, err = await cnvmctl("--node", "node3", "--json", "ls", "--node", "node2")
    assert [(r["name"], r["node"]) for r in json.loads(out)] == [("hdc2", "node2")], out
    rc, out, err = await cnvmctl("--node", "node3", "nodes")
    assert rc == 0 and "CNVMS" in out, err
    with pytest.raises(ProtoError) as ei:
        await tl.call("node3", "inspect", {"name": "nosuch"})
    assert ei.value.code == ErrorCode.NOT_FOUND

    # a cordoned node is refused as a target; auto skips it
    await tl.call("node1", "cordon", {"node": "node2"})
    await asyncio.sleep(0.5)
    with pytest.raises(ProtoError) as ei:
        await tl.call("node3", "teleport", {"name": "hdc1", "target": "node2"}, timeout=120)
    assert ei.value.code == ErrorCode.CONFLICT and "cordoned" in ei.value.message
    view = await tl.call("node1", "nodes")
    assert {n["name"]: n["cordoned"] for n in view["nodes"]}["node2"] is True
    # teleport asked of node3, auto target: node3 (node2 is cordoned)
    rep = await tl.call("node3", "teleport", {"name": "hdc1", "target": "auto"}, timeout=180)
    assert rep["ok"] and rep["target"] == "node3" and rep["node"] == "node1"
    await counts_within(tl, "node2", {"node1": 0, "node2": 1, "node3": 1})
    info = await tl.call("node1", "inspect", {"name": "hdc1"})  # routed to node3 now
    assert info["node"] == "node3"
    reps = await tl.call("node2", "teleport.reports", {"name": "hdc1"})
    assert reps["node"] == "node3" and reps["reports"][-1]["target"] == "node3"
    await tl.call("node1", "uncordon", {"node": "node2"})

    # rm from another node
    await tl.call("node1", "rm", {"name": "hdc2", "force": True})
    await counts_within(tl, "node3", {"node1": 0, "node2": 0, "node3": 1})
    assert await listed(tl, "node1") == {"hdc1": "node3"}

    # a taken name is a conflict anywhere
    with pytest.raises(ProtoError) as ei:
        await tl.call("node2", "deploy", {"name": "hdc1", "image": tl.image})
    assert ei.value.code == ErrorCode.CONFLICT

    # two concurrent deploys of one name on two nodes: exactly one wins
    for round_ in range(3):
        name = f"hddup{round_}"
        res2 = await asyncio.gather(
            tl.call("node1", "deploy", {"name": name, "image": tl.image}),
            tl.call("node2", "deploy", {"name": name, "image": tl.image}),
            return_exceptions=True)
        ok = [r for r in res2 if isinstance(r, dict)]
        errs = [r for r in res2 if isinstance(r, BaseException)]
        assert len(ok) == 1 and len(errs) == 1, res2
        assert isinstance(errs[0], ProtoError) and errs[0].code == ErrorCode.CONFLICT, errs
        await asyncio.sleep(0.3)
        where = [n for n, x in (await listed(tl, "node3")).items() if n == name]
        assert where == [name]
        await tl.call("node3", "rm", {"name": name, "force": True})


async def test_evacuate_with_a_target_killed_then_rerun(clab: TeleLab):
    tl = clab
    names = [f"hde{i}" for i in range(6)]
    ips = {n: f"10.100.101.{41 + i}" for i, n in enumerate(names)}
    for n in names:
        await tl.deploy(n, ips[n], node="node1")
    conns = {n: await tl.client(ips[n]) for n in names}
    for c in conns.values():
        await c.wait_more(10)
    await counts_within(tl, "node3", {"node1": 6})
    plan = await tl.call("node2", "evacuate", {"node": "node1", "dry_run": True})
    assert {i["to"] for i in plan["items"]} == {"node2", "node3"}, plan

    killed = asyncio.Event()

    def on_event(ev: Any) -> None:
        d = ev.data
        if ev.name == "evacuate" and d.get("kind") == "item" and not killed.is_set():
            i = d["item"]
            if i.get("to") == "node3" and i.get("phase") in ("layers", "upper"):
                killed.set()

    async def killer() -> None:
        await killed.wait()
        await tl.kill_daemon("node3")

    k = asyncio.create_task(killer())
    res = await tl.call("node2", "evacuate", {"node": "node1", "parallel": 3},
                        on_event=on_event, timeout=600)
    await k
    print("first evacuate:", [(i["cnvm"], i["to"], i["result"], i["mode"], i["frozen"],
                               i["error"]) for i in res["items"]])
    by = {i["cnvm"]: i for i in res["items"]}
    failed = [n for n, i in by.items() if i["result"] != "moved"]
    assert failed, res  # node3 died: something did not move
    assert all(by[n]["to"] == "node3" for n in failed), res
    assert res["failed"] == len(failed) and res["cordoned"]
    on1 = {r["name"] for r in await tl.call("node1", "ls") if r["state"] == "running"}
    assert on1 == set(failed), (on1, res)
    for c in conns.values():
        await c.wait_more(10, timeout=30)
        assert not c.eof

    await tl.start_daemon("node3")
    await tl.wait_members(timeout=30)
    await asyncio.sleep(1.5)
    rc, out, err = await cnvmctl("--node", "node1", "evacuate", "node1", "-j", "3")
    print("second evacuate (cnvmctl):", out, err, sep="\n")
    assert rc == 0, (out, err)
    table = [ln.split() for ln in out.splitlines()]
    assert table[0] == ["CNVM", "FROM", "TO", "MODE", "FROZEN", "BYTES", "RESULT"], out
    assert sorted(r[0] for r in table[1:] if r[-1] == "moved") == sorted(failed), out
    assert all(n in err for n in failed), err  # the live view, a line per cnvm
    assert [r for r in await tl.call("node1", "ls")] == []
    view = await tl.call("node2", "nodes")
    row = {n["name"]: n for n in view["nodes"]}
    assert row["node1"]["cordoned"] is True
    where = await listed(tl, "node2")
    assert set(where) == set(names) and set(where.values()) == {"node2", "node3"}, where
    for n, c in conns.items():
        await c.wait_more(20, timeout=30)
        assert not c.eof, n
        c.check_sequence()


async def test_partition_heals_and_cancel_from_another_node(clab: TeleLab):
    from cnvmd import netlink

    tl = clab
    await tl.deploy("hdk1", "10.100.101.51", node="node1")
    await tl.call("node1", "deploy", {"name": "hdz3", "image": tl.image, "node": "node3",
                                      "ip": "10.100.101.53"})
    # teleport --cancel asked of node2 reaches the source (node1) of a teleport asked
    # of node3; the cnvm resumes on node1
    t = asyncio.create_task(tl.call("node3", "teleport", {
        "name": "hdk1", "target": "node2", "mode": "stop-copy", "hold": {"transfer": 4}},
        timeout=180))
    await asyncio.sleep(1.5)
    res = await tl.call("node2", "teleport.cancel", {"name": "hdk1"}, timeout=180)
    assert res["cancelled"] and res["node"] == "node1", res
    with pytest.raises(ProtoError):
        await t
    assert (await tl.call("node3", "inspect", {"name": "hdk1"}))["node"] == "node1"

    # node3 cut off: once judged down, each side deploys on its own (a name can then
    # exist twice: listed as a duplicate when the partition heals, nothing removed)
    await netlink.link_down("node3", tl.lab.ul_netns)
    try:
        end = time.monotonic() + 30
        while True:
            v1 = {n["name"]: n["state"] for n in (await tl.call("node1", "nodes"))["nodes"]}
            v3 = {n["name"]: n["state"] for n in (await tl.call("node3", "nodes"))["nodes"]}
            if v1["node3"] == "down" and v3["node1"] == "down" and v3["node2"] == "down":
                break
            assert time.monotonic() < end, (v1, v3)
            await asyncio.sleep(0.5)
        await tl.call("node1", "deploy", {"name": "hdp1", "image": tl.image})
        await tl.call("node1", "rm", {"name": "hdk1", "force": True})
        await tl.call("node1", "deploy", {"name": "hdtwin", "image": tl.image})
        await tl.call("node3", "deploy", {"name": "hdtwin", "image": tl.image})
        ls3 = await listed(tl, "node3")
        assert "hdp1" not in ls3 and "hdk1" in ls3  # node3 cannot know yet
    finally:
        await netlink.link_up("node3", tl.lab.ul_netns)
    # healed: node3 catches up (anti-entropy), everybody sees the duplicate
    end = time.monotonic() + 30
    while True:
        res3 = await tl.call("node3", "cluster.ls")
        names3 = {(r["name"], r["node"]) for r in res3["cnvms"]}
        res2 = await tl.call("node2", "cluster.ls")
        if ("hdp1", "node1") in names3 and ("hdk1", "node1") not in names3 \
                and sorted(res2["duplicates"].get("hdtwin", [])) == ["node1", "node3"]:
            break
        assert time.monotonic() < end, (names3, res2["duplicates"])
        await asyncio.sleep(0.5)
    # a duplicate is addressed per node; removing one leaves one
    await tl.call("node3", "rm", {"name": "hdtwin", "force": True})
    await asyncio.sleep(0.5)
    assert (await tl.call("node2", "cluster.ls"))["duplicates"] == {}

    # Ctrl-C on `cnvmctl evacuate` cancels the teleports in flight: rolled back
    for q in ("hdq1", "hdq2"):
        await tl.call("node2", "deploy", {"name": q, "image": tl.image})
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cnvmctl", "--lab", "hd", "--node", "node1", "evacuate", "node2",
        "-j", "2", "--mode", "stop-copy", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert p.stderr is not None
    seen = ""
    while "moving" not in seen:
        line = await asyncio.wait_for(p.stderr.readline(), 60)
        assert line, seen
        seen += line.decode()
    p.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(p.communicate(), 120)
    assert p.returncode != 0, (out, err)
    end = time.monotonic() + 60
    while True:  # the daemon finishes the rollback on its own
        where2 = {r["name"]: r["state"] for r in await tl.call("node2", "ls")}
        others = [r["name"] for n in ("node1", "node3") for r in await tl.call(n, "ls")]
        if all(where2.get(q) == "running" for q in ("hdq1", "hdq2")) \
                and not {"hdq1", "hdq2"} & set(others):
            break
        assert time.monotonic() < end, (where2, others, seen, err)
        await asyncio.sleep(0.5)

    # the evacuation runs in the daemon: killing the CLI does not stop it
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cnvmctl", "--lab", "hd", "--node", "node1", "evacuate", "node2",
        "-j", "2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert p.stderr is not None
    line = await asyncio.wait_for(p.stderr.readline(), 60)
    assert b"evacuating node2" in line, line
    p.kill()
    await p.wait()
    end = time.monotonic() + 120
    while True:
        where = await listed(tl, "node3")
        left = [r["name"] for r in await tl.call("node2", "ls")]
        if where.get("hdq1") in ("node1", "node3") and where.get("hdq2") in ("node1", "node3") \
                and left == []:
            break
        assert time.monotonic() < end, (where, left)
        await asyncio.sleep(0.5)
