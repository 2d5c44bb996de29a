"""Wiring of the daemon: config → logs → state → capability probe → plug-ins → API.

The daemon owns nothing that must die with it: containers are runc's, records are
on disk, so a crash or restart loses no cnvm. On start it re-reads both and adopts
what is running (see cnvmd.inventory). Subsystems are the plug-ins named in
``PLUGIN_MODULES``; each declares its API ops, its peer-only ops, what it requires
and its hooks (cnvmd.services.Plugin), and they start in dependency order.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import platform
import signal
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cnvmd
from cnvmd import criu, inventory, proc
from cnvmd.api import ApiServer, Router, SocketInUse, api_group_id
from cnvmd.config import Config
from cnvmd.services import Plugin, Services, start_order
from cnvmd.state import OWNED_MARK, StateStore, secure_children, secure_dir
from proto.messages import PROTOCOL_VERSION

log = logging.getLogger("cnvmd")

# --------------------------------------------------------------------------- logging

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
           logging.CRITICAL: 2}


def _logfmt_value(v: Any) -> str:
    if isinstance(v, list | tuple | set):
        v = ",".join(map(str, v))
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s)
    return s


class LogfmtFormatter(logging.Formatter):
    """One line per record: ``level=info logger=cnvmd.api msg="listening" key=value…``.

    Under systemd (JOURNAL_STREAM set) lines start with a ``<N>`` syslog priority,
    which journald turns into the entry's priority, and carry no timestamp (journald
    adds its own); on a terminal they start with a UTC timestamp instead.
    """

    def __init__(self, journal: bool, node: str) -> None:
        super().__init__()
        self.journal = journal
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.journal:
            prefix = f"<{_SYSLOG.get(record.levelno, 6)}>"
        else:
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            prefix = f"{ts}.{int(record.msecs):03d}Z "
        parts.append(f"{prefix}level={record.levelname.lower()} node={_logfmt_value(self.node)} "
                     f"logger={record.name} msg={_logfmt_value(record.getMessage())}")
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_") and v is not None:
                parts.append(f"{k}={_logfmt_value(v)}")
        line = " ".join(parts)
        if record.exc_info:
            tb = self.formatException(record.exc_info).replace("\n", "\n    ")
            line += f"\n    {tb}"
        return line


def setup_logging(level: str, node: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(bool(os.environ.get("JOURNAL_STREAM")), node))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("asyncssh").setLevel(max(root.level, logging.WARNING))


# --------------------------------------------------------------------------- sd_notify


_NOTIFY_SOCKET: str | None = None


def take_notify_socket() -> None:
    """Move $NOTIFY_SOCKET out of the environment, keeping it for `sd_notify`.

    Why: every child inherits the environment, and `runc run -d` that sees
    NOTIFY_SOCKET proxies sd_notify for the container and does not return until the
    *container* says READY=1 (runc's notify_socket.go), which a cnvm never does: under
    the shipped unit (Type=notify) every deploy hung until its timeout, with the
    cnvm running (found by the VM lane). libsystemd's sd_notify(unset_environment=1)
    exists for the same reason. Called once at start, before any child is spawned.
    """
    global _NOTIFY_SOCKET
    addr = os.environ.pop("NOTIFY_SOCKET", None)
    if addr:
        _NOTIFY_SOCKET = addr


def sd_notify(state: str) -> bool:
    """Send a notification to systemd (Type=notify) without libsystemd.

    $NOTIFY_SOCKET (taken at start by `take_notify_socket`) is a datagram socket path,
    or an abstract one when it starts with '@'. Returns False when not under systemd
    or on error (never fatal).
    """
    addr = _NOTIFY_SOCKET or os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})
        return False


# --------------------------------------------------------------------------- plug-ins

PLUGIN_MODULES = ("cnvmd.core", "cnvmd.events", "cnvmd.inventory", "cnvmd.lifecycle",
                  "cnvmd.restart", "cnvmd.network.ops", "cnvmd.peers.ops",
                  "cnvmd.migration.ops", "cnvmd.pull", "cnvmd.metrics", "cnvmd.cluster.ops",
                  "cnvmd.network.dns")
"""The daemon's subsystems. Each module defines ``plugin = Plugin(...)``; the start
order comes from their declared ``requires``, not from this list."""


def load_plugins(modules: tuple[str, ...] = PLUGIN_MODULES) -> tuple[list[Plugin], dict[str, str]]:
    """Import the plug-in modules; one that fails (or needs one that failed) is left out
    and listed with its reason: its ops are missing, the rest of the daemon works."""
    found: list[Plugin] = []
    failed: dict[str, str] = {}
    for modname in modules:
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:
            log.error("plug-in failed to import; its ops are unavailable",
                      exc_info=True, extra={"module": modname})
            failed[modname] = f"{type(exc).__name__}: {exc}"
            continue
        p = getattr(mod, "plugin", None)
        if not isinstance(p, Plugin):
            failed[modname] = "defines no `plugin`"
            continue
        found.append(p)
    names = {p.name for p in found}
    while True:  # drop plug-ins whose requirements are missing, transitively
        bad = [p for p in found if any(r not in names for r in p.requires)]
        if not bad:
            break
        for p in bad:
            failed[p.name] = "requires " + ", ".join(r for r in p.requires if r not in names)
            found.remove(p)
            names.discard(p.name)
    return start_order(found), failed


def merge_routers(plugins: list[Plugin]) -> tuple[Router, Router]:
    """The API router and the peer-only router of all plug-ins (kept apart: a peer op
    is never reachable from the API socket)."""
    api, peer = Router(), Router()
    for p in plugins:
        if p.router is not None:
            api.include(p.router)
        if p.peer_router is not None:
            peer.include(p.peer_router)
    return api, peer


# --------------------------------------------------------------------------- daemon


@dataclass
class Daemon:
    """Everything handlers reach through ``ctx.daemon``.

    ``services`` holds the subsystems' shared objects by typed key
    (``daemon.services.require(LIFECYCLE)``), provided by each plug-in's start hook.
    """

    config: Config
    state: StateStore
    router: Router
    peer_router: Router = field(default_factory=Router)
    plugin_list: list[Plugin] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    caps: criu.Capabilities | None = None
    caps_error: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    adopted: dict[str, inventory.Adopted] = field(default_factory=dict)
    services: Services = field(default_factory=Services)
    plugins: list[str] = field(default_factory=list)
    plugins_failed: dict[str, str] = field(default_factory=dict)
    server: ApiServer | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def node_name(self) -> str:
        return self.config.node_name

    def hello_reply(self, version: int) -> dict[str, Any]:
        return {"t": "hello", "proto": version, "agent": f"cnvmd/{cnvmd.__version__}",
                "node": self.node_name, "version": cnvmd.__version__}

    def request_stop(self) -> None:
        self._stop.set()

    async def probe(self) -> None:
        """Versions and capabilities, once per start: later ops pick modes from these."""
        cfg = self.config

        async def runc_version() -> str | None:
            try:
                res = await proc.run([cfg.runc, "--version"], timeout=10)
            except proc.CommandError as exc:
                log.error("runc not usable", extra={"runc": cfg.runc, "error": str(exc)})
                return None
            first = res.stdout.splitlines()[0] if res.stdout else ""
            return first.removeprefix("runc version ").strip() or None

        async def caps() -> None:
            try:
                self.caps = await criu.probe(cfg.criu)
            except (criu.CriuError, proc.CommandError) as exc:
                self.caps_error = str(exc)
                log.error("CRIU probe failed: teleport will be unavailable",
                          extra={"criu": cfg.criu, "error": str(exc)})

        runc_v, _ = await asyncio.gather(runc_version(), caps())
        self.versions = {
            "cnvmd": cnvmd.__version__,
            "protocol": str(PROTOCOL_VERSION),
            "runc": runc_v,
            "criu": self.caps.criu_version if self.caps else None,
            "kernel": platform.release(),
            "python": platform.python_version(),
        }

    def prepare_dirs(self) -> None:
        """Make the daemon's directories root's alone, so no local user reaches the image
        store (its layers keep setuid binaries), the records or runc's state.

        state_dir and runc_root are 0700; the socket's directory is 0750 with group
        `socket_group` (its members may use the API; 0700 without such a group); the
        run dir, when it is not the socket's, 0700. Existing directories are tightened
        only if cnvmd made them (`cnvmd.state.secure_dir`; also those an older cnvmd left:
        a 0711 state dir, a 0755 run dir holding only runc/ and the socket), never
        another one given in the config (/tmp!). The state dir's subdirectories are
        tightened too.
        """
        cfg = self.config
        gid = api_group_id(cfg.socket_group)
        sock_dir = cfg.socket_path.parent
        sock_mode = 0o750 if gid is not None else 0o700
        legacy_run = {"runc", cfg.socket_path.name, OWNED_MARK}

        def old_state(p: Path, st: os.stat_result) -> bool:
            return stat.S_IMODE(st.st_mode) == 0o711

        def old_run(p: Path, st: os.stat_result) -> bool:
            return (stat.S_IMODE(st.st_mode) == 0o755
                    and {e.name for e in p.iterdir()} <= legacy_run)

        if secure_dir(cfg.state_dir, 0o700, adopt=old_state) != "left":
            secure_children(cfg.state_dir)
        if cfg.run_dir != sock_dir:
            secure_dir(cfg.run_dir, 0o700, adopt=old_run)
        secure_dir(sock_dir, sock_mode, gid, adopt=old_run)
        secure_dir(cfg.runc_root, 0o700, mark=False)

    async def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # no reload yet; never die
        cfg = self.config
        log.info("starting", extra={"version": cnvmd.__version__, "pid": os.getpid(),
                                    "socket": str(cfg.socket_path),
                                    "state_dir": str(cfg.state_dir),
                                    "runc_root": str(cfg.runc_root)})
        self.prepare_dirs()
        self.server = ApiServer(self.router, self)
        try:
            # first: a second daemon stops here
            await self.server.bind(cfg.socket_path, group=cfg.socket_group)
        except SocketInUse as exc:
            log.error("cannot start: %s", exc)
            self.server = None
            return 1
        try:
            await asyncio.gather(self.probe(), inventory.adopt(self))
            for p in self.plugin_list:
                if p.start is not None:
                    await p.start(self)
            for p in self.plugin_list:
                if p.serve is not None:
                    await p.serve(self)
            await self.server.serve()
            sd_notify(f"READY=1\nSTATUS=serving on {cfg.socket_path}\nMAINPID={os.getpid()}")
            log.info("ready", extra={"ops": sorted(self.router.ops),
                                     "adopted": sorted(self.adopted) or None,
                                     "startup_s": round(time.time() - self.started, 3)})
            await self._stop.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: cancelling requests; containers keep running")
            await self.server.stop()
            return 0
        finally:
            for p in reversed(self.plugin_list):  # stop hooks tolerate a partial start
                if p.stop is None:
                    continue
                try:
                    await p.stop(self)
                except Exception:
                    log.exception("plug-in stop failed", extra={"plugin": p.name})
            if self.server is not None:
                await self.server.stop(grace=0)  # no-op after a clean stop; else release
            log.info("stopped")

    def _on_signal(self, sig: int) -> None:
        log.info("signal received", extra={"signal": signal.Signals(sig).name})
        self.request_stop()


async def amain(cfg: Config, extra: list[Plugin] | None = None) -> int:
    plugins, failed = load_plugins()
    if extra:
        plugins = start_order([*plugins, *extra])
    router, peer_router = merge_routers(plugins)
    daemon = Daemon(config=cfg, state=StateStore(cfg.state_dir), router=router,
                    peer_router=peer_router, plugin_list=plugins,
                    plugins=[p.name for p in plugins], plugins_failed=failed)
    return await daemon.run()
