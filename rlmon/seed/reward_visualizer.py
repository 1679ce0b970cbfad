"""``RewardVisualizer``: the GRPO guide's plots and HTML summary, from the collector's answers.

Inputs are plain data, so the same calls work live, at the end of a run and offline:

* ``history`` — ``{function: [per-step mean or None, ...]}`` with an optional ``steps`` axis
  (``monitoring_data.json``'s ``history`` and ``steps``);
* ``statistics`` — the collector's ``rewards`` answer (``RewardMonitor.refresh()``), whose
  ``functions`` hold each function's statistics over its individual values and a ``histogram``;
* ``alerts`` — ``RewardMonitor.all_alerts`` (dicts with ``type``, ``message``, ``step``,
  ``severity``).

Drawing reuses :mod:`exporters.plots` (its figures never go through ``pyplot``, its files are
written atomically, and without matplotlib nothing is drawn: one warning, ``None`` returned).
Call from the training process's main thread (matplotlib's ``rcParams`` are process-wide); each
plot takes a few hundred milliseconds, so the integration draws only at ``finalize``. numpy,
matplotlib and :mod:`exporters` are imported on first use, never by ``import rlmon``.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

ALERT_TYPES = ("OUTLIER", "DROP", "SPIKE", "FLATLINE", "NEGATIVE")
"""The GRPO guide's reward alert types."""

_PERCENTILE_KEYS = ("mean", "std", "min", "max", "median", "p25", "p75", "p90")


class RewardVisualizer:
    """Writes the GRPO guide's PNGs and HTML pages (see the module docstring for the inputs).

    Every method returns the path written, or ``None`` when there was nothing to draw or
    matplotlib is missing; an ``OSError`` while writing propagates."""

    def __init__(self, output_dir: str | Path = ".", dpi: int | None = None,
                 style: str | None = None) -> None:
        from exporters.plots import DEFAULT_DPI, STYLE

        self.output_dir = Path(output_dir)
        self.dpi = DEFAULT_DPI if dpi is None else int(dpi)
        self.style = STYLE if style is None else style

    def plot_reward_history(self, history: Mapping[str, Sequence[float | None]],
                            save_path: str | Path, steps: Sequence[int] | None = None
                            ) -> Path | None:
        """``reward_history.png``: one panel per function, per-step mean and its EMA."""
        from exporters.plots import plot_reward_history

        return plot_reward_history(history, save_path, steps=steps, dpi=self.dpi,
                                   style=self.style)

    def plot_reward_distributions(self, statistics: Mapping[str, Any],
                                  save_path: str | Path) -> Path | None:
        """``reward_distributions.png``: each function's histogram of individual values."""
        functions = _held(statistics)
        return self._write(_distributions_figure, save_path, functions)

    def plot_reward_statistics(self, statistics: Mapping[str, Any],
                               save_path: str | Path) -> Path | None:
        """``reward_statistics.png``: mean ± std and min/p25/median/p75/p90/max per function."""
        return self._write(_statistics_figure, save_path, _held(statistics))

    def create_dashboard(self, statistics: Mapping[str, Any],
                         history: Mapping[str, Sequence[float | None]], alerts: Sequence[Mapping],
                         save_path: str | Path, steps: Sequence[int] | None = None,
                         step: int | None = None) -> Path | None:
        """``final_dashboard.png`` / ``dashboard_step_N.png``: history, mean ± std,
        distributions and alert counts on one page."""
        return self._write(_dashboard_figure, save_path, statistics, history, steps, alerts, step)

    def create_html_summary(self, statistics: Mapping[str, Any], alerts: Sequence[Mapping],
                            save_path: str | Path, images: Mapping[str, str | Path] = (),
                            step: int | None = None, links: Sequence[str] = ()) -> Path:
        """``final_summary.html`` / ``summary_step_N.html``: a self-contained page with the
        statistics table, trend indicators, recent alerts, the PNGs in ``images`` (caption →
        path, embedded) and links to export files."""
        from exporters.atomic import atomic_write_text

        return atomic_write_text(save_path, render_summary_html(statistics, alerts, images,
                                                                step, links))

    def _write(self, build: Any, save_path: str | Path, *args: Any) -> Path | None:
        from exporters import plots
        from exporters.atomic import atomic_write_bytes

        if not plots._matplotlib_or_warn():
            return None
        with plots._style(self.style):
            data = plots._png(build, *args, dpi=self.dpi)
        return None if data is None else atomic_write_bytes(save_path, data)


