"""Async subprocess helpers: the daemon never blocks its loop on a child.

Every external tool (runc, criu, iptables, nsenter, ...) goes through `run`,
which captures output, enforces a timeout (killing the whole process group), and
raises `CommandError` carrying the tool's own stderr, so errors reaching the user
name the real cause.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class CommandError(Exception):
    """A command exited non-zero, timed out, or could not be started."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 reason: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        tail = (stderr.strip() or stdout.strip()).splitlines()[-3:]
        why = reason or f"exit status {returncode}"
        super().__init__(f"{os.path.basename(argv[0])} failed ({why})"
                         + (": " + " | ".join(tail) if tail else ""))


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def netns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix argv so it runs in a network namespace.

    `nsenter --net=PATH` and not `ip netns exec`: the latter remounts /sys, which
    hides the cgroup v1 mounts runc needs and makes CRIU dumps fail.
    """
    if not netns:
        return list(argv)
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--", *argv]


async def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    input: bytes | None = None,
    timeout: float | None = 60.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Result:
    """Run a command to completion without blocking the event loop."""
    full = netns_argv(netns, argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandError(full, None, "", "", reason=str(exc)) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        kill_group(proc.pid)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise CommandError(full, None, "", "", reason=f"timed out after {timeout:g}s") from None
    res = Result(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and res.returncode != 0:
        raise CommandError(full, res.returncode, res.stdout, res.stderr)
    return res


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a child's whole process group (it was started in its own session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pids_with_arg(fragment: bytes, *, any_of: tuple[bytes, ...] = ()) -> list[int]:
    """Processes whose command line contains `fragment` (and, if given, one of
    `any_of`): what a killed daemon left running for a session dir. Blocking."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if fragment in argv and (not any_of or any(x in argv for x in any_of)):
            out.append(int(d))
    return out
