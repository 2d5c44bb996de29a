"""What the cnvm resolver answers: the cluster directory as a DNS zone (pure logic).

Kept apart from the sockets (cnvmd.network.dns) so that it is tested with a fake
directory. Packets are parsed and built by dnslib, never by hand.

The zone, for domain ``cnvm`` (config ``dns_domain``):

* ``NAME`` and ``NAME.cnvm`` -> A (the cnvm's overlay IP) for every cnvm of the
  cluster that is not stopped; AAAA and other types -> no data (NOERROR, empty).
* ``D.C.B.A.in-addr.arpa`` for an address of the overlay subnet -> PTR ``NAME.cnvm``.
* Anything else in the domain, single-label names that are no cnvm, and reverse names
  of the subnet that no cnvm holds -> NXDOMAIN.
* Other names (``example.com``, reverse names outside the subnet) -> `FORWARD`: the
  caller forwards them upstream, or answers REFUSED when no upstream is set.

TTL is `TTL` (1 s) everywhere, negative answers included (SOA minimum), so that an
answer follows a teleport or an rm within a second even in a caching stub.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dnslib import (
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSError,
    DNSLabel,
    DNSRecord,
)

TTL = 1
MAX_QUERY = 4096
"""Largest query packet taken (UDP or one TCP message); bigger ones are dropped."""
UDP_PAYLOAD = 512
"""Reply size without EDNS (RFC 1035); a larger reply is truncated (TC) over UDP."""
DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
LIVE = frozenset({"running", "paused", "created", "creating", "unknown"})
"""Directory states whose name resolves (a stopped, missing or broken cnvm does not)."""


class EntryLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def state(self) -> str: ...


class DirectoryView(Protocol):
    """What the zone needs of cnvmd.cluster.directory.Directory."""

    def where(self, name: str) -> Sequence[EntryLike]: ...

    def entries(self) -> Sequence[EntryLike]: ...


class Forward(Exception):
    """Not ours: forward upstream (or REFUSED)."""


def check_domain(domain: str) -> str:
    d = domain.strip().rstrip(".").lower()
    if len(d) > 200 or not DOMAIN_RE.fullmatch(d):
        raise ValueError(f"bad dns_domain {domain[:80]!r}: DNS labels separated by dots")
    return d


@dataclass(frozen=True)
class Found:
    name: str
    ip: str


class Zone:
    """Answers for one node: `answer(query) -> DNSRecord` or raises `Forward`."""

    def __init__(self, directory: DirectoryView, domain: str, subnet: str) -> None:
        self.dir = directory
        self.domain = check_domain(domain)
        self.origin = DNSLabel(self.domain)
        self.subnet = ipaddress.IPv4Network(subnet, strict=False)
        self.soa = SOA(mname=DNSLabel(f"ns.{self.domain}"), rname=DNSLabel(f"root.{self.domain}"),
                       times=(1, TTL, TTL, TTL, TTL))

    # ---- lookups

    def find(self, name: str) -> Found | None:
        """The live cnvm `name` (running here first, then running anywhere)."""
        best: Found | None = None
        rank = 9
        for e in _live(self.dir.where(name)):
            r = 0 if e.state == "running" else 1
            if r < rank:
                best, rank = Found(name, str(e.ip)), r
        return best

    def by_ip(self, ip: str) -> str | None:
        names = sorted(e.name for e in _live(self.dir.entries()) if e.ip == ip)
        return names[0] if names else None

    def _cnvm_name(self, qname: DNSLabel) -> str | None:
        """The cnvm name a question asks about, None if not in our namespace."""
        labels = [bytes(x).decode("ascii", "replace").lower() for x in qname.label]
        if len(labels) == 1:
            return labels[0]
        if qname.matchSuffix(self.origin):
            head = labels[: len(labels) - len(self.origin.label)]
            return head[0] if len(head) == 1 else ""  # "" : ours, but no such cnvm
        return None

    def _reverse_ip(self, qname: DNSLabel) -> str | None:
        labels = [bytes(x).decode("ascii", "replace").lower() for x in qname.label]
        if len(labels) != 6 or labels[4:] != ["in-addr", "arpa"]:
            return None
        try:
            ip = ipaddress.IPv4Address(".".join(reversed(labels[:4])))
        except ValueError:
            return None
        return str(ip) if ip in self.subnet else None

    # ---- answers

    def answer(self, q: DNSRecord) -> DNSRecord:
        """The reply to a parsed query (one question, checked by `parse_query`)."""
        question = q.questions[0]
        qname, qtype = question.qname, question.qtype
        reply = q.reply()
        reply.header.ra = 1
        reply.header.aa = 1
        rev = self._reverse_ip(qname)
        if rev is not None:
            owner = self.by_ip(rev)
            if owner is None:
                return self._negative(reply, RCODE.NXDOMAIN)
            if qtype in (QTYPE.PTR, QTYPE.ANY):
                reply.add_answer(RR(qname, QTYPE.PTR, rdata=PTR(f"{owner}.{self.domain}."),
                                    ttl=TTL))
                return reply
            return self._negative(reply, RCODE.NOERROR)
        name = self._cnvm_name(qname)
        if name is None or name == "arpa":
            raise Forward()
        if name == "" and qname == self.origin:
            if qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(RR(self.origin, QTYPE.SOA, rdata=self.soa, ttl=TTL))
                return reply
            return self._negative(reply, RCODE.NOERROR)
        found = self.find(name) if name else None
        if found is None:
            return self._negative(reply, RCODE.NXDOMAIN)
        if qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.A, rdata=A(found.ip), ttl=TTL))
            return reply
        return self._negative(reply, RCODE.NOERROR)

    def _negative(self, reply: DNSRecord, rcode: int) -> DNSRecord:
        reply.header.rcode = rcode
        reply.add_auth(RR(self.origin, QTYPE.SOA, rdata=self.soa, ttl=TTL))
        return reply


def _live(entries: Iterable[EntryLike]) -> list[EntryLike]:
    return [e for e in entries if e.ip and e.state in LIVE]


class BadQuery(Exception):
    """Not a query we take (dropped or FORMERR)."""


def parse_query(data: bytes) -> DNSRecord:
    """A client's packet: a standard query with exactly one question (else BadQuery)."""
    if not 12 <= len(data) <= MAX_QUERY:
        raise BadQuery("size")
    try:
        q = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, UnicodeError) as exc:
        raise BadQuery(f"unparsable: {exc}") from None
    if q.header.qr != 0 or q.header.opcode != 0:
        raise BadQuery("not a standard query")
    if len(q.questions) != 1 or q.rr or q.auth:
        raise BadQuery("one question, nothing else")
    if len(str(q.q.qname)) > 255:
        raise BadQuery("name too long")
    return q


