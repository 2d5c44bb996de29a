"""Length-prefixed msgpack framing.

A frame is a 4-byte big-endian unsigned length N followed by N bytes holding one
msgpack-encoded map. Length-prefixing (instead of msgpack's own streaming) lets a
reader reject an oversized frame before buffering it, and resynchronisation is
never attempted: any framing error closes the connection.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from typing import Any

import msgpack

MAX_FRAME = 16 * 1024 * 1024
"""Largest frame body accepted (bytes). Bulk data travels on streams, not frames."""

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class FrameError(Exception):
    """The byte stream is not valid framing; the connection must be closed."""


def encode_frame(obj: dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """Encode one map as a frame (header + msgpack body)."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body; anything but a single msgpack map is a FrameError."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable msgpack body: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame body is a {type(obj).__name__}, expected a map")
    return obj


class FrameDecoder:
    """Incremental decoder for protocols (asyncio.Protocol, SSH channels).

    Feed it bytes as they arrive; it returns every complete message. It raises
    FrameError as soon as a header announces more than `max_frame` bytes, so a
    hostile peer cannot make us buffer an arbitrary amount.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return list(self.feed_iter(data))

    def feed_iter(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Like `feed`, but yields each message as soon as it is decoded.

        Messages that precede a framing error in the same chunk are thus still
        delivered (and answered) before the FrameError is raised.
        """
        self._buf += data
        while len(self._buf) >= HEADER_SIZE:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                raise FrameError(f"frame of {n} bytes announced, limit is {self.max_frame}")
            if len(self._buf) < HEADER_SIZE + n:
                break
            body = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + n])
            del self._buf[: HEADER_SIZE + n]
            yield decode_body(body)

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)


async def read_frame(
    reader: asyncio.StreamReader, max_frame: int = MAX_FRAME
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
    return decode_body(body)
