"""The daemon's request API: an op registry (Router) and a Unix-socket server.

Subsystems never edit the server. Each subsystem's plug-in (cnvmd.services.Plugin,
listed in cnvmd.daemon.PLUGIN_MODULES) carries a ``Router`` of its API ops; the
daemon merges them (and, apart, every plug-in's peer-only router):

    router = Router()

    @router.op("deploy")
    async def deploy(ctx: Context, args: Args) -> dict:
        \"\"\"Deploy a cnvm from an image.\"\"\"       # first line is the op's summary
        name = args.name("name")                      # validated, else INVALID_ARGUMENT
        ctx.progress("unpack", done=0, total=3)       # streamed to the caller
        ...
        raise ProtoError(ErrorCode.ALREADY_EXISTS, f"cnvm {name} exists")  # clean error
        return {"name": name}                         # msgpack-able result

    plugin = Plugin("lifecycle", router=router, start=start_lifecycle)

Every request runs in its own task, so a slow op never delays others on the same
connection; ``cancel`` cancels that task (handlers see CancelledError, clean up,
and the caller gets CANCELLED).

One request/response engine serves both the Unix socket and the peer mesh: `Session`
is transport agnostic, and the peer mesh runs one per member's RPC channel
(``Session(peer_router, daemon, write, close, greeted=True, node=member)``: the SSH
layer already authenticated the member, so no hello, and ``ctx.node`` names it). Peer
ops live on a *separate* Router (an API client can never reach them; a peer reaches
API ops only through ``peer.forward``, which runs them with `dispatch`). A Router also
carries the stream kinds a node accepts on the mesh (``@router.stream(kind)``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import enum
import errno
import grp
import logging
import os
import re
import reprlib
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import msgpack

from cnvmd import metrics_hooks
from proto.framing import (
    HEADER_SIZE,
    MAX_DEPTH,
    MAX_FRAME,
    DecodeLimits,
    FrameBudget,
    FrameBusy,
    FrameDecoder,
    FrameError,
)
from proto.messages import (
    EVT_PROGRESS,
    Cancel,
    ErrorCode,
    Hello,
    ProtoError,
    Request,
    error_response,
    negotiate,
    parse_client_frame,
)

if TYPE_CHECKING:
    from cnvmd.daemon import Daemon
    from cnvmd.peers.streams import PeerStream

log = logging.getLogger("cnvmd.api")

Handler = Callable[["Context", "Args"], Awaitable[Any]]
StreamHandler = Callable[["PeerStream", dict[str, Any]], Awaitable[Any]]
"""Receiving side of a peer-mesh bulk stream: ``async def h(stream, args)``."""
EventSink = Callable[[str, dict[str, Any]], None]

MAX_INFLIGHT = 1024
"""Concurrent requests per connection; more get BUSY (a runaway client, not a user)."""
MAX_WRITE_BUFFER = 64 * 1024 * 1024
"""A client that lets this much reply data pile up unread is disconnected."""
HELLO_TIMEOUT = 10.0
LINGER_SECONDS = 1.0
"""After a closing error frame, how long the socket stays open (write side shut) to
swallow what the client still sends: a close with unread data makes the client's
read fail with ECONNRESET before it sees the error that says why."""
LINGER_BYTES = 1 << 20
"""A connection that has not said hello by then is closed (fd hygiene)."""
HELLO_MAX_FRAME = 64 * 1024
"""Largest frame before the hello: an unknown caller gets no big buffer."""
MAX_REQUEST_FRAME = (8 << 20) + (64 << 10)
"""Largest request frame on the API socket: `exec` stdin (8 MiB) plus its envelope.
Below the protocol's MAX_FRAME, which replies and peers may still use."""
API_DECODE_LIMITS = DecodeLimits(max_depth=MAX_DEPTH, max_containers=1 << 16,
                                 max_items=1 << 18)
"""What one API request may decode into (requests are small maps of args)."""
MAX_ARG_BYTES = 64 * 1024
"""Longest string of a process argv/env (UTF-8 bytes); the kernel allows 128 KiB."""
MAX_ARGV_BYTES = 1 << 20
"""Longest argv (or env) in all; execve() refuses more than about 2 MiB together."""


