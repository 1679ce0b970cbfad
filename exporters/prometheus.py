"""The collector's ``/metrics`` endpoint: Prometheus families built fresh from each snapshot.

:class:`SnapshotCollector` follows prometheus_client's custom-collector protocol: on every scrape
it calls ``get_snapshot()`` once and turns that immutable
:class:`~collector.snapshot.CollectorSnapshot` into new ``*MetricFamily`` objects. It owns no
state of its own, so a scrape never races the collector's receive loop. :class:`MetricsServer`
serves it from a private :class:`~prometheus_client.CollectorRegistry` (never the global one), on
loopback by default.

Conventions (every name is listed in ``docs/metrics.md``):

* every name starts ``rlmon_``; base units (seconds); counters end ``_total``; points in time are
  ``*_timestamp_seconds`` (Unix seconds);
* per-rank series (label ``rank``) exist only while the job has at most ``max_rank_labels`` ranks;
  past that only cross-rank aggregates are exported, and per-rank detail lives in the reports;
* NaN: counters are never NaN or negative (such a count is left out of the scrape); the logged
  values ``rlmon_metric_value`` and ``rlmon_metric_aggregate`` pass NaN and ±Inf through, since a
  NaN loss is news; window statistics are computed over finite points only, so a NaN one only
  means "not enough data" and is left out, as is any sample with no meaning yet (no stop decided,
  no completed step).
"""

from __future__ import annotations

import math
import threading
from importlib import metadata
from typing import Callable, Iterable, Iterator, Mapping, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from collector.snapshot import CollectorSnapshot, MetricSnapshot, RankSnapshot, StopSnapshot

SnapshotSource = Callable[[], Optional[CollectorSnapshot]]
"""A zero-argument callable returning the latest snapshot, or ``None`` before the first one."""

DEFAULT_MAX_RANK_LABELS = 64
"""Default bound on the number of ranks that get per-rank series."""

WINDOW_STATS = ("mean", "std", "min", "max", "median", "p25", "p75", "p90",
                "ema_short", "ema_long", "slope", "last")
"""Values of the ``stat`` label of ``rlmon_metric_window``, in exposition order."""

REWARD_STATS = ("mean", "std", "min", "max", "median", "p25", "p75", "p90", "ema_short",
                "ema_long", "positive_fraction", "negative_fraction", "zero_fraction")
"""Values of the ``stat`` label of ``rlmon_reward_stat`` (per-sample reward statistics)."""

STOP_REASON_MAX_CHARS = 80
"""The ``reason`` label of ``rlmon_stop_info`` is cut to this many characters."""


class SnapshotCollector:
    """A prometheus_client custom collector that renders the latest collector snapshot.

    ``get_snapshot`` is called once per scrape, from the HTTP server's thread; it must be cheap
    and thread-safe (reading one reference is). ``max_rank_labels`` bounds per-rank series: when
    the job has more ranks than that (``world_size`` or ranks seen, whichever is larger), no
    family carries a ``rank`` label. ``version`` is the ``version`` label of ``rlmon_build_info``
    (default: the installed ``rlmon`` distribution's version, else ``"unknown"``). An exception
    from ``get_snapshot`` fails the scrape (HTTP 500, Prometheus records ``up == 0``).
    """

    def __init__(self, get_snapshot: SnapshotSource, *,
                 max_rank_labels: int = DEFAULT_MAX_RANK_LABELS,
                 version: str | None = None) -> None:
        if max_rank_labels < 0:
            raise ValueError(f"max_rank_labels must be >= 0, got {max_rank_labels}")
        self._get_snapshot = get_snapshot
        self.max_rank_labels = max_rank_labels
        self.version = version if version is not None else installed_version()

    def describe(self) -> list[Metric]:
        """Return no descriptions: the families depend on the snapshot, so none are fixed."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield fresh families for the current snapshot (only build info when there is none)."""
        snapshot = self._get_snapshot()
        yield _build_info(self.version, snapshot)
        if snapshot is None:
            return
        per_rank = self.per_rank_labels(snapshot)
        yield from _collector_families(snapshot, self.max_rank_labels)
        yield from _metric_families(snapshot.metrics.values(), per_rank)
        yield from _rank_aggregate_families(snapshot.ranks.values())
        if per_rank:
            yield from _rank_families(snapshot.ranks.values())
        else:
            yield from _worst_rank_families(snapshot.ranks.values(), snapshot.taken_at)
        yield from _alert_families(snapshot)
        yield from _stop_families(snapshot.stop)
        yield from _reward_families(snapshot.extra.get("rewards"))

    def per_rank_labels(self, snapshot: CollectorSnapshot) -> bool:
        """Whether ``snapshot`` is small enough to export per-rank series."""
        return max(snapshot.world_size, len(snapshot.ranks)) <= self.max_rank_labels


