"""THE CANARY (issue 2 §5): a live TCP connection survives a cross-host checkpoint/restore.

A busybox runc container serving an in-memory counter runs in its own netns
(veth into bridge cnvm0 of lab host node1). The nodes' bridges — and the client
host's — are joined by VXLAN over the underlay (head-end replication, learning
on). The client holds ONE TCP connection and asks for the next number every
few ms. We checkpoint on node1 with --tcp-established, rebuild the cnvm netns
on node2 with the same IP/MAC, pre-locked before its veth comes up, restore,
send a gratuitous ARP, and the same connection keeps counting with no gap.
The container's log follows it (stdio through log-shim pipes).

Every later migration change must keep this green.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from cnvmd import netlink
from cnvmd.runtime import start_log_shim
from cnvmlab.lab import Lab
from tests.teleportlab import CLIENT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAB = "lb"
VNI = 42
VXLAN_PORT = 4789
OVERLAY_MTU = 1450  # 1500 underlay - 50 bytes VXLAN/UDP/IP/Ethernet
CNVM_IP = "10.100.101.5"
CNVM_MAC = "02:00:0a:64:65:05"
CLIENT_IP = "10.100.101.250"
PORT = 7000
CID = "canary"

SERVICE = """#!/bin/sh
echo "svc up"
nc -ll -p 7000 -e /bin/counter &
i=0
while :; do echo "tick $i"; i=$((i+1)); sleep 0.2; done
"""
COUNTER = """#!/bin/sh
n=0
while read l; do n=$((n+1)); echo $n; done
"""


async def join_overlay(lab: Lab, host: str) -> None:
    """cnvm0 bridge + VXLAN vx0 in host's netns, flooding to every other lab host."""
    ns = lab.netns(host)
    await netlink.bridge_add("cnvm0", netns=ns, mtu=OVERLAY_MTU)
    await netlink.vxlan_add("vx0", VNI, netns=ns, local=lab.underlay_ip(host), dev="ul0",
                            dstport=VXLAN_PORT, learning=True, mtu=OVERLAY_MTU)
    for other in lab.hosts:
        if other != host:
            await netlink.fdb_flood_add("vx0", lab.underlay_ip(other), netns=ns)
    await netlink.link_set("vx0", netns=ns, master="cnvm0", up=True)
    await netlink.link_up("cnvm0", ns)


async def make_cnvm_netns(lab: Lab, node: str, *, prelock: bool, up: bool = True) -> str:
    """The cnvm's own netns on node: eth0 (fixed IP/MAC) <-> veth into node's cnvm0.

    With prelock, CRIU's lock rules go in before any link comes up. With up=False
    both veth ends stay down (a target prepared while the source still runs must
    not answer ARP for the same IP/MAC); `links_up` brings them up.
    """
    ns = f"{lab.name}-{node}-c1"
    await netlink.netns_add(ns)
    if prelock:
        await netlink.prelock(ns)
    await netlink.veth_add("c1", "eth0", netns=lab.netns(node), peer_netns=ns,
                           mtu=OVERLAY_MTU, peer_mac=CNVM_MAC)
    await netlink.link_set("c1", netns=lab.netns(node), master="cnvm0")
    await netlink.addr_add("eth0", f"{CNVM_IP}/24", netns=ns)
    if up:
        await links_up(lab, node, ns)
    return ns


async def links_up(lab: Lab, node: str, ns: str) -> None:
    await netlink.link_up("c1", lab.netns(node))
    await netlink.link_up("eth0", ns)


