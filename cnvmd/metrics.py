"""Optional Prometheus endpoint: ``metrics_listen`` in cnvmd.toml (off by default).

What is exported (all prefixed ``cnvm_``), from a registry of its own (never
prometheus_client's global one, so nothing else in the process leaks into it and
several daemons in one test process stay apart):

- read from the daemon's state at each scrape (`StateCollector`): ``cnvms{state}``
  (records joined with runc, as ``ls``), ``images``, ``peer_members{state}`` and
  ``peer_up{member}`` (the local liveness view of the other members),
  ``teleports_in_flight``;
- counted where things happen, by two one-line hooks (cnvmd.metrics_hooks, which
  imports nothing of the daemon, so cnvmd.api can call it without an import cycle):
  ``api_requests_total{op,code}`` and ``api_request_duration_seconds{op,code}``
  (cnvmd.api, for requests on the API socket), ``teleports_total{mode,result}``,
  ``teleport_duration_seconds`` and ``teleport_frozen_seconds{mode,result}``
  (histograms) and
  ``teleport_bytes_total{mode,result}`` (the teleport op, on the source node, when
  it ends: result ok | failed | rolled_back | cancelled).

Label values come from closed sets (the router's ops, error codes, teleport modes,
cluster members), so no client can grow the series without bound.

Served from the daemon's own asyncio loop by a tiny HTTP/1.0 handler around
``generate_latest`` rather than ``start_http_server``'s thread: the state collector
needs async work (``runc list``, the state store, the peer table, all owned by the
loop), which a scrape thread could neither await nor read safely; on the loop it is
gathered first, then rendered. The handler answers ``GET /metrics`` only, with
bounded request size, time and connection count. The endpoint has no
authentication: keep it on loopback (the default) or a management network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cnvmd import inventory
from cnvmd.services import LIFECYCLE, METRICS, PEERS, TELEPORTS, Plugin
from proto.messages import ErrorCode

log = logging.getLogger("cnvmd.metrics")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What generate_latest writes (all our names are legacy-valid: no escaping needed)."""
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
CNVM_STATES = ("running", "paused", "created", "stopped", "missing", "corrupt")
PEER_STATES = ("alive", "suspect", "down")
TELEPORT_RESULTS = ("ok", "failed", "rolled_back", "cancelled")
_CODES = {str(c) for c in ErrorCode} | {"ok", "cancelled"}
_MODES = {"auto", "stop-copy", "precopy", "postcopy", "hybrid", "none"}
API_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600)
TELEPORT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
FROZEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30)


def parse_listen(value: Any) -> tuple[str, int] | None:
    """``metrics_listen`` → (host, port), or None when off. true / "on" → localhost:9464;
    ":PORT" or "PORT" → localhost; "HOST:PORT"; "[V6]:PORT". ValueError otherwise."""
    if value is None or value is False or value == "":
        return None
    if value is True:
        return DEFAULT_HOST, DEFAULT_PORT
    if not isinstance(value, str):
        raise ValueError(f"metrics_listen must be a string or a boolean, got {value!r}")
    s = value.strip()
    if s.lower() in ("off", "false", "no"):
        return None
    if s.lower() in ("on", "true", "yes"):
        return DEFAULT_HOST, DEFAULT_PORT
    m = re.fullmatch(r"(?:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]*)):)?"
                     r"(?P<port>[0-9]{1,5})", s)
    if m is None or not 0 <= int(m.group("port")) <= 65535:
        raise ValueError(f"metrics_listen {value!r}: expected HOST:PORT, :PORT or true")
    host = m.group("v6") or m.group("host") or DEFAULT_HOST
    if m.group("v6"):
        ipaddress.IPv6Address(host)  # ValueError if not
    return host, int(m.group("port"))


