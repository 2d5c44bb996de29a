"""Byte streams over dedicated SSH channels: the bulk-data path (teleport).

A stream channel starts with one framed header each way (``{kind, args}`` then
``{ok, ...}``), after which it is a raw, flow-controlled, half-closable byte pipe.
Built on it here: TCP relaying (CRIU's page server, lazy-pages) and file transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh

from proto.framing import encode_frame, read_frame
from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.peers")

CHUNK = 1 << 20
"""Read size for bulk copies: large reads amortise per-call overhead in the loop."""


ABORT_SIGNAL = "ABRT"


class StreamAborted(ProtoError):
    """The peer aborted the stream (or the connection died): what was received is
    incomplete. Never confuse this with EOF: CRIU takes a clean EOF on a page-server
    connection as "all pages done"."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


class PeerStream:
    """One bulk channel to (or from) a peer: read / write+drain / write_eof / close.

    ``read`` returns b'' only for a clean end (the peer called ``write_eof`` or
    finished normally); an ``abort()`` on the far side, or a lost connection, raises
    StreamAborted instead. Client side aborts travel as an SSH ``signal`` request,
    server side ones as ``exit-signal``.
    """

    def __init__(self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes],
                 node: str, kind: str, *, server: bool = False, daemon: Any = None) -> None:
        self.reader = reader
        self.writer = writer
        self.node = node
        self.daemon = daemon
        """On the serving side: the daemon, so a handler reaches its subsystem's
        services the way an op does through ``ctx.daemon``."""
        self.kind = kind
        self.server = server
        self.accept: dict[str, Any] = {}
        """The peer's acceptance frame (handlers may put e.g. a size in it)."""
        self.bytes_written = 0

    async def read(self, n: int = CHUNK) -> bytes:
        """Up to n bytes; b'' at a clean EOF; StreamAborted if the peer aborted/died."""
        try:
            data = await self.reader.read(n)
        except asyncssh.SignalReceived as exc:
            raise StreamAborted(f"{self.node} aborted stream {self.kind} ({exc})") from None
        except (asyncssh.Error, OSError) as exc:
            raise StreamAborted(f"stream {self.kind} with {self.node} lost: {exc}") from None
        if not data and not self.server:
            sig = self._exit_signal()
            if sig is not None:
                raise StreamAborted(f"{self.node} aborted stream {self.kind}: "
                                    f"{sig[2] or sig[0]}")
        return data

    def _exit_signal(self) -> tuple[str, bool, str, str] | None:
        """The far side's exit-signal (name, core_dumped, msg, lang), if it sent one.

        Only the opening side (an SSHClientChannel) receives ``exit-signal``: that is
        how a serving side's ``abort()`` arrives. asyncssh's SSHWriter types its
        channel as the SSHChannel base, so narrow it."""
        chan = self.writer.channel
        if isinstance(chan, asyncssh.SSHClientChannel):
            return chan.get_exit_signal()
        return None

    async def readexactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write and wait for the channel window (back-pressure)."""
        self.bytes_written += len(data)
        try:
            self.writer.write(bytes(data) if not isinstance(data, bytes) else data)
            await self.writer.drain()
        except (asyncssh.Error, OSError) as exc:
            raise StreamAborted(f"stream {self.kind} with {self.node} lost: {exc}") from None

    def abort(self, reason: str = "") -> None:
        """End the stream so that the peer's ``read`` raises instead of seeing EOF."""
        chan = self.writer.channel
        with contextlib.suppress(Exception):
            if self.server:
                chan.exit_with_signal(ABORT_SIGNAL, False, reason[:200])  # type: ignore
            else:
                chan.send_signal(ABORT_SIGNAL)  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            self.writer.close()

    async def read_frame(self) -> dict[str, Any] | None:
        """One framed message; None at a clean EOF; StreamAborted as for ``read``."""
        try:
            msg = await read_frame(self.reader)  # type: ignore[arg-type]
        except asyncssh.SignalReceived as exc:
            raise StreamAborted(f"{self.node} aborted stream {self.kind} ({exc})") from None
        except (asyncssh.Error, OSError) as exc:
            raise StreamAborted(f"stream {self.kind} with {self.node} lost: {exc}") from None
        if msg is None and not self.server:
            sig = self._exit_signal()
            if sig is not None:
                raise StreamAborted(f"{self.node} aborted stream {self.kind}: "
                                    f"{sig[2] or sig[0]}")
        return msg

    async def write_frame(self, obj: dict[str, Any]) -> None:
        await self.write(encode_frame(obj))

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self.writer.channel.wait_closed()

    async def __aenter__(self) -> PeerStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc_type.__name__)
        await self.wait_closed()


async def pump_to_stream(src: asyncio.StreamReader, dst: PeerStream) -> int:
    """TCP → channel until EOF; returns bytes; half-closes the channel (only on EOF)."""
    n = 0
    while data := await src.read(CHUNK):
        n += len(data)
        await dst.write(data)
    dst.write_eof()
    return n


async def pump_from_stream(src: PeerStream, dst: asyncio.StreamWriter,
                           clean_eof: Callable[[], bool] | None = None) -> int:
    """Channel → TCP until EOF; returns bytes; half-closes the socket, or resets it
    when `clean_eof` says the EOF must not look clean (see `splice`)."""
    n = 0
    while data := await src.read(CHUNK):
        n += len(data)
        dst.write(data)
        await dst.drain()
    if clean_eof is not None and not clean_eof():
        abort_tcp(dst)
    elif dst.can_write_eof() and not dst.is_closing():
        with contextlib.suppress(OSError):
            dst.write_eof()
    return n


