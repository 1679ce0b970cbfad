"""Build realistic :class:`CollectorSnapshot` objects by hand, for exporter tests.

The statistics are computed here with plain numpy, the slow obvious way, so exporter tests do not
depend on the collector's kernels.
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

import numpy as np

from collector.snapshot import (Alert, CollectorSnapshot, MetricSnapshot, RankSnapshot,
                                SampleRecord, SeriesStats, StopSnapshot)

T0 = 1_750_000_000.0
"""Start time (Unix seconds) of every factory snapshot."""

DEFAULT_METRICS = ("reward", "kl_div", "policy_loss", "rewards/check_answer", "entropy")
"""Metric names used when none are given: an increasing, flat, decreasing, ... series each."""


def ema(values: np.ndarray, span: int) -> float:
    """Exponential moving average with ``alpha = 2 / (span + 1)`` over finite ``values``."""
    alpha = 2.0 / (span + 1.0)
    out = math.nan
    for v in values:
        out = v if math.isnan(out) else alpha * v + (1 - alpha) * out
    return out


def series_stats(steps: np.ndarray, values: np.ndarray) -> SeriesStats:
    """Window statistics of a series, NaN everywhere when it holds no finite point."""
    keep = np.isfinite(values)
    s, v = steps[keep].astype(float), values[keep]
    if v.size == 0:
        nan = math.nan
        return SeriesStats(0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan)
    slope = float(np.polyfit(s, v, 1)[0]) if v.size >= 2 else math.nan
    p25, median, p75, p90 = (float(x) for x in np.percentile(v, [25, 50, 75, 90]))
    return SeriesStats(int(v.size), float(v.mean()), float(v.std()), float(v.min()),
                       float(v.max()), median, p25, p75, p90, ema(v, 10), ema(v, 100), slope,
                       float(v[-1]))


def _series(index: int, steps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A deterministic shape per metric index: rising, flat, falling, rising, falling."""
    trend = (0.01, 0.0, -0.01, 0.005, -0.002)[index % 5]
    return 0.5 + trend * steps + rng.normal(0.0, 0.01, steps.size)


def make_metric(name: str, values_by_rank: np.ndarray, steps: np.ndarray) -> MetricSnapshot:
    """A metric from a ``(ranks, steps)`` value matrix; the aggregate is the last column's."""
    with np.errstate(invalid="ignore"):
        mean_series = values_by_rank.mean(axis=0)
    last = values_by_rank[:, -1]
    aggregate = {"mean": float(last.mean()), "min": float(last.min()), "max": float(last.max())}
    step_count = int(steps.size)
    return MetricSnapshot(
        name=name,
        last_by_rank=MappingProxyType({r: float(v) for r, v in enumerate(last)}),
        last_step_by_rank=MappingProxyType({r: int(steps[-1]) for r in range(len(last))}),
        aggregate=MappingProxyType(aggregate),
        aggregate_step=int(steps[-1]) if step_count else -1,
        window=series_stats(steps, mean_series),
        steps=steps.copy(), values=mean_series.copy())


def make_rank(rank: int, last_step: int, *, drops: int = 0) -> RankSnapshot:
    """A live rank that reported ``last_step`` one second before the snapshot."""
    return RankSnapshot(rank=rank, local_rank=rank % 8, host=f"node{rank // 8}", pid=1000 + rank,
                        incarnation=1, last_step=last_step, last_seen=T0 + 99.0,
                        batches_received=last_step // 4 + 1, scalars_received=16 * (last_step + 1),
                        dropped_by_reason=MappingProxyType({"queue_full": drops} if drops else {}),
                        closed=False)


def make_alerts() -> tuple[Alert, ...]:
    """Three alerts of increasing severity."""
    return (
        Alert(10, "INFO", "reward_trend", "reward", 0.6, 0.0, "reward rising", T0 + 10),
        Alert(20, "WARNING", "kl_divergence", "kl_div", 0.12, 0.1,
              "KL divergence above threshold: 0.1200", T0 + 20, rank=1),
        Alert(30, "CRITICAL", "kl_divergence", "kl_div", 0.25, 0.2,
              "KL divergence above critical | threshold: 0.2500", T0 + 30),
    )


