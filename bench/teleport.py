"""Teleport bench (issue 7): client-seen stall, frozen time, total time and bytes on the
wire per mode, for a cnvm with MEM MiB resident that keeps dirtying memory while a
client on the client host sends a request every 10 ms over one TCP connection.

Modes here: postcopy, stop-copy (streamed pages over the peer SSH channel), and the
seed's method in the same run (`seed`: dump everything to a directory, copy the
directory to the target — here over the same peer channel instead of scp — then
restore). precopy/hybrid need soft-dirty tracking, absent on these hosts (they run
in the VM lab). Root only; builds its own lab (`tb`) and removes it. Not a test.

    .venv/bin/python bench/teleport.py [--mem 256] [--dirty 16] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnvmlab import paths as labpaths  # noqa: E402
from tests.teleportlab import TeleLab  # noqa: E402

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
NAME = "hog"
IP = "10.100.101.31"


def build_hog(tmp: Path) -> Path:
    src, out = tmp / "hog.c", tmp / "hog"
    src.write_text(HOG)
    subprocess.run(["gcc", "-static", "-O2", str(src), "-o", str(out)], check=True)
    return out


async def rss_of(tl: TeleLab, node: str) -> int:
    res = await tl.call(node, "exec", {"name": NAME, "cmd": ["sh", "-c",
                                        "cat /proc/[0-9]*/status 2>/dev/null | grep VmRSS"]})
    return sum(int(ln.split()[1]) * 1024 for ln in res["stdout"].splitlines() if ln.strip())


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", type=int, default=256, help="MiB resident (default 256)")
    ap.add_argument("--dirty", type=int, default=16, help="MiB/s dirtied (default 16)")
    ap.add_argument("--rounds", type=int, default=2, help="teleports per mode (default 2)")
    ap.add_argument("--modes", default="postcopy,stop-copy,seed")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cnvm-bench-"))
    tl = TeleLab("tb", 2)
    rows: list[dict[str, Any]] = []
    try:
        hog = build_hog(tmp)
        await tl.up(tmp)
        await tl.deploy(NAME, IP, memory=f"{a.mem + 256}M")
        upper = labpaths.node_state_dir("tb", "node1") / "cnvms" / NAME / "upper"
        shutil.copy2(hog, upper / "hog")
        await tl.call("node1", "exec", {"name": NAME, "cmd": [
            "sh", "-c", f"/hog {a.mem} {a.dirty} </dev/null >/dev/null 2>&1 &"]})
        for _ in range(100):
            if await rss_of(tl, "node1") >= a.mem << 20:
                break
            await asyncio.sleep(0.2)
        resident = await rss_of(tl, "node1")
        c = await tl.client(IP, interval=0.01)
        await c.wait_more(50)
        where = "node1"
        for mode in a.modes.split(","):
            for _ in range(a.rounds):
                dst = "node2" if where == "node1" else "node1"
                args: dict[str, Any] = {"name": NAME, "target": dst,
                                        "mode": "stop-copy" if mode == "seed" else mode}
                if mode == "seed":
                    args["baseline"] = True
                t0 = time.monotonic()
                rep = await tl.call(where, "teleport", args, timeout=600)
                await c.wait_more(50, timeout=120)
                stall = c.max_stall(t0 - 0.05)
                rows.append({"mode": mode, "from": where, "to": dst,
                             "stall_ms": round(stall * 1000),
                             "frozen_ms": round(rep["frozen_seconds"] * 1000),
                             "total_s": round(rep["total_seconds"], 2),
                             "wire_mb": round(rep["wire_bytes"] / 1e6, 1),
                             "phases": rep.get("phases", {})})
                where = dst
        c.check_sequence()
    finally:
        await tl.down()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps({"resident_bytes": resident, "rows": rows}, indent=2))
        return
    print(f"\nteleport bench: cnvm with {resident / 2**20:.0f} MiB resident, dirtying "
          f"{a.dirty} MiB/s; client request every 10 ms on one TCP connection\n")
    print(f"{'mode':<10} {'hop':<14} {'stall ms':>9} {'frozen ms':>10} {'total s':>8} "
          f"{'wire MB':>8}")
    for r in rows:
        print(f"{r['mode']:<10} {r['from'] + '->' + r['to']:<14} {r['stall_ms']:>9} "
              f"{r['frozen_ms']:>10} {r['total_s']:>8} {r['wire_mb']:>8}")
    print()
    for mode in a.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            print(f"{mode:<10} median stall {statistics.median(r['stall_ms'] for r in mine):.0f}"
                  f" ms, median frozen {statistics.median(r['frozen_ms'] for r in mine):.0f} ms")
    print("\ngoal: stall <= 300 ms in the best mode; stop-and-copy grows with memory")


if __name__ == "__main__":
    asyncio.run(main())
