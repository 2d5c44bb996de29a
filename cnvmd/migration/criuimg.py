"""Reading the few CRIU image fields the engine needs, without protobuf bindings.

CRIU images are two magics (one for the inventory), then u32-length-prefixed protobuf
messages (criu/protobuf.c). The engine reads: the lazy ranges of pagemap images
(lazyrelay) and, from the inventory, the network-lock method and the dump's CRIU run
id — the name of the nftables table CRIU's restore deletes at network-unlock, which a
fresh target netns must already hold (netlink.prelock_nft). Everything read here came
from a peer: parse defensively, bound sizes, and let callers validate values.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

IMG_COMMON_MAGIC = 0x54564319
INVENTORY_MAGIC = 0x58313116
MAX_INVENTORY = 1 << 20

LOCK_IPTABLES, LOCK_NFTABLES, LOCK_SKIP = 0, 1, 2  # enum NETWORK_LOCK_METHOD
RUN_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(msg: bytes) -> dict[int, int | bytes]:
    """Top-level fields of one protobuf message: varints as int, length-delimited as
    bytes (the last occurrence wins); fixed-width fields are skipped."""
    out: dict[int, int | bytes] = {}
    i = 0
    while i < len(msg):
        key, i = varint(msg, i)
        kind = key & 7
        if kind == 0:
            out[key >> 3], i = varint(msg, i)
        elif kind == 2:
            n, i = varint(msg, i)
            if i + n > len(msg):
                raise ValueError("truncated field")
            out[key >> 3] = msg[i:i + n]
            i += n
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        else:
            raise ValueError(f"wire type {kind}")
    return out


def messages(data: bytes, start: int) -> list[bytes]:
    out: list[bytes] = []
    i = start
    while i < len(data):
        if i + 4 > len(data):
            raise ValueError("truncated entry size")
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        if i + n > len(data):
            raise ValueError("truncated entry")
        out.append(data[i:i + n])
        i += n
    return out


def read_bounded(path: Path, limit: int) -> bytes:
    """A file of our own session dir, not following symlinks, at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    return data


def network_lock(images: Path) -> tuple[int, str | None]:
    """(method, dump run id) from inventory.img: how CRIU's restore will unlock the
    network. Images without the method (older CRIU) mean iptables, as CRIU falls back;
    a run id that is no UUID is returned as None (never used in a command)."""
    data = read_bounded(images / "inventory.img", MAX_INVENTORY)
    if len(data) >= 4 and struct.unpack_from("<I", data)[0] == IMG_COMMON_MAGIC:
        start = 8
    else:
        start = 4
    if len(data) < start or struct.unpack_from("<I", data, start - 4)[0] != INVENTORY_MAGIC:
        raise ValueError("not a CRIU inventory image")
    msgs = messages(data, start)
    if not msgs:
        raise ValueError("empty inventory image")
    f = fields(msgs[0])
    method = f.get(11, LOCK_IPTABLES)
    run = f.get(13)
    run_id = run.decode("ascii", "replace") if isinstance(run, bytes) else None
    if run_id is not None and not RUN_ID_RE.fullmatch(run_id):
        run_id = None
    return (method if isinstance(method, int) else LOCK_IPTABLES), run_id
