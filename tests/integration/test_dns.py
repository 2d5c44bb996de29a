"""Names on the overlay (issue 15 item 5) on 3 real cnvmd nodes, nothing mocked.

cnvm hna (node1) resolves hnb (node2) by name through the resolver at 127.0.0.11 in
its own netns (busybox nslookup, and `nc hnb 7000` reaching hnb's counter); A for NAME
and NAME.cnvm, PTR for hnb's IP, TTL 1, UDP and TCP; unknown names NXDOMAIN; other
names forwarded to a dnslib fake upstream that the test runs in node1's lab netns.
After hnb teleports to node3, a new connection by name from hna reaches it at once,
and hnb resolves names from node3 (its resolver was opened there after the restore).
After `rm hnb` the name is NXDOMAIN. node3's daemon restarted without `dns_upstream`:
its existing cnvm gets a resolver again, external names are REFUSED.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cnvmlab import paths as labpaths
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAB = "hn"
UPSTREAM_PORT = 5300
IPS = {"hna": "10.100.101.61", "hnb": "10.100.101.62", "hnc": "10.100.101.63"}

FAKE_UPSTREAM = r"""
import socket, sys
from dnslib import DNSRecord, RR, A, QTYPE
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(4096)
    q = DNSRecord.parse(data)
    print("Q", str(q.q.qname), flush=True)
    r = q.reply()
    if q.q.qtype == QTYPE.A:
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
    s.sendto(r.pack(), addr)
"""

PROBE = r"""
import json, sys
from dnslib import DNSRecord, RCODE
name, qtype, proto = sys.argv[1:4]
q = DNSRecord.question(name, qtype)
a = DNSRecord.parse(q.send("127.0.0.11", 53, tcp=proto == "tcp", timeout=3))
print(json.dumps({"rcode": RCODE[a.header.rcode], "answers": [str(r.rdata) for r in a.rr],
                  "ttl": [r.ttl for r in a.rr]}))
"""


@pytest.fixture
async def dlab(tmp_path: Path):
    tl = TeleLab(LAB, 3)
    up_ip = labpaths.underlay_address(1)
    tl.extra_config = f'dns_upstream = "{up_ip}:{UPSTREAM_PORT}"\n'
    try:
        await tl.up(tmp_path)
        yield tl
    except BaseException:
        tl.print_logs(40)
        raise
    finally:
        await tl.down()


async def probe(tl: TeleLab, node: str, cnvm: str, name: str, qtype: str = "A",
                proto: str = "udp") -> dict[str, Any]:
    """One query from inside cnvm's netns to its resolver (dnslib, exact rcodes)."""
    ns = f"{tl.lab.name}-{node}-{cnvm}"
    p = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", PROBE, name, qtype, proto,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(p.communicate(), 20)
    except TimeoutError:
        p.kill()
        await p.wait()
        raise
    assert p.returncode == 0, err.decode()
    return dict(json.loads(out))


async def sh(tl: TeleLab, cnvm: str, script: str) -> dict[str, Any]:
    """A shell command in the cnvm (asked of node1: routed to the cnvm's node)."""
    return dict(await tl.call("node1", "exec", {"name": cnvm, "cmd": ["sh", "-c", script]}))


async def until(fn: Any, ok: Any, within: float) -> tuple[Any, float]:
    t0 = time.monotonic()
    while True:
        got = await fn()
        if ok(got):
            return got, time.monotonic() - t0
        if time.monotonic() - t0 > within:
            raise AssertionError(f"not within {within}s: {got}")
        await asyncio.sleep(0.1)


