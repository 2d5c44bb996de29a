"""The record of one teleport, versioned because reports are kept on disk.

Readers accept any version <= REPORT_VERSION; fields are only ever added.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_VERSION = 1


@dataclass
class RoundReport:
    kind: str  # "predump", "dump", "lazy"
    bytes: int
    seconds: float


@dataclass
class TeleportReport:
    cnvm: str
    source: str
    target: str
    mode: str = ""
    mode_reason: str = ""
    ok: bool = False
    error: str = ""
    rolled_back: bool = False
    started_at: float = field(default_factory=time.time)
    rounds: list[RoundReport] = field(default_factory=list)
    frozen_seconds: float = 0.0
    total_seconds: float = 0.0
    wire_bytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    client_stall_seconds: float | None = None
    version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeleportReport:
        if int(d.get("version", 1)) > REPORT_VERSION:
            raise ValueError(f"teleport report version {d['version']} is newer than this cnvmd")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["rounds"] = [RoundReport(**r) for r in d.get("rounds", [])]
        return cls(**known)


LOG_CAP = 4 << 20  # bytes kept per log file (its tail): CRIU at -v4 can write a lot


def keep_logs(session_dir: Path, state_dir: Path, name: str, role: str) -> Path | None:
    """Copy a teleport session's logs (CRIU dump/restore/lazy-pages, runc) to
    ``<state_dir>/teleport-logs/<name>/<role>/`` before the session dir goes away, so
    an operator can still read why the last teleport took long or failed. Replaces
    the previous teleport's logs of that cnvm and role; blocking (run in a thread)."""
    logs: list[Path] = []
    for root, dirs, files in os.walk(session_dir):
        # never into a mounted rootfs, and not deep: the logs sit at the top levels
        depth = len(Path(root).relative_to(session_dir).parts)
        dirs[:] = [] if depth >= 2 else [
            d for d in dirs if not os.path.ismount(os.path.join(root, d))]
        logs += [Path(root, f) for f in files if f.endswith(".log")]
    if not logs:
        return None
    dest = state_dir / "teleport-logs" / name / role
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for p in logs:
        rel = p.relative_to(session_dir)
        out = dest / "_".join(rel.parts)
        with open(p, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - LOG_CAP))
            out.write_bytes(f.read())
    return dest
