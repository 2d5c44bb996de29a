"""`cnvmd`: the per-host cnvm daemon (usually started by systemd, see systemd/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cnvmd
from cnvmd import config

DESCRIPTION = """\
The cnvm daemon: runs this host's cnvms under runc, serves the cnvmctl API on a
Unix socket and talks to peer daemons for teleports.

Containers do not depend on the daemon: stopping, restarting or killing cnvmd
leaves every cnvm running, and the next cnvmd adopts them.
"""

EPILOG = """\
configuration:
  Settings come from the TOML file (--config, else $CNVMD_CONFIG, else
  /etc/cnvm/cnvmd.toml when it exists); options given here override it.
  Keys: node_name, state_dir, run_dir, socket_path, runc_root, runc, criu,
  listen_address, peer_port, vxlan_port, vni, subnet, gateway, netns_prefix,
  cgroup_root, metrics_listen, image_pull_max_size, log_level, ... (flat, or in
  [daemon]/[network]/[peers] tables).

signals:
  SIGTERM, SIGINT  cancel in-flight requests, close the socket, exit 0
  SIGHUP           ignored

exit status:
  0 clean shutdown, 1 start-up failure, 2 bad options or configuration
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnvmd", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML configuration file (default /etc/cnvm/cnvmd.toml)")
    p.add_argument("--socket", type=Path, metavar="PATH", dest="socket_path",
                   help="API socket (default /run/cnvm/cnvmd.sock)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="persistent state: cnvm records, images (default /var/lib/cnvm)")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="runtime files, lost at reboot (default /run/cnvm)")
    p.add_argument("--runc-root", type=Path, metavar="DIR",
                   help="runc --root for this daemon's containers (default /run/cnvm/runc)")
    p.add_argument("--node-name", metavar="NAME", help="this node's name (default: hostname)")
    p.add_argument("--listen-address", metavar="ADDR",
                   help="peer (SSH) listener address (default 0.0.0.0)")
    p.add_argument("--peer-port", type=int, metavar="PORT",
                   help="peer listener port; 0 picks a free one (default 6783)")
    p.add_argument("--netns-prefix", metavar="PREFIX",
                   help="prefix of the per-cnvm network namespaces (default cnvm-); "
                        "daemons sharing one /run/netns need distinct prefixes")
    p.add_argument("--cgroup-root", metavar="PATH",
                   help="cgroup parent of the cnvms (default /cnvm); the same on every "
                        "member; labs sharing one host need distinct roots")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default info)")
    p.add_argument("--version", action="version", version=f"cnvmd {cnvmd.__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        cfg = config.load(args.config, **overrides)
    except config.ConfigError as exc:
        print(f"cnvmd: {exc}", file=sys.stderr)
        return 2

    import uvloop

    from cnvmd import daemon

    daemon.setup_logging(cfg.log_level, cfg.node_name)
    daemon.take_notify_socket()  # before any child: runc must not see it
    try:
        return uvloop.run(daemon.amain(cfg))
    except Exception:
        daemon.log.exception("fatal error")
        return 1


if __name__ == "__main__":
    sys.exit(main())
