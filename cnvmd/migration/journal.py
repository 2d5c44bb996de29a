"""Versioned on-disk state of a teleport session, one file per side and session.

Why: a daemon can be killed at any instant of a teleport while the cnvm is frozen,
its sockets in repair mode, CRIU running, a netns half made. The next daemon reads
this file and resolves the session from it (cnvmd.migration.recovery): the side
effects done so far are listed here *before* each is made (write-ahead), so every
one of them is undone, each undo tolerating an effect that did not happen.

Written durably (fsync of the file, then of its directory and the one above, ~0.3 ms
here, in a thread): it must survive the host's reset as well as the daemon's death.
A reset loses the frozen cnvm, but not what the journal says about it: a source
reset after the switchover must still know that it gave the cnvm away (else its
stale record would name a second copy), and a page cache that had not been written
back yet (30 s on Debian) would hand the next daemon an older phase.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cnvmd.migration import wire

SCHEMA = 2
"""2: phase ``confirm``, ``lease``/``restore_sent`` (fenced switchover, issue 18); a
daemon reading only 1 leaves such a session alone instead of resuming it blindly."""
FILE = "session.json"


class JournalError(Exception):
    """The file is unreadable or of a newer schema: leave the session alone, say why."""


@dataclass
class SourceJournal:
    sid: str
    name: str
    target: str
    mode: str = ""
    phase: str = "preflight"
    effects: list[str] = field(default_factory=list)
    """Side effects in the order made (write-ahead); unwound in reverse."""
    netns: str = ""
    host_veth: str = ""
    neighbors: list[dict[str, str]] = field(default_factory=list)
    lazy: bool = False
    lease: float = 30.0
    restore_sent: float = 0.0
    """Wall-clock time the restore request left (the source's lease runs from it)."""
    pid: int = 0
    schema: int = SCHEMA


@dataclass
class TargetJournal:
    sid: str
    name: str
    source: str
    phase: str = "prepared"
    effects: list[str] = field(default_factory=list)
    lease: float = 30.0
    pid: int = 0
    schema: int = SCHEMA


def save(directory: Path, j: SourceJournal | TargetJournal) -> None:
    """Replace the session file (blocking: call in a thread)."""
    j.pid = os.getpid()
    tmp = directory / f".{FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(asdict(j), sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / FILE)
    for d in (directory, directory.parent):  # the rename, and the session dir's entry
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _load(directory: Path) -> dict[str, Any]:
    try:
        fd = os.open(directory / FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise JournalError(f"{directory / FILE}: {exc.strerror}") from None
    try:
        raw = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise JournalError(f"{directory / FILE}: not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise JournalError(f"{directory / FILE}: not a map")
    schema = d.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA:
        raise JournalError(f"{directory / FILE}: schema {schema!r}, this cnvmd reads "
                           f"<= {SCHEMA}")
    if not isinstance(d.get("sid"), str) or not wire.SID_RE.fullmatch(d["sid"]):
        raise JournalError(f"{directory / FILE}: bad session id")
    if not isinstance(d.get("name"), str) or not wire.NAME_RE.fullmatch(d["name"]):
        raise JournalError(f"{directory / FILE}: bad cnvm name")
    return d


def _fields(cls: type[Any], d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k in cls.__dataclass_fields__}


def load_source(directory: Path) -> SourceJournal:
    return SourceJournal(**_fields(SourceJournal, _load(directory)))


def load_target(directory: Path) -> TargetJournal:
    return TargetJournal(**_fields(TargetJournal, _load(directory)))


def unresolved(state_dir: Path, name: str) -> list[dict[str, str]]:
    """Teleport sessions of cnvm `name` still on disk here (shown by `inspect`: while a
    teleport runs, or when a restarted daemon could not resolve one). Blocking."""
    out = []
    for side, role, load in (("out", "source", load_source), ("in", "target", load_target)):
        try:
            dirs = sorted((state_dir / "teleport" / side).iterdir())
        except OSError:
            continue
        for d in dirs:
            try:
                j = load(d)
            except JournalError as exc:
                out.append({"sid": d.name, "side": role, "phase": "unreadable",
                            "error": str(exc)})
                continue
            if j.name == name:
                out.append({"sid": j.sid, "side": role, "phase": j.phase,
                            "effects": ",".join(j.effects)})
    return out
