"""How the teleport engine reaches the other node: RPC, byte streams, TCP relays.

The engine only sees `NodeLink`; `PeerLink` implements it over the peer mesh
(asyncssh: one SSH connection per peer, RPC on a multiplexed channel, every
stream and relayed TCP connection on its own channel). Keeping the interface
this narrow lets the engine be tested against other transports and keeps
asyncssh details (windows, channel errors) inside `cnvmd.peers`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cnvmd.peers.streams import PeerStream, TcpRelay

from .lazyrelay import PrefetchRelay

if TYPE_CHECKING:
    from cnvmd.peers.service import PeerService

STREAM_KIND = "teleport.data"


class ByteStream(Protocol):
    """A half-closable byte pipe with a framed trailer from the far side."""

    async def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    async def read_frame(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class Relay(Protocol):
    """A local TCP listener whose connections are carried to a port on the other node."""

    port: int
    bytes_up: int
    bytes_down: int

    async def close(self) -> None: ...


class NodeLink(Protocol):
    node: str

    async def call(self, op: str, args: dict[str, Any], *, timeout: float | None = 60.0,
                   on_event: Callable[[str, dict[str, Any]], None] | None = None) -> Any: ...

    async def open_stream(self, args: dict[str, Any]) -> ByteStream: ...

    async def relay(self, remote_port: int) -> Relay: ...


class PeerLink:
    """NodeLink over `cnvmd.peers.PeerService`: the target's peer-only teleport ops."""

    def __init__(self, svc: PeerService, node: str) -> None:
        self.svc = svc
        self.node = node

    async def call(self, op: str, args: dict[str, Any], *, timeout: float | None = 60.0,
                   on_event: Callable[[str, dict[str, Any]], None] | None = None) -> Any:
        return await self.svc.call(self.node, op, args, timeout=timeout, on_event=on_event)

    async def open_stream(self, args: dict[str, Any]) -> PeerStream:
        return await self.svc.open_stream(self.node, STREAM_KIND, args)

    async def relay(self, remote_port: int) -> TcpRelay:
        return await self.svc.relay_tcp(self.node, remote_port)


def member_names(svc: Any) -> set[str]:
    """Active members as this node sees them (for 'unknown node' refusals)."""
    try:
        return {n["name"] for n in svc.nodes()}
    except Exception:
        return set()


# --------------------------------------------------------------------------- page relay

CHUNK = 1 << 20


async def stream_relay(link: PeerLink, args: dict[str, Any], images: Path | None = None,
                       *, hold: bool = False) -> TcpRelay | PrefetchRelay:
    """A loopback TCP listener; each connection is relayed into a new teleport stream.

    Used on a postcopy target: CRIU's lazy-pages daemon connects here, and the
    source's handler connects the stream to its lazy page server. With `images` (the
    session's image dir, holding the pagemaps) the relay prefetches pages in large
    pipelined requests (see lazyrelay) instead of copying bytes; with `hold`, only
    after its `release()`.
    """
    relay: TcpRelay | PrefetchRelay
    if images is not None:
        relay = PrefetchRelay(lambda: link.open_stream(args), f"{link.node} (lazy pages)",
                              images, hold=hold)
    else:
        relay = TcpRelay(lambda: link.open_stream(args), f"{link.node} {args}")
    return await relay.start("127.0.0.1", 0)


class CountingReader:
    """A StreamReader's `read` that counts what passes (the live view of the lazy
    pages a postcopy source serves: CRIU moves them, not the engine)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.n = 0

    async def read(self, n: int = -1) -> bytes:
        data = await self.reader.read(n)
        self.n += len(data)
        return data


def free_port() -> int:
    """A loopback port that was free a moment ago (CRIU needs a number up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
