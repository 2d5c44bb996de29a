"""`cnvmctl completion bash|zsh`: shell completion generated from the argparse
definitions by shtab (so it never drifts from the real options)."""

from __future__ import annotations

import argparse

from cnvmctl.context import CliError, Ctx
from cnvmctl.registry import arg, command

EPILOG = """\
install (what `make install` does):
  cnvmctl completion bash > /usr/share/bash-completion/completions/cnvmctl
  cnvmctl completion zsh  > /usr/local/share/zsh/site-functions/_cnvmctl

or for the current shell only:
  source <(cnvmctl completion bash)
"""


@command("completion", daemon=False, help="print a shell completion script (bash, zsh)",
         description="Print the completion script for SHELL on stdout: every command, "
                     "option and\nchoice of this cnvmctl.",
         epilog=EPILOG, args=[arg("shell", choices=["bash", "zsh"], metavar="SHELL",
                                  help="bash or zsh")])
def completion(ctx: Ctx, a: argparse.Namespace) -> None:
    try:
        import shtab
    except ImportError:
        raise CliError("shtab is not installed (pip install 'cnvm[docs]', or run "
                       "scripts/install-deps)") from None

    from cnvmctl.__main__ import build_parser

    ctx.write(shtab.complete(build_parser(), shell=a.shell))
