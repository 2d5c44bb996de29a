"""The one-machine demo: a 3-node lab, sneaker01 with sshd, an SSH session that
survives being teleported node1 → node2 → node3.

It drives only public surfaces — the lab, `cnvmctl` subprocesses, a real OpenSSH
client on the lab's client host — so the demo is also an end-to-end test of what an
operator would type (tests/integration/test_demo.py runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnvmlab import paths as labpaths
from cnvmlab.lab import Lab

REPO = Path(__file__).resolve().parent.parent
CNVM = "sneaker01"
CNVM_IP = "10.100.101.111"
IMAGE = "debian-ssh"
USER, PASSWORD = "user", "password"
COUNTER = 'i=0; while :; do i=$((i+1)); echo "$i"; sleep 0.1; done'


class DemoError(Exception):
    pass


@dataclass
class Session:
    """The SSH session's counter lines, with the time each arrived."""

    proc: asyncio.subprocess.Process
    lines: list[tuple[float, int]] = field(default_factory=list)
    broken: str = ""

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                n = int(line)
            except ValueError:
                continue
            if self.lines and n != self.lines[-1][1] + 1:
                self.broken = f"counter jumped from {self.lines[-1][1]} to {n}"
            self.lines.append((time.monotonic(), n))
        self.broken = self.broken or f"ssh session ended (exit {await self.proc.wait()})"

    @property
    def last(self) -> int:
        return self.lines[-1][1] if self.lines else 0

    def max_gap(self, since: float) -> float:
        """Longest silence (s) between two counter lines after `since`."""
        ts = [t for t, _ in self.lines if t >= since]
        return max((b - a for a, b in itertools.pairwise(ts)), default=0.0)


