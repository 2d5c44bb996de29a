"""Peer mesh: SSH transport, trust, membership gossip, peer RPC and bulk streams.

Usage from the daemon::

    svc = PeerService(config, router=peer_router, api_router=daemon.router, daemon=daemon)
    await svc.start()
    ...
    await svc.stop()

The daemon starts it through ops.py (its plug-in and API ops). Layers, one module
each: transport.py, enrol.py, rpc.py, bulk.py, gossip.py; service.py is the facade;
trust.py has the enrolment design. See README.md.
"""

from .membership import MemberEvent, Membership
from .ops import router
from .service import PeerService, Tuning
from .streams import PeerStream, TcpRelay

__all__ = ["MemberEvent", "Membership", "PeerService", "PeerStream", "TcpRelay", "Tuning",
           "router"]
