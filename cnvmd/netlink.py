"""Kernel network primitives: named network namespaces, veth/bridge/VXLAN links,
addresses, routes, FDB entries, CRIU's pre-lock and gratuitous ARP.

The overlay (cnvm0, IPAM, expose) and the lab are built from these calls, so they
are small, idempotent where that is cheap, and never block the caller's loop.

Why a private worker thread: pyroute2 0.9's `AsyncIPRoute` opens its netlink
socket as a datagram endpoint, which uvloop (the daemon's loop) refuses
("invalid family 16"). So every netlink request runs as a coroutine on one
daemon thread that owns a plain asyncio loop; callers await it through
`run_coroutine_threadsafe`. Switching network namespace (`setns`) is per-thread,
so that same thread enters a namespace to create a netlink socket there (or to
`unshare` a new one) and then returns to where it started; the socket stays
bound to the namespace it was created in. pyroute2's own netns support forks a
multiprocessing child per socket instead, which is slower and unsafe in a
threaded daemon.

Namespace arguments (`netns=`) are a name under /run/netns, an absolute path
(e.g. /proc/PID/ns/net), or None for the process's own namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import os
import re
import shutil
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2 import netns as _pnetns
from pyroute2.netlink.exceptions import NetlinkError as _PyNetlinkError

from cnvmd import proc

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
ZERO_MAC = "00:00:00:00:00:00"
IFF_UP = 0x1

# The rule set CRIU itself installs to lock a netns during dump (see platform
# notes). Loaded into a *fresh* target netns before its link comes up, so that a
# client packet arriving before the restored socket exists is dropped (and later
# retransmitted) instead of answered with a RST. CRIU's restore removes exactly
# these rules when it unlocks.
CRIU_LOCK_RULES = (
    "*filter\n"
    ":CRIU - [0:0]\n"
    "-I INPUT -j CRIU\n"
    "-I OUTPUT -j CRIU\n"
    "-A CRIU -m mark --mark 0xC114 -j ACCEPT\n"
    "-A CRIU -j DROP\n"
    "COMMIT\n"
)
CRIU_UNLOCK_RULES = (
    "*filter\n"
    ":CRIU - [0:0]\n"
    "-D INPUT -j CRIU\n"
    "-D OUTPUT -j CRIU\n"
    "-X CRIU\n"
    "COMMIT\n"
)

RUN_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class NetlinkError(OSError):
    """A netlink request failed; the message names the operation and namespace."""


def netns_path(netns: str) -> Path:
    return Path(netns) if netns.startswith("/") else NETNS_DIR / netns


def pids_in_netns(netns: Iterable[str | Path]) -> list[int]:
    """Pids living in any of these namespaces (names or paths; a blocking /proc scan,
    so call it in a thread from async code)."""
    inodes = set()
    for ns in netns:
        try:
            inodes.add(netns_path(str(ns)).stat().st_ino)
        except OSError:
            continue
    if not inodes:
        return []
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                out.append(int(d))
        except OSError:
            continue
    return out


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


# --------------------------------------------------------------------------- worker


class _Worker:
    """One thread with a plain asyncio loop that owns all netlink traffic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._home_fd = -1  # the netns this thread started in (to return to)

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                ready = threading.Event()
                loop = asyncio.SelectorEventLoop()

                def main() -> None:
                    self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                    asyncio.set_event_loop(loop)
                    ready.set()
                    loop.run_forever()

                threading.Thread(target=main, name="cnvm-netlink", daemon=True).start()
                ready.wait()
                self._loop = loop
            return self._loop

    def home_fd(self) -> int:
        return self._home_fd


_worker = _Worker()


