"""VM lab lane: the shipped unit on real kernels (issue 18 §4) and the modes that
need soft-dirty (issue 8 §2).

Three QEMU guests (stock trixie kernels: soft-dirty and userfaultfd) get cnvm the
way an operator installs it: the checkout and its venv, ``scripts/install-host
--start`` (the shipped ``systemd/cnvmd.service``, ``Type=notify``, enabled), an
/etc/cnvm/cnvmd.toml naming the node and its address; then ``cluster init``,
``cluster token`` and ``join`` over their private link ``lv0``. A busybox cnvm
serves the TCP counter (one in-memory counter per connection) and keeps tens of MiB
of *private* memory that it slowly dirties (a static C program added to the image;
CRIU does not pre-dump shared anonymous memory). A client process on lv3, on lv3's
own overlay address (``cnvmctl net host``), keeps ONE connection and asks for the
next number every 50 ms; lv3 is never an end of a teleport, so resets of lv1/lv2
leave it alive.

- faults in the precopy mode unwind to the source (after the final dump; three more
  fault points in the slow lane);
- lv1 -> lv2 ``--mode precopy``, then lv2 -> lv1 ``--mode auto`` (hybrid here):
  connection kept, counter never resets, file and IP intact, >= 2 pre-dump rounds of
  shrinking size;
- ``systemctl restart cnvmd`` with the cnvm running: same process, adopted, managed;
- slow lane (``CI`` or ``CNVM_SLOW`` set): a hard reset (QMP ``system_reset``) of
  the target during each phase before the switchover, and of the source after it,
  ends with the cnvm running exactly once (on the source, resp. the target) with its
  connection, counter and file.

One boot for everything but the resets: a boot costs 1-3 minutes of TCG. Traffic
stays on the guests' private link (VXLAN over lv0) and loopback. Run:
``.venv/bin/pytest -m vmlab -s tests/vmlab/test_vm_teleport.py``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
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

CLIENT_AT = 2  # lv3: the client's guest, never an end of a teleport
SLOW = bool(os.environ.get("CI") or os.environ.get("CNVM_SLOW"))  # the slow lane (CI)

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
        # connect within 60 s; a reply may take 600 s (a teleport held frozen while
        # its target reboots: the source waits for the outcome)
        cmd = f"python3 -u -c {shlex.quote(CLIENT)} {ip} 7000 0.05 60 600"
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


def _config(lab: VMLab, i: int) -> str:
    """The operator's /etc/cnvm/cnvmd.toml: the node's name and its address on the
    private link (peers and VXLAN); fault_injection for the test hooks (hold,
    fail_at) this lane uses to hit a phase."""
    g = lab.guests[i]
    return (f'[daemon]\nnode_name = "{g.name}"\nfault_injection = true\n'
            f'[peers]\nlisten_address = "{g.ip}"\n')


@pytest.fixture(scope="module")
def cluster(vmlab_boot) -> Iterator[VMLab]:
    """Three guests with cnvm installed as an operator installs it (checkout, venv,
    ``scripts/install-host --start``: the shipped unit, Type=notify), a cluster made
    by ``cluster init`` / ``cluster token`` / ``join``, busybox imported on lv1 only
    (the first teleport ships its layers by digest). lv3 carries the client."""
    if shutil.which("gcc") is None:
        pytest.skip("vmlab teleport: gcc (with static libc) builds the dirtier")
    lab = vmlab_boot(n=3, mem_mib=1024, resettable=True)
    t = time.monotonic()
    try:
        lab.timings["install_s"] = max(lab.install_operator(
            {i: _config(lab, i) for i in range(lab.n)}).values())
        for i in range(lab.n):
            unit = lab.ssh(i, "systemctl show cnvmd -p Type -p ActiveState -p FragmentPath "
                              "-p UnitFileState").stdout
            assert "Type=notify" in unit and "ActiveState=active" in unit, unit
            assert "FragmentPath=/etc/systemd/system/cnvmd.service" in unit, unit
            assert "UnitFileState=enabled" in unit, unit
        print("\n" + lab.form_cluster())
        with tempfile.TemporaryDirectory(prefix="lw-busybox-") as tmp:
            layout = build_image(Path(tmp) / "busybox-oci")
            lab.copy_to(0, layout, "/var/tmp/lw-busybox-oci")
        lab.cnvmctl(0, "images import /var/tmp/lw-busybox-oci --name busybox")
        lab.timings["setup_s"] = round(time.monotonic() - t, 1)
        yield lab
    except BaseException:
        _journals(lab)
        raise
    finally:
        lab.down()


def _journals(lab: VMLab, lines: int = 40) -> None:
    for i in range(lab.n):
        r = lab.ssh(i, f"journalctl -u cnvmd --no-pager | tail -{lines}", check=False,
                    timeout=60)
        print(f"--- {lab.guests[i].name} cnvmd journal\n{r.stdout}")


@pytest.fixture(scope="module")
def served(cluster: VMLab) -> Iterator[tuple[VMLab, Client, str]]:
    """The cnvm on lv1 with its file written, and the client connected from lv3
    (neither end of any teleport: a reset of lv1 or lv2 leaves the client alive)."""
    lab = cluster
    try:
        lab.cnvmctl(0, f"deploy {NAME} --image busybox --memory 256M -- sh -c "
                       f"{shlex.quote(SERVICE)}", timeout=600)
    except BaseException:
        _journals(lab)
        raise
    ip = _json(lab.cnvmctl(0, f"--json inspect {NAME}"))["ip"]
    lab.cnvmctl(0, f"exec {NAME} -- sh -c 'echo kept > /data.txt'")
    # The client: a process on lv3, on lv3's overlay address (cnvm0) — no netns needed.
    client_ip = _json(lab.cnvmctl(CLIENT_AT, "--json net host"))["expose_ip"]
    c = Client(lab, CLIENT_AT, ip)
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
           "journalctl -u cnvmd --no-pager | tail -40")
    for i, g in enumerate(lab.guests):
        r = lab.ssh(i, cmd, check=False)
        print(f"--- {g.name} overlay\n{r.stdout}{r.stderr}")


def _teleport(lab: VMLab, c: Client, ip: str, src: int, dst: int, mode: str,
              expect: str | None = None) -> dict:
    """Teleport with `mode`; the report must say `expect` (default: mode) ran."""
    since = _guest_now(lab, CLIENT_AT)
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
    assert rep["ok"] and rep["mode"] == (expect or mode), rep
    assert rep["target"] == lab.guests[dst].name, rep
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
    the client's connection crosses it (cnvm on lv1, client on lv3; lv2's datapath
    comes up with its first cnvm)."""
    lab, c, _ip = served
    for i in (0, CLIENT_AT):
        g = lab.guests[i]
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


