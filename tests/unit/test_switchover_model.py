"""Exhaustive model check of the fenced switchover (cnvmd/migration/README.md).

The source runs the real rule (`outcome.decide`); the target is modelled after
TargetSide (restore -> fenced, confirm -> restored, abort / fence deadline /
restart -> gone, status answers). Every interleaving is explored: any in-flight
message may be delivered next (reordering) or lost, the source may time out at any
moment (with membership saying down or not, the lease over or not), the target's
deadline may fire and its daemon may restart at any moment, the source may restart
(its in-flight replies lost, its journaled phase kept).

Checked: no reachable state runs two network-visible copies; from every reachable
state a quiet network leads to exactly one copy; every settled end has exactly one.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from cnvmd.migration.outcome import Action, decide
from cnvmd.migration.wire import TargetStatus as TS

MAX_IN_FLIGHT = 3


class St(NamedTuple):
    src: str  # frozen (restore not sent) | sent | confirm_sent | switched | resumed
    tgt: str  # prepared | fenced | running | gone
    net: tuple[tuple[str, str], ...]  # sorted multiset of (direction+kind, payload)


def tgt_status(tgt: str) -> TS:
    return {"prepared": TS.PREPARED, "fenced": TS.FENCED, "running": TS.RESTORED,
            "gone": TS.UNKNOWN}[tgt]


def add(net: tuple[tuple[str, str], ...], *msgs: tuple[str, str]) -> tuple | None:
    out = tuple(sorted(net + msgs))
    return out if len(out) <= MAX_IN_FLIGHT else None


def source_act(s: St, status: TS | None, down: bool, lease_over: bool) -> St | None:
    """The source acts on an answer (or on silence) with the real rule."""
    if s.src not in ("sent", "confirm_sent"):
        return s
    confirm_sent = s.src == "confirm_sent"
    act = decide(status, confirm_sent=confirm_sent, target_down=down, lease_over=lease_over)
    if act is Action.SWITCH:
        return s._replace(src="switched")
    if act is Action.RESUME:
        net = add(s.net, ("to_t:abort", ""))  # the rollback's best-effort abort
        return s._replace(src="resumed", net=net if net is not None else s.net)
    kind = {Action.CONFIRM: "confirm", Action.ABORT: "abort", Action.ASK: "status"}[act]
    net = add(s.net, (f"to_t:{kind}", ""))
    if net is None:
        return None
    return s._replace(src="confirm_sent" if act is Action.CONFIRM else s.src, net=net)


def target_on(tgt: str, kind: str) -> tuple[str, TS | None]:
    """TargetSide's answer to one request: (new state, status answered; None: error)."""
    if kind == "restore":
        return ("fenced", TS.FENCED) if tgt == "prepared" else (tgt, None)
    if kind == "confirm":
        new = "running" if tgt == "fenced" else tgt
        return new, tgt_status(new)
    if kind == "abort":
        new = "gone" if tgt in ("prepared", "fenced") else tgt
        return new, tgt_status(new)
    return tgt, tgt_status(tgt)  # status