def make_snapshot(*, ranks: int = 2, metrics: tuple[str, ...] | int = DEFAULT_METRICS,
                  steps: int = 50, stop: bool = False, world_size: int | None = None,
                  seed: int = 0) -> CollectorSnapshot:
    """A realistic snapshot: ``ranks`` ranks that each logged ``metrics`` for ``steps`` steps."""
    names = metrics if not isinstance(metrics, int) else tuple(f"metric_{i:03d}"
                                                               for i in range(metrics))
    rng = np.random.default_rng(seed)
    step_array = np.arange(steps, dtype=np.int64)
    metric_map = {}
    for index, name in enumerate(names):
        matrix = np.stack([_series(index, step_array, rng) for _ in range(ranks)])
        metric_map[name] = make_metric(name, matrix, step_array)
    rank_map = {r: make_rank(r, steps - 1, drops=3 if r == 1 else 0) for r in range(ranks)}
    return CollectorSnapshot(
        run_id="run-test", started_at=T0, taken_at=T0 + 100.0,
        world_size=ranks if world_size is None else world_size, kl_threshold=0.1,
        metrics=MappingProxyType(metric_map), ranks=MappingProxyType(rank_map),
        frames_received_by_kind=MappingProxyType({"batch": 40 * ranks, "hello": ranks}),
        frames_rejected_by_reason=MappingProxyType({"malformed": 2, "bad_version": 1}),
        values_flagged_by_reason=MappingProxyType({"nan": 1}),
        alerts=make_alerts(),
        alert_counts=MappingProxyType({("reward_trend", "INFO"): 1,
                                       ("kl_divergence", "WARNING"): 1,
                                       ("kl_divergence", "CRITICAL"): 1}),
        stop=make_stop() if stop else None,
        recent_samples=(SampleRecord(steps - 1, 0, "What is 2+2?", "4", 1.0),
                        SampleRecord(steps - 1, 1, "Name a prime.\nAny.", "9 | 7", math.nan)),
        series_count=len(names) * ranks, series_capacity=10_000)


def make_stop() -> StopSnapshot:
    """A critical KL stop at step 32, acknowledged by rank 0."""
    return StopSnapshot(generation=1, stop_at_step=32, reason="KL divergence above 2x threshold",
                        severity="CRITICAL", decided_at=T0 + 30.5, source="detector:kl",
                        acked_ranks=(0,))


# --- additions for the plot/HTML/monitoring-data exporters ----------------------------------------

GRPO_METRICS = ("reward", "kl", "loss", "policy_loss", "entropy", "grad_norm", "clip_fraction",
                "advantage_mean", "advantage_std", "response_length", "frac_reward_zero_std",
                "rewards/match_format_exactly", "rewards/check_answer", "span/rollout",
                "span/update")
"""The demo's metric names (a subset), logged by :func:`grpo_collector_snapshot`."""


def with_rank_history(snapshot: CollectorSnapshot, *, ranks: int | None = None,
                      seed: int = 1) -> CollectorSnapshot:
    """``snapshot`` with every metric's ``history_by_rank`` filled: each rank's series is the
    mean series plus small deterministic noise (``ranks`` defaults to the snapshot's)."""
    count = len(snapshot.ranks) if ranks is None else ranks
    rng = np.random.default_rng(seed)
    metrics = {}
    for name, metric in snapshot.metrics.items():
        by_rank = {r: (metric.steps.copy(), metric.values + rng.normal(0.0, 0.01, metric.values.size))
                   for r in range(count)}
        metrics[name] = dataclasses.replace(metric, history_by_rank=MappingProxyType(by_rank))
    return dataclasses.replace(snapshot, metrics=MappingProxyType(metrics))


def grpo_collector_snapshot(*, steps: int = 60, world: int = 2, blowup_at: int = 50):
    """A finished snapshot (with history) of the real :class:`collector.state.CollectorState`
    fed a demo-like GRPO run: ``world`` ranks, :data:`GRPO_METRICS`, KL blowing up from step
    ``blowup_at`` (so KL alerts and a stop decision exist), a few samples. No sockets."""
    from collector.state import CollectorState, StateConfig
    from rlmon import wire
    from rlmon.wire import Kind

    def msg(kind, rank, **fields):
        return wire.decode(wire.encode(wire.envelope(kind, "grpo-run", rank, 1, **fields)))

    state = CollectorState(StateConfig(run_id="grpo-run", world_size=world, control_key="k"))
    for rank in range(world):
        state.handle(msg(Kind.HELLO, rank, world=world, local_rank=rank, pid=100 + rank,
                         host="node0"), b"id%d" % rank, T0)
    rng = np.random.default_rng(7)
    step_list = list(range(steps))
    for rank in range(world):
        rows = [[_grpo_value(name, s, blowup_at, rng) for name in GRPO_METRICS] for s in step_list]
        block = [list(GRPO_METRICS), step_list, [T0 + s for s in step_list], rows]
        samples = [[steps - 1, ["7+5="], [f"<answer>{12 + rank}</answer>"], [3.0 - rank]]]
        state.handle(msg(Kind.BATCH, rank, seq=1, t=T0 + steps, step=steps - 1, blocks=[block],
                         samples=samples), b"id%d" % rank, T0 + steps)
    state.finish(T0 + steps + 1)
    return state.snapshot(T0 + steps + 1, with_history=True, finished=True)


def _grpo_value(name: str, step: int, blowup_at: int, rng: np.random.Generator) -> float:
    """A plausible value of metric ``name`` at ``step`` (KL explodes after ``blowup_at``)."""
    noise = float(rng.normal(0.0, 0.01))
    if name == "kl":
        return 0.02 + noise / 10 + (0.08 * (step - blowup_at + 1) if step >= blowup_at else 0.0)
    if name.startswith("span/"):
        return 0.1 + abs(noise)
    if name.startswith("reward"):
        return 1.0 + 0.02 * step + noise
    return 0.5 + noise
