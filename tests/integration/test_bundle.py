"""Real runc on a real overlay: import the busybox OCI image, mount, run, talk, tear down.

Root only. Each test uses its own temp state dir and runc root and a network namespace
named ``lc-<random>``; everything (container, mounts, netns) is removed in `finally`,
also when an assertion fails.
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

from cnvmd import bundle, proc
from cnvmd.images import ImageStore, is_whiteout
from cnvmd.runtime import Runc, start_log_shim
from tests import imagebuild

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("runc"), reason="needs runc"),
    pytest.mark.skipif(not imagebuild.BUSYBOX.is_file(), reason="needs busybox-static"),
]


def mounts_under(path: Path) -> list[str]:
    base = str(path)
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(base)]


def memory_limit(cgroup: str) -> int | None:
    p = Path("/sys/fs/cgroup/memory") / cgroup.lstrip("/") / "memory.limit_in_bytes"
    return int(p.read_text()) if p.exists() else None


@contextlib.asynccontextmanager
async def netns():
    name = f"lc-bt-{uuid.uuid4().hex[:6]}"
    await proc.run(["ip", "netns", "add", name])
    try:
        await proc.run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        await proc.run(["ip", "netns", "del", name], check=False)


async def ask(ns: str, lines: list[str], port: int = 7000, timeout: float = 5.0) -> list[str]:
    """Talk to the counter from the cnvm's netns (loopback only), retrying until it listens."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(('127.0.0.1',{port}),timeout=3)\n"
        "f=s.makefile('rw')\n"
        "for ln in sys.argv[1:]:\n"
        "    f.write(ln+'\\n'); f.flush(); print(f.readline().strip())\n"
    )
    while True:
        res = await proc.run([sys.executable, "-c", script, *lines], netns=ns, check=False,
                             timeout=10)
        if res.returncode == 0:
            return res.stdout.splitlines()
        if loop.time() > end:
            raise AssertionError(f"counter did not answer: {res.stderr.strip()}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def env(tmp_path):
    """An image store with the busybox image, a cnvms dir and a runc root, all temporary."""
    store = ImageStore(tmp_path / "images")
    store.load()
    layout = imagebuild.build_busybox_layout(tmp_path / "busybox-oci")
    t0 = time.monotonic()
    img = await store.import_path(layout.path, "busybox")
    import_s = time.monotonic() - t0
    runc = Runc(tmp_path / "runc")
    made: list[tuple[str, bundle.BundlePaths]] = []
    yield {"store": store, "img": img, "runc": runc, "cnvms": tmp_path / "cnvms",
           "made": made, "import_s": import_s, "layout": layout}
    for cid, paths in made:
        with contextlib.suppress(Exception):
            await runc.destroy(cid)
        await bundle.destroy(paths)
    assert mounts_under(tmp_path) == []


async def start(env, name: str, ns: str | None, **kw) -> tuple[str, bundle.BundlePaths]:
    img = env["img"]
    paths = await bundle.prepare(env["cnvms"], name, img.layer_dirs, img.config,
                                 netns_path=ns, node="test", **kw)
    cid = f"lc-{name}"
    env["made"].append((cid, paths))
    pipe = await start_log_shim(paths.console_log)
    try:
        await env["runc"].run(cid, paths.dir, stdio=pipe.write_fd)
    finally:
        pipe.close()
    return cid, paths


async def test_run_busybox_counter_upper_dir_and_logs(env):
    async with netns() as ns:
        t0 = time.monotonic()
        cid, paths = await start(env, "bb1", ns, memory=bundle.parse_memory("64M"), cpus=0.5,
                                 cmd=["sh", "-c", "echo counter starting; exec /bin/counter"])
        t_run = time.monotonic() - t0
        assert await ask(ns, ["hello", "hostname", "x"]) == ["1 hello", "2 bb1", "3 x"]
        t_answer = time.monotonic() - t0
        print(f"\nimport {env['import_s'] * 1000:.0f} ms; prepare+run {t_run * 1000:.0f} ms; "
              f"deploy→answering {t_answer * 1000:.0f} ms")

        # a file written inside lands in the upper dir; the lower layers are untouched
        res = await env["runc"].exec(cid, ["sh", "-c", "echo inside > /root/made-here; "
                                          "rm /etc/motd; cat /etc/hostname"])
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "bb1"
        assert (paths.upper / "root" / "made-here").read_text() == "inside\n"
        assert is_whiteout(paths.upper / "etc" / "motd")
        assert (env["img"].layer_dirs[1] / "etc" / "motd").is_file()

        # the image's whiteouts are honoured inside the container
        res = await env["runc"].exec(cid, ["sh", "-c", "ls /opt/data; test -e /etc/deleteme"])
        assert res.stdout.split() == ["new.txt"] and res.returncode == 1

        # exit codes pass through runc exec
        assert (await env["runc"].exec(cid, ["sh", "-c", "exit 7"])).returncode == 7

        # limits reached the cgroup
        st = await env["runc"].state(cid)
        assert st is not None and st.status == "running"
        limit = memory_limit("/cnvm/test/bb1")
        assert limit in (None, 64 << 20)

        # stdout goes through the log shim to the console log
        for _ in range(100):
            if "counter starting" in paths.console_log.read_text():
                break
            await asyncio.sleep(0.02)
        assert "counter starting" in paths.console_log.read_text()

        # stop; the upper dir (the cnvm's state) survives a remount
        await env["runc"].destroy(cid)
        await bundle.unmount_rootfs(paths)
        assert not bundle.is_mounted(paths.rootfs)
        await bundle.mount_rootfs(paths, env["img"].layer_dirs)
        assert (paths.rootfs / "root" / "made-here").read_text() == "inside\n"
        assert not (paths.rootfs / "etc" / "motd").exists()


async def test_run_without_custom_netns(env):
    cid, _ = await start(env, "bb2", None)
    res = await env["runc"].exec(
        cid, ["sh", "-c", "sleep 0.2; echo ping | nc 127.0.0.1 7000; ip -o link | wc -l"])
    assert res.returncode == 0, res.stderr
    out = res.stdout.split("\n")
    assert out[0] == "1 ping"
    assert out[1].strip() == "1"  # a fresh netns: loopback only


async def test_overlay_matches_umoci_flattening(env, tmp_path):
    """Cross-check our per-layer unpack + overlay against umoci's flattened rootfs."""
    if not shutil.which("umoci"):
        pytest.skip("umoci not installed")
    flat = tmp_path / "flat"
    await proc.run(["umoci", "raw", "unpack", "--image", f"{env['layout'].path}:latest",
                    str(flat)], timeout=120)
    paths = bundle.bundle_paths(env["cnvms"], "cmp")
    env["made"].append(("lc-none", paths))
    await bundle.mount_rootfs(paths, env["img"].layer_dirs)

    def tree(root: Path) -> dict[str, tuple[int, int, str]]:
        out = {}
        for p in root.rglob("*"):
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size if p.is_file() else 0, link)
        return out

    assert tree(paths.rootfs) == tree(flat)


