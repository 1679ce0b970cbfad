"""``rlmon top DIR``: a live terminal view of a running collector (also shown by ``rlmon launch``).

Where the numbers come from, and what they cost the collector
-------------------------------------------------------------
The view reads only what the collector already publishes, never its receive loop:

* ``DIR/collector.json`` — where ``/metrics`` is served and the collector's pid;
* ``GET /metrics`` — rendered by prometheus_client's server thread from the latest immutable
  snapshot, which the collector takes four times a second whether anyone looks or not. The view
  times every scrape and waits at least ``1 / duty_cycle`` times as long before the next one, so
  it keeps the collector's scrape thread busy at most 1 % of the time however large the run is;
* ``DIR/alerts.jsonl`` — every alert as it fired (a file read: the collector pays nothing);
* ``DIR/callbacks.json`` — the counters of the ``--callback`` process, when there is one.

Per-rank steps/s are computed here from successive ``rlmon_rank_last_step`` readings; trend
arrows come from the collector's window statistics of the cross-rank mean series (the last
``stats_window`` points), with the same rule as the reports' arrows
(:func:`exporters.reports.trend_arrow`). The progress bar needs a step count: ``--total-steps N``,
or a metric named ``total_steps`` (or ``max_steps``) that the run logs once.

On a terminal the view redraws in place (rich); anywhere else (CI logs, pipes) it prints one plain
status line every ``plain_interval`` seconds and one line per alert as it fires. It needs
``rich`` and ``prometheus_client`` (``pip install 'rlmon[collector]'``). Nothing here raises for
a collector that is slow, restarting or gone: the view says so instead.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from rlmon.errors import CollectorUnavailable, ConfigError
from rlmon.processes import process_alive

log = logging.getLogger("rlmon")

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Parsed ``/metrics`` text: sample name → ``[(labels, value), ...]``."""

KEY_METRICS = ("reward", "reward_mean", "kl", "kl_div", "kl_divergence", "loss", "policy_loss",
               "value_loss", "entropy", "response_length", "completion_length", "clip_fraction",
               "grad_norm", "frac_reward_zero_std", "learning_rate")
"""Metrics listed first, in this order, when present; then ``rewards/*``; then the rest by name."""
TOTAL_STEP_METRICS = ("total_steps", "max_steps")
"""A run announces its step count by logging one of these; it becomes the progress bar's total."""
RECENT_ALERTS = 6
"""Alerts kept for the view (most recent last)."""


@dataclass(kw_only=True, slots=True)
class TopOptions:
    """Settings of the view (``rlmon top`` flags)."""

    interval: float = 1.0
    """Seconds between reads on a terminal (raised when a scrape is slow, see ``duty_cycle``)."""
    plain_interval: float = 5.0
    """Seconds between status lines when the output is not a terminal."""
    total_steps: int | None = None
    """The run's step count, for the progress bar (else announced by the run, else none)."""
    max_metrics: int = 12
    """Most metrics shown."""
    once: bool = False
    """Print one view and return."""
    wait: float = 10.0
    """Seconds to wait for ``collector.json`` and a first answer before giving up."""
    duty_cycle: float = 0.01
    """Largest share of time the collector's scrape thread may spend serving this view."""

    def __post_init__(self) -> None:
        for name in ("interval", "plain_interval", "wait", "duty_cycle"):
            if not getattr(self, name) > 0:
                raise ConfigError("--" + name.replace("_", "-"), "must be > 0")
        if self.total_steps is not None and self.total_steps < 1:
            raise ConfigError("--total-steps", "must be >= 1")
        if self.max_metrics < 1:
            raise ConfigError("--max-metrics", "must be >= 1")


@dataclass(frozen=True, slots=True)
class MetricRow:
    """One logged metric: ``value`` is the cross-rank mean of the last completed step (else the
    latest value seen); ``mean``/``min``/``max`` are over the collector's window; ``arrow`` is
    ↑, ↓, → or – (see the module docstring)."""

    name: str
    value: float
    step: int
    mean: float
    min: float
    max: float
    arrow: str


