"""PeerService: the node's SSH server, its cached client links, gossip, RPC and streams.

One asyncssh server per node (underlay address, ``peer_port``) and at most one
outgoing connection per peer, reused for everything: a multiplexed RPC channel
(``cnvm-rpc``: proto framing + req/res/evt/cancel envelopes) and one fresh channel
per bulk stream (``cnvm-stream``). Members authenticate with their pinned keys
only; an unenrolled node may only open the ``cnvm-enroll`` channel as user
``_enroll`` and must prove it holds a valid token (see trust.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import random
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from cnvmd.config import Config
from cnvmd.state import StateStore
from proto.framing import FrameDecoder, FrameError, encode_frame, read_frame
from proto.messages import (
    ErrorCode,
    ProtoError,
    cancel,
    error_response,
    event,
    request,
    response,
)

from . import streams, trust
from .membership import ACTIVE, ALIVE, DOWN, REMOVED, Member, MemberEvent, Membership

log = logging.getLogger("cnvmd.peers")

ENROLL_USER = "_enroll"
SUB_RPC = "cnvm-rpc"
SUB_STREAM = "cnvm-stream"
SUB_ENROLL = "cnvm-enroll"
_STATE_KIND = "peers"
MAX_UNAUTHENTICATED = 64
"""Connections allowed to sit before authentication (login_timeout closes them)."""

PeerHandler = Callable[[dict[str, Any], "CallContext"], Awaitable[Any]]
StreamHandler = Callable[[streams.PeerStream, dict[str, Any]], Awaitable[Any]]
ForwardHandler = Callable[[str, dict[str, Any], Callable[[str, dict[str, Any]], None]],
                          Awaitable[Any]]


@dataclass
class Tuning:
    """SSH knobs. AES-GCM first: ~1.7x chacha20 here (AES-NI); big windows for bulk."""

    encryption_algs: tuple[str, ...] = (
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
        "aes128-ctr", "aes256-ctr")
    window: int = 8 * 1024 * 1024
    max_pktsize: int = 128 * 1024
    """128 KiB packets: 4x fewer per-packet Python passes (2x MB/s per CPU measured in
    bench/peer_throughput.py), affordable once the malloc thresholds are raised."""
    connect_timeout: float = 3.0
    login_timeout: float = 10.0
    keepalive_interval: float = 5.0
    skip_ignore: bool = True
    """Drop asyncssh's empty MSG_IGNORE before each packet on AEAD ciphers (a CBC-era
    countermeasure, pointless with GCM/ChaCha: +10 % MB/s per CPU at 128 KiB packets,
    +40 % at 32 KiB). Wraps a private asyncssh method, process-wide, only when its
    signature is the one this was written against (2.24); otherwise nothing changes."""
    malloc_thresholds: bool = True
    """mallopt(M_MMAP_THRESHOLD=32M, M_TRIM_THRESHOLD=256M) at start, as the
    MALLOC_*_ env vars of platform.md would: stops glibc from mmap/munmap-ing every
    large packet buffer. Process-wide."""

    def options(self) -> dict[str, Any]:
        """Options common to our server and client connections (no GSSAPI, no compression:
        keys only, and compression costs CPU on already-compressed CRIU pages)."""
        return {"encryption_algs": list(self.encryption_algs), "compression_algs": ["none"],
                "window": self.window, "max_pktsize": self.max_pktsize, "gss_host": None}


_AEAD = ("GCMEncryption", "ChachaEncryption")


def install_skip_ignore() -> bool:
    """Wrap asyncssh's send_packet so that empty MSG_IGNOREs are not sent when the
    connection's cipher is an AEAD. Returns False if asyncssh changed shape."""
    from asyncssh import connection as _c
    from asyncssh.constants import MSG_IGNORE

    orig = getattr(_c.SSHConnection, "send_packet", None)
    if orig is None:
        return False
    if getattr(orig, "_cnvm_wrapped", False):
        return True
    import inspect

    params = list(inspect.signature(orig).parameters)
    if params != ["self", "pkttype", "args", "handler"]:
        return False
    empty = b"\0\0\0\0"

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (pkttype == MSG_IGNORE and args == (empty,)
                and type(getattr(self, "_send_encryption", None)).__name__ in _AEAD):
            return
        orig(self, pkttype, *args, handler=handler)

    send_packet._cnvm_wrapped = True  # type: ignore[attr-defined]
    _c.SSHConnection.send_packet = send_packet  # type: ignore[method-assign]
    return True


