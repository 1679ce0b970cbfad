"""``monitoring_data.json``: the GRPO seed's complete data export, for offline analysis.

The seed's offline example works on it unchanged::

    import json
    from exporters import plots as viz
    data = json.load(open("monitoring_data.json"))
    viz.plot_reward_history(data["history"], save_path="analysis.png", steps=data["steps"])

Schema (``"schema": "rlmon.monitoring_data/1"``; strict JSON, NaN and ±Inf written as ``null``;
times are Unix seconds; steps are the training loop's own step numbers):

* ``run`` — ``run_id``, ``world_size``, ``started_at``, ``taken_at``, ``generated_at``,
  ``duration_seconds``, ``finished``, ``total_iterations`` (largest step reached + 1),
  ``kl_threshold``, ``stop`` (``generation``, ``stop_at_step``, ``reason``, ``severity``,
  ``source``, ``decided_at``, ``acked_ranks``; ``null`` when no stop was decided).
* ``steps`` — the step axis of ``history``: every step any reward function has a value at,
  ascending.
* ``history`` — ``{fn: [value or null, ...]}``, one list per reward function, aligned with
  ``steps`` (``null`` where that function has no value). A reward function is a metric named
  ``rewards/<fn>`` and is keyed by ``<fn>``; a run that logs none gets its total ``reward``
  under the key ``"reward"``. Values are the cross-rank mean at each step.
* ``statistics`` — ``{fn: {...}}`` for the same keys: ``count``, ``mean``, ``std``, ``min``,
  ``max``, ``median``, ``p25``, ``p75``, ``p90``, ``ema_short``, ``ema_long``, ``last``,
  ``trend`` (least-squares slope, reward units per step), ``trend_direction`` (``up``/``down``/
  ``flat``, the Markdown report's rule; ``null`` under two points) and the seed's distribution as
  ``positive_fraction``/``negative_fraction``/``zero_fraction`` — computed over every rank's
  per-step means (the collector never sees single completions' rewards).
* ``metrics`` — ``{name: {"steps": [...], "values": [...], "statistics": {...same keys...},
  "by_rank": {"0": {"steps": [...], "values": [...]}, ...}}}`` for every metric. ``values`` is the
  cross-rank mean series; ``by_rank`` is omitted above :data:`MAX_RANKS_BY_RANK` ranks.
* ``alerts`` — every alert the snapshot holds, oldest first: ``step``, ``severity``, ``type``,
  ``metric``, ``value``, ``threshold``, ``message``, ``time``, ``rank`` (``null`` when not about
  one rank). ``alert_counts`` — ``{"by_severity": {sev: n}, "by_type": {type: {sev: n}}}``.
* ``ranks`` — ``{"<rank>": {local_rank, host, pid, incarnation, last_step, last_seen,
  batches_received, scalars_received, dropped, closed}}``.
* ``samples`` — the recent samples: ``step``, ``rank``, ``prompt``, ``response``, ``reward``.
* ``sample_comparisons`` — the seed's comparator summary (see :mod:`exporters.reports`).
* ``reward_statistics`` — the statistics of the individual values the wrapped reward functions
  returned (``functions``: per function ``count``, ``samples``, ``mean``, ``std``, ``min``,
  ``max``, ``median``, ``p25``, ``p75``, ``p90``, ``ema_short``/``ema_long`` over step means, the
  three sign fractions, ``non_finite``, ``missing``, ``last_step`` and ``histogram`` with
  ``edges``/``counts``; plus ``total_mean``, ``total_std``, ``sum``), as in the JSON report.

The file is written atomically and compactly (one line); it needs no optional dependency.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from collector.snapshot import Alert, CollectorSnapshot, MetricSnapshot, RankSnapshot
from exporters.atomic import atomic_write_text
from exporters.reports import (_jsonable, alert_totals, reward_statistics, sample_comparisons,
                               total_iterations, trend_arrow)

FILE_NAME = "monitoring_data.json"
"""File name of the export (the GRPO seed's)."""

SCHEMA = "rlmon.monitoring_data/1"
"""Value of the top-level ``schema`` key; bumped when a key changes meaning or goes away."""

REWARD_PREFIX = "rewards/"
"""Metrics named ``rewards/<fn>`` are the reward functions of ``history`` and the reward plots."""

MAX_RANKS_BY_RANK = 64
"""Above this many ranks, ``metrics[*].by_rank`` is left out to keep the file small."""

TOP_LEVEL_KEYS = ("schema", "run", "steps", "history", "statistics", "metrics", "alerts",
                  "alert_counts", "ranks", "samples", "sample_comparisons", "reward_statistics")
"""Every key of the export, in file order."""

_DIRECTIONS = {"↑": "up", "↓": "down", "→": "flat"}


def reward_functions(snapshot: CollectorSnapshot, *, fallback: bool = True
                     ) -> dict[str, MetricSnapshot]:
    """``{fn: metric}`` for the metrics named ``rewards/<fn>`` that have history, sorted by name.

    With ``fallback`` and no such metric, the total ``reward`` (when it has history) as
    ``{"reward": metric}``.
    """
    found = {name[len(REWARD_PREFIX):]: m for name, m in sorted(snapshot.metrics.items())
             if name.startswith(REWARD_PREFIX) and len(name) > len(REWARD_PREFIX) and len(m.steps)}
    reward = snapshot.metrics.get("reward")
    if not found and fallback and reward is not None and len(reward.steps):
        found = {"reward": reward}
    return found


def aligned_history(metrics: Mapping[str, MetricSnapshot]
                    ) -> tuple[list[int], dict[str, list[float]]]:
    """The metrics' cross-rank mean series on one step axis: ``(steps, {key: values})``, NaN where
    a metric has no value at a step."""
    if not metrics:
        return [], {}
    steps = np.unique(np.concatenate([np.asarray(m.steps, dtype=np.int64)
                                      for m in metrics.values()]))
    history = {}
    for key, metric in metrics.items():
        column = np.full(steps.size, np.nan)
        column[np.searchsorted(steps, metric.steps)] = metric.values
        history[key] = column.tolist()
    return steps.tolist(), history


def build_monitoring_data(snapshot: CollectorSnapshot, *,
                          generated_at: float | None = None) -> dict[str, Any]:
    """The export as plain, strict-JSON-ready data (non-finite floats already ``None``)."""
    when = time.time() if generated_at is None else generated_at
    functions = reward_functions(snapshot)
    steps, history = aligned_history(functions)
    with_ranks = len(snapshot.ranks) <= MAX_RANKS_BY_RANK
    return _jsonable({
        "schema": SCHEMA,
        "run": _run(snapshot, when),
        "steps": steps,
        "history": history,
        "statistics": {fn: series_statistics(m) for fn, m in functions.items()},
        "metrics": {name: _metric(m, with_ranks) for name, m in sorted(snapshot.metrics.items())},
        "alerts": [_alert(a) for a in snapshot.alerts],
        "alert_counts": _alert_counts(snapshot),
        "ranks": {str(r.rank): _rank(r) for r in sorted(snapshot.ranks.values(),
                                                         key=lambda r: r.rank)},
        "samples": [{"step": s.step, "rank": s.rank, "prompt": s.prompt,
                     "response": s.response, "reward": s.reward}
                    for s in snapshot.recent_samples],
        "sample_comparisons": sample_comparisons(snapshot),
        "reward_statistics": reward_statistics(snapshot),
    })


def write_monitoring_data(snapshot: CollectorSnapshot, path: str | Path, *,
                          generated_at: float | None = None) -> Path:
    """Write the export to ``path`` atomically; return the path. The parent directory must exist;
    on failure the previous file is left as it was and the exception propagates."""
    data = build_monitoring_data(snapshot, generated_at=generated_at)
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return atomic_write_text(path, text + "\n")


def series_statistics(metric: MetricSnapshot) -> dict[str, Any]:
    """The window statistics of ``metric`` plus the seed's ``trend`` and distribution fractions."""
    stats = asdict(metric.window)
    stats["trend"] = stats.pop("slope")
    stats["trend_direction"] = _DIRECTIONS.get(trend_arrow(metric.window, metric.steps))
    values = _rank_values(metric)
    total = values.size
    for key, mask in (("positive_fraction", values > 0), ("negative_fraction", values < 0),
                      ("zero_fraction", values == 0)):
        stats[key] = float(mask.sum()) / total if total else math.nan
    return stats


def _rank_values(metric: MetricSnapshot) -> np.ndarray:
    """Every finite per-rank value (the mean series when there is no per-rank history)."""
    pieces = [np.asarray(v, dtype=np.float64) for _, v in metric.history_by_rank.values()]
    values = np.concatenate(pieces) if pieces else np.asarray(metric.values, dtype=np.float64)
    return values[np.isfinite(values)]


def _run(snap: CollectorSnapshot, generated_at: float) -> dict[str, Any]:
    stop = snap.stop
    return {"run_id": snap.run_id, "world_size": snap.world_size, "started_at": snap.started_at,
            "taken_at": snap.taken_at, "generated_at": generated_at,
            "duration_seconds": snap.taken_at - snap.started_at, "finished": snap.finished,
            "total_iterations": total_iterations(snap), "kl_threshold": snap.kl_threshold,
            "stop": None if stop is None else {
                "generation": stop.generation, "stop_at_step": stop.stop_at_step,
                "reason": stop.reason, "severity": stop.severity, "source": stop.source,
                "decided_at": stop.decided_at, "acked_ranks": list(stop.acked_ranks)}}


def _metric(metric: MetricSnapshot, with_ranks: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": np.asarray(metric.steps).tolist(),
                           "values": np.asarray(metric.values, dtype=np.float64).tolist(),
                           "statistics": series_statistics(metric)}
    if with_ranks:
        out["by_rank"] = {str(rank): {"steps": np.asarray(s).tolist(),
                                      "values": np.asarray(v, dtype=np.float64).tolist()}
                          for rank, (s, v) in sorted(metric.history_by_rank.items())}
    return out


def _alert(alert: Alert) -> dict[str, Any]:
    return {"step": alert.step, "severity": alert.severity, "type": alert.type,
            "metric": alert.metric, "value": alert.value, "threshold": alert.threshold,
            "message": alert.message, "time": alert.time,
            "rank": alert.rank if alert.rank >= 0 else None}


def _alert_counts(snap: CollectorSnapshot) -> dict[str, Any]:
    by_type: dict[str, dict[str, int]] = defaultdict(dict)
    if snap.alert_counts:
        for (kind, severity), count in sorted(snap.alert_counts.items()):
            by_type[kind][severity] = by_type[kind].get(severity, 0) + int(count)
    else:
        for alert in snap.alerts:
            by_type[alert.type][alert.severity] = by_type[alert.type].get(alert.severity, 0) + 1
    return {"by_severity": alert_totals(snap), "by_type": dict(by_type)}


def _rank(rank: RankSnapshot) -> dict[str, Any]:
    return {"local_rank": rank.local_rank, "host": rank.host, "pid": rank.pid,
            "incarnation": rank.incarnation, "last_step": rank.last_step,
            "last_seen": rank.last_seen, "batches_received": rank.batches_received,
            "scalars_received": rank.scalars_received,
            "dropped": dict(sorted(rank.dropped_by_reason.items())), "closed": rank.closed}
