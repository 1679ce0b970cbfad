"""The seeds' PNG plots, drawn from a :class:`CollectorSnapshot` taken with history.

Files (:data:`PLOT_FILES`, in this order); each is skipped — its builder returns ``None`` — when
the snapshot lacks what it draws:

* ``loss_curves.png`` — one panel per loss among :data:`LOSS_METRICS`.
* ``rewards.png`` — the total reward: each rank faint, the cross-rank mean bold, a least-squares
  trend line.
* ``kl_divergence.png`` — KL with the warning (``kl_threshold``) and critical (2×) lines, the KL
  alerts as markers and the stop step as a vertical line; when KL passes 10× the threshold the
  y axis turns symlog (linear below the threshold) so a blow-up does not flatten the rest.
* ``quality_metrics.png`` — entropy, response length, fraction of zero-std reward groups, every
  alert on a step axis (one row per alert type, coloured by severity), and the sample comparator
  from ``snapshot.extra["sample_comparisons"]``: a similarity panel when it carries a
  ``similarities`` list (optional ``steps``, ``threshold``), else its summary in the title.
* ``ppo_mechanics.png`` — clip fraction, advantages, gradient norm, policy/value losses (only when
  one of :data:`PPO_ONLY_METRICS` exists).
* ``reward_history.png`` / ``reward_distributions.png`` / ``reward_statistics.png`` — the GRPO
  seed's per-reward-function plots (functions are the metrics named ``rewards/<fn>``; see
  :func:`exporters.monitoring_data.reward_functions`).
* ``final_dashboard.png`` — the overview (:func:`dashboard_figure`); ``dashboard_step_N.png`` is the
  same figure titled with step N (:func:`write_dashboard`). ``N`` only titles it: the data is
  whatever the snapshot holds, so pass a snapshot taken at that step.

Conventions: x is always ``step``; a panel of one metric draws each rank as a faint line (legend
``rank 0``…, up to :data:`MAX_RANK_LINES` ranks, a min–max band beyond) under the bold cross-rank
mean; a panel of several metrics draws each metric's mean with a band for its rank spread.
``span/*`` metrics are in seconds. A stop decision is a dotted vertical line on every step axis.

Process and thread affinity: figures are :class:`matplotlib.figure.Figure` objects drawn on an Agg
canvas, never through ``pyplot``, so there is no global figure registry, no GUI backend and no
figure to leak; the only global state touched is ``rcParams``, set inside
``matplotlib.style.context`` and restored after each call. Safe in a forked child; not meant to run
in two threads at once (``rcParams`` is process-wide).

Failure: every file is rendered in memory and then written with
:func:`exporters.atomic.atomic_write_bytes`. A plot whose drawing fails is logged and skipped; an
``OSError`` while writing propagates. matplotlib is an optional extra: without it the writers
return ``[]``/``None`` and log one warning per process saying how to install it.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from collector.snapshot import CollectorSnapshot, MetricSnapshot
from exporters.atomic import atomic_write_bytes
from exporters.monitoring_data import aligned_history, reward_functions
from exporters.reports import SEVERITIES, alert_totals

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("rlmon.exporters.plots")

DEFAULT_DPI = 150
"""Resolution of every PNG unless the caller asks otherwise (dots per inch)."""

STYLE = "seaborn-v0_8-whitegrid"
"""The seed's matplotlib style; matplotlib's default style when this one is not installed."""

INSTALL_HINT = 'pip install "rlmon[plots]"'
MISSING_MATPLOTLIB_MESSAGE = (
    "matplotlib is not installed, so rlmon wrote no PNG plots (the HTML summary and "
    f"monitoring_data.json are still written); install it with: {INSTALL_HINT}")
"""The one warning logged (once per process) when matplotlib cannot be imported."""

PLOT_FILES = ("loss_curves.png", "rewards.png", "kl_divergence.png", "quality_metrics.png",
              "ppo_mechanics.png", "reward_history.png", "reward_distributions.png",
              "reward_statistics.png", "final_dashboard.png")
"""File names :func:`write_all_plots` may write, in order."""

MAX_RANK_LINES = 8
"""Up to this many ranks are drawn as one line each; more become a min–max band."""

EMA_SPAN = 10
"""Span of the EMA overlays (``alpha = 2 / (span + 1)``), the seed's short EMA."""

LOSS_METRICS = ("loss", "total_loss", "policy_loss", "pg_loss", "value_loss", "vf_loss")
REWARD_METRICS = ("reward", "rewards/total_mean", "reward_mean", "rewards/mean")
KL_METRICS = ("kl", "kl_div", "kl_divergence", "objective/kl", "train/kl", "actor/kl", "policy/kl",
              "ppo/mean_kl", "approx_kl")
"""KL metric names, first present wins (TRL, OpenRLHF, verl and the seeds' spellings)."""
QUALITY_METRICS = ("entropy", "response_length", "frac_reward_zero_std")
PPO_ONLY_METRICS = ("clip_fraction", "clipfrac", "advantage_mean", "advantage_std", "grad_norm",
                    "value_loss", "vf_loss", "approx_kl", "ratio")