@dataclass(frozen=True, slots=True)
class RankRow:
    """One rank: last step, when it was last heard from (Unix seconds), its dropped events and
    its step rate over the last few seconds (NaN until two readings apart)."""

    rank: int
    step: int
    last_seen: float
    closed: bool
    dropped: int
    steps_per_second: float = math.nan


@dataclass(frozen=True, slots=True)
class StopView:
    """The coordinated stop state, as ``/metrics`` shows it."""

    generation: int
    at_step: int
    reason: str
    severity: str
    source: str
    acked: int


@dataclass(frozen=True, slots=True)
class TopView:
    """Everything one frame of the view shows. ``error`` is non-empty when there is no fresh data
    (then the rest is the last data known, or empty)."""

    run_dir: str = ""
    run_id: str = ""
    world_size: int = 0
    started_at: float = math.nan
    taken_at: float = math.nan
    finished: bool = False
    alive: bool = True
    ranks: tuple[RankRow, ...] = ()
    ranks_known: int = 0
    per_rank: bool = True
    metrics: tuple[MetricRow, ...] = ()
    total_steps: int | None = None
    steps_per_second: float = math.nan
    rejected: Mapping[str, float] = field(default_factory=dict)
    dropped: Mapping[str, float] = field(default_factory=dict)
    flagged: Mapping[str, float] = field(default_factory=dict)
    alert_counts: Mapping[str, int] = field(default_factory=dict)
    firing: tuple[tuple[str, str, str], ...] = ()
    stop: StopView | None = None
    alerts: tuple[dict[str, Any], ...] = ()
    new_alerts: tuple[dict[str, Any], ...] = ()
    callbacks: Mapping[str, Any] = field(default_factory=dict)
    scrape_seconds: float = math.nan
    interval: float = math.nan
    error: str = ""

    @property
    def max_step(self) -> int:
        """The furthest step any rank reported (-1 before any)."""
        return max((r.step for r in self.ranks), default=-1)


# -- /metrics text → TopView ---------------------------------------------------------------------


def parse_exposition(text: str) -> Samples:
    """Prometheus text exposition → samples by name (counters keep their ``_total`` suffix)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _one(samples: Samples, name: str, default: float = math.nan, **labels: str) -> float:
    for sample_labels, value in samples.get(name, ()):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return default


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``{label value: sample value}``, summing samples that share a label value."""
    out: dict[str, float] = {}
    for labels, value in samples.get(name, ()):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def view_from_samples(samples: Samples, *, total_steps: int | None = None,
                      max_metrics: int = 12) -> TopView:
    """The view of one ``/metrics`` reading (no rates, alerts or callbacks yet)."""
    build = samples.get("rlmon_build_info", [({}, 1.0)])[0][0]
    return TopView(
        run_id=build.get("run_id", ""), world_size=int(_one(samples, "rlmon_world_size", 0)),
        started_at=_one(samples, "rlmon_collector_start_timestamp_seconds"),
        taken_at=_one(samples, "rlmon_snapshot_timestamp_seconds"),
        finished=_one(samples, "rlmon_run_finished", 0) == 1,
        ranks=_ranks(samples), ranks_known=int(_one(samples, "rlmon_ranks_known", 0)),
        per_rank="rlmon_rank_info" in samples or "rlmon_worst_rank_last_step" not in samples,
        metrics=_metrics(samples, max_metrics),
        total_steps=total_steps or _announced_total(samples),
        rejected=_by(samples, "rlmon_frames_rejected_total", "reason"),
        dropped=_by(samples, "rlmon_dropped_events_total", "reason"),
        flagged=_by(samples, "rlmon_values_flagged_total", "reason"),
        alert_counts={k: int(v) for k, v in _by(samples, "rlmon_alerts_total", "severity").items()},
        firing=tuple((lb.get("type", ""), lb.get("subject", ""), lb.get("severity", ""))
                     for lb, _ in samples.get("rlmon_alert_firing", ())),
        stop=_stop(samples))


def _ranks(samples: Samples) -> tuple[RankRow, ...]:
    steps = _by(samples, "rlmon_rank_last_step", "rank") or _by(
        samples, "rlmon_worst_rank_last_step", "rank")
    seen = _by(samples, "rlmon_rank_last_seen_timestamp_seconds", "rank")
    closed = _by(samples, "rlmon_rank_closed", "rank")
    dropped = _by(samples, "rlmon_rank_dropped_events_total", "rank")
    return tuple(sorted((RankRow(int(r), int(step), seen.get(r, math.nan), closed.get(r) == 1,
                                 int(dropped.get(r, 0))) for r, step in steps.items()),
                        key=lambda row: row.rank))


