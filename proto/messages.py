"""Message envelopes and error codes.

Every frame is a map with a type key ``t``:

- ``hello``  ``{t, proto, agent}`` first frame in each direction; the server's
  reply also carries ``node`` and ``version``.
- ``req``    ``{t, id, op, args}`` a request; ``id`` is chosen by the client and is
  unique among its in-flight requests, so one connection carries many at once.
- ``evt``    ``{t, id, event, data}`` an event streamed for request ``id`` (progress).
- ``res``    ``{t, id, ok: true, result}`` or ``{t, id, ok: false, error: {code,
  message, details}}``; ends request ``id``.
- ``cancel`` ``{t, id}`` asks the server to abandon request ``id``.

Error codes are stable strings (never renumbered) so scripts can branch on them.
"""

from __future__ import annotations

import enum
import reprlib
from dataclasses import dataclass
from typing import Any, TypedDict, TypeGuard

PROTOCOL_VERSION = 1

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def show(v: object) -> str:
    """A bounded repr for error messages about values a peer sent (any size or depth)."""
    return _REPR.repr(v)


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    INVALID_ARGUMENT = "invalid_argument"
    CONFLICT = "conflict"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    PERMISSION_DENIED = "permission_denied"
    FAILED = "failed"
    INTERNAL = "internal"


class ProtoError(Exception):
    """An error that travels to the peer as a ``res`` with ``ok: false``."""

    def __init__(
        self, code: ErrorCode | str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.message = message
        self.details = details or {}

    def to_wire(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.details:
            err["details"] = self.details
        return err

    @classmethod
    def from_wire(cls, err: Any) -> ProtoError:
        if not isinstance(err, dict):
            return cls(ErrorCode.INTERNAL, f"malformed error object: {show(err)}")
        return cls(
            str(err.get("code", ErrorCode.INTERNAL)),
            str(err.get("message", "unknown error")),
            err.get("details") if isinstance(err.get("details"), dict) else None,
        )

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def hello(agent: str, **extra: Any) -> dict[str, Any]:
    return {"t": "hello", "proto": PROTOCOL_VERSION, "agent": agent, **extra}


def request(req_id: int, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"t": "req", "id": req_id, "op": op, "args": args or {}}


def response(req_id: int, result: Any = None) -> dict[str, Any]:
    return {"t": "res", "id": req_id, "ok": True, "result": result}


def error_response(req_id: int | str | None, err: ProtoError) -> dict[str, Any]:
    return {"t": "res", "id": req_id, "ok": False, "error": err.to_wire()}


def event(req_id: int, name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"t": "evt", "id": req_id, "event": name, "data": data or {}}


def cancel(req_id: int) -> dict[str, Any]:
    return {"t": "cancel", "id": req_id}


# --------------------------------------------------------------------------
# Additions for the daemon API (issue 3): version negotiation, envelope
# validation shared by every server and client, event names, and light typed
# shapes of the core ops' results. Validation lives here (not in the server) so
# the peer protocol and any other transport reject the same inputs the same way.

MIN_PROTOCOL_VERSION = 1
"""Oldest protocol version a server still accepts in a client's hello."""

MAX_ID_LEN = 64
"""Longest string request id accepted (integer ids are any int64)."""

EVT_PROGRESS = "progress"
"""Progress event; data is a ProgressData map. cnvmctl's progress bar draws these."""

EVT_LOG = "log"
"""Free-text line for the operator; data is ``{level, message}``."""


def negotiate(client_proto: Any) -> int:
    """The version a server speaks with a client that announced ``client_proto``.

    The client announces the highest version it speaks; the server answers with
    min(client, server). Anything older than MIN_PROTOCOL_VERSION is refused.
    """
    if not isinstance(client_proto, int) or isinstance(client_proto, bool):
        raise ProtoError(ErrorCode.UNSUPPORTED_VERSION,
                         f"hello.proto must be an integer, got {show(client_proto)}")
    if client_proto < MIN_PROTOCOL_VERSION:
        raise ProtoError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {client_proto} is not supported; this daemon speaks "
            f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}",
            {"min": MIN_PROTOCOL_VERSION, "max": PROTOCOL_VERSION},
        )
    return min(client_proto, PROTOCOL_VERSION)


