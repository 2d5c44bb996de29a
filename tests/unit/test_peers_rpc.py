"""The request engine the peer mesh shares with the API socket (cnvmd.api), without SSH:
a greeted Session naming its caller, `dispatch` for ops run inside another request
(peer.forward), and stream kinds on a Router."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cnvmd.api import Args, Context, Router, Session, dispatch
from proto.framing import FrameDecoder, encode_frame
from proto.messages import ErrorCode, ProtoError, cancel, hello, request

pytestmark = pytest.mark.unit


class Wire:
    """A Session's far end: what it wrote, decoded."""

    def __init__(self) -> None:
        self.dec = FrameDecoder()
        self.msgs: list[dict[str, Any]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.msgs.extend(self.dec.feed(data))

    def close(self) -> None:
        self.closed = True

    async def reply(self, rid: int, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for m in self.msgs:
                    if m.get("t") == "res" and m.get("id") == rid:
                        return m
                await asyncio.sleep(0.01)


def peer_session(router: Router, node: str | None = "node2") -> tuple[Session, Wire]:
    wire = Wire()
    return Session(router, None, wire.write, wire.close, greeted=True, node=node), wire


async def test_greeted_session_serves_at_once_and_names_the_caller() -> None:
    r = Router()

    @r.op("who")
    async def who(ctx: Context, args: Args) -> dict[str, Any]:
        ctx.emit("tick", {"n": 1})
        return {"node": ctx.node, "op": ctx.op}

    sess, wire = peer_session(r)
    sess.feed(encode_frame(request(1, "who")))
    res = await wire.reply(1)
    assert res["ok"] and res["result"] == {"node": "node2", "op": "who"}
    assert {"t": "evt", "id": 1, "event": "tick", "data": {"n": 1}} in wire.msgs
    # No second hello on an authenticated transport; unknown ops as on the socket.
    sess.feed(encode_frame(hello("x")))
    sess.feed(encode_frame(request(2, "nope")))
    res = await wire.reply(2)
    assert res["error"]["code"] == ErrorCode.UNKNOWN_OP and res["error"]["details"]["ops"] == [
        "who"]
    assert any(m.get("error", {}).get("code") == ErrorCode.BAD_REQUEST for m in wire.msgs)
    # A local API session (no greeted flag) still wants its hello first.
    local = Wire()
    s2 = Session(r, None, local.write, local.close)
    s2.feed(encode_frame(request(1, "who")))
    assert local.closed and local.msgs[0]["error"]["code"] == ErrorCode.BAD_REQUEST


async def test_errors_map_the_same_for_every_caller(caplog: pytest.LogCaptureFixture) -> None:
    r = Router()

    @r.op("boom")
    async def boom(ctx: Context, args: Args) -> None:
        raise RuntimeError("disk on fire")

    @r.op("no")
    async def no(ctx: Context, args: Args) -> None:
        raise ProtoError(ErrorCode.CONFLICT, "nope", {"why": 1})

    sess, wire = peer_session(r)
    sess.feed(encode_frame(request(1, "boom")))
    sess.feed(encode_frame(request(2, "no")))
    assert (await wire.reply(1))["error"] == {"code": "internal",
                                              "message": "RuntimeError: disk on fire"}
    assert (await wire.reply(2))["error"] == {"code": "conflict", "message": "nope",
                                              "details": {"why": 1}}
    # The same op through dispatch (in process): the same errors, as exceptions.
    with pytest.raises(ProtoError) as ei:
        await dispatch(r, Context.local("boom"), "boom", {})
    assert (ei.value.code, ei.value.message) == (ErrorCode.INTERNAL, "RuntimeError: disk on fire")
    with pytest.raises(ProtoError) as ei:
        await dispatch(r, Context.local("x"), "x", {})
    assert ei.value.code == ErrorCode.UNKNOWN_OP
    assert "disk on fire" in caplog.text


async def test_nested_op_events_cancel_and_disconnect() -> None:
    """What peer.forward does: an op of another router inside a request's Context."""
    inner = Router()
    seen: list[str] = []
    gate = asyncio.Event()

    @inner.op("work")
    async def work(ctx: Context, args: Args) -> str:
        ctx.progress("step", done=1, total=1)
        seen.append(f"{args.str('tag')} from {ctx.node}")
        try:
            await gate.wait()
        except asyncio.CancelledError:
            seen.append(f"{args.str('tag')} cancelled")
            raise
        seen.append(f"{args.str('tag')} done")
        return args.str("tag")

    @inner.op("teleport", cancel_on_disconnect=False)
    async def teleport(ctx: Context, args: Args) -> str:
        return await work(ctx, args)

    outer = Router()

    @outer.op("fwd")
    async def fwd(ctx: Context, args: Args) -> Any:
        op = args.str("op")
        return await dispatch(inner, ctx.nested(op), op, args.map("args"))

    sess, wire = peer_session(outer, node="node7")
    sess.feed(encode_frame(request(1, "fwd", {"op": "work", "args": {"tag": "a"}})))
    await asyncio.sleep(0.05)
    assert seen == ["a from node7"]
    assert any(m.get("t") == "evt" and m["id"] == 1 and m["data"]["phase"] == "step"
               for m in wire.msgs)
    sess.feed(encode_frame(cancel(1)))
    assert (await wire.reply(1))["error"]["code"] == ErrorCode.CANCELLED
    assert seen[-1] == "a cancelled"

    # cancel_on_disconnect=False: an explicit cancel still reaches it...
    sess.feed(encode_frame(request(2, "fwd", {"op": "teleport", "args": {"tag": "b"}})))
    await asyncio.sleep(0.05)
    sess.feed(encode_frame(cancel(2)))
    assert (await wire.reply(2))["error"]["code"] == ErrorCode.CANCELLED
    assert seen[-1] == "b cancelled"
    # ...but a lost connection does not: it finishes on its own, events dropped.
    sess.feed(encode_frame(request(3, "fwd", {"op": "teleport", "args": {"tag": "c"}})))
    await asyncio.sleep(0.05)
    sess.lost()
    await asyncio.sleep(0.05)
    assert seen[-1] == "c from node7"
    gate.set()
    await asyncio.sleep(0.05)
    assert seen[-1] == "c done"


async def test_local_context_events_and_router_streams() -> None:
    r = Router()
    got: list[tuple[str, dict[str, Any]]] = []

    @r.op("hi")
    async def hi(ctx: Context, args: Args) -> str | None:
        ctx.emit("said", {"x": 1})
        assert ctx.connected
        await ctx.drain()
        return ctx.node

    ctx = Context.local("hi", node="me", on_event=lambda n, d: got.append((n, d)))
    assert await dispatch(r, ctx, "hi", {}) == "me"
    assert got == [("said", {"x": 1})]

    async def kind(stream: Any, args: dict[str, Any]) -> None:
        return None

    r.stream("bulk.a")(kind)
    with pytest.raises(ValueError, match="registered twice"):
        r.stream("bulk.a")(kind)
    with pytest.raises(ValueError, match="bad stream kind"):
        r.stream("Bad Kind")
    other = Router()
    other.stream("bulk.a")(kind)
    with pytest.raises(ValueError, match=r"stream kind 'bulk\.a' defined by both"):
        r.include(other)
    merged = Router()
    merged.include(r)
    assert merged.streams == {"bulk.a": kind} and "hi" in merged.ops
