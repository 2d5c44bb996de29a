"""SSH transport of the mesh: who may connect, and the one cached link per peer.

Why a layer of its own: everything above it (RPC, streams, enrolment, gossip) speaks
in member names and channels; only this module knows asyncssh connections, keys and
the tuning that makes bulk data fast. One asyncssh server per node (underlay
address, ``peer_port``); at most one outgoing connection per peer, reused for the
multiplexed RPC channel (``cnvm-rpc``) and one fresh channel per bulk stream
(``cnvm-stream``). Members authenticate with their pinned keys only; an unenrolled
node may only open ``cnvm-enroll`` as user ``_enroll`` (see enrol.py, trust.py).

Nobody outside the cluster may exhaust the port: connections that are not (yet) an
authenticated member hold a *pre-auth slot*, limited per source address and in
total; the oldest slot of the busiest source gives way to a new connection (so a
flood never locks members out, it only churns itself), and a slot is freed when its
connection dies. ``_enroll`` connections additionally hold an *enrolment slot*
(smaller caps), live at most ``enroll_timeout`` and get one small-window channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncssh

from proto.framing import FrameDecoder, FrameError
from proto.messages import ErrorCode, ProtoError

from . import trust
from .membership import ACTIVE

if TYPE_CHECKING:
    from .service import PeerService

log = logging.getLogger("cnvmd.peers")

ENROLL_USER = "_enroll"
SUB_RPC = "cnvm-rpc"
SUB_STREAM = "cnvm-stream"
SUB_ENROLL = "cnvm-enroll"
PREAUTH_PER_SOURCE = 8
"""Connections from one address that are not an authenticated member (enrolling ones
included). A member authenticates within milliseconds, so this only bounds floods."""
PREAUTH_TOTAL = 128
"""Such connections from all addresses together."""
ENROLL_PER_SOURCE = 2
"""``_enroll`` connections (any key gets that far) per source address..."""
ENROLL_TOTAL = 16
"""...and in total; each may buffer at most ENROLL_WINDOW + one frame."""
ENROLL_WINDOW = 64 * 1024
"""SSH window of an enrolment channel: what an unenrolled peer can make us buffer."""
ENROLL_PKTSIZE = 32 * 1024

EventCallback = Callable[[str, dict[str, Any]], None]
MemberChannel = Callable[[str, "asyncssh.SSHReader[bytes]", "asyncssh.SSHWriter[bytes]"],
                         Awaitable[None]]
"""Server side of a subsystem a member may open: ``handler(node, reader, writer)``."""
EnrollChannel = Callable[["ServerConn", "asyncssh.SSHReader[bytes]",
                          "asyncssh.SSHWriter[bytes]"], Awaitable[None]]


@dataclass
class Tuning:
    """SSH knobs. AES-GCM first: ~1.7x chacha20 here (AES-NI); big windows for bulk."""

    encryption_algs: tuple[str, ...] = (
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
        "aes128-ctr", "aes256-ctr")
    window: int = 8 * 1024 * 1024
    max_pktsize: int = 128 * 1024
    """128 KiB packets: 4x fewer per-packet Python passes (2x MB/s per CPU measured in
    bench/peer_throughput.py), affordable once the malloc thresholds are raised."""
    connect_timeout: float = 3.0
    login_timeout: float = 10.0
    """Auth timeout: a connection that has not authenticated by then is closed."""
    enroll_timeout: float = 20.0
    """Lifetime of an ``_enroll`` connection (the exchange itself takes < 1 s)."""
    keepalive_interval: float = 5.0
    skip_ignore: bool = True
    """Drop asyncssh's empty MSG_IGNORE before each packet on AEAD ciphers (a CBC-era
    countermeasure, pointless with GCM/ChaCha: +10 % MB/s per CPU at 128 KiB packets,
    +40 % at 32 KiB). Wraps a private asyncssh method, process-wide, only when its
    signature is the one this was written against (2.24); otherwise nothing changes."""
    malloc_thresholds: bool = True
    """mallopt(M_MMAP_THRESHOLD=32M, M_TRIM_THRESHOLD=256M) at start, as the
    MALLOC_*_ env vars of platform.md would: stops glibc from mmap/munmap-ing every
    large packet buffer. Process-wide."""

    def options(self) -> dict[str, Any]:
        """Options common to our server and client connections (no GSSAPI, no compression:
        keys only, and compression costs CPU on already-compressed CRIU pages)."""
        return {"encryption_algs": list(self.encryption_algs), "compression_algs": ["none"],
                "window": self.window, "max_pktsize": self.max_pktsize, "gss_host": None}

    def apply_process_wide(self) -> None:
        """The two process-wide tweaks (idempotent), as the fields ask."""
        if self.malloc_thresholds and not install_malloc_thresholds():
            log.info("peers: mallopt not available; malloc thresholds unchanged")
        if self.skip_ignore and not install_skip_ignore():
            log.warning("peers: skip_ignore requested but asyncssh changed; not applied")


_AEAD = ("GCMEncryption", "ChachaEncryption")


def install_skip_ignore() -> bool:
    """Wrap asyncssh's send_packet so that empty MSG_IGNOREs are not sent when the
    connection's cipher is an AEAD. Returns False if asyncssh changed shape."""
    from asyncssh import connection as _c
    from asyncssh.constants import MSG_IGNORE

    orig = getattr(_c.SSHConnection, "send_packet", None)
    if orig is None:
        return False
    if getattr(orig, "_cnvm_wrapped", False):
        return True
    import inspect

    params = list(inspect.signature(orig).parameters)
    if params != ["self", "pkttype", "args", "handler"]:
        return False
    empty = b"\0\0\0\0"

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (pkttype == MSG_IGNORE and args == (empty,)
                and type(getattr(self, "_send_encryption", None)).__name__ in _AEAD):
            return
        orig(self, pkttype, *args, handler=handler)

    send_packet._cnvm_wrapped = True  # type: ignore[attr-defined]
    _c.SSHConnection.send_packet = send_packet  # type: ignore[method-assign]
    return True


