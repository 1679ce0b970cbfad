"""The GRPO reward-monitoring guide's API on rlmon: ``setup_grpo_monitoring``,
``GRPOMonitoringIntegration``, ``RewardMonitor`` and ``RewardMetricsLogger``.

Where the guide computes statistics in the training process, here the rank only sends: wrapped
reward functions send their values, time and errors with the rank's next ``log``
(:mod:`rlmon.rewards`); the collector keeps each function's window of individual values, computes
the statistics (:mod:`collector.reward_stats`) and runs the anomaly detectors (OUTLIER, DROP,
SPIKE, FLATLINE, NEGATIVE over the per-step means ``rewards/<name>``). With no ``RLMON_ENDPOINT``
the embedded collector is started, writing into ``output_dir``; under ``rlmon launch`` the
launched collector is used (and its own flags and ``--out`` apply).

Every method that returns statistics asks the collector (question ``rewards``): a round trip of
tens of milliseconds, bounded by :data:`QUERY_TIMEOUT`, never on the reward functions' path. The
integration asks only every ``log_frequency`` steps (when a W&B run takes the metrics), every
``summary_frequency`` steps (the console summary) and at ``finalize``. Thread affinity: the
training thread. Nothing here raises because of the collector; a missing answer reads as empty
statistics.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rlmon.config import RankConfig
from rlmon.monitor import Monitor, NullMonitor
from rlmon.rewards import reward_floats
from rlmon.seed.reward_visualizer import ALERT_TYPES, RewardVisualizer

log = logging.getLogger("rlmon")

QUERY_TIMEOUT = 10.0
"""Seconds a question waits for the collector before it is answered "unknown"."""
MAX_ALERTS = 1000
"""Most recent reward alerts fetched with each answer (``RewardMonitor.all_alerts``)."""
HISTORY_POINTS = 10_000
"""Per-step means fetched per function for the history plots and ``monitoring_data.json``."""
DEFAULT_OUTPUT_DIR = "./reward_monitoring"
"""Where the integration writes its files when no ``output_dir`` is given."""
REWARD_RULES = ("reward_outlier", "reward_drop", "reward_spike", "reward_flatline",
                "reward_negative")
"""The collector rules behind the guide's alert types (disabled with anomaly detection off)."""
STAT_KEYS = ("mean", "std", "min", "max", "median", "p25", "p75", "p90", "ema_short", "ema_long",
             "positive_fraction", "negative_fraction", "zero_fraction")
"""Per-function statistics in ``get_metrics_dict`` as ``<name>/<key>``."""
SEPARATOR = "=" * 80


