"""Teleport bench (issues 7, 13, 16): how a teleport's cost grows with the cnvm.

For a cnvm with MEM MiB resident that keeps dirtying DIRTY MiB/s while a client on
the client host sends a request every 10 ms over one TCP connection, per mode: the
client-seen stall, the frozen time, the total time, the time until every page is
on the target (post-copy), the client's request latency p50/p99 while pages still
arrive, bytes on the wire / resident bytes, throughput, and the CPU seconds of
cnvmd itself and of its children (runc, CRIU) on both nodes; with `--timeline`, the
median of every step of the frozen window ("where the frozen time went").

Modes: postcopy and stop-copy (cnvmd, pages over the peer SSH channels); `seed`, the
seed's method for real (bench/seedscp.py: `runc checkpoint` to a directory, OpenSSH
`scp -c aes128-gcm` to an sshd in the target host's namespace, `runc restore`; a
plain runc container outside cnvmd with the same image and dirtier); `seed-chan`,
cnvmd's own dump-copy-restore baseline over its peer channel. precopy/hybrid need
soft-dirty tracking, absent on these hosts: the VM lab reports them.

The underlay can be shaped (`--shape 1gbit`: tc TBF on each node's underlay link;
netem does not exist on these kernels); the shaping goes with the lab.

    .venv/bin/python bench/teleport.py --preset quick        # a couple of minutes
    .venv/bin/python bench/teleport.py --preset full         # the matrix (about an hour)
    .venv/bin/python bench/teleport.py --preset freeze       # issue 13: small + 256 MiB
    .venv/bin/python bench/teleport.py --mem 64,256 --dirty 10 --shape none,1gbit \\
        --modes postcopy,stop-copy,seed --rounds 3 --out bench/results/mine

Writes DIR/README.md (tables), DIR/rows.json and PNG plots (matplotlib) into the
`--out` directory. Root only; builds its own lab (`tb`) and removes it. Not a test:
run it on a quiet machine (nothing else timing or building).
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
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
/* MB resident, filled with pseudo-random bytes (zero pages would flatter a transfer
   that skips them), then RATE MiB/s dirtied: one word per page, page after page. */
int main(int argc, char **argv) {
    size_t mb = strtoul(argv[1], 0, 10), rate = strtoul(argv[2], 0, 10);
    size_t n = mb << 20, pages = n / 4096, i = 0;
    size_t per_ms = rate ? (rate << 20) / 4096 / 1000 + 1 : 0;
    uint64_t *p = malloc(n), x = 88172645463325252ull;
    for (size_t k = 0; k < n / 8; k++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[k] = x; }
    for (;;) {
        for (size_t k = 0; k < per_ms; k++, i++) p[(i % pages) * 512] ^= 1;
        usleep(1000);
    }
}
"""
NAME = "hog"
IP = "10.100.101.31"
SEED_IP = "10.100.101.32"
CNVM_MODES = ("postcopy", "stop-copy", "seed-chan")
ALL_MODES = (*CNVM_MODES, "seed")
SHAPES = {"none": None, "1gbit": 1_000_000_000, "100mbit": 100_000_000}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"mem": [64], "dirty": [10], "shape": ["none", "1gbit"],
              "modes": ["postcopy", "stop-copy", "seed"], "rounds": 2, "timeline": False},
    "full": {"mem": [64, 256, 1024], "dirty": [0, 10, 100], "shape": ["none", "1gbit"],
             "modes": ["postcopy", "stop-copy", "seed"], "rounds": 2, "timeline": False},
    "freeze": {"mem": [0, 256], "dirty": [16], "shape": ["none"],
               "modes": ["postcopy", "stop-copy", "seed"], "rounds": 10, "timeline": True},
}


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
                "/opt/cnvm/bin/criu").exists() else version(["criu", "--version"]),
            "openssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                      text=True).stderr.strip()}