_UNITS = {"response_length": "tokens", "learning_rate": "learning rate",
          "frac_reward_zero_std": "fraction of groups", "clip_fraction": "fraction clipped",
          "grad_norm": "L2 norm", "entropy": "nats / token"}
_SEVERITY_COLOR = {"INFO": "#1f77b4", "WARNING": "#ff9f1c", "CRITICAL": "#d62728"}
_SEVERITY_MARKER = {"INFO": "o", "WARNING": "^", "CRITICAL": "X"}
_MEAN_COLOR = "#222222"
_TREND_COLOR = "#8e44ad"
_STOP_COLOR = "#c0392b"
_RC = {"font.size": 10, "axes.titlesize": 11.5, "axes.titleweight": "bold",
       "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 8.5,
       "legend.framealpha": 0.9, "figure.titlesize": 14, "figure.titleweight": "bold",
       "figure.facecolor": "white", "savefig.facecolor": "white", "axes.facecolor": "white"}
_warned_missing = False

Panel = Callable[["Axes"], None]
"""Draws one subplot."""


# --- public API -----------------------------------------------------------------------------------

def plots_available() -> bool:
    """Whether matplotlib can be imported (without warning when it cannot)."""
    try:
        import matplotlib.figure  # noqa: F401
        from matplotlib.backends import backend_agg  # noqa: F401
    except ImportError:
        return False
    return True


def render_pngs(snapshot: CollectorSnapshot, *, dpi: int = DEFAULT_DPI, style: str = STYLE,
                names: Sequence[str] | None = None) -> dict[str, bytes]:
    """Render the plots in :data:`PLOT_FILES` (or those of ``names``) to PNG bytes, in memory.

    Returns ``{file name: PNG bytes}`` for the plots the snapshot has data for; ``{}`` (after one
    warning per process) without matplotlib. Never raises for missing or odd data.
    """
    if not _matplotlib_or_warn():
        return {}
    wanted = PLOT_FILES if names is None else [n for n in PLOT_FILES if n in names]
    pngs: dict[str, bytes] = {}
    with _style(style):
        for name in wanted:
            data = _png(_BUILDERS[name], snapshot, dpi=dpi)
            if data is not None:
                pngs[name] = data
    return pngs


def write_all_plots(snapshot: CollectorSnapshot, out_dir: str | Path, dpi: int = DEFAULT_DPI,
                    *, style: str = STYLE) -> list[Path]:
    """Write every plot the snapshot has data for into ``out_dir`` (created if missing).

    Returns the paths written, in :data:`PLOT_FILES` order; ``[]`` without matplotlib (one warning
    per process). Each file is replaced whole or not at all.
    """
    pngs = render_pngs(snapshot, dpi=dpi, style=style)
    directory = Path(out_dir)
    if pngs:
        directory.mkdir(parents=True, exist_ok=True)
    return [atomic_write_bytes(directory / name, data) for name, data in pngs.items()]


def dashboard_png(snapshot: CollectorSnapshot, *, step: int | None = None, dpi: int = DEFAULT_DPI,
                  style: str = STYLE) -> bytes | None:
    """The dashboard as PNG bytes (titled with ``step`` when given); ``None`` without matplotlib
    or without any metric history."""
    if not _matplotlib_or_warn():
        return None
    with _style(style):
        return _png(dashboard_figure, snapshot, step, dpi=dpi)


def write_dashboard(snapshot: CollectorSnapshot, path: str | Path, *, step: int | None = None,
                    dpi: int = DEFAULT_DPI, style: str = STYLE) -> Path | None:
    """Write the dashboard to ``path`` atomically; ``None`` when there was nothing to draw."""
    data = dashboard_png(snapshot, step=step, dpi=dpi, style=style)
    return None if data is None else atomic_write_bytes(path, data)


def plot_reward_history(history: Mapping[str, Sequence[float | None]], save_path: str | Path, *,
                        steps: Sequence[int] | None = None, dpi: int = DEFAULT_DPI,
                        style: str = STYLE) -> Path | None:
    """Plot ``{reward function: values}`` (``monitoring_data.json``'s ``history``) to ``save_path``.

    The seed's offline-analysis entry point: ``plot_reward_history(data["history"],
    save_path="analysis.png")``. ``None`` values (NaN in the export) are gaps. With ``steps``
    (``data["steps"]``) the x axis is the step; without, the record index. Returns the path, or
    ``None`` when ``history`` is empty or matplotlib is missing.
    """
    if not _matplotlib_or_warn():
        return None
    with _style(style):
        data = _png(reward_history_figure, history, steps, dpi=dpi)
    return None if data is None else atomic_write_bytes(save_path, data)


def ema_series(values: Sequence[float], span: int = EMA_SPAN) -> np.ndarray:
    """Running EMA (``alpha = 2 / (span + 1)``) of ``values``; NaN points keep the previous EMA."""
    alpha, acc = 2.0 / (span + 1.0), math.nan
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        if value is not None and math.isfinite(value):
            acc = value if math.isnan(acc) else alpha * value + (1.0 - alpha) * acc
        out[i] = acc
    return out