def _announced_total(samples: Samples) -> int | None:
    for name in TOTAL_STEP_METRICS:
        value = _one(samples, "rlmon_metric_window", metric=name, stat="last")
        if math.isfinite(value) and value >= 1:
            return int(value)
    return None


def metric_order(names: list[str]) -> list[str]:
    """Key metrics first (:data:`KEY_METRICS` order), then ``rewards/*``, then the rest by name;
    the announced step count is left out."""
    def key(name: str) -> tuple[int, int, str]:
        if name in KEY_METRICS:
            return (0, KEY_METRICS.index(name), name)
        return (1 if name.startswith("rewards/") else 2, 0, name)
    return sorted((n for n in names if n not in TOTAL_STEP_METRICS), key=key)


def _metrics(samples: Samples, limit: int) -> tuple[MetricRow, ...]:
    window: dict[str, dict[str, float]] = {}
    for labels, value in samples.get("rlmon_metric_window", ()):
        window.setdefault(labels.get("metric", ""), {})[labels.get("stat", "")] = value
    points = _by(samples, "rlmon_metric_window_points", "metric")
    names = set(window) | set(points) | set(_by(samples, "rlmon_metric_aggregate_step", "metric"))
    return tuple(_metric_row(samples, name, window.get(name, {}), int(points.get(name, 0)))
                 for name in metric_order(sorted(names))[:limit])


def _metric_row(samples: Samples, name: str, stats: dict[str, float], count: int) -> MetricRow:
    value = _one(samples, "rlmon_metric_aggregate", metric=name, agg="mean")
    if math.isnan(value):
        value = stats.get("last", math.nan)
    step = int(_one(samples, "rlmon_metric_aggregate_step", -1, metric=name))
    return MetricRow(name, value, step, stats.get("mean", math.nan), stats.get("min", math.nan),
                     stats.get("max", math.nan), arrow_of(stats, count))


def arrow_of(stats: Mapping[str, float], count: int) -> str:
    """The reports' trend arrow for window statistics read from ``/metrics``."""
    from collector.snapshot import SeriesStats
    from exporters.reports import trend_arrow

    nan = math.nan
    get = stats.get
    return trend_arrow(SeriesStats(count, get("mean", nan), get("std", nan), get("min", nan),
                                   get("max", nan), get("median", nan), get("p25", nan),
                                   get("p75", nan), get("p90", nan), get("ema_short", nan),
                                   get("ema_long", nan), get("slope", nan), get("last", nan)))


def _stop(samples: Samples) -> StopView | None:
    if _one(samples, "rlmon_stop_requested", 0) != 1:
        return None
    info = samples.get("rlmon_stop_info", [({}, 1.0)])[0][0]
    return StopView(int(_one(samples, "rlmon_stop_generation", 0)),
                    int(_one(samples, "rlmon_stop_at_step", -1)), info.get("reason", ""),
                    info.get("severity", ""), info.get("source", ""),
                    int(_one(samples, "rlmon_stop_acked_ranks", 0)))


# -- what is read besides /metrics ----------------------------------------------------------------


class RateTracker:
    """Per-rank steps/s from successive readings over the last ``horizon`` seconds (collector
    time, ``rlmon_snapshot_timestamp_seconds``); NaN for a closed rank."""

    def __init__(self, horizon: float = 10.0) -> None:
        self.horizon = horizon
        self._history: deque[tuple[float, dict[int, int]]] = deque()

    def apply(self, view: TopView) -> TopView:
        """``view`` with each rank's ``steps_per_second`` and the fastest rank's rate filled in."""
        now = view.taken_at
        if not math.isfinite(now):
            return view
        steps = {row.rank: row.step for row in view.ranks}
        if not self._history or now > self._history[-1][0]:
            self._history.append((now, steps))
        while len(self._history) > 2 and now - self._history[1][0] >= self.horizon:
            self._history.popleft()
        ranks = tuple(dataclasses.replace(row, steps_per_second=self._rate(row, now))
                      for row in view.ranks)
        rates = [r.steps_per_second for r in ranks if math.isfinite(r.steps_per_second)]
        return dataclasses.replace(view, ranks=ranks, steps_per_second=max(rates, default=math.nan))

    def _rate(self, row: RankRow, now: float) -> float:
        """Steps/s of ``row`` since the oldest reading that has its rank (0.5 s apart at least)."""
        if row.closed:
            return math.nan
        for then, steps in self._history:
            if row.rank in steps:
                span = now - then
                return (row.step - steps[row.rank]) / span if span >= 0.5 else math.nan
        return math.nan


