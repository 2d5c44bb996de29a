"""runc wrapper: lifecycle, exec exit codes, log shims, errors that carry CRIU's words."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cnvmd import netlink
from cnvmd.runtime import Runc, RuncError, mounts_under, start_log_shim

pytestmark = pytest.mark.integration

TICKER = """#!/bin/sh
i=0
while :; do echo "tick $i"; i=$((i+1)); sleep 0.1; done
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _wait(pred, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


@pytest.fixture
async def runc_env(tmp_path: Path):
    """A private runc root and a lab-prefixed netns for the container; all removed after."""
    ns = "lb-rt"
    await netlink.netns_del(ns)
    await netlink.netns_add(ns)
    runc = Runc(tmp_path / "runc-root")
    try:
        yield runc, str(netlink.netns_path(ns))
    finally:
        for c in await runc.list():
            await runc.destroy(c.id)
        await netlink.netns_del(ns)


async def test_lifecycle_exec_and_log_shim(runc_env, busybox_bundle, tmp_path: Path):
    runc, ns = runc_env
    bundle = busybox_bundle(["/bin/ticker"], netns_path=ns, files={"bin/ticker": TICKER})
    log = tmp_path / "logs" / "c.log"
    pipe = await start_log_shim(log)
    try:
        st = await runc.run("rt1", bundle, stdio=pipe.write_fd, work_dir=tmp_path / "w")
    finally:
        pipe.close()
    assert st.status == "running" and st.pid > 0
    assert [c.id for c in await runc.list()] == ["rt1"]

    res = await runc.exec("rt1", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert res.returncode == 7 and res.stdout == "out\n" and "err" in res.stderr
    res = await runc.exec("rt1", ["cat"], input=b"piped")
    assert (res.returncode, res.stdout) == (0, "piped")

    assert await _wait(lambda: "tick 3" in log.read_text())
    assert _alive(pipe.shim_pid)
    await runc.kill("rt1", "KILL")
    # the shim is not our child and exits by itself once the container's write end is gone
    assert await _wait(lambda: not _alive(pipe.shim_pid))
    await runc.destroy("rt1")
    assert await runc.state("rt1") is None
    await runc.destroy("rt1")  # idempotent


async def test_run_failure_carries_runc_message(runc_env, busybox_bundle, tmp_path: Path):
    runc, ns = runc_env
    bundle = busybox_bundle(["/bin/does-not-exist"], netns_path=ns)
    with pytest.raises(RuncError) as ei:
        await runc.run("rt2", bundle, work_dir=tmp_path / "w")
    assert "does-not-exist" in str(ei.value) or "no such file" in str(ei.value).lower()


async def test_restore_failure_carries_criu_log_and_cleans_up(runc_env, busybox_bundle,
                                                              tmp_path: Path):
    runc, ns = runc_env
    bundle = busybox_bundle(["sleep", "100"], netns_path=ns)
    empty = tmp_path / "no-images"
    empty.mkdir()
    # runc itself only checks descriptors.json; CRIU then finds no images
    (empty / "descriptors.json").write_text('["/dev/null","/dev/null","/dev/null"]')
    with pytest.raises(RuncError) as ei:
        await runc.restore("rt3", bundle, empty, work_dir=tmp_path / "w", timeout=60)
    msg = str(ei.value)
    assert "restore.log" in msg and "Error" in msg, msg
    assert await runc.state("rt3") is None
    assert not (runc.root / "rt3").exists()
    assert mounts_under(tmp_path) == []


@pytest.mark.slow
async def test_checkpoint_leave_running_then_restore_elsewhere(runc_env, busybox_bundle,
                                                               tmp_path: Path):
    """Pre-dumps aren't possible here (no soft-dirty); leave-running + restore under a new id
    in a new root proves image dir, work dir and log hand-over independently of TCP."""
    runc, ns = runc_env
    bundle = busybox_bundle(["/bin/ticker"], netns_path=ns, files={"bin/ticker": TICKER})
    log1, log2 = tmp_path / "l1.log", tmp_path / "l2.log"
    p1 = await start_log_shim(log1)
    try:
        await runc.run("rt4", bundle, stdio=p1.write_fd, work_dir=tmp_path / "w")
    finally:
        p1.close()
    assert await _wait(lambda: "tick 2" in log1.read_text())
    img = tmp_path / "img"
    await runc.checkpoint("rt4", img, work_dir=tmp_path / "wd", tcp_established=False,
                          leave_running=True)
    assert (await runc.state("rt4")).status == "running"
    assert (img / "descriptors.json").exists() and any(img.glob("pages-*.img"))
    await runc.destroy("rt4")
    assert await _wait(lambda: not _alive(p1.shim_pid))
    last = [ln for ln in log1.read_text().splitlines() if ln.startswith("tick")][-1]

    other = Runc(tmp_path / "runc-root2")
    p2 = await start_log_shim(log2)
    try:
        st = await other.restore("rt4", bundle, img, work_dir=tmp_path / "wr",
                                 stdio=p2.write_fd, tcp_established=False)
        assert st.status == "running"
        assert await _wait(lambda: "tick" in log2.read_text())
        first = log2.read_text().splitlines()[0]
        # restored from the checkpoint: continues from there, not from 0
        assert int(first.split()[1]) >= 2
        assert int(first.split()[1]) <= int(last.split()[1]) + 1
    finally:
        p2.close()
        await other.destroy("rt4")
    assert await _wait(lambda: not _alive(p2.shim_pid))
