"""VM lab lane, teleport acceptance in the modes that need soft-dirty (issue 8 §2).

Two QEMU guests (stock trixie kernels: soft-dirty and userfaultfd) run cnvmd and
form a cluster over their private link ``lv0``. A busybox cnvm serves the TCP
counter (one in-memory counter per connection) and keeps tens of MiB of *private*
memory that it slowly dirties (a static C program added to the image; CRIU does
not pre-dump shared anonymous memory). A client process on lv2, on lv2's own overlay address
(``cnvmctl net host``), keeps ONE connection and asks for the next number every 50 ms.

The cnvm goes lv1 -> lv2 with ``--mode precopy``, then lv2 -> lv1 with ``--mode
hybrid``: connection kept, counter never resets, file and IP intact, report mode
as asked with >= 2 pre-dump rounds of shrinking size. One boot for everything: a
boot costs 2-3 minutes of TCG. Traffic stays on the guests' private link (VXLAN
over lv0) and loopback. Run: ``.venv/bin/pytest -m vmlab -s tests/vmlab/test_vm_teleport.py``.
"""

from __future__ import annotations

import io
import itertools
import json
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import imagebuild
from tests.teleportlab import CLIENT

from .lab import DAEMON_SOCKET, GUEST_SRC, GUEST_VENV, VMLab

pytestmark = [pytest.mark.vmlab, pytest.mark.slow]

NAME = "lwtp"
DIRTY_MIB = 24  # private memory the cnvm's dirtier holds
DIRTY_KIB_PER_S = 400  # pages it rewrites per second, a window sliding over the set;
# well below the ~1-5 MB/s a round moves between TCG guests over SSH, so rounds shrink

# The dirtier: a static C program (busybox awk re-dirtied its whole heap every round,
# measured). Fork-free on purpose: a task exiting while CRIU seizes the tree fails
# that pre-dump (the engine retries, but the lane should not depend on it).
DIRTY_C = r"""
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]) << 20, per_tick = atol(argv[2]) * 1024 / 10 / 4096, pos = 0;
    volatile char *m = malloc(n);
    struct timespec t = {0, 100000000};
    for (long i = 0; i < n; i += 4096) m[i] = 1;
    for (unsigned char c = 0;; c++) {
        for (long j = 0; j < per_tick; j++) { m[pos] = c; pos = (pos + 4096) % n; }
        nanosleep(&t, 0);
    }
}
"""
SERVICE = (f"/bin/lwdirty {DIRTY_MIB} {DIRTY_KIB_PER_S} </dev/null >/dev/null 2>&1 &\n"
           "exec /bin/counter\n")


def build_image(dest: Path) -> Path:
    """The busybox test image plus a third layer holding /bin/lwdirty (gcc -static).

    Three layers on purpose: their absolute lowerdir list is longer than one option
    string of the new mount API that Debian 13's mount(8) uses (cnvmd.bundle)."""
    src = dest.parent / "lwdirty.c"
    src.write_text(DIRTY_C)
    binary = dest.parent / "lwdirty"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(src)], check=True)
    raw = imagebuild.busybox_layers()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = binary.read_bytes()
        info = tarfile.TarInfo("bin/lwdirty")
        info.size, info.mode, info.mtime = len(data), 0o755, imagebuild.MTIME
        tar.addfile(info, io.BytesIO(data))
    raw.append(buf.getvalue())
    diff_ids = [imagebuild._digest(x) for x in raw]
    dest.mkdir(parents=True)
    descs = [{"mediaType": imagebuild.MT_LAYER, "digest": imagebuild._put(dest, x),
              "size": len(x)} for x in raw]
    cb = json.dumps(imagebuild.image_config(diff_ids), sort_keys=True).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": imagebuild.MT_MANIFEST,
                           "config": {"mediaType": imagebuild.MT_CONFIG,
                                      "digest": imagebuild._put(dest, cb), "size": len(cb)},
                           "layers": descs}, sort_keys=True).encode()
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": imagebuild.MT_MANIFEST,
                            "digest": imagebuild._put(dest, manifest), "size": len(manifest),
                            "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dest



class Client:
    """The client process (ssh -> python on lv2); replies read in a thread."""

    def __init__(self, lab: VMLab, i: int, ip: str) -> None:
        cmd = f"python3 -u -c {shlex.quote(CLIENT)} {ip} 7000 0.05 60"
        self.p = lab.popen(i, cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        self.replies: list[tuple[float, int, float]] = []
        self.port: int | None = None
        self.eof = False
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            parts = raw.split()
            if not parts:
                continue
            if parts[0] == "port":
                self.port = int(parts[1])
            elif parts[0] == "EOF":
                self.eof = True
            else:
                self.replies.append((float(parts[0]), int(parts[1]), float(parts[2])))

    @property
    def last(self) -> int:
        return self.replies[-1][1] if self.replies else 0

    def wait_more(self, k: int, timeout: float = 60) -> None:
        want = self.last + k
        end = time.monotonic() + timeout
        while self.last < want:
            if self.p.poll() is not None or self.eof or time.monotonic() > end:
                err = ""
                if self.p.poll() is not None and self.p.stderr is not None:
                    err = self.p.stderr.read()
                raise AssertionError(f"client stuck at {self.last}, wanted {want}; "
                                     f"eof={self.eof} rc={self.p.poll()} {err}")
            time.sleep(0.05)

    def check_sequence(self) -> None:
        ns = [n for _, n, _ in self.replies]
        assert ns == list(range(1, len(ns) + 1)), "counter reset, skipped or repeated"

    def max_stall(self, since: float) -> float:
        """Longest gap between consecutive replies at or after guest time `since`."""
        r = [x for x in self.replies if x[0] >= since]
        return max((b[0] - a[0] for a, b in itertools.pairwise(r)), default=0.0)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=10)


