"""`exec`: run a command inside a running cnvm, with its output streamed and,
on request, a terminal (issue 17).

How (why not runc's console socket): `runc exec --tty` in the *foreground* makes
the pty inside the container itself, copies between it and runc's own stdio and
passes window-size changes on SIGWINCH; it also reaps the command and exits with
its status. `--console-socket` (runc sends the pty master over a unix socket with
SCM_RIGHTS) only works with `--detach`, and then the command's exit status is
lost unless the daemon made itself a child subreaper for every process it
starts. So for ``tty`` the daemon opens a pty pair of its own, gives the slave
to runc as stdin/stdout/stderr (runc puts it in raw mode) and relays the master;
a resize sets the pair's window size and sends SIGWINCH to runc.
Without ``tty`` the command's stdout and stderr are pipes read as data arrives.

Each run is an `ExecProc` with a random id, announced by an ``exec.started``
event, so the same connection can feed it (``exec.input``: stdin bytes, EOF) and
resize it (``exec.resize``). Another connection cannot: ids are looked up per
connection. runc's own failure to start the command (no such binary, not
executable, bad cwd) is read from its JSON ``--log`` and returned as one line
with docker's exit codes (127 not found, 126 cannot run).

A teleport refuses while an exec runs in the cnvm (CRIU cannot dump a process
whose parent, runc, is outside the container), and an exec is refused while
another operation (stop, start, teleport) holds the cnvm's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import struct
import termios
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnvmd import proc
from cnvmd.api import Args, Context, Router
from cnvmd.services import LIFECYCLE
from proto.messages import ErrorCode, ProtoError

if TYPE_CHECKING:
    from cnvmd.lifecycle import Lifecycle

EVT_STARTED = "exec.started"
"""First event of a streamed exec: ``{"id": str, "tty": bool}``."""
EVT_OUTPUT = "output"
"""Output of a streamed exec: ``{"stream": "stdout"|"stderr", "data": bytes}``."""
COLLECT_MAX = 8 << 20  # per stream, when the output is returned in the result
INPUT_MAX = 1 << 20  # bytes per exec.input
PENDING_MAX = 4 << 20  # stdin bytes the command has not read yet
EXIT_NOT_FOUND, EXIT_CANNOT_RUN = 127, 126
_ID = r"[0-9a-f]{16}"
_RUNC_FAILED = re.compile(rb"exec failed: [^\n]*\r?\n")


def _err(code: ErrorCode, msg: str) -> ProtoError:
    return ProtoError(code, msg)


@dataclass
class ExecProc:
    """One running exec: its runc process and the daemon's end of its stdio."""

    id: str
    name: str
    owner: Any  # the api Session that started it (None for in-process callers)
    tty: bool
    workdir: Path
    process: asyncio.subprocess.Process | None = None
    master: int | None = None  # tty: the pty master
    pending: bytearray = field(default_factory=bytearray)  # tty stdin not yet written
    eof: bool = False
    _writer_on: bool = False

    # ---- input

    def feed(self, data: bytes, eof: bool, *, bounded: bool = True) -> None:
        """Queue stdin bytes (in order: the caller awaits each exec.input). `bounded`:
        refuse (BUSY) when the command has not read PENDING_MAX bytes yet; the
        request's own `stdin` (at most 8 MiB, checked by the op) is not."""
        if self.eof:
            if data:
                raise _err(ErrorCode.CONFLICT, "stdin of this exec is closed")
            return
        if bounded and len(self.pending) + len(data) > PENDING_MAX:
            raise _err(ErrorCode.BUSY, "the command is not reading its input; try later")
        if self.tty:
            self.pending += data
            if eof:  # a terminal has no EOF of its own: send ^D like a keyboard
                self.pending += b"\x04"
                self.eof = True
            self._flush_tty()
            return
        p = self.process
        if p is None or p.stdin is None:
            raise _err(ErrorCode.CONFLICT, "this exec does not take input (start it with "
                       "interactive)")
        if bounded and p.stdin.transport.get_write_buffer_size() + len(data) > PENDING_MAX:
            raise _err(ErrorCode.BUSY, "the command is not reading its input; try later")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            if data:
                p.stdin.write(data)
            if eof:
                p.stdin.close()
                self.eof = True

    def _flush_tty(self) -> None:
        if self.master is None:
            self.pending.clear()
            return
        while self.pending:
            try:
                n = os.write(self.master, self.pending)
            except BlockingIOError:
                break
            except OSError:  # the command is gone
                self.pending.clear()
                break
            del self.pending[:n]
        loop = asyncio.get_running_loop()
        if self.pending and not self._writer_on:
            loop.add_writer(self.master, self._flush_tty)
            self._writer_on = True
        elif not self.pending and self._writer_on:
            loop.remove_writer(self.master)
            self._writer_on = False

    def resize(self, rows: int, cols: int) -> None:
        if self.master is None:
            raise _err(ErrorCode.CONFLICT, "this exec has no terminal (start it with tty)")
        set_winsize(self.master, rows, cols)
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGWINCH)  # runc copies the size inside

    # ---- end

    def kill(self) -> None:
        """Kill the command (its pid from runc's --pid-file) and runc itself."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.workdir / "pid").read_text().strip())
            if pid > 1:
                os.kill(pid, signal.SIGKILL)
        if self.process is not None and self.process.returncode is None:
            proc.kill_group(self.process.pid)

    def close(self) -> None:
        if self.master is not None:
            loop = asyncio.get_running_loop()
            if self._writer_on:
                loop.remove_writer(self.master)
                self._writer_on = False
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None


class ExecTable:
    """The execs running on this node (Lifecycle.execs)."""

    def __init__(self) -> None:
        self._by_id: dict[str, ExecProc] = {}

    def running(self, name: str) -> int:
        """How many execs run in cnvm `name` (a teleport waits for none)."""
        return sum(1 for e in self._by_id.values() if e.name == name)

    def add(self, e: ExecProc) -> None:
        self._by_id[e.id] = e

    def remove(self, e: ExecProc) -> None:
        self._by_id.pop(e.id, None)

    def get(self, eid: str, owner: Any) -> ExecProc:
        e = self._by_id.get(eid)
        if e is None or e.owner is not owner:  # another connection's exec: not yours
            raise _err(ErrorCode.NOT_FOUND, f"no exec {eid} on this connection")
        return e


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def start_error(log: Path) -> str | None:
    """runc's reason for not starting the command (from its JSON log), one line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for ln in lines:
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        msg = str(d.get("msg", ""))
        if d.get("level") in ("error", "fatal") and msg.startswith("exec failed"):
            for prefix in ("exec failed: unable to start container process: ",
                           "exec failed: "):
                if msg.startswith(prefix):
                    return msg[len(prefix):]
    return None


