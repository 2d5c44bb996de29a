"""Bulk data over the mesh: stream kinds on ``cnvm-stream`` channels, TCP relays, files.

Why apart from RPC: bulk data gets a fresh SSH channel per stream, with its own
flow-control window, so a teleport's pages never queue behind (or block) small RPC
replies. A stream's receiving side is a *stream kind* on the peer router
(``@router.stream(kind)``, or ``PeerService.register_stream``); the built-in kinds
are ``tcp`` (relays, e.g. CRIU's page server), ``file.put``, ``file.get`` and
``echo``. The byte-level pieces (PeerStream, splice, file copy) are in streams.py.

Files: nothing in cnvmd moves files with ``file.put``/``file.get`` (teleport has
typed streams of its own), so peers may only touch ``<state_dir>/transfer`` (plus
what a subsystem adds with ``allow_root``), and only beneath it without following
any symlink: a symlink a cnvm or a peer left there never leads outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from cnvmd.api import Router
from proto.framing import FrameError, read_frame
from proto.messages import ErrorCode, ProtoError

from . import streams
from .transport import SUB_STREAM, Transport

if TYPE_CHECKING:
    from .service import PeerService

log = logging.getLogger("cnvmd.peers")

MAX_HEADER = 1 << 20
"""A stream's header frame (kind and args); bulk data follows it raw."""


