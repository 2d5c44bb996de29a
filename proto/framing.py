"""Length-prefixed msgpack framing.

A frame is a 4-byte big-endian unsigned length N followed by N bytes holding one
msgpack-encoded map. Length-prefixing (instead of msgpack's own streaming) lets a
reader reject an oversized frame before buffering it, and resynchronisation is
never attempted: any framing error closes the connection.

What a hostile sender can make a reader hold is bounded here, once for every
transport: the frame size (checked on the header), the buffer (allocated once at
the announced size; large ones are anonymous mappings, returned to the kernel when
the frame completes or the connection dies, whatever malloc's trim settings), an
optional budget shared by all connections of a server (`FrameBudget`), and the
decoded value (`DecodeLimits`: nesting depth, number of maps/arrays and of their
elements, so a small body cannot decode into gigabytes of objects or into a value
whose ``repr`` or re-encoding overflows the interpreter's stack).
"""

from __future__ import annotations

import asyncio
import mmap
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_FRAME = 16 * 1024 * 1024
"""Largest frame body accepted (bytes). Bulk data travels on streams, not frames."""

MAX_DEPTH = 64
"""Deepest nesting of maps/arrays in a frame body; the top-level map is level 1."""

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size

MMAP_MIN = 1 << 20
"""Frame buffers of at least this size are anonymous mappings (unmapped when done)."""


class FrameError(Exception):
    """The byte stream is not valid framing; the connection must be closed."""


class FrameBusy(FrameError):
    """A frame would exceed the server's shared buffer budget: close with BUSY."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds on one decoded body (violations are FrameErrors).

    `max_items` counts elements of all maps and arrays together (a map entry is one),
    `max_containers` the maps and arrays themselves: together they bound the Python
    objects a body decodes into, whatever its byte size.
    """

    max_depth: int = MAX_DEPTH
    max_containers: int = 1 << 20
    max_items: int = 1 << 22


DEFAULT_LIMITS = DecodeLimits()


class FrameBudget:
    """Bytes that the partial frames of all connections of one server may hold.

    A connection charges a frame body larger than the decoder's `free_size` when its
    header arrives and gives it back when the frame is decoded or the connection
    dies; a frame that does not fit is refused (FrameBusy), never waited for, so
    a stalled sender cannot make others queue behind it.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def acquire(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


def encode_frame(obj: dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """Encode one map as a frame (header + msgpack body)."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return _HEADER.pack(len(body)) + body


class _Counter:
    """msgpack hooks counting maps/arrays and their elements as they are built.

    msgpack calls a hook for every completed container, so counting there stops a
    body that decodes into too many objects after at most one container too many.
    """

    __slots__ = ("containers", "items", "limits")

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.containers = 0
        self.items = 0

    def _count(self, n: int) -> None:
        self.containers += 1
        self.items += n
        if self.containers > self.limits.max_containers:
            raise FrameError(f"more than {self.limits.max_containers} maps/arrays in a frame")
        if self.items > self.limits.max_items:
            raise FrameError(f"more than {self.limits.max_items} elements in a frame")

    def list_hook(self, v: list[Any]) -> list[Any]:
        self._count(len(v))
        return v

    def object_hook(self, v: dict[str, Any]) -> dict[str, Any]:
        self._count(len(v))
        return v


def too_deep(obj: Any, limit: int) -> bool:
    """Is `obj` nested deeper than `limit` maps/arrays? Breadth first, no recursion;
    each level's element types are scanned in C (``map(type, ...)``)."""
    level = [obj]
    depth = 1
    while level:
        if depth > limit:
            return True
        nxt: list[Any] = []
        for o in level:
            vals = o.values() if type(o) is dict else o
            kinds = set(map(type, vals))
            if list in kinds or dict in kinds:
                nxt.extend(v for v in vals if type(v) is list or type(v) is dict)
        level = nxt
        depth += 1
    return False


