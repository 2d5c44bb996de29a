"""Join tokens, the token ledger and the enrolment proofs."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import asyncssh
import pytest

from cnvmd.peers import trust
from proto.messages import ProtoError

pytestmark = pytest.mark.unit


def test_token_roundtrip_and_tag_verifies() -> None:
    c = trust.Cluster.new()
    tok, p = trust.mint_token(c, "node1", 60)
    raw, p2, tag = trust.parse_token(tok)
    assert p2 == p and trust.token_tag(c, raw) == tag
    trust.check_payload(c, p2)


def test_tampered_token_has_wrong_tag() -> None:
    c = trust.Cluster.new()
    tok, _ = trust.mint_token(c, "node1", 60)
    head, payload, tag = tok.split(".")
    bad_tag = tag[:-2] + ("AA" if tag[-2:] != "AA" else "BB")
    raw, _, t = trust.parse_token(f"{head}.{payload}.{bad_tag}")
    assert trust.token_tag(c, raw) != t
    other = trust.Cluster.new()
    assert trust.token_tag(other, raw) != trust.parse_token(tok)[2]


@pytest.mark.parametrize("junk", ["", "x", "cnvm1.a.b", "cnvm1..", "cnvm2.AAAA.BBBB",
                                  "cnvm1.!!.??"])
def test_garbage_tokens_refused(junk: str) -> None:
    with pytest.raises(ProtoError):
        trust.parse_token(junk)


def test_expired_stale_and_foreign_tokens() -> None:
    c = trust.Cluster.new()
    _, p = trust.mint_token(c, "node1", 1)
    with pytest.raises(ProtoError, match="expired"):
        trust.check_payload(c, p, now=time.time() + 5)
    with pytest.raises(ProtoError, match="stale"):
        trust.check_payload(c.rotated(asyncssh.generate_private_key("ssh-ed25519"), "n1", "n2"),
                            p)
    with pytest.raises(ProtoError, match="another cluster"):
        trust.check_payload(trust.Cluster.new(), p)


def test_ledger_single_use() -> None:
    c = trust.Cluster.new()
    led = trust.TokenLedger()
    _, p = trust.mint_token(c, "node1", 60)
    led.issue(p)
    led.consume(p.token_id)
    with pytest.raises(ProtoError, match="already used"):
        led.consume(p.token_id)
    with pytest.raises(ProtoError, match="unknown"):
        led.consume("deadbeef")
    _, q = trust.mint_token(c, "node1", 1)
    led.issue(q)
    with pytest.raises(ProtoError, match="expired"):
        led.consume(q.token_id, now=time.time() + 10)
    led2 = trust.TokenLedger(**led.to_wire())
    with pytest.raises(ProtoError, match="already used"):
        led2.consume(p.token_id)


def test_proofs_bind_keys() -> None:
    tag = os.urandom(32)
    tr = trust.transcript(b"p", "n", b"c" * 32, b"s" * 32, b"serverkey", b"clientkey")
    tr_mitm = trust.transcript(b"p", "n", b"c" * 32, b"s" * 32, b"mitmkey", b"clientkey")
    assert trust.server_proof(tag, tr) != trust.server_proof(tag, tr_mitm)
    assert trust.server_proof(tag, tr) != trust.client_proof(tag, tr)


def test_node_key_created_0600_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "peers" / "node_key"
    k1 = trust.load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k2 = trust.load_or_create_key(path)
    assert k1.public_data == k2.public_data
    assert trust.same_key(k1, trust.public_line(k2))
    assert not trust.same_key(k1, "ssh-ed25519 garbage")