class Bulk:
    """Opens streams to members and serves theirs by kind, from the peer router."""

    def __init__(self, svc: PeerService, transport: Transport, router: Router) -> None:
        self.svc = svc
        self.transport = transport
        self.router = router
        transport.channels[SUB_STREAM] = self.serve
        router.stream("tcp")(streams.serve_tcp)
        router.stream("file.put")(self._serve_put)
        router.stream("file.get")(self._serve_get)
        router.stream("echo")(_serve_echo)

    # -- client side -------------------------------------------------------------------

    async def open_stream(self, node: str, kind: str, args: dict[str, Any] | None = None, *,
                          window: int | None = None,
                          max_pktsize: int | None = None) -> streams.PeerStream:
        """A new bulk channel to ``node``; returns once the peer's handler accepted it."""
        w, r = await self.transport.open_channel(node, SUB_STREAM, window=window,
                                                 max_pktsize=max_pktsize)
        stream = streams.PeerStream(r, w, node, kind)
        try:
            await stream.write_frame({"kind": kind, "args": args or {}})
            ans = await stream.read_frame()
        except ProtoError:
            stream.close()
            raise
        except (asyncssh.Error, OSError, FrameError) as exc:
            stream.close()
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: stream {kind}: {exc}") from None
        if not ans:
            stream.close()
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: stream {kind} closed at once")
        if not ans.get("ok"):
            stream.close()
            raise ProtoError.from_wire(ans.get("error"))
        stream.accept = ans
        return stream

    async def relay_tcp(self, node: str, remote_port: int, *, remote_host: str = "127.0.0.1",
                        local_host: str = "127.0.0.1", local_port: int = 0) -> streams.TcpRelay:
        """Listen locally; carry every connection to ``remote_host:remote_port`` on ``node``.

        Use ``relay.port``; ``await relay.close()`` (or ``async with``) when done."""
        relay = streams.TcpRelay(
            lambda: self.open_stream(node, "tcp", {"host": remote_host, "port": remote_port}),
            f"{node}:{remote_host}:{remote_port}")
        return await relay.start(local_host, local_port)

    async def put_file(self, node: str, src: Path | str, dest: str, *,
                       mode: int = 0o644) -> dict[str, Any]:
        """Copy a local file to ``dest`` on ``node``; verifies sha256 end to end."""
        stream = await self.open_stream(node, "file.put", {"dest": dest, "mode": mode})
        async with stream:
            sent = await streams.send_file(stream, Path(src))
            ans = await stream.read_frame()
        if not ans or not ans.get("ok"):
            raise ProtoError.from_wire((ans or {}).get("error"))
        if ans.get("sha256") != sent["sha256"] or ans.get("bytes") != sent["bytes"]:
            raise ProtoError(ErrorCode.FAILED, f"{dest} on {node}: checksum mismatch")
        return sent

    async def get_file(self, node: str, src: str, dest: Path | str) -> dict[str, Any]:
        """Fetch ``src`` from ``node`` into local ``dest``; verifies sha256."""
        stream = await self.open_stream(node, "file.get", {"src": src})
        async with stream:
            size = int(stream.accept.get("size", 0))
            got = await streams.receive_file(stream, Path(dest), limit=size)
            trailer = await stream.read_frame() or {}
        if trailer.get("sha256") != got["sha256"] or got["bytes"] != size:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(Path(dest).unlink)
            raise ProtoError(ErrorCode.FAILED, f"{src} from {node}: checksum mismatch")
        return got

    # -- server side -------------------------------------------------------------------

    async def serve(self, node: str, reader: asyncssh.SSHReader[bytes],
                    writer: asyncssh.SSHWriter[bytes]) -> None:
        """One ``cnvm-stream`` channel: read its header, run the kind's handler."""
        try:
            hdr = await read_frame(reader, max_frame=MAX_HEADER)  # type: ignore[arg-type]
        except FrameError as exc:
            log.warning("stream from %s: bad header: %s", node, exc)
            return
        if not hdr:
            return
        kind, raw = hdr.get("kind"), hdr.get("args", {})
        stream = streams.PeerStream(reader, writer, node, str(kind)[:64], server=True,
                                    daemon=self.svc.daemon)
        try:
            if not isinstance(kind, str) or not isinstance(raw, dict):
                raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                                 "stream header needs a string kind and a map of args")
            h = self.router.streams.get(kind)
            if h is None:
                raise ProtoError(ErrorCode.UNKNOWN_OP, f"unknown stream kind {kind[:64]!r}")
            await h(stream, raw)
        except (Exception, asyncio.CancelledError) as exc:
            err = exc if isinstance(exc, ProtoError) else ProtoError(
                ErrorCode.FAILED, f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, ProtoError | asyncio.CancelledError):
                log.warning("stream %s from %s failed: %s", kind, node, exc)
            if stream.bytes_written == 0:
                # Not accepted yet: the opener is waiting for a frame; refuse cleanly.
                with contextlib.suppress(Exception):
                    await stream.write_frame({"ok": False, "error": err.to_wire()})
            else:
                # Mid-stream: never append bytes to the data; abort so the far side fails.
                stream.abort(err.message)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _serve_put(self, stream: streams.PeerStream, args: dict[str, Any]) -> None:
        """Write a file beneath an allowed root (never through a symlink)."""
        root, parts = streams.check_path(args.get("dest"), self.svc.allowed_roots)
        mode = args.get("mode", 0o644)
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT, "mode must be an int in 0..0o777")

        async def accept() -> None:
            await stream.write_frame({"ok": True})

        got = await streams.receive_beneath(stream, root, parts, mode, ready=accept)
        await stream.write_frame({"ok": True, **got})
        stream.write_eof()

    async def _serve_get(self, stream: streams.PeerStream, args: dict[str, Any]) -> None:
        """Send a regular file beneath an allowed root (never through a symlink)."""
        root, parts = streams.check_path(args.get("src"), self.svc.allowed_roots)
        fd, size = await asyncio.to_thread(streams.open_beneath, root, parts)
        try:
            await stream.write_frame({"ok": True, "size": size})
        except BaseException:
            os.close(fd)
            raise
        sent = await streams.send_file(stream, fd, limit=size, eof=False)
        await stream.write_frame(sent)
        stream.write_eof()


async def _serve_echo(stream: streams.PeerStream, args: dict[str, Any]) -> None:
    """Echo everything back (tests, and a quick health check of the bulk path)."""
    await stream.write_frame({"ok": True})
    while data := await stream.read():
        await stream.write(data)
    stream.write_eof()
