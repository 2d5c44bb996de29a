"""One cnvmd process on 127.0.0.1 for the peer-mesh tests: its own port, socket and
state dir, started and stopped by the test (no network namespaces needed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proto.client import Client

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """One cnvmd on 127.0.0.1 (its own port, socket, state dir)."""

    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.dir = base / name
        self.port = free_port()
        self.sock = self.dir / "run" / "cnvmd.sock"
        self.log = self.dir / "cnvmd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "cnvmd.toml"
        self.cfg.write_text(
            f'node_name = "{name}"\nstate_dir = "{self.dir / "state"}"\n'
            f'run_dir = "{self.dir / "run"}"\nsocket_path = "{self.sock}"\n'
            f'runc_root = "{self.dir / "run" / "runc"}"\n'
            f'listen_address = "127.0.0.1"\npeer_port = {self.port}\n')

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as logf:
            return subprocess.Popen(
                [sys.executable, "-m", "cnvmd", "--config", str(self.cfg)], cwd=ROOT,
                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    async def start(self) -> None:
        self.proc = self.spawn()
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(Exception):
                async with await Client.connect(self.sock, timeout=1) as c:
                    await c.call("nodes")
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.log.read_text()}")
            await asyncio.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def call(self, op: str, args: dict[str, Any] | None = None,
                   timeout: float = 30) -> Any:
        async with await Client.connect(self.sock, timeout=5) as c:
            return await c.call(op, args or {}, timeout=timeout)

    async def states(self) -> dict[str, str]:
        return {n["name"]: n["state"] for n in (await self.call("nodes"))["nodes"]}
