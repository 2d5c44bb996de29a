"""Where a cnvm should go: `deploy --node auto`, `teleport NAME auto`, evacuate plans.

A node qualifies if it is alive, not cordoned, not excluded, capable (for a
teleport target: CRIU with TCP repair, as the node's membership record says), and its free memory
(minus what this plan already put on it) fits the cnvm's limit (or `DEFAULT_NEED`
for a cnvm without one). Among those, spread wins: fewest cnvms per CPU (counting
planned ones), then most free memory, then a node that already has the image (no
layers to ship), then the name (deterministic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .directory import Directory

DEFAULT_NEED = 64 << 20
"""Memory assumed for a cnvm without a limit."""


@dataclass
class Plan:
    """What a plan has already placed, per node (so one plan spreads)."""

    count: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)

    def add(self, node: str, need: int) -> None:
        self.count[node] = self.count.get(node, 0) + 1
        self.memory[node] = self.memory.get(node, 0) + need


def candidates(d: Directory, *, need: int, alive: Callable[[str], bool],
               exclude: Iterable[str] = (), only: Iterable[str] | None = None,
               image_id: str | None = None, plan: Plan | None = None,
               capable: Callable[[str], str | None] | None = None
               ) -> list[tuple[str, str | None]]:
    """Every node with why it does not qualify (None: it does), best first."""
    plan = plan or Plan()
    ex = set(exclude)
    allowed = set(only) if only is not None else None
    rows: list[tuple[tuple[float, int, bool, str], str, str | None]] = []
    for node, doc in d.docs.items():
        r = doc.resources
        free = r.mem_free - plan.memory.get(node, 0)
        count = len(doc.entries) + plan.count.get(node, 0)
        why: str | None = None
        if node in ex:
            why = "excluded"
        elif allowed is not None and node not in allowed:
            why = "not in --to"
        elif not alive(node):
            why = "not alive"
        elif r.cordoned:
            why = "cordoned"
        elif capable is not None and (lack := capable(node)) is not None:
            why = lack
        elif free < need:
            why = f"{free >> 20} MiB free < {need >> 20} MiB needed"
        key = (count / max(1, r.cpus), -free, not (image_id and image_id in r.images), node)
        rows.append((key, node, why))
    rows.sort(key=lambda x: (x[2] is not None, x[0]))
    return [(n, w) for _, n, w in rows]


def pick(d: Directory, **kw: object) -> str | None:
    """The best node, or None if none qualifies."""
    for node, why in candidates(d, **kw):  # type: ignore[arg-type]
        if why is None:
            return node
    return None
