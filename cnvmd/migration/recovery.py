"""Resolve the teleport sessions a killed daemon left, from their journals.

Runs once at start, after the lifecycle, network and peer services (the plug-in
requires them), before this node serves peers again. Idempotent: each undo
tolerates an effect that is already gone, and a session is forgotten (its dir
removed) only once resolved, so a crash during recovery is recovered next time.

Source side: if the switchover was confirmed, only forward cleanup is left (the
local copy goes); if the restore request was sent (phases ``restore``/``confirm``),
the cnvm stays frozen and a background task settles the outcome with the target
(cnvmd.migration.outcome: never resumed on silence once a confirm may have left);
otherwise the effects are unwound (CRIU killed with the tasks frozen, network
unlocked, veth up, repair off, thawed) and the target told to abort.
Target side: a confirmed cnvm is kept; anything short of that, a *fenced* copy
included, is unwound (its source learns ``unknown`` and resumes its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cnvmd import netlink
from cnvmd.migration import journal, netmove, outcome, wire
from cnvmd.migration import link as links
from cnvmd.migration.source import (
    Effect,
    Phase,
    SourceUndo,
    kill_session_procs,
    relay_status,
    target_down,
)
from cnvmd.migration.target import TargetUndo, kill_criu_helpers
from cnvmd.migration.undo import UndoStack
from cnvmd.runtime import Runc, _umount_under
from cnvmd.services import LIFECYCLE, PEERS
from proto.messages import ProtoError

if TYPE_CHECKING:
    from cnvmd.migration.ops import Teleports

log = logging.getLogger("cnvmd.teleport")

async def recover(engine: Teleports) -> None:
    daemon = engine.daemon
    base = Path(daemon.config.state_dir) / "teleport"
    for d in await asyncio.to_thread(_dirs, base / "out"):
        await _recover_source(engine, d)
    for d in await asyncio.to_thread(_dirs, base / "in"):
        await _recover_target(engine, d)


def _dirs(p: Path) -> list[Path]:
    try:
        return sorted(x for x in p.iterdir() if x.is_dir() and not x.is_symlink())
    except OSError:
        return []


async def _drop(d: Path) -> None:
    await asyncio.to_thread(_umount_under, d)
    await asyncio.to_thread(shutil.rmtree, d, True)


async def _recover_source(engine: Teleports, d: Path) -> None:
    daemon = engine.daemon
    try:
        j = await asyncio.to_thread(journal.load_source, d)
    except journal.JournalError as exc:
        log.error("teleport session %s left as is: %s", d.name, exc)
        return
    peers = daemon.services.get(PEERS)
    link = links.PeerLink(peers, j.target) if peers is not None else None
    runc = Runc(daemon.config.runc_root, daemon.config.runc, engine.criu)
    u = SourceUndo(runc, j, d, link)
    phase = Phase(j.phase) if j.phase in Phase._value2member_map_ else Phase.PREFLIGHT
    switched = phase in (Phase.SWITCHED, Phase.COMMIT, Phase.DONE)
    if phase in (Phase.RESTORE, Phase.CONFIRM) and link is not None:
        log.warning("teleport %s of %s: restart with the outcome unknown (phase %s); the "
                    "cnvm stays frozen until %s answers", j.sid, j.name, j.phase, j.target)
        engine.spawn(_settle(engine, d, j, u, link, confirm_sent=phase is Phase.CONFIRM))
        return
    if switched:
        await _forward(engine, d, j, link)
        return
    await _unwind(d, j, u)


async def _settle(engine: Teleports, d: Path, j: journal.SourceJournal, u: SourceUndo,
                  link: links.NodeLink, *, confirm_sent: bool) -> None:
    async def before_confirm() -> None:
        j.phase = str(Phase.CONFIRM)
        await asyncio.to_thread(journal.save, d, j)

    verdict = await outcome.settle(
        link, j.sid, first=None, confirm_sent=confirm_sent, lease_end=j.restore_sent + j.lease,
        target_down=lambda: target_down(engine.daemon, j.target), before_confirm=before_confirm,
        relay=lambda: relay_status(engine.daemon, j.target, j.sid))
    log.warning("teleport %s of %s settled after the restart: it runs on %s", j.sid, j.name,
                j.target if verdict is outcome.Verdict.TARGET else "this node")
    if verdict is outcome.Verdict.TARGET:
        j.phase = str(Phase.SWITCHED)
        await asyncio.to_thread(journal.save, d, j)
        await _forward(engine, d, j, link)
    else:
        await _unwind(d, j, u)


async def _forward(engine: Teleports, d: Path, j: journal.SourceJournal,
                   link: links.NodeLink | None) -> None:
    daemon = engine.daemon
    log.warning("teleport %s: %s moved to %s before the restart; releasing the local "
                "copy", j.sid, j.name, j.target)
    await asyncio.to_thread(kill_session_procs, d)
    life = daemon.services.require(LIFECYCLE)
    await life.release(j.name)
    with contextlib.suppress(Exception):
        await netmove.plumbing(daemon).destroy(j.name)
    if j.host_veth:
        with contextlib.suppress(Exception):
            await netlink.link_del(j.host_veth)
    if j.netns:
        with contextlib.suppress(Exception):
            await netlink.netns_del(os.path.basename(j.netns))
    if link is not None:
        with contextlib.suppress(ProtoError):
            await link.call("teleport.commit", wire.Commit(j.sid).to_wire(), timeout=10)
    await _drop(d)


async def _unwind(d: Path, j: journal.SourceJournal, u: SourceUndo) -> None:
    log.warning("teleport %s of %s was interrupted by a restart in phase %s: resuming the "
                "cnvm here (undoing %s)", j.sid, j.name, j.phase, ", ".join(j.effects))
    stack = UndoStack()
    for e in j.effects:
        if e in Effect._value2member_map_:
            await stack.push(e, u.undo(e))
    if str(Effect.CRIU) not in j.effects:  # CRIU may have been started right before
        await asyncio.to_thread(kill_session_procs, d)
    done = await stack.unwind()
    log.info("teleport %s: source recovered: %s", j.sid, ", ".join(done))
    await _drop(d)


async def _recover_target(engine: Teleports, d: Path) -> None:
    side = engine.target
    if d.name in side.sessions:  # arrived after this start: alive
        return
    try:
        j = await asyncio.to_thread(journal.load_target, d)
    except journal.JournalError as exc:
        log.error("teleport session %s: %s; removing its directory only", d.name, exc)
        await _drop(d)
        return
    if j.phase in (str(wire.TargetStatus.RESTORED), str(wire.TargetStatus.COMMITTED)):
        log.info("teleport %s: %s arrived before the restart; keeping it", j.sid, j.name)
        await _drop(d)
        return
    log.warning("teleport %s of %s from %s was interrupted by a restart: unwinding %s",
                j.sid, j.name, j.source, ", ".join(j.effects))
    u = TargetUndo(side, j.name, d)
    stack = UndoStack()
    for e in j.effects:
        with contextlib.suppress(ValueError):
            await stack.push(e, u.undo(e))
    await asyncio.to_thread(kill_criu_helpers, d)
    await stack.unwind()
    await _drop(d)
