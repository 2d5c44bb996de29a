"""Deploy-to-answering time of a cnvm whose image is already on the node (issue 4).

Goal: <= 500 ms from `deploy` to the cnvm's TCP service answering.

Root only. Builds the busybox test image offline, imports it into a temporary store,
then N times: deploy a cnvm running /bin/counter (through `cnvmd.lifecycle`, the code
behind `cnvmctl deploy`, with the minimal per-cnvm netns), connect to 127.0.0.1:7000
inside the cnvm's netns until a request is answered, rm. Prints per-phase times.

    .venv/bin/python bench/deploy.py [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnvmd import bundle, lifecycle
from cnvmd.images import ImageStore
from cnvmd.lifecycle import Lifecycle, LocalNetns
from cnvmd.runtime import Runc
from cnvmd.state import StateStore
from tests import imagebuild

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in_netns(path: str) -> socket.socket:
    """A TCP socket created inside the netns at path (a socket keeps its netns)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(home)
        os.close(target)
    s.setblocking(False)
    return s


async def first_answer(netns: str, timeout: float = 10.0) -> float:
    """Seconds until the counter answers a line (retrying connects every 2 ms)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while loop.time() - t0 < timeout:
        s = await asyncio.to_thread(socket_in_netns, netns)
        try:
            await loop.sock_connect(s, ("127.0.0.1", 7000))
            await loop.sock_sendall(s, b"ping\n")
            data = await asyncio.wait_for(loop.sock_recv(s, 100), 2)
            if data.startswith(b"1 ping"):
                return loop.time() - t0
        except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
            await asyncio.sleep(0.002)
        finally:
            s.close()
    raise TimeoutError("the counter never answered")


async def main(runs: int) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/deploy.py needs root")
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as tmp:
        root = Path(tmp)
        layout = imagebuild.build_busybox_layout(root / "busybox-oci")
        store = ImageStore(root / "state" / "images")
        store.load()
        t = time.monotonic()
        await store.import_path(layout.path, "busybox")
        import_ms = (time.monotonic() - t) * 1000
        prefix = f"lc-bd{uuid.uuid4().hex[:4]}-"
        life = Lifecycle(node="bench", state=StateStore(root / "state"), images=store,
                         runc=Runc(root / "runc"), cnvms_dir=root / "state" / "cnvms",
                         network=LocalNetns(prefix))
        # time the phases by wrapping the two steps deploy is made of
        phases: dict[str, list[float]] = {"netns": [], "bundle": [], "runc run": [],
                                          "deploy": [], "answering": []}
        orig_prepare, orig_attach = bundle.prepare, life.network.attach

        async def timed_prepare(*a, **kw):
            t = time.monotonic()
            try:
                return await orig_prepare(*a, **kw)
            finally:
                phases["bundle"].append(time.monotonic() - t)

        async def timed_attach(*a, **kw):
            t = time.monotonic()
            try:
                return await orig_attach(*a, **kw)
            finally:
                phases["netns"].append(time.monotonic() - t)

        lifecycle.bundle.prepare = timed_prepare  # type: ignore[assignment]
        life.network.attach = timed_attach  # type: ignore[method-assign]
        try:
            for i in range(runs + 1):  # run 0 warms caches and is not counted
                name = f"b{i}"
                t0 = time.monotonic()
                rec = await life.deploy(name, "busybox")
                t_dep = time.monotonic() - t0
                await first_answer(rec["netns"])
                t_ans = time.monotonic() - t0
                if i > 0:
                    phases["deploy"].append(t_dep)
                    phases["answering"].append(t_ans)
                    phases["runc run"].append(t_dep - phases["bundle"][-1] - phases["netns"][-1])
                else:
                    phases["bundle"].clear()
                    phases["netns"].clear()
                await life.rm(name, force=True)
        finally:
            lifecycle.bundle.prepare = orig_prepare  # type: ignore[assignment]
            for name in (await asyncio.to_thread(life.state.list, "cnvms")):
                with contextlib.suppress(Exception):
                    await life.rm(name, force=True)

    print(f"busybox image import (2 layers, 1.9 MiB): {import_ms:.0f} ms")
    print(f"deploy → service answering, {runs} runs (goal <= 500 ms):")
    print(f"  {'phase':<28}{'median':>10}{'min':>10}{'max':>10}")
    labels = {"netns": "netns (LocalNetns)", "bundle": "overlay mount + config.json",
              "runc run": "log shim + runc run -d", "deploy": "deploy total",
              "answering": "deploy → first answer"}
    for key, label in labels.items():
        xs = [x * 1000 for x in phases[key]]
        print(f"  {label:<28}{statistics.median(xs):>8.0f}ms{min(xs):>8.0f}ms"
              f"{max(xs):>8.0f}ms")
    med = statistics.median(phases["answering"]) * 1000
    print(f"goal {'met' if med <= 500 else 'MISSED'}: median {med:.0f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    asyncio.run(main(ap.parse_args().runs))
