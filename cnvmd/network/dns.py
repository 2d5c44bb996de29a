"""Names on the overlay: a resolver at 127.0.0.11:53 inside every cnvm's netns.

Docker's embedded-DNS pattern: cnvmd opens a UDP and a TCP socket on 127.0.0.11:53
*inside* each local cnvm's network namespace (created on the netlink thread, which
setns()'s there, then served by the daemon's loop). No overlay address is used, no
query leaves the node, and the same happens on every node, so a cnvm keeps its
resolver when it teleports. The cnvm's /etc/resolv.conf (seeded at deploy) points at
it: ``nameserver 127.0.0.11``, ``search <domain>``, ``options ndots:0``.

Answers come from the cluster directory (cnvmd.network.dnszone): A for NAME and
NAME.<domain> of every cnvm of the cluster, PTR for overlay addresses, TTL 1 s;
other names go to ``dns_upstream`` (or REFUSED when it is empty), with a fresh
query id and source port per query, a timeout, a per-cnvm rate and a node-wide
bound on queries in flight.

Which cnvms get a resolver: those with a record on this node whose netns exists.
The plug-in follows the state store (deploy, start, rm; a teleport target saves the
record right after `runc restore`, i.e. once CRIU's network lock is gone; the source
deletes it on release), re-checks every `PERIOD` s, and at daemon start serves the
cnvms that already exist. So no lifecycle or teleport code calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from dnslib import RCODE, DNSRecord

from cnvmd import inventory, netlink
from cnvmd.api import Args, Context, Router
from cnvmd.services import DIRECTORY, DNS, LIFECYCLE, NETWORK, Plugin

from .dnszone import MAX_QUERY, BadQuery, Forward, Zone, error_reply, fit_udp, parse_query

log = logging.getLogger("cnvmd.network.dns")

ADDRESS = "127.0.0.11"
PORT = 53
PERIOD = 5.0
DEBOUNCE = 0.02
FORWARD_TIMEOUT = 2.0
MAX_INFLIGHT = 64
"""Forwarded queries in flight on this node (beyond: SERVFAIL at once)."""
RATE = 100.0
BURST = 200.0
"""Forwarded queries per second (and burst) per cnvm."""
LOCAL_RATE = 2000.0
LOCAL_BURST = 4000.0
"""All queries per second per cnvm (beyond: dropped)."""
TCP_CONNS = 16
TCP_IDLE = 5.0
TCP_QUERIES = 100
RESOLV_CONF = "nameserver {addr}\nsearch {domain}\noptions ndots:0\n"
_UPSTREAM = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+))(?::(?P<port>[0-9]{1,5}))?")


def parse_upstream(spec: str) -> tuple[str, int] | None:
    """``IP``, ``IP:PORT`` or ``[V6]:PORT``; "" -> None (no forwarding)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    m = _UPSTREAM.fullmatch(spec)
    if m is None:
        raise ValueError(f"bad dns_upstream {spec[:80]!r}: IP, IP:PORT or [IPv6]:PORT")
    host = m.group("v6") or m.group("v4")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad dns_upstream address {host[:64]!r}") from None
    port = int(m.group("port") or 53)
    if not 1 <= port <= 65535:
        raise ValueError("dns_upstream port must be 1..65535")
    return str(addr), port


def resolv_conf(domain: str) -> str:
    return RESOLV_CONF.format(addr=ADDRESS, domain=domain)