_SLOW_ONLY = pytest.mark.skipif(not SLOW, reason="slow lane (2 min each in TCG): set CI or "
                                                "CNVM_SLOW")


@pytest.mark.parametrize("fault", [pytest.param("predumping", marks=_SLOW_ONLY),
                                   pytest.param("criu", marks=_SLOW_ONLY), "dumped",
                                   pytest.param("target:config", marks=_SLOW_ONLY)])
def test_precopy_fault_unwinds_to_the_source(served: tuple[VMLab, Client, str],
                                             fault: str) -> None:
    """Engine v2 in the precopy mode (soft-dirty kernels only): a failure as the rounds
    begin, right after CRIU starts, after the final dump, or on the target after its
    config is written,
    unwinds to a cnvm that runs once, on the source, with its connection and file."""
    lab, c, ip = served
    src = next(i for i in range(lab.n)
               if NAME in [x["name"] for x in _json(lab.cnvmctl(i, "--json ls --local"))])
    dst = 1 if src == 0 else 0
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
    # auto picks hybrid: both guests have soft-dirty tracking and userfaultfd
    reps = [_teleport(lab, c, ip, 0, 1, "precopy"),
            _teleport(lab, c, ip, 1, 0, "auto", expect="hybrid")]
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



def _where(lab: VMLab, *, strict: bool = True) -> list[int] | None:
    """Guests whose daemon lists the cnvm as its own (exactly one, normally); None if
    a daemon does not answer and not `strict` (one still starting after a reset)."""
    out = []
    for i in range(lab.n):
        r = lab.cnvmctl(i, "--json ls --local", check=strict, timeout=120)
        if r.returncode != 0:
            return None
        if NAME in [x["name"] for x in json.loads(r.stdout)]:
            out.append(i)
    return out


