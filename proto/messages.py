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
from typing import Any

PROTOCOL_VERSION = 1


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
            return cls(ErrorCode.INTERNAL, f"malformed error object: {err!r}")
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


def error_response(req_id: int | None, err: ProtoError) -> dict[str, Any]:
    return {"t": "res", "id": req_id, "ok": False, "error": err.to_wire()}


def event(req_id: int, name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"t": "evt", "id": req_id, "event": name, "data": data or {}}


def cancel(req_id: int) -> dict[str, Any]:
    return {"t": "cancel", "id": req_id}
