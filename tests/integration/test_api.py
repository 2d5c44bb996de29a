"""A real cnvmd subprocess on temp paths, driven by cnvmctl and by a raw client.

The raw client below is written only from proto/README.md (struct + msgpack, no
project imports) to keep the documented wire format honest. No namespaces are
needed: containers get a fresh netns from runc's default spec and their own runc
root, so these tests never touch the host's runc state.
"""

from __future__ import annotations

import grp
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cnvmd.state import StateStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("CNVM_SOCKET", None)


# ---------------------------------------------------------------- raw client (README §5)


class Raw:
    """Blocking client exactly as proto/README.md describes the wire format."""

    def __init__(self, path: Path, hello: bool = True, timeout: float = 10) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(str(path))
        if hello:
            self.send({"t": "hello", "proto": 1, "agent": "raw-test"})
            self.server = self.recv()
            assert self.server["t"] == "hello" and self.server["proto"] == 1

    def send(self, obj: dict[str, Any]) -> None:
        body = msgpack.packb(obj)
        self.s.sendall(struct.pack(">I", len(body)) + body)

    def send_bytes(self, b: bytes) -> None:
        self.s.sendall(b)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def recv(self) -> dict[str, Any]:
        (n,) = struct.unpack(">I", self._exact(4))
        return msgpack.unpackb(self._exact(n))

    def call(self, op: str, args: dict[str, Any] | None = None, rid: Any = 1) -> dict[str, Any]:
        self.send({"t": "req", "id": rid, "op": op, "args": args or {}})
        while True:
            m = self.recv()
            if m["t"] == "res" and m["id"] == rid:
                return m

    def recv_until_closed(self) -> list[dict[str, Any]]:
        out = []
        try:
            while True:
                out.append(self.recv())
        except (EOFError, ConnectionResetError):
            return out

    def close(self) -> None:
        self.s.close()


# ---------------------------------------------------------------- daemon process


class Daemon:
    def __init__(self, root: Path, name: str = "apinode", config: str = "") -> None:
        """`config`: extra cnvmd.toml lines (limits, socket_group, ...)."""
        self.root = root
        self.name = name
        self.config = config
        self.socket = root / "run" / "cnvmd.sock"
        self.state_dir = root / "state"
        self.run_dir = root / "run"
        self.runc_root = root / "run" / "runc"
        self.log = root / "cnvmd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> subprocess.Popen[bytes]:
        notify = self.root / f"notify-{uuid.uuid4().hex[:6]}.sock"
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(str(notify))
        ns.settimeout(30)
        env = {**ENV, "NOTIFY_SOCKET": str(notify)}
        # Test daemons share the host netns: the peer listener must not take the
        # fixed port 6783 (lab nodes have their own netns and keep the default).
        cfg = self.root / "cnvmd.toml"
        port = "" if "peer_port" in self.config else "peer_port = 0\n"
        cfg.write_text('listen_address = "127.0.0.1"\n' + port + self.config)
        argv = [PY, "-m", "cnvmd", "--config", str(cfg), "--socket", str(self.socket),
                "--state-dir",
                str(self.state_dir), "--run-dir", str(self.run_dir), "--runc-root",
                str(self.runc_root), "--node-name", self.name, "--log-level", "debug"]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, env=env, stdout=logf, stderr=logf,
                                         stdin=subprocess.DEVNULL)
        try:
            if wait:
                msgs = b""
                while b"READY=1" not in msgs:
                    try:
                        msgs += ns.recv(4096) + b"\n"
                    except TimeoutError:
                        raise AssertionError(f"no READY=1; log:\n{self.log.read_text()}") from None
                assert f"MAINPID={self.proc.pid}".encode() in msgs
        finally:
            ns.close()
            notify.unlink()
        return self.proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([PY, "-m", "cnvmctl", "--socket", str(self.socket), *args],
                           env=ENV, capture_output=True, text=True, timeout=60)
        if check is not None:
            assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
        return r

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl("--json", *args).stdout)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.start()
    try:
        yield d
    finally:
        if d.alive():
            d.proc.kill()  # type: ignore[union-attr]
            d.proc.wait()  # type: ignore[union-attr]


