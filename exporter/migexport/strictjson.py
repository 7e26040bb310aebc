"""JSON from files that other programs (or people, or a full disk) may have written: any bytes give a
value or one printable line, never a traceback, an infinity, or a number float() cannot hold.

Used by the state and baseline readers, whose values end up as metric samples and label values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JsonRefused(ValueError):
    """The bytes are not JSON a migexport file can hold; the message is one printable line."""


def _reject_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a number a migexport file can hold")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise JsonRefused(f"{text[:20]} is out of range")
    return value


def _small_int(text: str) -> int:
    # 20 digits are beyond any count, pid or byte size; checked before int(), which refuses more than
    # 4300 digits only after scanning them all.
    if len(text.lstrip("-")) > 20:
        raise JsonRefused(f"integer of {len(text)} digits is out of range")
    return int(text)


# No migexport JSON file comes near this (the state is bounded at 64 KiB, the baseline at 4 MiB, a
# snapshot is cut to fit): a larger one is refused before parsing, after reading one byte more.
MAX_FILE_BYTES = 16 * 1024 * 1024


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """Path.read_bytes() that stops one byte past `limit` (loads() then refuses it): a huge file or a
    device that never ends is not read into memory. OSError as from open()."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def loads(data: bytes, limit: int = MAX_FILE_BYTES) -> Any:
    """Parse `data` or raise JsonRefused with one line saying why."""
    if len(data) > limit:
        raise JsonRefused(f"larger than {limit // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused(f"not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_small_int)
    except json.JSONDecodeError as exc:
        raise JsonRefused(f"not valid JSON (truncated or edited?) at line {exc.lineno}: {exc.msg}") from None
    except JsonRefused:
        raise
    except ValueError as exc:  # the interpreter's own limit on integer digits
        raise JsonRefused(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise JsonRefused("nested too deeply") from None
