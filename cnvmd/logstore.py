"""Reading a cnvm's console log with times: `logs --since/--tail/--timestamps/-f`.

The log is what the shim (`cnvmd.logshim`) appended; next to it, ``LOG.idx`` holds
fixed-size records (offset where a piece starts, UNIX time it arrived). A line's time
is the time of the piece its first byte belongs to. Lines written before the index
existed (a cnvm started by an older daemon, or the part of the log that came with a
teleport) have no time: they are shown with `-` and left out by `since`.

Reads are bounded: at most `WINDOW` bytes from the end of the log (4 MiB), and the
index is searched by bisection, so a long-lived chatty cnvm costs no more than a
fresh one. Blocking file I/O: callers run these in a thread.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnvmd.api import Args, Context, Router
from cnvmd.logshim import INDEX_RECORD
from cnvmd.services import LIFECYCLE

if TYPE_CHECKING:
    from cnvmd.lifecycle import Lifecycle

WINDOW = 4 << 20
EVT_OUTPUT = "output"
"""`logs --follow` event: ``{"data": str}`` (+ ``"lines": [[time|None, str]]`` with
timestamps), new console output."""

Piece = tuple[float | None, str]


def index_path(log: Path) -> Path:
    return log.with_name(log.name + ".idx")


def load_index(log: Path, start: int, end: int) -> list[tuple[int, float]]:
    """Index records covering log bytes [start, end): the last one at or before
    `start`, then every one before `end`."""
    rs = INDEX_RECORD.size
    try:
        f = open(index_path(log), "rb")
    except FileNotFoundError:
        return []
    with f:
        n = os.fstat(f.fileno()).st_size // rs

        def rec(i: int) -> tuple[int, float]:
            f.seek(i * rs)
            off, t = INDEX_RECORD.unpack(f.read(rs))
            return int(off), float(t)

        lo, hi = 0, n  # first record with offset > start
        while lo < hi:
            mid = (lo + hi) // 2
            if rec(mid)[0] <= start:
                lo = mid + 1
            else:
                hi = mid
        first = max(lo - 1, 0)
        if n == 0:
            return []
        f.seek(first * rs)
        out = []
        for off, t in INDEX_RECORD.iter_unpack(f.read((n - first) * rs)):
            if off >= end:
                break
            out.append((int(off), float(t)))
        return out


def pieces(log: Path, data: bytes, base: int) -> list[Piece]:
    """Split log bytes starting at offset `base` into lines (the last may lack its
    newline), each with its time."""
    idx = load_index(log, base, base + len(data))
    offs = [o for o, _ in idx]
    out: list[Piece] = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        stop = len(data) if nl < 0 else nl + 1
        i = bisect.bisect_right(offs, base + pos) - 1
        out.append((idx[i][1] if i >= 0 else None, data[pos:stop].decode(errors="replace")))
        pos = stop
    return out


def read_tail(log: Path, *, tail: int | None = None, since: float | None = None
              ) -> tuple[list[Piece], int, int]:
    """(lines, end offset, lines left out for lack of a time) of the last `WINDOW`
    bytes: only those at or after `since`, then the last `tail` of them."""
    try:
        with open(log, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            base = max(0, end - WINDOW)
            f.seek(max(base - 1, 0))  # with the byte before: is base a line start?
            data = f.read(end - base + (1 if base else 0))
    except FileNotFoundError:
        return [], 0, 0
    if base > 0:  # start at a line (unless one line fills the window: its end then)
        nl = data.find(b"\n")
        if nl < 0 or nl == len(data) - 1:
            data = data[1:]
        else:
            base, data = base + nl, data[nl + 1:]
    lines = pieces(log, data, base)
    untimed = 0
    if since is not None:
        untimed = sum(1 for t, _ in lines if t is None)
        lines = [(t, s) for t, s in lines if t is not None and t >= since]
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    return lines, end, untimed


def read_from(log: Path, pos: int, limit: int = 1 << 20) -> tuple[list[Piece], int]:
    """New output after offset `pos` (from 0 again if the log got shorter)."""
    try:
        with open(log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < pos:
                pos = 0  # truncated/replaced (e.g. arrived by teleport): start over
            f.seek(pos)
            data = f.read(min(size - pos, limit))
    except FileNotFoundError:
        return [], pos
    return pieces(log, data, pos), pos + len(data)


async def follow(life: Lifecycle, name: str, *, tail: int | None = None,
                 since: float | None = None, interval: float = 0.2
                 ) -> AsyncIterator[list[Piece]]:
    """The log's end, then new output as it comes, until the cnvm leaves this node."""
    rec = await life._require(name)
    log = Path(rec.get("log") or life.paths(name).console_log)
    lines, pos, _ = await asyncio.to_thread(read_tail, log, tail=tail, since=since)
    if lines:
        yield lines
    while True:
        new, pos = await asyncio.to_thread(read_from, log, pos)
        if new:
            yield new
        elif await life.record(name) is None:
            return
        else:
            await asyncio.sleep(interval)


# ----------------------------------------------------------------------------- op

router = Router()


@router.op("logs")
async def logs(ctx: Context, args: Args) -> dict[str, Any]:
    """A cnvm's console output (the last 4 MiB at most): `tail` lines, those since
    `since` (UNIX time); `timestamps` adds `lines: [[time or nil, text]]`. With
    `follow`, new output is streamed as `output` events until the cnvm leaves."""
    name = args.str("name", max_len=63)
    do_follow = args.bool("follow", False)
    tail = args.int("tail", None, min=0)
    since = args.float("since", None, min=0)
    timestamps = args.bool("timestamps", False)
    args.reject_unknown()
    life: Lifecycle = ctx.daemon.services.require(LIFECYCLE)

    def shape(lines: list[Piece]) -> dict[str, Any]:
        out: dict[str, Any] = {"data": "".join(s for _, s in lines)}
        if timestamps:
            out["lines"] = [[t, s] for t, s in lines]
        return out

    if not do_follow:
        rec = await life._require(name)
        log = Path(rec.get("log") or life.paths(name).console_log)
        lines, _, untimed = await asyncio.to_thread(read_tail, log, tail=tail, since=since)
        res = {"name": name, **shape(lines)}
        if since is not None:
            res["untimed"] = untimed
        return res
    async for chunk in follow(life, name, tail=tail, since=since):
        ctx.emit(EVT_OUTPUT, shape(chunk))
        await ctx.drain()
    return {"name": name, "data": "", "ended": "the cnvm left this node"}
