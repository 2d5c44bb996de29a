"""The record of one teleport, versioned because reports are kept on disk.

Readers accept any version <= REPORT_VERSION; fields are only ever added.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cnvmd.state import StateError, StateStore

REPORT_VERSION = 1


@dataclass
class RoundReport:
    kind: str  # "predump", "dump", "lazy"
    bytes: int
    seconds: float


@dataclass
class Step:
    """One step of the frozen window: who (source/target), what, when and how long.

    `start_ms` counts from the moment the cnvm was frozen; `clock` says whose clock
    measured it ("cnvmd", or "criu" for stages read from CRIU's log timestamps, placed
    after the CRIU run's own start)."""

    side: str
    step: str
    start_ms: float
    ms: float
    clock: str = "cnvmd"


# Stages of CRIU's logs: (name, first line marker, marker that ends it). A stage
# whose markers are missing (another CRIU version, another mode) is left out.
DUMP_STAGES = (
    ("criu start, kernel probe", None, "Dumping processes"),
    ("freeze and seize tasks", "freezing cgroup", "net: Lock network"),
    ("network lock", "net: Lock network", "Dumping task"),
    ("dump tasks (memory, files, sockets)", "Dumping task", "Unfreezing tasks"),
    ("dump tasks (all but the lazy pages)", "Dumping task", "Starting lazy pages server"),
    ("let go of the tasks", "Unfreezing tasks", "Dumping finished"),
)
_LAZY = "Starting lazy pages server"  # a lazy dump: its later stages run after the switch
RESTORE_STAGES = (
    ("criu start, kernel probe", None, "Will dump/restore TCP connections"),
    ("cgroups", "Preparing cgroups yard", "Running pre-restore scripts"),
    ("namespaces, mounts, fork", "Running pre-restore scripts",
     "Running post-setup-namespaces scripts"),
    ("memory, files, sockets", "Running post-setup-namespaces scripts",
     "Running post-restore scripts"),
    ("network unlock", "Running network-unlock scripts", "Turning repair off"),
    ("repair off, resume", "Turning repair off", "Restore finished successfully"),
)
_TS = re.compile(r"\((\d+)\.(\d{6})\) ")


def criu_stages(text: str, stages: tuple[tuple[str, str | None, str], ...],
                side: str, offset_ms: float) -> list[Step]:
    """Durations of CRIU's stages from the "(SS.uuuuuu)" stamps of its log lines."""
    first: dict[str, float] = {}
    for line in text.splitlines():
        m = _TS.search(line)
        if m is None:
            continue
        t = int(m.group(1)) * 1000 + int(m.group(2)) / 1000
        for _name, a, b in (*stages, ("", _LAZY, _LAZY)):
            for marker in (a, b):
                if marker is not None and marker not in first and marker in line:
                    first[marker] = t
    out: list[Step] = []
    lazy = _LAZY in first
    for name, a, b in stages:
        if lazy and b != _LAZY and b in ("Unfreezing tasks", "Dumping finished"):
            continue
        start = 0.0 if a is None else first.get(a)
        end = first.get(b)
        if start is None or end is None or end < start:
            continue
        out.append(Step(side, f"criu: {name}", round(offset_ms + start, 2),
                        round(end - start, 2), "criu"))
    return out


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
    timeline: list[Step] = field(default_factory=list)
    """Where the frozen time went (see `Step`)."""
    version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeleportReport:
        """Parse a kept or received report; ValueError if it is not one."""
        if not isinstance(d, dict):
            raise ValueError("a report must be a map")
        version = d.get("version", 1)
        if not isinstance(version, int) or version > REPORT_VERSION:
            raise ValueError(f"teleport report version {version!r} is newer than this "
                             "cnvmd reads (or not a version)")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("cnvm", "source", "target", "mode", "mode_reason", "error"):
            if not isinstance(known.get(k, ""), str) or len(known.get(k, "")) > 4096:
                raise ValueError(f"{k} must be a string")
        rounds = d.get("rounds", [])
        if not isinstance(rounds, list) or len(rounds) > 1000:
            raise ValueError("rounds must be a list")
        known["rounds"] = [RoundReport(str(r["kind"]), int(r["bytes"]), float(r["seconds"]))
                           for r in rounds]
        steps = d.get("timeline", [])
        if not isinstance(steps, list) or len(steps) > 200:
            raise ValueError("timeline must be a list")
        known["timeline"] = [Step(str(x["side"])[:16], str(x["step"])[:80],
                                  float(x["start_ms"]), float(x["ms"]),
                                  str(x.get("clock", "cnvmd"))[:8]) for x in steps]
        phases = known.get("phases", {})
        if not isinstance(phases, dict) or len(phases) > 100:
            raise ValueError("phases must be a map")
        return cls(**known)


KIND_REPORTS = "teleports"
MAX_REPORTS = 10


def save_reports(state: StateStore, name: str, reports: list[dict[str, Any]]) -> None:
    """Keep the last MAX_REPORTS reports of a cnvm (they travel with it); blocking."""
    state.save(KIND_REPORTS, name, {"reports": reports[-MAX_REPORTS:]})


def load_reports(state: StateStore, name: str) -> list[dict[str, Any]]:
    try:
        d = state.load(KIND_REPORTS, name)
    except StateError:
        return []
    return list((d or {}).get("reports", []))


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