# --- figures --------------------------------------------------------------------------------------

def loss_figure(snapshot: CollectorSnapshot) -> Figure | None:
    """``loss_curves.png``: one panel per loss metric present."""
    losses = _present(snapshot, LOSS_METRICS)
    panels = [_single_panel(snapshot, m, title=_title(m.name)) for m in losses]
    return _panel_figure(panels, "Losses")


def rewards_figure(snapshot: CollectorSnapshot) -> Figure | None:
    """``rewards.png``: total reward per rank, cross-rank mean, least-squares trend."""
    reward = _first(snapshot, REWARD_METRICS)
    if reward is None:
        return None
    panel = _single_panel(snapshot, reward, title=f"Reward progression ({_text(reward.name)})",
                          trend=True)
    return _panel_figure([panel], None, size=(10.5, 5.2))


def kl_figure(snapshot: CollectorSnapshot) -> Figure | None:
    """``kl_divergence.png``: KL per rank and mean, thresholds, alert markers, stop step."""
    kl = _first(snapshot, KL_METRICS)
    if kl is None:
        return None
    return _panel_figure([lambda ax: _draw_kl(ax, snapshot, kl, ranks=True)], None,
                         size=(10.5, 5.2))


def quality_figure(snapshot: CollectorSnapshot) -> Figure | None:
    """``quality_metrics.png``: similarity, entropy/length/zero-std fraction, alerts over time."""
    panels: list[Panel] = []
    comparisons = snapshot.extra.get("sample_comparisons")
    comparisons = comparisons if isinstance(comparisons, Mapping) else {}
    if _similarity_series(comparisons) is not None:
        panels.append(lambda ax: _draw_similarity(ax, comparisons))
    panels += [_single_panel(snapshot, m, title=_title(m.name))
               for m in _present(snapshot, QUALITY_METRICS)]
    if not panels and not snapshot.alerts:
        return None
    span = _step_span(snapshot)
    panels.append(lambda ax: _draw_alert_timeline(ax, snapshot, span))
    return _panel_figure(panels, "Generation quality and alerts" + _similarity_summary(comparisons))


def ppo_figure(snapshot: CollectorSnapshot) -> Figure | None:
    """``ppo_mechanics.png``: clip fraction, advantages, gradient norm, policy/value losses."""
    if not _present(snapshot, PPO_ONLY_METRICS):
        return None
    groups = (("Clip fraction", ("clip_fraction", "clipfrac")),
              ("Advantages", ("advantage_mean", "advantage_std")),
              ("Gradient norm", ("grad_norm",)),
              ("Policy / value loss", ("policy_loss", "pg_loss", "value_loss", "vf_loss")),
              ("Approx. KL and ratio", ("approx_kl", "ratio")))
    panels = []
    for title, names in groups:
        metrics = _present(snapshot, names)
        if len(metrics) == 1:
            panels.append(_single_panel(snapshot, metrics[0], title=title))
        elif metrics:
            panels.append(_multi_panel(snapshot, metrics, title=title, ylabel="value"))
    return _panel_figure(panels, "PPO mechanics")


def reward_history_figure(history: Mapping[str, Sequence[float | None]],
                          steps: Sequence[int] | None = None,
                          alerts: Mapping[str, Sequence[tuple[int, str]]] | None = None
                          ) -> Figure | None:
    """``reward_history.png``: one panel per reward function, per-step mean and its EMA.

    ``alerts`` maps a function to ``(step, severity)`` pairs marked on its line (needs ``steps``).
    """
    series = {name: np.array([math.nan if v is None else v for v in values], dtype=np.float64)
              for name, values in history.items() if len(values)}
    if not series:
        return None
    alerts = alerts or {}
    panels = [_history_panel(name, values, steps, i, alerts.get(name, ()))
              for i, (name, values) in enumerate(series.items())]
    return _panel_figure(panels, "Reward history per reward function")


def reward_history_from_snapshot(snapshot: CollectorSnapshot) -> Figure | None:
    """``reward_history.png`` from a snapshot (the same data as ``monitoring_data.json``), with
    each function's alerts marked."""
    functions = reward_functions(snapshot)
    steps, history = aligned_history(functions)
    by_name = {m.name: fn for fn, m in functions.items()}
    alerts: dict[str, list[tuple[int, str]]] = {}
    for alert in snapshot.alerts:
        if alert.metric in by_name:
            alerts.setdefault(by_name[alert.metric], []).append((alert.step, alert.severity))
    return reward_history_figure(history, steps, alerts)


def reward_distributions_figure(snapshot: CollectorSnapshot) -> Figure | None:
    """``reward_distributions.png``: a histogram per reward function of every rank's step means."""
    functions = reward_functions(snapshot)
    panels = [_histogram_panel(name, m, i) for i, (name, m) in enumerate(functions.items())]
    return _panel_figure([p for p in panels if p is not None],
                         "Reward distributions (per-rank step means)")