@dataclasses.dataclass(frozen=True)
class ApiLimits:
    """Bounds of the Unix-socket API, so that no client can exhaust the daemon.

    From cnvmd.toml (`api_max_connections`, `api_frame_timeout`, `api_idle_timeout`,
    `api_read_budget`); documented in proto/README.md section 6.
    """

    max_connections: int = 256
    """Open connections; past ``max_connections - root_reserve`` only root gets in."""
    root_reserve: int = 16
    frame_timeout: float = 30.0
    """A frame once begun must be complete within this (slow senders are closed)."""
    idle_timeout: float = 300.0
    """A greeted connection with nothing in flight and no bytes for this is closed."""
    max_request_frame: int = MAX_REQUEST_FRAME
    read_budget: int = 32 << 20
    """Bytes that partly received frames above 64 KiB may hold on all connections
    together; a large frame beyond it is refused with BUSY."""

    @classmethod
    def from_config(cls, config: Any) -> ApiLimits:
        base = cls()
        return cls(
            max_connections=int(getattr(config, "api_max_connections", base.max_connections)),
            frame_timeout=float(getattr(config, "api_frame_timeout", base.frame_timeout)),
            idle_timeout=float(getattr(config, "api_idle_timeout", base.idle_timeout)),
            read_budget=int(getattr(config, "api_read_budget", base.read_budget)),
        )


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    handler: Handler
    summary: str
    cancel_on_disconnect: bool = True
    module: str = ""


_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")


class Router:
    """A set of ops and stream kinds; routers merge with `include`."""

    def __init__(self) -> None:
        self.ops: dict[str, OpSpec] = {}
        self.streams: dict[str, StreamHandler] = {}

    def op(self, name: str, *, cancel_on_disconnect: bool = True,
           summary: str | None = None) -> Callable[[Handler], Handler]:
        """Register ``async def h(ctx, args)`` as op `name`.

        cancel_on_disconnect=False keeps the op running when its caller goes away
        (e.g. a teleport must finish or roll back on its own; its events are dropped).
        """
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad op name {name!r}")

        def deco(fn: Handler) -> Handler:
            if not asyncio.iscoroutinefunction(fn):
                raise TypeError(f"op {name}: handler must be `async def`")
            if name in self.ops:
                raise ValueError(f"op {name!r} registered twice")
            doc = summary or next(iter((fn.__doc__ or "").strip().splitlines()), "")
            self.ops[name] = OpSpec(name, fn, doc, cancel_on_disconnect, fn.__module__)
            return fn

        return deco

    def stream(self, kind: str) -> Callable[[StreamHandler], StreamHandler]:
        """Register ``async def h(stream, args)`` as the receiving side of the peer-mesh
        bulk stream `kind` (what a peer's ``open_stream(node, kind, args)`` reaches).

        The handler refuses by raising ProtoError before writing anything, or accepts
        with ``await stream.write_frame({"ok": True, ...})`` and then owns the stream.
        """
        if not _NAME.fullmatch(kind):
            raise ValueError(f"bad stream kind {kind!r}")

        def deco(fn: StreamHandler) -> StreamHandler:
            if not asyncio.iscoroutinefunction(fn):
                raise TypeError(f"stream {kind}: handler must be `async def`")
            if kind in self.streams:
                raise ValueError(f"stream kind {kind!r} registered twice")
            self.streams[kind] = fn
            return fn

        return deco

    def include(self, other: Router) -> None:
        for name, spec in other.ops.items():
            if name in self.ops:
                raise ValueError(f"op {name!r} defined by both {self.ops[name].module} and "
                                 f"{spec.module}")
            self.ops[name] = spec
        for kind, fn in other.streams.items():
            if kind in self.streams:
                raise ValueError(f"stream kind {kind!r} defined by both "
                                 f"{self.streams[kind].__module__} and {fn.__module__}")
            self.streams[kind] = fn


# --------------------------------------------------------------------------- arguments

_REQUIRED: Any = object()
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def show(v: Any) -> str:
    """A bounded repr for error messages: a hostile value (deep, huge) stays short."""
    return _REPR.repr(v)


def _bad(key: str, why: str) -> ProtoError:
    return ProtoError(ErrorCode.INVALID_ARGUMENT, f"argument {show(key)} {why}", {"arg": key})


