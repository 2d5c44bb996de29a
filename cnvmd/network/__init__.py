"""The overlay network: one cluster L2 over kernel VXLAN, an IP per cnvm that
follows it, node expose addresses and published ports (issue 5).

- names:     device names, MAC-from-IP, port-spec parsing (pure)
- datapath:  NodeNetwork (cnvm0 + VXLAN + flood list), CnvmNet (per-cnvm netns)
- addresses: the cluster IPAM wired to the peer mesh and to disk
- expose:    published ports with kernel NAT (why: see its docstring)
- service:   Network, the facade deploy/rm/teleport call (the NETWORK service, cnvmd.services)
- ops:       API ops and daemon hooks (discovered through ``router``)
"""

from .datapath import CnvmLink, CnvmNet, NodeNetwork, peer_addresses, plan_fdb, reconcile_fdb
from .expose import Exposer, Forward
from .names import NetworkError, PortSpec, mac_for_ip, parse_port_spec
from .ops import router
from .service import Network

__all__ = ["CnvmLink", "CnvmNet", "Exposer", "Forward", "Network", "NetworkError",
           "NodeNetwork", "PortSpec", "mac_for_ip", "parse_port_spec", "peer_addresses",
           "plan_fdb", "reconcile_fdb", "router"]
