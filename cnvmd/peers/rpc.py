"""Peer RPC: the ``cnvm-rpc`` channel, served by the same engine as the API socket.

Why no dispatcher of its own: a peer op is an ordinary `cnvmd.api.Router` op
(``async def h(ctx, args)``, ``ctx.node`` = the calling member), and each member's
RPC channel is served by an `api.Session` (``greeted=True``: SSH already
authenticated the member). Framing, per-request tasks, events, cancel and error
mapping are therefore the API's, byte for byte. The peer router is not the API
router: a peer reaches API ops only through ``peer.forward``, which runs them with
`api.dispatch` inside the peer request's own Context (its events are the request's
events; cancel and errors behave as for a local client).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import asyncssh
import msgpack

from cnvmd import api
from cnvmd.api import Args, Context, Router
from proto.framing import encode_frame
from proto.messages import ErrorCode, ProtoError, cancel, request

from .transport import SUB_RPC, EventCallback, Transport, channel_drain, channel_writer

if TYPE_CHECKING:
    from .service import PeerService

log = logging.getLogger("cnvmd.peers")

MAX_ECHO = 1 << 20


class Rpc:
    """Serves the node's peer router to members and calls theirs."""

    def __init__(self, svc: PeerService, transport: Transport, router: Router,
                 api_router: Router | None) -> None:
        self.svc = svc
        self.transport = transport
        self.router = router
        self.api_router = api_router
        self._ids = itertools.count(1)
        transport.channels[SUB_RPC] = self.serve
        router.op("peer.ping")(self._ping)
        router.op("peer.nodes")(self._nodes)
        router.op("peer.forward")(self._forward)

    # -- serving -----------------------------------------------------------------------

    async def serve(self, node: str, reader: asyncssh.SSHReader[bytes],
                    writer: asyncssh.SSHWriter[bytes]) -> None:
        """One member's RPC channel, until it closes (its requests are then cancelled)."""
        session = api.Session(
            self.router, self.svc.daemon, channel_writer(writer), writer.close,
            buffered=writer.channel.get_write_buffer_size, tasks=self.svc.tasks,
            greeted=True, node=node, drain=channel_drain(writer))
        try:
            while not session.closed and (data := await reader.read(1 << 20)):
                session.feed(data)
        finally:
            session.lost()

    # -- calling -----------------------------------------------------------------------

    async def call(self, node: str, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = 30.0,
                   on_event: EventCallback | None = None) -> Any:
        """Run peer op ``op`` on ``node``; raises ProtoError (UNAVAILABLE if unreachable)."""
        if node == self.svc.name:
            ctx = Context.local(op, daemon=self.svc.daemon, node=node, on_event=on_event)
            try:
                async with asyncio.timeout(timeout):
                    return await api.dispatch(self.router, ctx, op, args or {})
            except TimeoutError:
                raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {op} timed out") from None
        try:
            link = await self.transport.link(node)
        except ProtoError as exc:  # no connection: the request never left
            raise _delivered(exc, NOT_SENT) from None
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending[rid] = (fut, on_event)
        try:
            link.writer.write(encode_frame(request(rid, op, args)))
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {op} timed out",
                             {"delivery": UNKNOWN}) from None
        except asyncssh.Error as exc:
            self.transport.drop_link(node)
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{node}: {exc}",
                             {"delivery": UNKNOWN}) from None
        except ProtoError as exc:
            # An answer from the peer, or the connection lost while waiting for one.
            raise _delivered(exc, ANSWERED if fut.done() and not link.closed else UNKNOWN) \
                from None
        finally:
            link.pending.pop(rid, None)
            if (not fut.done() or fut.cancelled()) and not link.closed:
                with contextlib.suppress(Exception):
                    link.writer.write(encode_frame(cancel(rid)))

    async def forward(self, node: str, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_event: EventCallback | None = None) -> Any:
        """Run *API* op ``op`` on ``node`` (``cnvmctl --node n1 deploy X --on n3``)."""
        return await self.call(node, "peer.forward", {"op": op, "args": args or {}},
                               timeout=timeout, on_event=on_event)

    # -- built-in peer ops ---------------------------------------------------------------

    async def _ping(self, ctx: Context, args: Args) -> dict[str, Any]:
        """Liveness and clock of this node; echoes ``echo`` (up to 1 MiB: the reply must
        fit in a frame whatever is asked)."""
        echo = args.get("echo")
        if len(msgpack.packb(echo, use_bin_type=True)) > MAX_ECHO:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT, f"echo is larger than {MAX_ECHO} bytes",
                             {"arg": "echo"})
        return {"node": self.svc.name, "time": time.time(), "echo": echo}

    async def _nodes(self, ctx: Context, args: Args) -> list[dict[str, Any]]:
        """This node's view of the members."""
        return self.svc.nodes()

    async def _forward(self, ctx: Context, args: Args) -> Any:
        """Run API op ``op`` with ``args`` here, for the calling member."""
        op = args.str("op", max_len=64)
        op_args = args.map("args", {})
        if self.api_router is None:
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{self.svc.name} cannot run API ops")
        return await api.dispatch(self.api_router, ctx.nested(op), op, op_args)


NOT_SENT, UNKNOWN, ANSWERED = "not_sent", "unknown", "answered"
"""``details["delivery"]`` of a failed call: whether the peer may have carried it out
(cnvmd.migration.wire.Delivery reads it; a caller never guesses from the text)."""


def _delivered(exc: ProtoError, how: str) -> ProtoError:
    return ProtoError(exc.code, exc.message, {**exc.details, "delivery": how})
