"""Pure naming and parsing rules of the overlay: device names, MACs, port specs.

Kept free of I/O so unit tests pin them down: a cnvm's MAC must be the same on
every node it ever runs on (a teleported TCP peer keeps its ARP entry), and the
names must be derivable again after a crash from nothing but the cnvm's name.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from proto.messages import ErrorCode

BRIDGE = "cnvm0"
"""The per-node bridge every cnvm veth and the VXLAN device are enslaved to."""
VXLAN = "cnvm0-vx"
CNVM_IF = "eth0"
"""The interface name inside a cnvm's netns."""
VXLAN_OVERHEAD = 50
"""Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 bytes."""
HOST_VETH_PREFIX = "vc"
IFNAMSIZ = 15
NODE_OWNER_PREFIX = "node:"
"""IPAM owner of a node's own (expose) address; ':' is never in a cnvm name."""

_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_PORTSPEC = re.compile(r"^(\d+):(\d+)(?:/([A-Za-z]+))?$")
PROTOS = ("tcp", "udp")


class NetworkError(Exception):
    """A network request failed or was refused; `code` maps onto the API's ErrorCode."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> NetworkError:
    return NetworkError(message, ErrorCode.INVALID_ARGUMENT)


def mac_for_ip(ip: str | ipaddress.IPv4Address) -> str:
    """02:00:a:b:c:d for IPv4 a.b.c.d: locally administered, unicast, stable across nodes."""
    addr = ipaddress.IPv4Address(str(ip))
    return "02:00:" + ":".join(f"{b:02x}" for b in addr.packed)


def bridge_mac(node: str) -> str:
    """A fixed MAC for a node's cnvm0 (0e: prefix, never a cnvm MAC).

    A bridge otherwise takes the lowest MAC of its ports, so it would change as
    cnvms come and go and the node's expose address would keep moving in every
    neighbour's ARP cache.
    """
    h = hashlib.sha256(node.encode()).digest()[:5]
    return "0e:" + ":".join(f"{b:02x}" for b in h)


def vxlan_mac(node: str) -> str:
    """A fixed MAC for a node's VXLAN device (0a: prefix), set when it is created.

    Like every MAC the daemon creates, it is given at creation time: a device born
    with a random MAC is fair game for udev's MACAddressPolicy=persistent, which
    derives it from /etc/machine-id and the interface name, so hosts cloned from one
    image would get identical MACs (and drop each other's frames as their own).
    """
    h = hashlib.sha256(b"vxlan:" + node.encode()).digest()[:5]
    return "0a:" + ":".join(f"{b:02x}" for b in h)


def host_veth_mac(node: str, name: str) -> str:
    """The host end of a cnvm's veth (06: prefix): per node and cnvm, so the same
    cnvm's old and new host ends differ across a teleport (see `vxlan_mac`)."""
    h = hashlib.sha256(f"veth:{node}:{name}".encode()).digest()[:5]
    return "06:" + ":".join(f"{b:02x}" for b in h)


def host_veth(name: str) -> str:
    """Host end of a cnvm's veth: `vc` + 12 hex digits of the name's hash (IFNAMSIZ-safe)."""
    return HOST_VETH_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:12]


def netns_name(prefix: str, name: str) -> str:
    """The cnvm's named netns; unique per node because cnvm names are."""
    ns = prefix + name
    if not _NETNS_NAME.match(ns):
        raise invalid(f"bad network namespace name {ns!r} (prefix {prefix!r}, cnvm {name!r})")
    return ns


@dataclass(frozen=True, order=True)
class PortSpec:
    """A host port forwarded to a cnvm port: HOSTPORT:PORT[/tcp|udp]."""

    hostport: int
    port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.hostport}:{self.port}/{self.proto}"

    @property
    def key(self) -> str:
        """Identity on a node: one host port per protocol."""
        return f"{self.hostport}/{self.proto}"


def _port(text: str, what: str, spec: str) -> int:
    n = int(text)
    if not 1 <= n <= 65535:
        raise invalid(f"bad port spec {spec!r}: {what} {n} is not in 1-65535")
    return n


def parse_port_spec(spec: str) -> PortSpec:
    """Parse `HOSTPORT:PORT[/tcp|udp]` (tcp by default), with an error that says what is wrong."""
    if not isinstance(spec, str):
        raise invalid(f"bad port spec {spec!r}: expected HOSTPORT:PORT[/tcp|udp]")
    m = _PORTSPEC.match(spec.strip())
    if not m:
        raise invalid(f"bad port spec {spec!r}: expected HOSTPORT:PORT[/tcp|udp], "
                      "e.g. 8080:80 or 5353:53/udp")
    proto = (m.group(3) or "tcp").lower()
    if proto not in PROTOS:
        raise invalid(f"bad port spec {spec!r}: protocol must be tcp or udp, not {m.group(3)!r}")
    return PortSpec(_port(m.group(1), "host port", spec), _port(m.group(2), "port", spec), proto)


def parse_key(key: str) -> tuple[int, str]:
    """`HOSTPORT[/proto]` as used by unexpose; tcp by default."""
    m = re.fullmatch(r"(\d+)(?:/([A-Za-z]+))?", str(key).strip())
    if not m:
        raise invalid(f"bad host port {key!r}: expected HOSTPORT[/tcp|udp]")
    proto = (m.group(2) or "tcp").lower()
    if proto not in PROTOS:
        raise invalid(f"bad host port {key!r}: protocol must be tcp or udp")
    return _port(m.group(1), "host port", key), proto


def overlay_mtu(underlay_mtu: int) -> int:
    return underlay_mtu - VXLAN_OVERHEAD