# Args has getters named after builtins (str, int, float, bool, list, ...), which
# shadow them in its class body: its annotations use these aliases instead.
_str: TypeAlias = builtins.str
_int: TypeAlias = builtins.int
_float: TypeAlias = builtins.float
_bool: TypeAlias = builtins.bool
_list: TypeAlias = builtins.list


class Args(Mapping[str, Any]):
    """A request's args with typed getters that raise INVALID_ARGUMENT, never KeyError.

    ``args.str("image")`` is required; pass ``default=`` to make a key optional.
    Call ``args.reject_unknown()`` after reading to refuse typos like ``--memroy``.
    Strings read by a getter never hold NUL (nothing downstream — paths, argv, names,
    runc, iptables — can carry one) and patterns must match the whole string.
    """

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = raw
        self._seen: set[_str] = set()

    def __getitem__(self, key: _str) -> Any:
        return self._raw[key]

    def __iter__(self) -> Iterator[_str]:
        return iter(self._raw)

    def __len__(self) -> _int:
        return len(self._raw)

    def _get(self, key: _str, default: Any) -> tuple[_bool, Any]:
        self._seen.add(key)
        if key not in self._raw or self._raw[key] is None:
            if default is _REQUIRED:
                raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"missing argument {key!r}",
                                 {"arg": key})
            return False, default
        return True, self._raw[key]

    def str(self, key: _str, default: Any = _REQUIRED, *, pattern: _str | None = None,
            choices: tuple[_str, ...] | _list[_str] | None = None,
            max_len: _int = 4096) -> Any:
        have, v = self._get(key, default)
        if not have:
            return v
        if not isinstance(v, str):
            raise _bad(key, f"must be a string, got {type(v).__name__}")
        if len(v) > max_len:
            raise _bad(key, f"is longer than {max_len} characters")
        if "\0" in v:
            raise _bad(key, "must not contain NUL characters")
        if pattern is not None and not re.fullmatch(pattern, v):
            raise _bad(key, f"must match {pattern}, got {show(v)}")
        if choices is not None and v not in choices:
            raise _bad(key, f"must be one of {', '.join(choices)}; got {show(v)}")
        return v

    def bytes(self, key: _str, default: Any = _REQUIRED, *, max_len: _int = 8 << 20) -> Any:
        """A msgpack bin (str is accepted too, as UTF-8: scripts without a bin type)."""
        have, v = self._get(key, default)
        if not have:
            return v
        if isinstance(v, str):
            v = v.encode()
        if not isinstance(v, (bytes, bytearray)):
            raise _bad(key, f"must be bytes, got {type(v).__name__}")
        if len(v) > max_len:
            raise _bad(key, f"is longer than {max_len} bytes")
        return builtins.bytes(v)

    def name(self, key: _str = "name", default: Any = _REQUIRED) -> Any:
        """A cnvm/host name: a DNS label (lowercase letters, digits, '-', max 63)."""
        have, v = self._get(key, default)
        if not have:
            return v
        if not isinstance(v, str) or not _DNS_LABEL.fullmatch(v):
            raise _bad(key, f"must be a DNS label (a-z, 0-9, '-', 1-63 chars), got {show(v)}")
        return v

    def int(self, key: _str, default: Any = _REQUIRED, *, min: _int | None = None,
            max: _int | None = None) -> Any:
        have, v = self._get(key, default)
        if not have:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(key, f"must be an integer, got {type(v).__name__}")
        if min is not None and v < min:
            raise _bad(key, f"must be >= {min}, got {v}")
        if max is not None and v > max:
            raise _bad(key, f"must be <= {max}, got {v}")
        return v

    def float(self, key: _str, default: Any = _REQUIRED, *, min: _float | None = None,
              max: _float | None = None) -> Any:
        have, v = self._get(key, default)
        if not have:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _bad(key, f"must be a number, got {type(v).__name__}")
        if min is not None and v < min:
            raise _bad(key, f"must be >= {min}, got {v}")
        if max is not None and v > max:
            raise _bad(key, f"must be <= {max}, got {v}")
        return float(v)

    def bool(self, key: _str, default: Any = _REQUIRED) -> Any:
        have, v = self._get(key, default)
        if have and not isinstance(v, bool):
            raise _bad(key, f"must be true or false, got {type(v).__name__}")
        return v

    def list(self, key: _str, default: Any = _REQUIRED, *, of: type = builtins.str,
             max_items: _int = 4096, max_len: _int = 4096) -> Any:
        """A list of `of`; strings in it obey the rules of `str` (NUL, `max_len`)."""
        have, v = self._get(key, default)
        if not have:
            return v
        if not isinstance(v, list) or not all(isinstance(x, of) for x in v):
            raise _bad(key, f"must be a list of {of.__name__}")
        if len(v) > max_items:
            raise _bad(key, f"has more than {max_items} items")
        for x in v:
            if isinstance(x, str):
                if len(x) > max_len:
                    raise _bad(key, f"has an item longer than {max_len} characters")
                if "\0" in x:
                    raise _bad(key, "must not contain NUL characters")
        return v

    def argv(self, key: _str, default: Any = _REQUIRED, *, max_items: _int = 4096,
             max_arg: _int = MAX_ARG_BYTES, max_total: _int = MAX_ARGV_BYTES) -> Any:
        """A process argv or env list: strings without NUL, each at most `max_arg` bytes
        of UTF-8 and `max_total` together, so what execve() (via runc) would refuse is
        INVALID_ARGUMENT here, not a failure deep inside."""
        have, v = self._get(key, default)
        if not have:
            return v
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _bad(key, "must be a list of strings")
        if len(v) > max_items:
            raise _bad(key, f"has more than {max_items} items")
        total = 0
        for x in v:
            if "\0" in x:
                raise _bad(key, "must not contain NUL characters")
            try:
                n = len(x.encode())
            except UnicodeEncodeError:  # lone surrogates cannot reach a process
                raise _bad(key, "must be valid Unicode text") from None
            if n > max_arg:
                raise _bad(key, f"has an item longer than {max_arg} bytes")
            total += n + 1
        if total > max_total:
            raise _bad(key, f"is longer than {max_total} bytes in all")
        return v

    def map(self, key: _str, default: Any = _REQUIRED) -> Any:
        have, v = self._get(key, default)
        if have and not isinstance(v, dict):
            raise _bad(key, f"must be a map, got {type(v).__name__}")
        return v

    def reject_unknown(self) -> None:
        extra = sorted(set(self._raw) - self._seen)
        if extra:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             f"unknown argument{'s' if len(extra) > 1 else ''}: "
                             + ", ".join(map(show, extra[:20])), {"args": extra[:100]})