class MetricsServer:
    """Serves a :class:`SnapshotCollector` over HTTP at ``/metrics`` from a daemon thread.

    The server has its own :class:`CollectorRegistry` (``registry``) holding the snapshot
    collector and, unless ``process_metrics=False``, a ``ProcessCollector`` with the ``rlmon``
    namespace (``rlmon_process_*``). Start it once; :meth:`stop` is idempotent. Not thread-safe:
    start and stop it from one thread.
    """

    def __init__(self, get_snapshot: SnapshotSource, *,
                 max_rank_labels: int = DEFAULT_MAX_RANK_LABELS,
                 process_metrics: bool = True, version: str | None = None) -> None:
        self.registry = make_registry(get_snapshot, max_rank_labels=max_rank_labels,
                                      process_metrics=process_metrics, version=version)
        self._httpd = None
        self._thread: threading.Thread | None = None
        self._scheme = "http"

    def start(self, host: str = "127.0.0.1", port: int = 0, *,
              certfile: str | None = None, keyfile: str | None = None,
              client_cafile: str | None = None) -> int:
        """Bind ``host:port`` (port 0 picks a free one), start serving, return the bound port.

        Loopback by default: pass ``host="0.0.0.0"`` deliberately to expose it. With both
        ``certfile`` and ``keyfile`` the endpoint speaks HTTPS; with ``client_cafile`` too it
        requires client certificates signed by that CA (mutual TLS). Raises ``RuntimeError`` if already
        started and ``OSError`` if the address cannot be bound.
        """
        if self._httpd is not None:
            raise RuntimeError("MetricsServer already started")
        self._httpd, self._thread = start_http_server(
            port, addr=host, registry=self.registry, certfile=certfile, keyfile=keyfile,
            client_cafile=client_cafile, client_auth_required=client_cafile is not None)
        self._scheme = "https" if certfile and keyfile else "http"
        return self.port

    @property
    def port(self) -> int:
        """The bound TCP port; raises ``RuntimeError`` when not started."""
        return self.address[1]

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; raises ``RuntimeError`` when not started."""
        if self._httpd is None:
            raise RuntimeError("MetricsServer not started")
        host, port = self._httpd.server_address[:2]
        return host, port

    @property
    def url(self) -> str:
        """The full scrape URL, e.g. ``http://127.0.0.1:9464/metrics``."""
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{self._scheme}://{host}:{port}/metrics"

    @property
    def running(self) -> bool:
        """Whether the serving thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread (at most ``timeout`` seconds)."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout)


def make_registry(get_snapshot: SnapshotSource, *,
                  max_rank_labels: int = DEFAULT_MAX_RANK_LABELS,
                  process_metrics: bool = True, version: str | None = None) -> CollectorRegistry:
    """Build a private registry holding a :class:`SnapshotCollector` (and process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot, max_rank_labels=max_rank_labels,
                                        version=version))
    if process_metrics:
        ProcessCollector(namespace="rlmon", registry=registry)
    return registry


def installed_version() -> str:
    """The installed ``rlmon`` distribution's version, or ``"unknown"``."""
    try:
        return metadata.version("rlmon")
    except metadata.PackageNotFoundError:
        return "unknown"


# --- family builders: each takes snapshot parts and returns fresh families -----------------------

def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    """A counter family; ``name`` ends ``_total`` (prometheus_client strips and re-adds it)."""
    return CounterMetricFamily(name, doc, labels=list(labels))


def _add_count(family: CounterMetricFamily, labels: list[str], value: float) -> None:
    """Add a counter sample unless ``value`` is NaN, infinite or negative."""
    if _valid_count(value):
        family.add_metric(labels, float(value))