class AlertTail:
    """New alerts from ``DIR/alerts.jsonl`` (one JSON object a line, appended by the collector).
    The first call returns the last :data:`RECENT_ALERTS` of at most ``backlog`` bytes from the
    end; a half-written last line waits for the next call; a line that is not JSON is skipped."""

    def __init__(self, path: Path, backlog: int = 64 << 10) -> None:
        self.path = Path(path)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)
        self._offset: int | None = None
        self._backlog = backlog

    def poll(self) -> list[dict[str, Any]]:
        """Alerts appended since the last call (the backlog's last few on the first call)."""
        first = self._offset is None
        try:
            with open(self.path, "rb") as handle:
                data = self._read(handle)
        except OSError:
            return []
        alerts = []
        for line in data.splitlines():
            try:
                alert = json.loads(line)
            except ValueError:
                continue
            if isinstance(alert, dict):
                alerts.append(alert)
        alerts = alerts[-RECENT_ALERTS:] if first else alerts
        self.recent.extend(alerts)
        return alerts

    def _read(self, handle) -> bytes:
        size = handle.seek(0, 2)
        first = self._offset is None or size < self._offset  # first look, or a new file
        if first:
            self._offset = max(0, size - self._backlog)
        start = self._offset
        handle.seek(start)
        data = handle.read(size - start)
        end = data.rfind(b"\n") + 1  # whole lines only
        self._offset = start + end
        data = data[:end]
        if first and start > 0:  # the backlog began mid-file: drop its partial first line
            data = data[data.find(b"\n") + 1:]
        return data


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON file's object, or ``{}`` while it is missing, partial or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def scrape(url: str, timeout: float = 5.0) -> tuple[str, float]:
    """GET ``url``; return (text, seconds it took). Raises ``OSError`` on failure."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    return text, time.perf_counter() - started


CALLBACKS_FILE = "callbacks.json"
"""Counters the ``--callback`` process keeps in the run directory (see exporters.callbacks)."""


class TopSource:
    """Reads frames of the view from a run directory (see the module docstring). One reader
    thread; :meth:`read` never raises."""

    def __init__(self, run_dir: Path, options: TopOptions) -> None:
        self.run_dir = Path(run_dir)
        self.options = options
        self.alerts = AlertTail(self.run_dir / "alerts.jsonl")
        self.rates = RateTracker()
        self.interval = options.interval
        """Seconds until the next scrape: ``options.interval``, or more after a slow scrape."""
        self.seen_alive = False
        """Whether a fresh reading has come from a live collector yet."""
        self._last = TopView(run_dir=str(self.run_dir))

    def read(self, scrape_metrics: bool = True) -> TopView:
        """The view now: new alerts always; ``/metrics`` only when ``scrape_metrics`` (else the
        last reading is reused). A failure becomes the view's ``error``."""
        new = tuple(self.alerts.poll())
        info = read_json(self.run_dir / "collector.json")
        pid = info.get("pid")
        alive = isinstance(pid, int) and process_alive(pid)
        view, error = self._last, self._why_not(info) if not alive else ""
        if alive and scrape_metrics:
            try:
                view = self._fresh(info)
                self.seen_alive = True
            except (OSError, ValueError, http.client.HTTPException) as exc:
                error = f"cannot read {info.get('metrics_url') or '/metrics'}: {exc}"
        self._last = dataclasses.replace(
            view, run_dir=str(self.run_dir), alive=alive, error=error, new_alerts=new,
            alerts=tuple(self.alerts.recent), callbacks=read_json(self.run_dir / CALLBACKS_FILE),
            interval=self.interval)
        return self._last

    def _fresh(self, info: dict[str, Any]) -> TopView:
        url = info.get("metrics_url")
        if not url:
            raise ValueError("the collector serves no /metrics (started with --metrics-port -1)")
        text, seconds = scrape(url)
        self.interval = max(self.options.interval, seconds / self.options.duty_cycle)
        view = view_from_samples(parse_exposition(text), total_steps=self.options.total_steps,
                                 max_metrics=self.options.max_metrics)
        return dataclasses.replace(self.rates.apply(view), scrape_seconds=seconds)

    def _why_not(self, info: dict[str, Any]) -> str:
        if not info:
            return f"waiting for {self.run_dir / 'collector.json'}"
        return f"the collector (pid {info.get('pid')}) is not running"


