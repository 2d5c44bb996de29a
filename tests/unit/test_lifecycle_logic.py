"""Lifecycle logic that needs no root: log reading, the default network, validation."""

from __future__ import annotations

import pytest

from cnvmd import lifecycle
from cnvmd.images import ImageStore
from cnvmd.lifecycle import Lifecycle, LocalNetns
from cnvmd.state import StateStore
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit


class NoRunc:
    """Fails the test if deploy gets as far as runc."""

    async def state(self, cid):
        return None

    async def run(self, *a, **kw):
        raise AssertionError("runc must not be reached")


@pytest.fixture
def life(tmp_path):
    store = ImageStore(tmp_path / "images")
    store.load()
    return Lifecycle(node="n1", state=StateStore(tmp_path / "state"), images=store,
                     runc=NoRunc(), cnvms_dir=tmp_path / "cnvms",
                     network=LocalNetns("lc-unit-"))


@pytest.mark.parametrize("kw,code,text", [
    ({"name": "A"}, ErrorCode.INVALID_ARGUMENT, "bad cnvm name"),
    ({"name": "a", "memory": "lots"}, ErrorCode.INVALID_ARGUMENT, "memory size"),
    ({"name": "a", "cpus": "-1"}, ErrorCode.INVALID_ARGUMENT, "CPU count"),
    ({"name": "a", "env": ["x"]}, ErrorCode.INVALID_ARGUMENT, "KEY=VALUE"),
    ({"name": "a"}, ErrorCode.NOT_FOUND, "unknown image"),
])
async def test_deploy_validates_before_touching_anything(life, tmp_path, kw, code, text):
    with pytest.raises(ProtoError) as e:
        await life.deploy(image="busybox", **{"name": "a", **kw})
    assert e.value.code == code and text in e.value.message
    assert list((tmp_path / "cnvms").iterdir()) == []
    assert not (tmp_path / "state" / "cnvms").exists()


async def test_unknown_cnvm(life):
    for coro in (life.stop("x"), life.start("x"), life.logs("x"), life.exec("x", ["true"])):
        with pytest.raises(ProtoError) as e:
            await coro
        assert e.value.code == ErrorCode.NOT_FOUND


async def test_local_netns_refuses_ip():
    with pytest.raises(ProtoError) as e:
        await LocalNetns("lc-unit-").attach("a", ip="10.0.0.2", record={})
    assert e.value.code == ErrorCode.UNAVAILABLE


async def test_net_errors_become_proto_errors():
    class NetErr(Exception):
        def __init__(self):
            self.code, self.message = ErrorCode.ALREADY_EXISTS, "taken"

    async def boom():
        raise NetErr()

    with pytest.raises(ProtoError) as e:
        await lifecycle._net_call(boom())
    assert e.value.code == ErrorCode.ALREADY_EXISTS and e.value.message == "taken"


def test_log_reading(tmp_path):
    from cnvmd import logstore

    def text(lines):
        return "".join(s for _, s in lines)

    log = tmp_path / "console.log"
    assert logstore.read_tail(log) == ([], 0, 0)
    log.write_text("a\nb\nc\n")
    assert text(logstore.read_tail(log, tail=2)[0]) == "b\nc\n"
    assert text(logstore.read_tail(log, tail=0)[0]) == ""
    lines, pos, _ = logstore.read_tail(log)
    assert text(lines) == "a\nb\nc\n" and pos == 6
    with log.open("a") as f:
        f.write("d\n")
    assert logstore.read_from(log, pos) == ([(None, "d\n")], 8)
    log.write_text("new\n")  # replaced (e.g. arrived by teleport): start over
    assert logstore.read_from(log, 8) == ([(None, "new\n")], 4)


def test_overlay_options_fit_the_new_mount_api(tmp_path):
    """One option string of the new mount API holds 255 bytes: short lists stay
    classic, long ones use lowerdir+= (kernel >= 6.8) or relative names."""
    from cnvmd import bundle

    dirs = []
    for i in range(5):
        d = tmp_path / "layers" / (f"{i}" + "b" * 63)
        d.mkdir(parents=True)
        dirs.append(d)
    paths = bundle.bundle_paths(tmp_path / "cnvms", "x")
    opts, cwd = bundle._overlay_options(paths, dirs[:1], kernel="6.12.0")
    assert opts.startswith(f"lowerdir={dirs[0]},upperdir=") and cwd is None
    opts, cwd = bundle._overlay_options(paths, dirs, kernel="6.12.0")
    assert cwd is None and opts.count("lowerdir+=") == 5
    assert opts.index(str(dirs[4])) < opts.index(str(dirs[0]))  # top layer first
    assert all(len(o) <= 255 for o in opts.split(","))
    opts, cwd = bundle._overlay_options(paths, dirs, kernel="5.10.0")
    assert cwd == str(tmp_path / "layers") and opts.startswith(f"lowerdir={dirs[4].name}:")