def _valid_count(value: float) -> bool:
    try:
        return math.isfinite(value) and value >= 0
    except TypeError:
        return False


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _valid_timestamp(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _build_info(version: str, snapshot: CollectorSnapshot | None) -> InfoMetricFamily:
    run_id = snapshot.run_id if snapshot is not None else ""
    return InfoMetricFamily("rlmon_build", "rlmon version and the run this collector serves.",
                            value={"version": version, "run_id": run_id})


def _by_label_counter(name: str, doc: str, label: str,
                      counts: Mapping[str, float]) -> CounterMetricFamily:
    family = _counter(name, doc, [label])
    for key in sorted(counts):
        _add_count(family, [str(key)], counts[key])
    return family


def _collector_families(snap: CollectorSnapshot, max_rank_labels: int) -> Iterator[Metric]:
    yield _by_label_counter("rlmon_frames_received_total",
                            "Frames the collector accepted, by message kind.", "kind",
                            snap.frames_received_by_kind)
    yield _by_label_counter("rlmon_frames_rejected_total",
                            "Frames the collector rejected, by reason.", "reason",
                            snap.frames_rejected_by_reason)
    yield _by_label_counter("rlmon_values_flagged_total",
                            "Logged values flagged as invalid (e.g. nan, inf), by reason.",
                            "reason", snap.values_flagged_by_reason)
    yield from _scalar_gauges((
        ("rlmon_series", "Series held in the collector's store.", snap.series_count),
        ("rlmon_series_capacity_points", "Ring-buffer capacity of each stored series, in points.",
         snap.series_capacity),
        ("rlmon_world_size", "World size the ranks reported.", snap.world_size),
        ("rlmon_ranks_known", "Ranks the collector has heard from.", len(snap.ranks)),
        ("rlmon_rank_labels_limit", "Ranks beyond which per-rank series are not exported.",
         max_rank_labels),
        ("rlmon_kl_threshold", "KL divergence warning threshold (critical at twice it).",
         snap.kl_threshold),
        ("rlmon_run_finished", "1 once every rank has closed and the run is finished, else 0.",
         int(snap.finished)),
        ("rlmon_relays", "Relays (rlmon relay) that sent a frame within the last minute.",
         snap.extra.get("relays", 0)),
    ))
    relayed = _counter("rlmon_frames_relayed_total",
                       "Frames that reached the collector through a relay (rlmon relay).")
    _add_count(relayed, [], snap.extra.get("relayed_frames", 0))
    yield relayed
    yield from _timestamp_gauges((
        ("rlmon_collector_start_timestamp_seconds", "When the collector started (Unix seconds).",
         snap.started_at),
        ("rlmon_snapshot_timestamp_seconds",
         "When the exported snapshot was taken (Unix seconds); stale means a stuck collector.",
         snap.taken_at),
    ))


def _scalar_gauges(rows: Iterable[tuple[str, str, float]]) -> Iterator[GaugeMetricFamily]:
    for name, doc, value in rows:
        yield GaugeMetricFamily(name, doc, value=float(value))


def _timestamp_gauges(rows: Iterable[tuple[str, str, float]]) -> Iterator[GaugeMetricFamily]:
    for name, doc, value in rows:
        family = _gauge(name, doc)
        if _valid_timestamp(value):
            family.add_metric([], value)
        yield family


def _metric_families(metrics: Iterable[MetricSnapshot], per_rank: bool) -> Iterator[Metric]:
    value = _gauge("rlmon_metric_value", "Last logged value of each metric on each rank.",
                   ["metric", "rank"])
    aggregate = _gauge("rlmon_metric_aggregate",
                       "Cross-rank aggregate (mean, min, max) of the last completed step.",
                       ["metric", "agg"])
    agg_step = _gauge("rlmon_metric_aggregate_step",
                      "Step that rlmon_metric_aggregate describes.", ["metric"])
    window = _gauge("rlmon_metric_window",
                    "Statistics of the cross-rank mean series over the collector's stats window.",
                    ["metric", "stat"])
    points = _gauge("rlmon_metric_window_points",
                    "Finite points in the window rlmon_metric_window is computed over.", ["metric"])
    for metric in metrics:
        if per_rank:
            _add_rank_values(value, metric)
        _add_aggregate(aggregate, agg_step, metric)
        _add_window(window, points, metric)
    yield from ((value,) if per_rank else ()) + (aggregate, agg_step, window, points)


def _add_rank_values(family: GaugeMetricFamily, metric: MetricSnapshot) -> None:
    for rank in sorted(metric.last_by_rank):
        family.add_metric([metric.name, str(rank)], float(metric.last_by_rank[rank]))


def _add_aggregate(family: GaugeMetricFamily, step_family: GaugeMetricFamily,
                   metric: MetricSnapshot) -> None:
    if metric.aggregate_step < 0:
        return
    for agg in sorted(metric.aggregate):
        family.add_metric([metric.name, agg], float(metric.aggregate[agg]))
    step_family.add_metric([metric.name], float(metric.aggregate_step))


def _add_window(family: GaugeMetricFamily, points: GaugeMetricFamily,
                metric: MetricSnapshot) -> None:
    stats = metric.window
    points.add_metric([metric.name], float(stats.count))
    for stat in WINDOW_STATS:
        value = float(getattr(stats, stat))
        if not _is_nan(value):
            family.add_metric([metric.name, stat], value)


def _rank_aggregate_families(ranks: Iterable[RankSnapshot]) -> Iterator[Metric]:
    ranks = list(ranks)
    dropped: dict[str, float] = {}
    for rank in ranks:
        for reason, count in rank.dropped_by_reason.items():
            if _valid_count(count):
                dropped[reason] = dropped.get(reason, 0) + count
    yield _by_label_counter("rlmon_dropped_events_total",
                            "Events the ranks dropped and reported, summed over ranks, by reason.",
                            "reason", dropped)
    yield _sum_counter("rlmon_batches_received_total", "Batches received from all ranks.",
                       [r.batches_received for r in ranks])
    yield _sum_counter("rlmon_scalars_received_total", "Scalar values received from all ranks.",
                       [r.scalars_received for r in ranks])
    yield GaugeMetricFamily("rlmon_ranks_closed", "Ranks that closed cleanly.",
                            value=float(sum(1 for r in ranks if r.closed)))
    yield _min_max_gauge("rlmon_ranks_last_step", "Lowest and highest last step over all ranks.",
                         [r.last_step for r in ranks if r.last_step >= 0])
    yield _min_max_gauge("rlmon_ranks_last_seen_timestamp_seconds",
                         "Oldest (min) and newest (max) time any rank was last heard from.",
                         [r.last_seen for r in ranks if _valid_timestamp(r.last_seen)])


def _sum_counter(name: str, doc: str, counts: list[float]) -> CounterMetricFamily:
    family = _counter(name, doc)
    _add_count(family, [], sum(c for c in counts if _valid_count(c)))
    return family


def _min_max_gauge(name: str, doc: str, values: list[float]) -> GaugeMetricFamily:
    family = _gauge(name, doc, ["agg"])
    if values:
        family.add_metric(["min"], float(min(values)))
        family.add_metric(["max"], float(max(values)))
    return family


#: Ranks shown by the worst-k series when per-rank labels are off.
WORST_K = 5


def _worst_rank_families(ranks: Iterable[RankSnapshot], now: float) -> Iterator[Metric]:
    """Past the rank-label bound: only the ``WORST_K`` furthest-behind and longest-silent open
    ranks carry a ``rank`` label, so a 1,024-rank job still points at the ranks to look at."""
    open_ranks = [r for r in ranks if not r.closed]
    behind = _gauge("rlmon_worst_rank_last_step",
                    f"Last step of the {WORST_K} open ranks furthest behind.", ["rank"])
    for rank in sorted(open_ranks, key=lambda r: (r.last_step, r.rank))[:WORST_K]:
        behind.add_metric([str(rank.rank)], float(rank.last_step))
    silent = _gauge("rlmon_worst_rank_silence_seconds",
                    f"Seconds since the {WORST_K} longest-silent open ranks were heard, at the "
                    "snapshot.", ["rank"])
    for rank in sorted(open_ranks, key=lambda r: (r.last_seen, r.rank))[:WORST_K]:
        silent.add_metric([str(rank.rank)], max(0.0, now - rank.last_seen))
    yield from (behind, silent)


def _rank_families(ranks: Iterable[RankSnapshot]) -> Iterator[Metric]:
    info = _gauge("rlmon_rank_info", "1 for every known rank; host and local rank as labels.",
                  ["rank", "host", "local_rank"])
    step = _gauge("rlmon_rank_last_step", "Last step the rank reported.", ["rank"])
    seen = _gauge("rlmon_rank_last_seen_timestamp_seconds",
                  "When the rank was last heard from (Unix seconds).", ["rank"])
    incarnation = _gauge("rlmon_rank_incarnation", "The rank's current incarnation (restarts).",
                         ["rank"])
    closed = _gauge("rlmon_rank_closed", "1 when the rank closed cleanly, else 0.", ["rank"])
    lag = _gauge("rlmon_rank_lag_seconds", "Seconds from the rank's log call to the collector's "
                 "store (smoothed, holding the worst recent value; includes clock skew).", ["rank"])
    batches = _counter("rlmon_rank_batches_received_total", "Batches received from the rank.",
                       ["rank"])
    scalars = _counter("rlmon_rank_scalars_received_total",
                       "Scalar values received from the rank.", ["rank"])
    dropped = _counter("rlmon_rank_dropped_events_total",
                       "Events the rank dropped and reported, by reason.", ["rank", "reason"])
    for rank in sorted(ranks, key=lambda r: r.rank):
        label = str(rank.rank)
        info.add_metric([label, rank.host, str(rank.local_rank)], 1.0)
        if rank.last_step >= 0:
            step.add_metric([label], float(rank.last_step))
        if _valid_timestamp(rank.last_seen):
            seen.add_metric([label], rank.last_seen)
        incarnation.add_metric([label], float(rank.incarnation))
        closed.add_metric([label], float(rank.closed))
        lag.add_metric([label], float(rank.lag_seconds))
        _add_count(batches, [label], rank.batches_received)
        _add_count(scalars, [label], rank.scalars_received)
        for reason in sorted(rank.dropped_by_reason):
            _add_count(dropped, [label, reason], rank.dropped_by_reason[reason])
    yield from (info, step, seen, incarnation, closed, lag, batches, scalars, dropped)


def _alert_families(snap: CollectorSnapshot) -> Iterator[Metric]:
    family = _counter("rlmon_alerts_total", "Alerts raised by detectors, by type and severity.",
                      ["type", "severity"])
    for (alert_type, severity), count in sorted(snap.alert_counts.items()):
        _add_count(family, [alert_type, severity], count)
    yield family
    firing = _gauge("rlmon_alert_firing",
                    "1 for each detector condition holding right now (subject: metric or rank).",
                    ["type", "subject", "severity"])
    for alert_type, subject, severity in snap.firing:
        firing.add_metric([alert_type, subject[:120], severity], 1.0)
    yield firing


def _stop_families(stop: StopSnapshot | None) -> Iterator[Metric]:
    yield GaugeMetricFamily("rlmon_stop_requested", "1 once a coordinated stop is decided, else 0.",
                            value=float(stop is not None))
    yield GaugeMetricFamily("rlmon_stop_generation",
                            "Generation of the current stop state (0: none).",
                            value=float(stop.generation if stop is not None else 0))
    at_step = _gauge("rlmon_stop_at_step", "Ranks stop when step >= this value.")
    decided = _gauge("rlmon_stop_decided_timestamp_seconds",
                     "When the current stop state was decided (Unix seconds).")
    acked = _gauge("rlmon_stop_acked_ranks", "Ranks that acknowledged the current stop state.")
    info = _gauge("rlmon_stop_info", "1 for the current stop state; reason, severity, source.",
                  ["reason", "severity", "source"])
    if stop is not None:
        at_step.add_metric([], float(stop.stop_at_step))
        if _valid_timestamp(stop.decided_at):
            decided.add_metric([], stop.decided_at)
        acked.add_metric([], float(len(stop.acked_ranks)))
        info.add_metric([_short(stop.reason), stop.severity, stop.source], 1.0)
    yield from (at_step, decided, acked, info)


def _short(text: str, limit: int = STOP_REASON_MAX_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (with an ellipsis when cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reward_families(rewards: object) -> Iterator[Metric]:
    """Per-sample reward statistics (``snapshot.extra["rewards"]``, see
    :mod:`collector.reward_stats`): per function and statistic, and the aggregates. Nothing when
    no reward values were received; NaN statistics are left out."""
    if not isinstance(rewards, Mapping) or not rewards.get("functions"):
        return
    stat = _gauge("rlmon_reward_stat", "Statistic of the individual values of a reward function "
                  "over its window (EMAs over per-step means).", ["fn", "stat"])
    held = _gauge("rlmon_reward_window_values", "Finite values in a reward function's window.",
                  ["fn"])
    received = _counter("rlmon_reward_values_total",
                        "Finite values a reward function returned.", ["fn"])
    skipped = _counter("rlmon_reward_values_skipped_total",
                       "Values of a reward function left out of its statistics, by reason.",
                       ["fn", "reason"])
    for fn, stats in sorted(rewards["functions"].items()):
        for name in REWARD_STATS:
            if not _is_nan(stats.get(name, math.nan)):
                stat.add_metric([fn, name], float(stats[name]))
        held.add_metric([fn], float(stats.get("count", 0)))
        _add_count(received, [fn], stats.get("samples", 0))
        _add_count(skipped, [fn, "non_finite"], stats.get("non_finite", 0))
        _add_count(skipped, [fn, "missing"], stats.get("missing", 0))
    yield from (stat, held, received, skipped)
    for name, key, doc in (("rlmon_reward_total_mean", "total_mean", "Mean of the reward "
                            "functions' means."),
                           ("rlmon_reward_total_std", "total_std", "Mean of the reward "
                            "functions' standard deviations."),
                           ("rlmon_reward_sum_of_means", "sum", "Sum of the reward functions' "
                            "means.")):
        family = _gauge(name, doc)
        if not _is_nan(rewards.get(key, math.nan)):
            family.add_metric([], float(rewards[key]))
        yield family
