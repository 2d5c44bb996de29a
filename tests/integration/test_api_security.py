"""Issue 14 against a real cnvmd: the API socket's bounds (partial frames, timeouts,
connection cap, nesting), bad input as INVALID_ARGUMENT, exposes of the node's own
ports, and local users kept out of the daemon's files and socket.

Every daemon runs on temp paths (as in test_api.py) under a 0755 base directory, so
that only the modes cnvmd itself sets stand between user `nobody` and its files.
"""

from __future__ import annotations

import io
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cnvmd.state import StateStore
from tests.integration.test_api import Daemon, Raw, _runc, _runc_run

pytestmark = pytest.mark.integration

NOBODY = 65534
MiB = 1 << 20


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable base dir (pytest's tmp dirs are 0700 and would hide all)."""
    d = Path(tempfile.mkdtemp(prefix="sa-api-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start() -> Iterator[Callable[..., Daemon]]:
    """start(root, config="", name=, sock=) -> a running Daemon; all killed at the end."""
    made: list[Daemon] = []

    def go(root: Path, config: str = "", name: str = "sanode",
           sock: Path | None = None) -> Daemon:
        root.mkdir(parents=True, exist_ok=True)
        d = Daemon(root, name=name, config=config)
        if sock is not None:
            d.socket = sock
        made.append(d)
        d.start()
        return d

    try:
        yield go
    finally:
        for d in made:
            if d.alive():
                d.proc.kill()  # type: ignore[union-attr]
                d.proc.wait()  # type: ignore[union-attr]


def rss(d: Daemon) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def hello_bytes() -> bytes:
    body = msgpack.packb({"t": "hello", "proto": 1, "agent": "sa"})
    return struct.pack(">I", len(body)) + body


def closing_error(c: Raw) -> dict[str, Any] | None:
    """Read until the server closes; its last error, if it sent one."""
    errs = [m for m in c.recv_until_closed() if m.get("t") == "res" and not m["ok"]]
    return errs[-1]["error"] if errs else None


def as_user(argv: list[str], gid: int = NOBODY) -> subprocess.CompletedProcess[str]:
    """Run argv as uid `nobody` (group `gid`, no others). Through env(1): setpriv itself
    would exec its target with root's view of the path (seen here: it ran a program
    in a 0700 directory), not the user's."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={gid}", "--clear-groups",
                           "--", "/usr/bin/env", *argv], capture_output=True, text=True,
                          timeout=30)


CONNECT = ("import socket, sys\n"
           "s = socket.socket(socket.AF_UNIX)\n"
           "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
           "    print('refused', e.errno); sys.exit(3)\n"
           "s.sendall(bytes.fromhex(sys.argv[2])); print('connected', s.recv(4096)[:4].hex())\n")


# ------------------------------------------------------------------------ socket bounds


def test_partial_frames_cannot_pile_up(base: Path, start: Callable[..., Daemon]) -> None:
    """20 greeted connections each holding a 15 MiB partial frame raised RSS by 300 MB,
    never released: now such a frame is refused at its header, 8 MiB ones (an exec's
    stdin) share one 32 MiB budget, and partial frames are closed at the timeout."""
    d = start(base / "n", 'api_frame_timeout = 3.0\n')
    warm = Raw(d.socket)
    assert warm.call("ping")["ok"]
    before = rss(d)
    held: list[Raw] = []
    for _ in range(20):
        c = Raw(d.socket)
        try:
            c.send_bytes(struct.pack(">I", 15 * MiB) + b"\x81" + bytes(15 * MiB - 2))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        held.append(c)
    time.sleep(0.5)
    grown15 = rss(d) - before
    for c in held:
        c.close()
    held.clear()
    busy = 0
    for _ in range(20):
        c = Raw(d.socket)
        try:
            c.send_bytes(struct.pack(">I", 8 * MiB) + b"\x81" + bytes(8 * MiB - 2))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        held.append(c)
    time.sleep(0.5)
    grown8 = rss(d) - before
    print(f"RSS before {before >> 20} MiB, +{grown15 >> 20} MiB with 20 x 15 MiB partial "
          f"frames, +{grown8 >> 20} MiB with 20 x 8 MiB")
    assert grown15 < 50 * MiB, grown15
    assert grown8 < 50 * MiB, grown8
    codes = []
    for c in held:  # refused at once (busy) or closed at the frame timeout (bad_frame)
        err = closing_error(c)
        codes.append(err and err["code"])
        busy += codes[-1] == "busy"
        c.close()
    assert set(codes) <= {"busy", "bad_frame"} and 12 <= busy <= 17, codes
    time.sleep(0.5)
    after = rss(d) - before
    print(f"RSS after they closed: +{after >> 20} MiB")
    assert after < 30 * MiB
    assert warm.call("ping", rid=2)["ok"]  # an established client was never disturbed
    assert "Traceback" not in d.log.read_text()


def test_slow_and_idle_connections_are_closed(base: Path,
                                              start: Callable[..., Daemon]) -> None:
    d = start(base / "n", 'api_frame_timeout = 1.5\napi_idle_timeout = 2.5\n')
    drip = Raw(d.socket)
    busy = Raw(d.socket)
    idle = Raw(d.socket)
    busy.send({"t": "req", "id": 1, "op": "ping", "args": {"delay": 4}})
    assert busy.recv()["t"] == "evt"
    frame = msgpack.packb({"t": "req", "id": 1, "op": "ping", "args": {"data": "x" * 200}})
    frame = struct.pack(">I", len(frame)) + frame
    t0 = time.monotonic()
    closed_at = None
    for b in frame[:-1]:  # one byte every 50 ms: would take 10 s
        try:
            drip.send_bytes(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic() - t0
            break
        time.sleep(0.05)
    assert closed_at is not None and 1.4 < closed_at < 4, closed_at
    err = closing_error(drip)
    assert err is not None and err["code"] == "bad_frame", err
    err = closing_error(idle)
    assert err is not None and err["code"] == "unavailable" and "idle" in err["message"]
    assert time.monotonic() - t0 < 6
    while (res := busy.recv())["t"] != "res":  # the request in flight kept its connection
        assert res["t"] == "evt"
    assert res["ok"], res
    for c in (drip, busy, idle):
        c.close()


def test_connection_cap(base: Path, start: Callable[..., Daemon]) -> None:
    d = start(base / "n", "api_max_connections = 24\n")
    conns = [Raw(d.socket) for _ in range(24)]  # root: the reserve is its own
    extra = Raw(d.socket, hello=False)
    err = closing_error(extra)
    assert err is not None and err["code"] == "busy", err
    conns.pop().close()
    time.sleep(0.2)
    again = Raw(d.socket)
    assert again.call("ping")["ok"]
    for c in [*conns, again]:
        c.close()


def test_deep_nesting_is_a_clean_error(base: Path, start: Callable[..., Daemon]) -> None:
    """A deep arg reached a handler's error message: `internal: RecursionError`."""
    d = start(base / "n")
    for op, key in (("expose", "name"), ("inspect", "name"), ("ping", "data"),
                    ("exposes", "name"), ("teleport.reports", "name")):
        c = Raw(d.socket)
        deep = b"\x91" * 999 + b"\x00"  # {"t","id","op", "args": {key: [[[...]]]}}
        body = (b"\x84" + msgpack.packb("t") + msgpack.packb("req") + msgpack.packb("id")
                + msgpack.packb(1) + msgpack.packb("op") + msgpack.packb(op)
                + msgpack.packb("args") + b"\x81" + msgpack.packb(key) + deep)
        c.send_bytes(struct.pack(">I", len(body)) + body)
        err = closing_error(c)
        assert err is not None and err["code"] == "bad_frame" and "deeper" in err["message"]
        c.close()
        c = Raw(d.socket)  # within the limit: a clean invalid_argument, a short message
        v: Any = "x" * 100_000
        for _ in range(40):
            v = [v]
        r = c.call(op, {key: v} if op != "ping" else {key: v, "delay": "soon"})
        assert not r["ok"] and r["error"]["code"] == "invalid_argument", r
        assert len(r["error"]["message"]) < 400
        c.close()
    assert "Traceback" not in d.log.read_text()


# ------------------------------------------------------------------------ bad input


@pytest.fixture
def running(base: Path, start: Callable[..., Daemon],
            busybox_bundle: Callable[..., Path]) -> Iterator[tuple[Daemon, str]]:
    """A daemon with a running busybox container (started with runc, plus a record)."""
    d = start(base / "n")
    cid = f"sa{uuid.uuid4().hex[:8]}"
    _runc_run(d, busybox_bundle(["/bin/sh", "-c", "while :; do sleep 1; done"]), cid)
    StateStore(d.state_dir).save("cnvms", cid, {"name": cid, "desired": "running"})
    try:
        yield d, cid
    finally:
        _runc(d, "kill", cid, "KILL", check=False)
        for _ in range(50):
            if _runc(d, "delete", "-f", cid, check=False).returncode == 0:
                break
            time.sleep(0.1)


def test_bad_input_is_invalid_argument(running: tuple[Daemon, str], tmp_path: Path) -> None:
    d, cid = running
    c = Raw(d.socket)
    assert c.call("exec", {"name": cid, "cmd": ["/bin/echo", "hi"]})["result"]["exit_code"] == 0
    rootfs = tmp_path / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tf:
        ti = tarfile.TarInfo("bin/true")
        ti.size, ti.mode = 3, 0o755
        tf.addfile(ti, io.BytesIO(b"#!\n"))
    assert c.call("images.import", {"path": str(rootfs), "name": "sa-img"})["ok"]
    cases: list[tuple[str, dict[str, Any]]] = [
        ("exec", {"name": cid, "cmd": ["/bin/echo", "a\0b"]}),
        ("exec", {"name": cid, "cmd": ["/bin/echo"], "env": ["A=\0"]}),
        ("exec", {"name": cid, "cmd": ["/bin/echo"], "cwd": "/\0"}),
        ("exec", {"name": cid, "cmd": ["x" * 100_000]}),
        ("exec", {"name": cid, "cmd": ["/bin/echo", "x" * 200_000]}),
        ("exec", {"name": cid, "cmd": ["/bin/echo", *["x" * 60_000] * 40]}),
        ("inspect", {"name": cid + "\n"}),
        ("deploy", {"name": "sadep\n", "image": "sa-img"}),
        ("deploy", {"name": "sadep", "image": "sa-img", "cmd": ["/bin/true", "a\0b"]}),
        ("deploy", {"name": "sadep", "image": "sa-img", "cmd": ["x" * 100_000]}),
        ("deploy", {"name": "sadep", "image": "sa-img", "env": ["A=\0"]}),
        ("deploy", {"name": "sadep", "image": "sa-img", "hostname": "sadep.lab\n"}),
        ("images.import", {"path": str(rootfs), "name": "sa-img2\n"}),
        ("images.import", {"path": str(rootfs) + "\0x"}),
        ("images.rm", {"image": "sa-img\n"}),
        ("stop", {"name": cid + "\n"}),
        ("logs", {"name": cid + "\n"}),
    ]
    try:
        for i, (op, args) in enumerate(cases):
            r = c.call(op, args, rid=i)
            assert not r["ok"], (op, str(args)[:200], r)
            expect = "not_found" if op == "images.rm" else "invalid_argument"
            assert r["error"]["code"] == expect, (op, str(args)[:200], r["error"])
    finally:
        c.call("rm", {"name": "sadep", "force": True}, rid="cleanup")
    assert c.call("exec", {"name": cid, "cmd": ["/bin/echo", "x" * 60_000]}, rid="ok")["ok"]
    # the largest legitimate request still fits: exec with 8 MiB of stdin
    r = c.call("exec", {"name": cid, "cmd": ["/bin/wc", "-c"], "stdin": bytes(8 * MiB)},
               rid="stdin")
    assert r["ok"] and r["result"]["stdout"].strip() == str(8 * MiB), r
    assert "Traceback" not in d.log.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_expose_refuses_the_nodes_own_ports(base: Path, start: Callable[..., Daemon]) -> None:
    peer = _free_port()
    d = start(base / "n", f"peer_port = {peer}\n")
    c = Raw(d.socket)
    with socket.socket() as other:  # any service listening on the node
        other.bind(("0.0.0.0", 0))
        other.listen()
        svc = other.getsockname()[1]
        for spec in ("22:22", f"{peer}:80", f"{peer}:80/udp", "6783:80/udp", f"{svc}:80"):
            r = c.call("expose", {"name": "ghost", "spec": spec}, rid=spec)
            assert r["error"]["code"] == "invalid_argument", (spec, r["error"])
            assert "used by the node" in r["error"]["message"]
    r = c.call("expose", {"name": "ghost", "spec": f"{_free_port()}:80"}, rid="free")
    assert r["error"]["code"] != "invalid_argument", r  # checked, then: no such cnvm


# ------------------------------------------------------------------------ local users


def _suid_rootfs(dest: Path) -> Path:
    """A rootfs tarball whose bin/id is a setuid-root copy of the host's id(1)."""
    data = Path("/usr/bin/id").read_bytes()
    with tarfile.open(dest, "w") as tf:
        ti = tarfile.TarInfo("bin/id")
        ti.size, ti.mode, ti.uid, ti.gid = len(data), 0o4755, 0, 0
        tf.addfile(ti, io.BytesIO(data))
    return dest


def test_local_users_get_nothing(base: Path, start: Callable[..., Daemon]) -> None:
    """`nobody` ran a setuid-root binary from a layer (state dir 0711, store 0755)."""
    d = start(base / "n")
    c = Raw(d.socket)
    r = c.call("images.import", {"path": str(_suid_rootfs(base / "suid.tar")),
                                 "name": "sa-suid", "format": "rootfs"})
    assert r["ok"], r
    info = c.call("images.inspect", {"image": "sa-suid"}, rid=2)["result"]
    suid = Path(info["layer_dirs"][0]) / "bin" / "id"
    assert suid.stat().st_mode & stat.S_ISUID  # the image keeps it: cnvms may need it
    blob = d.state_dir / "images" / "blobs" / "sha256" / info["config_digest"][7:]
    for argv in (["ls", str(d.state_dir)], ["ls", str(d.state_dir / "images" / "layers")],
                 ["cat", str(blob)], ["stat", str(suid)], [str(suid), "-u"],
                 ["ls", str(d.run_dir)]):
        res = as_user(argv)
        assert res.returncode != 0, (argv, res.stdout, res.stderr)
        assert "Permission denied" in res.stderr, (argv, res.stderr)
    res = as_user(["/usr/bin/python3", "-c", CONNECT, str(d.socket), hello_bytes().hex()])
    assert res.returncode == 3 and "refused" in res.stdout, res
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((d.state_dir / "images").stat().st_mode) == 0o700
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660


def test_socket_group_members_only(base: Path, start: Callable[..., Daemon]) -> None:
    """Members of socket_group may use the API, and nothing else of the daemon's."""
    d = start(base / "n", 'socket_group = "nogroup"\n')
    st = d.run_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == NOBODY
    st = d.socket.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
    ok = as_user(["/usr/bin/python3", "-c", CONNECT, str(d.socket), hello_bytes().hex()])
    assert ok.returncode == 0 and "connected" in ok.stdout, ok
    other = as_user(["/usr/bin/python3", "-c", CONNECT, str(d.socket), hello_bytes().hex()],
                    gid=100)
    assert other.returncode == 3, other
    res = as_user(["ls", str(d.state_dir)])
    assert res.returncode != 0 and "Permission denied" in res.stderr
    res = as_user(["ls", str(d.runc_root)])
    assert res.returncode != 0 and "Permission denied" in res.stderr


def test_existing_dirs_are_tightened_at_start(base: Path,
                                              start: Callable[..., Daemon]) -> None:
    """Dirs an older cnvmd made (state 0711, store 0755, run 0755) are re-moded; a
    shared directory that merely holds the socket is not."""
    root = base / "n"
    state, run = root / "state", root / "run"
    for p in (state / "images" / "layers" / "x", state / "images" / "blobs" / "sha256",
              state / "cnvms", run / "runc"):
        p.mkdir(parents=True)
    for p in (state / "images", state / "images" / "layers", state / "images" / "layers" / "x",
              state / "images" / "blobs", state / "cnvms", run):
        p.chmod(0o755)
    state.chmod(0o711)
    (run / "runc").chmod(0o700)
    d = start(root)
    for p in (state, state / "images", state / "images" / "layers", state / "cnvms", run):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    d.stop()
    # a shared socket directory (like /tmp): left as it is, only the socket is ours
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "someone-elses").write_text("x")
    d2 = start(base / "m", name="sanode2", sock=shared / "sa.sock")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    sock = shared / "sa.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert Raw(sock).call("ping")["ok"]
    assert "left as it is" in d2.log.read_text()
