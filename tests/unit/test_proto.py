"""Wire protocol: framing, envelopes, the API session and the client, without root.

The server side is exercised in-process over a real Unix socket (ApiServer with a
test Router), so concurrency, events and cancellation are tested without cnvmd.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnvmd.api import HELLO_MAX_FRAME, ApiLimits, ApiServer, Args, Context, Router, Session
from proto.client import Client, Disconnected
from proto.framing import (
    MAX_DEPTH,
    MAX_FRAME,
    MMAP_MIN,
    DecodeLimits,
    FrameBudget,
    FrameBusy,
    FrameDecoder,
    FrameError,
    decode_body,
    encode_frame,
    read_frame,
)
from proto.messages import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorCode,
    Hello,
    ProtoError,
    Request,
    negotiate,
    parse_client_frame,
)

pytestmark = pytest.mark.unit

# msgpack values that round-trip exactly (no floats: NaN != NaN; tuples become lists)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=20,
)
maps = st.dictionaries(st.text(max_size=10), values, max_size=8)


# ------------------------------------------------------------------------- framing


@given(maps)
def test_frame_roundtrip(m: dict[str, Any]) -> None:
    frame = encode_frame(m)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert FrameDecoder().feed(frame) == [m]


@given(st.lists(maps, min_size=1, max_size=5), st.data())
@settings(max_examples=50)
def test_decoder_any_chunking(msgs: list[dict[str, Any]], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    out: list[dict[str, Any]] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        out += dec.feed(stream[prev:c])
        prev = c
    assert out == msgs
    assert dec.pending == 0


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_random_bytes_never_crash_decoder(blob: bytes) -> None:
    dec = FrameDecoder(max_frame=1024)
    try:
        for m in dec.feed(blob):
            assert isinstance(m, dict)
    except FrameError:
        pass


def test_oversized_header_rejected_before_body() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameError, match="limit"):
        dec.feed(struct.pack(">I", 1025))
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(FrameError):
        encode_frame({"x": b"\0" * 2048}, max_frame=1024)


@pytest.mark.parametrize("body", [
    b"\x93\x01\x02\x03",  # array at top level
    b"\x01",  # scalar
    b"\x85\xa1t",  # truncated map
    b"\x81\xa1t\xa3req\x00",  # trailing bytes
    b"\xc1",  # never-used msgpack byte
    b"",  # empty body
    b"\x81\x01\x02",  # int key
])
def test_bad_bodies(body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_body(body)
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def _nest(depth: int) -> dict[str, Any]:
    """A map whose value nests `depth` levels in all (the map itself is level 1)."""
    v: Any = 0
    for i in range(depth - 1):
        v = [v] if i % 2 else {"k": v}
    return {"t": v}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100, 1000, 5000])
def test_nesting_depth_is_bounded(depth: int) -> None:
    """Deep values would overflow the stack of whatever walks them later (repr in an
    error message gave `internal: RecursionError`): refused as framing errors."""
    body = b"\x81\xa1t" + b"\x91" * (depth - 1) + b"\x00"  # {"t": [[...[0]...]]}
    with pytest.raises(FrameError, match=r"deeper|undecodable"):
        decode_body(body)
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_nesting_up_to_the_limit_and_wide_frames_decode() -> None:
    m = _nest(MAX_DEPTH)
    assert decode_body(msgpack.packb(m)) == m
    wide = {"rows": [{"name": f"c{i}", "ports": [i, i + 1]} for i in range(5000)]}
    assert decode_body(msgpack.packb(wide)) == wide


def test_object_count_limits() -> None:
    lim = DecodeLimits(max_containers=100, max_items=1000)
    with pytest.raises(FrameError, match="maps/arrays"):
        decode_body(msgpack.packb({"x": [[] for _ in range(200)]}), lim)
    with pytest.raises(FrameError, match="max_array_len"):  # one container too big
        decode_body(msgpack.packb({"x": list(range(5000))}), lim)
    with pytest.raises(FrameError, match="elements"):  # many containers, too big together
        decode_body(msgpack.packb({"x": [list(range(90)) for _ in range(20)]}), lim)
    assert decode_body(msgpack.packb({"x": list(range(900))}), lim)["x"][-1] == 899


def test_decoder_buffer_and_budget() -> None:
    """One exact buffer per frame (an anonymous mapping when large), charged to the
    shared budget while the frame is partial and given back when it ends or dies."""
    budget = FrameBudget(3 * MMAP_MIN)
    frame = encode_frame({"b": b"x" * (2 * MMAP_MIN)})
    a, b = FrameDecoder(budget=budget), FrameDecoder(budget=budget)
    assert a.feed(frame[:1000]) == [] and a.partial and a.pending == 1000
    assert budget.used == len(frame) - 4
    with pytest.raises(FrameBusy):  # a second big frame does not fit
        b.feed(frame[:10])
    assert budget.used == len(frame) - 4
    out = a.feed(frame[1000:])
    assert out[0]["b"] == b"x" * (2 * MMAP_MIN) and budget.used == 0 and not a.partial
    small = encode_frame({"s": 1})  # below free_size: never charged
    assert FrameDecoder(budget=FrameBudget(0)).feed(small) == [{"s": 1}]
    c = FrameDecoder(budget=budget)
    c.feed(frame[:5000])
    assert budget.used > 0
    c.close()  # the connection died mid-frame
    assert budget.used == 0 and c.pending == 0


async def test_read_frame_eof_and_truncation() -> None:
    async def reader(data: bytes) -> asyncio.StreamReader:
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return r

    good = encode_frame({"t": "hello"})
    assert await read_frame(await reader(good)) == {"t": "hello"}
    assert await read_frame(await reader(b"")) is None
    with pytest.raises(FrameError, match="header"):
        await read_frame(await reader(good[:2]))
    with pytest.raises(FrameError, match="body"):
        await read_frame(await reader(good[:-1]))
    with pytest.raises(FrameError, match="limit"):
        await read_frame(await reader(struct.pack(">I", MAX_FRAME + 1)))


# ------------------------------------------------------------------------- envelopes


@given(st.dictionaries(st.sampled_from(["t", "id", "op", "args", "proto", "agent", "x"]),
                       st.one_of(values, st.sampled_from(["req", "cancel", "hello", "evt"])),
                       max_size=6))
def test_parse_client_frame_total(obj: dict[str, Any]) -> None:
    """Any map parses to an envelope or raises ProtoError(BAD_REQUEST) — nothing else."""
    try:
        msg = parse_client_frame(obj)
    except ProtoError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST
    else:
        assert isinstance(msg, Hello | Request | Cancel)


def test_parse_request_details() -> None:
    assert parse_client_frame({"t": "req", "id": 3, "op": "ls"}) == Request(3, "ls", {})
    assert parse_client_frame({"t": "req", "id": "a", "op": "ls", "args": None}).args == {}
    with pytest.raises(ProtoError) as e:
        parse_client_frame({"t": "req", "id": 3, "op": "ls", "args": [1]})
    assert e.value.details["id"] == 3
    for bad_id in (1.5, True, None, "", "x" * 65, 2**63, [1]):
        with pytest.raises(ProtoError):
            parse_client_frame({"t": "req", "id": bad_id, "op": "ls"})


def test_negotiate() -> None:
    assert negotiate(PROTOCOL_VERSION) == PROTOCOL_VERSION
    assert negotiate(PROTOCOL_VERSION + 5) == PROTOCOL_VERSION
    for bad in (0, -1, "1", None, True, 1.0):
        with pytest.raises(ProtoError) as e:
            negotiate(bad)
        assert e.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_error_wire_roundtrip() -> None:
    e = ProtoError(ErrorCode.NOT_FOUND, "gone", {"name": "x"})
    back = ProtoError.from_wire(e.to_wire())
    assert (back.code, back.message, back.details) == (ErrorCode.NOT_FOUND, "gone", {"name": "x"})
    assert ProtoError.from_wire("junk").code == ErrorCode.INTERNAL


# ------------------------------------------------------------------------- args


def test_args_helpers() -> None:
    a = Args({"name": "web-1", "n": 3, "f": 2, "b": True, "l": ["x"], "m": {}, "extra": 1})
    assert a.name() == "web-1"
    assert a.int("n", min=1, max=5) == 3
    assert a.float("f") == 2.0
    assert a.bool("b") is True
    assert a.list("l") == ["x"]
    assert a.map("m") == {}
    assert a.str("missing", None) is None
    assert Args({"d": b"\x00\xff", "s": "hi"}).bytes("d") == b"\x00\xff"
    assert Args({"s": "hi"}).bytes("s") == b"hi"
    with pytest.raises(ProtoError, match="must be bytes"):
        Args({"d": 5}).bytes("d")
    with pytest.raises(ProtoError, match="longer than 4 bytes"):
        Args({"d": b"12345"}).bytes("d", max_len=4)
    with pytest.raises(ProtoError, match="unknown argument"):
        a.reject_unknown()
    for call in (lambda: a.int("b"), lambda: a.int("n", max=2), lambda: a.str("n"),
                 lambda: a.str("absent"), lambda: Args({"name": "Bad_Name"}).name(),
                 lambda: a.list("l", of=int), lambda: a.str("name", choices=["a"])):
        with pytest.raises(ProtoError) as e:
            call()
        assert e.value.code == ErrorCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------- server+client


class FakeDaemon:
    node_name = "unit"

    def hello_reply(self, version: int) -> dict[str, Any]:
        return {"t": "hello", "proto": version, "agent": "test", "node": self.node_name}


def make_router(log: list[str]) -> Router:
    r = Router()

    @r.op("echo")
    async def echo(ctx: Context, args: Args) -> Any:
        """Return args."""
        return dict(args)

    @r.op("slow")
    async def slow(ctx: Context, args: Args) -> str:
        steps = args.int("steps", 3)
        for i in range(steps):
            ctx.progress("work", done=i, total=steps)
            await asyncio.sleep(args.float("delay", 0.05))
        return "done"

    @r.op("forever")
    async def forever(ctx: Context, args: Args) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            log.append("cleaned up")
            raise

    @r.op("boom")
    async def boom(ctx: Context, args: Args) -> None:
        raise RuntimeError("kaboom")

    @r.op("unserialisable")
    async def unser(ctx: Context, args: Args) -> Any:
        return object()

    @r.op("baddetails")
    async def baddetails(ctx: Context, args: Args) -> None:
        raise ProtoError(ErrorCode.FAILED, "x", {"obj": object()})

    @r.op("path")
    async def path(ctx: Context, args: Args) -> Any:
        return {"p": Path("/x"), "s": {1}, "c": ErrorCode.BUSY}

    return r


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    log: list[str] = []
    srv = ApiServer(make_router(log), FakeDaemon())
    sock = tmp_path / "api.sock"
    await srv.start(sock, group=None)
    srv.cleanup_log = log  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        await srv.stop(grace=2)


async def test_client_basic_and_concurrent(server: ApiServer) -> None:
    assert server.path is not None
    assert (server.path.stat().st_mode & 0o777) == 0o660
    async with await Client.connect(server.path) as c:
        assert c.server["node"] == "unit"
        assert await c.call("echo", {"a": 1}) == {"a": 1}
        # slow then fast on one connection: fast answers first
        slow = c.start("slow", {"steps": 3})
        fast = await c.call("echo", {"b": 2})
        assert fast == {"b": 2} and not slow.done
        events = [ev async for ev in slow]
        assert [e.data["done"] for e in events] == [0, 1, 2]
        assert events[0].name == "progress"
        assert await slow == "done"
        many = await asyncio.gather(*[c.call("echo", {"i": i}) for i in range(200)])
        assert [m["i"] for m in many] == list(range(200))
        assert await c.call("path") == {"p": "/x", "s": [1], "c": "busy"}


async def test_errors_and_cancel(server: ApiServer) -> None:
    async with await Client.connect(server.path) as c:  # type: ignore[arg-type]
        for op, code in (("nope", "unknown_op"), ("boom", "internal"),
                         ("unserialisable", "internal"), ("baddetails", "internal")):
            with pytest.raises(ProtoError) as e:
                await c.call(op)
            assert e.value.code == code
        call = c.start("forever")
        await asyncio.sleep(0.05)
        await call.cancel()
        with pytest.raises(ProtoError) as e:
            await call
        assert e.value.code == ErrorCode.CANCELLED
        assert server.cleanup_log == ["cleaned up"]  # type: ignore[attr-defined]
        # timeout on the client side sends a cancel too
        with pytest.raises(TimeoutError):
            await c.call("forever", timeout=0.05)
        await asyncio.sleep(0.05)
        assert server.cleanup_log == ["cleaned up"] * 2  # type: ignore[attr-defined]
        assert await c.call("echo") == {}


async def test_disconnect_cancels_requests(server: ApiServer) -> None:
    c = await Client.connect(server.path)  # type: ignore[arg-type]
    c.start("forever")
    await asyncio.sleep(0.05)
    await c.aclose()
    for _ in range(50):
        if server.cleanup_log:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert server.cleanup_log == ["cleaned up"]  # type: ignore[attr-defined]


async def test_shutdown_fails_inflight_with_unavailable(tmp_path: Path) -> None:
    srv = ApiServer(make_router([]), FakeDaemon())
    await srv.start(tmp_path / "s.sock", group=None)
    c = await Client.connect(tmp_path / "s.sock")
    call = c.start("forever")
    await asyncio.sleep(0.05)
    await srv.stop(grace=2)
    with pytest.raises(ProtoError) as e:
        await call
    assert e.value.code == ErrorCode.UNAVAILABLE
    assert not (tmp_path / "s.sock").exists()


async def test_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(Disconnected):
        await Client.connect(tmp_path / "missing.sock", timeout=1)


async def raw(path: Path, data: bytes, read: bool = True,
              until: int | None = None) -> list[dict[str, Any]]:
    """Send bytes on a fresh connection; collect frames until EOF or `until` responses."""
    r, w = await asyncio.open_unix_connection(str(path))
    w.write(data)
    await w.drain()
    out: list[dict[str, Any]] = []
    if read:
        try:
            while True:
                f = await asyncio.wait_for(read_frame(r), 2)
                if f is None:
                    break
                out.append(f)
                if until is not None and sum(x["t"] == "res" for x in out) >= until:
                    break
        except (TimeoutError, FrameError, ConnectionError):
            pass
    w.close()
    return out


HELLO = encode_frame({"t": "hello", "proto": 1, "agent": "raw"})


async def test_malformed_inputs_keep_server_alive(server: ApiServer) -> None:
    p = server.path
    assert p is not None
    good = await Client.connect(p)

    # huge length prefix after hello: error + close
    out = await raw(p, HELLO + struct.pack(">I", 0xFFFFFFF0))
    assert out[0]["t"] == "hello" and out[-1]["error"]["code"] == "bad_frame"
    # truncated msgpack inside a complete frame
    body = b"\x85\xa1t"
    out = await raw(p, HELLO + struct.pack(">I", len(body)) + body)
    assert out[-1]["error"]["code"] == "bad_frame"
    # no hello first
    out = await raw(p, encode_frame({"t": "req", "id": 1, "op": "echo"}))
    assert out[-1]["id"] is None and out[-1]["error"]["code"] == "bad_request"
    # bad protocol versions
    for v in (0, "1", None):
        out = await raw(p, encode_frame({"t": "hello", "proto": v}))
        assert out[-1]["error"]["code"] == "unsupported_version"
    # wrong types keep the connection: every bad request answered, then a good one works
    bad = [{"t": "req", "id": 1.5, "op": "echo"}, {"t": "req", "id": 2, "op": 7},
           {"t": "req", "id": 3, "op": "echo", "args": [1]}, {"t": "what"},
           {"t": "req", "id": 4, "op": "nope"}, {"t": "hello", "proto": 1},
           {"t": "cancel", "id": 999}, {"t": "req", "id": 5, "op": "echo", "args": {"k": 1}}]
    out = await raw(p, HELLO + b"".join(encode_frame(b) for b in bad), until=7)
    res = [f for f in out if f["t"] == "res"]
    assert [r["id"] for r in res] == [None, 2, 3, None, 4, None, 5]
    assert [r.get("error", {}).get("code") for r in res] == [
        "bad_request", "bad_request", "bad_request", "bad_request", "unknown_op",
        "bad_request", None]
    # duplicate in-flight id
    out = await raw(p, HELLO + encode_frame({"t": "req", "id": 1, "op": "slow"})
                    + encode_frame({"t": "req", "id": 1, "op": "echo"}), until=2)
    res = [f for f in out if f["t"] == "res"]
    assert res[0]["id"] is None and res[0]["error"]["details"]["id"] == 1
    assert res[1]["id"] == 1 and res[1]["result"] == "done"
    # request and its cancel in one chunk: cancelled before it ever ran, still answered
    r, w = await asyncio.open_unix_connection(str(p))
    w.write(HELLO + encode_frame({"t": "req", "id": 9, "op": "forever"})
            + encode_frame({"t": "cancel", "id": 9}))
    assert (await read_frame(r))["t"] == "hello"  # type: ignore[index]
    res = await asyncio.wait_for(read_frame(r), 2)
    assert res is not None and res["id"] == 9 and res["error"]["code"] == "cancelled"
    w.write(encode_frame({"t": "req", "id": 9, "op": "echo"}))  # the id is free again
    res = await asyncio.wait_for(read_frame(r), 2)
    assert res is not None and res["id"] == 9 and res["ok"]
    w.close()
    # truncated frame then close: nothing to answer, no crash
    await raw(p, HELLO + HELLO[:7], read=False)
    assert await good.call("echo", {"still": "alive"}) == {"still": "alive"}
    await good.aclose()


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_session_random_bytes(blob: bytes) -> None:
    """Feeding arbitrary bytes to a session only ever writes frames or closes it."""

    async def go() -> None:
        written: list[bytes] = []
        closed: list[bool] = []
        s = Session(make_router([]), FakeDaemon(), written.append, lambda: closed.append(True))
        s.feed(HELLO)
        s.feed(blob)
        await asyncio.sleep(0)
        for w in written:
            FrameDecoder().feed(w)  # every write is a valid frame

    asyncio.run(go())


def test_raw_msgpack_matches_readme_example() -> None:
    """The README's frame layout is what encode_frame produces."""
    body = msgpack.packb({"t": "hello", "proto": 1, "agent": "sh"})
    assert encode_frame({"t": "hello", "proto": 1, "agent": "sh"}) == (
        struct.pack(">I", len(body)) + body)
    assert struct.pack(">I", len(body)) == b"\x00\x00\x00\x19"