class Metrics:
    """The daemon's metrics (the METRICS service): counters, histograms and the
    state snapshot the collector renders."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.api_requests = Counter("cnvm_api_requests", "API requests by op and result code",
                                    ["op", "code"], registry=r)
        self.api_seconds = Histogram("cnvm_api_request_duration_seconds",
                                     "API request latency by op and result code",
                                     ["op", "code"], buckets=API_BUCKETS, registry=r)
        self.teleports = Counter("cnvm_teleports", "teleports started here, by mode and result",
                                 ["mode", "result"], registry=r)
        self.teleport_seconds = Histogram("cnvm_teleport_duration_seconds",
                                          "teleport duration, by mode and result",
                                          ["mode", "result"], buckets=TELEPORT_BUCKETS,
                                          registry=r)
        self.teleport_frozen = Histogram("cnvm_teleport_frozen_seconds",
                                         "time the cnvm was frozen, by mode and result",
                                         ["mode", "result"], buckets=FROZEN_BUCKETS,
                                         registry=r)
        self.teleport_bytes = Counter("cnvm_teleport_bytes",
                                      "bytes sent to the target by teleports, by mode and "
                                      "result", ["mode", "result"], registry=r)
        self.snapshot: dict[str, Any] = {}
        self.server: MetricsServer | None = None
        self._lock = asyncio.Lock()
        r.register(StateCollector(self))

    # ---- hooks

    def request(self, op: str, code: str, seconds: float) -> None:
        code = code if code in _CODES else "other"
        self.api_requests.labels(op, code).inc()
        self.api_seconds.labels(op, code).observe(seconds)

    def teleport(self, report: Any) -> None:
        mode = str(getattr(report, "mode", "") or "none")
        mode = mode if mode in _MODES else "other"
        if getattr(report, "ok", False):
            result = "ok"
        elif getattr(report, "error", "") == "cancelled":
            result = "cancelled"
        elif getattr(report, "rolled_back", False):
            result = "rolled_back"
        else:
            result = "failed"
        self.teleports.labels(mode, result).inc()
        self.teleport_seconds.labels(mode, result).observe(
            float(getattr(report, "total_seconds", 0.0) or 0.0))
        self.teleport_frozen.labels(mode, result).observe(
            float(getattr(report, "frozen_seconds", 0.0) or 0.0))
        self.teleport_bytes.labels(mode, result).inc(max(0, int(
            getattr(report, "wire_bytes", 0) or 0)))

    # ---- scrape

    async def refresh(self) -> None:
        """Read the daemon's state for the collector (on the loop, before rendering)."""
        d = self.daemon
        snap: dict[str, Any] = {"at": time.time()}
        try:
            rows = await inventory.snapshot(d)
            snap["cnvms"] = [str(r.get("state", "unknown")) for r in rows]
        except Exception as exc:  # a scrape still answers, without the cnvm gauges
            log.warning("metrics: cannot list cnvms: %s", exc)
            snap["cnvms"] = None
        life = d.services.get(LIFECYCLE)
        snap["images"] = len(life.images.list()) if life is not None else None
        peers = d.services.get(PEERS)
        if peers is not None and peers.running:
            snap["peers"] = {n["name"]: str(n.get("state")) for n in peers.nodes()
                             if n["name"] != d.node_name}
        engine = d.services.get(TELEPORTS)
        snap["in_flight"] = len(engine.outgoing) if engine is not None else None
        self.snapshot = snap

    async def render(self) -> bytes:
        async with self._lock:
            await self.refresh()
            return generate_latest(self.registry)


class StateCollector(Collector):
    """Gauges from the last `Metrics.refresh` (so collect() itself never blocks)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # dynamic: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot
        states = snap.get("cnvms")
        if states is not None:
            g = GaugeMetricFamily("cnvm_cnvms", "cnvms on this node by state", labels=["state"])
            for st in sorted(set(CNVM_STATES) | set(states)):
                g.add_metric([st], states.count(st))
            yield g
        if snap.get("images") is not None:
            yield GaugeMetricFamily("cnvm_images", "images in this node's store",
                                    value=snap["images"])
        peers = snap.get("peers")
        if peers is not None:
            g = GaugeMetricFamily("cnvm_peer_members", "other cluster members by the local "
                                  "liveness view", labels=["state"])
            vals = list(peers.values())
            for st in sorted(set(PEER_STATES) | set(vals)):
                g.add_metric([st], vals.count(st))
            yield g
            up = GaugeMetricFamily("cnvm_peer_up", "1 if the member is alive, else 0",
                                   labels=["member"])
            for name, st in sorted(peers.items()):
                up.add_metric([name], 1.0 if st == "alive" else 0.0)
            yield up
        if snap.get("in_flight") is not None:
            yield GaugeMetricFamily("cnvm_teleports_in_flight",
                                    "outgoing teleports running now", value=snap["in_flight"])


# ----------------------------------------------------------------------- HTTP server


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on the daemon's loop; one request per connection."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._client, host, port,
                                                 limit=MAX_REQUEST, reuse_address=True)
        sock = self.server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._conns.add(task)
        try:
            status, ctype, body = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT)
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")  # LimitOverrunError past MAX_REQUEST
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        text = "text/plain; charset=utf-8"
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", text, b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if target != "/metrics":
            return "404 Not Found", text, b"see /metrics\n"
        body = await self.metrics.render()
        return "200 OK", CONTENT_TYPE, b"" if method == "HEAD" else body


async def start_metrics(daemon: Any) -> None:
    """Provide METRICS only when the endpoint is on (hooks are no-ops otherwise)."""
    try:
        where = parse_listen(getattr(daemon.config, "metrics_listen", ""))
    except ValueError as exc:
        log.error("metrics endpoint off: %s", exc)
        daemon.services.failed(METRICS, str(exc))
        return
    if where is not None:
        daemon.services.provide(METRICS, Metrics(daemon))


async def serve_metrics(daemon: Any) -> None:
    m = daemon.services.get(METRICS)
    if m is None:
        return
    where = parse_listen(daemon.config.metrics_listen)
    assert where is not None
    srv = MetricsServer(m)
    try:
        await srv.start(*where)
    except OSError as exc:
        log.error("metrics endpoint off: cannot listen on %s:%d: %s", *where, exc.strerror)
        daemon.services.remove(METRICS)
        daemon.services.failed(METRICS, f"cannot listen on {where[0]}:{where[1]}")
        return
    m.server = srv
    assert srv.address is not None
    host = srv.address[0]
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("metrics endpoint listens beyond loopback without authentication",
                    extra={"address": f"{host}:{srv.address[1]}"})
    log.info("metrics endpoint listening", extra={"address": f"{host}:{srv.address[1]}"})


async def stop_metrics(daemon: Any) -> None:
    m = daemon.services.remove(METRICS)
    if m is not None and m.server is not None:
        await m.server.stop()


plugin = Plugin("metrics", start=start_metrics, serve=serve_metrics, stop=stop_metrics)
