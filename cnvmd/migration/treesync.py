"""Incremental sync of a directory tree (a cnvm's overlay upper dir) as tar streams.

GNU tar's ``--listed-incremental`` mode does exactly what teleport needs: a first
level-0 stream while the cnvm runs, then a level-1 stream while it is frozen that
holds only what changed since (ctime/mtime with nanoseconds) plus the directory
listings, from which extraction deletes files that vanished. ``--xattrs`` with
``trusted.*`` keeps overlayfs opaque-directory markers, and whiteouts (0:0 char
devices) travel as device nodes. tar runs as a child process, so hashing and disk
I/O never touch the event loop; we only move its bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from cnvmd.proc import CommandError, kill_group

CHUNK = 256 * 1024
_COMMON = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--sparse"]


async def pack(
    src: Path, snapshot: Path, sink: Callable[[bytes], Awaitable[None]]
) -> int:
    """Stream the changes of `src` since `snapshot` (created on first use) to `sink`.

    Returns the number of bytes produced.
    """
    argv = ["tar", "-C", str(src), *_COMMON, f"--listed-incremental={snapshot}",
            "-cf", "-", "."]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    total = 0
    try:
        while chunk := await proc.stdout.read(CHUNK):
            total += len(chunk)
            await sink(chunk)
        err = await proc.stderr.read()
        rc = await proc.wait()
    except BaseException:
        kill_group(proc.pid)
        await proc.wait()
        raise
    # Exit status 1 means "a file changed while being read": expected while the cnvm
    # runs; the frozen final round picks the change up.
    if rc not in (0, 1):
        raise CommandError(argv, rc, "", err.decode(errors="replace"))
    return total


class Unpacker:
    """Receives a tar stream (fed chunk by chunk) and applies it to `dst`."""

    def __init__(self, proc: asyncio.subprocess.Process, argv: list[str]) -> None:
        self._proc = proc
        self._argv = argv
        self.bytes = 0

    @classmethod
    async def start(cls, dst: Path) -> Unpacker:
        await asyncio.to_thread(dst.mkdir, parents=True, exist_ok=True)
        argv = ["tar", "-C", str(dst), *_COMMON, "--listed-incremental=/dev/null",
                "--same-permissions", "--same-owner", "-xf", "-"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        return cls(proc, argv)

    async def feed(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        self.bytes += len(data)
        self._proc.stdin.write(data)
        await self._proc.stdin.drain()

    async def finish(self) -> None:
        """Close the stream and wait for tar; raises CommandError if it failed."""
        assert self._proc.stdin is not None and self._proc.stderr is not None
        self._proc.stdin.close()
        err = await self._proc.stderr.read()
        rc = await self._proc.wait()
        if rc != 0:
            raise CommandError(self._argv, rc, "", err.decode(errors="replace"))

    def abort(self) -> None:
        kill_group(self._proc.pid)
