"""Image and cnvm lifecycle commands (issue 4): images import/ls/inspect/rm, deploy,
stop, start, rm (exec and logs: cnvmctl/commands/exec.py, logs.py). The daemon side is
cnvmd/lifecycle.py."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cnvmctl.context import EXIT_USAGE, CliError, Ctx
from cnvmctl.output import cell, print_kv, print_table, print_tree, size
from cnvmctl.registry import arg, command, group
from proto.imageref import looks_like_registry_ref

group("images", help="import, list and remove images on a node")


def _absolute(path: str) -> str:
    """The daemon has another cwd: send an absolute path (keeping a PATH:REF suffix)."""
    ref = ""
    if not os.path.exists(path) and ":" in path:
        path, _, ref = path.rpartition(":")
    return os.path.abspath(path) + (f":{ref}" if ref else "")


def _not_a_registry_ref(path: str) -> None:
    """`images import docker.io/library/busybox:latest`: point to `images pull`."""
    if not os.path.exists(path) and not os.path.exists(path.rpartition(":")[0] or path) \
            and looks_like_registry_ref(path):
        raise CliError(f"{path}: no such file; to fetch it from a registry use "
                       f"`cnvmctl images pull {path}`", EXIT_USAGE)


@command("images import", help="import an OCI layout, oci-archive, docker-save or rootfs tar",
         description="Import an image into the node's store. PATH is an OCI image layout "
                     "directory or tar\n(skopeo `oci:DIR`, `podman save --format oci-archive`), "
                     "a `docker save` tarball,\nor a plain rootfs tarball (optionally "
                     "compressed). PATH:REF picks one image of a layout.\nEvery blob is "
                     "verified by digest; layers are unpacked once and shared.",
         args=[arg("path", metavar="PATH"),
               arg("--name", help="image name (default: from the archive or file name)"),
               arg("--format", default="auto", choices=["auto", "oci", "docker", "rootfs"],
                   help="force the input format")])
async def images_import(ctx: Ctx, a: argparse.Namespace) -> None:
    _not_a_registry_ref(a.path)
    res = await ctx.call("images.import",
                         {"path": _absolute(a.path), "name": a.name, "format": a.format})
    ctx.output(res, lambda r: print(f"imported {', '.join(r['names']) or r['id']} "
                                    f"({r['id']}, {r['layers']} layers, {size(r['size'])}) "
                                    f"in {r['seconds']:.2f}s"))


@command("images ls", help="list images")
async def images_ls(ctx: Ctx, a: argparse.Namespace) -> None:
    rows = await ctx.call("images.ls")

    def human(rows: list[dict[str, Any]]) -> None:
        print_table([{**r, "names": ", ".join(r["names"]) or "-",
                      "used_by": ", ".join(r.get("used_by") or []) or "-"} for r in rows],
                    [("NAME", "names"), ("ID", "id"), ("LAYERS", "layers"), ("SIZE", "size"),
                     ("USED BY", "used_by")], {"size": size})

    ctx.output(rows, human)


@command("images inspect", help="show an image's digests, layers and config",
         args=[arg("image", metavar="IMAGE")])
async def images_inspect(ctx: Ctx, a: argparse.Namespace) -> None:
    ctx.output(await ctx.call("images.inspect", {"image": a.image}), print_tree)


@command("images rm", help="remove an image (refused while a cnvm uses it)",
         args=[arg("image", metavar="IMAGE")])
async def images_rm(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("images.rm", {"image": a.image})
    ctx.output(res, lambda r: print(f"removed {', '.join(r['names']) or r['id']}"))


def _after_dashdash(parser: argparse.ArgumentParser) -> None:
    """Make `NAME --opt X -- CMD ARGS` work: Python 3.11's argparse gives the `*`
    positional its (empty) match at NAME already and then rejects what follows
    `--`. So this command's parser parses what precedes `--` and takes the rest
    verbatim as `cmd`."""
    orig = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        tail: list[str] | None = None
        if "--" in args:
            i = args.index("--")
            args, tail = args[:i], args[i + 1:]
        ns, extra = orig(args, namespace)
        if tail is not None:
            ns.cmd = [*(getattr(ns, "cmd", None) or []), *tail]
        return ns, extra

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _cnvm(r: dict[str, Any]) -> None:
    print_kv([("name", r.get("name")), ("node", r.get("node")), ("state", r.get("desired")),
              ("image", r.get("image")), ("hostname", r.get("hostname")), ("ip", r.get("ip")),
              ("memory", size(r["memory"]) if r.get("memory") else "-"),
              ("cpus", cell(r.get("cpus"))),
              ("sandbox", ", ".join(r.get("security_opt") or []) or "default"),
              ("netns", r.get("netns")), ("restart", r.get("restart") or "no")])


@command("deploy", help="deploy a cnvm from an image and start it",
         description="Create a cnvm: an overlay over the image's layers with its own upper "
                     "dir, a runc\nbundle with the given limits, a network namespace, and "
                     "start it. Everything after\n`--` replaces the image's command "
                     "(Cmd; the Entrypoint stays).",
         epilog="example: cnvmctl deploy web1 --image busybox --memory 256M --env PORT=8080\n"
                "         cnvmctl deploy web2 --image busybox --node auto  # best node\n\n"
                "names are unique in the cluster: a name taken on any node is a conflict.\n"
                "--node NODE|auto deploys elsewhere (auto: free memory vs --memory, spread,\n"
                "never a cordoned node); a node without the image gets it from this one.\n\n"
                "sandbox: a cnvm runs under Docker's default seccomp profile (no new\n"
                "namespaces, keyrings, perf_event_open, io_uring, bpf, mounts, ...) and, by\n"
                "default, noNewPrivileges (setuid binaries such as su/sudo cannot raise\n"
                "privileges). --security-opt seccomp=unconfined lifts the profile;\n"
                "--security-opt no-new-privileges=false lets su/sudo work. The options are\n"
                "kept with the cnvm and follow it when it teleports.",
         configure=_after_dashdash,
         args=[arg("name", metavar="NAME", help="cnvm name (a DNS label)"),
               arg("--image", required=True, help="image name or id"),
               arg("--node", "--on", dest="on_node", metavar="NODE|auto",
                   help="deploy on NODE, or on the best node with auto (default: this node)"),
               arg("--hostname", help="hostname inside (default: NAME)"),
               arg("--ip", help="IP on the overlay network (default: allocated)"),
               arg("--memory", help="memory limit, e.g. 256M, 1G"),
               arg("--cpus", help="CPU limit, e.g. 0.5, 2, 500m"),
               arg("--env", "-e", action="append", default=[], metavar="K=V",
                   help="environment variable (repeatable)"),
               arg("--security-opt", action="append", default=[], metavar="OPT",
                   dest="security_opt",
                   help="loosen or tighten the sandbox (repeatable): seccomp=unconfined, "
                        "no-new-privileges=true|false"),
               arg("--restart", default="no", metavar="POLICY",
                   help="restart policy when its process exits: no (default), always, "
                        "on-failure[:N] (at most N restarts); kept across teleports and "
                        "daemon restarts; `stop` never restarts"),
               arg("cmd", nargs="*", metavar="CMD",
                   help="command to run instead of the image's")])
async def deploy(ctx: Ctx, a: argparse.Namespace) -> None:
    cmd = list(a.cmd)
    with ctx.progress(f"deploy {a.name}") as p:
        res = await ctx.call("deploy", {"name": a.name, "image": a.image,
                                        "hostname": a.hostname, "ip": a.ip,
                                        "memory": a.memory, "cpus": a.cpus, "env": a.env,
                                        "security_opt": a.security_opt, "cmd": cmd,
                                        "restart": a.restart,
                                        **({"node": a.on_node} if a.on_node else {})},
                            on_event=p.on_event)
    ctx.output(res, _cnvm)


@command("stop", help="stop a cnvm (SIGTERM, then SIGKILL)",
         args=[arg("name", metavar="NAME"),
               arg("--time", "-t", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL (default 10)")])
async def stop(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("stop", {"name": a.name, "time": a.time})
    ctx.output(res, lambda r: print(f"stopped {r['name']} on {r.get('node', '?')}"))


@command("start", help="start a stopped cnvm", args=[arg("name", metavar="NAME")])
async def start(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("start", {"name": a.name})
    ctx.output(res, lambda r: print(f"started {r['name']} on {r.get('node', '?')}"))


@command("rm", help="remove a cnvm and its files",
         args=[arg("name", metavar="NAME"),
               arg("--force", "-f", action="store_true", help="also when it is running")])
async def rm(ctx: Ctx, a: argparse.Namespace) -> None:
    res = await ctx.call("rm", {"name": a.name, "force": a.force})
    ctx.output(res, lambda r: print(f"removed {r['name']} from {r.get('node', '?')}"))