def reward_statistics_figure(snapshot: CollectorSnapshot) -> Figure | None:
    """``reward_statistics.png``: mean ± std and p25/median/p75/p90 per reward function."""
    functions = {name: m for name, m in reward_functions(snapshot).items() if m.window.count}
    if not functions:
        return None
    names = list(functions)
    stats = [functions[n].window for n in names]
    height = 1.6 + 0.45 * len(names)
    fig, axes = _figure(1, 2, size=(13.0, max(4.0, height)))
    _draw_mean_std(axes[0], names, stats)
    _draw_percentiles(axes[1], names, stats)
    axes[1].set_ylim(axes[0].get_ylim())
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=4)
    fig.suptitle("Reward statistics per reward function (cross-rank mean series)")
    return fig


def dashboard_figure(snapshot: CollectorSnapshot, step: int | None = None) -> Figure | None:
    """The overview: reward, reward functions, KL, losses, per-rank step time, alerts.

    ``None`` when no metric has history. Panels without data say so instead of disappearing, so
    every dashboard has the same layout.
    """
    if not any(len(m.steps) for m in snapshot.metrics.values()):
        return None
    fig, axes = _figure(2, 3, size=(19.0, 10.0))
    span = _step_span(snapshot)
    for ax, draw in zip(axes, _dashboard_panels(snapshot, span)):
        draw(ax)
        if ax.lines or ax.collections:
            ax.set_xlim(*span)
    fig.suptitle(_dashboard_title(snapshot, step))
    return fig


_BUILDERS: dict[str, Callable[..., "Figure | None"]] = {
    "loss_curves.png": loss_figure,
    "rewards.png": rewards_figure,
    "kl_divergence.png": kl_figure,
    "quality_metrics.png": quality_figure,
    "ppo_mechanics.png": ppo_figure,
    "reward_history.png": reward_history_from_snapshot,
    "reward_distributions.png": reward_distributions_figure,
    "reward_statistics.png": reward_statistics_figure,
    "final_dashboard.png": dashboard_figure,
}


# --- dashboard panels -----------------------------------------------------------------------------

def _dashboard_panels(snapshot: CollectorSnapshot, span: tuple[float, float]) -> list[Panel]:
    reward = _first(snapshot, REWARD_METRICS)
    kl = _first(snapshot, KL_METRICS)
    losses = _present(snapshot, LOSS_METRICS)
    functions = reward_functions(snapshot, fallback=False)
    return [
        _single_panel(snapshot, reward, title="Reward", trend=True) if reward
        else _empty_panel("Reward", "no reward metric"),
        (lambda ax: _draw_reward_functions(ax, snapshot, functions)) if functions
        else _empty_panel("Reward functions", "no rewards/<fn> metrics"),
        (lambda ax: _draw_kl(ax, snapshot, kl, ranks=True)) if kl
        else _empty_panel("KL divergence", "no KL metric"),
        (_multi_panel(snapshot, losses, title="Losses", ylabel="loss") if len(losses) > 1
         else _single_panel(snapshot, losses[0], title="Loss")) if losses
        else _empty_panel("Losses", "no loss metric"),
        lambda ax: _draw_step_time(ax, snapshot),
        lambda ax: _draw_alert_timeline(ax, snapshot, span),
    ]


def _dashboard_title(snapshot: CollectorSnapshot, step: int | None) -> str:
    at = f"step {step}" if step is not None else (
        "final" if snapshot.finished else f"step {_last_step(snapshot)}")
    ranks = f"{snapshot.world_size} rank{'s' if snapshot.world_size != 1 else ''}"
    head = f"rlmon · run {_text(snapshot.run_id)} · {at} · {ranks}"
    stop = snapshot.stop
    if stop is None:
        return head + "\nno stop decided"
    reason = _text(_shorten(stop.reason, 90))
    return head + f"\nSTOP at step {stop.stop_at_step} ({stop.severity}): {reason}"


def _draw_reward_functions(ax: Axes, snapshot: CollectorSnapshot,
                           functions: Mapping[str, MetricSnapshot]) -> None:
    for i, (name, metric) in enumerate(functions.items()):
        color = _color(i)
        ax.plot(metric.steps, metric.values, color=color, alpha=0.3, lw=1.0)
        ax.plot(metric.steps, ema_series(metric.values), color=color, lw=2.0, label=_text(name))
    _mark_stop(ax, snapshot)
    _finish(ax, f"Reward functions (EMA {EMA_SPAN}; raw faint)", "reward")


