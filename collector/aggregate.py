"""Cross-rank aggregates of each metric, one per training step.

:class:`StepAggregator` collects the value every rank reported for ``(metric, step)`` and emits a
:class:`StepAggregate` (mean, min and max over the ranks) once the step is *complete*: either every
one of ``world_size`` ranks reported it, or it fell more than ``max_pending_steps`` behind the newest
step seen for that metric (so a dead or slow rank never stalls the aggregates). Each
``(metric, step)`` is emitted once; a value arriving after its step completed is dropped and
counted in :attr:`StepAggregator.late_values`.

Owned by the receive loop: not thread-safe. Plain Python; memory is bounded by about
``max_pending_steps + 1`` pending steps per metric, plus completed aggregates not yet popped.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StepAggregate:
    """Cross-rank aggregate of ``metric`` at ``step``.

    ``count`` is the number of ranks that reported (any value, NaN included). ``mean``, ``min`` and
    ``max`` are over the finite values only, in the metric's units; NaN when none is finite.
    """

    metric: str
    step: int
    mean: float
    min: float
    max: float
    count: int


def _aggregate(metric: str, step: int, by_rank: dict[int, float]) -> StepAggregate:
    """Aggregate the per-rank values of one step."""
    finite = [v for v in by_rank.values() if math.isfinite(v)]
    if not finite:
        nan = float("nan")
        return StepAggregate(metric, step, nan, nan, nan, len(by_rank))
    mean = math.fsum(finite) / len(finite)
    return StepAggregate(metric, step, mean, min(finite), max(finite), len(by_rank))


class _MetricSteps:
    """Pending and recently completed steps of one metric.

    ``queue`` is a min-heap of the steps that entered ``pending`` (each once), so expiring by age
    costs O(log n) per step; entries whose step completed early are skipped when they surface.
    ``done`` holds completed steps at or above the horizon, pruned once it doubles its bound.
    """

    __slots__ = ("metric", "pending", "queue", "completed", "done", "newest")

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.pending: dict[int, dict[int, float]] = {}
        self.queue: list[int] = []
        self.completed: list[StepAggregate] = []
        self.done: set[int] = set()
        self.newest: int | None = None

    def add(self, rank: int, step: int, value: float, world_size: int, horizon: int) -> bool:
        """Record one value; returns False (and records nothing) when its step already completed."""
        if step in self.done or (self.newest is not None and step < self.newest - horizon):
            return False
        by_rank = self.pending.get(step)
        if by_rank is None:
            by_rank = self.pending[step] = {}
            heapq.heappush(self.queue, step)
        by_rank[rank] = value
        if len(by_rank) >= world_size:
            self.complete(step)
        if self.newest is None or step > self.newest:
            self.newest = step
            self.expire(step - horizon, horizon)
        return True

    def complete(self, step: int) -> None:
        """Move ``step`` from pending to completed."""
        self.completed.append(_aggregate(self.metric, step, self.pending.pop(step)))
        self.done.add(step)

    def expire(self, cutoff: int, horizon: int) -> None:
        """Complete the pending steps below ``cutoff``; prune ``done`` when it grew large."""
        while self.queue and self.queue[0] < cutoff:
            step = heapq.heappop(self.queue)
            if step in self.pending:
                self.complete(step)
        if len(self.done) > 2 * (horizon + 1):
            self.done = {s for s in self.done if s >= cutoff}

    def complete_all(self, world_size: int = 0) -> None:
        """Complete every pending step reported by at least ``world_size`` ranks (all when 0)."""
        for step in [s for s, by_rank in self.pending.items() if len(by_rank) >= world_size]:
            self.complete(step)

    def take(self) -> list[StepAggregate]:
        """Completed aggregates in step order, forgotten once taken."""
        out = sorted(self.completed, key=lambda a: a.step)
        self.completed = []
        return out


class StepAggregator:
    """Cross-rank mean/min/max per ``(metric, step)``, emitted once each step is complete.

    A step is complete when all ``world_size`` ranks reported it, or when it is older than the
    newest step seen for that metric minus ``max_pending_steps`` (then it carries whatever ranks
    reported; ``count`` says how many). A repeated report from one rank replaces its value. A value
    for a completed step (or one already older than the horizon) is dropped and counted in
    :attr:`late_values`. Not thread-safe. Ranks must lie in ``[0, world_size)``.
    """

    def __init__(self, world_size: int, max_pending_steps: int = 64) -> None:
        self._world_size = _positive(world_size, "world_size")
        self._horizon = _positive(max_pending_steps, "max_pending_steps")
        self._metrics: dict[str, _MetricSteps] = {}
        self._late = 0

    @property
    def world_size(self) -> int:
        """Ranks that must report a step before it completes without waiting for the horizon."""
        return self._world_size

    @property
    def late_values(self) -> int:
        """Values dropped because their step had already completed (a running total)."""
        return self._late

    @property
    def pending_steps(self) -> int:
        """``(metric, step)`` pairs waiting for more ranks, over all metrics."""
        return sum(len(m.pending) for m in self._metrics.values())

    def add(self, metric: str, rank: int, step: int, value: float) -> None:
        """Record ``value`` reported by ``rank`` for ``(metric, step)``.

        ValueError for a rank outside ``[0, world_size)``; TypeError for a non-str metric or a
        non-integer rank/step.
        """
        state = self._steps_of(metric)
        self._record(state, self._check_rank(rank), operator.index(step), float(value))

    def add_block(self, rank: int, metrics: Sequence[str], steps: np.ndarray,
                  values: np.ndarray) -> None:
        """Record ``values[i, j]`` from ``rank`` for ``(metrics[j], steps[i])``, all ``i`` and ``j``.

        ``steps`` integer ``(n,)``, ``values`` float ``(n, k)`` with ``k == len(metrics)``.
        Nothing is recorded on an error: ValueError for mismatched shapes or a bad rank,
        TypeError for non-integer steps or a non-str metric.
        """
        rank = self._check_rank(rank)
        steps = np.asarray(steps)
        values = np.asarray(values, dtype=np.float64)
        if steps.dtype.kind not in "iu" or steps.ndim != 1:
            raise TypeError("steps must be a one-dimensional integer array")
        if values.shape != (steps.shape[0], len(metrics)):
            expected = (steps.shape[0], len(metrics))
            raise ValueError(f"values has shape {values.shape}, expected {expected}")
        states = [self._steps_of(metric) for metric in metrics]
        step_list = steps.tolist()
        for state, column in zip(states, values.T.tolist()):
            for step, value in zip(step_list, column):
                self._record(state, rank, step, value)

    def pop_completed(self) -> list[StepAggregate]:
        """Aggregates completed since the last call: grouped by metric (first-seen order), each
        metric's in step order. Each ``(metric, step)`` is returned exactly once."""
        return [agg for state in self._metrics.values() for agg in state.take()]

    def flush(self) -> list[StepAggregate]:
        """Complete every pending step with the ranks it has (end of run) and return all
        aggregates not yet popped, ordered as :meth:`pop_completed`."""
        for state in self._metrics.values():
            state.complete_all()
        return self.pop_completed()

    def set_world_size(self, n: int) -> None:
        """Change the number of ranks; pending steps that ``n`` ranks have reported complete now.

        Values already recorded from ranks ``>= n`` are kept. ValueError when ``n < 1``.
        """
        self._world_size = _positive(n, "world_size")
        for state in self._metrics.values():
            state.complete_all(self._world_size)

    def _record(self, state: _MetricSteps, rank: int, step: int, value: float) -> None:
        """Add one value to a metric's state, counting it when late."""
        if not state.add(rank, step, value, self._world_size, self._horizon):
            self._late += 1

    def _steps_of(self, metric: str) -> _MetricSteps:
        """The state of ``metric``, created on first use; TypeError for a non-str name."""
        state = self._metrics.get(metric)
        if state is None:
            if not isinstance(metric, str):
                raise TypeError(f"metric must be a str, not {type(metric).__name__}")
            state = self._metrics[metric] = _MetricSteps(metric)
        return state

    def _check_rank(self, rank: int) -> int:
        """``rank`` as an int; ValueError unless ``0 <= rank < world_size``."""
        rank = operator.index(rank)
        if not 0 <= rank < self._world_size:
            raise ValueError(f"rank {rank} outside [0, {self._world_size})")
        return rank


def _positive(x: object, name: str) -> int:
    """``x`` as an int >= 1, else ValueError (TypeError if not an integer)."""
    x = operator.index(x)
    if x < 1:
        raise ValueError(f"{name} must be >= 1, not {x}")
    return x