def test_restart_keeps_the_cnvm_running_and_adopted(served: tuple[VMLab, Client, str]) -> None:
    """``systemctl restart cnvmd`` (the shipped unit: KillMode=process) with the cnvm
    running: the same container process serves on, the new daemon adopts it (state,
    exec, the file), and the client never notices more than a hiccup."""
    lab, c, ip = served
    [node] = _where(lab) or []
    before = _json(lab.cnvmctl(node, f"--json inspect {NAME}"))
    main = lab.ssh(node, "systemctl show cnvmd -p MainPID --value").stdout.strip()
    t = time.monotonic()
    lab.ssh(node, "systemctl restart cnvmd", timeout=600)  # returns at READY=1
    took = time.monotonic() - t
    after_main = lab.ssh(node, "systemctl show cnvmd -p MainPID --value").stdout.strip()
    assert after_main != main, (main, after_main)
    after = _json(lab.cnvmctl(node, f"--json inspect {NAME}"))
    print(f"\nrestart of cnvmd on {lab.guests[node].name}: {took:.1f} s until READY; "
          f"cnvm pid {before.get('pid')} -> {after.get('pid')}")
    assert after["state"] == "running" and after.get("pid") == before.get("pid"), after
    c.wait_more(20, timeout=120)
    _assert_on(lab, c, ip, node)


HOLD_CALL = r"""
import asyncio, json, sys
from proto.client import Client
from proto.messages import ProtoError

def show(ev):
    print(json.dumps({"event": ev.name, "data": ev.data}, default=str), flush=True)

async def main():
    async with await Client.connect(sys.argv[1]) as c:
        try:
            r = await c.call("teleport", json.loads(sys.argv[2]), on_event=show, timeout=1800)
            print(json.dumps({"ok": True, "report": r}), flush=True)
        except ProtoError as e:
            print(json.dumps({"ok": False, "code": str(e.code), "message": e.message,
                              "report": e.details.get("report")}), flush=True)

asyncio.run(main())
"""

HOLD_S = 10.0  # how long the source holds at the phase: the reset lands meanwhile

# (where the reset lands, whose guest is reset, where the cnvm must run afterwards)
RESETS = [
    ("precopy", "target", "source"),  # pre-dump rounds about to stream
    ("frozen", "target", "source"),  # cnvm frozen, final dump made, nothing sent
    ("restore", "target", "source"),  # restore request about to go: outcome unknown
    ("fenced", "target", "source"),  # the target restored a fenced copy, answer held
    ("commit", "source", "target"),  # switched; every page on the target
]


class _Call:
    """The teleport call running in a guest; its events and result read in a thread."""

    def __init__(self, lab: VMLab, i: int, args: dict[str, Any]) -> None:
        self.p = lab.popen(i, f"cd {GUEST_SRC} && {GUEST_VENV}/bin/python -u -c "
                              f"{shlex.quote(HOLD_CALL)} {DAEMON_SOCKET} "
                              f"{shlex.quote(json.dumps(args))}",
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    def held(self, phase: str) -> bool:
        return any(isinstance(x.get("data"), dict) and x["data"].get("hold") is not None
                   and x["data"].get("phase") == phase for x in self.lines)

    def result(self) -> dict[str, Any] | None:
        return next((x for x in self.lines if "ok" in x), None)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=30)


