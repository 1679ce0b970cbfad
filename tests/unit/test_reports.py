"""The seed-format reports: JSON schema and strictness, Markdown sections, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.snapshot import SeriesStats
from exporters import atomic
from exporters.atomic import atomic_write_bytes, atomic_write_text
from exporters.reports import (build_json_report, render_markdown, total_iterations, trend_arrow,
                               write_final_reports, write_json_report, write_markdown_report)
from snapshot_factory import T0, make_metric, make_snapshot, series_stats

SEED_SUMMARY = {"total_iterations": int, "early_stopped": bool, "generated_at": str}
SEED_METRIC = ("mean", "std", "min", "max", "count", "trend")
EXTRA_METRIC = ("median", "p25", "p75", "p90", "ema_short", "ema_long", "last")
SEED_ALERT = ("iteration", "severity", "reason", "metric_name", "metric_value")
EXTRA_ALERT = ("type", "threshold", "time", "rank")
SEED_SAMPLES = {"num_comparisons": int, "avg_similarity": (float, type(None)),
                "degraded_count": int, "catastrophic_forgetting": bool}


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON parsers do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


def leftovers(directory: Path) -> list[str]:
    """Names in ``directory`` that look like temporary files."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_json_report_follows_the_seed_schema(tmp_path):
    """Every seed key is present with the seed's type; rlmon's extras sit beside them."""
    path = write_json_report(make_snapshot(stop=True), tmp_path / "training_report.json")
    report = strict_loads(path.read_text(encoding="utf-8"))
    top = {"summary", "metrics", "alerts", "sample_comparisons", "ranks", "collector"}
    assert top <= set(report)
    summary = report["summary"]
    for key, kind in SEED_SUMMARY.items():
        assert isinstance(summary[key], kind), key
    assert summary["stop_reason"] == "KL divergence above 2x threshold"
    datetime.fromisoformat(summary["generated_at"])
    assert summary["run_id"] == "run-test" and summary["world_size"] == 2
    assert summary["stop"]["stop_at_step"] == 32 and summary["stop"]["generation"] == 1
    reward = report["metrics"]["reward"]
    assert set(SEED_METRIC + EXTRA_METRIC) <= set(reward)
    assert isinstance(reward["count"], int) and isinstance(reward["trend"], float)
    for alert in report["alerts"]:
        assert set(SEED_ALERT + EXTRA_ALERT) <= set(alert)
        assert isinstance(alert["iteration"], int) and isinstance(alert["reason"], str)
    for key, kind in SEED_SAMPLES.items():
        assert isinstance(report["sample_comparisons"][key], kind), key


def test_json_report_values(tmp_path):
    """Numbers in the JSON equal the snapshot's: iterations, stats, alerts, ranks, counts."""
    snap = make_snapshot(ranks=3)
    report = build_json_report(snap, generated_at=T0 + 200)
    assert report["summary"]["total_iterations"] == 50
    assert report["summary"]["early_stopped"] is False and report["summary"]["stop_reason"] is None
    reward = snap.metrics["reward"].window
    assert report["metrics"]["reward"]["mean"] == reward.mean
    assert report["metrics"]["reward"]["trend"] == reward.slope
    assert report["metrics"]["reward"]["trend_direction"] == "up"
    assert [a["iteration"] for a in report["alerts"]] == [10, 20, 30]
    assert report["alerts"][1]["rank"] == 1 and report["alerts"][0]["rank"] is None
    assert report["ranks"]["1"]["dropped"] == {"queue_full": 3}
    assert report["collector"]["frames_rejected"] == {"bad_version": 1, "malformed": 2}
    assert report["summary"]["alert_counts"] == {"INFO": 1, "WARNING": 1, "CRITICAL": 1}


def test_nan_becomes_null_in_json(tmp_path):
    """NaN and Inf anywhere in the snapshot become null; the file stays strict JSON."""
    nan_metric = make_metric("loss", np.array([[math.nan, math.nan]]), np.arange(2))
    snap = dataclasses.replace(make_snapshot(ranks=1, metrics=()),
                               metrics=MappingProxyType({"loss": nan_metric}))
    path = write_json_report(snap, tmp_path / "r.json")
    report = strict_loads(path.read_text(encoding="utf-8"))
    assert report["metrics"]["loss"]["mean"] is None
    assert report["metrics"]["loss"]["count"] == 0
    assert report["metrics"]["loss"]["trend_direction"] is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1,
                max_size=20))
def test_json_report_is_strict_for_any_values(values):
    """Whatever floats a metric holds, the JSON report serializes strictly and parses back."""
    steps = np.arange(len(values))
    with np.errstate(all="ignore"):
        metric = make_metric("x", np.array([values], dtype=float), steps)
    snap = dataclasses.replace(make_snapshot(ranks=1, metrics=()),
                               metrics=MappingProxyType({"x": metric}))
    text = json.dumps(build_json_report(snap), allow_nan=False)
    assert strict_loads(text)["metrics"]["x"]["count"] == metric.window.count


def test_sample_comparisons_default_without_comparator():
    """With no comparator data the seed's object holds zeros, null and false."""
    report = build_json_report(make_snapshot())
    assert report["sample_comparisons"] == {"num_comparisons": 0, "avg_similarity": None,
                                            "degraded_count": 0, "catastrophic_forgetting": False}


