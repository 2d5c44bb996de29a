"""The soak lane's flatness check can fail (tests/soakcheck.py)."""

from __future__ import annotations

import pytest

from tests.soakcheck import check_flat, table

pytestmark = pytest.mark.unit

FLAT_RSS = [60e6, 75e6, 80e6, 81e6, 80.5e6, 81.2e6, 80.9e6, 81.5e6, 81e6, 82e6]


def test_a_flat_run_passes():
    assert check_flat({"rss": FLAT_RSS, "fds": [30, 34, 33, 33, 34, 33, 33, 34, 33, 33]},
                      {"netns": [2] * 10}, {"netns": 2}, warmup=2) == []


def test_a_leaking_series_fails():
    leaking_fds = [30 + i for i in range(10)]  # one fd per teleport
    probs = check_flat({"fds": leaking_fds}, {}, {}, warmup=2)
    assert probs and probs[0].startswith("fds: median of samples")
    growing_rss = [80e6 * (1 + 0.03 * i) for i in range(10)]
    assert check_flat({"rss": growing_rss}, {}, {}, warmup=2)


def test_one_busy_sample_is_not_a_leak_but_a_step_that_stays_is():
    # CI's 200-run: one sample at 32 fds among 21-25 (work in flight when sampled)
    spike = [25, 24, 25, 21, 25, 32, 24, 21, 25, 24, 25, 21]
    assert check_flat({"fds": spike}, {}, {}, warmup=2, slack={"fds": 2.0}) == []
    assert check_flat({"fds": spike}, {}, {}, warmup=2, slack={"fds": 2.0}, window=1)
    step = [25, 24, 25, 21, 25, 32, 33, 32, 33, 32, 33, 32]  # 8 fds kept from one point on
    assert check_flat({"fds": step}, {}, {}, warmup=2, slack={"fds": 2.0})
    slow = [25 + i // 10 for i in range(200)]  # one fd every 10 teleports
    assert check_flat({"fds": slow}, {}, {}, warmup=40, slack={"fds": 2.0})


def test_a_leftover_fails_even_if_small():
    probs = check_flat({}, {"netns": [2, 2, 2, 3, 3]}, {"netns": 2}, warmup=1)
    assert probs == ["netns: sample 3 is 3, expected 2 (left over)"]


def test_warmup_is_ignored_and_too_few_samples_is_a_failure():
    assert check_flat({"rss": [10, 500, 100, 100, 101]}, {}, {}, warmup=2) == []
    assert check_flat({"rss": [1, 2]}, {}, {}, warmup=2)


def test_table_prints_every_row():
    text = table([{"i": 1, "mode": "postcopy"}, {"i": 2, "mode": "stop-copy"}], ["i", "mode"])
    assert text.splitlines()[0].split() == ["i", "mode"] and len(text.splitlines()) == 3
