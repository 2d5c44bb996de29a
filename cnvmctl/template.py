"""`--format`: a small Go-template-like language over a command's JSON fields.

Syntax (documented in `FORMAT_HELP`): text with `{{.Field}}` actions. A field is a
JSON key of the row, matched exactly, then ignoring case and `_` (so `.IP`, `.ip`,
`.CreatedAt` and `.created_at` work); `.a.b` goes into maps; `{{.}}` is the whole
row; `{{json .Field}}` prints the value as JSON. `\\t` and `\\n` are a tab and a
newline. A leading `table ` prints a header line and aligns tab-separated columns.
Values: nothing (null) prints as an empty string, true/false as such, lists and
maps as JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

FORMAT_HELP = ("Go-template-like: text with {{.Field}} for a JSON field of each row "
               "(case and _ ignored: {{.Name}} {{.IP}} {{.image_id}}), {{.a.b}} into "
               "maps, {{json .Field}} as JSON, {{.}} the whole row; \\t and \\n are "
               "tab and newline; a leading 'table ' adds a header and aligns columns "
               "(the fields are the keys of --json, listed below)")

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_KEY = r"[A-Za-z_][A-Za-z0-9_-]*"
_FIELD = re.compile(rf"\s*(json\s+)?\.({_KEY}(?:\.{_KEY})*)?\s*")


class FormatError(ValueError):
    """A bad template, or a field the rows do not have."""


@dataclass(frozen=True)
class Field:
    path: tuple[str, ...]
    as_json: bool

    @property
    def header(self) -> str:
        return (self.path[-1] if self.path else "value").upper()


def _norm(k: str) -> str:
    return k.replace("_", "").replace("-", "").lower()


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            raise FormatError(f"field .{'.'.join(path)}: {key!r} is not inside a map")
        if key in obj:
            obj = obj[key]
            continue
        match = [k for k in obj if isinstance(k, str) and _norm(k) == _norm(key)]
        if not match:
            fields = ", ".join(sorted(str(k) for k in obj))
            raise FormatError(f"no field .{key} (fields: {fields})")
        obj = obj[match[0]]
    return obj


def _show(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"), default=str)
    return str(v)


def _unescape(text: str) -> str:
    return text.replace("\\t", "\t").replace("\\n", "\n")


class Template:
    def __init__(self, spec: str) -> None:
        self.table = spec.startswith("table ")
        if self.table:
            spec = spec[len("table "):]
        self.parts: list[str | Field] = []
        pos = 0
        for m in _ACTION.finditer(spec):
            if m.start() > pos:
                self.parts.append(_unescape(spec[pos:m.start()]))
            f = _FIELD.fullmatch(m.group(1))
            if f is None:
                raise FormatError(f"unsupported action {m.group(0)!r}: use {{{{.Field}}}} "
                                  "or {{json .Field}}")
            self.parts.append(Field(tuple(f.group(2).split(".")) if f.group(2) else (),
                                    bool(f.group(1))))
            pos = m.end()
        if "{{" in spec[pos:] or "}}" in spec[pos:]:
            raise FormatError("unbalanced {{ }} in the format")
        if pos < len(spec):
            self.parts.append(_unescape(spec[pos:]))

    def render(self, row: Any) -> str:
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
            else:
                v = _get(row, p.path)
                out.append(json.dumps(v, default=str) if p.as_json else _show(v))
        return "".join(out)

    def header(self) -> str:
        return "".join(p if isinstance(p, str) else p.header for p in self.parts)

    def lines(self, rows: list[Any]) -> list[str]:
        """The output lines for `rows` (with `table`: a header, columns aligned)."""
        text = [self.render(r) for r in rows]
        if not self.table:
            return text
        table = [ln.split("\t") for ln in [self.header(), *text]]
        n = max(len(r) for r in table)
        widths = [max((len(r[i]) for r in table if i < len(r)), default=0) for i in range(n)]
        return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in table]