def test_sample_comparisons_from_extra():
    """Comparator results placed in snapshot.extra reach both reports."""
    data = {"num_comparisons": 20, "avg_similarity": 0.8542, "degraded_count": 2,
            "catastrophic_forgetting": True}
    snap = dataclasses.replace(make_snapshot(),
                               extra=MappingProxyType({"sample_comparisons": data}))
    assert build_json_report(snap)["sample_comparisons"] == data
    assert "- **Catastrophic Forgetting**: Yes" in render_markdown(snap)


def test_markdown_has_every_section_in_order():
    """The Markdown report has the seed's headings first, then rlmon's, each once."""
    text = render_markdown(make_snapshot(stop=True), generated_at=T0 + 200)
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# Training Report", "## Summary", "## Metrics", "## Quality Alerts",
                        "## Sample Comparisons", "## PPO Mechanics", "## Ranks",
                        "## Collector Health"]


def test_markdown_summary_and_tables():
    """Summary lines, the seed's metric table header, severity counts and escaped cells."""
    text = render_markdown(make_snapshot(stop=True), generated_at=T0 + 200)
    assert "- **Total Iterations**: 50" in text
    assert "- **Early Stopped**: Yes" in text
    assert "- **Stop Reason**: KL divergence above 2x threshold" in text
    assert "- **Stop At Step**: 32" in text
    assert "| Metric | Mean | Std | Min | Max | Trend |" in text
    assert "- INFO: 1\n- WARNING: 1\n- CRITICAL: 1" in text
    assert "critical \\| threshold" in text
    assert "| 1 | node0 | 49 |" in text
    assert "- **Frames Rejected**: bad_version: 1, malformed: 2" in text


def test_markdown_trend_arrows():
    """Rising, falling and flat metrics get ↑, ↓ and → in the metrics table."""
    text = render_markdown(make_snapshot())
    rows = {line.split("|")[1].strip(): line.split("|")[6].strip()
            for line in text.split("## Quality Alerts")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| Metric")}
    assert rows["reward"] == "↑" and rows["policy_loss"] == "↓" and rows["kl_div"] == "→"


def test_markdown_without_stop_or_data():
    """An empty snapshot renders: no stop, zero iterations, no metrics, no ranks."""
    text = render_markdown(make_snapshot(ranks=0, metrics=()))
    assert "- **Early Stopped**: No" in text and "- **Stop Reason**: None" in text
    assert "- **Total Iterations**: 0" in text
    assert "No metrics were logged." in text and "No rank has connected." in text
    assert "## PPO Mechanics" not in text


def test_total_iterations_is_largest_step_plus_one():
    """Total iterations counts from step 0 to the furthest rank's last step."""
    snap = make_snapshot(ranks=2, steps=10)
    ranks = dict(snap.ranks)
    ranks[1] = dataclasses.replace(ranks[1], last_step=41)
    assert total_iterations(dataclasses.replace(snap, ranks=MappingProxyType(ranks))) == 42


@pytest.mark.parametrize(("slope", "std", "count", "expected"), [
    (0.01, 0.03, 100, "↑"),
    (-0.01, 0.03, 100, "↓"),
    (1e-5, 0.03, 100, "→"),
    (0.0, 0.0, 100, "→"),
    (math.nan, math.nan, 1, "–"),
])
def test_trend_arrow_rule(slope, std, count, expected):
    """The arrow follows the fitted change against one standard deviation."""
    nan = math.nan
    stats = SeriesStats(count, 0.5, std, nan, nan, nan, nan, nan, nan, nan, nan, slope, nan)
    assert trend_arrow(stats, np.arange(count)) == expected


def test_trend_arrow_flat_for_noise():
    """A 200-point noise series with no drift reads as flat."""
    steps = np.arange(200)
    values = np.random.default_rng(3).normal(1.0, 0.1, 200)
    assert trend_arrow(series_stats(steps, values), steps) == "→"


def test_write_final_reports(tmp_path):
    """Both seed files land in a new directory, are returned, and leave no temp files."""
    out = tmp_path / "run" / "out"
    paths = write_final_reports(make_snapshot(stop=True), out)
    assert [p.name for p in paths] == ["training_report.md", "training_report.json"]
    assert all(p.is_file() and p.parent == out for p in paths)
    assert strict_loads(paths[1].read_text(encoding="utf-8"))["summary"]["early_stopped"] is True
    assert paths[0].read_text(encoding="utf-8").startswith("# Training Report\n")
    assert leftovers(out) == []


def test_rewrite_replaces_whole_file(tmp_path):
    """A shorter report over a longer one leaves exactly the new content."""
    path = tmp_path / "training_report.md"
    path.write_text("x" * 100_000, encoding="utf-8")
    write_markdown_report(make_snapshot(ranks=0, metrics=()), path)
    text = path.read_text(encoding="utf-8")
    assert "x" * 10 not in text and text.startswith("# Training Report")
    assert leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    """If the rename fails the old file is intact and the temp file is removed."""
    path = tmp_path / "report.json"
    path.write_text("old", encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text(encoding="utf-8") == "old"
    assert leftovers(tmp_path) == []


def test_atomic_write_keeps_permissions(tmp_path):
    """A replaced file keeps its mode; a new file gets 0o644."""
    fresh = atomic_write_bytes(tmp_path / "new.bin", b"abc")
    assert fresh.read_bytes() == b"abc" and (fresh.stat().st_mode & 0o777) == 0o644
    existing = tmp_path / "old.bin"
    existing.write_bytes(b"old")
    os.chmod(existing, 0o600)
    atomic_write_bytes(existing, b"new")
    assert existing.read_bytes() == b"new" and (existing.stat().st_mode & 0o777) == 0o600