class RewardMonitor:
    """The guide's ``RewardMonitor``: reward values in, the collector's statistics and alerts out.

    ``window_size`` values per function are described (at most the collector's window, 1,000 by
    default). ``monitor`` is the rank monitor to send through; by default ``rlmon.init()``'s when
    one is open, else one started here (an embedded collector writing into ``output_dir`` when
    no ``RLMON_ENDPOINT`` is set, with ``collector_args`` as its flags), closed by :meth:`close`
    or at exit. After ``close`` the statistics are the last ones fetched."""

    def __init__(self, reward_names: Sequence[str] | None = None, window_size: int = 1000,
                 enable_anomaly_detection: bool = True, *, output_dir: str | Path | None = None,
                 monitor: Monitor | NullMonitor | None = None,
                 collector_args: Sequence[str] = ()) -> None:
        if window_size < 1:
            raise ValueError("window_size must be >= 1")
        self.reward_names = list(reward_names or [])
        self.window_size = int(window_size)
        self.enable_anomaly_detection = bool(enable_anomaly_detection)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.collector_args = list(collector_args)
        if not self.enable_anomaly_detection:
            self.collector_args += [a for rule in REWARD_RULES
                                    for a in ("--rule", f"{rule}.enabled=false")]
        self._mon = monitor
        self._owns_monitor = False
        self._answer: dict[str, Any] | None = None
        self._closed = False
        self._last_step = -1

    # -- sending -----------------------------------------------------------------------------------

    def update(self, rewards: Mapping[str, Any], step: int | None = None) -> dict[str, dict]:
        """Send each function's value (or values: a list, array or tensor) for ``step`` (default:
        the last step + 1), with their mean as ``rewards/<name>`` for the detectors; return the
        statistics per function afterwards (one round trip to the collector)."""
        step = self._last_step + 1 if step is None else int(step)
        self._last_step = step
        mon = self.rank_monitor()
        means = {}
        for name, values in rewards.items():
            if name not in self.reward_names:
                self.reward_names.append(name)
            floats = reward_floats(values)
            finite = [v for v in floats if v is not None and math.isfinite(v)]
            mon.log_reward_values(step, name, floats)
            if finite:
                means[f"rewards/{name}"] = sum(finite) / len(finite)
        mon.log(step, means)
        self._answer = None
        return self.get_statistics()

    def rank_monitor(self) -> Monitor | NullMonitor:
        """The rank monitor this sends through (started on first use; after :meth:`close`
        without one, a disabled one)."""
        if self._mon is None:
            if self._closed:
                return NullMonitor()
            self._mon = _current_monitor()
            if self._mon is None:
                self._mon = _start_monitor(self.output_dir, self.collector_args)
                self._owns_monitor = True
                if not self._closed:
                    atexit.register(self.close)
        return self._mon

    @property
    def started(self) -> bool:
        """Whether a rank monitor is in use (it starts on the first update or question)."""
        return self._mon is not None

    # -- reading -----------------------------------------------------------------------------------

    def refresh(self) -> dict[str, Any]:
        """Ask the collector now; return its ``rewards`` answer. Without an answer in time the
        last one stays (empty before any), and is not asked for again until the next update."""
        if not self._closed:
            answer = self.rank_monitor().query("rewards", QUERY_TIMEOUT, n=MAX_ALERTS,
                                               window=self.window_size)
            if answer is not None and "error" not in answer:
                self._answer = answer
            elif answer is not None:
                log.warning("rlmon: the collector could not answer: %s", answer["error"])
        if self._answer is None:
            self._answer = {}
        return self._answer

    def _current(self) -> dict[str, Any]:
        return self._answer if self._answer is not None else self.refresh()

    def get_statistics(self, name: str | None = None) -> dict[str, Any]:
        """Statistics of every function (or of ``name``): count, mean, std, min, max, median,
        p25/p75/p90, EMAs, sign fractions, histogram, calls, errors, avg_time_ms."""
        functions = self._current().get("functions", {})
        return dict(functions.get(name, {})) if name is not None else dict(functions)

    def get_metrics_dict(self) -> dict[str, Any]:
        """The guide's flat metrics: ``<name>/mean`` ... ``<name>/histogram`` (``edges``,
        ``counts``), ``rewards/total_mean``, ``rewards/total_std``, ``rewards/sum``,
        ``reward_fn/<name>/calls|errors|avg_time_ms``, ``alerts/<TYPE>`` and ``alerts/total``."""
        answer = self._current()
        metrics: dict[str, Any] = {}
        for name, stats in sorted(answer.get("functions", {}).items()):
            metrics.update({f"{name}/{key}": stats[key] for key in STAT_KEYS})
            metrics[f"{name}/count"] = stats["count"]
            metrics[f"{name}/histogram"] = stats["histogram"]
            for key in ("calls", "errors", "avg_time_ms"):
                metrics[f"reward_fn/{name}/{key}"] = stats.get(key)
        for key in ("total_mean", "total_std", "sum"):
            metrics[f"rewards/{key}"] = answer.get(key, math.nan)
        counts = self.alert_counts
        metrics.update({f"alerts/{kind}": counts[kind] for kind in ALERT_TYPES})
        metrics["alerts/total"] = sum(counts.values())
        return metrics

    @property
    def alert_counts(self) -> dict[str, int]:
        """Reward alerts raised so far, by type (0 for every type with detection off)."""
        counts = self._current().get("alert_counts", {})
        on = self.enable_anomaly_detection
        return {kind: int(counts.get(kind, 0)) if on else 0 for kind in ALERT_TYPES}

    @property
    def all_alerts(self) -> list[dict[str, Any]]:
        """The reward alerts, oldest first (the last :data:`MAX_ALERTS`): ``type``, ``message``,
        ``step``, ``severity``, ``reward_name``, ``metric``, ``value``, ``threshold``, ``time``."""
        if not self.enable_anomaly_detection:
            return []
        return [{**alert, "reward_name": alert["metric"].removeprefix("rewards/")}
                for alert in self._current().get("alerts", [])]

    def history(self) -> tuple[list[int], dict[str, list[float | None]]]:
        """The per-step means of every function as ``(steps, {name: values})`` on one step axis
        (``None`` where a function has no value at a step), from the collector."""
        series: dict[str, dict[int, float]] = {}
        for name in sorted(set(self.reward_names) | set(self.get_statistics())):
            answer = None if self._closed else self.rank_monitor().query(
                "metrics", QUERY_TIMEOUT, name=f"rewards/{name}", n=HISTORY_POINTS)
            metric = (answer or {}).get("metrics", {}).get(f"rewards/{name}")
            if metric:
                series[name] = dict(zip(metric["steps"], metric["values"]))
        steps = sorted({s for points in series.values() for s in points})
        return steps, {name: [_finite_or_none(points.get(s)) for s in steps]
                       for name, points in series.items()}

    def close(self) -> None:
        """Keep the last statistics; close the rank monitor if it was started here (an embedded
        collector then writes its reports). Idempotent."""
        if self._closed:
            return
        if self._mon is not None:
            self.refresh()
        self._closed = True
        if self._owns_monitor and self._mon is not None:
            self._mon.close()


