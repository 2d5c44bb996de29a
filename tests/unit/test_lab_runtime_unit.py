"""Pure parts of lab/runtime/netlink: naming, addresses, log tails (no root needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnvmd import netlink
from cnvmd.runtime import ContainerState, _runc_log_tail, _tail
from cnvmlab.lab import Lab

pytestmark = pytest.mark.unit


def test_lab_naming_and_underlay():
    lab = Lab("lb", nodes=3)
    assert lab.hosts == ["client", "node1", "node2", "node3"]
    assert [lab.netns(h) for h in lab.hosts] == ["lb-client", "lb-node1", "lb-node2", "lb-node3"]
    assert lab.ul_netns == "lb-ul" and lab.prefix == "lb-"
    assert lab.underlay_ip("client") == "198.18.0.2"
    assert lab.underlay_ip("node3") == "198.18.0.13"
    assert str(lab.state_file) == "/run/cnvm-lab/lb/lab.json"
    assert lab.runc("node2").netns == "lb-node2"


@pytest.mark.parametrize("bad", ["", "Lab", "1lab", "lab-x", "toolongname"])
def test_bad_lab_names_are_refused(bad):
    with pytest.raises(ValueError):
        Lab(bad)


def test_netns_path():
    assert netlink.netns_path("lb-node1") == Path("/run/netns/lb-node1")
    assert netlink.netns_path("/proc/1/ns/net") == Path("/proc/1/ns/net")


def test_criu_lock_rules_match_criu():
    # the exact set CRIU installs (platform notes); its restore removes exactly this
    assert "-A CRIU -m mark --mark 0xC114 -j ACCEPT" in netlink.CRIU_LOCK_RULES
    assert netlink.CRIU_LOCK_RULES.index("-I INPUT -j CRIU") < netlink.CRIU_LOCK_RULES.index(
        "-A CRIU -j DROP")


def test_criu_log_tail_prefers_error_lines(tmp_path: Path):
    log = tmp_path / "restore.log"
    log.write_text("(0.1) fine\n(0.2) Error (criu/files.c:1): boom\n(0.3) more\n")
    t = _tail(log)
    assert "boom" in t and "fine" not in t and str(log) in t
    assert _tail(tmp_path / "missing.log") == ""


def test_runc_json_log_tail(tmp_path: Path):
    log = tmp_path / "runc.log"
    log.write_text("\n".join(json.dumps(d) for d in (
        {"level": "info", "msg": "x"}, {"level": "error", "msg": "criu failed: type RESTORE"})))
    assert _runc_log_tail(log) == "criu failed: type RESTORE"


def test_container_state_from_runc_json():
    st = ContainerState.from_json({"id": "a", "pid": 5, "status": "running",
                                   "bundle": "/b", "created": "now"})
    assert (st.id, st.pid, st.status) == ("a", 5, "running")
