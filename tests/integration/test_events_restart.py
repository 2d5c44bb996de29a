"""Restart policies, the event stream and honest teleport history (issue 17), on real
cnvmd daemons of a 2-node lab ("he"), runc + CRIU, busybox cnvms — nothing mocked.

1. on-failure:2 restarts a cnvm that exits 1 twice, then leaves it "exited (1)";
   `always` restarts after exit 0; a user `stop` never restarts. `cnvmctl events
   --json` (the real CLI, a subprocess) sees deploy, die (with the code), restart.
2. A policy travels with a teleport (inspect on the target shows it, the target's
   daemon restarts the cnvm when it exits) and survives a daemon restart (SIGKILL).
   The CLI event stream shows the teleport's start, phases and commit.
3. A postcopy teleport's history on both nodes counts the ~32 MiB of memory pages
   fetched after the switchover; a rolled-back teleport's reason appears in the
   human `cnvmctl teleports NAME`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_asyncio

from cnvmlab import paths as labpaths
from cnvmlab.lab import REPO
from proto.messages import ProtoError
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.asyncio(loop_scope="module")]

LAB = "he"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MEM_BYTES = 32 << 20
# ~36 MB of text in a shell variable: dirtied anonymous memory the teleport must move
HOLD = ("rm -f /tmp/quit /tmp/ready; x=$(seq 4600000); touch /tmp/ready; "
        "while [ ! -f /tmp/quit ]; do sleep 0.2; done; exit 3")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hl(tmp_path_factory: pytest.TempPathFactory):
    tl = TeleLab(LAB, 2)
    try:
        await tl.up(tmp_path_factory.mktemp("hlab"))
        yield tl
    finally:
        await tl.down()


def sock(node: str) -> str:
    return str(labpaths.node_socket(LAB, node))


async def cli(node: str, *args: str, check: bool = True) -> str:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cnvmctl", "--socket", sock(node), *args, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 120)
    if check and p.returncode != 0:
        raise AssertionError(f"cnvmctl {args}: rc {p.returncode}: {err.decode()}")
    return out.decode()


class Tap:
    """`cnvmctl events --json` as a subprocess, its lines parsed as they come."""

    def __init__(self, p: asyncio.subprocess.Process) -> None:
        self.p = p
        self.events: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, node: str, *args: str) -> Tap:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cnvmctl", "--socket", sock(node), "events", "--json",
            *args, env=ENV, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        return cls(p)

    async def _read(self) -> None:
        assert self.p.stdout is not None
        async for line in self.p.stdout:
            self.events.append(json.loads(line))

    def of(self, name: str, type: str = "cnvm") -> list[str]:
        return [e["action"] for e in self.events if e["name"] == name and e["type"] == type]

    async def until(self, pred: Callable[[], bool], timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end or self.p.returncode is not None:
                err = b""
                if self.p.returncode is not None and self.p.stderr is not None:
                    err = await self.p.stderr.read()
                raise AssertionError(f"events so far: {self.events} {err.decode()}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.terminate()
        await self.p.wait()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def row(tl: TeleLab, node: str, name: str) -> dict[str, Any]:
    rows = await tl.call(node, "ls")
    return next(r for r in rows if r["name"] == name)


async def wait_row(tl: TeleLab, node: str, name: str, pred: Callable[[dict[str, Any]], bool],
                   timeout: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        r = await row(tl, node, name)
        if pred(r):
            return r
        if time.monotonic() > end:
            raise AssertionError(f"{name} on {node}: {r}\n{tl.daemon_log(node)[-3000:]}")
        await asyncio.sleep(0.2)


async def deploy(tl: TeleLab, name: str, ip: str, restart: str, script: str,
                 node: str = "node1") -> dict[str, Any]:
    return await tl.call(node, "deploy", {"name": name, "image": tl.image, "ip": ip,
                                          "restart": restart, "cmd": ["sh", "-c", script]})


async def test_on_failure_restarts_n_times_then_shows_the_exit_code(hl: TeleLab):
    tap = await Tap.start("node1", "--since", "5s", "--filter", "name=hf1")
    try:
        await deploy(hl, "hf1", "10.100.101.41", "on-failure:2", "sleep 1; exit 1")
        r = await wait_row(hl, "node1", "hf1", lambda r: r["state"].startswith("exited"))
        assert r["state"] == "exited (1)" and r["restarts"] == 2, r
        assert r["exit_code"] == 1 and r["exited_at"] and r["restart"] == "on-failure:2"
        await tap.until(lambda: tap.of("hf1").count("die") == 3)
        assert tap.of("hf1") == ["deploy", "die", "restart", "die", "restart", "die"]
        dies = [e for e in tap.events if e["action"] == "die"]
        assert all(e["attrs"]["exit_code"] == 1 for e in dies), dies
        out = await cli("node1", "ls")
        line = next(ln for ln in out.splitlines() if ln.startswith("hf1 "))
        assert "exited (1)" in line and line.split()[-1] == "2", out  # RESTARTS column
        human = await cli("node1", "inspect", "hf1")
        assert "on-failure:2 (2 restarts)" in human and "exit code 1" in human, human
        await asyncio.sleep(2)  # and it stays so
        assert (await row(hl, "node1", "hf1"))["restarts"] == 2
        # a user start gives the policy a fresh count
        await hl.call("node1", "start", {"name": "hf1"})
        r = await wait_row(hl, "node1", "hf1", lambda r: r["state"].startswith("exited"))
        assert r["restarts"] == 2 and r["state"] == "exited (1)", r
    finally:
        await tap.close()
        with contextlib.suppress(ProtoError):
            await hl.call("node1", "rm", {"name": "hf1", "force": True})


async def test_always_restarts_after_exit_0_and_user_stop_does_not(hl: TeleLab):
    tap = await Tap.start("node1", "--since", "5s", "--filter", "name=ha1")
    try:
        await deploy(hl, "ha1", "10.100.101.42", "always", "sleep 1; exit 0")
        await wait_row(hl, "node1", "ha1", lambda r: r["restarts"] >= 2)
        await tap.until(lambda: "restart" in tap.of("ha1"))
        assert {e["attrs"].get("exit_code") for e in tap.events if e["action"] == "die"} == {0}
        await wait_row(hl, "node1", "ha1", lambda r: r["state"] == "running")
        await hl.call("node1", "stop", {"name": "ha1", "time": 0})
        n = (await row(hl, "node1", "ha1"))["restarts"]
        await asyncio.sleep(3)  # longer than a run plus the backoff
        r = await row(hl, "node1", "ha1")
        assert r["state"] == "stopped" and r["restarts"] == n, r
        assert tap.of("ha1")[-1] == "stop" or tap.of("ha1")[-2:] == ["stop", "die"], tap.of("ha1")
    finally:
        await tap.close()
        with contextlib.suppress(ProtoError):
            await hl.call("node1", "rm", {"name": "ha1", "force": True})


async def test_policy_travels_with_a_teleport_and_survives_a_daemon_restart(hl: TeleLab):
    name = "ht1"
    t_start = time.time() - 1
    await deploy(hl, name, "10.100.101.43", "always", HOLD)
    anon = await fill_and_measure(hl, "node1", name)
    assert anon >= MEM_BYTES
    tap1 = await Tap.start("node1", "--since", str(t_start))
    tap2 = await Tap.start("node2", "--since", str(t_start), "--filter", f"name={name}")
    try:
        seen: list[dict[str, Any]] = []
        rep = await hl.call("node1", "teleport", {"name": name, "target": "node2",
                                                  "mode": "postcopy"},
                            on_event=lambda ev: seen.append(ev.data)
                            if ev.name == "progress" else None, timeout=300)
        assert rep["ok"], rep
        # the live view shows the lazy pages moving from the restore on (progress is per
        # phase: the prefetching relay may bring most of them before the switchover)
        per_phase: dict[str, int] = {}
        for d in seen:
            if d.get("what") == "pages":
                per_phase[d["phase"]] = max(per_phase.get(d["phase"], 0), d["done"])
        assert sum(per_phase.values()) >= anon // 2, (anon, per_phase)
        assert not [d for d in seen if isinstance(d.get("total"), int)
                    and d.get("done", 0) > d["total"]]
        await tap1.until(lambda: "committed" in tap1.of(name, "teleport"))
        seq = tap1.of(name, "teleport")
        assert seq[0] == "start" and seq[-1] == "committed", seq
        phases = [e["attrs"]["phase"] for e in tap1.events
                  if e["name"] == name and e["action"] == "phase"]
        assert phases[:1] == ["prepare"] and {"freeze", "restore", "commit"} <= set(phases), \
            phases
        assert tap1.of(name)[:1] == ["deploy"]  # lifecycle and teleport in one stream
        await tap2.until(lambda: "arrived" in tap2.of(name, "teleport"))

        # history: both nodes keep it, with the pages fetched after the switchover
        wires: dict[str, int] = {}
        for node in ("node1", "node2"):
            hist = (await hl.call(node, "teleport.reports", {"name": name}))["reports"]
            last = hist[-1]
            lazy = [x for x in last["rounds"] if x["kind"] == "lazy"]
            assert lazy and lazy[0]["bytes"] >= anon, (node, anon, last["rounds"])
            assert last["wire_bytes"] >= sum(x["bytes"] for x in last["rounds"]), last
            wires[node] = last["wire_bytes"]
            human = await cli(node, "teleports", name)
            assert " MiB" in human.splitlines()[1], human

        assert wires["node1"] == wires["node2"] == rep["wire_bytes"], (wires, rep)
        info = await hl.call("node2", "inspect", {"name": name})
        assert info["restart"] == "always" and info["record"]["restart"] == "always", info
        assert "restart" in await cli("node2", "inspect", name)

        # the target's daemon applies it
        await hl.call("node2", "exec", {"name": name, "cmd": ["touch", "/tmp/quit"]})
        r = await wait_row(hl, "node2", name, lambda r: r["restarts"] >= 1
                           and r["state"] == "running")
        await tap2.until(lambda: "restart" in tap2.of(name))
        assert "die" in tap2.of(name)

        # a daemon restart keeps the policy; the new daemon restarts the cnvm too
        await hl.kill_daemon("node2")
        await hl.start_daemon("node2")
        info = await hl.call("node2", "inspect", {"name": name})
        assert info["restart"] == "always" and info["state"] == "running", info
        n = info["restarts"]
        await hl.call("node2", "exec", {"name": name, "cmd": ["touch", "/tmp/quit"]})
        r = await wait_row(hl, "node2", name, lambda r: r["restarts"] > n
                           and r["state"] == "running")
        assert r["exited_at"], r
    finally:
        await tap1.close()
        await tap2.close()
        for node in ("node1", "node2"):
            with contextlib.suppress(ProtoError):
                await hl.call(node, "rm", {"name": name, "force": True})


async def test_rolled_back_teleport_reason_shows_in_the_human_history(hl: TeleLab):
    name = "hr1"
    await deploy(hl, name, "10.100.101.44", "no", "while true; do sleep 1; done")
    tap = await Tap.start("node1", "--since", "5s", "--filter", "type=teleport")
    try:
        with pytest.raises(ProtoError) as ei:
            await hl.call("node1", "teleport", {"name": name, "target": "node2",
                                                "mode": "stop-copy", "fail_at": "dumped"},
                          timeout=120)
        assert "fault injected" in ei.value.message
        out = await cli("node1", "teleports", name)
        assert "rolled back" in out and "fault injected after dumped" in out, out
        await tap.until(lambda: "rolled_back" in tap.of(name, "teleport"))
        ev = next(e for e in tap.events if e["action"] == "rolled_back")
        assert "fault injected after dumped" in ev["attrs"]["reason"], ev
        assert (await row(hl, "node1", name))["state"] == "running"
        # membership events are kept too: node2 joined node1's cluster at lab start
        out = await cli("node1", "events", "--json", "--since", "1h", "--no-follow",
                        "--filter", "type=node")
        nodes = [json.loads(ln) for ln in out.splitlines()]
        assert any(e["action"] == "joined" and e["name"] == "node2" for e in nodes), nodes
    finally:
        await tap.close()
        with contextlib.suppress(ProtoError):
            await hl.call("node1", "rm", {"name": name, "force": True})


async def fill_and_measure(tl: TeleLab, node: str, name: str) -> int:
    """Wait until the HOLD script has dirtied its memory; its anonymous RSS in bytes."""
    end = time.monotonic() + 60
    while (await tl.call(node, "exec", {"name": name, "cmd": [
            "test", "-f", "/tmp/ready"]}))["exit_code"] != 0:
        assert time.monotonic() < end, "the cnvm did not fill its memory"
        await asyncio.sleep(0.3)
    status = (await tl.call(node, "exec", {"name": name, "cmd": [
        "cat", "/proc/1/status"]}))["stdout"]
    return 1024 * int(next(ln for ln in status.splitlines()
                           if ln.startswith("RssAnon:")).split()[1])


async def test_live_view_shows_the_memory_moving_with_a_sane_total(hl: TeleLab):
    """A stop-copy teleport's progress events: the freeze phase counts the memory pages
    it streams (not only the upper dir delta), and no event says more done than total."""
    name = "hp1"
    await deploy(hl, name, "10.100.101.45", "no", HOLD)
    try:
        anon = await fill_and_measure(hl, "node1", name)
        assert anon >= MEM_BYTES
        seen: list[dict[str, Any]] = []
        rep = await hl.call("node1", "teleport", {"name": name, "target": "node2",
                                                  "mode": "stop-copy"},
                            on_event=lambda ev: seen.append(ev.data)
                            if ev.name == "progress" else None, timeout=300)
        assert rep["ok"], rep
        sized = [d for d in seen if d.get("unit") == "bytes"]
        bad = [d for d in sized if isinstance(d.get("total"), int) and d["done"] > d["total"]]
        assert not bad, bad
        freeze = [d["done"] for d in sized if d.get("phase") == "freeze"]
        assert freeze and max(freeze) >= anon, (anon, freeze[-5:])
        assert any(d.get("what") == "pages" for d in sized if d.get("phase") == "freeze")
        upper = [d for d in sized if d.get("phase") == "upper"]
        assert upper and all(d.get("total") for d in upper), upper[-3:]
        dump = next(x for x in rep["rounds"] if x["kind"] == "dump")
        assert max(freeze) >= dump["bytes"] >= anon, (dump, anon)
    finally:
        for node in ("node1", "node2"):
            with contextlib.suppress(ProtoError):
                await hl.call(node, "rm", {"name": name, "force": True})
