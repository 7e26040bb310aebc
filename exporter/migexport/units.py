"""Parsing of the small value syntaxes users type: durations and listen addresses."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """'100ms', '2s', '30m', '1h' or a bare number of seconds -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"duration {text!r} is negative")
        return float(text)
    if str(text).strip().startswith("-"):
        raise ValueError(f"duration {text!r} is negative")
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"duration {text!r} is not like 100ms, 5s, 30m or 1h")
    return float(match.group(1)) * _FACTORS[match.group(2)]


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' (all interfaces) or '[v6addr]:PORT' -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)
