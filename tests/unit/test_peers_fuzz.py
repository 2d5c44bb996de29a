"""Fuzz lanes of the peer port (issue 14), in process: malformed input before
authentication (raw TCP garbage, SSH-level junk, junk on the enrolment channel) and
random/mutated frames on a member's ``cnvm-rpc`` channel after authentication.

A seeded mutator (reproducible: the seed is in every assertion message) rather than
hypothesis, because each lane is one long conversation with a live node. Checked: no
crash, no hang (every step is time-bounded), no ``internal`` error, the table is
unchanged, memory stays within +50 MB, other members' calls keep working, and a
member's RPC answers afterwards. The generators are shared with
tests/integration/test_peers_security.py, which runs the same lanes against cnvmd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import msgpack
import pytest

from cnvmd.config import Config
from cnvmd.peers import PeerService
from proto.framing import FrameDecoder, FrameError

pytestmark = pytest.mark.unit

FAST = {"gossip_interval": 0.2, "suspect_after": 0.8, "down_after": 1.6}
SEED = int(os.environ.get("CNVM_FUZZ_SEED", "14"))
FRAMES = 10_000
MB = 1 << 20

ACCEPTABLE = {"bad_frame", "bad_request", "invalid_argument", "unknown_op",
              "permission_denied", "not_found", "unavailable", "busy", "conflict", "cancelled"}
"""Error codes a junk frame may get. Never ``internal``."""


# -- generators (shared with the integration lane) -----------------------------------------


class Mutator:
    """Random msgpack values and mutations of real frames, from one seeded Random."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def scalar(self) -> Any:
        r = self.r
        return r.choice([
            lambda: None, lambda: r.random() < 0.5, lambda: r.randint(-5, 70000),
            lambda: r.choice([-(1 << 63), (1 << 63) - 1, (1 << 64) - 1, 1 << 62, -1, 0]),
            lambda: r.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0,
                              r.uniform(-1e9, 1e9)]),
            lambda: "".join(chr(r.randrange(1, 0x2FFF)) for _ in range(r.randrange(0, 40))),
            lambda: r.choice(["", "..", "/", "\0", "node1", "_enroll", "active", "removed",
                              "x" * r.randrange(60, 5000), "ssh-ed25519 AAAA", "127.0.0.1"]),
            lambda: r.randbytes(r.randrange(0, 64)),
            lambda: r.randbytes(r.choice([32, 1024, 70000])),
        ])()

    def value(self, depth: int = 0) -> Any:
        r = self.r
        if depth >= 3 or r.random() < 0.6:
            return self.scalar()
        if r.random() < 0.5:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 6))]
        return {self.key(): self.value(depth + 1) for _ in range(r.randrange(0, 6))}

    def key(self) -> str:
        return self.r.choice(["t", "id", "op", "args", "name", "pubkey", "epoch", "admin",
                              "cert", "removal", "sig", "by", "cluster", "members", "secret",
                              "record", "echo", "token_id", "data", "caps", "cnvms", "port",
                              "x" * self.r.randrange(1, 300)])

    def mutate(self, obj: Any, depth: int = 0) -> Any:
        """A copy of ``obj`` with a few random changes at any depth."""
        r = self.r
        if isinstance(obj, dict):
            out = dict(obj)
            for _ in range(r.randrange(1, 3)):
                choice = r.random()
                if out and choice < 0.25:
                    out.pop(r.choice(list(out)))
                elif out and choice < 0.75:
                    k = r.choice(list(out))
                    out[k] = self.mutate(out[k], depth + 1) if r.random() < 0.6 else self.value()
                else:
                    out[self.key()] = self.value()
            return out
        if isinstance(obj, list):
            out_l = list(obj)
            if out_l and r.random() < 0.5:
                i = r.randrange(len(out_l))
                out_l[i] = self.mutate(out_l[i], depth + 1)
            elif r.random() < 0.5:
                out_l.append(self.value())
            elif out_l:
                out_l.pop()
            return out_l
        if isinstance(obj, int) and not isinstance(obj, bool) and r.random() < 0.5:
            return obj + r.choice([1, -1, 1 << 40, -(1 << 40)])
        return self.value()


