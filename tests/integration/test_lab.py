"""The lab harness: hosts reach each other only over the underlay, and down() leaves nothing."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from cnvmd import netlink, proc
from cnvmd.runtime import mounts_under
from cnvmlab import paths as labpaths
from cnvmlab.lab import Lab

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LAB = "lb"
LAB2 = "lb2"


def assert_nothing_left(name: str, pids: list[int] = ()) -> None:
    """No namespace, runc state, mount, directory or recorded process of the lab remains."""
    assert netlink.netns_list(f"{name}-") == [], "namespaces left"
    run_dir = labpaths.RUN_BASE / name
    assert not run_dir.exists(), f"{run_dir} left (runc roots, state file)"
    assert not (labpaths.STATE_BASE / name).exists()
    assert mounts_under(run_dir) == [] and mounts_under(labpaths.STATE_BASE / name) == []
    with open("/proc/self/mountinfo") as f:
        assert f"/run/netns/{name}-" not in f.read()
    for pid in pids:
        assert not _running(pid), f"process {pid} left"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def ping(lab: Lab, host: str, ip: str) -> bool:
    res = await lab.exec(host, ["busybox", "ping", "-c", "1", "-W", "2", ip], check=False,
                         timeout=10)
    return res.returncode == 0


async def test_up_reachability_down(lab_factory):
    lab = await lab_factory(LAB, nodes=3)
    assert set(netlink.netns_list(f"{LAB}-")) == {
        "lb-ul", "lb-client", "lb-node1", "lb-node2", "lb-node3"}
    assert "198.18.0.12/24" in await netlink.addrs(lab.netns("node2"), "ul0")
    assert "198.18.0.2/24" in await netlink.addrs(lab.netns("client"))
    # the root namespace holds no underlay address
    assert not any(a.startswith("198.18.") for a in await netlink.addrs(None))
    for ip in ("198.18.0.11", "198.18.0.12", "198.18.0.13"):
        assert await ping(lab, "client", ip), f"client cannot reach {ip}"
    assert await ping(lab, "node3", "198.18.0.11")
    assert await ping(lab, "node1", "127.0.0.1")  # loopback up
    st = {s.host: s for s in lab.status()}
    assert st["node1"].exists and st["node1"].underlay == "198.18.0.11"
    await lab.down()
    assert_nothing_left(LAB)
    await lab.down()  # idempotent


async def test_two_labs_side_by_side(lab_factory):
    a = await lab_factory(LAB, nodes=2)
    b = await lab_factory(LAB2, nodes=2)
    # same addresses, separate worlds
    assert await ping(a, "client", "198.18.0.12")
    assert await ping(b, "client", "198.18.0.12")
    await b.down()
    assert_nothing_left(LAB2)
    assert netlink.netns_exists("lb-node2")
    assert await ping(a, "node1", "198.18.0.12")


async def test_down_removes_containers_processes_and_mounts(lab_factory, busybox_bundle):
    lab = await lab_factory(LAB, nodes=2)
    runc = lab.runc("node1")
    bundle = busybox_bundle(["sleep", "1000"], netns_path=str(netlink.netns_path("lb-node1")))
    st = await runc.run("c1", bundle, work_dir=bundle.parent / "work")
    assert st.status == "running"
    sleeper = await lab.spawn("client", ["sleep", "1000"])
    # an unrecorded stray process living in a lab namespace, and a mount under the lab dir
    stray = await asyncio.create_subprocess_exec(
        "nsenter", "--net=/run/netns/lb-node2", "sleep", "1000", start_new_session=True)
    mnt = lab.run_dir / "node1" / "m"
    mnt.mkdir(parents=True)
    await proc.run(["mount", "-t", "tmpfs", "none", str(mnt)])
    try:
        await lab.down()
        await asyncio.wait_for(asyncio.gather(sleeper.wait(), stray.wait()), 5)
        assert_nothing_left(LAB, [st.pid, sleeper.pid, stray.pid])
        assert not (lab.run_dir / "node1" / "runc" / "c1").exists()
    finally:
        if stray.returncode is None:
            stray.kill()
            await stray.wait()


async def test_down_from_a_fresh_process_after_a_crash(tmp_path: Path):
    """A process builds the lab, starts a client process, and is killed -9; we clean up."""
    lab = Lab(LAB, nodes=2)
    if lab.exists():
        await lab.down()
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from cnvmlab.lab import Lab
        async def main():
            lab = Lab({LAB!r}, nodes=2)
            await lab.up(start_daemons=False)
            p = await lab.spawn("node1", ["sleep", "1000"], stdout=asyncio.subprocess.DEVNULL,
                                  stderr=asyncio.subprocess.DEVNULL)
            print(p.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    try:
        res = await proc.run([sys.executable, "-c", script], cwd=str(REPO), check=False,
                             timeout=60)
        assert res.returncode == -9, res.stderr
        child = int(res.stdout.split()[0])
        assert _running(child)
        assert netlink.netns_exists("lb-node1")
        fresh = Lab(LAB, nodes=2)
        assert fresh.exists()
        await fresh.down()
        await asyncio.sleep(0.05)
        assert_nothing_left(LAB, [child])
    finally:
        await Lab(LAB, nodes=2).down()


async def test_up_refuses_existing_lab_and_keeps_it(lab_factory):
    lab = await lab_factory(LAB, nodes=1)
    with pytest.raises(Exception, match="already exists"):
        await Lab(LAB, nodes=1).up(start_daemons=False)
    assert netlink.netns_exists("lb-node1")
    assert await ping(lab, "client", "198.18.0.11")


@pytest.mark.slow
async def test_daemons_start_per_node_and_stop(lab_factory):
    if not (REPO / "cnvmd" / "__main__.py").exists():
        pytest.skip("cnvmd has no __main__ yet")
    lab = await lab_factory(LAB, nodes=2, start_daemons=True)
    st = {s.host: s for s in lab.status()}
    for node in ("node1", "node2"):
        assert st[node].daemon_alive and st[node].socket, st[node]
        # the daemon lives in its node's namespace
        assert st[node].daemon_pid in netlink.pids_in_netns([lab.netns(node)])
    pids = [st["node1"].daemon_pid, st["node2"].daemon_pid]
    await lab.down()
    assert_nothing_left(LAB, pids)
