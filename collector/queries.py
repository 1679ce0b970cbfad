"""Answers to QUERY messages, computed from the collector's state (read-only).

A rank's ``Monitor.query(q, **args)`` (and the seed-compatible analyzers built on it) arrive here
through :meth:`collector.state.CollectorState.handle`; :func:`answer` returns a msgpack-able map
that goes back to the asking identity in a RESULT message. Questions:

``alerts``       counts by severity, total, and the ``n`` most recent alerts (default 50)
``comparisons``  the forgetting probe's summary (the seed's ``SampleComparator``)
``metrics``      per metric (or only ``name``): window statistics and the last ``n`` points
                 (default 100) of the cross-rank mean series
``ppo``          the seed's ``PPOMetricsTracker`` figures
``rewards``      the GRPO seed's per-sample reward statistics per function (with histogram,
                 calls, errors, average time), their aggregates and the reward alerts
``stop``         the coordinated stop state, or ``{"stopped": False}``

An unknown question or a bad argument is answered ``{"error": "..."}``; nothing here raises for
bad input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from collector.state import CollectorState

#: Most points or alerts one answer carries (keeps a RESULT frame far below the frame limit).
MAX_POINTS = 10_000
POLICY_LOSS = ("policy_loss", "pg_loss")
VALUE_LOSS = ("value_loss", "vf_loss")
CLIP_FRACTION = ("clip_fraction", "clipfrac")
ADVANTAGE = ("advantage_mean", "advantages", "advantage")
GRAD_NORM = ("grad_norm",)
REWARD_ALERT_TYPES = ("OUTLIER", "DROP", "SPIKE", "FLATLINE", "NEGATIVE")
"""Alert types of the per-reward-function anomaly detectors (the GRPO seed's)."""


def answer(state: CollectorState, question: str, args: Any) -> dict[str, Any]:
    """The answer to ``question`` with ``args`` (a map, or None) from ``state``."""
    handler = _QUESTIONS.get(question)
    if handler is None:
        return {"error": f"unknown query {question!r}; ask one of {sorted(_QUESTIONS)}"}
    try:
        return handler(state, args if isinstance(args, dict) else {})
    except (TypeError, ValueError) as exc:
        return {"error": f"bad arguments for {question!r}: {exc}"[:300]}


def series_of(state: CollectorState, name: str) -> int | None:
    """The store series describing ``name``: the cross-rank mean, else the lowest rank's."""
    from collector.state import AGGREGATE_RANK

    series = state.store.find(name, AGGREGATE_RANK)
    if series is not None:
        return series
    ranks = sorted(rank for metric, rank in state.store.keys() if metric == name and rank >= 0)
    return state.store.find(name, ranks[0]) if ranks else None


def stats_map(state: CollectorState, series: int | None, window: int | None = None) -> dict[str, float]:
    """Window statistics of one series as plain floats (NaN where undefined; count 0 if none)."""
    if series is None:
        return {"count": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan,
                "slope": math.nan, "last": math.nan}
    stats = state.store.window_stats(series, window)
    return {f.name: (int(getattr(stats, f.name)) if f.name == "count" else float(getattr(stats, f.name)))
            for f in dataclasses.fields(stats)}


def _limit(args: dict[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer")
    return min(value, MAX_POINTS)


def _alerts(state: CollectorState, args: dict[str, Any]) -> dict[str, Any]:
    n = _limit(args, "n", 50)
    counts = {"INFO": 0, "WARNING": 0, "CRITICAL": 0}
    for (_, severity), count in state.alert_counts.items():
        counts[severity] = counts.get(severity, 0) + count
    recent = list(state.alerts)[-n:] if n else []
    return {"counts": counts, "total": sum(counts.values()),
            "recent": [_alert_map(a) for a in recent]}


def _comparisons(state: CollectorState, args: dict[str, Any]) -> dict[str, Any]:
    summary = dict(state.comparator.get_comparison_summary())
    summary["threshold"] = state.comparator.degradation_threshold
    if args.get("similarities"):
        summary["similarities"] = state.comparator.similarity_series()[-MAX_POINTS:].tolist()
    return summary


def _metrics(state: CollectorState, args: dict[str, Any]) -> dict[str, Any]:
    n = _limit(args, "n", 100)
    window = args.get("window")
    if window is not None:
        window = _limit(args, "window", 0) or None
    name = args.get("name")
    names = sorted({m for m, rank in state.store.keys() if rank >= 0})
    if name is not None:
        names = [m for m in names if m == str(name)]
    result = {}
    for metric in names:
        series = series_of(state, metric)
        steps, values = (state.store.history(series, n) if series is not None and n
                         else (np.empty(0, np.int64), np.empty(0)))
        result[metric] = {"stats": stats_map(state, series, window), "steps": steps.tolist(),
                          "values": values.tolist()}
    return {"metrics": result}


def _ppo(state: CollectorState, args: dict[str, Any]) -> dict[str, Any]:
    def stats(names: tuple[str, ...]) -> dict[str, float]:
        return stats_map(state, _first(state, names))

    policy, value = stats(POLICY_LOSS), stats(VALUE_LOSS)
    clip = stats(CLIP_FRACTION)
    return {"clip_fraction": clip, "advantage": stats(ADVANTAGE),
            "advantage_std": stats(("advantage_std",)), "grad_norm": stats(GRAD_NORM),
            "policy_loss": policy, "value_loss": value,
            "policy_loss_trend": policy["slope"] if policy["count"] >= 2 else None,
            "value_loss_trend": value["slope"] if value["count"] >= 2 else None,
            "avg_clip_fraction": clip["mean"] if clip["count"] else 0.0,
            "num_policy_updates": policy["count"]}


def _first(state: CollectorState, names: tuple[str, ...]) -> int | None:
    for name in names:
        series = series_of(state, name)
        if series is not None:
            return series
    return None


def _stop(state: CollectorState, args: dict[str, Any]) -> dict[str, Any]:
    stop = state.stop.state
    if stop is None:
        return {"stopped": False}
    return {"stopped": True, "generation": stop.generation, "stop_at_step": stop.stop_at_step,
            "reason": stop.reason, "severity": stop.severity, "decided_at": stop.decided_at,
            "source": stop.source}


def _rewards(state: CollectorState, args: dict[str, Any]) -> dict[str, Any]:
    n = _limit(args, "n", 100)
    window = _limit(args, "window", 0) or None
    summary = state.reward_stats.summary(window)
    names = sorted(set(summary["functions"]) | _timed_functions(state))
    functions = {name: {**summary["functions"].get(name, _NO_VALUES),
                        **reward_execution(state, name)} for name in names}
    counts = dict.fromkeys(REWARD_ALERT_TYPES, 0)
    for (kind, _), count in state.alert_counts.items():
        if kind in counts:
            counts[kind] += count
    alerts = [a for a in state.alerts if a.type in REWARD_ALERT_TYPES][-n:] if n else []
    return {"functions": functions, "total_mean": summary["total_mean"],
            "total_std": summary["total_std"], "sum": summary["sum"],
            "window": summary["window"], "alert_counts": counts,
            "alerts_total": sum(counts.values()), "alerts": [_alert_map(a) for a in alerts]}


_NO_VALUES: dict[str, Any] = {
    **dict.fromkeys(("mean", "std", "min", "max", "median", "p25", "p75", "p90", "ema_short",
                     "ema_long", "positive_fraction", "negative_fraction", "zero_fraction"),
                    math.nan),
    "count": 0, "samples": 0, "non_finite": 0, "missing": 0, "last_step": -1,
    "histogram": {"edges": [], "counts": []}}


def _timed_functions(state: CollectorState) -> set[str]:
    """Names of the wrapped reward functions whose ``reward_fn/<name>/calls`` are in the store."""
    return {metric[len("reward_fn/"):-len("/calls")] for metric, rank in state.store.keys()
            if rank >= 0 and metric.startswith("reward_fn/") and metric.endswith("/calls")}


def reward_execution(state: CollectorState, name: str) -> dict[str, Any]:
    """``calls`` and ``errors`` (summed over the ranks' cumulative counts) and ``avg_time_ms``
    (seconds over calls, per call, over the points the store holds; NaN without calls) of the
    wrapped reward function ``name``."""
    calls = errors = covered = 0
    seconds = 0.0
    for rank in sorted(state.ranks.ranks):
        rank_calls, rank_covered, rank_seconds = _rank_timing(state, name, rank)
        calls += rank_calls
        covered += rank_covered
        seconds += rank_seconds
        series = state.store.find(f"reward_fn/{name}/errors", rank)
        errors += _as_count(state.store.last(series)[1]) if series is not None else 0
    return {"calls": calls, "errors": errors,
            "avg_time_ms": 1000.0 * seconds / covered if covered else math.nan}


def _rank_timing(state: CollectorState, name: str, rank: int) -> tuple[int, int, float]:
    """One rank's cumulative calls, and the calls and seconds of the steps the store holds."""
    calls_series = state.store.find(f"reward_fn/{name}/calls", rank)
    seconds_series = state.store.find(f"reward_fn/{name}/seconds", rank)
    if calls_series is None or seconds_series is None:
        return 0, 0, 0.0
    _, calls = state.store.history(calls_series)
    _, seconds = state.store.history(seconds_series)
    last = _as_count(calls[-1]) if calls.size else 0
    if not calls.size or calls.size != seconds.size:
        return last, 0, 0.0
    if state.store.count(calls_series) < state.store.capacity:  # the whole run is held
        return last, last, float(np.nansum(seconds))
    return last, max(last - _as_count(calls[0]), 0), float(np.nansum(seconds[1:]))


def _as_count(value: float) -> int:
    return int(value) if math.isfinite(value) and value >= 0 else 0


def _alert_map(a: Any) -> dict[str, Any]:
    """One alert as a plain map (the ``alerts`` and ``rewards`` answers)."""
    return {"step": a.step, "severity": a.severity, "type": a.type, "metric": a.metric,
            "value": float(a.value), "threshold": float(a.threshold), "message": a.message,
            "time": float(a.time), "rank": a.rank}


_QUESTIONS: dict[str, Callable[[CollectorState, dict[str, Any]], dict[str, Any]]] = {
    "alerts": _alerts, "comparisons": _comparisons, "metrics": _metrics, "ppo": _ppo,
    "rewards": _rewards, "stop": _stop,
}
