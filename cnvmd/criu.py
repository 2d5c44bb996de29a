"""CRIU discovery and capability probing.

cnvm needs CRIU >= 4.2 on kernels >= 6.16 (older releases cannot dump TCP
sockets there). Which migration modes are possible depends on what this kernel
offers (soft-dirty tracking for pre-copy, userfaultfd for post-copy), so the
daemon probes instead of assuming.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from cnvmd import proc

MIN_VERSION = (4, 2)
PIPE_MAX_SIZE_PATH = "/proc/sys/fs/pipe-max-size"
# CRIU's lazy page server needs a 819-page tee pipe; without CAP_SYS_RESOURCE it
# can only get one if the system limit allows it (see shared platform notes).
LAZY_PIPE_MIN = 4 * 1024 * 1024


class CriuError(Exception):
    """CRIU is missing, too old, or fails its self-check."""


def parse_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", text, re.M)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


async def version(criu: str) -> tuple[int, ...]:
    try:
        res = await proc.run([criu, "--version"], timeout=20)
    except proc.CommandError as exc:
        raise CriuError(f"cannot run CRIU at {criu!r} ({exc}); run scripts/install-deps") from None
    v = parse_version(res.stdout)
    if v is None:
        raise CriuError(f"cannot parse `{criu} --version` output: {res.stdout.strip()!r}")
    return v


async def require(criu: str) -> tuple[int, ...]:
    """Return CRIU's version, or raise a one-line error saying what to do."""
    v = await version(criu)
    if v < MIN_VERSION:
        raise CriuError(
            f"CRIU {'.'.join(map(str, v))} at {criu} is too old: cnvm needs >= "
            f"{'.'.join(map(str, MIN_VERSION))}; run scripts/install-deps"
        )
    return v


async def has_feature(criu: str, feature: str) -> bool:
    res = await proc.run([criu, "check", "--feature", feature], check=False, timeout=30)
    return res.returncode == 0


@dataclass(frozen=True)
class Capabilities:
    criu_version: str
    mem_dirty_track: bool  # soft-dirty: pre-copy rounds possible
    uffd_noncoop: bool  # userfaultfd: post-copy (lazy pages) possible
    tcp_repair: bool  # TCP_REPAIR: open connections survive a checkpoint
    pipe_max_size: int

    @property
    def lazy_pages_ready(self) -> bool:
        return self.uffd_noncoop and self.pipe_max_size >= LAZY_PIPE_MIN

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["lazy_pages_ready"] = self.lazy_pages_ready
        return d


def read_pipe_max_size() -> int:
    try:
        with open(PIPE_MAX_SIZE_PATH) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


async def probe(criu: str) -> Capabilities:
    """Ask CRIU and the kernel what this host can do."""
    v = await require(criu)
    dirty = await has_feature(criu, "mem_dirty_track")
    uffd = await has_feature(criu, "uffd-noncoop")
    tcp = await has_feature(criu, "tcp_half_closed") or await has_feature(criu, "tcp-repair")
    return Capabilities(".".join(map(str, v)), dirty, uffd, tcp, read_pipe_max_size())


def live_caps(caps: Capabilities | None, error: str | None = None) -> dict[str, Any]:
    """Capabilities as a peer sees them, with the live fs.pipe-max-size (the daemon may
    have raised it since the probe): what a teleport's mode choice reads."""
    if caps is None:
        return {"error": error or "not probed"}
    d: dict[str, Any] = dict(caps.to_dict())
    live = read_pipe_max_size()
    d["pipe_max_size"] = live
    d["lazy_pages_ready"] = bool(caps.uffd_noncoop and live >= LAZY_PIPE_MIN)
    d["lazy_pipe_min"] = LAZY_PIPE_MIN
    return d


def cpu_flags() -> list[str]:
    """CPU feature flags (x86 `flags`, arm `Features`): a restored process may use any
    instruction the source CPU had, so the target needs at least those. Blocking."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return val.split()
    except OSError:
        pass
    return []
