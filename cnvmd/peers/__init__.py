"""Peer mesh: SSH transport, trust, membership gossip, peer RPC and bulk streams.

Usage from the daemon::

    svc = PeerService(config)
    await svc.start()
    ...
    await svc.stop()

The daemon discovers ``router`` (ops.py), whose startup hook starts the service and
publishes it as ``daemon.services["peers"]``. See service.py for the API and trust.py
for the enrolment design.
"""

from .membership import MemberEvent, Membership
from .ops import router
from .service import CallContext, PeerService, Tuning
from .streams import PeerStream, TcpRelay

__all__ = ["CallContext", "MemberEvent", "Membership", "PeerService", "PeerStream",
           "TcpRelay", "Tuning", "router"]
