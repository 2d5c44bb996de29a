"""Issue 14 against real cnvmd processes: what an outsider or a member can do to the
peer port of a running daemon, measured on the daemon itself (its RSS, its answers).

Daemons run on 127.0.0.1 with their own ports, sockets and state dirs (as in
test_peers.py: no namespace, nothing leaves loopback); hostile clients use other
loopback source addresses (127.0.x.y) so that per-source limits are exercised. The
test process also joins the cluster as an ordinary member ("probe", an in-process
PeerService): the member whose fresh connections and calls must keep working, and
whose key the after-auth fuzz lane uses. Every daemon and the probe are stopped in a
finally, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from cnvmd.config import Config
from cnvmd.peers import PeerService
from tests.peerdaemon import Daemon, free_port
from tests.unit.test_peers_fuzz import (
    ACCEPTABLE,
    FRAMES,
    SEED,
    Mutator,
    RpcFuzzer,
    auth_junk,
    drop_link,
    fuzz_rpc_channel,
    gossip_payload,
    junk_connection,
    preauth_junk,
    rpc_templates,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20



def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Mesh:
    """node1 (the target) and node2 as cnvmd processes, the probe in process."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons = {n: Daemon(base, n) for n in ("node1", "node2", "node3")}
        self.probe: PeerService | None = None

    @property
    def node1(self) -> Daemon:
        return self.daemons["node1"]

    async def up(self) -> PeerService:
        d1, d2 = self.daemons["node1"], self.daemons["node2"]
        await asyncio.gather(d1.start(), d2.start())
        await d1.call("cluster.init")
        await d2.call("join", {"peer": f"127.0.0.1:{d1.port}",
                               "token": (await d1.call("cluster.token"))["token"]})
        probe = PeerService(Config(node_name="probe", state_dir=self.base / "probe",
                                   listen_address="127.0.0.1", peer_port=free_port()),
                            gossip_interval=0.5)
        await probe.start()
        self.probe = probe
        await probe.join(f"127.0.0.1:{d1.port}", (await d1.call("cluster.token"))["token"])
        await eventually(lambda: self.all_alive(["node1", "node2", "probe"]))
        return probe

    async def all_alive(self, names: list[str]) -> None:
        for d in ("node1", "node2"):
            states = {n["name"]: n["state"] for n in (await self.daemons[d].call("nodes"))["nodes"]}
            assert states == {n: "alive" for n in names}, (d, states)

    async def fresh_call(self) -> None:
        """The probe dials node1 anew and its RPC answers."""
        assert self.probe is not None
        drop_link(self.probe, "node1")
        res = await self.probe.call("node1", "peer.ping", timeout=10)
        assert res["node"] == "node1"

    async def down(self) -> None:
        if self.probe is not None:
            await self.probe.stop()
        for d in self.daemons.values():
            d.stop()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        await m.down()


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> None:
    t0 = time.monotonic()
    while True:
        try:
            await check()
            return
        except (AssertionError, Exception):
            if time.monotonic() - t0 > timeout:
                raise
        await asyncio.sleep(0.2)


class RssWatch:
    """Samples a process's RSS every 50 ms: the peak is what a hostile client achieved."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = rss(pid)
        self.peak = self.base
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss(self.pid))
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, rss(self.pid))
        return self.peak - self.base


class Forwarder:
    """node2 (another cnvmd) keeps reaching node1 through its own peer link."""

    def __init__(self, d2: Daemon) -> None:
        self.d2 = d2
        self.ok = 0
        self.errors: list[str] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                res = await self.d2.call("forward", {"node": "node1", "op": "ping",
                                                     "args": {"data": self.ok}}, timeout=10)
                assert res["node"] == "node1"
                self.ok += 1
            except Exception as exc:
                self.errors.append(repr(exc))
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# -- lockout ---------------------------------------------------------------------------


async def test_daemon_connect_close_then_idle_then_join(mesh: Mesh) -> None:
    """1,000 sequential connect+close on cnvmd's peer port, then a member dialling anew
    is answered; then 200 idle unauthenticated connections (from 51 addresses) are held
    open while node3 joins and the member calls again."""
    await mesh.up()
    port = mesh.node1.port
    for _ in range(1000):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()
    await asyncio.sleep(0.5)
    await mesh.fresh_call()
    idle: list[asyncio.StreamWriter] = []
    try:
        for i in range(200):
            src = "127.0.0.1" if i < 50 else f"127.0.6.{i % 50 + 1}"
            _, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
            if i % 2:
                w.write(b"SSH-2.0-idle\r\n")
            idle.append(w)
        await asyncio.sleep(0.5)
        d3 = mesh.daemons["node3"]
        await d3.start()
        tok = (await mesh.node1.call("cluster.token"))["token"]
        await d3.call("join", {"peer": f"127.0.0.1:{port}", "token": tok})
        await mesh.fresh_call()
        await eventually(lambda: mesh.all_alive(["node1", "node2", "node3", "probe"]))
    finally:
        for w in idle:
            w.close()
    assert mesh.node1.alive()


# -- pre-auth memory ---------------------------------------------------------------------


async def test_daemon_enrolment_channels_cannot_raise_rss(mesh: Mesh) -> None:
    """20 enrolment channels, each announcing a 15 MiB frame and sending it: the
    daemon's RSS (sampled throughout) stays within +50 MB, and they are all closed."""
    await mesh.up()
    port = mesh.node1.port
    watch = RssWatch(mesh.node1.pid)

    async def one(i: int) -> None:
        try:
            async with asyncio.timeout(60):
                conn = await asyncssh.connect(
                    "127.0.0.1", port, username="_enroll", local_addr=(f"127.0.7.{i + 1}", 0),
                    client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                    known_hosts=None, agent_path=None, config=None)
                async with conn:
                    w, r, _ = await conn.open_session(subsystem="cnvm-enroll", encoding=None)
                    w.write((15 << 20).to_bytes(4, "big"))
                    chunk = os.urandom(256 << 10)
                    for _ in range(60):  # 15 MiB
                        if w.channel.is_closing():
                            break
                        w.write(chunk)
                        await w.drain()
                    await r.read()
        except (OSError, asyncssh.Error, TimeoutError):
            pass

    try:
        await asyncio.gather(*(one(i) for i in range(20)))
    finally:
        grew = await watch.stop()
    print(f"enrolment 20 x 15 MiB: daemon RSS {watch.base / MB:.0f} MB, peak +{grew / MB:.1f} MB")
    assert grew < 50 * MB, f"daemon RSS grew by {grew / MB:.0f} MB"
    assert mesh.node1.alive()
    await mesh.fresh_call()


