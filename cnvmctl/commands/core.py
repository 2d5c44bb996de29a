"""Core commands: status, ls, inspect."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from cnvmctl import timefmt
from cnvmctl.context import EXIT_USAGE, CliError, Ctx
from cnvmctl.output import cell, duration, print_kv, print_table, print_tree, size
from cnvmctl.registry import arg, command
from cnvmctl.template import FORMAT_HELP, FormatError, Template


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


def _exited(r: dict[str, Any]) -> str:
    code = r.get("exit_code")
    return f"{timefmt.human(r['exited_at'])}, exit code {code if code is not None else 'unknown'}"


def _format_arg() -> Any:
    return arg("--format", metavar="TEMPLATE", help="print each row through TEMPLATE: "
               + FORMAT_HELP)


def print_formatted(ctx: Ctx, spec: str, rows: list[dict[str, Any]]) -> None:
    """--format: one rendered line per row (usage error on a bad template/field)."""
    try:
        lines = Template(spec).lines(rows)
    except FormatError as exc:
        raise CliError(f"--format: {exc}", EXIT_USAGE) from None
    for ln in lines:
        ctx.write(ln + "\n")


LS_DESCRIPTION = (
    "List every cnvm of the cluster with the node that runs it (the cluster directory,\n"
    "current within about a second). --local lists this node's cnvms from runc and\n"
    "the daemon's records instead (with PID, uptime and adoption).\n\n"
    "STATE notes: 'adopted' = already running when this daemon started (it took it over);\n"
    "'unmanaged' = a container in the daemon's runc root without a cnvm record;\n"
    "'missing' = recorded as running but no container exists;\n"
    "'exited (N)' = its process exited with status N and its restart policy left it so;\n"
    "'restarting' = waiting out the restart backoff; '(node down)' = its node does not\n"
    "answer: the last known state. RESTARTS counts the policy's restarts since the last\n"
    "deploy/start.")
LS_EPILOG = """\
fields for --format (the keys of --json): name, node, state, pid, managed, adopted,
image, ip, memory, mem_use, created, uptime, restart, restarts, exit_code, exited_at

examples:
  cnvmctl ls                                     every node
  cnvmctl ls --node node2                        only node2's cnvms
  cnvmctl ls --local                             this node, with PIDs and uptime
  cnvmctl ps -q                                  names only, one a line
  cnvmctl ls --format '{{.Name}} {{.Node}} {{.IP}}'
  cnvmctl ls --format 'table {{.Name}}\\t{{.State}}\\t{{.Uptime}}'
"""
LS_ARGS = [arg("--node", "--on", dest="on_node", metavar="NODE",
               help="only the cnvms of NODE"),
           arg("--local", action="store_true", help="this node only, from runc"),
           arg("--quiet", "-q", action="store_true", help="print the names only"),
           _format_arg()]


def _render_cluster(rows: list[dict[str, Any]]) -> None:
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


async def ls(ctx: Ctx, a: argparse.Namespace) -> None:
    render: Any = render_ls
    if a.local:
        rows = await ctx.call("ls")
    else:
        res = await ctx.call("cluster.ls", {"node": a.on_node} if a.on_node else {})
        rows = res["cnvms"]
        if res.get("cluster"):  # else a node alone: the classic view
            render = _render_cluster
    if a.quiet:
        for r in rows:
            ctx.write(f"{r['name']}\n")
    elif a.format:
        print_formatted(ctx, a.format, rows)
    else:
        ctx.output(rows, render)


command("ls", help="list the cnvms of the whole cluster (or of one node)",
        description=LS_DESCRIPTION, epilog=LS_EPILOG, args=LS_ARGS)(ls)
command("ps", help="list the cnvms (same as ls)", description=LS_DESCRIPTION,
        epilog=LS_EPILOG, args=LS_ARGS)(ls)


def _is_time_key(k: Any) -> bool:
    return isinstance(k, str) and (k in ("at", "created", "started", "time")
                                   or k.endswith(("_at", "_time")))


def humanize_times(obj: Any, now: float | None = None) -> Any:
    """A copy of `obj` whose time fields (`*_at`, `created`, ...; epoch numbers or RFC
    3339 strings) read as local time plus how long ago."""
    if isinstance(obj, dict):
        return {k: (timefmt.human(v, now) if _is_time_key(k) and timefmt.to_epoch(v)
                    is not None else humanize_times(v, now)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [humanize_times(v, now) for v in obj]
    return obj


def render_inspect(r: dict[str, Any]) -> None:
    print_kv([("name", r.get("name")), ("state", _state(r)), ("pid", r.get("pid")),
              ("node", r.get("node")), ("image", r.get("image")), ("ip", r.get("ip")),
              ("created", timefmt.human(r.get("created"))),
              ("uptime", duration(r.get("uptime"))),
              ("restart", f"{r.get('restart') or 'no'} ({r.get('restarts') or 0} restarts)"),
              *([("exited", _exited(r))] if r.get("exited_at") else [])])
    adoption = r.get("adoption")
    if adoption:
        print(f"adopted   pid {adoption['pid']} at {timefmt.human(adoption['at'])}")
    if r.get("record"):
        print("record:")
        print_tree(humanize_times(r["record"]), 2)
    if r.get("runc"):
        print("runc:")
        print_tree(humanize_times(r["runc"]), 2)
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
                     "runc's view.\nTimes are shown in local time with how long ago; "
                     "--json keeps them as the\ndaemon sends them (UNIX times, RFC 3339).",
         epilog="fields for --format: the keys of --json (name, state, pid, node, image, ip,"
                "\ncreated, uptime, record.*, runc.*, adoption, exposes, teleports)\n\n"
                "examples:\n  cnvmctl inspect web\n"
                "  cnvmctl inspect --format '{{.IP}} {{.record.image_id}}' web",
         args=[arg("name", metavar="NAME", help="the cnvm's name"), _format_arg()])
async def inspect(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("inspect", {"name": a.name})
    if a.format:
        print_formatted(ctx, a.format, [res])
    else:
        ctx.output(res, render_inspect)


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
