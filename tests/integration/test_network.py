"""The overlay network on a 3-node lab + client host (issue 5 acceptance).

The Network service of each node is driven in-process against the node's lab
namespace (netns=...); the datapath, netns, veths, FDB and NAT rules are all
real kernel objects. IPAM claims between the three nodes go through an
in-process loopback peer set (the same `handle` the peer mesh calls).

Processes inside cnvm netns are plain busybox servers started with nsenter;
every namespace is named `ln-...`, so the lab's teardown finds all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cnvmd import netlink, proc
from cnvmd.config import Config
from cnvmd.network import Network, NetworkError, NodeNetwork, mac_for_ip
from cnvmd.network.names import BRIDGE, VXLAN, bridge_mac, host_veth, host_veth_mac, vxlan_mac
from cnvmd.state import StateStore
from cnvmlab.lab import Lab
from proto.messages import ErrorCode

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAB = "ln"
SUBNET = ipaddress.IPv4Network("10.100.101.0/24")
CLIENT_IP = "10.100.101.250"
PORT = 7000


class LoopbackPeers:
    """Peer set over the other in-process Networks (what MeshPeers does over SSH)."""

    def __init__(self, me: str, nets: dict[str, Network]) -> None:
        self.me, self.nets = me, nets

    def up_peers(self) -> list[str]:
        return sorted(n for n in self.nets if n != self.me)

    async def call(self, node: str, op: str, args: dict[str, Any]) -> Any:
        await asyncio.sleep(random.random() * 0.001)
        return await self.nets[node].ipam.handle(op, dict(args))


def node_config(lab: Lab, node: str) -> Config:
    return replace(Config(), node_name=node, vni=42, vxlan_port=6783,
                   subnet=str(SUBNET), netns_prefix=f"{lab.name}-{node}-")


def make_network(lab: Lab, node: str, tmp: Path, nets: dict[str, Network]) -> Network:
    net = Network(node_config(lab, node), store=StateStore(tmp / node), netns=lab.netns(node))
    net.ipam.peers = LoopbackPeers(node, nets)
    nets[node] = net
    return net


async def sh(netns: str, *argv: str, timeout: float = 15, check: bool = True) -> proc.Result:
    return await proc.run(list(argv), netns=netns, timeout=timeout, check=check)


async def eventually(fn: Any, timeout: float = 10.0, every: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except (AssertionError, proc.CommandError):
            if time.monotonic() > end:
                raise
        await asyncio.sleep(every)


async def serve(netns: str, reply: str) -> asyncio.subprocess.Process:
    """A TCP server in a cnvm netns that answers every connection with `reply`."""
    return await asyncio.create_subprocess_exec(
        *proc.netns_argv(netns, ["busybox", "nc", "-ll", "-p", str(PORT), "-e",
                                 "/bin/busybox", "echo", reply]),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)


async def fetch(netns: str, ip: str, port: int = PORT) -> str:
    res = await sh(netns, "busybox", "nc", "-w", "3", ip, str(port), check=False)
    return res.stdout.strip()


async def expect_reply(netns: str, ip: str, want: str, port: int = PORT) -> None:
    async def check() -> None:
        got = await fetch(netns, ip, port)
        assert got == want, f"{ip}:{port} from {netns}: got {got!r}, want {want!r}"

    await eventually(check)


UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(sys.argv[2].encode() + b" " + data, peer)
"""
UDP_ASK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
print(s.recv(2048).decode())
"""


async def serve_udp(netns: str, port: int, reply: str) -> asyncio.subprocess.Process:
    import sys

    return await asyncio.create_subprocess_exec(
        *proc.netns_argv(netns, [sys.executable, "-c", UDP_ECHO, str(port), reply]),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)


async def expect_udp(netns: str, ip: str, port: int, want: str) -> None:
    import sys

    async def check() -> None:
        res = await sh(netns, sys.executable, "-c", UDP_ASK, ip, str(port), check=False)
        assert res.stdout.strip() == want, (res.stdout, res.stderr[-300:])

    await eventually(check)


async def ping(netns: str, ip: str) -> None:
    await eventually(lambda: sh(netns, "busybox", "ping", "-c", "1", "-W", "1", ip))


async def stop(p: asyncio.subprocess.Process) -> None:
    if p.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill_group(p.pid)
        await p.wait()


async def overlay_addrs_in_root() -> list[str]:
    return [a for a in await netlink.addrs(None)
            if ipaddress.ip_interface(a).ip in SUBNET]


async def test_overlay_three_nodes_client_expose_and_move(lab_factory, tmp_path: Path):
    lab: Lab = await lab_factory(LAB, nodes=3)
    nets: dict[str, Network] = {}
    for n in lab.node_names:
        make_network(lab, n, tmp_path, nets)
    underlay = {h: lab.underlay_ip(h) for h in lab.hosts}
    servers: list[asyncio.subprocess.Process] = []
    try:
        # ---- datapath on every node; flood list = every other lab host (incl. client)
        for net in nets.values():
            await net.ensure()
            await net.set_peers([underlay[h] for h in lab.hosts])  # own address is skipped
        for n, net in nets.items():
            st = await net.status()
            assert st["datapath"]["up"] and st["datapath"]["mtu"] == 1450, st
            assert st["datapath"]["vni"] == 42 and st["datapath"]["port"] == 6783
            assert sorted(st["peers"]) == sorted(a for h, a in underlay.items() if h != n)
            br = await netlink.link_get(BRIDGE, lab.netns(n))
            vx = await netlink.link_get(VXLAN, lab.netns(n))
            assert br and vx and vx.master == br.index and vx.mtu == 1450
        # ensure() again changes nothing (idempotent), set_peers converges
        await nets["node1"].ensure()
        assert await nets["node1"].set_peers([underlay[h] for h in lab.hosts]) == ([], [])

        # ---- the client host joins the overlay with a claimed address
        client = NodeNetwork("client", vni=42, port=6783, subnet=str(SUBNET),
                             netns=lab.netns("client"))
        assert await nets["node1"].ipam.allocate("node:client", CLIENT_IP) == CLIENT_IP
        await client.set_expose(CLIENT_IP)
        await client.ensure()
        await client.set_peers([underlay[h] for h in lab.node_names])

        # ---- two cnvms on different nodes: allocate (IPAM) + netns
        ip_web = await nets["node1"].allocate("web")
        ip_db = await nets["node2"].allocate("db", want="10.100.101.20")
        assert ip_db == "10.100.101.20" and ip_web != ip_db
        for net in nets.values():
            assert net.ipam.owner_of(ip_web) == "web" and net.ipam.owner_of(ip_db) == "db"
        web = await nets["node1"].create("web", ip_web)
        db = await nets["node2"].create("db", ip_db)
        assert web.netns == "ln-node1-web" and web.netns_path == "/run/netns/ln-node1-web"
        assert nets["node1"].netns_path("web") == web.netns_path
        eth0 = await netlink.link_get("eth0", web.netns)
        assert eth0 and eth0.mac == mac_for_ip(ip_web) and eth0.mtu == 1450
        # every device the daemon made carries the MAC it was created with (see vxlan_mac)
        node_ns = nets["node1"].node.netns
        for dev, mac in (("cnvm0", bridge_mac("node1")), ("cnvm0-vx", vxlan_mac("node1")),
                         (host_veth("web"), host_veth_mac("node1", "web"))):
            got = await netlink.link_get(dev, node_ns)
            assert got and got.mac == mac, (dev, got, mac)
        assert f"{ip_web}/24" in await netlink.addrs(web.netns, "eth0")
        servers += [await serve(web.netns, "web"), await serve(db.netns, "db")]

        # cnvm <-> cnvm across nodes: ping and TCP, both ways
        await ping(web.netns, ip_db)
        await ping(db.netns, ip_web)
        await expect_reply(web.netns, ip_db, "db")
        await expect_reply(db.netns, ip_web, "web")
        # the client host reaches every cnvm over the overlay
        for ip, want in ((ip_web, "web"), (ip_db, "db")):
            await ping(lab.netns("client"), ip)
            await expect_reply(lab.netns("client"), ip, want)

        # ---- node expose address: a node reaches every cnvm directly
        host3 = await nets["node3"].set_expose_address("auto")
        assert host3 and ipaddress.ip_address(host3) in SUBNET
        assert nets["node1"].ipam.owner_of(host3) == "node:node3"
        await expect_reply(lab.netns("node3"), ip_web, "web")

        # ---- onramp: node2:8080 -> web (which runs on node1)
        fwd = await nets["node2"].expose("web", "8080:7000")
        assert (fwd.ip, fwd.port, fwd.proto) == (ip_web, PORT, "tcp")
        assert nets["node2"].ipam.ip_of("node:node2")  # expose address made on demand
        assert await nets["node2"].expose("web", "8080:7000/tcp") == fwd  # idempotent
        await expect_reply(lab.netns("client"), underlay["node2"], "web", 8080)
        # UDP: node1:5353/udp -> db (on node2) port 7001
        servers.append(await serve_udp(db.netns, 7001, "db"))
        await nets["node1"].expose("db", "5353:7001/udp")
        await expect_udp(lab.netns("client"), underlay["node1"], 5353, "db hi")

        # ---- bad input: clear errors, nothing changed
        ns_before = netlink.netns_list(f"{LAB}-")
        rules_before = await nets["node2"].exposer.kernel_rules()
        table_before = nets["node1"].ipam.table()
        bad = [
            (nets["node3"].create("x1", "10.100.102.7"), ErrorCode.INVALID_ARGUMENT,
             "outside the cluster subnet"),
            (nets["node3"].create("x2", "10.100.101.255"), ErrorCode.INVALID_ARGUMENT,
             "reserved"),
            (nets["node3"].allocate("x3", want="10.100.99.1"), ErrorCode.INVALID_ARGUMENT,
             "outside the cluster subnet"),
            (nets["node3"].allocate("x4", want=ip_web), ErrorCode.ALREADY_EXISTS,
             "already in use"),
            (nets["node3"].create("x5", ip_db), ErrorCode.CONFLICT, "in use by db"),
            (nets["node1"].create("web", ip_web), ErrorCode.ALREADY_EXISTS, "already exists"),
            (nets["node2"].expose("web", "8080"), ErrorCode.INVALID_ARGUMENT, "bad port spec"),
            (nets["node2"].expose("web", "80:99999"), ErrorCode.INVALID_ARGUMENT,
             "not in 1-65535"),
            (nets["node2"].expose("web", "9090:80/icmp"), ErrorCode.INVALID_ARGUMENT,
             "tcp or udp"),
            (nets["node2"].expose("db", "8080:7000"), ErrorCode.ALREADY_EXISTS,
             "already forwarded to web"),
            (nets["node2"].expose("nosuch", "9090:80"), ErrorCode.NOT_FOUND, "no cnvm"),
            (nets["node2"].unexpose("db", "8080"), ErrorCode.NOT_FOUND, "no published port"),
        ]
        for coro, code, msg in bad:
            with pytest.raises(NetworkError, match=msg) as ei:
                await coro
            assert ei.value.code == code, (msg, ei.value)
        assert netlink.netns_list(f"{LAB}-") == ns_before
        assert await nets["node2"].exposer.kernel_rules() == rules_before
        assert nets["node1"].ipam.table() == table_before

        # ---- move web node1 -> node3 (stopped cnvm): same IP, same MAC, forward still works
        await stop(servers.pop(0))
        assert await nets["node1"].destroy("web")
        assert not netlink.netns_exists("ln-node1-web")
        assert await fetch(lab.netns("client"), underlay["node2"], 8080) == ""
        web3 = await nets["node3"].create("web", ip_web, up=False, prelocked=True)
        assert await netlink.is_locked(web3.netns)
        await netlink.unlock(web3.netns)  # (a restore would remove the lock itself)
        servers.append(await serve(web3.netns, "web"))
        await nets["node3"].bring_up("web")
        await nets["node3"].announce("web")
        eth0 = await netlink.link_get("eth0", web3.netns)
        assert eth0 and eth0.up and eth0.mac == mac_for_ip(ip_web)
        assert f"{ip_web}/24" in await netlink.addrs(web3.netns, "eth0")
        assert nets["node1"].ipam.owner_of(ip_web) == "web"  # kept on the move
        await expect_reply(lab.netns("client"), underlay["node2"], "web", 8080)
        await expect_reply(db.netns, ip_web, "web")
        await expect_reply(lab.netns("client"), ip_web, "web")

        # ---- daemon restart on node2: a fresh service repairs from its records
        await netlink.link_del(VXLAN, lab.netns("node2"))  # damage: VXLAN gone
        ghost_ip = await nets["node2"].allocate("ghost")  # plumbed, but its record lost
        await nets["node2"].cnvms.create("ghost", ghost_ip)
        await netlink.netns_add("ln-node2-alien")  # not plumbed here: never touched
        nets.pop("node2")
        n2 = make_network(lab, "node2", tmp_path, nets)
        notes = await n2.start()
        await n2.set_peers([underlay[h] for h in lab.hosts])  # what the membership replay does
        assert any("ghost" in x and "orphan removed" in x for x in notes), notes
        assert not netlink.netns_exists("ln-node2-ghost")
        assert netlink.netns_exists("ln-node2-alien")
        assert any("alien" in x and "left alone" in x for x in notes), notes
        await netlink.netns_del("ln-node2-alien")
        assert [f.key for f in n2.exposes()] == ["8080/tcp"]
        await expect_reply(lab.netns("client"), underlay["node2"], "web", 8080)
        await expect_reply(web3.netns, ip_db, "db")

        # ---- unexpose, rm (release) removes the address and every forward of it
        await n2.expose("web", "9090:7000")
        assert (await n2.unexpose("web", "9090")).hostport == 9090
        await n2.expose("db", "5000:7000")
        await expect_reply(lab.netns("client"), underlay["node2"], "db", 5000)
        await stop(servers.pop(0))  # db
        await n2.detach("db", {})
        assert all(net.ipam.owner_of(ip_db) is None for net in nets.values())
        assert [f.key for f in n2.exposes()] == ["8080/tcp"]
        assert not any("5000" in r for r in await n2.exposer.kernel_rules())
        assert nets["node1"].exposes() == []  # db's UDP forward on node1 went too
        assert await nets["node1"].exposer.kernel_rules() == []

        # ---- net down: refused while in use; with force everything of node2 goes
        with pytest.raises(NetworkError, match="still in use") as ei:
            await n2.teardown()
        assert ei.value.code == ErrorCode.CONFLICT
        host2 = n2.ipam.ip_of("node:node2")
        notes = await n2.teardown(force=True)
        assert notes and await netlink.link_get(BRIDGE, lab.netns("node2")) is None
        assert await n2.exposer.kernel_rules() == []
        assert nets["node1"].ipam.owner_of(host2) is None
        assert not n2.exposes() and not (await n2.status())["enabled"]

        # ---- the root namespace never saw an overlay address or device
        assert await overlay_addrs_in_root() == []
        assert await netlink.link_get(BRIDGE, None) is None
    finally:
        for p in servers:
            await stop(p)
        for net in nets.values():
            with contextlib.suppress(Exception):
                await net.close()
    assert await overlay_addrs_in_root() == []


# --------------------------------------------------------------------------- real daemons


DAEMONS: dict[tuple[str, str], asyncio.subprocess.Process] = {}


async def start_node_daemon(lab: Lab, node: str) -> Path:
    """cnvmd in the node's namespace with the lab's paths and a per-node netns prefix."""
    import os
    import sys

    from cnvmlab import paths as labpaths
    from cnvmlab.lab import REPO

    run = labpaths.node_run_dir(lab.name, node)
    run.mkdir(parents=True, exist_ok=True)
    sock = labpaths.node_socket(lab.name, node)
    cfg = run / "cnvmd-net.toml"
    cfg.write_text(
        f'node_name = "{node}"\nstate_dir = "{labpaths.node_state_dir(lab.name, node)}"\n'
        f'run_dir = "{run}"\nsocket_path = "{sock}"\n'
        f'runc_root = "{labpaths.node_runc_root(lab.name, node)}"\n'
        f'listen_address = "{lab.underlay_ip(node)}"\n'
        f'netns_prefix = "{lab.name}-{node}-"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sock.unlink(missing_ok=True)
    log = os.open(run / "cnvmd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        p = await lab.spawn(node, [sys.executable, "-m", "cnvmd", "--config", str(cfg)],
                            stdout=log, stderr=log, env=env, cwd=str(REPO))
    finally:
        os.close(log)
    DAEMONS[(lab.name, node)] = p
    end = time.monotonic() + 20
    while not sock.exists():
        assert p.returncode is None, (run / "cnvmd.log").read_text()[-3000:]
        assert time.monotonic() < end, "cnvmd did not come up"
        await asyncio.sleep(0.05)
    return sock


async def test_daemons_fdb_follows_membership_and_ipam_race(lab_factory):
    from proto.client import Client

    lab: Lab = await lab_factory(LAB, nodes=3)
    socks = {n: await start_node_daemon(lab, n) for n in lab.node_names}
    clients = {n: await Client.connect(s) for n, s in socks.items()}
    ul = {n: lab.underlay_ip(n) for n in lab.node_names}

    async def call(node: str, op: str, args: dict[str, Any] | None = None) -> Any:
        return await clients[node].call(op, args or {}, timeout=60)

    async def peers_of(node: str) -> list[str]:
        return sorted((await call(node, "net.status"))["peers"])

    try:
        # the datapath is only built on demand; node1 first, alone: nobody to flood to
        assert (await call("node1", "net.status"))["datapath"]["bridge"] is False
        st = await call("node1", "net.up")
        assert st["datapath"]["up"] and st["peers"] == []
        # the cluster forms: node1's flood list follows membership by itself
        await call("node1", "cluster.init")
        for n in ("node2", "node3"):
            tok = (await call("node1", "cluster.token"))["token"]
            await call(n, "join", {"peer": ul["node1"], "token": tok})

        async def node1_floods_to_both() -> None:
            assert await peers_of("node1") == sorted([ul["node2"], ul["node3"]])

        await eventually(node1_floods_to_both, timeout=15)
        # the others build theirs with net.up and know the members already
        for n in ("node2", "node3"):
            await call(n, "net.up", {"expose": "auto"})

        async def all_flood() -> None:
            for n in lab.node_names:
                assert await peers_of(n) == sorted(a for m, a in ul.items() if m != n)

        await eventually(all_flood, timeout=15)
        host1 = (await call("node1", "net.host", {"ip": "auto"}))["expose_ip"]
        hosts = {n: (await call(n, "net.status"))["expose_ip"] for n in lab.node_names}
        assert hosts["node1"] == host1 and len(set(hosts.values())) == 3
        # node addresses reach each other over the overlay
        await ping(lab.netns("node1"), hosts["node3"])
        await ping(lab.netns("node3"), hosts["node2"])

        # concurrent allocations on two nodes, through the real mesh: never the same address
        seen: dict[str, str] = {}
        for i in range(50):
            a, b = await asyncio.gather(call("node1", "net.allocate", {"name": f"a{i}"}),
                                        call("node2", "net.allocate", {"name": f"b{i}"}))
            for r in (a, b):
                assert r["ip"] not in seen, f"{r['ip']} handed out twice"
                seen[r["ip"]] = r["name"]
        tables = [(await call(n, "net.ipam"))["in_use"] for n in lab.node_names]
        for t in tables:
            for ip, owner in seen.items():
                assert t.get(ip) == owner
        # a taken address is refused with a clear error, anywhere
        from proto.messages import ProtoError

        with pytest.raises(ProtoError, match="already in use") as ei:
            await call("node3", "net.allocate", {"name": "zz", "ip": next(iter(seen))})
        assert ei.value.code == ErrorCode.ALREADY_EXISTS
        rel = await call("node2", "net.release", {"name": "a0"})
        assert rel["ip"]
        for n in lab.node_names:
            assert (await call(n, "net.ipam"))["in_use"].get(rel["ip"]) is None

        # a removed member leaves every flood list, and its address ranges go to node1
        had = [r for r in (await call("node1", "net.ipam"))["ranges"] if r["owner"] == "node3"]
        res = await call("node1", "cluster.remove", {"node": "node3"})
        assert len(res["ranges_taken"]) == len(had), (res, had)

        async def node3_gone() -> None:
            for n in ("node1", "node2"):
                assert ul["node3"] not in await peers_of(n)
                owners = {r["owner"] for r in (await call(n, "net.ipam"))["ranges"]}
                assert "node3" not in owners, owners

        await eventually(node3_gone, timeout=15)
        assert await overlay_addrs_in_root() == []
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
        for n, sock in socks.items():  # for a failing run: what the daemons complained about
            with contextlib.suppress(OSError):
                bad = [ln for ln in (sock.parent / "cnvmd.log").read_text().splitlines()
                       if "level=error" in ln or ("network" in ln and "level=warning" in ln)]
                if bad:
                    print(f"--- {n} cnvmd.log\n" + "\n".join(bad[-20:]))


ASK = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(b"hostname\n")
print(s.makefile().readline().strip())
"""


