"""`cnvmctl lab …`: a multi-node cluster on one machine, in network namespaces.

The same `cnvmlab.lab.Lab` code backs the tests, the benchmarks and the demo, so
what an operator pokes at by hand is exactly what CI exercises.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from cnvmctl.context import EXIT_USAGE, CliError, Ctx
from cnvmctl.registry import arg, command, group

group("lab", help="build and drive a local multi-node lab (network namespaces)",
      description="A lab is N node hosts plus a client host, each a network namespace\n"
                  "(<lab>-node1..N, <lab>-client) on a private underlay bridge "
                  "(198.18.0.0/24),\nwith a real cnvmd on every node. Needs root.")

_NAME = arg("--name", default=None, metavar="NAME",
            help="lab name (default: --lab, else 'lab'); 1-8 lowercase letters/digits")


def _lab(ctx: Ctx, a: argparse.Namespace, nodes: int | None = None) -> Any:
    from cnvmlab import paths as labpaths
    from cnvmlab.lab import Lab

    if os.geteuid() != 0:
        raise CliError("the lab needs root (network namespaces, runc, CRIU)",
                       hint="run it with sudo")
    name = a.name or ctx.lab or labpaths.DEFAULT_LAB
    try:
        if nodes is None:
            nodes = Lab(name).recorded_nodes()
        return Lab(name, nodes=nodes)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@command("lab up", daemon=False, help="create a lab and start a cnvmd on every node",
         description="Create the lab's namespaces and underlay, start one cnvmd per node, "
                     "form a cluster\nof all nodes (node1 inits, the others join) and put "
                     "the client host on the overlay\n(10.100.101.250). Fails if the lab "
                     "exists.",
         epilog="Then: cnvmctl --lab NAME --node node2 status",
         args=[_NAME,
               arg("--nodes", type=int, default=3, metavar="N", help="node hosts (default 3)"),
               arg("--no-daemons", action="store_true",
                   help="only build the namespaces and underlay"),
               arg("--no-cluster", action="store_true",
                   help="start the daemons but form no cluster")])
async def lab_up(ctx: Ctx, a: argparse.Namespace) -> None:
    from cnvmlab.lab import LabError

    lab = _lab(ctx, a, a.nodes)
    try:
        await lab.up(start_daemons=not a.no_daemons, cluster=not a.no_cluster)
    except LabError as exc:
        raise CliError(str(exc)) from None
    ctx.output(_status(lab), _render)


@command("lab down", daemon=False, help="remove a lab and everything it made",
         description="Stop the lab's daemons, remove its containers, mounts, namespaces "
                     "and directories.\nSafe to repeat, and works after a crash.",
         args=[_NAME])
async def lab_down(ctx: Ctx, a: argparse.Namespace) -> None:
    lab = _lab(ctx, a)
    notes = await lab.down()
    ctx.output({"lab": lab.name, "removed": notes},
               lambda r: print(f"lab {r['lab']} is down"
                               + "".join(f"\n  removed {n}" for n in r["removed"])))


@command("lab status", daemon=False, help="show a lab's hosts and daemons", args=[_NAME])
async def lab_status(ctx: Ctx, a: argparse.Namespace) -> int:
    lab = _lab(ctx, a)
    if not lab.exists():
        raise CliError(f"lab {lab.name} does not exist", hint="create it with: cnvmctl lab up")
    ctx.output(_status(lab), _render)
    return 0


@command("lab exec", daemon=False, help="run a command on a lab host",
         description="Run CMD inside a lab host's network namespace (via nsenter), with "
                     "stdio attached.\nThe exit status is CMD's.",
         epilog="Example: cnvmctl lab exec client -- ping -c1 10.100.101.111",
         args=[_NAME, arg("host", help="client, node1, node2, …"),
               arg("cmd", nargs=argparse.REMAINDER, help="command (after --)")])
async def lab_exec(ctx: Ctx, a: argparse.Namespace) -> int:
    from cnvmd import netlink, proc

    lab = _lab(ctx, a)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        raise CliError("no command given", EXIT_USAGE, hint="cnvmctl lab exec HOST -- CMD …")
    if a.host not in lab.hosts or not netlink.netns_exists(lab.netns(a.host)):
        raise CliError(f"no host {a.host!r} in lab {lab.name}",
                       hint=f"hosts: {', '.join(lab.hosts)}")
    sys.stdout.flush()
    argv = proc.netns_argv(lab.netns(a.host), cmd)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise CliError(f"cannot run {cmd[0]}: {exc}") from None
    return 0  # not reached


def _status(lab: Any) -> dict[str, Any]:
    return {"lab": lab.name, "nodes": lab.nodes,
            "hosts": [dataclasses.asdict(h) for h in lab.status()]}


def _render(r: dict[str, Any]) -> None:
    from cnvmctl.output import print_table

    print(f"lab {r['lab']}: {r['nodes']} nodes")
    rows = [{**h, "daemon": ("up" if h.get("daemon_alive") else
                             "down" if h.get("daemon_pid") else "-")} for h in r["hosts"]]
    print_table(rows, [("HOST", "host"), ("NETNS", "netns"), ("UNDERLAY", "underlay"),
                       ("DAEMON", "daemon"), ("PID", "daemon_pid"), ("SOCKET", "socket")])
