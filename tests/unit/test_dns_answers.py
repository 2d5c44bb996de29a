"""The cnvm resolver's answers (cnvmd.network.dnszone) with a fake directory, and the
forwarding path of cnvmd.network.dns against a dnslib fake upstream on loopback."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from cnvmd.network import dns
from cnvmd.network.dnszone import (
    BadQuery,
    Forward,
    Zone,
    check_domain,
    error_reply,
    fit_udp,
    parse_query,
)


@dataclass(frozen=True)
class E:
    name: str
    node: str
    state: str
    ip: str | None


class FakeDir:
    def __init__(self, *entries: E) -> None:
        self.items = list(entries)

    def where(self, name: str) -> list[E]:
        return [e for e in self.items if e.name == name]

    def entries(self) -> list[E]:
        return list(self.items)


def zone(*entries: E, domain: str = "cnvm") -> Zone:
    return Zone(FakeDir(*entries), domain, "10.100.101.0/24")


def ask(z: Zone, name: str, qtype: str = "A") -> DNSRecord:
    q = parse_query(bytes(DNSRecord.question(name, qtype).pack()))
    return DNSRecord.parse(z.answer(q).pack())


WEB = E("web", "n2", "running", "10.100.101.5")


def test_a_for_name_and_name_in_domain():
    z = zone(WEB)
    for qn in ("web", "web.cnvm", "WEB.Cnvm."):
        r = ask(z, qn)
        assert r.header.rcode == RCODE.NOERROR and r.header.aa
        assert [(str(a.rdata), a.ttl, a.rtype) for a in r.rr] == [("10.100.101.5", 1, QTYPE.A)]


def test_unknown_and_removed_names_are_nxdomain_with_short_negative_ttl():
    d = FakeDir(WEB)
    z = Zone(d, "cnvm", "10.100.101.0/24")
    assert ask(z, "web").rr
    d.items.clear()  # rm web: the next answer says so
    for qn in ("web", "web.cnvm", "nosuch.cnvm", "a.b.cnvm"):
        r = ask(z, qn)
        assert r.header.rcode == RCODE.NXDOMAIN and not r.rr, qn
        assert r.auth and r.auth[0].rtype == QTYPE.SOA and r.auth[0].ttl == 1


def test_stopped_cnvm_does_not_resolve_but_teleporting_one_does():
    assert ask(zone(E("db", "n1", "stopped", "10.100.101.9")), "db").header.rcode == \
        RCODE.NXDOMAIN
    # both nodes list it during a teleport's commit: the running one answers
    z = zone(E("db", "n1", "missing", "10.100.101.9"), E("db", "n3", "running", "10.100.101.9"))
    assert [str(a.rdata) for a in ask(z, "db").rr] == ["10.100.101.9"]


def test_other_types_are_nodata():
    r = ask(zone(WEB), "web", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and not r.rr and r.auth
    r = ask(zone(WEB), "web.cnvm", "MX")
    assert r.header.rcode == RCODE.NOERROR and not r.rr


def test_ptr_for_overlay_addresses():
    z = zone(WEB)
    r = ask(z, "5.101.100.10.in-addr.arpa", "PTR")
    assert [(str(a.rdata), a.ttl) for a in r.rr] == [("web.cnvm.", 1)]
    assert ask(z, "6.101.100.10.in-addr.arpa", "PTR").header.rcode == RCODE.NXDOMAIN
    with pytest.raises(Forward):  # outside the overlay: not ours
        ask(z, "1.1.168.192.in-addr.arpa", "PTR")


def test_other_names_are_forwarded_and_domain_is_configurable():
    z = zone(WEB, domain="Corp.Example")
    with pytest.raises(Forward):
        ask(z, "example.com")
    assert [str(a.rdata) for a in ask(z, "web.corp.example").rr] == ["10.100.101.5"]
    assert ask(z, "x.corp.example").header.rcode == RCODE.NXDOMAIN
    with pytest.raises(Forward):
        ask(z, "web.cnvm")  # the default domain is not ours any more


@pytest.mark.parametrize("bad", ["", "a..b", "-a", "a b", "x" * 64, "é"])
def test_bad_domain(bad: str):
    with pytest.raises(ValueError):
        check_domain(bad)


def test_parse_query_bounds():
    good = bytes(DNSRecord.question("web").pack())
    assert parse_query(good).q.qname == "web."
    for bad in [b"", b"\x00" * 11, good + b"\x00" * 5000, b"\xff" * 40]:
        with pytest.raises(BadQuery):
            parse_query(bad)
    two = DNSRecord.question("a")
    two.add_question(DNSRecord.question("b").q)
    with pytest.raises(BadQuery):
        parse_query(bytes(two.pack()))
    resp = DNSRecord.question("a").reply()
    with pytest.raises(BadQuery):
        parse_query(bytes(resp.pack()))
    assert error_reply(bytes(resp.pack()), RCODE.FORMERR) is None  # never answer answers
    r = error_reply(b"\x12\x34" + b"\x00" * 10 + b"\xff", RCODE.FORMERR)
    assert r is not None and r[:2] == b"\x12\x34" and r[3] & 0xF == RCODE.FORMERR


def test_udp_replies_are_truncated_to_512():
    q = DNSRecord.question("big.example")
    big = q.reply()
    for i in range(60):
        big.add_answer(RR("big.example", QTYPE.A, rdata=A(f"192.0.2.{i}"), ttl=1))
    out = fit_udp(bytes(big.pack()), q)
    r = DNSRecord.parse(out)
    assert len(out) <= 512 and r.header.tc and not r.rr


def test_parse_upstream():
    assert dns.parse_upstream("") is None
    assert dns.parse_upstream("192.0.2.1") == ("192.0.2.1", 53)
    assert dns.parse_upstream("192.0.2.1:5300") == ("192.0.2.1", 5300)
    assert dns.parse_upstream("[2001:db8::1]:53") == ("2001:db8::1", 53)
    for bad in ["dns.example", "1.2.3.4:0", "1.2.3.4:99999", "1.2.3", "/etc/x"]:
        with pytest.raises(ValueError):
            dns.parse_upstream(bad)


# ---- forwarding, against a fake upstream on loopback


class Upstream(asyncio.DatagramProtocol):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.seen: list[DNSRecord] = []

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        q = DNSRecord.parse(data)
        self.seen.append(q)
        if self.mode == "silent":
            return
        r = q.reply()
        if self.mode == "wrong-id":
            r.header.id = (q.header.id + 1) & 0xFFFF
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
        self.t.sendto(r.pack(), addr)


async def _svc(mode: str | None) -> tuple[dns.DnsService, Upstream | None, Any]:
    up = None
    tr = None
    addr = None
    if mode is not None:
        loop = asyncio.get_running_loop()
        tr, up = await loop.create_datagram_endpoint(lambda: Upstream(mode),
                                                     local_addr=("127.0.0.1", 0),
                                                     family=socket.AF_INET)
        addr = tr.get_extra_info("sockname")[:2]
    svc = dns.DnsService(None, zone(WEB), addr)
    return svc, up, tr


async def test_forwarding_refused_timeout_and_spoof_checks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dns, "FORWARD_TIMEOUT", 0.3)
    res = dns.Resolver("a", 1)
    q = DNSRecord.question("example.com")
    q.header.id = 4242
    raw = bytes(q.pack())

    svc, _, _ = await _svc(None)  # no upstream: REFUSED
    r = DNSRecord.parse(await svc.handle(raw, res, tcp=False) or b"")
    assert r.header.rcode == RCODE.REFUSED and r.header.id == 4242

    svc, up, tr = await _svc("answer")
    r = DNSRecord.parse(await svc.handle(raw, res, tcp=False) or b"")
    assert r.header.rcode == RCODE.NOERROR and r.header.id == 4242
    assert [str(a.rdata) for a in r.rr] == ["192.0.2.7"]
    # local names never go upstream
    r = DNSRecord.parse(await svc.handle(bytes(DNSRecord.question("web").pack()), res,
                                         tcp=False) or b"")
    assert [str(a.rdata) for a in r.rr] == ["10.100.101.5"] and up is not None
    assert len(up.seen) == 1
    tr.close()

    for mode in ("silent", "wrong-id"):
        svc, _, tr = await _svc(mode)
        r = DNSRecord.parse(await svc.handle(raw, res, tcp=False) or b"")
        assert r.header.rcode == RCODE.SERVFAIL and not r.rr, mode
        tr.close()


async def test_forwarding_is_rate_bounded():
    svc, _, tr = await _svc("answer")
    res = dns.Resolver("a", 1)
    res.forwards = dns.Bucket(0.0, 2)
    raw = bytes(DNSRecord.question("example.com").pack())
    codes = [DNSRecord.parse(await svc.handle(raw, res, tcp=False) or b"").header.rcode
             for _ in range(4)]
    assert codes == [RCODE.NOERROR, RCODE.NOERROR, RCODE.SERVFAIL, RCODE.SERVFAIL]
    tr.close()