async def ask(netns: str, ip: str, port: int = PORT) -> str:
    """Ask the test image's counter service (port 7000) for its hostname: '1 <name>'."""
    import sys

    res = await sh(netns, sys.executable, "-c", ASK, ip, str(port), check=False)
    return res.stdout.strip()


async def test_deploy_real_containers_on_the_overlay(lab_factory, tmp_path: Path):
    """lifecycle.deploy/rm through the daemons use this network (attach/detach)."""
    from proto.client import Client
    from proto.messages import ProtoError
    from tests.imagebuild import build_busybox_layout

    lab: Lab = await lab_factory(LAB, nodes=3)
    socks = {n: await start_node_daemon(lab, n) for n in lab.node_names}
    clients = {n: await Client.connect(s) for n, s in socks.items()}
    ul = {h: lab.underlay_ip(h) for h in lab.hosts}

    async def call(node: str, op: str, args: dict[str, Any] | None = None) -> Any:
        return await clients[node].call(op, args or {}, timeout=40)

    try:
        await call("node1", "cluster.init")
        for n in ("node2", "node3"):
            tok = (await call("node1", "cluster.token"))["token"]
            await call(n, "join", {"peer": ul["node1"], "token": tok})
        img = build_busybox_layout(tmp_path / "busybox-oci")
        for n in lab.node_names:
            await call(n, "images.import", {"path": str(img.path), "name": "busybox"})

        web = await call("node1", "deploy", {"name": "web", "image": "busybox",
                                             "ip": "10.100.101.30"})
        db = await call("node2", "deploy", {"name": "db", "image": "busybox"})
        assert web["ip"] == "10.100.101.30" and web["netns"] == "/run/netns/ln-node1-web"
        assert db["ip"] and ipaddress.ip_address(db["ip"]) in SUBNET and db["ip"] != web["ip"]

        # bad input through deploy: clear errors; the other cnvm and the tables unchanged
        table = (await call("node3", "net.ipam"))["in_use"]
        ns_before = netlink.netns_list(f"{LAB}-")
        for args, msg in [({"name": "x", "ip": "10.100.102.3"}, "outside the cluster subnet"),
                          ({"name": "x", "ip": "10.100.101.30"}, "already in use"),
                          # the cluster directory refuses the name before IPAM is asked
                          ({"name": "web"}, "named 'web' already exists on node1")]:
            with pytest.raises(ProtoError, match=msg):
                await call("node3", "deploy", {**args, "image": "busybox"})
        assert (await call("node3", "net.ipam"))["in_use"] == table
        assert netlink.netns_list(f"{LAB}-") == ns_before

        # containers talk across nodes; the client host reaches them over the overlay
        client = NodeNetwork("client", vni=42, port=6783, subnet=str(SUBNET),
                             netns=lab.netns("client"))
        await call("node1", "net.allocate", {"name": "node:client", "ip": CLIENT_IP})
        await client.set_expose(CLIENT_IP)
        await client.ensure()
        await client.set_peers([ul[n] for n in lab.node_names])

        async def answers(netns: str, ip: str, want: str, port: int = PORT) -> None:
            async def check() -> None:
                assert await ask(netns, ip, port) == want

            await eventually(check, timeout=15)

        await answers("ln-node1-web", db["ip"], "1 db")
        await answers("ln-node2-db", web["ip"], "1 web")
        await answers(lab.netns("client"), web["ip"], "1 web")
        await answers(lab.netns("client"), db["ip"], "1 db")

        # node3 publishes web (on node1); rm web on node1 removes it on node3 as well
        # (through the CLI: cnvmctl --lab ln --node node3 expose web 8080:7000)
        import json
        import sys

        async def cli(*argv: str) -> proc.Result:
            return await proc.run([sys.executable, "-m", "cnvmctl", "--lab", LAB, *argv],
                                  timeout=60, check=False)

        res = await cli("--node", "node3", "--json", "expose", "web", "8080:7000")
        assert res.returncode == 0, res
        fwd = json.loads(res.stdout)
        assert fwd["ip"] == web["ip"] and fwd["node"] == "node3"
        res = await cli("--node", "node3", "expose", "web", "8080")
        assert res.returncode == 1 and "bad port spec '8080'" in res.stderr, res
        res = await cli("--node", "node3", "net", "status")
        assert res.returncode == 0 and "8080/tcp" in res.stdout and "web" in res.stdout, res
        res = await cli("--node", "node1", "exposes", "--on", "node3")
        assert res.returncode == 0 and "8080/tcp" in res.stdout, res
        await answers(lab.netns("client"), ul["node3"], "1 web", 8080)

        # node3's daemon crashes (kill -9) and its VXLAN device is lost meanwhile: the
        # next daemon repairs the datapath, the flood list (membership replay) and ports
        p3 = DAEMONS[(LAB, "node3")]
        p3.kill()
        await p3.wait()
        await clients["node3"].aclose()
        await netlink.link_del(VXLAN, lab.netns("node3"))
        clients["node3"] = await Client.connect(await start_node_daemon(lab, "node3"))

        async def node3_repaired() -> None:
            st = await call("node3", "net.status")
            assert st["datapath"]["up"] and sorted(st["peers"]) == sorted(
                ul[n] for n in ("node1", "node2")), st
            assert [f["spec"] for f in st["exposes"]] == ["8080:7000/tcp"]

        await eventually(node3_repaired, timeout=20)
        await answers(lab.netns("client"), ul["node3"], "1 web", 8080)

        await call("node1", "rm", {"name": "web", "force": True})
        assert not netlink.netns_exists("ln-node1-web")

        async def released() -> None:
            for n in lab.node_names:
                assert web["ip"] not in (await call(n, "net.ipam"))["in_use"]
            assert (await call("node3", "exposes"))["exposes"] == []

        await eventually(released)
        await call("node2", "rm", {"name": "db", "force": True})
        assert await overlay_addrs_in_root() == []
    except BaseException:
        with contextlib.suppress(Exception):
            c = await Client.connect(socks["node1"])
            print("LS node1", await c.call("ls", {}, timeout=10))
            await c.aclose()
        for n, sock in socks.items():
            with contextlib.suppress(OSError):
                tail = (sock.parent / "cnvmd.log").read_text().splitlines()[-15:]
                print(f"--- {n} cnvmd.log\n" + "\n".join(tail))
        raise
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
