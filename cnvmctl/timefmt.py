"""Times on the command line: durations (`10m`, `1h30m`), `--since` values and
human renderings ("2026-12-01 22:44:50 +00:00 (3 minutes ago)")."""

from __future__ import annotations

import datetime
import re
import time

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")

SINCE_HELP = ("a duration back from now (10m, 1h30m, 2d; units ms s m h d w), a date/time "
              "(RFC 3339 like 2026-12-01T22:00:00Z, or 2026-12-01 22:00 in local time), "
              "or a UNIX time in seconds")


def parse_duration(text: str) -> float:
    """Seconds in `text` ("90s", "10m", "1h30m", "1.5h", "500ms"); ValueError if not one."""
    s = text.strip().lower()
    if not _DURATION.fullmatch(s):
        raise ValueError(f"bad duration {text!r} (examples: 45s, 10m, 1h30m, 2d)")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(s))


def parse_time(text: str) -> float:
    """A date/time as a UNIX time: RFC 3339 / ISO 8601 (naive = local time)."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"bad time {text!r} (examples: 2026-12-01T22:00:00Z, "
                         "2026-12-01 22:00)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time
    return dt.timestamp()


def parse_since(text: str, now: float | None = None) -> float:
    """`--since` as a UNIX time: a duration ago, a date/time, or a UNIX time."""
    s = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return float(s)
    if _DURATION.fullmatch(s.lower()):
        return (time.time() if now is None else now) - parse_duration(s)
    return parse_time(s)


def ago(t: float, now: float | None = None) -> str:
    """"3 minutes ago", "just now", "in 2 hours"."""
    d = (time.time() if now is None else now) - t
    future = d < 0
    d = abs(d)
    if d < 2:
        return "just now"
    for unit, secs in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if d >= secs:
            n = int(d // secs)
            phrase = f"{n} {unit}{'s' if n != 1 else ''}"
            return f"in {phrase}" if future else f"{phrase} ago"
    return "just now"


RFC3339_RE = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d{1,9})?)?(Z|[+-]\d\d:?\d\d)?")


def to_epoch(v: object) -> float | None:
    """A UNIX time from a number or an RFC 3339 string (runc's `created`), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str) and RFC3339_RE.fullmatch(v):
        # runc writes nanoseconds; fromisoformat takes at most microseconds
        v = re.sub(r"(\.\d{6})\d+", r"\1", v)
        try:
            return parse_time(v)
        except ValueError:
            return None
    return None


def local_iso(t: float, *, ms: bool = False) -> str:
    dt = datetime.datetime.fromtimestamp(t).astimezone()
    return dt.isoformat(sep=" " if not ms else "T",
                        timespec="milliseconds" if ms else "seconds")


def human(v: object, now: float | None = None) -> str:
    """Local ISO time and how long ago, for an epoch float or an RFC 3339 string."""
    t = to_epoch(v)
    if t is None:
        return "-" if v is None else str(v)
    return f"{local_iso(t)} ({ago(t, now)})"
