"""Teleport: live migration of a running cnvm between nodes.

- `policy`: mode choice and pre-copy convergence (pure, unit-tested);
  `report`: the versioned record of one teleport (kept, travels with the cnvm);
  `treesync`: incremental upper-dir sync as tar streams.
- `source`: the engine on the node that has the cnvm; it drives every step and owns
  the rollback. `target`: the sessions of arriving cnvms (prepare, data, pages,
  restore, commit, abort; lease-based self-abort; clean-up after a crash).
- `link`: the narrow transport the engine uses (RPC through the peer mesh's
  `forward`, data streams, TCP relays for CRIU's page server over SSH channels).
- `netmove`: same IP/MAC on the target, pre-locked netns, source isolation, the
  neighbour hand-over; `tcprepair`: TCP_REPAIR off after an aborted dump.
- `precopy`: the pre-dump round loop (needs soft-dirty tracking).
- `ops`: the API ops (`teleport`, `teleport.cancel`, `teleport.reports`, and the
  target-side `teleport.*` ops), the `teleport.data` stream kind, start-up
  (fs.pipe-max-size for lazy pages, interrupted sessions).
"""

from cnvmd.migration.ops import router

__all__ = ["router"]
