"""``TrainingMonitor`` and ``MetricsStore``: the seed's orchestrator on top of a rank ``Monitor``.

The monitor starts publishing lazily (at ``monitor_context()``, the first event, or the first
question), so analyzers constructed after it can still set the collector's thresholds: with no
``RLMON_ENDPOINT`` it starts the embedded collector with those settings, writing into
``output_dir``; under ``rlmon launch`` the collector's own flags apply instead. Metrics of one
iteration are merged and sent with one ``log`` call when the iteration ends. Questions go to the
collector (``Monitor.query``); after ``close`` they are answered from the final answers fetched
just before the collector was finalized.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from rlmon.config import RankConfig
from rlmon.monitor import Monitor, NullMonitor
from rlmon.seed.events import TrainingCallback, TrainingEvent, TrainingPhase, VerbosityLevel

log = logging.getLogger("rlmon")

#: Seconds a question waits for the collector before it is answered "unknown".
QUERY_TIMEOUT = 10.0
#: Points per metric kept from the collector when the monitor closes (answers after close).
FINAL_POINTS = 10_000
_FLUSH_PHASES = (TrainingPhase.ITERATION_END, TrainingPhase.TRAINING_END)


class TrainingMonitor:
    """The seed's ``TrainingMonitor``: events in, coordinated early stop out.

    Thread affinity: the training thread. ``on_event`` costs a dict merge and, at the end of an
    iteration, one ``Monitor.log`` (plus whatever custom callbacks cost: they run here).
    Questions (``get_metrics_store()`` and the analyzers) block up to ``QUERY_TIMEOUT`` seconds."""

    def __init__(self, output_dir: str | Path = Path("./outputs"),
                 verbosity: VerbosityLevel = VerbosityLevel.SIMPLE,
                 metrics_capacity: int = 10_000) -> None:
        if metrics_capacity < 1:
            raise ValueError("metrics_capacity must be >= 1")
        self.output_dir = Path(output_dir)
        self.verbosity = verbosity
        self.metrics_capacity = int(metrics_capacity)
        self.callbacks: list[TrainingCallback] = []
        self.collector_settings: dict[str, Any] = {"--capacity": self.metrics_capacity}
        self._mon: Monitor | NullMonitor | None = None
        self._closed = False
        self._final: dict[str, dict[str, Any]] = {}
        self._step: int | None = None
        self._metrics: dict[str, Any] = {}
        self._last_iteration = 0
        self._local_stop: str | None = None

    # -- callbacks and settings ------------------------------------------------------------------

    def register_callback(self, callback: TrainingCallback) -> None:
        """Add a callback. rlmon's analyzers bind to this monitor (their work runs in the
        collector); any other callback's ``on_event`` runs in this process for every event."""
        if callback not in self.callbacks:
            self.callbacks.append(callback)
        bind = getattr(callback, "_bind", None)
        if callable(bind):
            bind(self)

    def unregister_callback(self, callback: TrainingCallback) -> None:
        """Remove a callback (no error when it was not registered)."""
        with contextlib.suppress(ValueError):
            self.callbacks.remove(callback)

    def configure_collector(self, settings: dict[str, Any]) -> None:
        """Collector flags (``{"--kl-threshold": 0.08}``) for the embedded collector. They apply
        only if it has not started yet; later ones are logged and ignored."""
        if self._mon is not None:
            changed = {k: v for k, v in settings.items() if self.collector_settings.get(k) != v}
            if changed:
                log.warning("rlmon: collector already started; ignoring settings %s", changed)
            return
        self.collector_settings.update(settings)

    # -- lifecycle -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def monitor_context(self) -> Iterator[TrainingMonitor]:
        """Start publishing (waiting, bounded, until an embedded collector is ready), yield the
        monitor, and close it on exit (the embedded collector writes the reports)."""
        self._ensure_started()
        try:
            yield self
        finally:
            self.close()

    def close(self) -> None:
        """Send what is pending, keep the collector's final answers, then close the rank monitor
        (an embedded collector writes its reports into ``output_dir``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        mon = self._mon
        if mon is None:
            return
        self._flush()
        self._final = self._fetch_final(mon)
        mon.close()

    def _fetch_final(self, mon: Monitor | NullMonitor) -> dict[str, dict[str, Any]]:
        questions = {"alerts": {"n": FINAL_POINTS}, "comparisons": {"similarities": True},
                     "metrics": {"n": min(self.metrics_capacity, FINAL_POINTS)}, "ppo": {},
                     "stop": {}}
        final = {}
        for question, args in questions.items():
            result = mon.query(question, QUERY_TIMEOUT, **args)
            if result is not None:
                final[question] = result
        return final

    def _ensure_started(self) -> Monitor | NullMonitor | None:
        if self._mon is None and not self._closed:
            self._mon = self._start()
            atexit.register(self.close)
        return self._mon

    def _start(self) -> Monitor | NullMonitor:
        """Publish with ``rlmon``'s own start-up, passing the analyzers' settings to an embedded
        collector (waited for, so the first questions find it)."""
        from rlmon import _start

        config = RankConfig.from_env(out_dir=str(self.output_dir))
        args = [str(item) for key, value in self.collector_settings.items() for item in (key, value)]
        return _start(config, args, wait_until_ready=True)

    # -- events ----------------------------------------------------------------------------------

    def on_event(self, event: TrainingEvent) -> None:
        """Record one event: its metrics are sent (one ``log`` per iteration), RESPONSE_GENERATED
        ``prompts``/``responses`` metadata go to the text detectors, then every custom callback
        runs (an exception in one is logged, never raised)."""
        mon = self._ensure_started()
        if mon is not None:
            self._record(mon, event)
        for callback in list(self.callbacks):
            try:
                callback.on_event(event)
            except Exception:
                log.exception("rlmon: callback %r failed on %s", callback, event.phase)

    def _record(self, mon: Monitor | NullMonitor, event: TrainingEvent) -> None:
        if self._step is not None and event.iteration != self._step:
            self._flush()
        self._step = self._last_iteration = event.iteration
        self._metrics.update(event.metrics)
        if event.phase is TrainingPhase.RESPONSE_GENERATED:
            prompts, responses = event.get_metadata("prompts"), event.get_metadata("responses")
            if prompts is not None and responses is not None:
                mon.log_samples(event.iteration, prompts, responses, event.get_metadata("rewards"))
        if event.phase in _FLUSH_PHASES:
            self._flush()

    def _flush(self) -> None:
        if self._metrics and self._mon is not None and self._step is not None:
            self._mon.log(self._step, self._metrics)
        self._metrics = {}

    # -- stopping --------------------------------------------------------------------------------

    def request_early_stop(self, reason: str) -> None:
        """Ask for a coordinated stop of every rank. In a single process ``should_stop_early()``
        is true at once; with several ranks, from the step the collector picks."""
        mon = self._ensure_started()
        if mon is not None:
            mon.request_early_stop(reason)
        if mon is None or mon.world_size == 1:
            self._local_stop = reason

    def should_stop_early(self) -> tuple[bool, str | None]:
        """``(True, reason)`` once the coordinated stop applies at the last iteration seen (every
        rank at the same step); after ``close``, whether a stop was decided during the run."""
        if self._local_stop is not None:
            return True, self._local_stop
        if self._closed:
            stop = self._final.get("stop", {})
            return (True, stop.get("reason")) if stop.get("stopped") else (False, None)
        mon = self._ensure_started()
        if mon is not None and mon.should_stop(self._last_iteration):
            return True, mon.stop_reason
        return False, None

    # -- questions -------------------------------------------------------------------------------

    def get_metrics_store(self) -> MetricsStore:
        """A view of the metrics kept by the collector."""
        return MetricsStore(self)

    def query(self, question: str, **args: Any) -> dict[str, Any] | None:
        """Ask the collector (or, after ``close``, the final answers); None when unknown."""
        if self._closed:
            return _from_final(self._final, question, args)
        mon = self._ensure_started()
        if mon is None:
            return None
        result = mon.query(question, QUERY_TIMEOUT, **args)
        return None if result is None or "error" in result else result


def _from_final(final: dict[str, dict[str, Any]], question: str, args: dict[str, Any]
                ) -> dict[str, Any] | None:
    """Answer from the answers kept at close (``name``/``n`` applied to ``metrics``/``alerts``)."""
    result = final.get(question)
    if result is None:
        return None
    if question == "metrics":
        metrics = result.get("metrics", {})
        if args.get("name") is not None:
            metrics = {k: v for k, v in metrics.items() if k == args["name"]}
        n = args.get("n")
        if n is not None:
            metrics = {k: {**v, "steps": v["steps"][-n:] if n else [],
                           "values": v["values"][-n:] if n else []} for k, v in metrics.items()}
        return {"metrics": metrics}
    if question == "alerts" and args.get("n") is not None:
        n = args["n"]
        return {**result, "recent": result["recent"][-n:] if n else []}
    return result


class MetricsStore:
    """The seed's ``MetricsStore``, answered by the collector: statistics are over the cross-rank
    mean series (the whole buffer of ``metrics_capacity`` points). Each call is one query."""

    def __init__(self, monitor: TrainingMonitor) -> None:
        self.monitor = monitor

    def _metric(self, name: str, n: int = 0) -> dict[str, Any] | None:
        result = self.monitor.query("metrics", name=name, n=n)
        return None if result is None else result.get("metrics", {}).get(name)

    def get_statistics(self, name: str) -> dict[str, float]:
        """``mean``, ``std``, ``min``, ``max``, ``count``, ``median``, ``last`` and ``trend``
        (slope per step) of ``name``; ``{}`` for an unknown metric."""
        metric = self._metric(name)
        if metric is None:
            return {}
        stats = metric["stats"]
        return {"mean": stats["mean"], "std": stats["std"], "min": stats["min"],
                "max": stats["max"], "count": stats["count"], "median": stats.get("median"),
                "last": stats.get("last"), "trend": stats["slope"]}

    def compute_trend(self, name: str) -> float:
        """Least-squares slope of ``name`` against the step; 0.0 with fewer than two points."""
        stats = self.get_statistics(name)
        slope = stats.get("trend")
        return float(slope) if stats.get("count", 0) >= 2 and slope == slope else 0.0

    def get_recent(self, name: str, n: int = 10) -> list[float]:
        """The last ``n`` values of ``name``, oldest first (``[]`` when unknown)."""
        metric = self._metric(name, n)
        return [] if metric is None else list(metric["values"])

    def get_metric_names(self) -> list[str]:
        """Every metric name the collector holds, sorted."""
        result = self.monitor.query("metrics", n=0)
        return [] if result is None else sorted(result.get("metrics", {}))
