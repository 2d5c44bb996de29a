"""Where a lab's per-node daemons keep their sockets, state and runc roots.

Shared by `cnvmctl --lab L --node N` (to find the socket) and the lab builder
(to start the daemons), so both agree without talking to each other. Every lab
resource is named after the lab, so two labs with different names never collide
and teardown can find everything by name.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_LAB = "lab"
RUN_BASE = Path("/run/cnvm-lab")
STATE_BASE = Path("/var/lib/cnvm-lab")
UNDERLAY_NET = "198.18.0.0/24"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


def check_lab_name(name: str) -> str:
    """Lab names prefix interface and namespace names (15-char limit), so keep them short."""
    if not _NAME.match(name):
        raise ValueError(f"bad lab name {name!r}: 1-8 characters, lowercase letters and digits, "
                         "starting with a letter")
    return name


def netns_name(lab: str, host: str) -> str:
    """Namespace of a lab host: `<lab>-node1`, `<lab>-client`, `<lab>-ul` (underlay)."""
    return f"{lab}-{host}"


def node_run_dir(lab: str, node: str) -> Path:
    return RUN_BASE / lab / node


def node_socket(lab: str, node: str) -> Path:
    return node_run_dir(lab, node) / "cnvmd.sock"


def node_state_dir(lab: str, node: str) -> Path:
    return STATE_BASE / lab / node


def node_runc_root(lab: str, node: str) -> Path:
    return node_run_dir(lab, node) / "runc"


def underlay_address(index: int) -> str:
    """nodeK gets 198.18.0.(10+K); index 0 is the client host (198.18.0.2)."""
    return "198.18.0.2" if index == 0 else f"198.18.0.{10 + index}"
