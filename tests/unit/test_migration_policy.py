import pytest

from cnvmd.migration.policy import (
    Convergence,
    Decision,
    Mode,
    ModeUnavailable,
    Round,
    choose_mode,
)
from cnvmd.migration.report import RoundReport, TeleportReport

pytestmark = pytest.mark.unit

THESE_HOSTS = {"mem_dirty_track": False, "lazy_pages_ready": True}
VM_GUEST = {"mem_dirty_track": True, "lazy_pages_ready": True}
BARE = {"mem_dirty_track": False, "lazy_pages_ready": False}


def test_auto_picks_postcopy_without_soft_dirty():
    mode, why = choose_mode("auto", THESE_HOSTS, THESE_HOSTS)
    assert mode is Mode.POSTCOPY
    assert "lazy_pages_ready" in why


def test_auto_picks_hybrid_with_soft_dirty_and_uffd():
    assert choose_mode(Mode.AUTO, VM_GUEST, VM_GUEST)[0] is Mode.HYBRID


def test_auto_falls_back_to_stop_copy_and_says_why():
    mode, why = choose_mode("auto", THESE_HOSTS, BARE)
    assert mode is Mode.STOP_COPY
    assert "lazy_pages_ready on the target" in why


def test_explicit_unavailable_mode_is_refused():
    with pytest.raises(ModeUnavailable, match="mem_dirty_track on the source"):
        choose_mode("precopy", THESE_HOSTS, VM_GUEST)
    assert choose_mode("stop-copy", BARE, BARE)[0] is Mode.STOP_COPY


def test_bad_mode_name():
    with pytest.raises(ValueError):
        choose_mode("warp", BARE, BARE)


def test_convergence_switches_when_rest_fits_budget():
    c = Convergence(max_downtime=0.3)
    assert c.decide([]) is Decision.CONTINUE
    # 256 MB at 100 MB/s: 2.56 s > budget
    assert c.decide([Round(256_000_000, 2.56)]) is Decision.CONTINUE
    # 10 MB at 100 MB/s = 0.1 s + 0.1 fixed <= 0.3
    assert c.decide([Round(256_000_000, 2.56), Round(10_000_000, 0.1)]) is Decision.SWITCH


def test_convergence_gives_up_when_not_shrinking_or_capped():
    c = Convergence(max_downtime=0.3, max_rounds=3)
    stuck = [Round(100_000_000, 1.0), Round(98_000_000, 1.0)]
    assert c.decide(stuck) is Decision.GIVE_UP
    shrinking = [Round(400_000_000, 4.0), Round(200_000_000, 2.0), Round(100_000_000, 1.0)]
    assert c.decide(shrinking) is Decision.GIVE_UP


def test_report_round_trip_and_version_guard():
    r = TeleportReport("sneaker01", "node1", "node2", mode="postcopy")
    r.rounds.append(RoundReport("dump", 1234, 0.5))
    d = r.to_dict()
    assert TeleportReport.from_dict(d) == r
    d["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        TeleportReport.from_dict(d)