def _wait(what: str, cond, timeout: float, every: float = 0.5) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _daemon_up(lab: VMLab, i: int) -> bool:
    return lab.cnvmctl(i, "status", check=False, timeout=60).returncode == 0


@pytest.mark.skipif(not SLOW, reason="slow lane (five guest reboots): set CI or CNVM_SLOW")
@pytest.mark.parametrize(("phase", "victim", "ends_on"), RESETS,
                         ids=[f"{p}-reset-{v}" for p, v, _ in RESETS])
def test_guest_reset_during_teleport(served: tuple[VMLab, Client, str], phase: str,
                                     victim: str, ends_on: str) -> None:
    """A hard reset of one end of a hybrid (``--mode auto``) teleport at `phase`: the
    cnvm runs exactly once afterwards — on the source if the switchover was not
    reached, on the target if it was — with its connection, counter and file."""
    lab, c, ip = served
    [src] = _where(lab) or []
    dst = 1 if src == 0 else 0
    port = c.port
    args: dict[str, Any] = {"name": NAME, "target": lab.guests[dst].name, "mode": "auto"}
    if phase == "fenced":
        args["fail_at"] = "target:hold_reply"
    else:
        args["hold"] = {phase: HOLD_S}
    i_victim = dst if victim == "target" else src
    i_home = src if ends_on == "source" else dst
    t0, since = time.monotonic(), _guest_now(lab, CLIENT_AT)
    call = _Call(lab, src, args)
    try:
        if phase == "fenced":  # the target holds its answer 5 s after the fenced restore
            def fenced() -> bool:
                r = lab.ssh(dst, "cat /var/lib/cnvm/teleport/in/*/session.json 2>/dev/null",
                            check=False, timeout=30)
                return '"phase": "fenced"' in r.stdout
            _wait("the target's fenced copy", fenced, 900, every=0.2)
        elif phase == "commit":
            _wait("the hold at commit", lambda: call.held(phase), 900)
            # post-copy: the source serves the last pages until the target has them all
            _wait("the target's lazy-pages daemon to end", lambda: lab.ssh(
                dst, "pgrep -f lazy-pages", check=False, timeout=30).returncode != 0, 300)
        else:
            _wait(f"the hold at {phase}", lambda: call.held(phase), 900)
        t_reset = time.monotonic()
        lab.reset(i_victim)
        print(f"\n{phase}: reset {lab.guests[i_victim].name} "
              f"{t_reset - t0:.1f} s into the teleport")
        booted = lab.wait_ssh(i_victim, timeout=900)
        _wait(f"cnvmd on {lab.guests[i_victim].name} after the reset",
              lambda: _daemon_up(lab, i_victim), 600, every=2)
        if victim == "target":  # the source's call ends: rolled back, cnvm resumed
            _wait("the teleport's answer", lambda: call.result() is not None, 900)
            res = call.result()
            assert res is not None and not res["ok"], res
            print(f"  answer after {time.monotonic() - t_reset:.1f} s: {res['code']}: "
                  f"{res['message']}")
        # exactly once: on one node only, running, same IP, file, connection, counter
        _wait("one copy", lambda: _where(lab, strict=False) == [i_home], 600, every=2)
        c.wait_more(20, timeout=600)
        assert c.port == port
        _assert_on(lab, c, ip, i_home)
        for i in range(lab.n):
            r = lab.ssh(i, "runc --root /run/cnvm/runc list -q", check=False)
            assert (NAME in r.stdout.split()) == (i == i_home), (lab.guests[i].name, r.stdout)
        print(f"  {lab.guests[i_victim].name} back in {booted:.0f} s; cnvm runs once, on "
              f"{lab.guests[i_home].name}; client stall {c.max_stall(since) * 1000:.0f} ms max; "
              f"{time.monotonic() - t0:.0f} s in all")
    except BaseException:
        _journals(lab, 60)
        raise
    finally:
        call.close()
