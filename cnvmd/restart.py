"""Restart policies and the exit watcher (`deploy --restart no|on-failure[:N]|always`).

Why the daemon is a child subreaper: `runc run -d` (and `runc restore -d`) leave the
cnvm's init without a parent; with PR_SET_CHILD_SUBREAPER the kernel hands it to
the daemon, so its exit status can be read (`waitid` on a pidfd), as containerd's
shim does. A cnvm adopted after a daemon restart is not our child: its exit is
seen (pidfd / runc state) but its status is unknown (``exit_code: null``).

How exits are seen: a pidfd per running cnvm, readable when its init exits; plus a
poll of runc's view every POLL seconds that picks up cnvms started elsewhere
(teleport arrivals, rollbacks, adoption) and exits that happened while the daemon
was down.

What an exit does (under the cnvm's lifecycle lock, so never during a user op or a
teleport): nothing unless the record says ``desired: running`` (a user `stop` sets
``stopped`` first, a teleport's source holds the lock and then drops the record).
It records ``exit_code``/``exited_at`` and emits ``die``; then, per policy, either
the cnvm ends (``desired: exited``, shown as "exited (N)") or, after a backoff like
docker's (100 ms doubling up to BACKOFF_MAX, back to 100 ms after RESET_AFTER s of
running), it is started again from its bundle and ``restarts`` counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnvmd import bundle, events
from cnvmd.runtime import RuncError
from cnvmd.services import EVENTS, LIFECYCLE, Plugin
from cnvmd.state import StateError
from proto.messages import ErrorCode, ProtoError

if TYPE_CHECKING:
    from cnvmd.lifecycle import Lifecycle

log = logging.getLogger("cnvmd.restart")

RESTART_RE = re.compile(r"no|always|on-failure(:[0-9]{1,4})?")
"""A restart policy as kept in records and sent in teleport specs (full match)."""
BACKOFF_START = 0.1
BACKOFF_MAX = 60.0
RESET_AFTER = 10.0
POLL = 1.0
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Policy:
    kind: str  # no | on-failure | always
    max_restarts: int = 0  # on-failure:N; 0 = no limit

    def __str__(self) -> str:
        if self.kind == "on-failure" and self.max_restarts:
            return f"on-failure:{self.max_restarts}"
        return self.kind

    def wants_restart(self, exit_code: int | None, restarts: int) -> bool:
        """Should a cnvm that exited with `exit_code` (None: unknown, counted as a
        failure) and was restarted `restarts` times be started again?"""
        if self.kind == "always":
            return True
        if self.kind == "on-failure":
            return exit_code != 0 and (not self.max_restarts or restarts < self.max_restarts)
        return False


def parse_policy(raw: Any) -> Policy:
    """``no`` | ``always`` | ``on-failure`` | ``on-failure:N`` (1 <= N <= 1000)."""
    if raw is None or raw == "":
        return Policy("no")
    if not isinstance(raw, str) or not RESTART_RE.fullmatch(raw):
        raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                         f"bad restart policy {str(raw)[:40]!r}: no, always, on-failure "
                         "or on-failure:N")
    kind, _, n = raw.partition(":")
    if n:
        if not 1 <= int(n) <= 1000:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT,
                             "on-failure:N takes 1 <= N <= 1000 restarts")
        return Policy(kind, int(n))
    return Policy(kind)


def next_delay(prev: float | None, ran: float | None) -> float:
    """Docker's backoff: 100 ms, doubling, capped; reset after a run of RESET_AFTER s."""
    if prev is None or ran is None or ran >= RESET_AFTER:
        return BACKOFF_START
    return min(prev * 2, BACKOFF_MAX)


def set_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _children() -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for t in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                out.update(int(x) for x in (t / "children").read_text().split())
    return out


