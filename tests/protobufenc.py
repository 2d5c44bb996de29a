"""Tiny protobuf encoders for hand-made CRIU images in unit tests."""

from __future__ import annotations

import struct


def varint(v: int) -> bytes:
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def message(fields: dict[int, int]) -> bytes:
    """A u32-length-prefixed message of varint fields, as CRIU images hold them."""
    body = b"".join(varint(k << 3) + varint(v) for k, v in fields.items())
    return struct.pack("<I", len(body)) + body
