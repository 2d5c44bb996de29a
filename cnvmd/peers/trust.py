"""Node keys, cluster identity, join tokens and the enrolment proofs.

Design (why it is safe without trust-on-first-use):

- Each node has one Ed25519 key (state dir, 0600); it is both its SSH host key and
  its SSH client key, so "pinning a node" means pinning one public key.
- ``cluster init`` creates a cluster id and a 256-bit cluster secret (with an epoch).
  Every member holds the secret, so any member can mint tokens; removing a node
  rotates the secret (epoch + 1), so a revoked node's copy mints nothing valid.
- A token is ``cnvm1.<payload>.<tag>``: payload = (cluster id, secret epoch, issuer,
  random token id, expiry); tag = HMAC-SHA256(secret, payload). The tag is never
  sent on the wire during enrolment: it is a per-token key both sides use to prove
  knowledge of it, bound to the SSH keys each side actually saw (so a man in the
  middle that substitutes its own host key or client key makes the proofs fail).
- Single use: only the issuer keeps the token id (issued list); redeeming it anywhere
  makes the redeeming member ask the issuer to consume it, atomically and persisted,
  so a replay at any member is refused. Expiry is absolute wall time.
- Membership changes carry signatures by node keys (``sign``/``verify``), so gossip
  only spreads what a member decided and cannot invent it: an *admission* (name, key,
  enrolment epoch) is signed by the member that enrolled the node, a *removal* by the
  member that removed it, a *rotation* of the cluster secret by the member whose
  removal caused it, and every record's content (address, caps, heartbeat) by its
  owner. The policy that checks them is gossip.py's.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import msgpack

from cnvmd.state import atomic_write
from proto.messages import ErrorCode, ProtoError

TOKEN_PREFIX = "cnvm1"
DEFAULT_TOKEN_TTL = 600.0
MAX_TOKEN_TTL = 7 * 86400.0
_TAG_LABEL = b"cnvm-join-token-v1\0"
_SERVER_LABEL = b"cnvm-enroll-server-v1\0"
_CLIENT_LABEL = b"cnvm-enroll-client-v1\0"
ADMIT = b"cnvm-admit-v1\0"
"""Signed by the enrolling member: [cluster_id, name, pubkey, epoch]."""
REMOVE = b"cnvm-remove-v1\0"
"""Signed by the removing member: [cluster_id, name, pubkey, epoch]."""
RECORD = b"cnvm-record-v1\0"
"""Signed by a record's owner: the record's content (membership.Member.signed_fields)."""
ROTATE = b"cnvm-rotate-v1\0"
"""Signed by the remover: [cluster_id, epoch, sha256(secret), removed node]."""


def load_or_create_key(path: Path) -> asyncssh.SSHKey:
    """The node's Ed25519 key, created on first start (mode 0600, atomically)."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"cnvm@{path.parent}")
    atomic_write(path, key.export_private_key("openssh"), mode=0o600)
    atomic_write(path.with_suffix(".pub"), key.export_public_key("openssh"), mode=0o644)
    return key


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().split("\n")[0].strip()


def key_from_line(line: str) -> asyncssh.SSHKey:
    return asyncssh.import_public_key(line)


def fingerprint(key_or_line: asyncssh.SSHKey | str) -> str:
    key = key_from_line(key_or_line) if isinstance(key_or_line, str) else key_or_line
    return key.get_fingerprint("sha256")


@functools.lru_cache(maxsize=4096)
def _public_key(line: str) -> asyncssh.SSHKey | None:
    try:
        return key_from_line(line)
    except (asyncssh.KeyImportError, ValueError, TypeError):
        return None


def canonical(obj: Any) -> Any:
    """A form of ``obj`` whose msgpack encoding does not depend on map order (state
    files sort keys, msgpack keeps them as sent): what signatures cover."""
    if isinstance(obj, dict):
        return [[str(k), canonical(v)] for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))]
    if isinstance(obj, list | tuple):
        return [canonical(x) for x in obj]
    return obj


