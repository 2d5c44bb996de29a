"""The undo stack of a teleport side: each side effect pushes its undo as it happens.

Why a stack and not flags: rollback is the reverse of what was done, exactly, and a
new step (say, pausing the cnvm earlier) brings its own undo instead of a new flag
that every rollback branch must consider. The stack is mirrored to the session's
journal *before* each effect is made (write-ahead), so a restarted daemon unwinds
the same effects (cnvmd.migration.recovery) with the same undo functions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proto.messages import ErrorCode, ProtoError

log = logging.getLogger("cnvmd.teleport")

Undo = Callable[[], Awaitable[None]]


class FaultInjected(ProtoError):
    """A test hook failed the teleport right after a side effect (fault_injection)."""

    def __init__(self, step: str) -> None:
        super().__init__(ErrorCode.FAILED, f"fault injected after {step}", {"fault": step})


@dataclass
class _Entry:
    effect: str
    undo: Undo


class UndoStack:
    """Effects in the order made; `unwind` undoes them last-first, each once."""

    def __init__(self, journal: Callable[[list[str]], Awaitable[None]] | None = None,
                 fail_at: str | None = None) -> None:
        self._entries: list[_Entry] = []
        self._journal = journal
        self.fail_at = fail_at

    @property
    def effects(self) -> list[str]:
        return [e.effect for e in self._entries]

    def __contains__(self, effect: str) -> bool:
        return any(e.effect == effect for e in self._entries)

    async def push(self, effect: str, undo: Undo) -> None:
        """Record `effect` (journal first), to be undone by `undo`. Call just before
        making the effect: the undo must tolerate an effect that did not happen."""
        self._entries.append(_Entry(effect, undo))
        if self._journal is not None:
            await self._journal(self.effects)

    def done(self, step: str) -> None:
        """A step (effect or milestone) completed: the fault hook may fail here."""
        if self.fail_at == step:
            raise FaultInjected(step)

    async def unwind(self) -> list[str]:
        """Undo everything, last first; an undo that fails is logged and the rest still
        run (the cnvm must come back whatever one step does). Returns what was undone."""
        out: list[str] = []
        while self._entries:
            e = self._entries.pop()
            try:
                await e.undo()
                out.append(e.effect)
            except Exception as exc:
                log.exception("undo of %s failed", e.effect)
                out.append(f"{e.effect} (failed: {exc})")
            if self._journal is not None:
                try:
                    await self._journal(self.effects)
                except OSError:  # the session dir itself was the last thing undone
                    pass
        return out

    def forget(self) -> None:
        """The switchover: what was done now belongs to the new owner; nothing to undo."""
        self._entries.clear()
