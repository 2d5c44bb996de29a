"""Who is a member: cluster creation, join tokens, enrolment (both sides), removal.

Why a layer of its own: this is the only code that changes *trust* (pins keys,
rotates the cluster secret, spends tokens); gossip and RPC only ever use it. The
joiner connects as ``_enroll`` with its own key; both sides prove the token's tag
bound to both nonces and both SSH keys (trust.transcript), the issuer's ledger
decides single use (``peer.token.consume``), and the server pins the joiner's key.
Removal tombstones the record, rotates the secret and tells the node
(``peer.removed``). Design and rationale: README.md ("Trust") and trust.py.

Every change made here is signed with this node's key so that gossip can carry it
and others can check it: the admission of a joiner, a removal (the tombstone, and
the proof shown to the removed node) and the rotation of the secret. The enrolment
channel is the one thing an outsider reaches: its frames and total bytes are capped
and the whole exchange is timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

import asyncssh

from cnvmd.api import Args, Context, Router
from proto.framing import HEADER_SIZE, FrameError, encode_frame, read_frame
from proto.messages import ErrorCode, ProtoError

from . import trust
from .membership import ACTIVE, REMOVED, Member
from .transport import ENROLL_USER, SUB_ENROLL, ServerConn, Throttle, Transport

if TYPE_CHECKING:
    from .service import PeerService

log = logging.getLogger("cnvmd.peers")

ENROLL_MAX_FRAME = 64 * 1024
"""Largest enrolment frame (enroll1/enroll3 are < 1 KiB plus the joiner's caps)."""
ENROLL_MAX_BYTES = 2 * (ENROLL_MAX_FRAME + HEADER_SIZE)
"""All an unenrolled peer may send on its channel: two frames."""


class CappedReader:
    """A reader with a byte budget, so ``read_frame`` on it cannot buffer more than
    ``budget`` bytes in total whatever the frames announce."""

    def __init__(self, reader: asyncssh.SSHReader[bytes], budget: int) -> None:
        self.reader = reader
        self.left = budget

    async def readexactly(self, n: int) -> bytes:
        if n > self.left:
            raise FrameError(f"more than {ENROLL_MAX_BYTES} bytes on the enrolment channel")
        data = await self.reader.readexactly(n)
        self.left -= len(data)
        return data


async def read_small_frame(reader: Any) -> dict[str, Any] | None:
    return await read_frame(reader, max_frame=ENROLL_MAX_FRAME)


class Enrolment:
    """Cluster membership changes of this node and, as a member, of others."""

    def __init__(self, svc: PeerService, transport: Transport, router: Router) -> None:
        self.svc = svc
        self.transport = transport
        transport.enroll = self.serve
        self._throttle = Throttle()
        router.op("peer.token.consume")(self._consume_op)
        router.op("peer.removed")(self._removed_op)

    def self_member(self, epoch: int = 1) -> Member:
        svc = self.svc
        assert svc.key is not None
        return Member(name=svc.name, addr=svc.advertise_address, port=svc.port,
                      pubkey=trust.public_line(svc.key), epoch=epoch, incarnation=1,
                      version=0, caps=svc.caps(), joined=time.time())

    # -- cluster management ------------------------------------------------------------

    async def cluster_init(self) -> dict[str, Any]:
        svc = self.svc
        if svc.cluster is not None:
            raise ProtoError(ErrorCode.ALREADY_EXISTS,
                             f"already in cluster {svc.cluster.cluster_id}")
        svc.cluster = trust.Cluster.new()
        svc.membership.put(self.self_member())
        await svc.save()
        log.info("cluster %s created on %s", svc.cluster.cluster_id, svc.name)
        return {"cluster_id": svc.cluster.cluster_id, "node": svc.name}

    async def mint_token(self, ttl: float = trust.DEFAULT_TOKEN_TTL) -> dict[str, Any]:
        svc = self.svc
        if svc.cluster is None:
            raise ProtoError(ErrorCode.CONFLICT, "not in a cluster: run `cluster init` first")
        tok, p = trust.mint_token(svc.cluster, svc.name, float(ttl))
        svc.ledger.issue(p)
        await svc.save()
        return {"token": tok, "expires": p.expiry, "issuer": svc.name}

    async def remove(self, node: str) -> dict[str, Any]:
        """Revoke a node: tombstone it, rotate the cluster secret, cut its connections."""
        svc = self.svc
        if svc.cluster is None:
            raise ProtoError(ErrorCode.CONFLICT, "not in a cluster")
        if node == svc.name:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             "a node cannot remove itself; run `cluster remove` on another member")
        m = svc.membership.get(node)
        if m is None or m.admin == REMOVED:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no member named {node}")
        assert svc.key is not None
        cid = svc.cluster.cluster_id
        tomb = Member(**{**m.to_wire(), "admin": REMOVED, "version": m.version + 1,
                         "cnvms": [], "sig": "",
                         "removal": trust.cert(svc.key, svc.name, trust.REMOVE,
                                               m.identity(cid))})
        with contextlib.suppress(Exception):
            await svc.call(node, "peer.removed", {"record": tomb.to_wire()}, timeout=2.0)
        svc.membership.put(tomb)
        svc.cluster = svc.cluster.rotated(svc.key, svc.name, node)
        await svc.save()
        log.warning("node %s removed from the cluster by %s; secret rotated to epoch %d",
                    node, svc.name, svc.cluster.epoch)
        svc.gossip.now()
        return {"removed": node, "epoch": svc.cluster.epoch}

    def leave(self, why: str) -> None:
        """This node was removed: forget the cluster (it may re-join with a new token)."""
        svc = self.svc
        log.warning("this node was removed from cluster %s (%s): leaving",
                    svc.cluster.cluster_id if svc.cluster else "?", why)
        svc.cluster = None
        svc.membership.clear()
        self.transport.drop_all()
        svc.spawn(svc.save())

    async def _removed_op(self, ctx: Context, args: Args) -> dict[str, Any]:
        """A member tells us we were removed: it must show our tombstone, signed by it."""
        raw = args.map("record")
        args.reject_unknown()
        svc = self.svc
        try:
            tomb = Member.from_wire(raw)
        except ValueError as exc:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT, str(exc), {"arg": "record"}) from None
        me = svc.membership.get(svc.name)
        signer = svc.membership.pinned_key(ctx.node or "")
        if (svc.cluster is None or me is None or signer is None or tomb.name != svc.name
                or tomb.admin != REMOVED or tomb.pubkey != me.pubkey or tomb.epoch != me.epoch
                or tomb.removal.get("by") != ctx.node
                or not trust.verify(signer, trust.REMOVE, tomb.identity(svc.cluster.cluster_id),
                                    tomb.removal.get("sig"))):
            if self._throttle(ctx.node):
                log.warning("peer.removed from %s refused: no valid removal of this node",
                            ctx.node)
            raise ProtoError(ErrorCode.PERMISSION_DENIED,
                             "not a removal of this node signed by the caller")
        asyncio.get_running_loop().call_soon(self.leave, f"removed by {ctx.node}")
        return {"ok": True}

    # -- joining (client side of enrolment) -------------------------------------------

    async def join(self, peer: str, token: str, *, timeout: float = 15.0) -> dict[str, Any]:
        """Enrol through ``peer`` ("addr" or "addr:port") with a token from any member."""
        svc = self.svc
        if svc.cluster is not None:
            raise ProtoError(ErrorCode.ALREADY_EXISTS,
                             f"already in cluster {svc.cluster.cluster_id}")
        assert svc.key is not None
        raw, payload, tag = trust.parse_token(token)
        host, port = split_hostport(peer, svc.config.peer_port)
        try:
            async with asyncio.timeout(timeout):
                conn = await self.transport.dial_enroll(host, port)
        except TimeoutError:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"cannot reach {peer}: timeout") from None
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
        svc = self.svc
        assert svc.key is not None
        server_key = conn.get_server_host_key()
        assert server_key is not None
        local = conn.get_extra_info("sockname")[0]
        writer, reader, _ = await conn.open_session(subsystem=SUB_ENROLL, encoding=None)
        nonce_c = secrets.token_bytes(32)
        writer.write(encode_frame({"t": "enroll1", "payload": raw, "node": svc.name,
                                   "nonce": nonce_c}))
        msg = await read_small_frame(reader)  # the server is not verified yet
        _raise_if_error(msg)
        assert msg is not None
        tr = trust.transcript(raw, svc.name, nonce_c, _bin(msg, "nonce"),
                              server_key.public_data, svc.key.public_data)
        if not hmac.compare_digest(_bin(msg, "proof"), trust.server_proof(tag, tr)):
            log.warning("join: %s failed to prove the token: not a member of that cluster",
                        conn.get_extra_info("peername"))
            raise ProtoError(ErrorCode.PERMISSION_DENIED,
                             "the peer could not prove it belongs to the token's cluster")
        addr = svc.advertise_address or local
        writer.write(encode_frame({"t": "enroll3", "proof": trust.client_proof(tag, tr),
                                   "addr": addr, "port": svc.port, "caps": svc.caps()}))
        res = await read_frame(reader)  # type: ignore[arg-type]
        _raise_if_error(res)
        assert res is not None
        cluster = trust.Cluster.from_wire(res["cluster"])
        members = res["members"]
        svc.advertise_address = addr
        svc.cluster = cluster
        svc.membership.merge([m for m in members if m.get("name") != svc.name])
        mine = next(m for m in members if m.get("name") == svc.name)
        svc.membership.put(Member.from_wire(mine))
        await svc.save()
        log.info("joined cluster %s via %s as %s", cluster.cluster_id, res.get("node"), svc.name)
        svc.gossip.now()
        return {"cluster_id": cluster.cluster_id, "node": svc.name, "via": res.get("node"),
                "members": sorted(m["name"] for m in members if m.get("admin") == ACTIVE)}

    # -- enrolment (server side) -------------------------------------------------------

    async def serve(self, sc: ServerConn, reader: asyncssh.SSHReader[bytes],
                    writer: asyncssh.SSHWriter[bytes]) -> None:
        """The ``cnvm-enroll`` channel of an ``_enroll`` connection."""
        svc = self.svc
        joiner = "?"
        capped = CappedReader(reader, ENROLL_MAX_BYTES)
        try:
            async with asyncio.timeout(svc.tuning.login_timeout):
                m1 = await read_small_frame(capped)
                if not m1 or m1.get("t") != "enroll1":
                    raise ProtoError(ErrorCode.BAD_REQUEST, "expected enroll1")
                node = m1.get("node")
                joiner = node[:64] if isinstance(node, str) else "?"
                raw = _bin(m1, "payload", 1024)
                nonce_c = _bin(m1, "nonce")
                if not valid_name(joiner) or joiner == ENROLL_USER or len(nonce_c) != 32:
                    raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"bad node name {joiner!r}")
                cluster = svc.cluster
                if cluster is None:
                    raise ProtoError(ErrorCode.CONFLICT, "this node is in no cluster")
                payload = trust.TokenPayload.decode(raw)
                trust.check_payload(cluster, payload)
                existing = svc.membership.get(joiner)
                assert sc.enroll_key is not None and svc.key is not None
                if joiner == svc.name or (existing is not None and existing.admin == ACTIVE
                                          and not trust.same_key(sc.enroll_key,
                                                                 existing.pubkey)):
                    raise ProtoError(ErrorCode.ALREADY_EXISTS,
                                     f"node name {joiner} is taken by another member; "
                                     "remove it first")
                tag = trust.token_tag(cluster, raw)
                nonce_s = secrets.token_bytes(32)
                tr = trust.transcript(raw, joiner, nonce_c, nonce_s, svc.key.public_data,
                                      sc.enroll_key.public_data)
                writer.write(encode_frame({"t": "enroll2", "nonce": nonce_s,
                                           "proof": trust.server_proof(tag, tr)}))
                m3 = await read_small_frame(capped)
                if not m3 or m3.get("t") != "enroll3":
                    raise ProtoError(ErrorCode.BAD_REQUEST, "expected enroll3")
                if not hmac.compare_digest(_bin(m3, "proof"), trust.client_proof(tag, tr)):
                    raise ProtoError(ErrorCode.PERMISSION_DENIED, "wrong token")
                assert sc.conn is not None
                addr = m3.get("addr") or sc.conn.get_extra_info("peername")[0]
                port = m3.get("port", 0)
                caps = m3.get("caps") or {}
                if (not isinstance(addr, str) or not isinstance(port, int)
                        or not 0 <= port < 65536 or len(addr) > 255
                        or not isinstance(caps, dict)):
                    raise ProtoError(ErrorCode.INVALID_ARGUMENT, "bad address, port or caps")
                epoch = existing.epoch + (1 if existing.admin == REMOVED else 0) \
                    if existing else 1
                try:  # the bounds every member checks, before the token is spent
                    Member.from_wire({"name": joiner, "addr": addr, "port": port,
                                      "pubkey": trust.public_line(sc.enroll_key),
                                      "caps": caps, "epoch": epoch})
                except ValueError as exc:
                    raise ProtoError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
                await self.consume_token(payload)
                # Learn our own underlay address from how the joiner reached us.
                me = svc.membership.get(svc.name)
                assert me is not None
                if not me.addr:
                    svc.advertise_address = sc.conn.get_extra_info("sockname")[0]
                    svc.membership.update_self(addr=svc.advertise_address)
                if existing is not None and existing.admin == ACTIVE:
                    new = Member(**{**existing.to_wire(), "addr": addr, "port": port,
                                    "version": existing.version + 1, "sig": ""})
                else:
                    new = Member(name=joiner, addr=addr, port=port,
                                 pubkey=trust.public_line(sc.enroll_key), epoch=epoch,
                                 incarnation=1, version=0, caps=dict(caps),
                                 joined=time.time(),
                                 prev=dict(existing.removal) if existing is not None else {})
                    new.cert = trust.cert(svc.key, svc.name, trust.ADMIT,
                                          new.identity(cluster.cluster_id))
                svc.membership.put(new)
                await svc.save()
                svc.gossip.sign_self()
                writer.write(encode_frame({"t": "enroll4", "node": svc.name,
                                           "cluster": svc.cluster.to_wire()
                                           if svc.cluster else cluster.to_wire(),
                                           "members": svc.membership.wire()}))
                log.info("enrolled %s (%s:%s, key %s) via token from %s", joiner, addr,
                         new.port, trust.fingerprint(new.pubkey), payload.issuer)
                svc.gossip.now()
        except ProtoError as exc:
            log.warning("enrolment of %r from %s refused: %s", joiner, sc.peer, exc.message)
            with contextlib.suppress(Exception):
                writer.write(encode_frame({"t": "enroll_err", "error": exc.to_wire()}))
        except (TimeoutError, FrameError, asyncssh.Error, OSError, KeyError, ValueError,
                TypeError) as exc:
            log.warning("enrolment from %s refused: %s", sc.peer, exc or type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):  # a peer that never reads is not waited for
                    await writer.drain()
            writer.close()
            if sc.conn is not None:
                loop = asyncio.get_running_loop()
                loop.call_later(1.0, sc.conn.close)

    async def consume_token(self, p: trust.TokenPayload) -> None:
        """Single use, decided by the issuer (the only holder of the issued list)."""
        svc = self.svc
        if p.issuer == svc.name:
            svc.ledger.consume(p.token_id)
            await svc.save()
            return
        issuer = svc.membership.get(p.issuer)
        if issuer is None or issuer.admin != ACTIVE:
            raise ProtoError(ErrorCode.PERMISSION_DENIED, f"token issuer {p.issuer} unknown")
        try:
            await svc.call(p.issuer, "peer.token.consume", {"token_id": p.token_id},
                           timeout=5.0)
        except ProtoError as exc:
            if exc.code == ErrorCode.PERMISSION_DENIED:
                raise
            raise ProtoError(ErrorCode.UNAVAILABLE,
                             f"token issuer {p.issuer} unreachable ({exc.message}); join via "
                             f"{p.issuer} or mint a new token") from None

    async def _consume_op(self, ctx: Context, args: Args) -> dict[str, Any]:
        """Spend one of the tokens this node issued (asked by the enrolling member)."""
        token_id = args.str("token_id", max_len=128)
        self.svc.ledger.consume(token_id)
        await self.svc.save()
        log.info("token %s.. redeemed via %s", token_id[:8], ctx.node)
        return {"ok": True}


def _bin(msg: dict[str, Any], key: str, max_len: int = 64) -> bytes:
    """A short binary field of an enrolment frame (b"" if absent or not binary)."""
    v = msg.get(key)
    return bytes(v) if isinstance(v, bytes) and len(v) <= max_len else b""


def _raise_if_error(msg: dict[str, Any] | None) -> None:
    if msg is None:
        raise ProtoError(ErrorCode.UNAVAILABLE, "peer closed the enrolment channel")
    if msg.get("t") == "enroll_err":
        raise ProtoError.from_wire(msg.get("error"))


def valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name))


def split_hostport(peer: str, default_port: int) -> tuple[str, int]:
    if peer.startswith("["):
        host, _, rest = peer[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if peer.count(":") == 1:
        host, port = peer.split(":")
        return host, int(port)
    return peer, default_port
