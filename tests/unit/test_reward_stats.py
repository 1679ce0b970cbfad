"""Per-sample reward statistics: the kernels against slow references, RewardStats, the ``rewards``
question, and what the exporters make of them."""

from __future__ import annotations

import math
import statistics
import subprocess
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import reward_stats as rs
from collector.state import CollectorState, StateConfig
from reference import ref_ema, ref_percentile
from rlmon import wire
from rlmon.wire import Kind

NAN, INF = math.nan, math.inf
CASES = {
    "empty": [],
    "one point": [2.5],
    "all equal": [1.0] * 7,
    "NaN and Inf": [1.0, NAN, -2.0, INF, 0.0, -INF, 3.0],
    "wrap-around": [float(i % 5 - 2) for i in range(23)],
}
FLOATS = (st.floats(-1e6, 1e6) | st.sampled_from([NAN, INF, -INF, 0.0, 2.0**52, -1e308])
          | st.floats(allow_nan=False, allow_infinity=False))


# --- slow references ------------------------------------------------------------------------------

def ref_ring(values: list[float], capacity: int) -> list[float]:
    """The last ``capacity`` finite values, oldest first."""
    return list(deque((v for v in values if math.isfinite(v)), maxlen=capacity))


def ref_value_stats(values: list[float]) -> dict[str, float]:
    """count, moments, percentiles and sign fractions of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    stats = {"count": 0, **dict.fromkeys(("mean", "std", "min", "max", "median", "p25", "p75",
                                          "p90"), NAN)}
    if finite:
        ordered = sorted(finite)
        stats.update(count=len(finite), mean=float(sum(map(Fraction, finite)) / len(finite)),
                     std=statistics.pstdev(finite), min=ordered[0], max=ordered[-1],
                     **{key: ref_percentile(ordered, q) for key, q in
                        (("median", 0.5), ("p25", 0.25), ("p75", 0.75), ("p90", 0.9))})
    for key, keep in (("positive", lambda v: v > 0), ("negative", lambda v: v < 0),
                      ("zero", lambda v: v == 0)):
        stats[key] = sum(map(keep, finite)) / len(finite) if finite else NAN
    return stats


def ref_histogram(values: list[float], edges: list[float]) -> list[int]:
    """Counts per bin by comparing with every edge (the last bin closed)."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        for i in range(len(counts)):
            last = i == len(counts) - 1
            if edges[i] <= v < edges[i + 1] or (last and v == edges[-1]):
                counts[i] += 1
                break
    return counts


def push_all(values: list[float], capacity: int, chunk: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A ring filled through ``ring_push`` in chunks."""
    buffer, ring = np.full(capacity, -99.0), np.zeros(2, np.int64)
    for start in range(0, len(values), chunk):
        rs.ring_push(buffer, ring, np.asarray(values[start:start + chunk], np.float64))
    return buffer, ring


def kernel_stats(values: list[float]) -> dict[str, float]:
    """``value_stats`` on the sorted finite values, keyed like the reference."""
    finite = np.sort(np.asarray([v for v in values if math.isfinite(v)], np.float64))
    out = np.empty(rs.N_VALUE_STATS)
    rs.value_stats(finite, out)
    keys = {"count": 0, "mean": 1, "std": 2, "min": 3, "max": 4, "median": 5, "p25": 6, "p75": 7,
            "p90": 8, "positive": rs.VALUE_POSITIVE, "negative": rs.VALUE_NEGATIVE,
            "zero": rs.VALUE_ZERO}
    return {key: float(out[slot]) for key, slot in keys.items()}


def assert_close(actual: dict[str, float], expected: dict[str, float], scale: float = 1.0) -> None:
    """Equal keys; values equal within 1e-9 relative (1e-12 of ``scale`` absolute), NaN
    matching NaN."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12 * scale,
                                            nan_ok=True), key


# --- kernels --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_ring_push_and_tail_match_a_bounded_deque(name):
    """ring_push keeps the last `capacity` finite values; ring_tail reads them oldest first."""
    values, capacity = CASES[name], 5
    buffer, ring = push_all(values, capacity)
    expected = ref_ring(values, capacity)
    assert int(ring[1]) == len(expected)
    assert sorted(buffer[:ring[1]]) == sorted(expected)
    for want in (0, 2, capacity, capacity + 3):
        out = np.empty(want)
        m = rs.ring_tail(buffer, ring, out)
        assert list(out[:m]) == (expected[-want:] if want else [])


