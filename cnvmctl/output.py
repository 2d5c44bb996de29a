"""Human output: aligned tables, sizes and durations, and a progress view.

Tables are plain padded text (no truncation, no colour when piped) so `grep` and
`awk` work on them; rich is only used for the live progress bar on a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from proto.client import Event
from proto.messages import EVT_LOG, EVT_PROGRESS


def cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]],
                fmt: dict[str, Callable[[Any], str]] | None = None, file: Any = None) -> None:
    """Columns are (HEADER, key); `fmt` maps a key to a formatter of its value."""
    fmt = fmt or {}
    file = file or sys.stdout
    table = [[h for h, _ in columns]]
    for r in rows:
        table.append([fmt[k](r.get(k)) if k in fmt else cell(r.get(k)) for _, k in columns])
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        print(line, file=file)


def print_kv(pairs: list[tuple[str, Any]], indent: int = 0, file: Any = None) -> None:
    file = file or sys.stdout
    if not pairs:
        return
    w = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{' ' * indent}{k.ljust(w)}  {cell(v)}", file=file)


def size(n: Any) -> str:
    if not isinstance(n, int | float):
        return cell(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def duration(s: Any) -> str:
    if not isinstance(s, int | float):
        return cell(s)
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def print_tree(obj: Any, indent: int = 0, file: Any = None) -> None:
    """Nested maps/lists as an indented outline (inspect's record and runc state)."""
    file = file or sys.stdout
    pad = " " * indent
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list) and v:
                print(f"{pad}{k}:", file=file)
                print_tree(v, indent + 2, file)
            else:
                print(f"{pad}{k}: {cell(v)}", file=file)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict | list) and v:
                print(f"{pad}-", file=file)
                print_tree(v, indent + 2, file)
            else:
                print(f"{pad}- {cell(v)}", file=file)
    else:
        print(f"{pad}{cell(obj)}", file=file)


class ProgressView:
    """Renders ``progress``/``log`` events of one streamed op on stderr.

    On a terminal: a rich bar per phase (phase, round, done/total, rate, ETA). When
    stderr is not a terminal: one line per phase change, so logs stay readable.
    Event data follows proto.messages.ProgressData.
    """

    def __init__(self, title: str = "", *, enabled: bool = True, file: Any = None) -> None:
        self.title = title
        self.enabled = enabled
        self.file = file or sys.stderr
        self.tty = enabled and self.file.isatty()
        self._progress: Any = None
        self._task: Any = None
        self._phase: str | None = None
        self._t0 = time.monotonic()

    def __enter__(self) -> ProgressView:
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.fields[amount]}"), TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(), console=Console(file=self.file), transient=False)
            self._progress.start()
        elif self.enabled and self.title:
            print(f"{self.title} ...", file=self.file)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def on_event(self, ev: Event) -> None:
        if not self.enabled:
            return
        if ev.name == EVT_LOG:
            self._line(str(ev.data.get("message", "")))
        elif ev.name == EVT_PROGRESS:
            self._update(ev.data)

    def _line(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.file)

    def _update(self, d: dict[str, Any]) -> None:
        phase = str(d.get("phase", ""))
        label = phase + (f" #{d['round']}" if "round" in d else "")
        done, total = d.get("done"), d.get("total")
        is_bytes = d.get("unit") == "bytes"
        amount = ""
        if isinstance(done, int | float):
            f = size if is_bytes else cell
            amount = f(done) + (f" / {f(total)}" if isinstance(total, int | float) else "")
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = f"{size(done / elapsed)}/s" if is_bytes and isinstance(done, int | float) else ""
        new_phase = label != self._phase
        if new_phase:
            self._phase = label
            self._t0 = time.monotonic()
        if self._progress is None:
            if new_phase:
                msg = d.get("message")
                self._line(f"  {label}" + (f": {msg}" if msg else "")
                           + (f" ({amount})" if amount else ""))
            return
        if new_phase:
            if self._task is not None:
                self._progress.update(self._task, completed=self._progress.tasks[-1].total or 1)
            self._task = self._progress.add_task(label, total=total or None,
                                                 amount=amount, rate=rate)
        self._progress.update(self._task, completed=done or 0, total=total or None,
                              amount=amount or d.get("message", ""), rate=rate)
