"""Partition-safe addresses (issue 18): a split cluster never hands one address out twice.

Real cnvmd on 2 lab nodes ("hxp" lab). Once the cluster has formed, each node owns
address ranges (node1 founds the ring, node2 gets half of the free addresses
handed over). Then node1 and node2 stop hearing each other (all underlay traffic
between them dropped in node1's netns): each side deploys 20 busybox cnvms with
automatic addresses, and a deploy asking for an address of the other side's range
is refused with ``unavailable`` naming that node. After healing, both nodes agree
on the address table and no address is held twice.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest
import pytest_asyncio

from proto.messages import ErrorCode, ProtoError
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="module")]

LAB = "hxp"
PER_SIDE = 20


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plab(tmp_path_factory: pytest.TempPathFactory):
    tl = TeleLab(LAB, 2)
    try:
        tmp = tmp_path_factory.mktemp("plab")
        await tl.up(tmp)
        await tl.call("node2", "images.import", {"path": str(tmp / "busybox-oci"),
                                                 "name": tl.image})
        yield tl
    except BaseException:
        tl.print_logs(60)
        raise
    finally:
        await tl.down()


async def cut(tl: TeleLab, on: bool) -> None:
    op = "-I" if on else "-D"
    peer = tl.lab.underlay_ip("node2")
    for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
        await tl.lab.exec("node1", ["iptables", "-w", op, chain, flag, peer, "-j", "DROP"])


async def ranges(tl: TeleLab, node: str) -> list[dict[str, str]]:
    return list((await tl.call(node, "net.ipam"))["ranges"])


async def wait_for(pred, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.5)


async def state_of(tl: TeleLab, node: str, other: str) -> str:
    view = await tl.call(node, "nodes")
    return next(m["state"] for m in view["nodes"] if m["name"] == other)


async def test_partitioned_sides_never_share_an_address(plab: TeleLab):
    async def both_own() -> bool:
        owners = [{r["owner"] for r in await ranges(plab, n)} for n in ("node1", "node2")]
        return all(o == {"node1", "node2"} for o in owners)

    await wait_for(both_own, "the nodes never came to own ranges each")
    ring = await ranges(plab, "node1")
    assert ring == await ranges(plab, "node2")
    theirs = next(r for r in ring if r["owner"] == "node2")
    await cut(plab, True)
    try:
        async def split() -> bool:
            return (await state_of(plab, "node1", "node2") == "down"
                    and await state_of(plab, "node2", "node1") == "down")

        await wait_for(split, "membership never saw the partition")

        async def deploy(node: str, i: int) -> str:
            res = await plab.call(node, "deploy", {"name": f"p{node[-1]}-{i}",
                                                   "image": plab.image,
                                                   "cmd": ["sleep", "3600"]}, timeout=300)
            return str(res["ip"])

        got = await asyncio.gather(*(deploy(n, i) for n in ("node1", "node2")
                                     for i in range(PER_SIDE)))
        assert len(set(got)) == 2 * PER_SIDE, f"an address was handed out twice: {got}"
        # a specific address of node2's range, asked on node1: refused, naming node2
        first = ipaddress.IPv4Address(theirs["first"])
        want = next(str(first + k) for k in range(256) if str(first + k) not in got)
        with pytest.raises(ProtoError) as ei:
            await plab.call("node1", "deploy", {"name": "pwant", "image": plab.image,
                                                "cmd": ["sleep", "3600"], "ip": want})
        assert ei.value.code == ErrorCode.UNAVAILABLE, ei.value
        assert "node2" in ei.value.message and "unreachable" in ei.value.message, ei.value
        assert not any(r["name"] == "pwant" for r in await plab.call("node1", "ls"))
    finally:
        await cut(plab, False)

    async def healed() -> bool:
        if await state_of(plab, "node1", "node2") != "alive":
            return False
        t1 = (await plab.call("node1", "net.ipam"))["in_use"]
        t2 = (await plab.call("node2", "net.ipam"))["in_use"]
        return bool(t1 == t2)

    await wait_for(healed, "the address tables never agreed after healing", 90)
    table = (await plab.call("node1", "net.ipam"))["in_use"]
    owners = list(table.values())
    assert len(owners) == len(set(owners)), table  # no owner twice, no address twice
    held = {}
    for n in ("node1", "node2"):
        for r in await plab.call(n, "ls"):
            ip = (await plab.call(n, "inspect", {"name": r["name"]}))["ip"]
            assert ip not in held, f"{ip} held by {held.get(ip)} and {r['name']}"
            held[ip] = r["name"]
            assert table.get(ip) == r["name"], (ip, r["name"], table.get(ip))
    assert len(held) == 2 * PER_SIDE
    # the address asked for before is free: node1 gets it from its owner now
    res = await plab.call("node1", "deploy", {"name": "pwant", "image": plab.image,
                                              "cmd": ["sleep", "3600"], "ip": want})
    assert res["ip"] == want