@pytest.mark.parametrize("name", CASES)
def test_value_stats_matches_reference(name):
    """Moments, percentiles and sign fractions equal the slow reference."""
    assert_close(kernel_stats(CASES[name]), ref_value_stats(CASES[name]))


@pytest.mark.parametrize("name", CASES)
def test_histogram_matches_reference_and_numpy(name):
    """Counts equal the edge-by-edge reference and numpy.histogram; NaN/Inf are not counted."""
    values = CASES[name]
    finite = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    edges = rs.histogram_edges(finite, 4)
    if not finite.size:
        assert edges.size == 0
        return
    counts = np.zeros(4, np.int64)
    rs.histogram(np.asarray(values, np.float64), edges, counts)
    assert counts.tolist() == ref_histogram(finite.tolist(), edges.tolist())
    assert counts.tolist() == np.histogram(finite, bins=edges)[0].tolist()
    assert counts.sum() == finite.size


@settings(max_examples=150, deadline=None)
@given(st.lists(FLOATS, max_size=40), st.integers(1, 12))
def test_kernels_match_references_on_random_inputs(values, capacity):
    """Ring, statistics and histogram agree with their references on arbitrary inputs."""
    buffer, ring = push_all(values, capacity, chunk=4)
    held = ref_ring(values, capacity)
    assert sorted(buffer[:ring[1]]) == sorted(held)
    assert_close(kernel_stats(held), ref_value_stats(held), max(map(abs, held), default=1.0))
    finite = np.asarray(held, np.float64)
    edges = rs.histogram_edges(finite, 7)
    if finite.size:
        counts = np.zeros(7, np.int64)
        rs.histogram(finite, edges, counts)
        assert counts.sum() == finite.size
        if np.all(np.diff(edges) > 0):  # bins exist (not so at the limits of float64)
            assert counts.tolist() == ref_histogram(held, edges.tolist())


# --- RewardStats ----------------------------------------------------------------------------------

def test_reward_stats_window_counters_and_flags():
    """The window keeps the last values; nil, NaN/Inf and non-numbers are counted, not stored."""
    stats, flags = rs.RewardStats(window=4), {}
    stats.observe([[0, "f", [1.0, 2.0, None]], [1, "f", [3.0, NAN, INF, "x", 4.0, 5.0]]], flags)
    f = stats.summary()["functions"]["f"]
    assert (f["count"], f["samples"], f["missing"], f["non_finite"]) == (4, 5, 1, 2)
    assert (f["min"], f["max"], f["mean"]) == (2.0, 5.0, 3.5)
    assert flags == {"wrong_type": 1, "nan": 1, "inf": 1}
    assert stats.summary(window=2)["functions"]["f"]["mean"] == 4.5
    assert sum(f["histogram"]["counts"]) == 4
    assert len(f["histogram"]["edges"]) == rs.DEFAULT_BINS + 1


def test_reward_stats_emas_are_over_step_means():
    """EMAs fold one mean per step (alphas 2/11, 2/101), the open step included."""
    stats = rs.RewardStats()
    stats.observe([[0, "f", [0.0, 2.0]], [0, "f", [4.0]], [1, "f", [10.0]], [2, "f", [1.0, 3.0]]])
    f = stats.summary()["functions"]["f"]
    means = [2.0, 10.0, 2.0]
    assert f["ema_short"] == pytest.approx(ref_ema(means, rs.ALPHA_SHORT))
    assert f["ema_long"] == pytest.approx(ref_ema(means, rs.ALPHA_LONG))
    assert f["last_step"] == 2


def test_reward_stats_aggregates_and_function_limit():
    """total_mean/total_std/sum are over the functions holding values; extra names are dropped."""
    stats = rs.RewardStats(max_functions=2)
    stats.observe([[0, "a", [1.0, 3.0]], [0, "b", [4.0, 4.0]], [0, "c", [9.0]], [0, "d", []]])
    summary = stats.summary()
    assert sorted(summary["functions"]) == ["a", "b"] and summary["dropped_entries"] == 2
    assert (summary["total_mean"], summary["total_std"], summary["sum"]) == (3.0, 0.5, 6.0)
    empty = rs.RewardStats().summary()
    assert empty["functions"] == {} and math.isnan(empty["total_mean"])


# --- through the collector ------------------------------------------------------------------------