def _json(r: subprocess.CompletedProcess) -> Any:
    return json.loads(r.stdout)


def _guest_now(lab: VMLab, i: int) -> float:
    """The guest's monotonic clock (the client stamps replies with it)."""
    return float(lab.ssh(i, "python3 -c 'import time; print(time.monotonic())'").stdout)


@pytest.fixture(scope="module")
def cluster(vmlab_boot) -> Iterator[VMLab]:
    """Two guests with the project installed, daemons up, cluster formed, busybox
    imported on lv1 only (the first teleport ships its layers by digest)."""
    if shutil.which("gcc") is None:
        pytest.skip("vmlab teleport: gcc (with static libc) builds the dirtier")
    lab = vmlab_boot(n=2, mem_mib=1024)
    t = time.monotonic()
    try:
        lab.timings["install_s"] = max(lab.install_project().values())
        lab.start_daemons()
        lab.form_cluster()
        with tempfile.TemporaryDirectory(prefix="lw-busybox-") as tmp:
            layout = build_image(Path(tmp) / "busybox-oci")
            lab.copy_to(0, layout, "/var/tmp/lw-busybox-oci")
        lab.cnvmctl(0, "images import /var/tmp/lw-busybox-oci --name busybox")
        lab.timings["setup_s"] = round(time.monotonic() - t, 1)
        yield lab
    except BaseException:
        for i in range(lab.n):
            r = lab.ssh(i, "journalctl -u lv-cnvmd --no-pager | tail -40", check=False)
            print(f"--- {lab.guests[i].name} cnvmd journal\n{r.stdout}")
        raise
    finally:
        lab.down()


@pytest.fixture(scope="module")
def served(cluster: VMLab) -> Iterator[tuple[VMLab, Client, str]]:
    """The cnvm on lv1 with its file written, and the client connected from lv2."""
    lab = cluster
    lab.cnvmctl(0, f"deploy {NAME} --image busybox --memory 256M -- sh -c "
                   f"{shlex.quote(SERVICE)}")
    ip = _json(lab.cnvmctl(0, f"--json inspect {NAME}"))["ip"]
    lab.cnvmctl(0, f"exec {NAME} -- sh -c 'echo kept > /data.txt'")
    # The client: a process on lv2, on lv2's overlay address (cnvm0) — no netns needed.
    client_ip = _json(lab.cnvmctl(1, "--json net host"))["expose_ip"]
    c = Client(lab, 1, ip)
    try:
        try:
            c.wait_more(20, timeout=120)
        except AssertionError:
            _dump_overlay(lab)
            raise
        # the dirtier holds its memory by now
        rss = lab.cnvmctl(0, f"exec {NAME} -- sh -c "
                             "'grep -h VmRSS /proc/[0-9]*/status'").stdout
        print(f"\ncnvm {NAME} at {ip}; client from {client_ip}; RSS per process:\n{rss}")
        yield lab, c, ip
    finally:
        c.close()


def _dump_overlay(lab: VMLab) -> None:
    """What each guest's overlay looks like (printed when the client cannot connect)."""
    cmd = ("ip -br link; ip -br addr; bridge fdb show; ip neigh; "
           "for n in $(ip netns list | cut -d' ' -f1); do echo \"== netns $n\"; "
           "ip -n $n -br addr; ip -n $n neigh; done; "
           "journalctl -u lv-cnvmd --no-pager | tail -40")
    for i, g in enumerate(lab.guests):
        r = lab.ssh(i, cmd, check=False)
        print(f"--- {g.name} overlay\n{r.stdout}{r.stderr}")


