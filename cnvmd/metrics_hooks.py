"""Where the daemon reports to the metrics endpoint (cnvmd.metrics), when it is on.

Kept apart from cnvmd.metrics, and free of daemon imports, so that cnvmd.api and the
teleport op can call these without an import cycle. Each is a no-op while the
endpoint is off (no METRICS service).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnvmd.services import METRICS

if TYPE_CHECKING:
    from cnvmd.metrics import Metrics


def _of(daemon: Any) -> Metrics | None:
    services = getattr(daemon, "services", None)
    return services.get(METRICS) if services is not None else None


def observe_request(daemon: Any, op: str, code: str, seconds: float,
                    node: str | None) -> None:
    """cnvmd.api: one request ended (API socket only: `node` is None there)."""
    m = _of(daemon)
    if m is not None and node is None:
        m.request(op, code, seconds)


def teleport_finished(daemon: Any, report: Any) -> None:
    """cnvmd.migration.ops: a teleport (TeleportReport) ended, whatever the outcome."""
    m = _of(daemon)
    if m is not None:
        m.teleport(report)
