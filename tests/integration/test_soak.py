"""Soak lane (issue 18): many consecutive teleports of a busy cnvm, nothing leaks.

Real cnvmd on 2 lab nodes ("hxs" lab). One busybox cnvm that keeps dirtying 16 MiB
(a small static C program, 4 MiB/s) and serves one client connection whose
counter must carry on, teleported N times back and forth, alternating postcopy and
stop-copy. After every teleport both nodes are sampled: cnvmd's RSS, open fds and
threads; and, summed over both nodes, network namespaces, mounts under the lab's
state dirs, cgroups of the cnvm, runc containers and teleport session dirs. The
table is printed; after the warm-up the daemon gauges (their running median over 5
samples: one sample taken mid-work is no leak) stay within ±10 % and the
leftover counts never move (tests/soakcheck.py, itself unit-tested with leaking
series).

N = $CNVM_SOAK_TELEPORTS (default 20, the normal run); `make soak` runs 200.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cnvmd import netlink
from cnvmlab import paths as labpaths
from tests.soakcheck import check_flat, table
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="module")]

LAB = "hxs"
NAME = "soak1"
IP = "10.100.101.61"
N = int(os.environ.get("CNVM_SOAK_TELEPORTS", "20"))

HOG = r"""
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t mb = strtoul(argv[1], 0, 10), rate = strtoul(argv[2], 0, 10);
    size_t n = mb << 20, pages = n / 4096, per_ms = (rate << 20) / 4096 / 1000 + 1, i = 0;
    char *p = malloc(n);
    for (size_t k = 0; k < n; k += 4096) p[k] = (char)k;
    for (;;) {
        for (size_t k = 0; k < per_ms; k++, i++) p[(i % pages) * 4096] ^= 1;
        usleep(1000);
    }
}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def soaklab(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("soak")
    tl = TeleLab(LAB, 2)
    try:
        await tl.up(tmp)
        await tl.deploy(NAME, IP, memory="192M")
        src, hog = tmp / "hog.c", tmp / "hog"
        src.write_text(HOG)
        await asyncio.to_thread(subprocess.run, ["gcc", "-static", "-O2", str(src), "-o",
                                                 str(hog)], check=True)
        upper = labpaths.node_state_dir(LAB, "node1") / "cnvms" / NAME / "upper"
        shutil.copy2(hog, upper / "hog")
        res = await tl.call("node1", "exec", {"name": NAME, "cmd": [
            "sh", "-c", "/hog 16 4 </dev/null >/dev/null 2>&1 &"]})
        assert res["exit_code"] == 0, res
        tl.conn = await tl.client(IP)  # type: ignore[attr-defined]
        await tl.conn.wait_more(20)  # type: ignore[attr-defined]
        yield tl
    except BaseException:
        tl.print_logs(60)
        raise
    finally:
        await tl.down()


def _status_field(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _cgroups(name: str) -> int:
    root = Path("/sys/fs/cgroup")
    n = 0
    for base in [root, *(p for p in root.iterdir() if p.is_dir())]:
        for node in ("node1", "node2"):
            if (base / f"cnvm-{LAB}" / node / name).is_dir():  # the lab's cgroup_root
                n += 1
    return n


def sample(tl: TeleLab) -> dict[str, float]:
    """One sample of both nodes (blocking: /proc and /sys reads)."""
    out: dict[str, float] = {}
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    for node in tl.lab.node_names:
        pid = tl.daemons[node].pid
        out[f"{node}.rss_mb"] = round(_status_field(pid, "VmRSS") / 1024, 1)
        out[f"{node}.fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        out[f"{node}.threads"] = _status_field(pid, "Threads")
    states = [str(labpaths.node_state_dir(LAB, n)) for n in tl.lab.node_names]
    out["mounts"] = sum(1 for ln in mounts if any(ln.split()[4].startswith(s) for s in states))
    out["netns"] = len(netlink.netns_list(f"{LAB}-node"))
    out["cgroups"] = _cgroups(NAME)
    out["runc"] = sum(1 for n in tl.lab.node_names
                      if (labpaths.node_runc_root(LAB, n) / NAME).exists())
    out["sessions"] = sum(len(list(p.iterdir())) for n in tl.lab.node_names
                          for side in ("in", "out")
                          if (p := labpaths.node_state_dir(LAB, n) / "teleport" / side).exists())
    return out


async def test_soak_teleports_stay_flat(soaklab: TeleLab):
    c = soaklab.conn  # type: ignore[attr-defined]
    where = "node1"
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, float]] = []
    for i in range(N):
        mode = "postcopy" if i % 2 == 0 else "stop-copy"
        dst = "node2" if where == "node1" else "node1"
        rep = await soaklab.call(where, "teleport", {"name": NAME, "target": dst,
                                                     "mode": mode}, timeout=300)
        assert rep["ok"], rep
        await c.wait_more(10, timeout=60)  # the connection and its counter carry on
        c.check_sequence()
        assert not c.eof
        s = await asyncio.to_thread(sample, soaklab)
        samples.append(s)
        rows.append({"#": i + 1, "mode": mode, "to": dst,
                     "frozen_ms": round(rep["frozen_seconds"] * 1000),
                     "counter": c.last, **s})
        where = dst
    info = await soaklab.call(where, "inspect", {"name": NAME})
    assert info["state"] == "running" and info["ip"] == IP
    cols = ["#", "mode", "to", "frozen_ms", "counter",
            *(f"{n}.{k}" for n in soaklab.lab.node_names for k in ("rss_mb", "fds", "threads")),
            "mounts", "netns", "cgroups", "runc", "sessions"]
    print(f"\nsoak: {N} teleports of a cnvm dirtying 16 MiB, one client connection\n"
          + table(rows, cols))
    warmup = max(2, N // 5)
    gauges = {k: [s[k] for s in samples] for k in samples[0]
              if k.endswith((".rss_mb", ".fds", ".threads"))}
    # the cnvm lives on one node: its netns and mounts, one container, its cgroups
    exact = {k: [s[k] for s in samples] for k in ("mounts", "netns", "cgroups", "runc",
                                                    "sessions")}
    # (one cgroup per hierarchy: 1 on cgroup v2, one per controller on v1)
    assert samples[warmup]["cgroups"] >= 1
    expect = {"runc": 1, "sessions": 0, "cgroups": samples[warmup]["cgroups"],
              "netns": samples[warmup]["netns"], "mounts": samples[warmup]["mounts"]}
    slack = {k: 2.0 for k in gauges if k.endswith((".threads", ".fds"))}
    problems = check_flat(gauges, exact, expect, warmup=warmup, slack=slack)
    assert not problems, "\n".join(problems)
