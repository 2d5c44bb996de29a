"""cnvmd.metrics without a daemon: listen parsing, hooks, rendering, the HTTP handler."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cnvmd import metrics, metrics_hooks
from cnvmd.migration.report import TeleportReport
from cnvmd.services import METRICS, Services


@pytest.mark.parametrize(("value", "want"), [
    ("", None), (False, None), ("off", None), (True, ("127.0.0.1", 9464)),
    ("on", ("127.0.0.1", 9464)), (":9100", ("127.0.0.1", 9100)), ("9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("[::1]:9100", ("::1", 9100)),
])
def test_parse_listen(value: Any, want: Any) -> None:
    assert metrics.parse_listen(value) == want


@pytest.mark.parametrize("bad", ["x", "1.2.3.4:", "1.2.3.4:70000", "[zz]:1", 5, "a b:1"])
def test_parse_listen_bad(bad: Any) -> None:
    with pytest.raises(ValueError):
        metrics.parse_listen(bad)


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_hooks_and_http() -> None:
    d = SimpleNamespace(services=Services(), node_name="n1", config=None)
    m = metrics.Metrics(d)
    d.services.provide(METRICS, m)

    async def refresh() -> None:  # no runc here: a fixed snapshot
        m.snapshot = {"cnvms": ["running", "running", "stopped"], "images": 2,
                      "peers": {"n2": "alive", "n3": "down"}, "in_flight": 0}

    m.refresh = refresh  # type: ignore[method-assign]
    metrics_hooks.observe_request(d, "ls", "ok", 0.002, None)
    metrics_hooks.observe_request(d, "ls", "not_found", 0.002, None)
    metrics_hooks.observe_request(d, "ls", "ok", 0.002, "n2")  # peer channel: not the API
    metrics_hooks.observe_request(d, "ls", "weird-code-from-a-peer", 0.1, None)
    rep = TeleportReport("c", "n1", "n2", mode="precopy", ok=True, frozen_seconds=0.04,
                         total_seconds=3.0, wire_bytes=1000)
    metrics_hooks.teleport_finished(d, rep)
    metrics_hooks.teleport_finished(d, TeleportReport("c", "n1", "n2", mode="postcopy",
                                                error="x", rolled_back=True))
    srv = metrics.MetricsServer(m)
    await srv.start("127.0.0.1", 0)
    try:
        assert srv.address is not None
        r, w = await asyncio.open_connection(*srv.address)
        w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await r.read()
        w.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        fam = _families(body.decode())
        r2, w2 = await asyncio.open_connection(*srv.address)
        w2.write(b"GET /nope HTTP/1.0\r\n\r\n")
        assert (await r2.read()).startswith(b"HTTP/1.0 404")
        w2.close()
    finally:
        await srv.stop()
    reqs = {(s.labels["op"], s.labels["code"]): s.value
            for s in fam["cnvm_api_requests"].samples if s.name.endswith("_total")}
    assert reqs == {("ls", "ok"): 1.0, ("ls", "not_found"): 1.0, ("ls", "other"): 1.0}
    tp = {(s.labels["mode"], s.labels["result"]): s.value
          for s in fam["cnvm_teleports"].samples if s.name.endswith("_total")}
    assert tp == {("precopy", "ok"): 1.0, ("postcopy", "rolled_back"): 1.0}
    frozen = [s for s in fam["cnvm_teleport_frozen_seconds"].samples
              if s.name.endswith("_bucket") and s.labels["mode"] == "precopy"]
    assert {s.labels["le"]: s.value for s in frozen}["0.05"] == 1.0
    assert {s.labels["le"]: s.value for s in frozen}["0.025"] == 0.0
    cn = {s.labels["state"]: s.value for s in fam["cnvm_cnvms"].samples}
    assert cn["running"] == 2 and cn["stopped"] == 1 and cn["paused"] == 0
    assert {s.labels["member"]: s.value for s in fam["cnvm_peer_up"].samples} == {
        "n2": 1.0, "n3": 0.0}
    b = [s.value for s in fam["cnvm_teleport_bytes"].samples
         if s.name.endswith("_total") and s.labels["result"] == "ok"]
    assert b == [1000.0]


def test_hooks_without_metrics() -> None:
    d = SimpleNamespace(services=Services())
    metrics_hooks.observe_request(d, "ls", "ok", 0.1, None)  # off: nothing, no error
    metrics_hooks.teleport_finished(object(), None)