# --------------------------------------------------------------------------- context


class PeerCred(NamedTuple):
    pid: int
    uid: int
    gid: int


class Context:
    """What a handler gets besides its args: who asked, and a way to stream events.

    A Session makes one per request (``node`` is the calling member on a peer's RPC
    channel, None for a local API client). `Context.local` is for an in-process call
    without a Session (events go to a callback); `nested` runs another op inside this
    request (peer.forward): its events are this request's events and it ends with it.
    """

    __slots__ = ("_on_event", "_parent", "daemon", "finished", "log", "node", "op", "peer",
                 "request_id", "session")

    def __init__(self, session: Session | None, request_id: Any, op: str, *,
                 daemon: Any = None, node: str | None = None,
                 on_event: EventSink | None = None, parent: Context | None = None) -> None:
        self.session = session
        self.daemon: Daemon = session.daemon if session is not None else daemon
        self.node: str | None = session.node if session is not None else node
        """The peer-mesh member that asked; None for a local API client."""
        self.peer = session.peer if session is not None else None
        self.request_id = request_id
        self.op = op
        self.log = log
        self.finished = False  # set once the res was sent: later events are dropped
        self._on_event = on_event
        self._parent = parent

    @classmethod
    def local(cls, op: str, *, daemon: Any = None, node: str | None = None,
              on_event: EventSink | None = None) -> Context:
        """A Context for running `op` in-process (see `dispatch`); events → `on_event`."""
        return cls(None, None, op, daemon=daemon, node=node, on_event=on_event)

    def nested(self, op: str) -> Context:
        """A Context for `op` run within this request: same caller, same event stream."""
        return Context(self.session, self.request_id, op, daemon=self.daemon, node=self.node,
                       on_event=self._on_event, parent=self)

    def _ended(self) -> bool:
        return (self.finished or (self.session is not None and self.session.closed)
                or (self._parent is not None and self._parent._ended()))

    @property
    def connected(self) -> bool:
        """False once the caller went away (events are then dropped)."""
        return not self._ended()

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an ``evt`` for this request; never blocks (see `drain`)."""
        if self._ended():
            return
        if self.session is not None:
            self.session.send({"t": "evt", "id": self.request_id, "event": event,
                               "data": data or {}})
        elif self._on_event is not None:
            try:
                self._on_event(event, data or {})
            except Exception:
                log.exception("event callback of %s failed", self.op)

    def progress(self, phase: str, *, done: int | None = None, total: int | None = None,
                 unit: str | None = None, **extra: Any) -> None:
        """Emit a ``progress`` event (proto.messages.ProgressData) for cnvmctl's bar."""
        data: dict[str, Any] = {"phase": phase, **extra}
        if done is not None:
            data["done"] = done
        if total is not None:
            data["total"] = total
        if unit is not None:
            data["unit"] = unit
        self.emit(EVT_PROGRESS, data)

    async def drain(self) -> None:
        """Wait until the caller has read what we sent (use in tight emit loops)."""
        if self.session is not None:
            await self.session.drain()


