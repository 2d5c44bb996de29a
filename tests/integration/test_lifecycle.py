"""The cnvm lifecycle with real runc, overlayfs and netns: deploy, exec, logs, stop/start, rm.

Drives `cnvmd.lifecycle.Lifecycle` directly (no daemon), on uvloop like the daemon,
with the minimal `LocalNetns` network (namespaces named ``lc-lt<random>-<cnvm>``).
Everything made is removed in teardown, also after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from cnvmd import proc
from cnvmd.images import ImageError, ImageStore
from cnvmd.lifecycle import Lifecycle, LocalNetns
from cnvmd.runtime import Runc
from cnvmd.state import StateStore
from proto.messages import ErrorCode, ProtoError
from tests import imagebuild

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("runc"), reason="needs runc"),
    pytest.mark.skipif(not imagebuild.BUSYBOX.is_file(), reason="needs busybox-static"),
]


@pytest.fixture
def event_loop_policy():
    """The daemon runs on uvloop: so do these tests (it has bitten subprocess code)."""
    uvloop = pytest.importorskip("uvloop")
    return uvloop.EventLoopPolicy()


def netns_list(prefix: str) -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix)) if d.is_dir() else []


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(path))]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture
async def life(tmp_path):
    prefix = f"lc-lt{uuid.uuid4().hex[:5]}-"
    state = StateStore(tmp_path / "state")
    holder: dict[str, Lifecycle] = {}

    async def in_use():
        return await holder["l"].images_in_use()

    images = ImageStore(tmp_path / "state" / "images", in_use=in_use)
    images.load()
    lc = Lifecycle(node="lct", state=state, images=images, runc=Runc(tmp_path / "runc"),
                   cnvms_dir=tmp_path / "state" / "cnvms", network=LocalNetns(prefix))
    holder["l"] = lc
    lc.test_prefix = prefix  # type: ignore[attr-defined]
    lc.test_root = tmp_path  # type: ignore[attr-defined]
    layout = imagebuild.build_busybox_layout(tmp_path / "busybox-oci")
    await images.import_path(layout.path, "busybox")
    try:
        yield lc
    finally:
        for name in list(await asyncio.to_thread(state.list, "cnvms")):
            with contextlib.suppress(Exception):
                await lc.rm(name, force=True)
        for ns in netns_list(prefix):
            await proc.run(["ip", "netns", "del", ns], check=False)
        assert mounts_under(tmp_path) == []
        assert netns_list(prefix) == []


async def ask(netns_path: str, lines: list[str], timeout: float = 5.0) -> list[str]:
    """Talk to the busybox counter on 127.0.0.1:7000 inside the cnvm's netns."""
    script = ("import socket,sys\n"
              "s=socket.create_connection(('127.0.0.1',7000),timeout=3)\n"
              "f=s.makefile('rw')\n"
              "for ln in sys.argv[1:]:\n"
              "    f.write(ln+'\\n'); f.flush(); print(f.readline().strip())\n")
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        res = await proc.run([sys.executable, "-c", script, *lines], netns=netns_path,
                             check=False, timeout=10)
        if res.returncode == 0:
            return res.stdout.splitlines()
        if loop.time() > end:
            raise AssertionError(f"counter did not answer: {res.stderr.strip()}")
        await asyncio.sleep(0.01)


