"""`cnvmctl teleport NAME NODE`: live-migrate a running cnvm (daemon side:
cnvmd/migration). Also `teleport --cancel NAME` and `teleports NAME`."""

from __future__ import annotations

import argparse
from typing import Any

from cnvmctl.context import CliError, Ctx
from cnvmctl.output import print_kv, print_table, size
from cnvmctl.registry import arg, command
from proto.messages import ProtoError

MODES = ["auto", "postcopy", "stop-copy", "precopy", "hybrid"]


def _ms(s: Any) -> str:
    return f"{s * 1000:.0f} ms" if isinstance(s, int | float) else "-"


def render_report(r: dict[str, Any]) -> None:
    ok = "ok" if r.get("ok") else ("rolled back" if r.get("rolled_back") else "FAILED")
    print_kv([
        ("teleport", f"{r.get('cnvm')}: {r.get('source')} -> {r.get('target')} ({ok})"),
        ("mode", f"{r.get('mode') or '-'} ({r.get('mode_reason') or '-'})"),
        ("frozen", _ms(r.get("frozen_seconds"))),
        ("total", f"{r.get('total_seconds', 0):.2f} s"),
        ("on the wire", size(r.get("wire_bytes"))),
        *([("error", r["error"])] if r.get("error") else []),
    ])
    rounds = r.get("rounds") or []
    if rounds:
        print_table([{**x, "ms": _ms(x.get("seconds"))} for x in rounds],
                    [("ROUND", "kind"), ("BYTES", "bytes"), ("TIME", "ms")],
                    {"bytes": size})
    render_timeline(r)


def render_timeline(r: dict[str, Any], width: int = 30) -> None:
    """"Where the frozen time went": every step of the frozen window, on both sides,
    as offset, duration and a bar on the frozen window's scale. CRIU's own stages
    (read from its log) are indented under the step that ran CRIU."""
    steps = [x for x in r.get("timeline") or [] if isinstance(x, dict)]
    frozen = float(r.get("frozen_seconds") or 0) * 1000
    if not steps or frozen <= 0:
        return
    print(f"where the frozen time went ({frozen:.0f} ms):")
    for x in sorted(steps, key=lambda x: (float(x.get("start_ms", 0)), x.get("clock") != "cnvmd")):
        start, ms = float(x.get("start_ms", 0)), float(x.get("ms", 0))
        a = max(0, min(width, round(start / frozen * width)))
        b = max(a + (1 if ms > 0 else 0), min(width, round((start + ms) / frozen * width)))
        bar = " " * a + "#" * (b - a)
        indent = "    " if x.get("clock") == "criu" else "  "
        print(f"{indent}{x.get('side', ''):<6} {str(x.get('step', ''))[:52]:<52} "
              f"{start:7.1f} +{ms:7.1f} ms |{bar:<{width}}|")


@command("teleport", help="move a running cnvm to another node, live",
         description="Teleport cnvm NAME to node NODE: memory, processes, open TCP connections, "
                     "IP and file\nchanges move; clients see a short stall. The source keeps "
                     "the cnvm until the target\nreports a successful restore; any failure "
                     "before that resumes it where it was.\n\n"
                     "Modes: auto (default: the best both nodes support, and why), postcopy "
                     "(lazy pages),\nstop-copy (always available), precopy / hybrid (need "
                     "kernel dirty-page tracking).",
         epilog="Any member may be asked: the node running NAME carries it out.\n"
                "--json prints the report: mode, mode_reason, rounds, frozen_seconds, "
                "total_seconds,\nwire_bytes, phases. `cnvmctl teleports NAME` lists the kept "
                "reports.",
         args=[arg("name", metavar="NAME", help="the cnvm (or, with --cancel, its name)"),
               arg("target", metavar="NODE", nargs="?",
                   help="target node, or auto (free memory vs the cnvm's limit, spread, "
                        "never a cordoned node)"),
               arg("--mode", choices=MODES, default="auto"),
               arg("--max-downtime", type=float, default=0.3, metavar="SECONDS",
                   help="pre-copy switches over when the rest fits this (default 0.3)"),
               arg("--cancel", action="store_true",
                   help="cancel the teleport of NAME in flight (asked of any member)")])
async def teleport(ctx: Ctx, a: argparse.Namespace) -> int | None:
    if a.cancel:
        res = await ctx.call("teleport.cancel", {"name": a.name})
        ctx.output(res, lambda r: print(f"cancelled the teleport of {r['name']} "
                                        f"(in phase {r['phase']}); "
                                        + ("it runs on where it was" if r.get("rolled_back")
                                           else "see the daemon log")))
        return None
    if not a.target:
        raise CliError("teleport needs a target NODE (or --cancel NAME)", code=2)
    args = {"name": a.name, "target": a.target, "mode": a.mode,
            "max_downtime": a.max_downtime}
    try:
        with ctx.progress(f"teleport {a.name} -> {a.target}") as p:
            report = await ctx.call("teleport", args, on_event=p.on_event)
    except ProtoError as exc:
        rep = (exc.details or {}).get("report") if isinstance(exc.details, dict) else None
        if rep and ctx.json:
            ctx.print_json(rep)
        raise
    ctx.output(report, render_report)
    return None


@command("teleports", help="show the kept teleport reports of a cnvm",
         description="The last 10 teleports of cnvm NAME as this node keeps them: the source "
                     "and the target\nboth keep an entry (the target's history travels "
                     "with the cnvm). WIRE counts every byte\nmoved, with the memory pages a "
                     "postcopy target fetched after the switchover. A failed\nor rolled-back "
                     "teleport's reason follows the table; --json has the full reports\n"
                     "(rounds, phases, timeline).",
         epilog="example: cnvmctl teleports web   (on either node)",
         args=[arg("name", metavar="NAME")])
async def teleports(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("teleport.reports", {"name": a.name})

    def human(r: dict[str, Any]) -> None:
        rows = [{"when": x.get("started_at"), "from": x.get("source"), "to": x.get("target"),
                 "mode": x.get("mode"), "frozen": _ms(x.get("frozen_seconds")),
                 "total": f"{x.get('total_seconds', 0):.2f} s",
                 "wire": size(x.get("wire_bytes")),
                 "ok": "ok" if x.get("ok") else "rolled back" if x.get("rolled_back")
                 else "failed"} for x in r["reports"]]
        import datetime

        for row in rows:
            if isinstance(row["when"], int | float):
                row["when"] = datetime.datetime.fromtimestamp(
                    row["when"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        print_table(rows, [("WHEN (UTC)", "when"), ("FROM", "from"), ("TO", "to"),
                           ("MODE", "mode"), ("FROZEN", "frozen"), ("TOTAL", "total"),
                           ("WIRE", "wire"), ("RESULT", "ok")])
        for row, x in zip(rows, r["reports"], strict=True):
            if x.get("error"):
                print(f"{row['when']} {row['ok']}: {x['error']}")

    ctx.output(res, human)
