"""The peer mesh's API ops and daemon hooks, through the real Router/Session, in one
process (no root, no subprocess): what cnvmctl cluster/join/nodes/forward call."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from cnvmd import core
from cnvmd.api import Context, Router, dispatch
from cnvmd.config import Config
from cnvmd.peers import ops
from cnvmd.services import PEERS, Services
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeDaemon:
    """The parts of cnvmd.daemon.Daemon that ops and hooks touch."""

    def __init__(self, root: Path, name: str) -> None:
        self.config = Config(node_name=name, state_dir=root / name,
                             listen_address="127.0.0.1", peer_port=free_port())
        self.router = Router()
        self.router.include(ops.router)
        self.router.include(core.router)
        self.peer_router = Router()
        self.services = Services()
        self.caps = None
        self.versions = {"criu": "4.2.1"}
        self.adopted: dict[str, Any] = {}

    @property
    def node_name(self) -> str:
        return self.config.node_name

    def hello_reply(self, version: int) -> dict[str, Any]:
        return {"t": "hello", "proto": version, "agent": "test", "node": self.node_name,
                "version": "0"}

    async def op(self, op: str, args: dict[str, Any] | None = None,
                 events: list[tuple[str, dict[str, Any]]] | None = None) -> Any:
        """Run an API op in process, as the socket would (same dispatch and errors)."""
        sink = events.append if events is not None else None
        ctx = Context.local(op, daemon=self,
                            on_event=(lambda n, d: sink((n, d))) if sink else None)
        return await dispatch(self.router, ctx, op, args or {})

    @property
    def peers(self) -> Any:
        return self.services.require(PEERS)


async def test_api_ops_end_to_end(tmp_path: Path) -> None:
    ds = [FakeDaemon(tmp_path, f"node{i}") for i in (1, 2, 3)]
    for d in ds:
        await ops.start_peers(d)
    try:
        d1, d2, d3 = ds
        with pytest.raises(ProtoError) as ei:
            await d1.op("cluster.token")
        assert ei.value.code == ErrorCode.CONFLICT
        await d1.op("cluster.init")
        with pytest.raises(ProtoError) as ei:
            await d1.op("cluster.init")
        assert ei.value.code == ErrorCode.ALREADY_EXISTS
        with pytest.raises(ProtoError) as ei:
            await d1.op("cluster.token", {"ttl": -1})
        assert ei.value.code == ErrorCode.INVALID_ARGUMENT
        tok = await d1.op("cluster.token", {"ttl": 30})
        assert tok["expires"] > time.time() + 25
        port1 = d1.peers.port
        res = await d2.op("join", {"peer": f"127.0.0.1:{port1}", "token": tok["token"]})
        assert res["members"] == ["node1", "node2"]
        tok = await d2.op("cluster.token")
        await d3.op("join", {"peer": f"127.0.0.1:{d2.peers.port}",
                             "token": tok["token"]})

        async def converged() -> bool:
            for d in ds:
                view = await d.op("nodes")
                if sorted((n["name"], n["state"]) for n in view["nodes"]) != [
                        ("node1", "alive"), ("node2", "alive"), ("node3", "alive")]:
                    return False
            return True

        for _ in range(100):
            if await converged():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no convergence")
        view = {n["name"]: n for n in (await d1.op("nodes"))["nodes"]}
        assert view["node3"]["caps"].get("criu") == "4.2.1"
        assert "pubkey" not in view["node3"]

        # forward: node1 runs `ping` on node3 through the mesh, and on itself.
        assert await d1.op("forward", {"node": "node3", "op": "ping",
                                       "args": {"data": 7}}) == {"node": "node3", "data": 7}
        assert (await d1.op("forward", {"node": "node1", "op": "ping"}))["node"] == "node1"
        with pytest.raises(ProtoError) as ei:
            await d1.op("forward", {"node": "node3", "op": "no.such.op"})
        assert ei.value.code == ErrorCode.UNKNOWN_OP
        # A peer op is not an API op: forward cannot reach it.
        with pytest.raises(ProtoError) as ei:
            await d1.op("forward", {"node": "node3", "op": "peer.ping"})
        assert ei.value.code == ErrorCode.UNKNOWN_OP
        # Events of the forwarded op reach the API caller (mesh → this node's request).
        for target in ("node3", "node1"):
            evs: list[tuple[str, dict[str, Any]]] = []
            res = await d1.op("forward", {"node": target, "op": "ping",
                                          "args": {"delay": 0.25}}, events=evs)
            assert res["node"] == target
            assert evs and all(n == "progress" and d["phase"] == "wait" for n, d in evs)
            assert evs[-1][1]["done"] == evs[-1][1]["total"] == 250

        await d1.op("cluster.remove", {"node": "node3"})
        for _ in range(100):
            names = {n["name"] for n in (await d2.op("nodes"))["nodes"]}
            if names == {"node1", "node2"}:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("removal not gossiped")
    finally:
        for d in ds:
            await ops.stop_peers(d)


async def test_busy_port_keeps_daemon_up(tmp_path: Path) -> None:
    d = FakeDaemon(tmp_path, "node1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", d.config.peer_port))
        s.listen()
        await ops.start_peers(d)
    assert PEERS not in d.services
    with pytest.raises(ProtoError, match="not running") as ei:
        await d.op("nodes")
    assert ei.value.code == ErrorCode.UNAVAILABLE
    await ops.stop_peers(d)