def start_exit_code(why: str) -> int:
    """Docker's codes: 127 when the command does not exist, 126 when it cannot run."""
    if "chdir" in why:  # a bad --cwd: the command exists but cannot run there
        return EXIT_CANNOT_RUN
    return EXIT_NOT_FOUND if ("executable file not found" in why
                              or "no such file or directory" in why) else EXIT_CANNOT_RUN


async def run(life: Lifecycle, name: str, argv: list[str], *, env: list[str], cwd: str | None,
              tty: bool = False, interactive: bool = False, stdin: bytes | None = None,
              rows: int | None = None, cols: int | None = None,
              timeout: float | None = None, owner: Any = None,
              emit: Any = None) -> dict[str, Any]:
    """Run argv in the cnvm. With `emit(event, data)` the output is streamed as events
    (and `exec.started` is sent first); without, it is collected into the result."""
    await life._require(name)
    if not argv:
        raise _err(ErrorCode.INVALID_ARGUMENT, "exec needs a command")
    st = await life.runc.state(name)
    if st is None or st.status != "running":
        raise _err(ErrorCode.CONFLICT, f"cnvm {name!r} is not running")
    if life.lock(name).locked():
        raise _err(ErrorCode.BUSY, f"cnvm {name!r} is busy with another operation (stop, "
                   "start or teleport); try again when it ends")
    table: ExecTable = life.execs
    eid = secrets.token_hex(8)
    workdir = life.runc.root.parent / "exec" / eid
    e = ExecProc(eid, name, owner, tty, workdir)
    table.add(e)  # no await since the lock check: a teleport starting now sees it
    try:
        return await _run(life, e, argv, env=env, cwd=cwd, interactive=interactive,
                          stdin=stdin, rows=rows, cols=cols, timeout=timeout, emit=emit)
    finally:
        table.remove(e)
        e.kill()
        e.close()
        if e.process is not None and e.process.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(e.process.wait(), 10))
        await asyncio.to_thread(shutil.rmtree, workdir, True)