def _draw_step_time(ax: Axes, snapshot: CollectorSnapshot) -> None:
    """Per-rank seconds per step (sum of ``span/*``), or rank progress bars without spans."""
    times = _step_time_by_rank(snapshot)
    if not times:
        _draw_progress(ax, snapshot)
        return
    last = {r: info.last_step for r, info in snapshot.ranks.items()}
    if len(times) <= MAX_RANK_LINES:
        for i, (rank, (steps, secs)) in enumerate(sorted(times.items())):
            ax.plot(steps, secs, color=_color(i), lw=1.3, alpha=0.85,
                    label=f"rank {rank} · at step {last.get(rank, int(steps[-1]))}")
    else:
        steps, low, high = _envelope(times)
        ax.fill_between(steps, low, high, color="0.6", alpha=0.35, lw=0,
                        label=f"{len(times)} ranks: min–max")
    _mark_stop(ax, snapshot)
    _finish(ax, "Step time per rank (sum of span/*)", "seconds per step")


def _draw_progress(ax: Axes, snapshot: CollectorSnapshot) -> None:
    ranks = sorted(snapshot.ranks.values(), key=lambda r: r.rank)
    if not ranks:
        _empty_panel("Rank progress", "no rank has connected")(ax)
        return
    last_steps = [max(r.last_step, 0) for r in ranks]
    if len(ranks) <= MAX_RANK_LINES * 4:
        ax.barh([f"rank {r.rank}" for r in ranks], last_steps, height=0.6,
                color=[_color(i) for i in range(len(ranks))])
        ax.set_ylabel("rank")
    else:
        ax.hist(last_steps, bins=min(40, len(set(last_steps))), color=_color(0))
        ax.set_ylabel("ranks")
    ax.set_title("Rank progress (no span/* metrics)")
    ax.set_xlabel("last step reported")


def _step_time_by_rank(snapshot: CollectorSnapshot) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{rank: (steps, seconds)}``: each step's ``span/*`` durations summed (nested spans count
    twice)."""
    spans = [m for name, m in snapshot.metrics.items() if name.startswith("span/")]
    pieces: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for metric in spans:
        for rank, (steps, values) in metric.history_by_rank.items():
            pieces.setdefault(rank, []).append((steps, values))
    out = {}
    for rank, parts in pieces.items():
        steps = np.concatenate([s for s, _ in parts]).astype(np.float64)
        values = np.concatenate([v for _, v in parts]).astype(np.float64)
        keep = np.isfinite(values)
        if keep.any():
            unique, inverse = np.unique(steps[keep], return_inverse=True)
            out[rank] = (unique, np.bincount(inverse, weights=values[keep]))
    return out


# --- panels of one or several metrics --------------------------------------------------------------

def _single_panel(snapshot: CollectorSnapshot, metric: MetricSnapshot, *, title: str,
                  trend: bool = False) -> Panel:
    """A panel of one metric: ranks faint, mean bold, optional trend, stop line."""
    def draw(ax: Axes) -> None:
        _plot_ranks(ax, metric)
        ranks = len(metric.history_by_rank)
        label = f"mean of {ranks} ranks" if ranks > 1 else _text(metric.name)
        ax.plot(metric.steps, metric.values, color=_MEAN_COLOR, lw=2.0, label=label)
        if trend:
            _plot_trend(ax, metric.steps, metric.values)
        _plot_alert_markers(ax, snapshot, metric)
        _mark_stop(ax, snapshot)
        _finish(ax, title, _ylabel(metric.name))
    return draw


def _multi_panel(snapshot: CollectorSnapshot, metrics: Sequence[MetricSnapshot], *, title: str,
                 ylabel: str) -> Panel:
    """A panel of several metrics: each mean in its own colour over its rank min–max band."""
    def draw(ax: Axes) -> None:
        for i, metric in enumerate(metrics):
            color = _color(i)
            if len(metric.history_by_rank) > 1:
                steps, low, high = _envelope(dict(metric.history_by_rank))
                ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
            ax.plot(metric.steps, metric.values, color=color, lw=1.8, label=_text(metric.name))
        _mark_stop(ax, snapshot)
        _finish(ax, title, ylabel)
    return draw


def _plot_ranks(ax: Axes, metric: MetricSnapshot) -> None:
    history = metric.history_by_rank
    if len(history) < 2:
        return
    if len(history) <= MAX_RANK_LINES:
        for i, rank in enumerate(sorted(history)):
            steps, values = history[rank]
            ax.plot(steps, values, color=_color(i), alpha=0.45, lw=1.0, label=f"rank {rank}")
        return
    steps, low, high = _envelope(dict(history))
    ax.fill_between(steps, low, high, color="0.55", alpha=0.3, lw=0,
                    label=f"{len(history)} ranks: min–max")


def _plot_trend(ax: Axes, steps: np.ndarray, values: np.ndarray) -> None:
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = np.isfinite(v)
    if keep.sum() < 2 or np.ptp(s[keep]) == 0:
        return
    slope, intercept = np.polyfit(s[keep], v[keep], 1)
    ends = np.array([s[keep][0], s[keep][-1]])
    ax.plot(ends, intercept + slope * ends, color=_TREND_COLOR, ls="--", lw=1.6,
            label=f"trend {slope:+.3g} / step")


def _draw_kl(ax: Axes, snapshot: CollectorSnapshot, kl: MetricSnapshot, *, ranks: bool) -> None:
    if ranks:
        _plot_ranks(ax, kl)
    count = len(kl.history_by_rank)
    ax.plot(kl.steps, kl.values, color=_MEAN_COLOR, lw=2.0,
            label=f"mean of {count} ranks" if count > 1 else _text(kl.name))
    threshold = snapshot.kl_threshold
    if math.isfinite(threshold) and threshold > 0:
        ax.axhline(threshold, color=_SEVERITY_COLOR["WARNING"], ls="--", lw=1.4,
                   label=f"warning threshold {threshold:g}")
        ax.axhline(2 * threshold, color=_SEVERITY_COLOR["CRITICAL"], ls="--", lw=1.4,
                   label=f"critical threshold {2 * threshold:g}")
    _plot_alert_markers(ax, snapshot, kl)
    _mark_stop(ax, snapshot)
    ylabel = "KL divergence"
    finite = _finite(kl.values)
    if math.isfinite(threshold) and threshold > 0 and finite.size \
            and finite.max() > 10 * threshold:  # a blow-up would flatten the thresholds
        _symlog_axis(ax, threshold, float(finite.max()), float(finite.min()))
        ylabel += f" (linear below {threshold:g}, log above)"
    _finish(ax, f"KL divergence ({_text(kl.name)})", ylabel)


def _symlog_axis(ax: Axes, linthresh: float, high: float, low: float) -> None:
    """Linear up to ``linthresh``, logarithmic above, with plain-number ticks at 1-2-5 steps."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.5)
    ticks, decade = [0.0, linthresh / 2, linthresh], linthresh
    while decade * 2 <= high * 1.5 and len(ticks) < 40:  # finite inputs only; bounded anyway
        ticks += [t for t in (decade * 2, decade * 5, decade * 10) if t <= high * 1.5]
        decade *= 10
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.set_ylim(min(0.0, low) if math.isfinite(low) else 0.0, high * 1.3)


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def _plot_alert_markers(ax: Axes, snapshot: CollectorSnapshot, metric: MetricSnapshot) -> None:
    """Mark the alerts about ``metric`` on its mean line (at the series' value at the alert's
    step: an alert's own ``value`` may be a score, not the metric)."""
    alerts = [a for a in snapshot.alerts if a.metric == metric.name]
    for severity in SEVERITIES:
        hits = [a for a in alerts if a.severity == severity]
        points = [(a.step, _value_at(metric, a.step)) for a in hits]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, s=70, zorder=5, marker=_SEVERITY_MARKER[severity],
                       color=_SEVERITY_COLOR[severity], edgecolors="black", linewidths=0.6,
                       label=f"{severity.lower()} alert ({len(points)})")


