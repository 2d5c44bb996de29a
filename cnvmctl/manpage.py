"""Man pages generated from cnvmctl's argparse definitions (argparse-manpage):
cnvmctl(1) with every command, and cnvmctl-CMD(1) per top-level command (as git
does), so `man cnvmctl-exec` works. `make install` writes them to
/usr/local/share/man/man1 (`python -m cnvmctl.manpage DIR`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cnvmctl import __version__

MANUAL = "cnvm manual"


def _roff(text: str) -> str:
    """Plain text as roff lines, kept as they are (for .nf blocks)."""
    out = []
    for ln in text.rstrip("\n").split("\n"):
        ln = ln.replace("\\", "\\e").replace("-", "\\-")
        out.append("\\&" + ln if ln.startswith((".", "'")) else ln)
    return "\n".join(out)


def _page(parser: argparse.ArgumentParser, description: str | None = None) -> str:
    """argparse-manpage's page, with two fixes: a one-word title for "cnvmctl logs"
    (cnvmctl-logs), and the epilog (examples, tables) kept verbatim, not refilled."""
    from argparse_manpage.manpage import Manpage

    data: dict[str, Any] = {"project_name": "cnvm", "version": __version__,
                            "manual_title": MANUAL, "manual_section": 1}
    if description:
        data["description"] = description
    page = str(Manpage(parser, _data=data, format="pretty"))
    head, _, rest = page.partition("\n")
    head = head.replace(parser.prog.upper(), parser.prog.upper().replace(" ", "\\-"), 1)
    page = head + "\n" + rest
    if parser.epilog and "\n.SH COMMENTS\n" in page:
        before, _, after = page.partition("\n.SH COMMENTS\n")
        nxt = after.find("\n.SH ")
        tail = after[nxt:] if nxt >= 0 else "\n"
        page = (before + "\n.SH NOTES\n.nf\n" + _roff(parser.epilog) + "\n.fi" + tail)
    # a text line starting with ' would be read as a macro call
    return "\n".join("\\&" + ln if ln.startswith("'") else ln for ln in page.split("\n"))


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def write(dest: Path) -> list[Path]:
    """Write cnvmctl.1 and cnvmctl-CMD.1 into dest; return the paths written."""
    from cnvmctl import registry
    from cnvmctl.__main__ import build_parser

    registry.discover()
    parser = build_parser()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = [dest / "cnvmctl.1"]
    out[0].write_text(_page(parser, "control the cnvm daemon: deploy, exec, logs and "
                                    "teleport live-migrating containers"))
    for name, sub in sorted(_children(parser).items()):
        path = dest / f"cnvmctl-{name}.1"
        path.write_text(_page(sub, sub.description))
        out.append(path)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cnvmctl.manpage DIR")
    for p in write(Path(sys.argv[1])):
        print(p)
