"""`cnvmctl images pull REF` (issue 17): a registry image through the daemon's skopeo,
or a local archive through `images import`.

Decision on archives: ``oci-archive:PATH`` and ``docker-archive:PATH`` name files of
the client. The daemon's ``images.pull`` takes registry references only (it never
reads a path it was sent for a pull); cnvmctl maps an archive to ``images.import``,
the op that already takes the client's files (an absolute path on this host, read by
the same hardened importer: both archive formats are native to it), so no extra
conversion step or temporary copy is needed.

Credentials: ``--creds USER`` asks for the password on the terminal (``--creds
USER:PASS`` works but shows in this command's own process list entry, as it would
with skopeo), ``--authfile FILE`` is read here and sent as content. The daemon passes
both to skopeo in a 0600 auth file, never on a command line.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from cnvmctl.context import EXIT_USAGE, CliError, Ctx
from cnvmctl.output import size
from cnvmctl.registry import arg, command
from proto import imageref

MAX_AUTHFILE = 1 << 20

EPILOG = """\
references:
  busybox                                  docker://busybox:latest (the default registry)
  docker://REGISTRY[:PORT]/REPO[:TAG]      a registry image (@sha256:DIGEST pins one)
  oci-archive:FILE[:REF]                   an OCI archive on this host
  docker-archive:FILE[:REPO:TAG]           a `docker save` tar on this host

examples:
  cnvmctl images pull busybox
  cnvmctl images pull --no-tls-verify 127.0.0.1:5000/test/busybox:1
  cnvmctl images pull --creds alice localhost:5000/team/app:2.1
  cnvmctl images pull oci-archive:./busybox.tar --name busybox
"""


def _creds(value: str | None) -> str | None:
    if value is None:
        return None
    if ":" in value:
        return value
    if not sys.stdin.isatty():
        raise CliError("--creds USER needs a terminal to ask for the password; "
                       "give USER:PASSWORD or --authfile", EXIT_USAGE)
    return f"{value}:{getpass.getpass(f'password for {value}: ')}"


def _authfile(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_AUTHFILE + 1)
    except OSError as exc:
        raise CliError(f"cannot read --authfile {path}: {exc.strerror}", EXIT_USAGE) from None
    if len(data) > MAX_AUTHFILE:
        raise CliError(f"--authfile {path} is larger than {MAX_AUTHFILE} bytes", EXIT_USAGE)
    return data


def _archive_path(path: str) -> str:
    """The daemon has another cwd: an absolute path to an existing file."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise CliError(f"{path}: no such file", EXIT_USAGE)
    return full


def _human(r: dict[str, Any]) -> None:
    print(f"pulled {', '.join(r['names']) or r['id']} ({r['id']}, {r['layers']} layers, "
          f"{size(r['size'])}) in {r['seconds']:.2f}s")


@command("images pull", help="pull an image from a registry (skopeo) or a local archive",
         description="Copy an image into the node's store. A registry image is fetched by "
                     "the daemon\nwith skopeo and imported like `images import` (every "
                     "blob verified, layers\nunpacked once). A bare NAME[:TAG] means "
                     "docker://NAME[:TAG]. Archives are files\non this host and go "
                     "through `images import`.",
         epilog=EPILOG,
         args=[arg("ref", metavar="REF", help="image reference (forms below)"),
               arg("--name", help="image name (default: the reference, e.g. "
                                  "127.0.0.1:5000/test/busybox:1)"),
               arg("--tls-verify", action=argparse.BooleanOptionalAction, default=True,
                   help="require HTTPS with a verified certificate (default: yes); "
                        "--no-tls-verify for a plain-HTTP or self-signed registry"),
               arg("--authfile", metavar="FILE",
                   help="registry credentials file (containers auth.json / docker "
                        "config.json format)"),
               arg("--creds", metavar="USER[:PASS]",
                   help="registry credentials; without :PASS the password is asked for"),
               arg("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="give up after this long (default 1800)")])
async def images_pull(ctx: Ctx, a: argparse.Namespace) -> None:
    try:
        ref = imageref.parse(a.ref)
    except imageref.RefError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if ref.transport != "docker":
        if a.creds or a.authfile or not a.tls_verify:
            raise CliError(f"--creds, --authfile and --no-tls-verify are for registries, "
                           f"not {ref.transport}:", EXIT_USAGE)
        path = _archive_path(ref.path)
        fmt = "oci" if ref.transport == "oci-archive" else "docker"
        with ctx.progress(f"import {a.ref}") as p:
            res = await ctx.call("images.import", {
                "path": path + (f":{ref.ref}" if ref.ref else ""), "name": a.name,
                "format": fmt}, on_event=p.on_event)
        ctx.output(res, _human)
        return
    args = {"ref": ref.skopeo, "name": a.name, "tls_verify": a.tls_verify,
            "creds": _creds(a.creds), "authfile": _authfile(a.authfile),
            "timeout": a.timeout}
    with ctx.progress(f"pull {ref.remote}") as p:
        res = await ctx.call("images.pull", {k: v for k, v in args.items() if v is not None},
                             on_event=p.on_event)
    ctx.output(res, _human)