async def test_bad_command_fails_prepare_cleanly(env):
    img = env["img"]
    with pytest.raises(bundle.BundleError, match="not found in the image"):
        await bundle.prepare(env["cnvms"], "bad", img.layer_dirs, img.config,
                             cmd=["no-such-program"])
    paths = bundle.bundle_paths(env["cnvms"], "bad")
    env["made"].append(("lc-bad", paths))
    assert not bundle.is_mounted(paths.rootfs)


@pytest.mark.parametrize("kernel", [None, "6.1.0"])
async def test_many_layers_mount_in_order(tmp_path, kernel, monkeypatch):
    """Twelve layers (like a typical Docker image): too long for one 255-byte option of
    the new mount API (mount(8) on Debian 13). Real mounts, both long-list shapes:
    ``lowerdir+=`` per layer (kernel >= 6.8) and relative names from the layers dir."""
    if kernel is not None:
        if not bundle._kernel_at_least(6, 8):
            pytest.skip("this kernel is older than 6.8: the default shape is the fallback")
        real = bundle._overlay_options
        monkeypatch.setattr(bundle, "_overlay_options",
                            lambda p, dirs: real(p, dirs, kernel=kernel))
    layers = tmp_path / "layers"
    dirs = []
    for i in range(12):
        d = layers / (f"{i:02d}" + "a" * 62)  # sha256-long names, bottom first
        (d / "etc").mkdir(parents=True)
        (d / "etc" / "who").write_text(f"layer {i}\n")
        (d / f"only{i}").write_text("x")
        dirs.append(d)
    paths = bundle.bundle_paths(tmp_path / "cnvms", "many")
    opts, cwd = bundle._overlay_options(paths, dirs)
    assert ("lowerdir+=" in opts) == (kernel is None) and (cwd is not None) == (kernel is not None)
    await bundle.mount_rootfs(paths, dirs)
    try:
        assert (paths.rootfs / "etc" / "who").read_text() == "layer 11\n"  # the top wins
        assert all((paths.rootfs / f"only{i}").exists() for i in range(12))
    finally:
        await bundle.unmount_rootfs(paths)
    assert mounts_under(tmp_path) == []
