"""Drawing the ``rlmon top`` view (:mod:`rlmon.top`): a rich renderable for terminals and plain
lines for logs and pipes. Pure functions of a :class:`~rlmon.top.TopView`; nothing here reads
files or sockets. Needs ``rich`` for :func:`render` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from rlmon.top import MetricRow, RankRow, TopView

MAX_RANK_ROWS = 16
"""Ranks listed at most; past it the ones furthest behind are shown."""
PLAIN_METRICS = 6
"""Metrics in a plain status line."""
FIXED_LINES = 20
"""Lines of the view besides table rows and recent alerts (titles, headers, progress, health)."""
SILENT_SECONDS = 30.0
"""A live rank not heard from for this long is shown as silent."""
_SEVERITY_STYLE = {"INFO": "cyan", "WARNING": "yellow", "CRITICAL": "bold red"}


def fmt(value: float) -> str:
    """A number in at most ~6 characters: ``0.4123``, ``1.2e-05``, ``3.4e+04``, ``nan``."""
    if value is None or not isinstance(value, (int, float)):
        return "–"
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.2g}" if abs(value) < 1e-3 else f"{value:.3g}"
    return f"{value:.4g}"


def duration(seconds: float) -> str:
    """``12s``, ``3m05s``, ``1h02m`` (``–`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rate(value: float) -> str:
    """Steps per second for people (``–`` before two readings)."""
    return "–" if not math.isfinite(value) else f"{value:.3g}"


def progress_text(view: TopView) -> str:
    """``step 41/100 (42%) · 9.8 steps/s · ETA 6s``, or ``step 41 · 9.8 steps/s`` without a
    known total (``no step yet`` before the first)."""
    step = view.max_step
    if step < 0:
        return "no step yet"
    speed = f"{rate(view.steps_per_second)} steps/s"
    if not view.total_steps:
        return f"step {step} · {speed}"
    done = min(step + 1, view.total_steps)
    left = view.total_steps - done
    eta = left / view.steps_per_second if view.steps_per_second > 0 else math.nan
    return (f"step {step}/{view.total_steps} ({100 * done // view.total_steps}%) · {speed}"
            f" · ETA {duration(eta)}")


def stop_text(view: TopView) -> str:
    """The stop state in one line (``stop: none`` while there is none)."""
    stop = view.stop
    if stop is None:
        return "stop: none"
    ranks = view.world_size or len(view.ranks)
    return (f"STOP at step {stop.at_step} (generation {stop.generation}, {stop.severity}, "
            f"{stop.source}): {stop.reason} · acknowledged by {stop.acked}/{ranks} ranks")


def counts_text(counts: Mapping[str, float]) -> str:
    """``queue_full 12, nan 3`` or ``none``."""
    items = [(k, int(v)) for k, v in sorted(counts.items()) if v]
    return ", ".join(f"{k} {v}" for k, v in items) if items else "none"


def status_line(view: TopView) -> str:
    """One plain line: progress, ranks, the first metrics with trend arrows, alerts, drops,
    rejected frames and the stop state (or why there is no data)."""
    if view.error and not view.ranks:
        return f"rlmon: {view.error}"
    metrics = " ".join(f"{m.name} {fmt(m.value)}{m.arrow}" for m in view.metrics[:PLAIN_METRICS])
    alerts = sum(view.alert_counts.values())
    parts = [progress_text(view), f"ranks {view.ranks_known}/{view.world_size}", metrics,
             f"alerts {alerts}" + (f" ({counts_text(view.alert_counts)})" if alerts else ""),
             f"drops {int(sum(view.dropped.values()))}",
             f"rejected {int(sum(view.rejected.values()))}", stop_text(view)]
    if view.error:
        parts.append(view.error)
    return "rlmon: " + " · ".join(p for p in parts if p)


def alert_line(alert: Mapping[str, Any]) -> str:
    """One plain line for an alert read from ``alerts.jsonl``."""
    rank = alert.get("rank", -1)
    where = f" rank {rank}" if isinstance(rank, int) and rank >= 0 else ""
    kind, message = str(alert.get("type", "")), str(alert.get("message", ""))
    if not message.startswith(kind):
        message = f"{kind}: {message}"
    return f"rlmon: alert at step {alert.get('step')}{where}: {alert.get('severity')} {message}"


# -- the rich view -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """Rows the tables may use: metrics, ranks and recent alerts."""

    metrics: int = 12
    ranks: int = MAX_RANK_ROWS
    alerts: int = 6


def budget_for(height: int | None, view: TopView) -> Budget:
    """Rows for a terminal ``height`` lines tall (None: no limit), so the whole view fits: the
    fixed lines (headers, progress, stop, health) take about :data:`FIXED_LINES`, the metric
    table gets up to half of the rest, the ranks what is left."""
    if height is None:
        return Budget(len(view.metrics), MAX_RANK_ROWS, len(view.alerts))
    alerts = 6 if height >= 45 else 3 if height >= 30 else 1
    rows = max(4, height - FIXED_LINES - alerts)
    metrics = min(len(view.metrics), max(2, rows // 2))
    return Budget(metrics, max(2, min(MAX_RANK_ROWS, rows - metrics)), alerts)


def render(view: TopView, height: int | None = None) -> Any:
    """The whole view as one rich renderable, fitted to ``height`` lines when given."""
    from rich.console import Group

    budget = budget_for(height, view)
    parts = [_header(view), _progress(view), _stop(view), _metrics_table(view, budget.metrics),
             _ranks_table(view, budget.ranks), _alerts(view, budget.alerts), _health(view)]
    return Group(*[part for part in parts if part is not None])


def _header(view: TopView) -> Any:
    from rich.text import Text

    header = Text.assemble(("rlmon top", "bold"), f"  {view.run_dir}")
    if view.run_id:
        header.append(f"  run {view.run_id}")
    header.append(f"  ·  {view.ranks_known}/{view.world_size} ranks")
    header.append(f"  ·  up {duration(view.taken_at - view.started_at)}")
    if view.finished:
        header.append("  ·  finished", "green")
    if view.error:
        header.append(f"\n{view.error}", "bold red")
    return header


def _progress(view: TopView) -> Any:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    if view.total_steps and view.max_step >= 0:
        done = min(view.max_step + 1, view.total_steps)
        grid.add_row(ProgressBar(total=view.total_steps, completed=done, width=40),
                     progress_text(view))
    else:
        grid.add_row(progress_text(view))
    return grid


def _stop(view: TopView) -> Any:
    from rich.text import Text

    return Text(stop_text(view), "bold red" if view.stop is not None else "green")


def _metrics_table(view: TopView, limit: int) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title="metrics (cross-rank mean; window of recent steps)",
                  title_justify="left", title_style="bold")
    for name in ("metric", "value", "trend", "mean", "min", "max", "step"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for row in view.metrics[:limit]:
        table.add_row(*_metric_cells(row))
    if not view.metrics:
        table.add_row("(none logged yet)", "", "", "", "", "", "")
    return table


def _metric_cells(row: MetricRow) -> tuple[str, ...]:
    return (row.name, fmt(row.value), row.arrow, fmt(row.mean), fmt(row.min), fmt(row.max),
            str(row.step) if row.step >= 0 else "–")


def _ranks_table(view: TopView, limit: int) -> Any:
    from rich import box
    from rich.table import Table

    rows = sorted(view.ranks, key=lambda r: (r.step, r.rank))[:limit]
    caption = None
    if not view.per_rank:
        caption = f"the ranks furthest behind of {view.ranks_known} (per-rank series are off)"
    elif len(view.ranks) > len(rows):
        caption = f"the {len(rows)} ranks furthest behind of {len(view.ranks)}"
    table = Table(box=box.SIMPLE_HEAD, title="ranks", title_justify="left", title_style="bold",
                  caption=caption, caption_justify="left")
    for name in ("rank", "step", "steps/s", "last heard", "dropped", "state"):
        table.add_column(name, justify="right" if name != "state" else "left")
    for row in sorted(rows, key=lambda r: r.rank):
        table.add_row(*_rank_cells(row, view.taken_at))
    return table


def _rank_cells(row: RankRow, now: float) -> tuple[str, ...]:
    age = now - row.last_seen
    state = "closed" if row.closed else ("[yellow]silent[/]" if age > SILENT_SECONDS else "live")
    return (str(row.rank), str(row.step), rate(row.steps_per_second), f"{duration(age)} ago",
            str(row.dropped), state)


def _alerts(view: TopView, limit: int) -> Any:
    from rich.text import Text

    text = Text("alerts", "bold")
    for severity in ("INFO", "WARNING", "CRITICAL"):
        count = view.alert_counts.get(severity, 0)
        text.append(f"  {severity} {count}", _SEVERITY_STYLE[severity] if count else "dim")
    if view.firing:
        firing = ", ".join(f"{t} {s} ({sev})" for t, s, sev in view.firing[:6])
        text.append(f"\nfiring now: {firing}", "yellow")
    for alert in view.alerts[len(view.alerts) - limit:] if limit else ():
        style = _SEVERITY_STYLE.get(str(alert.get("severity")), "")
        text.append("\n" + alert_line(alert).removeprefix("rlmon: "), style)
    return text


def _health(view: TopView) -> Any:
    from rich.text import Text

    text = Text.assemble(("health", "bold"), f"  frames rejected: {counts_text(view.rejected)}",
                         f"  ·  dropped by ranks: {counts_text(view.dropped)}",
                         f"  ·  values flagged: {counts_text(view.flagged)}")
    if view.callbacks:
        cb = view.callbacks
        text.append(f"\ncallbacks: {cb.get('delivered', 0)} events delivered, "
                    f"{cb.get('dropped', 0)} dropped, {sum(cb.get('errors', {}).values())} errors")
    if math.isfinite(view.scrape_seconds):
        text.append(f"\n/metrics read in {view.scrape_seconds * 1e3:.1f} ms, every "
                    f"{view.interval:.1f} s", "dim")
    return text
