"""Cross-rank aggregates of each metric, one per training step.

:class:`StepAggregator` collects the value every rank reported for ``(metric, step)`` and emits a
:class:`StepAggregate` (mean, min and max over the ranks) once the step is *complete*: either every
one of ``world_size`` ranks reported it, or it fell more than ``max_pending_steps`` behind the newest
step seen for that metric (so a dead or slow rank never stalls the aggregates). Each
``(metric, step)`` is emitted once; a value arriving after its step completed is dropped and
counted in :attr:`StepAggregator.late_values`.

Owned by the receive loop: not thread-safe. State and validation are plain Python around one
Numba kernel per call (:func:`collector.kernels.aggregate_block`, which also documents the array
layout): each metric has a ring of ``max_pending_steps + 1`` step slots holding running counts,
sum, min and max, and each ``(metric, rank)`` pair the value it reported into each slot (so a
repeated report can replace its value). Memory is about ``64 * (max_pending_steps + 1)`` bytes per
metric plus ``16 * (max_pending_steps + 1)`` per ``(metric, rank)`` pair (4 kB and 1 kB at the
default 64), plus the completed aggregates not yet popped.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from collector import kernels

_FIRST_METRICS = 16
_FIRST_PAIRS = 64
_FIRST_OUT = 1024
_MAX_CACHED_BLOCKS = 10_000
_CHUNK_VALUES = 1 << 16
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _empty_columns() -> tuple[np.ndarray, ...]:
    """The columns of an empty :class:`CompletedSteps` (read-only: shared by every empty one)."""
    columns = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty(0),
               np.empty(0, np.int64))
    for column in columns:
        column.flags.writeable = False
    return columns


_EMPTY_COLUMNS = _empty_columns()


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


@dataclass(frozen=True, slots=True)
class CompletedSteps:
    """Completed aggregates as columns, ordered like :meth:`StepAggregator.pop_completed`: by
    metric (first-seen order), each metric's rows in step order.

    Row ``i`` is metric ``names[metric[i]]`` at ``step[i]``; ``metric``, ``step`` and ``count`` are
    int64, ``mean``, ``min`` and ``max`` float64 (as in :class:`StepAggregate`), each contiguous.
    The arrays are fresh copies the caller may keep.
    """

    names: tuple[str, ...]
    metric: np.ndarray
    step: np.ndarray
    mean: np.ndarray
    min: np.ndarray
    max: np.ndarray
    count: np.ndarray

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def runs(self) -> list[tuple[str, slice]]:
        """``(metric name, rows)`` for each metric present, in row order; ``rows`` is a slice."""
        if not len(self):
            return []
        starts = np.flatnonzero(np.diff(self.metric)) + 1
        bounds = [0, *starts.tolist(), len(self)]
        names = self.names
        return [(names[m], slice(start, stop)) for m, start, stop in
                zip(self.metric[bounds[:-1]].tolist(), bounds[:-1], bounds[1:])]

    def to_list(self) -> list[StepAggregate]:
        """The rows as :class:`StepAggregate` objects (Python ints and floats), in row order."""
        names = self.names
        return [StepAggregate(names[m], step, mean, low, high, count)
                for m, step, mean, low, high, count in zip(
                    self.metric.tolist(), self.step.tolist(), self.mean.tolist(),
                    self.min.tolist(), self.max.tolist(), self.count.tolist())]


class StepAggregator:
    """Cross-rank mean/min/max per ``(metric, step)``, emitted once each step is complete.

    A step is complete when all ``world_size`` ranks reported it, or when it is older than the
    newest step seen for that metric minus ``max_pending_steps`` (then it carries whatever ranks
    reported; ``count`` says how many). A repeated report from one rank replaces its value. A value
    for a completed step (or one already older than the horizon) is dropped and counted in
    :attr:`late_values`. Not thread-safe. Ranks must lie in ``[0, world_size)``; steps in the
    int64 range. The mean is a compensated sum divided by the count, clamped to ``[min, max]``
    (±Inf if the sum overflows).
    """

    def __init__(self, world_size: int, max_pending_steps: int = 64) -> None:
        self._world_size = _positive(world_size, "world_size")
        self._width = _positive(max_pending_steps, "max_pending_steps") + 1
        self._names: list[str] = []
        self._names_tuple: tuple[str, ...] = ()
        self._metric_ids: dict[str, int] = {}
        self._pair_ids: dict[tuple[str, int], int] = {}
        self._blocks: dict[tuple[int, tuple[str, ...]], tuple[np.ndarray, np.ndarray]] = {}
        self._slot_ints, self._slot_floats, self._metric_ints = _metric_arrays(0, self._width)
        self._pair_steps, self._pair_values, self._pair_metric = _pair_arrays(0, self._width)
        self._out_ints = np.empty((3, 0), np.int64)
        self._out_floats = np.empty((3, 0), np.float64)
        self._counters = np.zeros(2, np.int64)
        self._one_id = np.zeros(1, np.int64)
        self._one_pair = np.zeros(1, np.int64)
        self._one_step = np.zeros(1, np.int64)
        self._one_value = np.zeros((1, 1), np.float64)

    @property
    def world_size(self) -> int:
        """Ranks that must report a step before it completes without waiting for the horizon."""
        return self._world_size

    @property
    def late_values(self) -> int:
        """Values dropped because their step had already completed (a running total)."""
        return int(self._counters[kernels.COUNTER_LATE])

    @property
    def pending_steps(self) -> int:
        """``(metric, step)`` pairs waiting for more ranks, over all metrics."""
        states = self._slot_ints[:len(self._names), :, kernels.SLOT_STATE]
        return int(np.count_nonzero(states == kernels.PENDING))

    def nbytes(self) -> int:
        """Bytes held by the aggregator's arrays (allocated, not only filled)."""
        arrays = (self._slot_ints, self._slot_floats, self._metric_ints, self._pair_steps,
                  self._pair_values, self._pair_metric, self._out_ints, self._out_floats)
        return sum(a.nbytes for a in arrays)

    def add(self, metric: str, rank: int, step: int, value: float) -> None:
        """Record ``value`` reported by ``rank`` for ``(metric, step)``.

        ValueError for a rank outside ``[0, world_size)``; TypeError for a non-str metric or a
        non-integer rank/step; OverflowError for a step outside int64. Slow path (a few µs).
        """
        rank = self._check_rank(rank)
        step = _as_step(step)
        value = float(value)
        metric_id, pair_id = self._ids_of(metric, rank)
        self._one_id[0], self._one_pair[0] = metric_id, pair_id
        self._one_step[0], self._one_value[0, 0] = step, value
        self._record(self._one_id, self._one_pair, self._one_step, self._one_value)

    def add_block(self, rank: int, metrics: Sequence[str], steps: np.ndarray,
                  values: np.ndarray) -> None:
        """Record ``values[i, j]`` from ``rank`` for ``(metrics[j], steps[i])``, all ``i`` and ``j``.

        ``steps`` integer ``(n,)``, ``values`` float ``(n, k)`` with ``k == len(metrics)``.
        Nothing is recorded on an error: ValueError for mismatched shapes or a bad rank,
        TypeError for non-integer steps or a non-str metric, OverflowError for steps outside int64.
        One kernel call (per 65,536 values); a few µs plus ~40 ns per value.
        """
        rank = self._check_rank(rank)
        steps = _as_steps(steps)
        values = np.ascontiguousarray(values, dtype=np.float64)
        if values.shape != (steps.shape[0], len(metrics)):
            expected = (steps.shape[0], len(metrics))
            raise ValueError(f"values has shape {values.shape}, expected {expected}")
        metric_ids, pair_ids = self._block_ids(rank, metrics)
        self._record(metric_ids, pair_ids, steps, values)

    def pop_completed(self) -> list[StepAggregate]:
        """Aggregates completed since the last call: grouped by metric (first-seen order), each
        metric's in step order. Each ``(metric, step)`` is returned exactly once."""
        return self.pop_completed_arrays().to_list()

    def pop_completed_arrays(self) -> CompletedSteps:
        """What :meth:`pop_completed` returns, as columns (no per-aggregate objects)."""
        k = kernels
        n = int(self._counters[k.COUNTER_OUT])
        if n == 0:
            return CompletedSteps(self._names_tuple, *_EMPTY_COLUMNS)
        ints, floats = self._out_ints[:, :n], self._out_floats[:, :n]
        if k.sorted_by_metric_and_step(ints[k.OUT_METRIC], ints[k.OUT_STEP]):
            ints, floats = ints.copy(), floats.copy()  # the usual case: emitted in order
        else:
            order = np.lexsort((ints[k.OUT_STEP], ints[k.OUT_METRIC]))
            ints, floats = np.take(ints, order, axis=1), np.take(floats, order, axis=1)
        self._counters[k.COUNTER_OUT] = 0
        return CompletedSteps(self._names_tuple, ints[k.OUT_METRIC], ints[k.OUT_STEP],
                              floats[k.OUT_MEAN], floats[k.OUT_MIN], floats[k.OUT_MAX],
                              ints[k.OUT_COUNT])

    def flush(self) -> list[StepAggregate]:
        """Complete every pending step with the ranks it has (end of run) and return all
        aggregates not yet popped, ordered as :meth:`pop_completed`."""
        return self.flush_arrays().to_list()

    def flush_arrays(self) -> CompletedSteps:
        """What :meth:`flush` returns, as columns (see :meth:`pop_completed_arrays`)."""
        self._complete_pending(0)
        return self.pop_completed_arrays()

    def set_world_size(self, n: int) -> None:
        """Change the number of ranks; pending steps that ``n`` ranks have reported complete now.

        Values already recorded from ranks ``>= n`` are kept. ValueError when ``n < 1``.
        """
        self._world_size = _positive(n, "world_size")
        self._complete_pending(self._world_size)

    def _record(self, metric_ids: np.ndarray, pair_ids: np.ndarray, steps: np.ndarray,
                values: np.ndarray) -> None:
        """Run the block kernel, with room for every completion it can emit; a huge block goes
        in chunks of rows, so that room stays near what is really emitted."""
        k = metric_ids.shape[0]
        rows = max(1, _CHUNK_VALUES // max(k, 1))
        for start in range(0, steps.shape[0], rows):
            chunk = steps[start:start + rows]
            self._reserve(k * (self._width + chunk.shape[0]))
            kernels.aggregate_block(
                self._slot_ints, self._slot_floats, self._metric_ints, self._pair_steps,
                self._pair_values, self._pair_metric, self._out_ints, self._out_floats,
                self._counters, self._world_size, metric_ids, pair_ids, chunk,
                values[start:start + rows])

    def _complete_pending(self, min_reported: int) -> None:
        """Emit every pending step reported by at least ``min_reported`` ranks (all when 0)."""
        self._reserve(len(self._names) * self._width)
        kernels.aggregate_complete(self._slot_ints, self._slot_floats, self._out_ints,
                                   self._out_floats, self._counters, min_reported)

    def _block_ids(self, rank: int, metrics: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Metric and pair ids of a block's columns, cached per ``(rank, metrics)``."""
        key = (rank, tuple(metrics))
        ids = self._blocks.get(key)
        if ids is None:
            for metric in metrics:
                _check_metric(metric)
            pairs = [self._ids_of(metric, rank) for metric in metrics]
            ids = (np.array([m for m, _ in pairs], np.int64).reshape(-1),
                   np.array([p for _, p in pairs], np.int64).reshape(-1))
            if len(self._blocks) >= _MAX_CACHED_BLOCKS:
                self._blocks.clear()
            self._blocks[key] = ids
        return ids

    def _ids_of(self, metric: str, rank: int) -> tuple[int, int]:
        """``(metric id, pair id)`` of ``(metric, rank)``, created on first use."""
        pair_id = self._pair_ids.get((metric, rank))
        if pair_id is not None:
            return self._metric_ids[metric], pair_id
        metric_id = self._metric_ids.get(metric)
        if metric_id is None:
            metric_id = self._new_metric(_check_metric(metric))
        pair_id = len(self._pair_ids)
        if pair_id == self._pair_metric.shape[0]:
            self._grow_pairs(max(_FIRST_PAIRS, 2 * pair_id))
        self._pair_metric[pair_id] = metric_id
        self._pair_ids[(metric, rank)] = pair_id
        return metric_id, pair_id

    def _new_metric(self, metric: str) -> int:
        """Id of a new metric; grows the metric arrays when full."""
        metric_id = len(self._names)
        if metric_id == self._metric_ints.shape[0]:
            grown = _metric_arrays(max(_FIRST_METRICS, 2 * metric_id), self._width)
            for new, old in zip(grown, (self._slot_ints, self._slot_floats, self._metric_ints)):
                new[:metric_id] = old
            self._slot_ints, self._slot_floats, self._metric_ints = grown
        self._names.append(metric)
        self._names_tuple = tuple(self._names)
        self._metric_ids[metric] = metric_id
        return metric_id

    def _grow_pairs(self, rows: int) -> None:
        """Reallocate the pair arrays for ``rows`` pairs, keeping the live ones."""
        live = self._pair_metric.shape[0]
        grown = _pair_arrays(rows, self._width)
        for new, old in zip(grown, (self._pair_steps, self._pair_values, self._pair_metric)):
            new[:live] = old
        self._pair_steps, self._pair_values, self._pair_metric = grown

    def _reserve(self, extra: int) -> None:
        """Make room for ``extra`` more completions in the out arrays."""
        used = int(self._counters[kernels.COUNTER_OUT])
        if used + extra <= self._out_ints.shape[1]:
            return
        size = max(_FIRST_OUT, 2 * self._out_ints.shape[1], used + extra)
        ints, floats = np.empty((3, size), np.int64), np.empty((3, size), np.float64)
        ints[:, :used], floats[:, :used] = self._out_ints[:, :used], self._out_floats[:, :used]
        self._out_ints, self._out_floats = ints, floats

    def _check_rank(self, rank: int) -> int:
        """``rank`` as an int; ValueError unless ``0 <= rank < world_size``."""
        rank = operator.index(rank)
        if not 0 <= rank < self._world_size:
            raise ValueError(f"rank {rank} outside [0, {self._world_size})")
        return rank


def _metric_arrays(rows: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``slot_ints``, ``slot_floats`` and ``metric_ints`` for ``rows`` metrics with empty rings."""
    return (np.zeros((rows, width, 4), np.int64), np.zeros((rows, width, 4), np.float64),
            np.zeros((rows, 2), np.int64))


def _pair_arrays(rows: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pair_steps``, ``pair_values`` and ``pair_metric`` for ``rows`` unused pairs (slot ``k``
    holds step ``k + 1``, which never maps to slot ``k``)."""
    steps = np.broadcast_to(np.arange(1, width + 1, dtype=np.int64), (rows, width)).copy()
    return steps, np.zeros((rows, width), np.float64), np.full(rows, -1, np.int64)


def _check_metric(metric: object) -> str:
    """``metric`` itself; TypeError unless it is a str."""
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a str, not {type(metric).__name__}")
    return metric


def _as_step(step: object) -> int:
    """``step`` as an int in the int64 range; TypeError for non-integers, OverflowError outside."""
    step = operator.index(step)
    if not _INT64_MIN <= step <= _INT64_MAX:
        raise OverflowError(f"step {step} does not fit in int64")
    return step


def _as_steps(steps: object) -> np.ndarray:
    """``steps`` as a contiguous int64 ``(n,)`` array; TypeError unless one-dimensional integers,
    OverflowError for unsigned steps past the int64 range."""
    steps = np.asarray(steps)
    if steps.dtype.kind not in "iu" or steps.ndim != 1:
        raise TypeError("steps must be a one-dimensional integer array")
    if steps.dtype == np.uint64 and steps.size and int(steps.max()) > _INT64_MAX:
        raise OverflowError("steps must fit in int64")
    return np.ascontiguousarray(steps, dtype=np.int64)


def _positive(x: object, name: str) -> int:
    """``x`` as an int >= 1, else ValueError (TypeError if not an integer)."""
    x = operator.index(x)
    if x < 1:
        raise ValueError(f"{name} must be >= 1, not {x}")
    return x
