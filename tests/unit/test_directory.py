"""Cluster directory: document validation, ordering, lookups, the name claim
protocol's decisions, placement, and the evacuation parallelism default."""

from __future__ import annotations

import pytest

from cnvmd.cluster import placement
from cnvmd.cluster.directory import Directory, Entry, NodeDoc, Resources, parse_doc
from cnvmd.cluster.evacuate import default_parallel

GIB = 1 << 30
IMG = "a" * 64


def doc(node: str, names: list[str], *, inc: int = 1, ver: int = 1, **res: object) -> NodeDoc:
    r = {"mem_total": 8 * GIB, "mem_free": 4 * GIB, "cpus": 2, "load": 0.5, **res}
    return parse_doc(node, {
        "node": node, "incarnation": inc, "version": ver,
        "entries": [{"name": n, "node": node, "state": "running", "ip": "10.0.0.1",
                     "memory": 128 << 20, "mem_use": 1 << 20, "image": "busybox:latest",
                     "image_id": IMG} for n in names],
        "resources": r})


def test_parse_doc_accepts_a_good_document():
    d = doc("node2", ["web", "db"])
    assert set(d.entries) == {"web", "db"} and d.resources.cpus == 2


@pytest.mark.parametrize("bad", [
    {"node": "node3"},  # speaks for another node
    {"entries": [{"name": "Web", "node": "node2", "state": "running"}]},  # not a DNS label
    {"entries": [{"name": "web", "node": "node1", "state": "running"}]},  # another node's
    {"entries": [{"name": "web", "node": "node2", "state": "exploded"}]},
    {"entries": [{"name": "web", "node": "node2", "state": "running", "ip": "1.2.3.999"}]},
    {"entries": [{"name": "web", "node": "node2", "state": "running", "memory": -1}]},
    {"entries": [{"name": "web", "node": "node2", "state": "running", "memory": True}]},
    {"entries": [{"name": "web", "node": "node2", "state": "running", "image": "../x\n"}]},
    {"entries": [{"name": "web", "node": "node2", "state": "running", "extra": 1}]},
    {"entries": [{"name": "web", "node": "node2", "state": "running"}] * 2},  # twice
    {"entries": "web"},
    {"resources": {"load": float("nan")}},
    {"resources": {"cpus": 0}},
    {"resources": {"cordoned": "yes"}},
    {"resources": {"images": ["../../etc"]}},
    {"incarnation": -1},
])
def test_parse_doc_refuses_bad_input(bad: dict[str, object]):
    base = {"node": "node2", "incarnation": 1, "version": 1, "entries": [],
            "resources": {}}
    with pytest.raises(ValueError):
        parse_doc("node2", {**base, **bad})


def test_newer_documents_win_and_listeners_hear_changes():
    d = Directory("node1")
    heard: list[set[str]] = []
    d.add_listener(heard.append)
    assert d.absorb(doc("node2", ["web"], inc=5, ver=3))
    assert not d.absorb(doc("node2", [], inc=5, ver=2))  # stale
    assert d.lookup("web") is not None and d.lookup("web").node == "node2"  # type: ignore
    assert d.absorb(doc("node2", [], inc=6, ver=0))  # restarted: a new incarnation wins
    assert d.lookup("web") is None
    assert heard == [{"web"}, {"web"}]
    d.drop("node2")
    assert "node2" not in d.docs


def test_set_local_bumps_version_only_on_change():
    d = Directory("node1")
    e = Entry("web", "node1", "running")
    assert d.set_local([e], Resources(cpus=2))
    v = d.mine.version
    assert not d.set_local([e], Resources(cpus=2))
    assert d.mine.version == v


def test_claims_exactly_one_of_two_concurrent_claimants_collects_every_grant():
    n1, n2, n3 = Directory("node1"), Directory("node2"), Directory("node3")
    n1.pending.add("x")
    n2.pending.add("x")
    # node2 asks node1: node1 is claiming with priority -> refused
    assert n1.on_claim("x", "node2") == {"ok": False, "why": "busy", "node": "node1"}
    # node1 asks node2: granted, and node2's own claim is lost
    assert n2.on_claim("x", "node1")["ok"] and "x" in n2.lost
    # node3 granted node2 first: node1 meets busy, retries after node2 abandons
    assert n3.on_claim("x", "node2")["ok"]
    assert n3.on_claim("x", "node1")["why"] == "busy"
    n3.on_abandon("x", "node2")
    assert n3.on_claim("x", "node1")["ok"]