# ---------------------------------------------------------------- cnvmctl


def test_cnvmctl_status_ls_inspect(daemon: Daemon) -> None:
    st = daemon.ctl_json("status")
    assert st["node"] == "apinode"
    assert st["versions"]["runc"] and st["versions"]["kernel"] == os.uname().release
    caps = st["capabilities"]
    assert caps.get("criu_version", "").startswith("4."), caps
    for k in ("mem_dirty_track", "uffd_noncoop", "tcp_repair", "pipe_max_size",
              "lazy_pages_ready"):
        assert k in caps
    human = daemon.ctl("status").stdout
    assert "apinode" in human and "userfaultfd" in human and "lazy pages ready" in human
    assert daemon.ctl_json("ls") == []
    assert daemon.ctl("ls").stdout.split() == ["NAME", "STATE", "PID", "IMAGE", "IP", "MEMORY",
                                               "UPTIME", "RESTARTS"]
    # --json after the command works too
    assert json.loads(daemon.ctl("ls", "--json").stdout) == []
    r = daemon.ctl("inspect", "ghost", check=1)
    assert "no cnvm named 'ghost'" in r.stderr and r.stderr.count("\n") == 1
    r = daemon.ctl("--json", "inspect", "ghost", check=1)
    assert json.loads(r.stdout)["error"]["code"] == "not_found"
    st_sock = daemon.socket.stat()
    assert st_sock.st_mode & 0o777 == 0o660
    try:
        assert st_sock.st_gid == grp.getgrnam("cnvm").gr_gid
    except KeyError:
        pass  # no cnvm group on this host: root-only socket