def _value_at(metric: MetricSnapshot, step: int) -> float:
    index = int(np.searchsorted(metric.steps, step))
    if index < len(metric.steps) and metric.steps[index] == step:
        return float(metric.values[index])
    return math.nan


def _draw_alert_timeline(ax: Axes, snapshot: CollectorSnapshot, span: tuple[float, float]) -> None:
    """Every alert the snapshot holds at (step, type), coloured by severity."""
    alerts = snapshot.alerts
    types = sorted({a.type for a in alerts})
    row = {kind: i for i, kind in enumerate(types)}
    totals = alert_totals(snapshot)
    for severity in SEVERITIES:
        hits = [a for a in alerts if _severity_name(a.severity) == severity]
        if hits:
            ax.scatter([a.step for a in hits], [row[a.type] for a in hits], s=70, zorder=5,
                       marker=_SEVERITY_MARKER[severity], color=_SEVERITY_COLOR[severity],
                       edgecolors="black", linewidths=0.6,
                       label=f"{severity} ({totals.get(severity, len(hits))} total)")
    ax.set_yticks(range(len(types)), [_text(_shorten(t, 22)) for t in types])
    ax.set_ylim(-0.7, max(len(types), 1) - 0.3)
    ax.set_xlim(*span)
    if not alerts:
        ax.text(0.5, 0.5, "no alerts", transform=ax.transAxes, ha="center", va="center",
                color="0.45", fontsize=12)
        ax.set_yticks([])
    _mark_stop(ax, snapshot)
    _finish(ax, f"Alerts over time ({len(alerts)} held)", "alert type")


def _draw_similarity(ax: Axes, comparisons: Mapping[str, Any]) -> None:
    """Each comparison's similarity to its baseline response, with the degradation threshold.

    Reads ``similarities`` (a sequence of floats) and, when present, ``steps`` (same length) and
    ``threshold`` from the comparator's mapping."""
    values = _similarity_series(comparisons)
    steps = comparisons.get("steps")
    has_steps = isinstance(steps, Sequence) and len(steps) == len(values)
    ax.plot(list(steps) if has_steps else range(len(values)), values, marker="o", ms=3,
            lw=1.2, color=_color(0), label="similarity")
    threshold = comparisons.get("threshold")
    if isinstance(threshold, (int, float)) and math.isfinite(threshold):
        ax.axhline(threshold, color=_SEVERITY_COLOR["WARNING"], ls="--",
                   label=f"degraded below {threshold:g}")
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "Sample similarity to baseline", "similarity (0–1)",
            xlabel="step" if has_steps else "comparison")


