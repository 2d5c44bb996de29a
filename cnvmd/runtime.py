"""Async wrapper around runc (+ CRIU through `runc --criu`).

Stdio design (verified with checkpoint + restore, see tests/integration):

* A container's stdout/stderr is the write end of a **pipe** whose read end
  belongs to a tiny *log shim* (`cnvmd.logshim`: `cat >> LOGFILE` that also
  notes when each piece arrived, in LOGFILE.idx), started detached (double-fork,
  own session) so it is nobody's child: it survives daemon restarts and exits
  by itself on EOF, i.e. when the container's last process dies. stdin is
  /dev/null. The daemon closes its copies of both ends right after starting
  runc, so it never holds the container up.
* Why a pipe and not the log file: CRIU cannot dump an open host file that is
  not reachable from the container's mount namespace (`Can't lookup mount=…
  for fd=1`), and a file must exist with the same path and size on the target.
  A pipe is "external" to the container: `runc run -d` records it in
  descriptors.json (`pipe:[INODE]`), and on `runc restore` runc hands its *own*
  fds 0/1/2 to CRIU as `--inherit-fd` for those entries. So the restore is
  started with stdout/stderr = a NEW pipe to a NEW shim appending to the log on
  the target host: output after the restore lands in the target's log, and
  the old shim on the source exits when the source container is gone.
  (Checked: a container printing a counter continues the sequence in the new
  log after restore.)
* runc's own diagnostics go to `--log FILE` (JSON) in the work dir, not to the
  container's stdio, and CRIU's log (`dump.log`/`restore.log` in the work dir)
  is read on failure so errors carry the real cause.

runc should run in the *node's* network namespace (`netns=`, via nsenter); the
container's own netns is a path in config.json, which runc/CRIU treat as
external (it must exist on restore).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cnvmd import logshim, proc
from cnvmd.config import default_criu

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


class RuncError(Exception):
    """runc (or CRIU under it) failed; str() carries the tool's own last words."""

    def __init__(self, action: str, container: str, why: str, log_tail: str = "") -> None:
        self.action = action
        self.container = container
        self.why = why
        self.log_tail = log_tail
        msg = f"runc {action} {container} failed: {why}"
        if log_tail:
            msg += "\n" + log_tail
        super().__init__(msg)


@dataclass(frozen=True)
class ContainerState:
    id: str
    pid: int
    status: str  # created | running | paused | stopped
    bundle: str
    created: str

    @classmethod
    def from_json(cls, d: dict) -> ContainerState:
        return cls(d["id"], int(d.get("pid") or 0), d.get("status", ""),
                   d.get("bundle", ""), d.get("created", ""))


# --------------------------------------------------------------------------- log shim


@dataclass(frozen=True)
class LogPipe:
    """The write end of a pipe to a detached log shim; give it to runc, then close()."""

    write_fd: int
    shim_pid: int
    log_path: Path

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.write_fd)


async def start_log_shim(log_path: Path) -> LogPipe:
    """Start the shim (`cnvmd.logshim`: like `cat >> log_path`, plus a time index)
    reading a new pipe; return the pipe's write end.

    The shim is double-forked (the intermediate sh exits) in its own session, so
    it is reparented away from the daemon and outlives it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    try:
        # The pipe is sh's stdin; an async list's stdin would become /dev/null, so it
        # is handed to the shim explicitly through fd 3 (dash only knows fds 0-9). Its
        # stdout/stderr go to /dev/null: a copy of our pipe would stay open for its life.
        p = await asyncio.create_subprocess_exec(
            "sh", "-c", 'exec 3<&0; "$2" -I -S "$3" "$1" <&3 3<&- >/dev/null 2>&1 & echo $!',
            "cnvm-logshim", str(log_path), sys.executable, logshim.__file__, stdin=r,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        # One line, not communicate(): under uvloop the background cat can inherit a
        # copy of the stdout pipe, so EOF would only come when the cnvm dies.
        assert p.stdout is not None
        out = await p.stdout.readline()
        await p.wait()
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    try:
        pid = int(out.strip())
    except ValueError:
        os.close(w)
        raise RuntimeError(f"log shim for {log_path} did not start") from None
    return LogPipe(w, pid, log_path)


# --------------------------------------------------------------------------- runc


def _tail(path: Path, lines: int = 12) -> str:
    """Last lines of a log, errors first: CRIU logs are long and the cause is an Error line."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in text if "Error" in ln or "error" in ln][-lines:]
    picked = errors or text[-lines:]
    return f"--- {path} ---\n" + "\n".join(picked)