# -- displays ------------------------------------------------------------------------------------


class PlainDisplay:
    """Plain lines for logs and pipes: one per alert as it is read, and a status line every
    ``interval`` seconds when it changed. ``write`` gets whole lines (with the newline)."""

    terminal = False

    def __init__(self, write: Callable[[str], Any], interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write = write
        self.interval = interval
        self._clock = clock
        self._next = 0.0
        self._last_line = ""

    def due(self) -> bool:
        """Whether a status line is due (so the next read should scrape)."""
        return self._clock() >= self._next

    def show(self, view: TopView) -> None:
        """Print the new alerts, then the status line when due and changed."""
        from rlmon.top_render import alert_line, status_line

        for alert in view.new_alerts:
            self.write(alert_line(alert) + "\n")
        if self.due():
            self._next = self._clock() + self.interval
            self._status(status_line(view))

    def close(self, view: TopView) -> None:
        """Print the last status line (unless it is the one printed last)."""
        from rlmon.top_render import status_line

        self._status(status_line(view))

    def output(self, text: str) -> None:
        """Text from a launched command (plain mode does not relay: the command writes itself)."""
        self.write(text)

    def _status(self, line: str) -> None:
        if line != self._last_line:
            self._last_line = line
            self.write(line + "\n")


class LiveDisplay:
    """The rich view redrawn in place on ``console``; a launched command's output scrolls above
    it (:meth:`output`). Start with :meth:`start`, end with :meth:`close`."""

    terminal = True

    def __init__(self, console: Any) -> None:
        self.console = console
        self._live: Any = None

    def due(self) -> bool:
        """Always: every read of a live view scrapes."""
        return True

    def start(self, view: TopView) -> None:
        """Begin drawing ``view`` (no automatic refresh thread: :meth:`show` redraws)."""
        from rich.live import Live

        from rlmon.top_render import render

        self._live = Live(render(view, self.console.height), console=self.console,
                          auto_refresh=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)

    def show(self, view: TopView) -> None:
        """Redraw with ``view``."""
        from rlmon.top_render import render

        if self._live is None:
            self.start(view)
        else:
            self._live.update(render(view, self.console.height), refresh=True)

    def output(self, text: str) -> None:
        """Print a launched command's output above the view (ANSI colours kept)."""
        from rich.text import Text

        lines = text.rstrip("\n").split("\n")
        shown = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)
        self.console.print(Text.from_ansi(shown), soft_wrap=True, highlight=False)

    def close(self, view: TopView) -> None:
        """Draw ``view`` a last time and leave it on the screen."""
        self.show(view)
        if self._live is not None:
            self._live.stop()
            self._live = None


def make_display(stream: Any, plain_interval: float = 5.0,
                 allow_live: bool = True) -> LiveDisplay | PlainDisplay:
    """A :class:`LiveDisplay` when ``allow_live`` and ``stream`` is a terminal that rich can draw
    on, else a :class:`PlainDisplay` writing to ``stream``. Raises ImportError without rich."""
    from rich.console import Console

    console = Console(file=stream)
    if allow_live and console.is_terminal and not console.is_dumb_terminal:
        return LiveDisplay(console)

    def write(text: str) -> None:
        stream.write(text)
        stream.flush()
    return PlainDisplay(write, plain_interval)


# -- running it -----------------------------------------------------------------------------------