def valid_id(req_id: object) -> TypeGuard[int | str]:
    """Request ids are int64 integers or short strings (scripts may prefer strings)."""
    if isinstance(req_id, bool):
        return False
    if isinstance(req_id, int):
        return -(2**63) <= req_id < 2**63
    return isinstance(req_id, str) and 0 < len(req_id) <= MAX_ID_LEN


@dataclass(frozen=True, slots=True)
class Hello:
    proto: Any
    agent: str
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str
    op: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Cancel:
    id: int | str


def parse_client_frame(obj: dict[str, Any]) -> Hello | Request | Cancel:
    """Validate one decoded frame sent by a client.

    Raises ProtoError(BAD_REQUEST) whose ``details["id"]`` carries the request id
    when one could be read, so the server can address its error reply.
    """
    t = obj.get("t")
    if t == "req":
        rid = obj.get("id")
        if not valid_id(rid):
            raise ProtoError(ErrorCode.BAD_REQUEST,
                             "req.id must be an int64 or a string of 1..64 characters")
        op = obj.get("op")
        if not isinstance(op, str) or not op:
            raise ProtoError(ErrorCode.BAD_REQUEST, "req.op must be a non-empty string",
                             {"id": rid})
        args = obj.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ProtoError(ErrorCode.BAD_REQUEST,
                             f"req.args must be a map, got {type(args).__name__}", {"id": rid})
        return Request(rid, op, args)
    if t == "cancel":
        rid = obj.get("id")
        if not valid_id(rid):
            raise ProtoError(ErrorCode.BAD_REQUEST, "cancel.id must be a valid request id")
        return Cancel(rid)
    if t == "hello":
        agent = obj.get("agent", "")
        extra = {k: v for k, v in obj.items() if k not in ("t", "proto", "agent")}
        return Hello(obj.get("proto"), agent if isinstance(agent, str) else repr(agent), extra)
    raise ProtoError(ErrorCode.BAD_REQUEST, f"unknown frame type t={show(t)}")


# ---- typed shapes (documentation for plug-in authors; not enforced on the wire)


class ProgressData(TypedDict, total=False):
    """``evt`` data for EVT_PROGRESS. Every key is optional."""

    phase: str  # short phase name: "dump", "transfer", "restore", ...
    done: int  # units done in this phase
    total: int  # units in this phase, when known
    unit: str  # "bytes" (rendered as sizes/rates) or anything else (plain counts)
    round: int  # iteration number for iterative phases (pre-copy rounds)
    message: str  # one human line


class CnvmSummary(TypedDict, total=False):
    """One row of ``ls`` (and the core of ``inspect``)."""

    name: str
    state: str  # runc status (running/paused/stopped/created), or "missing"
    pid: int | None
    managed: bool  # a cnvm record exists (False: found in our runc root only)
    adopted: bool  # already running when this daemon started; it took it over
    image: str | None
    ip: str | None
    memory: int | None  # memory limit in bytes (None: unlimited)
    node: str
    created: str | None  # runc's creation time (RFC 3339)
    uptime: float | None  # seconds since creation while running
    restart: str  # restart policy: no | always | on-failure[:N]
    restarts: int  # restarts made by the policy since the last deploy/start
    exit_code: int | None  # of the last exit of its init (None: unknown or none yet)
    exited_at: float | None  # epoch seconds of that exit


class StatusResult(TypedDict, total=False):
    node: str
    versions: dict[str, str | None]  # cnvmd, runc, criu, kernel, python, protocol
    capabilities: dict[str, Any]  # Capabilities.to_dict() plus "error" if probing failed
    paths: dict[str, str]
    pid: int
    started: float  # unix time
    uptime: float
    ops: list[str]
