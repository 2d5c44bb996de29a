"""Typed shared state of the daemon and the plug-in contract of its subsystems.

Why typed keys (as aiohttp's ``AppKey``): a subsystem reaches another through
``daemon.services.require(LIFECYCLE)`` and gets a ``Lifecycle`` back, checked by the
type checker, instead of a string lookup in a ``dict[str, Any]``. A missing service
is a clean ``unavailable`` error naming why it is missing, never a ``KeyError``.

Why declared plug-ins (as containerd's): each subsystem says what it requires; the
daemon starts them in that order (a topological sort, not module-name order), and
nobody polls for a service that "should appear soon".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from proto.messages import ErrorCode, ProtoError

if TYPE_CHECKING:
    from cnvmd.api import Router
    from cnvmd.cluster.service import ClusterService
    from cnvmd.events import EventBus
    from cnvmd.lifecycle import Lifecycle
    from cnvmd.metrics import Metrics
    from cnvmd.migration.ops import Teleports
    from cnvmd.network.dns import DnsService
    from cnvmd.network.service import Network
    from cnvmd.peers.service import PeerService

T = TypeVar("T")


class Key(Generic[T]):
    """A typed name for one shared service (compare by identity)."""

    __slots__ = ("name", "what")

    def __init__(self, name: str, what: str) -> None:
        self.name = name
        self.what = what  # for error messages: "the overlay network"

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


LIFECYCLE: Key[Lifecycle] = Key("lifecycle", "the lifecycle service")
NETWORK: Key[Network] = Key("network", "the overlay network")
PEERS: Key[PeerService] = Key("peers", "the peer mesh")
TELEPORTS: Key[Teleports] = Key("teleports", "the teleport engine")
METRICS: Key[Metrics] = Key("metrics", "the metrics endpoint")
EVENTS: Key[EventBus] = Key("events", "the event stream")
DIRECTORY: Key[ClusterService] = Key("directory", "the cluster directory")
"""Every cnvm of the cluster: ``.dir.lookup(name)`` -> Entry (ip, node), ``.dir.entries()``,
``.dir.add_listener(cb)`` / ``await .dir.wait_change()`` (cnvmd.cluster.directory)."""
DNS: Key[DnsService] = Key("dns", "the cnvm resolver")
"""Resolvers at 127.0.0.11:53 in each local cnvm's netns (cnvmd.network.dns)."""


class Services:
    """The daemon's started services, by typed key; a failed one keeps its reason."""

    def __init__(self) -> None:
        self._items: dict[Key[Any], object] = {}
        self._why: dict[Key[Any], str] = {}

    def provide(self, key: Key[T], value: T) -> None:
        self._items[key] = value
        self._why.pop(key, None)

    def failed(self, key: Key[Any], why: str) -> None:
        """Record why a service is not there (shown in the `unavailable` error)."""
        self._why[key] = why

    def get(self, key: Key[T]) -> T | None:
        return cast("T | None", self._items.get(key))

    def require(self, key: Key[T]) -> T:
        v = self._items.get(key)
        if v is None:
            why = self._why.get(key)
            raise ProtoError(ErrorCode.UNAVAILABLE, f"{key.what} is not running on this node"
                             + (f": {why}" if why else ""))
        return cast("T", v)

    def remove(self, key: Key[T]) -> T | None:
        return cast("T | None", self._items.pop(key, None))

    def __contains__(self, key: Key[Any]) -> bool:
        return key in self._items


Hook = Callable[[Any], Awaitable[None]]
"""``async def hook(daemon)``; typed ``Any`` to keep this module free of the daemon."""


@dataclass(frozen=True)
class Plugin:
    """One subsystem: its API ops, its peer-only ops, and its lifecycle hooks.

    - ``start`` runs in dependency order and provides the subsystem's services; peers
      do not reach this node yet.
    - ``serve`` runs after every ``start`` (same order): open listeners.
    - ``stop`` runs in reverse order at shutdown and tolerates a partial start.
    """

    name: str
    requires: tuple[str, ...] = ()
    router: Router | None = None
    peer_router: Router | None = None
    start: Hook | None = None
    serve: Hook | None = None
    stop: Hook | None = None


class PluginError(Exception):
    """The declared plug-ins do not form a valid start order."""


def start_order(plugins: Iterable[Plugin]) -> list[Plugin]:
    """Plug-ins sorted so that each comes after what it requires (stable otherwise)."""
    items = list(plugins)
    by_name = {p.name: p for p in items}
    if len(by_name) != len(items):
        raise PluginError("two plug-ins share a name")
    out: list[Plugin] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(p: Plugin, path: tuple[str, ...]) -> None:
        s = state.get(p.name)
        if s == 2:
            return
        if s == 1:
            raise PluginError("plug-in dependency cycle: " + " -> ".join((*path, p.name)))
        state[p.name] = 1
        for r in p.requires:
            dep = by_name.get(r)
            if dep is None:
                raise PluginError(f"plug-in {p.name} requires unknown plug-in {r}")
            visit(dep, (*path, p.name))
        state[p.name] = 2
        out.append(p)

    for p in items:
        visit(p, ())
    return out
