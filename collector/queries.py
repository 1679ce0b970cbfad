"""Answers to QUERY messages, computed from the collector's state (read-only).

A rank's ``Monitor.query(q, **args)`` (and the seed-compatible analyzers built on it) arrive here
through :meth:`collector.state.CollectorState.handle`; :func:`answer` returns a msgpack-able map
that goes back to the asking identity in a RESULT message. Questions:

``alerts``       counts by severity, total, and the ``n`` most recent alerts (default 50)
``comparisons``  the forgetting probe's summary (the seed's ``SampleComparator``)
``metrics``      per metric (or only ``name``): window statistics and the last ``n`` points
                 (default 100) of the cross-rank mean series
``ppo``          the seed's ``PPOMetricsTracker`` figures
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
            "recent": [{"step": a.step, "severity": a.severity, "type": a.type, "metric": a.metric,
                        "value": float(a.value), "threshold": float(a.threshold),
                        "message": a.message, "time": float(a.time), "rank": a.rank}
                       for a in recent]}


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


_QUESTIONS: dict[str, Callable[[CollectorState, dict[str, Any]], dict[str, Any]]] = {
    "alerts": _alerts, "comparisons": _comparisons, "metrics": _metrics, "ppo": _ppo, "stop": _stop,
}