# ------------------------------------------------------------------------- server limits


async def _closing_error(r: asyncio.StreamReader, timeout: float = 5) -> dict[str, Any]:
    """Read until EOF; the last frame (the server's error before it closed)."""
    last: dict[str, Any] = {}
    while True:
        f = await asyncio.wait_for(read_frame(r), timeout)
        if f is None:
            return last
        last = f


async def test_server_read_timeouts_and_caps(tmp_path: Path) -> None:
    """A dribbled frame is cut at frame_timeout; an idle connection at idle_timeout
    (not one with a request in flight); the connection cap answers BUSY; frames before
    the hello and requests above max_request_frame are refused; big partial frames
    share one budget."""
    lim = ApiLimits(max_connections=6, root_reserve=1, frame_timeout=0.4, idle_timeout=0.8,
                    max_request_frame=4 * MMAP_MIN, read_budget=5 * MMAP_MIN)
    srv = ApiServer(make_router([]), FakeDaemon(), lim)
    p = tmp_path / "lim.sock"
    await srv.start(p, group=None)
    try:
        # a frame sent one byte at a time, forever: closed after frame_timeout
        r, w = await asyncio.open_unix_connection(str(p))
        w.write(HELLO)
        assert (await read_frame(r))["t"] == "hello"  # type: ignore[index]
        frame = encode_frame({"t": "req", "id": 1, "op": "echo", "args": {"x": "y" * 100}})
        t0 = asyncio.get_running_loop().time()

        async def dribble() -> None:
            for byte in frame[:-1]:
                w.write(bytes([byte]))
                await asyncio.sleep(0.02)

        drip = asyncio.ensure_future(dribble())
        err = await _closing_error(r)
        drip.cancel()
        took = asyncio.get_running_loop().time() - t0
        assert err["error"]["code"] == "bad_frame" and "within" in err["error"]["message"]
        assert 0.3 < took < 2.5
        w.close()
        # idle: closed; busy with a request in flight: kept
        r1, w1 = await asyncio.open_unix_connection(str(p))
        r2, w2 = await asyncio.open_unix_connection(str(p))
        w1.write(HELLO)
        w2.write(HELLO + encode_frame({"t": "req", "id": 1, "op": "forever"}))
        err = await _closing_error(r1)
        assert err["error"]["code"] == "unavailable" and "idle" in err["error"]["message"]
        assert (await read_frame(r2))["t"] == "hello"  # type: ignore[index]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read_frame(r2), 1.2)  # nothing: still open
        w1.close()
        w2.close()
        await asyncio.sleep(0.1)
        # before the hello, frames are small; after it, below max_request_frame
        out = await raw(p, struct.pack(">I", HELLO_MAX_FRAME + 1))
        assert out[-1]["error"]["code"] == "bad_frame"
        out = await raw(p, HELLO + struct.pack(">I", 4 * MMAP_MIN + 1))
        assert out[-1]["error"]["code"] == "bad_frame"
        # two 3 MiB partial frames: the second does not fit the 5 MiB budget
        big = struct.pack(">I", 3 * MMAP_MIN) + b"\x81"
        ra, wa = await asyncio.open_unix_connection(str(p))
        wa.write(HELLO + big)
        assert (await read_frame(ra))["t"] == "hello"  # type: ignore[index]
        await asyncio.sleep(0.1)
        assert srv.budget.used == 3 * MMAP_MIN
        out = await raw(p, HELLO + big)
        assert out[-1]["error"]["code"] == "busy"
        assert (await _closing_error(ra))["error"]["code"] == "bad_frame"  # frame timeout
        assert srv.budget.used == 0
        wa.close()
        # the connection cap: root keeps its reserve, everyone else gets BUSY at the cap
        conns = [await asyncio.open_unix_connection(str(p)) for _ in range(lim.max_connections)]
        await asyncio.sleep(0.1)
        cap = lim.max_connections - (0 if os.geteuid() == 0 else lim.root_reserve)
        assert len(srv.sessions) == cap
        out = await raw(p, HELLO)
        assert out[-1]["error"]["code"] == "busy"
        for _, cw in conns:
            cw.close()
        await asyncio.sleep(0.1)
        async with await Client.connect(p) as c:
            assert await c.call("echo", {"ok": 1}) == {"ok": 1}
    finally:
        await srv.stop(grace=1)
