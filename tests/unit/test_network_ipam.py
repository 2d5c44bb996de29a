"""ClusterIpam (the claim protocol wired to a transport and to disk) with an
in-process fake peer set: every call goes through `handle`, as over the mesh."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from pathlib import Path

import pytest

from cnvmd.ipam import Subnet
from cnvmd.network.addresses import ClusterIpam
from cnvmd.network.names import NetworkError
from cnvmd.state import StateStore
from proto.messages import ErrorCode

pytestmark = pytest.mark.unit

SUBNET = "10.100.101.0/24"


class FakePeers:
    """Peer set of one node: the other ClusterIpams, with jitter and a `down` set."""

    def __init__(self, me: str, cluster: dict[str, ClusterIpam], rng: random.Random,
                 down: set[str]) -> None:
        self.me, self.cluster, self.rng, self.down = me, cluster, rng, down
        self.unreachable: set[str] = set()

    def up_peers(self) -> list[str]:
        return sorted(n for n in self.cluster if n != self.me and n not in self.down)

    def members(self) -> list[str]:
        return sorted(n for n in self.cluster if n != self.me)

    async def call(self, node, op, args):
        await asyncio.sleep(self.rng.random() * 0.002)
        if node in self.unreachable:
            raise ConnectionError(f"{node} unreachable")
        res = await self.cluster[node].handle(op, dict(args))
        await asyncio.sleep(self.rng.random() * 0.002)
        return res


def make(names, tmp: Path | None = None, seed=0, gateway=None):
    rng = random.Random(seed)
    cluster: dict[str, ClusterIpam] = {}
    down: set[str] = set()
    for n in names:
        store = StateStore(tmp / n) if tmp else None
        cluster[n] = ClusterIpam(n, Subnet.parse(SUBNET, gateway), store=store)
    for n, c in cluster.items():
        c.peers = FakePeers(n, cluster, rng, down)
    return cluster, down


async def test_50_concurrent_pairs_on_two_nodes_never_share_an_address(tmp_path):
    cluster, _ = make(["node1", "node2", "node3"], tmp_path)
    seen: dict[str, str] = {}
    for i in range(50):
        a, b = await asyncio.gather(cluster["node1"].allocate(f"a{i}"),
                                    cluster["node2"].allocate(f"b{i}"))
        assert a != b
        for ip, owner in ((a, f"a{i}"), (b, f"b{i}")):
            assert ip not in seen, f"{ip} handed out twice"
            seen[ip] = owner
    for c in cluster.values():
        assert c.table() == dict(sorted(seen.items()))


async def test_same_wanted_address_on_two_nodes_one_wins():
    for seed in range(20):
        cluster, _ = make(["node1", "node2", "node3"], seed=seed)
        res = await asyncio.gather(cluster["node1"].allocate("x", want="10.100.101.50"),
                                   cluster["node3"].allocate("y", want="10.100.101.50"),
                                   return_exceptions=True)
        ok = [r for r in res if isinstance(r, str)]
        assert len(ok) <= 1, res  # safety; both may lose a simultaneous race
        for err in (r for r in res if isinstance(r, Exception)):
            assert isinstance(err, NetworkError) and err.code == ErrorCode.ALREADY_EXISTS
        if not ok:  # a retry settles it; grants of the lost race are gone already
            assert await cluster["node3"].allocate("y", want="10.100.101.50")
        holders = {c.owner_of("10.100.101.50") for c in cluster.values()}
        assert len(holders) == 1 and holders <= {"x", "y"}


async def test_want_checks_are_clear_and_change_nothing(tmp_path):
    cluster, _ = make(["node1", "node2"], tmp_path, gateway="10.100.101.1")
    n1 = cluster["node1"]
    assert await n1.allocate("web", want="10.100.101.5") == "10.100.101.5"
    before = {n: c.table() for n, c in cluster.items()}
    for want, code, msg in [
        ("10.100.102.5", ErrorCode.INVALID_ARGUMENT, "outside the cluster subnet"),
        ("10.100.101.1", ErrorCode.INVALID_ARGUMENT, "reserved"),
        ("banana", ErrorCode.INVALID_ARGUMENT, "not an IPv4 address"),
        ("10.100.101.5", ErrorCode.ALREADY_EXISTS, "already in use"),
    ]:
        with pytest.raises(NetworkError, match=msg) as ei:
            await cluster["node2"].allocate("db", want=want)
        assert ei.value.code == code
    assert {n: c.table() for n, c in cluster.items()} == before
    # idempotent per owner; another address for the same owner is refused
    assert await n1.allocate("web") == "10.100.101.5"
    with pytest.raises(NetworkError, match="already has"):
        await n1.allocate("web", want="10.100.101.6")


async def test_release_frees_everywhere_and_runs_callbacks(tmp_path):
    cluster, _ = make(["node1", "node2"], tmp_path)
    gone = []

    async def cb(owner, ip):
        gone.append((owner, ip))

    cluster["node2"].on_released.append(cb)
    ip = await cluster["node1"].allocate("web")
    assert cluster["node2"].owner_of(ip) == "web"
    assert await cluster["node1"].release("web") == ip
    assert all(c.owner_of(ip) is None for c in cluster.values())
    assert gone == [("web", ip)]
    assert await cluster["node1"].release("web") is None
    assert await cluster["node2"].allocate("db", want=ip) == ip  # reusable


async def test_teleport_keeps_the_address():
    """The owner is the cnvm: another node re-claiming for the same owner is granted."""
    cluster, _ = make(["node1", "node2"])
    ip = await cluster["node1"].allocate("web")
    assert await cluster["node2"].allocate("web", want=ip) == ip
    assert await cluster["node2"].allocate("web") == ip


async def test_persisted_table_survives_a_restart(tmp_path):
    cluster, _ = make(["node1", "node2"], tmp_path)
    ip = await cluster["node1"].allocate("web")
    again = ClusterIpam("node2", Subnet.parse(SUBNET), store=StateStore(tmp_path / "node2"))
    assert again.table() == {ip: "web"}
    with pytest.raises(NetworkError, match="already in use"):
        await again.allocate("db", want=ip)


async def test_unreachable_range_owner_refuses_a_specific_address_cleanly():
    """Ranges (partition safety): a specific address is granted by the owner of its
    range only; while that owner is unreachable the claim is refused, naming it."""
    cluster, _ = make(["node1", "node2", "node3"])
    await cluster["node3"].ensure_range()  # node1 founds the ring, hands node3 a part
    want = "10.100.101.9"
    holder = cluster["node3"].ring.owner_of(int(ipaddress.IPv4Address(want)))
    assert holder == "node1"
    cluster["node3"].peers.unreachable.add("node1")
    with pytest.raises(NetworkError, match="owned by node1, which is unreachable") as ei:
        await cluster["node3"].allocate("web", want=want)
    assert ei.value.code == ErrorCode.UNAVAILABLE
    assert all(not c.table() for c in cluster.values())
    cluster["node3"].peers.unreachable.clear()
    assert await cluster["node3"].allocate("web", want=want) == want
    assert all(c.owner_of(want) == "web" for c in cluster.values())


async def test_a_node_that_was_down_catches_up(tmp_path):
    cluster, down = make(["node1", "node2", "node3"], tmp_path)
    down.add("node3")
    ip = await cluster["node1"].allocate("web")
    assert cluster["node3"].owner_of(ip) is None
    down.clear()
    assert await cluster["node3"].sync_from("node1") == 1
    assert cluster["node3"].owner_of(ip) == "web"
    with pytest.raises(NetworkError, match="already in use"):
        await cluster["node3"].allocate("db", want=ip)


async def test_mine_tracks_claims_made_through_this_node(tmp_path):
    """`mine` lets a deploy use an address reserved on this node, and only here."""
    cluster, _ = make(["node1", "node2"], tmp_path)
    ip = await cluster["node1"].allocate("web")
    assert cluster["node1"].mine == {"web"} and cluster["node2"].mine == set()
    again = ClusterIpam("node1", Subnet.parse(SUBNET), store=StateStore(tmp_path / "node1"))
    assert again.mine == {"web"} and again.table() == {ip: "web"}
    await cluster["node2"].release("web")
    assert cluster["node1"].mine == set()


async def test_concurrent_requests_for_one_owner_get_one_address():
    cluster, _ = make(["node1", "node2"])
    res = await asyncio.gather(*(cluster["node1"].allocate("node:node1") for _ in range(5)))
    assert len(set(res)) == 1 and list(cluster["node2"].table().values()) == ["node:node1"]


def partition(cluster, a: str, b: str, on: bool = True) -> None:
    for x, y in ((a, b), (b, a)):
        p = cluster[x].peers
        p.down = set(p.down)  # per node from here on
        if on:
            p.down.add(y)
            p.unreachable.add(y)
        else:
            p.down.discard(y)
            p.unreachable.discard(y)


async def test_a_partition_never_hands_one_address_out_twice(tmp_path):
    cluster, _ = make(["node1", "node2"], tmp_path)
    await cluster["node2"].ensure_range()
    assert cluster["node1"].ring.size_of("node1") and cluster["node2"].ring.size_of("node2")
    partition(cluster, "node1", "node2")
    got = await asyncio.gather(*(cluster[n].allocate(f"{n}-c{i}") for n in ("node1", "node2")
                                 for i in range(20)))
    assert len(set(got)) == 40, "an address was handed out twice"
    # a specific address of the other side's range is refused, naming its owner
    theirs = next(ip for ip in got if cluster["node1"].owner_of(ip) is None)
    with pytest.raises(NetworkError, match="owned by node2, which is unreachable") as ei:
        await cluster["node1"].allocate("x", want=str(ipaddress.IPv4Address(theirs) + 1))
    assert ei.value.code == ErrorCode.UNAVAILABLE
    partition(cluster, "node1", "node2", on=False)
    await cluster["node1"].sync_from("node2")
    await cluster["node2"].sync_from("node1")
    t1, t2 = cluster["node1"].table(), cluster["node2"].table()
    assert t1 == t2 and len(t1) == 40 and len(set(t1.values())) == 40


async def test_an_empty_range_asks_for_a_hand_over():
    cluster, _ = make(["node1", "node2"])
    n2 = cluster["node2"]
    ip = await n2.allocate("web")  # no range yet: founding and hand-over on demand
    assert n2.ring.owner_of(int(ipaddress.IPv4Address(ip))) == "node2"
    assert cluster["node1"].ring.to_wire() == n2.ring.to_wire()


async def test_upgrade_keeps_the_addresses_of_a_store_without_ranges(tmp_path):
    """A claim store from before the ring (in_use + mine, no ring) loads unchanged;
    once the ring is founded no address in use is handed out again."""
    legacy = {f"10.100.101.{i}": f"old{i}" for i in range(1, 200)}
    for n in ("node1", "node2"):
        StateStore(tmp_path / n).save("network", "ipam", {
            "in_use": legacy,
            "mine": [f"old{i}" for i in range(1, 200) if i % 2 == (n == "node1")]})
    cluster, _ = make(["node1", "node2"], tmp_path)
    for c in cluster.values():
        assert c.table() == dict(sorted(legacy.items())) and c.ring.empty
        assert c.ip_of("old7") == "10.100.101.7"
    got = await asyncio.gather(*(cluster[n].allocate(f"new-{n}-{i}")
                                 for n in ("node1", "node2") for i in range(20)))
    assert len(set(got)) == 40 and not set(got) & set(legacy)
    again = StateStore(tmp_path / "node2").load("network", "ipam")
    assert again["ring"] and set(legacy) <= set(again["in_use"])
    assert ClusterIpam("node2", Subnet.parse(SUBNET),
                       store=StateStore(tmp_path / "node2")).ring.to_wire() == \
        cluster["node2"].ring.to_wire()


def test_ring_merge_hand_over_and_hostile_input():
    from cnvmd.ipamring import Entry, Ring, RingError

    r = Ring.for_subnet(ipaddress.IPv4Network(SUBNET))
    r.claim_all("node1")
    a, b = r.hand_over("node1", "node2", set())
    assert r.owner_of(a) == "node2" and r.owner_of(a - 1) == "node1" and b == r.hi + 1
    other = Ring(r.lo, r.hi)
    assert other.merge(r.tokens) and other.to_wire() == r.to_wire()
    assert not other.merge({r.lo: Entry("node9", 1)}) or other.tokens[r.lo].owner != "node9"
    assert other.merge({r.lo: Entry("node3", 2)}) and other.owner_of(r.lo) == "node3"
    for bad in ({"10.0.0.1": ["n", 1]}, {"x": ["n", 1]}, {"10.100.101.9": ["../x", 1]},
                {"10.100.101.9": ["n", True]}, {"10.100.101.9": ["n"]}, [1]):
        with pytest.raises(RingError):
            r.parse(bad)


async def test_a_removed_members_ranges_go_to_the_node_that_removed_it(tmp_path):
    """`cluster remove node3` on node1: node1 takes node3's ranges (one decision),
    node2 learns the new owner by the ring exchange, node3's addresses in use stay
    in use, and the freed part of its ranges is allocated by node1 again."""
    cluster, down = make(["node1", "node2", "node3"], tmp_path)
    for n in ("node2", "node3"):
        await cluster[n].ensure_range()
    held = await cluster["node3"].allocate("web3")
    await cluster["node1"].sync_from("node3")
    await cluster["node2"].sync_from("node3")
    n3_ranges = cluster["node1"].ring.owned("node3")
    assert n3_ranges
    down.add("node3")
    taken = await cluster["node1"].reclaim("node3")
    assert taken and cluster["node1"].ring.owned("node3") == []
    assert cluster["node2"].ring.owned("node3") == []  # learnt by the exchange
    assert cluster["node2"].ring.to_wire() == cluster["node1"].ring.to_wire()
    assert await cluster["node1"].reclaim("node3") == []  # idempotent
    # node3's cnvm keeps its address; everything else of its ranges is node1's to give
    lo, hi = n3_ranges[0]
    got: set[str] = set()
    with pytest.raises(NetworkError):  # until node1's ranges (its own + node3's) run out
        for i in range(300):
            got.add(await cluster["node1"].allocate(f"n1-{i}"))
    assert held not in got
    assert any(lo <= int(ipaddress.IPv4Address(ip)) < hi for ip in got)
