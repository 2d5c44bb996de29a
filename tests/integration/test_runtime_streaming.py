"""Runc.checkpoint's streaming modes across lab hosts: --page-server and --lazy-pages.

Memory goes node1 -> node2 over the lab underlay (198.18.0.0/24), never through
the root namespace. The container is a ticker whose log must continue on node2.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from cnvmd import netlink
from cnvmd.criu import LAZY_PIPE_MIN, read_pipe_max_size
from cnvmd.runtime import start_log_shim
from cnvmlab.lab import Lab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAB = "lb"
TICKER = """#!/bin/sh
big=$(seq 1 20000)
i=0
while :; do echo "tick $i ${#big}"; i=$((i+1)); sleep 0.1; done
"""


def _tick_lines(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith("tick")]


async def _ticks(log: Path, timeout: float = 10) -> list[str]:
    for _ in range(int(timeout / 0.05)):
        lines = _tick_lines(log)
        if lines:
            return lines
        await asyncio.sleep(0.05)
    return []


async def _setup(lab: Lab, busybox_bundle, tmp_path: Path):
    """Ticker running on node1 in netns lb-node1-s; node2 gets lb-node2-s and bundle2."""
    ns1, ns2 = "lb-node1-s", "lb-node2-s"
    for ns in (ns1, ns2):
        await netlink.netns_add(ns)
    bundle1 = busybox_bundle(["/bin/ticker"], netns_path=str(netlink.netns_path(ns1)),
                             files={"bin/ticker": TICKER}, name="b1")
    bundle2 = tmp_path / "b2"
    bundle2.mkdir()
    cfg = json.loads((bundle1 / "config.json").read_text())
    cfg["root"]["path"] = str(bundle1 / "rootfs")
    for ns in cfg["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = str(netlink.netns_path(ns2))
    (bundle2 / "config.json").write_text(json.dumps(cfg))
    log1 = tmp_path / "l1.log"
    pipe = await start_log_shim(log1)
    try:
        await lab.runc("node1").run("s1", bundle1, stdio=pipe.write_fd, work_dir=tmp_path / "w1")
    finally:
        pipe.close()
    assert await _ticks(log1)
    return bundle2, log1


def _copy_images(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


async def _restore_on_node2(lab: Lab, bundle2: Path, images: Path, work: Path, log1: Path,
                            tmp_path: Path, *, lazy: bool = False) -> None:
    log2 = tmp_path / "l2.log"
    pipe = await start_log_shim(log2)
    try:
        st = await lab.runc("node2").restore("s1", bundle2, images, work_dir=work,
                                             stdio=pipe.write_fd, tcp_established=False,
                                             lazy_pages=lazy, timeout=60)
    finally:
        pipe.close()
    assert st.status == "running"
    new = await _ticks(log2)
    old = _tick_lines(log1)
    assert new and int(new[0].split()[1]) == int(old[-1].split()[1]) + 1
    assert new[0].split()[2] == old[-1].split()[2]  # the big variable survived


async def test_streamed_stop_and_copy_through_page_server(lab_factory, busybox_bundle,
                                                          tmp_path: Path):
    lab = await lab_factory(LAB, nodes=2)
    bundle2, log1 = await _setup(lab, busybox_bundle, tmp_path)
    target = tmp_path / "target-images"
    target.mkdir()
    r, w = os.pipe()
    runc1 = lab.runc("node1")
    server = await lab.spawn("node2", [
        runc1.criu, "page-server", "--images-dir", str(target), "--address", "198.18.0.12",
        "--port", "27001", "--status-fd", str(w)], pass_fds=(w,))
    os.close(w)
    try:
        assert await asyncio.wait_for(asyncio.to_thread(os.read, r, 1), 20) == b"\0"
    finally:
        os.close(r)
    await runc1.checkpoint("s1", tmp_path / "src-images", work_dir=tmp_path / "wd",
                           tcp_established=False, page_server="198.18.0.12:27001")
    assert await asyncio.wait_for(server.wait(), 20) == 0
    assert any(target.glob("pages-*.img")) and not any((tmp_path / "src-images").glob("pages-*"))
    _copy_images(tmp_path / "src-images", target)
    await _restore_on_node2(lab, bundle2, target, tmp_path / "wr", log1, tmp_path)


async def test_lazy_pages_post_copy(lab_factory, busybox_bundle, tmp_path: Path):
    if read_pipe_max_size() < LAZY_PIPE_MIN:
        pytest.skip(f"fs.pipe-max-size < {LAZY_PIPE_MIN}: CRIU's lazy page server fails "
                    "(see platform notes)")
    lab = await lab_factory(LAB, nodes=2)
    bundle2, log1 = await _setup(lab, busybox_bundle, tmp_path)
    runc1 = lab.runc("node1")
    src_images, target, lazy_work = (tmp_path / "src-images", tmp_path / "target",
                                     tmp_path / "lazy-work")
    target.mkdir()
    lazy_work.mkdir()
    r, w = os.pipe()
    dump = asyncio.create_task(runc1.checkpoint(
        "s1", src_images, work_dir=tmp_path / "wd", tcp_established=False, lazy_pages=True,
        page_server="198.18.0.11:27002", status_fd=w))
    try:
        ready = asyncio.create_task(asyncio.to_thread(os.read, r, 1))
        done, _ = await asyncio.wait({dump, ready}, timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, dump.exception() if dump.done() else "no status from CRIU"
        assert ready.result() == b"\0"
    finally:
        os.close(w)
    os.close(r)
    _copy_images(src_images, target)
    lazy = await lab.spawn("node2", [
        runc1.criu, "lazy-pages", "--page-server", "--address", "198.18.0.11", "--port",
        "27002", "--images-dir", str(target), "--work-dir", str(lazy_work)])
    for _ in range(200):
        if (lazy_work / "lazy-pages.socket").exists():
            break
        await asyncio.sleep(0.02)
    await _restore_on_node2(lab, bundle2, target, lazy_work, log1, tmp_path, lazy=True)
    await asyncio.wait_for(dump, 30)  # the source exits once every page was served
    assert await runc1.state("s1") is None
    await asyncio.wait_for(lazy.wait(), 30)
