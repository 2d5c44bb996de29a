"""The pre-copy round loop, separate from CRIU so its decisions are unit-tested.

Each round dumps what the cnvm dirtied since the last one while it keeps
running; `policy.Convergence` decides after every round whether to go on, to
switch over (the rest fits the downtime budget) or to give up (rounds stop
shrinking / cap reached), in which case a hybrid teleport finishes lazily
instead of spinning.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cnvmd.migration.policy import Convergence, Decision, Round

DumpRound = Callable[[int], Awaitable[int]]
"""dump_round(index) -> bytes written by that round (pages shipped)."""


@dataclass
class RoundsResult:
    rounds: list[Round]
    decision: Decision

    @property
    def converged(self) -> bool:
        return self.decision is Decision.SWITCH


async def run_rounds(dump_round: DumpRound, conv: Convergence,
                     on_round: Callable[[int, Round, Decision], None] | None = None,
                     clock: Callable[[], float] = time.monotonic) -> RoundsResult:
    """Pre-dump until the policy says switch or give up; never more than max_rounds."""
    rounds: list[Round] = []
    while True:
        t0 = clock()
        n = await dump_round(len(rounds))
        rounds.append(Round(n, max(clock() - t0, 1e-6)))
        decision = conv.decide(rounds)
        if on_round is not None:
            on_round(len(rounds) - 1, rounds[-1], decision)
        if decision is not Decision.CONTINUE:
            return RoundsResult(rounds, decision)
        if len(rounds) >= conv.max_rounds:  # decide() caps too; belt and braces
            return RoundsResult(rounds, Decision.GIVE_UP)


def final_mode(requested: str, result: RoundsResult, lazy_ready: bool) -> str:
    """How the last step runs after pre-copy: hybrid (or a non-converging precopy that
    may go lazy) switches with lazy pages; otherwise a final stop-and-copy dump."""
    if requested == "hybrid" and lazy_ready:
        return "lazy"
    if result.decision is Decision.GIVE_UP and lazy_ready:
        return "lazy"
    return "dump"
