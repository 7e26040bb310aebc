"""Metric naming rules and password redaction: checked over everything the exporter defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from migexport.collect import all_specs
from migexport.dsn import redact
from migexport.metrics import COUNTER


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_metric_names_follow_prometheus_conventions(spec):
    assert re.fullmatch(r"migexport_[a-z0-9_]+", spec.name)
    assert spec.help.strip() and spec.help.endswith((".", ")")), "HELP must be a sentence"
    assert spec.name.endswith("_total") == (spec.kind == COUNTER)
    assert not re.search(r"_(milliseconds|ms|minutes|kilobytes|megabytes|mb)(_|$)", spec.name), "base units"
    if spec.per_target:
        assert "target" not in spec.labels, "target is added by the exporter"
    assert not {"query", "queryid", "dsn"} & set(spec.labels), "unbounded labels are not allowed"


def test_metric_names_are_unique():
    names = [spec.name for spec in all_specs()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "text",
    [
        "host=db password=hunter2 user=app",
        "host=db password = 'hun ter2' user=app",
        "postgresql://app:hunter2@db:5432/app",
        "postgres://app:hunter2@db/app?sslmode=require",
        "postgresql://db/app?user=app&password=hunter2",
        'connection to "host=db password=hunter2" failed',
    ],
)
def test_every_password_form_is_redacted(text):
    out = redact(text)
    assert "hunter2" not in out and "hun ter2" not in out
    assert "***" in out


def test_readme_documents_every_metric():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [s.name for s in all_specs() if f"`{s.name}`" not in readme and f"`{s.name}{{" not in readme]
    assert not missing, f"README.md does not document: {missing}"
