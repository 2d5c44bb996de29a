"""API round-trip latency of cnvmd: p50/p99 per op and client (goal: p99 <= 1 ms).

Starts a throw-away cnvmd on temp paths (or uses --socket PATH) and measures, after
a warm-up, sequential request→response times with:
  - the project's asyncio client (proto.client, on uvloop) — what cnvmctl and peers use;
  - a blocking raw-socket client (struct + msgpack) — the floor a script can reach;
plus pipelined throughput (64 requests in flight). Prints a table; not a test.

    .venv/bin/python bench/api_latency.py [-n 10000] [--socket PATH] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proto.client import Client  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def row(name: str, client: str, samples: list[float], total_s: float | None = None
        ) -> dict[str, Any]:
    us = [x * 1e6 for x in samples]
    return {"op": name, "client": client, "n": len(us), "p50_us": pct(us, 50),
            "p90_us": pct(us, 90), "p99_us": pct(us, 99), "max_us": max(us),
            "mean_us": statistics.fmean(us),
            "req_per_s": len(us) / (total_s if total_s else sum(samples))}


async def async_client(sock: Path, op: str, n: int, args: dict[str, Any] | None = None
                       ) -> list[float]:
    async with await Client.connect(sock, agent="bench") as c:
        for _ in range(min(500, n)):
            await c.call(op, args)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await c.call(op, args)
            out.append(time.perf_counter() - t0)
        return out


async def pipelined(sock: Path, n: int, depth: int = 64) -> tuple[list[float], float]:
    async with await Client.connect(sock, agent="bench") as c:
        lat: list[float] = []
        sem = asyncio.Semaphore(depth)

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                await c.call("ping")
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return lat, time.perf_counter() - t0


def raw_client(sock: Path, op: str, n: int) -> list[float]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))

    def send(obj: dict[str, Any]) -> None:
        b = msgpack.packb(obj)
        s.sendall(struct.pack(">I", len(b)) + b)

    def recv() -> dict[str, Any]:
        def exact(k: int) -> bytes:
            buf = b""
            while len(buf) < k:
                chunk = s.recv(k - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf

        (k,) = struct.unpack(">I", exact(4))
        return msgpack.unpackb(exact(k))

    send({"t": "hello", "proto": 1, "agent": "bench-raw"})
    recv()
    out = []
    for i in range(n + min(500, n)):
        t0 = time.perf_counter()
        send({"t": "req", "id": i, "op": op, "args": {}})
        recv()
        if i >= min(500, n):
            out.append(time.perf_counter() - t0)
    s.close()
    return out


def start_daemon(tmp: Path, cpu: int | None) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "cnvmd.sock"
    cfg = tmp / "cnvmd.toml"
    cfg.write_text('listen_address = "127.0.0.1"\npeer_port = 0\nlog_level = "warning"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    p = subprocess.Popen([*pin, sys.executable, "-m", "cnvmd", "--config", str(cfg), "--socket",
                          str(sock), "--state-dir", str(tmp / "state"), "--run-dir",
                          str(tmp / "run"), "--runc-root", str(tmp / "run" / "runc"),
                          "--node-name", "bench"], env=env, stdin=subprocess.DEVNULL,
                         stderr=open(tmp / "cnvmd.log", "wb"))
    for _ in range(300):
        if sock.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                break
            except OSError:
                pass
        if p.poll() is not None:
            raise SystemExit(f"cnvmd exited: {(tmp / 'cnvmd.log').read_text()}")
        time.sleep(0.05)
    return p, sock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10000, help="requests per measurement")
    ap.add_argument("--socket", type=Path, help="bench an already running daemon")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--pin", action="store_true",
                    help="pin the daemon to CPU 1 and this client to CPU 0 (less jitter)")
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    pin = a.pin and len(cpus) >= 2
    if pin:
        os.sched_setaffinity(0, {cpus[0]})

    import uvloop

    tmp = Path(tempfile.mkdtemp(prefix="cnvm-bench-"))
    proc = None
    try:
        if a.socket:
            sock = a.socket
        else:
            proc, sock = start_daemon(tmp, cpus[1] if pin else None)
        rows = [
            row("ping", "asyncio client", uvloop.run(async_client(sock, "ping", a.n))),
            row("ping", "raw socket", raw_client(sock, "ping", a.n)),
            row("status", "asyncio client", uvloop.run(async_client(sock, "status", a.n))),
        ]
        lat, total = uvloop.run(pipelined(sock, a.n))
        rows.append(row("ping", "pipelined x64", lat, total))
        n_ls = max(20, a.n // 50)
        rows.append(row("ls (runs runc list)", "asyncio client",
                        uvloop.run(async_client(sock, "ls", n_ls))))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)

    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = ["op", "client", "n", "p50 µs", "p90 µs", "p99 µs", "max µs", "req/s"]
    table = [head] + [[r["op"], r["client"], str(r["n"]), f"{r['p50_us']:.0f}",
                       f"{r['p90_us']:.0f}", f"{r['p99_us']:.0f}", f"{r['max_us']:.0f}",
                       f"{r['req_per_s']:.0f}"] for r in rows]
    w = [max(len(t[i]) for t in table) for i in range(len(head))]
    for i, t in enumerate(table):
        print("  ".join(c.ljust(w[j]) if j < 2 else c.rjust(w[j]) for j, c in enumerate(t)))
        if i == 0:
            print("  ".join("-" * x for x in w))
    seq = [r for r in rows if r["op"] == "ping" and "pipelined" not in r["client"]]
    worst = max(r["p99_us"] for r in seq)
    print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
          f"{', pinned' if pin else ''}")
    print(f"goal p99 <= 1000 µs for a sequential request round trip: "
          f"{'met' if worst <= 1000 else 'NOT met'} (worst p99 {worst:.0f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
