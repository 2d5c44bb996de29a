"""`cnvmctl images pull` from a REAL local registry (issue 17, item 1).

Debian's `docker-registry` (distribution) runs inside the lab node's namespace on its
loopback, with filesystem storage under the lab's state dir; `skopeo copy` fills it
with the busybox OCI layout the tests build; the node's cnvmd pulls it (skopeo, in
the node's namespace, plain HTTP: --no-tls-verify), the image is deployed and runs.
`Lab.down()` kills the registry (a process in a lab namespace) and removes its
storage, on failure too.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnvmlab import paths as labpaths
from cnvmlab.lab import Lab
from proto.messages import ErrorCode, ProtoError
from tests import imagebuild

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LAB = "hpr"
PORT = 5000
REF = f"127.0.0.1:{PORT}/test/busybox:1"
REGISTRY = "/usr/bin/docker-registry"


def cnvmctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "cnvmctl", "--lab", LAB, "--node", "node1", *args],
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    return r


def _have_tools() -> bool:
    return Path(REGISTRY).exists() and shutil.which("skopeo") is not None


@pytest.fixture
async def reglab(tmp_path: Path):
    if not _have_tools():
        pytest.skip("docker-registry and skopeo are needed (scripts/install-deps)")
    lab = Lab(LAB, nodes=1)
    if lab.exists():
        await lab.down()
    try:
        await lab.up(start_daemons=True)
        store = labpaths.STATE_BASE / LAB / "registry"
        store.mkdir(parents=True)
        cfg = tmp_path / "registry.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {store}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{PORT}\n")
        reg = await lab.spawn("node1", [REGISTRY, "serve", str(cfg)],
                              stdout=asyncio.subprocess.DEVNULL,
                              stderr=asyncio.subprocess.DEVNULL)
        for _ in range(100):
            r = await lab.exec("node1", ["curl", "-fsS", f"http://127.0.0.1:{PORT}/v2/"],
                               check=False)
            if r.returncode == 0:
                break
            assert reg.returncode is None, "docker-registry exited"
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("registry did not answer")
        layout = imagebuild.build_busybox_layout(tmp_path / "busybox-oci")
        await lab.exec("node1", ["skopeo", "copy", "--dest-tls-verify=false",
                                 f"oci:{layout.path}:latest", f"docker://{REF}"], timeout=120)
        yield lab, layout
    finally:
        await lab.down()


async def test_pull_deploy_run(reglab, tmp_path: Path) -> None:
    lab, layout = reglab
    r = cnvmctl("images", "pull", "--no-tls-verify", REF)
    assert r.stdout.startswith(f"pulled {REF} ("), r.stdout
    assert "pull 127.0.0.1" in r.stderr  # progress went to stderr
    res = json.loads(cnvmctl("--json", "images", "pull", "--no-tls-verify", REF).stdout)
    assert res["names"] == [REF] and res["layers"] == 2
    # the same image as the layout: config digest = image id, manifest kept as pushed
    info = await lab.call("node1", "images.inspect", {"image": REF})
    assert info["config_digest"] == layout.config_digest
    assert [x["diff_id"] for x in info["layers"]] == layout.diff_ids
    # pinned by digest: the same image, named after the digest
    pinned = f"127.0.0.1:{PORT}/test/busybox@{info['manifest_digest']}"
    res = json.loads(cnvmctl("--json", "images", "pull", "--no-tls-verify", pinned).stdout)
    assert res["full_id"] == info["id"]
    short = info["manifest_digest"].removeprefix("sha256:")[:12]
    assert f"127.0.0.1:{PORT}/test/busybox:sha256-{short}" in res["names"]
    # the staging dir (skopeo's layout, the auth file) is gone
    tmp = labpaths.node_state_dir(LAB, "node1") / "images" / "tmp"
    assert list(tmp.iterdir()) == []

    cnvmctl("deploy", "web", "--image", REF)
    out = cnvmctl("exec", "web", "--", "sh", "-c", "echo pulled-and-running; cat /etc/passwd")
    assert out.stdout.startswith("pulled-and-running\n"), out.stdout
    ls = json.loads(cnvmctl("--json", "ls").stdout)
    assert [(c["name"], c["state"], c["image"]) for c in ls] == [("web", "running", REF)]
    cnvmctl("rm", "--force", "web")


async def test_pull_errors(reglab, tmp_path: Path) -> None:
    lab, _ = reglab
    # unknown tag: skopeo's error, mapped to not_found, in one line
    r = cnvmctl("images", "pull", "--no-tls-verify", f"127.0.0.1:{PORT}/test/busybox:nope",
                check=False)
    assert r.returncode == 1 and "manifest unknown" in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cnvmctl: images pull: skopeo copy failed: ") and "time=" not in last
    # TLS on (the default) against a plain-HTTP registry fails
    r = cnvmctl("images", "pull", REF, check=False)
    assert r.returncode == 1 and "skopeo copy failed" in r.stderr, r.stderr
    # bad references never reach the daemon from the CLI ...
    r = cnvmctl("images", "pull", "Not/A:ref:x", check=False)
    assert r.returncode == 2 and "malformed image reference" in r.stderr
    # ... and the daemon refuses them itself: invalid_argument, and no paths
    for bad in ("--src-creds=a:b", "oci-archive:/etc/shadow", "x\n", "dir:/tmp"):
        with pytest.raises(ProtoError) as e:
            await lab.call("node1", "images.pull", {"ref": bad})
        assert e.value.code == ErrorCode.INVALID_ARGUMENT, bad
    with pytest.raises(ProtoError) as e:
        await lab.call("node1", "images.pull", {"ref": REF, "path": "/etc"})
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    # `images import REF` points to `images pull`
    r = cnvmctl("images", "import", "docker.io/library/busybox:latest", check=False)
    assert r.returncode == 2 and "cnvmctl images pull docker.io/library/busybox:latest" \
        in r.stderr, r.stderr
    # creds travel in an auth file, and work against this (open) registry
    res = json.loads(cnvmctl("--json", "images", "pull", "--no-tls-verify", "--creds",
                             "alice:s3cret", "--name", "withcreds:1", REF).stdout)
    assert res["names"] == ["withcreds:1"] or "withcreds:1" in res["names"]
    log = (labpaths.node_run_dir(LAB, "node1") / "cnvmd.log").read_text()
    assert "s3cret" not in log


async def test_pull_archives(reglab, tmp_path: Path) -> None:
    arch = imagebuild.build_busybox_archive(tmp_path / "bb.oci.tar", tag="v1")
    res = json.loads(cnvmctl("--json", "images", "pull", f"oci-archive:{arch.path}",
                             "--name", "frombox:oci").stdout)
    assert "frombox:oci" in res["names"]
    dsave = imagebuild.build_docker_save(tmp_path / "bb.docker.tar", "cnvm-busybox:7")
    res = json.loads(cnvmctl("--json", "images", "pull",
                             f"docker-archive:{dsave.path}:cnvm-busybox:7").stdout)
    assert "cnvm-busybox:7" in res["names"]
    r = cnvmctl("images", "pull", f"oci-archive:{tmp_path}/missing.tar", check=False)
    assert r.returncode == 2 and "no such file" in r.stderr


BLACKHOLE = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
held = []
while True:
    c, _ = s.accept()
    held.append(c)  # accept, never answer: skopeo waits
"""


