"""What cnvms exist on this node: records (state dir) reconciled with runc's view.

The daemon holds no container state in memory that it could lose: a cnvm *record*
(StateStore kind ``cnvms``, written by the lifecycle ops) says what should exist,
runc's state (``runc --root <runc_root> list``) says what does. At start the daemon
*adopts* every container already running in its runc root — after a crash or
restart, cnvms keep running and are managed again without being touched.

Record fields read here (all optional; the record's name is the cnvm name):
``runc_id`` (default: the name), ``image``, ``ip``, ``memory`` (bytes), ``desired``
("running" | "stopped" | "exited" | "restarting": with no container, "running"
shows as ``missing``, "exited" as ``exited (CODE)``), ``restart``/``restarts``/
``exit_code``/``exited_at`` (cnvmd.restart). Other
fields are passed through by ``inspect``. Lifecycle code adds columns by extending
`summarize`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnvmd import proc
from cnvmd.api import Args, Context, Router
from cnvmd.migration import journal
from cnvmd.runtime import Runc, RuncError
from cnvmd.services import NETWORK, PEERS, Plugin
from cnvmd.state import StateError
from proto.messages import CnvmSummary, ErrorCode, ProtoError

if TYPE_CHECKING:
    from cnvmd.daemon import Daemon

log = logging.getLogger("cnvmd.inventory")


@dataclasses.dataclass
class Adopted:
    """A container this daemon instance found running at start and took over."""

    runc_id: str
    pid: int
    at: float
router = Router()

KIND = "cnvms"
_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"


async def runc_list(daemon: Daemon) -> list[dict[str, Any]]:
    """Containers in this daemon's runc root, as maps (id, pid, status, bundle, created)."""
    cfg = daemon.config
    try:
        states = await Runc(cfg.runc_root, runc=cfg.runc, criu=cfg.criu).list()
    except (RuncError, proc.CommandError, ValueError) as exc:
        raise ProtoError(ErrorCode.UNAVAILABLE, f"cannot list containers: {exc}") from None
    return [dataclasses.asdict(st) for st in states]


