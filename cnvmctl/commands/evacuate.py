"""`cnvmctl cordon|uncordon NODE` and `cnvmctl evacuate NODE` (daemon side:
cnvmd/cluster). Any member may be asked; the cordon is the node's own."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cnvmctl.context import Ctx
from cnvmctl.output import cell, print_table, size
from cnvmctl.registry import arg, command
from proto.client import Event

MODES = ["auto", "postcopy", "stop-copy", "precopy", "hybrid"]


@command("cordon", help="stop new cnvms from landing on a node",
         description="Cordon NODE: deploy and teleport refuse it as a target (and `auto` "
                     "skips it); its\ncnvms keep running. Shown by `cnvmctl nodes`.",
         epilog="example: cnvmctl cordon node1",
         args=[arg("node", metavar="NODE")])
async def cordon(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("cordon", {"node": a.node})
    ctx.output(res, lambda r: print(f"{r['node']} cordoned ({r.get('cnvms', 0)} cnvms on it)"))


@command("uncordon", help="let new cnvms land on a node again",
         args=[arg("node", metavar="NODE")])
async def uncordon(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("uncordon", {"node": a.node})
    ctx.output(res, lambda r: print(f"{r['node']} uncordoned"))


def _ms(s: Any) -> str:
    return f"{s * 1000:.0f} ms" if isinstance(s, int | float) else "-"


def render_table(r: dict[str, Any]) -> None:
    rows = [{**i, "to": i.get("to") or "-", "frozen": _ms(i.get("frozen")),
             "result": i["result"] + (f": {i['error']}" if i.get("error") else "")}
            for i in r["items"]]
    print_table(rows, [("CNVM", "cnvm"), ("FROM", "from"), ("TO", "to"), ("MODE", "mode"),
                       ("FROZEN", "frozen"), ("BYTES", "bytes"), ("RESULT", "result")],
                {"bytes": lambda b: size(b) if isinstance(b, int) else cell(b)})
    what = "plan" if r.get("dry_run") else "moved"
    print(f"{r['node']}: {r['moved'] if not r.get('dry_run') else r['total']}/{r['total']} "
          f"{what}, {r['failed']} failed, -j {r['parallel']}, {r['seconds']:.1f} s"
          + ("" if r.get("dry_run") else "; node stays cordoned"))


class LiveView:
    """One line per cnvm and a total on stderr: redrawn in place on a terminal, else a
    line each time a cnvm's state changes."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.shown: dict[str, str] = {}
        self.tty = sys.stderr.isatty()
        self.drawn = 0

    def _total(self) -> str:
        moved = sum(1 for x in self.items.values() if x["result"] == "moved")
        failed = sum(1 for x in self.items.values() if x["result"] == "failed")
        moving = sum(1 for x in self.items.values() if x["result"] == "moving")
        return (f"total: {moved} moved, {moving} moving, {failed} failed, "
                f"{len(self.items)} cnvms")

    def _redraw(self) -> None:
        out = [f"  {i['cnvm']:<20} -> {i.get('to') or '-':<12} "
               f"{i['result']} {i.get('phase') or ''}" for i in self.items.values()]
        out.append(self._total())
        if self.drawn:
            sys.stderr.write(f"\x1b[{self.drawn}F")
        sys.stderr.write("".join(f"\x1b[2K{ln}\n" for ln in out))
        sys.stderr.flush()
        self.drawn = len(out)

    def on_event(self, ev: Event) -> None:
        if ev.name != "evacuate":
            return
        d = ev.data
        if d.get("kind") == "plan":
            for i in d.get("items", []):
                self.items[i["cnvm"]] = i
            print(f"evacuating {d.get('node')}: {d.get('total')} cnvms, -j {d.get('parallel')}",
                  file=sys.stderr)
            if self.tty:
                self._redraw()
        elif d.get("kind") == "item":
            i = d["item"]
            self.items[i["cnvm"]] = i
            if self.tty:
                self._redraw()
                return
            line = f"{i['result']} {i.get('phase') or ''}".strip()
            if self.shown.get(i["cnvm"]) != line:
                self.shown[i["cnvm"]] = line
                print(f"  {i['cnvm']:<20} -> {i.get('to') or '-':<12} {line:<28} "
                      f"[{self._total()}]", file=sys.stderr)


@command("evacuate", help="move every cnvm off a node (cordons it first)",
         description="Cordon NODE, plan a target for each of its cnvms (memory fit, spread, "
                     "never a cordoned\nor down node; only --to nodes if given), and "
                     "teleport them live, at most -j at once\n(default: from NODE's CPUs and "
                     "link speed). A cnvm that fails to move keeps running\non NODE and is "
                     "reported; the others go on. Run it again to retry what is left.\nThe "
                     "evacuation runs in the daemon: if this command dies it goes on; Ctrl-C "
                     "cancels\nthe teleports in flight (each cnvm resumes on NODE).",
         epilog="examples:\n  cnvmctl evacuate node1 --dry-run\n"
                "  cnvmctl evacuate node1 -j 3\n  cnvmctl evacuate node1 --to node2 --to node3 "
                "--mode stop-copy --json\n\nexit status: 0 if every cnvm moved, 1 otherwise.",
         args=[arg("node", metavar="NODE"),
               arg("--to", action="append", default=[], metavar="NODE",
                   help="only these target nodes (repeatable)"),
               arg("-j", "--parallel", type=int, metavar="N", help="teleports at once"),
               arg("--mode", choices=MODES, default="auto", help="teleport mode"),
               arg("--dry-run", action="store_true", help="print the plan, move nothing")])
async def evacuate(ctx: Ctx, a: argparse.Namespace) -> int:
    args: dict[str, Any] = {"node": a.node, "to": a.to, "mode": a.mode, "dry_run": a.dry_run}
    if a.parallel is not None:
        args["parallel"] = a.parallel
    view = LiveView()
    res = await ctx.call("evacuate", args, on_event=None if ctx.json else view.on_event)
    ctx.output(res, render_table)
    return 0 if res.get("failed", 0) == 0 else 1