async def test_deploy_exec_logs_stop_start_rm(life):
    t0 = time.monotonic()
    phases: list[str] = []
    rec = await life.deploy("web1", "busybox", memory="64M", cpus="0.5", env=["GREETING=hi"],
                            cmd=["sh", "-c", "echo $GREETING from $(hostname); exec /bin/counter"],
                            progress=phases.append)
    t_deployed = time.monotonic() - t0
    assert phases == ["network", "rootfs", "start"]
    assert await ask(rec["netns"], ["a", "hostname"]) == ["1 a", "2 web1"]
    t_answer = time.monotonic() - t0
    print(f"\ndeploy {t_deployed * 1000:.0f} ms, deploy→service answering "
          f"{t_answer * 1000:.0f} ms")
    assert rec["desired"] == "running" and rec["memory"] == 64 << 20
    assert rec["netns"].startswith(f"/run/netns/{life.test_prefix}")

    res = await life.exec("web1", ["sh", "-c", "echo data > /root/file; exit 5"])
    assert res["exit_code"] == 5
    upper = life.paths("web1").upper
    assert (upper / "root" / "file").read_text() == "data\n"

    for _ in range(100):
        if "hi from web1" in await life.logs("web1"):
            break
        await asyncio.sleep(0.02)
    assert (await life.logs("web1", tail=1)).strip() == "hi from web1"

    # the image cannot go while web1 uses it
    with pytest.raises(ImageError) as e:
        await life.images.remove("busybox")
    assert e.value.code == ErrorCode.CONFLICT
    # a running cnvm is not removed without force; a duplicate name is refused
    with pytest.raises(ProtoError) as e:
        await life.rm("web1")
    assert e.value.code == ErrorCode.CONFLICT
    with pytest.raises(ProtoError) as e:
        await life.deploy("web1", "busybox")
    assert e.value.code == ErrorCode.ALREADY_EXISTS

    await life.stop("web1", timeout=1)
    assert await life.runc.state("web1") is None
    assert mounts_under(life.paths("web1").dir) == []
    assert (await life.record("web1"))["desired"] == "stopped"
    with pytest.raises(ProtoError):
        await life.exec("web1", ["true"])

    rec = await life.start("web1")
    assert await ask(rec["netns"], ["again"]) == ["1 again"]
    res = await life.exec("web1", ["cat", "/root/file"])
    assert res["stdout"] == "data\n"
    assert (await life.logs("web1")).count("hi from web1") == 2

    # follow: the existing log, then new output, ends when the cnvm is removed
    got: list[str] = []

    async def follow():
        async for chunk in life.follow("web1", interval=0.05):
            got.append(chunk)

    task = asyncio.create_task(follow())
    await life.exec("web1", ["sh", "-c", "echo later > /proc/1/fd/1"])
    for _ in range(100):
        if "later" in "".join(got):
            break
        await asyncio.sleep(0.02)
    assert "later" in "".join(got)

    await life.rm("web1", force=True)
    await asyncio.wait_for(task, 5)
    assert await life.record("web1") is None
    assert not life.paths("web1").dir.exists()
    assert netns_list(life.test_prefix) == []
    await life.images.remove("busybox")
    assert life.images.list() == []


async def test_bad_input_changes_nothing(life, tmp_path):
    root = life.test_root
    before = (tree(root / "state"), netns_list(life.test_prefix))
    cases = [
        (dict(name="Bad_Name", image="busybox"), ErrorCode.INVALID_ARGUMENT, "bad cnvm name"),
        (dict(name="x", image="nope"), ErrorCode.NOT_FOUND, "unknown image"),
        (dict(name="x", image="busybox", memory="12Q"), ErrorCode.INVALID_ARGUMENT,
         "bad memory size"),
        (dict(name="x", image="busybox", memory="1k"), ErrorCode.INVALID_ARGUMENT,
         "too small"),
        (dict(name="x", image="busybox", cpus="lots"), ErrorCode.INVALID_ARGUMENT, "CPU"),
        (dict(name="x", image="busybox", env=["=x"]), ErrorCode.INVALID_ARGUMENT, "environment"),
        (dict(name="x", image="busybox", hostname="Not Valid"), ErrorCode.INVALID_ARGUMENT,
         "hostname"),
        (dict(name="x", image="busybox", ip="10.0.0.9"), ErrorCode.UNAVAILABLE, "network"),
        (dict(name="x", image="busybox", cmd=["no-such-cmd"]), ErrorCode.INVALID_ARGUMENT,
         "not found in the image"),
    ]
    for kw, code, text in cases:
        with pytest.raises(ProtoError) as e:
            await life.deploy(**kw)
        assert e.value.code == code, kw
        assert text in e.value.message, (kw, e.value.message)
    assert (tree(root / "state"), netns_list(life.test_prefix)) == before

    # bad images: corrupt layer, missing index.json (uncompressed layers: blobs the
    # store does not hold yet, so they are read and verified)
    bad = imagebuild.build_busybox_layout(tmp_path / "bad", gzip_layers=(False, False))
    blob = bad.path / "blobs" / "sha256" / bad.layer_digests[0][7:]
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ImageError, match="digest mismatch"):
        await life.images.import_path(bad.path, "bad")
    (bad.path / "index.json").unlink()
    with pytest.raises(ImageError, match=r"index\.json is missing"):
        await life.images.import_path(bad.path, "bad")
    assert (tree(root / "state"), netns_list(life.test_prefix)) == before
    assert [i.names for i in life.images.list()] == [["busybox"]]

    for op in (life.stop("ghost"), life.start("ghost"), life.rm("ghost"),
               life.exec("ghost", ["true"]), life.logs("ghost")):
        with pytest.raises(ProtoError) as e:
            await op
        assert e.value.code == ErrorCode.NOT_FOUND


async def test_exited_cnvm_can_be_started_again(life):
    rec = await life.deploy("short", "busybox", cmd=["sh", "-c", "echo ran; exit 0"])
    for _ in range(100):
        st = await life.runc.state("short")
        if st is None or st.status == "stopped":
            break
        await asyncio.sleep(0.02)
    rec = await life.start("short")
    assert rec["desired"] == "running"
    for _ in range(100):
        if (await life.logs("short")).count("ran") == 2:
            break
        await asyncio.sleep(0.02)
    assert (await life.logs("short")).count("ran") == 2
