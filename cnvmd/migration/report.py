"""The record of one teleport, versioned because reports are kept on disk.

Readers accept any version <= REPORT_VERSION; fields are only ever added.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
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