async def _call(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the netlink thread and await its result here."""
    loop = _worker.loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Call fn with this (worker) thread inside netns, then come back."""
    if netns is None:
        return fn()
    try:
        fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetlinkError(errno.ENOENT, f"network namespace {netns} does not exist") from None
    try:
        _setns(fd)
        try:
            return fn()
        finally:
            _setns(_worker.home_fd())
    finally:
        os.close(fd)


def _rtnl(netns: str | None) -> AsyncIPRoute:
    """An AsyncIPRoute bound to netns, living on the worker loop."""
    sock = _in_netns(
        netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    )
    return AsyncIPRoute(use_socket=sock, use_event_loop=_worker.loop())


async def with_rtnl(netns: str | None, fn: Callable[[AsyncIPRoute], Awaitable[T]]) -> T:
    """Run `fn(ipr)` with an AsyncIPRoute in netns, on the netlink thread.

    The escape hatch for requests this module has no helper for; fn must only
    use `ipr` (it runs on another loop).
    """

    async def body() -> T:
        ipr = _rtnl(netns)
        try:
            return await fn(ipr)
        finally:
            ipr.close()

    return await _call(body())


async def socket_in(netns: str, family: int, type: int,
                    setup: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """A socket created inside netns (it stays bound to it), non-blocking; `setup`
    (bind, listen) runs there too. For servers a daemon offers inside a cnvm's netns."""

    async def body() -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(family, type)
            try:
                s.setblocking(False)
                if setup is not None:
                    setup(s)
            except BaseException:
                s.close()
                raise
            return s

        return _in_netns(netns, make)

    return await _call(body())


def _fail(exc: Exception, what: str, netns: str | None) -> NetlinkError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None) or errno.EIO
    return NetlinkError(code, f"{what}{_where(netns)}: {os.strerror(code)}")


async def _index(ipr: AsyncIPRoute, ifname: str, netns: str | None) -> int:
    found = await ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkError(errno.ENODEV, f"no link {ifname}{_where(netns)}")
    return int(found[0])


# --------------------------------------------------------------------------- namespaces


def _netns_add_sync(name: str) -> None:
    path = netns_path(name)
    if path.exists():
        raise NetlinkError(errno.EEXIST, f"network namespace {name} already exists")

    def make() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"unshare: {os.strerror(e)}")
        try:
            # pyroute2 makes /run/netns a shared mount (like iproute2) and bind-mounts
            # /proc/<pid>/ns/net; "thread-self" names this thread's new namespace.
            _pnetns.attach(name, "thread-self")
        finally:
            _setns(_worker.home_fd())

    make()


async def netns_add(name: str, *, lo_up: bool = True) -> None:
    """Create /run/netns/NAME (error if it exists); loopback up by default."""

    async def body() -> None:
        _netns_add_sync(name)
        if lo_up:
            ipr = _rtnl(name)
            try:
                await ipr.link("set", index=await _index(ipr, "lo", name), state="up")
            finally:
                ipr.close()

    await _call(body())