def follow(source: TopSource, display: LiveDisplay | PlainDisplay, options: TopOptions,
           stop_event: threading.Event, until_collector_exits: bool = True) -> TopView:
    """Read and show until ``stop_event`` is set (or the collector has exited, when
    ``until_collector_exits``); return the last view."""
    view = source.read(display.due())
    while True:
        display.show(view)
        if until_collector_exits and source.seen_alive and not view.alive:
            return view
        wait = source.interval if display.terminal else options.interval
        if stop_event.wait(wait):
            return source.read()
        view = source.read(display.due())


def first_view(source: TopSource, wait: float, stop_event: threading.Event) -> TopView:
    """The first fresh view, waiting up to ``wait`` seconds for the collector; raises
    :class:`CollectorUnavailable` saying why not."""
    deadline = time.monotonic() + wait
    while True:
        view = source.read()
        if source.seen_alive and not view.error:
            return view
        if finished_run(source.run_dir) and not view.alive:
            raise CollectorUnavailable(f"{view.error}: the run has finished; its reports are "
                                       f"in {source.run_dir}")
        if time.monotonic() >= deadline:
            raise CollectorUnavailable(f"{view.error} (run directory {source.run_dir})")
        if stop_event.wait(0.1):  # polling files another process writes, bounded by the deadline
            raise CollectorUnavailable("interrupted")


def finished_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a report written after its ``collector.json`` (the collector
    there has finished)."""
    try:
        report = (Path(run_dir) / "training_report.json").stat().st_mtime
        return report >= (Path(run_dir) / "collector.json").stat().st_mtime
    except OSError:
        return False


def run_top(run_dir: Path, options: TopOptions, stream: Any = None,
            stop_event: threading.Event | None = None) -> int:
    """The whole of ``rlmon top DIR``: 0 when the collector exits, on Ctrl-C or after ``--once``
    (130 for a Ctrl-C before the first view). Raises :class:`CollectorUnavailable` when no
    collector answers within ``options.wait``."""
    import sys

    stream = sys.stdout if stream is None else stream
    stop_event = stop_event or threading.Event()
    source = TopSource(run_dir, options)
    display = make_display(stream, options.plain_interval)
    try:
        view = first_view(source, options.wait, stop_event)
        if options.once and not stop_event.wait(options.interval):
            view = _second_reading(view, source.read())  # for steps/s and the ETA
    except KeyboardInterrupt:
        return 130
    if options.once:
        display.show(view)
        if display.terminal:
            display.close(view)
        return 0
    try:
        view = follow(source, display, options, stop_event)
    except KeyboardInterrupt:
        view = source.read()
    display.close(view)
    if not view.alive:
        display.output(f"rlmon top: the collector has exited; reports in {run_dir}\n")
    return 0


def _second_reading(view: TopView, later: TopView) -> TopView:
    """``later`` with the alerts both readings found, unless it failed where ``view`` had data."""
    if later.error and not view.error:
        return view
    return dataclasses.replace(later, new_alerts=view.new_alerts + later.new_alerts)


class TopThread:
    """The view beside a running command (``rlmon launch``): a daemon thread that reads and
    shows until :meth:`stop`; :meth:`output` relays the command's output (above a live view;
    rich serialises the two threads' writes). A failure of the view is logged and ends the view,
    never the launch."""

    def __init__(self, run_dir: Path, display: LiveDisplay | PlainDisplay,
                 options: TopOptions | None = None) -> None:
        self.options = options or TopOptions()
        self.display = display
        self.source = TopSource(run_dir, self.options)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlmon-top", daemon=True)

    def start(self) -> TopThread:
        """Start reading and drawing; returns self."""
        self._thread.start()
        return self

    def output(self, text: str) -> None:
        """Show a chunk of the command's output (whole lines)."""
        self.display.output(text)

    def stop(self) -> None:
        """Stop the thread and draw the last view (left on the screen)."""
        self._stop.set()
        self._thread.join(10.0)
        try:
            self.display.close(self.source.read())
        except Exception:
            log.exception("rlmon: the live view failed")

    def _run(self) -> None:
        try:
            follow(self.source, self.display, self.options, self._stop, until_collector_exits=False)
        except Exception:  # the view must never take the launch down
            log.exception("rlmon: the live view failed; it is off")