def install_malloc_thresholds(mmap: int = 32 << 20, trim: int = 256 << 20) -> bool:
    """glibc only; a no-op elsewhere. Same effect as MALLOC_MMAP_THRESHOLD_ etc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: no ldconfig subprocess
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, mmap)) and bool(
            libc.mallopt(m_trim_threshold, trim))
    except (OSError, AttributeError):
        return False


def release_memory() -> bool:
    """malloc_trim(0): hand freed heap pages back to the kernel. With the thresholds
    above, glibc keeps up to 256 MiB of freed memory at the heap top and holes inside
    it; a daemon that has just moved a cnvm's pages through its buffers would otherwise
    keep its peak RSS (the soak lane saw ~35 KB per teleport). Blocking: call it in a
    thread, once per teleport."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


class Link:
    """A cached outgoing connection to one peer with its multiplexed RPC channel:
    ``pending`` maps our request ids to the caller's future and event callback."""

    def __init__(self, node: str, conn: asyncssh.SSHClientConnection,
                 writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]) -> None:
        self.node = node
        self.conn = conn
        self.writer = writer
        self.reader = reader
        self.pending: dict[int, tuple[asyncio.Future[Any], EventCallback | None]] = {}
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def fail_all(self, exc: Exception) -> None:
        self.closed = True
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()

    def close(self) -> None:
        self.closed = True
        self.conn.close()


class Throttle:
    """At most one log line per key and minute: refusals are logged (who, why) without
    letting a peer that repeats itself flood the journal."""

    def __init__(self, every: float = 60.0, keys: int = 1024) -> None:
        self.every = every
        self.keys = keys
        self._last: dict[Any, float] = {}

    def __call__(self, key: Any) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self.every:
            return False
        if len(self._last) >= self.keys:
            self._last.clear()
        self._last[key] = now
        return True


class SlotPool:
    """Bounded slots per source address and in total, oldest first out.

    Why eviction rather than refusal: refusing new connections once full would let a
    flood of idle connections lock members out until they time out; evicting the
    oldest connection of the busiest source keeps the bound and lets a newcomer
    (a member, a joiner) in, so an attacker only churns its own connections. Slots
    are strong references removed on ``release`` (the connection's death): nothing
    here depends on garbage collection.
    """

    def __init__(self, what: str, per_source: int, total: int) -> None:
        self.what = what
        self.per_source = per_source
        self.total = total
        self.by_source: dict[str, dict[ServerConn, None]] = {}
        self.count = 0

    def admit(self, sc: ServerConn) -> list[ServerConn]:
        """Take a slot for ``sc``; returns the connections that must give way."""
        victims: list[ServerConn] = []
        mine = self.by_source.setdefault(sc.source, {})
        if len(mine) >= self.per_source:
            victims.append(next(iter(mine)))
        elif self.count >= self.total:
            busiest = max(self.by_source.values(), key=len)
            victims.append(next(iter(busiest)))
        for v in victims:
            self.release(v)
        self.by_source.setdefault(sc.source, {})[sc] = None
        self.count += 1
        return victims

    def release(self, sc: ServerConn) -> None:
        mine = self.by_source.get(sc.source)
        if mine is not None and sc in mine:
            del mine[sc]
            self.count -= 1
            if not mine:
                del self.by_source[sc.source]


