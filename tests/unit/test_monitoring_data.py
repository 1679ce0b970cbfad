"""monitoring_data.json: the documented schema, strict JSON, and the seed's offline example."""

from __future__ import annotations

import dataclasses
import json
import math
from types import MappingProxyType

import numpy as np
import pytest

from collector.snapshot import CollectorSnapshot
from exporters import monitoring_data, plots
from exporters.monitoring_data import (FILE_NAME, SCHEMA, TOP_LEVEL_KEYS, aligned_history,
                                       build_monitoring_data, reward_functions,
                                       write_monitoring_data)
from snapshot_factory import (T0, grpo_collector_snapshot, make_metric, make_snapshot,
                              series_stats, with_rank_history)


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory):
    """The export of a real collector snapshot of a GRPO run, read back from disk."""
    path = tmp_path_factory.mktemp("md") / FILE_NAME
    write_monitoring_data(grpo_collector_snapshot(), path, generated_at=T0 + 100)
    return strict_loads(path.read_text(encoding="utf-8"))


def test_file_has_the_documented_keys(grpo_data):
    """Top-level keys are exactly TOP_LEVEL_KEYS, with the schema tag and the run facts."""
    assert list(grpo_data) == list(TOP_LEVEL_KEYS)
    assert grpo_data["schema"] == SCHEMA
    run = grpo_data["run"]
    assert run["run_id"] == "grpo-run" and run["world_size"] == 2 and run["finished"] is True
    assert run["total_iterations"] == 60 and run["generated_at"] == T0 + 100
    assert run["stop"]["source"] == "detector:kl_high" and run["stop"]["stop_at_step"] > 50


def test_history_is_keyed_by_reward_function_and_aligned_with_steps(grpo_data):
    """history has one list per rewards/<fn>, each as long as steps, holding the mean series."""
    assert set(grpo_data["history"]) == {"match_format_exactly", "check_answer"}
    assert grpo_data["steps"] == list(range(60))
    for values in grpo_data["history"].values():
        assert len(values) == len(grpo_data["steps"])
    assert set(grpo_data["statistics"]) == set(grpo_data["history"])
    stats = grpo_data["statistics"]["check_answer"]
    for key in ("count", "mean", "std", "min", "max", "median", "p25", "p75", "p90", "ema_short",
                "ema_long", "last", "trend", "trend_direction", "positive_fraction",
                "negative_fraction", "zero_fraction"):
        assert key in stats, key
    assert stats["trend_direction"] == "up" and stats["positive_fraction"] == 1.0


def test_metrics_carry_every_series_and_each_ranks(grpo_data):
    """metrics has every metric with its mean series, statistics and each rank's own series."""
    kl = grpo_data["metrics"]["kl"]
    assert len(kl["steps"]) == len(kl["values"]) == 60
    assert set(kl["by_rank"]) == {"0", "1"}
    assert "span/rollout" in grpo_data["metrics"]


def test_alerts_and_counts_are_exported(grpo_data):
    """Every alert held is listed with its fields; counts are split by severity and by type."""
    kinds = {(a["type"], a["severity"]) for a in grpo_data["alerts"]}
    assert ("KL_HIGH", "CRITICAL") in kinds
    assert set(grpo_data["alerts"][0]) == {"step", "severity", "type", "metric", "value",
                                           "threshold", "message", "time", "rank"}
    assert grpo_data["alert_counts"]["by_type"]["KL_HIGH"]["CRITICAL"] == 1
    assert grpo_data["alert_counts"]["by_severity"]["CRITICAL"] >= 1
    assert grpo_data["samples"][0]["prompt"] == "7+5="


def test_statistics_match_the_naive_reference():
    """The exported window statistics equal the factory's plain-numpy computation."""
    snap = make_snapshot(metrics=("rewards/a",))
    metric = snap.metrics["rewards/a"]
    data = build_monitoring_data(snap)
    expected = series_stats(metric.steps, metric.values)
    assert data["statistics"]["a"]["mean"] == pytest.approx(expected.mean)
    assert data["statistics"]["a"]["p90"] == pytest.approx(expected.p90)
    assert data["statistics"]["a"]["trend"] == pytest.approx(expected.slope)


def test_non_finite_values_become_null(tmp_path):
    """NaN and Inf in a series are written as null, so the file is strict JSON."""
    values = np.array([[1.0, np.nan, np.inf], [1.0, np.nan, np.inf]])
    metric = make_metric("rewards/x", values, np.arange(3))
    snap = dataclasses.replace(make_snapshot(), metrics=MappingProxyType({"rewards/x": metric}))
    data = strict_loads(write_monitoring_data(snap, tmp_path / FILE_NAME).read_text("utf-8"))
    assert data["history"]["x"] == [1.0, None, None]


def test_history_falls_back_to_the_total_reward():
    """Without rewards/<fn> metrics, history holds the total reward under "reward"."""
    snap = make_snapshot(metrics=("reward", "kl"))
    assert list(reward_functions(snap)) == ["reward"]
    assert reward_functions(snap, fallback=False) == {}
    assert list(build_monitoring_data(snap)["history"]) == ["reward"]


def test_aligned_history_fills_gaps_with_nan():
    """Functions logged at different steps share the union of steps, NaN where one is missing."""
    a = make_metric("rewards/a", np.array([[1.0, 2.0]]), np.array([0, 2]))
    b = make_metric("rewards/b", np.array([[5.0, 6.0]]), np.array([1, 2]))
    steps, history = aligned_history({"a": a, "b": b})
    assert steps == [0, 1, 2]
    assert history["a"][0] == 1.0 and math.isnan(history["a"][1]) and history["a"][2] == 2.0
    assert math.isnan(history["b"][0]) and history["b"][1:] == [5.0, 6.0]


def test_per_rank_series_are_left_out_for_large_worlds(monkeypatch):
    """Above MAX_RANKS_BY_RANK ranks, metrics[*] has no by_rank (the file stays small)."""
    snap = with_rank_history(make_snapshot(ranks=3))
    assert "by_rank" in build_monitoring_data(snap)["metrics"]["reward"]
    monkeypatch.setattr(monitoring_data, "MAX_RANKS_BY_RANK", 2)
    assert "by_rank" not in build_monitoring_data(snap)["metrics"]["reward"]


def test_empty_snapshot_exports_empty_sections(tmp_path):
    """A snapshot with nothing in it still writes a loadable file with every key."""
    empty = CollectorSnapshot(run_id="r", started_at=T0, taken_at=T0, world_size=1,
                              kl_threshold=0.1)
    data = strict_loads(write_monitoring_data(empty, tmp_path / FILE_NAME).read_text("utf-8"))
    assert list(data) == list(TOP_LEVEL_KEYS)
    assert data["history"] == {} and data["steps"] == [] and data["run"]["stop"] is None


def test_seed_example_3_offline_analysis(grpo_data, tmp_path, monkeypatch):
    """The seed's Example 3 works on the file: plot_reward_history(data["history"], save_path)."""
    monkeypatch.chdir(tmp_path)
    viz = plots
    path = viz.plot_reward_history(grpo_data["history"], save_path="analysis.png", dpi=60)
    assert path is not None and (tmp_path / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    stepped = viz.plot_reward_history(grpo_data["history"], save_path="analysis_steps.png",
                                      steps=grpo_data["steps"], dpi=60)
    assert stepped is not None and stepped.stat().st_size > 3_000
    assert viz.plot_reward_history({}, save_path="nothing.png") is None
    assert not (tmp_path / "nothing.png").exists()