# -- fuzz lanes ------------------------------------------------------------------------


async def test_daemon_fuzz_peer_port_before_auth(mesh: Mesh) -> None:
    """10,000+ malformed frames before authentication (raw TCP, SSH packets, junk
    KEXINITs), then SSH sessions with random users and junk enrolment frames: cnvmd
    stays up, within +50 MB, node2's calls all answer, a fresh member call answers."""
    await mesh.up()
    port = mesh.node1.port
    fwd = Forwarder(mesh.daemons["node2"])
    watch = RssWatch(mesh.node1.pid)
    r = random.Random(SEED)
    m = Mutator(SEED)
    counts = {"tcp": 0, "ssh": 0}

    async def worker(i: int) -> None:
        while counts["tcp"] < FRAMES:
            data, n = preauth_junk(r)
            counts["tcp"] += n
            await junk_connection(port, data, f"127.0.8.{i + 1}")

    async def ssh_worker(i: int) -> None:
        for _ in range(25):
            n = await auth_junk(port, m, f"127.0.9.{i + 1}")
            counts["ssh"] += n

    t0 = time.monotonic()
    try:
        async with asyncio.timeout(300):
            await asyncio.gather(*(worker(i) for i in range(16)))
            await asyncio.gather(*(ssh_worker(i) for i in range(8)))
    finally:
        grew = await watch.stop()
        await fwd.stop()
    print(f"pre-auth fuzz on cnvmd: {counts} frames in {time.monotonic() - t0:.1f}s, "
          f"RSS {watch.base / MB:.0f} MB, peak +{grew / MB:.1f} MB, node2 calls {fwd.ok}")
    assert counts["tcp"] >= FRAMES
    assert mesh.node1.alive()
    assert grew < 50 * MB
    assert not fwd.errors and fwd.ok > 5, fwd.errors[:3]
    await mesh.fresh_call()


async def test_daemon_fuzz_rpc_after_auth(mesh: Mesh) -> None:
    """10,000+ random/mutated frames on cnvm-rpc from an authenticated member (the
    probe): never ``internal``, no hang, node1's view of the cluster unchanged, cnvmd
    within +50 MB, node2's calls all answer, and the member's RPC answers afterwards."""
    probe = await mesh.up()
    assert probe.key is not None
    before = await mesh.node1.call("nodes")
    payload = await probe.call("node1", "peer.gossip", gossip_payload(probe))
    record = next(m for m in payload["members"] if m["name"] == "node1")
    fuzzer = RpcFuzzer(SEED, rpc_templates(payload, record))
    fwd = Forwarder(mesh.daemons["node2"])
    watch = RssWatch(mesh.node1.pid)
    t0 = time.monotonic()
    try:
        conn = await asyncssh.connect("127.0.0.1", mesh.node1.port, username="probe",
                                      client_keys=[probe.key], known_hosts=None,
                                      agent_path=None, config=None)
        async with conn:
            codes = await fuzz_rpc_channel(conn, fuzzer, FRAMES)
    finally:
        grew = await watch.stop()
        await fwd.stop()
    print(f"rpc fuzz on cnvmd: {fuzzer.next_id - 1} requests in {time.monotonic() - t0:.1f}s, "
          f"RSS {watch.base / MB:.0f} MB, peak +{grew / MB:.1f} MB, codes {codes}, "
          f"node2 calls {fwd.ok}")
    assert "internal" not in codes, f"seed {SEED}: {codes}"
    assert set(codes) <= ACCEPTABLE | {"ok"}, codes
    assert mesh.node1.alive()
    assert grew < 50 * MB
    assert not fwd.errors and fwd.ok > 5, fwd.errors[:3]
    after = await mesh.node1.call("nodes")

    def ids(v: dict[str, Any]) -> dict[str, tuple[str, str, int]]:
        return {n["name"]: (n["addr"], n["admin"], n["epoch"]) for n in v["nodes"]}

    assert ids(after) == ids(before) and after["cluster_id"] == before["cluster_id"]
    await mesh.fresh_call()