def _zombies(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rpartition(")")[2].split()[0] == "Z":
                out.add(pid)
    return out


def _records(life: Lifecycle) -> dict[str, dict[str, Any]]:
    """The cnvm records; a corrupt one is skipped here (`ls` shows it as such)."""
    out: dict[str, dict[str, Any]] = {}
    d = life.state.root / "cnvms"
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        with contextlib.suppress(StateError):
            rec = life.state.load("cnvms", p.stem)
            if rec is not None:
                out[p.stem] = rec
    return out


class Supervisor:
    """Watches the node's cnvms and applies their restart policies (one per daemon)."""

    def __init__(self, life: Lifecycle, bus: events.EventBus | None) -> None:
        self.life = life
        self.bus = bus
        self._watch: dict[str, tuple[int, int]] = {}  # name -> (pid, pidfd)
        self._busy: set[str] = set()
        self._delay: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._old_zombies: set[int] = set()

    # ---- watching

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        for t in [*self._tasks, *([self._poller] if self._poller else [])]:
            t.cancel()
        for t in [*self._tasks, *([self._poller] if self._poller else [])]:
            with contextlib.suppress(BaseException):
                await t
        for name in list(self._watch):
            self._unwatch(name)

    def watch(self, name: str, pid: int) -> None:
        """Be told when `pid` (the cnvm's init) exits."""
        cur = self._watch.get(name)
        if cur is not None and cur[0] == pid:
            return
        self._unwatch(name)
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already gone: the poll sees it stopped
            return
        self._watch[name] = (pid, fd)
        asyncio.get_running_loop().add_reader(fd, self._on_exit, name, pid, fd)

    def _unwatch(self, name: str) -> None:
        cur = self._watch.pop(name, None)
        if cur is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(cur[1])
            with contextlib.suppress(OSError):
                os.close(cur[1])

    def _on_exit(self, name: str, pid: int, fd: int) -> None:
        code: int | None = None
        try:  # our child (subreaper): its status; else unknown
            res = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            if res is not None:
                code = res.si_status if res.si_code == os.CLD_EXITED else 128 + res.si_status
        except (ChildProcessError, OSError):
            code = None
        if self._watch.get(name, (None,))[0] == pid:
            self._unwatch(name)
        self._spawn(self.handle_exit(name, pid, code, time.time()))

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("restart watcher poll failed")
            await asyncio.sleep(POLL)

    async def poll(self) -> None:
        """Watch running cnvms we do not watch yet; act on exits nobody saw.

        A watched cnvm costs nothing here (its pidfd tells its exit), so in the steady
        state this runs no runc at all: only a cnvm that arrived (teleport), was
        adopted, or whose exit happened while the daemon was down is looked up."""
        await self._reap_orphans()
        life = self.life
        recs = await asyncio.to_thread(_records, life)
        for name, rec in recs.items():
            desired = rec.get("desired")
            if (desired not in ("running", "restarting") or name in self._watch
                    or name in self._busy or life.lock(name).locked()):
                continue
            c = await life.runc.state(rec.get("runc_id", name))
            if life.lock(name).locked():
                continue  # an op began meanwhile: it decides
            if c is not None and c.status in ("running", "paused", "created") and c.pid:
                if desired == "running":
                    self.watch(name, c.pid)
                continue
            self._spawn(self.handle_exit(name, None, None, time.time()))

    async def _reap_orphans(self) -> None:
        """Zombies of orphans we inherited as subreaper and nobody waits for (seen
        twice, a second apart: asyncio reaps its own children at once)."""
        watched = {pid for pid, _ in self._watch.values()}
        z = await asyncio.to_thread(lambda: _zombies(_children() - watched))
        for pid in z & self._old_zombies:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: never blocks
        self._old_zombies = z - self._old_zombies

    # ---- acting on an exit

    def _emit(self, action: str, name: str, **attrs: Any) -> None:
        if self.bus is not None:
            self.bus.emit("cnvm", action, name, **attrs)

    async def handle_exit(self, name: str, pid: int | None, code: int | None,
                          at: float) -> None:
        if name in self._busy:
            return
        self._busy.add(name)
        try:
            delay = await self._after_exit(name, pid, code, at)
            if delay is None:
                return
            await asyncio.sleep(delay)
            await self._restart(name)
        except Exception:  # a corrupt record, runc gone...: the next poll tries again
            log.exception("handling the exit of a cnvm failed", extra={"cnvm": name})
        finally:
            self._busy.discard(name)

    async def _after_exit(self, name: str, pid: int | None, code: int | None,
                          at: float) -> float | None:
        """Record the exit; the backoff delay if the policy restarts it, else None."""
        life = self.life
        lock = life.lock(name)
        # Wait out a user op or a teleport, then see what it left without holding the
        # lock: a `stop` followed by a `teleport` must not find the cnvm busy with us.
        async with lock:
            pass
        rec = await life.record(name)
        if rec is None or rec.get("desired") not in ("running", "restarting"):
            return None
        async with lock:
            rec = await life.record(name)
            if rec is None:
                return None
            st = await life.runc.state(rec.get("runc_id", name))
            if st is not None and st.status in ("running", "paused", "created"):
                if st.pid and st.pid != pid:
                    self.watch(name, st.pid)  # e.g. a teleport's rollback restored it
                return None
            desired = rec.get("desired")
            if desired == "restarting":  # a restart was due when the daemon went away
                return BACKOFF_START
            if desired != "running":
                return None  # stopped by the user, or being deployed/started
            policy = parse_policy(rec.get("restart"))
            restarts = int(rec.get("restarts") or 0)
            started = rec.get("started_at")
            ran = at - float(started) if isinstance(started, int | float) else None
            rec["exit_code"], rec["exited_at"] = code, at
            self._emit("die", name, exit_code=code, ran=round(ran, 3) if ran else None)
            log.info("cnvm exited", extra={"cnvm": name, "exit_code": code,
                                           "policy": str(policy)})
            if not policy.wants_restart(code, restarts):
                rec["desired"] = "exited"
                await life.save_record(name, rec)
                with contextlib.suppress(RuncError):
                    await life.runc.destroy(rec.get("runc_id", name))
                await bundle.unmount_rootfs(life.paths(name))
                self._delay.pop(name, None)
                return None
            delay = next_delay(self._delay.get(name), ran)
            self._delay[name] = delay
            rec["desired"] = "restarting"
            rec["restart_at"] = time.time() + delay
            await life.save_record(name, rec)
            return delay

    async def _restart(self, name: str) -> None:
        life = self.life
        async with life.lock(name):
            rec = await life.record(name)
            if rec is None or rec.get("desired") != "restarting":
                return  # stopped or removed during the backoff
            try:
                st = await life.restart_in_place(name, rec)
            except (ProtoError, RuncError, OSError) as exc:
                msg = getattr(exc, "message", None) or str(exc)
                log.error("restart failed", extra={"cnvm": name, "error": msg})
                rec["desired"] = "exited"
                rec["restart_error"] = msg[:500]
                await life.save_record(name, rec)
                self._emit("restart_failed", name, error=msg[:200])
                return
            rec["restarts"] = int(rec.get("restarts") or 0) + 1
            rec.pop("restart_at", None)
            await life.save_record(name, rec)
            if st is not None and st.pid:
                self.watch(name, st.pid)
            self._emit("restart", name, restarts=rec["restarts"],
                       delay=self._delay.get(name))


# --------------------------------------------------------------------------- plug-in


async def start_supervisor(daemon: Any) -> None:
    if not set_subreaper():
        log.warning("cannot become child subreaper: exit codes of cnvms are unknown")
    life = daemon.services.require(LIFECYCLE)
    sup = Supervisor(life, daemon.services.get(EVENTS))
    life.supervisor = sup
    daemon.restart_supervisor = sup


async def serve_supervisor(daemon: Any) -> None:
    """Polling starts once every plug-in has started: teleport sessions a killed
    daemon left are resolved by then (a cnvm they froze or dumped is not an exit)."""
    sup = getattr(daemon, "restart_supervisor", None)
    if sup is not None:
        sup.start()


async def stop_supervisor(daemon: Any) -> None:
    sup = getattr(daemon, "restart_supervisor", None)
    if sup is not None:
        await sup.stop()


plugin = Plugin("restart", requires=("lifecycle", "events"), start=start_supervisor,
                serve=serve_supervisor, stop=stop_supervisor)