def _state_with_rewards() -> CollectorState:
    state = CollectorState(StateConfig(run_id="r"))
    keys = ["reward_fn/fmt/calls", "reward_fn/fmt/errors", "reward_fn/fmt/seconds", "rewards/fmt"]
    rows = [[1, 0, 0.002, 0.5], [3, 1, 0.006, 1.0]]
    batch = wire.envelope(Kind.BATCH, "r", 0, 1, seq=1, t=1.0, step=1,
                          blocks=[[keys, [0, 1], [1.0, 1.0], rows]], samples=[],
                          rv=[[0, "fmt", [0.0, 1.0]], [1, "fmt", [1.0, 1.0, None, "bad"]]])
    state.handle(wire.decode(wire.encode(batch)), b"id", 2.0)
    return state


def test_rewards_question_has_stats_execution_and_alerts():
    """``rewards`` answers per-sample stats, calls/errors/avg_time_ms and the reward alerts."""
    state = _state_with_rewards()
    answer = state.answer("rewards", {"n": 5})
    fmt = answer["functions"]["fmt"]
    assert (fmt["count"], fmt["mean"], fmt["missing"]) == (4, 0.75, 1)
    assert (fmt["calls"], fmt["errors"]) == (3, 1)
    assert fmt["avg_time_ms"] == pytest.approx(1000 * 0.008 / 3)
    assert answer["total_mean"] == 0.75 and answer["sum"] == 0.75
    assert set(answer["alert_counts"]) == {"OUTLIER", "DROP", "SPIKE", "FLATLINE", "NEGATIVE"}
    assert state.flagged_by_reason["wrong_type"] == 1
    assert wire.decode(wire.encode(wire.envelope(Kind.RESULT, "r", -1, 0, id=1, result=answer)))
    assert "error" in state.answer("rewards", {"window": -1})


def test_snapshot_exports_reward_families_that_pass_promtool():
    """The snapshot's ``rewards`` extra becomes rlmon_reward_* families; promtool is silent."""
    from prometheus_client import generate_latest

    from exporters.prometheus import make_registry
    from tests.components import require_binary

    snapshot = _state_with_rewards().snapshot(3.0)
    text = generate_latest(make_registry(lambda: snapshot, process_metrics=False)).decode()
    assert 'rlmon_reward_stat{fn="fmt",stat="mean"} 0.75' in text
    assert 'rlmon_reward_values_skipped_total{fn="fmt",reason="missing"} 1.0' in text
    assert "rlmon_reward_total_mean 0.75" in text and "rlmon_reward_sum_of_means 0.75" in text
    promtool = require_binary("promtool", "scripts/setup.sh installs Debian's prometheus package")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_reports_include_reward_statistics():
    """The JSON report, the Markdown report and monitoring_data.json carry the statistics."""
    from exporters.monitoring_data import build_monitoring_data
    from exporters.reports import build_json_report, render_markdown

    snapshot = _state_with_rewards().snapshot(3.0, with_history=True)
    assert build_json_report(snapshot)["reward_statistics"]["functions"]["fmt"]["count"] == 4
    assert build_monitoring_data(snapshot)["reward_statistics"]["total_mean"] == 0.75
    markdown = render_markdown(snapshot)
    assert "## Reward Functions" in markdown and "| fmt | 0.7500" in markdown


def test_console_summary_has_the_guides_layout():
    """format_summary prints the guide's block for each function and one line per alert."""
    from rlmon.seed.grpo import format_summary

    answer = _state_with_rewards().answer("rewards")
    alert = {"step": 50, "message": "OUTLIER: distance from the mean 5.2 above 3 (rewards/fmt)"}
    text = format_summary(answer, 100, [alert])
    lines = text.splitlines()
    assert lines[:3] == ["=" * 80, "Reward Monitoring Summary (Step 100)", "=" * 80]
    assert lines[4:12] == ["fmt:", "  Mean: 0.7500 ± 0.4330", "  Range: [0.0000, 1.0000]",
                           "  Median: 1.0000", "  Percentiles: P25=0.7500, P75=1.0000, P90=1.0000",
                           lines[9], "  Distribution: 75.0% positive, 0.0% negative, 25.0% zero",
                           "  Samples: 4"]
    assert lines[9].startswith("  EMAs: Short=") and ", Long=" in lines[9]
    assert lines[-2] == f"⚠️  Step 50: {alert['message']}" and lines[-1] == "=" * 80
