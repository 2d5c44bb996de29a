"""Flood-list reconciliation and the membership -> peer address mapping."""

from __future__ import annotations

import pytest

from cnvmd.network.datapath import peer_addresses, plan_fdb, reconcile_fdb

pytestmark = pytest.mark.unit


def test_plan_fdb():
    assert plan_fdb([], []) == ([], [])
    assert plan_fdb(["198.18.0.11"], ["198.18.0.11"]) == ([], [])
    assert plan_fdb(["198.18.0.11", "198.18.0.12"], ["198.18.0.12", "198.18.0.13"]) == (
        ["198.18.0.13"], ["198.18.0.11"])


class FakeFdb:
    """The kernel's all-zero entries of one VXLAN device, with an operation log."""

    def __init__(self, entries=()):
        self.entries = set(entries)
        self.log = []

    async def add(self, a):
        self.log.append(("add", a))
        self.entries.add(a)

    async def remove(self, a):
        self.log.append(("del", a))
        self.entries.discard(a)


async def test_reconcile_adds_before_removing_and_converges():
    fdb = FakeFdb(["198.18.0.11", "198.18.0.12", "198.18.0.99"])
    added, removed = await reconcile_fdb(fdb.entries.copy(), {"198.18.0.12", "198.18.0.13"},
                                         fdb.add, fdb.remove)
    assert fdb.entries == {"198.18.0.12", "198.18.0.13"}
    assert added == ["198.18.0.13"] and removed == ["198.18.0.11", "198.18.0.99"]
    assert fdb.log[0] == ("add", "198.18.0.13")  # never a moment with fewer peers than needed
    fdb.log.clear()
    assert await reconcile_fdb(fdb.entries.copy(), fdb.entries.copy(), fdb.add,
                               fdb.remove) == ([], [])
    assert fdb.log == []  # idempotent: no kernel calls when in sync


def test_peer_addresses_follow_membership():
    members = [
        {"name": "node1", "addr": "198.18.0.11", "admin": "active"},
        {"name": "node2", "addr": "198.18.0.12", "admin": "active"},
        {"name": "node3", "addr": "198.18.0.13", "admin": "removed"},
        {"name": "node4", "addr": "", "admin": "active"},  # address not learnt yet
        {"name": "node5", "addr": "not-an-ip", "admin": "active"},
    ]
    assert peer_addresses(members, "node1") == {"198.18.0.12"}

    class M:
        def __init__(self, name, addr, admin="active"):
            self.name, self.addr, self.admin = name, addr, admin

    assert peer_addresses([M("a", "198.18.0.1"), M("b", "198.18.0.2")], "a") == {"198.18.0.2"}


async def test_membership_events_drive_the_flood_list():
    """join -> added, remove -> gone, replayed table -> same result (order-free)."""
    fdb = FakeFdb()
    table = {"node1": {"name": "node1", "addr": "198.18.0.11", "admin": "active"}}

    async def on_event():
        await reconcile_fdb(fdb.entries.copy(), peer_addresses(table.values(), "node1"),
                            fdb.add, fdb.remove)

    for n in (2, 3):
        table[f"node{n}"] = {"name": f"node{n}", "addr": f"198.18.0.1{n}", "admin": "active"}
        await on_event()
    assert fdb.entries == {"198.18.0.12", "198.18.0.13"}
    table["node2"]["admin"] = "removed"
    await on_event()
    assert fdb.entries == {"198.18.0.13"}
    await on_event()
    assert fdb.entries == {"198.18.0.13"}
