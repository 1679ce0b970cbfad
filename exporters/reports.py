"""The seed's end-of-run reports, ``training_report.md`` and ``training_report.json``.

Both files are written atomically (temp file + rename, see :mod:`exporters.atomic`), so a reader
or a crash never sees half a report. The JSON follows the seed's schema — ``summary``, ``metrics``,
``alerts``, ``sample_comparisons`` with the seed's keys and types — and only adds keys to it
(``ranks``, ``collector``, and extras inside each object). Definitions used by both reports:

* **Total iterations** is the largest step any rank reached, plus one (steps count from 0, as in
  the seeds' loops); 0 before any step. Metric histories are bounded ring buffers, so counting
  stored points would undercount long runs.
* **Early stopped** is true when a stop state was decided (a ``StopSnapshot`` exists).
* **Trend**: the JSON ``trend`` is the least-squares slope of the cross-rank mean series against
  step (metric units per step), as in the seed. The Markdown arrow is ↑ or ↓ when the fitted change
  across the window, ``|slope| × (last step − first step)``, is at least one standard deviation of
  the series *and* the slope is significant (t-statistic ≥ 2, derived from the window's count, std
  and slope assuming evenly spaced steps); → otherwise; – with fewer than two finite points. A clean
  linear ramp has a fitted change of ~3.5 standard deviations; pure noise shows an arrow in ~8 % of
  10-point windows and < 0.5 % of 100-point ones.
* **NaN and ±Inf** become ``null`` in JSON (the file is always strict JSON) and ``NaN``/``inf`` in
  Markdown.
* **JSON extras**: ``summary`` adds ``stop`` (generation, stop_at_step, reason, severity,
  source, decided_at, acked_ranks — or null), ``run_id``, ``world_size``, ``started_at``,
  ``snapshot_taken_at``, ``duration_seconds``, ``finished``, ``alert_counts`` (per severity);
  each metric adds the window stats, ``trend_direction`` (``up``/``down``/``flat``, null when
  undefined), ``aggregate``/``aggregate_step`` (last completed step, null before one); each alert
  adds ``type``, ``threshold``, ``time`` and ``rank`` (null when not about one rank). Times are
  ISO 8601 with a UTC offset. ``alerts`` lists the alerts the snapshot holds (the collector keeps
  the most recent ones; ``alerts.jsonl`` has them all).
* **Markdown sections**: Summary, Metrics, Quality Alerts (counts per severity, then the last
  :data:`RECENT_ALERTS` alerts), Sample Comparisons (comparator summary, last :data:`RECENT_SAMPLES`
  samples), PPO Mechanics (only when metrics named like :data:`PPO_METRIC_HINTS` exist), Ranks,
  Collector Health.
* **Reward statistics** (JSON ``reward_statistics``, Markdown "Reward Functions") are over the
  individual values the wrapped reward functions returned, from ``snapshot.extra["rewards"]``
  (:mod:`collector.reward_stats`): per function the window statistics, sign fractions, EMAs of the
  step means, counts and histogram, plus ``total_mean``, ``total_std`` and ``sum``; empty
  ``functions`` when none were received.
* **Sample comparisons** come from ``snapshot.extra["sample_comparisons"]`` (a mapping with the
  seed's four keys) when the collector ran a sample comparator; without one they are
  ``num_comparisons: 0``, ``avg_similarity: null``, ``degraded_count: 0``,
  ``catastrophic_forgetting: false``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from collector.snapshot import Alert, CollectorSnapshot, MetricSnapshot, RankSnapshot, SeriesStats
from exporters.atomic import atomic_write_text

MARKDOWN_REPORT_NAME = "training_report.md"
"""File name of the Markdown report (the seed's)."""

JSON_REPORT_NAME = "training_report.json"
"""File name of the JSON report (the seed's)."""

SEVERITIES = ("INFO", "WARNING", "CRITICAL")
"""Alert severities, lowest first."""

RECENT_ALERTS = 20
"""How many of the most recent alerts the Markdown table lists (the JSON lists every one held)."""

RECENT_SAMPLES = 5
"""How many recent samples the Markdown report shows."""

PPO_METRIC_HINTS = ("policy_loss", "value_loss", "clip", "advantage", "grad_norm", "entropy",
                    "approx_kl", "ratio")
"""Substrings that put a metric in the Markdown report's ``PPO Mechanics`` section."""

_SAMPLE_DEFAULTS = {"num_comparisons": 0, "avg_similarity": None, "degraded_count": 0,
                    "catastrophic_forgetting": False}
_STAT_FIELDS = ("median", "p25", "p75", "p90", "ema_short", "ema_long", "last")


# --- public API -----------------------------------------------------------------------------------

def write_markdown_report(snapshot: CollectorSnapshot, path: str | Path, *,
                          generated_at: float | None = None) -> Path:
    """Write the Markdown report for ``snapshot`` to ``path`` atomically; return the path.

    ``generated_at`` (Unix seconds, default now) is stamped in the summary. The parent directory
    must exist; on failure the previous file is left as it was and the exception propagates.
    """
    return atomic_write_text(path, render_markdown(snapshot, generated_at=generated_at))


def write_json_report(snapshot: CollectorSnapshot, path: str | Path, *,
                      generated_at: float | None = None) -> Path:
    """Write the JSON report for ``snapshot`` to ``path`` atomically; return the path.

    Same failure behaviour as :func:`write_markdown_report`. The file is strict JSON (no NaN).
    """
    text = json.dumps(build_json_report(snapshot, generated_at=generated_at), indent=2,
                      ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def write_final_reports(snapshot: CollectorSnapshot, out_dir: str | Path, *,
                        generated_at: float | None = None) -> list[Path]:
    """Write ``training_report.md`` and ``training_report.json`` into ``out_dir`` (created if
    missing); return their paths, Markdown first. Each file is replaced whole or not at all."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    when = time.time() if generated_at is None else generated_at
    return [write_markdown_report(snapshot, directory / MARKDOWN_REPORT_NAME, generated_at=when),
            write_json_report(snapshot, directory / JSON_REPORT_NAME, generated_at=when)]


def total_iterations(snapshot: CollectorSnapshot) -> int:
    """The largest step any rank (or any metric) reached, plus one; 0 before any step."""
    steps = [rank.last_step for rank in snapshot.ranks.values()]
    steps += [int(m.steps[-1]) for m in snapshot.metrics.values() if len(m.steps)]
    return max(steps, default=-1) + 1


def trend_arrow(stats: SeriesStats, steps: Any = None) -> str:
    """``↑``, ``↓`` or ``→`` for a series' window stats (``–`` without two finite points).

    ``steps`` is the series' step array, used for the window's span; without it the span is taken
    as ``count - 1`` steps. An arrow needs the fitted change across the window to reach one
    standard deviation of the series and the slope's t-statistic to reach 2 (see the module
    docstring).
    """
    n, slope, std = stats.count, stats.slope, stats.std
    if n < 2 or not math.isfinite(slope):
        return "–"
    span = _span(n, steps)
    change = abs(slope) * span
    if not (math.isfinite(std) and std > 1e-12 * max(1.0, abs(stats.mean))) or change < std:
        return "→"
    return ("↑" if slope > 0 else "↓") if _slope_t_squared(n, slope * span, std) >= 4 else "→"


def _slope_t_squared(n: int, change: float, std: float) -> float:
    """Squared t-statistic of a least-squares slope, from the fitted ``change`` across the window
    and the series' population ``std``, assuming evenly spaced steps."""
    r2 = min(1.0, change * change * (n + 1) / (12.0 * (n - 1)) / (std * std))
    return math.inf if r2 >= 1.0 else (n - 2) * r2 / (1.0 - r2)


def alert_totals(snapshot: CollectorSnapshot) -> dict[str, int]:
    """Alerts per severity: from ``alert_counts`` (keys ``(type, severity)``), else by counting
    ``alerts``. Every severity in :data:`SEVERITIES` is present."""
    totals = Counter({severity: 0 for severity in SEVERITIES})
    if snapshot.alert_counts:
        for (_type, severity), count in snapshot.alert_counts.items():
            totals[severity] += int(count)
    else:
        totals.update(alert.severity for alert in snapshot.alerts)
    return dict(totals)


def sample_comparisons(snapshot: CollectorSnapshot) -> dict[str, Any]:
    """The seed's ``sample_comparisons`` object, from ``extra`` or the no-comparator defaults."""
    found = snapshot.extra.get("sample_comparisons")
    merged = dict(_SAMPLE_DEFAULTS)
    if isinstance(found, Mapping):
        merged.update(found)
    return _jsonable(merged)


def reward_statistics(snapshot: CollectorSnapshot) -> dict[str, Any]:
    """The per-sample reward statistics from ``extra["rewards"]`` (``functions`` empty and the
    aggregates NaN when no reward values were received)."""
    found = snapshot.extra.get("rewards")
    if not isinstance(found, Mapping):
        return {"functions": {}, "total_mean": math.nan, "total_std": math.nan, "sum": math.nan}
    return {"functions": dict(found.get("functions", {})),
            **{key: found.get(key, math.nan) for key in ("total_mean", "total_std", "sum")}}


# --- JSON -----------------------------------------------------------------------------------------

def build_json_report(snapshot: CollectorSnapshot, *,
                      generated_at: float | None = None) -> dict[str, Any]:
    """The JSON report as plain data (NaN already replaced by ``None``)."""
    when = time.time() if generated_at is None else generated_at
    return _jsonable({
        "summary": _json_summary(snapshot, when),
        "metrics": {name: _json_metric(m) for name, m in sorted(snapshot.metrics.items())},
        "alerts": [_json_alert(alert) for alert in snapshot.alerts],
        "sample_comparisons": sample_comparisons(snapshot),
        "reward_statistics": reward_statistics(snapshot),
        "ranks": {str(r.rank): _json_rank(r) for r in _sorted_ranks(snapshot.ranks.values())},
        "collector": _json_collector(snapshot),
    })


def _json_summary(snap: CollectorSnapshot, generated_at: float) -> dict[str, Any]:
    stop = snap.stop
    return {
        "total_iterations": total_iterations(snap),
        "early_stopped": stop is not None,
        "stop_reason": stop.reason if stop is not None else None,
        "generated_at": _iso(generated_at),
        "stop": None if stop is None else {
            "generation": stop.generation, "stop_at_step": stop.stop_at_step,
            "reason": stop.reason, "severity": stop.severity, "source": stop.source,
            "decided_at": _iso(stop.decided_at), "acked_ranks": list(stop.acked_ranks)},
        "run_id": snap.run_id,
        "world_size": snap.world_size,
        "started_at": _iso(snap.started_at),
        "snapshot_taken_at": _iso(snap.taken_at),
        "duration_seconds": snap.taken_at - snap.started_at,
        "finished": snap.finished,
        "alert_counts": alert_totals(snap),
    }


def _json_metric(metric: MetricSnapshot) -> dict[str, Any]:
    stats = metric.window
    out: dict[str, Any] = {"mean": stats.mean, "std": stats.std, "min": stats.min,
                           "max": stats.max, "count": stats.count, "trend": stats.slope}
    out.update({name: getattr(stats, name) for name in _STAT_FIELDS})
    out["trend_direction"] = {"↑": "up", "↓": "down", "→": "flat"}.get(
        trend_arrow(stats, metric.steps))
    out["aggregate"] = dict(metric.aggregate) if metric.aggregate_step >= 0 else None
    out["aggregate_step"] = metric.aggregate_step if metric.aggregate_step >= 0 else None
    return out


def _json_alert(alert: Alert) -> dict[str, Any]:
    return {"iteration": alert.step, "severity": alert.severity, "reason": alert.message,
            "metric_name": alert.metric, "metric_value": alert.value, "type": alert.type,
            "threshold": alert.threshold, "time": _iso(alert.time),
            "rank": alert.rank if alert.rank >= 0 else None}


def _json_rank(rank: RankSnapshot) -> dict[str, Any]:
    return {"local_rank": rank.local_rank, "host": rank.host, "pid": rank.pid,
            "incarnation": rank.incarnation, "last_step": rank.last_step,
            "last_seen": _iso(rank.last_seen), "batches_received": rank.batches_received,
            "scalars_received": rank.scalars_received,
            "dropped": dict(sorted(rank.dropped_by_reason.items())),
            "dropped_total": sum(rank.dropped_by_reason.values()), "closed": rank.closed}


def _json_collector(snap: CollectorSnapshot) -> dict[str, Any]:
    return {"frames_received": dict(sorted(snap.frames_received_by_kind.items())),
            "frames_rejected": dict(sorted(snap.frames_rejected_by_reason.items())),
            "values_flagged": dict(sorted(snap.values_flagged_by_reason.items())),
            "dropped_events": _dropped_totals(snap.ranks.values()),
            "series_count": snap.series_count, "series_capacity": snap.series_capacity,
            "kl_threshold": snap.kl_threshold,
            "alerts_firing": [{"type": t, "subject": s, "severity": v} for t, s, v in snap.firing],
            "render_loop_lag_seconds": _finite_or_none(snap.extra.get("render_loop_lag_seconds")),
            "dashboards_rendered": list(snap.extra.get("dashboards_rendered", ())),
            "relayed_frames": int(snap.extra.get("relayed_frames", 0))}


def _finite_or_none(value: Any) -> float | None:
    """A number for JSON, or None when it is missing, NaN or infinite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --- Markdown -------------------------------------------------------------------------------------

def render_markdown(snapshot: CollectorSnapshot, *, generated_at: float | None = None) -> str:
    """The Markdown report as text (sections in the seed's order, then rlmon's)."""
    when = time.time() if generated_at is None else generated_at
    sections = [["# Training Report"], _md_summary(snapshot, when), _md_metrics(snapshot),
                _md_rewards(snapshot), _md_alerts(snapshot), _md_samples(snapshot), _md_ppo(snapshot),
                _md_ranks(snapshot), _md_health(snapshot)]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _md_summary(snap: CollectorSnapshot, generated_at: float) -> list[str]:
    stop = snap.stop
    lines = ["## Summary",
             f"- **Total Iterations**: {total_iterations(snap)}",
             f"- **Early Stopped**: {'Yes' if stop is not None else 'No'}",
             f"- **Stop Reason**: {_cell(stop.reason) if stop is not None else 'None'}"]
    if stop is not None:
        lines += [f"- **Stop Generation**: {stop.generation}",
                  f"- **Stop At Step**: {stop.stop_at_step}",
                  f"- **Stop Severity**: {stop.severity} (source: {_cell(stop.source)})"]
    lines += [f"- **Run ID**: {_cell(snap.run_id)}",
              f"- **World Size**: {snap.world_size}",
              f"- **Duration**: {_duration(snap.taken_at - snap.started_at)}",
              f"- **Generated At**: {_iso(generated_at)}"]
    return lines


def _md_metrics(snap: CollectorSnapshot) -> list[str]:
    return ["## Metrics", *_metric_table(snap.metrics.values())]


def _metric_table(metrics: Iterable[MetricSnapshot]) -> list[str]:
    ordered = sorted(metrics, key=lambda m: m.name)
    if not ordered:
        return ["No metrics were logged."]
    table = ["| Metric | Mean | Std | Min | Max | Trend |", "|---|---|---|---|---|---|"]
    for m in ordered:
        s = m.window
        table.append(f"| {_cell(m.name)} | {_num(s.mean)} | {_num(s.std)} | {_num(s.min)} | "
                     f"{_num(s.max)} | {trend_arrow(s, m.steps)} |")
    return table


def _md_rewards(snap: CollectorSnapshot) -> list[str]:
    stats = reward_statistics(snap)
    if not stats["functions"]:
        return []
    lines = ["## Reward Functions", "",
             f"Over each function's individual values: total mean {_num(stats['total_mean'])}, "
             f"mean std {_num(stats['total_std'])}, sum of means {_num(stats['sum'])}.", "",
             "| Function | Mean | Std | Min | Median | Max | P90 | EMA short | EMA long | "
             "Positive | Zero | Negative | Samples |", "|---" * 13 + "|"]
    for name, s in sorted(stats["functions"].items()):
        lines.append(f"| {_cell(name)} | {_num(s['mean'])} | {_num(s['std'])} | {_num(s['min'])} | "
                     f"{_num(s['median'])} | {_num(s['max'])} | {_num(s['p90'])} | "
                     f"{_num(s['ema_short'])} | {_num(s['ema_long'])} | "
                     f"{_percent(s['positive_fraction'])} | {_percent(s['zero_fraction'])} | "
                     f"{_percent(s['negative_fraction'])} | {s['samples']} |")
    return lines


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if math.isfinite(fraction) else "n/a"


def _md_alerts(snap: CollectorSnapshot) -> list[str]:
    totals = alert_totals(snap)
    lines = ["## Quality Alerts", *(f"- {sev}: {totals[sev]}" for sev in SEVERITIES)]
    extra = sorted(set(totals) - set(SEVERITIES))
    lines += [f"- {_cell(sev)}: {totals[sev]}" for sev in extra]
    recent = snap.alerts[-RECENT_ALERTS:]
    if recent:
        lines += ["", f"Most recent {len(recent)} alert(s):", "",
                  "| Step | Severity | Type | Message |", "|---|---|---|---|"]
        lines += [f"| {a.step} | {a.severity} | {_cell(a.type)} | {_cell(a.message)} |"
                  for a in recent]
    return lines


def _md_samples(snap: CollectorSnapshot) -> list[str]:
    comp = sample_comparisons(snap)
    similarity = comp["avg_similarity"]
    lines = ["## Sample Comparisons",
             f"- **Comparisons**: {comp['num_comparisons']}",
             f"- **Average Similarity**: {_num(similarity) if similarity is not None else 'n/a'}",
             f"- **Degraded Samples**: {comp['degraded_count']}",
             f"- **Catastrophic Forgetting**: {'Yes' if comp['catastrophic_forgetting'] else 'No'}"]
    recent = snap.recent_samples[-RECENT_SAMPLES:]
    if recent:
        lines += ["", "| Step | Rank | Prompt | Response | Reward |", "|---|---|---|---|---|"]
        lines += [f"| {s.step} | {s.rank} | {_cell(s.prompt, 60)} | {_cell(s.response, 60)} | "
                  f"{_num(s.reward)} |" for s in recent]
    return lines


def _md_ppo(snap: CollectorSnapshot) -> list[str]:
    ppo = [m for m in snap.metrics.values()
           if any(hint in m.name.lower() for hint in PPO_METRIC_HINTS)]
    return ["## PPO Mechanics", *_metric_table(ppo)] if ppo else []


def _md_ranks(snap: CollectorSnapshot) -> list[str]:
    ranks = _sorted_ranks(snap.ranks.values())
    if not ranks:
        return ["## Ranks", "No rank has connected."]
    lines = ["## Ranks", "| Rank | Host | Last Step | Last Seen | Batches | Dropped | Closed |",
             "|---|---|---|---|---|---|---|"]
    for r in ranks:
        age = _duration(snap.taken_at - r.last_seen) + " ago" if r.last_seen > 0 else "never"
        lines.append(f"| {r.rank} | {_cell(r.host)} | {r.last_step} | {age} | "
                     f"{r.batches_received} | {_counts(r.dropped_by_reason)} | "
                     f"{'Yes' if r.closed else 'No'} |")
    return lines


def _md_health(snap: CollectorSnapshot) -> list[str]:
    return ["## Collector Health",
            f"- **Frames Received**: {_counts(snap.frames_received_by_kind)}",
            f"- **Frames Rejected**: {_counts(snap.frames_rejected_by_reason)}",
            f"- **Values Flagged**: {_counts(snap.values_flagged_by_reason)}",
            f"- **Events Dropped by Ranks**: {_counts(_dropped_totals(snap.ranks.values()))}",
            f"- **Series Stored**: {snap.series_count} "
            f"(capacity {snap.series_capacity} points each)"]


# --- helpers --------------------------------------------------------------------------------------

def _span(count: int, steps: Any) -> float:
    """Steps covered by the last ``count`` points of ``steps`` (``count - 1`` without steps)."""
    if steps is not None and len(steps) >= 2:
        tail = steps[-min(count, len(steps)):]
        if len(tail) >= 2:
            return float(tail[-1] - tail[0])
    return float(count - 1)


def _sorted_ranks(ranks: Iterable[RankSnapshot]) -> list[RankSnapshot]:
    return sorted(ranks, key=lambda r: r.rank)


def _dropped_totals(ranks: Iterable[RankSnapshot]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for rank in ranks:
        totals.update(dict(rank.dropped_by_reason))
    return dict(sorted(totals.items()))


def _counts(counts: Mapping[str, Any]) -> str:
    """``a: 1, b: 2`` (sorted by key), or ``none``."""
    return ", ".join(f"{_cell(str(k))}: {v}" for k, v in sorted(counts.items())) or "none"


def _num(value: float) -> str:
    """A table number: 4 decimals like the seed, scientific notation for very large/small."""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 1e-3):
        return f"{value:.4g}"
    return f"{value:.4f}"


def _cell(text: str, limit: int = 200) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, cut to ``limit``."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _duration(seconds: float) -> str:
    """``1h 02m 03s``, ``4m 05s`` or ``6.7s``."""
    if not math.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _iso(unix_seconds: float) -> str | None:
    """ISO 8601 in local time with its UTC offset; ``None`` for a missing/invalid time."""
    if not (math.isfinite(unix_seconds) and unix_seconds > 0):
        return None
    return datetime.fromtimestamp(unix_seconds, tz=timezone.utc).astimezone().isoformat()


def _jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` and numpy scalars made plain."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
