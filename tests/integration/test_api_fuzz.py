"""Fuzz lane of the API socket (issue 14): >= 10,000 malformed frames against a running
cnvmd, from a seeded mutator (reproducible: the seed is in the test id).

Frames come in two kinds. *Soft* ones are well-framed maps with hostile content —
wrong types, huge/negative/odd ids, unknown and real ops with random args, NUL and
oversized strings, nesting just inside the limit: the connection must stay usable and
every request must end with a clean error code, never `internal`. *Hard* ones break
the framing — bad lengths, truncation, garbage, non-map bodies, invalid UTF-8, non-str
keys, nesting past the limit: the server answers `bad_frame`/`busy` (or nothing, for a
connection that died mid-frame) and closes. Afterwards: the daemon runs, answers a
ping, logged no traceback, and its RSS grew by less than 50 MB.

Only ops without effects outside the daemon's temp dirs are called (no net.up, join,
cluster.init...): random args must not reconfigure the host. net.status is left out
too: on a host without a default route it fails for any args (a network bug, not an
input one).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.integration.test_api import Daemon, Raw

pytestmark = pytest.mark.integration

MiB = 1 << 20
SAFE_OPS = ["ping", "ops", "status", "ls", "inspect", "images.ls", "images.inspect",
            "images.rm", "images.import", "exposes", "expose", "unexpose", "logs", "exec",
            "stop", "start", "rm", "deploy", "teleport.reports", "teleport.cancel", "nodes",
            "net.ipam"]
ARG_KEYS = ["name", "image", "cmd", "env", "cwd", "stdin", "timeout", "spec", "port", "path",
            "format", "tail", "follow", "force", "time", "memory", "cpus", "hostname", "ip",
            "data", "delay", "count", "x"]
CLEAN = {"bad_request", "unknown_op", "invalid_argument", "not_found", "already_exists",
         "conflict", "busy", "unavailable", "cancelled", "permission_denied", "failed"}
HARD_CLOSE = {"bad_frame", "busy", "bad_request"}


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Mutator:
    """Seeded generator of hostile values, envelopes and framings."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def text(self) -> str:
        r = self.r
        pick = r.random()
        if pick < 0.15:
            return "\0" * r.randint(1, 3) + "x"
        if pick < 0.25:
            return "x" * r.choice([64, 65, 4096, 4097, 70_000, 100_000])
        if pick < 0.35:
            return r.choice(["web\n", "\nweb", "../../etc", "/", "a b", "é", "🙂", "web"])
        alphabet = "abcz09-_./:=\n\t \\\"'$" + "\u00e9\u4e2d\U0001f600"
        return "".join(r.choice(alphabet) for _ in range(r.randint(0, 40)))

    def scalar(self) -> Any:
        r = self.r
        return r.choice([
            lambda: None, lambda: r.random() < 0.5, lambda: r.randint(-5, 5),
            lambda: r.choice([2**63 - 1, -(2**63), 2**64 - 1, 2**32, -1, 0]),
            lambda: r.choice([float("nan"), float("inf"), -0.0, 1e308, 0.5]),
            self.text, lambda: r.randbytes(r.randint(0, 64)),
            lambda: msgpack.ExtType(r.randint(0, 127), r.randbytes(r.randint(0, 8))),
            lambda: msgpack.Timestamp(r.randint(0, 2**33)),
        ])()

    def value(self, depth: int = 0) -> Any:
        r = self.r
        if depth > 4 or r.random() < 0.5:
            return self.scalar()
        if r.random() < 0.5:
            return [self.value(depth + 1) for _ in range(r.randint(0, 5))]
        return {self.text(): self.value(depth + 1) for _ in range(r.randint(0, 5))}

    def nested(self, depth: int) -> Any:
        v: Any = self.scalar()
        for _ in range(depth):
            v = [v] if self.r.random() < 0.5 else {"k": v}
        return v

    def req_id(self) -> Any:
        r = self.r
        return r.choice([
            lambda: r.randint(0, 10**6), lambda: r.choice([2**63 - 1, -(2**63), 2**63, -1]),
            lambda: "i" * r.randint(0, 70), lambda: None, lambda: 1.5, lambda: [1],
            lambda: {"id": 1}, lambda: True, self.scalar])()

    def args(self) -> Any:
        r = self.r
        if r.random() < 0.1:
            return self.value()
        a = {r.choice(ARG_KEYS): self.value() for _ in range(r.randint(0, 5))}
        if r.random() < 0.2:
            a[r.choice(ARG_KEYS)] = self.nested(r.randint(20, 60))  # inside the limit
        if r.random() < 0.1:
            a["cmd"] = [self.text() for _ in range(r.randint(0, 5))]
        return a

    def soft(self) -> dict[str, Any]:
        """A well-framed map that is a bad (or odd) request."""
        r = self.r
        t = r.choice(["req"] * 8 + ["cancel", "hello", "evt", "res", None, 7, ""])
        m: dict[str, Any] = {"t": t}
        if r.random() < 0.95:
            m["id"] = self.req_id()
        if r.random() < 0.95:
            m["op"] = r.choice(SAFE_OPS) if r.random() < 0.8 else self.scalar()
        if r.random() < 0.9:
            m["args"] = self.args()
        for _ in range(r.randint(0, 2)):
            m[self.text()] = self.value()
        return m

    def hard(self) -> tuple[str, bytes]:
        """Bytes that break the framing; (kind, bytes)."""
        r = self.r
        good = msgpack.packb({"t": "req", "id": 1, "op": "ping"})
        kinds: list[tuple[str, Callable[[], bytes]]] = [
            ("garbage", lambda: r.randbytes(r.randint(1, 300))),
            ("garbage-body", lambda: frame(r.randbytes(r.randint(1, 300)))),
            ("empty-body", lambda: frame(b"")),
            ("not-a-map", lambda: frame(msgpack.packb(self.value()) if r.random() < 0.5
                                        else msgpack.packb([1, 2]))),
            ("trailing", lambda: frame(good + b"\x00")),
            ("truncated-msgpack", lambda: frame(good[: r.randint(1, len(good) - 1)])),
            ("over-limit", lambda: struct.pack(">I", r.choice([16 * MiB + 1, 2**32 - 1,
                                                               9 * MiB]))),
            ("short-then-close", lambda: frame(good)[: r.randint(1, len(good) + 3)]),
            ("long-then-close", lambda: struct.pack(">I", len(good) + r.randint(1, 1000))
             + good),
            ("too-deep", lambda: frame(b"\x81\xa1t" + b"\x91" * r.choice(
                [64, 65, 200, 990, 1000, 1020, 1023, 1024, 1025, 5000]) + b"\x00")),
            ("bad-utf8", lambda: frame(b"\x82\xa1t\xa3req\xa2op\xa3\xff\xfe\xfd")),
            ("int-key", lambda: frame(msgpack.packb({1: 2, "t": "req"}))),
            ("bin-key", lambda: frame(b"\x81\xc4\x01t\xa3req")),
            ("huge-map-header", lambda: frame(b"\xdf\xff\xff\xff\xff")),
            ("huge-str-header", lambda: frame(b"\x81\xa1t\xdb\xff\xff\xff\xff")),
        ]
        kind, make = r.choice(kinds)
        return kind, make()


