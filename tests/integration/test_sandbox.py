"""The cnvm sandbox (issue 14 item 7), on real cnvmd/runc/CRIU in a 2-node lab.

A default cnvm runs under Docker's default seccomp profile with noNewPrivileges:
inside it `unshare -U`, `keyctl`, `add_key`, `perf_event_open`, `io_uring_setup` and
`bpf` fail with EPERM (a static probe, /bin/sysprobe, calls them directly), `clone3`
answers ENOSYS. A cnvm deployed with ``--security-opt seccomp=unconfined
--security-opt no-new-privileges=false`` has no filter: the same calls are not
refused with EPERM. Neither inherits cnvmd's oom_score_adj (raised to 300 here, as
the shipped unit lowers it to -500). Both keep their sandbox across a teleport —
restored processes and new `exec`s alike — and the default one keeps its client
connection.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cnvmlab import paths as labpaths
from proto.messages import ProtoError
from tests import imagebuild
from tests.teleportlab import Conn, TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="module")]

LAB = "sxsb"
IMAGE = "sandbox:latest"
BOXED, OPEN = "boxed", "open"
BOXED_IP, OPEN_IP = "10.100.101.31", "10.100.101.32"
OPT_OUT = ["seccomp=unconfined", "no-new-privileges=false"]
DAEMON_OOM = 300

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sched.h>
#include <sys/syscall.h>
#include <linux/perf_event.h>
#include <linux/keyctl.h>

/* One line per call: "<name> <errno>" (0: the call succeeded). */
static void report(const char *name, long rc) {
    printf("%s %d\n", name, rc < 0 ? errno : 0);
}

int main(void) {
    struct perf_event_attr pa;
    char params[512];
    memset(&pa, 0, sizeof pa);
    pa.size = sizeof pa;
    pa.type = PERF_TYPE_SOFTWARE;
    pa.config = PERF_COUNT_SW_TASK_CLOCK;
    pa.exclude_kernel = 1;
    pa.exclude_hv = 1;
    pa.disabled = 1;
    memset(params, 0, sizeof params);
    errno = 0; report("perf_event_open", syscall(SYS_perf_event_open, &pa, 0, -1, -1, 0));
    errno = 0; report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID,
                                        KEY_SPEC_SESSION_KEYRING, 0));
    errno = 0; report("add_key", syscall(SYS_add_key, "user", "sysprobe", "x", 1,
                                         KEY_SPEC_PROCESS_KEYRING));
    errno = 0; report("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
    errno = 0; report("io_uring_setup", syscall(SYS_io_uring_setup, 1, params));
    memset(params, 0, sizeof params);
    errno = 0; report("bpf", syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, params, 72));
    errno = 0; report("clone3", syscall(SYS_clone3, NULL, 0));
    return 0;
}
"""
DENIED = ("perf_event_open", "keyctl", "add_key", "unshare_user", "io_uring_setup", "bpf")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox_lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TeleLab]:
    """2 nodes, the probe image on node1, cnvmd at oom_score_adj 300, both cnvms."""
    tmp = tmp_path_factory.mktemp("sandbox")
    try:
        probe = imagebuild.gcc_static(PROBE_C, tmp / "sysprobe")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tl = TeleLab(LAB, 2)
    try:
        await tl.up(tmp)
        for p in tl.daemons.values():  # stands in for the unit's -500 (root may raise)
            set_oom_score_adj(p.pid, DAEMON_OOM)
        layout = imagebuild.build_busybox_plus_layout(
            tmp / "sandbox-oci", {"bin/sysprobe": (probe, 0o755)})
        await tl.call("node1", "images.import", {"path": str(layout.path), "name": IMAGE})
        tl.image = IMAGE
        await tl.deploy(BOXED, BOXED_IP)
        await tl.call("node1", "deploy", {"name": OPEN, "image": IMAGE, "ip": OPEN_IP,
                                          "security_opt": OPT_OUT})
        yield tl
    except BaseException:
        tl.print_logs(25)
        raise
    finally:
        await tl.down()


def set_oom_score_adj(pid: int, value: int) -> None:
    Path(f"/proc/{pid}/oom_score_adj").write_text(str(value))


async def probe(tl: TeleLab, node: str, name: str) -> dict[str, int]:
    res = await tl.call(node, "exec", {"name": name, "cmd": ["/bin/sysprobe"]})
    assert res["exit_code"] == 0, res
    return {k: int(v) for k, v in (ln.split() for ln in res["stdout"].splitlines())}


async def status_of(tl: TeleLab, node: str, name: str) -> dict[str, str]:
    """Seccomp, Seccomp_filters, NoNewPrivs and oom_score_adj of the cnvm's first
    process (deployed or restored) and of a process `exec` starts."""
    res = await tl.call(node, "exec", {"name": name, "cmd": ["sh", "-c",
        "for p in 1 self; do grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs):' "
        "/proc/$p/status | sed \"s/^/$p./\"; echo \"$p.oom: $(cat /proc/$p/oom_score_adj)\"; "
        "done"]})
    assert res["exit_code"] == 0, res
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in res["stdout"].splitlines())}