def abort_tcp(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0): the local program sees an error, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def splice(stream: PeerStream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *,
                 clean_eof: Callable[[], bool] | None = None) -> tuple[int, int]:
    """Copy both ways until both directions hit EOF; returns (up, down) byte counts.

    Failure on either side (peer aborted, connection lost, local reset, cancel) is
    passed on as a failure on the other: RST on the TCP side, abort on the stream.

    `clean_eof`: asked when the stream ends; False resets the TCP side instead of
    half-closing it. Teleport needs this: CRIU 4.2.1's lazy page server takes a clean
    EOF from the lazy-pages client as "all pages served" and kills the frozen source
    cnvm, while a RST makes it fail and let go, so the engine can still resume it.
    Until the target has reported a successful restore, no clean EOF is passed on."""
    up = asyncio.ensure_future(pump_to_stream(reader, stream))
    down = asyncio.ensure_future(pump_from_stream(stream, writer, clean_eof))
    ok = False
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await asyncio.gather(up, down)
        ok = True
        return up.result(), down.result()
    finally:
        for t in (up, down):
            t.cancel()
        if ok:
            stream.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        else:
            stream.abort("relay failed")
            abort_tcp(writer)


class TcpRelay:
    """A local TCP listener whose every connection is spliced into a new peer stream.

    `opener()` opens that stream; `label` names the far end in logs. The page-server
    case (`PeerService.relay_tcp`): the target runs ``criu page-server --address
    127.0.0.1 --port P``; the source relays to a "tcp" stream for that port and points
    runc at ``--page-server 127.0.0.1:{relay.port}``. A postcopy target relays its
    lazy-pages daemon into a teleport stream the same way.
    """

    def __init__(self, opener: Callable[[], Awaitable[PeerStream]], label: str) -> None:
        self._opener = opener
        self.label = label
        self.server: asyncio.Server | None = None
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.errors: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, local_host: str, local_port: int) -> TcpRelay:
        self.server = await asyncio.start_server(self._accept, local_host, local_port,
                                                 limit=CHUNK)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            stream = await self._opener()
            up, down = await splice(stream, reader, writer)
            self.bytes_up += up
            self.bytes_down += down
        except Exception as exc:
            self.errors.append(str(exc))
            log.warning("relay to %s failed: %s", self.label, exc)
            abort_tcp(writer)
        except asyncio.CancelledError:
            abort_tcp(writer)
            raise
        finally:
            self._tasks.discard(task)

    async def wait_idle(self) -> None:
        """Wait until every relayed connection has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def __aenter__(self) -> TcpRelay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- server-side handlers for the built-in stream kinds ---------------------------------

_LOOPBACK = ("127.", "::1", "localhost")


async def serve_tcp(stream: PeerStream, args: dict[str, Any]) -> None:
    """Connect to a local port and splice; only loopback targets (CRIU listens there)."""
    host, port = str(args.get("host", "127.0.0.1")), int(args.get("port", 0))
    if not host.startswith(_LOOPBACK) or not 0 < port < 65536:
        raise ProtoError(ErrorCode.PERMISSION_DENIED, f"relay target {host}:{port} not allowed")
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=CHUNK)
    except OSError as exc:
        raise ProtoError(ErrorCode.UNAVAILABLE, f"connect {host}:{port}: {exc}") from None
    await stream.write_frame({"ok": True})
    await splice(stream, reader, writer)


def check_path(path: str, roots: list[Path]) -> Path:
    p = Path(path)
    if not p.is_absolute():
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"path must be absolute: {path}")
    rp = Path(os.path.normpath(p))
    if not any(rp == r or r in rp.parents for r in roots):
        raise ProtoError(ErrorCode.PERMISSION_DENIED, f"{path} is outside the allowed roots")
    return rp


async def receive_file(stream: PeerStream, dest: Path, mode: int = 0o644,
                       limit: int | None = None) -> dict[str, Any]:
    """Write the stream (to EOF, or ``limit`` bytes) to dest; temp + rename, so a cut
    transfer leaves no half file."""
    await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
    fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    h = hashlib.sha256()
    n = 0
    ok = False
    try:
        pending: asyncio.Future[Any] | None = None
        while True:
            want = CHUNK * 4 if limit is None else min(CHUNK * 4, limit - n)
            if want <= 0:
                break
            data = await stream.read(want)
            if not data:
                break
            h.update(data)
            n += len(data)
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(asyncio.to_thread(os.write, fd, data))
        if pending is not None:
            await pending
        await asyncio.to_thread(os.fsync, fd)
        ok = True
    finally:
        os.close(fd)
        if ok:
            await asyncio.to_thread(os.replace, tmp, dest)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return {"bytes": n, "sha256": h.hexdigest()}


async def send_file(stream: PeerStream, src: Path, *, limit: int | None = None,
                    eof: bool = True) -> dict[str, Any]:
    """Copy a file (or its first ``limit`` bytes) into the stream, reading the next chunk
    in a thread while the last one is sent (disk reads never stall the loop)."""
    fd = await asyncio.to_thread(os.open, src, os.O_RDONLY)
    h = hashlib.sha256()
    n = 0

    def want() -> int:
        return CHUNK if limit is None else max(0, min(CHUNK, limit - n))

    nxt: asyncio.Future[bytes] = asyncio.ensure_future(asyncio.to_thread(os.read, fd, want()))
    try:
        while True:
            data = await nxt
            if not data:
                break
            h.update(data)
            n += len(data)
            nxt = asyncio.ensure_future(asyncio.to_thread(os.read, fd, want()))
            await stream.write(data)
    finally:
        with contextlib.suppress(BaseException):
            await nxt
        os.close(fd)
    if eof:
        stream.write_eof()
    return {"bytes": n, "sha256": h.hexdigest()}