class Client:
    """The client process in <lab>-client; collects (time, n) replies."""

    def __init__(self, p: asyncio.subprocess.Process) -> None:
        self.p = p
        self.replies: list[tuple[float, int]] = []
        self.port: int | None = None
        self.eof = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.p.stdout
        async for raw in self.p.stdout:
            parts = raw.decode().split()
            if parts[0] == "port":
                self.port = int(parts[1])
            elif parts[0] == "EOF":
                self.eof = True
            else:
                self.replies.append((float(parts[0]), int(parts[1])))

    async def wait_for(self, n: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not self.replies or self.replies[-1][1] < n:
            if self.p.returncode is not None or self.eof or time.monotonic() > end:
                err = (await self.p.stderr.read()).decode() if self.p.returncode is not None \
                    and self.p.stderr else ""
                raise AssertionError(
                    f"client stuck at {self.replies[-1][1] if self.replies else None}, "
                    f"wanted {n}; eof={self.eof} rc={self.p.returncode} {err}")
            await asyncio.sleep(0.02)


async def test_canary_tcp_connection_survives_cross_host_restore(
        lab_factory, busybox_bundle, tmp_path: Path):
    lab: Lab = await lab_factory(LAB, nodes=2)
    for h in lab.hosts:
        await join_overlay(lab, h)
    await netlink.addr_add("cnvm0", f"{CLIENT_IP}/24", netns=lab.netns("client"))

    src_ns = await make_cnvm_netns(lab, "node1", prelock=False)
    files = {"bin/svc": SERVICE, "bin/counter": COUNTER}
    bundle1 = busybox_bundle(["/bin/svc"], netns_path=str(netlink.netns_path(src_ns)),
                             files=files, name="bundle-node1")
    src = lab.runc("node1")
    log1 = tmp_path / "node1" / "canary.log"
    pipe = await start_log_shim(log1)
    try:
        await src.run(CID, bundle1, stdio=pipe.write_fd, work_dir=tmp_path / "node1-run")
    finally:
        pipe.close()

    argv = [sys.executable, "-c", CLIENT, CNVM_IP, str(PORT), "0.01"]  # a request / 10 ms
    client = Client(await lab.spawn("client", argv,
                                    stdout=asyncio.subprocess.PIPE,
                                    stderr=asyncio.subprocess.PIPE))
    try:
        await client.wait_for(30, timeout=30)
        port = client.port

        # ---- prepare node2 while the source runs: same IP/MAC, pre-locked, links down
        dst_ns = await make_cnvm_netns(lab, "node2", prelock=True, up=False)
        bundle2 = tmp_path / "bundle-node2"
        bundle2.mkdir()
        cfg = json.loads((bundle1 / "config.json").read_text())
        cfg["root"]["path"] = str(bundle1 / "rootfs")
        for ns in cfg["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = str(netlink.netns_path(dst_ns))
        (bundle2 / "config.json").write_text(json.dumps(cfg))
        dst = lab.runc("node2")
        log2 = tmp_path / "node2" / "canary.log"
        pipe2 = await start_log_shim(log2)

        # ---- checkpoint on node1 (the source container is gone afterwards)
        t0 = time.monotonic()
        await src.checkpoint(CID, tmp_path / "img", work_dir=tmp_path / "work-dump",
                             tcp_established=True)
        t_dump = time.monotonic()
        await netlink.netns_del(src_ns)  # its MAC/IP must vanish from node1
        await links_up(lab, "node2", dst_ns)
        last_before = client.replies[-1][1]

        # ---- restore on node2 (stdout/stderr: a new pipe to a new log shim); announce
        t_r0 = time.monotonic()
        try:
            st = await dst.restore(CID, bundle2, tmp_path / "img",
                                   work_dir=tmp_path / "work-restore", stdio=pipe2.write_fd)
        finally:
            pipe2.close()
        t_restore = time.monotonic()
        await netlink.announce(dst_ns, "eth0", CNVM_IP)
        t_arp = time.monotonic()
        assert st.status == "running"
        assert await src.state(CID) is None
        assert not await netlink.is_locked(dst_ns), "CRIU left its lock in place"

        # ---- the same connection keeps counting, with no gap
        await client.wait_for(last_before + 30, timeout=30)
        assert client.port == port and not client.eof
        numbers = [n for _, n in client.replies]
        assert numbers == list(range(1, len(numbers) + 1)), "counter skipped or repeated"
        gaps = [b[0] - a[0] for a, b in zip(client.replies, client.replies[1:], strict=False)]
        stall = max(gaps)

        # ---- the log followed the container
        for _ in range(50):
            if "tick" in log2.read_text():
                break
            await asyncio.sleep(0.1)
        old = [int(x.split()[1]) for x in log1.read_text().split("\n") if x.startswith("tick")]
        new = [int(x.split()[1]) for x in log2.read_text().split("\n") if x.startswith("tick")]
        assert new and new[0] == old[-1] + 1, (old[-3:], new[:3])
        assert "svc up" not in log2.read_text()  # restored, not restarted

        print(f"\ncanary: checkpoint {1000 * (t_dump - t0):.0f} ms, "
              f"restore {1000 * (t_restore - t_r0):.0f} ms, "
              f"between {1000 * (t_r0 - t_dump):.0f} ms, "
              f"freeze (checkpoint start -> ARP sent) {1000 * (t_arp - t0):.0f} ms, "
              f"client stall {1000 * stall:.0f} ms")
    finally:
        client.task.cancel()
        if client.p.returncode is None:
            client.p.kill()
            await client.p.wait()
        for node in ("node1", "node2"):
            await lab.runc(node).destroy(CID)
        shutil.rmtree(tmp_path / "img", ignore_errors=True)
