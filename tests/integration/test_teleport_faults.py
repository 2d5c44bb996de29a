"""Teleport engine v2 (issue 12): every side effect unwinds, and a killed daemon's
session is resolved from its journal. Real cnvmd on 2 lab nodes, runc + CRIU 4.2,
one live client connection to a busybox cnvm — nothing mocked.

1. A failure injected right after each side effect / milestone of both host modes
   (the `fail_at` test hook, source and target steps) unwinds to a cnvm that runs
   exactly once, on the source, with its counter, its file and its connection, and
   leaves nothing on the target.
2. The source or the target daemon SIGKILLed in each phase and restarted: the
   session is resolved (before the switchover: the cnvm resumes on the source;
   after it: it stays on the target), the cnvm runs exactly once, nothing is left.
3. The API socket refuses the target-side ops; hostile peer payloads get
   invalid_argument from a real peer and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import pytest
import pytest_asyncio

from cnvmd import proc
from cnvmd.migration.source import FAULT_POINTS
from cnvmd.migration.target import TARGET_FAULT_POINTS
from cnvmlab import paths as labpaths
from cnvmlab.lab import REPO
from proto.messages import ErrorCode, ProtoError
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="module")]

AS_MEMBER = r"""
# A member's raw peer RPC: node1's own key, straight onto node2's rpc channel.
import asyncio, json, sys
import asyncssh
from proto.framing import FrameDecoder, encode_frame
from proto.messages import request

async def main():
    key = asyncssh.read_private_key(sys.argv[1])
    conn = await asyncssh.connect(sys.argv[3], 6783, username=sys.argv[2],
                                  client_keys=[key], known_hosts=None, agent_path=None,
                                  config=None, preferred_auth="publickey")
    w, r, _ = await conn.open_session(subsystem="cnvm-rpc", encoding=None)
    dec, out = FrameDecoder(), []
    for i, h in enumerate(json.loads(sys.argv[4]), 1):
        w.write(encode_frame(request(i, h["op"], h["args"])))
        got = None
        while got is None:
            for m in dec.feed(await r.read(1 << 16)):
                if m.get("t") == "res" and m.get("id") == i:
                    got = m
        out.append(got)
    conn.close()
    print(json.dumps(out, default=str))

asyncio.run(main())
"""

IP = "10.100.101.31"
NAME = "tf1"
LAB = "lf"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def flab(tmp_path_factory: pytest.TempPathFactory):
    tl = TeleLab(LAB, 2)
    try:
        await tl.up(tmp_path_factory.mktemp("flab"))
        await tl.deploy_with_client(NAME, IP)
        yield tl
    except BaseException:
        tl.print_logs(40)
        raise
    finally:
        await tl.down()


async def running_once_on(tl: TeleLab, node: str, timeout: float = 60) -> None:
    """The cnvm runs on `node` only, counter and connection intact, file kept, and the
    other node holds nothing of it."""
    c = tl.conn  # type: ignore[attr-defined]
    await c.wait_more(20, timeout=timeout)  # the client's TCP may have backed off
    c.check_sequence()
    assert not c.eof
    assert await tl.where(NAME) == [node]
    info = await tl.call(node, "inspect", {"name": NAME})
    assert info["state"] == "running" and info["ip"] == IP, info
    res = await tl.call(node, "exec", {"name": NAME, "cmd": ["cat", "/data.txt"]})
    assert res["stdout"].strip() == "kept"
    other = "node2" if node == "node1" else "node1"
    end = time.monotonic() + 30
    while left := await tl.leftovers(other, NAME):
        if time.monotonic() > end:
            raise AssertionError(f"{other} keeps {left}")
        await asyncio.sleep(0.5)
    for n in tl.lab.node_names:  # no unresolved session anywhere
        for side in ("in", "out"):
            d = labpaths.node_state_dir(LAB, n) / "teleport" / side
            assert not d.exists() or not any(d.iterdir()), (n, side, list(d.iterdir()))


CASES = [(m, p) for m in ("postcopy", "stop-copy")
         for p in (*FAULT_POINTS, *(f"target:{t}" for t in TARGET_FAULT_POINTS))
         if p != "predumping"  # pre-copy rounds only: the VM lane
         and not (m == "postcopy" and p == "page_relay")
         and not (m == "stop-copy" and p == "target:lazy")]


@pytest.mark.parametrize(("mode", "fault"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
async def test_fault_after_each_effect_unwinds_to_the_source(flab: TeleLab, mode: str,
                                                             fault: str):
    with pytest.raises(ProtoError) as ei:
        await flab.call("node1", "teleport", {"name": NAME, "target": "node2", "mode": mode,
                                              "fail_at": fault}, timeout=120)
    rep = ei.value.details.get("report") or {}
    assert rep.get("rolled_back"), ei.value
    assert "fault injected" in ei.value.message, ei.value.message
    await running_once_on(flab, "node1")


async def kill_during(tl: TeleLab, who: str, hold: str, mode: str) -> Any:
    """Start a teleport node1 -> node2 that holds at phase `hold`, SIGKILL `who`'s
    daemon during the hold, restart it; returns the teleport call's outcome."""
    t = asyncio.create_task(tl.call("node1", "teleport", {
        "name": NAME, "target": "node2", "mode": mode, "lease": 6, "hold": {hold: 4}},
        timeout=120))
    journal_dir = labpaths.node_state_dir(LAB, "node1") / "teleport" / "out"
    end = time.monotonic() + 30
    while True:  # until the source journals the held phase
        phases = []
        if journal_dir.exists():
            for d in journal_dir.iterdir():
                try:
                    phases.append((d / "session.json").read_text())
                except OSError:
                    pass
        if any(f'"phase": "{hold}"' in p for p in phases) or (
                hold in ("transfer", "frozen") and any('"phase": "' in p for p in phases)
                and await asyncio.sleep(1.5, result=True)):
            break
        assert time.monotonic() < end, f"never reached {hold}: {phases}"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    # while it is in flight, `inspect` shows the session on the source
    info = await tl.call("node1", "inspect", {"name": NAME})
    assert [x["side"] for x in info["teleport_sessions"]] == ["source"], info
    await tl.kill_daemon(who)
    if who == "node1":
        with pytest.raises(Exception):  # noqa: B017 - the caller's daemon is gone
            await t
        await tl.start_daemon("node1")
        return None
    try:
        return await t
    except ProtoError as exc:
        return exc
    finally:
        await tl.start_daemon(who)


