"""cnvmctl plumbing and daemon helpers that need no daemon: registry, parser, output,
progress view, sd_notify, log format, plug-in discovery."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cnvmctl import output, registry
from cnvmctl.__main__ import build_parser, resolve_socket
from cnvmctl.context import CliError
from cnvmd import daemon as daemon_mod
from proto.client import Event

pytestmark = pytest.mark.unit


@pytest.fixture
def clean_registry() -> Any:
    saved_c, saved_g = dict(registry.COMMANDS), dict(registry.GROUPS)
    registry.COMMANDS.clear()
    registry.GROUPS.clear()
    try:
        yield registry
    finally:
        registry.COMMANDS.clear()
        registry.COMMANDS.update(saved_c)
        registry.GROUPS.clear()
        registry.GROUPS.update(saved_g)


def test_registry_nested_groups_and_json_anywhere(clean_registry: Any) -> None:
    calls: list[str] = []

    @registry.command("status", help="s")
    async def status(ctx: Any, a: Any) -> None:
        calls.append("status")

    registry.group("lab", help="lab things")

    @registry.command("lab up", help="up", daemon=False,
                      args=[registry.arg("--nodes", type=int, default=3)])
    def lab_up(ctx: Any, a: Any) -> int:
        return 0

    @registry.command("images import", help="import",
                      args=[registry.arg("path"), registry.arg("--name")])
    async def imp(ctx: Any, a: Any) -> None: ...

    with pytest.raises(ValueError):
        registry.command("status", help="dup")(status)
    p = build_parser()
    ns = p.parse_args(["lab", "up", "--nodes", "5", "--json"])
    assert ns._command.path == ("lab", "up") and ns.nodes == 5 and ns.json is True
    ns = p.parse_args(["--json", "images", "import", "x.tar"])
    assert ns._command.handler is imp and ns.path == "x.tar" and ns.json
    ns = p.parse_args(["status"])
    assert ns.json is False
    with pytest.raises(SystemExit) as e:
        p.parse_args(["lab"])  # group without subcommand is a usage error
    assert e.value.code == 2
    # --lab alone is fine for daemon-less commands, not for daemon ones
    ns = p.parse_args(["--lab", "x", "lab", "up"])
    resolve_socket(ns, ns._command)
    ns = p.parse_args(["--lab", "x", "status"])
    with pytest.raises(CliError):
        resolve_socket(ns, ns._command)


def test_resolve_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.discover()
    p = build_parser()
    monkeypatch.delenv("CNVM_SOCKET", raising=False)
    ns = p.parse_args(["ls"])
    assert resolve_socket(ns, ns._command) == (Path("/run/cnvm/cnvmd.sock"), "default")
    monkeypatch.setenv("CNVM_SOCKET", "/tmp/x.sock")
    assert resolve_socket(ns, ns._command)[0] == Path("/tmp/x.sock")
    ns = p.parse_args(["--node", "node2", "ls"])
    assert resolve_socket(ns, ns._command)[0] == Path("/run/cnvm-lab/lab/node2/cnvmd.sock")
    ns = p.parse_args(["--lab", "b", "--node", "node1", "ls"])
    assert resolve_socket(ns, ns._command)[0] == Path("/run/cnvm-lab/b/node1/cnvmd.sock")
    ns = p.parse_args(["--lab", "BAD!", "--node", "node1", "ls"])
    with pytest.raises(CliError):
        resolve_socket(ns, ns._command)


def test_table_and_formatters(capsys: pytest.CaptureFixture[str]) -> None:
    output.print_table([{"a": "x", "b": None}, {"a": "longer", "b": True}],
                       [("A", "a"), ("BEE", "b")])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["A       BEE", "x       -", "longer  yes"]
    assert output.size(1536) == "1.5 KiB" and output.size(10) == "10 B"
    assert output.duration(3725) == "1h2m" and output.duration(5) == "5s"


def test_progress_view_plain() -> None:
    buf = io.StringIO()
    with output.ProgressView("teleport web", file=buf) as pv:
        pv.on_event(Event("progress", {"phase": "dump", "done": 1, "total": 2}))
        pv.on_event(Event("progress", {"phase": "dump", "done": 2, "total": 2}))
        pv.on_event(Event("progress", {"phase": "transfer", "round": 1, "done": 4096,
                                       "unit": "bytes"}))
        pv.on_event(Event("log", {"message": "hello operator"}))
    text = buf.getvalue()
    assert "teleport web" in text and "dump" in text and "transfer #1" in text
    assert "4.0 KiB" in text and "hello operator" in text
    assert text.count("dump") == 1  # one line per phase when not a terminal
    quiet = io.StringIO()
    with output.ProgressView("x", enabled=False, file=quiet) as pv:
        pv.on_event(Event("progress", {"phase": "a"}))
    assert quiet.getvalue() == ""


def test_sd_notify_abstract_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon_mod.sd_notify("READY=1") is False
    for addr, bind in ((str(tmp_path / "n.sock"), str(tmp_path / "n.sock")),
                       ("@cnvm-test-notify", "\0cnvm-test-notify")):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(bind)
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", addr)
            assert daemon_mod.sd_notify("READY=1\nSTATUS=x") is True
            assert s.recv(100) == b"READY=1\nSTATUS=x"
        finally:
            s.close()


def test_children_never_see_the_notify_socket(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`runc run -d` that inherits NOTIFY_SOCKET waits for the container's READY=1
    (forever, for a cnvm): the daemon takes it out of its environment at start and
    still notifies systemd."""
    addr = str(tmp_path / "n.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    monkeypatch.setattr(daemon_mod, "_NOTIFY_SOCKET", None)
    try:
        daemon_mod.take_notify_socket()
        assert "NOTIFY_SOCKET" not in os.environ
        env = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
        assert "NOTIFY_SOCKET" not in env
        assert daemon_mod.sd_notify("READY=1") is True
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_logfmt_formatter() -> None:
    rec = logging.LogRecord("cnvmd.api", logging.WARNING, "f", 1, "hello %s", ("world",), None)
    rec.cnvm = "web"
    rec.ops = ["a", "b"]
    rec.none = None
    line = daemon_mod.LogfmtFormatter(journal=True, node="n1").format(rec)
    assert line.startswith("<4>level=warning node=n1 logger=cnvmd.api")
    assert 'msg="hello world"' in line and "cnvm=web" in line and "ops=a,b" in line
    assert "none=" not in line
    term = daemon_mod.LogfmtFormatter(journal=False, node="n1").format(rec)
    assert term[:4].isdigit() and "Z level=warning" in term


def test_plugins_start_in_declared_order_and_peer_ops_stay_apart() -> None:
    plugins, failed = daemon_mod.load_plugins()
    assert failed == {}
    names = [p.name for p in plugins]
    for p in plugins:  # every plug-in starts after what it requires
        assert all(names.index(r) < names.index(p.name) for r in p.requires), p
    api, peer = daemon_mod.merge_routers(plugins)
    assert {"status", "ls", "inspect", "ping", "ops", "teleport"} <= set(api.ops)
    assert "teleport.prepare" in peer.ops and "teleport.data" in peer.streams
    assert not set(api.ops) & set(peer.ops)  # target ops never on the API socket


def test_plugin_order_refuses_cycles_and_unknown_requirements() -> None:
    from cnvmd.services import Plugin, PluginError, start_order

    a, b = Plugin("a", requires=("b",)), Plugin("b")
    assert [p.name for p in start_order([a, b])] == ["b", "a"]
    with pytest.raises(PluginError, match="cycle"):
        start_order([Plugin("a", requires=("b",)), Plugin("b", requires=("a",))])
    with pytest.raises(PluginError, match="unknown"):
        start_order([Plugin("a", requires=("zz",))])