# --------------------------------------------------------------------------- running ops


def unknown_op(router: Router, op: str) -> ProtoError:
    return ProtoError(ErrorCode.UNKNOWN_OP, f"unknown op {show(op)}", {"ops": sorted(router.ops)})


async def run_op(spec: OpSpec, ctx: Context, args: Mapping[str, Any]) -> Any:
    """Run one op's handler: its result, or a ProtoError (the handler's own, or INTERNAL
    for any other exception, logged). CancelledError propagates; what it means (client
    cancel, shutdown) is the Session's to say. The one place handlers are called."""
    try:
        return await spec.handler(ctx, args if isinstance(args, Args) else Args(dict(args)))
    except (ProtoError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("op %s failed", spec.name, extra={"op": spec.name, "node": ctx.node})
        raise ProtoError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc


async def dispatch(router: Router, ctx: Context, op: str, args: Mapping[str, Any]) -> Any:
    """Run `op` of `router` within `ctx` outside a request of its own: an in-process call
    (`Context.local`) or an API op run for a peer (``ctx.nested(op)``). Unknown op →
    UNKNOWN_OP; errors as `run_op`.

    An op declared ``cancel_on_disconnect=False`` keeps running when ctx's caller goes
    away, as it would as a request of its own; an explicit cancel still reaches it.
    """
    spec = router.ops.get(op)
    if spec is None:
        raise unknown_op(router, op)
    session = ctx.session
    if spec.cancel_on_disconnect or session is None:
        return await run_op(spec, ctx, args)
    task = asyncio.ensure_future(run_op(spec, ctx, args))
    session.track(task)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if ctx.connected:  # cancelled by the caller (or shutdown), not by a disconnect
            task.cancel()
            await asyncio.wait({task})
        raise


# --------------------------------------------------------------------------- sessions


def _wire_default(obj: Any) -> Any:
    """Let handlers return paths, enums, sets and dataclasses without converting."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


_HEADER = struct.Struct(">I")


def encode(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True, default=_wire_default)
    if len(body) > MAX_FRAME:
        raise FrameError(f"reply of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


assert HEADER_SIZE == _HEADER.size


class Session:
    """One client connection's protocol state, independent of the transport.

    The transport calls `feed(bytes)` and `lost()`; the session calls `write` and
    `close` it was given. Framing errors close the connection (a length-prefixed
    stream cannot be resynchronised); envelope errors only fail that request.
    """

    def __init__(self, router: Router, daemon: Any, write: Callable[[bytes], None],
                 close: Callable[[], None], *, peer: PeerCred | None = None,
                 buffered: Callable[[], int] = lambda: 0,
                 tasks: set[asyncio.Task[Any]] | None = None, greeted: bool = False,
                 node: str | None = None,
                 drain: Callable[[], Awaitable[None]] | None = None,
                 max_frame: int = MAX_FRAME, limits: DecodeLimits | None = None,
                 budget: FrameBudget | None = None) -> None:
        """`greeted`: the transport already authenticated the caller (peer mesh): no
        hello. `node`: the calling member (``ctx.node``). `drain`: the transport's own
        flow control, if it has no pause/resume_writing callbacks (SSH channels).
        `max_frame`, `limits`, `budget`: what a caller may make us buffer and decode
        (see proto.framing); before the hello, frames are at most HELLO_MAX_FRAME."""
        self.router = router
        self.daemon = daemon
        self.peer = peer
        self.node = node
        self._write = write
        self._close = close
        self._buffered = buffered
        self._drain = drain
        self._max_frame = max_frame
        kw: dict[str, Any] = {"budget": budget}
        if limits is not None:
            kw["limits"] = limits
        self._decoder = FrameDecoder(max_frame if greeted else min(max_frame, HELLO_MAX_FRAME),
                                     **kw)
        self.last_active = time.monotonic()
        """When the caller last sent a byte or a request of it ended (idle timeout)."""
        self._inflight: dict[Any, tuple[asyncio.Task[Any], OpSpec]] = {}
        self._all_tasks = tasks if tasks is not None else set()
        self._greeted = greeted
        self._drained = asyncio.Event()
        self._drained.set()
        self.closed = False
        self.agent = ""
        self.shutting_down = False

    # -- transport side
    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        try:
            for f in self._decoder.feed_iter(data):
                self._frame(f)
                if self.closed:
                    return
        except FrameBusy as exc:
            self._fatal(ErrorCode.BUSY, str(exc))
        except FrameError as exc:
            self._fatal(ErrorCode.BAD_FRAME, str(exc))

    def expire(self, now: float, frame_timeout: float, idle_timeout: float) -> None:
        """Close a greeted connection whose frame is overdue or that sat idle too long
        (a partly sent frame holds a buffer; an idle one holds a connection slot)."""
        if self.closed or not self._greeted:
            return
        since = self._decoder.partial_since
        if since is not None:
            if now - since > frame_timeout:
                self._fatal(ErrorCode.BAD_FRAME,
                            f"frame not completed within {frame_timeout:g}s")
        elif not self._inflight and now - self.last_active > idle_timeout:
            self._fatal(ErrorCode.UNAVAILABLE, f"connection idle for {idle_timeout:g}s")

    def lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._decoder.close()
        self._drained.set()
        for task, spec in list(self._inflight.values()):
            if spec.cancel_on_disconnect:
                task.cancel()

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    async def drain(self) -> None:
        await self._drained.wait()
        if self._drain is not None and not self.closed:
            await self._drain()

    def track(self, task: asyncio.Task[Any]) -> None:
        """Count `task` among this session's (the server cancels them at shutdown)."""
        self._all_tasks.add(task)
        task.add_done_callback(self._all_tasks.discard)

    # -- protocol
    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        self._write(encode(msg))
        if self._buffered() > MAX_WRITE_BUFFER:
            log.warning("closing connection: client does not read its replies",
                        extra={"agent": self.agent, "node": self.node,
                               "peer_pid": self.peer and self.peer.pid})
            self.close()

    def close(self) -> None:
        if not self.closed:
            self._close()
            self.lost()

    def _fatal(self, code: ErrorCode, message: str) -> None:
        log.info("closing connection: %s", message,
                 extra={"code": str(code), "agent": self.agent, "node": self.node,
                        "peer_pid": self.peer and self.peer.pid})
        try:
            self.send(error_response(None, ProtoError(code, message)))
        finally:
            self.close()

    def _frame(self, obj: dict[str, Any]) -> None:
        try:
            msg = parse_client_frame(obj)
        except ProtoError as exc:
            rid = exc.details.pop("id", None)
            if not self._greeted:
                self._fatal(ErrorCode.BAD_REQUEST, f"expected a hello frame first: {exc.message}")
            else:
                self.send(error_response(rid, exc))
            return
        if not self._greeted:
            if not isinstance(msg, Hello):
                self._fatal(ErrorCode.BAD_REQUEST, "the first frame must be a hello")
                return
            try:
                version = negotiate(msg.proto)
            except ProtoError as exc:
                log.info("refusing client: %s", exc.message, extra={"agent": msg.agent})
                try:
                    self.send(error_response(None, exc))
                finally:
                    self.close()
                return
            self._greeted = True
            self._decoder.max_frame = self._max_frame
            self.agent = msg.agent[:100]
            self.send(self.daemon.hello_reply(version))
            return
        if isinstance(msg, Request):
            self._request(msg)
        elif isinstance(msg, Cancel):
            entry = self._inflight.get(msg.id)
            if entry is not None:
                entry[0].cancel()
        else:
            self.send(error_response(None, ProtoError(ErrorCode.BAD_REQUEST,
                                                      "hello was already exchanged")))

    def _request(self, req: Request) -> None:
        if req.id in self._inflight:
            self.send(error_response(None, ProtoError(
                ErrorCode.BAD_REQUEST, f"request id {req.id!r} is already in flight",
                {"id": req.id})))
            return
        spec = self.router.ops.get(req.op)
        if spec is None:
            self.send(error_response(req.id, unknown_op(self.router, req.op)))
            return
        if self.shutting_down:
            self.send(error_response(req.id, ProtoError(ErrorCode.UNAVAILABLE,
                                                        "cnvmd is shutting down")))
            return
        if len(self._inflight) >= MAX_INFLIGHT:
            self.send(error_response(req.id, ProtoError(
                ErrorCode.BUSY, f"more than {MAX_INFLIGHT} requests in flight")))
            return
        task = asyncio.get_running_loop().create_task(self._run(req, spec))
        self._inflight[req.id] = (task, spec)
        self.track(task)
        rid = req.id

        def done(t: asyncio.Task[None]) -> None:
            self._task_done(rid, t)

        task.add_done_callback(done)

    def _cancel_error(self) -> ProtoError:
        if self.shutting_down:
            return ProtoError(ErrorCode.UNAVAILABLE, "cnvmd is shutting down")
        return ProtoError(ErrorCode.CANCELLED, "cancelled by the client")

    def _task_done(self, rid: Any, task: asyncio.Task[Any]) -> None:
        """A task cancelled before it ever ran never enters _run: answer for it here."""
        entry = self._inflight.get(rid)
        if entry is not None and entry[0] is task:
            del self._inflight[rid]
            self.last_active = time.monotonic()
            if not self.closed:
                self._write(encode(error_response(rid, self._cancel_error())))

    async def _run(self, req: Request, spec: OpSpec) -> None:
        t0 = time.perf_counter()
        ctx = Context(self, req.id, req.op)
        outcome = "ok"
        try:
            msg: dict[str, Any]
            try:
                result = await run_op(spec, ctx, req.args)
                msg = {"t": "res", "id": req.id, "ok": True, "result": result}
            except ProtoError as exc:
                outcome = str(exc.code)
                msg = error_response(req.id, exc)
            except asyncio.CancelledError:
                outcome = "cancelled"
                msg = error_response(req.id, self._cancel_error())
            try:
                reply = encode(msg)
            except Exception as exc:  # result (or error details) not serialisable / too big
                outcome = "internal"
                log.error("op %s: cannot encode its reply", req.op,
                          extra={"op": req.op, "error": str(exc)})
                reply = encode(error_response(req.id, ProtoError(
                    ErrorCode.INTERNAL, f"op {req.op} produced an unsendable reply: {exc}")))
            ctx.finished = True
            if not self.closed:
                self._write(reply)
        finally:
            self._inflight.pop(req.id, None)
            self.last_active = time.monotonic()
            metrics_hooks.observe_request(self.daemon, req.op, outcome,
                                          time.perf_counter() - t0, self.node)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request", extra={"op": req.op, "outcome": outcome, "node": self.node,
                                            "ms": round((time.perf_counter() - t0) * 1e3, 3)})


