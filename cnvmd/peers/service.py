"""PeerService: the one object other subsystems use to reach the mesh.

Why a facade over parts: each concern of the mesh is a layer of its own module —
transport.py (SSH server, keys, cached links), enrol.py (who is a member), rpc.py
(peer ops, served by the API's request engine), bulk.py (streams, relays, files),
gossip.py (table convergence, liveness) — while callers (network, IPAM, teleport,
the API ops in ops.py) keep one stable object. This module owns what they all
share: the node's identity, cluster record, member table and token ledger, and
their persistence.

Peer ops and stream kinds live on the peer `Router` given to the constructor
(built-ins are added to it here); API ops of this node are run for peers from
`api_router` (``peer.forward``). The two routers stay separate objects.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from cnvmd.api import Router, StreamHandler
from cnvmd.config import Config
from cnvmd.state import StateStore

from . import streams, trust
from .bulk import Bulk
from .enrol import Enrolment
from .gossip import Gossip
from .membership import ALIVE, DOWN, REMOVED, MemberEvent, Membership
from .rpc import Rpc
from .transport import ENROLL_USER, EventCallback, Transport, Tuning

if TYPE_CHECKING:
    from cnvmd.daemon import Daemon

log = logging.getLogger("cnvmd.peers")

_STATE_KIND = "peers"


class PeerService:
    """Everything peer-to-peer for one node. The daemon calls start() and stop().

    `router`: the peer router (peer ops and stream kinds of every subsystem; the
    service adds its built-ins to it, so a Router serves one PeerService).
    `api_router`: the daemon's API ops, run for peers by ``peer.forward`` (None:
    refused). `daemon`: handed to handlers as ``ctx.daemon`` (None in unit tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        router: Router | None = None,
        api_router: Router | None = None,
        daemon: Daemon | None = None,
        advertise_address: str | None = None,
        gossip_interval: float = 1.0,
        suspect_after: float = 3.0,
        down_after: float = 6.0,
        capabilities: dict[str, Any] | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        self.config = config
        self.name = config.node_name
        self.tuning = tuning or Tuning()
        self.gossip_interval = gossip_interval
        self.capabilities = dict(capabilities or {})
        listen = config.listen_address
        self.advertise_address = advertise_address or (
            listen if listen not in ("0.0.0.0", "::", "") else "")
        self.dir = Path(config.state_dir) / _STATE_KIND
        self.transfer_dir = Path(os.path.normpath(Path(config.state_dir).absolute() / "transfer"))
        self.store = StateStore(Path(config.state_dir))
        self.membership = Membership(self.name, suspect_after=suspect_after,
                                     down_after=down_after)
        self.cluster: trust.Cluster | None = None
        self.ledger = trust.TokenLedger()
        self.key: asyncssh.SSHKey | None = None
        self.port = config.peer_port
        self.allowed_roots: list[Path] = [self.transfer_dir]
        """Where peers may put/get files (bulk.py); never the whole state dir, which
        holds this node's private key and every cnvm's files."""
        self.router = router if router is not None else Router()
        self.api_router = api_router
        self.daemon = daemon
        self.tasks: set[asyncio.Task[Any]] = set()
        """Background work and in-flight peer requests; cancelled by stop()."""
        self._save_lock = asyncio.Lock()
        self._write_fut: asyncio.Future[None] | None = None
        self._started = False
        self._loaded = False
        self.ready = asyncio.Event()  # set once state is loaded and the port is open
        # The layers, bottom up; each registers its channels, peer ops and stream kinds.
        self.transport = Transport(self)
        self.rpc = Rpc(self, self.transport, self.router, api_router)
        self.enrolment = Enrolment(self, self.transport, self.router)
        self.gossip = Gossip(self, self.transport, self.router, gossip_interval)
        self.bulk = Bulk(self, self.transport, self.router)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Persisted state is loaded and the port is open."""
        return self._started

    @property
    def running(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Load keys and state, listen, and start gossiping (rejoins by itself)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.tuning.apply_process_wide()
        self.key = await asyncio.to_thread(trust.load_or_create_key, self.dir / "node_key")
        await asyncio.to_thread(self._load_state)
        self._loaded = True
        self.port = await self.transport.listen(self.config.listen_address,
                                                self.config.peer_port, self.key)
        me = self.membership.get(self.name)
        if me is not None and self.cluster is not None:
            addr = self.advertise_address or me.addr
            self.membership.update_self(incarnation=me.incarnation + 1, version=0, addr=addr,
                                        port=self.port, caps=self.caps())
            await self.save()
        self.gossip.start()
        self._started = True
        self.ready.set()
        log.info("peers: %s listening on %s:%d (key %s)%s", self.name,
                 self.config.listen_address, self.port, trust.fingerprint(self.key),
                 f", cluster {self.cluster.cluster_id}" if self.cluster else ", no cluster yet")

    async def stop(self) -> None:
        """Close the listener, every link and every in-flight task."""
        self._started = False
        await self.gossip.stop()
        await self.transport.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._write_fut is not None:
            await asyncio.gather(self._write_fut, return_exceptions=True)
        if self._loaded:  # never overwrite state we did not read
            await self.save()

    def caps(self) -> dict[str, Any]:
        return {**self.capabilities}

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background; stop() cancels it."""
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    # -- persistence -----------------------------------------------------------------

    def _load_state(self) -> None:
        c = self.store.load(_STATE_KIND, "cluster")
        if c:
            self.cluster = trust.Cluster.from_wire(c)
        m = self.store.load(_STATE_KIND, "members")
        if m and self.cluster is not None:
            self.membership.load(m.get("members", []))
        t = self.store.load(_STATE_KIND, "tokens")
        if t:
            self.ledger = trust.TokenLedger(t.get("issued"), t.get("used"))

    async def save(self) -> None:
        """Persist cluster, table and tokens off the loop (fsyncs)."""
        async with self._save_lock:
            if self._write_fut is not None and not self._write_fut.done():
                await asyncio.shield(self._write_fut)
            self.membership.dirty = False
            cluster = self.cluster.to_wire() if self.cluster else None
            members = {"members": self.membership.wire()}
            tokens = self.ledger.to_wire()

            def write() -> None:
                if cluster is None:
                    self.store.delete(_STATE_KIND, "cluster")
                else:
                    self.store.save(_STATE_KIND, "cluster", cluster)
                self.store.save(_STATE_KIND, "members", members)
                self.store.save(_STATE_KIND, "tokens", tokens)

            # The thread cannot be cancelled: keep its future so that the next save (or
            # stop) waits for it instead of racing it on the same temp file.
            self._write_fut = asyncio.ensure_future(asyncio.to_thread(write))
            await asyncio.shield(self._write_fut)

    # -- registration (for other subsystems) -----------------------------------------

    def register_stream(self, kind: str, handler: StreamHandler) -> None:
        """Accept bulk channels of ``kind``: ``handler(stream, args)`` (the same as
        ``@router.stream(kind)`` on the peer router; a kind is registered once)."""
        self.router.stream(kind)(handler)

    def allow_root(self, path: Path) -> None:
        """Let peers put/get files beneath ``path`` (default: ``<state_dir>/transfer``
        only), never through a symlink."""
        self.allowed_roots.append(Path(os.path.normpath(Path(path).absolute())))

    # -- membership ----------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        self.membership.tick()
        return [n for n in self.membership.view() if n["admin"] != REMOVED]

    def update_local(self, *, caps: dict[str, Any] | None = None,
                     cnvms: list[str] | None = None) -> None:
        """Publish this node's capabilities / cnvm list (gossiped on the next round)."""
        if caps is not None:
            self.capabilities.update(caps)
        if self.membership.get(self.name) is None:
            return
        fields: dict[str, Any] = {}
        if caps is not None:
            fields["caps"] = self.caps()
        if cnvms is not None:
            fields["cnvms"] = sorted(cnvms)
        if fields:
            self.membership.update_self(**fields)
            self.spawn(self.save())

    # -- cluster management (enrol.py) ---------------------------------------------------

    async def cluster_init(self) -> dict[str, Any]:
        return await self.enrolment.cluster_init()

    async def mint_token(self, ttl: float = trust.DEFAULT_TOKEN_TTL) -> dict[str, Any]:
        return await self.enrolment.mint_token(ttl)

    async def join(self, peer: str, token: str, *, timeout: float = 15.0) -> dict[str, Any]:
        """Enrol through ``peer`` ("addr" or "addr:port") with a token from any member."""
        return await self.enrolment.join(peer, token, timeout=timeout)

    async def remove(self, node: str) -> dict[str, Any]:
        """Revoke a node: tombstone it, rotate the cluster secret, cut its connections."""
        return await self.enrolment.remove(node)

    # -- RPC (rpc.py) ----------------------------------------------------------------------

    async def call(self, node: str, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = 30.0,
                   on_event: EventCallback | None = None) -> Any:
        """Run peer op ``op`` on ``node`` (this node too); raises ProtoError (UNAVAILABLE
        if unreachable). Cancelling the awaiting task cancels the handler there."""
        return await self.rpc.call(node, op, args, timeout=timeout, on_event=on_event)

    async def forward(self, node: str, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_event: EventCallback | None = None) -> Any:
        """Run *API* op ``op`` on ``node`` (``cnvmctl --node n1 deploy X --on n3``)."""
        return await self.rpc.forward(node, op, args, timeout=timeout, on_event=on_event)

    # -- bulk data (bulk.py) ---------------------------------------------------------------

    async def open_stream(self, node: str, kind: str, args: dict[str, Any] | None = None, *,
                          window: int | None = None,
                          max_pktsize: int | None = None) -> streams.PeerStream:
        """A new bulk channel to ``node``; returns once the peer's handler accepted it."""
        return await self.bulk.open_stream(node, kind, args, window=window,
                                           max_pktsize=max_pktsize)

    async def relay_tcp(self, node: str, remote_port: int, *, remote_host: str = "127.0.0.1",
                        local_host: str = "127.0.0.1", local_port: int = 0) -> streams.TcpRelay:
        """Listen locally; carry every connection to ``remote_host:remote_port`` on ``node``."""
        return await self.bulk.relay_tcp(node, remote_port, remote_host=remote_host,
                                         local_host=local_host, local_port=local_port)

    async def put_file(self, node: str, src: Path | str, dest: str, *,
                       mode: int = 0o644) -> dict[str, Any]:
        """Copy a local file to ``dest`` on ``node``; verifies sha256 end to end."""
        return await self.bulk.put_file(node, src, dest, mode=mode)

    async def get_file(self, node: str, src: str, dest: Path | str) -> dict[str, Any]:
        """Fetch ``src`` from ``node`` into local ``dest``; verifies sha256."""
        return await self.bulk.get_file(node, src, dest)


__all__ = ["ALIVE", "DOWN", "ENROLL_USER", "MemberEvent", "PeerService", "Tuning"]