def test_cnvmctl_exit_codes(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.ctl("nonsense", check=2).stderr
    assert daemon.ctl("inspect", check=2).stderr  # missing NAME
    r = subprocess.run([PY, "-m", "cnvmctl", "--socket", str(tmp_path / "nope.sock"), "status"],
                       env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "is cnvmd running" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([PY, "-m", "cnvmctl", "--lab", "zz9", "--node", "n1", "status"],
                       env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "/zz9/n1/" in r.stderr and "lab" in r.stderr
    r = subprocess.run([PY, "-m", "cnvmctl", "status"], capture_output=True, text=True,
                       timeout=30, env={**ENV, "CNVM_SOCKET": str(daemon.socket)})
    assert r.returncode == 0 and "apinode" in r.stdout
    r = subprocess.run([PY, "-m", "cnvmctl", "--socket", "x", "--node", "y", "ls"], env=ENV,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    r = subprocess.run([PY, "-m", "cnvmctl", "--help"], env=ENV, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "exit status" in r.stdout and "status" in r.stdout


# ---------------------------------------------------------------- raw protocol


def test_raw_client_from_readme(daemon: Daemon) -> None:
    c = Raw(daemon.socket)
    assert c.server["node"] == "apinode"
    st = c.call("status")
    assert st["ok"] and st["result"]["node"] == "apinode"
    # pipelined requests with string and int ids; answers matched by id
    for i in range(20):
        c.send({"t": "req", "id": f"p{i}", "op": "ping", "args": {"data": i}})
    c.send({"t": "req", "id": 99, "op": "ls"})
    got = {}
    while len(got) < 21:
        m = c.recv()
        got[m["id"]] = m
    assert all(got[f"p{i}"]["result"]["data"] == i for i in range(20))
    assert got[99]["ok"] and got[99]["result"] == []
    bad = c.call("inspect", {"name": 5})
    assert not bad["ok"] and bad["error"]["code"] == "invalid_argument"
    unk = c.call("frobnicate", rid=7)
    assert unk["error"]["code"] == "unknown_op" and "status" in unk["error"]["details"]["ops"]
    # the teleport test hooks are refused on a node without fault_injection
    hook = c.call("teleport", {"name": "web", "target": "n2", "hold": {"frozen": 60}})
    assert hook["error"]["code"] == "permission_denied", hook
    assert "fault_injection" in hook["error"]["message"]
    c.close()


def _malformed_cases() -> list[tuple[str, bytes, bool]]:
    """(name, bytes sent after hello (or instead of it), expect connection closed)."""
    hello = msgpack.packb({"t": "hello", "proto": 1, "agent": "x"})
    h = struct.pack(">I", len(hello)) + hello

    def fr(obj: Any) -> bytes:
        b = msgpack.packb(obj)
        return struct.pack(">I", len(b)) + b

    rnd = random.Random(1234)
    return [
        ("random bytes", h + bytes(rnd.randrange(256) for _ in range(4096)), True),
        ("random bytes, no hello", bytes(rnd.randrange(256) for _ in range(512)), True),
        ("huge length prefix", h + struct.pack(">I", 0xFFFFFFFF) + b"abc", True),
        ("17 MiB announced", h + struct.pack(">I", 17 * 1024 * 1024), True),
        ("truncated msgpack", h + struct.pack(">I", 3) + b"\x85\xa1t", True),
        ("array body", h + fr([1, 2, 3]), True),
        ("wrong types", h + fr({"t": "req", "id": [1], "op": 3, "args": "x"}), False),
        ("args not a map", h + fr({"t": "req", "id": 1, "op": "ls", "args": [1]}), False),
        ("unknown op", h + fr({"t": "req", "id": 1, "op": "no-such-op"}), False),
        ("unknown frame type", h + fr({"t": "zzz"}), False),
        ("bad protocol version", fr({"t": "hello", "proto": 999999999999, "agent": "x"}), False),
        ("protocol version 0", fr({"t": "hello", "proto": 0}), True),
        ("protocol version string", fr({"t": "hello", "proto": "1"}), True),
        ("request before hello", fr({"t": "req", "id": 1, "op": "ls"}), True),
    ]


def test_malformed_frames_daemon_keeps_serving(daemon: Daemon) -> None:
    stop = threading.Event()
    errors: list[str] = []
    count = [0]

    def hammer() -> None:
        try:
            c = Raw(daemon.socket)
            i = 0
            while not stop.is_set():
                i += 1
                r = c.call("ping", {"data": i}, rid=i)
                if not r["ok"] or r["result"]["data"] != i:
                    errors.append(repr(r))
                count[0] += 1
            c.close()
        except Exception as exc:
            errors.append(repr(exc))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for name, data, closes in _malformed_cases():
            c = Raw(daemon.socket, hello=False)
            try:
                c.send_bytes(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            if closes:
                frames = c.recv_until_closed()
                res = [f for f in frames if f.get("t") == "res"]
                assert res and res[-1]["ok"] is False, name
                assert res[-1]["error"]["code"] in ("bad_frame", "bad_request",
                                                    "unsupported_version"), (name, res)
            else:
                frames = []
                while not any(f.get("t") == "res" or (f.get("t") == "hello" and
                              "version" in name) for f in frames):
                    frames.append(c.recv())
                if "version" in name:  # too new: server answers with the version it speaks
                    assert frames[0]["proto"] == 1
                else:
                    assert frames[-1]["ok"] is False, name
                    # the connection is still usable after an envelope error
                    assert c.call("ping", rid=123)["ok"], name
            c.close()
            assert daemon.alive(), name
        # a connection that dies mid-frame
        c = Raw(daemon.socket)
        c.send_bytes(struct.pack(">I", 100) + b"\x85")
        c.close()
        # a client that sends many requests and never reads
        c = Raw(daemon.socket)
        for i in range(2000):
            c.send({"t": "req", "id": i, "op": "ping"})
        c.close()
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert count[0] > 10
    assert daemon.alive()
    assert daemon.ctl_json("status")["node"] == "apinode"
    log = daemon.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_concurrent_clients(daemon: Daemon) -> None:
    results: list[bool] = []

    def worker(k: int) -> None:
        c = Raw(daemon.socket)
        for i in range(50):
            c.send({"t": "req", "id": i, "op": "ping", "args": {"data": [k, i]}})
        seen = {}
        while len(seen) < 50:
            m = c.recv()
            seen[m["id"]] = m["result"]["data"]
        results.append(all(seen[i] == [k, i] for i in range(50)))
        c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 16


def test_events_cancel_and_ctrl_c(daemon: Daemon) -> None:
    c = Raw(daemon.socket)
    c.send({"t": "req", "id": "slow", "op": "ping", "args": {"delay": 20}})
    ev = c.recv()
    assert ev["t"] == "evt" and ev["id"] == "slow" and ev["event"] == "progress"
    assert ev["data"]["phase"] == "wait" and ev["data"]["total"] == 20000
    assert c.call("ping", rid="fast")["ok"]  # not delayed by the slow one
    t0 = time.monotonic()
    c.send({"t": "cancel", "id": "slow"})
    while (m := c.recv())["t"] != "res":
        assert m["t"] == "evt"
    assert m["id"] == "slow" and m["error"]["code"] == "cancelled"
    assert time.monotonic() - t0 < 2
    c.close()

    # streamed progress through cnvmctl (stderr is not a tty: one line per phase)
    r = daemon.ctl("ping", "--delay", "0.3")
    assert "wait" in r.stderr and "apinode" in r.stdout
    assert daemon.ctl_json("ping", "-c", "3")["count"] == 3

    # Ctrl-C in cnvmctl cancels the request in the daemon
    p = subprocess.Popen([PY, "-m", "cnvmctl", "--socket", str(daemon.socket), "ping",
                          "--delay", "60"], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 130, err
    for _ in range(50):
        if "op=ping outcome=cancelled" in daemon.log.read_text():
            break
        time.sleep(0.1)
    assert daemon.log.read_text().count("op=ping outcome=cancelled") == 2


# ---------------------------------------------------------------- lifecycle of the daemon


def test_sigterm_clean_exit_and_single_instance(daemon: Daemon, tmp_path: Path) -> None:
    second = Daemon(tmp_path)  # same socket
    p = second.start(wait=False)
    assert p.wait(30) == 1
    assert "already listening" in daemon.log.read_text()
    assert daemon.alive() and daemon.ctl_json("status")["node"] == "apinode"
    c = Raw(daemon.socket)  # an idle connection must not delay shutdown
    busy = Raw(daemon.socket)  # nor a long request: it ends with `unavailable`
    busy.send({"t": "req", "id": 1, "op": "ping", "args": {"delay": 60}})
    assert busy.recv()["t"] == "evt"
    t0 = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5
    assert not daemon.socket.exists()
    assert "msg=stopped" in daemon.log.read_text()
    assert c.recv_until_closed() == []
    c.close()
    res = [m for m in busy.recv_until_closed() if m["t"] == "res"]
    assert res and res[0]["id"] == 1 and res[0]["error"]["code"] == "unavailable"
    busy.close()


def _runc(d: Daemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runc", "--root", str(d.runc_root), *args], capture_output=True,
                          text=True, check=check, stdin=subprocess.DEVNULL, timeout=60)


def _runc_run(d: Daemon, bundle: Path, cid: str) -> None:
    """`runc run -d`: the container inherits runc's stdio, so no pipes (they never close)."""
    subprocess.run(["runc", "--root", str(d.runc_root), "run", "-d", "--bundle", str(bundle),
                    cid], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=60)


@pytest.fixture
def container(daemon: Daemon, busybox_bundle: Callable[..., Path]) -> Iterator[str]:
    """A busybox container started with runc directly in the daemon's runc root,
    plus the cnvm record the lifecycle ops would have written."""
    cid = f"apit{uuid.uuid4().hex[:8]}"
    bundle = busybox_bundle(["/bin/sh", "-c", "while :; do sleep 1; done"])
    _runc_run(daemon, bundle, cid)
    StateStore(daemon.state_dir).save("cnvms", cid, {
        "name": cid, "image": "busybox-test", "ip": "10.100.101.7", "desired": "running",
        "memory": 64 * 1024 * 1024})
    try:
        yield cid
    finally:
        _runc(daemon, "kill", cid, "KILL", check=False)
        for _ in range(50):
            if _runc(daemon, "delete", "-f", cid, check=False).returncode == 0:
                break
            time.sleep(0.1)


def _row(d: Daemon, cid: str) -> dict[str, Any]:
    rows = d.ctl_json("ls")
    return next(r for r in rows if r["name"] == cid)


def test_kill9_restart_adopts_running_container(daemon: Daemon, container: str) -> None:
    row = _row(daemon, container)
    assert row["state"] == "running" and row["managed"] and not row["adopted"]
    assert row["image"] == "busybox-test" and row["ip"] == "10.100.101.7"
    pid = row["pid"]
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert daemon.socket.exists()  # stale socket left behind by the crash
    state = json.loads(_runc(daemon, "state", container).stdout)
    assert state["status"] == "running" and state["pid"] == pid
    os.kill(pid, 0)  # still alive without its daemon

    daemon.start()
    row = _row(daemon, container)
    assert row["state"] == "running" and row["adopted"] is True and row["pid"] == pid
    assert row["uptime"] is not None and row["uptime"] >= 0
    human = daemon.ctl("ls").stdout
    line = next(ln for ln in human.splitlines() if ln.startswith(container))
    assert "running (adopted)" in line and "10.100.101.7" in line
    info = daemon.ctl_json("inspect", container)
    assert info["adoption"]["pid"] == pid and info["record"]["image"] == "busybox-test"
    assert info["runc"]["status"] == "running"
    assert container in daemon.ctl_json("status")["adopted"]
    assert "adopted running container" in daemon.log.read_text()


def test_sigterm_leaves_containers_running(daemon: Daemon, container: str,
                                           busybox_bundle: Callable[..., Path]) -> None:
    pid = _row(daemon, container)["pid"]
    # an unmanaged container (no record) in the same runc root is shown, not hidden
    stray = f"apis{uuid.uuid4().hex[:8]}"
    bundle = busybox_bundle(["/bin/sh", "-c", "while :; do sleep 1; done"], name="stray")
    _runc_run(daemon, bundle, stray)
    try:
        assert daemon.stop(signal.SIGTERM) == 0
        os.kill(pid, 0)
        daemon.start()
        rows = {r["name"]: r for r in daemon.ctl_json("ls")}
        assert rows[container]["adopted"] and rows[container]["pid"] == pid
        assert rows[stray]["managed"] is False and rows[stray]["state"] == "running"
        assert "unmanaged" in daemon.ctl("ls").stdout
        # after the container goes away, its record shows it ended, not running: the
        # exit watcher (cnvmd.restart) marks it exited; the code of an adopted one
        # (not the daemon's child) is unknown
        _runc(daemon, "kill", container, "KILL")
        for _ in range(50):
            if _runc(daemon, "delete", container, check=False).returncode == 0:
                break
            time.sleep(0.1)
        for _ in range(100):
            if _row(daemon, container)["state"] != "missing":
                break
            time.sleep(0.1)
        row = _row(daemon, container)
        assert row["state"] == "exited (?)" and row["exit_code"] is None, row
    finally:
        _runc(daemon, "delete", "-f", stray, check=False)
