"""Evacuate bench (issue 15): six busybox cnvms on node1, each with one live client
connection (a request every 10 ms), evacuated to node2 and node3 — once one at a
time (`-j 1`) and once three at a time (`-j 3`); prints the total time of each and
the per-cnvm frozen times, and checks every connection survived with its counter.

Root only; builds its own lab (`hdb`) and removes it. Not a test; run it on a quiet
machine (CRIU dumps and restores are CPU-bound: parallel teleports share cores).

    .venv/bin/python bench/evacuate.py [--cnvms 6] [--parallel 1,3] [--mode auto] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.teleportlab import TeleLab  # noqa: E402


async def one_run(tmp: Path, n: int, j: int, mode: str) -> dict[str, Any]:
    tl = TeleLab("hdb", 3)
    try:
        await tl.up(tmp)
        names = [f"hdev{i}" for i in range(n)]
        ips = {x: f"10.100.101.{60 + i}" for i, x in enumerate(names)}
        for x in names:
            await tl.deploy(x, ips[x], node="node1")
        conns = {x: await tl.client(ips[x]) for x in names}
        for c in conns.values():
            await c.wait_more(10)
        t0 = time.monotonic()
        res = await tl.call("node1", "evacuate", {"node": "node1", "parallel": j,
                                                  "mode": mode}, timeout=1800)
        total = time.monotonic() - t0
        for c in conns.values():
            await c.wait_more(10, timeout=30)
            c.check_sequence()
        return {"parallel": j, "cnvms": n, "seconds": round(total, 2),
                "moved": res["moved"], "failed": res["failed"],
                "frozen_ms": sorted(round((i["frozen"] or 0) * 1000) for i in res["items"]),
                "to": sorted(str(i["to"]) for i in res["items"]),
                "max_client_stall_ms": round(max(c.max_stall(t0) for c in conns.values())
                                             * 1000)}
    finally:
        await tl.down()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cnvms", type=int, default=6)
    ap.add_argument("--parallel", default="1,3", help="comma-separated -j values")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    runs = []
    for j in (int(x) for x in a.parallel.split(",")):
        with tempfile.TemporaryDirectory(prefix="hdb-") as tmp:
            runs.append(await one_run(Path(tmp), a.cnvms, j, a.mode))
    if a.json:
        print(json.dumps(runs, indent=2))
    else:
        for r in runs:
            print(f"evacuate {r['cnvms']} cnvms, -j {r['parallel']}: {r['seconds']:.1f} s total, "
                  f"{r['moved']} moved, {r['failed']} failed; frozen ms {r['frozen_ms']}; "
                  f"longest client stall {r['max_client_stall_ms']} ms; to {r['to']}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
