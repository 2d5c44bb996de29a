"""VM lab lane: build the guest image, boot two guests, prove the pre-copy floor.

The teleport lane's precopy/hybrid tests build on exactly these facts: guests boot
with a soft-dirty kernel, reach each other over the private link only, CRIU
pre-dumps with shrinking rounds, and the project installs offline from the tree.
Run: ``.venv/bin/pytest -m vmlab -s tests/vmlab`` (root; ~5 min cached, +3 min cold).
Slow lane only (``CI`` or ``CNVM_SLOW``): the three-guest teleport lane
(test_vm_teleport.py) boots, installs and pre-dumps on the same kernels in every
``make test``; this two-guest check of the bare facts keeps `make test` under 30 min.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from . import smoke
from .lab import VMLab

pytestmark = [pytest.mark.vmlab, pytest.mark.slow,
              pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("CNVM_SLOW")),
                                 reason="slow lane: set CI or CNVM_SLOW")]


@pytest.fixture(scope="module")
def lab(vmlab_boot) -> VMLab:
    return vmlab_boot(n=2, mem_mib=1024)


def test_guests_boot_on_private_link(lab: VMLab) -> None:
    print(json.dumps({"timings": lab.timings, "boot_s": {g.name: g.boot_s for g in lab.guests}}))
    for i, g in enumerate(lab.guests):
        out = lab.ssh(i, "hostname; ip -4 -o addr show dev lv0; ip route").stdout
        assert out.splitlines()[0] == g.name
        assert f"{g.ip}/24" in out
        # restrict=on plus no default route: the guest has no way out but hostfwd.
        assert "default" not in out
    peer = lab.guests[1].ip
    r = lab.ssh(0, f"ping -c 3 -i 0.3 -W 2 {peer}")
    assert " 0% packet loss" in r.stdout


def test_kernel_tracks_dirty_memory(lab: VMLab) -> None:
    outs = lab.each(lambda i: smoke.criu_check(lab, i))
    for out in outs:
        print(out)
        assert "CONFIG_MEM_SOFT_DIRTY=y" in out
        assert "CONFIG_USERFAULTFD=y" in out
        assert "is supported" in out or "Looks good" in out


def test_predump_rounds_shrink(lab: VMLab) -> None:
    rep = smoke.predump_rounds(lab, 0, mib=128, dirty_mib_per_s=8.0)
    print(json.dumps(rep))
    kinds = [r["kind"] for r in rep["rounds"]]
    assert kinds == ["pre-dump", "pre-dump", "dump"]
    assert rep["rounds"][0]["pages_bytes"] >= 128 << 20  # the whole working set first
    assert smoke.rounds_shrink(rep), [r["pages_bytes"] for r in rep["rounds"]]
    assert rep["restored_alive"]
    assert rep["counter_after_restore"] > rep["counter_at_dump"] > 0


def test_project_installs_offline(lab: VMLab) -> None:
    took = lab.install_project()
    print(json.dumps({"install_s": took}))
    r = lab.ssh(1, "/opt/cnvm/venv/bin/python -c "
                   "'import asyncssh, msgpack, uvloop, pyroute2, aiofiles, rich, cnvmd, proto; "
                   "print(pyroute2.__version__)'")
    assert r.stdout.strip()
    if not lab.has_daemon():
        pytest.skip("cnvmd/__main__.py not in the tree yet: daemon start not tested")
    status = lab.start_daemons()
    print(json.dumps(status))
    assert set(status) == {g.name for g in lab.guests}
    for out in status.values():
        assert re.search(r"dirty tracking.*\byes\b", out), out
    nodes = lab.form_cluster()
    print(nodes)
    for g in lab.guests:
        assert g.name in nodes and g.ip in nodes


def test_teardown_leaves_nothing(lab: VMLab) -> None:
    pids = lab.pids()
    overlays = [g.overlay for g in lab.guests]
    workdir = lab.workdir
    assert pids and all(_alive(p) for p in pids)
    lab.down()
    assert not [p for p in pids if _alive(p)], "qemu left running"
    assert not any(o.exists() for o in overlays)
    assert workdir is None or not Path(workdir).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (it is reaped by whoever owns it).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
