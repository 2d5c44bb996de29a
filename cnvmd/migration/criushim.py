"""CRIU for hosts where root lacks CAP_SYS_RESOURCE (like these lab machines).

CRIU reads every task's rlimits with prlimit(2), which the kernel refuses for a
task of another user without CAP_SYS_RESOURCE: a cnvm running, say, an sshd
session as a normal user cannot be dumped. `prlimit_shim.c` (LD_PRELOAD) answers
such reads from /proc/PID/limits. Built once per daemon start into the state dir
when a C compiler is present and the capability is missing; the engine then runs
CRIU through a tiny wrapper that preloads it. Without a compiler, teleports of
cnvms with processes of several users fail cleanly (and roll back).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from cnvmd import proc

log = logging.getLogger("cnvmd.teleport")
SRC = Path(__file__).with_name("prlimit_shim.c")
CAP_SYS_RESOURCE = 24


def has_sys_resource() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except OSError:
        pass
    return True


async def criu_for_teleport(criu: str, state_dir: Path) -> str:
    """The CRIU command the engine should use: `criu` itself, or the shim wrapper."""
    if has_sys_resource():
        return criu
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not SRC.exists():
        log.warning("no CAP_SYS_RESOURCE and no C compiler: cnvms with processes of "
                    "several users cannot be teleported from this node")
        return criu
    d = Path(state_dir) / "teleport"
    so, wrapper = d / "prlimit_shim.so", d / "criu"
    try:
        await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True)
        fresh = so.exists() and so.stat().st_mtime >= SRC.stat().st_mtime
        if not fresh:
            tmp = d / f".prlimit_shim.{os.getpid()}.so"
            await proc.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SRC)],
                           timeout=60)
            await asyncio.to_thread(os.replace, tmp, so)
        text = (f'#!/bin/sh\n# CRIU with {so.name} (see cnvmd/migration/criushim.py)\n'
                f'LD_PRELOAD="{so}${{LD_PRELOAD:+:$LD_PRELOAD}}" exec "{criu}" "$@"\n')

        def write() -> None:
            tmpw = d / ".criu.tmp"
            tmpw.write_text(text)
            tmpw.chmod(0o755)
            os.replace(tmpw, wrapper)

        await asyncio.to_thread(write)
    except (proc.CommandError, OSError) as exc:
        log.warning("cannot build the CRIU prlimit shim (%s): using plain CRIU", exc)
        return criu
    return str(wrapper)
