"""What a command handler gets: the chosen daemon, output mode, and helpers.

The connection is opened lazily on the first ``ctx.call`` so commands that do not
need the daemon (``lab up``) never fail for lack of one.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnvmctl import output
from cnvmctl.output import ProgressView
from proto.client import Client, EventCallback

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class CliError(Exception):
    """A failure detected by cnvmctl itself; printed as one line, exits `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


class Ctx:
    def __init__(self, *, socket: Path, socket_origin: str, json: bool, lab: str | None,
                 node: str | None, daemon: bool = True) -> None:
        self.socket = socket
        self.socket_origin = socket_origin  # how the socket was chosen (for hints)
        self.json = json
        self.lab = lab
        self.node = node
        self._daemon_allowed = daemon
        self._client: Client | None = None
        self.task: asyncio.Task[Any] | None = None  # the command's task (main sets it)
        self.pipe_closed = False  # stdout's reader went away (`| head -1`)

    async def client(self) -> Client:
        """The connection to the daemon (opened on first use)."""
        if not self._daemon_allowed:
            raise CliError("internal: this command is registered with daemon=False")
        if self._client is None:
            self._client = await Client.connect(self.socket, agent="cnvmctl")
        return self._client

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   on_event: EventCallback | None = None, timeout: float | None = None) -> Any:
        """One request to the daemon. ProtoError propagates (main maps it to exit 1/3)."""
        c = await self.client()
        return await c.call(op, args, on_event=on_event, timeout=timeout)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # -- output
    def output(self, result: Any, human: Callable[[Any], None]) -> None:
        """Print `result` as JSON with --json, else via the human renderer."""
        if self.json:
            self.print_json(result)
        else:
            human(result)

    def write(self, data: bytes | str, *, err: bool = False) -> None:
        """Write and flush now (streamed output). Usable from event callbacks: a
        closed stdout ends the command (main exits quietly) instead of the
        connection's protocol callback failing."""
        f = sys.stderr if err else sys.stdout
        try:
            if isinstance(data, bytes):
                f.flush()
                f.buffer.write(data)
            else:
                f.write(data)
            f.flush()
        except BrokenPipeError:
            self.pipe_closed = True
            try:
                inside = asyncio.current_task() is self.task
            except RuntimeError:  # no event loop
                inside = True
            if inside or self.task is None:
                raise
            self.task.cancel()  # from a callback: end the command at its next await

    def print_json(self, obj: Any) -> None:
        json.dump(obj, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")

    def table(self, rows: list[dict[str, Any]], columns: list[tuple[str, str]],
              fmt: dict[str, Callable[[Any], str]] | None = None) -> None:
        output.print_table(rows, columns, fmt)

    def progress(self, title: str = "") -> ProgressView:
        """Live progress for an op streaming ``progress`` events (silent with --json)::

            with ctx.progress("teleport web → node3") as p:
                report = await ctx.call("teleport", args, on_event=p.on_event)
        """
        return output.ProgressView(title, enabled=not self.json)
