import asyncio
import random

import pytest

from cnvmd.ipam import Ipam, IpamError, Subnet

pytestmark = pytest.mark.unit


def make_cluster(names, cidr="10.100.101.0/24", seed=0):
    rng = random.Random(seed)
    subnet = Subnet.parse(cidr, gateway=None)
    nodes = {n: Ipam(n, subnet) for n in names}

    async def jitter():
        await asyncio.sleep(rng.random() * 0.002)

    def wiring(me):
        others = [o for o in nodes.values() if o.node != me]

        async def ask(ip, owner):
            async def one(o):
                await jitter()  # request in flight
                granted = o.on_claim(ip, me, owner)
                await jitter()  # response in flight
                return granted
            return all(await asyncio.gather(*(one(o) for o in others)))

        async def commit(ip, owner):
            for o in others:
                await jitter()
                o.on_commit(ip, owner)

        async def abandon(ip):
            for o in others:
                o.on_abandon(ip, me)

        return ask, commit, abandon

    async def allocate(node, owner, want=None):
        ask, commit, abandon = wiring(node)
        return await nodes[node].allocate(
            owner, lambda ip: ask(ip, owner), lambda ip: commit(ip, owner), abandon, want=want)

    return nodes, allocate


def test_subnet_validation():
    s = Subnet.parse("10.100.101.0/24", gateway="10.100.101.1")
    assert str(s.check("10.100.101.7")) == "10.100.101.7"
    for bad, msg in [("10.100.102.7", "outside"), ("10.100.101.255", "reserved"),
                     ("10.100.101.1", "reserved"), ("banana", "not an IPv4")]:
        with pytest.raises(IpamError, match=msg):
            s.check(bad)
    with pytest.raises(IpamError, match="bad subnet"):
        Subnet.parse("10.100.101.5/24")


async def test_concurrent_allocations_never_collide():
    nodes, allocate = make_cluster(["node1", "node2", "node3"])
    owners = {}
    for i in range(50):  # 50 pairs deploying at the same moment on two nodes
        a, b = await asyncio.gather(allocate("node1", f"node1/a{i}"),
                                    allocate("node2", f"node2/b{i}"))
        assert a != b
        for ip, owner in ((a, f"node1/a{i}"), (b, f"node2/b{i}")):
            assert ip not in owners, f"{ip} handed out twice"
            owners[ip] = owner
    for n in nodes.values():
        for ip, owner in owners.items():
            assert n.in_use[ip] == owner


@pytest.mark.parametrize("names", [["node1", "node2"], ["node1", "node2", "node3"]])
async def test_same_wanted_ip_on_two_nodes_only_one_wins(names):
    for seed in range(30):
        _nodes, allocate = make_cluster(names, seed=seed)
        res = await asyncio.gather(
            allocate("node1", "node1/x", want="10.100.101.50"),
            allocate("node2", "node2/y", want="10.100.101.50"),
            return_exceptions=True)
        wins = [r for r in res if r == "10.100.101.50"]
        assert len(wins) <= 1, res
        assert all(isinstance(r, IpamError) for r in res if r != "10.100.101.50")


async def test_claimed_ip_refused_and_release_frees_it():
    nodes, allocate = make_cluster(["node1", "node2"])
    assert await allocate("node1", "node1/a", want="10.100.101.9") == "10.100.101.9"
    with pytest.raises(IpamError, match="already in use"):
        await allocate("node2", "node2/b", want="10.100.101.9")
    for n in nodes.values():
        n.on_release("10.100.101.9", "node1/a")
    assert await allocate("node2", "node2/b", want="10.100.101.9") == "10.100.101.9"


async def test_subnet_exhaustion():
    _nodes, allocate = make_cluster(["n1", "n2"], cidr="10.9.0.0/30")
    got = {await allocate("n1", "n1/a"), await allocate("n2", "n2/b")}
    assert len(got) == 2
    with pytest.raises(IpamError, match="no free address"):
        await allocate("n1", "n1/c")
