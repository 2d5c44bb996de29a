"""Byte streams over dedicated SSH channels: the bulk-data path (teleport).

A stream channel starts with one framed header each way (``{kind, args}`` then
``{ok, ...}``), after which it is a raw, flow-controlled, half-closable byte pipe.
Built on it here: TCP relaying (CRIU's page server, lazy-pages) and file transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import secrets
import socket
import stat
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
            up, down = await self._relay(reader, writer)
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

    async def _relay(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> tuple[int, int]:
        """One accepted connection: open the stream and copy bytes both ways; returns
        (up, down). Subclasses relay differently (migration.lazyrelay speaks CRIU's
        page-server protocol)."""
        return await splice(await self._opener(), reader, writer)

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

async def serve_tcp(stream: PeerStream, args: dict[str, Any]) -> None:
    """Connect to a local port and splice; only literal loopback IPs (CRIU listens
    there): a name would be resolved, and ``127.evil.example`` is no loopback."""
    host, port = args.get("host", "127.0.0.1"), args.get("port")
    try:
        ip = ipaddress.ip_address(host) if isinstance(host, str) else None
    except ValueError:
        ip = None
    if ip is None:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                         f"relay host must be a literal IP address, got {host!r:.80}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"relay port {port!r:.40} out of range")
    if not ip.is_loopback:
        raise ProtoError(ErrorCode.PERMISSION_DENIED, f"relay target {ip}:{port} not allowed")
    try:
        reader, writer = await asyncio.open_connection(str(ip), port, limit=CHUNK)
    except OSError as exc:
        raise ProtoError(ErrorCode.UNAVAILABLE, f"connect {ip}:{port}: {exc}") from None
    await stream.write_frame({"ok": True})
    await splice(stream, reader, writer)


# -- files beneath a root, never through a symlink ---------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_path(path: Any, roots: list[Path]) -> tuple[Path, list[str]]:
    """Split a peer-supplied absolute path into (allowed root, components beneath it).

    Purely lexical and strict: no ``.``/``..``/empty components, no NUL, bounded
    length. The components are then opened one by one (``open_beneath``)."""
    if not isinstance(path, str) or not path or len(path) > 4096 or "\0" in path:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, "path must be a non-empty string")
    if not path.startswith("/"):
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"path must be absolute: {path:.200}")
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") or len(p.encode(errors="surrogatepass")) > 255
           for p in parts):
        raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                         f"path must be normalised (no '.', '..' or '//'): {path:.200}")
    for root in roots:
        rparts = root.parts[1:]
        if len(parts) > len(rparts) and tuple(parts[:len(rparts)]) == rparts:
            return root, parts[len(rparts):]
    raise ProtoError(ErrorCode.PERMISSION_DENIED, f"{path:.200} is outside the allowed roots")


def _beneath_error(exc: OSError, path: str) -> ProtoError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
        return ProtoError(ErrorCode.INVALID_ARGUMENT,
                          f"{path}: a symlink or non-directory on the way (not followed)")
    if exc.errno == errno.ENOENT:
        return ProtoError(ErrorCode.NOT_FOUND, f"{path}: no such file")
    return ProtoError(ErrorCode.FAILED, f"{path}: {exc.strerror}")


def open_parent(root: Path, parts: list[str], *, create: bool) -> int:
    """A directory fd for the parent of ``parts`` beneath ``root``, walked one
    component at a time with O_NOFOLLOW (a symlink anywhere is refused, never
    followed); ``create`` makes missing directories (0700). Caller closes the fd."""
    if create:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(root: Path, parts: list[str]) -> tuple[int, int]:
    """Open a regular file beneath ``root`` for reading without following any
    symlink; returns (fd, size). ProtoError INVALID_ARGUMENT for a symlink or a
    non-regular file, NOT_FOUND if missing."""
    shown = str(root.joinpath(*parts))
    try:
        dfd = open_parent(root, parts, create=False)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise _beneath_error(exc, shown) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"{shown}: not a regular file")
    return fd, st.st_size


async def receive_beneath(stream: PeerStream, root: Path, parts: list[str],
                          mode: int = 0o644, *,
                          ready: Callable[[], Awaitable[None]] | None = None
                          ) -> dict[str, Any]:
    """``receive_file`` into ``root/parts`` without following symlinks: directories
    walked with O_NOFOLLOW, a new temp file (O_EXCL|O_NOFOLLOW) renamed over the
    name (a symlink there is replaced, never written through). ``ready`` is awaited
    once the file could be created (accept the stream there: refusals before it)."""
    shown = str(root.joinpath(*parts))
    tmp = f".{parts[-1][:200]}.part{os.getpid()}.{secrets.token_hex(4)}"

    def prepare() -> tuple[int, int]:
        dfd = open_parent(root, parts, create=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode & 0o777, dir_fd=dfd)
        except BaseException:
            os.close(dfd)
            raise
        return dfd, fd

    try:
        dfd, fd = await asyncio.to_thread(prepare)
    except OSError as exc:
        raise _beneath_error(exc, shown) from None
    ok = False
    try:
        if ready is not None:
            await ready()
        got = await _receive_fd(stream, fd, None)
        await asyncio.to_thread(os.replace, tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        ok = True
    except OSError as exc:
        raise _beneath_error(exc, shown) from None
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
        os.close(dfd)
    return got


async def receive_file(stream: PeerStream, dest: Path, mode: int = 0o644,
                       limit: int | None = None) -> dict[str, Any]:
    """Write the stream (to EOF, or ``limit`` bytes) to a local ``dest`` the caller
    chose; temp + rename, so a cut transfer leaves no half file."""
    await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
    fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    ok = False
    try:
        got = await _receive_fd(stream, fd, limit)
        ok = True
    finally:
        os.close(fd)
        if ok:
            await asyncio.to_thread(os.replace, tmp, dest)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return got


async def _receive_fd(stream: PeerStream, fd: int, limit: int | None) -> dict[str, Any]:
    """Stream → fd (to EOF or ``limit``), writes in a thread, fsync at the end."""
    h = hashlib.sha256()
    n = 0
    pending: asyncio.Future[Any] | None = None
    try:
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
            pending = None
        await asyncio.to_thread(os.fsync, fd)
    finally:
        if pending is not None:  # never close the fd under a running write
            with contextlib.suppress(BaseException):
                await pending
    return {"bytes": n, "sha256": h.hexdigest()}


async def send_file(stream: PeerStream, src: Path | int, *, limit: int | None = None,
                    eof: bool = True) -> dict[str, Any]:
    """Copy a file (a local path, or an open fd that this takes over) or its first
    ``limit`` bytes into the stream, reading the next chunk in a thread while the last
    one is sent (disk reads never stall the loop)."""
    fd = src if isinstance(src, int) else await asyncio.to_thread(os.open, src, os.O_RDONLY)
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
