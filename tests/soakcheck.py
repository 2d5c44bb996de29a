"""Flatness of resource series over a soak run (tests/integration/test_soak.py).

Why a module of its own: the check must be able to fail, and that is unit-tested
(tests/unit/test_soakcheck.py) with a leaking series, so it is a pure function.

Two kinds of series, sampled after each teleport:
- daemon gauges (cnvmd's RSS, open fds, threads, per node): after the warm-up, the
  running median of `window` consecutive samples stays within ±`tol` of the warm-up
  baseline (the median of the first samples after the warm-up). A leak persists, so
  it moves the running median: one fd per teleport over 200 teleports breaks it, a
  Python heap that settles does not. A single sample taken while work was still in
  flight (an SSH channel or an API connection closing: CI saw one sample at 32 fds
  between neighbours at 21-25) is not a leak and does not fail the run;
- leftovers (netns, mounts, cgroups, runc containers, teleport session dirs, summed
  over both nodes): must equal their expected value exactly, at every sample
  after the warm-up ("nothing left over").
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


def baseline(xs: Sequence[float], warmup: int, n: int = 3) -> float:
    after = list(xs[warmup:warmup + n]) or list(xs[-1:])
    return float(statistics.median(after))


def running_median(xs: Sequence[float], window: int) -> list[float]:
    """Median of each run of `window` consecutive samples (fewer at the start)."""
    return [float(statistics.median(xs[max(0, i - window + 1):i + 1]))
            for i in range(len(xs))]


def check_flat(gauges: Mapping[str, Sequence[float]], exact: Mapping[str, Sequence[float]],
               expect: Mapping[str, float], *, warmup: int, tol: float = 0.10,
               slack: Mapping[str, float] | None = None, window: int = 5) -> list[str]:
    """Problems found (empty: flat). `slack` adds an absolute allowance per gauge
    (small integer counts, e.g. threads, where 10 % is less than one); gauges are
    judged on their running median over `window` samples (1: every sample)."""
    out: list[str] = []
    for name, xs in gauges.items():
        if len(xs) <= warmup:
            out.append(f"{name}: only {len(xs)} samples, warm-up is {warmup}")
            continue
        base = baseline(xs, warmup)
        allow = abs(base) * tol + (slack or {}).get(name, 0.0)
        med = running_median(xs[warmup:], window)
        for i, m in enumerate(med, warmup):
            if abs(m - base) > allow:
                out.append(f"{name}: median of samples {max(warmup, i - window + 1)}-{i} "
                           f"is {m:g}, baseline {base:g} ±{allow:g}")
                break
    for name, xs in exact.items():
        want = expect[name]
        for i, x in enumerate(xs[warmup:], warmup):
            if x != want:
                out.append(f"{name}: sample {i} is {x:g}, expected {want:g} (left over)")
                break
    return out


def table(rows: Sequence[Mapping[str, object]], cols: Sequence[str]) -> str:
    """A plain text table (printed by the soak lane)."""
    w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(w[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).rjust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)