def _runc_log_tail(path: Path) -> str:
    """Messages of error-level entries of runc's JSON log."""
    try:
        raw = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    msgs = []
    for ln in raw:
        try:
            d = json.loads(ln)
        except ValueError:
            msgs.append(ln)
            continue
        if d.get("level") in ("error", "fatal", "warning"):
            msgs.append(d.get("msg", ""))
    return "\n".join(msgs[-6:])


class Runc:
    """One runc root (one per host/node); every call is async and time-limited."""

    def __init__(self, root: Path, runc: str = "runc", criu: str | None = None,
                 netns: str | None = None) -> None:
        self.root = Path(root)
        self.runc = runc
        self.criu = criu or default_criu()
        self.netns = netns  # where runc itself runs (the node's netns); None = here

    def _base(self, log: Path | None = None) -> list[str]:
        argv = [self.runc, "--root", str(self.root), "--criu", self.criu]
        if log is not None:
            argv += ["--log", str(log), "--log-format", "json"]
        return argv

    async def _simple(self, action: str, cid: str, args: Sequence[str], *,
                      timeout: float = 30, check: bool = True) -> proc.Result:
        res = await proc.run([*self._base(), *args], netns=self.netns, timeout=timeout,
                             check=False)
        if check and res.returncode != 0:
            raise RuncError(action, cid, (res.stderr.strip() or res.stdout.strip()
                                          or f"exit status {res.returncode}"))
        return res

    async def _spawn(self, action: str, cid: str, args: Sequence[str], *, log: Path,
                     stdio: int | None = None, pass_fds: Sequence[int] = (),
                     timeout: float | None, criu_log: Path | None = None,
                     oom_score_adj: int | None = None) -> None:
        """Run runc with given stdio (the container inherits it); errors from --log + CRIU log."""
        _fresh_log(log)
        argv = proc.netns_argv(self.netns, [*self._base(log), *args])
        if oom_score_adj is not None and shutil.which("choom"):
            argv = ["choom", "-n", str(int(oom_score_adj)), "--", *argv]
        out = stdio if stdio is not None else asyncio.subprocess.DEVNULL
        try:
            p = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                pass_fds=tuple(pass_fds), start_new_session=True,
            )
        except OSError as exc:
            raise RuncError(action, cid, str(exc)) from None
        try:
            rc = await asyncio.wait_for(p.wait(), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            proc.kill_group(p.pid)
            await p.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = f"timed out after {timeout:g}s"
            raise RuncError(action, cid, why, self._tails(log, criu_log)) from None
        if rc != 0:
            raise RuncError(action, cid, f"exit status {rc}", self._tails(log, criu_log))

    @staticmethod
    def _tails(log: Path, criu_log: Path | None) -> str:
        parts = [t for t in (_runc_log_tail(log), _tail(criu_log) if criu_log else "") if t]
        return "\n".join(parts)

    # ---- lifecycle

    async def run(self, cid: str, bundle: Path, *, stdio: int | None = None,
                  work_dir: Path | None = None, pid_file: Path | None = None,
                  timeout: float = 60) -> ContainerState:
        """`runc run -d`: start detached, stdout/stderr = stdio (e.g. a LogPipe's write_fd)."""
        log = (work_dir or Path(bundle)) / "runc-run.log"
        args = ["run", "-d", "--bundle", str(bundle)]
        if pid_file:
            args += ["--pid-file", str(pid_file)]
        await self._spawn("run", cid, [*args, cid], log=log, stdio=stdio, timeout=timeout)
        st = await self.state(cid)
        if st is None:
            raise RuncError("run", cid, "container vanished right after start",
                            _runc_log_tail(log))
        return st

    async def state(self, cid: str) -> ContainerState | None:
        res = await self._simple("state", cid, ["state", cid], check=False)
        if res.returncode != 0:
            if "does not exist" in res.stderr or "not exist" in res.stderr:
                return None
            raise RuncError("state", cid, res.stderr.strip())
        return ContainerState.from_json(json.loads(res.stdout))

    async def list(self) -> list[ContainerState]:
        if not self.root.exists():
            return []
        res = await self._simple("list", "", ["list", "--format", "json"])
        data = json.loads(res.stdout or "null") or []
        return [ContainerState.from_json(d) for d in data]

    async def kill(self, cid: str, sig: str | int = "TERM", *, all: bool = False) -> None:
        s = sig if isinstance(sig, str) else signal.Signals(sig).name
        args = ["kill", *(["--all"] if all else []), cid, s]
        await self._simple("kill", cid, args)

    async def delete(self, cid: str, *, force: bool = False) -> None:
        await self._simple("delete", cid, ["delete", *(["--force"] if force else []), cid])

    async def destroy(self, cid: str, *, timeout: float = 10) -> None:
        """Kill and delete, whatever state it is in; no error if it does not exist."""
        st = await self.state(cid)
        if st is None:
            self._forget(cid)
            return
        if st.status in ("running", "paused", "created"):
            with contextlib.suppress(RuncError):
                await self.kill(cid, "KILL", all=True)
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while loop.time() < end:
                st = await self.state(cid)
                if st is None or st.status == "stopped":
                    break
                await asyncio.sleep(0.05)
        with contextlib.suppress(RuncError):
            await self.delete(cid, force=True)
        self._forget(cid)

    def _forget(self, cid: str) -> None:
        """Remove leftovers of a half-made container (e.g. after a failed restore)."""
        d = self.root / cid
        if d.exists():
            _umount_under(d)
            shutil.rmtree(d, ignore_errors=True)

    async def exec(self, cid: str, argv: Sequence[str], *, input: bytes | None = None,
                   env: Sequence[str] = (), cwd: str | None = None,
                   timeout: float | None = 60) -> proc.Result:
        """`runc exec`: returncode is the command's own exit status (passthrough)."""
        args = ["exec"]
        for e in env:
            args += ["--env", e]
        if cwd:
            args += ["--cwd", cwd]
        return await proc.run([*self._base(), *args, cid, *argv], netns=self.netns,
                              input=input, timeout=timeout, check=False)

    async def pause(self, cid: str) -> None:
        """Freeze every task of the container (cgroup freezer); `resume` thaws them."""
        await self._simple("pause", cid, ["pause", cid])

    async def resume(self, cid: str) -> None:
        await self._simple("resume", cid, ["resume", cid])

    async def freeze(self, cid: str, *, timeout: float = 10.0) -> bool:
        """Freeze the container's cgroup directly and wait (1 ms steps) until it is.

        Why not `runc pause`: runc refuses when it believes the container is paused,
        but CRIU thaws a cgroup after seizing its tasks (they are held by ptrace
        instead); before CRIU is killed they must be frozen again or they run on,
        with their TCP sockets still in repair mode. Returns False if the container
        has no freezer cgroup (gone)."""
        path = await asyncio.to_thread(_freezer_of, self.root / cid / "state.json")
        if path is None:
            return False
        return await asyncio.to_thread(_freeze_wait, path, timeout)

    async def thaw(self, cid: str, *, timeout: float = 10.0) -> bool:
        """Thaw the container's cgroup directly (what `runc resume` writes, without a
        runc and a `runc state` run: 30-90 ms in a teleport's frozen window). runc
        reads the freezer live, so its view stays right. False if there is no freezer
        cgroup or it did not thaw in time (the caller falls back to runc)."""
        path = await asyncio.to_thread(_freezer_of, self.root / cid / "state.json")
        if path is None:
            return False
        return await asyncio.to_thread(_freeze_wait, path, timeout, False)

    # ---- migration

    async def checkpoint(
        self, cid: str, image_dir: Path, *, work_dir: Path,
        tcp_established: bool = True, leave_running: bool = False,
        page_server: str | None = None, lazy_pages: bool = False,
        status_fd: int | None = None, extra_args: Sequence[str] = (),
        timeout: float | None = 120,
    ) -> None:
        """`runc checkpoint`; with lazy_pages it returns only after all pages were served.

        status_fd: a pipe write end; CRIU writes "\\0" to it when the images (minus
        lazy pages) are ready, so a caller can start the restore meanwhile.
        """
        _mkdirs(image_dir, work_dir)
        args = ["checkpoint", "--image-path", str(image_dir), "--work-path", str(work_dir)]
        if tcp_established:
            args.append("--tcp-established")
        if leave_running:
            args.append("--leave-running")
        if page_server:
            args += ["--page-server", page_server]
        if lazy_pages:
            args.append("--lazy-pages")
        if status_fd is not None:
            args += ["--status-fd", str(status_fd)]
        args += [*extra_args, cid]
        await self._spawn("checkpoint", cid, args, log=work_dir / "runc-checkpoint.log",
                          pass_fds=() if status_fd is None else (status_fd,),
                          timeout=timeout, criu_log=work_dir / "dump.log")

    async def restore(
        self, cid: str, bundle: Path, image_dir: Path, *, work_dir: Path,
        stdio: int | None = None, tcp_established: bool = True, lazy_pages: bool = False,
        extra_args: Sequence[str] = (), timeout: float | None = 120,
        oom_score_adj: int | None = None,
    ) -> ContainerState:
        """`runc restore -d`: stdio (a NEW LogPipe's write end) replaces the dumped pipes.

        `oom_score_adj`: the value runc (and so CRIU and the restored tasks) starts
        with. CRIU restores a task's oom_score_adj only when the dumped one is not 0, so
        a cnvm at 0 would otherwise keep cnvmd's own (-500 under the shipped unit).

        A failed restore (esp. lazy) can hang or leave CRIU mounts and runc state:
        on failure these are cleaned so the id can be reused.
        """
        _mkdirs(work_dir)
        args = ["restore", "-d", "--bundle", str(bundle), "--image-path", str(image_dir),
                "--work-path", str(work_dir)]
        if tcp_established:
            args.append("--tcp-established")
        if lazy_pages:
            args.append("--lazy-pages")
        args += [*extra_args, cid]
        try:
            await self._spawn("restore", cid, args, log=work_dir / "runc-restore.log",
                              stdio=stdio, timeout=timeout, criu_log=work_dir / "restore.log",
                              oom_score_adj=oom_score_adj)
        except RuncError:
            _umount_under(work_dir)
            st = await self.state(cid)
            if st is None or st.status != "running":
                with contextlib.suppress(RuncError):
                    await self.destroy(cid)
            raise
        st = await self.state(cid)
        if st is None:
            raise RuncError("restore", cid, "container not found after restore")
        return st


def _freezer_of(state_json: Path) -> tuple[Path, bool] | None:
    """(cgroup dir, is_v1) of a container's freezer, from runc's own state file."""
    try:
        d = json.loads(state_json.read_text())
    except (OSError, ValueError):
        return None
    paths = d.get("cgroup_paths") or {}
    if paths.get("freezer"):
        return Path(paths["freezer"]), True
    if paths.get(""):
        return Path(paths[""]), False
    return None


def _freeze_wait(where: tuple[Path, bool], timeout: float, frozen: bool = True) -> bool:
    """Write the freeze (or thaw) request, then poll every millisecond (not CRIU's
    100 ms) until the cgroup reports it."""
    import time

    path, v1 = where
    state = "FROZEN" if frozen else "THAWED"
    try:
        if v1:
            (path / "freezer.state").write_text(state)
        else:
            (path / "cgroup.freeze").write_text("1" if frozen else "0")
        end = time.monotonic() + timeout
        while True:
            if v1:
                if (path / "freezer.state").read_text().strip() == state:
                    return True
            elif f"frozen {int(frozen)}" in (path / "cgroup.events").read_text():
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.001)
    except OSError:
        return False


def _mkdirs(*dirs: Path) -> None:
    """Directory creation is a metadata syscall, not I/O worth a thread."""
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)


def _fresh_log(log: Path) -> None:
    _mkdirs(log.parent)
    with contextlib.suppress(FileNotFoundError):
        log.unlink()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (from /proc/self/mountinfo), deepest first."""
    base = str(path).rstrip("/")
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == base or mp.startswith(base + "/"):
                    out.append(mp)
    except OSError:
        return []
    return sorted(set(out), key=len, reverse=True)


def _umount_under(path: Path) -> None:
    for mp in mounts_under(path):
        _libc.umount2(mp.encode(), MNT_DETACH)
