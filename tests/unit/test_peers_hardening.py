"""Issue 14 on the peer port, in process (no root): outsiders cannot lock members out or
hold memory, peers reach files only beneath their root and never through a symlink,
relays only reach literal loopback IPs, and membership changes need proof.

Self-contained on purpose (its own small cluster helper): each test also runs against
an older checkout to show it fails there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from cnvmd.config import Config
from cnvmd.peers import PeerService
from proto.framing import encode_frame
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit

FAST = {"gossip_interval": 0.2, "suspect_after": 0.8, "down_after": 1.6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nodes:
    """PeerServices on 127.0.0.1, one loop, per-node ports and state dirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.svcs: dict[str, PeerService] = {}
        self.ports: dict[str, int] = {}

    async def start(self, name: str, **kw: Any) -> PeerService:
        port = self.ports.setdefault(name, free_port())
        cfg = Config(node_name=name, state_dir=self.root / name, listen_address="127.0.0.1",
                     peer_port=port)
        svc = PeerService(cfg, **{**FAST, **kw})  # type: ignore[arg-type]
        await svc.start()
        self.svcs[name] = svc
        return svc

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def stop_all(self) -> None:
        for n in list(self.svcs):
            await self.svcs.pop(n).stop()


async def wait_for(pred: Callable[[], bool], timeout: float = 8.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.05)


def alive(svc: PeerService, names: list[str]) -> bool:
    return {n["name"]: n["state"] for n in svc.nodes()} == {n: "alive" for n in names}


def drop_link(svc: PeerService, node: str) -> None:
    """Forget the cached connection, so the next call dials anew."""
    transport = getattr(svc, "transport", None)
    if transport is not None:
        transport.drop_link(node)
    else:  # older layout
        svc._drop_link(node)  # type: ignore[attr-defined]


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Nodes]:
    nodes = Nodes(tmp_path)
    try:
        yield nodes
    finally:
        await nodes.stop_all()


async def make_cluster(lab: Nodes, names: list[str]) -> list[PeerService]:
    svcs = [await lab.start(n) for n in names]
    await svcs[0].cluster_init()
    for s in svcs[1:]:
        await s.join(lab.addr(names[0]), (await svcs[0].mint_token())["token"])
    await wait_for(lambda: all(alive(s, names) for s in svcs), what="convergence")
    return svcs


async def connect_from(src: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))


def preauth_count(svc: PeerService) -> int:
    return int(svc.transport.preauth.count)


async def settle(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    """Give the server time to see closed connections (no failure here: the member's
    call is what must work)."""
    with contextlib.suppress(AssertionError, AttributeError):
        await wait_for(pred, timeout)


# -- 1. the peer port cannot be locked ---------------------------------------------------


async def test_connect_close_flood_then_member_rpc(lab: Nodes) -> None:
    """1,000 sequential TCP connect+close (from the members' own address), then a member
    dials anew and its RPC answers: every slot was freed when its connection died."""
    n1, n2 = await make_cluster(lab, ["node1", "node2"])
    for _ in range(1000):
        _, w = await asyncio.open_connection("127.0.0.1", lab.ports["node1"])
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()
    await settle(lambda: preauth_count(n1) == 0)
    drop_link(n2, "node1")
    assert (await n2.call("node1", "peer.ping", timeout=5))["node"] == "node1"
    assert preauth_count(n1) == 0
    assert all(sc.authed for sc in n1.transport.server_conns.values())


async def test_idle_unauthenticated_do_not_block_join_or_call(lab: Nodes) -> None:
    """200 idle connections (50 from the members' address, 150 from 50 others, half of
    them after the SSH banner) sit on the port; a node still joins and a member calls."""
    n1, n2 = await make_cluster(lab, ["node1", "node2"])
    n3 = await lab.start("node3")
    idle: list[asyncio.StreamWriter] = []
    try:
        sources = ["127.0.0.1"] * 50 + [f"127.0.1.{i % 50 + 1}" for i in range(150)]
        for i, src in enumerate(sources):
            _, w = await connect_from(src, lab.ports["node1"])
            if i % 2:
                w.write(b"SSH-2.0-idle\r\n")
            idle.append(w)
        await asyncio.sleep(0.3)
        tok = (await n1.mint_token())["token"]
        await n3.join(lab.addr("node1"), tok)
        drop_link(n2, "node1")
        assert (await n2.call("node1", "peer.ping", timeout=5))["node"] == "node1"
        await wait_for(lambda: alive(n1, ["node1", "node2", "node3"]), what="node3 alive")
        tr = n1.transport
        assert tr.preauth.count <= 128
        assert all(len(v) <= 8 for v in tr.preauth.by_source.values())
    finally:
        for w in idle:
            w.close()


async def test_unauthenticated_connections_time_out(lab: Nodes) -> None:
    """A connection that does not authenticate within login_timeout is closed and its
    slot freed (banner sent or not)."""
    from cnvmd.peers.transport import Tuning

    n1 = await lab.start("node1", tuning=Tuning(login_timeout=1.0))
    await n1.cluster_init()
    conns = [await connect_from(f"127.0.5.{i}", lab.ports["node1"]) for i in (1, 2)]
    conns[1][1].write(b"SSH-2.0-slow\r\n")
    try:
        for r, _ in conns:
            async with asyncio.timeout(4):
                while await r.read(65536):
                    pass
        await wait_for(lambda: preauth_count(n1) == 0, what="slots freed")
    finally:
        for _, w in conns:
            w.close()


# -- 2. enrolment cannot hold memory or slots ---------------------------------------------


async def enroll_conn(port: int, src: str = "127.0.0.1") -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1", port, username="_enroll", local_addr=(src, 0),
        client_keys=[asyncssh.generate_private_key("ssh-ed25519")], known_hosts=None,
        agent_path=None, config=None)


