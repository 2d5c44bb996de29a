"""Three in-process nodes on 127.0.0.1: enrolment, gossip, failure detection, refusals,
RPC (peer ops on a Router, API ops through peer.forward) and bulk streams. No root, no
namespaces: only loopback with per-node ports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from cnvmd.api import Args, Context, Router
from cnvmd.config import Config
from cnvmd.peers import PeerService
from cnvmd.peers.service import ENROLL_USER
from cnvmd.peers.streams import StreamAborted, abort_tcp
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit

FAST = {"gossip_interval": 0.2, "suspect_after": 0.8, "down_after": 1.6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a subsystem declares: peer-only ops and stream kinds on its own Router, merged
# into each node's peer router (as the daemon merges every plug-in's peer_router).
SUBSYSTEM_PEER = Router()


@SUBSYSTEM_PEER.op("test.whoami")
async def whoami(ctx: Context, args: Args) -> dict[str, Any]:
    """Who asked, and who answered."""
    ctx.emit("seen", {"by": ctx.daemon["name"]})
    return {"caller": ctx.node, "callee": ctx.daemon["name"], "x": args.int("x", 0)}


@SUBSYSTEM_PEER.stream("test.upper")
async def upper(stream: Any, args: dict[str, Any]) -> None:
    await stream.write_frame({"ok": True, "from": stream.node})
    while data := await stream.read():
        await stream.write(data.upper())
    stream.write_eof()


def api_router(name: str, log: list[str]) -> Router:
    """Each node's *API* ops (what cnvmctl reaches), reachable by peers only by forward."""
    r = Router()

    @r.op("deploy")
    async def deploy(ctx: Context, args: Args) -> dict[str, Any]:
        """A stand-in API op: streams progress, checks its args like a real one."""
        cnvm = args.name("name")
        args.reject_unknown()
        ctx.progress("unpack", done=1, total=2)
        ctx.progress("start", done=2, total=2)
        return {"ran_on": name, "name": cnvm, "caller": ctx.node}

    @r.op("hang")
    async def hang(ctx: Context, args: Args) -> None:
        log.append("started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    return r


class Nodes:
    """Several PeerServices sharing one loop; restartable with the same state/port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.svcs: dict[str, PeerService] = {}
        self.ports: dict[str, int] = {}
        self.api_log: dict[str, list[str]] = {}

    def config(self, name: str) -> Config:
        port = self.ports.setdefault(name, free_port())
        return Config(node_name=name, state_dir=self.root / name,
                      listen_address="127.0.0.1", peer_port=port)

    async def start(self, name: str) -> PeerService:
        peer = Router()
        peer.include(SUBSYSTEM_PEER)
        log = self.api_log.setdefault(name, [])
        svc = PeerService(self.config(name), router=peer, api_router=api_router(name, log),
                          daemon={"name": name}, **FAST)  # type: ignore[arg-type]
        await svc.start()
        self.svcs[name] = svc
        return svc

    async def stop(self, name: str) -> None:
        await self.svcs.pop(name).stop()

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def stop_all(self) -> None:
        for n in list(self.svcs):
            await self.stop(n)


async def wait_for(pred: Callable[[], bool], timeout: float = 8.0, what: str = "") -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def states(svc: PeerService) -> dict[str, str]:
    return {n["name"]: n["state"] for n in svc.nodes()}


def all_alive(nodes: Nodes, names: list[str]) -> bool:
    return all(states(nodes.svcs[n]) == {m: "alive" for m in names} for n in names)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Nodes]:
    nodes = Nodes(tmp_path)
    try:
        yield nodes
    finally:
        await nodes.stop_all()


@pytest.fixture
async def cluster(lab: Nodes) -> Nodes:
    """init on node1, join node2 via node1, node3 via node2 (as in the issue)."""
    n1, n2, n3 = [await lab.start(n) for n in ("node1", "node2", "node3")]
    await n1.cluster_init()
    await n2.join(lab.addr("node1"), (await n1.mint_token())["token"])
    await n3.join(lab.addr("node2"), (await n2.mint_token())["token"])
    await wait_for(lambda: all_alive(lab, ["node1", "node2", "node3"]), what="convergence")
    return lab


async def healthy(lab: Nodes) -> None:
    """The cluster still works: every node reaches every other by RPC."""
    for a in lab.svcs.values():
        for b in lab.svcs:
            if b != a.name:
                assert (await a.call(b, "peer.ping", timeout=5))["node"] == b


# -- membership -------------------------------------------------------------------------


async def test_three_nodes_converge_and_restart(cluster: Nodes) -> None:
    lab = cluster
    await healthy(lab)
    n1 = lab.svcs["node1"]
    assert {n["addr"] for n in n1.nodes()} == {"127.0.0.1"}
    events: list[tuple[str, str, str]] = []
    n1.membership.add_listener(lambda ev: events.append((ev.kind, ev.name, ev.state)))

    await lab.stop("node3")
    took = await wait_for(lambda: states(lab.svcs["node1"])["node3"] == "down"
                          and states(lab.svcs["node2"])["node3"] == "down", what="node3 down")
    assert took < 5
    assert ("state", "node3", "suspect") in events and ("state", "node3", "down") in events

    await lab.start("node3")  # same state dir and port: rejoins by itself
    await wait_for(lambda: all_alive(lab, ["node1", "node2", "node3"]), what="node3 back")
    assert ("state", "node3", "alive") in events
    await healthy(lab)
    assert lab.svcs["node3"].membership.get("node3").incarnation >= 2


async def test_all_restart_from_disk(cluster: Nodes) -> None:
    lab = cluster
    for n in ("node1", "node2", "node3"):
        await lab.stop(n)
    for n in ("node3", "node1", "node2"):
        await lab.start(n)
    await wait_for(lambda: all_alive(lab, ["node1", "node2", "node3"]), what="reconvergence")
    await healthy(lab)


async def test_caps_and_cnvms_propagate_and_subscribe(cluster: Nodes) -> None:
    lab = cluster
    it = lab.svcs["node1"].membership.subscribe(replay=False)
    lab.svcs["node3"].update_local(caps={"criu": "4.2.1"}, cnvms=["web", "db"])

    def ok() -> bool:
        v = {n["name"]: n for n in lab.svcs["node1"].nodes()}["node3"]
        return v["cnvm_count"] == 2 and v["caps"].get("criu") == "4.2.1"

    await wait_for(ok, what="node3 update")
    ev = await asyncio.wait_for(anext(it), 2)
    assert (ev.kind, ev.name) == ("updated", "node3")
    await it.aclose()


async def test_broken_link_is_not_a_down_node(cluster: Nodes) -> None:
    """node1 and node3 cannot reach each other at all, node2 reaches both: each stays
    alive for the other (heartbeats travel through node2) — the point of gossip."""
    lab = cluster
    n1, n3 = lab.svcs["node1"], lab.svcs["node3"]
    real = {n1.name: n1.transport.connect, n3.name: n3.transport.connect}

    def cutter(svc: PeerService, peer: str) -> Callable[[str], Any]:
        async def connect(node: str) -> Any:
            if node == peer:
                raise ProtoError(ErrorCode.UNAVAILABLE, "link cut by the test")
            return await real[svc.name](node)
        return connect

    n1.transport.connect = cutter(n1, "node3")  # type: ignore[method-assign]
    n3.transport.connect = cutter(n3, "node1")  # type: ignore[method-assign]
    await asyncio.sleep(0.5)  # let connects already in flight finish, then cut those too
    n1.transport.drop_link("node3")
    n3.transport.drop_link("node1")
    await asyncio.sleep(2 * FAST["down_after"])
    assert states(n1)["node3"] == "alive" and states(n3)["node1"] == "alive"
    with pytest.raises(ProtoError):
        await n1.call("node3", "peer.ping", timeout=2)
    n1.transport.connect = real["node1"]  # type: ignore[method-assign]
    n3.transport.connect = real["node3"]  # type: ignore[method-assign]
    await healthy(lab)


# -- refusals -----------------------------------------------------------------------------


async def ssh_login(port: int, username: str, key: asyncssh.SSHKey) -> None:
    conn = await asyncssh.connect("127.0.0.1", port, username=username, client_keys=[key],
                                  known_hosts=None, agent_path=None, config=None)
    conn.close()


async def test_unenrolled_key_refused(cluster: Nodes, caplog: pytest.LogCaptureFixture) -> None:
    lab = cluster
    intruder = asyncssh.generate_private_key("ssh-ed25519")
    for user in ("node2", "node9", "root"):
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_login(lab.ports["node1"], user, intruder)
    assert "not the pinned key of an enrolled member" in caplog.text
    # The enrolment user cannot open RPC/streams even with a self-made key.
    conn = await asyncssh.connect("127.0.0.1", lab.ports["node1"], username=ENROLL_USER,
                                  client_keys=[intruder], known_hosts=None, agent_path=None,
                                  config=None)
    async with conn:
        w, r, _ = await conn.open_session(subsystem="cnvm-rpc", encoding=None)
        with contextlib.suppress(OSError):
            w.write(b"\x00\x00\x00\x01\x80")
        assert await asyncio.wait_for(r.read(), 5) == b""
    await healthy(lab)


async def test_host_key_pinned_no_tofu(cluster: Nodes) -> None:
    """node1 dials node3's address but an impostor answers: refused by host key."""
    lab = cluster
    await lab.stop("node3")
    impostor_cfg = Config(node_name="node3", state_dir=lab.root / "impostor",
                          listen_address="127.0.0.1", peer_port=lab.ports["node3"])
    impostor = PeerService(impostor_cfg, **FAST)
    await impostor.start()
    try:
        with pytest.raises(ProtoError) as ei:
            await lab.svcs["node1"].call("node3", "peer.ping", timeout=5)
        assert ei.value.code == ErrorCode.UNAVAILABLE
        assert "host key" in ei.value.message.lower()
    finally:
        await impostor.stop()


async def test_wrong_expired_replayed_tokens(lab: Nodes, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    n1, n2, n3, n4 = [await lab.start(n) for n in ("node1", "node2", "node3", "node4")]
    await n1.cluster_init()

    tok = (await n1.mint_token())["token"]
    head, payload, tag = tok.split(".")
    forged = f"{head}.{payload}.{tag[::-1]}"
    with pytest.raises(ProtoError) as ei:
        await n2.join(lab.addr("node1"), forged)
    assert ei.value.code == ErrorCode.PERMISSION_DENIED
    assert n2.cluster is None

    short = (await n1.mint_token(ttl=0.3))["token"]
    await asyncio.sleep(0.5)
    with pytest.raises(ProtoError, match="expired"):
        await n2.join(lab.addr("node1"), short)

    await n2.join(lab.addr("node1"), tok)  # the genuine one still works
    with pytest.raises(ProtoError, match="already used"):
        await n3.join(lab.addr("node1"), tok)
    # Replay at another member than the issuer: node2 asks node1, which refuses.
    with pytest.raises(ProtoError, match="already used"):
        await n3.join(lab.addr("node2"), tok)
    # A token from node1 redeemed via node2 works once.
    tok2 = (await n1.mint_token())["token"]
    await wait_for(lambda: states(n2).get("node1") == "alive")
    await n3.join(lab.addr("node2"), tok2)
    with pytest.raises(ProtoError, match="already used"):
        await n4.join(lab.addr("node1"), tok2)
    assert n4.cluster is None
    assert "refused" in caplog.text
    await wait_for(lambda: all_alive(lab, ["node1", "node2", "node3"])
                   and "node4" not in states(n1))
    await healthy(Nodes_subset(lab, ["node1", "node2", "node3"]))


def Nodes_subset(lab: Nodes, names: list[str]) -> Nodes:
    sub = Nodes(lab.root)
    sub.svcs = {n: lab.svcs[n] for n in names}
    sub.ports = lab.ports
    return sub


async def test_fake_cluster_cannot_enrol_or_impersonate(lab: Nodes) -> None:
    """A server of another cluster cannot prove the token: the joiner refuses it."""
    n1, evil, n3 = [await lab.start(n) for n in ("node1", "evil", "node3")]
    await n1.cluster_init()
    await evil.cluster_init()
    tok = (await n1.mint_token())["token"]
    with pytest.raises(ProtoError) as ei:
        await n3.join(lab.addr("evil"), tok)
    assert ei.value.code == ErrorCode.PERMISSION_DENIED
    assert n3.cluster is None
    await n3.join(lab.addr("node1"), tok)  # not consumed by the failed attempt


async def test_garbage_on_the_port(cluster: Nodes) -> None:
    lab = cluster
    junk = (os.urandom(4096), b"SSH-2.0-x\r\n" + os.urandom(2048), b"GET / HTTP/1.1\r\n\r\n")
    for payload in junk:
        r, w = await asyncio.open_connection("127.0.0.1", lab.ports["node1"])
        w.write(payload)
        with contextlib.suppress(ConnectionError):
            await w.drain()
            await asyncio.wait_for(r.read(), 15)  # the server closes on us
        w.close()
    await healthy(lab)
    assert all_alive(lab, ["node1", "node2", "node3"])


async def test_remove_revokes(cluster: Nodes) -> None:
    lab = cluster
    n1, n2, n3 = (lab.svcs[n] for n in ("node1", "node2", "node3"))
    old_epoch = n1.cluster.epoch
    stale_token = (await n3.mint_token())["token"]
    await n1.remove("node3")
    await wait_for(lambda: "node3" not in states(n2) and n2.cluster.epoch == old_epoch + 1,
                   what="removal gossiped")
    await wait_for(lambda: n3.cluster is None, what="node3 told")
    with pytest.raises(asyncssh.PermissionDenied):
        await ssh_login(lab.ports["node2"], "node3", n3.key)
    # Tokens minted before the removal (with the old secret) are dead.
    await lab.start("node5")
    with pytest.raises(ProtoError, match="stale"):
        await lab.svcs["node5"].join(lab.addr("node2"), stale_token)
    # node3 may come back with a fresh token (new epoch of its record).
    await n3.join(lab.addr("node2"), (await n2.mint_token())["token"])
    await wait_for(lambda: all_alive(Nodes_subset(lab, ["node1", "node2", "node3"]),
                                     ["node1", "node2", "node3"]), what="node3 re-enrolled")


# -- RPC and streams -----------------------------------------------------------------------


async def test_rpc_roundtrip_events_errors_cancel(cluster: Nodes) -> None:
    lab = cluster
    n1, n3 = lab.svcs["node1"], lab.svcs["node3"]
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def work(ctx: Context, args: Args) -> Any:
        for i in range(3):
            ctx.emit("progress", {"done": i})
        if args.get("fail"):
            raise ProtoError(ErrorCode.CONFLICT, "nope")
        if args.get("hang"):
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        blob = bytes(args["blob"])
        return {"from": ctx.node, "sha": hashlib.sha256(blob).hexdigest()}

    n3.router.op("test.work")(work)
    blob = os.urandom(1 << 20)
    evs: list[int] = []
    res = await n1.call("node3", "test.work", {"blob": blob},
                        on_event=lambda n, d: evs.append(d["done"]))
    assert res == {"from": "node1", "sha": hashlib.sha256(blob).hexdigest()}
    assert evs == [0, 1, 2]
    with pytest.raises(ProtoError) as ei:
        await n1.call("node3", "test.work", {"fail": True})
    assert ei.value.code == ErrorCode.CONFLICT
    with pytest.raises(ProtoError) as ei:
        await n1.call("node3", "no.such.op")
    assert ei.value.code == ErrorCode.UNKNOWN_OP
    task = asyncio.create_task(n1.call("node3", "test.work", {"hang": True}))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    # Many concurrent calls share one connection.
    res = await asyncio.gather(*(n1.call("node2", "peer.ping", {"echo": i}) for i in range(200)))
    assert [r["echo"] for r in res] == list(range(200))


async def test_peer_op_on_router_served_over_ssh(cluster: Nodes) -> None:
    """A subsystem's peer op (on a Router merged into the node's peer router) runs on the
    callee over the real SSH channel, with ctx.node = the caller; so does a stream kind."""
    n1, n2 = cluster.svcs["node1"], cluster.svcs["node2"]
    evs: list[tuple[str, dict[str, Any]]] = []
    res = await n1.call("node2", "test.whoami", {"x": 5},
                        on_event=lambda n, d: evs.append((n, d)))
    assert res == {"caller": "node1", "callee": "node2", "x": 5}
    assert evs == [("seen", {"by": "node2"})]
    assert (await n2.call("node1", "test.whoami"))["caller"] == "node2"
    # In-process call to itself: same op, same dispatch, ctx.node = itself.
    assert await n1.call("node1", "test.whoami", {"x": 1}) == {
        "caller": "node1", "callee": "node1", "x": 1}
    # The handler's argument checks answer as on the API socket.
    with pytest.raises(ProtoError) as ei:
        await n1.call("node2", "test.whoami", {"x": "five"})
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    # API ops are not peer ops: the peer router does not have them.
    with pytest.raises(ProtoError) as ei:
        await n1.call("node2", "deploy", {"name": "x"})
    assert ei.value.code == ErrorCode.UNKNOWN_OP
    # Stream kinds from the router are served next to the built-ins.
    stream = await n1.open_stream("node2", "test.upper")
    assert stream.accept["from"] == "node1"
    await stream.write(b"hello mesh")
    stream.write_eof()
    got = b""
    while chunk := await stream.read():
        got += chunk
    stream.close()
    assert got == b"HELLO MESH"
    with pytest.raises(ValueError, match="registered twice"):
        n2.register_stream("test.upper", upper)


async def test_forward_api_op(cluster: Nodes) -> None:
    """peer.forward runs the callee's API op within the peer request: its events arrive
    as the request's events, its result is the reply, cancel reaches it."""
    lab = cluster
    n1 = lab.svcs["node1"]
    evs: list[tuple[str, str]] = []
    res = await n1.forward("node3", "deploy", {"name": "web"},
                           on_event=lambda n, d: evs.append((n, d["phase"])))
    assert res == {"ran_on": "node3", "name": "web", "caller": "node1"}
    assert evs == [("progress", "unpack"), ("progress", "start")]
    # To itself: in process, same engine.
    assert (await n1.forward("node1", "deploy", {"name": "db"}))["ran_on"] == "node1"
    # Validation errors of the API op come back as they would to cnvmctl.
    with pytest.raises(ProtoError) as ei:
        await n1.forward("node3", "deploy", {"name": "web", "memroy": 1})
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    # Unknown API op.
    with pytest.raises(ProtoError) as ei:
        await n1.forward("node3", "no.such.op", {})
    assert ei.value.code == ErrorCode.UNKNOWN_OP
    assert "deploy" in ei.value.details.get("ops", [])
    # A peer op is not an API op: forward refuses it.
    for peer_op in ("peer.ping", "test.whoami", "peer.forward"):
        with pytest.raises(ProtoError) as ei:
            await n1.forward("node3", peer_op, {})
        assert ei.value.code == ErrorCode.UNKNOWN_OP, peer_op
    # Cancelling the caller cancels the forwarded API op on the callee.
    log = lab.api_log["node3"]
    task = asyncio.create_task(n1.forward("node3", "hang", {}))
    await wait_for(lambda: "started" in log, what="hang started")
    task.cancel()
    await wait_for(lambda: "cancelled" in log, what="hang cancelled")
    with pytest.raises(asyncio.CancelledError):
        await task
    # A node without API router refuses forward.
    lab.svcs["node2"].rpc.api_router = None
    with pytest.raises(ProtoError) as ei:
        await n1.forward("node2", "deploy", {"name": "x"})
    assert ei.value.code == ErrorCode.UNAVAILABLE


async def test_stream_echo_integrity(cluster: Nodes) -> None:
    n1 = cluster.svcs["node1"]
    data = os.urandom(32 << 20)
    stream = await n1.open_stream("node2", "echo")

    async def send() -> None:
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            await stream.write(view[i:i + (1 << 20)])
        stream.write_eof()

    sender = asyncio.create_task(send())
    h = hashlib.sha256()
    n = 0
    while chunk := await stream.read():
        h.update(chunk)
        n += len(chunk)
    await sender
    stream.close()
    assert n == len(data) and h.digest() == hashlib.sha256(data).digest()
    with pytest.raises(ProtoError) as ei:
        await n1.open_stream("node2", "no-such-kind")
    assert ei.value.code == ErrorCode.UNKNOWN_OP


async def test_file_put_get(cluster: Nodes, tmp_path: Path) -> None:
    n1 = cluster.svcs["node1"]
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5 << 20) + b"tail")
    dest = str(cluster.svcs["node2"].transfer_dir / "incoming" / "img.bin")
    sent = await n1.put_file("node2", src, dest)
    assert Path(dest).read_bytes() == src.read_bytes()  # noqa: ASYNC240
    assert sent["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    back = tmp_path / "back.bin"
    got = await n1.get_file("node2", dest, back)
    assert back.read_bytes() == src.read_bytes() and got["sha256"] == sent["sha256"]
    with pytest.raises(ProtoError) as ei:
        await n1.put_file("node2", src, "/etc/cnvm-should-not-exist")
    assert ei.value.code == ErrorCode.PERMISSION_DENIED
    with pytest.raises(ProtoError) as ei:
        await n1.get_file("node2", str(cluster.svcs["node2"].transfer_dir / "nope"), back)
    assert ei.value.code == ErrorCode.NOT_FOUND


async def test_relay_tcp_like_page_server(cluster: Nodes) -> None:
    """A 'page server' on node3's loopback; node1 relays a local port into it."""
    got = hashlib.sha256()
    received = 0
    done = asyncio.Event()

    async def page_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal received
        while chunk := await r.read(1 << 20):
            got.update(chunk)
            received += len(chunk)
        w.write(b"ACK " + str(received).encode())
        await w.drain()
        w.close()
        done.set()

    srv = await asyncio.start_server(page_server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    data = os.urandom(24 << 20)
    try:
        async with await cluster.svcs["node1"].relay_tcp("node3", port) as relay:
            r, w = await asyncio.open_connection("127.0.0.1", relay.port)
            w.write(data)
            await w.drain()
            w.write_eof()
            reply = await asyncio.wait_for(r.read(), 10)
            w.close()
            await asyncio.wait_for(done.wait(), 10)
            await relay.wait_idle()
            assert relay.bytes_up == len(data)
        assert reply == f"ACK {len(data)}".encode()
        assert got.digest() == hashlib.sha256(data).digest()
        # Refused target (nothing listens): the local connection is reset, relay survives.
        async with await cluster.svcs["node1"].relay_tcp("node3", free_port()) as relay:
            r, w = await asyncio.open_connection("127.0.0.1", relay.port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 10)
            w.close()
            assert relay.errors
    finally:
        srv.close()


async def test_aborts_are_never_a_clean_eof(cluster: Nodes) -> None:
    """A failure mid-stream must reach the far end as an error, not as EOF (CRIU reads
    a clean EOF on a page-server connection as "all pages served")."""
    n1, n2 = cluster.svcs["node1"], cluster.svcs["node2"]
    seen: dict[str, str] = {}

    async def flaky(stream: Any, args: dict[str, Any]) -> None:
        await stream.write_frame({"ok": True})
        if args.get("fail"):
            await stream.write(b"partial")
            raise RuntimeError("disk full")
        try:
            while await stream.read():
                pass
            seen["server"] = "eof"
        except StreamAborted:
            seen["server"] = "aborted"

    n2.register_stream("test.flaky", flaky)
    s = await n1.open_stream("node2", "test.flaky", {"fail": True})
    assert await s.read() == b"partial"
    with pytest.raises(StreamAborted, match="disk full"):
        await s.read()
    s = await n1.open_stream("node2", "test.flaky")
    await s.write(b"x" * 1000)
    s.abort("cancelled")
    await wait_for(lambda: "server" in seen)
    assert seen["server"] == "aborted"

    # Relay: the remote program resets its connection mid-transfer → our local client
    # gets a reset too (ECONNRESET), never a clean EOF.
    async def resetting_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(1000)
        w.write(b"some pages")
        await w.drain()
        abort_tcp(w)

    srv = await asyncio.start_server(resetting_server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with await n1.relay_tcp("node2", port) as relay:
            r, w = await asyncio.open_connection("127.0.0.1", relay.port)
            w.write(b"y" * 5000)
            await w.drain()
            got = b""
            with pytest.raises(ConnectionResetError):
                while chunk := await asyncio.wait_for(r.read(65536), 10):
                    got += chunk
            assert got == b"some pages"
            w.close()
    finally:
        srv.close()