class Demo:
    def __init__(self, lab: str = "demo", say: Callable[[str], None] | None = None,
                 tty: bool | None = None) -> None:
        self.lab = Lab(lab, nodes=3)
        self.say = say or (lambda s: print(s, flush=True))
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.reports: list[dict[str, Any]] = []
        self.session: Session | None = None
        self.host_key = ""
        self._pump: asyncio.Task[None] | None = None

    # ---- helpers

    def step(self, text: str) -> None:
        self.say(f"\n\033[1m==> {text}\033[0m" if self.tty else f"\n==> {text}")

    async def cnvmctl(self, node: str | None, *args: str, show: bool = False) -> str:
        """Run cnvmctl as an operator would; with show, its output goes to the terminal."""
        argv = [sys.executable, "-m", "cnvmctl", "--lab", self.lab.name]
        if node:
            argv += ["--node", node]
        argv += list(args)
        p = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=None if show else asyncio.subprocess.PIPE,
            stderr=None if show else asyncio.subprocess.PIPE, cwd=str(REPO))
        out, err = await p.communicate()
        if p.returncode != 0:
            msg = (err or b"").decode(errors="replace").strip()
            raise DemoError(f"cnvmctl {' '.join(args)} failed (exit {p.returncode})"
                            + (f": {msg}" if msg else ""))
        return (out or b"").decode()

    async def build_image(self) -> Path:
        p = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "build-debian-image"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=None)
        out, _ = await p.communicate()
        if p.returncode != 0:
            raise DemoError("building the Debian+openssh image failed (see above)")
        return Path(out.decode().strip().splitlines()[-1])

    async def wait_tcp(self, host: str, ip: str, port: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = await self.lab.exec(host, ["timeout", "2", "bash", "-c",
                                           f"exec 3<>/dev/tcp/{ip}/{port}"],
                                    check=False, timeout=5)
            if r.returncode == 0:
                return
            await asyncio.sleep(0.3)
        raise DemoError(f"{ip}:{port} did not answer from the {host} host in {timeout:g}s")

    async def open_session(self) -> Session:
        """A real OpenSSH session from the client host, logged in with the password."""
        askpass = labpaths.RUN_BASE / self.lab.name / "askpass"
        askpass.write_text(f"#!/bin/sh\necho {PASSWORD}\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
               "DISPLAY": os.environ.get("DISPLAY", ":0")}
        p = await self.lab.spawn("client", [
            "ssh", "-T", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password,keyboard-interactive",
            "-o", "ConnectTimeout=10", f"{USER}@{CNVM_IP}", COUNTER],
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env)
        s = Session(p)
        self._pump = asyncio.create_task(s.pump())
        end = time.monotonic() + 30
        while len(s.lines) < 10:
            if s.broken or time.monotonic() > end:
                raise DemoError(f"the SSH session did not start counting ({s.broken or 'timeout'})")
            await asyncio.sleep(0.1)
        return s

    # ---- the demo

    async def run(self, hops: tuple[str, ...] = ("node2", "node3")) -> list[dict[str, Any]]:
        self.step("Setting up a 3-node lab (network namespaces, a cnvmd per node, one cluster)")
        if self.lab.exists():
            self.say(f"removing the previous lab {self.lab.name!r}")
            await self.lab.down()
        await self.lab.up(start_daemons=True, cluster=True)
        self.say(await self.cnvmctl(None, "lab", "status", "--name", self.lab.name))
        self.step("Building (cached) and importing the Debian + openssh image on node1")
        layout = await self.build_image()
        await self.cnvmctl("node1", "images", "import", str(layout), "--name", IMAGE)
        self.step(f"Deploying {CNVM} on node1 at {CNVM_IP} (user {USER!r}, password "
                  f"{PASSWORD!r})")
        await self.cnvmctl("node1", "deploy", CNVM, "--image", IMAGE, "--ip", CNVM_IP,
                           "--hostname", CNVM, show=True)
        await self.wait_tcp("client", CNVM_IP, 22)
        # made by this cnvm at its first start (not baked into the image); it travels along
        self.host_key = (await self.cnvmctl("node1", "exec", CNVM, "--", "cat",
                                            "/etc/ssh/ssh_host_ed25519_key.pub")).strip()
        self.step(f"Opening an SSH session from the client host: ssh {USER}@{CNVM_IP}, "
                  "printing a counter every 100 ms")
        self.session = s = await self.open_session()
        self.say(f"session is counting: {s.last}")
        where = "node1"
        for target in hops:
            self.step(f"Teleporting {CNVM} {where} → {target} while the session runs")
            before, t0 = s.last, time.monotonic()
            # as an operator would: live progress bar and the human report
            await self.cnvmctl(where, "teleport", CNVM, target, show=True)
            report = await self.last_report(target)
            self.reports.append(report)
            await asyncio.sleep(1.0)  # let the session print on the new node
            if s.broken:
                raise DemoError(f"the SSH session broke during the teleport: {s.broken}")
            if s.last <= before:
                raise DemoError("the SSH session stopped counting after the teleport")
            self.say(self._summary(report, s, before, t0))
            where = target
        self.step("The SSH session survived every teleport")
        self.say(f"counter went 1 → {s.last} without a restart or a gap in the sequence")
        return self.reports

    async def last_report(self, node: str) -> dict[str, Any]:
        out = json.loads(await self.cnvmctl(node, "--json", "teleports", CNVM))
        rows = out.get("reports", out) if isinstance(out, dict) else out
        if not rows:
            raise DemoError(f"no teleport report for {CNVM} on {node}")
        return rows[-1]

    def _summary(self, r: dict[str, Any], s: Session, before: int, t0: float) -> str:
        stall = max(0.0, s.max_gap(t0) - 0.1)
        return (f"  mode {r.get('mode')} ({r.get('mode_reason')})\n"
                f"  frozen {r.get('frozen_seconds', 0) * 1000:.0f} ms, total "
                f"{r.get('total_seconds', 0):.2f} s, {r.get('wire_bytes', 0) / 1e6:.1f} MB "
                f"on the wire\n"
                f"  ssh counter {before} → {s.last}; longest stall seen in the session "
                f"{stall * 1000:.0f} ms")

    async def close_session(self) -> None:
        if self.session and self.session.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.session.proc.kill()
            await self.session.proc.wait()
        if self._pump:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def epilogue(self, node: str) -> str:
        n = self.lab.name
        # the venv's cnvmctl when it is not on PATH (a fresh clone after `make demo`)
        cnvmctl = ("cnvmctl" if shutil.which("cnvmctl")
                   else str(Path(sys.executable).parent / "cnvmctl"))
        return (f"\nThe lab {n!r} is still up. Try it yourself:\n"
                f"  ssh in (password {PASSWORD!r}):\n"
                f"    {cnvmctl} lab exec --name {n} client -- ssh {USER}@{CNVM_IP}\n"
                f"  teleport by hand (from a second terminal, while logged in):\n"
                f"    {cnvmctl} --lab {n} --node {node} teleport {CNVM} node1\n"
                f"  look around:\n"
                f"    {cnvmctl} --lab {n} --node {node} ls\n"
                f"    {cnvmctl} --lab {n} --node node1 nodes\n"
                f"  tear it all down:\n"
                f"    {cnvmctl} lab down --name {n}")
