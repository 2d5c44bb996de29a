"""Core commands: status, ls, inspect."""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from typing import Any

from cnvmctl.context import Ctx
from cnvmctl.output import cell, duration, print_kv, print_table, print_tree, size
from cnvmctl.registry import arg, command


def _yn(v: Any) -> str:
    return "yes" if v is True else "no" if v is False else cell(v)


def render_status(st: dict[str, Any]) -> None:
    v = st.get("versions", {})
    paths = st.get("paths", {})
    print_kv([
        ("node", st.get("node")),
        ("cnvmd", f"{v.get('cnvmd')} (protocol {v.get('protocol')}, pid {st.get('pid')}, "
                  f"up {duration(st.get('uptime'))})"),
        ("runc", v.get("runc") or "unavailable"),
        ("criu", f"{v.get('criu') or 'unavailable'} ({paths.get('criu')})"),
        ("kernel", v.get("kernel")),
        ("socket", paths.get("socket")),
        ("state dir", paths.get("state_dir")),
        ("runc root", paths.get("runc_root")),
        ("adopted", ", ".join(st.get("adopted") or []) or "-"),
    ])
    caps = st.get("capabilities", {})
    print("capabilities:")
    if "error" in caps:
        print(f"  probe failed: {caps['error']}")
    else:
        pms = caps.get("pipe_max_size")
        need = caps.get("lazy_pipe_min")
        print_kv([
            ("dirty tracking (pre-copy)", _yn(caps.get("mem_dirty_track"))),
            ("userfaultfd (post-copy)", _yn(caps.get("uffd_noncoop"))),
            ("TCP repair (live connections)", _yn(caps.get("tcp_repair"))),
            ("fs.pipe-max-size", f"{size(pms)}" + (f" (lazy pages need >= {size(need)})"
                                                   if isinstance(need, int) and
                                                   isinstance(pms, int) and pms < need else "")),
            ("lazy pages ready", _yn(caps.get("lazy_pages_ready"))),
        ], indent=2)
    failed = st.get("plugins_failed") or {}
    for mod, err in failed.items():
        print(f"warning: daemon module {mod} failed to load: {err}")


@command("status", help="show the node's versions and capabilities",
         description="Show which node the daemon runs, the versions of cnvmd, runc, CRIU "
                     "and the kernel,\nand what this host can do for migrations "
                     "(probed once at daemon start).",
         epilog="JSON fields: node, versions{cnvmd,runc,criu,kernel,protocol}, capabilities"
                "{mem_dirty_track,\nuffd_noncoop,tcp_repair,pipe_max_size,lazy_pages_ready}, "
                "paths, pid, uptime, adopted, ops.")
async def status(ctx: Ctx, a: argparse.Namespace) -> None:
    ctx.output(await ctx.call("status"), render_status)


def _state(r: dict[str, Any]) -> str:
    notes = []
    if r.get("adopted"):
        notes.append("adopted")
    if r.get("managed") is False:
        notes.append("unmanaged")
    return cell(r.get("state")) + (f" ({', '.join(notes)})" if notes else "")


LS_COLUMNS = [("NAME", "name"), ("STATE", "state"), ("PID", "pid"), ("IMAGE", "image"),
              ("IP", "ip"), ("MEMORY", "memory"), ("UPTIME", "uptime"), ("RESTARTS", "restarts")]


def render_ls(rows: list[dict[str, Any]]) -> None:
    print_table([{**r, "state": _state(r)} for r in rows], LS_COLUMNS,
                {"uptime": duration,
                 "memory": lambda m: size(m) if isinstance(m, int) else cell(m)})


@command("ls", help="list the cnvms of the whole cluster (or of one node)",
         description="List every cnvm of the cluster with the node that runs it (the cluster "
                     "directory,\ncurrent within about a second). --local lists this node's "
                     "cnvms from runc and\nthe daemon's records instead (with PID, uptime and "
                     "adoption).\n\n"
                     "STATE notes: 'adopted' = already running when this daemon started "
                     "(it took it over);\n'unmanaged' = a container in the daemon's runc root "
                     "without a cnvm record;\n'missing' = recorded as running but no container "
                     "exists;\n'exited (N)' = its process exited with status N and its restart "
                     "policy\nleft it so; 'restarting' = waiting out the restart backoff; "
                     "'(node down)' = its node\ndoes not answer: the last known state. "
                     "RESTARTS counts the policy's restarts\nsince the last deploy/start.",
         epilog="examples:\n  cnvmctl ls                 # every node\n"
                "  cnvmctl ls --node node2    # only node2's cnvms\n"
                "  cnvmctl ls --local         # this node, with PIDs and uptime",
         args=[arg("--node", "--on", dest="on_node", metavar="NODE", help="only the cnvms of NODE"),
               arg("--local", action="store_true", help="this node only, from runc")])
