"""Core ops every daemon answers: status, ping, ops.

`status` is what operators and the migration engine look at first: which node,
which versions, and what this host can do (capabilities decide migration modes).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from cnvmd import criu
from cnvmd.api import Args, Context, Router
from cnvmd.services import Plugin

router = Router()


@router.op("ping")
async def ping(ctx: Context, args: Args) -> dict[str, Any]:
    """Liveness/latency check; echoes `data`. `delay` (s) streams progress while waiting.

    The delayed form exercises the whole streaming path (events, cancel, shutdown)
    against a real daemon, which the tests and `cnvmctl ping --delay` rely on.
    """
    delay = args.float("delay", 0.0, min=0.0, max=3600.0)
    if delay:
        t0 = time.monotonic()
        total = int(delay * 1000)
        while (elapsed := time.monotonic() - t0) < delay:
            ctx.progress("wait", done=int(elapsed * 1000), total=total, unit="ms")
            await asyncio.sleep(min(0.1, delay - elapsed))
        ctx.progress("wait", done=total, total=total, unit="ms")
    return {"node": ctx.daemon.node_name, "data": args.get("data")}


@router.op("status")
async def status(ctx: Context, args: Args) -> dict[str, Any]:
    """Node name, versions of cnvmd/runc/CRIU/kernel and the host's capabilities."""
    d = ctx.daemon
    # pipe-max-size can change at run time (the migration engine raises it): read live.
    caps = criu.live_caps(d.caps, d.caps_error)
    cfg = d.config
    now = time.time()
    return {
        "node": d.node_name,
        "versions": d.versions,
        "capabilities": caps,
        "paths": {"socket": str(cfg.socket_path), "state_dir": str(cfg.state_dir),
                  "run_dir": str(cfg.run_dir), "runc_root": str(cfg.runc_root),
                  "runc": cfg.runc, "criu": cfg.criu},
        "pid": os.getpid(),
        "instance": d.instance,
        "started": d.started,
        "uptime": round(now - d.started, 3),
        "adopted": sorted(d.adopted),
        "plugins": d.plugins,
        "plugins_failed": d.plugins_failed,
        "ops": sorted(d.router.ops),
    }


@router.op("ops")
async def ops(ctx: Context, args: Args) -> list[dict[str, str]]:
    """The ops this daemon serves, with one-line summaries and defining modules."""
    return [{"op": s.name, "summary": s.summary, "module": s.module}
            for s in sorted(ctx.daemon.router.ops.values(), key=lambda s: s.name)]


plugin = Plugin("core", router=router)
