"""Daemon configuration: a TOML file, overridden by command-line options.

Every path is configurable so that several daemons (the lab's nodes) can share
one machine; the defaults are those of a systemd-managed host.
"""

from __future__ import annotations

import os
import shutil
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/cnvm/cnvmd.toml")
DEFAULT_SOCKET = Path("/run/cnvm/cnvmd.sock")
BUNDLED_CRIU = Path("/opt/cnvm/bin/criu")


def default_criu() -> str:
    """The CRIU install-deps provided, else whatever is on PATH."""
    if BUNDLED_CRIU.exists():
        return str(BUNDLED_CRIU)
    return shutil.which("criu") or "criu"


@dataclass(frozen=True)
class Config:
    node_name: str = field(default_factory=socket.gethostname)
    state_dir: Path = Path("/var/lib/cnvm")
    run_dir: Path = Path("/run/cnvm")
    socket_path: Path = DEFAULT_SOCKET
    runc_root: Path = Path("/run/cnvm/runc")
    runc: str = "runc"
    criu: str = field(default_factory=default_criu)
    listen_address: str = "0.0.0.0"
    peer_port: int = 6783
    vxlan_port: int = 6783
    vni: int = 42
    subnet: str = "10.100.101.0/24"
    gateway: str = ""
    """Overlay default gateway for cnvms ("" = none); reserved by IPAM."""
    netns_prefix: str = "cnvm-"
    """Per-cnvm netns are /run/netns/<prefix><name>; a lab node sets `<lab>-<node>-`."""
    cgroup_root: str = "/cnvm"
    """cgroup parent of every cnvm (`<root>/<node>/<name>`); the same on every member of
    a cluster. Labs on one host give each lab its own, so that two labs' node1 never
    share a cnvm's cgroup."""
    socket_group: str = "cnvm"
    """Group allowed on the API socket (0660) and its directory (0750); without such a
    group both are root's only."""
    api_max_connections: int = 256
    """Open API connections; the last 16 are kept for root."""
    api_frame_timeout: float = 30.0
    """Seconds within which an API frame, once begun, must be complete."""
    api_idle_timeout: float = 300.0
    """Seconds an API connection may sit with nothing in flight before it is closed."""
    api_read_budget: int = 32 << 20
    """Bytes that partly received API frames above 64 KiB may hold together."""
    image_max_layer_size: int = 8 << 30
    """Largest uncompressed layer (bytes) an import unpacks."""
    image_max_layer_ratio: int = 100
    """Largest uncompressed:compressed ratio of a layer; a layer may always expand to
    64 MiB (small layers, tar padding). Both are enforced while the layer streams."""
    image_pull_max_size: int = 16 << 30
    """Bytes an `images pull` may download before skopeo is stopped."""
    metrics_listen: str | bool = ""
    """Prometheus endpoint (cnvmd.metrics): "" or false = off (default); true = on at
    127.0.0.1:9464; "HOST:PORT", ":PORT" (localhost) or "[V6]:PORT"."""
    log_level: str = "info"
    fault_injection: bool = False
    """Accept the teleport op's test hooks (`hold`, `fail_restore`); test labs only."""
    cnvm_no_new_privileges: bool = True
    """noNewPrivileges for cnvm processes: setuid binaries (su, sudo) and file
    capabilities cannot raise privileges inside. CRIU restores the flag with the
    processes; a cnvm overrides it with `--security-opt no-new-privileges=false`."""
    dns_domain: str = "cnvm"
    """Domain of the cnvm resolver (cnvmd.network.dns): NAME.<domain> resolves too."""
    dns_upstream: str = ""
    """Where the cnvm resolver forwards other names: "IP", "IP:PORT", "[V6]:PORT";
    "" = nowhere (those names are REFUSED)."""
    cnvm_oom_score_adj: int = 0
    """oom_score_adj of cnvm processes (-1000..1000). Always written to config.json, so
    cnvms never inherit cnvmd's own (-500 under systemd/cnvmd.service)."""

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def cnvms_dir(self) -> Path:
        return self.state_dir / "cnvms"


_PATH_FIELDS = {f.name for f in fields(Config) if f.type in ("Path", Path)}


class ConfigError(Exception):
    pass


def load(path: Path | None = None, **overrides: Any) -> Config:
    """Read the TOML file (if any) then apply non-None overrides."""
    values: dict[str, Any] = {}
    cfg_path = path or Path(os.environ.get("CNVMD_CONFIG", DEFAULT_CONFIG))
    if cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{cfg_path}: {exc}") from None
        values.update(_flatten(data))
    elif path is not None:
        raise ConfigError(f"config file {path} does not exist")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    for k in _PATH_FIELDS & set(values):
        values[k] = Path(values[k])
    return replace(Config(), **values)


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Accept both flat keys and [daemon]/[network]/[peers] tables."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            out[k.replace("-", "_")] = v
    return out
