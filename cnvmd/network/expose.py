"""Onramp: forward a node's host port to a cnvm's overlay address with kernel NAT.

Why kernel NAT (iptables DNAT + MASQUERADE in the node's netns) and not a proxy:

- It survives the daemon. cnvms keep running when cnvmd restarts or crashes
  (the daemon's core rule), and so must their published ports; a proxy inside
  cnvmd would drop every forwarded connection with it.
- Teleport-safe by construction. The rule targets the cnvm's *overlay IP*, which
  never changes; the node reaches it over cnvm0/VXLAN wherever it runs, and an
  established forwarded TCP connection is just conntrack state on the exposing
  node plus the cnvm's own socket, which CRIU carries over. A proxy would hold a
  second socket per connection that CRIU never sees — fine too, but a second
  moving part.
- UDP comes for free (conntrack), no per-packet Python, no fd per connection.
- iptables is a dependency already (CRIU's network lock needs iptables-restore);
  `nft` is not guaranteed, and iptables-nft writes nftables underneath anyway.

Costs, handled here: MASQUERADE (replies must come back through this node, the
cnvm has no route to the client's underlay), so the node needs an overlay
address (the expose address, allocated on demand); ip_forward on in the node's
netns; connections from the node to *127.0.0.1*:HOSTPORT are not forwarded (only
to its real addresses), which is the usual DNAT caveat.

The rule set lives in our own chains, rebuilt atomically from the persisted list
with `iptables-restore --noflush` (a declared user chain is flushed and refilled
in one transaction), so reconciling after a crash is the same call as a change.

A DNAT rule on a port the node itself serves would hand that service's traffic to a
cnvm (the host's SSH logins, the peer mesh), so `refuse_node_port` keeps such ports
out: 22, the configured peer and VXLAN ports (either protocol), and every port with
a listening TCP or bound UDP socket in the node's network namespace.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnvmd import netlink, proc

from .names import BRIDGE, PortSpec, invalid

log = logging.getLogger("cnvmd.network")

DNAT_CHAIN = "CNVM-DNAT"
SNAT_CHAIN = "CNVM-SNAT"
FWD_CHAIN = "CNVM-FWD"
JUMPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("nat", "PREROUTING", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", DNAT_CHAIN)),
    ("nat", "OUTPUT", ("!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL",
                       "-j", DNAT_CHAIN)),
    ("nat", "POSTROUTING", ("-j", SNAT_CHAIN)),
    ("filter", "FORWARD", ("-j", FWD_CHAIN)),
)


@dataclass(frozen=True, order=True)
class Forward:
    """One published port: HOSTPORT/proto on this node -> ip:port of cnvm `name`."""

    name: str
    hostport: int
    port: int
    proto: str
    ip: str

    @property
    def key(self) -> str:
        return f"{self.hostport}/{self.proto}"

    @property
    def spec(self) -> PortSpec:
        return PortSpec(self.hostport, self.port, self.proto)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spec": str(self.spec)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Forward:
        return cls(str(d["name"]), int(d["hostport"]), int(d["port"]), str(d["proto"]),
                   str(d["ip"]))


SSH_PORT = 22
_TCP_LISTEN = "0A"


def listening_ports(proc_net: Path = Path("/proc/self/net")) -> set[tuple[int, str]]:
    """(port, proto) of every listening TCP and bound UDP socket in this process's
    network namespace (the node's: cnvmd runs in it), from /proc/net/{tcp,udp}{,6}."""
    out: set[tuple[int, str]] = set()
    for proto in ("tcp", "udp"):
        for name in (proto, proto + "6"):
            try:
                lines = (proc_net / name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) < 4 or (proto == "tcp" and f[3] != _TCP_LISTEN):
                    continue
                port = int(f[1].rpartition(":")[2], 16)
                if port:
                    out.add((port, proto))
    return out


def node_ports(config: object) -> set[tuple[int, str]]:
    """Ports the node itself uses, which no cnvm may take over with an expose."""
    out = {(SSH_PORT, "tcp")}
    for key in ("peer_port", "vxlan_port"):
        port = getattr(config, key, 0)
        if isinstance(port, int) and port > 0:
            out |= {(port, "tcp"), (port, "udp")}
    return out | listening_ports()


def refuse_node_port(spec: PortSpec, config: object) -> None:
    """INVALID_ARGUMENT (as a NetworkError) if spec's host port is one the node uses."""
    if (spec.hostport, spec.proto) in node_ports(config):
        raise invalid(f"host port {spec.hostport}/{spec.proto} is used by the node itself "
                      "(SSH, the peer mesh, VXLAN or a listening service): pick another")


def render(forwards: Iterable[Forward]) -> str:
    """The iptables-restore input for exactly these forwards (chains are replaced whole)."""
    nat = [f"-A {DNAT_CHAIN} -p {f.proto} -m {f.proto} --dport {f.hostport} "
           f'-m comment --comment "cnvm {f.name}" -j DNAT --to-destination {f.ip}:{f.port}'
           for f in sorted(forwards)]
    return (
        "*nat\n"
        f":{DNAT_CHAIN} - [0:0]\n"
        f":{SNAT_CHAIN} - [0:0]\n"
        + "".join(line + "\n" for line in nat)
        + f"-A {SNAT_CHAIN} -o {BRIDGE} -m conntrack --ctstate DNAT -j MASQUERADE\n"
        "COMMIT\n"
        "*filter\n"
        f":{FWD_CHAIN} - [0:0]\n"
        f"-A {FWD_CHAIN} -o {BRIDGE} -m conntrack --ctstate DNAT -j ACCEPT\n"
        f"-A {FWD_CHAIN} -i {BRIDGE} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "COMMIT\n"
    )


class Exposer:
    """Applies a set of forwards to the kernel of one node's netns (None: our own)."""

    def __init__(self, netns: str | None = None, *, timeout: float = 20.0) -> None:
        self.netns = netns
        self.timeout = timeout

    async def _ipt(self, *args: str, check: bool = True) -> proc.Result:
        return await proc.run(["iptables", "-w", *args], netns=self.netns, check=check,
                              timeout=self.timeout)

    async def apply(self, forwards: Iterable[Forward]) -> None:
        """Make the kernel hold exactly `forwards` (atomic per table)."""
        forwards = list(forwards)
        if forwards:
            await netlink.sysctl(self.netns, "net.ipv4.ip_forward", 1)
        await proc.run(["iptables-restore", "-w", "--noflush"], netns=self.netns,
                       input=render(forwards).encode(), timeout=self.timeout)
        for table, chain, rule in JUMPS:
            if (await self._ipt("-t", table, "-C", chain, *rule, check=False)).returncode != 0:
                await self._ipt("-t", table, "-I", chain, "1", *rule)

    async def clear(self) -> None:
        """Remove our jumps and chains entirely (node teardown)."""
        for table, chain, rule in JUMPS:
            for _ in range(8):  # duplicates from a crash between -C and -I
                if (await self._ipt("-t", table, "-D", chain, *rule, check=False)).returncode:
                    break
        for table, chain in (("nat", DNAT_CHAIN), ("nat", SNAT_CHAIN), ("filter", FWD_CHAIN)):
            await self._ipt("-t", table, "-F", chain, check=False)
            await self._ipt("-t", table, "-X", chain, check=False)

    async def kernel_rules(self) -> list[str]:
        """Our DNAT rules as the kernel holds them (`iptables -S` lines), for status/tests."""
        res = await self._ipt("-t", "nat", "-S", DNAT_CHAIN, check=False)
        return [ln for ln in res.stdout.splitlines() if ln.startswith("-A ")]
