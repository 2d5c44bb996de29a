"""The lab: several "hosts" on one machine, each a network namespace.

`<lab>-node1..N` and `<lab>-client` each have a veth `ul0` into a bridge in
`<lab>-ul` (the underlay switch) with an address from 198.18.0.0/24
(paths.underlay_address). With `up(start_daemons=True)` a real cnvmd runs in
every node's namespace with per-lab socket, state dir and runc root
(cnvmlab.paths), so `cnvmctl --lab L --node nodeK` reaches node K.

Tests, benchmarks, the demo and `cnvmctl lab` all use this class. Teardown
must work from a fresh process after a crash, so everything the lab makes is
either recorded in /run/cnvm-lab/<lab>/lab.json (pids with their start times)
or discoverable by name: namespaces starting with `<lab>-`, processes living in
those namespaces, runc roots and mounts under the lab's own directories.
Nothing outside that prefix is ever touched, so labs with different names
coexist. The root namespace never gets an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnvmd import netlink, proc
from cnvmd.runtime import Runc, _umount_under, mounts_under
from cnvmlab import paths

UL_BRIDGE = "br0"  # inside <lab>-ul
UL_IF = "ul0"  # each host's underlay interface
UL_PREFIX = 24
REPO = Path(__file__).resolve().parents[1]


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of pid (jiffies since boot): tells a recorded pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class HostStatus:
    host: str
    netns: str
    exists: bool
    underlay: str
    daemon_pid: int | None
    daemon_alive: bool
    socket: str | None


CLIENT_OVERLAY_IP = "10.100.101.250"


class LabError(Exception):
    pass


class Lab:
    """A named lab of `nodes` node hosts plus a client host."""

    def __init__(self, name: str = paths.DEFAULT_LAB, nodes: int = 3,
                 python: str | None = None) -> None:
        self.name = paths.check_lab_name(name)
        if not 1 <= nodes <= 200:
            raise ValueError("nodes must be between 1 and 200")
        self.nodes = nodes
        self.python = python or sys.executable
        self.run_dir = paths.RUN_BASE / name
        self.state_base = paths.STATE_BASE / name
        self.state_file = self.run_dir / "lab.json"

    # ---- naming

    @property
    def prefix(self) -> str:
        return f"{self.name}-"

    @property
    def node_names(self) -> list[str]:
        return [f"node{k}" for k in range(1, self.nodes + 1)]

    @property
    def hosts(self) -> list[str]:
        return ["client", *self.node_names]

    def netns(self, host: str) -> str:
        return paths.netns_name(self.name, host)

    @property
    def ul_netns(self) -> str:
        return self.netns("ul")

    def underlay_ip(self, host: str) -> str:
        return paths.underlay_address(0 if host == "client" else int(host[4:]))

    def runc(self, node: str) -> Runc:
        """A Runc for node's runc root, running runc inside the node's namespace."""
        return Runc(paths.node_runc_root(self.name, node), netns=self.netns(node))

    # ---- state file

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def _record_pid(self, key: str, pid: int, argv: Sequence[str]) -> None:
        state = self._load()
        state.setdefault("pids", {})[key] = {
            "pid": pid, "start": _proc_start_time(pid), "argv": list(argv)}
        self._save(state)

    # ---- up

    async def up(self, *, start_daemons: bool = True, cluster: bool = False,
                 daemon_timeout: float = 15.0) -> None:
        """Build the lab (error if it already exists); on any failure tear down what was made.

        With daemons and `cluster`, node1 inits a cluster that every other node joins,
        and the client host joins the overlay (address CLIENT_OVERLAY_IP), as an
        operator would set up real hosts.
        """
        if self.state_file.exists() or netlink.netns_list(self.prefix):
            raise LabError(f"lab {self.name} already exists (run `cnvmctl lab down --name "
                           f"{self.name}` first)")
        self._save({"name": self.name, "nodes": self.nodes, "created": time.time(),
                    "netns": [self.ul_netns, *(self.netns(h) for h in self.hosts)], "pids": {}})
        try:
            await self._build_network()
            for node in self.node_names:
                for d in (paths.node_run_dir(self.name, node),
                          paths.node_state_dir(self.name, node),
                          paths.node_runc_root(self.name, node)):
                    d.mkdir(parents=True, exist_ok=True)
            if start_daemons:
                await asyncio.gather(*(self.start_daemon(n, timeout=daemon_timeout)
                                       for n in self.node_names))
                if cluster:
                    await self.form_cluster()
                    await self.join_client_to_overlay()
        except BaseException:
            await asyncio.shield(self.down())
            raise

    async def _build_network(self) -> None:
        ul = self.ul_netns
        await netlink.netns_add(ul)
        await netlink.bridge_add(UL_BRIDGE, netns=ul)
        await netlink.link_up(UL_BRIDGE, ul)

        async def host(h: str) -> None:
            ns = self.netns(h)
            await netlink.netns_add(ns)
            # host end ul0 in the host, switch end named after the host in <lab>-ul
            await netlink.veth_add(h, UL_IF, netns=ul, peer_netns=ns)
            await netlink.link_set(h, netns=ul, master=UL_BRIDGE, up=True)
            await netlink.addr_add(UL_IF, f"{self.underlay_ip(h)}/{UL_PREFIX}", netns=ns)
            await netlink.link_up(UL_IF, ns)

        await asyncio.gather(*(host(h) for h in self.hosts))

    async def start_daemon(self, node: str, *, timeout: float = 15.0) -> int:
        """Start cnvmd for node inside its namespace; wait until its socket exists."""
        sock = paths.node_socket(self.name, node)
        run_dir = paths.node_run_dir(self.name, node)
        run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        argv = proc.netns_argv(self.netns(node), [
            self.python, "-m", "cnvmd", "--node-name", node,
            "--socket", str(sock),
            "--state-dir", str(paths.node_state_dir(self.name, node)),
            "--run-dir", str(run_dir),
            "--runc-root", str(paths.node_runc_root(self.name, node)),
            # the nodes share one /run/netns: per-node cnvm namespaces, found by down()
            "--netns-prefix", f"{self.prefix}{node}-",
            # and one cgroup tree per lab: every lab has a node1
            "--cgroup-root", f"/cnvm-{self.name}",
        ])
        log_path = run_dir / "cnvmd.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            p = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                start_new_session=True, env=env, cwd=str(REPO))
        finally:
            os.close(log_fd)
        # nsenter execs the target, so p.pid is the daemon itself
        self._record_pid(f"cnvmd-{node}", p.pid, argv)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not sock.exists():
            if p.returncode is not None or loop.time() > end:
                if p.returncode is None:
                    proc.kill_group(p.pid)
                    await p.wait()
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-8:])
                raise LabError(f"cnvmd on {node} did not come up (exit {p.returncode}):\n{tail}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(p.wait()), 0.05)
        return p.pid

    # ---- cluster

    async def call(self, node: str, op: str, args: dict[str, Any] | None = None,
                   timeout: float = 60.0) -> Any:
        """One API request to a node's daemon."""
        from proto.client import Client

        c = await Client.connect(paths.node_socket(self.name, node), agent="lab")
        try:
            return await c.call(op, args or {}, timeout=timeout)
        finally:
            await c.aclose()

    async def form_cluster(self, timeout: float = 30.0) -> None:
        """node1 inits a cluster; every other node joins it through node1 with a token."""
        first = self.node_names[0]
        await self.call(first, "cluster.init")
        for node in self.node_names[1:]:
            tok = await self.call(first, "cluster.token")
            await self.call(node, "join", {"peer": self.underlay_ip(first),
                                           "token": tok["token"]})
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        want = set(self.node_names)
        while True:
            seen = await self.call(first, "nodes")
            alive = {n["name"] for n in seen["nodes"] if n.get("state") == "alive"}
            if alive >= want:
                return
            if loop.time() > end:
                raise LabError(f"cluster did not converge: alive {sorted(alive)}")
            await asyncio.sleep(0.2)

    async def join_client_to_overlay(self, ip: str = CLIENT_OVERLAY_IP) -> None:
        """Put the client host on the cluster overlay, with an address claimed in IPAM."""
        from cnvmd.config import Config
        from cnvmd.network.datapath import NodeNetwork

        await self.call(self.node_names[0], "net.allocate", {"name": "node:client", "ip": ip})
        cfg = Config()  # the lab's daemons run with the default overlay settings
        client = NodeNetwork("client", vni=cfg.vni, port=cfg.vxlan_port, subnet=cfg.subnet,
                             netns=self.netns("client"))
        await client.set_expose(ip)
        await client.ensure()
        await client.set_peers([self.underlay_ip(n) for n in self.node_names])
        # The client is no cluster member: tell the nodes to flood to it too.
        for node in self.node_names:
            await self.call(node, "net.flood", {"add": [self.underlay_ip("client")]})

    # ---- use

    async def exec(self, host: str, argv: Sequence[str], *, input: bytes | None = None,
                   timeout: float | None = 60, check: bool = True) -> proc.Result:
        """Run a command to completion on a lab host."""
        return await proc.run(argv, netns=self.netns(host), input=input, timeout=timeout,
                              check=check)

    async def spawn(self, host: str, argv: Sequence[str], **kw: Any) -> asyncio.subprocess.Process:
        """Start a long-running process on a lab host (recorded, so down() kills it)."""
        full = proc.netns_argv(self.netns(host), argv)
        kw.setdefault("start_new_session", True)
        p = await asyncio.create_subprocess_exec(*full, **kw)
        self._record_pid(f"{host}-{p.pid}", p.pid, full)
        return p

    def status(self) -> list[HostStatus]:
        pids = self._load().get("pids", {})
        out = []
        for h in [*self.hosts, "ul"]:
            ns = self.netns(h)
            rec = pids.get(f"cnvmd-{h}")
            pid = rec["pid"] if rec else None
            alive = bool(rec) and _proc_start_time(rec["pid"]) == rec["start"]
            sock = paths.node_socket(self.name, h) if h.startswith("node") else None
            out.append(HostStatus(
                host=h, netns=ns, exists=netlink.netns_exists(ns),
                underlay="" if h == "ul" else self.underlay_ip(h),
                daemon_pid=pid, daemon_alive=alive,
                socket=str(sock) if sock and sock.exists() else None))
        return out

    def recorded_nodes(self) -> int:
        """How many nodes the existing lab was built with (default 3 if unknown)."""
        return int(self._load().get("nodes", 3))

    def exists(self) -> bool:
        return self.state_file.exists() or bool(netlink.netns_list(self.prefix))

    # ---- down

    async def down(self) -> list[str]:
        """Remove everything the lab made; safe to repeat and after a crash. Returns notes."""
        notes: list[str] = []
        state = self._load()
        # 1. recorded processes (daemons first, so none acts on what follows): TERM, KILL
        recorded = []
        for key, rec in state.get("pids", {}).items():
            if _proc_start_time(rec["pid"]) == rec.get("start"):
                recorded.append(rec["pid"])
                notes.append(f"process {key} ({rec['pid']})")
        await _terminate(recorded)
        # 2. runc containers in every runc root under the lab's run dir (their log
        #    shims exit by themselves once the containers are gone)
        for root in self._runc_roots():
            r = Runc(root)
            try:
                for c in await r.list():
                    await r.destroy(c.id)
                    notes.append(f"container {c.id} ({root})")
            except Exception as exc:  # keep tearing down
                notes.append(f"runc root {root}: {exc}")
        # 3. whatever still lives in one of the lab's namespaces
        lab_ns = netlink.netns_list(self.prefix)
        if lab_ns:
            stray = netlink.pids_in_netns(lab_ns)
            if stray:
                notes.append(f"processes in lab namespaces: {stray}")
            await _terminate(stray, grace=0.5)
        # 4. mounts under the lab's dirs (CRIU yards, runc criu-root, ...)
        for base in (self.run_dir, self.state_base):
            if mounts_under(base):
                notes.append(f"mounts under {base}")
                _umount_under(base)
        # 5. namespaces (links inside go with them)
        for ns in netlink.netns_list(self.prefix):
            await netlink.netns_del(ns)
        # 6. directories, and the lab's cgroup tree (its daemons' --cgroup-root)
        for base in (self.state_base, self.run_dir):
            shutil.rmtree(base, ignore_errors=True)
        left = remove_cgroup_tree(f"cnvm-{self.name}")
        if left:
            notes.append(f"cgroups still in use: {left}")
        return notes

    def _runc_roots(self) -> list[Path]:
        roots = {paths.node_runc_root(self.name, n) for n in self.node_names}
        if self.run_dir.exists():
            roots |= {p for p in self.run_dir.glob("*/runc") if p.is_dir()}
            roots |= {p for p in self.run_dir.glob("*/runc-*") if p.is_dir()}
        return sorted(r for r in roots if r.exists())