def install_malloc_thresholds(mmap: int = 32 << 20, trim: int = 256 << 20) -> bool:
    """glibc only; a no-op elsewhere. Same effect as MALLOC_MMAP_THRESHOLD_ etc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: no ldconfig subprocess
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, mmap)) and bool(
            libc.mallopt(m_trim_threshold, trim))
    except (OSError, AttributeError):
        return False


@dataclass
class CallContext:
    """What a peer-op handler knows about its caller; ``emit`` streams progress events."""

    node: str
    emit: Callable[[str, dict[str, Any]], None] = field(default=lambda _n, _d: None)


class _Link:
    """A cached outgoing connection to one peer with its multiplexed RPC channel."""

    def __init__(self, node: str, conn: asyncssh.SSHClientConnection,
                 writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]) -> None:
        self.node = node
        self.conn = conn
        self.writer = writer
        self.reader = reader
        self.pending: dict[int, tuple[asyncio.Future[Any], Any]] = {}
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def fail_all(self, exc: Exception) -> None:
        self.closed = True
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()

    def close(self) -> None:
        self.closed = True
        self.conn.close()


class _ServerConn(asyncssh.SSHServer):
    """Per-connection server object: authentication decisions and refusal logging."""

    def __init__(self, svc: PeerService) -> None:
        self.svc = svc
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.node: str | None = None
        self.enroll_key: asyncssh.SSHKey | None = None
        self.authed = False
        self.refused = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        pn = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{pn[0]}:{pn[1]}"
        pending = sum(1 for sc in self.svc._server_conns.values() if not sc.authed)
        self.svc._server_conns[conn] = self
        if pending >= MAX_UNAUTHENTICATED:
            # A flood of half-open or junk connections must not starve members.
            self.refused = True
            log.warning("peer port: %s refused: %d connections already awaiting "
                        "authentication", self.peer, pending)
            conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.authed and not self.refused:
            log.warning("peer port: connection from %s refused/closed before authentication%s",
                        self.peer, f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        svc = self.svc
        if username == ENROLL_USER:
            if svc.cluster is None:
                self.refused = True
                log.warning("enrolment attempt from %s refused: this node is in no cluster",
                            self.peer)
                return False
            self.enroll_key = key
            return True
        pinned = svc.membership.pinned_key(username)
        if (svc.cluster is not None and pinned is not None and username != svc.name
                and trust.same_key(key, pinned)):
            self.node = username
            return True
        self.refused = True
        log.warning("peer port: refused %s from %s: key %s is not the pinned key of an "
                    "enrolled member", username, self.peer, key.get_fingerprint("sha256"))
        return False

    def auth_completed(self) -> None:
        self.authed = True
        log.debug("peer port: %s authenticated from %s", self.node or ENROLL_USER, self.peer)

    def connection_requested(self, *_a: Any) -> bool:
        return False

    def server_requested(self, *_a: Any) -> bool:
        return False


class PeerService:
    """Everything peer-to-peer for one node. The daemon calls start() and stop()."""

    def __init__(
        self,
        config: Config,
        *,
        advertise_address: str | None = None,
        gossip_interval: float = 1.0,
        suspect_after: float = 3.0,
        down_after: float = 6.0,
        capabilities: dict[str, Any] | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        self.config = config
        self.name = config.node_name
        self.tuning = tuning or Tuning()
        self.gossip_interval = gossip_interval
        self.capabilities = dict(capabilities or {})
        listen = config.listen_address
        self.advertise_address = advertise_address or (
            listen if listen not in ("0.0.0.0", "::", "") else "")
        self.dir = Path(config.state_dir) / _STATE_KIND
        self.store = StateStore(Path(config.state_dir))
        self.membership = Membership(self.name, suspect_after=suspect_after,
                                     down_after=down_after)
        self.cluster: trust.Cluster | None = None
        self.ledger = trust.TokenLedger()
        self.key: asyncssh.SSHKey | None = None
        self.port = config.peer_port
        self.allowed_roots: list[Path] = [Path(config.state_dir)]
        self._server: asyncssh.SSHAcceptor | None = None
        self._server_conns: weakref.WeakKeyDictionary[Any, _ServerConn] = \
            weakref.WeakKeyDictionary()
        self._links: dict[str, _Link] = {}
        self._link_locks: dict[str, asyncio.Lock] = {}
        self._ids = itertools.count(1)
        self._ops: dict[str, PeerHandler] = {}
        self._stream_kinds: dict[str, StreamHandler] = {}
        self._forward: ForwardHandler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gossiping: set[str] = set()
        self._gossip_task: asyncio.Task[None] | None = None
        self._save_lock = asyncio.Lock()
        self._write_fut: asyncio.Future[None] | None = None
        self._round = 0
        self._started = False
        self.ready = asyncio.Event()  # set once state is loaded and the port is open
        self._loaded = False
        self._register_builtins()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Persisted state is loaded and the port is open."""
        return self._started

    async def start(self) -> None:
        """Load keys and state, listen, and start gossiping (rejoins by itself)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if self.tuning.malloc_thresholds and not install_malloc_thresholds():
            log.info("peers: mallopt not available; malloc thresholds unchanged")
        if self.tuning.skip_ignore and not install_skip_ignore():
            log.warning("peers: skip_ignore requested but asyncssh changed; not applied")
        self.key = await asyncio.to_thread(trust.load_or_create_key, self.dir / "node_key")
        await asyncio.to_thread(self._load_state)
        self._loaded = True
        opts = self.tuning.options()
        self._server = await asyncssh.create_server(
            lambda: _ServerConn(self), self.config.listen_address, self.config.peer_port,
            server_host_keys=[self.key], session_factory=self._session, login_timeout=
            self.tuning.login_timeout, allow_scp=False, agent_forwarding=False,
            x11_forwarding=False, keepalive_interval=self.tuning.keepalive_interval,
            reuse_address=True, encoding=None, **opts)
        self.port = self._server.sockets[0].getsockname()[1]
        me = self.membership.get(self.name)
        if me is not None and self.cluster is not None:
            addr = self.advertise_address or me.addr
            self.membership.update_self(incarnation=me.incarnation + 1, version=0, addr=addr,
                                        port=self.port, caps=self._caps())
            await self._save()
        self.membership.add_listener(self._on_member_event)
        self._gossip_task = asyncio.create_task(self._gossip_loop(), name="peers-gossip")
        self._started = True
        self.ready.set()
        log.info("peers: %s listening on %s:%d (key %s)%s", self.name,
                 self.config.listen_address, self.port, trust.fingerprint(self.key),
                 f", cluster {self.cluster.cluster_id}" if self.cluster else ", no cluster yet")

    async def stop(self) -> None:
        """Close the listener, every link and every in-flight task."""
        self._started = False
        if self._gossip_task is not None:
            self._gossip_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gossip_task
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
        if self._server is not None:
            self._server.close()
            for conn in list(self._server_conns.keys()):
                conn.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._write_fut is not None:
            await asyncio.gather(self._write_fut, return_exceptions=True)
        if self._loaded:  # never overwrite state we did not read
            await self._save()

    def _caps(self) -> dict[str, Any]:
        return {**self.capabilities}

    def _spawn(self, coro: Awaitable[Any], name: str | None = None) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    @property
    def running(self) -> bool:
        return self._started

    # -- persistence -----------------------------------------------------------------

    def _load_state(self) -> None:
        c = self.store.load(_STATE_KIND, "cluster")
        if c:
            self.cluster = trust.Cluster.from_wire(c)
        m = self.store.load(_STATE_KIND, "members")
        if m and self.cluster is not None:
            self.membership.load(m.get("members", []))
        t = self.store.load(_STATE_KIND, "tokens")
        if t:
            self.ledger = trust.TokenLedger(t.get("issued"), t.get("used"))

    async def _save(self) -> None:
        """Persist cluster, table and tokens off the loop (fsyncs)."""
        async with self._save_lock:
            if self._write_fut is not None and not self._write_fut.done():
                await asyncio.shield(self._write_fut)
            self.membership.dirty = False
            cluster = self.cluster.to_wire() if self.cluster else None
            members = {"members": self.membership.wire()}
            tokens = self.ledger.to_wire()

            def write() -> None:
                if cluster is None:
                    self.store.delete(_STATE_KIND, "cluster")
                else:
                    self.store.save(_STATE_KIND, "cluster", cluster)
                self.store.save(_STATE_KIND, "members", members)
                self.store.save(_STATE_KIND, "tokens", tokens)

            # The thread cannot be cancelled: keep its future so that the next save (or
            # stop) waits for it instead of racing it on the same temp file.
            self._write_fut = asyncio.ensure_future(asyncio.to_thread(write))
            await asyncio.shield(self._write_fut)

    # -- registration (for other subsystems) -----------------------------------------

    def register_op(self, op: str, handler: PeerHandler) -> None:
        """Expose ``handler(args, ctx)`` to peers as RPC op ``op``."""
        self._ops[op] = handler

    def register_stream(self, kind: str, handler: StreamHandler) -> None:
        """Accept bulk channels of ``kind``: ``handler(stream, args)``. The handler may
        raise ProtoError before writing; otherwise it must first send ``{"ok": True}``
        with ``stream.write_frame`` (the helper ``accept_stream`` does that)."""
        self._stream_kinds[kind] = handler

    def set_forward_handler(self, fn: ForwardHandler) -> None:
        """The daemon's router: runs an API op locally on behalf of a peer."""
        self._forward = fn

    def allow_root(self, path: Path) -> None:
        """Let peers put/get files under ``path`` (state dir is allowed by default)."""
        self.allowed_roots.append(Path(os.path.normpath(path)))

    # -- cluster management ------------------------------------------------------------

    def _self_member(self, epoch: int = 1) -> Member:
        assert self.key is not None
        return Member(name=self.name, addr=self.advertise_address, port=self.port,
                      pubkey=trust.public_line(self.key), epoch=epoch, incarnation=1,
                      version=0, caps=self._caps(), joined=time.time())

    async def cluster_init(self) -> dict[str, Any]:
        if self.cluster is not None:
            raise ProtoError(ErrorCode.ALREADY_EXISTS,
                             f"already in cluster {self.cluster.cluster_id}")
        self.cluster = trust.Cluster.new()
        self.membership.put(self._self_member())
        await self._save()
        log.info("cluster %s created on %s", self.cluster.cluster_id, self.name)
        return {"cluster_id": self.cluster.cluster_id, "node": self.name}

    async def mint_token(self, ttl: float = trust.DEFAULT_TOKEN_TTL) -> dict[str, Any]:
        if self.cluster is None:
            raise ProtoError(ErrorCode.CONFLICT, "not in a cluster: run `cluster init` first")
        tok, p = trust.mint_token(self.cluster, self.name, float(ttl))
        self.ledger.issue(p)
        await self._save()
        return {"token": tok, "expires": p.expiry, "issuer": self.name}

    async def remove(self, node: str) -> dict[str, Any]:
        """Revoke a node: tombstone it, rotate the cluster secret, cut its connections."""
        if self.cluster is None:
            raise ProtoError(ErrorCode.CONFLICT, "not in a cluster")
        if node == self.name:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             "a node cannot remove itself; run `cluster remove` on another member")
        m = self.membership.get(node)
        if m is None or m.admin == REMOVED:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no member named {node}")
        with contextlib.suppress(Exception):
            await self.call(node, "peer.removed", {"by": self.name}, timeout=2.0)
        tomb = Member(**{**m.to_wire(), "admin": REMOVED, "version": m.version + 1,
                         "cnvms": []})
        self.membership.put(tomb)
        self.cluster = self.cluster.rotated()
        await self._save()
        log.warning("node %s removed from the cluster by %s; secret rotated to epoch %d",
                    node, self.name, self.cluster.epoch)
        self._gossip_now()
        return {"removed": node, "epoch": self.cluster.epoch}

    def nodes(self) -> list[dict[str, Any]]:
        self.membership.tick()
        return [n for n in self.membership.view() if n["admin"] != REMOVED]

    def update_local(self, *, caps: dict[str, Any] | None = None,
                     cnvms: list[str] | None = None) -> None:
        """Publish this node's capabilities / cnvm list (gossiped on the next round)."""
        if caps is not None:
            self.capabilities.update(caps)
        if self.membership.get(self.name) is None:
            return
        fields: dict[str, Any] = {}
        if caps is not None:
            fields["caps"] = self._caps()
        if cnvms is not None:
            fields["cnvms"] = sorted(cnvms)
        if fields:
            self.membership.update_self(**fields)
            self._spawn(self._save())

    # -- joining (client side of enrolment) -------------------------------------------

    async def join(self, peer: str, token: str, *, timeout: float = 15.0) -> dict[str, Any]:
        """Enrol through ``peer`` ("addr" or "addr:port") with a token from any member."""
        if self.cluster is not None:
            raise ProtoError(ErrorCode.ALREADY_EXISTS,
                             f"already in cluster {self.cluster.cluster_id}")
        assert self.key is not None
        raw, payload, tag = trust.parse_token(token)
        host, port = _split_hostport(peer, self.config.peer_port)
        try:
            async with asyncio.timeout(timeout):
                conn = await asyncssh.connect(
                    host, port, username=ENROLL_USER, client_keys=[self.key],
                    known_hosts=None, agent_path=None, config=None,
                    preferred_auth="publickey", **self.tuning.options())
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"cannot reach {peer}: {exc}") from None
        try:
            async with asyncio.timeout(timeout):
                return await self._enroll_client(conn, raw, payload, tag)
        except TimeoutError:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"enrolment via {peer} timed out") from None
        except (asyncssh.Error, OSError, FrameError) as exc:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"enrolment via {peer} failed: {exc}") \
                from None
        finally:
            conn.close()

    async def _enroll_client(self, conn: asyncssh.SSHClientConnection, raw: bytes,
                             payload: trust.TokenPayload, tag: bytes) -> dict[str, Any]:
        assert self.key is not None
        server_key = conn.get_server_host_key()
        assert server_key is not None
        local = conn.get_extra_info("sockname")[0]
        writer, reader, _ = await conn.open_session(subsystem=SUB_ENROLL, encoding=None)
        nonce_c = secrets.token_bytes(32)
        writer.write(encode_frame({"t": "enroll1", "payload": raw, "node": self.name,
                                   "nonce": nonce_c}))
        msg = await read_frame(reader)  # type: ignore[arg-type]
        _raise_if_error(msg)
        assert msg is not None
        tr = trust.transcript(raw, self.name, nonce_c, bytes(msg.get("nonce", b"")),
                              server_key.public_data, self.key.public_data)
        if not hmac.compare_digest(bytes(msg.get("proof", b"")), trust.server_proof(tag, tr)):
            log.warning("join: %s failed to prove the token: not a member of that cluster",
                        conn.get_extra_info("peername"))
            raise ProtoError(ErrorCode.PERMISSION_DENIED,
                             "the peer could not prove it belongs to the token's cluster")
        addr = self.advertise_address or local
        writer.write(encode_frame({"t": "enroll3", "proof": trust.client_proof(tag, tr),
                                   "addr": addr, "port": self.port, "caps": self._caps()}))
        res = await read_frame(reader)  # type: ignore[arg-type]
        _raise_if_error(res)
        assert res is not None
        cluster = trust.Cluster.from_wire(res["cluster"])
        members = res["members"]
        self.advertise_address = addr
        self.cluster = cluster
        self.membership.merge([m for m in members if m.get("name") != self.name])
        mine = next(m for m in members if m.get("name") == self.name)
        self.membership.put(Member.from_wire(mine))
        await self._save()
        log.info("joined cluster %s via %s as %s", cluster.cluster_id, res.get("node"), self.name)
        self._gossip_now()
        return {"cluster_id": cluster.cluster_id, "node": self.name, "via": res.get("node"),
                "members": sorted(m["name"] for m in members if m.get("admin") == ACTIVE)}

    # -- enrolment (server side) -------------------------------------------------------

    async def _serve_enroll(self, sc: _ServerConn, reader: asyncssh.SSHReader[bytes],
                            writer: asyncssh.SSHWriter[bytes]) -> None:
        joiner = "?"
        try:
            async with asyncio.timeout(self.tuning.login_timeout):
                m1 = await read_frame(reader)  # type: ignore[arg-type]
                if not m1 or m1.get("t") != "enroll1":
                    raise ProtoError(ErrorCode.BAD_REQUEST, "expected enroll1")
                joiner = str(m1.get("node", ""))
                raw = bytes(m1.get("payload", b""))
                nonce_c = bytes(m1.get("nonce", b""))
                if not _valid_name(joiner) or joiner == ENROLL_USER or len(nonce_c) != 32:
                    raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"bad node name {joiner!r}")
                cluster = self.cluster
                if cluster is None:
                    raise ProtoError(ErrorCode.CONFLICT, "this node is in no cluster")
                payload = trust.TokenPayload.decode(raw)
                trust.check_payload(cluster, payload)
                existing = self.membership.get(joiner)
                assert sc.enroll_key is not None and self.key is not None
                if joiner == self.name or (existing is not None and existing.admin == ACTIVE
                                          and not trust.same_key(sc.enroll_key,
                                                                 existing.pubkey)):
                    raise ProtoError(ErrorCode.ALREADY_EXISTS,
                                     f"node name {joiner} is taken by another member; "
                                     "remove it first")
                tag = trust.token_tag(cluster, raw)
                nonce_s = secrets.token_bytes(32)
                tr = trust.transcript(raw, joiner, nonce_c, nonce_s, self.key.public_data,
                                      sc.enroll_key.public_data)
                writer.write(encode_frame({"t": "enroll2", "nonce": nonce_s,
                                           "proof": trust.server_proof(tag, tr)}))
                m3 = await read_frame(reader)  # type: ignore[arg-type]
                if not m3 or m3.get("t") != "enroll3":
                    raise ProtoError(ErrorCode.BAD_REQUEST, "expected enroll3")
                if not hmac.compare_digest(bytes(m3.get("proof", b"")),
                                           trust.client_proof(tag, tr)):
                    raise ProtoError(ErrorCode.PERMISSION_DENIED, "wrong token")
                await self._consume_token(payload)
                # Learn our own underlay address from how the joiner reached us.
                me = self.membership.get(self.name)
                assert me is not None and sc.conn is not None
                if not me.addr:
                    self.advertise_address = sc.conn.get_extra_info("sockname")[0]
                    self.membership.update_self(addr=self.advertise_address)
                addr = str(m3.get("addr") or sc.conn.get_extra_info("peername")[0])
                epoch = existing.epoch + (1 if existing.admin == REMOVED else 0) \
                    if existing else 1
                if existing is not None and existing.admin == ACTIVE:
                    new = Member(**{**existing.to_wire(), "addr": addr,
                                    "port": int(m3.get("port", 0)),
                                    "version": existing.version + 1})
                else:
                    new = Member(name=joiner, addr=addr, port=int(m3.get("port", 0)),
                                 pubkey=trust.public_line(sc.enroll_key), epoch=epoch,
                                 incarnation=1, version=0, caps=dict(m3.get("caps") or {}),
                                 joined=time.time())
                self.membership.put(new)
                await self._save()
                writer.write(encode_frame({"t": "enroll4", "node": self.name,
                                           "cluster": self.cluster.to_wire()
                                           if self.cluster else cluster.to_wire(),
                                           "members": self.membership.wire()}))
                log.info("enrolled %s (%s:%s, key %s) via token from %s", joiner, addr,
                         new.port, trust.fingerprint(new.pubkey), payload.issuer)
                self._gossip_now()
        except ProtoError as exc:
            log.warning("enrolment of %r from %s refused: %s", joiner, sc.peer, exc.message)
            with contextlib.suppress(Exception):
                writer.write(encode_frame({"t": "enroll_err", "error": exc.to_wire()}))
        except (TimeoutError, FrameError, asyncssh.Error, OSError, KeyError, ValueError,
                TypeError) as exc:
            log.warning("enrolment from %s refused: %s", sc.peer, exc or type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            if sc.conn is not None:
                loop = asyncio.get_running_loop()
                loop.call_later(1.0, sc.conn.close)

    async def _consume_token(self, p: trust.TokenPayload) -> None:
        """Single use, decided by the issuer (the only holder of the issued list)."""
        if p.issuer == self.name:
            self.ledger.consume(p.token_id)
            await self._save()
            return
        issuer = self.membership.get(p.issuer)
        if issuer is None or issuer.admin != ACTIVE:
            raise ProtoError(ErrorCode.PERMISSION_DENIED, f"token issuer {p.issuer} unknown")
        try:
            await self.call(p.issuer, "peer.token.consume", {"token_id": p.token_id},
                            timeout=5.0)
        except ProtoError as exc:
            if exc.code == ErrorCode.PERMISSION_DENIED:
                raise
            raise ProtoError(ErrorCode.UNAVAILABLE,
                             f"token issuer {p.issuer} unreachable ({exc.message}); join via "
                             f"{p.issuer} or mint a new token") from None

    # -- server sessions ---------------------------------------------------------------

    async def _session(self, stdin: asyncssh.SSHReader[bytes],
                       stdout: asyncssh.SSHWriter[bytes],
                       stderr: asyncssh.SSHWriter[bytes]) -> None:
        chan = stdin.channel
        sc = self._server_conns.get(chan.get_connection())
        sub = chan.get_subsystem()
        if sc is None:
            stdout.close()
            return
        try:
            if sc.node is None:
                if sub == SUB_ENROLL:
                    await self._serve_enroll(sc, stdin, stdout)
                else:
                    log.warning("peer port: %s as %s asked for %r: refused", sc.peer,
                                ENROLL_USER, sub)
                return
            if self.membership.pinned_key(sc.node) is None:
                return  # revoked while connected
            if sub == SUB_RPC:
                await self._serve_rpc(sc.node, stdin, stdout)
            elif sub == SUB_STREAM:
                await self._serve_stream(sc.node, stdin, stdout)
            else:
                log.warning("peer %s asked for unknown subsystem %r", sc.node, sub)
        except (asyncssh.Error, OSError, asyncio.CancelledError):
            pass
        finally:
            stdout.close()

    async def _serve_rpc(self, node: str, reader: asyncssh.SSHReader[bytes],
                         writer: asyncssh.SSHWriter[bytes]) -> None:
        dec = FrameDecoder()
        running: dict[Any, asyncio.Task[None]] = {}

        def send(obj: dict[str, Any]) -> None:
            if not writer.channel.is_closing():
                writer.write(encode_frame(obj))

        async def run(rid: Any, op: str, args: dict[str, Any]) -> None:
            try:
                h = self._ops.get(op)
                if h is None:
                    raise ProtoError(ErrorCode.UNKNOWN_OP, f"unknown peer op {op!r}")
                ctx = CallContext(node, lambda n, d: send(event(rid, n, d)))
                send(response(rid, await h(args, ctx)))
            except asyncio.CancelledError:
                send(error_response(rid, ProtoError(ErrorCode.CANCELLED, "cancelled")))
            except ProtoError as exc:
                send(error_response(rid, exc))
            except Exception as exc:
                log.exception("peer op %s from %s failed", op, node)
                send(error_response(rid, ProtoError(ErrorCode.INTERNAL, f"{op}: {exc}")))
            finally:
                running.pop(rid, None)

        try:
            while data := await reader.read(1 << 20):
                for msg in dec.feed(data):
                    t = msg.get("t")
                    if t == "req":
                        rid = msg.get("id")
                        args = msg.get("args") if isinstance(msg.get("args"), dict) else {}
                        running[rid] = self._spawn(run(rid, str(msg.get("op")), args))
                    elif t == "cancel" and msg.get("id") in running:
                        running[msg["id"]].cancel()
        except FrameError as exc:
            log.warning("peer %s sent bad framing on rpc channel: %s", node, exc)
        finally:
            for task in list(running.values()):
                task.cancel()

    async def _serve_stream(self, node: str, reader: asyncssh.SSHReader[bytes],
                            writer: asyncssh.SSHWriter[bytes]) -> None:
        hdr = await read_frame(reader)  # type: ignore[arg-type]
        if not hdr:
            return
        kind = str(hdr.get("kind"))
        args = hdr.get("args") if isinstance(hdr.get("args"), dict) else {}
        stream = streams.PeerStream(reader, writer, node, kind, server=True)
        h = self._stream_kinds.get(kind)
        try:
            if h is None:
                raise ProtoError(ErrorCode.UNKNOWN_OP, f"unknown stream kind {kind!r}")
            await h(stream, args)
        except (Exception, asyncio.CancelledError) as exc:
            err = exc if isinstance(exc, ProtoError) else ProtoError(
                ErrorCode.FAILED, f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, ProtoError | asyncio.CancelledError):
                log.warning("stream %s from %s failed: %s", kind, node, exc)
            if stream.bytes_written == 0:
                # Not accepted yet: the opener is waiting for a frame; refuse cleanly.
                with contextlib.suppress(Exception):
                    await stream.write_frame({"ok": False, "error": err.to_wire()})
            else:
                # Mid-stream: never append bytes to the data; abort so the far side fails.
                stream.abort(err.message)
            if isinstance(exc, asyncio.CancelledError):
                raise

    # -- client links ------------------------------------------------------------------

    async def _link(self, node: str) -> _Link:
        link = self._links.get(node)
        if link is not None and not link.closed:
            return link
        lock = self._link_locks.setdefault(node, asyncio.Lock())
        async with lock:
            link = self._links.get(node)
            if link is not None and not link.closed:
                return link
            conn = await self._connect(node)
            try:
                w, r, _ = await conn.open_session(subsystem=SUB_RPC, encoding=None)
            except (asyncssh.Error, OSError) as exc:
                conn.close()
                raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {exc}") from None
            link = _Link(node, conn, w, r)
            link.task = asyncio.create_task(self._read_link(link))
            self._links[node] = link
            return link

    async def _connect(self, node: str) -> asyncssh.SSHClientConnection:
        if self.cluster is None:
            raise ProtoError(ErrorCode.CONFLICT, "not in a cluster")
        m = self.membership.get(node)
        if m is None or m.admin != ACTIVE:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no member named {node}")
        if not m.addr:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node} has no known address yet")
        try:
            host_key = trust.key_from_line(m.pubkey)
            async with asyncio.timeout(self.tuning.connect_timeout + 2):
                return await asyncssh.connect(
                    m.addr, m.port, username=self.name, client_keys=[self.key],
                    known_hosts=([host_key], [], []), agent_path=None, config=None,
                    preferred_auth="publickey", connect_timeout=self.tuning.connect_timeout,
                    keepalive_interval=self.tuning.keepalive_interval, keepalive_count_max=3,
                    **self.tuning.options())
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise ProtoError(ErrorCode.UNAVAILABLE,
                             f"{node} ({m.addr}:{m.port}) unreachable: {exc or 'timeout'}") \
                from None

    async def _read_link(self, link: _Link) -> None:
        dec = FrameDecoder()
        err: Exception = ProtoError(ErrorCode.UNAVAILABLE, f"connection to {link.node} lost")
        try:
            while data := await link.reader.read(1 << 20):
                for msg in dec.feed(data):
                    p = link.pending.get(msg.get("id"))  # type: ignore[arg-type]
                    if p is None:
                        continue
                    fut, on_event = p
                    if msg.get("t") == "evt":
                        if on_event is not None:
                            try:
                                on_event(str(msg.get("event")), msg.get("data") or {})
                            except Exception:
                                log.exception("event callback failed")
                    elif msg.get("t") == "res" and not fut.done():
                        if msg.get("ok"):
                            fut.set_result(msg.get("result"))
                        else:
                            fut.set_exception(ProtoError.from_wire(msg.get("error")))
        except FrameError as exc:
            log.warning("peer %s sent bad framing: %s", link.node, exc)
        except (asyncssh.Error, OSError) as exc:
            err = ProtoError(ErrorCode.UNAVAILABLE, f"connection to {link.node} lost: {exc}")
        finally:
            link.fail_all(err)
            link.close()
            if self._links.get(link.node) is link:
                del self._links[link.node]

    def _drop_link(self, node: str) -> None:
        link = self._links.pop(node, None)
        if link is not None:
            link.close()

    # -- RPC -----------------------------------------------------------------------------

    async def call(self, node: str, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = 30.0,
                   on_event: Callable[[str, dict[str, Any]], None] | None = None) -> Any:
        """Run peer op ``op`` on ``node``; raises ProtoError (UNAVAILABLE if unreachable)."""
        if node == self.name:
            h = self._ops.get(op)
            if h is None:
                raise ProtoError(ErrorCode.UNKNOWN_OP, f"unknown peer op {op!r}")
            ctx = CallContext(self.name, on_event or (lambda _n, _d: None))
            async with asyncio.timeout(timeout):
                return await h(args or {}, ctx)
        link = await self._link(node)
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending[rid] = (fut, on_event)
        try:
            link.writer.write(encode_frame(request(rid, op, args)))
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {op} timed out") from None
        except asyncssh.Error as exc:
            self._drop_link(node)
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {exc}") from None
        finally:
            link.pending.pop(rid, None)
            if (not fut.done() or fut.cancelled()) and not link.closed:
                with contextlib.suppress(Exception):
                    link.writer.write(encode_frame(cancel(rid)))

    async def forward(self, node: str, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_event: Callable[[str, dict[str, Any]], None] | None = None) -> Any:
        """Run *API* op ``op`` on ``node`` (``cnvmctl --node n1 deploy X --on n3``)."""
        return await self.call(node, "peer.forward", {"op": op, "args": args or {}},
                               timeout=timeout, on_event=on_event)

    # -- streams -------------------------------------------------------------------------

    async def open_stream(self, node: str, kind: str, args: dict[str, Any] | None = None, *,
                          window: int | None = None,
                          max_pktsize: int | None = None) -> streams.PeerStream:
        """A new bulk channel to ``node``; returns once the peer's handler accepted it."""
        link = await self._link(node)
        try:
            w, r, _ = await link.conn.open_session(
                subsystem=SUB_STREAM, encoding=None, window=window or self.tuning.window,
                max_pktsize=max_pktsize or self.tuning.max_pktsize)
        except (asyncssh.Error, OSError) as exc:
            self._drop_link(node)
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {exc}") from None
        stream = streams.PeerStream(r, w, node, kind)
        try:
            await stream.write_frame({"kind": kind, "args": args or {}})
            ans = await stream.read_frame()
        except ProtoError:
            stream.close()
            raise
        except (asyncssh.Error, OSError, FrameError) as exc:
            stream.close()
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: stream {kind}: {exc}") from None
        if not ans:
            stream.close()
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: stream {kind} closed at once")
        if not ans.get("ok"):
            stream.close()
            raise ProtoError.from_wire(ans.get("error"))
        stream.accept = ans
        return stream

    async def relay_tcp(self, node: str, remote_port: int, *, remote_host: str = "127.0.0.1",
                        local_host: str = "127.0.0.1", local_port: int = 0) -> streams.TcpRelay:
        """Listen locally; carry every connection to ``remote_host:remote_port`` on ``node``.

        Use ``relay.port``; ``await relay.close()`` (or ``async with``) when done."""
        relay = streams.TcpRelay(
            lambda: self.open_stream(node, "tcp", {"host": remote_host, "port": remote_port}),
            f"{node}:{remote_host}:{remote_port}")
        return await relay.start(local_host, local_port)

    async def put_file(self, node: str, src: Path | str, dest: str, *,
                       mode: int = 0o644) -> dict[str, Any]:
        """Copy a local file to ``dest`` on ``node``; verifies sha256 end to end."""
        stream = await self.open_stream(node, "file.put", {"dest": dest, "mode": mode})
        async with stream:
            sent = await streams.send_file(stream, Path(src))
            ans = await stream.read_frame()
        if not ans or not ans.get("ok"):
            raise ProtoError.from_wire((ans or {}).get("error"))
        if ans.get("sha256") != sent["sha256"] or ans.get("bytes") != sent["bytes"]:
            raise ProtoError(ErrorCode.FAILED, f"{dest} on {node}: checksum mismatch")
        return sent

    async def get_file(self, node: str, src: str, dest: Path | str) -> dict[str, Any]:
        """Fetch ``src`` from ``node`` into local ``dest``; verifies sha256."""
        stream = await self.open_stream(node, "file.get", {"src": src})
        async with stream:
            size = int(stream.accept.get("size", 0))
            got = await streams.receive_file(stream, Path(dest), limit=size)
            trailer = await stream.read_frame() or {}
        if trailer.get("sha256") != got["sha256"] or got["bytes"] != size:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(Path(dest).unlink)
            raise ProtoError(ErrorCode.FAILED, f"{src} from {node}: checksum mismatch")
        return got

    # -- gossip --------------------------------------------------------------------------

    def _gossip_payload(self) -> dict[str, Any]:
        assert self.cluster is not None
        return {"cluster": self.cluster.to_wire(), "members": self.membership.wire()}

    def _absorb(self, payload: dict[str, Any], source: str) -> None:
        cluster = self.cluster
        if cluster is None:
            return
        try:
            theirs = trust.Cluster.from_wire(payload.get("cluster") or {})
        except ValueError as exc:
            log.warning("gossip from %s: %s", source, exc)
            return
        if theirs.cluster_id != cluster.cluster_id:
            log.error("gossip from %s is for cluster %s, we are in %s: ignored", source,
                      theirs.cluster_id, cluster.cluster_id)
            return
        if theirs.epoch > cluster.epoch:
            self.cluster = theirs
            self.membership.dirty = True
        about_me = self.membership.merge(payload.get("members") or [])
        for m in about_me:
            me = self.membership.get(self.name)
            if m.admin == REMOVED and (me is None or m.epoch >= me.epoch):
                self._removed(f"gossip from {source}")
                return
            if me is not None and m.pubkey != me.pubkey:
                log.error("another node enrolled under our name %s (key %s) and won; this "
                          "node must be removed and re-join under another name", self.name,
                          trust.fingerprint(m.pubkey))
                continue
            if me is not None and m.admin == ACTIVE and m.order() > me.order():
                # Someone remembers a newer us (state lost?): outbid it.
                self.membership.update_self(incarnation=max(me.incarnation, m.incarnation) + 1,
                                            version=0, epoch=max(me.epoch, m.epoch))
        if self.membership.dirty:
            self._spawn(self._save())

    def _removed(self, why: str) -> None:
        log.warning("this node was removed from cluster %s (%s): leaving",
                    self.cluster.cluster_id if self.cluster else "?", why)
        self.cluster = None
        self.membership.clear()
        for node in list(self._links):
            self._drop_link(node)
        self._spawn(self._save())

    def _gossip_now(self) -> None:
        for m in self.membership.peers():
            if self.membership.state_of(m.name) != DOWN:
                self._spawn(self._gossip_with(m.name))

    async def _gossip_with(self, node: str) -> None:
        if node in self._gossiping or self.cluster is None:
            return
        self._gossiping.add(node)
        try:
            ans = await self.call(node, "peer.gossip", self._gossip_payload(),
                                  timeout=self.tuning.connect_timeout + 3)
            if isinstance(ans, dict):
                self._absorb(ans, node)
        except ProtoError as exc:
            log.debug("gossip with %s failed: %s", node, exc)
        finally:
            self._gossiping.discard(node)

    async def _gossip_loop(self) -> None:
        """Heartbeat + push-pull with 2 random live peers, and a down one now and then."""
        while True:
            await asyncio.sleep(self.gossip_interval * random.uniform(0.8, 1.2))
            try:
                if self.cluster is None:
                    continue
                self._round += 1
                self.membership.heartbeat()
                self.membership.tick()
                live = [m.name for m in self.membership.peers()
                        if self.membership.state_of(m.name) != DOWN]
                dead = [m.name for m in self.membership.peers(DOWN)]
                targets = random.sample(live, min(2, len(live)))
                if dead and (not live or self._round % 3 == 0):
                    targets.append(random.choice(dead))
                for t in targets:
                    self._spawn(self._gossip_with(t))
                if self.membership.dirty:
                    self._spawn(self._save())
            except Exception:
                log.exception("gossip round failed")

    def _on_member_event(self, ev: MemberEvent) -> None:
        if ev.kind == "removed" and ev.name != self.name:
            self._drop_link(ev.name)
            for conn, sc in list(self._server_conns.items()):
                if sc.node == ev.name:
                    log.warning("closing connection of removed node %s", ev.name)
                    conn.close()

    # -- built-in peer ops and stream kinds -----------------------------------------------

    def _register_builtins(self) -> None:
        async def ping(args: dict[str, Any], ctx: CallContext) -> Any:
            return {"node": self.name, "time": time.time(), "echo": args.get("echo")}

        async def gossip(args: dict[str, Any], ctx: CallContext) -> Any:
            self._absorb(args, ctx.node)
            return self._gossip_payload() if self.cluster else None

        async def consume(args: dict[str, Any], ctx: CallContext) -> Any:
            self.ledger.consume(str(args.get("token_id")))
            await self._save()
            log.info("token %s.. redeemed via %s", str(args.get("token_id"))[:8], ctx.node)
            return {"ok": True}

        async def removed(args: dict[str, Any], ctx: CallContext) -> Any:
            asyncio.get_running_loop().call_soon(self._removed, f"removed by {ctx.node}")
            return {"ok": True}

        async def fwd(args: dict[str, Any], ctx: CallContext) -> Any:
            if self._forward is None:
                raise ProtoError(ErrorCode.UNAVAILABLE, f"{self.name} cannot run API ops")
            return await self._forward(str(args.get("op")), dict(args.get("args") or {}),
                                       ctx.emit)

        async def nodes(args: dict[str, Any], ctx: CallContext) -> Any:
            return self.nodes()

        self.register_op("peer.ping", ping)
        self.register_op("peer.gossip", gossip)
        self.register_op("peer.token.consume", consume)
        self.register_op("peer.removed", removed)
        self.register_op("peer.forward", fwd)
        self.register_op("peer.nodes", nodes)
        self.register_stream("tcp", streams.serve_tcp)
        self.register_stream("file.put", self._serve_put)
        self.register_stream("file.get", self._serve_get)
        self.register_stream("echo", _serve_echo)

    async def _serve_put(self, stream: streams.PeerStream, args: dict[str, Any]) -> None:
        dest = streams.check_path(str(args.get("dest")), self.allowed_roots)
        await stream.write_frame({"ok": True})
        got = await streams.receive_file(stream, dest, int(args.get("mode", 0o644)) & 0o777)
        await stream.write_frame({"ok": True, **got})
        stream.write_eof()

    async def _serve_get(self, stream: streams.PeerStream, args: dict[str, Any]) -> None:
        src = streams.check_path(str(args.get("src")), self.allowed_roots)
        try:
            size = (await asyncio.to_thread(src.stat)).st_size
        except OSError:
            raise ProtoError(ErrorCode.NOT_FOUND, f"{src}: no such file") from None
        await stream.write_frame({"ok": True, "size": size})
        sent = await streams.send_file(stream, src, limit=size, eof=False)
        await stream.write_frame(sent)
        stream.write_eof()


async def _serve_echo(stream: streams.PeerStream, args: dict[str, Any]) -> None:
    """Echo everything back (tests, and a quick health check of the bulk path)."""
    await stream.write_frame({"ok": True})
    while data := await stream.read():
        await stream.write(data)
    stream.write_eof()


def _raise_if_error(msg: dict[str, Any] | None) -> None:
    if msg is None:
        raise ProtoError(ErrorCode.UNAVAILABLE, "peer closed the enrolment channel")
    if msg.get("t") == "enroll_err":
        raise ProtoError.from_wire(msg.get("error"))


def _valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name))


def _split_hostport(peer: str, default_port: int) -> tuple[str, int]:
    if peer.startswith("["):
        host, _, rest = peer[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if peer.count(":") == 1:
        host, port = peer.split(":")
        return host, int(port)
    return peer, default_port


__all__ = ["ALIVE", "DOWN", "CallContext", "MemberEvent", "PeerService", "Tuning"]
