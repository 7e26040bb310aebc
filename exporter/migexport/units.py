"""Parsing of the small value syntaxes users type: durations and listen addresses."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*(ms|s|m|h)?\s*$")
_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

# The longest duration Prometheus (and promtool) can represent: int64 nanoseconds, 106751d 23h 47m
# 16.854s; `for: 2562048h` is "duration out of range". Every duration migexport takes stays below it.
PROMETHEUS_MAX_DURATION_SECONDS = 9223372036.854
# PostgreSQL's lock_timeout / statement_timeout: whole milliseconds from 1 (0 turns the timeout off)
# to INT_MAX.
PG_TIMEOUT_MIN_SECONDS = 0.001
PG_TIMEOUT_MAX_SECONDS = 2147483.647
DAY = 86400.0


def show(value: object, limit: int = 40) -> str:
    """repr() of a value a user typed, cut to `limit` characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human(seconds: float) -> str:
    """A bound as a user reads it: 1ms, 1h, 106751d."""
    for unit, size in (("d", DAY), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size:
            return f"{math.floor(seconds / size * 1000) / 1000:.10g}{unit}"
    return f"{seconds * 1000:.10g}ms"


def parse_duration(
    text: str | float | int, maximum: float = PROMETHEUS_MAX_DURATION_SECONDS, minimum: float = 0.0
) -> float:
    """'100ms', '2s', '30m', '1h' or a bare number of seconds -> seconds: finite, from `minimum` (a
    positive value below it is refused, not rounded to 0) to `maximum`."""
    if isinstance(text, bool):
        raise ValueError(f"duration {text!r} is not like 100ms, 5s, 30m or 1h")
    if isinstance(text, int | float):
        if isinstance(text, int) and abs(text) > 10**15:  # float() of a 400-digit int overflows
            raise ValueError(f"duration {show(text)} is out of range (at most {human(maximum)})")
        seconds = float(text)
        if math.isnan(seconds):
            raise ValueError("duration .nan is not a number")
        if seconds < 0:
            raise ValueError(f"duration {show(text)} is negative")
    else:
        raw = str(text)
        if raw.strip().startswith("-"):
            raise ValueError(f"duration {show(text)} is negative")
        match = _DURATION.match(raw)
        if not match:
            raise ValueError(f"duration {show(text)} is not like 100ms, 5s, 30m or 1h")
        seconds = float(match.group(1)) * _FACTORS[match.group(2)]
    if not math.isfinite(seconds) or seconds > maximum:
        raise ValueError(f"duration {show(text)} is out of range (at most {human(maximum)})")
    if 0 < seconds < minimum:
        raise ValueError(f"duration {show(text)} is below {human(minimum)}")
    return seconds


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' (all interfaces) or '[v6addr]:PORT' -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)