class RewardMetricsLogger:
    """The guide's ``RewardMetricsLogger``: logs metric rows to the active W&B run.

    With ``use_wandb`` and a run started by ``wandb.init()`` in this process, :meth:`log_step`
    calls ``run.log(metrics, step=step)`` (``<name>/histogram`` maps become ``wandb.Histogram``
    unless ``log_histograms`` is false; non-numbers and NaN are left out). Without an active run
    (or without wandb) nothing is sent and one warning is logged: the integration then has the
    collector write the run as an offline W&B run under ``output_dir/wandb`` instead. wandb is
    never imported here; failures are logged, never raised."""

    def __init__(self, use_wandb: bool = True, log_histograms: bool = True) -> None:
        self.use_wandb = bool(use_wandb)
        self.log_histograms = bool(log_histograms)
        self.last_logged: dict[str, Any] = {}
        self.rows_logged = 0
        self._warned = False

    def wandb_run(self) -> Any:
        """The active W&B run of this process, or None."""
        wandb = sys.modules.get("wandb")
        return getattr(wandb, "run", None) if self.use_wandb and wandb is not None else None

    def log_step(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Log one row for ``step``; True when W&B took it."""
        self.last_logged = dict(metrics)
        run = self.wandb_run()
        if run is None:
            if self.use_wandb and not self._warned:
                self._warned = True
                log.warning("rlmon: use_wandb is set but no W&B run is active (call "
                            "wandb.init() first); reward metrics are not sent to W&B")
            return False
        try:
            run.log(self._row(metrics), step=int(step))
        except Exception:
            log.warning("rlmon: W&B logging failed at step %s", step, exc_info=True)
            return False
        self.rows_logged += 1
        return True

    def _row(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if isinstance(value, Mapping) and key.endswith("/histogram"):
                if self.log_histograms and value.get("counts"):
                    wandb = sys.modules["wandb"]
                    row[key] = wandb.Histogram(np_histogram=(value["counts"], value["edges"]))
            elif _finite(value):
                row[key] = value
        return row


class GRPOMonitoringIntegration:
    """The guide's integration: wraps the reward functions, follows the steps, prints summaries,
    writes the output files.

    ``get_wrapped_reward_functions()`` returns functions with the same names (``reward_names``
    when given), signatures and return values (usable as TRL ``reward_funcs``); exceptions
    propagate and are counted. Call ``update_step(step)`` after each step's rewards; until it is
    first called, a second call of the same function starts a new step (so a trainer that only
    calls the functions still gets per-step series). ``finalize()`` writes the guide's files
    into ``output_dir``. The embedded collector also writes ``dashboard_step_N.png`` and
    ``summary_step_N.html`` every ``visualization_frequency`` steps."""

    def __init__(self, reward_functions: Sequence[Callable],
                 reward_names: Sequence[str] | None = None, use_wandb: bool = False,
                 enable_anomaly_detection: bool = True, log_frequency: int = 10,
                 summary_frequency: int = 100, visualization_frequency: int = 500,
                 output_dir: str | Path = DEFAULT_OUTPUT_DIR, verbose: bool = True,
                 window_size: int = 1000, log_histograms: bool = True) -> None:
        self.reward_functions = list(reward_functions)
        names = reward_names or [getattr(f, "__name__", f"reward_{i}")
                                 for i, f in enumerate(self.reward_functions)]
        if len(names) != len(self.reward_functions) or len(set(names)) != len(names):
            raise ValueError("reward_names must name each reward function once")
        if min(log_frequency, summary_frequency, visualization_frequency) < 0:
            raise ValueError("frequencies must be >= 0 (0: never)")
        self.reward_names = list(names)
        self.log_frequency, self.summary_frequency = log_frequency, summary_frequency
        self.visualization_frequency = visualization_frequency
        self.output_dir = Path(output_dir)
        self.verbose = verbose
        self.metrics_logger = RewardMetricsLogger(use_wandb, log_histograms)
        self.visualizer = RewardVisualizer(self.output_dir)
        self.reward_monitor = RewardMonitor(self.reward_names, window_size,
                                            enable_anomaly_detection, output_dir=self.output_dir,
                                            collector_args=self._collector_args(use_wandb))
        self.current_step = -1
        self._wrapped: list[Callable] | None = None
        self._explicit_steps = False
        self._called: set[str] = set()
        self._alerts_shown = 0
        self._finalized: list[Path] | None = None
        self._announce()

    def _collector_args(self, use_wandb: bool) -> list[str]:
        args = ["--visualization-frequency", str(self.visualization_frequency)]
        if use_wandb and self.metrics_logger.wandb_run() is None:
            if importlib.util.find_spec("wandb") is not None:
                args.append("--wandb")  # the collector's sink writes an offline W&B run
            else:
                log.warning("rlmon: use_wandb is set but wandb is not installed")
        return args

    def _announce(self) -> None:
        if self.verbose:
            print(f"rlmon: reward monitoring of {', '.join(self.reward_names)}; "
                  f"files in {self.output_dir}")

    # -- the trainer's side -----------------------------------------------------------------------

    def get_wrapped_reward_functions(self) -> list[Callable]:
        """The reward functions, wrapped (the same list on every call)."""
        if self._wrapped is None:
            mon = self.reward_monitor.rank_monitor()
            inner = mon.wrap_rewards(self.reward_functions, self.reward_names)
            self._wrapped = [self._counting_steps(f, n) for f, n in zip(inner, self.reward_names)]
        return list(self._wrapped)

    def _counting_steps(self, function: Callable, name: str) -> Callable:
        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self._explicit_steps:
                if name in self._called:
                    self._finish_step(self.current_step)
                    self._called.clear()
                if not self._called:
                    self.current_step += 1
                self._called.add(name)
            return function(*args, **kwargs)
        return wrapped

    def update_step(self, step: int) -> None:
        """Close ``step``: its rewards, counts and times go to the collector; every
        ``log_frequency`` steps the metrics go to W&B, every ``summary_frequency`` steps the
        summary is printed. Cheap except on those steps (one round trip each)."""
        self._explicit_steps = True
        self._finish_step(int(step))

    def _finish_step(self, step: int) -> None:
        self.current_step = step
        mon = self.reward_monitor.rank_monitor()
        mon.log(step, {})  # carries what the wrapped functions attached this step
        if _due(step, self.log_frequency) and self.metrics_logger.wandb_run() is not None:
            self.reward_monitor.refresh()
            self.metrics_logger.log_step(self.reward_monitor.get_metrics_dict(), step)
        if self.verbose and step > 0 and _due(step, self.summary_frequency) and mon.rank == 0:
            self.print_summary(step)

    def print_summary(self, step: int | None = None) -> None:
        """Print the guide's console summary (fresh statistics; alerts since the last one)."""
        answer = self.reward_monitor.refresh()
        if not answer:  # monitoring disabled, or no answer in time
            return
        alerts = self.reward_monitor.all_alerts
        print(format_summary(answer, self.current_step if step is None else step,
                             alerts[self._alerts_shown:][-10:]))
        self._alerts_shown = len(alerts)

    # -- the end -----------------------------------------------------------------------------------

    def finalize(self) -> list[Path]:
        """Send the last step, fetch the final statistics, close the rank monitor (the embedded
        collector writes its reports into ``output_dir``) and write the guide's files there (on
        rank 0; nothing with monitoring disabled). Returns the paths written here. Idempotent."""
        if self._finalized is not None:
            return self._finalized
        if not self.reward_monitor.started:  # never used: nothing to send, nothing to write
            self.reward_monitor.close()
            self._finalized = []
            return self._finalized
        if not self._explicit_steps and self._called:
            self._finish_step(self.current_step)
        answer = self.reward_monitor.refresh()
        steps, history = self.reward_monitor.history()
        alerts = self.reward_monitor.all_alerts
        mon = self.reward_monitor.rank_monitor()
        if self.verbose and mon.rank == 0 and answer:
            print(format_summary(answer, self.current_step, alerts[self._alerts_shown:][-10:]))
        self.reward_monitor.close()
        writes = mon.rank == 0 and not isinstance(mon, NullMonitor)
        self._finalized = self._write_files(answer, steps, history, alerts) if writes else []
        return self._finalized

    def _write_files(self, answer: dict, steps: list[int], history: dict,
                     alerts: list[dict]) -> list[Path]:
        """Per-sample distributions and statistics always (replacing the collector's, drawn from
        per-step means); the other files where the collector did not write them."""
        out, viz = self.output_dir, self.visualizer
        out.mkdir(parents=True, exist_ok=True)
        written = [viz.plot_reward_distributions(answer, out / "reward_distributions.png"),
                   viz.plot_reward_statistics(answer, out / "reward_statistics.png")]
        if not (out / "reward_history.png").exists():
            written.append(viz.plot_reward_history(history, out / "reward_history.png", steps))
        if not (out / "final_dashboard.png").exists():
            written.append(viz.create_dashboard(answer, history, alerts,
                                                out / "final_dashboard.png", steps))
        if not (out / "monitoring_data.json").exists():
            written.append(_write_data(out / "monitoring_data.json", answer, steps, history,
                                       alerts))
        if not (out / "final_summary.html").exists():
            images = {name: out / f"{name}.png" for name in
                      ("final_dashboard", "reward_history", "reward_distributions",
                       "reward_statistics")}
            written.append(viz.create_html_summary(answer, alerts, out / "final_summary.html",
                                                   images, links=["monitoring_data.json"]))
        return [path for path in written if path is not None]


def setup_grpo_monitoring(reward_functions: Sequence[Callable], use_wandb: bool = False,
                          enable_anomaly_detection: bool = True, log_frequency: int = 10,
                          summary_frequency: int = 100, visualization_frequency: int = 500,
                          output_dir: str | Path = DEFAULT_OUTPUT_DIR, verbose: bool = True,
                          **kwargs: Any) -> GRPOMonitoringIntegration:
    """The guide's one-call setup: a :class:`GRPOMonitoringIntegration` with these settings
    (``kwargs``: ``reward_names``, ``window_size``, ``log_histograms``)."""
    return GRPOMonitoringIntegration(
        reward_functions, use_wandb=use_wandb, enable_anomaly_detection=enable_anomaly_detection,
        log_frequency=log_frequency, summary_frequency=summary_frequency,
        visualization_frequency=visualization_frequency, output_dir=output_dir, verbose=verbose,
        **kwargs)


def format_summary(answer: Mapping[str, Any], step: int, alerts: Sequence[Mapping]) -> str:
    """The guide's console summary of a ``rewards`` answer at ``step``, with ``alerts``."""
    lines = [SEPARATOR, f"Reward Monitoring Summary (Step {step})", SEPARATOR]
    for name, s in sorted(answer.get("functions", {}).items()):
        lines += ["", f"{name}:",
                  f"  Mean: {_f(s['mean'])} ± {_f(s['std'])}",
                  f"  Range: [{_f(s['min'])}, {_f(s['max'])}]",
                  f"  Median: {_f(s['median'])}",
                  f"  Percentiles: P25={_f(s['p25'])}, P75={_f(s['p75'])}, P90={_f(s['p90'])}",
                  f"  EMAs: Short={_f(s['ema_short'])}, Long={_f(s['ema_long'])}",
                  f"  Distribution: {_p(s['positive_fraction'])} positive, "
                  f"{_p(s['negative_fraction'])} negative, {_p(s['zero_fraction'])} zero",
                  f"  Samples: {s['count']}"]
    if alerts:
        lines.append("")
    lines += [f"⚠️  Step {a['step']}: {a['message']}" for a in alerts]
    lines.append(SEPARATOR)
    return "\n".join(lines)


def _current_monitor() -> Monitor | NullMonitor | None:
    """``rlmon.init()``'s monitor when it is open."""
    import rlmon

    current = rlmon.get()
    return None if current is None or getattr(current, "_closed", False) else current


def _start_monitor(output_dir: Path | None, collector_args: Sequence[str]
                   ) -> Monitor | NullMonitor:
    """A rank monitor through rlmon's own start-up (an embedded collector, waited for, when no
    ``RLMON_ENDPOINT`` is set)."""
    from rlmon import _start

    overrides = {} if output_dir is None else {"out_dir": str(output_dir)}
    return _start(RankConfig.from_env(**overrides), list(collector_args), wait_until_ready=True)


def _write_data(path: Path, answer: Mapping[str, Any], steps: list[int], history: dict,
                alerts: list[dict]) -> Path:
    """This process's ``monitoring_data.json`` (when the collector writes its own elsewhere)."""
    from exporters.atomic import atomic_write_text

    data = {"schema": "rlmon.grpo_monitoring_data/1", "steps": steps, "history": history,
            "reward_statistics": answer, "alerts": alerts}
    return atomic_write_text(path, json.dumps(_jsonable(data), allow_nan=False) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _due(step: int, frequency: int) -> bool:
    return frequency > 0 and step % frequency == 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if _finite(value) else None


def _f(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else "n/a"


def _p(value: Any) -> str:
    return f"{100 * value:.1f}%" if _finite(value) else "n/a"