def _load_records(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """All records; a corrupt one shows up as such instead of hiding the others."""
    out: dict[str, dict[str, Any]] = {}
    d = daemon.state.root / KIND
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            rec = daemon.state.load(KIND, p.stem)
        except StateError as exc:
            rec = {"corrupt": str(exc)}
        if rec is not None:
            out[p.stem] = rec
    return out


async def records(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return await asyncio.to_thread(_load_records, daemon)


def _parse_time(s: Any) -> float | None:
    if not isinstance(s, str):
        return None
    s = re.sub(r"(\.\d{6})\d+", r"\1", s)  # runc prints nanoseconds
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        return None


def summarize(daemon: Daemon, name: str, rec: dict[str, Any] | None,
              c: dict[str, Any] | None) -> CnvmSummary:
    """One cnvm as `ls` shows it, from its record and/or its runc container."""
    rec = rec or {}
    cid = rec.get("runc_id", name)
    state: str
    pid: int | None = None
    if "corrupt" in rec:
        state = "corrupt"
    elif c is not None:
        state = str(c.get("status", "unknown"))
        pid = c.get("pid") or None
    else:
        state = _ended_state(rec)
    a = daemon.adopted.get(cid)
    created = c.get("created") if c else None
    # Uptime counts from the last (re)start, which the record keeps and a teleport
    # carries along; runc's "created" is the restore on this node after a teleport.
    started = rec.get("started_at")
    t0 = float(started) if isinstance(started, (int, float)) else _parse_time(created)
    return {
        "name": name,
        "state": state,
        "pid": pid,
        "managed": bool(rec),
        "adopted": bool(a and pid == a.pid and state in ("running", "paused")),
        "image": rec.get("image"),
        "ip": rec.get("ip"),
        "memory": rec.get("memory"),
        "node": daemon.node_name,
        "created": created,
        "uptime": round(time.time() - t0, 1) if t0 and state == "running" else None,
        "restart": rec.get("restart") or "no",
        "restarts": int(rec.get("restarts") or 0),
        "exit_code": rec.get("exit_code"),
        "exited_at": rec.get("exited_at"),
    }


def _ended_state(rec: dict[str, Any]) -> str:
    """A cnvm without a live container: what its record says happened (cnvmd.restart)."""
    desired = rec.get("desired")
    if desired == "exited":
        code = rec.get("exit_code")
        return f"exited ({code if code is not None else '?'})"
    if desired == "restarting":
        return "restarting"
    return "missing" if desired == "running" else "stopped"


async def snapshot(daemon: Daemon) -> list[CnvmSummary]:
    """Every cnvm of this node: records joined with runc containers, sorted by name.

    Containers in our runc root without a record (a crash between `runc run` and the
    record write, or a restore in progress) are listed with managed=False rather
    than hidden.
    """
    recs, containers = await asyncio.gather(records(daemon), runc_list(daemon))
    by_id = {c["id"]: c for c in containers}
    rows = []
    for name, rec in recs.items():
        rows.append(summarize(daemon, name, rec, by_id.pop(rec.get("runc_id", name), None)))
    for cid, c in by_id.items():
        rows.append(summarize(daemon, cid, None, c))
    rows.sort(key=lambda r: r["name"])
    return rows


async def adopt(daemon: Daemon) -> None:
    """At start: take over every container already running in our runc root."""
    try:
        recs, containers = await asyncio.gather(records(daemon), runc_list(daemon))
    except ProtoError as exc:
        log.error("cannot look for running containers to adopt", extra={"error": exc.message})
        return
    managed = {rec.get("runc_id", name) for name, rec in recs.items()}
    now = time.time()
    for c in containers:
        if c.get("status") in ("running", "paused") and c.get("pid"):
            daemon.adopted[c["id"]] = Adopted(c["id"], int(c["pid"]), now)
            log.info("adopted running container", extra={
                "cnvm": c["id"], "pid": c["pid"], "status": c["status"],
                "managed": c["id"] in managed})
    missing = [n for n, r in recs.items() if r.get("desired") == "running"
               and r.get("runc_id", n) not in {c["id"] for c in containers}]
    if missing:
        log.warning("cnvms recorded as running have no container", extra={"cnvms": missing})


@router.op("ls")
async def ls(ctx: Context, args: Args) -> list[CnvmSummary]:
    """List this node's cnvms with their live state (runc) and whether adopted."""
    args.reject_unknown()
    return await snapshot(ctx.daemon)


@router.op("inspect")
async def inspect(ctx: Context, args: Args) -> dict[str, Any]:
    """One cnvm in detail: summary, full record, runc state, adoption."""
    name = args.str("name", pattern=_ID)
    args.reject_unknown()
    d = ctx.daemon
    try:
        rec = await asyncio.to_thread(d.state.load, KIND, name)
    except StateError as exc:
        rec = {"corrupt": str(exc)}
    containers = await runc_list(d)
    cid = (rec or {}).get("runc_id", name)
    c = next((c for c in containers if c["id"] == cid), None)
    if rec is None and c is None:
        raise ProtoError(ErrorCode.NOT_FOUND, f"no cnvm named {name!r} on {d.node_name}",
                         {"name": name})
    a = d.adopted.get(cid)
    out: dict[str, Any] = dict(summarize(d, name, rec, c))
    out["record"] = rec
    out["runc"] = c
    out["adoption"] = ({"pid": a.pid, "at": a.at, "by_instance": d.instance}
                       if a is not None and out["adopted"] else None)
    try:  # the last teleports (cnvmd.migration keeps them; they travel with the cnvm)
        kept = await asyncio.to_thread(d.state.load, "teleports", name)
    except StateError:
        kept = None
    out["teleports"] = (kept or {}).get("reports", [])
    out["teleport_sessions"] = await asyncio.to_thread(
        journal.unresolved, Path(d.config.state_dir), name)
    out["exposes"] = await _exposes_of(d, name)
    return out


async def _exposes_of(d: Any, name: str, timeout: float = 2.0) -> list[dict[str, Any]]:
    """The cnvm's published ports on every node (a port is published on one node and
    forwards to the cnvm wherever it runs). Nodes that do not answer within `timeout`
    are listed with an error instead of their ports, so inspect never hangs on them."""
    out: list[dict[str, Any]] = []
    net = d.services.get(NETWORK)
    if net is not None:
        out += [{**f.to_dict(), "node": d.node_name} for f in net.exposes(name)]
    svc = d.services.get(PEERS)
    if svc is None or getattr(svc, "cluster", None) is None:
        return out
    others = [m.name for m in svc.membership.active() if m.name != d.node_name]

    async def one(node: str) -> list[dict[str, Any]]:
        try:
            r = await svc.forward(node, "exposes", {"name": name}, timeout=timeout)
        except Exception as exc:  # an unreachable node is reported, not fatal
            return [{"node": node, "error": str(exc) or type(exc).__name__}]
        return [{**f, "node": node} for f in (r or {}).get("exposes", [])]

    for part in await asyncio.gather(*(one(n) for n in others)):
        out += part
    return out


plugin = Plugin("inventory", router=router)