async def unshare_user(tl: TeleLab, node: str, name: str) -> dict[str, Any]:
    res: dict[str, Any] = await tl.call(node, "exec",
                                        {"name": name, "cmd": ["busybox", "unshare", "-U", "true"]})
    return res


async def assert_boxed(tl: TeleLab, node: str, *, restored: bool = False) -> None:
    got = await probe(tl, node, BOXED)
    assert {k: got[k] for k in DENIED} == dict.fromkeys(DENIED, errno.EPERM), got
    assert got["clone3"] == errno.ENOSYS, got  # libc falls back to clone
    res = await unshare_user(tl, node, BOXED)
    assert res["exit_code"] != 0 and "Operation not permitted" in res["stderr"], res
    st = await status_of(tl, node, BOXED)
    for p in ("1", "self"):
        assert st[f"{p}.Seccomp"] == "2" and int(st[f"{p}.Seccomp_filters"]) >= 1, st
        assert st[f"{p}.NoNewPrivs"] == "1", st
    assert st["self.oom"] == "0", st
    if not restored:  # see test_restored_cnvm_keeps_oom_score_adj
        assert st["1.oom"] == "0", st


async def assert_open(tl: TeleLab, node: str, *, restored: bool = False) -> None:
    got = await probe(tl, node, OPEN)
    for k in ("perf_event_open", "keyctl", "add_key", "unshare_user", "io_uring_setup"):
        assert got[k] != errno.EPERM, got  # not refused by a filter (most succeed)
    assert got["clone3"] != errno.ENOSYS, got
    res = await unshare_user(tl, node, OPEN)
    assert res["exit_code"] == 0, res
    st = await status_of(tl, node, OPEN)
    for p in ("1", "self"):
        assert st[f"{p}.Seccomp"] == "0" and st[f"{p}.NoNewPrivs"] == "0", st
    assert st["self.oom"] == "0", st
    if not restored:
        assert st["1.oom"] == "0", st


async def test_default_cnvm_is_sandboxed(sandbox_lab: TeleLab) -> None:
    await assert_boxed(sandbox_lab, "node1")
    info = await sandbox_lab.call("node1", "inspect", {"name": BOXED})
    assert info["record"]["security_opt"] == []


async def test_opt_out_lifts_the_filter(sandbox_lab: TeleLab) -> None:
    await assert_open(sandbox_lab, "node1")
    info = await sandbox_lab.call("node1", "inspect", {"name": OPEN})
    assert info["record"]["security_opt"] == ["no-new-privileges=false", "seccomp=unconfined"]


async def test_bad_security_opt_is_refused(sandbox_lab: TeleLab) -> None:
    for bad in (["seccomp=/etc/profile.json"], ["apparmor=unconfined"], "seccomp=unconfined",
                ["no-new-privileges=true", "no-new-privileges=false"]):
        with pytest.raises(ProtoError) as ei:
            await sandbox_lab.call("node1", "deploy", {"name": "bad", "image": IMAGE,
                                                       "security_opt": bad})
        assert ei.value.code == "invalid_argument", ei.value
    assert not (labpaths.node_state_dir(LAB, "node1") / "cnvms" / "bad").exists()


async def test_sandbox_travels_with_teleport(sandbox_lab: TeleLab) -> None:
    tl = sandbox_lab
    c: Conn = await tl.client(BOXED_IP)
    await c.wait_more(20)
    port = c.port
    for name, mode in ((BOXED, "postcopy"), (OPEN, "stop-copy")):
        rep = await tl.call("node1", "teleport", {"name": name, "target": "node2",
                                                  "mode": mode}, timeout=180)
        assert rep["ok"] and rep["target"] == "node2", rep
    await c.wait_more(30, timeout=30)
    assert c.port == port and not c.eof
    c.check_sequence()
    await assert_boxed(tl, "node2", restored=True)
    await assert_open(tl, "node2", restored=True)
    info = await tl.call("node2", "inspect", {"name": OPEN})
    assert info["record"]["security_opt"] == ["no-new-privileges=false", "seccomp=unconfined"]
    cfg_dir = labpaths.node_state_dir(LAB, "node2") / "cnvms"
    assert '"seccomp"' in (cfg_dir / BOXED / "config.json").read_text()
    assert '"seccomp"' not in (cfg_dir / OPEN / "config.json").read_text()


async def test_restored_cnvm_keeps_oom_score_adj(sandbox_lab: TeleLab) -> None:
    """After the teleport above: the restored first process is back at 0, not at the
    target daemon's value."""
    for name in (BOXED, OPEN):
        st = await status_of(sandbox_lab, "node2", name)
        assert st["1.oom"] == "0", (name, st)