KILLS = [("node1", "prepare", "postcopy"), ("node1", "upper", "stop-copy"),
         ("node1", "freeze", "postcopy"), ("node1", "frozen", "postcopy"),
         ("node1", "frozen", "stop-copy"), ("node1", "restore", "stop-copy"),
         ("node2", "upper", "postcopy"), ("node2", "frozen", "stop-copy")]


@pytest.mark.parametrize(("who", "hold", "mode"), KILLS,
                         ids=[f"kill-{w}-{h}-{m}" for w, h, m in KILLS])
async def test_killed_daemon_resolves_before_switchover(flab: TeleLab, who: str, hold: str,
                                                        mode: str):
    out = await kill_during(flab, who, hold, mode)
    if who == "node2":  # the source saw its target die: rolled back
        assert isinstance(out, ProtoError) and out.details["report"]["rolled_back"], out
    await running_once_on(flab, "node1")


async def test_killed_source_after_switchover_keeps_it_on_the_target(flab: TeleLab):
    await kill_during(flab, "node1", "switched", "postcopy")
    await running_once_on(flab, "node2")
    # and back, so the module's cnvm ends where it began
    rep = await flab.call("node2", "teleport", {"name": NAME, "target": "node1",
                                                "mode": "stop-copy"}, timeout=120)
    assert rep["ok"]
    await running_once_on(flab, "node1")


async def test_killed_target_after_switchover_keeps_it_there(flab: TeleLab):
    out = await kill_during(flab, "node2", "switched", "stop-copy")
    assert isinstance(out, dict) and out["ok"], out  # the source had let go already
    await running_once_on(flab, "node2")
    rep = await flab.call("node2", "teleport", {"name": NAME, "target": "node1",
                                                "mode": "postcopy"}, timeout=120)
    assert rep["ok"]
    await running_once_on(flab, "node1")


async def test_target_ops_are_peer_only_and_check_their_input(flab: TeleLab):
    for op in ("teleport.prepare", "teleport.restore", "teleport.abort", "teleport.status",
               "teleport.commit", "teleport.pages", "teleport.image"):
        with pytest.raises(ProtoError) as ei:
            await flab.call("node2", op, {"sid": "/etc"})
        assert ei.value.code == ErrorCode.UNKNOWN_OP, (op, ei.value)
    # through the mesh, as a member: hostile payloads are invalid_argument, no effect
    hostile: list[dict[str, Any]] = [
        {"op": "teleport.prepare", "args": {"v": 3, "sid": "../../../etc", "mode": "auto"}},
        {"op": "teleport.status", "args": {"v": 3, "sid": "/var/lib/cnvm"}},
        {"op": "teleport.abort", "args": {"v": 3, "sid": "t" + "0" * 20, "x": 1}},
        {"op": "teleport.restore", "args": {"v": 3, "sid": "t" + "0" * 20,
                                             "vteps": {"..": "1.2.3.4"}}},
    ]
    before = await flab.leftovers("node2", NAME)
    key = labpaths.node_state_dir(LAB, "node1") / "peers" / "node_key"
    res = await proc.run([sys.executable, "-c", AS_MEMBER, str(key), "node1",
                          flab.lab.underlay_ip("node2"), json.dumps(hostile)],
                         netns=flab.lab.netns("node1"), timeout=60, cwd=str(REPO))
    answers = json.loads(res.stdout)
    assert len(answers) == len(hostile)
    for h, a in zip(hostile, answers, strict=True):
        assert a.get("ok") is False and a["error"]["code"] == "invalid_argument", (h, a)
    assert await flab.leftovers("node2", NAME) == before
    await running_once_on(flab, "node1")
