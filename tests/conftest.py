"""Shared test fixtures: root gating, lab factory (always torn down), busybox bundle.

Integration tests need root (namespaces, runc, CRIU). Without root they are
skipped with one clear reason instead of failing deep inside a tool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cnvmlab.lab import Lab

IS_ROOT = os.geteuid() == 0
ROOT_REASON = "integration tests need root (network namespaces, runc, CRIU): run as root"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason=ROOT_REASON)
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
async def lab_factory() -> AsyncIterator[Callable[..., Any]]:
    """make(name, nodes=2, start_daemons=False) -> a Lab that is up; torn down afterwards.

    Teardown runs also when the test failed, and first cleans any leftover lab of
    the same name (a crashed earlier run).
    """
    made: list[Lab] = []

    async def make(name: str, nodes: int = 2, start_daemons: bool = False) -> Lab:
        lab = Lab(name, nodes=nodes)
        if lab.exists():
            await lab.down()
        made.append(lab)
        await lab.up(start_daemons=start_daemons)
        return lab

    try:
        yield make
    finally:
        for lab in reversed(made):
            await lab.down()


def find_busybox() -> str:
    for p in BUSYBOX_CANDIDATES:
        if os.path.exists(p):
            return p
    pytest.skip("busybox-static is not installed (run scripts/install-deps)")
    raise AssertionError  # unreachable


def make_busybox_bundle(dest: Path, args: list[str], *, netns_path: str | None = None,
                        files: dict[str, str] | None = None) -> Path:
    """A runc bundle whose rootfs is /bin/busybox plus its applets: no downloads.

    `files` maps rootfs-relative paths to contents (made executable when under bin/).
    The container joins netns_path (an existing netns, so runc/CRIU treat it as
    external) or gets a fresh one.
    """
    busybox = find_busybox()
    rootfs = dest / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        link = rootfs / "bin" / a
        if a != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    for rel, text in (files or {}).items():
        p = rootfs / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():  # e.g. an applet of the same name: never write through it
            p.unlink()
        p.write_text(text)
        if rel.startswith("bin/"):
            p.chmod(0o755)
    subprocess.run(["runc", "spec"], cwd=dest, check=True, capture_output=True)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    cfg["root"]["readonly"] = False
    cfg["hostname"] = "cnvm"
    for ns in cfg["linux"]["namespaces"]:
        if ns["type"] == "network" and netns_path:
            ns["path"] = netns_path
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    return dest


@pytest.fixture
def busybox_bundle(tmp_path: Path) -> Callable[..., Path]:
    """make(args, netns_path=None, files=None, name="bundle") -> bundle dir under tmp_path."""

    def make(args: list[str], *, netns_path: str | None = None,
             files: dict[str, str] | None = None, name: str = "bundle") -> Path:
        return make_busybox_bundle(tmp_path / name, args, netns_path=netns_path, files=files)

    return make