def error_reply(data: bytes, rcode: int) -> bytes | None:
    """FORMERR/REFUSED/SERVFAIL for a packet, echoing its id and question if parsable."""
    try:
        q = DNSRecord.parse(data)
    except Exception:
        if len(data) < 12 or data[2] & 0x80:  # too short, or a response: stay silent
            return None
        hdr = bytearray(data[:12])
        hdr[2] = 0x80 | (hdr[2] & 0x78)  # QR, same opcode
        hdr[3] = 0x80 | rcode  # RA
        hdr[4:12] = bytes(8)
        return bytes(hdr)
    if q.header.qr:
        return None
    reply = q.reply()
    reply.rr, reply.auth, reply.ar = [], [], []
    reply.questions = q.questions[:1]
    reply.header.rcode = rcode
    reply.header.ra = 1
    return bytes(reply.pack())


def fit_udp(reply: bytes, query: DNSRecord) -> bytes:
    """A reply cut to what the client accepts over UDP (EDNS size or 512): TC set."""
    limit = UDP_PAYLOAD
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            limit = max(UDP_PAYLOAD, min(int(rr.rclass), 4096))
    if len(reply) <= limit:
        return reply
    r = DNSRecord.parse(reply)
    r.rr, r.auth, r.ar = [], [], []
    r.header.tc = 1
    return bytes(r.pack())