def _signed_bytes(label: bytes, fields: list[Any]) -> bytes:
    return label + msgpack.packb(canonical(fields), use_bin_type=True)


def sign(key: asyncssh.SSHKey, label: bytes, fields: list[Any]) -> str:
    """Sign ``fields`` under ``label`` with a node key; base64 text (state files are JSON)."""
    return _b64e(key.sign(_signed_bytes(label, fields), key.sig_algorithms[0]))


def verify(pubkey_line: str | None, label: bytes, fields: list[Any], sig: Any) -> bool:
    """True if ``sig`` is ``sign(key, label, fields)`` by the key of ``pubkey_line``;
    False for anything malformed (never raises: inputs come from the wire)."""
    if not pubkey_line or not isinstance(sig, str) or not sig or len(sig) > 1024:
        return False
    key = _public_key(pubkey_line)
    if key is None:
        return False
    try:
        return bool(key.verify(_signed_bytes(label, fields), _b64d(sig)))
    except (ValueError, TypeError, binascii.Error, OverflowError):
        return False


def cert(key: asyncssh.SSHKey, by: str, label: bytes, fields: list[Any]) -> dict[str, str]:
    """A signed statement as carried in records: ``{"by": signer, "sig": ...}``."""
    return {"by": by, "sig": sign(key, label, fields)}


def same_key(a: asyncssh.SSHKey, line: str) -> bool:
    try:
        return hmac.compare_digest(a.public_data, key_from_line(line).public_data)
    except (asyncssh.KeyImportError, ValueError):
        return False


@dataclass
class Cluster:
    """The cluster identity every member holds (secret included: members only)."""

    cluster_id: str
    epoch: int
    secret: str  # hex
    created: float
    proof: dict[str, str] = field(default_factory=dict)
    """For epoch > 1: {by, removed, sig}, the rotation signed by the member that
    removed ``removed`` (``rotation_fields``); gossip refuses an epoch without it."""

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cluster_id": self.cluster_id, "epoch": self.epoch,
                             "secret": self.secret, "created": self.created}
        if self.proof:
            d["proof"] = dict(self.proof)
        return d

    @classmethod
    def from_wire(cls, d: Any) -> Cluster:
        """Validate a cluster record (from a peer or the disk); ValueError if malformed."""
        try:
            proof = d.get("proof") or {}
            if not isinstance(d["cluster_id"], str) or not isinstance(d["secret"], str):
                raise ValueError("cluster_id and secret must be strings")
            c = cls(d["cluster_id"], int(d["epoch"]), d["secret"],
                    float(d.get("created", 0.0)),
                    {str(k): str(v) for k, v in proof.items()})
            if len(bytes.fromhex(c.secret)) != 32 or not 0 < c.epoch < 1 << 62 \
                    or len(c.cluster_id) > 64 or len(c.proof) > 3:
                raise ValueError("out of range")
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed cluster record: {exc}") from None
        return c

    @classmethod
    def new(cls) -> Cluster:
        return cls(secrets.token_hex(8), 1, secrets.token_hex(32), time.time())

    def rotation_fields(self) -> list[Any]:
        return [self.cluster_id, self.epoch, hashlib.sha256(self.secret.encode()).hexdigest(),
                self.proof.get("removed", "")]

    def rotated(self, key: asyncssh.SSHKey, by: str, removed: str) -> Cluster:
        """The next epoch with a fresh secret, signed by ``by`` (who removed ``removed``)."""
        c = Cluster(self.cluster_id, self.epoch + 1, secrets.token_hex(32), self.created,
                    {"by": by, "removed": removed})
        c.proof["sig"] = sign(key, ROTATE, c.rotation_fields())
        return c


