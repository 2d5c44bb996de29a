"""Persistent daemon state: one JSON document per object, written atomically.

The daemon may be killed at any instant (kill -9, power loss) while containers keep
running, so every write is write-temp, fsync, rename, fsync-dir: after a crash each
record is either the old or the new version, never a torn one. Records live in
``<state_dir>/<kind>/<name>.json``; JSON (not msgpack) so an operator can read them.

Everything here is root's alone: records are 0600 in 0700 directories (they name
paths, addresses and keys). `secure_dir` is how the daemon makes and tightens its
directories without ever re-moding one it did not make (a state_dir of /tmp!).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proto.messages import ErrorCode, ProtoError, show

log = logging.getLogger("cnvmd.state")

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # fullmatch: no trailing newline
DIR_MODE = 0o700
OWNED_MARK = ".cnvmd-dir"
"""File cnvmd leaves in each top-level directory it made: it re-modes only those (and
what lies beneath them) at start."""


class StateError(Exception):
    pass


class InvalidKey(StateError, ProtoError):
    """A kind or name no record can have (e.g. with a trailing newline): it travels to
    the caller as INVALID_ARGUMENT, like any other bad name."""

    def __init__(self, message: str) -> None:
        ProtoError.__init__(self, ErrorCode.INVALID_ARGUMENT, message)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers see the old or the new file only."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
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
        self.on_change: list[Callable[[str, str], None]] = []
        """``cb(kind, name)`` after each save/delete (may run in a worker thread): the
        cluster directory follows cnvm records this way."""

    def _changed(self, kind: str, name: str) -> None:
        for cb in list(self.on_change):
            try:
                cb(kind, name)
            except Exception:  # a listener never breaks a state write
                pass

    def _path(self, kind: str, name: str) -> Path:
        if (not isinstance(kind, str) or not isinstance(name, str)
                or not _KEY.fullmatch(kind) or not _KEY.fullmatch(name)):
            raise InvalidKey(f"invalid name {show(kind)}/{show(name)}: letters, digits, "
                             "'_', '.', ':', '-' (at most 128)")
        return self.root / kind / f"{name}.json"

    def save(self, kind: str, name: str, data: dict[str, Any]) -> None:
        body = json.dumps(data, indent=1, sort_keys=True, default=str).encode() + b"\n"
        atomic_write(self._path(kind, name), body)
        self._changed(kind, name)

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
            self._changed(kind, name)
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


# --------------------------------------------------------------------------- directories


def owned(path: Path) -> bool:
    """Did cnvmd make `path` or a directory above it (its OWNED_MARK is there)?"""
    p = Path(os.path.abspath(path))
    return any((d / OWNED_MARK).is_file() for d in (p, *p.parents))


def secure_dir(path: Path, mode: int = DIR_MODE, gid: int | None = None, *,
               adopt: Callable[[Path, os.stat_result], bool] | None = None,
               mark: bool = True) -> str:
    """Make `path` a root-owned directory of `mode` (group `gid` if given), or tighten it.

    A missing directory is created (and marked, unless `mark` is False: e.g. runc's
    root). An existing one is re-moded only if it is cnvmd's: marked (itself or a
    parent), already private to root, or one a former cnvmd made (`adopt` says, e.g.
    by its old mode). Anything else — /tmp, /run, an operator's directory — is left
    as it is, with a warning if others can enter it. Returns what was done:
    "created", "secured" or "left".
    """
    path = Path(path)
    if not path.is_dir():
        path.mkdir(mode=mode & 0o700, parents=True, exist_ok=True)
        _set(path, mode, gid)
        if mark:
            _mark(path)
        return "created"
    st = os.lstat(path)
    private = st.st_uid == os.geteuid() and not stat.S_IMODE(st.st_mode) & 0o077
    if owned(path) or private or (adopt is not None and adopt(path, st)):
        _set(path, mode, gid)
        if mark and not (path / OWNED_MARK).is_file():
            _mark(path)
        return "secured"
    if stat.S_IMODE(st.st_mode) & 0o007:
        log.warning("directory is open to other users and was not made by cnvmd: left "
                    "as it is", extra={"path": str(path), "mode": oct(stat.S_IMODE(st.st_mode))})
    return "left"


def secure_children(path: Path, mode: int = DIR_MODE) -> None:
    """Tighten every directory directly in cnvmd's own `path` (records, images, ...)."""
    for child in Path(path).iterdir():
        try:
            st = os.lstat(child)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & ~mode:
            os.chmod(child, stat.S_IMODE(st.st_mode) & mode, follow_symlinks=False)


def _set(path: Path, mode: int, gid: int | None) -> None:
    if os.geteuid() == 0:  # tests may run a daemon as a user: its own dirs then
        os.chown(path, 0, gid if gid is not None else 0, follow_symlinks=False)
    os.chmod(path, mode, follow_symlinks=False)


def _mark(path: Path) -> None:
    atomic_write(path / OWNED_MARK,
                 b"made by cnvmd: it keeps this directory's mode tight at every start\n")
