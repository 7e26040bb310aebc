"""Metric definitions, and the Prometheus text exposition of their samples.

Collectors declare their metrics as module-level `MetricSpec`s next to their SQL and return plain
`Sample`s. A scrape gathers the samples of every target and `render()` writes them in the Prometheus
text format (version 0.0.4), one block per metric, so a metric's HELP and type are written once however
many targets there are. The format is a few lines of escaping; writing it here rather than through a
client library's metric objects makes a scrape ~0.6 ms cheaper (~1.1 ms against its OpenMetrics and
name-escaping path) and keeps that library out of the memory of a process that runs for months.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GAUGE = "gauge"
COUNTER = "counter"
HISTOGRAM = "histogram"

# Application names and other free text that reach a label are cut to this many characters so a
# client cannot blow up series size with a long name.
MAX_LABEL_VALUE_LEN = 64

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# Identity, not field-by-field equality: specs are module-level constants, used as dict keys at every
# scrape, and a dataclass hash would rebuild and hash the tuple of all fields (the HELP text) each time.
@dataclass(frozen=True, eq=False)
class MetricSpec:
    name: str
    help: str
    kind: str = GAUGE
    labels: tuple[str, ...] = ()
    # False for facts about the migration or the exporter as a whole: no `target` label then.
    per_target: bool = True

    def __post_init__(self) -> None:
        if self.kind == COUNTER and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must end in _total")

    @functools.cached_property
    def header(self) -> str:
        """Its HELP and TYPE lines, escaped once."""
        return f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"

    def sample(self, value: float | int | None, **labels: str) -> Sample:
        missing = set(self.labels) - set(labels)
        extra = set(labels) - set(self.labels)
        if missing or extra:
            raise ValueError(f"{self.name}: labels {sorted(labels)} do not match {self.labels}")
        return Sample(self, tuple(clip_label(labels[n]) for n in self.labels), as_float(value))

    def histogram(
        self, bounds: Sequence[float], cumulative: Sequence[float], total: float, **labels: str
    ) -> list[Sample]:
        """A histogram's series: a `_bucket` per upper bound and +Inf (`cumulative` has one count more
        than `bounds`), then `_sum` and `_count`."""
        if self.kind != HISTOGRAM:
            raise ValueError(f"{self.name} is not a histogram")
        base = self.sample(0, **labels).label_values
        les = [*(format_value(b) for b in bounds), "+Inf"]
        out = [Sample(self, base, float(c), "_bucket", le) for le, c in zip(les, cumulative, strict=True)]
        return [*out, Sample(self, base, float(total), "_sum"), Sample(self, base, float(cumulative[-1]), "_count")]


@dataclass(frozen=True)
class Sample:
    spec: MetricSpec
    label_values: tuple[str, ...]
    value: float
    # A histogram's series: `_bucket` (with its `le`), `_sum` or `_count`.
    suffix: str = ""
    le: str = ""


def as_float(value: float | int | None) -> float:
    """SQL NULL becomes NaN: 'unknown' must not read as 0."""
    if value is None:
        return math.nan
    return float(value)


def clip_label(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_LABEL_VALUE_LEN else text[: MAX_LABEL_VALUE_LEN - 1] + "…"


def format_value(value: float) -> str:
    """A sample value as Prometheus reads it: +Inf, -Inf, NaN, or the shortest exact decimal."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(per_target: Iterable[tuple[str | None, Iterable[Sample]]], specs: Iterable[MetricSpec] = ()) -> str:
    """The text exposition: samples grouped by metric, each metric's HELP and TYPE once. `specs` are
    written even without samples, so their HELP lines are always visible. Samples of specs with
    per_target=False come with target None."""
    by_spec: dict[MetricSpec, list[str]] = {spec: [] for spec in specs}
    label_names: dict[MetricSpec, tuple[str, ...]] = {}
    for target, samples in per_target:
        for sample in samples:
            spec = sample.spec
            names = label_names.get(spec)
            if names is None:
                names = label_names[spec] = ("target", *spec.labels) if spec.per_target else spec.labels
            values = (target, *sample.label_values) if spec.per_target else sample.label_values
            pairs = [f'{n}="{_escape_label(v or "")}"' for n, v in zip(names, values, strict=True)]
            if sample.suffix == "_bucket":
                pairs.append(f'le="{sample.le}"')
            labels = "{" + ",".join(pairs) + "}" if pairs else ""
            by_spec.setdefault(spec, []).append(f"{spec.name}{sample.suffix}{labels} {format_value(sample.value)}\n")
    out = []
    for spec, lines in by_spec.items():
        out.append(spec.header)
        out.extend(lines)
    return "".join(out)