# ---------------------------------------------------------------- measuring


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process itself, its reaped children: runc, CRIU, relays) in CPU seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return (0.0, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    return ((ut + st) / tick, (cut + cst) / tick)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def after_stall(replies: list[tuple[float, int, float]], since: float,
                until: float) -> tuple[float, list[tuple[float, float]]]:
    """End of the longest reply gap after `since`, and the (time after it, round trip)
    of every reply from there to `until`: the client's view while pages still arrive."""
    r = [x for x in replies if x[0] >= since]
    if len(r) < 2:
        return since, []
    k = max(range(1, len(r)), key=lambda i: r[i][0] - r[i - 1][0])
    t_end = r[k][0]
    return t_end, [(t - t_end, rtt) for t, _, rtt in r[k + 1:] if t <= until]


async def shape(tl: TeleLab, rate: int | None) -> None:
    """Each node's underlay egress limited to `rate` bit/s (TBF; burst for HZ 250).
    The qdisc lives on the lab's links and goes with the lab."""
    if not rate:
        return
    from cnvmd import proc

    burst = max(rate // 8 // 250 * 2, 64 * 1024)
    for n in tl.lab.node_names:
        await proc.run(["tc", "qdisc", "replace", "dev", "ul0", "root", "tbf", "rate",
                        f"{rate}bit", "burst", str(burst), "latency", "20ms"],
                       netns=tl.lab.netns(n))


# ---------------------------------------------------------------- one lab per cell


async def one_cell(size: int, dirty: int, shape_name: str, rounds: int, modes: list[str],
                   rows: list[dict[str, Any]]) -> None:
    """A lab, a cnvm of `size` MiB (0: no dirtier) dirtying `dirty` MiB/s, on an
    underlay shaped to `shape_name`; `rounds` hops per mode. Rows appended as hops end."""
    tmp = Path(tempfile.mkdtemp(prefix="cnvm-bench-"))
    tl = TeleLab("tb", 2)
    cell = {"size": size, "dirty": dirty, "shape": shape_name}
    try:
        await tl.up(tmp)
        await shape(tl, SHAPES[shape_name])
        hog = build_hog(tmp) if size else None
        cmodes = [m for m in modes if m in CNVM_MODES]
        if cmodes:
            await cnvm_hops(tl, tmp, hog, cell, rounds, cmodes, rows)
        if "seed" in modes:
            await seed_hops(tl, tmp, hog, cell, rounds, rows)
    finally:
        await tl.down()
        shutil.rmtree(tmp, ignore_errors=True)


def _log(row: dict[str, Any]) -> None:
    print(f"{row['size']} MiB dirty {row['dirty']} {row['shape']} {row['mode']} "
          f"{row['from']}->{row['to']}: stall {row['stall_ms']} ms, frozen "
          f"{row['frozen_ms']} ms, total {row['total_s']} s", file=sys.stderr, flush=True)


async def cnvm_hops(tl: TeleLab, tmp: Path, hog: Path | None, cell: dict[str, Any],
                    rounds: int, modes: list[str], rows: list[dict[str, Any]]) -> None:
    size, dirty = cell["size"], cell["dirty"]
    await tl.deploy(NAME, IP, memory=f"{size + 256}M")
    if hog is not None:
        upper = labpaths.node_state_dir("tb", "node1") / "cnvms" / NAME / "upper"
        shutil.copy2(hog, upper / "hog")
        await tl.call("node1", "exec", {"name": NAME, "cmd": [
            "sh", "-c", f"/hog {size} {dirty} </dev/null >/dev/null 2>&1 &"]})
        for _ in range(300):
            if await rss_of(tl, "node1") >= size << 20:
                break
            await asyncio.sleep(0.2)
    resident = await rss_of(tl, "node1")
    c = await tl.client(IP, interval=0.01)
    await c.wait_more(50)
    where = "node1"
    pids = {n: p.pid for n, p in tl.daemons.items()}
    for mode in modes:
        for _ in range(rounds):
            dst = "node2" if where == "node1" else "node1"
            args: dict[str, Any] = {"name": NAME, "target": dst,
                                    "mode": "stop-copy" if mode == "seed-chan" else mode}
            if mode == "seed-chan":
                args["baseline"] = True
            cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
            t0 = time.monotonic()
            rep = await tl.call(where, "teleport", args, timeout=900)
            t_end = time.monotonic()
            cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
            await c.wait_more(50, timeout=120)
            _, lat = after_stall(c.replies, t0 - 0.05, t_end) if mode == "postcopy" \
                else (0.0, [])
            rtts = [rtt * 1000 for _, rtt in lat]
            wire = int(rep["wire_bytes"])
            row = {**cell, "resident": resident, "mode": mode, "from": where, "to": dst,
                   "stall_ms": round(c.max_stall(t0 - 0.05) * 1000),
                   "frozen_ms": round(rep["frozen_seconds"] * 1000),
                   "total_s": round(rep["total_seconds"], 3),
                   "pages_s": rep.get("phases", {}).get("pages_after_restore"),
                   "lat_p50_ms": round(percentile(rtts, 0.5), 2),
                   "lat_p99_ms": round(percentile(rtts, 0.99), 2),
                   "wire_bytes": wire,
                   "cpu": {f"{'src' if n == where else 'dst'}_{k}": round(cpu1[n][i] -
                                                                         cpu0[n][i], 2)
                           for n in pids for i, k in enumerate(("cnvmd", "children"))},
                   "timeline": rep.get("timeline", []),
                   "lat_series": [(round(t, 4), round(r * 1000, 2)) for t, r in lat]
                   if mode == "postcopy" else []}
            rows.append(row)
            _log(row)
            where = dst
    c.check_sequence()
    await c.close()
    await tl.call(where, "rm", {"name": NAME, "force": True})


async def seed_hops(tl: TeleLab, tmp: Path, hog: Path | None, cell: dict[str, Any],
                    rounds: int, rows: list[dict[str, Any]]) -> None:
    from bench.seedscp import SeedLab

    size, dirty = cell["size"], cell["dirty"]
    for n in tl.lab.node_names:
        await tl.call(n, "net.up")
    await tl.call("node1", "net.allocate", {"name": "seed-bench", "ip": SEED_IP})
    sl = SeedLab(tl.lab, tmp, SEED_IP)
    try:
        await sl.up(hog, (size + 256) << 20)
        if hog is not None:
            await sl.start_dirtier(size, dirty)
            for _ in range(300):
                if await sl.resident() >= size << 20:
                    break
                await asyncio.sleep(0.2)
        resident = await sl.resident()
        c = await tl.client(SEED_IP, interval=0.01)
        await c.wait_more(50)
        for _ in range(rounds):
            where = sl.where
            t0 = time.monotonic()
            h = await sl.hop()
            t_end = time.monotonic()
            await c.wait_more(50, timeout=120)
            row = {**cell, "resident": resident, "mode": "seed", "from": where, "to": sl.where,
                   "stall_ms": round(c.max_stall(t0 - 0.05) * 1000),
                   "frozen_ms": round(h.frozen_ms), "total_s": round(t_end - t0, 3),
                   "pages_s": None, "lat_p50_ms": None, "lat_p99_ms": None,
                   "wire_bytes": h.bytes, "cpu": {}, "timeline": h.steps, "lat_series": []}
            rows.append(row)
            _log(row)
        c.check_sequence()
        await c.close()
    finally:
        await sl.down()


# ---------------------------------------------------------------- output


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


def _med(xs: list[float | None], fmt: str = "{:.0f}", spread: bool = False) -> str:
    v = [x for x in xs if x is not None and x == x]
    if not v:
        return "-"
    m = fmt.format(statistics.median(v))
    if spread and len(v) > 1:
        m += f" ({fmt.format(min(v))}-{fmt.format(max(v))})"
    return m


def cells_of(rows: list[dict[str, Any]]) -> list[tuple[int, int, str, str]]:
    seen: list[tuple[int, int, str, str]] = []
    for r in rows:
        k = (r["size"], r["dirty"], r["shape"], r["mode"])
        if k not in seen:
            seen.append(k)
    return seen


def report(rows: list[dict[str, Any]], info: dict[str, str], *, timeline: bool,
           plots: list[str]) -> str:
    out = [f"# Teleport bench — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
           "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
           "A cnvm of MEM MiB resident (filled with non-zero data) dirtying DIRTY MiB/s "
           "(size 0: plain busybox, no dirtier); a client on the client host sends a "
           "request every 10 ms over one TCP connection. **stall**: the longest gap between "
           "the client's replies around the hop; **frozen**: from the freeze to the "
           "target's answer (seed: `runc checkpoint` start to the GARP after `runc "
           "restore`); **total**: the whole teleport (post-copy: until the last page is "
           "on the target); **pages**: post-copy, seconds from the switchover until every "
           "page is on the target; **p50/p99**: the client's request round trip from the "
           "stall's end until then; **wire/res**: bytes on the wire / resident bytes; "
           "**MB/s**: bytes on the wire / total; **CPU s**: cnvmd itself and its children "
           "(runc, CRIU, relays) on source/target. Medians (min-max) of the hops.", "",
           "| resident | dirty MiB/s | link | mode | hops | stall ms | frozen ms | total s "
           "| pages s | p50/p99 ms | wire/res | MB/s | CPU s cnvmd src/dst | CPU s runc+CRIU "
           "src/dst |", "|" + "---|" * 14]
    for size, dirty, shp, mode in cells_of(rows):
        mine = [r for r in rows if (r["size"], r["dirty"], r["shape"], r["mode"]) ==
                (size, dirty, shp, mode)]
        res = statistics.median(r["resident"] for r in mine)
        ratio = [r["wire_bytes"] / r["resident"] for r in mine if r["resident"]]
        mbps = [r["wire_bytes"] / 1e6 / r["total_s"] for r in mine if r["total_s"]]

        def cpu(key: str, mine: list[dict[str, Any]] = mine) -> str:
            return _med([r["cpu"].get(key) for r in mine], "{:.2f}")

        out.append(
            f"| {res / 2**20:.0f} MiB | {dirty} | {shp} | {mode} | {len(mine)} | "
            f"{_med([r['stall_ms'] for r in mine], spread=True)} | "
            f"{_med([r['frozen_ms'] for r in mine], spread=True)} | "
            f"{_med([r['total_s'] for r in mine], '{:.2f}')} | "
            f"{_med([r['pages_s'] for r in mine], '{:.2f}')} | "
            f"{_med([r['lat_p50_ms'] for r in mine], '{:.1f}')}/"
            f"{_med([r['lat_p99_ms'] for r in mine], '{:.1f}')} | "
            f"{_med(ratio, '{:.3f}')} | {_med(mbps, '{:.0f}')} | "
            f"{cpu('src_cnvmd')}/{cpu('dst_cnvmd')} | {cpu('src_children')}/"
            f"{cpu('dst_children')} |")
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if timeline:
        for size, dirty, shp, mode in cells_of(rows):
            mine = [r for r in rows if (r["size"], r["dirty"], r["shape"], r["mode"]) ==
                    (size, dirty, shp, mode)]
            steps = step_medians(mine)
            if not steps:
                continue
            res = statistics.median(r["resident"] for r in mine)
            out += ["", f"## Where the frozen time went: {res / 2**20:.0f} MiB, dirty {dirty}, "
                    f"{shp}, {mode} (medians of {len(mine)} hops)", "",
                    "| side | step | starts at ms | takes ms |", "|---|---|---|---|"]
            for side, step, start, ms, clock in steps:
                name = f"&nbsp;&nbsp;{step}" if clock == "criu" else step
                out.append(f"| {side} | {name} | {start:.1f} | {ms:.1f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """stall vs resident, total vs resident (with bytes ÷ bandwidth), post-copy latency
    while pages arrive. Returns the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    written: list[str] = []
    dirties = sorted({r["dirty"] for r in rows})
    dref = 10 if 10 in dirties else dirties[len(dirties) // 2]
    series: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["dirty"] == dref:
            series.setdefault((r["mode"], r["shape"]), {}).setdefault(
                r["resident"] / 2**20, []).append(r)

    for key, ylabel, fname in (("stall_ms", "client-seen stall (ms)", "stall_vs_resident.png"),
                               ("total_s", "total time (s)", "total_vs_resident.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (mode, shp), pts in sorted(series.items()):
            xs = sorted(pts)
            ys = [statistics.median(r[key] for r in pts[x]) for x in xs]
            ax.plot(xs, ys, marker="o", label=f"{mode}, {shp}")
        if key == "total_s":
            xs = sorted({x for pts in series.values() for x in pts})
            for shp, rate in SHAPES.items():
                if rate and any(s == shp for _, s in series):
                    ax.plot(xs, [x * 2**20 * 8 / rate for x in xs], "k--", lw=1,
                            label=f"resident ÷ {shp}")
        ax.set_xlabel("resident (MiB)")
        ax.set_ylabel(ylabel)
        if key == "stall_ms":
            ax.set_yscale("log")
        ax.set_title(f"{ylabel.split(' (')[0]} vs resident, dirtying {dref} MiB/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)

    post = [r for r in rows if r["mode"] == "postcopy" and r["lat_series"]]
    if post:
        big = max(r["resident"] for r in post)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for shp in sorted({r["shape"] for r in post}):
            pick = [r for r in post if r["resident"] == big and r["shape"] == shp
                    and r["dirty"] == max(x["dirty"] for x in post)]
            if pick:
                r = pick[0]
                ax.plot([t for t, _ in r["lat_series"]], [v for _, v in r["lat_series"]],
                        lw=0.8, label=f"{shp}, dirty {r['dirty']} MiB/s")
        ax.set_xlabel("seconds after the switchover")
        ax.set_ylabel("client request round trip (ms)")
        ax.set_title(f"post-copy: client latency while {big / 2**20:.0f} MiB of pages arrive")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "postcopy_latency.png", dpi=110)
        plt.close(fig)
        written.append("postcopy_latency.png")
    return written


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="a set of the options below (default quick); options override it")
    ap.add_argument("--mem", type=_ints, help="MiB resident, comma-separated (0: busybox)")
    ap.add_argument("--dirty", type=_ints, help="MiB/s dirtied, comma-separated")
    ap.add_argument("--shape", type=lambda t: t.split(","),
                    help=f"underlay shapes, comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--modes", type=lambda t: t.split(","),
                    help=f"comma-separated: {', '.join(ALL_MODES)}")
    ap.add_argument("--rounds", type=int, help="hops per mode and cell")
    ap.add_argument("--timeline", action=argparse.BooleanOptionalAction, default=None,
                    help="per-step medians of the frozen window")
    ap.add_argument("--out", type=Path, help="results directory (README.md, rows.json, "
                    "plots); default bench/results/teleport-<preset>-<date>")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args()
    cfg = dict(PRESETS[a.preset])
    for k in ("mem", "dirty", "shape", "modes", "rounds", "timeline"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    bad = [m for m in cfg["modes"] if m not in ALL_MODES] + \
        [s for s in cfg["shape"] if s not in SHAPES]
    if bad:
        ap.error(f"unknown mode or shape: {', '.join(bad)}")
    out = a.out or REPO / "bench" / "results" / \
        f"teleport-{a.preset}-{time.strftime('%Y-%m-%d', time.gmtime())}"
    rows: list[dict[str, Any]] = []
    for size in cfg["mem"]:
        for dirty in cfg["dirty"] if size else [0]:
            for shp in cfg["shape"]:
                await one_cell(size, dirty, shp, cfg["rounds"], cfg["modes"], rows)
    if a.json:
        print(json.dumps(rows, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps({"config": cfg, "machine": machine(),
                                               "rows": rows}, indent=1))
    plots = plot(rows, out)
    text = report(rows, machine(), timeline=cfg["timeline"], plots=plots)
    (out / "README.md").write_text(text)
    if not a.json:
        print(text)
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
