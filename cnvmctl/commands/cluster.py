"""Cluster membership commands: cluster init/token/remove, join, nodes (issue 6)."""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

from cnvmctl.context import Ctx
from cnvmctl.output import cell, print_table, size
from cnvmctl.registry import arg, command, group

group("cluster", help="create a cluster, mint join tokens, revoke nodes")


@command("cluster init", help="create a new cluster with this node as its first member",
         description="Create the cluster identity (id and secret) on this node. Other nodes "
                     "then join\nwith a token from `cnvmctl cluster token`.")
async def cluster_init(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("cluster.init")
    ctx.output(res, lambda r: print(f"cluster {r['cluster_id']} created on {r['node']}"))


@command("cluster token", help="mint a single-use join token",
         description="Print a join token (single use, expires after --ttl seconds). Any member "
                     "can mint one;\nthe joining node runs `cnvmctl join THIS_NODE_ADDRESS "
                     "--token TOKEN`.",
         args=[arg("--ttl", type=float, default=600.0, help="lifetime in seconds (default 600)")])
async def cluster_token(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("cluster.token", {"ttl": a.ttl})

    def human(r: dict[str, Any]) -> None:
        left = max(0, int(r["expires"] - time.time()))
        print(r["token"])
        print(f"(single use, expires in {left}s, issued by {r['issuer']})")

    ctx.output(res, human)


@command("cluster remove", help="revoke a node's membership",
         description="Unpin the node's key on every member, close its connections and rotate "
                     "the cluster\nsecret (tokens minted before stop working). Only for a node "
                     "gone for good:\nthis member takes over its address ranges (addresses "
                     "its cnvms held stay in use).",
         args=[arg("node", help="node name")])
async def cluster_remove(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("cluster.remove", {"node": a.node})

    def human(r: dict) -> None:
        taken = r.get("ranges_taken") or []
        print(f"removed {r['removed']}" + (f"; its {len(taken)} address range(s) now belong "
                                           "to this node" if taken else ""))

    ctx.output(res, human)


@command("join", help="join the cluster of a member node",
         description="Enrol this node through PEER (address[:port] of any member) with a token "
                     "from\n`cnvmctl cluster token`. Keys are exchanged and pinned both ways.",
         args=[arg("peer", help="a member's underlay address, optionally :port"),
               arg("--token", required=True, help="join token")])
async def join(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("join", {"peer": a.peer, "token": a.token})
    ctx.output(res, lambda r: print(f"{r['node']} joined cluster {r['cluster_id']} via "
                                    f"{r['via']}; members: {', '.join(r['members'])}"))


def _ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    s = max(0.0, time.time() - ts)
    return "now" if s < 1.5 else f"{s:.0f}s ago" if s < 120 else \
        datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _caps(c: Any) -> str:
    if not isinstance(c, dict) or not c:
        return "-"
    keys = ("criu", "uffd_noncoop", "tcp_repair", "mem_dirty_track")
    parts = [f"{k}={c[k]}" for k in keys if k in c]
    return " ".join(parts) or f"{len(c)} keys"


@command("nodes", help="list cluster members as this node sees them",
         description="Name, underlay address, state (alive/suspect/down, cordoned), last seen, "
                     "cnvm count,\nfree/total memory, CPUs, load and capabilities of every "
                     "member (cnvm counts and\nresources from the cluster directory).")
async def nodes(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("nodes")

    def human(r: dict[str, Any]) -> None:
        if not r.get("cluster_id"):
            print(f"{r.get('node')} is not in a cluster (cnvmctl cluster init | join)")
            return
        rows = [{**n, "address": f"{n['addr'] or '?'}:{n['port']}",
                 "name": n["name"] + (" *" if n["name"] == r["node"] else ""),
                 "state": n["state"] + (",cordoned" if n.get("cordoned") else ""),
                 "memory": (f"{size(n['mem_free'])}/{size(n['mem_total'])}"
                            if n.get("mem_total") else "-")}
                for n in r["nodes"]]
        print_table(rows, [("NAME", "name"), ("ADDRESS", "address"), ("STATE", "state"),
                           ("LAST SEEN", "last_seen"), ("CNVMS", "cnvm_count"),
                           ("MEM FREE/TOTAL", "memory"), ("CPUS", "cpus"), ("LOAD", "load"),
                           ("CAPABILITIES", "caps")],
                    {"last_seen": _ago, "caps": _caps, "cnvm_count": cell})

    ctx.output(res, human)
