"""Persistent daemon state: one JSON document per object, written atomically.

The daemon may be killed at any instant (kill -9, power loss) while containers keep
running, so every write is write-temp, fsync, rename, fsync-dir: after a crash each
record is either the old or the new version, never a torn one. Records live in
``<state_dir>/<kind>/<name>.json``; JSON (not msgpack) so an operator can read them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class StateError(Exception):
    pass


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers see the old or the new file only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateStore:
    """Small synchronous store; records are tiny, so calls take microseconds."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, kind: str, name: str) -> Path:
        if not _KEY.match(kind) or not _KEY.match(name):
            raise StateError(f"invalid state key {kind!r}/{name!r}")
        return self.root / kind / f"{name}.json"

    def save(self, kind: str, name: str, data: dict[str, Any]) -> None:
        body = json.dumps(data, indent=1, sort_keys=True, default=str).encode() + b"\n"
        atomic_write(self._path(kind, name), body)

    def load(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(kind, name).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"corrupt state record {kind}/{name}: {exc}") from None

    def delete(self, kind: str, name: str) -> bool:
        try:
            self._path(kind, name).unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self, kind: str) -> dict[str, dict[str, Any]]:
        d = self.root / kind
        out: dict[str, dict[str, Any]] = {}
        if not d.is_dir():
            return out
        for p in sorted(d.glob("*.json")):
            rec = self.load(kind, p.stem)
            if rec is not None:
                out[p.stem] = rec
        return out