async def netns_del(name: str) -> bool:
    """Remove a named netns if present (its links go with it). True if removed."""

    async def body() -> bool:
        path = netns_path(name)
        if not path.exists():
            return False
        _libc.umount2(str(path).encode(), 2)  # MNT_DETACH; fine if not mounted
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    return await _call(body())


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def netns_list(prefix: str = "") -> list[str]:
    """Named namespaces under /run/netns, optionally only those starting with prefix."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Link:
    index: int
    ifname: str
    kind: str | None
    mac: str | None
    mtu: int
    up: bool
    master: int | None


def _link_of(msg: Any) -> Link:
    kind = None
    info = msg.get("IFLA_LINKINFO")
    if info is not None:
        kind = info.get("IFLA_INFO_KIND")
    return Link(
        index=int(msg["index"]),
        ifname=msg.get("IFLA_IFNAME"),
        kind=kind,
        mac=msg.get("IFLA_ADDRESS"),
        mtu=int(msg.get("IFLA_MTU") or 0),
        up=bool(msg["flags"] & IFF_UP),
        master=msg.get("IFLA_MASTER"),
    )


async def links(netns: str | None = None) -> list[Link]:
    async def fn(ipr: AsyncIPRoute) -> list[Link]:
        return [_link_of(m) async for m in await ipr.link("dump")]

    return await with_rtnl(netns, fn)


async def link_get(ifname: str, netns: str | None = None) -> Link | None:
    for link in await links(netns):
        if link.ifname == ifname:
            return link
    return None


async def _add(netns: str | None, what: str, exist_ok: bool, ifname: str, **spec: Any) -> None:
    async def fn(ipr: AsyncIPRoute) -> None:
        try:
            await ipr.link("add", ifname=ifname, **spec)
        except _PyNetlinkError as exc:
            if exc.code == errno.EEXIST and exist_ok:
                return
            raise _fail(exc, f"add {what} {ifname}", netns) from None

    await with_rtnl(netns, fn)


async def veth_add(
    ifname: str,
    peer: str,
    *,
    netns: str | None = None,
    peer_netns: str | None = None,
    mtu: int | None = None,
    mac: str | None = None,
    peer_mac: str | None = None,
) -> None:
    """Create a veth pair in netns with its peer end created directly in peer_netns.

    Creating the peer in place (IFLA_NET_NS_FD on the peer) avoids a window where
    the peer's name could clash in the first namespace.
    """
    peer_spec: dict[str, Any] = {"ifname": peer}
    if peer_netns is not None:
        peer_spec["net_ns_fd"] = str(netns_path(peer_netns))
    if mtu:
        peer_spec["mtu"] = mtu
    if peer_mac:
        peer_spec["address"] = peer_mac
    spec: dict[str, Any] = {"kind": "veth", "peer": peer_spec}
    if mtu:
        spec["mtu"] = mtu
    if mac:
        spec["address"] = mac
    await _add(netns, "veth", False, ifname, **spec)


async def bridge_add(ifname: str, *, netns: str | None = None, mtu: int | None = None,
                     mac: str | None = None, exist_ok: bool = False) -> None:
    spec: dict[str, Any] = {"kind": "bridge"}
    if mtu:
        spec["mtu"] = mtu
    if mac:
        spec["address"] = mac
    await _add(netns, "bridge", exist_ok, ifname, **spec)


async def vxlan_add(
    ifname: str,
    vni: int,
    *,
    netns: str | None = None,
    local: str | None = None,
    dev: str | None = None,
    dstport: int = 4789,
    learning: bool = True,
    mtu: int | None = None,
    mac: str | None = None,
) -> None:
    """A VXLAN device for head-end replication: add peers with `fdb_flood_add`."""

    async def fn(ipr: AsyncIPRoute) -> None:
        spec: dict[str, Any] = {
            "kind": "vxlan",
            "vxlan_id": vni,
            "vxlan_port": dstport,
            "vxlan_learning": 1 if learning else 0,
        }
        if local:
            spec["vxlan_local"] = local
        if dev:
            spec["vxlan_link"] = await _index(ipr, dev, netns)
        if mtu:
            spec["mtu"] = mtu
        if mac:
            spec["address"] = mac
        try:
            await ipr.link("add", ifname=ifname, **spec)
        except _PyNetlinkError as exc:
            raise _fail(exc, f"add vxlan {ifname} (vni {vni})", netns) from None

    await with_rtnl(netns, fn)


async def link_set(
    ifname: str,
    *,
    netns: str | None = None,
    up: bool | None = None,
    mtu: int | None = None,
    mac: str | None = None,
    master: str | None = None,
    nomaster: bool = False,
    to_netns: str | None = None,
    new_name: str | None = None,
) -> None:
    """Change one link: state, MTU, MAC, bridge master, name, or namespace."""

    async def fn(ipr: AsyncIPRoute) -> None:
        idx = await _index(ipr, ifname, netns)
        spec: dict[str, Any] = {}
        if mtu:
            spec["mtu"] = mtu
        if mac:
            spec["address"] = mac
        if master:
            spec["master"] = await _index(ipr, master, netns)
        elif nomaster:
            spec["master"] = 0
        if new_name:
            spec["ifname"] = new_name
        if to_netns:
            spec["net_ns_fd"] = str(netns_path(to_netns))
        try:
            if spec:
                await ipr.link("set", index=idx, **spec)
            if up is not None and not to_netns:
                await ipr.link("set", index=idx, state="up" if up else "down")
        except _PyNetlinkError as exc:
            raise _fail(exc, f"set link {ifname}", netns) from None

    await with_rtnl(netns, fn)


async def link_up(ifname: str, netns: str | None = None) -> None:
    await link_set(ifname, netns=netns, up=True)


async def link_down(ifname: str, netns: str | None = None) -> None:
    await link_set(ifname, netns=netns, up=False)


async def link_del(ifname: str, netns: str | None = None) -> bool:
    """Delete a link if present (a veth takes its peer along). True if deleted."""

    async def fn(ipr: AsyncIPRoute) -> bool:
        found = await ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            await ipr.link("del", index=found[0])
        except _PyNetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise _fail(exc, f"delete link {ifname}", netns) from None
        return True

    return await with_rtnl(netns, fn)


# --------------------------------------------------------------------------- addresses, routes, FDB


async def addr_add(ifname: str, cidr: str, *, netns: str | None = None,
                   exist_ok: bool = True) -> None:
    """Add an address like "10.100.101.5/24" to a link."""
    iface = ipaddress.ip_interface(cidr)

    async def fn(ipr: AsyncIPRoute) -> None:
        idx = await _index(ipr, ifname, netns)
        try:
            await ipr.addr("add", index=idx, address=str(iface.ip),
                           prefixlen=iface.network.prefixlen)
        except _PyNetlinkError as exc:
            if exc.code == errno.EEXIST and exist_ok:
                return
            raise _fail(exc, f"add address {cidr} to {ifname}", netns) from None

    await with_rtnl(netns, fn)


async def addr_del(ifname: str, cidr: str, *, netns: str | None = None) -> bool:
    iface = ipaddress.ip_interface(cidr)

    async def fn(ipr: AsyncIPRoute) -> bool:
        idx = await _index(ipr, ifname, netns)
        try:
            await ipr.addr("del", index=idx, address=str(iface.ip),
                           prefixlen=iface.network.prefixlen)
        except _PyNetlinkError as exc:
            if exc.code == errno.EADDRNOTAVAIL:
                return False
            raise _fail(exc, f"delete address {cidr} from {ifname}", netns) from None
        return True

    return await with_rtnl(netns, fn)


async def addrs(netns: str | None = None, ifname: str | None = None) -> list[str]:
    """Addresses as "ip/prefix" strings (IPv4 and IPv6), optionally of one link."""

    async def fn(ipr: AsyncIPRoute) -> list[str]:
        want = await _index(ipr, ifname, netns) if ifname else None
        out = []
        async for m in await ipr.addr("dump"):
            if want is None or m["index"] == want:
                out.append(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}")
        return out

    return await with_rtnl(netns, fn)


async def route_add(dst: str, *, netns: str | None = None, gateway: str | None = None,
                    dev: str | None = None, exist_ok: bool = True) -> None:
    """Add a route; dst "default" or a CIDR, via gateway and/or out of dev."""

    async def fn(ipr: AsyncIPRoute) -> None:
        spec: dict[str, Any] = {"dst": "0.0.0.0/0" if dst == "default" else dst}
        if gateway:
            spec["gateway"] = gateway
        if dev:
            spec["oif"] = await _index(ipr, dev, netns)
        try:
            await ipr.route("add", **spec)
        except _PyNetlinkError as exc:
            if exc.code == errno.EEXIST and exist_ok:
                return
            raise _fail(exc, f"add route {dst}", netns) from None

    await with_rtnl(netns, fn)


async def fdb_flood_add(vxlan: str, dst: str, *, netns: str | None = None) -> None:
    """`bridge fdb append 00:00:00:00:00:00 dev VXLAN dst DST`: flood BUM traffic to a peer.

    One all-zero entry per peer gives head-end replication without multicast;
    with learning on, unicast then follows the learnt MACs.
    """

    async def fn(ipr: AsyncIPRoute) -> None:
        idx = await _index(ipr, vxlan, netns)
        try:
            await ipr.fdb("append", ifindex=idx, lladdr=ZERO_MAC, dst=dst)
        except _PyNetlinkError as exc:
            if exc.code == errno.EEXIST:
                return
            raise _fail(exc, f"add flood entry {dst} to {vxlan}", netns) from None

    await with_rtnl(netns, fn)


async def fdb_flood_del(vxlan: str, dst: str, *, netns: str | None = None) -> bool:
    async def fn(ipr: AsyncIPRoute) -> bool:
        idx = await _index(ipr, vxlan, netns)
        try:
            await ipr.fdb("del", ifindex=idx, lladdr=ZERO_MAC, dst=dst)
        except _PyNetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise _fail(exc, f"delete flood entry {dst} from {vxlan}", netns) from None
        return True

    return await with_rtnl(netns, fn)


async def fdb_flood_peers(vxlan: str, *, netns: str | None = None) -> list[str]:
    """Destinations of the all-zero FDB entries of a VXLAN device."""

    async def fn(ipr: AsyncIPRoute) -> list[str]:
        idx = await _index(ipr, vxlan, netns)
        out = []
        async for m in await ipr.fdb("dump", ifindex=idx):
            if m.get("NDA_LLADDR") == ZERO_MAC and m.get("NDA_DST"):
                out.append(m.get("NDA_DST"))
        return out

    return await with_rtnl(netns, fn)


async def sysctl(netns: str | None, key: str, value: str | int) -> None:
    """Write /proc/sys/KEY (dots as separators) as seen from inside netns."""
    path = "/proc/sys/" + key.replace(".", "/")

    async def body() -> None:
        def write() -> None:
            with open(path, "w") as f:
                f.write(str(value))

        _in_netns(netns, write)

    await _call(body())


# --------------------------------------------------------------------------- CRIU lock, ARP


async def prelock(netns: str, *, timeout: float = 20.0) -> None:
    """Load CRIU's network-lock rules into a fresh netns, before its link comes up.

    CRIU's restore only removes the lock it assumes its dump added; on a new host
    the target netns must already hold it, or the client's retransmission meets
    no socket and gets a RST. Both IPv4 and IPv6 (`-w`: wait for the xtables lock,
    `--noflush`: keep other rules).
    """
    for tool in ("iptables-restore", "ip6tables-restore"):
        await proc.run([tool, "-w", "--noflush"], netns=netns, input=CRIU_LOCK_RULES.encode(),
                       timeout=timeout)


NFT_TABLE_RE = re.compile(r"table inet (CRIU-[0-9a-f-]{1,64})")


def nft_lock_table(run_id: str) -> str:
    """The table CRIU names for a run id: `snprintf(table, 32, "inet CRIU-%s", id)`
    (criu/netfilter.c, nftables_get_table) into a 32-byte buffer, so a UUID run id is
    cut to its first 21 characters — by the dump's lock and the restore's unlock alike."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"bad CRIU run id {run_id!r}")
    return f"inet CRIU-{run_id}"[:31].removeprefix("inet ")


