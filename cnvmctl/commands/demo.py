"""`cnvmctl demo`: the one-machine demo (see cnvmctl/demo.py)."""

from __future__ import annotations

import argparse
import os

from cnvmctl.context import CliError, Ctx
from cnvmctl.registry import arg, command


@command("demo", daemon=False, help="run the one-machine demo (3-node lab, live SSH teleport)",
         description="Build a 3-node lab on this machine, deploy sneaker01 (Debian + sshd) at "
                     "10.100.101.111,\nopen a real SSH session into it from the lab's client "
                     "host that prints a counter\nevery 100 ms, and teleport sneaker01 node1 → "
                     "node2 → node3 while the session runs.\nThe lab stays up afterwards; "
                     "an existing lab of the same name is replaced. Needs root.",
         epilog="Afterwards: cnvmctl lab exec --name demo client -- ssh user@10.100.101.111",
         args=[arg("--name", default="demo", help="lab name (default demo)")])
async def demo(ctx: Ctx, a: argparse.Namespace) -> int:
    from cnvmctl.demo import Demo, DemoError

    if os.geteuid() != 0:
        raise CliError("the demo needs root (network namespaces, runc, CRIU)",
                       hint="run it with sudo, or `sudo make demo`")
    d = Demo(a.name)
    try:
        reports = await d.run()
    except DemoError as exc:
        raise CliError(f"demo failed: {exc}",
                       hint=f"the lab is left up for a look; `cnvmctl lab down --name {a.name}`"
                       ) from None
    finally:
        await d.close_session()
    if ctx.json:
        ctx.print_json({"lab": a.name, "teleports": reports})
    else:
        print(d.epilogue(reports[-1]["target"] if reports else "node1"))
    return 0