async def test_enrolment_channel_size_capped(lab: Nodes) -> None:
    """A frame announcing 15 MiB on the enrolment channel is refused at its header: the
    channel closes while we are still sending (nothing near 15 MiB is ever buffered)."""
    (_n1,) = await make_cluster(lab, ["node1"])
    conn = await enroll_conn(lab.ports["node1"])
    try:
        w, _r, _ = await conn.open_session(subsystem="cnvm-enroll", encoding=None)
        w.write((15 << 20).to_bytes(4, "big"))
        t0 = time.monotonic()
        sent = 0
        with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
            async with asyncio.timeout(5):
                while not w.channel.is_closing():
                    w.write(os.urandom(64 << 10))
                    sent += 64 << 10
                    await w.drain()
        assert time.monotonic() - t0 < 3, "the enrolment channel was not closed"
        assert sent < (4 << 20)
        # A second channel on an enrolment connection is refused.
        if not conn.is_closed():
            with pytest.raises((asyncssh.ChannelOpenError, OSError, asyncssh.Error)):
                await conn.open_session(subsystem="cnvm-enroll", encoding=None)
    finally:
        conn.close()


async def test_enrolment_connections_capped(lab: Nodes) -> None:
    """Idle enrolment connections beyond the per-source cap (2) are closed, oldest
    first; a real join still works next to them."""
    (n1,) = await make_cluster(lab, ["node1"])
    conns = [await enroll_conn(lab.ports["node1"]) for _ in range(20)]
    try:
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: all(c.is_closed() for c in conns[:-2]), timeout=3)
        assert sum(not c.is_closed() for c in conns) <= 2
        assert all(c.is_closed() for c in conns[:-2]), "the oldest must give way"
        n2 = await lab.start("node2")
        await n2.join(lab.addr("node1"), (await n1.mint_token())["token"])
        assert n1.transport.enrolling.count <= 2
    finally:
        for c in conns:
            c.close()


async def test_enrolment_connection_times_out(lab: Nodes) -> None:
    """An enrolment connection that never enrols is closed after enroll_timeout, and
    its slots are freed."""
    from cnvmd.peers.transport import Tuning

    n1 = await lab.start("node1", tuning=Tuning(enroll_timeout=1.0))
    await n1.cluster_init()
    conns = [await enroll_conn(lab.ports["node1"], f"127.0.3.{i}") for i in (1, 2, 3)]
    try:
        await wait_for(lambda: all(c.is_closed() for c in conns), timeout=4,
                       what="enrolment timeout")
        await wait_for(lambda: n1.transport.enrolling.count == 0
                       and n1.transport.preauth.count == 0, what="slots freed")
    finally:
        for c in conns:
            c.close()


