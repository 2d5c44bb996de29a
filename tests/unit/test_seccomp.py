"""The cnvm sandbox without root: the seccomp profile's shape, security options, the
runc config they make, the teleport spec that carries them, and the CLI option."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnvmd import bundle, seccomp
from cnvmd.images import ImageStore
from cnvmd.lifecycle import Lifecycle, LocalNetns
from cnvmd.migration import wire
from cnvmd.state import StateStore
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
NEVER = ("keyctl", "add_key", "request_key", "unshare", "setns", "mount", "umount2",
         "pivot_root", "perf_event_open", "bpf", "io_uring_setup", "io_uring_enter",
         "io_uring_register", "kexec_load", "kexec_file_load", "init_module",
         "finit_module", "delete_module", "userfaultfd", "open_by_handle_at", "reboot",
         "swapon", "settimeofday", "clock_settime", "acct", "fsopen", "move_mount",
         "open_tree", "kcmp", "pidfd_getfd", "iopl", "ioperm", "mbind", "syslog",
         "lookup_dcookie", "quotactl", "vhangup", "uselib", "ustat", "_sysctl",
         "nfsservctl", "vm86")


def rules_for(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def test_default_profile_is_an_allowlist_without_the_dangerous_calls() -> None:
    p = seccomp.default_profile(bundle.CAPS, arch="amd64", kernel="6.12.0")
    assert p["defaultAction"] == "SCMP_ACT_ERRNO" and p["defaultErrnoRet"] == errno.EPERM
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = seccomp.allowed_names(p)
    assert not allowed & set(NEVER), sorted(allowed & set(NEVER))
    for name in ("read", "write", "execve", "futex", "rt_sigreturn", "prctl", "seccomp",
                 "setresuid", "capset", "arch_prctl", "chroot", "ptrace"):
        assert name in allowed, name
    assert 300 < len(p["syscalls"][0]["names"]) < 450
    assert p["syscalls"][0]["names"] == sorted(p["syscalls"][0]["names"])


def test_conditional_rules() -> None:
    p = seccomp.default_profile(bundle.CAPS, arch="amd64", kernel="6.1.0")
    (clone,) = rules_for(p, "clone")
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0,
                              "op": "SCMP_CMP_MASKED_EQ"}]
    (clone3,) = rules_for(p, "clone3")
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == errno.ENOSYS
    (sock,) = rules_for(p, "socket")
    assert sock["args"] == [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]
    personas = {r["args"][0]["value"] for r in rules_for(p, "personality")}
    assert personas == {0, 8, 0x20000, 0x20008, 0xFFFFFFFF}
    assert all(r["args"][0]["op"] == "SCMP_CMP_EQ" for r in rules_for(p, "personality"))


def test_capabilities_arch_and_kernel_decide_the_gated_rules() -> None:
    admin = seccomp.default_profile([*bundle.CAPS, "CAP_SYS_ADMIN"], arch="amd64")
    allowed = seccomp.allowed_names(admin)
    assert {"unshare", "mount", "setns", "clone", "clone3"} <= allowed
    assert all("args" not in r for r in rules_for(admin, "clone"))
    bare = seccomp.default_profile([], arch="amd64")
    assert "chroot" not in seccomp.allowed_names(bare)
    old = seccomp.default_profile(bundle.CAPS, arch="amd64", kernel="4.4.0")
    assert "ptrace" not in seccomp.allowed_names(old)
    arm = seccomp.default_profile(bundle.CAPS, arch="arm64")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "arch_prctl" not in seccomp.allowed_names(arm)
    assert "set_tls" in seccomp.allowed_names(arm)
    s390 = seccomp.default_profile(bundle.CAPS, arch="s390x")
    assert rules_for(s390, "clone")[0]["args"][0]["index"] == 1
    assert seccomp.native_arch("x86_64") == "amd64"


@pytest.mark.parametrize("given,want", [
    (None, ()),
    ([], ()),
    (["seccomp=unconfined"], ("seccomp=unconfined",)),
    (["no-new-privileges"], ("no-new-privileges=true",)),
    (["no-new-privileges:false", "seccomp:unconfined"],
     ("no-new-privileges=false", "seccomp=unconfined")),
    (["seccomp=unconfined", "seccomp=unconfined"], ("seccomp=unconfined",)),
])
def test_parse_security_opt(given: Any, want: tuple[str, ...]) -> None:
    assert seccomp.parse_security_opt(given) == want
    assert all(seccomp.SECURITY_OPT_RE.fullmatch(o) for o in want)


@pytest.mark.parametrize("given", [
    "seccomp=unconfined", ["seccomp=/etc/docker/seccomp.json"], ["apparmor=unconfined"],
    ["label=disable"], ["no-new-privileges=maybe"], [1], ["seccomp=unconfined\n"],
    ["no-new-privileges=true", "no-new-privileges=false"], {"seccomp": "unconfined"},
])
def test_parse_security_opt_refuses(given: Any) -> None:
    with pytest.raises(ProtoError) as e:
        seccomp.parse_security_opt(given)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT


def test_sandbox_resolve() -> None:
    assert seccomp.Sandbox.resolve() == seccomp.Sandbox(True, True)
    assert seccomp.Sandbox.resolve(no_new_privileges=False) == seccomp.Sandbox(True, False)
    assert seccomp.Sandbox.resolve(["no-new-privileges=true"], no_new_privileges=False) \
        == seccomp.Sandbox(True, True)
    assert seccomp.Sandbox.resolve(["seccomp=unconfined", "no-new-privileges=false"]) \
        == seccomp.Sandbox(False, False)


def test_runc_config_sandbox_and_oom() -> None:
    img = {"Cmd": ["/bin/sh"]}
    cfg = bundle.runc_config(name="a", image_config=img)
    assert cfg["process"]["noNewPrivileges"] is True
    assert cfg["process"]["oomScoreAdj"] == 0
    assert cfg["linux"]["seccomp"] == seccomp.default_profile(bundle.CAPS)
    cfg = bundle.runc_config(name="a", image_config=img, oom_score_adj=250,
                             sandbox=seccomp.Sandbox(seccomp=False, no_new_privileges=False))
    assert "seccomp" not in cfg["linux"]
    assert cfg["process"]["noNewPrivileges"] is False
    assert cfg["process"]["oomScoreAdj"] == 250
    for bad in (-1001, 1001, True, "0"):
        with pytest.raises(ProtoError):
            bundle.runc_config(name="a", image_config=img, oom_score_adj=bad)


SPEC = {"name": "web", "image": "busybox:latest", "image_id": "a" * 64, "hostname": "web",
        "cmd": [], "env": {}, "memory": None, "cpus": None, "created_at": 1.0,
        "started_at": 2.0}


def test_spec_carries_security_opt() -> None:
    plain = wire.CnvmSpec.from_wire(SPEC)
    assert plain.security_opt == () and "security_opt" not in plain.to_wire()
    raw = {**SPEC, "security_opt": ["seccomp=unconfined", "no-new-privileges=false"]}
    spec = wire.CnvmSpec.from_wire(raw)
    assert spec.security_opt == ("no-new-privileges=false", "seccomp=unconfined")
    assert wire.CnvmSpec.from_wire(spec.to_wire()) == spec
    rec = {**SPEC, "security_opt": ["seccomp=unconfined"]}
    assert wire.CnvmSpec.from_record(rec).security_opt == ("seccomp=unconfined",)
    assert wire.CnvmSpec.from_record({**SPEC, "security_opt": []}).security_opt == ()
    assert wire.CnvmSpec.from_record(SPEC).security_opt == ()


@pytest.mark.parametrize("bad", [
    ["seccomp=unconfined\n"], ["seccomp=/etc/x.json"], ["no-new-privileges"],
    ["apparmor=unconfined"], [7], "seccomp=unconfined",
    ["no-new-privileges=true", "no-new-privileges=false"],
    ["seccomp=unconfined", "no-new-privileges=true", "no-new-privileges=false"],
])
def test_spec_refuses_bad_security_opt(bad: Any) -> None:
    with pytest.raises(ProtoError) as e:
        wire.CnvmSpec.from_wire({**SPEC, "security_opt": bad})
    assert e.value.code == ErrorCode.INVALID_ARGUMENT


class NoRunc:
    async def state(self, cid: str) -> None:
        return None

    async def run(self, *a: Any, **kw: Any) -> None:
        raise AssertionError("runc must not be reached")


def life_at(tmp_path: Path, **kw: Any) -> Lifecycle:
    store = ImageStore(tmp_path / "images")
    store.load()
    return Lifecycle(node="n1", state=StateStore(tmp_path / "state"), images=store,
                     runc=NoRunc(), cnvms_dir=tmp_path / "cnvms",  # type: ignore[arg-type]
                     network=LocalNetns("sc-unit-"), **kw)


async def test_deploy_validates_security_opt_first(tmp_path: Path) -> None:
    life = life_at(tmp_path)
    with pytest.raises(ProtoError) as e:
        await life.deploy("a", "busybox", security_opt=["seccomp=/x.json"])
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "security option" in e.value.message
    assert list((tmp_path / "cnvms").iterdir()) == []


def test_lifecycle_policy(tmp_path: Path) -> None:
    life = life_at(tmp_path, no_new_privileges=False, oom_score_adj=100)
    assert life.sandbox({}) == seccomp.Sandbox(True, False)
    assert life.sandbox({"security_opt": ["no-new-privileges=true"]}) == \
        seccomp.Sandbox(True, True)
    for kw in ({"oom_score_adj": 2000}, {"no_new_privileges": "yes"}):
        with pytest.raises(ValueError):
            life_at(tmp_path, **kw)


def test_cnvmctl_deploy_help_documents_security_opt() -> None:
    res = subprocess.run([sys.executable, "-m", "cnvmctl", "deploy", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert "--security-opt" in res.stdout
    assert "seccomp=unconfined" in res.stdout and "no-new-privileges=false" in res.stdout