class ServerConn(asyncssh.SSHServer):
    """Per-connection server object: authentication decisions and refusal logging."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.svc = transport.svc
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.source = "?"
        self.node: str | None = None
        self.enroll_key: asyncssh.SSHKey | None = None
        self.enroll_channels = 0
        self.authed = False
        self.refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        pn = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{pn[0]}:{pn[1]}"
        self.source = str(pn[0])
        t = self.transport
        t.server_conns[conn] = self
        for victim in t.preauth.admit(self):
            victim.evict(f"{t.preauth.what}: {victim.source} or the port is at its limit")

    def evict(self, why: str) -> None:
        """Close this connection to make room (logged once, at warning level)."""
        if not self.refused:
            self.refused = True
            self.transport.refusal(self.source, "peer port: %s closed before authentication: %s",
                                   self.peer, why)
        if self.conn is not None:
            self.conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        t = self.transport
        t.preauth.release(self)
        t.enrolling.release(self)
        if self.conn is not None:
            t.server_conns.pop(self.conn, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.authed and not self.refused:
            self.transport.refusal(
                self.source, "peer port: connection from %s closed before authentication%s",
                self.peer, f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        svc = self.svc
        if username == ENROLL_USER:
            if svc.cluster is None:
                self.refused = True
                self.transport.refusal(
                    self.source, "enrolment attempt from %s refused: this node is in no cluster",
                    self.peer)
                return False
            self.enroll_key = key
            self.node = None
            return True
        pinned = svc.membership.pinned_key(username)
        if (svc.cluster is not None and pinned is not None and username != svc.name
                and trust.same_key(key, pinned)):
            self.node = username
            self.enroll_key = None
            return True
        self.refused = True
        self.transport.refusal(
            self.source, "peer port: refused %s from %s: key %s is not the pinned key of an "
            "enrolled member", username, self.peer, key.get_fingerprint("sha256"))
        return False

    def auth_completed(self) -> None:
        self.authed = True
        t = self.transport
        user = self.conn.get_extra_info("username") if self.conn is not None else None
        if user != (self.node or ENROLL_USER):  # never trust state left by a probe
            self.node = None
            self.evict(f"authenticated as {user!r} after probing another user")
            return
        if self.node is not None:
            t.preauth.release(self)  # a member: its slot is free for others at once
            log.debug("peer port: %s authenticated from %s", self.node, self.peer)
            return
        # The enrolment user is no member: it keeps its pre-auth slot, takes an
        # enrolment slot and has a bounded life.
        for victim in t.enrolling.admit(self):
            victim.evict(f"{t.enrolling.what}: too many enrolments in progress")
        if self.conn is not None:
            self._timer = asyncio.get_running_loop().call_later(
                t.tuning.enroll_timeout, self._enroll_expired)
        log.debug("peer port: %s authenticated as %s", self.peer, ENROLL_USER)

    def _enroll_expired(self) -> None:
        self._timer = None
        self.evict(f"enrolment not finished within {self.transport.tuning.enroll_timeout:g}s")

    def session_requested(self) -> Any:
        """Members get channels with the tuned window; the enrolment user one channel
        with a small window (bounds what it can make us buffer)."""
        if not self.authed or self.conn is None:
            return False
        if self.node is None:
            self.enroll_channels += 1
            if self.enroll_channels > 1:
                self.transport.refusal(self.source, "peer port: %s as %s opened a second "
                                       "channel: refused", self.peer, ENROLL_USER)
                return False
            chan = self.conn.create_server_channel(encoding=None, window=ENROLL_WINDOW,
                                                   max_pktsize=ENROLL_PKTSIZE)
            return chan, self._handler
        return self._handler

    def _handler(self, stdin: asyncssh.SSHReader[bytes], stdout: asyncssh.SSHWriter[bytes],
                 stderr: asyncssh.SSHWriter[bytes]) -> Awaitable[None]:
        return self.transport.serve_channel(self, stdin, stdout)

    def connection_requested(self, *_a: Any) -> bool:
        return False

    def server_requested(self, *_a: Any) -> bool:
        return False


class Transport:
    """The node's SSH server, its server-side connections and its client links.

    Channels are handed to the layers above by subsystem name: ``channels`` for
    authenticated members (``handler(node, reader, writer)``), ``enroll`` for the
    enrolment user.
    """

    def __init__(self, svc: PeerService) -> None:
        self.svc = svc
        self.tuning = svc.tuning
        self.server: asyncssh.SSHAcceptor | None = None
        self.server_conns: dict[asyncssh.SSHServerConnection, ServerConn] = {}
        """Live server-side connections; an entry goes in ``connection_lost``."""
        self._throttle = Throttle()
        self.preauth = SlotPool("pre-auth connections", PREAUTH_PER_SOURCE, PREAUTH_TOTAL)
        self.enrolling = SlotPool("enrolments", ENROLL_PER_SOURCE, ENROLL_TOTAL)
        self.links: dict[str, Link] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.channels: dict[str, MemberChannel] = {}
        self.enroll: EnrollChannel | None = None

    # -- server ------------------------------------------------------------------------

    def refusal(self, source: str, msg: str, *args: Any) -> None:
        """Log a refusal at warning level, at most once a minute per source address and
        kind (a flood of junk connections must not become a flood of log lines)."""
        if self._throttle((source, msg)):
            log.warning(msg, *args)

    async def listen(self, host: str, port: int, key: asyncssh.SSHKey) -> int:
        """Open the peer port; returns the port actually bound."""
        self.server = await asyncssh.create_server(
            lambda: ServerConn(self), host, port, server_host_keys=[key],
            login_timeout=self.tuning.login_timeout,
            allow_scp=False, agent_forwarding=False, x11_forwarding=False,
            keepalive_interval=self.tuning.keepalive_interval, reuse_address=True,
            encoding=None, **self.tuning.options())
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Close every link, the listener and every server-side connection."""
        self.drop_all()
        if self.server is not None:
            self.server.close()
            for conn in list(self.server_conns.keys()):
                conn.close()
            await self.server.wait_closed()

    def close_member(self, node: str) -> None:
        """Cut a (removed) member off: our link to it and its connections to us."""
        self.drop_link(node)
        for conn, sc in list(self.server_conns.items()):
            if sc.node == node:
                log.warning("closing connection of removed node %s", node)
                conn.close()

    async def serve_channel(self, sc: ServerConn, stdin: asyncssh.SSHReader[bytes],
                            stdout: asyncssh.SSHWriter[bytes]) -> None:
        """Hand a channel to the layer that owns its subsystem (members), or to
        enrolment (the ``_enroll`` user, which may open nothing else)."""
        sub = stdin.channel.get_subsystem()
        try:
            if sc.node is None:
                if sub == SUB_ENROLL and self.enroll is not None:
                    await self.enroll(sc, stdin, stdout)
                else:
                    self.refusal(sc.source, "peer port: %s as %s asked for %r: refused",
                                 sc.peer, ENROLL_USER, sub)
                return
            if self.svc.membership.pinned_key(sc.node) is None:
                return  # revoked while connected
            handler = self.channels.get(sub or "")
            if handler is None:
                log.warning("peer %s asked for unknown subsystem %r", sc.node, sub)
                return
            await handler(sc.node, stdin, stdout)
        except (asyncssh.Error, OSError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("peer %s: channel %r failed", sc.node or sc.peer, sub)
        finally:
            stdout.close()

    # -- client links ------------------------------------------------------------------

    async def link(self, node: str) -> Link:
        """The cached link to ``node`` (connecting and opening its RPC channel if need be)."""
        link = self.links.get(node)
        if link is not None and not link.closed:
            return link
        lock = self._locks.setdefault(node, asyncio.Lock())
        async with lock:
            link = self.links.get(node)
            if link is not None and not link.closed:
                return link
            conn = await self.connect(node)
            try:
                w, r, _ = await conn.open_session(subsystem=SUB_RPC, encoding=None)
            except (asyncssh.Error, OSError) as exc:
                conn.close()
                raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {exc}") from None
            link = Link(node, conn, w, r)
            link.task = asyncio.create_task(self._read_link(link))
            self.links[node] = link
            return link

    async def connect(self, node: str) -> asyncssh.SSHClientConnection:
        """A new authenticated connection to member ``node``, its host key pinned."""
        svc = self.svc
        if svc.cluster is None:
            raise ProtoError(ErrorCode.CONFLICT, "not in a cluster")
        m = svc.membership.get(node)
        if m is None or m.admin != ACTIVE:
            raise ProtoError(ErrorCode.NOT_FOUND, f"no member named {node}")
        if not m.addr:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node} has no known address yet")
        try:
            host_key = trust.key_from_line(m.pubkey)
            async with asyncio.timeout(self.tuning.connect_timeout + 2):
                return await asyncssh.connect(
                    m.addr, m.port, username=svc.name, client_keys=[svc.key],
                    known_hosts=([host_key], [], []), agent_path=None, config=None,
                    preferred_auth="publickey", connect_timeout=self.tuning.connect_timeout,
                    keepalive_interval=self.tuning.keepalive_interval, keepalive_count_max=3,
                    **self.tuning.options())
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise ProtoError(ErrorCode.UNAVAILABLE,
                             f"{node} ({m.addr}:{m.port}) unreachable: {exc or 'timeout'}") \
                from None

    async def dial_enroll(self, host: str, port: int) -> asyncssh.SSHClientConnection:
        """Connect as the enrolment user; the host key is checked by the token proof."""
        try:
            return await asyncssh.connect(
                host, port, username=ENROLL_USER, client_keys=[self.svc.key],
                known_hosts=None, agent_path=None, config=None, preferred_auth="publickey",
                **self.tuning.options())
        except (OSError, asyncssh.Error) as exc:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"cannot reach {host}:{port}: {exc}") \
                from None

    async def open_channel(self, node: str, subsystem: str, *, window: int | None = None,
                           max_pktsize: int | None = None
                           ) -> tuple[asyncssh.SSHWriter[bytes], asyncssh.SSHReader[bytes]]:
        """A fresh channel on the link to ``node`` (UNAVAILABLE if that fails)."""
        link = await self.link(node)
        try:
            w, r, _ = await link.conn.open_session(
                subsystem=subsystem, encoding=None, window=window or self.tuning.window,
                max_pktsize=max_pktsize or self.tuning.max_pktsize)
        except (asyncssh.Error, OSError) as exc:
            self.drop_link(node)
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {exc}") from None
        return w, r

    async def _read_link(self, link: Link) -> None:
        """Client half of the RPC channel: hand each res/evt to its pending call."""
        dec = FrameDecoder()
        err: Exception = ProtoError(ErrorCode.UNAVAILABLE, f"connection to {link.node} lost")
        try:
            while data := await link.reader.read(1 << 20):
                for msg in dec.feed(data):
                    p = link.pending.get(msg.get("id"))  # type: ignore[arg-type]
                    if p is None:
                        continue
                    fut, on_event = p
                    if msg.get("t") == "evt":
                        if on_event is not None:
                            try:
                                on_event(str(msg.get("event")), msg.get("data") or {})
                            except Exception:
                                log.exception("event callback failed")
                    elif msg.get("t") == "res" and not fut.done():
                        if msg.get("ok"):
                            fut.set_result(msg.get("result"))
                        else:
                            fut.set_exception(ProtoError.from_wire(msg.get("error")))
        except FrameError as exc:
            log.warning("peer %s sent bad framing: %s", link.node, exc)
        except (asyncssh.Error, OSError) as exc:
            err = ProtoError(ErrorCode.UNAVAILABLE, f"connection to {link.node} lost: {exc}")
        finally:
            dec.close()
            link.fail_all(err)
            link.close()
            if self.links.get(link.node) is link:
                del self.links[link.node]

    def drop_link(self, node: str) -> None:
        link = self.links.pop(node, None)
        if link is not None:
            link.close()

    def drop_all(self) -> None:
        for node in list(self.links):
            self.drop_link(node)


def channel_writer(writer: asyncssh.SSHWriter[bytes]) -> Callable[[bytes], None]:
    """A ``write(bytes)`` for a channel that drops data once the channel is closing."""
    chan = writer.channel

    def write(data: bytes) -> None:
        if not chan.is_closing():
            with contextlib.suppress(OSError, asyncssh.Error):
                writer.write(data)

    return write


def channel_drain(writer: asyncssh.SSHWriter[bytes]) -> Callable[[], Awaitable[None]]:
    """Wait for the channel window; a dead channel counts as drained (nobody reads)."""
    async def drain() -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            await writer.drain()

    return drain
