"""Immutable views of the collector's state, handed to exporters.

The receive loop owns every mutable structure (ring buffers, rank table, stop state). A few times a
second it builds a :class:`CollectorSnapshot` and swaps it into place with one reference
assignment; exporters (the Prometheus endpoint thread, the report writer) only ever read a
snapshot, so they never race the loop and never reach into ring buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SeriesStats:
    """Window statistics of one series; every field is NaN when the window holds no finite point.

    ``slope`` is the least-squares slope of value against step (units of the metric per step).
    ``ema_short``/``ema_long`` are exponential moving averages over the whole series (spans of 10
    and 100 points by default). ``count`` is the number of finite points in the window.
    """

    count: int
    mean: float
    std: float
    min: float
    max: float
    median: float
    p25: float
    p75: float
    p90: float
    ema_short: float
    ema_long: float
    slope: float
    last: float


@dataclass(frozen=True, slots=True)
class MetricSnapshot:
    """One logged metric: its last value on every rank, the cross-rank aggregate, its history.

    ``aggregate`` holds the last completed step's cross-rank ``mean``, ``min`` and ``max``;
    ``aggregate_step`` is that step (-1 before the first). ``window`` is computed over the
    cross-rank mean series. ``steps``/``values`` are that series, chronological, read-only copies
    (empty in live snapshots).
    """

    name: str
    last_by_rank: Mapping[int, float]
    last_step_by_rank: Mapping[int, int]
    aggregate: Mapping[str, float]
    aggregate_step: int
    window: SeriesStats
    steps: np.ndarray
    values: np.ndarray
    history_by_rank: Mapping[int, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=lambda: _EMPTY)
    """Each rank's own series as (steps, values), chronological; filled only in snapshots taken
    with history (reports and plots), empty in the live snapshots behind /metrics."""


@dataclass(frozen=True, slots=True)
class RankSnapshot:
    """What the collector knows of one rank. Timestamps are Unix seconds (``time.time()``)."""

    rank: int
    local_rank: int
    host: str
    pid: int
    incarnation: int
    last_step: int
    last_seen: float
    batches_received: int
    scalars_received: int
    dropped_by_reason: Mapping[str, int]
    closed: bool
    lag_seconds: float = 0.0
    """Smoothed seconds from the rank's log call to the collector's store (its clock vs ours),
    holding the worst recent value."""


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert raised by a detector. ``severity`` is INFO, WARNING or CRITICAL."""

    step: int
    severity: str
    type: str
    metric: str
    value: float
    threshold: float
    message: str
    time: float
    rank: int = -1


@dataclass(frozen=True, slots=True)
class StopSnapshot:
    """The stop state every rank follows: stop when ``step >= stop_at_step``.

    ``source`` says who asked: ``detector:<name>``, ``rank:<n>`` or ``operator``.
    ``acked_ranks`` lists the ranks that acknowledged this generation.
    """

    generation: int
    stop_at_step: int
    reason: str
    severity: str
    decided_at: float
    source: str
    acked_ranks: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One logged prompt/response pair (``reward`` is NaN when none was given)."""

    step: int
    rank: int
    prompt: str
    response: str
    reward: float


@dataclass(frozen=True, slots=True)
class CollectorSnapshot:
    """Everything an exporter may read, taken at ``taken_at`` (Unix seconds)."""

    run_id: str
    started_at: float
    taken_at: float
    world_size: int
    kl_threshold: float
    metrics: Mapping[str, MetricSnapshot] = field(default_factory=lambda: _EMPTY)
    ranks: Mapping[int, RankSnapshot] = field(default_factory=lambda: _EMPTY)
    frames_received_by_kind: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    frames_rejected_by_reason: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    values_flagged_by_reason: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    alerts: tuple[Alert, ...] = ()
    alert_counts: Mapping[tuple[str, str], int] = field(default_factory=lambda: _EMPTY)
    stop: StopSnapshot | None = None
    firing: tuple[tuple[str, str, str], ...] = ()
    """(alert type, subject, severity) of every rule whose condition holds right now."""
    recent_samples: tuple[SampleRecord, ...] = ()
    series_count: int = 0
    series_capacity: int = 0
    finished: bool = False
    extra: Mapping[str, object] = field(default_factory=lambda: _EMPTY)
