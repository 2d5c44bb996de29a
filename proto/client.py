"""Async client for the cnvmd Unix-socket API (and any transport speaking proto/).

One connection carries many concurrent requests: each gets an id, its events and
its final ``res`` are routed back by that id. cnvmctl, the tests, the benchmarks
and peer daemons all use this one client so the protocol is spoken one way.

    async with await Client.connect("/run/cnvm/cnvmd.sock") as c:
        st = await c.call("status")                     # simple request
        call = c.start("teleport", {"name": "web", "target": "node3"})
        async for ev in call:                            # streamed events
            print(ev.name, ev.data)
        report = await call                              # result or ProtoError
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, NamedTuple

from proto.framing import MAX_FRAME, FrameDecoder, FrameError, encode_frame
from proto.messages import PROTOCOL_VERSION, ErrorCode, ProtoError, cancel, hello, request


class Disconnected(ProtoError):
    """The connection closed (or could not be opened) before the reply arrived."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


class Event(NamedTuple):
    name: str
    data: dict[str, Any]


EventCallback = Callable[[Event], Any]


class _End(enum.Enum):
    """Queued after a call's last event (a one-member enum: `is _END` narrows the type)."""

    END = enum.auto()


_END = _End.END


def _mark_retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class Call:
    """One in-flight request: await it for the result, iterate it for its events."""

    def __init__(self, client: Client, req_id: int, op: str,
                 on_event: EventCallback | None, queue_events: bool) -> None:
        self.id = req_id
        self.op = op
        self._client = client
        self._on_event = on_event
        self._queue: asyncio.Queue[Event | _End] | None = (
            asyncio.Queue() if queue_events else None)
        self._fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Awaiting goes through shield(): a caller cancelled (Ctrl-C) never reads the
        # error the closing connection sets later. Mark it read: no asyncio noise.
        self._fut.add_done_callback(_mark_retrieved)

    # -- fed by the client's protocol
    def _event(self, ev: Event) -> None:
        if self._on_event is not None:
            self._on_event(ev)
        if self._queue is not None:
            self._queue.put_nowait(ev)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._fut.done():
            return
        if error is not None:
            self._fut.set_exception(error)
        else:
            self._fut.set_result(result)
        if self._queue is not None:
            self._queue.put_nowait(_END)

    # -- public
    @property
    def done(self) -> bool:
        return self._fut.done()

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.shield(self._fut).__await__()

    def __aiter__(self) -> Call:
        if self._queue is None:
            raise TypeError("events of this call are delivered to its callback, not queued")
        return self

    async def __anext__(self) -> Event:
        assert self._queue is not None
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later iterations end at once too
            raise StopAsyncIteration
        return item

    async def cancel(self) -> None:
        """Ask the server to abandon this request; the call then ends with CANCELLED."""
        if not self._fut.done():
            self._client._send(cancel(self.id))


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.decoder = FrameDecoder(client.max_frame)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self.client._lost(f"bad frame from server: {exc}")
            return
        for f in frames:
            self.client._frame(f)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(f"connection closed{f': {exc}' if exc else ''}")


class Client:
    """A connection to a cnvm API server; create with `await Client.connect(path)`."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.server: dict[str, Any] = {}  # the server's hello (node, version, proto)
        self._transport: asyncio.WriteTransport | None = None
        self._ids = itertools.count(1)
        self._calls: dict[Any, Call] = {}
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._closed_reason: str | None = None
        self._server_error: ProtoError | None = None

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, agent: str = "proto.client",
                      timeout: float = 5.0, max_frame: int = MAX_FRAME) -> Client:
        """Connect to a Unix socket and exchange hellos.

        Raises Disconnected if the socket cannot be reached, ProtoError if the
        server refuses the hello (e.g. UNSUPPORTED_VERSION).
        """
        self = cls(max_frame)
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        try:
            await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Protocol(self), str(Path(path))), timeout)
        except (OSError, TimeoutError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise Disconnected(f"cannot connect to {path}: {why or 'timed out'}") from None
        self._send(hello(agent))
        try:
            self.server = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            self.close()
            raise Disconnected(f"no hello from {path} within {timeout:g}s") from None
        return self

    # -- requests
    def start(self, op: str, args: dict[str, Any] | None = None, *,
              on_event: EventCallback | None = None) -> Call:
        """Send a request now; returns its Call (iterate for events unless on_event given)."""
        if self._closed_reason is not None:
            raise self._disconnected()
        req_id = next(self._ids)
        call = Call(self, req_id, op, on_event, queue_events=on_event is None)
        self._calls[req_id] = call
        self._send(request(req_id, op, args))
        return call

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   on_event: EventCallback | None = None, timeout: float | None = None) -> Any:
        """Send a request and wait for its result; events go to `on_event` (or are dropped).

        If the waiting task is cancelled (Ctrl-C, timeout) a cancel is sent for the
        request, so the daemon does not keep working for nobody.
        """
        if self._closed_reason is not None:
            raise self._disconnected()
        req_id = next(self._ids)
        call = Call(self, req_id, op, on_event or (lambda ev: None), queue_events=False)
        self._calls[req_id] = call
        self._send(request(req_id, op, args))
        try:
            return await asyncio.wait_for(asyncio.shield(call._fut), timeout)
        except (asyncio.CancelledError, TimeoutError):
            if not call.done and self._closed_reason is None:
                self._send(cancel(req_id))
            raise

    # -- lifecycle
    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def aclose(self) -> None:
        self.close()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    # -- internals
    def _send(self, msg: dict[str, Any]) -> None:
        if self._transport is None or self._transport.is_closing():
            raise self._disconnected()
        self._transport.write(encode_frame(msg, self.max_frame))

    def _disconnected(self) -> ProtoError:
        if self._server_error is not None:
            return self._server_error
        return Disconnected(self._closed_reason or "not connected")

    def _frame(self, f: dict[str, Any]) -> None:
        t = f.get("t")
        if t == "evt":
            call = self._calls.get(f.get("id"))
            if call is not None:
                data = f.get("data")
                call._event(Event(str(f.get("event")), data if isinstance(data, dict) else {}))
        elif t == "res":
            rid = f.get("id")
            call = self._calls.pop(rid, None) if rid is not None else None
            if f.get("ok"):
                if call is not None:
                    call._finish(f.get("result"))
                return
            err = ProtoError.from_wire(f.get("error"))
            if call is not None:
                call._finish(error=err)
            elif rid is None:
                # Connection-level error (bad frame, refused hello): the server closes next.
                self._server_error = err
                if self._hello is not None and not self._hello.done():
                    self._hello.set_exception(err)
        elif t == "hello":
            if self._hello is not None and not self._hello.done():
                v = f.get("proto")
                if not isinstance(v, int) or not 1 <= v <= PROTOCOL_VERSION:
                    self._hello.set_exception(ProtoError(
                        ErrorCode.UNSUPPORTED_VERSION,
                        f"server chose protocol {v!r}; this client speaks 1..{PROTOCOL_VERSION}"))
                else:
                    self._hello.set_result(f)

    def _lost(self, reason: str) -> None:
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        if self._transport is not None:
            self._transport.close()
        err = self._disconnected()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(err)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call._finish(error=err)
