"""The DIRECTORY service: keeps this node's document current and spreads it.

* Local changes: the state store tells us when a cnvm record is written or deleted
  (deploy, stop, start, rm, a teleport's commit on both sides); a refresh follows
  within `DEBOUNCE` and, if the document changed, it is pushed to every member not
  judged down (``dir.push``) at once. A periodic refresh (`PERIOD`) catches what
  no record write announces (a cnvm that exited by itself, memory, load).
* Anti-entropy: for each member we remember which version of our document it
  acknowledged; a member that did not (push failed, partition, it restarted: its
  document arrives with a new incarnation, or it comes back from down) gets ours
  again on the next tick, and every `RESYNC` seconds all get it regardless.
* Name claims (`claim`): see cnvmd.cluster.directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cnvmd import inventory, proc
from cnvmd.services import LIFECYCLE, PEERS
from proto.messages import ErrorCode, ProtoError

from .directory import (
    IMAGE_ID_RE,
    IMAGE_RE,
    NAME_RE,
    STATES,
    Directory,
    Entry,
    NodeDoc,
    Resources,
    parse_doc,
)

log = logging.getLogger("cnvmd.cluster")

DEBOUNCE = 0.05
PERIOD = 2.0
RESYNC = 10.0
PUSH_TIMEOUT = 5.0
CLAIM_ATTEMPTS = 8
NODE_KIND = "cluster"
NODE_KEY = "node"
"""StateStore record of this node's cluster settings (cordoned)."""


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            parts = v.split()
            if parts and parts[0].isdigit():
                out[k] = int(parts[0]) * 1024
    return out