async def test_enrolment_frames_with_huge_fields_are_refused(lab: Nodes) -> None:
    """Fields of the wrong type never turn into allocations (bytes(2**40))."""
    (n1,) = await make_cluster(lab, ["node1"])
    conn = await enroll_conn(lab.ports["node1"])
    async with conn:
        w, r, _ = await conn.open_session(subsystem="cnvm-enroll", encoding=None)
        w.write(encode_frame({"t": "enroll1", "payload": 1 << 40, "node": "x",
                              "nonce": 1 << 40}))
        data = await asyncio.wait_for(r.read(), 5)
        assert b"enroll_err" in data
    assert alive(n1, ["node1"])


# -- 3. files beneath their root, never through a symlink; relays to loopback only ---------


def transfer_dir(svc: PeerService) -> Path:
    return Path(svc.config.state_dir) / "transfer"


async def test_file_get_never_follows_symlinks(lab: Nodes, tmp_path: Path) -> None:
    n1, n2 = await make_cluster(lab, ["node1", "node2"])
    root = transfer_dir(n2)
    (root / "sub").mkdir(parents=True)
    key = Path(n2.config.state_dir) / "peers" / "node_key"
    assert key.stat().st_mode & 0o777 == 0o600
    (root / "key").symlink_to(key)
    (root / "etc").symlink_to("/etc")
    (root / "sub" / "up").symlink_to("../../peers/node_key")
    back = tmp_path / "back"
    for path in (root / "key", root / "etc" / "hostname", root / "sub" / "up"):
        with pytest.raises(ProtoError) as ei:
            await n1.get_file("node2", str(path), back)
        assert ei.value.code == ErrorCode.INVALID_ARGUMENT, (path, ei.value)
    assert not back.exists()
    # The state dir itself (where the key lives) is not a root peers may read.
    with pytest.raises(ProtoError) as ei:
        await n1.get_file("node2", str(key), back)
    assert ei.value.code == ErrorCode.PERMISSION_DENIED
    # Lexical tricks and non-regular files.
    for bad in (f"{root}/sub/../key", f"{root}//key", "relative/path"):
        with pytest.raises(ProtoError) as ei:
            await n1.get_file("node2", bad, back)
        assert ei.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.PERMISSION_DENIED)
    os.mkfifo(root / "fifo")
    with pytest.raises(ProtoError) as ei:
        await asyncio.wait_for(n1.get_file("node2", str(root / "fifo"), back), 5)
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT


async def test_file_put_never_writes_through_symlinks(lab: Nodes, tmp_path: Path) -> None:
    n1, n2 = await make_cluster(lab, ["node1", "node2"])
    root = transfer_dir(n2)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("original")
    root.mkdir(parents=True, exist_ok=True)
    (root / "dir").symlink_to(outside)
    (root / "file").symlink_to(victim)
    src = tmp_path / "payload"
    src.write_bytes(b"evil")
    with pytest.raises(ProtoError) as ei:
        await n1.put_file("node2", src, str(root / "dir" / "victim"))
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    # A symlink as the last component is replaced, never written through.
    await n1.put_file("node2", src, str(root / "file"))
    assert victim.read_text() == "original"
    assert not (root / "file").is_symlink() and (root / "file").read_bytes() == b"evil"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    # A fresh directory beneath the root is fine.
    await n1.put_file("node2", src, str(root / "a" / "b" / "c"))
    assert (root / "a" / "b" / "c").read_bytes() == b"evil"


async def test_tcp_relay_needs_a_literal_loopback_ip(lab: Nodes) -> None:
    n1, _ = await make_cluster(lab, ["node1", "node2"])
    cases = {"127.evil.example": ErrorCode.INVALID_ARGUMENT,
             "localhost": ErrorCode.INVALID_ARGUMENT,
             "10.0.0.1": ErrorCode.PERMISSION_DENIED,
             "0.0.0.0": ErrorCode.PERMISSION_DENIED}
    for host, code in cases.items():
        with pytest.raises(ProtoError) as ei:
            await n1.open_stream("node2", "tcp", {"host": host, "port": 1})
        assert ei.value.code == code, (host, ei.value)
    with pytest.raises(ProtoError) as ei:
        await n1.open_stream("node2", "tcp", {"host": "127.0.0.1", "port": "22"})
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT


# -- 4. membership changes need proof -----------------------------------------------------


def record(svc: PeerService, name: str) -> dict[str, Any]:
    m = svc.membership.get(name)
    assert m is not None
    return dict(m.to_wire())


async def test_gossip_cannot_mint_repin_or_rotate(lab: Nodes) -> None:
    """A member (node3, "rogue") pushes a ghost member with its own key, node2's record
    with another key, node2's record with another address, a tombstone of node2 and a new
    cluster secret: node1 takes none of it, and the ghost cannot log in."""
    n1, n2, rogue = await make_cluster(lab, ["node1", "node2", "node3"])
    ghost_key = asyncssh.generate_private_key("ssh-ed25519")
    ghost_pub = ghost_key.export_public_key("openssh").decode().strip()
    assert n1.cluster is not None
    before = (n1.cluster.epoch, n1.cluster.secret, record(n1, "node2")["pubkey"])
    r2 = record(n1, "node2")
    cluster = {**n1.cluster.to_wire(), "epoch": n1.cluster.epoch + 1, "secret": "ab" * 32}
    payloads = [
        [{**r2, "name": "ghost", "pubkey": ghost_pub, "incarnation": 1, "version": 0}],
        [{**r2, "pubkey": ghost_pub, "incarnation": r2["incarnation"] + 5}],
        [{**r2, "addr": "203.0.113.9", "version": r2["version"] + 1000}],
        [{**r2, "admin": "removed", "version": r2["version"] + 1000}],
        [{**r2, "pubkey": ghost_pub, "epoch": r2["epoch"] + 1, "incarnation": 1, "version": 0}],
    ]
    for members in payloads:
        with contextlib.suppress(ProtoError):
            await rogue.call("node1", "peer.gossip", {"cluster": cluster, "members": members})
    await asyncio.sleep(0.5)
    assert n1.membership.get("ghost") is None
    assert (n1.cluster.epoch, n1.cluster.secret, record(n1, "node2")["pubkey"]) == before
    assert record(n1, "node2")["addr"] == "127.0.0.1"
    assert alive(n1, ["node1", "node2", "node3"])
    with pytest.raises(asyncssh.PermissionDenied):
        conn = await asyncssh.connect("127.0.0.1", lab.ports["node1"], username="ghost",
                                      client_keys=[ghost_key], known_hosts=None,
                                      agent_path=None, config=None)
        conn.close()
    drop_link(n2, "node1")
    assert (await n2.call("node1", "peer.ping", timeout=5))["node"] == "node1"


async def test_peer_removed_needs_a_signed_removal(lab: Nodes) -> None:
    """A member cannot make another leave the cluster by just saying so."""
    _n1, n2, rogue = await make_cluster(lab, ["node1", "node2", "node3"])
    with pytest.raises(ProtoError) as ei:
        await rogue.call("node2", "peer.removed", {"by": "node1"})
    assert ei.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.PERMISSION_DENIED)
    forged = {**record(n2, "node2"), "admin": "removed",
              "removal": {"by": "node1", "sig": "AAAA"}}
    with pytest.raises(ProtoError) as ei:
        await rogue.call("node2", "peer.removed", {"record": forged})
    assert ei.value.code == ErrorCode.PERMISSION_DENIED
    await asyncio.sleep(0.5)
    assert n2.cluster is not None and alive(n2, ["node1", "node2", "node3"])