async def _skopeo_pids(lab: Lab) -> list[str]:
    r = await lab.exec("node1", ["pgrep", "-f", "skopeo copy"], check=False)
    return r.stdout.split()


async def test_pull_timeout_and_cancel(reglab, tmp_path: Path) -> None:
    """A registry that never answers: the pull's timeout and a client's cancel both kill
    skopeo and leave no staging behind."""
    lab, _ = reglab
    hole = await lab.spawn("node1", [sys.executable, "-c", BLACKHOLE, "5001"],
                           stdout=asyncio.subprocess.PIPE)
    assert hole.stdout is not None
    assert (await asyncio.wait_for(hole.stdout.readline(), 20)).strip() == b"ready"
    ref = "127.0.0.1:5001/stuck/image:1"
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(ProtoError) as e:
        await lab.call("node1", "images.pull", {"ref": ref, "tls_verify": False,
                                                "timeout": 2.0})
    assert e.value.code == ErrorCode.FAILED and "timed out" in e.value.message
    assert asyncio.get_running_loop().time() - t0 < 30
    assert await _skopeo_pids(lab) == []

    from proto.client import Client

    c = await Client.connect(labpaths.node_socket(LAB, "node1"), agent="test")
    try:
        task = asyncio.ensure_future(c.call("images.pull", {"ref": ref, "tls_verify": False}))
        for _ in range(100):  # wait until skopeo runs
            if await _skopeo_pids(lab):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("skopeo never started")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not await _skopeo_pids(lab):
                break
            await asyncio.sleep(0.1)
        assert await _skopeo_pids(lab) == []
    finally:
        await c.aclose()
    tmp = labpaths.node_state_dir(LAB, "node1") / "images" / "tmp"
    for _ in range(50):
        if not list(tmp.iterdir()):
            break
        await asyncio.sleep(0.1)
    assert list(tmp.iterdir()) == []


