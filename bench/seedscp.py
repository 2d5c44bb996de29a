"""The seed's teleport method, for real, as the baseline of bench/teleport.py (issue 16).

The seed moved a container with three tools and no daemon: `runc checkpoint` into a
directory, OpenSSH `scp` of that directory to the other host, `runc restore` there.
This module does exactly that between two lab nodes, outside cnvmd:

* the container is a plain runc container (runc root, bundle and netns of its own —
  cnvmd does not know it), on the lab's overlay bridge `cnvm0` of its node, with the
  same busybox counter image and the same memory dirtier as the cnvm of the bench;
* an OpenSSH server runs in every node's namespace (port 2222 on the underlay address,
  a throw-away host key and client key), and `scp -c aes128-gcm@openssh.com` copies
  the checkpoint directory over the underlay — the path (and tc shaping) cnvmd's own
  peer channels use;
* on the target, the container's netns is made before the freeze (that is in the
  seed's favour: only checkpoint, copy and restore are inside the frozen window), with
  CRIU's network-lock rules loaded before its link comes up (or the client gets a RST),
  and a gratuitous ARP is sent after the restore; the source's neighbour entries are
  copied to the target before the freeze, as cnvmd does.

The root filesystem is present on both nodes beforehand (the seed's hosts had the
image); only the checkpoint travels. Frozen: from `runc checkpoint` to the GARP.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnvmd import bundle, netlink, proc
from cnvmd.migration import netmove
from cnvmd.runtime import LogPipe, Runc, start_log_shim
from cnvmlab.lab import Lab
from tests import imagebuild

SSH_PORT = 2222
CIPHER = "aes128-gcm@openssh.com"
NAME = "seed"
MAC = "02:cd:5e:ed:00:01"  # one MAC on both nodes, as a cnvm keeps its MAC

SSHD_CONFIG = """\
Port {port}
ListenAddress {addr}
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Ciphers {cipher}
Subsystem sftp internal-sftp
"""


@dataclass
class SeedHop:
    """What one seed teleport measured (ms, bytes)."""

    frozen_ms: float
    checkpoint_ms: float
    copy_ms: float
    restore_ms: float
    bytes: int
    steps: list[dict[str, Any]] = field(default_factory=list)


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not p.is_symlink())


class SeedLab:
    """The seed container and the tools it needs, on the nodes of an existing lab.

    `ip` must be reserved in cnvmd's IPAM by the caller (it is on cnvmd's overlay).
    Everything made here lives under `tmp` or in namespaces named `<lab>-sd-<node>`;
    `down()` removes it all (the lab's own teardown removes the sshd processes too).
    """

    def __init__(self, lab: Lab, tmp: Path, ip: str, prefix: int = 24) -> None:
        self.lab = lab
        self.tmp = tmp / "seed"
        self.ip = ip
        self.prefix = prefix
        self.sshd: dict[str, asyncio.subprocess.Process] = {}
        self.logs: list[LogPipe] = []
        self.where: str | None = None

    # ---- names and paths

    def netns(self, node: str) -> str:
        return f"{self.lab.name}-sd-{node[4:]}"

    def host_veth(self, node: str) -> str:
        return f"sd{node[4:]}h"

    def runc(self, node: str) -> Runc:
        return Runc(self.tmp / node / "runc", netns=self.lab.netns(node))

    def bundle(self, node: str) -> Path:
        return self.tmp / node / "bundle"

    # ---- set-up

    async def up(self, hog: Path | None, memory: int) -> None:
        """Bundles on both nodes, sshd on both, the container started on node1 (the
        dirtier, if any, is started by `start_dirtier`)."""
        key = self.tmp / "id_ed25519"
        self.tmp.mkdir(parents=True, exist_ok=True)
        await proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        for node in ("node1", "node2"):
            await self._bundle(node, hog, memory)
            await self._sshd(node, key)
        await self._make_netns("node1")
        log = await start_log_shim(self.tmp / "node1" / "console.log")
        self.logs.append(log)
        try:
            await self.runc("node1").run(NAME, self.bundle("node1"), stdio=log.write_fd,
                                         work_dir=self.tmp / "node1")
        finally:
            log.close()
        await self._link_up("node1")
        self.where = "node1"

    async def start_dirtier(self, mib: int, rate: int) -> None:
        assert self.where
        await self.runc(self.where).exec(NAME, ["sh", "-c", f"/hog {mib} {rate} </dev/null "
                                                ">/dev/null 2>&1 &"])

    async def resident(self) -> int:
        assert self.where
        res = await self.runc(self.where).exec(NAME, [
            "sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null | grep VmRSS"])
        return sum(int(ln.split()[1]) * 1024 for ln in res.stdout.splitlines() if ln.strip())

    async def _bundle(self, node: str, hog: Path | None, memory: int) -> None:
        b = self.bundle(node)
        rootfs = b / "rootfs"

        def unpack() -> None:
            rootfs.mkdir(parents=True, exist_ok=True)
            for layer in imagebuild.busybox_layers():
                with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
                    tf.extractall(rootfs, filter="tar")
            if hog is not None:
                shutil.copy2(hog, rootfs / "hog")

        await asyncio.to_thread(unpack)
        image_cfg = imagebuild.image_config([])["config"]
        cfg = bundle.runc_config(name=NAME, image_config=image_cfg, node=f"sd-{node}",
                                 netns_path=self.netns(node), rootfs=rootfs, memory=memory,
                                 cgroup_root=f"/cnvm-{self.lab.name}")  # goes with the lab
        (b / "config.json").write_text(json.dumps(cfg))

    async def _sshd(self, node: str, key: Path) -> None:
        d = self.tmp / node / "ssh"
        d.mkdir(parents=True, exist_ok=True)
        await proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(d / "host_ed25519")])
        def files() -> None:
            shutil.copy(f"{key}.pub", d / "authorized_keys")
            (d / "sshd_config").write_text(SSHD_CONFIG.format(
                port=SSH_PORT, addr=self.lab.underlay_ip(node), dir=d, cipher=CIPHER))
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep dir

        await asyncio.to_thread(files)
        p = await self.lab.spawn(node, ["/usr/sbin/sshd", "-D", "-e", "-f",
                                        str(d / "sshd_config")],
                                 stdout=asyncio.subprocess.DEVNULL,
                                 stderr=asyncio.subprocess.DEVNULL)
        self.sshd[node] = p
        end = time.monotonic() + 10
        while True:  # until it accepts connections
            res = await proc.run(["ss", "-ltnH", f"sport = :{SSH_PORT}"],
                                 netns=self.lab.netns(node), check=False, timeout=5)
            if res.stdout.strip():
                return
            if p.returncode is not None or time.monotonic() > end:
                raise RuntimeError(f"sshd on {node} did not start")
            await asyncio.sleep(0.1)

    async def _make_netns(self, node: str, *, prelock: bool = False) -> None:
        """The container's netns with its veth on the node's cnvm0 bridge, link down."""
        ns, hv = self.netns(node), self.host_veth(node)
        await proc.run(["ip", "netns", "add", ns])
        if prelock:
            await netlink.prelock(ns)
        node_ns = self.lab.netns(node)
        await proc.run(["ip", "link", "add", hv, "type", "veth", "peer", "name", "eth0",
                        "address", MAC, "netns", ns], netns=node_ns)
        await proc.run(["ip", "link", "set", hv, "master", "cnvm0", "up"], netns=node_ns)
        await proc.run(["ip", "addr", "add", f"{self.ip}/{self.prefix}", "dev", "eth0"],
                       netns=ns)
        await proc.run(["ip", "link", "set", "lo", "up"], netns=ns)
        if prelock:
            # CRIU reconnects the TCP sockets in repair mode during the restore: that
            # needs the address routable, so the link is up, behind CRIU's lock.
            await self._link_up(node)

    async def _link_up(self, node: str) -> None:
        await proc.run(["ip", "link", "set", "eth0", "up"], netns=self.netns(node))

    async def _drop_netns(self, node: str) -> None:
        with contextlib.suppress(Exception):
            await proc.run(["ip", "link", "del", self.host_veth(node)],
                           netns=self.lab.netns(node), check=False)
        with contextlib.suppress(Exception):
            await proc.run(["ip", "netns", "del", self.netns(node)], check=False)

    # ---- the hop

    async def hop(self) -> SeedHop:
        """Move the container to the other node the seed's way; returns the timings."""
        src = self.where
        assert src
        dst = "node2" if src == "node1" else "node1"
        images_src = self.tmp / src / "images"
        images_dst = self.tmp / dst / "images"
        for d in (images_src, images_dst):
            shutil.rmtree(d, ignore_errors=True)
        await self._make_netns(dst, prelock=True)
        # cnvmd's neighbour handover, given to the seed too: the restored cnvm reaches
        # its peers without an ARP round trip (a client off the nodes' flood lists
        # would never see that ARP request)
        await netmove.add_neighbors(self.netns(dst), await netmove.neighbors(self.netns(src)))
        steps: list[dict[str, Any]] = []

        def step(side: str, name: str, t0: float, t1: float) -> None:
            steps.append({"side": side, "step": name, "start_ms": round((t0 - tf) * 1000, 1),
                          "ms": round((t1 - t0) * 1000, 1), "clock": "bench"})

        tf = time.monotonic()
        await self.runc(src).checkpoint(NAME, images_src, work_dir=self.tmp / src / "work",
                                        tcp_established=True)
        t1 = time.monotonic()
        step("source", "runc checkpoint", tf, t1)
        # scp from the source host's namespace to the target's sshd, over the underlay
        key = self.tmp / "id_ed25519"
        res = await proc.run([
            "scp", "-q", "-r", "-c", CIPHER, "-P", str(SSH_PORT), "-i", str(key),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            str(images_src), f"root@{self.lab.underlay_ip(dst)}:{images_dst}"],
            netns=self.lab.netns(src), check=False, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"scp failed: {res.stderr.strip()}")
        t2 = time.monotonic()
        step("source", "scp", t1, t2)
        log = await start_log_shim(self.tmp / dst / "console.log")
        self.logs.append(log)
        try:
            await self.runc(dst).restore(NAME, self.bundle(dst), images_dst,
                                         work_dir=self.tmp / dst / "work", stdio=log.write_fd)
        finally:
            log.close()
        t3 = time.monotonic()
        step("target", "runc restore", t2, t3)
        await netlink.announce(self.netns(dst), "eth0", self.ip)
        t4 = time.monotonic()
        step("target", "GARP", t3, t4)
        self.where = dst
        n = await asyncio.to_thread(_dir_bytes, images_src)
        await self._drop_netns(src)
        return SeedHop(frozen_ms=(t4 - tf) * 1000, checkpoint_ms=(t1 - tf) * 1000,
                       copy_ms=(t2 - t1) * 1000, restore_ms=(t3 - t2) * 1000, bytes=n,
                       steps=steps)

    # ---- teardown

    async def down(self) -> None:
        for node in ("node1", "node2"):
            r = self.runc(node)
            with contextlib.suppress(Exception):
                await r.destroy(NAME)
            await self._drop_netns(node)
        for p in self.sshd.values():
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 5)
        for log in self.logs:
            with contextlib.suppress(Exception):
                os.kill(log.shim_pid, 9)
        shutil.rmtree(self.tmp, ignore_errors=True)
