"""Overlay network commands (issue 5): expose, unexpose, exposes, net status/up/down/
host/ipam. The daemon side is cnvmd/network/ops.py.

`--on NODE` runs the command on another cluster member through the peer mesh
(the global `--node` already picks a lab node's daemon).
"""

from __future__ import annotations

import argparse
from typing import Any

from cnvmctl.context import Ctx
from cnvmctl.output import cell, print_kv, print_table
from cnvmctl.registry import arg, command, group

group("net", help="the overlay network of a node: status, datapath, node address, IPAM")

_ON = arg("--on", metavar="NODE", help="run on this cluster member (via the peer mesh)")


async def _call(ctx: Ctx, a: argparse.Namespace, op: str, args: dict[str, Any]) -> Any:
    on = getattr(a, "on", None)
    if on:
        return await ctx.call("forward", {"node": on, "op": op, "args": args})
    return await ctx.call(op, args)


def _fwd_line(r: dict[str, Any]) -> str:
    return f"{r['node']}:{r['hostport']}/{r['proto']} -> {r['name']} ({r['ip']}:{r['port']})"


@command("expose", help="forward a host port of a node to a cnvm",
         description="Forward HOSTPORT on the node (this one, or --on NODE) to PORT of cnvm "
                     "NAME, by kernel NAT\nto the cnvm's overlay address: it keeps working "
                     "wherever the cnvm runs,\nincluding after a teleport. SPEC is "
                     "HOSTPORT:PORT[/tcp|udp] (tcp by default).",
         epilog="examples:\n  cnvmctl expose web 8080:80\n  cnvmctl expose dns 5353:53/udp "
                "--on node2",
         args=[arg("name", help="cnvm name"), arg("spec", metavar="HOSTPORT:PORT[/tcp|udp]"),
               _ON])
async def expose(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await _call(ctx, a, "expose", {"name": a.name, "spec": a.spec})
    ctx.output(res, lambda r: print(f"exposed {_fwd_line(r)}"))


@command("unexpose", help="stop forwarding a host port to a cnvm",
         args=[arg("name", help="cnvm name"), arg("port", metavar="HOSTPORT[/tcp|udp]"), _ON])
async def unexpose(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await _call(ctx, a, "unexpose", {"name": a.name, "port": a.port})
    ctx.output(res, lambda r: print(f"unexposed {_fwd_line(r)}"))


EXPOSE_COLUMNS = [("HOST PORT", "key"), ("CNVM", "name"), ("TARGET", "target")]


def _rows(exposes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**f, "key": f"{f['hostport']}/{f['proto']}", "target": f"{f['ip']}:{f['port']}"}
            for f in exposes]


@command("exposes", help="list a node's published ports",
         args=[arg("name", nargs="?", help="only those of this cnvm"), _ON])
async def exposes(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await _call(ctx, a, "exposes", {"name": a.name})

    def human(r: dict[str, Any]) -> None:
        if not r["exposes"]:
            print(f"no published ports on {r['node']}")
            return
        print_table(_rows(r["exposes"]), EXPOSE_COLUMNS)

    ctx.output(res, human)


def render_status(st: dict[str, Any]) -> None:
    dp = st.get("datapath", {})
    print_kv([
        ("node", st.get("node")),
        ("subnet", st["subnet"] + (f" (gateway {st['gateway']})" if st.get("gateway")
                                       else "")),
        ("datapath", ("up" if dp.get("up") else "down" if st.get("enabled") else
                      "not built (cnvmctl net up)")
         + f", vni {dp.get('vni')}, udp {dp.get('port')}, mtu {cell(dp.get('mtu'))}, "
           f"underlay {cell(dp.get('underlay'))}"),
        ("node address", st.get("expose_ip") or "-"),
        ("flood peers", ", ".join(st.get("peers") or []) or "-"),
        ("addresses in use", st.get("addresses_in_use")),
    ])
    if st.get("cnvms"):
        print("cnvms:")
        print_table([{**c, "present": "yes" if c["present"] else "MISSING"}
                     for c in st["cnvms"]],
                    [("NAME", "name"), ("IP", "ip"), ("MAC", "mac"), ("NETNS", "netns"),
                     ("PRESENT", "present")])
    if st.get("exposes"):
        print("published ports:")
        print_table(_rows(st["exposes"]), EXPOSE_COLUMNS)


@command("net status", help="show the node's overlay: datapath, peers, cnvm netns, ports",
         args=[_ON])
async def net_status(ctx: Ctx, a: argparse.Namespace) -> None:
    ctx.output(await _call(ctx, a, "net.status", {}), render_status)


@command("net up", help="build or repair the node's overlay datapath",
         description="Create (or repair) cnvm0 and the VXLAN device and re-apply published "
                     "ports.\nWith --expose the node also gets an overlay address (`auto` or "
                     "an address),\nso it reaches every cnvm directly.",
         args=[arg("--expose", nargs="?", const="auto", metavar="IP",
                   help="also give the node an overlay address (default: allocate one)"), _ON])
async def net_up(ctx: Ctx, a: argparse.Namespace) -> None:
    args: dict[str, Any] = {"expose": a.expose} if a.expose else {}
    res = await _call(ctx, a, "net.up", args)

    def human(r: dict[str, Any]) -> None:
        for n in r.get("notes") or []:
            print(f"repaired: {n}")
        render_status(r)

    ctx.output(res, human)


@command("net down", help="remove the node's published ports and overlay datapath",
         args=[arg("--force", action="store_true",
                   help="also remove cnvm network namespaces"), _ON])
async def net_down(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await _call(ctx, a, "net.down", {"force": a.force})
    ctx.output(res, lambda r: print("\n".join(r["notes"] + ["overlay datapath removed"])))


@command("net host", help="give the node an overlay address (weave expose), or remove it",
         args=[arg("ip", nargs="?", default="auto", help="address or `auto` (default)"),
               arg("--remove", action="store_true", help="remove the node's address"), _ON])
async def net_host(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await _call(ctx, a, "net.host", {"ip": a.ip, "remove": a.remove})
    ctx.output(res, lambda r: print(f"{r['node']}: overlay address "
                                    f"{r['expose_ip'] or 'removed'}"))


@command("net ipam", help="addresses in use in the cluster, as this node knows them",
         args=[_ON])
async def net_ipam(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await _call(ctx, a, "net.ipam", {})

    def human(r: dict[str, Any]) -> None:
        print(f"subnet {r['subnet']}, {len(r['in_use'])} in use")
        print_table([{"ip": ip, "owner": o} for ip, o in r["in_use"].items()],
                    [("ADDRESS", "ip"), ("OWNER", "owner")])
        if r.get("ranges"):  # who may hand out which addresses (partition-safe IPAM)
            print()
            print_table(r["ranges"], [("FIRST", "first"), ("LAST", "last"),
                                      ("NODE", "owner")])

    ctx.output(res, human)