def _similarity_series(comparisons: Mapping[str, Any]) -> list[float] | None:
    values = comparisons.get("similarities")
    if isinstance(values, Sequence) and not isinstance(values, str) and len(values):
        return [float(v) for v in values]
    return None


def _similarity_summary(comparisons: Mapping[str, Any]) -> str:
    """``\nsample similarity 0.958 over 22 comparisons, 0 degraded`` or ``""``."""
    average = comparisons.get("avg_similarity")
    if not isinstance(average, (int, float)) or not math.isfinite(average):
        return ""
    forgetting = "catastrophic forgetting" if comparisons.get("catastrophic_forgetting") \
        else "no forgetting"
    return (f"\nsample similarity to baseline {average:.3f} over "
            f"{comparisons.get('num_comparisons', '?')} comparisons, "
            f"{comparisons.get('degraded_count', '?')} degraded, {forgetting}")


# --- GRPO reward-function panels -------------------------------------------------------------------

def _history_panel(name: str, values: np.ndarray, steps: Sequence[int] | None, index: int,
                   alerts: Sequence[tuple[int, str]]) -> Panel:
    has_steps = steps is not None and len(steps) == len(values)

    def draw(ax: Axes) -> None:
        x = np.asarray(steps if has_steps else range(len(values)), dtype=np.float64)
        color = _color(index)
        ax.plot(x, values, color=color, alpha=0.35, lw=1.0, label="per-step mean")
        ax.plot(x, ema_series(values), color=color, lw=2.2, label=f"EMA (span {EMA_SPAN})")
        for severity in SEVERITIES if has_steps else ():
            wanted = np.array([step for step, sev in alerts if _severity_name(sev) == severity])
            at = np.flatnonzero(np.isin(x, wanted) & np.isfinite(values))
            if at.size:
                ax.scatter(x[at], values[at], s=60, zorder=5, marker=_SEVERITY_MARKER[severity],
                           color=_SEVERITY_COLOR[severity], edgecolors="black", linewidths=0.6,
                           label=f"{severity.lower()} alert ({at.size})")
        _finish(ax, _text(name), "reward", xlabel="step" if has_steps else "record")
    return draw


def _histogram_panel(name: str, metric: MetricSnapshot, index: int) -> Panel | None:
    pieces = [v for _, v in metric.history_by_rank.values()] or [metric.values]
    values = np.concatenate([np.asarray(p, dtype=np.float64) for p in pieces])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None

    def draw(ax: Axes) -> None:
        bins = min(40, max(5, len(np.histogram_bin_edges(values, bins="auto")) - 1))
        ax.hist(values, bins=bins, color=_color(index), alpha=0.75, edgecolor="white")
        ax.axvline(values.mean(), color=_MEAN_COLOR, lw=1.6, label=f"mean {values.mean():.3g}")
        ax.axvline(np.median(values), color=_MEAN_COLOR, ls="--", lw=1.4,
                   label=f"median {np.median(values):.3g}")
        ax.set_title(_text(name))
        ax.set_xlabel("reward (one rank's mean at one step)")
        ax.set_ylabel("count (rank-steps)")
        ax.legend(loc="best")
    return draw


def _draw_mean_std(ax: Axes, names: list[str], stats: list[Any]) -> None:
    y = np.arange(len(names))
    ax.barh(y, [s.mean for s in stats], xerr=[s.std for s in stats], color=[_color(i) for i in y], alpha=0.8,
            capsize=4, error_kw={"elinewidth": 1.2})
    for yi, s in zip(y, stats):
        right = max(s.mean, s.mean + s.std) if math.isfinite(s.std) else s.mean
        ax.annotate(f"{s.mean:.3g} ± {s.std:.2g}", (right, yi), xytext=(5, 0),
                    textcoords="offset points", va="center", fontsize=8.5)
    ax.margins(x=0.15)
    ax.set_yticks(y, [_text(n) for n in names])
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_title("Mean ± std")
    ax.set_xlabel("reward")


def _draw_percentiles(ax: Axes, names: list[str], stats: list[Any]) -> None:
    y = np.arange(len(names))
    for yi, s in zip(y, stats):
        ax.plot([s.min, s.max], [yi, yi], color="0.6", lw=1.0, zorder=1)
        ax.plot([s.p25, s.p75], [yi, yi], color=_color(int(yi)), lw=11, alpha=0.6,
                solid_capstyle="butt", zorder=2)
    ax.scatter([s.median for s in stats], y, marker="|", s=260, color="black", zorder=3,
               label="median")
    ax.scatter([s.p90 for s in stats], y, marker="D", s=36, color=_SEVERITY_COLOR["CRITICAL"],
               zorder=3, label="p90")
    ax.plot([], [], color="0.45", lw=8, alpha=0.6, label="p25–p75")
    ax.plot([], [], color="0.6", lw=1.0, label="min–max")
    ax.set_yticks(y, [_text(n) for n in names])
    ax.tick_params(axis="y", labelleft=False)
    ax.invert_yaxis()
    ax.set_title("Percentiles")
    ax.set_xlabel("reward")


