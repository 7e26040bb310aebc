"""A small Prometheus HTTP API client for the report: instant and range queries with a timeout.

Every failure is one ReportError line naming the URL and what went wrong (unreachable, HTTP error, a
query Prometheus refused), never a traceback: `migexport report` prints it and exits 2.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from migexport.dsn import redact

# Prometheus refuses range queries of more than 11,000 points per series.
MAX_POINTS = 11_000


def quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class ReportError(Exception):
    """The report cannot be written; the message is one printable line."""


@dataclass(frozen=True)
class Sample:
    """One series of an instant query: its labels, the value as Prometheus wrote it, and its time."""

    labels: dict[str, str]
    text: str
    at: float

    @property
    def value(self) -> float:
        return float(self.text)


@dataclass(frozen=True)
class Series:
    """One series of a range query: labels and (time, value) points."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


class Prometheus:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ReportError(f"Prometheus URL {redact(url)!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str]) -> Any:
        where = f"{redact(self.url)}{path}"
        request = urllib.request.Request(
            f"{self.url}{path}?{urllib.parse.urlencode(params)}", headers={"Accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            # Prometheus explains a refused query in the body: {"status": "error", "error": "..."}.
            raise ReportError(f"Prometheus at {where}: HTTP {exc.code}: {_error_of(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ReportError(f"Prometheus at {redact(self.url)} is unreachable: {reason}") from None
        except ValueError:
            raise ReportError(f"Prometheus at {where}: the answer is not JSON (is this Prometheus?)") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else None
            raise ReportError(f"Prometheus at {where}: query failed: {error or 'unexpected answer'}")
        return body.get("data", {})

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query (vector result) at `at` (default: now)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data.get("resultType") == "scalar":
            t, text = data["result"]
            return [Sample({}, text, float(t))]
        if data.get("resultType") != "vector":
            raise ReportError(f"Prometheus: {expr!r} is not an instant vector query")
        return [Sample(r["metric"], r["value"][1], float(r["value"][0])) for r in data["result"]]

    def raw_samples(self, expr: str, at: float) -> list[Series]:
        """An instant query of a range selector (`ALERTS{...}[1h]`): every stored sample, not a resampling."""
        data = self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})
        if data.get("resultType") != "matrix":
            raise ReportError(f"Prometheus: {expr!r} is not a range selector")
        return [_series(r) for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        # Within Prometheus' limit whatever the window: a coarser step rather than a refused query.
        step = max(step, math.ceil((end - start) / (MAX_POINTS - 1)))
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        data = self._get("/api/v1/query_range", params)
        return [_series(r) for r in data.get("result", [])]


def _series(raw: dict[str, Any]) -> Series:
    return Series(raw["metric"], [(float(t), float(v)) for t, v in raw.get("values", [])])


def _error_of(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except (ValueError, OSError):
        return exc.reason or "error"
    return str(body.get("error") or exc.reason or "error").splitlines()[0]