def _teleport(lab: VMLab, c: Client, ip: str, src: int, dst: int, mode: str) -> dict:
    since = _guest_now(lab, 1)
    t = time.monotonic()
    r = lab.cnvmctl(src, f"--json teleport {NAME} {lab.guests[dst].name} --mode {mode}",
                    check=False, timeout=900)
    took = time.monotonic() - t
    if r.returncode != 0:
        raise AssertionError(f"teleport {mode} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    rep = json.loads(r.stdout)
    c.wait_more(30, timeout=120)
    stall = c.max_stall(since)
    pre = [x for x in rep["rounds"] if x["kind"] == "predump"]
    print(f"\n{mode} {lab.guests[src].name}->{lab.guests[dst].name}: wall {took:.1f} s, "
          f"frozen {rep['frozen_seconds'] * 1000:.0f} ms, total {rep['total_seconds']:.2f} s, "
          f"client stall {stall * 1000:.0f} ms, wire {rep['wire_bytes']} B\n  rounds: "
          + ", ".join(f"{x['kind']} {x['bytes'] / 2**20:.2f} MiB/{x['seconds']:.2f} s"
                      for x in rep["rounds"])
          + f"\n  phases: {json.dumps(rep['phases'])}")
    rep["_client_stall"] = stall
    assert rep["ok"] and rep["mode"] == mode and rep["target"] == lab.guests[dst].name, rep
    assert len(pre) >= 2, rep["rounds"]
    assert pre[0]["bytes"] >= DIRTY_MIB << 20, pre  # round 1 carries the whole set
    assert pre[1]["bytes"] < pre[0]["bytes"], [x["bytes"] for x in pre]
    _assert_on(lab, c, ip, dst)
    return rep


def _assert_on(lab: VMLab, c: Client, ip: str, node: int) -> None:
    """Runs on `node` only, same IP and file, connection and counter go on."""
    assert c.port is not None and not c.eof
    c.check_sequence()
    for i in range(lab.n):
        names = [x["name"] for x in _json(lab.cnvmctl(i, "--json ls --local"))]
        assert (NAME in names) == (i == node), (lab.guests[i].name, names)
    info = _json(lab.cnvmctl(node, f"--json inspect {NAME}"))
    assert info["state"] == "running" and info["ip"] == ip, info
    assert lab.cnvmctl(node, f"exec {NAME} -- cat /data.txt").stdout.strip() == "kept"
    addrs = lab.cnvmctl(node, f"exec {NAME} -- ip -4 -o addr show dev eth0").stdout
    assert f"{ip}/" in addrs, addrs


def test_overlay_uses_private_link(served: tuple[VMLab, Client, str]) -> None:
    """The VXLAN's local address is the guest's lv0 address (not the ssh NIC's), and
    the client's connection crosses it (cnvm on lv1, client on lv2)."""
    lab, c, _ip = served
    for i, g in enumerate(lab.guests):
        out = lab.ssh(i, "ip -d -o link show cnvm0-vx").stdout
        assert f"local {g.ip}" in out, out
    assert c.last >= 20


FAULT_CALL = r"""
import asyncio, json, sys
from proto.client import Client
from proto.messages import ProtoError

async def main():
    async with await Client.connect(sys.argv[1]) as c:
        try:
            r = await c.call("teleport", json.loads(sys.argv[2]), timeout=900)
            print(json.dumps({"ok": True, "report": r}))
        except ProtoError as e:
            print(json.dumps({"ok": False, "code": str(e.code), "message": e.message,
                              "report": e.details.get("report")}))

asyncio.run(main())
"""


@pytest.mark.parametrize("fault", ["predumping", "criu", "dumped", "target:config"])
def test_precopy_fault_unwinds_to_the_source(served: tuple[VMLab, Client, str],
                                             fault: str) -> None:
    """Engine v2 in the precopy mode (soft-dirty kernels only): a failure as the rounds
    begin, right after CRIU starts, after the final dump, or on the target after its
    config is written,
    unwinds to a cnvm that runs once, on the source, with its connection and file."""
    lab, c, ip = served
    src = next(i for i in range(lab.n)
               if NAME in [x["name"] for x in _json(lab.cnvmctl(i, "--json ls --local"))])
    dst = 1 - src
    args = {"name": NAME, "target": lab.guests[dst].name, "mode": "precopy",
            "fail_at": fault}
    r = lab.ssh(src, f"cd {GUEST_SRC} && {GUEST_VENV}/bin/python -c "
                     f"{shlex.quote(FAULT_CALL)} {DAEMON_SOCKET} "
                     f"{shlex.quote(json.dumps(args))}", timeout=900)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["ok"] and "fault injected" in out["message"], out
    assert out["report"]["rolled_back"], out
    c.wait_more(20, timeout=180)
    _assert_on(lab, c, ip, src)


def test_precopy_then_hybrid(served: tuple[VMLab, Client, str]) -> None:
    lab, c, ip = served
    port = c.port
    t0 = time.monotonic()
    reps = [_teleport(lab, c, ip, 0, 1, "precopy"), _teleport(lab, c, ip, 1, 0, "hybrid")]
    assert c.port == port  # one and the same connection all along
    hist = _json(lab.cnvmctl(0, f"--json teleports {NAME}"))["reports"]
    assert [(r["mode"], r["target"]) for r in hist][-2:] == [("precopy", "lv2"),
                                                           ("hybrid", "lv1")]
    print("\n" + json.dumps({
        "timings": lab.timings, "teleports_s": round(time.monotonic() - t0, 1),
        "modes": {r["mode"]: {"frozen_s": r["frozen_seconds"], "total_s": r["total_seconds"],
                              "client_stall_s": round(r["_client_stall"], 3),
                              "rounds": [(x["kind"], x["bytes"], x["seconds"])
                                         for x in r["rounds"]]} for r in reps}}))

