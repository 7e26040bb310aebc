"""Metric definitions and the plumbing that turns samples into Prometheus metric families.

Collectors declare their metrics as module-level `MetricSpec`s next to their SQL and return plain
`Sample`s. A scrape gathers the samples of every target and groups them into one family per metric,
so a metric's HELP and type are written once however many targets there are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

GAUGE = "gauge"
COUNTER = "counter"

# Application names and other free text that reach a label are cut to this many characters so a
# client cannot blow up series size with a long name.
MAX_LABEL_VALUE_LEN = 64


@dataclass(frozen=True)
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

    def sample(self, value: float | int | None, **labels: str) -> Sample:
        missing = set(self.labels) - set(labels)
        extra = set(labels) - set(self.labels)
        if missing or extra:
            raise ValueError(f"{self.name}: labels {sorted(labels)} do not match {self.labels}")
        return Sample(self, tuple(clip_label(labels[n]) for n in self.labels), as_float(value))


@dataclass(frozen=True)
class Sample:
    spec: MetricSpec
    label_values: tuple[str, ...]
    value: float


def as_float(value: float | int | None) -> float:
    """SQL NULL becomes NaN: 'unknown' must not read as 0."""
    if value is None:
        return math.nan
    return float(value)


def clip_label(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_LABEL_VALUE_LEN else text[: MAX_LABEL_VALUE_LEN - 1] + "…"


def families(
    per_target: Iterable[tuple[str | None, Iterable[Sample]]], specs: Iterable[MetricSpec] = ()
) -> Iterator[Metric]:
    """Group samples by metric into families; `specs` are emitted even without samples so their
    HELP lines are always visible. Samples of specs with per_target=False come with target None."""
    by_spec: dict[MetricSpec, list[tuple[tuple[str, ...], float]]] = {}
    for spec in specs:
        by_spec.setdefault(spec, [])
    for target, samples in per_target:
        for sample in samples:
            prefix = (target,) if sample.spec.per_target else ()
            by_spec.setdefault(sample.spec, []).append(((*prefix, *sample.label_values), sample.value))  # type: ignore[arg-type]
    for spec, rows in by_spec.items():
        labels = ["target", *spec.labels] if spec.per_target else list(spec.labels)
        if spec.kind == COUNTER:
            family: Metric = CounterMetricFamily(spec.name.removesuffix("_total"), spec.help, labels=labels)
        else:
            family = GaugeMetricFamily(spec.name, spec.help, labels=labels)
        for label_values, value in rows:
            family.add_metric(list(label_values), value)
        yield family
