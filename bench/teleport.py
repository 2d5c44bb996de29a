"""Teleport bench (issues 7, 13): client-seen stall, frozen time, total time and bytes
on the wire per mode and size, and the median of every step of the frozen window
("where the frozen time went"), for a cnvm with MEM MiB resident that keeps dirtying
memory (MEM 0: a plain busybox cnvm) while a client on the client host sends a
request every 10 ms over one TCP connection.

Modes here: postcopy, stop-copy (streamed pages over the peer SSH channel), and the
seed's method in the same run (`seed`: dump everything to a directory, copy the
directory to the target — here over the same peer channel instead of scp — then
restore). precopy/hybrid need soft-dirty tracking, absent on these hosts (they run
in the VM lab). Root only; builds its own lab (`tb`) and removes it. Not a test.

    .venv/bin/python bench/teleport.py [--mem 0,256] [--dirty 16] [--rounds 10]
        [--modes postcopy,stop-copy,seed] [--json] [--out bench/results/teleport.md]

Run it on a quiet machine (nothing else timing or building): medians of >= 10 hops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) >> 20
    except (OSError, StopIteration):
        pass

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
        except OSError:
            return "?"
        return out.splitlines()[0] if out else "?"

    return {"cpu": f"{os.cpu_count()} x {cpu}", "memory": f"{mem} GiB",
            "kernel": platform.release(), "python": platform.python_version(),
            "runc": version(["runc", "--version"]),
            "criu": version(["/opt/cnvm/bin/criu", "--version"]) if Path(
                "/opt/cnvm/bin/criu").exists() else version(["criu", "--version"])}


def step_medians(rows: list[dict[str, Any]]) -> list[tuple[str, str, float, float, str]]:
    """(side, step, median start ms, median ms, clock) over the rows, by start."""
    acc: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in rows:
        for x in r.get("timeline") or []:
            acc.setdefault((x["side"], x["step"], x.get("clock", "cnvmd")), []).append(
                (float(x["start_ms"]), float(x["ms"])))
    out = [(side, step, statistics.median(a for a, _ in v), statistics.median(b for _, b in v),
            clock) for (side, step, clock), v in acc.items()]
    return sorted(out, key=lambda t: (t[2], t[4] != "cnvmd"))


def report(rows: list[dict[str, Any]], sizes: dict[int, int], modes: list[str],
           dirty: int, info: dict[str, str]) -> str:
    out = [f"# Teleport bench — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
           "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
           f"A cnvm dirtying {dirty} MiB/s (size 0: plain busybox, no dirtier); a client on "
           "the client host sends a request every 10 ms on one TCP connection. Stall: the "
           "longest gap between the client's replies around the hop. Frozen: from the "
           "freeze to the target's answer.", "",
           "| size | mode | hops | stall ms (median, min-max) | frozen ms (median, min-max) "
           "| total s | wire MB |", "|---|---|---|---|---|---|---|"]
    for size, resident in sizes.items():
        for mode in modes:
            mine = [r for r in rows if r["mode"] == mode and r["size"] == size]
            if not mine:
                continue
            st = [r["stall_ms"] for r in mine]
            fr = [r["frozen_ms"] for r in mine]
            out.append(f"| {resident / 2**20:.0f} MiB | {mode} | {len(mine)} | "
                       f"{statistics.median(st):.0f} ({min(st)}-{max(st)}) | "
                       f"{statistics.median(fr):.0f} ({min(fr)}-{max(fr)}) | "
                       f"{statistics.median(r['total_s'] for r in mine):.2f} | "
                       f"{statistics.median(r['wire_mb'] for r in mine):.1f} |")
    for size, resident in sizes.items():
        for mode in modes:
            mine = [r for r in rows if r["mode"] == mode and r["size"] == size]
            steps = step_medians(mine)
            if not steps:
                continue
            out += ["", f"## Where the frozen time went: {resident / 2**20:.0f} MiB, {mode} "
                    f"(medians of {len(mine)} hops)", "",
                    "| side | step | starts at ms | takes ms |", "|---|---|---|---|"]
            for side, step, start, ms, clock in steps:
                name = f"&nbsp;&nbsp;{step}" if clock == "criu" else step
                out.append(f"| {side} | {name} | {start:.1f} | {ms:.1f} |")
    return "\n".join(out) + "\n"


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mem", default="0,256",
                    help="MiB resident, comma-separated sizes (0: plain busybox; default 0,256)")
    ap.add_argument("--dirty", type=int, default=16, help="MiB/s dirtied (default 16)")
    ap.add_argument("--rounds", type=int, default=10, help="teleports per mode (default 10)")
    ap.add_argument("--modes", default="postcopy,stop-copy,seed")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    a = ap.parse_args()
    modes = a.modes.split(",")
    rows: list[dict[str, Any]] = []
    sizes: dict[int, int] = {}
    for size in (int(x) for x in a.mem.split(",")):
        sizes[size] = await one_size(size, a.dirty, a.rounds, modes, rows)
    if a.json:
        print(json.dumps({"sizes": sizes, "rows": rows}, indent=2))
        return
    text = report(rows, sizes, modes, a.dirty, machine())
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


async def one_size(size: int, dirty: int, rounds: int, modes: list[str],
                   rows: list[dict[str, Any]]) -> int:
    """A lab, one cnvm of `size` MiB (0: no dirtier), `rounds` hops per mode; returns
    the cnvm's resident bytes. Rows are appended as hops finish."""
    tmp = Path(tempfile.mkdtemp(prefix="cnvm-bench-"))
    tl = TeleLab("tb", 2)
    try:
        await tl.up(tmp)
        await tl.deploy(NAME, IP, memory=f"{size + 256}M")
        if size:
            hog = build_hog(tmp)
            upper = labpaths.node_state_dir("tb", "node1") / "cnvms" / NAME / "upper"
            shutil.copy2(hog, upper / "hog")
            await tl.call("node1", "exec", {"name": NAME, "cmd": [
                "sh", "-c", f"/hog {size} {dirty} </dev/null >/dev/null 2>&1 &"]})
            for _ in range(100):
                if await rss_of(tl, "node1") >= size << 20:
                    break
                await asyncio.sleep(0.2)
        resident = await rss_of(tl, "node1")
        c = await tl.client(IP, interval=0.01)
        await c.wait_more(50)
        where = "node1"
        for mode in modes:
            for _ in range(rounds):
                dst = "node2" if where == "node1" else "node1"
                args: dict[str, Any] = {"name": NAME, "target": dst,
                                        "mode": "stop-copy" if mode == "seed" else mode}
                if mode == "seed":
                    args["baseline"] = True
                t0 = time.monotonic()
                rep = await tl.call(where, "teleport", args, timeout=600)
                await c.wait_more(50, timeout=120)
                stall = c.max_stall(t0 - 0.05)
                rows.append({"size": size, "mode": mode, "from": where, "to": dst,
                             "stall_ms": round(stall * 1000),
                             "frozen_ms": round(rep["frozen_seconds"] * 1000),
                             "total_s": round(rep["total_seconds"], 2),
                             "wire_mb": round(rep["wire_bytes"] / 1e6, 1),
                             "timeline": rep.get("timeline", []),
                             "phases": rep.get("phases", {})})
                print(f"{size} MiB {mode} {where}->{dst}: stall {rows[-1]['stall_ms']} ms, "
                      f"frozen {rows[-1]['frozen_ms']} ms", file=sys.stderr, flush=True)
                where = dst
        c.check_sequence()
        return resident
    finally:
        await tl.down()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