def _held(statistics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The functions of a ``rewards`` answer that hold values, by name (``None``, JSON's NaN,
    read as NaN)."""
    functions = statistics.get("functions", {}) if isinstance(statistics, Mapping) else {}
    return {name: {k: math.nan if v is None else v for k, v in s.items()}
            for name, s in sorted(functions.items()) if s.get("count")}


def _distributions_figure(functions: Mapping[str, Mapping[str, Any]]) -> Any:
    from exporters import plots

    panels = [_histogram_panel(name, stats, i) for i, (name, stats) in enumerate(functions.items())]
    return plots._panel_figure(panels, "Reward distributions (individual values, last window)")


def _histogram_panel(name: str, stats: Mapping[str, Any], index: int) -> Any:
    from exporters import plots

    def draw(ax: Any) -> None:
        _draw_histogram(ax, stats, plots._color(index))
        ax.set_title(plots._text(name))
        ax.set_xlabel("reward (one sample)")
        ax.set_ylabel("samples")
        ax.legend(loc="best")
    return draw


def _draw_histogram(ax: Any, stats: Mapping[str, Any], color: str, label: str = "") -> None:
    """The histogram as filled stairs; with ``label`` (several functions on one axis) its mean
    in its colour, else the mean and median in black."""
    histogram = stats.get("histogram") or {}
    edges, counts = histogram.get("edges", []), histogram.get("counts", [])
    if len(edges) == len(counts) + 1 and counts:
        ax.stairs(counts, edges, fill=True, color=color, alpha=0.5, label=label or None)
    if label:
        ax.axvline(stats["mean"], color=color, lw=1.6)
        return
    ax.axvline(stats["mean"], color="#222222", lw=1.6, label=f"mean {stats['mean']:.3g}")
    ax.axvline(stats["median"], color="#222222", ls="--", lw=1.4,
               label=f"median {stats['median']:.3g}")


def _statistics_figure(functions: Mapping[str, Mapping[str, Any]]) -> Any:
    from exporters import plots

    if not functions:
        return None
    names = list(functions)
    stats = [SimpleNamespace(**{k: functions[n][k] for k in _PERCENTILE_KEYS}) for n in names]
    fig, axes = plots._figure(1, 2, size=(13.0, max(4.0, 1.6 + 0.45 * len(names))))
    plots._draw_mean_std(axes[0], names, stats)
    plots._draw_percentiles(axes[1], names, stats)
    axes[1].set_ylim(axes[0].get_ylim())
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=4)
    fig.suptitle("Reward statistics per reward function (individual values, last window)")
    return fig


def _dashboard_figure(statistics: Mapping[str, Any], history: Mapping[str, Sequence],
                      steps: Sequence[int] | None, alerts: Sequence[Mapping],
                      step: int | None) -> Any:
    from exporters import plots

    functions = _held(statistics)
    if not functions and not any(len(v) for v in history.values()):
        return None
    fig, axes = plots._figure(2, 2, size=(15.0, 9.0))
    _draw_history(axes[0], history, steps)
    if functions:
        plots._draw_mean_std(axes[1], list(functions), [
            SimpleNamespace(**{k: s[k] for k in _PERCENTILE_KEYS}) for s in functions.values()])
    for i, (name, stats) in enumerate(functions.items()):
        _draw_histogram(axes[2], stats, plots._color(i), label=plots._text(name))
    axes[2].set_title("Distributions (individual values; lines: means)")
    axes[2].set_xlabel("reward (one sample)")
    if functions:
        axes[2].legend(loc="best")
    _draw_alert_counts(axes[3], alerts)
    at = "final" if step is None else f"step {step}"
    fig.suptitle(f"Reward monitoring dashboard · {at} · total mean "
                 f"{_fmt(statistics.get('total_mean'))}")
    return fig


def _draw_history(ax: Any, history: Mapping[str, Sequence], steps: Sequence[int] | None) -> None:
    from exporters import plots

    for i, (name, values) in enumerate(history.items()):
        series = [math.nan if v is None else float(v) for v in values]
        x = list(steps) if steps is not None and len(steps) == len(series) else range(len(series))
        ax.plot(x, series, color=plots._color(i), alpha=0.3, lw=1.0)
        ax.plot(x, plots.ema_series(series), color=plots._color(i), lw=2.0, label=plots._text(name))
    plots._finish(ax, f"Per-step mean (EMA {plots.EMA_SPAN}; raw faint)", "reward")


def _draw_alert_counts(ax: Any, alerts: Sequence[Mapping]) -> None:
    counts = [sum(1 for a in alerts if a.get("type") == kind) for kind in ALERT_TYPES]
    ax.bar(ALERT_TYPES, counts, color=["#d62728" if c else "#2ca02c" for c in counts])
    ax.set_title(f"Reward alerts ({sum(counts)} in all)")
    ax.set_ylabel("alerts")


# --- HTML -----------------------------------------------------------------------------------------

_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th.l,td.l{text-align:left}"
        ".warn{color:#b35c00}.crit{color:#c0392b}img{max-width:100%}figure{margin:1em 0}")
_HEAD = ("Function", "Trend", "Mean ± std", "Range", "Median", "P25", "P75", "P90", "EMA short",
         "EMA long", "Positive", "Negative", "Zero", "Samples", "Calls", "Errors", "Avg ms")


def render_summary_html(statistics: Mapping[str, Any], alerts: Sequence[Mapping],
                        images: Mapping[str, str | Path] = (), step: int | None = None,
                        links: Sequence[str] = ()) -> str:
    """The summary page as text (every run-supplied string escaped; images embedded)."""
    title = "Reward monitoring summary" + (f" · step {step}" if step is not None else "")
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Total mean "
            f"{_fmt(statistics.get('total_mean'))}, mean std {_fmt(statistics.get('total_std'))}, "
            f"sum of means {_fmt(statistics.get('sum'))}.</p>",
            _stats_table(statistics), _alerts_table(alerts), _images(dict(images)),
            "".join(f'<p><a href="{html.escape(n)}">{html.escape(n)}</a></p>' for n in links)]
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def _stats_table(statistics: Mapping[str, Any]) -> str:
    functions = statistics.get("functions", {}) if isinstance(statistics, Mapping) else {}
    head = "".join(f"<th{' class=l' if i == 0 else ''}>{h}</th>" for i, h in enumerate(_HEAD))
    rows = "".join(_stats_row(name, s) for name, s in sorted(functions.items()))
    return f"<h2>Statistics</h2><table><tr>{head}</tr>{rows}</table>"


def _stats_row(name: str, s: Mapping[str, Any]) -> str:
    cells = [trend_indicator(s), f"{_fmt(s['mean'])} ± {_fmt(s['std'])}",
             f"[{_fmt(s['min'])}, {_fmt(s['max'])}]", _fmt(s["median"]), _fmt(s["p25"]),
             _fmt(s["p75"]), _fmt(s["p90"]), _fmt(s["ema_short"]), _fmt(s["ema_long"]),
             _pct(s["positive_fraction"]), _pct(s["negative_fraction"]), _pct(s["zero_fraction"]),
             str(s.get("count", 0)), str(s.get("calls", "")), str(s.get("errors", "")),
             _fmt(s.get("avg_time_ms"))]
    return (f"<tr><td class=l>{html.escape(name)}</td>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")


def _alerts_table(alerts: Sequence[Mapping]) -> str:
    if not alerts:
        return "<h2>Recent alerts</h2><p>No reward alerts.</p>"
    rows = "".join(
        f"<tr><td>{int(a.get('step', -1))}</td><td class=l>{html.escape(str(a.get('severity')))}"
        f"</td><td class=l>{html.escape(str(a.get('type')))}</td><td class=l>"
        f"{html.escape(str(a.get('message')))}</td></tr>" for a in list(alerts)[-25:][::-1])
    return ("<h2>Recent alerts</h2><table><tr><th>Step</th><th class=l>Severity</th>"
            f"<th class=l>Type</th><th class=l>Message</th></tr>{rows}</table>")


def _images(images: dict[str, str | Path]) -> str:
    import base64

    figures = []
    for caption, path in images.items():
        data = Path(path).read_bytes() if path and Path(path).exists() else None
        if data:
            figures.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;"
                           f"base64,{base64.b64encode(data).decode('ascii')}\"><figcaption>"
                           f"{html.escape(caption)}</figcaption></figure>")
    return "<h2>Plots</h2>" + "".join(figures) if figures else ""


def trend_indicator(stats: Mapping[str, Any]) -> str:
    """↑ when the short EMA is more than 5 % above the long one, ↓ when below, → otherwise
    (``?`` without both EMAs): the guide's "Short >> Long: recent improvement"."""
    short, long = stats.get("ema_short"), stats.get("ema_long")
    if not _finite(short) or not _finite(long):
        return "?"
    scale = max(abs(long), 1e-9)
    change = (short - long) / scale
    return "↑" if change > 0.05 else "↓" if change < -0.05 else "→"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else "n/a"


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if _finite(value) else "n/a"
