"""`cnvmctl lab …` end to end: the acceptance of the lab part of the daemon issue."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cnvmd import netlink
from cnvmlab import paths as labpaths
from cnvmlab.lab import Lab
from tests import imagebuild

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LAB = "lk"


def cnvmctl(*args: str, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnvmctl", *args], capture_output=True,
                          text=True, timeout=120, check=check, input=input)


@pytest.fixture
async def clean_lab():
    lab = Lab(LAB)
    if lab.exists():
        await lab.down()
    try:
        yield lab
    finally:
        await lab.down()


async def test_lab_up_status_exec_down(clean_lab, tmp_path):
    up = cnvmctl("lab", "up", "--name", LAB, "--nodes", "3", "--json")
    hosts = {h["host"]: h for h in json.loads(up.stdout)["hosts"]}
    assert all(hosts[f"node{k}"]["daemon_alive"] for k in (1, 2, 3))

    st = json.loads(cnvmctl("--lab", LAB, "--node", "node2", "--json", "status").stdout)
    assert st["node"] == "node2"
    assert st["versions"]["criu"] >= "4.2"

    # lab up formed a cluster: node3 sees all three members alive
    nodes = json.loads(cnvmctl("--lab", LAB, "--node", "node3", "--json", "nodes").stdout)
    assert {n["name"]: n["state"] for n in nodes["nodes"]} == {
        "node1": "alive", "node2": "alive", "node3": "alive"}
    # ... and put the client host on the overlay: it reaches node3's overlay address
    host = json.loads(cnvmctl("--lab", LAB, "--node", "node3", "--json", "net", "host").stdout)
    ping = cnvmctl("lab", "exec", "--name", LAB, "client", "--", "busybox", "ping", "-c1",
                   "-W2", host["expose_ip"], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # the root namespace never holds overlay addresses
    assert not [a for a in await netlink.addrs() if a.startswith("10.100.101.")]

    # the client host reaches node3 over the lab's underlay, and exit codes pass through
    ok = cnvmctl("lab", "exec", "--name", LAB, "client", "--",
                 "busybox", "ping", "-c1", "-W2", labpaths.underlay_address(3), check=False)
    assert ok.returncode == 0, ok.stderr
    assert cnvmctl("lab", "exec", "--name", LAB, "node1", "--", "false",
                   check=False).returncode == 1

    # a cnvm through the CLI: exec passes stdin (-i) and the exit code through
    layout = imagebuild.build_busybox_layout(tmp_path / "busybox-oci")
    on2 = ("--lab", LAB, "--node", "node2")
    cnvmctl(*on2, "images", "import", str(layout.path), "--name", "busybox")
    cnvmctl(*on2, "deploy", "c1", "--image", "busybox")
    r = cnvmctl(*on2, "exec", "-i", "c1", "--", "sh", "-c", "tr a-z A-Z; exit 3",
                check=False, input="hello\n")
    assert r.returncode == 3 and r.stdout == "HELLO\n", (r.returncode, r.stdout, r.stderr)
    r = cnvmctl(*on2, "exec", "c1", "--", "cat", check=False)  # without -i: /dev/null
    assert r.returncode == 0 and r.stdout == ""
    cnvmctl(*on2, "rm", "--force", "c1")

    again = cnvmctl("lab", "up", "--name", LAB, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr

    cnvmctl("lab", "down", "--name", LAB)
    assert not netlink.netns_list(f"{LAB}-")
    assert not (labpaths.RUN_BASE / LAB).exists()
    assert not (labpaths.STATE_BASE / LAB).exists()
    gone = cnvmctl("--lab", LAB, "--node", "node2", "status", check=False)
    assert gone.returncode == 3


def test_lab_usage_errors():
    bad = cnvmctl("lab", "up", "--name", "Bad_Name", check=False)
    assert bad.returncode == 2 and "bad lab name" in bad.stderr
    missing = cnvmctl("lab", "status", "--name", "nosuch", check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