async def test_names_follow_teleport_and_rm(dlab: TeleLab):
    tl = dlab
    up = await tl.lab.spawn("node1", [sys.executable, "-c", FAKE_UPSTREAM,
                                      labpaths.underlay_address(1), str(UPSTREAM_PORT)],
                            stdout=asyncio.subprocess.PIPE)
    assert up.stdout is not None
    assert (await asyncio.wait_for(up.stdout.readline(), 20)).strip() == b"ready"
    for name, node in (("hna", "node1"), ("hnb", "node2"), ("hnc", "node3")):
        await tl.call("node1", "deploy", {"name": name, "image": tl.image, "ip": IPS[name],
                                          "node": node})

    rc = await sh(tl, "hna", "cat /etc/resolv.conf")
    assert rc["stdout"] == "nameserver 127.0.0.11\nsearch cnvm\noptions ndots:0\n", rc

    # A by name and name.cnvm (the directory says hnb is on node2), UDP and TCP
    got, took = await until(lambda: probe(tl, "node1", "hna", "hnb"),
                            lambda r: r["rcode"] == "NOERROR", 5)
    print(f"hnb resolvable from hna {took:.2f}s after its deploy")
    assert got == {"rcode": "NOERROR", "answers": [IPS["hnb"]], "ttl": [1]}
    assert (await probe(tl, "node1", "hna", "hnb.cnvm", proto="tcp"))["answers"] == [IPS["hnb"]]
    assert (await probe(tl, "node1", "hna", "nosuch"))["rcode"] == "NXDOMAIN"
    ptr = await probe(tl, "node1", "hna", "62.101.100.10.in-addr.arpa", "PTR")
    assert ptr == {"rcode": "NOERROR", "answers": ["hnb.cnvm."], "ttl": [1]}
    # the cnvm's own tools: busybox nslookup (A and PTR), nc by name
    ns = await sh(tl, "hna", "busybox nslookup hnb")
    assert ns["exit_code"] == 0 and IPS["hnb"] in ns["stdout"], ns
    ns = await sh(tl, "hna", f"busybox nslookup {IPS['hnb']}")
    assert "hnb.cnvm" in ns["stdout"], ns
    nc = await sh(tl, "hna", "echo hostname | nc -w 3 hnb 7000")
    assert nc["stdout"].strip() == "1 hnb", nc
    # other names go to the upstream (a fake one in node1's lab netns)
    fw = await probe(tl, "node2", "hnb", "www.example.test")
    assert fw == {"rcode": "NOERROR", "answers": ["192.0.2.7"], "ttl": [60]}
    assert b"www.example.test." in await asyncio.wait_for(up.stdout.readline(), 5)

    # hnb teleports to node3: a new connection by name from hna reaches it at once
    rep = await tl.call("node2", "teleport", {"name": "hnb", "target": "node3"}, timeout=300)
    assert rep["ok"], rep
    t0 = time.monotonic()
    nc = await sh(tl, "hna", "echo hostname | nc -w 3 hnb 7000")
    took = time.monotonic() - t0
    print(f"new connection by name to hnb after its teleport: {took:.2f}s (first try)")
    assert nc["stdout"].strip() == "1 hnb", nc
    # hnb itself resolves from node3: its resolver was opened there after the restore
    got, took = await until(lambda: probe(tl, "node3", "hnb", "hna"),
                            lambda r: r["rcode"] == "NOERROR", 3)
    print(f"resolver of hnb on node3 answering {took:.2f}s after the teleport returned")
    assert got["answers"] == [IPS["hna"]]
    ns = await sh(tl, "hnb", "busybox nslookup hnc.cnvm")
    assert IPS["hnc"] in ns["stdout"], ns
    assert await tl.leftovers("node2", "hnb") == []
    st2, st3 = await tl.call("node2", "dns.status"), await tl.call("node3", "dns.status")
    assert "hnb" not in st2["serving"] and st3["serving"] == ["hnb", "hnc"], (st2, st3)

    # rm hnb: the name stops resolving (A and PTR)
    await tl.call("node1", "rm", {"name": "hnb", "force": True})
    got, took = await until(lambda: probe(tl, "node1", "hna", "hnb"),
                            lambda r: r["rcode"] == "NXDOMAIN", 3)
    print(f"hnb NXDOMAIN on hna {took:.2f}s after rm")
    ptr = await probe(tl, "node1", "hna", "62.101.100.10.in-addr.arpa", "PTR")
    assert ptr["rcode"] == "NXDOMAIN"
    ns = await sh(tl, "hna", "busybox nslookup hnb")
    assert ns["exit_code"] != 0 and IPS["hnb"] not in ns["stdout"], ns

    # node3's daemon restarts without an upstream: hnc gets its resolver back, and
    # external names are REFUSED
    await tl.kill_daemon("node3")
    tl.extra_config = ""
    await tl.start_daemon("node3")
    await tl.wait_members(timeout=30)
    got, took = await until(lambda: probe(tl, "node3", "hnc", "hna"),
                            lambda r: r["rcode"] == "NOERROR", 10)
    assert got["answers"] == [IPS["hna"]]
    assert (await probe(tl, "node3", "hnc", "www.example.test"))["rcode"] == "REFUSED"
    assert (await probe(tl, "node3", "hnc", "hnc"))["answers"] == [IPS["hnc"]]
    up.kill()
    await up.wait()
    for n in tl.lab.node_names:
        text = tl.daemon_log(n)
        assert "dns: no resolver" not in text and "dns: reconcile failed" not in text, n
        assert "dns: serving" in text, n
