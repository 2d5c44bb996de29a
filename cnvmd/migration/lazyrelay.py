"""Post-copy prefetch: the target's relay between CRIU's lazy-pages daemon and the
source's lazy page server, speaking CRIU's page-server protocol.

Why: the lazy-pages daemon keeps ONE background request in flight per process, of
64 KiB growing by 64 KiB per request up to 4 MiB, and back to 64 KiB at every page
fault (criu/uffd.c: `xfer_pages`, `update_xfer_len`). Through two relays and an SSH
channel each request costs a round trip, so pages arrived at about 100 MB/s (20 MB/s
with a cnvm that keeps faulting) on a link that carries 500 MB/s. This relay reads
the images' pagemaps (which pages the source still holds), keeps a bounded window of
large requests in flight to the source and answers the daemon from what has
arrived; a request for a page not fetched yet goes out at once, behind at most the
window, so a fault waits for little more than one round trip.

The protocol (criu/page-xfer.c, include/page-xfer.h): the client sends
``struct page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id}`` (32 bytes,
natural alignment). ``PS_IOV_GET(nr, vaddr, id)`` is answered, in request order, by
a header ``PS_IOV_ADD_F|PE_PRESENT`` with ``nr' <= nr`` (clamped at the end of the
source's iovec; the daemon re-requests the rest) and nr' pages; a GET for pages the
source does not hold ends the connection, so only ranges from the pagemaps are
prefetched. ``PS_IOV_CLOSE``/``FORCE_CLOSE`` is answered by an int32 status.
Anything else from the daemon ends the relay (reset on both sides).

The prefetch waits for a gate (`PrefetchRelay.release`): the target opens it once the
restored cnvm is unfenced and thawed, so that on a small host the prefetch (relay,
SSH, the source's page server) does not take the CPU the switchover's confirm round
trip needs. Until then only the daemon's own requests are relayed (faults cannot
happen before the thaw; its background requests are small).

A process is prefetched only once the daemon has asked for one of its pages and its
id names a pagemap image (`pagemap-<id>.img`): the id encoding is then the daemon's
own, never a guess. Memory is bounded: at most `window` bytes in flight and `cache`
bytes fetched and not yet taken.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cnvmd.peers.streams import PeerStream, TcpRelay, abort_tcp

from . import criuimg

log = logging.getLogger(__name__)

PAGE = 4096
PSI = struct.Struct("<I4xQQQ")  # cmd, nr_pages, vaddr, dst_id
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_MASK = 0xFFFF
IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PE_LAZY = 1 << 1
PAGEMAP_RE = re.compile(r"pagemap-([1-9][0-9]{0,9})\.img")
MAX_PAGEMAP = 64 << 20  # bytes of one pagemap image we are willing to parse
MAX_NR = 1 << 24  # pages in one request (64 GiB): a bound, not a tuning

CHUNK_PAGES = 128  # 512 KiB per prefetch request
WINDOW = 4 << 20  # prefetch bytes in flight: what a fault may wait behind
CACHE = 64 << 20  # fetched and not yet taken by the daemon


class ProtocolError(Exception):
    """The daemon or the source said something this relay does not speak."""


# --------------------------------------------------------------------------- pagemaps


def parse_pagemap(data: bytes) -> list[tuple[int, int]]:
    """Lazy [start, end) address ranges of one pagemap image (CRIU's format: two magics,
    then u32-length-prefixed protobuf messages: a head, then the entries)."""
    if len(data) < 8 or struct.unpack_from("<II", data) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC):
        raise ValueError("not a CRIU pagemap image")
    out: list[tuple[int, int]] = []
    for msg in criuimg.messages(data, 8)[1:]:  # after the pagemap_head
        f = criuimg.fields(msg)
        vaddr, pages, flags = f.get(1, 0), f.get(5, f.get(2, 0)), f.get(4, 0)
        if not (isinstance(vaddr, int) and isinstance(pages, int) and isinstance(flags, int)):
            raise ValueError("a pagemap entry with a non-integer field")
        if flags & PE_LAZY and pages and vaddr % PAGE == 0 and pages < MAX_NR:
            out.append((vaddr, vaddr + pages * PAGE))
    out.sort()
    return out


def read_pagemaps(images: Path) -> dict[int, list[tuple[int, int]]]:
    """Lazy ranges per image id, from `images` (our own session dir). Files are opened
    without following symlinks; a malformed image only means no prefetch for it."""
    out: dict[int, list[tuple[int, int]]] = {}
    try:
        names = os.listdir(images)
    except OSError:
        return out
    for name in names:
        m = PAGEMAP_RE.fullmatch(name)
        if not m:
            continue
        try:
            ranges = parse_pagemap(criuimg.read_bounded(images / name, MAX_PAGEMAP))
        except (OSError, ValueError) as exc:
            log.warning("pagemap %s: %s (no prefetch for it)", name, exc)
            continue
        if ranges:
            out[int(m.group(1))] = ranges
    return out


# --------------------------------------------------------------------------- ranges


@dataclass
class Todo:
    """Sorted disjoint [start, end) ranges nobody has asked the source for yet."""

    ranges: list[tuple[int, int]] = field(default_factory=list)

    def take(self, start: int, end: int) -> None:
        out: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if b <= start or a >= end:
                out.append((a, b))
                continue
            if a < start:
                out.append((a, start))
            if b > end:
                out.append((end, b))
        self.ranges = out

    def give(self, start: int, end: int) -> None:
        if start < end:
            bisect.insort(self.ranges, (start, end))

    def next_chunk(self, pages: int) -> tuple[int, int] | None:
        if not self.ranges:
            return None
        a, b = self.ranges[0]
        end = min(b, a + pages * PAGE)
        self.take(a, end)
        return a, end


@dataclass
class Cached:
    """Pages fetched for one id: start -> (end, data), data a view of one answer."""

    starts: list[int] = field(default_factory=list)
    chunks: dict[int, tuple[int, memoryview]] = field(default_factory=dict)

    def add(self, start: int, data: memoryview) -> None:
        bisect.insort(self.starts, start)
        self.chunks[start] = (start + len(data), data)

    def find(self, addr: int) -> int | None:
        k = bisect.bisect_right(self.starts, addr) - 1
        if k >= 0:
            s = self.starts[k]
            if addr < self.chunks[s][0]:
                return s
        return None

    def cut(self, start: int, addr: int, pages: int) -> memoryview:
        """Take `pages` (clamped to the chunk) at addr out of the chunk at `start`."""
        end, data = self.chunks.pop(start)
        self.starts.remove(start)
        lo = addr - start
        hi = min(end - start, lo + pages * PAGE)
        if lo:
            self.add(start, data[:lo])
        if start + hi < end:
            self.add(start + hi, data[hi:])
        return data[lo:hi]


# --------------------------------------------------------------------------- the relay


class Upstream(Protocol):
    async def read(self, n: int) -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...
    async def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def abort(self, reason: str = "") -> None: ...
    def close(self) -> None: ...


@dataclass
class _Req:
    """One request on the upstream connection, answered in order."""

    kind: str  # "get" (the daemon's), "pre" (ours), "close"
    dst_id: int
    start: int
    pages: int
    done: asyncio.Future[tuple[bytes, memoryview]]


class Prefetcher:
    """One lazy-pages connection: daemon (reader/writer) <-> source (upstream)."""

    def __init__(self, upstream: Upstream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, pagemaps: dict[int, list[tuple[int, int]]],
                 *, chunk_pages: int = CHUNK_PAGES, window: int = WINDOW,
                 cache: int = CACHE, gate: asyncio.Event | None = None) -> None:
        self.up = upstream
        self.gate = gate  # prefetch only once set (None: at once)
        self.reader = reader
        self.writer = writer
        self.pagemaps = pagemaps
        self.chunk_pages = chunk_pages
        self.window = window
        self.cache_max = cache
        self.todo: dict[int, Todo] = {}
        self.cached: dict[int, Cached] = {}
        self.pending: deque[_Req] = deque()
        self.answers: asyncio.Queue[asyncio.Future[tuple[bytes, memoryview]] | None] = \
            asyncio.Queue()
        self.inflight = 0  # prefetch bytes asked for, not arrived
        self.cache_bytes = 0
        self.bytes_up = 0  # request bytes to the source
        self.bytes_down = 0  # answer bytes from the source
        self.prefetched = 0  # bytes that came as our prefetch
        self.hits = 0  # daemon requests answered from the cache
        self._lock = asyncio.Lock()  # one writer of whole requests upstream
        self._more = asyncio.Event()  # a request was queued
        self._eof_sent = False

    # ---- upstream

    async def _send(self, kind: str, cmd: int, dst_id: int, start: int,
                    pages: int) -> _Req:
        req = _Req(kind, dst_id, start, pages, asyncio.get_running_loop().create_future())
        async with self._lock:
            self.pending.append(req)
            self._more.set()
            await self.up.write(PSI.pack(cmd, pages, start, dst_id))
        self.bytes_up += PSI.size
        return req

    async def _read_upstream(self) -> None:
        """Answers in request order; ours go to the cache, the daemon's to it. What to
        read next is known from the oldest request (a CLOSE is answered by 4 bytes)."""
        while True:
            while not self.pending:
                if self._eof_sent:
                    if await self.up.read(1):
                        raise ProtocolError("the source sent more than was asked")
                    return
                self._more.clear()
                await self._more.wait()
            req = self.pending[0]
            if req.kind == "close":
                status = await self.up.readexactly(4)
                self.pending.popleft()
                self.bytes_down += 4
                req.done.set_result((status, memoryview(b"")))
                continue
            hdr = await self.up.readexactly(PSI.size)
            self.pending.popleft()
            _cmd, nr, vaddr, _dst = PSI.unpack(hdr)
            if nr > req.pages or vaddr != req.start:
                raise ProtocolError(f"answer {nr}@{vaddr:#x} to a request "
                                    f"{req.pages}@{req.start:#x}")
            data = memoryview(await self.up.readexactly(nr * PAGE)) if nr else memoryview(b"")
            self.bytes_down += PSI.size + len(data)
            if req.kind == "pre":
                self.inflight -= req.pages * PAGE
                self.prefetched += len(data)
                if nr:
                    self.cached.setdefault(req.dst_id, Cached()).add(req.start, data)
                    self.cache_bytes += len(data)
                if nr < req.pages:  # clamped at the source's iovec end
                    self.todo[req.dst_id].give(req.start + nr * PAGE,
                                               req.start + req.pages * PAGE)
                req.done.set_result((hdr, memoryview(b"")))
                await self._fill()
            else:
                req.done.set_result((hdr, data))

    async def _fill(self) -> None:
        """Keep the window full, largest-first is not needed: the daemon goes in order."""
        if self.gate is not None and not self.gate.is_set():
            return
        for dst_id, todo in self.todo.items():
            while self.inflight + self.chunk_pages * PAGE <= self.window and \
                    self.cache_bytes + self.inflight < self.cache_max:
                nxt = todo.next_chunk(self.chunk_pages)
                if nxt is None:
                    break
                a, b = nxt
                pages = (b - a) // PAGE
                self.inflight += pages * PAGE
                await self._send("pre", PS_IOV_GET, dst_id, a, pages)

    # ---- the daemon

    def _inflight_for(self, dst_id: int, addr: int) -> _Req | None:
        for r in self.pending:
            if r.kind == "pre" and r.dst_id == dst_id and \
                    r.start <= addr < r.start + r.pages * PAGE:
                return r
        return None

    def _from_cache(self, dst_id: int, addr: int, pages: int,
                    cmd: int) -> tuple[bytes, memoryview] | None:
        c = self.cached.get(dst_id)
        s = c.find(addr) if c else None
        if c is None or s is None:
            return None
        data = c.cut(s, addr, pages)
        self.cache_bytes -= len(data)
        self.hits += 1
        return PSI.pack(cmd, len(data) // PAGE, addr, dst_id), data

    async def _answer_get(self, dst_id: int, addr: int, pages: int,
                          ans_cmd: int) -> tuple[bytes, memoryview]:
        while True:
            got = self._from_cache(dst_id, addr, pages, ans_cmd)
            if got is not None:
                await self._fill()
                return got
            pre = self._inflight_for(dst_id, addr)
            if pre is None:
                break
            await asyncio.shield(pre.done)
        req = await self._send("get", PS_IOV_GET, dst_id, addr, pages)
        return await req.done

    async def _read_daemon(self) -> None:
        ans_cmd = (1 << 2) << 16 | 6  # PS_IOV_ADD_F | PE_PRESENT << PS_CMD_BITS
        while True:
            try:
                hdr = await self.reader.readexactly(PSI.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise ProtocolError("the lazy-pages daemon sent half a request") from None
                await self.answers.put(None)
                return
            cmd, nr, vaddr, dst_id = PSI.unpack(hdr)
            c = cmd & PS_CMD_MASK
            if c == PS_IOV_GET:
                if not 0 < nr < MAX_NR or vaddr % PAGE:
                    raise ProtocolError(f"GET {nr}@{vaddr:#x}")
                end = vaddr + nr * PAGE
                if dst_id not in self.todo and dst_id in self.pagemaps:
                    self.todo[dst_id] = Todo(list(self.pagemaps[dst_id]))
                if dst_id in self.todo:
                    self.todo[dst_id].take(vaddr, end)
                fut: asyncio.Future[tuple[bytes, memoryview]] = asyncio.ensure_future(
                    self._answer_get(dst_id, vaddr, nr, ans_cmd))
                await self.answers.put(fut)
                await self._fill()
            elif c in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                req = await self._send("close", cmd, dst_id, vaddr, 0)
                await self.answers.put(req.done)
            else:
                raise ProtocolError(f"command {cmd:#x} from the lazy-pages daemon")

    async def _write_daemon(self) -> None:
        """Answers to the daemon strictly in its request order."""
        while True:
            fut = await self.answers.get()
            if fut is None:
                return
            hdr, data = await fut
            self.writer.write(hdr)
            if data:
                self.writer.write(data)
            await self.writer.drain()

    async def _open_gate(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
            await self._fill()

    async def run(self) -> None:
        """Until the daemon has closed and every answer was written; the source then
        gets our EOF and its page server ends. Any failure resets both sides."""
        up = asyncio.ensure_future(self._read_upstream())
        down = asyncio.ensure_future(self._read_daemon())
        out = asyncio.ensure_future(self._write_daemon())
        tasks = {up, down, out, asyncio.ensure_future(self._open_gate())}
        gate = next(t for t in tasks if t not in (up, down, out))
        try:
            while not (down.done() and out.done()):
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                    if t is gate:
                        continue
                    if t is up and not down.done():
                        raise ProtocolError("the source's page server ended early")
                tasks -= done
            self._eof_sent = True
            self._more.set()
            self.up.write_eof()
            await asyncio.wait_for(up, 60)
        finally:
            for t in (up, down, out, gate):
                t.cancel()
            await asyncio.gather(up, down, out, gate, return_exceptions=True)
            for r in self.pending:
                if not r.done.done():
                    r.done.cancel()


async def prefetch_splice(upstream: Upstream, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter,
                          pagemaps: dict[int, list[tuple[int, int]]],
                          gate: asyncio.Event | None = None) -> Prefetcher:
    """Relay one lazy-pages connection with prefetch (once `gate` is set, if given); on
    failure both sides are reset (the source's page server must not take a failure
    for "all pages served")."""
    p = Prefetcher(upstream, reader, writer, pagemaps, gate=gate)
    try:
        await p.run()
    except BaseException as exc:
        upstream.abort(f"lazy relay failed: {exc}")
        abort_tcp(writer)
        raise
    upstream.close()
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return p


class PrefetchRelay(TcpRelay):
    """A loopback listener for CRIU's lazy-pages daemon; each connection is relayed to
    a new stream from `opener` with prefetch (peers' TcpRelay with another `_relay`)."""

    def __init__(self, opener: Callable[[], Awaitable[PeerStream]], label: str,
                 images: Path, *, hold: bool = False) -> None:
        super().__init__(opener, label)
        self.images = images
        self.prefetched = 0
        self.hits = 0
        self.gate = asyncio.Event()
        if not hold:
            self.gate.set()

    def release(self) -> None:
        """Start prefetching (the cnvm runs: see the module doc)."""
        self.gate.set()

    async def _relay(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> tuple[int, int]:
        t0 = time.monotonic()
        pagemaps = await asyncio.to_thread(read_pagemaps, self.images)
        p = await prefetch_splice(await self._opener(), reader, writer, pagemaps, self.gate)
        self.prefetched += p.prefetched
        self.hits += p.hits
        dt = time.monotonic() - t0
        log.info("lazy relay to %s: %.1f MB in %.2f s (%.0f MB/s), %.1f MB prefetched, "
                 "%d answers from the prefetch", self.label, p.bytes_down / 1e6, dt,
                 p.bytes_down / 1e6 / max(dt, 1e-6), p.prefetched / 1e6, p.hits)
        return p.bytes_up, p.bytes_down