# --------------------------------------------------------------------------- unix server


class _UnixProtocol(asyncio.Protocol):
    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self.session: Session | None = None
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: duck-typed.
        self.transport = transport
        server = self.server
        lim = server.limits
        peer = _peercred(transport)
        self._lingering = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self.session = Session(
            server.router, server.daemon, transport.write, self._close_lingering,
            peer=peer, buffered=transport.get_write_buffer_size,
            tasks=server.tasks, max_frame=lim.max_request_frame, limits=API_DECODE_LIMITS,
            budget=server.budget)
        # root keeps a reserve of slots: group members cannot lock the operator out
        cap = lim.max_connections - (0 if peer is not None and peer.uid == 0
                                     else lim.root_reserve)
        if len(server.sessions) >= cap:
            self.session._fatal(ErrorCode.BUSY, f"too many connections ({len(server.sessions)} "
                                f"open, limit {cap}); retry later")
            return
        server.sessions.add(self.session)
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._no_hello)

    def _close_lingering(self) -> None:
        """Shut our write side (after the queued error frame) and close once the client
        has closed, LINGER_SECONDS have passed or LINGER_BYTES arrived (bounded, as
        anything before authentication must be)."""
        t = self.transport
        if t.is_closing() or self._linger_timer is not None:
            return
        try:
            t.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            t.close()
            return
        self._lingering = 1
        self._linger_timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, t.close)

    def _no_hello(self) -> None:
        if self.session is not None and not self.session._greeted:
            self.session._fatal(ErrorCode.BAD_REQUEST, f"no hello within {HELLO_TIMEOUT:g}s")

    def data_received(self, data: bytes) -> None:
        assert self.session is not None
        if self._lingering:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        self.session.feed(data)
        if self.session._greeted and self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def eof_received(self) -> bool:
        return False  # half-close from the client: we close too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self.session is not None:
            self.session.lost()
            self.server.sessions.discard(self.session)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()