def _cgroup_memory(pid: int) -> int | None:
    """Memory charged to the cgroup of process `pid` (the cnvm's init): cgroup v1's
    memory controller or v2's unified tree, whichever the host has; None if unreadable.
    (From the process, not from cnvmd.bundle.cgroups_path: after a teleport between
    hosts the cnvm lives in the cgroup it was dumped from.)"""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path(f"/proc/{int(pid)}/cgroup").read_text().splitlines()
    except (OSError, ValueError):
        return None
    cands: list[Path] = []
    for ln in lines:
        _, ctrls, path = ln.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in ctrls.split(","):
            cands.append(root / "memory" / rel / "memory.usage_in_bytes")
        elif ctrls == "":
            cands.append(root / rel / "memory.current")
    for c in cands:
        try:
            return int(c.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


class ClusterService:
    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.node: str = daemon.node_name
        self.dir = Directory(self.node)
        self.cordoned = False
        self.link_mbps = 0
        self._acked: dict[str, tuple[int, int] | None] = {}
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unlisten: Any = None
        self._refreshing = asyncio.Lock()
        self._loop = asyncio.get_running_loop()

    # ---- start / stop

    async def start(self) -> None:
        rec = await asyncio.to_thread(self.daemon.state.load, NODE_KIND, NODE_KEY) or {}
        self.cordoned = bool(rec.get("cordoned", False))
        self.link_mbps = await self._link_speed()
        self.daemon.state.on_change.append(self._on_state_change)
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="cluster-directory")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.daemon.state.on_change.remove(self._on_state_change)
        if self._unlisten is not None:
            self._unlisten()
        for t in [self._task, *self._tasks]:
            if t is not None:
                t.cancel()
        for t in [self._task, *self._tasks]:
            if t is not None:
                with contextlib.suppress(BaseException):
                    await t

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _on_state_change(self, kind: str, name: str) -> None:
        """Called by the StateStore, possibly from a worker thread."""
        if kind == inventory.KIND:
            self._loop.call_soon_threadsafe(self._poke.set)

    def poke(self) -> None:
        self._poke.set()

    @property
    def peers(self) -> Any:
        svc = self.daemon.services.get(PEERS)
        return svc if svc is not None and getattr(svc, "cluster", None) is not None else None

    def up_peers(self) -> list[str]:
        from cnvmd.peers.membership import DOWN

        svc = self.peers
        if svc is None:
            return []
        ms = svc.membership
        return sorted(m.name for m in ms.peers() if ms.state_of(m.name) != DOWN)

    def member_state(self, node: str) -> str:
        svc = self.peers
        if node == self.node:
            return "alive"
        if svc is None:
            return "unknown"
        return str(svc.membership.state_of(node))

    def teleport_capable(self, node: str) -> str | None:
        """Why `node` cannot receive a teleport (None: it can, or its caps are unknown
        and its preflight will say): CRIU must restore TCP connections."""
        svc = self.peers
        m = svc.membership.get(node) if svc is not None else None
        caps = m.caps if m is not None else {}
        if caps and caps.get("tcp_repair") is False:
            return "its CRIU cannot restore TCP connections"
        return None

    def _watch_membership(self) -> None:
        svc = self.peers
        if svc is None or self._unlisten is not None:
            return

        def on_event(ev: Any) -> None:
            if ev.kind == "removed":
                self._acked.pop(ev.name, None)
                self.dir.drop(ev.name)
            elif ev.kind in ("added", "state"):
                self._acked.pop(ev.name, None)  # back from down (or new): send ours again
                self._poke.set()

        self._unlisten = svc.membership.add_listener(on_event)

    # ---- the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_resync = loop.time()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), PERIOD)
            await asyncio.sleep(DEBOUNCE)
            self._poke.clear()
            try:
                self._watch_membership()
                await self.refresh()
                if loop.time() - last_resync > RESYNC:
                    last_resync = loop.time()
                    self._acked.clear()
                self.push()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("directory refresh failed")

    # ---- this node's document

    async def local_entries(self) -> list[Entry]:
        d = self.daemon
        recs, containers = await asyncio.gather(inventory.records(d), inventory.runc_list(d))
        by_id = {c["id"]: c for c in containers}
        out: list[Entry] = []
        for name, rec in recs.items():
            if not NAME_RE.fullmatch(name):
                continue
            c = by_id.get(rec.get("runc_id", name))
            s = inventory.summarize(d, name, rec, c)
            state = str(s["state"])
            if rec.get("desired") == "creating" and c is None:
                state = "creating"
            ip, mem, image, image_id = rec.get("ip"), rec.get("memory"), rec.get("image"), \
                rec.get("image_id")
            pid = s.get("pid")
            use = await asyncio.to_thread(_cgroup_memory, pid) \
                if isinstance(pid, int) and state in ("running", "paused") else None
            out.append(Entry(
                name=name, node=self.node, state=state if state in STATES else "unknown",
                ip=ip if isinstance(ip, str) and len(ip) <= 15 else None,
                memory=mem if isinstance(mem, int) and not isinstance(mem, bool) else None,
                mem_use=use,
                image=image if isinstance(image, str) and IMAGE_RE.fullmatch(image) else None,
                image_id=image_id if isinstance(image_id, str)
                and IMAGE_ID_RE.fullmatch(image_id) else None))
        return out

    async def local_resources(self) -> Resources:
        mi = await asyncio.to_thread(_meminfo)
        try:
            cpus = len(os.sched_getaffinity(0))
        except OSError:
            cpus = os.cpu_count() or 1
        images: list[str] = []
        life = self.daemon.services.get(LIFECYCLE)
        if life is not None:
            with contextlib.suppress(Exception):
                images = sorted(i.id for i in life.images.list()
                                if IMAGE_ID_RE.fullmatch(i.id))[:512]
        step = 16 << 20  # coarse, so that free memory's noise does not bump versions
        return Resources(mem_total=mi.get("MemTotal", 0),
                         mem_free=mi.get("MemAvailable", 0) // step * step,
                         cpus=max(1, cpus), load=round(os.getloadavg()[0], 1),
                         cordoned=self.cordoned, link_mbps=self.link_mbps, images=images)

    async def refresh(self) -> bool:
        """Re-read this node's cnvms and resources; True if the document changed.
        Serialised: a slow read must not overwrite a newer one."""
        async with self._refreshing:
            try:
                entries = await self.local_entries()
            except ProtoError as exc:  # runc unusable: keep what we said
                log.warning("directory: cannot list cnvms: %s", exc.message)
                return False
            changed = self.dir.set_local(entries, await self.local_resources())
        if changed:
            self.push()
        return changed

    async def set_cordoned(self, on: bool) -> None:
        self.cordoned = on
        await asyncio.to_thread(self.daemon.state.save, NODE_KIND, NODE_KEY, {"cordoned": on})
        await self.refresh()

    async def _link_speed(self) -> int:
        """Mbit/s of the interface that carries the peer mesh (0 if unknown)."""
        addr = getattr(self.daemon.config, "listen_address", "") or ""
        try:
            res = await proc.run(["ip", "-j", "-4", "addr", "show"], timeout=10, check=False)
            for link in json.loads(res.stdout or "[]"):
                ips = [a.get("local") for a in link.get("addr_info", [])]
                if addr in ips or (addr in ("", "0.0.0.0") and link.get("ifname") != "lo"
                                   and ips):
                    p = Path("/sys/class/net", str(link.get("ifname")), "speed")
                    v = int((await asyncio.to_thread(p.read_text)).strip())
                    return v if v > 0 else 0
        except Exception:
            return 0
        return 0

    # ---- spreading

    def push(self) -> None:
        """Send our document to every up member that has not acknowledged it."""
        mine = self.dir.mine
        for p in self.up_peers():
            if self._acked.get(p) != mine.order():
                self._spawn(self._push_one(p, mine))

    async def _push_one(self, node: str, doc: NodeDoc) -> None:
        svc = self.peers
        if svc is None:
            return
        try:
            ans = await svc.call(node, "dir.push", doc.to_wire(), timeout=PUSH_TIMEOUT)
        except ProtoError as exc:
            self._acked[node] = None
            log.debug("directory push to %s failed: %s", node, exc.message)
            return
        except Exception as exc:
            self._acked[node] = None
            log.debug("directory push to %s failed: %s", node, exc)
            return
        have = ans.get("have") if isinstance(ans, dict) else None
        if isinstance(have, list) and len(have) == 2 and tuple(have) == doc.order():
            self._acked[node] = doc.order()

    def absorb(self, sender: str, raw: Any) -> tuple[int, int] | None:
        """A pushed document (peer op dir.push); returns what we now hold of sender."""
        doc = parse_doc(sender, raw)
        prev = self.dir.docs.get(sender)
        if self.dir.absorb(doc) and (prev is None or prev.incarnation != doc.incarnation):
            self._acked.pop(sender, None)  # it (re)started: it needs ours
            self._poke.set()
        return self.dir.held(sender)

    # ---- name claims

    @contextlib.asynccontextmanager
    async def claim(self, name: str) -> AsyncIterator[None]:
        """Hold `name` cluster-wide for the duration of a deploy (module doc of
        cnvmd.cluster.directory). Raises CONFLICT or UNAVAILABLE."""
        d = self.dir
        for attempt in range(CLAIM_ATTEMPTS):
            why = d.local_conflict(name)
            if why is not None:
                here = any(e.node == self.node for e in d.where(name))
                raise ProtoError(ErrorCode.ALREADY_EXISTS if here else ErrorCode.CONFLICT,
                                 why, {"name": name})
            d.pending.add(name)
            d.lost.discard(name)
            try:
                peers = self.up_peers()
                svc = self.peers
                res: list[Any] = []
                if peers and svc is not None:
                    res = await asyncio.gather(
                        *(svc.call(p, "dir.claim", {"name": name}, timeout=PUSH_TIMEOUT)
                          for p in peers), return_exceptions=True)
                granted = [p for p, r in zip(peers, res, strict=True)
                           if isinstance(r, dict) and r.get("ok") is True]
                failed = [(p, r) for p, r in zip(peers, res, strict=True)
                          if isinstance(r, BaseException)]
                exists = [r for r in res if isinstance(r, dict) and r.get("why") == "exists"]
                if len(granted) == len(peers) and name not in d.lost:
                    d.deploying.add(name)
                    break
                await self._abandon(name, granted)
                if failed:
                    raise ProtoError(ErrorCode.UNAVAILABLE, f"cannot claim the name {name!r}: "
                                     + "; ".join(f"{p}: {r}" for p, r in failed)
                                     + " (retry once they are up, or marked down)")
                if exists:
                    raise ProtoError(ErrorCode.CONFLICT, f"a cnvm named {name!r} already "
                                     f"exists on {exists[0].get('node')}", {"name": name})
            finally:
                d.pending.discard(name)
                d.lost.discard(name)
            await asyncio.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
        else:
            raise ProtoError(ErrorCode.CONFLICT, f"{name!r} is being deployed on another "
                             "node", {"name": name})
        ok = False
        try:
            yield
            ok = True
        finally:
            try:
                await asyncio.shield(self.refresh())
            finally:
                d.deploying.discard(name)
            if not ok:
                self._spawn(self._abandon(name, self.up_peers()))

    async def _abandon(self, name: str, peers: list[str]) -> None:
        svc = self.peers
        if svc is None or not peers:
            return
        await asyncio.gather(*(svc.call(p, "dir.abandon", {"name": name}, timeout=PUSH_TIMEOUT)
                               for p in peers), return_exceptions=True)