def run_batch(sock: Path, m: Mutator, n_soft: int, errors: list[str]) -> int:
    """One connection: hello, n_soft soft frames, an `end` ping, maybe a hard frame.
    Returns how many fuzzed frames were sent."""
    c = Raw(sock, timeout=15)
    sent = 0
    try:
        body = b"".join(frame(msgpack.packb(m.soft(), use_bin_type=True))
                        for _ in range(n_soft))
        sent += n_soft
        c.send_bytes(body)
        c.send({"t": "req", "id": "end-of-batch", "op": "ping"})
        while True:
            msg = c.recv()
            if msg.get("t") != "res":
                continue
            if not msg["ok"]:
                code = msg["error"]["code"]
                if code not in CLEAN:
                    errors.append(f"soft: {code}: {msg['error']['message'][:200]}")
            if msg["id"] == "end-of-batch":
                if not msg["ok"]:
                    errors.append(f"end ping failed: {msg}")
                break
        if m.r.random() < 0.6:
            kind, data = m.hard()
            sent += 1
            try:
                c.send_bytes(data)
                if kind.endswith("then-close"):
                    return sent
                # random bytes may happen to be a good frame: then this ping answers
                c.send({"t": "req", "id": "after-hard", "op": "ping"})
            except (BrokenPipeError, ConnectionResetError):
                return sent
            while True:
                try:
                    msg = c.recv()
                except (EOFError, ConnectionResetError):
                    break
                if msg.get("t") == "res" and not msg["ok"]:
                    code = msg["error"]["code"]
                    if code not in HARD_CLOSE | CLEAN:
                        errors.append(f"hard {kind}: {code}: {msg['error']['message'][:200]}")
                if msg.get("id") == "after-hard":
                    break
    except (EOFError, OSError) as exc:
        errors.append(f"connection failed: {exc!r}")
    finally:
        c.close()
    return sent