async def ls(ctx: Ctx, a: argparse.Namespace) -> None:
    if a.local:
        ctx.output(await ctx.call("ls"), render_ls)
        return
    res = await ctx.call("cluster.ls", {"node": a.on_node} if a.on_node else {})
    rows = res["cnvms"]
    if not res.get("cluster"):  # a node alone: the classic view
        ctx.output(rows, render_ls)
        return

    def human(rows: list[dict[str, Any]]) -> None:
        shown = [{**r, "state": _state(r) + (" (node down)" if r.get("node_state") == "down"
                                             else "")
                  + (" DUPLICATE" if r.get("duplicate") else "")} for r in rows]

        def mem(m: Any) -> str:
            return size(m) if isinstance(m, int) else cell(m)

        print_table(shown, [("NAME", "name"), ("NODE", "node"), ("STATE", "state"),
                            ("PID", "pid"), ("IMAGE", "image"), ("IP", "ip"),
                            ("MEMORY", "memory"), ("USED", "mem_use"), ("UPTIME", "uptime"),
                            ("RESTARTS", "restarts")],
                    {"uptime": duration, "memory": mem, "mem_use": mem})

    ctx.output(rows, human)


def _exited(r: dict[str, Any]) -> str:
    at = datetime.datetime.fromtimestamp(float(r["exited_at"]), datetime.UTC)
    code = r.get("exit_code")
    return f"{at:%Y-%m-%d %H:%M:%S}Z, exit code {code if code is not None else 'unknown'}"


def render_inspect(r: dict[str, Any]) -> None:
    created = r.get("created")
    print_kv([("name", r.get("name")), ("state", _state(r)), ("pid", r.get("pid")),
              ("node", r.get("node")), ("image", r.get("image")), ("ip", r.get("ip")),
              ("created", created), ("uptime", duration(r.get("uptime"))),
              ("restart", f"{r.get('restart') or 'no'} ({r.get('restarts') or 0} restarts)"),
              *([("exited", _exited(r))] if r.get("exited_at") else [])])
    adoption = r.get("adoption")
    if adoption:
        at = datetime.datetime.fromtimestamp(adoption["at"], datetime.UTC)
        print(f"adopted   pid {adoption['pid']} at {at:%Y-%m-%d %H:%M:%S}Z")
    if r.get("record"):
        print("record:")
        print_tree(r["record"], 2)
    if r.get("runc"):
        print("runc:")
        print_tree(r["runc"], 2)
    for e in r.get("exposes") or []:
        if e.get("error"):
            print(f"expose    on {e['node']}: unknown ({e['error']})")
        else:
            print(f"expose    {e['node']}:{e['hostport']}/{e['proto']} -> port {e['port']}")
    for t in (r.get("teleports") or [])[-5:]:
        res = "ok" if t.get("ok") else "rolled back" if t.get("rolled_back") else "failed"
        print(f"teleport  {t.get('source')} -> {t.get('target')} {t.get('mode')} {res}, "
              f"frozen {1000 * (t.get('frozen_seconds') or 0):.0f} ms, "
              f"total {t.get('total_seconds') or 0:.2f} s, wire {size(t.get('wire_bytes'))}")
    last = (r.get("teleports") or [None])[-1]
    if isinstance(last, dict) and last.get("ok"):
        from cnvmctl.commands.teleport import render_timeline

        render_timeline(last)
    for t in r.get("teleport_sessions") or []:
        print(f"session   {t.get('sid')} ({t.get('side')}) in phase {t.get('phase')}"
              + (f", effects {t['effects']}" if t.get("effects") else "")
              + (f": {t['error']}" if t.get("error") else ""))


@command("inspect", help="show one cnvm in detail",
         description="Show one cnvm: live state, its record (image, IP, limits, history) and "
                     "runc's view.",
         args=[arg("name", metavar="NAME", help="the cnvm's name")])
async def inspect(ctx: Ctx, a: argparse.Namespace) -> None:
    ctx.output(await ctx.call("inspect", {"name": a.name}), render_inspect)


@command("ping", help="check that the daemon answers, and how fast",
         description="Send COUNT ping requests one after the other and print the round-trip "
                     "times.\nWith --delay the daemon waits that long per ping and streams "
                     "progress events\n(shown as a progress bar); Ctrl-C cancels the request.",
         args=[arg("-c", "--count", type=int, default=1, metavar="N",
                   help="number of pings (default 1)"),
               arg("--delay", type=float, default=0.0, metavar="SECONDS",
                   help="ask the daemon to wait this long before answering")])
async def ping(ctx: Ctx, a: argparse.Namespace) -> None:
    c = await ctx.client()
    times = []
    for _ in range(max(1, a.count)):
        t0 = time.perf_counter()
        if a.delay:
            with ctx.progress(f"ping {c.server.get('node')}") as p:
                await ctx.call("ping", {"delay": a.delay}, on_event=p.on_event)
        else:
            await ctx.call("ping")
        times.append((time.perf_counter() - t0) * 1e3)
    res = {"node": c.server.get("node"), "version": c.server.get("version"),
           "count": len(times), "min_ms": min(times), "median_ms": statistics.median(times),
           "max_ms": max(times)}
    ctx.output(res, lambda r: print(
        f"{r['node']} (cnvmd {r['version']}): {r['count']} ping(s), round trip "
        f"min {r['min_ms']:.3f} ms, median {r['median_ms']:.3f} ms, max {r['max_ms']:.3f} ms"))