@dataclass(frozen=True)
class TokenPayload:
    cluster_id: str
    epoch: int
    issuer: str
    token_id: str  # hex
    expiry: float

    def encode(self) -> bytes:
        return msgpack.packb(
            [self.cluster_id, self.epoch, self.issuer, self.token_id, self.expiry],
            use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> TokenPayload:
        try:
            cid, epoch, issuer, tid, expiry = msgpack.unpackb(raw, raw=False)
            return cls(str(cid), int(epoch), str(issuer), str(tid), float(expiry))
        except Exception:
            raise ProtoError(ErrorCode.PERMISSION_DENIED, "malformed join token") from None


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def token_tag(cluster: Cluster, payload: bytes) -> bytes:
    return hmac.new(bytes.fromhex(cluster.secret), _TAG_LABEL + payload, hashlib.sha256).digest()


def mint_token(cluster: Cluster, issuer: str, ttl: float) -> tuple[str, TokenPayload]:
    if not 0 < ttl <= MAX_TOKEN_TTL:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"ttl must be in (0, {MAX_TOKEN_TTL:.0f}] s")
    p = TokenPayload(cluster.cluster_id, cluster.epoch, issuer, secrets.token_hex(16),
                     time.time() + ttl)
    raw = p.encode()
    return f"{TOKEN_PREFIX}.{_b64e(raw)}.{_b64e(token_tag(cluster, raw))}", p


def parse_token(token: str) -> tuple[bytes, TokenPayload, bytes]:
    """Split a token into (raw payload, payload, tag) without verifying it."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, "not a cnvm join token")
    try:
        raw, tag = _b64d(parts[1]), _b64d(parts[2])
    except (ValueError, TypeError):
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, "not a cnvm join token") from None
    if len(tag) != 32:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, "not a cnvm join token")
    return raw, TokenPayload.decode(raw), tag


def check_payload(cluster: Cluster, p: TokenPayload, now: float | None = None) -> None:
    """Server-side checks that need no secret comparison (the proof does that)."""
    if p.cluster_id != cluster.cluster_id:
        raise ProtoError(ErrorCode.PERMISSION_DENIED, "token is for another cluster")
    if p.epoch != cluster.epoch:
        raise ProtoError(ErrorCode.PERMISSION_DENIED,
                         "token was minted before a node was removed (stale secret)")
    if p.expiry <= (now if now is not None else time.time()):
        raise ProtoError(ErrorCode.PERMISSION_DENIED, "token expired")


def transcript(raw_payload: bytes, joiner: str, nonce_c: bytes, nonce_s: bytes,
               server_key: bytes, client_key: bytes) -> bytes:
    """Everything both proofs are bound to: the token, both nonces and both SSH keys."""
    return msgpack.packb([raw_payload, joiner, nonce_c, nonce_s, server_key, client_key],
                         use_bin_type=True)


def server_proof(tag: bytes, tr: bytes) -> bytes:
    return hmac.new(tag, _SERVER_LABEL + tr, hashlib.sha256).digest()


def client_proof(tag: bytes, tr: bytes) -> bytes:
    return hmac.new(tag, _CLIENT_LABEL + tr, hashlib.sha256).digest()


class TokenLedger:
    """Tokens this node issued, and those already redeemed (the issuer's authority)."""

    def __init__(self, issued: dict[str, float] | None = None,
                 used: dict[str, float] | None = None) -> None:
        self.issued = dict(issued or {})
        self.used = dict(used or {})

    def to_wire(self) -> dict[str, Any]:
        return {"issued": self.issued, "used": self.used}

    def prune(self, now: float | None = None) -> None:
        now = now if now is not None else time.time()
        for d in (self.issued, self.used):
            for k in [k for k, exp in d.items() if exp < now - 60]:
                del d[k]

    def issue(self, p: TokenPayload) -> None:
        self.prune()
        self.issued[p.token_id] = p.expiry

    def consume(self, token_id: str, now: float | None = None) -> None:
        """Mark a token used; refuses unknown, expired or replayed tokens."""
        now = now if now is not None else time.time()
        if token_id in self.used:
            raise ProtoError(ErrorCode.PERMISSION_DENIED, "token already used (replay refused)")
        exp = self.issued.get(token_id)
        if exp is None:
            raise ProtoError(ErrorCode.PERMISSION_DENIED, "token unknown to its issuer")
        if exp <= now:
            raise ProtoError(ErrorCode.PERMISSION_DENIED, "token expired")
        del self.issued[token_id]
        self.used[token_id] = exp
