"""Naming rules of the overlay: MAC from IP, device names, port specs."""

from __future__ import annotations

import pytest

from cnvmd.network.expose import Forward, render
from cnvmd.network.names import (
    IFNAMSIZ,
    NetworkError,
    PortSpec,
    bridge_mac,
    host_veth,
    host_veth_mac,
    mac_for_ip,
    netns_name,
    overlay_mtu,
    parse_key,
    parse_port_spec,
    vxlan_mac,
)
from proto.messages import ErrorCode

pytestmark = pytest.mark.unit


def test_mac_is_derived_from_ip_stable_and_locally_administered():
    assert mac_for_ip("10.100.101.5") == "02:00:0a:64:65:05"  # the canary's MAC
    assert mac_for_ip("10.100.101.5") == mac_for_ip("10.100.101.5")
    assert mac_for_ip("10.100.101.6") != mac_for_ip("10.100.101.5")
    first = int(mac_for_ip("192.168.0.1").split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    with pytest.raises(ValueError):
        mac_for_ip("10.100.101.300")


def test_bridge_mac_never_collides_with_a_cnvm_mac():
    m = bridge_mac("node1")
    assert m == bridge_mac("node1") and m != bridge_mac("node2")
    first = int(m.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01 and not m.startswith("02:00:")


def test_device_macs_are_fixed_distinct_and_per_node():
    """Every MAC the daemon creates is given at creation (udev leaves it alone) and
    differs between nodes, also on hosts cloned from one image (same machine-id)."""
    macs = [bridge_mac("n1"), bridge_mac("n2"), vxlan_mac("n1"), vxlan_mac("n2"),
            host_veth_mac("n1", "web"), host_veth_mac("n2", "web"),
            host_veth_mac("n1", "db"), mac_for_ip("10.0.0.1")]
    assert len(set(macs)) == len(macs)
    assert vxlan_mac("n1") == vxlan_mac("n1") and host_veth_mac("n1", "a") == host_veth_mac(
        "n1", "a")
    for m in macs:
        first = int(m.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01 and len(m.split(":")) == 6


def test_host_veth_names_fit_ifnamsiz_and_are_per_name():
    n = host_veth("a" * 63)
    assert len(n) <= IFNAMSIZ and n.startswith("vc")
    assert host_veth("web") == host_veth("web") != host_veth("db")


def test_netns_name():
    assert netns_name("cnvm-", "web") == "cnvm-web"
    assert netns_name("ln-node1-", "web") == "ln-node1-web"
    with pytest.raises(NetworkError):
        netns_name("cnvm-", "../etc")


def test_overlay_mtu_accounts_for_vxlan():
    assert overlay_mtu(1500) == 1450
    assert overlay_mtu(9000) == 8950


@pytest.mark.parametrize("spec,want", [
    ("8080:80", PortSpec(8080, 80, "tcp")),
    ("8080:80/tcp", PortSpec(8080, 80, "tcp")),
    ("5353:53/udp", PortSpec(5353, 53, "udp")),
    (" 1:65535/UDP ", PortSpec(1, 65535, "udp")),
])
def test_port_spec_ok(spec, want):
    got = parse_port_spec(spec)
    assert got == want
    assert parse_port_spec(str(got)) == got


@pytest.mark.parametrize("spec,msg", [
    ("", "expected HOSTPORT:PORT"),
    ("8080", "expected HOSTPORT:PORT"),
    ("8080:", "expected HOSTPORT:PORT"),
    (":80", "expected HOSTPORT:PORT"),
    ("a:80", "expected HOSTPORT:PORT"),
    ("8080:80/sctp", "protocol must be tcp or udp"),
    ("8080:80/", "expected HOSTPORT:PORT"),
    ("0:80", "host port 0 is not in 1-65535"),
    ("8080:70000", "port 70000 is not in 1-65535"),
    ("-1:80", "expected HOSTPORT:PORT"),
    ("80:80:80", "expected HOSTPORT:PORT"),
])
def test_port_spec_errors_say_what_is_wrong(spec, msg):
    with pytest.raises(NetworkError, match=msg) as ei:
        parse_port_spec(spec)
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT


def test_unexpose_key():
    assert parse_key("8080") == (8080, "tcp")
    assert parse_key("53/udp") == (53, "udp")
    for bad in ("x", "53/icmp", "0"):
        with pytest.raises(NetworkError):
            parse_key(bad)


def test_render_rules_target_the_overlay_ip_and_masquerade_out_of_cnvm0():
    text = render([Forward("web", 8080, 80, "tcp", "10.100.101.5"),
                   Forward("dns", 5353, 53, "udp", "10.100.101.6")])
    assert ":CNVM-DNAT - [0:0]" in text  # declared: replaced as a whole
    assert ("-A CNVM-DNAT -p tcp -m tcp --dport 8080 -m comment --comment \"cnvm web\" "
            "-j DNAT --to-destination 10.100.101.5:80") in text
    assert "--dport 5353" in text and "10.100.101.6:53" in text
    assert "-o cnvm0 -m conntrack --ctstate DNAT -j MASQUERADE" in text
    assert text.count("COMMIT") == 2
    empty = render([])
    assert "-j DNAT" not in empty and ":CNVM-DNAT" in empty