def _auth_of(pid: int) -> tuple[list[bytes], Path, tuple[int, int], bytes]:
    """skopeo's argv, its --src-authfile, the file's and its dir's modes, its content."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--src-authfile" in argv, argv
    p = Path(argv[argv.index(b"--src-authfile") + 1].decode())
    return (argv, p, (p.stat().st_mode & 0o777, p.parent.stat().st_mode & 0o777),
            p.read_bytes())


def _exists(p: Path) -> bool:
    return p.exists()


async def test_pull_creds_never_on_a_command_line(reglab, tmp_path: Path) -> None:
    """--creds reach skopeo as a 0600 auth file: its argv holds the file, not the
    password (seen while skopeo waits on a registry that never answers)."""
    lab, _ = reglab
    hole = await lab.spawn("node1", [sys.executable, "-c", BLACKHOLE, "5003"],
                           stdout=asyncio.subprocess.PIPE)
    assert hole.stdout is not None
    assert (await asyncio.wait_for(hole.stdout.readline(), 20)).strip() == b"ready"
    from proto.client import Client

    c = await Client.connect(labpaths.node_socket(LAB, "node1"), agent="test")
    try:
        task = asyncio.ensure_future(c.call("images.pull", {
            "ref": "127.0.0.1:5003/x/y:1", "tls_verify": False,
            "creds": "alice:Sup3r-s3cret"}))
        pids: list[str] = []
        for _ in range(100):
            pids = await _skopeo_pids(lab)
            if pids:
                break
            await asyncio.sleep(0.1)
        assert pids, "skopeo never started"
        argv, authfile, modes, body = _auth_of(int(pids[0]))
        assert not any(b"s3cret" in a for a in argv), argv
        assert modes == (0o600, 0o700)  # the file, its staging dir
        assert b"s3cret" not in body  # base64, as auth.json has it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await c.aclose()
    for _ in range(100):
        if not _exists(authfile):
            break
        await asyncio.sleep(0.1)
    assert not _exists(authfile)


async def test_pull_from_a_registry_with_auth(reglab, tmp_path: Path) -> None:
    """A second registry with htpasswd auth: the right creds pull, wrong ones are
    permission_denied, an --authfile works too."""
    import base64
    import warnings

    with warnings.catch_warnings():  # bcrypt through libcrypt; gone in Python 3.13
        warnings.simplefilter("ignore", DeprecationWarning)
        crypt = pytest.importorskip("crypt")

    lab, layout = reglab
    store = labpaths.STATE_BASE / LAB / "registry-auth"
    store.mkdir()
    (tmp_path / "htpasswd").write_text(
        f"alice:{crypt.crypt('wonderland', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    cfg = tmp_path / "registry-auth.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {store}\nhttp:\n  addr: 127.0.0.1:5002\n"
        f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n")
    await lab.spawn("node1", [REGISTRY, "serve", str(cfg)],
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    for _ in range(100):
        r = await lab.exec("node1", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                     "http://127.0.0.1:5002/v2/"], check=False)
        if r.stdout == "401":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("auth registry did not answer")
    ref = "127.0.0.1:5002/private/busybox:2"
    await lab.exec("node1", ["skopeo", "copy", "--dest-tls-verify=false",
                             "--dest-creds", "alice:wonderland",
                             f"oci:{layout.path}:latest", f"docker://{ref}"], timeout=120)
    r = cnvmctl("images", "pull", "--no-tls-verify", ref, check=False)
    assert r.returncode == 1 and "unauthorized" in r.stderr.lower(), r.stderr
    r = cnvmctl("images", "pull", "--no-tls-verify", "--creds", "alice:wrong", ref,
                check=False)
    assert r.returncode == 1, r.stderr
    with pytest.raises(ProtoError) as e:
        await lab.call("node1", "images.pull", {"ref": ref, "tls_verify": False,
                                                "creds": "alice:wrong"})
    assert e.value.code == ErrorCode.PERMISSION_DENIED, e.value
    res = json.loads(cnvmctl("--json", "images", "pull", "--no-tls-verify", "--creds",
                             "alice:wonderland", ref).stdout)
    assert ref in res["names"]
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"127.0.0.1:5002": {
        "auth": base64.b64encode(b"alice:wonderland").decode()}}}))
    res = json.loads(cnvmctl("--json", "images", "pull", "--no-tls-verify", "--authfile",
                             str(auth), "--name", "viaauthfile:1", ref).stdout)
    assert "viaauthfile:1" in res["names"]
    log = (labpaths.node_run_dir(LAB, "node1") / "cnvmd.log").read_text()
    assert "wonderland" not in log