def successors(s: St) -> list[St]:
    out: list[St] = []
    if s.src == "frozen":
        net = add(s.net, ("to_t:restore", ""))
        assert net is not None
        out.append(s._replace(src="sent", net=net))
    for i, (kind, payload) in enumerate(s.net):
        rest = s.net[:i] + s.net[i + 1:]
        out.append(s._replace(net=rest))  # lost
        if kind.startswith("to_t:"):
            req = kind[5:]
            tgt, ans = target_on(s.tgt, req)
            reply = ("to_s:" + req, "error" if ans is None else str(ans))
            net = add(rest, reply)
            if net is not None:
                out.append(s._replace(tgt=tgt, net=net))
            out.append(s._replace(tgt=tgt, net=rest))  # acted, answer lost
        else:
            req = kind[5:]
            if req == "restore" and payload == "error":
                # an answered error: nothing runs there (source rolls back)
                if s.src == "sent":
                    n2 = add(rest, ("to_t:abort", ""))
                    out.append(s._replace(src="resumed", net=n2 if n2 is not None else rest))
                else:
                    out.append(s._replace(net=rest))
                continue
            nxt = source_act(s._replace(net=rest), TS(payload), False, False)
            if nxt is not None:
                out.append(nxt)
    # the source times out on silence (membership and lease either way)
    for down in (False, True):
        for lease_over in (False, True):
            nxt = source_act(s, None, down, lease_over)
            if nxt is not None and nxt != s:
                out.append(nxt)
    # target: fence deadline / lease expiry, or a restart (recovery unwinds both)
    if s.tgt in ("prepared", "fenced"):
        out.append(s._replace(tgt="gone"))
    # source restart: in-flight replies to it are lost, its journaled phase stays
    out.append(s._replace(net=tuple(m for m in s.net if not m[0].startswith("to_s:"))))
    return out


def explore() -> tuple[set[St], dict[St, list[St]]]:
    start = St("frozen", "prepared", ())
    seen = {start}
    edges: dict[St, list[St]] = {}
    q = deque([start])
    while q:
        s = q.popleft()
        nxt = successors(s)
        edges[s] = nxt
        for n in nxt:
            if n not in seen:
                seen.add(n)
                q.append(n)
    return seen, edges


def copies(s: St) -> int:
    return (s.src == "resumed") + (s.tgt == "running")


def test_no_interleaving_runs_two_copies():
    seen, _ = explore()
    assert len(seen) > 200  # the model is not trivially small
    bad = [s for s in seen if copies(s) > 1]
    assert not bad, bad[:5]


def test_every_settled_end_runs_exactly_one_copy():
    seen, _ = explore()
    ends = [s for s in seen if s.src in ("switched", "resumed") and not s.net
            and s.tgt in ("running", "gone")]
    assert ends
    for s in ends:
        assert copies(s) == 1, s
    # switched only ever follows a running target (never "none")
    assert all(s.tgt == "running" for s in seen if s.src == "switched")


def test_a_quiet_network_always_leads_to_exactly_one_copy():
    """Liveness: from every reachable state, some continuation ends with one copy."""
    seen, edges = explore()
    good = {s for s in seen if s.src in ("switched", "resumed") and copies(s) == 1
            and s.tgt in ("running", "gone")}
    changed = True
    while changed:
        changed = False
        for s in seen - good:
            if any(n in good for n in edges[s]):
                good.add(s)
                changed = True
    assert seen == good, [s for s in seen if s not in good][:5]


def test_decide_rules():
    assert decide(None, confirm_sent=True, target_down=True, lease_over=True) is Action.ASK
    assert decide(None, confirm_sent=False, target_down=True, lease_over=False) is Action.ASK
    assert decide(None, confirm_sent=False, target_down=False, lease_over=True) is Action.ASK
    assert decide(None, confirm_sent=False, target_down=True,
                  lease_over=True) is Action.RESUME
    assert decide(TS.FENCED, confirm_sent=True, target_down=False,
                  lease_over=True) is Action.CONFIRM
    assert decide(TS.UNKNOWN, confirm_sent=True, target_down=False,
                  lease_over=False) is Action.RESUME
    assert decide(TS.COMMITTED, confirm_sent=False, target_down=False,
                  lease_over=False) is Action.SWITCH


def test_the_checker_catches_a_broken_rule(monkeypatch):
    """The model can fail: a source that resumes on silence after a confirm would
    run two copies, and the check finds the interleaving."""
    real = decide

    def broken(status, *, confirm_sent, target_down, lease_over):
        if status is None and target_down and lease_over:
            return Action.RESUME
        return real(status, confirm_sent=confirm_sent, target_down=target_down,
                      lease_over=lease_over)

    monkeypatch.setitem(globals(), "decide", broken)
    seen, _ = explore()
    assert any(copies(s) > 1 for s in seen)