def rss(d: Daemon) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    # a short frame timeout: 9 MiB headers left partial are closed quickly
    d = Daemon(tmp_path, name="safuzz", config="api_frame_timeout = 2.0\n")
    d.start()
    try:
        yield d
    finally:
        if d.alive():
            d.proc.kill()  # type: ignore[union-attr]
            d.proc.wait()  # type: ignore[union-attr]


def fuzz(d: Daemon, seed: int, frames: int, threads: int = 4) -> tuple[int, list[str], float]:
    errors: list[str] = []
    counts = [0] * threads
    per = frames // threads + 1

    def worker(k: int) -> None:
        m = Mutator(seed * 100 + k)
        while counts[k] < per and len(errors) < 50:
            counts[k] += run_batch(d.socket, m, m.r.randint(10, 60), errors)

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert not any(t.is_alive() for t in ts), "fuzz clients hung"
    return sum(counts), errors, time.monotonic() - t0


def check_after(d: Daemon, before: int) -> int:
    assert d.alive(), d.log.read_text()[-3000:]
    c = Raw(d.socket)
    r = c.call("ping", {"data": "after"})
    assert r["ok"] and r["result"]["data"] == "after"
    c.close()
    log = d.log.read_text()
    assert "Traceback" not in log and "outcome=internal" not in log, log[-3000:]
    time.sleep(0.5)
    grown = rss(d) - before
    assert grown < 50 * MiB, f"RSS grew by {grown >> 20} MiB"
    return grown


@pytest.mark.parametrize("seed", [14])
def test_fuzz_api_socket(daemon: Daemon, seed: int) -> None:
    warm = Raw(daemon.socket)
    assert warm.call("status")["ok"]
    warm.close()
    before = rss(daemon)
    sent, errors, took = fuzz(daemon, seed, 10_000)
    grown = check_after(daemon, before)
    print(f"fuzz seed {seed}: {sent} frames in {took:.1f}s, RSS {before >> 20} MiB "
          f"+{grown / MiB:.1f} MiB")
    assert not errors, errors[:20]
    assert sent >= 10_000
    assert took < 60


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_api_socket_long(daemon: Daemon, seed: int) -> None:
    before = rss(daemon)
    sent, errors, _ = fuzz(daemon, seed, 60_000, threads=8)
    check_after(daemon, before)
    assert not errors, errors[:20]
    assert sent >= 60_000


def test_fuzz_connection_churn(daemon: Daemon) -> None:
    """Connections opened and dropped at every stage (before/within the hello, mid-frame)
    leave nothing behind."""
    before = rss(daemon)
    r = random.Random(7)
    hello = frame(msgpack.packb({"t": "hello", "proto": 1, "agent": "churn"}))
    for i in range(2000):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        for _ in range(500):  # a full accept backlog is EAGAIN for a timed socket
            try:
                s.connect(str(daemon.socket))
                break
            except BlockingIOError:
                time.sleep(0.01)
        stage = i % 4
        try:
            if stage >= 1:
                s.sendall(hello[: r.randint(1, len(hello))] if stage == 1 else hello)
            if stage >= 2:
                s.sendall(struct.pack(">I", r.choice([100, 70_000, 8 * MiB])) + b"\x81")
        except OSError:
            pass
        s.close()
    check_after(daemon, before)