def decode_body(body: bytes | bytearray | memoryview | mmap.mmap,
                limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode one frame body; anything but a single msgpack map within `limits` is a
    FrameError."""
    counter = _Counter(limits)
    n = len(body)
    try:
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True,
            list_hook=counter.list_hook, object_hook=counter.object_hook,
            max_array_len=min(n, limits.max_items), max_map_len=min(n, limits.max_items))
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable msgpack body: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame body is a {type(obj).__name__}, expected a map")
    # fewer containers than levels allowed cannot nest too deep: skip the walk
    if counter.containers > limits.max_depth and too_deep(obj, limits.max_depth):
        raise FrameError(f"frame body nests deeper than {limits.max_depth} maps/arrays")
    return obj


class _Buffer:
    """One frame body being received: allocated once at its announced size."""

    __slots__ = ("data", "got", "size", "view")

    def __init__(self, n: int) -> None:
        self.size = n
        self.got = 0
        self.data: bytearray | mmap.mmap = mmap.mmap(-1, n) if n >= MMAP_MIN else bytearray(n)
        self.view = memoryview(self.data)

    def free(self) -> None:
        self.view.release()
        if isinstance(self.data, mmap.mmap):
            self.data.close()


class FrameDecoder:
    """Incremental decoder for protocols (asyncio.Protocol, SSH channels).

    Feed it bytes as they arrive; it returns every complete message. It raises
    FrameError as soon as a header announces more than `max_frame` bytes (a setting
    the owner may change between frames, e.g. once a peer said hello), so a hostile
    peer cannot make us buffer an arbitrary amount; with a `budget`, bodies larger
    than `free_size` are charged to it and refused (FrameBusy) when it is spent.
    Call `close` when the connection ends, to return the buffer and the budget.
    """

    def __init__(self, max_frame: int = MAX_FRAME, *, limits: DecodeLimits = DEFAULT_LIMITS,
                 budget: FrameBudget | None = None, free_size: int = 64 * 1024) -> None:
        self.max_frame = max_frame
        self.limits = limits
        self.budget = budget
        self.free_size = free_size
        self._head = bytearray()  # a partial header (< 4 bytes)
        self._body: _Buffer | None = None
        self._charged = 0
        self.partial_since: float | None = None
        """time.monotonic() when the frame now partly received began, else None."""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return list(self.feed_iter(data))

    def feed_iter(self, data: bytes | bytearray | memoryview) -> Iterator[dict[str, Any]]:
        """Like `feed`, but yields each message as soon as it is decoded.

        Messages that precede a framing error in the same chunk are thus still
        delivered (and answered) before the FrameError is raised.
        """
        mv = memoryview(data)
        while mv:
            if self._body is None:
                if not self._head:
                    self.partial_since = time.monotonic()
                need = HEADER_SIZE - len(self._head)
                self._head += mv[:need]
                mv = mv[need:]
                if len(self._head) < HEADER_SIZE:
                    break
                (n,) = _HEADER.unpack(self._head)
                self._head.clear()
                self._start(n)
            body = self._body
            assert body is not None
            take = min(len(mv), body.size - body.got)
            body.view[body.got:body.got + take] = mv[:take]
            body.got += take
            mv = mv[take:]
            if body.got == body.size:
                yield self._finish()

    def _start(self, n: int) -> None:
        if n > self.max_frame:
            raise FrameError(f"frame of {n} bytes announced, limit is {self.max_frame}")
        if self.budget is not None and n > self.free_size:
            if not self.budget.acquire(n):
                raise FrameBusy(f"frame of {n} bytes refused: the server is buffering "
                                f"{self.budget.used} of {self.budget.total} bytes of large "
                                "frames; retry")
            self._charged = n
        self._body = _Buffer(n)

    def _finish(self) -> dict[str, Any]:
        body = self._body
        assert body is not None
        self._body = None
        self.partial_since = None
        try:
            return decode_body(body.view, self.limits)
        finally:
            body.free()
            self._uncharge()

    def _uncharge(self) -> None:
        if self._charged and self.budget is not None:
            self.budget.release(self._charged)
        self._charged = 0

    def close(self) -> None:
        """Drop a partial frame: its buffer and its share of the budget."""
        if self._body is not None:
            self._body.free()
            self._body = None
        self._uncharge()
        self._head.clear()
        self.partial_since = None

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._head) + (HEADER_SIZE + self._body.got if self._body is not None else 0)

    @property
    def partial(self) -> bool:
        """A frame has begun and not yet ended."""
        return self.partial_since is not None


async def read_frame(
    reader: asyncio.StreamReader, max_frame: int = MAX_FRAME,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> dict[str, Any] | None:
    """Read one frame from a stream; None on a clean EOF between frames."""
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("connection closed inside a frame header") from None
    (n,) = _HEADER.unpack(header)
    if n > max_frame:
        raise FrameError(f"frame of {n} bytes announced, limit is {max_frame}")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise FrameError("connection closed inside a frame body") from None
    return decode_body(body, limits)
