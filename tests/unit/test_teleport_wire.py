"""The teleport contract refuses hostile peer payloads with invalid_argument (or
unsupported_version), before anything acts on them: path-like ids, '..', extra
fields, wrong types, out-of-range numbers, and anything that would carry runc
config (capabilities, host mounts, privileged settings) instead of a cnvm spec."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from cnvmd.migration import wire
from cnvmd.migration.journal import SourceJournal, load_source, save
from cnvmd.migration.undo import FaultInjected, UndoStack
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit

SID = wire.new_sid()
DG = "sha256:" + "a" * 64


def prepare() -> dict[str, Any]:
    return {"v": wire.TELEPORT_PROTOCOL, "sid": SID, "mode": "postcopy",
            "spec": {"name": "web", "image": "busybox:latest", "image_id": "b" * 64,
                     "hostname": "web", "cmd": ["sh", "-c", "sleep 1"],
                     "env": {"A": "1"}, "memory": 64 << 20, "cpus": 0.5,
                     "created_at": 1.0, "started_at": 2.0},
            "image": {"id": "b" * 64, "manifest": DG, "config": DG, "layers": [DG],
                      "name": "busybox:latest"},
            "net": {"ip": "10.100.101.5", "prefixlen": 24, "mac": "02:00:0a:64:65:05",
                    "gateway": None},
            "criu_version": "4.2.1", "memory": 1 << 20, "disk": 1 << 20, "lease": 30.0,
            "cpu_flags": ["sse2"]}


def test_a_good_prepare_round_trips():
    msg = wire.Prepare.from_wire(prepare())
    assert msg.spec.name == "web" and msg.mode == "postcopy"
    assert wire.Prepare.from_wire(msg.to_wire()) == msg


def test_restart_policy_travels_and_stays_compatible():
    """The policy and its count cross a teleport; a default one is not sent at all,
    so a target of the previous release (which refuses unknown fields) still takes
    a cnvm that has none."""
    rec = {"name": "web", "image": "busybox:latest", "image_id": "b" * 64,
           "hostname": "web", "restart": "on-failure:3", "restarts": 2}
    spec = wire.CnvmSpec.from_record(rec)
    assert (spec.restart, spec.restarts) == ("on-failure:3", 2)
    assert wire.CnvmSpec.from_wire(spec.to_wire()) == spec
    plain = wire.CnvmSpec.from_record({**rec, "restart": "no", "restarts": 0})
    assert "restart" not in plain.to_wire() and "restarts" not in plain.to_wire()
    old = wire.CnvmSpec.from_wire(prepare()["spec"])  # from a source without the field
    assert (old.restart, old.restarts) == ("no", 0)
    for policy in ("always", "on-failure", "on-failure:1000"):
        assert wire.CnvmSpec.from_record({**rec, "restart": policy}).restart == policy


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(prepare())
    cur: Any = d
    for k in path[:-1]:
        cur = cur[k]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


HOSTILE = [
    (["sid"], "/etc"), (["sid"], "../../x"), (["sid"], "t" + "0" * 20 + "\n"),
    (["sid"], 12), (["sid"], KeyError),
    (["spec", "name"], "../web"), (["spec", "name"], "/abs"), (["spec", "name"], "web\n"),
    (["spec", "name"], "a" * 64), (["spec", "name"], ["web"]),
    (["spec", "image_id"], "../" + "b" * 61),
    (["spec", "cmd"], ["sh", "a\0b"]), (["spec", "cmd"], "sh"),
    (["spec", "cmd"], ["x"] * 10_000), (["spec", "cmd"], ["x" * 100_000]),
    (["spec", "env"], {"A B": "1"}), (["spec", "env"], {"A": 1}),
    (["spec", "memory"], -1), (["spec", "memory"], True), (["spec", "memory"], 1 << 60),
    (["spec", "capabilities"], ["CAP_SYS_ADMIN"]),
    (["spec", "mounts"], [{"source": "/", "destination": "/host", "type": "bind"}]),
    (["spec", "privileged"], True),
    (["config"], {"process": {"capabilities": {"bounding": ["CAP_SYS_ADMIN"]}}}),
    (["record"], {"bundle": "/etc"}),
    (["image", "layers"], ["sha256:../../etc/passwd"]), (["image", "layers"], [DG] * 1000),
    (["net", "ip"], "10.0.0.300"), (["net", "ip"], "::1"), (["net", "mac"], "zz"),
    (["net", "prefixlen"], 64), (["mode"], "teleport-everything"), (["lease"], 1e9),
    (["lease"], "30"), (["cpu_flags"], ["sse2; rm -rf"]), (["criu_version"], "4.2 && x"),
    (["spec", "restart"], "sometimes"), (["spec", "restart"], "on-failure:0"),
    (["spec", "restart"], "on-failure:-1"), (["spec", "restart"], "always\n"),
    (["spec", "restart"], 3), (["spec", "restarts"], -1), (["spec", "restarts"], "2"),
    (["spec", "restarts"], 1 << 40),
]


@pytest.mark.parametrize(("path", "value"), HOSTILE,
                         ids=[".".join(map(str, p)) + "=" + repr(v)[:20] for p, v in HOSTILE])
def test_hostile_prepare_is_invalid_argument(path: list[Any], value: Any):
    with pytest.raises(ProtoError) as ei:
        wire.Prepare.from_wire(mutate(path, value))
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT, ei.value


def test_another_protocol_version_is_refused_clearly():
    for v in (1, 2, 4, None, "3"):  # 2: before fenced switchovers (issue 18)
        with pytest.raises(ProtoError) as ei:
            wire.Prepare.from_wire(mutate(["v"], v))
        assert ei.value.code == ErrorCode.UNSUPPORTED_VERSION
        assert "teleport protocol" in ei.value.message


@pytest.mark.parametrize("raw", [
    {"v": wire.TELEPORT_PROTOCOL, "sid": SID, "what": "upper", "offset": 0, "extra": 1},
    {"v": wire.TELEPORT_PROTOCOL, "sid": SID, "what": "../upper"},
    {"v": wire.TELEPORT_PROTOCOL, "sid": SID, "what": "blob"},  # a blob needs its digest
    {"v": wire.TELEPORT_PROTOCOL, "sid": SID, "what": "blob", "digest": "sha256:/etc/shadow"},
    {"v": wire.TELEPORT_PROTOCOL, "sid": SID, "what": "log", "offset": 1 << 41},
    {"v": wire.TELEPORT_PROTOCOL, "sid": SID, "what": "log", "offset": -1},
    {"v": wire.TELEPORT_PROTOCOL, "sid": "/var/lib/cnvm", "what": "upper"},
    [], "x",
])
def test_hostile_data_headers(raw: Any):
    with pytest.raises(ProtoError) as ei:
        wire.DataHeader.from_wire(raw)
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT


def test_restore_and_pagemaps_are_bounded():
    ok = wire.Restore(SID, (wire.Neighbor("10.1.1.1", "02:00:00:00:00:01"),),
                      (("02:00:00:00:00:01", "198.18.0.2"),), lazy=True)
    assert wire.Restore.from_wire(ok.to_wire()) == ok
    bad = ok.to_wire() | {"vteps": {"02:00:00:00:00:01": "evil.example"}}
    with pytest.raises(ProtoError, match="IPv4"):
        wire.Restore.from_wire(bad)
    with pytest.raises(ProtoError, match="bad file name"):
        wire.pagemap_files_from_wire({"files": {"../pagemap-1.img": b""}})
    with pytest.raises(ProtoError, match="larger"):
        wire.pagemap_files_from_wire({"files": {"pagemap-1.img": b"x" * (65 << 20)}})
    with pytest.raises(ProtoError) as ei:
        wire.Commit.from_wire({"v": wire.TELEPORT_PROTOCOL, "sid": SID, "reports": [{"cnvm": 1}]})
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT


def test_delivery_is_a_field_not_text():
    sent = ProtoError(ErrorCode.UNAVAILABLE, "node2 unreachable", {"delivery": "not_sent"})
    lost = ProtoError(ErrorCode.UNAVAILABLE, "whatever", {"delivery": "unknown"})
    assert wire.delivery(sent) is wire.Delivery.NOT_SENT
    assert wire.delivery(lost) is wire.Delivery.UNKNOWN
    assert wire.delivery(ProtoError(ErrorCode.FAILED, "x")) is wire.Delivery.ANSWERED


async def test_undo_stack_unwinds_in_reverse_and_journals_first(tmp_path):
    done: list[str] = []
    journaled: list[list[str]] = []

    async def jot(effects: list[str]) -> None:
        journaled.append(list(effects))

    st = UndoStack(jot, fail_at="b")

    def undo(x: str) -> Any:
        async def f() -> None:
            done.append(x)
            if x == "b":
                raise RuntimeError("undo of b breaks")
        return f

    await st.push("a", undo("a"))
    st.done("a")
    await st.push("b", undo("b"))
    with pytest.raises(FaultInjected):
        st.done("b")
    await st.push("c", undo("c"))
    assert journaled[-1] == ["a", "b", "c"]
    out = await st.unwind()
    assert done == ["c", "b", "a"]  # a failing undo does not stop the rest
    assert out[0] == "c" and out[1].startswith("b (failed") and out[2] == "a"
    assert journaled[-1] == []


def test_journal_is_versioned(tmp_path):
    j = SourceJournal(sid=SID, name="web", target="node2", effects=["paused"])
    save(tmp_path, j)
    assert load_source(tmp_path).effects == ["paused"]
    (tmp_path / "session.json").write_text(json.dumps({"schema": 99, "sid": SID,
                                                        "name": "web"}))
    from cnvmd.migration.journal import JournalError

    with pytest.raises(JournalError, match="schema 99"):
        load_source(tmp_path)


def test_status_questions_and_relays_are_validated():
    v = wire.TELEPORT_PROTOCOL
    assert wire.StatusQuery.from_wire({"v": v, "sid": SID}) == wire.StatusQuery(SID)
    q = wire.StatusQuery(SID, on_behalf="node1")
    assert wire.StatusQuery.from_wire(q.to_wire()) == q
    r = wire.RelayStatus(SID, "node2")
    assert wire.RelayStatus.from_wire(r.to_wire()) == r
    for bad in ({"v": v, "sid": SID, "on_behalf": "../etc"},
                {"v": v, "sid": SID, "on_behalf": "n" * 64},
                {"v": v, "sid": "/var/lib/cnvm"},
                {"v": v, "sid": SID, "extra": 1}):
        with pytest.raises(ProtoError) as e:
            wire.StatusQuery.from_wire(bad)
        assert e.value.code is ErrorCode.INVALID_ARGUMENT
    for bad in ({"v": v, "sid": SID}, {"v": v, "sid": SID, "target": "a/b"},
                {"v": v, "sid": SID, "target": ["node2"]}):
        with pytest.raises(ProtoError) as e:
            wire.RelayStatus.from_wire(bad)
        assert e.value.code is ErrorCode.INVALID_ARGUMENT


def test_the_source_cgroup_is_a_cnvm_cgroup_or_refused():
    from cnvmd.migration.target import _arriving_cgroup

    ok = {**prepare(), "cgroup": "/cnvm/node1/web"}
    assert wire.Prepare.from_wire(ok).cgroup == "/cnvm/node1/web"
    assert wire.Prepare.from_wire(prepare()).cgroup is None  # older sources send none
    for bad in ("/cnvm/../etc", "/cnvm/node1/./web", "cnvm/node1/web", "/", "/a//b",
                "/cnvm/node1/web\n", 5, "/" + "a/" * 9 + "b"):
        with pytest.raises(ProtoError) as ei:
            wire.Prepare.from_wire({**prepare(), "cgroup": bad})
        assert ei.value.code == ErrorCode.INVALID_ARGUMENT, bad
    assert _arriving_cgroup("/cnvm/node1/web", "/cnvm", "web") == "/cnvm/node1/web"
    assert _arriving_cgroup(None, "/cnvm", "web") is None
    for bad in ("/cnvm/node1/other", "/system.slice/sshd.service", "/cnvm/web",
                "/cnvm/a/b/web", "/cnvm-x/node1/web"):
        with pytest.raises(ProtoError) as ei:
            _arriving_cgroup(bad, "/cnvm", "web")
        assert ei.value.code == ErrorCode.INVALID_ARGUMENT, bad


def test_task_cgroup_reads_v2_and_the_v1_freezer(tmp_path, monkeypatch):
    from cnvmd.migration import source

    real_open = open

    def fake_open(path, *a, **k):
        if str(path) == "/proc/1/cgroup":
            return real_open(tmp_path / "cg", *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    (tmp_path / "cg").write_text("0::/cnvm/lv1/web\n")
    assert source.task_cgroup(1) == "/cnvm/lv1/web"
    (tmp_path / "cg").write_text("12:memory:/cnvm/n1/web\n5:freezer:/cnvm/n2/web\n"
                                 "1:name=systemd:/system.slice/x\n")
    assert source.task_cgroup(1) == "/cnvm/n2/web"
    (tmp_path / "cg").write_text("0::/weird path/x\n")
    assert source.task_cgroup(1) is None
