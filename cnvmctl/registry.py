"""Registry of cnvmctl subcommands; command modules plug in without editing main.

Add a module ``cnvmctl/commands/<topic>.py``; it is imported on every run, so keep
heavy imports (pyroute2, asyncssh) inside handlers. Example::

    from cnvmctl.registry import arg, command, group
    from cnvmctl.context import Ctx

    @command("deploy", help="deploy a cnvm from an image",
             description="Long text for `cnvmctl deploy --help` ...",
             args=[arg("name", help="cnvm name (a DNS label)"),
                   arg("--image", required=True, help="image name or digest"),
                   arg("cmd", nargs="*", help="command to run (after --)")])
    async def deploy(ctx: Ctx, a) -> int | None:
        res = await ctx.call("deploy", {"name": a.name, "image": a.image})
        ctx.output(res, human=lambda r: print(f"deployed {r['name']}"))

    group("lab", help="build and drive a local multi-node lab")

    @command("lab up", daemon=False, help="create the lab",
             args=[arg("--nodes", type=int, default=3)])
    async def lab_up(ctx, a): ...

A handler is ``async def`` (or plain def) taking (ctx, namespace) and returning an
exit code or None (0). It raises ``ProtoError`` (exit 1, or 3 when the daemon is
unreachable) or ``CliError`` for failures; main() prints them in one line.
``daemon=False`` marks commands that do not talk to the daemon (ctx.call refuses).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def arg(*flags: str, **kwargs: Any) -> Arg:
    """Arguments for ArgumentParser.add_argument, declared next to the command."""
    return Arg(flags, kwargs)


@dataclass
class Command:
    path: tuple[str, ...]  # ("lab", "up")
    handler: Callable[..., Any]
    help: str
    description: str | None
    epilog: str | None
    args: list[Arg]
    daemon: bool
    configure: Callable[[argparse.ArgumentParser], None] | None
    module: str = ""


@dataclass
class Group:
    help: str
    description: str | None = None
    children: dict[str, Any] = field(default_factory=dict)


COMMANDS: dict[tuple[str, ...], Command] = {}
GROUPS: dict[tuple[str, ...], Group] = {}


def command(name: str, *, help: str, description: str | None = None,
            epilog: str | None = None, args: list[Arg] | None = None, daemon: bool = True,
            configure: Callable[[argparse.ArgumentParser], None] | None = None
            ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a subcommand; `name` may have several words ("images import")."""
    path = tuple(name.split())

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if path in COMMANDS:
            raise ValueError(f"cnvmctl command {name!r} registered twice")
        COMMANDS[path] = Command(path, fn, help, description, epilog, list(args or []),
                                 daemon, configure, fn.__module__)
        return fn

    return deco


def group(name: str, *, help: str, description: str | None = None) -> None:
    """Describe a command group ("lab", "images") for `cnvmctl --help`."""
    GROUPS[tuple(name.split())] = Group(help, description)


def discover(package: str = "cnvmctl.commands") -> dict[str, str]:
    """Import every command module; return {module: error} for those that failed."""
    failed: dict[str, str] = {}
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        modname = f"{package}.{info.name}"
        try:
            importlib.import_module(modname)
        except Exception as exc:
            failed[modname] = f"{type(exc).__name__}: {exc}"
            print(f"cnvmctl: warning: commands in {modname} are unavailable ({failed[modname]})",
                  file=sys.stderr)
    return failed