def nft_lock_rules(run_id: str) -> str:
    """CRIU's nftables network lock (criu/net.c, nftables_lock_network_internal): one
    inet table whose input/output chains drop all but CRIU's repair-marked packets."""
    chain = "type filter hook {hook} priority 0; policy drop; meta mark 0xc114 accept;"
    return (f"table inet {nft_lock_table(run_id)} {{\n"
            f"  chain output {{ {chain.format(hook='output')} }}\n"
            f"  chain input {{ {chain.format(hook='input')} }}\n}}\n")


async def prelock_nft(netns: str, run_id: str, *, timeout: float = 20.0) -> None:
    """CRIU's nftables lock, as the dump named it, in a fresh netns before its link comes
    up: CRIU's restore deletes exactly that table at network-unlock (in-process, no
    iptables runs), and that is when the restored sockets' window probes go out."""
    await proc.run(["nft", "-f", "-"], netns=netns, input=nft_lock_rules(run_id).encode(),
                   timeout=timeout)


async def _nft_tables(netns: str, timeout: float) -> list[str]:
    if shutil.which("nft") is None:
        return []
    res = await proc.run(["nft", "list", "tables", "inet"], netns=netns, check=False,
                         timeout=timeout)
    return NFT_TABLE_RE.findall(res.stdout) if res.returncode == 0 else []


async def unlock(netns: str, *, timeout: float = 20.0) -> None:
    """Remove a lock again, either kind (a restore that failed, or a dump that was
    stopped, leaves it behind)."""
    for tool in ("iptables-restore", "ip6tables-restore"):
        await proc.run([tool, "-w", "--noflush"], netns=netns,
                       input=CRIU_UNLOCK_RULES.encode(), timeout=timeout, check=False)
    for table in await _nft_tables(netns, timeout):
        await proc.run(["nft", "delete", "table", "inet", table], netns=netns, check=False,
                       timeout=timeout)


async def is_locked(netns: str) -> bool:
    res = await proc.run(["iptables", "-w", "-S", "INPUT"], netns=netns, check=False, timeout=20)
    return "-j CRIU" in res.stdout or bool(await _nft_tables(netns, 20))


async def announce(netns: str, ifname: str, ip: str, *, count: int = 1,
                   busybox: str = "busybox") -> None:
    """Gratuitous ARP for ip out of ifname, so peers and bridges relearn where it lives."""
    await proc.run([busybox, "arping", "-U", "-c", str(count), "-I", ifname, ip],
                   netns=netns, timeout=10)
