"""Command line for the VM lab (run through scripts/vmlab).

  build [--force]          build the cached guest image (no-op when current)
  smoke [-n N] [--mem M]   build, boot N guests, smoke-test, tear down; prints timings
  shell [-n N] [--mem M]   boot, print ssh commands, wait for Enter, tear down
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import image as imagemod
from . import smoke
from .lab import VMLab


def _smoke(lab: VMLab, predump_mib: int) -> dict:
    out: dict = {"boot": {g.name: g.boot_s for g in lab.guests}, "timings": dict(lab.timings)}
    out["criu_check"] = lab.each(lambda i: smoke.criu_check(lab, i).strip())
    t = time.monotonic()
    out["predump"] = smoke.predump_rounds(lab, 0, mib=predump_mib)
    out["predump"]["wall_s"] = round(time.monotonic() - t, 1)
    out["predump"]["shrinking"] = smoke.rounds_shrink(out["predump"])
    out["install_s"] = lab.install_project()
    if lab.has_daemon():
        out["cnvmctl_status"] = lab.start_daemons()
        if lab.n >= 2:
            out["cluster_nodes"] = lab.form_cluster()
    else:
        out["cnvmctl_status"] = "cnvmd/__main__.py not in the tree yet; daemon not started"
    if lab.n >= 2:
        r = lab.ssh(0, f"ping -c 3 -i 0.3 -W 2 {lab.guests[1].ip}", check=False)
        out["link_ping"] = r.stdout.strip().splitlines()[-1] if r.stdout else r.stderr
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmlab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--force", action="store_true")
    for name in ("smoke", "shell"):
        s = sub.add_parser(name)
        s.add_argument("-n", type=int, default=2)
        s.add_argument("--mem", type=int, default=1024, help="MiB per guest")
        s.add_argument("--predump-mib", type=int, default=128)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.cmd == "build":
        t = time.monotonic()
        img = imagemod.build(force=args.force)
        print(json.dumps({"image": str(img.dir), "kernel": img.manifest.get("kernel"),
                          "wall_s": round(time.monotonic() - t, 1),
                          "build_s": img.manifest.get("build_s")}, indent=2))
        return 0
    lab = VMLab(n=args.n, mem_mib=args.mem)
    try:
        lab.up()
        if args.cmd == "smoke":
            print(json.dumps(_smoke(lab, args.predump_mib), indent=2))
        else:
            for g in lab.guests:
                print(" ".join([*lab._ssh_base(g), "root@127.0.0.1"]), f"  # {g.name} {g.ip}")
            input("Enter tears the lab down> ")
    finally:
        pids = lab.pids()
        lab.down()
        print(json.dumps({"teardown": {"pids": pids, "alive_after": lab.alive_pids()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
