"""`cnvmctl logs`: a cnvm's console output, with --since, -n/--tail, -t/--timestamps,
-f/--follow and JSON lines. The daemon side is cnvmd/logstore.py."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cnvmctl import timefmt
from cnvmctl.context import EXIT_USAGE, CliError, Ctx
from cnvmctl.registry import arg, command
from proto.client import Event

LOGS_EPILOG = """\
examples:
  cnvmctl logs web                  everything kept (the last 4 MiB)
  cnvmctl logs -n 20 -t web         the last 20 lines, each with its time
  cnvmctl logs --since 10m web      what was written in the last 10 minutes
  cnvmctl logs --since 2026-12-01T22:00:00Z web
  cnvmctl logs -f web               then keep printing new output (Ctrl-C to stop)
  cnvmctl logs -f --json web        JSON lines: {"name", "time", "line"}

times: the daemon notes when each piece of output arrived; a line gets the time of
its first byte. Output written before that (a cnvm started by an older cnvmd, or
the part of the log that came with a teleport) has no time: shown as `-`, and left
out by --since (a note on stderr says how many lines).

--json: without -f, one JSON object {name, data[, lines: [[time, text]]]}; with -f,
one JSON object per line: {"name", "time" (UNIX time or null), "line"}.
"""


def _stamp(t: float | None) -> str:
    return timefmt.local_iso(t, ms=True) if t is not None else "-"


class _Printer:
    """Prints pieces of lines (a piece may continue the previous one): stamps at line
    starts only; JSON lines only for complete lines (the rest when the stream ends)."""

    def __init__(self, ctx: Ctx, name: str, stamps: bool, json_lines: bool) -> None:
        self.ctx, self.name, self.stamps, self.json_lines = ctx, name, stamps, json_lines
        self.at_start = True
        self.partial: tuple[float | None, str] | None = None

    def feed(self, lines: list[list[Any]]) -> None:
        for t, text in lines:
            if self.json_lines:
                if self.partial is not None:
                    t, text = self.partial[0], self.partial[1] + text
                    self.partial = None
                if text.endswith("\n"):
                    self._json(t, text[:-1])
                else:
                    self.partial = (t, text)
                continue
            prefix = f"{_stamp(t)} " if self.stamps and self.at_start else ""
            self.ctx.write(prefix + text)
            self.at_start = text.endswith("\n")

    def _json(self, t: float | None, line: str) -> None:
        self.ctx.write(json.dumps({"name": self.name, "time": t, "line": line}) + "\n")

    def end(self) -> None:
        if self.partial is not None:
            self._json(*self.partial)
            self.partial = None


@command("logs", help="show a cnvm's console output",
         description="Show what the cnvm's processes wrote to stdout/stderr (kept by its "
                     "node, the last\n4 MiB at most).",
         epilog=LOGS_EPILOG,
         args=[arg("name", metavar="NAME"),
               arg("--follow", "-f", action="store_true",
                   help="keep printing new output until the cnvm leaves this node"),
               arg("--tail", "-n", type=int, metavar="N", help="only the last N lines"),
               arg("--since", metavar="WHEN", help="only output since WHEN: "
                   + timefmt.SINCE_HELP),
               arg("--timestamps", "-t", action="store_true",
                   help="prefix each line with the local time it was written")])
async def logs(ctx: Ctx, a: argparse.Namespace) -> None:
    if a.tail is not None and a.tail < 0:
        raise CliError("--tail must be 0 or more", EXIT_USAGE)
    req: dict[str, Any] = {"name": a.name, "follow": a.follow, "tail": a.tail}
    if a.since is not None:
        try:
            req["since"] = timefmt.parse_since(a.since)
        except ValueError as exc:
            raise CliError(f"--since: {exc}", EXIT_USAGE) from None
    json_lines = ctx.json and a.follow
    need_lines = a.timestamps or json_lines
    if need_lines:
        req["timestamps"] = True
    out = _Printer(ctx, a.name, a.timestamps, json_lines)

    def on_event(ev: Event) -> None:
        if ev.name != "output":
            return
        if need_lines:
            out.feed(ev.data.get("lines") or [])
        else:
            ctx.write(str(ev.data.get("data", "")))

    res = await ctx.call("logs", req, on_event=on_event if a.follow else None)
    if a.follow:
        out.end()
        return
    if ctx.json:
        ctx.print_json(res)
    elif a.timestamps:
        out.feed(res.get("lines") or [])
    else:
        ctx.write(res.get("data", ""))
    if res.get("untimed"):
        print(f"cnvmctl: note: {res['untimed']} line(s) without a time were left out by "
              "--since", file=sys.stderr)