def test_claim_refused_when_listed_or_deploying_and_grant_lapses_when_listed():
    d = Directory("node1")
    d.absorb(doc("node2", ["web"]))
    assert d.on_claim("web", "node3") == {"ok": False, "why": "exists", "node": "node2"}
    assert d.local_conflict("web") is not None
    d.deploying.add("db")
    assert d.on_claim("db", "node0")["why"] == "exists"  # even with priority
    assert d.on_claim("api", "node3")["ok"]
    assert d.local_conflict("api") == "'api' is being deployed on node3"
    d.absorb(doc("node3", ["api"]))
    assert "api" not in d.granted


def test_grants_expire():
    now = [0.0]
    d = Directory("node1", clock=lambda: now[0])
    assert d.on_claim("x", "node2")["ok"]
    assert d.on_claim("x", "node3")["why"] == "busy"
    now[0] += 31
    assert d.on_claim("x", "node3")["ok"]


def test_placement_fit_spread_cordon():
    d = Directory("node1")
    d.absorb(doc("node2", ["a", "b"], mem_free=4 * GIB))
    d.absorb(doc("node3", [], mem_free=2 * GIB))
    d.absorb(doc("node4", [], mem_free=8 * GIB, cordoned=True))
    alive = lambda n: n != "node5"  # noqa: E731
    # node1 (own, empty resources: 0 free) does not fit; node3 has fewer cnvms
    assert placement.pick(d, need=GIB, alive=alive) == "node3"
    assert placement.pick(d, need=3 * GIB, alive=alive) == "node2"
    assert placement.pick(d, need=16 * GIB, alive=alive) is None
    plan = placement.Plan()
    got = []
    for _ in range(4):
        n = placement.pick(d, need=256 << 20, alive=alive, exclude=("node1",), plan=plan)
        assert n is not None
        plan.add(n, 256 << 20)
        got.append(n)
    assert sorted(got) == ["node2", "node3", "node3", "node3"]  # spread by count
    why = dict(placement.candidates(d, need=GIB, alive=alive))
    assert why["node4"] == "cordoned"
    no_tcp = (lambda n: "no TCP repair" if n == "node3" else None)  # noqa: E731
    assert placement.pick(d, need=GIB, alive=alive, capable=no_tcp) == "node2"


def test_default_parallel_follows_cpus_and_link():
    assert default_parallel(Resources(cpus=8, link_mbps=10_000), 2) == 4
    assert default_parallel(Resources(cpus=2, link_mbps=10_000), 2) == 2
    assert default_parallel(Resources(cpus=8, link_mbps=1000), 2) == 1
    assert default_parallel(Resources(cpus=8, link_mbps=0), 5) == 1
    assert default_parallel(None, 1) == 1


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                  st.binary(max_size=8))
_json = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                st.dictionaries(st.text(max_size=10), c,
                                                                max_size=4)), max_leaves=20)
_entry = st.fixed_dictionaries({"name": st.one_of(st.just("web"), st.text(max_size=5)),
                                "node": st.one_of(st.just("node2"), _leaf),
                                "state": st.one_of(st.just("running"), _leaf)},
                               optional={"ip": _leaf, "memory": _leaf, "mem_use": _leaf,
                                         "image": _leaf, "image_id": _leaf, "x": _leaf})


@settings(max_examples=400, deadline=None)
@given(st.one_of(_json, st.fixed_dictionaries(
    {"node": st.one_of(st.just("node2"), _leaf), "incarnation": _leaf, "version": _leaf,
     "entries": st.one_of(st.lists(_entry, max_size=3), _json),
     "resources": st.one_of(_json, st.dictionaries(
         st.sampled_from(["mem_total", "mem_free", "cpus", "load", "cordoned", "link_mbps",
                          "images"]), _json, max_size=7))})))
def test_parse_doc_never_fails_other_than_value_error(d: object):
    """Whatever a member sends, parse_doc accepts a valid document or raises ValueError
    (the peer op maps it to invalid_argument), never anything else."""
    try:
        parse_doc("node2", d)
    except ValueError:
        pass
