"""A lab for teleport tests and the teleport bench: nodes with real cnvmd, a peer mesh
(cluster init + joins over the underlay), an L2 overlay (cnvm0 + VXLAN on every host,
the client host included), the busybox image imported on node1 only (so teleports
ship its layers by digest), cnvms deployed through the daemon's `deploy` op and
wired into the overlay, and a client holding ONE TCP connection to a cnvm.

Everything is torn down by `TeleLab.down()` (lab namespaces, processes, mounts,
and the per-cnvm namespaces named ``cnvm-nodeK-*`` outside the lab prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from pathlib import Path
from typing import Any

from cnvmd import netlink
from cnvmlab import paths as labpaths
from cnvmlab.lab import Lab
from proto.client import Client
from tests import imagebuild

VNI = 42
VXLAN_PORT = 6783
SUBNET = "10.100.101.0/24"
MTU = 1450
CLIENT_IP = "10.100.101.250"
PREFIX = 24
PORT = 7000

CLIENT = r"""
import socket, sys, time
ip, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
wait = float(sys.argv[4]) if len(sys.argv) > 4 else 20.0  # connect deadline (s)
patience = float(sys.argv[5]) if len(sys.argv) > 5 else 120.0  # longest wait for a reply
deadline = time.monotonic() + wait
while True:
    try:
        s = socket.create_connection((ip, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
s.settimeout(patience)
print("port", s.getsockname()[1], flush=True)
f = s.makefile("rb")
while True:
    t0 = time.monotonic()
    s.sendall(b"x\n")
    line = f.readline()
    if not line:
        print("EOF", flush=True)
        break
    print(f"{time.monotonic():.6f} {line.split()[0].decode()} {time.monotonic() - t0:.6f}",
          flush=True)
    time.sleep(interval)
"""


class Conn:
    """The client process on the client host: one connection, a request every interval."""

    def __init__(self, p: asyncio.subprocess.Process) -> None:
        self.p = p
        self.replies: list[tuple[float, int, float]] = []  # (time, n, round trip)
        self.port: int | None = None
        self.eof = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.p.stdout
        async for raw in self.p.stdout:
            parts = raw.decode().split()
            if not parts:
                continue
            if parts[0] == "port":
                self.port = int(parts[1])
            elif parts[0] == "EOF":
                self.eof = True
            else:
                self.replies.append((float(parts[0]), int(parts[1]), float(parts[2])))

    @property
    def last(self) -> int:
        return self.replies[-1][1] if self.replies else 0

    async def wait_more(self, k: int, timeout: float = 30) -> None:
        want = self.last + k
        end = time.monotonic() + timeout
        while self.last < want:
            if self.p.returncode is not None or self.eof or time.monotonic() > end:
                raise AssertionError(f"client stuck at {self.last}, wanted {want}; "
                                     f"eof={self.eof} rc={self.p.returncode}")
            await asyncio.sleep(0.02)

    def check_sequence(self) -> None:
        ns = [n for _, n, _ in self.replies]
        assert ns == list(range(1, len(ns) + 1)), "counter reset, skipped or repeated"

    def max_stall(self, since: float = 0.0) -> float:
        """Longest gap between consecutive replies (after `since`)."""
        r = [x for x in self.replies if x[0] >= since]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(r)]
        return max(gaps, default=0.0)

    async def close(self) -> None:
        self.task.cancel()
        if self.p.returncode is None:
            self.p.kill()
            await self.p.wait()


class TeleLab:
    def __init__(self, name: str = "lt", nodes: int = 3) -> None:
        self.lab = Lab(name, nodes=nodes)
        self.image = "busybox:latest"
        self.clients: list[Conn] = []
        self.daemons: dict[str, asyncio.subprocess.Process] = {}
        self.conn: Conn | None = None
        self.extra_config = ""  # more cnvmd.toml lines for every node (e.g. metrics_listen)

    # ---- API

    async def call(self, node: str, op: str, args: dict[str, Any] | None = None, *,
                   on_event: Any = None, timeout: float | None = 120) -> Any:
        async with await Client.connect(labpaths.node_socket(self.lab.name, node)) as c:
            return await c.call(op, args or {}, on_event=on_event, timeout=timeout)

    # ---- up / down

    async def up(self, tmp: Path) -> None:
        lab = self.lab
        if lab.exists():
            await self.down()
        await lab.up(start_daemons=False)
        for n in lab.node_names:
            await self.start_daemon(n)
        await self.call("node1", "cluster.init")
        for n in lab.node_names[1:]:
            tok = await self.call("node1", "cluster.token")
            await self.call(n, "join", {"peer": lab.underlay_ip("node1"), "token": tok["token"]})
        await self.wait_members()
        # the client host joins the overlay (it is no cluster member: static flood list)
        from cnvmd.network.datapath import NodeNetwork

        await self.call("node1", "net.allocate", {"name": "lab-client", "ip": CLIENT_IP})
        client = NodeNetwork("client", vni=VNI, port=VXLAN_PORT, subnet=SUBNET,
                             netns=lab.netns("client"))
        await client.set_expose(CLIENT_IP)
        await client.ensure()
        await client.set_peers([lab.underlay_ip(n) for n in lab.node_names])
        layout = imagebuild.build_busybox_layout(tmp / "busybox-oci")
        await self.call("node1", "images.import", {"path": str(layout.path), "name": self.image})

    async def start_daemon(self, node: str) -> int:
        """cnvmd in the node's netns: lab paths, underlay listen address, own netns prefix."""
        import os

        from cnvmlab.lab import REPO

        lab = self.lab
        run = labpaths.node_run_dir(lab.name, node)
        run.mkdir(parents=True, exist_ok=True)
        sock = labpaths.node_socket(lab.name, node)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        cfg = run / "cnvmd-tp.toml"
        cfg.write_text(
            f'node_name = "{node}"\nstate_dir = "{labpaths.node_state_dir(lab.name, node)}"\n'
            f'run_dir = "{run}"\nsocket_path = "{sock}"\n'
            f'runc_root = "{labpaths.node_runc_root(lab.name, node)}"\n'
            f'listen_address = "{lab.underlay_ip(node)}"\n'
            f'netns_prefix = "{lab.name}-{node}-"\ncgroup_root = "/cnvm-{lab.name}"\n'
            f'fault_injection = true\n' + self.extra_config)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        logf = os.open(run / "cnvmd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                       0o644)
        try:
            p = await lab.spawn(node, [sys.executable, "-m", "cnvmd", "--config", str(cfg)],
                                stdout=logf, stderr=logf, env=env, cwd=str(REPO))
        finally:
            os.close(logf)
        self.daemons[node] = p
        end = time.monotonic() + 20
        while True:
            with contextlib.suppress(Exception):
                await self.call(node, "ping", timeout=2)
                return p.pid
            if p.returncode is not None or time.monotonic() > end:
                raise AssertionError((run / "cnvmd.log").read_text()[-3000:])
            await asyncio.sleep(0.05)

    async def kill_daemon(self, node: str) -> None:
        import signal

        p = self.daemons.pop(node)
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGKILL)
        await p.wait()

    def print_logs(self, lines: int = 40) -> None:
        """The tail of every node's cnvmd log (a failing test's diagnostics)."""
        for n in self.lab.node_names:
            print(f"--- {n} cnvmd.log\n" + "\n".join(self.daemon_log(n).splitlines()[-lines:]))

    def daemon_log(self, node: str) -> str:
        p = labpaths.node_run_dir(self.lab.name, node) / "cnvmd.log"
        try:
            return p.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_members(self, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        want = set(self.lab.node_names)
        while True:
            ok = True
            for n in self.lab.node_names:
                view = await self.call(n, "nodes")
                alive = {m["name"] for m in view["nodes"] if m.get("state") == "alive"}
                ok = ok and alive >= want
            if ok:
                return
            if time.monotonic() > end:
                raise AssertionError(f"cluster did not form: {view}")
            await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def running(self, tmp: Path, cnvm: tuple[str, str] | None = None):
        """The lab up (and, given (name, ip), that cnvm deployed with its client, see
        `deploy_with_client`) for a module fixture; on a failure the daemons' logs are
        printed; torn down in every case."""
        try:
            await self.up(tmp)
            if cnvm is not None:
                await self.deploy_with_client(*cnvm)
            yield self
        except BaseException:
            self.print_logs(60)
            raise
        finally:
            await self.down()

    async def down(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()
        await self.lab.down()

    # ---- cnvms

    async def deploy(self, name: str, ip: str, node: str = "node1",
                     cmd: list[str] | None = None, memory: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"name": name, "image": self.image}
        if cmd:
            args["cmd"] = cmd
        if memory:
            args["memory"] = memory
        args["ip"] = ip
        return await self.call(node, "deploy", args)

    async def deploy_with_client(self, name: str, ip: str) -> Conn:
        """The fault tests' cnvm: deployed on node1 with a file written inside
        (/data.txt = "kept") and one client connection counting; also `self.conn`."""
        await self.deploy(name, ip)
        res = await self.call("node1", "exec", {"name": name, "cmd": [
            "sh", "-c", "echo kept > /data.txt"]})
        assert res["exit_code"] == 0, res
        self.conn = await self.client(ip)
        await self.conn.wait_more(20)
        return self.conn

    async def client(self, ip: str, interval: float = 0.01) -> Conn:
        p = await self.lab.spawn("client", [sys.executable, "-c", CLIENT, ip, str(PORT),
                                            str(interval)],
                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        c = Conn(p)
        self.clients.append(c)
        end = time.monotonic() + 20
        while c.port is None:
            if p.returncode is not None or time.monotonic() > end:
                err = (await p.stderr.read()).decode() if p.stderr else ""
                raise AssertionError(f"client could not connect to {ip}: {err}")
            await asyncio.sleep(0.05)
        return c

    async def where(self, name: str) -> list[str]:
        """Nodes whose daemon lists the cnvm."""
        out = []
        for n in self.lab.node_names:
            rows = await self.call(n, "ls")
            if any(r["name"] == name for r in rows):
                out.append(n)
        return out

    async def leftovers(self, node: str, name: str) -> list[str]:
        """What a failed/aborted teleport could have left on node: must be empty."""
        found = []
        st = labpaths.node_state_dir(self.lab.name, node)
        if (st / "cnvms" / name).exists():
            found.append(f"bundle {st / 'cnvms' / name}")
        tin = st / "teleport" / "in"
        if tin.exists() and any(tin.iterdir()):
            found.append(f"session dirs {list(tin.iterdir())}")
        if (st / "cnvms" / f"{name}.json").exists():
            found.append("record")
        for ns in netlink.netns_list(f"{self.lab.name}-{node}-{name}"):
            found.append(f"netns {ns}")
        runc_root = labpaths.node_runc_root(self.lab.name, node)
        if (runc_root / name).exists():
            found.append("runc state")
        mounts = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
        for line in mounts.splitlines():
            mp = line.split()[4]
            if mp.startswith(str(st)) and (f"/{name}/" in mp or "/teleport/" in mp):
                found.append(f"mount {mp}")
        return found