async def _run(life: Lifecycle, e: ExecProc, argv: list[str], *, env: list[str],
               cwd: str | None, interactive: bool, stdin: bytes | None, rows: int | None,
               cols: int | None, timeout: float | None, emit: Any) -> dict[str, Any]:
    await asyncio.to_thread(e.workdir.mkdir, 0o700, True, True)
    log = e.workdir / "runc.log"
    runc = life.runc
    args = [*runc._base(log), "exec", "--pid-file", str(e.workdir / "pid")]
    if e.tty:
        args.append("--tty")
    for kv in env:
        args += ["--env", kv]
    if cwd:
        args += ["--cwd", cwd]
    full = proc.netns_argv(runc.netns, [*args, e.name, *argv])
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = False
    held: list[tuple[str, bytes]] = []  # runc's own "exec failed: ..." line, if it is one

    def deliver(stream: str, data: bytes, hold: bool = True) -> None:
        nonlocal truncated
        if hold and _RUNC_FAILED.fullmatch(data):
            held.append((stream, data))  # shown only if the command did run after all
            return
        if emit is not None:
            emit(EVT_OUTPUT, {"stream": stream, "data": data})
            return
        buf = out[stream]
        room = COLLECT_MAX - len(buf)
        if len(data) > room:
            truncated = True
        buf += data[:max(room, 0)]

    PIPE, DEVNULL = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    slave: int | None = None
    try:
        if e.tty:
            e.master, slave = os.openpty()
            set_winsize(e.master, rows or 24, cols or 80)
            os.set_blocking(e.master, False)
            e.process = await asyncio.create_subprocess_exec(
                *full, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        else:
            e.process = await asyncio.create_subprocess_exec(
                *full, stdin=PIPE if (interactive or stdin is not None) else DEVNULL,
                stdout=PIPE, stderr=PIPE, start_new_session=True)
    except OSError as exc:
        raise _err(ErrorCode.UNAVAILABLE, f"cannot run runc: {exc}") from None
    finally:
        if slave is not None:
            os.close(slave)
    p = e.process
    if emit is not None:
        emit(EVT_STARTED, {"id": e.id, "tty": e.tty})
    if stdin is not None:
        e.feed(stdin, eof=not interactive, bounded=False)

    async def pump_pipe(stream: str) -> None:
        reader = getattr(p, stream)
        while chunk := await reader.read(65536):
            deliver(stream, chunk)
            if emit is not None:
                await _drain(emit)

    async def pump_tty() -> None:
        assert e.master is not None
        while True:
            try:
                chunk = await _read_fd(e.master)
            except OSError:  # EIO: runc (the last holder of the slave) is gone
                return
            if not chunk:
                return
            deliver("stdout", chunk)
            if emit is not None:
                await _drain(emit)

    pumps = [pump_tty()] if e.tty else [pump_pipe("stdout"), pump_pipe("stderr")]

    async def whole() -> int:
        await asyncio.gather(*pumps)
        return await p.wait()

    try:
        rc = await asyncio.wait_for(whole(), timeout)
    except TimeoutError:
        raise _err(ErrorCode.FAILED, f"exec in {e.name} timed out after {timeout:g}s "
                   "(killed)") from None
    res: dict[str, Any] = {"exit_code": rc}
    why = await asyncio.to_thread(start_error, log) if rc == 255 else None
    if why is not None:
        res["exit_code"] = start_exit_code(why)
        res["error"] = why
    else:
        for stream, data in held:
            deliver(stream, data, hold=False)
    if emit is None:
        res["stdout"] = out["stdout"].decode(errors="replace")
        res["stderr"] = out["stderr"].decode(errors="replace")
        if truncated:
            res["truncated"] = True
    return res


async def _read_fd(fd: int) -> bytes:
    """One read of a non-blocking fd, waiting until it is readable."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            pass
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


async def _drain(emit: Any) -> None:
    drain = getattr(emit, "__self__", None)
    if isinstance(drain, Context):
        await drain.drain()


# ----------------------------------------------------------------------------- ops

router = Router()


def _life(ctx: Context) -> Lifecycle:
    return ctx.daemon.services.require(LIFECYCLE)


@router.op("exec")
async def exec_(ctx: Context, args: Args) -> dict[str, Any]:
    """Run a command in a cnvm. Without `stream`: returns exit_code, stdout, stderr
    (`stdin`, bytes up to 8 MiB, is fed to it, else its stdin is /dev/null). With
    `stream`: an `exec.started` event, then `output` events as the command writes; input
    through `exec.input` (if `interactive`), `tty` gives it a terminal of `rows`x`cols`
    (resized with `exec.resize`); returns exit_code (127/126 and `error` when the command
    cannot be started)."""
    name = args.str("name", max_len=63)
    argv = args.argv("cmd")  # argv rules: no NUL, what execve() would accept
    env = args.argv("env", [])
    cwd = args.str("cwd", None)
    stream = args.bool("stream", False)
    tty = args.bool("tty", False)
    interactive = args.bool("interactive", False)
    rows = args.int("rows", None, min=1, max=10000)
    cols = args.int("cols", None, min=1, max=10000)
    timeout = args.float("timeout", None if stream else 300.0, min=0.1, max=86400)
    stdin = args.bytes("stdin", None)
    args.reject_unknown()
    if (tty or interactive) and not stream:
        raise _err(ErrorCode.INVALID_ARGUMENT, "tty and interactive need stream")
    return await run(_life(ctx), name, argv, env=env, cwd=cwd, tty=tty,
                     interactive=interactive, stdin=stdin, rows=rows, cols=cols,
                     timeout=timeout, owner=ctx.session, emit=ctx.emit if stream else None)


@router.op("exec.input")
async def exec_input(ctx: Context, args: Args) -> dict[str, Any]:
    """Feed `data` (bytes, up to 1 MiB) to a streamed exec's stdin; `eof` closes it (with
    a tty: sends ^D). Only on the connection that started the exec."""
    eid = args.str("id", pattern=_ID)
    data = args.bytes("data", b"", max_len=INPUT_MAX)
    eof = args.bool("eof", False)
    args.reject_unknown()
    _life(ctx).execs.get(eid, ctx.session).feed(data, eof)
    return {"id": eid}


@router.op("exec.resize")
async def exec_resize(ctx: Context, args: Args) -> dict[str, Any]:
    """Set the terminal size of a tty exec (rows, cols); the command gets SIGWINCH."""
    eid = args.str("id", pattern=_ID)
    rows = args.int("rows", min=1, max=10000)
    cols = args.int("cols", min=1, max=10000)
    args.reject_unknown()
    _life(ctx).execs.get(eid, ctx.session).resize(rows, cols)
    return {"id": eid, "rows": rows, "cols": cols}
