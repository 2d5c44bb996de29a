"""The Prometheus endpoint (issue 17, item 6) on a real 2-node teleport lab.

Every node runs cnvmd with ``metrics_listen = true`` (so: 127.0.0.1:9464 in its
namespace). A cnvm is deployed on node1 and teleported to node2; both endpoints are
scraped with a real HTTP GET (curl inside the node's namespace) and parsed with
prometheus_client's parser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto.messages import ErrorCode, ProtoError
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IP = "10.100.101.31"
NAME = "mt1"


@pytest.fixture
async def tlab(tmp_path: Path):
    tl = TeleLab("hpm", 2)
    tl.extra_config = "metrics_listen = true\n"
    try:
        await tl.up(tmp_path)
        yield tl
    except BaseException:
        tl.print_logs(25)
        raise
    finally:
        await tl.down()


async def scrape(tl: TeleLab, node: str) -> dict[str, list[Any]]:
    """GET /metrics on the node's loopback → {sample name: [samples]}."""
    r = await tl.lab.exec(node, ["curl", "-fsS", "--max-time", "20", "-D", "/dev/stderr",
                                 "http://127.0.0.1:9464/metrics"])
    assert "text/plain; version=0.0.4" in r.stderr, r.stderr
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(r.stdout):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(m: dict[str, list[Any]], name: str, **labels: str) -> float:
    hits = [s.value for s in m.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, m.get(name))
    return float(hits[0])


async def test_metrics_after_deploy_and_teleport(tlab: TeleLab) -> None:
    tl = tlab
    before = await scrape(tl, "node1")
    assert value(before, "cnvm_cnvms", state="running") == 0
    assert value(before, "cnvm_images") == 1
    assert value(before, "cnvm_peer_up", member="node2") == 1
    assert value(before, "cnvm_peer_members", state="alive") == 1
    assert value(before, "cnvm_peer_members", state="down") == 0
    assert value(before, "cnvm_api_requests_total", op="images.import", code="ok") == 1

    await tl.deploy(NAME, IP)
    with pytest.raises(ProtoError) as e:
        await tl.call("node1", "inspect", {"name": "nosuch"})
    assert e.value.code == ErrorCode.NOT_FOUND
    mid = await scrape(tl, "node1")
    assert value(mid, "cnvm_cnvms", state="running") == 1
    assert value(mid, "cnvm_api_requests_total", op="deploy", code="ok") == 1
    assert value(mid, "cnvm_api_requests_total", op="inspect", code="not_found") == 1
    assert value(mid, "cnvm_api_request_duration_seconds_count", op="deploy", code="ok") == 1
    assert value(mid, "cnvm_api_request_duration_seconds_bucket", op="deploy", code="ok",
                 le="+Inf") == 1
    assert "cnvm_teleports_total" not in mid

    rep = await tl.call("node1", "teleport", {"name": NAME, "target": "node2"}, timeout=180)
    assert rep["ok"], rep
    mode = rep["mode"]
    m1, m2 = await scrape(tl, "node1"), await scrape(tl, "node2")
    assert value(m1, "cnvm_teleports_total", mode=mode, result="ok") == 1
    assert value(m1, "cnvm_teleport_duration_seconds_count", mode=mode, result="ok") == 1
    assert value(m1, "cnvm_teleport_duration_seconds_sum", mode=mode, result="ok") \
        == pytest.approx(rep["total_seconds"])
    assert value(m1, "cnvm_teleport_frozen_seconds_sum", mode=mode, result="ok") \
        == pytest.approx(rep["frozen_seconds"])
    frozen_le_10 = value(m1, "cnvm_teleport_frozen_seconds_bucket", mode=mode, result="ok",
                         le="10.0")
    assert frozen_le_10 == (1 if rep["frozen_seconds"] <= 10 else 0)
    assert value(m1, "cnvm_teleport_bytes_total", mode=mode, result="ok") \
        == rep["wire_bytes"] > 0
    assert value(m1, "cnvm_api_requests_total", op="teleport", code="ok") == 1
    assert value(m1, "cnvm_teleports_in_flight") == 0
    # the cnvm moved: node1 has none running, node2 one
    assert value(m1, "cnvm_cnvms", state="running") == 0
    assert value(m2, "cnvm_cnvms", state="running") == 1
    assert value(m2, "cnvm_peer_up", member="node1") == 1
    assert "cnvm_teleports_total" not in m2  # counted where the teleport ran

    # a failed teleport (refused by the target) counts as such
    with pytest.raises(ProtoError):
        await tl.call("node2", "teleport", {"name": NAME, "target": "node1",
                                            "fail_restore": True}, timeout=180)
    m2 = await scrape(tl, "node2")
    failed = [s for s in m2.get("cnvm_teleports_total", []) if s.labels["result"] != "ok"]
    assert [s.value for s in failed] == [1.0], failed
    assert failed[0].labels["result"] in ("rolled_back", "failed")
    assert value(m2, "cnvm_cnvms", state="running") == 1  # rolled back: still here


async def test_metrics_endpoint_http(tlab: TeleLab) -> None:
    """Only GET /metrics; other paths and methods get clean HTTP errors."""
    r = await tlab.lab.exec("node1", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                      "http://127.0.0.1:9464/"])
    assert r.stdout == "404"
    r = await tlab.lab.exec("node1", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                      "-X", "POST", "http://127.0.0.1:9464/metrics"])
    assert r.stdout == "405"
    # loopback only: the node's underlay address does not answer
    r = await tlab.lab.exec("node1", ["curl", "-sS", "--max-time", "3",
                                      f"http://{tlab.lab.underlay_ip('node1')}:9464/metrics"],
                            check=False)
    assert r.returncode != 0