def _peercred(transport: asyncio.BaseTransport) -> PeerCred | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return PeerCred(*struct.unpack("3i", raw))
    except OSError:
        return None


class SocketInUse(Exception):
    """Another live daemon already answers on the socket path."""


class ApiServer:
    """Serves a Router on a Unix socket (mode 0660, group `cnvm` when it exists).

    `limits` (default: from ``daemon.config``) bound what clients can hold: connections,
    partial frames (size, time, a budget shared by all connections), idle time."""

    def __init__(self, router: Router, daemon: Any, limits: ApiLimits | None = None) -> None:
        self.router = router
        self.daemon = daemon
        self.limits = limits or ApiLimits.from_config(getattr(daemon, "config", None))
        self.budget = FrameBudget(self.limits.read_budget)
        self._sweeper: asyncio.Task[None] | None = None
        self.sessions: set[Session] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.path: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._desc: dict[str, Any] = {}
        self._inode: int | None = None

    async def start(self, path: Path, *, mode: int = 0o660, group: str | None = "cnvm") -> None:
        """bind() then serve()."""
        await self.bind(path, mode=mode, group=group)
        await self.serve()

    async def bind(self, path: Path, *, mode: int = 0o660, group: str | None = "cnvm") -> None:
        """Claim the socket path (refusing a live daemon's) without accepting yet.

        The daemon binds first, then runs the subsystems' startup hooks, then serves:
        a second daemon on the same socket fails before touching anything.
        """
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~mode)  # no window in which the socket is wider than `mode`
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, mode)
        gid = api_group_id(group)
        if gid is not None:
            os.chown(path, -1, gid)
        self._inode = os.stat(path).st_ino
        self.path = path
        sock.listen(256)
        sock.setblocking(False)
        self._sock = sock
        self._desc = {"socket": str(path), "mode": oct(mode),
                      "group": group if gid is not None else None}

    async def serve(self) -> None:
        """Start accepting connections on the bound socket."""
        assert self._sock is not None, "bind() first"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _UnixProtocol(self), sock=self._sock)
        self._sweeper = loop.create_task(self._sweep())
        log.info("listening", extra={**self._desc, "ops": len(self.router.ops)})

    async def _sweep(self) -> None:
        """Close connections past their frame or idle deadline (one timer for all)."""
        lim = self.limits
        tick = max(0.05, min(1.0, lim.frame_timeout / 4, lim.idle_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for s in list(self.sessions):
                try:
                    s.expire(now, lim.frame_timeout, lim.idle_timeout)
                except Exception:  # one bad session must not stop the sweep
                    log.exception("expiring a connection failed")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, cancel in-flight requests (they reply UNAVAILABLE), close."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        for s in list(self.sessions):
            s.shutting_down = True
        pending = [t for t in self.tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            if still:
                log.warning("requests did not finish within the grace period",
                            extra={"count": len(still)})
        for s in list(self.sessions):
            s.close()
        self._unlink()

    def _unlink(self) -> None:
        """Remove our socket file, unless another daemon has replaced it meanwhile."""
        if self.path is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def api_group_id(group: str | None) -> int | None:
    """The gid of the API socket's group, None when there is no such group."""
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


async def _clear_stale_socket(path: Path) -> None:
    """Remove a dead daemon's socket; refuse to steal a live one's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or pick another path")
    try:
        _, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise SocketInUse(f"cannot check {path}: {exc}") from None
    except TimeoutError:
        raise SocketInUse(f"{path} accepts connections but does not answer") from None
    w.close()
    raise SocketInUse(f"another cnvmd is already listening on {path}")
