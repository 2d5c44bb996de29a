"""The post-copy prefetch relay against a page server and a lazy-pages client that
speak CRIU's protocol (criu/page-xfer.c) over real loopback sockets: every page the
client gets is the source's, answers come in request order, short answers at the
source's iovec ends work, prefetch really happens, and garbage ends the relay."""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct

import pytest

from cnvmd.migration import lazyrelay as lr
from tests.protobufenc import message

pytestmark = pytest.mark.unit

PAGE = lr.PAGE
ID = 7


def page(addr: int) -> bytes:
    return struct.pack("<Q", addr) * (PAGE // 8)


class StreamUp:
    """The Upstream interface over an asyncio TCP connection."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    async def read(self, n: int) -> bytes:
        return await self.r.read(n)

    async def readexactly(self, n: int) -> bytes:
        return await self.r.readexactly(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.w.write(bytes(data))
        await self.w.drain()

    def write_eof(self) -> None:
        self.w.write_eof()

    def abort(self, reason: str = "") -> None:
        self.w.transport.abort()

    def close(self) -> None:
        self.w.close()


class Source:
    """A dump-side lazy page server: iovecs of pages, GET clamped at iovec ends,
    a GET outside them closes the connection (as CRIU's does)."""

    def __init__(self, iovs: list[tuple[int, int]]) -> None:
        self.iovs = iovs
        self.gets: list[tuple[int, int]] = []
        self.eof = False

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    hdr = await r.readexactly(lr.PSI.size)
                except asyncio.IncompleteReadError:
                    self.eof = True
                    return
                cmd, nr, vaddr, dst = lr.PSI.unpack(hdr)
                if cmd in (lr.PS_IOV_CLOSE, lr.PS_IOV_FORCE_CLOSE):
                    w.write(struct.pack("<i", 0))
                    await w.drain()
                    continue
                assert cmd == lr.PS_IOV_GET and dst == ID
                self.gets.append((vaddr, nr))
                iov = next(((a, b) for a, b in self.iovs if a <= vaddr < b), None)
                if iov is None:
                    return  # CRIU ends the connection
                n = min(nr, (iov[1] - vaddr) // PAGE)
                w.write(lr.PSI.pack((4 << 16) | 6, n, vaddr, dst))
                w.write(b"".join(page(vaddr + i * PAGE) for i in range(n)))
                await w.drain()
        finally:
            w.close()


async def client(port: int, ranges: list[tuple[int, int]], faults: list[int]) -> dict[int, bytes]:
    """Like criu lazy-pages: one background request in flight plus faults, answers
    read in request order; returns every page it got."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    todo = [(a, b) for a, b in ranges]
    got: dict[int, bytes] = {}
    asked: list[tuple[int, int]] = []
    xfer = 16

    async def ask(addr: int, n: int) -> None:
        w.write(lr.PSI.pack(lr.PS_IOV_GET, n, addr, ID))
        asked.append((addr, n))
        await w.drain()

    async def answer() -> None:
        addr, n = asked.pop(0)
        hdr = await r.readexactly(lr.PSI.size)
        _c, nr, vaddr, dst = lr.PSI.unpack(hdr)
        assert vaddr == addr and dst == ID and 0 < nr <= n
        data = await r.readexactly(nr * PAGE)
        for i in range(nr):
            got[vaddr + i * PAGE] = data[i * PAGE:(i + 1) * PAGE]
        # the rest goes back, as uffd_io_complete does
        if nr < n:
            todo.insert(0, (vaddr + nr * PAGE, vaddr + n * PAGE))

    while todo or asked:
        if faults and random.random() < 0.3:
            f = faults.pop()
            if f not in got and not any(a <= f < a + n * PAGE for a, n in asked):
                await ask(f, 1)
                xfer = 16
        if todo and len(asked) < 2:
            a, b = todo.pop(0)
            while a < b and a in got:
                a += PAGE
            if a < b:
                e = a
                while e < min(b, a + xfer * PAGE) and e not in got:
                    e += PAGE
                await ask(a, (e - a) // PAGE)
                if e < b:
                    todo.insert(0, (e, b))
                xfer = min(xfer + 16, 1024)
        if asked:
            await answer()
    w.write(lr.PSI.pack(lr.PS_IOV_CLOSE, 0, 0, 0))
    await w.drain()
    assert struct.unpack("<i", await r.readexactly(4)) == (0,)
    w.close()
    return got


async def run_case(iovs: list[tuple[int, int]], pagemaps: dict[int, list[tuple[int, int]]],
                   src: Source | None = None, gate: asyncio.Event | None = None,
                   **kw: int) -> tuple[dict[int, bytes], lr.Prefetcher, Source]:
    src = src or Source(iovs)
    srv = await asyncio.start_server(src.serve, "127.0.0.1", 0)
    sport = srv.sockets[0].getsockname()[1]
    result: dict[str, lr.Prefetcher] = {}

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", sport)
        p = lr.Prefetcher(StreamUp(ur, uw), r, w, pagemaps, gate=gate, **kw)
        result["p"] = p
        with contextlib.suppress(Exception):
            await p.run()
        uw.close()
        w.close()

    relay = await asyncio.start_server(accept, "127.0.0.1", 0)
    rport = relay.sockets[0].getsockname()[1]
    try:
        ranges = sorted(iovs)
        faults = [a + PAGE * random.randrange((b - a) // PAGE) for a, b in ranges
                  for _ in range(5)]
        got = await asyncio.wait_for(client(rport, ranges, faults), 20)
        for _ in range(100):
            if src.eof:
                break
            await asyncio.sleep(0.01)
    finally:
        relay.close()
        srv.close()
    return got, result["p"], src


def expected(iovs: list[tuple[int, int]]) -> dict[int, bytes]:
    return {a: page(a) for s, e in iovs for a in range(s, e, PAGE)}


async def test_every_page_arrives_in_order_with_prefetch() -> None:
    random.seed(1)
    base = 0x7F0000000000
    # source iovecs split where the pagemap does not (short answers)
    iovs = [(base, base + 300 * PAGE), (base + 300 * PAGE, base + 700 * PAGE),
            (base + 1000 * PAGE, base + 1200 * PAGE)]
    pm = {ID: [(base, base + 700 * PAGE), (base + 1000 * PAGE, base + 1200 * PAGE)]}
    got, p, src = await run_case(iovs, pm, chunk_pages=64, window=256 * PAGE)
    assert got == expected(iovs)
    assert p.prefetched > 0 and p.hits > 0, "nothing was prefetched"
    assert src.eof, "the source never saw the end"
    # the window is respected and nothing is fetched twice beyond what faults raced
    fetched = sum(n for _, n in src.gets)
    assert fetched <= 1.2 * sum((b - a) // PAGE for a, b in iovs)


async def test_without_a_pagemap_it_is_a_plain_relay() -> None:
    random.seed(2)
    base = 0x400000
    iovs = [(base, base + 100 * PAGE)]
    got, p, _ = await run_case(iovs, {})
    assert got == expected(iovs)
    assert p.prefetched == 0 and p.hits == 0


async def test_small_cache_still_delivers_everything() -> None:
    random.seed(3)
    base = 0x500000
    iovs = [(base, base + 2000 * PAGE)]
    got, p, _ = await run_case(iovs, {ID: iovs}, chunk_pages=32, window=64 * PAGE,
                               cache=128 * PAGE)
    assert got == expected(iovs)
    assert p.cache_bytes >= 0


async def test_held_prefetch_relays_only_the_daemons_requests() -> None:
    """Until the target releases it (the cnvm runs), no prefetch request goes out."""
    random.seed(4)
    base = 0x600000
    iovs = [(base, base + 600 * PAGE)]
    got, p, src = await run_case(iovs, {ID: iovs}, gate=asyncio.Event(), chunk_pages=32,
                                 window=128 * PAGE)
    assert got == expected(iovs)
    assert p.prefetched == 0 and p.hits == 0
    assert len(src.gets) == p.bytes_up // lr.PSI.size - 1  # the daemon's GETs and its CLOSE


async def test_released_prefetch_starts_and_delivers_everything() -> None:
    random.seed(5)
    base = 0x700000
    iovs = [(base, base + 3000 * PAGE)]
    gate = asyncio.Event()

    class Releasing(Source):  # the gate opens once the daemon's first GET was served
        async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            asyncio.get_running_loop().call_later(0.01, gate.set)
            await super().serve(r, w)

    got, p, _ = await run_case(iovs, {ID: iovs}, src=Releasing(iovs), gate=gate,
                               chunk_pages=32, window=128 * PAGE)
    assert got == expected(iovs)
    assert gate.is_set() and p.prefetched > 0


async def test_garbage_from_the_daemon_resets_both_sides() -> None:
    src = Source([(0x1000, 0x9000)])
    srv = await asyncio.start_server(src.serve, "127.0.0.1", 0)
    sport = srv.sockets[0].getsockname()[1]
    errors: list[BaseException] = []

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", sport)
        try:
            await lr.prefetch_splice(StreamUp(ur, uw), r, w, {})
        except lr.ProtocolError as exc:
            errors.append(exc)

    relay = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
        w.write(lr.PSI.pack(99, 1, 0x1000, ID))
        await w.drain()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.01)
        assert errors and "command 0x63" in str(errors[0])
    finally:
        relay.close()
        srv.close()


def test_pagemap_parser_reads_lazy_entries() -> None:
    img = struct.pack("<II", lr.IMG_COMMON_MAGIC, lr.PAGEMAP_MAGIC) + message({1: 1})
    img += message({1: 0x400000, 2: 3, 4: 4})  # present, not lazy
    img += message({1: 0x7F0000000000, 2: 2, 4: 2 | 4})  # lazy, compat count
    img += message({1: 0x7F1000000000, 2: 0, 4: 2, 5: 5})  # lazy, 64-bit count
    assert lr.parse_pagemap(img) == [(0x7F0000000000, 0x7F0000000000 + 2 * PAGE),
                                     (0x7F1000000000, 0x7F1000000000 + 5 * PAGE)]
    with pytest.raises(ValueError):
        lr.parse_pagemap(b"\0" * 8)
    with pytest.raises(ValueError):
        lr.parse_pagemap(img[:-2])