# --- helpers --------------------------------------------------------------------------------------

def _panel_figure(panels: Sequence[Panel], title: str | None, *,
                  size: tuple[float, float] | None = None) -> Figure | None:
    """A figure with one subplot per panel, two columns when there are several."""
    if not panels:
        return None
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, size=size or (7.0 * ncols, 4.0 * nrows + 0.4))
    for ax, draw in zip(axes, panels):
        draw(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def _figure(nrows: int, ncols: int, *, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def _empty_panel(title: str, why: str) -> Panel:
    def draw(ax: Axes) -> None:
        ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.45",
                fontsize=12)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    return draw


def _finish(ax: Axes, title: str, ylabel: str, *, xlabel: str = "step") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def _mark_stop(ax: Axes, snapshot: CollectorSnapshot) -> None:
    stop = snapshot.stop
    if stop is not None and stop.stop_at_step >= 0:
        ax.axvline(stop.stop_at_step, color=_STOP_COLOR, ls=":", lw=1.6,
                   label=f"stop at step {stop.stop_at_step}")


def _envelope(history: Mapping[int, tuple[np.ndarray, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step (steps, min, max) across ranks' series, NaN-aware."""
    steps = np.concatenate([np.asarray(s, dtype=np.float64) for s, _ in history.values()])
    values = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in history.values()])
    if steps.size == 0:
        return steps, values, values
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    unique, starts = np.unique(steps, return_index=True)
    return unique, np.fmin.reduceat(values, starts), np.fmax.reduceat(values, starts)


def _present(snapshot: CollectorSnapshot, names: Sequence[str]) -> list[MetricSnapshot]:
    """The metrics among ``names`` that have history, in ``names`` order."""
    found = (snapshot.metrics.get(name) for name in names)
    return [m for m in found if m is not None and len(m.steps)]


def _first(snapshot: CollectorSnapshot, names: Sequence[str]) -> MetricSnapshot | None:
    present = _present(snapshot, names)
    return present[0] if present else None


def _step_span(snapshot: CollectorSnapshot) -> tuple[float, float]:
    """The x range every step axis of a figure shares: first to last step (or stop step)."""
    firsts = [float(m.steps[0]) for m in snapshot.metrics.values() if len(m.steps)]
    lasts = [float(m.steps[-1]) for m in snapshot.metrics.values() if len(m.steps)]
    lasts += [float(a.step) for a in snapshot.alerts]
    if snapshot.stop is not None and snapshot.stop.stop_at_step >= 0:
        lasts.append(float(snapshot.stop.stop_at_step))
    low, high = min(firsts, default=0.0), max(lasts, default=1.0)
    pad = max(1.0, 0.02 * (high - low))
    return low - pad, high + pad


def _last_step(snapshot: CollectorSnapshot) -> int:
    steps = [r.last_step for r in snapshot.ranks.values()]
    steps += [int(m.steps[-1]) for m in snapshot.metrics.values() if len(m.steps)]
    return max(steps, default=0)


def _severity_name(severity: str) -> str:
    """One of :data:`SEVERITIES` (unknown severities are drawn as INFO)."""
    return severity if severity in SEVERITIES else SEVERITIES[0]


def _ylabel(name: str) -> str:
    if name.startswith("span/") or name.endswith(("_seconds", "_time_s")):
        return "seconds"
    if name.endswith("loss"):
        return "loss"
    return _UNITS.get(name, _text(name))


def _title(name: str) -> str:
    return _text(name.replace("_", " ").capitalize()) if "/" not in name else _text(name)


def _text(text: object) -> str:
    """User text safe for matplotlib: ``$`` escaped so it is never parsed as mathtext."""
    return str(text).replace("$", r"\$")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _color(index: int) -> str:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#17becf", "#e377c2", "#8c564b",
               "#bcbd22", "#7f7f7f", "#d62728")
    return palette[index % len(palette)]


def _style(style: str) -> Any:
    import matplotlib.style as mstyle

    base = style if style in mstyle.available else "default"
    return mstyle.context([base, _RC])


def _png(build: Callable[..., "Figure | None"], *args: Any, dpi: int) -> bytes | None:
    """Build a figure and render it to PNG bytes; ``None`` when it had nothing to draw or failed
    (logged). The figure is cleared afterwards so nothing holds its artists."""
    try:
        fig = build(*args)
        if fig is None:
            return None
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png", dpi=dpi)
        finally:
            fig.clear()
    except Exception:  # one broken plot must not cost the others
        log.exception("plot %s failed and was skipped", getattr(build, "__name__", build))
        return None
    return buffer.getvalue()


def _matplotlib_or_warn() -> bool:
    global _warned_missing
    if plots_available():
        return True
    if not _warned_missing:
        _warned_missing = True
        log.warning(MISSING_MATPLOTLIB_MESSAGE)
    return False
