"""Mode choice and convergence: the decisions of a teleport, kept free of I/O.

Modes, best first when both ends can do them:

- ``hybrid``: pre-copy rounds while the cnvm runs, then a lazy (post-copy) switch;
  needs soft-dirty tracking and userfaultfd.
- ``precopy``: pre-copy rounds, then a final dump of what is still dirty; needs
  soft-dirty tracking (``criu check --feature mem_dirty_track``).
- ``postcopy``: freeze, ship everything but memory, restore at once with lazy pages;
  pages are faulted in / pushed afterwards. Needs userfaultfd and, without
  CAP_SYS_RESOURCE, ``fs.pipe-max-size`` >= 4 MiB on the source.
- ``stop-copy``: freeze, dump all, restore; always possible, downtime grows with
  memory.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class Mode(enum.StrEnum):
    AUTO = "auto"
    HYBRID = "hybrid"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    STOP_COPY = "stop-copy"


class ModeUnavailable(Exception):
    """An explicitly requested mode cannot run between these two nodes."""


def _needs(mode: Mode) -> tuple[str, ...]:
    return {
        Mode.HYBRID: ("mem_dirty_track", "lazy_pages_ready"),
        Mode.PRECOPY: ("mem_dirty_track",),
        Mode.POSTCOPY: ("lazy_pages_ready",),
        Mode.STOP_COPY: (),
    }[mode]


def _missing(mode: Mode, src: Mapping[str, Any], dst: Mapping[str, Any]) -> list[str]:
    out = []
    for cap in _needs(mode):
        for side, caps in (("source", src), ("target", dst)):
            if not caps.get(cap):
                out.append(f"{cap} on the {side}")
    return out


def choose_mode(
    requested: Mode | str, src: Mapping[str, Any], dst: Mapping[str, Any]
) -> tuple[Mode, str]:
    """Pick the mode and say why, from both nodes' probed capabilities."""
    req = Mode(requested)
    if req is not Mode.AUTO:
        missing = _missing(req, src, dst)
        if missing:
            raise ModeUnavailable(f"mode {req} needs {', '.join(missing)}")
        return req, f"{req} requested"
    for mode in (Mode.HYBRID, Mode.PRECOPY, Mode.POSTCOPY):
        missing = _missing(mode, src, dst)
        if not missing:
            return mode, f"auto: both nodes support {' and '.join(_needs(mode))}"
    reasons = "; ".join(
        f"{m}: no {', '.join(_missing(m, src, dst))}"
        for m in (Mode.PRECOPY, Mode.POSTCOPY)
    )
    return Mode.STOP_COPY, f"auto: fell back to stop-copy ({reasons})"


@dataclass(frozen=True)
class Round:
    """One pre-copy round: pages written while the cnvm ran."""

    bytes: int
    seconds: float

    @property
    def bandwidth(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


class Decision(enum.StrEnum):
    CONTINUE = "continue"  # another pre-copy round
    SWITCH = "switch"  # freeze now: the rest fits the downtime budget
    GIVE_UP = "give_up"  # not converging: switch anyway (lazily if possible)


@dataclass(frozen=True)
class Convergence:
    """When to stop pre-copying.

    The next round is expected to carry about what the last one did (the dirty
    rate times the round's length). We switch when that fits ``max_downtime`` at the
    measured bandwidth, and give up when rounds stop shrinking meaningfully or the
    round cap is hit: iterating further only burns bandwidth.
    """

    max_downtime: float = 0.3
    max_rounds: int = 8
    min_shrink: float = 0.9  # a round must be < 90 % of the previous to count as progress
    fixed_cost: float = 0.1  # freeze overhead not spent on pages (CRIU, restore), seconds

    def decide(self, rounds: Sequence[Round]) -> Decision:
        if not rounds:
            return Decision.CONTINUE
        last = rounds[-1]
        remaining_time = last.bytes / last.bandwidth if last.bytes else 0.0
        if remaining_time + self.fixed_cost <= self.max_downtime:
            return Decision.SWITCH
        if len(rounds) >= self.max_rounds:
            return Decision.GIVE_UP
        if len(rounds) >= 2 and rounds[-1].bytes >= self.min_shrink * rounds[-2].bytes:
            return Decision.GIVE_UP
        return Decision.CONTINUE