def remove_cgroup_tree(name: str, base: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """rmdir `<hierarchy>/<name>` bottom-up in every cgroup hierarchy (v1 controllers
    or the v2 tree); a cgroup with tasks stays and is returned."""
    left: list[str] = []
    tops = [base / name] + [d / name for d in base.iterdir() if d.is_dir()] \
        if base.is_dir() else []
    for top in tops:
        if not top.is_dir() or top.is_symlink():
            continue
        subs = sorted((p for p in top.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)
        for d in [*subs, top]:
            try:
                d.rmdir()
            except OSError:
                left.append(str(d))
    return left


async def _terminate(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM, wait up to grace, then SIGKILL; pids gone or reused are skipped."""
    starts = {p: _proc_start_time(p) for p in pids}
    live = [p for p, s in starts.items() if s is not None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    end = loop.time() + grace
    while live and loop.time() < end:
        await asyncio.sleep(0.05)
        live = [p for p in live if _alive(p, starts[p])]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    end = loop.time() + 2
    while live and loop.time() < end:
        await asyncio.sleep(0.02)
        live = [p for p in live if _alive(p, starts[p])]


def _alive(pid: int, start: int | None) -> bool:
    """Alive and not a zombie (a zombie of ours that asyncio did not reap yet counts as gone)."""
    if _proc_start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