def packb(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class RpcFuzzer:
    """Builds batches of peer-RPC frames from templates of real requests.

    ``batch()`` returns (bytes to send, request ids a reply must come for, frames in
    it, whether the last frame breaks the framing and so ends the channel)."""

    def __init__(self, seed: int, templates: dict[str, dict[str, Any]]) -> None:
        self.m = Mutator(seed)
        self.templates = templates
        self.next_id = 1

    def _request(self) -> tuple[dict[str, Any], int | None]:
        m, r = self.m, self.m.r
        rid = self.next_id
        self.next_id += 1
        roll = r.random()
        if roll < 0.55:
            op = r.choice(list(self.templates))
            args = self.templates[op]
            if op == "peer.forward":  # only "data" varies: forwarded API ops are real ops
                args = {"op": r.choice(["ping", "no.such.op", m.scalar()]),
                        "args": {"data": m.value()}}
            elif r.random() < 0.9:
                args = m.mutate(args)
            return {"t": "req", "id": rid, "op": op, "args": args}, rid
        if roll < 0.7:
            return {"t": "req", "id": rid, "op": r.choice(["", "peer.", "x" * 100, "peer.ping2",
                                                          "teleport.nope", "\0"]),
                    "args": m.value()}, rid
        if roll < 0.8:
            return {"t": "cancel", "id": r.choice([rid, -1, "x", 1 << 70 >> 10])}, None
        env = m.mutate({"t": "req", "id": rid, "op": "peer.ping", "args": {}})
        return env, None  # a broken envelope: at most an error with no usable id

    def batch(self, size: int) -> tuple[bytes, set[int], int, bool]:
        r = self.m.r
        out: list[bytes] = []
        ids: set[int] = set()
        for _ in range(size):
            obj, rid = self._request()
            try:
                out.append(frame(packb(obj)))
            except (OverflowError, ValueError, TypeError):
                continue
            if rid is not None and obj.get("t") == "req" and isinstance(obj.get("op"), str) \
                    and obj["op"] and isinstance(obj.get("args", {}), dict | type(None)):
                ids.add(rid)
        fatal = r.random() < 0.15
        if fatal:
            out.append(r.choice([
                struct.pack(">I", 0xFFFFFFFF),                      # oversized header
                frame(b""),                                         # empty body
                frame(r.randbytes(r.randrange(1, 200))),            # not msgpack
                frame(packb([1, 2, 3])),                            # not a map
                frame(packb(r.randrange(1 << 30))),
                frame(b"\x91" * 200 + b"\xc0"),                     # deep nesting
            ]))
        return b"".join(out), ids, len(out), fatal


def kexinit(r: random.Random) -> bytes:
    """A plaintext SSH_MSG_KEXINIT whose name-lists are junk (or nearly right)."""
    def namelist() -> bytes:
        names = r.choice([b"curve25519-sha256", b"", b"x" * r.randrange(1, 3000),
                          b",".join(r.randbytes(5) for _ in range(r.randrange(1, 50)))])
        return struct.pack(">I", len(names)) + names
    body = bytes([20]) + r.randbytes(16) + b"".join(namelist() for _ in range(10))
    return body + bytes([r.randrange(2)]) + b"\0\0\0\0"


def ssh_packet(r: random.Random, payload: bytes) -> bytes:
    pad = 8 - (5 + len(payload)) % 8 + 8 * r.randrange(2)
    if pad < 4:
        pad += 8
    return struct.pack(">IB", 1 + len(payload) + pad, pad) + payload + r.randbytes(pad)


def preauth_junk(r: random.Random) -> tuple[bytes, int]:
    """What one junk connection sends before any authentication, and how many
    malformed frames (lines or SSH packets) that is."""
    banner = b"SSH-2.0-fuzz_" + str(r.randrange(1000)).encode() + b"\r\n"
    kind = r.randrange(8)
    if kind == 0:
        return r.randbytes(r.randrange(1, 4096)), 1
    if kind == 1:
        return r.choice([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"SSH-1.5-old\r\n",
                         b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + r.randbytes(200),
                         b"SSH-2.0-" + b"v" * 300 + b"\r\n", b"\r\n" * 50,
                         b"x" * 9000]), 1
    if kind == 2:
        return banner + r.randbytes(r.randrange(1, 2048)), 1
    if kind == 3:  # random packet lengths
        n = r.randrange(1, 10)
        return banner + b"".join(struct.pack(">I", r.randrange(1 << 32)) + r.randbytes(
            r.randrange(0, 64)) for _ in range(n)), n
    if kind in (4, 5):  # well-formed plaintext packets with junk messages
        n = r.randrange(1, 25)
        pkts = []
        for _ in range(n):
            msg = bytes([r.choice([1, 2, 3, 4, 5, 6, 20, 21, 30, 31, 50, 80, 90, 94, 97,
                                   r.randrange(256)])]) + r.randbytes(r.randrange(0, 300))
            pkts.append(ssh_packet(r, msg))
        return banner + b"".join(pkts), n
    if kind == 6:
        n = r.randrange(1, 6)
        return banner + b"".join(ssh_packet(r, kexinit(r)) for _ in range(n)), n
    return banner + ssh_packet(r, r.randbytes(r.randrange(0, 35000))), 1


async def junk_connection(port: int, data: bytes, src: str, timeout: float = 3.0) -> None:
    """Send ``data`` then EOF; read until the server closes (or give up)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), timeout)
    except (OSError, TimeoutError):
        return
    try:
        with contextlib.suppress(OSError):
            writer.write(data)
            writer.write_eof()
            await writer.drain()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(timeout):
                while await reader.read(65536):
                    pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def enroll_junk(m: Mutator) -> list[bytes]:
    """Frames an unenrolled peer sends on cnvm-enroll: mutated enroll1/enroll3, junk."""
    r = m.r
    good1 = {"t": "enroll1", "payload": r.randbytes(60), "node": "x1", "nonce": r.randbytes(32)}
    good3 = {"t": "enroll3", "proof": r.randbytes(32), "addr": "127.0.0.1", "port": 1,
             "caps": {}}
    out = []
    for _ in range(r.randrange(1, 4)):
        roll = r.random()
        if roll < 0.6:
            with contextlib.suppress(OverflowError, ValueError, TypeError):
                out.append(frame(packb(m.mutate(r.choice([good1, good3])))))
        elif roll < 0.8:
            out.append(struct.pack(">I", r.choice([15 << 20, 1 << 31, 70000])) + r.randbytes(100))
        else:
            out.append(r.randbytes(r.randrange(1, 500)))
    return out


async def auth_junk(port: int, m: Mutator, src: str) -> int:
    """One SSH-level junk session: a random user with a random key, or the enrolment
    user sending junk frames; returns the malformed frames sent."""
    r = m.r
    user = r.choice(["_enroll", "_enroll", "node2", "root", "", "x" * 200, "n\0de",
                     "ünï", m.key()])
    sent = 1
    try:
        async with asyncio.timeout(5):
            conn = await asyncssh.connect(
                "127.0.0.1", port, username=user, local_addr=(src, 0),
                client_keys=[asyncssh.generate_private_key("ssh-ed25519")], known_hosts=None,
                agent_path=None, config=None, preferred_auth="publickey")
            async with conn:
                sub = "cnvm-enroll" if r.random() < 0.85 else r.choice(["cnvm-rpc", "sftp",
                                                                        "cnvm-stream"])
                w, rd, _ = await conn.open_session(subsystem=sub, encoding=None)
                for chunk in enroll_junk(m):
                    w.write(chunk)
                    sent += 1
                w.write_eof()
                while await rd.read(65536):
                    pass
    except Exception:
        pass
    return sent


# -- helpers -----------------------------------------------------------------------------


def rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(pred: Callable[[], bool], timeout: float = 8.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.05)


def drop_link(svc: PeerService, node: str) -> None:
    """Forget the cached connection, so the next call dials anew."""
    transport = getattr(svc, "transport", None)
    if transport is not None:
        transport.drop_link(node)
    else:  # older layout
        svc._drop_link(node)  # type: ignore[attr-defined]


def gossip_payload(svc: PeerService) -> dict[str, Any]:
    gossip = getattr(svc, "gossip", None)
    if gossip is not None:
        return dict(gossip.payload())
    return dict(svc._gossip_payload())  # type: ignore[attr-defined]  # older layout


def identities(svc: PeerService) -> dict[str, tuple[str, int, str, str]]:
    return {m.name: (m.pubkey, m.epoch, m.admin, m.addr) for m in svc.membership.records.values()}


class Nodes:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.svcs: dict[str, PeerService] = {}
        self.ports: dict[str, int] = {}

    async def start(self, name: str) -> PeerService:
        port = self.ports.setdefault(name, free_port())
        svc = PeerService(Config(node_name=name, state_dir=self.root / name,
                                 listen_address="127.0.0.1", peer_port=port),
                          **FAST)  # type: ignore[arg-type]
        await svc.start()
        self.svcs[name] = svc
        return svc

    async def stop_all(self) -> None:
        for n in list(self.svcs):
            await self.svcs.pop(n).stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Nodes]:
    nodes = Nodes(tmp_path)
    try:
        n1, n2, n3 = [await nodes.start(n) for n in ("node1", "node2", "node3")]
        await n1.cluster_init()
        for s in (n2, n3):
            await s.join(f"127.0.0.1:{nodes.ports['node1']}", (await n1.mint_token())["token"])
        await wait_for(lambda: all(len(s.nodes()) == 3 and all(
            n["state"] == "alive" for n in s.nodes()) for s in (n1, n2, n3)), what="cluster")
        yield nodes
    finally:
        await nodes.stop_all()


class Pinger:
    """Another member calling the fuzzed node all along: its calls must all answer."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.ok = 0
        self.errors: list[str] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.call()
                self.ok += 1
            except Exception as exc:
                self.errors.append(repr(exc))
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def rpc_templates(payload: dict[str, Any], record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Real requests of every built-in peer op, to mutate."""
    return {"peer.ping": {"echo": "hi"}, "peer.nodes": {}, "peer.gossip": payload,
            "peer.token.consume": {"token_id": "ab" * 16},
            "peer.removed": {"record": {**record, "admin": "removed",
                                        "removal": {"by": "node3", "sig": "AAAA"}}},
            "peer.forward": {"op": "ping", "args": {}}}


async def fuzz_rpc_channel(conn: asyncssh.SSHClientConnection, fuzzer: RpcFuzzer,
                           frames: int) -> dict[str, int]:
    """Send ``frames`` fuzz frames on cnvm-rpc channels of ``conn`` (a new channel
    whenever a framing error closed the last one); returns the reply codes seen."""
    codes: dict[str, int] = {}
    sent = 0
    w: Any = None
    rd: Any = None
    dec = FrameDecoder()
    while sent < frames:
        if w is None:
            w, rd, _ = await conn.open_session(subsystem="cnvm-rpc", encoding=None)
            dec = FrameDecoder()
        data, ids, n, fatal = fuzzer.batch(50)
        sent += n
        w.write(data)
        pending = set(ids)
        try:
            async with asyncio.timeout(15):
                while pending or fatal:
                    chunk = await rd.read(1 << 20)
                    if not chunk:
                        break
                    for msg in dec.feed(chunk):
                        if msg.get("t") != "res":
                            continue
                        if msg.get("ok"):
                            codes["ok"] = codes.get("ok", 0) + 1
                        else:
                            code = str((msg.get("error") or {}).get("code"))
                            codes[code] = codes.get(code, 0) + 1
                        pending.discard(msg.get("id"))  # type: ignore[arg-type]
        except TimeoutError:
            raise AssertionError(f"seed {SEED}: no reply for {sorted(pending)[:5]} "
                                 f"after {sent} frames (hang)") from None
        except FrameError as exc:
            raise AssertionError(f"seed {SEED}: the node sent bad framing: {exc}") from None
        if fatal or pending:
            assert fatal, f"seed {SEED}: channel closed with {len(pending)} unanswered"
            w.close()
            w = None
    if w is not None:
        w.close()
    return codes


# -- the lanes ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_fuzz_rpc_after_auth(cluster: Nodes) -> None:
    """10,000+ random/mutated frames from an authenticated member (node3) on cnvm-rpc
    to node1: no internal error, no hang, table unchanged, node2's calls all answered,
    memory within +50 MB, node1 answers afterwards."""
    n1, n2, n3 = (cluster.svcs[n] for n in ("node1", "node2", "node3"))
    before = identities(n1)
    assert n3.key is not None and n1.cluster is not None
    record = n1.membership.get("node1")
    assert record is not None
    fuzzer = RpcFuzzer(SEED, rpc_templates(gossip_payload(n1), record.to_wire()))
    pinger = Pinger(lambda: n2.call("node1", "peer.ping", timeout=5))
    rss0 = rss()
    conn = await asyncssh.connect("127.0.0.1", cluster.ports["node1"], username="node3",
                                  client_keys=[n3.key], known_hosts=None, agent_path=None,
                                  config=None)
    try:
        t0 = time.monotonic()
        codes = await fuzz_rpc_channel(conn, fuzzer, FRAMES)
        took = time.monotonic() - t0
    finally:
        conn.close()
        await pinger.stop()
    grew = rss() - rss0
    assert "internal" not in codes, f"seed {SEED}: {codes}"
    assert set(codes) <= ACCEPTABLE | {"ok"}, f"seed {SEED}: {codes}"
    assert codes.get("invalid_argument", 0) > 100 and codes.get("ok", 0) > 100, codes
    assert not pinger.errors and pinger.ok > 10, pinger.errors[:3]
    assert identities(n1) == before and n1.cluster.epoch == 1
    assert grew < 50 * MB, f"RSS grew by {grew / MB:.0f} MB"
    assert (await n2.call("node1", "peer.ping", timeout=5))["node"] == "node1"
    print(f"rpc fuzz: {fuzzer.next_id - 1} requests, {took:.1f}s, RSS {grew / MB:+.1f} MB, "
          f"codes {codes}")


@pytest.mark.slow
async def test_fuzz_peer_port_before_auth(cluster: Nodes) -> None:
    """10,000+ malformed frames before authentication: raw TCP garbage and SSH-level
    junk (plaintext packets, junk KEXINITs), then SSH sessions with random users and
    junk on the enrolment channel. Members keep calling throughout; afterwards every
    slot is free, memory is within +50 MB and a member dialling anew gets an answer."""
    n1, n2 = cluster.svcs["node1"], cluster.svcs["node2"]
    port = cluster.ports["node1"]
    before = identities(n1)
    pinger = Pinger(lambda: n2.call("node1", "peer.ping", timeout=5))
    rss0 = rss()
    r = random.Random(SEED)
    m = Mutator(SEED)
    counts = {"tcp": 0, "ssh": 0}

    async def worker(i: int) -> None:
        src = f"127.0.2.{i + 1}"
        while counts["tcp"] < FRAMES:
            data, n = preauth_junk(r)
            counts["tcp"] += n
            await junk_connection(port, data, src)

    async def ssh_worker(i: int, sessions: int) -> None:
        for _ in range(sessions):
            n = await auth_junk(port, m, f"127.0.4.{i + 1}")
            counts["ssh"] += n

    t0 = time.monotonic()
    try:
        async with asyncio.timeout(240):
            await asyncio.gather(*(worker(i) for i in range(16)))
            await asyncio.gather(*(ssh_worker(i, 25) for i in range(8)))
    finally:
        await pinger.stop()
    took = time.monotonic() - t0
    grew = rss() - rss0
    assert counts["tcp"] >= FRAMES
    assert not pinger.errors and pinger.ok > 10, pinger.errors[:3]
    assert identities(n1) == before
    assert grew < 50 * MB, f"RSS grew by {grew / MB:.0f} MB"
    await asyncio.sleep(1)
    drop_link(n2, "node1")
    assert (await n2.call("node1", "peer.ping", timeout=5))["node"] == "node1"
    await wait_for(lambda: n1.transport.preauth.count == 0 and n1.transport.enrolling.count == 0,
                   timeout=15, what="pre-auth slots freed")
    print(f"pre-auth fuzz: {counts} frames in {took:.1f}s, RSS {grew / MB:+.1f} MB")
