"""`cnvmctl exec [-i] [-t] NAME -- CMD`: output streamed as it comes, stdin streamed
with -i, a terminal with -t (raw mode here, window size passed and followed).
The daemon side is cnvmd/execs.py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import termios
import threading
import tty
from typing import Any

from cnvmctl.commands.lifecycle import _after_dashdash
from cnvmctl.context import EXIT_USAGE, CliError, Ctx
from cnvmctl.registry import arg, command
from proto.client import Event
from proto.messages import ProtoError

EXEC_EPILOG = """\
examples:
  cnvmctl exec web -- cat /etc/hostname
  cnvmctl exec -it web -- sh              an interactive shell (exit with `exit`)
  echo hi | cnvmctl exec -i web -- tr a-z A-Z
  cnvmctl exec web -- sh -c 'echo a; sleep 3; echo b'   (a shows at once)

exit status: the command's own; 127 when CMD does not exist in the cnvm, 126 when
it cannot be run (not executable, bad --cwd), 130 after Ctrl-C (without -t;
with -t Ctrl-C goes to the command, like a keyboard would).

A teleport of the cnvm is refused while an exec runs in it.
"""


@command("exec", help="run a command inside a cnvm (its exit code is passed through)",
         description="Run CMD in the running cnvm NAME, as a new process next to its own.\n"
                     "Output is shown as the command writes it. -i passes this command's\n"
                     "stdin; -t gives CMD a terminal (the local one is put in raw mode and\n"
                     "restored on exit; window size changes are passed on).",
         epilog=EXEC_EPILOG, configure=_after_dashdash,
         args=[arg("name", metavar="NAME"),
               arg("--env", "-e", action="append", default=[], metavar="K=V",
                   help="environment variable (repeatable)"),
               arg("--cwd", "-w", help="working directory inside"),
               arg("--interactive", "-i", action="store_true",
                   help="pass stdin to CMD (without it CMD's stdin is /dev/null)"),
               arg("--tty", "-t", action="store_true",
                   help="give CMD a terminal (use with -i for a shell)"),
               arg("cmd", nargs="*", metavar="CMD", help="after --: the command and its args")])
async def exec_(ctx: Ctx, a: argparse.Namespace) -> int:
    cmd = list(a.cmd)
    if not cmd:
        raise CliError("no command given", EXIT_USAGE, hint="cnvmctl exec NAME -- CMD …")
    args: dict[str, Any] = {"name": a.name, "cmd": cmd, "env": a.env, "cwd": a.cwd}
    if ctx.json:
        if a.tty:
            raise CliError("--json cannot be combined with -t", EXIT_USAGE)
        if a.interactive:  # the collected form: stdin read to its end first
            data = await asyncio.to_thread(sys.stdin.buffer.read, (8 << 20) + 1)
            if len(data) > 8 << 20:
                raise CliError("stdin is larger than 8 MiB", EXIT_USAGE)
            args["stdin"] = data
        res = await ctx.call("exec", args)
        ctx.print_json(res)
        return int(res["exit_code"])
    return await Session(ctx, a.interactive, a.tty).run(args)


def _winsize() -> tuple[int, int] | None:
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                sz = os.get_terminal_size(fd)
                return sz.lines, sz.columns
    return None


class Session:
    """One streamed exec: events → stdout/stderr, stdin → exec.input, SIGWINCH →
    exec.resize; the terminal's mode is restored whatever happens."""

    def __init__(self, ctx: Ctx, interactive: bool, tty: bool) -> None:
        self.ctx = ctx
        self.interactive = interactive
        self.tty = tty
        self.id: str | None = None
        self.started = asyncio.Event()
        self.stdin: asyncio.Queue[bytes] = asyncio.Queue()
        self._resizes: set[asyncio.Task[None]] = set()

    def on_event(self, ev: Event) -> None:
        if ev.name == "exec.started":
            self.id = str(ev.data.get("id"))
            self.started.set()
        elif ev.name == "output":
            data = ev.data.get("data", b"")
            if isinstance(data, str):
                data = data.encode()
            self.ctx.write(data, err=ev.data.get("stream") == "stderr")

    async def run(self, args: dict[str, Any]) -> int:
        args = {**args, "stream": True, "tty": self.tty, "interactive": self.interactive}
        size = _winsize() if self.tty else None
        if size:
            args["rows"], args["cols"] = size
        raw = self.tty and self.interactive and os.isatty(0)
        saved = termios.tcgetattr(0) if raw else None
        loop = asyncio.get_running_loop()
        helpers: list[asyncio.Task[Any]] = []
        try:
            if saved is not None:
                tty.setraw(0)
            if self.interactive:
                threading.Thread(target=self._read_stdin, args=(loop,), daemon=True).start()
                helpers.append(asyncio.create_task(self._send_stdin()))
            if self.tty:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.add_signal_handler(signal.SIGWINCH, self._resized)
            res = await self.ctx.call("exec", args, on_event=self.on_event)
        finally:
            if self.tty:
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(signal.SIGWINCH)
            for t in helpers:
                t.cancel()
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if res.get("error"):
            print(f"cnvmctl: {res['error']}", file=sys.stderr)
        return int(res["exit_code"])

    def _read_stdin(self, loop: asyncio.AbstractEventLoop) -> None:
        """A daemon thread: blocking reads of fd 0 (any kind of file) never hold up exit."""
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(self.stdin.put_nowait, data)
            except RuntimeError:  # the loop is closed: we are exiting
                return
            if not data:
                return

    async def _send_stdin(self) -> None:
        """exec.input one at a time, so the daemon gets the bytes in order."""
        await self.started.wait()
        while True:
            data = await self.stdin.get()
            while not self.stdin.empty() and data and len(data) < 512 << 10:
                more = self.stdin.get_nowait()
                if not more:
                    self.stdin.put_nowait(more)
                    break
                data += more
            eof = not data
            try:
                await self.ctx.call("exec.input", {"id": self.id, "data": data, "eof": eof})
            except ProtoError:
                return  # the command ended (its result says how)
            if eof:
                return

    def _resized(self) -> None:
        size = _winsize()
        if size and self.id is not None:
            t = asyncio.create_task(self._resize(*size))
            self._resizes.add(t)
            t.add_done_callback(self._resizes.discard)

    async def _resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(ProtoError):
            await self.ctx.call("exec.resize", {"id": self.id, "rows": rows, "cols": cols})
