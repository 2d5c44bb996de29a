"""`cnvmctl`: command-line client of cnvmd. Subcommands come from cnvmctl.commands."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from cnvmctl import __version__, registry
from cnvmctl.context import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, CliError, Ctx

EXIT_INTERRUPTED, EXIT_PIPE = 130, 141

DEFAULT_SOCKET = Path("/run/cnvm/cnvmd.sock")

DESCRIPTION = """\
Control the cnvm daemon (cnvmd) of one node: list, inspect, deploy and teleport
cnvms — runc containers with their own IP that live-migrate between hosts.
"""

EPILOG = """\
choosing the daemon:
  --socket PATH         talk to the daemon listening on PATH
  [--lab LAB] --node N  talk to node N of a local lab (`cnvmctl lab up`); LAB
                        defaults to "lab"
  otherwise             $CNVM_SOCKET if set, else /run/cnvm/cnvmd.sock

output:
  Human-readable aligned tables by default; --json (before or after the
  command) prints the daemon's answer as JSON on stdout. Errors go to stderr;
  with --json an error is also printed on stdout as {"error": {code, message}}.

exit status:
  0  success
  1  the operation failed (the daemon said why)
  2  usage error (bad command line)
  3  the daemon cannot be reached (not running, wrong socket, no permission)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. `cnvmctl ls | head -1`); nothing is printed
  exec passes the command's own status through (see `cnvmctl exec --help`)

environment:
  CNVM_SOCKET           default socket path

examples:
  cnvmctl status
  cnvmctl --node node2 --json status
  cnvmctl ls
  cnvmctl inspect web
"""


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep messages on one line + hint."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    json_parent = _Parser(add_help=False)
    json_parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="print machine-readable JSON on stdout")
    p = _Parser(prog="cnvmctl", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--socket", type=Path, metavar="PATH", help="daemon socket to talk to")
    p.add_argument("--lab", metavar="NAME", help="lab name for --node (default: lab)")
    p.add_argument("--node", metavar="NAME", help="talk to this node of a local lab")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--version", action="version", version=f"cnvmctl {__version__}")

    subparsers: dict[tuple[str, ...], Any] = {}

    def sub_of(path: tuple[str, ...]) -> Any:
        """The subparsers action that holds children of `path` (creating groups)."""
        if path in subparsers:
            return subparsers[path]
        if not path:
            parent = p
        else:
            grp = registry.GROUPS.get(path) or registry.Group(help=f"{' '.join(path)} commands")
            holder = sub_of(path[:-1])
            parent = holder.add_parser(path[-1], help=grp.help,
                                       description=grp.description or grp.help,
                                       formatter_class=fmt)
        sp = parent.add_subparsers(dest="_cmd" + str(len(path)), metavar="COMMAND",
                                   title="commands", parser_class=_Parser)
        sp.required = True
        subparsers[path] = sp
        return sp

    for path, cmd in sorted(registry.COMMANDS.items(), key=lambda kv: kv[0]):
        sp = sub_of(path[:-1])
        cp = sp.add_parser(path[-1], help=cmd.help, description=cmd.description or cmd.help,
                           epilog=cmd.epilog, formatter_class=fmt, parents=[json_parent])
        for a in cmd.args:
            cp.add_argument(*a.flags, **a.kwargs)
        if cmd.configure is not None:
            cmd.configure(cp)
        cp.set_defaults(_command=cmd)
    if not registry.COMMANDS:
        sub_of(())
    return p


def resolve_socket(ns: argparse.Namespace, cmd: registry.Command) -> tuple[Path, str]:
    if ns.socket and (ns.node or ns.lab):
        raise CliError("--socket cannot be combined with --lab/--node", EXIT_USAGE)
    if ns.lab and not ns.node and cmd.daemon:
        raise CliError("--lab needs --node NAME to pick a node", EXIT_USAGE)
    if ns.socket:
        return ns.socket, "--socket"
    if ns.node:
        from cnvmlab import paths as labpaths

        lab = ns.lab or labpaths.DEFAULT_LAB
        try:
            labpaths.check_lab_name(lab)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        return labpaths.node_socket(lab, ns.node), f"lab {lab}"
    env = os.environ.get("CNVM_SOCKET")
    if env:
        return Path(env), "$CNVM_SOCKET"
    return DEFAULT_SOCKET, "default"


def unreachable_hint(ctx: Ctx, message: str) -> str:
    if "Permission denied" in message:
        return "run as root or as a member of group cnvm"
    if ctx.socket_origin.startswith("lab "):
        lab = ctx.socket_origin[4:]
        return f"is lab {lab!r} up with a node {ctx.node!r}? try `cnvmctl lab status --name {lab}`"
    return ("is cnvmd running? try `systemctl start cnvmd`, or pick a daemon with "
            "--socket PATH or --node NAME")


async def _run(cmd: registry.Command, ctx: Ctx, ns: argparse.Namespace) -> int:
    ctx.task = asyncio.current_task()
    try:
        try:
            res = cmd.handler(ctx, ns)
            if inspect.isawaitable(res):
                res = await res
            return int(res or 0)
        finally:
            await ctx.close()
    except asyncio.CancelledError:
        if ctx.pipe_closed:  # Ctx.write saw stdout close under a streamed command
            raise BrokenPipeError from None
        raise


def main(argv: list[str] | None = None) -> int:
    """Exit quietly when stdout's reader goes away (`| head -1`: status 141, as a
    process killed by SIGPIPE) and on Ctrl-C (status 130), wherever they happen."""
    try:
        rc = _main(argv)
        sys.stdout.flush()
        return rc
    except KeyboardInterrupt:
        print("cnvmctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python would flush stdout again at exit and complain: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


def _main(argv: list[str] | None) -> int:
    from proto.client import Disconnected
    from proto.messages import ProtoError

    registry.discover()
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd: registry.Command = ns._command
    want_json = bool(getattr(ns, "json", False))
    try:
        sock, origin = resolve_socket(ns, cmd)
    except CliError as exc:
        parser.print_usage(sys.stderr)
        print(f"cnvmctl: error: {exc}", file=sys.stderr)
        return exc.code
    ctx = Ctx(socket=sock, socket_origin=origin, json=want_json, lab=ns.lab, node=ns.node,
              daemon=cmd.daemon)
    name = " ".join(cmd.path)
    try:
        return asyncio.run(_run(cmd, ctx, ns))
    except Disconnected as exc:
        _report(ctx, exc.to_wire(), f"cannot reach cnvmd: {exc.message}",
                unreachable_hint(ctx, exc.message))
        return EXIT_UNREACHABLE
    except ProtoError as exc:
        _report(ctx, exc.to_wire(), f"{name}: {exc.message}", None)
        return EXIT_FAILED
    except CliError as exc:
        _report(ctx, {"code": "cli", "message": str(exc)}, f"{name}: {exc}", exc.hint)
        return exc.code


def _report(ctx: Ctx, wire: dict[str, Any], line: str, hint: str | None) -> None:
    if ctx.json:
        ctx.print_json({"error": wire})
    print(f"cnvmctl: {line}" + (f" — {hint}" if hint else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