async def test_removed_node_needs_a_new_token(lab: Nodes) -> None:
    """After a removal, a member gossiping the removed node back (a new epoch, its own
    key) is refused; the node logs in again only after joining with a token."""
    n1, n2, n3 = await make_cluster(lab, ["node1", "node2", "node3"])
    key3 = n3.key
    assert key3 is not None
    old = record(n1, "node3")
    await n1.remove("node3")
    await wait_for(lambda: n3.cluster is None and n2.membership.pinned_key("node3") is None,
                   what="removal spread")
    assert n1.cluster is not None
    back = {**old, "admin": "active", "epoch": old["epoch"] + 1, "incarnation": 1,
            "version": 0}
    for target in ("node1", "node2"):
        caller = n2 if target == "node1" else n1
        with contextlib.suppress(ProtoError):
            await caller.call(target, "peer.gossip",
                              {"cluster": n1.cluster.to_wire(), "members": [back]})
    await asyncio.sleep(0.5)
    for svc in (n1, n2):
        assert svc.membership.pinned_key("node3") is None
    with pytest.raises(asyncssh.PermissionDenied):
        conn = await asyncssh.connect("127.0.0.1", lab.ports["node1"], username="node3",
                                      client_keys=[key3], known_hosts=None, agent_path=None,
                                      config=None)
        conn.close()
    await n3.join(lab.addr("node2"), (await n2.mint_token())["token"])
    await wait_for(lambda: all(alive(s, ["node1", "node2", "node3"]) for s in (n1, n2, n3)),
                   what="node3 back with a token")


async def test_forged_signatures_are_refused(lab: Nodes) -> None:
    """Proofs must be by the member they name: an admission or a removal 'by node1'
    signed with node3's key, and a rotation signed by a non-member, are refused; an
    update of node2's record signed by node3 too."""
    from cnvmd.peers import trust

    n1, n2, rogue = await make_cluster(lab, ["node1", "node2", "node3"])
    assert rogue.key is not None and n1.cluster is not None
    cid = n1.cluster.cluster_id
    ghost_pub = trust.public_line(asyncssh.generate_private_key("ssh-ed25519"))
    ghost = {**record(n1, "node2"), "name": "ghost", "pubkey": ghost_pub, "incarnation": 1,
             "version": 0, "sig": "", "prev": {}}
    ghost["cert"] = trust.cert(rogue.key, "node1", trust.ADMIT, [cid, "ghost", ghost_pub, 1])
    r2 = record(n1, "node2")
    tomb = {**r2, "admin": "removed", "version": r2["version"] + 1,
            "removal": trust.cert(rogue.key, "node1", trust.REMOVE,
                                  [cid, "node2", r2["pubkey"], r2["epoch"]])}
    hijack = {**r2, "addr": "203.0.113.9", "version": r2["version"] + 1000}
    hijack["sig"] = trust.sign(rogue.key, trust.RECORD,
                               [cid, "node2", "203.0.113.9", r2["port"], r2["pubkey"],
                                r2["epoch"], r2["incarnation"], hijack["version"], "active",
                                r2["caps"], r2["cnvms"], r2["joined"]])
    outsider = asyncssh.generate_private_key("ssh-ed25519")
    rotated = n1.cluster.rotated(outsider, "nobody", "node2").to_wire()
    await rogue.call("node1", "peer.gossip", {"cluster": rotated,
                                              "members": [ghost, tomb, hijack]})
    await asyncio.sleep(0.3)
    assert n1.membership.get("ghost") is None
    assert record(n1, "node2")["admin"] == "active"
    assert record(n1, "node2")["addr"] == "127.0.0.1"
    assert n1.cluster.epoch == 1
    # node2's own (signed) record relayed with its admission swapped: the update is taken
    # (the owner signed it), the certificate is not.
    cert2 = record(n1, "node2")["cert"]
    assert cert2.get("by") == "node1"
    n2.membership.heartbeat()
    fresh = next(m for m in n2.gossip.payload()["members"] if m["name"] == "node2")
    fresh["cert"] = {"by": "node3", "sig": "AAAA"}
    await rogue.call("node1", "peer.gossip", {"cluster": n1.cluster.to_wire(),
                                              "members": [fresh]})
    assert record(n1, "node2")["version"] >= fresh["version"]
    assert record(n1, "node2")["cert"] == cert2
    # The genuine article: a removal by node1 spreads with its proofs.
    await n1.remove("node2")
    await wait_for(lambda: rogue.membership.pinned_key("node2") is None
                   and rogue.cluster is not None and rogue.cluster.epoch == 2,
                   what="signed removal and rotation spread")
