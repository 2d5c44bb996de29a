"""`cnvmctl events`: the node's lifecycle, teleport and membership events, live
(daemon side: cnvmd/events.py)."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from typing import Any

from cnvmctl.context import EXIT_USAGE, CliError, Ctx
from cnvmctl.registry import arg, command
from proto.client import Event

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``/``30s``/``2h``/``1d`` ago, an ISO 8601 time (UTC unless it says), or
    epoch seconds; as epoch seconds."""
    now = time.time() if now is None else now
    m = _DURATION.fullmatch(text)
    if m is not None:
        return max(0.0, now - float(m.group(1)) * _UNIT[m.group(2)])
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--since {text!r}: give a duration (30s, 10m, 2h, 1d), an ISO time "
                       "(2026-12-01T10:00:00Z) or epoch seconds", EXIT_USAGE) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


def format_event(e: dict[str, Any]) -> str:
    """One line: time, type, action, name, then the attributes as key=value."""
    ts = datetime.datetime.fromtimestamp(float(e.get("time") or 0), datetime.UTC)
    attrs = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else v}"
                     for k, v in (e.get("attrs") or {}).items())
    return (f"{ts:%Y-%m-%dT%H:%M:%S.%f}"[:-3] + "Z "
            + f"{e.get('node')} {e.get('type')} {e.get('action')} {e.get('name')}"
            + (f" {attrs}" if attrs else ""))


@command("events", help="stream the node's lifecycle, teleport and membership events",
         description="Print the node's events as they happen, like `docker events`:\n"
                     "  cnvm      deploy, start, stop, die (exit_code), restart (restarts), "
                     "restart_failed, rm\n"
                     "  teleport  start, phase (phase), rolled_back / failed (reason), "
                     "committed (source),\n            arrived (target)\n"
                     "  node      joined, up, suspect, down, removed (as this node sees "
                     "its peers)\n"
                     "The daemon keeps its last 1000 events in memory: --since replays "
                     "those first.\nWith --json, one JSON object per line: seq, time, node, "
                     "type, action, name, attrs.",
         epilog="examples:\n  cnvmctl events\n  cnvmctl events --since 10m --filter type=cnvm "
                "--filter name=web\n  cnvmctl events --json --since 1h --no-follow | jq "
                "'select(.action == \"die\")'",
         args=[arg("--since", metavar="WHEN",
                   help="first replay the kept events since WHEN: a duration ago (30s, 10m, "
                        "2h, 1d), an ISO time or epoch seconds"),
               arg("--filter", "-f", action="append", default=[], metavar="KEY=VALUE",
                   help="only events with type=cnvm|teleport|node, name=NAME or "
                        "action=ACTION (repeatable; the same key again means 'or')"),
               arg("--no-follow", action="store_true",
                   help="print the kept events (with --since) and exit")])
async def events(ctx: Ctx, a: argparse.Namespace) -> None:
    args: dict[str, Any] = {"filters": a.filter, "follow": not a.no_follow}
    if a.since:
        args["since"] = parse_since(a.since)
    elif a.no_follow:
        args["since"] = 0.0

    def on_event(ev: Event) -> None:
        if ev.name != "event":
            return
        if ctx.json:
            sys.stdout.write(json.dumps(ev.data, default=str) + "\n")
        else:
            sys.stdout.write(format_event(ev.data) + "\n")
        sys.stdout.flush()

    res = await ctx.call("events", args, on_event=on_event)
    if isinstance(res, dict) and res.get("ended"):
        print(f"cnvmctl: events: {res['ended']}", file=sys.stderr)