class Bucket:
    """A token bucket (rate per second, burst)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class Resolver:
    """The sockets serving one cnvm."""

    name: str
    inode: int
    udp: asyncio.DatagramTransport | None = None
    tcp: asyncio.AbstractServer | None = None
    conns: set[asyncio.Task[Any]] = field(default_factory=set)
    queries: Bucket = field(default_factory=lambda: Bucket(LOCAL_RATE, LOCAL_BURST))
    forwards: Bucket = field(default_factory=lambda: Bucket(RATE, BURST))

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
        for t in list(self.conns):
            t.cancel()
        if self.tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.tcp.wait_closed(), 2)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, svc: DnsService, res: Resolver) -> None:
        self.svc, self.res = svc, res
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.res.queries.take():
            return
        self.svc.spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: Any) -> None:
        out = await self.svc.handle(data, self.res, tcp=False)
        if out is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class _OneShot(asyncio.DatagramProtocol):
    """The reply to one forwarded query (id and question checked by the caller)."""

    def __init__(self, fut: asyncio.Future[bytes]) -> None:
        self.fut = fut

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.fut.done() and len(data) >= 12:
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


class DnsService:
    def __init__(self, daemon: Any, zone: Zone, upstream: tuple[str, int] | None) -> None:
        self.daemon = daemon
        self.zone = zone
        self.upstream = upstream
        self.resolvers: dict[str, Resolver] = {}
        self.inflight = 0
        self._poke = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()

    # ---- which cnvms get a resolver

    def _on_state(self, kind: str, name: str) -> None:
        if kind == inventory.KIND:  # may run in a worker thread
            self._loop.call_soon_threadsafe(self._poke.set)

    async def start(self) -> None:
        self.daemon.state.on_change.append(self._on_state)
        await self.reconcile()
        self._task = asyncio.create_task(self._run(), name="dns")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.daemon.state.on_change.remove(self._on_state)
        for t in [self._task, *self._tasks]:
            if t is not None:
                t.cancel()
        async with self._lock:
            for name in list(self.resolvers):
                await self._close(name)

    def spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), PERIOD)
            await asyncio.sleep(DEBOUNCE)
            self._poke.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dns: reconcile failed")

    def _wanted(self) -> dict[str, int]:
        """name -> netns inode of every cnvm with a record here and a netns (blocking)."""
        net = self.daemon.services.get(NETWORK)
        if net is None:
            return {}
        out: dict[str, int] = {}
        records = self.daemon.state.list(inventory.KIND)
        for name in net.cnvms.list():
            if name not in records:
                continue
            try:
                out[name] = os.stat(net.cnvms.netns_path(name)).st_ino
            except OSError:
                continue
        return out

    async def reconcile(self) -> None:
        async with self._lock:
            want = await asyncio.to_thread(self._wanted)
            for name in [n for n, r in self.resolvers.items() if want.get(n) != r.inode]:
                await self._close(name)
            for name, inode in want.items():
                if name not in self.resolvers:
                    try:
                        await self._open(name, inode)
                    except Exception as exc:
                        log.warning("dns: no resolver for %s: %s", name, exc)

    async def _open(self, name: str, inode: int) -> None:
        net = self.daemon.services.require(NETWORK)
        ns = net.cnvms.netns(name)

        def bind_udp(s: socket.socket) -> None:
            s.bind((ADDRESS, PORT))

        def bind_tcp(s: socket.socket) -> None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ADDRESS, PORT))
            s.listen(16)

        try:
            us = await netlink.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM, bind_udp)
        except OSError as exc:
            if exc.errno != 99:  # EADDRNOTAVAIL: lo is down
                raise
            await netlink.link_up("lo", ns)
            us = await netlink.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM, bind_udp)
        res = Resolver(name, inode)
        try:
            res.udp, _ = await self._loop.create_datagram_endpoint(
                lambda: _Udp(self, res), sock=us)
        except BaseException:
            us.close()
            raise
        try:
            ts = await netlink.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, bind_tcp)
            res.tcp = await asyncio.start_server(
                lambda r, w: self._tcp_conn(res, r, w), sock=ts)
        except Exception as exc:  # UDP alone is a working resolver
            log.warning("dns: no TCP resolver for %s: %s", name, exc)
        self.resolvers[name] = res
        log.info("dns: serving %s", name, extra={"cnvm": name})

    async def _close(self, name: str) -> None:
        res = self.resolvers.pop(name, None)
        if res is not None:
            await res.close()
            log.info("dns: stopped serving %s", name, extra={"cnvm": name})

    # ---- TCP

    async def _tcp_conn(self, res: Resolver, r: asyncio.StreamReader,
                        w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(res.conns) >= TCP_CONNS or task is None:
            w.close()
            return
        res.conns.add(task)
        try:
            for _ in range(TCP_QUERIES):
                hdr = await asyncio.wait_for(r.readexactly(2), TCP_IDLE)
                (n,) = struct.unpack("!H", hdr)
                if n > MAX_QUERY:
                    break
                data = await asyncio.wait_for(r.readexactly(n), TCP_IDLE)
                if not res.queries.take():
                    break
                out = await self.handle(data, res, tcp=True)
                if out is None:
                    break
                w.write(struct.pack("!H", len(out)) + out)
                await asyncio.wait_for(w.drain(), TCP_IDLE)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            res.conns.discard(task)
            w.close()

    # ---- answering

    async def handle(self, data: bytes, res: Resolver, *, tcp: bool) -> bytes | None:
        """The reply to one client packet (None: stay silent)."""
        try:
            q = parse_query(data)
        except BadQuery:
            return error_reply(data[:MAX_QUERY], RCODE.FORMERR) if len(data) <= MAX_QUERY \
                else None
        try:
            out = bytes(self.zone.answer(q).pack())
        except Forward:
            out = await self.forward(q, data, res, tcp=tcp)
        except Exception:
            log.exception("dns: answering %s failed", q.q.qname)
            out = error_reply(data, RCODE.SERVFAIL) or b""
        if not out:
            return None
        return out if tcp else fit_udp(out, q)

    async def forward(self, q: DNSRecord, data: bytes, res: Resolver, *, tcp: bool) -> bytes:
        if self.upstream is None:
            return error_reply(data, RCODE.REFUSED) or b""
        if self.inflight >= MAX_INFLIGHT or not res.forwards.take():
            return error_reply(data, RCODE.SERVFAIL) or b""
        self.inflight += 1
        try:
            qid = secrets.randbelow(1 << 16)
            pkt = struct.pack("!H", qid) + data[2:]
            try:
                raw = await asyncio.wait_for(self._udp_exchange(pkt), FORWARD_TIMEOUT)
                ans = _check(raw, qid, q)
                if ans.header.tc and tcp:
                    raw = await asyncio.wait_for(self._tcp_exchange(pkt), FORWARD_TIMEOUT)
                    _check(raw, qid, q)
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                log.debug("dns: forwarding %s failed: %s", q.q.qname, exc)
                return error_reply(data, RCODE.SERVFAIL) or b""
            return data[:2] + raw[2:]
        finally:
            self.inflight -= 1

    async def _udp_exchange(self, pkt: bytes) -> bytes:
        assert self.upstream is not None
        fut: asyncio.Future[bytes] = self._loop.create_future()
        family = socket.AF_INET6 if ":" in self.upstream[0] else socket.AF_INET
        tr, _ = await self._loop.create_datagram_endpoint(
            lambda: _OneShot(fut), remote_addr=self.upstream, family=family)
        try:
            tr.sendto(pkt)
            return await fut
        finally:
            tr.close()

    async def _tcp_exchange(self, pkt: bytes) -> bytes:
        assert self.upstream is not None
        r, w = await asyncio.open_connection(*self.upstream)
        try:
            w.write(struct.pack("!H", len(pkt)) + pkt)
            await w.drain()
            (n,) = struct.unpack("!H", await r.readexactly(2))
            return await r.readexactly(n)
        finally:
            w.close()

    def status(self) -> dict[str, Any]:
        return {"address": ADDRESS, "domain": self.zone.domain,
                "upstream": f"{self.upstream[0]}:{self.upstream[1]}" if self.upstream else None,
                "serving": sorted(self.resolvers)}


def _check(raw: bytes, qid: int, q: DNSRecord) -> DNSRecord:
    """An upstream reply that answers our query (id, QR, same question), parsed."""
    if len(raw) > 65535:
        raise ValueError("reply too large")
    ans = DNSRecord.parse(raw)
    if ans.header.id != qid or not ans.header.qr:
        raise ValueError("reply to another query")
    if len(ans.questions) != 1:
        raise ValueError("reply without our question")
    a, b = ans.questions[0], q.questions[0]
    if (str(a.qname).lower(), a.qtype, a.qclass) != (str(b.qname).lower(), b.qtype, b.qclass):
        raise ValueError("reply to another question")
    return ans


# --------------------------------------------------------------------------- plug-in


async def start_dns(daemon: Any) -> None:
    """Set up the zone; resolvers open in `serve_dns` (the directory is running then)."""


async def serve_dns(daemon: Any) -> None:
    cfg = daemon.config
    cluster = daemon.services.get(DIRECTORY)
    net = daemon.services.get(NETWORK)
    if cluster is None or net is None:
        log.warning("dns: no resolvers (needs the cluster directory and the overlay)")
        return
    try:
        zone = Zone(cluster.dir, getattr(cfg, "dns_domain", "cnvm"), net.config.subnet)
        upstream = parse_upstream(getattr(cfg, "dns_upstream", ""))
    except ValueError as exc:
        log.error("dns: disabled: %s", exc)
        return
    svc = DnsService(daemon, zone, upstream)
    life = daemon.services.get(LIFECYCLE)
    if life is not None:  # new deploys get a resolv.conf pointing at us
        life.resolv_conf = resolv_conf(zone.domain)
    daemon.services.provide(DNS, svc)
    await svc.start()
    log.info("dns: resolvers at %s:%d in each cnvm", ADDRESS, PORT,
             extra={"domain": zone.domain, "upstream": svc.status()["upstream"]})


async def stop_dns(daemon: Any) -> None:
    svc = daemon.services.remove(DNS)
    if svc is not None:
        await svc.stop()


router = Router()


@router.op("dns.status")
async def dns_status(ctx: Context, args: Args) -> dict[str, Any]:
    """The resolver: address, domain, upstream and the local cnvms it serves."""
    args.reject_unknown()
    return {**ctx.daemon.services.require(DNS).status(), "node": ctx.daemon.node_name}


plugin = Plugin("dns", requires=("network", "cluster", "lifecycle"), router=router,
                start=start_dns, serve=serve_dns, stop=stop_dns)
