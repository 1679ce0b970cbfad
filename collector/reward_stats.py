"""Per-sample reward statistics: every value the wrapped reward functions returned, per function.

Ranks send the individual values of each wrapped reward-function call in the BATCH field ``rv``
(``[step, name, values]``; ``docs/protocol.md``). :class:`RewardStats` keeps, per reward function
name, a ring of the last ``window`` finite values (indexed modulo its capacity, never shifted) and
two EMAs, and computes the GRPO seed's statistics over the ring: count, mean, std, min, max,
median, p25/p75/p90, the positive/negative/zero fractions and a histogram. The EMAs (alphas 2/11
and 2/101, as :class:`collector.detectors.RewardAnomalyDetector`) are taken over the **per-step
means** of the values: a step is folded in once a later step arrives; the EMAs reported include
the step still open.

Values that are nil (TRL's "does not apply") are counted per function as ``missing``; NaN and
±Inf as ``non_finite`` (and in the collector's ``nan``/``inf`` flags); anything else (a string, a
map: only a foreign client sends those) is counted in the ``wrong_type`` flag. None of them enter
the ring. At most ``max_functions`` names are kept; entries for further names are counted in
``dropped_entries``.

The kernels below are tiny typed loops writing into arrays they are given, each tested against a
slow reference in ``tests/unit/test_reward_stats.py``; the mean/std and percentile kernels are the
store's own (:mod:`collector.kernels`). Owned by the collector's receive loop: not thread-safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, MutableMapping

import numpy as np
from numba import njit

from collector.kernels import (STAT_COUNT, STAT_MAX, STAT_MEAN, STAT_MEDIAN, STAT_MIN, STAT_P25,
                               STAT_P75, STAT_P90, STAT_STD, ema_update, magnitude_scale,
                               moments, order_stats)

DEFAULT_WINDOW = 1000
"""Values kept per reward function (the GRPO seed's ``window_size``)."""
DEFAULT_BINS = 20
"""Histogram bins per reward function."""
MAX_FUNCTIONS = 256
"""Most reward function names tracked (bounds memory and the ``fn`` label's cardinality)."""
ALPHA_SHORT = 2.0 / 11
"""Short EMA weight (span 10), per step mean."""
ALPHA_LONG = 2.0 / 101
"""Long EMA weight (span 100), per step mean."""

VALUE_POSITIVE = 9
"""Index in a :func:`value_stats` output: fraction of values above zero."""
VALUE_NEGATIVE = 10
"""Index in a :func:`value_stats` output: fraction of values below zero."""
VALUE_ZERO = 11
"""Index in a :func:`value_stats` output: fraction of values equal to zero."""
_LARGEST = float(np.finfo(np.float64).max)
N_VALUE_STATS = 12
"""Length of a :func:`value_stats` output (slots 0..8 are :mod:`collector.kernels`' ``STAT_*``)."""

STAT_NAMES = ("mean", "std", "min", "max", "median", "p25", "p75", "p90", "ema_short", "ema_long",
              "positive_fraction", "negative_fraction", "zero_fraction")
"""The float statistics of one function, in export order (``count`` and the counters aside)."""

_SLOTS = {"mean": STAT_MEAN, "std": STAT_STD, "min": STAT_MIN, "max": STAT_MAX,
          "median": STAT_MEDIAN, "p25": STAT_P25, "p75": STAT_P75, "p90": STAT_P90,
          "positive_fraction": VALUE_POSITIVE, "negative_fraction": VALUE_NEGATIVE,
          "zero_fraction": VALUE_ZERO}


# --- kernels --------------------------------------------------------------------------------------

@njit(cache=True)
def ring_push(buffer, ring, values):
    """Append the finite ``values`` to the ring ``buffer`` (float64, capacity ``len(buffer)``).

    ``ring`` is int64 ``[head, count]``: the slot the next value goes to and the values held (at
    most the capacity). While not full the values sit in ``buffer[:count]``; once full the ring
    overwrites its oldest slot. Non-finite values are skipped. Returns how many were appended.
    """
    capacity = buffer.shape[0]
    head = ring[0]
    count = ring[1]
    appended = 0
    for x in values:
        if not np.isfinite(x):
            continue
        buffer[head] = x
        head += 1
        if head == capacity:
            head = 0
        if count < capacity:
            count += 1
        appended += 1
    ring[0] = head
    ring[1] = count
    return appended


@njit(cache=True)
def ring_tail(buffer, ring, out):
    """Copy the last ``m = min(len(out), count)`` values of the ring into ``out[:m]``, oldest
    first; return ``m``."""
    capacity = buffer.shape[0]
    m = min(out.shape[0], ring[1])
    slot = ring[0] - m
    if slot < 0:
        slot += capacity
    for i in range(m):
        out[i] = buffer[slot]
        slot += 1
        if slot == capacity:
            slot = 0
    return m


@njit(cache=True)
def value_stats(finite_sorted, out):
    """Statistics of the ascending, finite ``finite_sorted`` into ``out`` (``N_VALUE_STATS``).

    Slots ``STAT_COUNT`` .. ``STAT_P90`` as :func:`collector.kernels.series_stats` (population
    std, NumPy's linear percentiles), then the positive, negative and zero fractions. With no value
    every slot but the count (0) is NaN.
    """
    out[:] = np.nan
    n = finite_sorted.shape[0]
    out[STAT_COUNT] = n
    if n == 0:
        return
    moments(finite_sorted, magnitude_scale(finite_sorted), out)
    order_stats(finite_sorted, out)
    positive = 0
    negative = 0
    for x in finite_sorted:
        if x > 0.0:
            positive += 1
        elif x < 0.0:
            negative += 1
    out[VALUE_POSITIVE] = positive / n
    out[VALUE_NEGATIVE] = negative / n
    out[VALUE_ZERO] = (n - positive - negative) / n


@njit(cache=True)
def histogram(values, edges, counts):
    """Count ``values`` into the bins of the ascending ``edges`` (``len(counts) + 1`` of them),
    as ``numpy.histogram``: bin i is ``[edges[i], edges[i+1])``, the last one closed; values
    outside the edges and non-finite values are not counted."""
    bins = counts.shape[0]
    low = edges[0]
    high = edges[bins]
    half_width = high / 2.0 - low / 2.0  # halves: no overflow across all of float64
    counts[:] = 0
    if not (np.isfinite(half_width) and half_width > 0.0):  # degenerate: one bin takes all
        for x in values:
            if x >= low and x <= high:
                counts[0] += 1
        return
    for x in values:
        if not (x >= low and x <= high):
            continue
        position = (x / 2.0 - low / 2.0) / half_width * bins  # divide first: no overflow
        i = int(position) if np.isfinite(position) else 0
        i = min(max(i, 0), bins - 1)
        if x < edges[i]:
            i -= 1
        elif i + 1 < bins and x >= edges[i + 1]:
            i += 1
        counts[i] += 1


def histogram_edges(finite: np.ndarray, bins: int) -> np.ndarray:
    """``bins + 1`` equal-width edges spanning ``finite`` (NumPy's rule: a single value ``v``
    spans ``[v - 0.5, v + 0.5]``, or ``v`` ± a relative 2**-40 where 0.5 is below its
    precision); empty for no values."""
    if finite.size == 0:
        return np.empty(0)
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        spread = max(0.5, abs(low) * 2.0**-40)
        low, high = max(low - spread, -_LARGEST), min(high + spread, _LARGEST)
    fractions = np.arange(bins + 1) / bins
    edges = low * (1.0 - fractions) + high * fractions  # no overflow even across all of float64
    edges[0], edges[-1] = low, high
    return edges


# --- state ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class RewardWindow:
    """One reward function's ring of recent finite values, its EMAs and counters."""

    buffer: np.ndarray
    ring: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    samples: int = 0
    """Finite values received in all (the ring holds the last ``window`` of them)."""
    non_finite: int = 0
    missing: int = 0
    ema_short: float = math.nan
    ema_long: float = math.nan
    open_step: int | None = None
    open_sum: float = 0.0
    open_count: int = 0

    def add(self, step: int, finite: np.ndarray) -> None:
        """Add one call's finite values at ``step`` (folding the previous step into the EMAs)."""
        self.samples += ring_push(self.buffer, self.ring, finite)
        if self.open_step is None or step > self.open_step:
            self._close_step()
            self.open_step = step
        self.open_sum += float(finite.sum())
        self.open_count += finite.size

    def _close_step(self) -> None:
        if self.open_count:
            mean = self.open_sum / self.open_count
            self.ema_short = ema_update(self.ema_short, mean, ALPHA_SHORT)
            self.ema_long = ema_update(self.ema_long, mean, ALPHA_LONG)
        self.open_sum, self.open_count = 0.0, 0

    def emas(self) -> tuple[float, float]:
        """Short and long EMA of the step means, the open step included."""
        if not self.open_count:
            return self.ema_short, self.ema_long
        mean = self.open_sum / self.open_count
        return (ema_update(self.ema_short, mean, ALPHA_SHORT),
                ema_update(self.ema_long, mean, ALPHA_LONG))

    def values(self, last: int | None = None) -> np.ndarray:
        """The values held (the last ``last`` of them), in no particular order."""
        if last is None or last >= self.ring[1]:
            return self.buffer[:self.ring[1]].copy()
        out = np.empty(max(int(last), 0))
        return out[:ring_tail(self.buffer, self.ring, out)]

    def summary(self, bins: int, last: int | None = None) -> dict[str, Any]:
        """The statistics of the values held (or of the last ``last``), as plain numbers (NaN
        where undefined); ``count`` is the number of values described."""
        finite = np.sort(self.values(last))
        out = np.empty(N_VALUE_STATS)
        value_stats(finite, out)
        stats: dict[str, Any] = {name: float(out[slot]) for name, slot in _SLOTS.items()}
        stats["ema_short"], stats["ema_long"] = (float(x) for x in self.emas())
        edges = histogram_edges(finite, bins)
        counts = np.zeros(max(edges.size - 1, 0), np.int64)
        if counts.size:
            histogram(finite, edges, counts)
        last_step = -1 if self.open_step is None else self.open_step
        stats.update(count=int(finite.size), samples=self.samples, non_finite=self.non_finite,
                     missing=self.missing, last_step=last_step,
                     histogram={"edges": edges.tolist(), "counts": counts.tolist()})
        return stats


class RewardStats:
    """Per reward function statistics over the last ``window`` values (see the module docstring).

    ``observe`` is called by the receive loop with each BATCH's ``rv`` field; ``summary`` is read
    by snapshots and the ``rewards`` question (cached until the next ``observe``)."""

    def __init__(self, window: int = DEFAULT_WINDOW, bins: int = DEFAULT_BINS,
                 max_functions: int = MAX_FUNCTIONS) -> None:
        if window < 1 or bins < 1 or max_functions < 0:
            raise ValueError("window and bins must be >= 1, max_functions >= 0")
        self.window = int(window)
        self.bins = int(bins)
        self.max_functions = int(max_functions)
        self.functions: dict[str, RewardWindow] = {}
        self.dropped_entries = 0
        self._cached: dict[str, Any] | None = None

    def observe(self, entries: Any, flags: MutableMapping[str, int] | None = None) -> None:
        """Add ``rv`` entries (``[step, name, values]``, shape-checked by
        :func:`rlmon.wire.decode`; None means none). Non-numbers and non-finite values are
        counted into ``flags`` (``wrong_type``, ``nan``, ``inf``) when given. Never raises for
        bad values."""
        if not entries:
            return
        self._cached = None
        for step, name, values in entries:
            window = self._window_for(name)
            if window is None:
                self.dropped_entries += 1
                continue
            array, missing, wrong = _floats(values)
            finite = array[np.isfinite(array)]
            window.missing += missing
            window.non_finite += array.size - finite.size
            window.add(int(step), finite)
            if flags is not None:
                _flag(flags, array, wrong)

    def _window_for(self, name: str) -> RewardWindow | None:
        window = self.functions.get(name)
        if window is None and len(self.functions) < self.max_functions:
            window = self.functions[name] = RewardWindow(np.zeros(self.window))
        return window

    def summary(self, window: int | None = None) -> dict[str, Any]:
        """``{"functions": {name: stats}, "total_mean", "total_std", "sum", "window",
        "dropped_entries"}``: per function the :data:`STAT_NAMES`, ``count`` (values described),
        ``samples``, ``non_finite``, ``missing``, ``last_step`` and ``histogram`` (``edges``,
        ``counts``), over its last ``window`` values (default and at most :attr:`window`); the
        aggregates are over the functions holding values: the mean of their means, the mean of
        their stds, the sum of their means (NaN when none holds any)."""
        window = self.window if window is None else max(1, min(int(window), self.window))
        if self._cached is None or self._cached["window"] != window:
            functions = {name: w.summary(self.bins, window)
                         for name, w in sorted(self.functions.items())}
            self._cached = {"functions": functions, **aggregates(functions),
                            "window": window, "dropped_entries": self.dropped_entries}
        return self._cached


def aggregates(functions: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``total_mean`` (mean of the functions' means), ``total_std`` (mean of their stds) and
    ``sum`` (sum of their means), over the functions that hold values; NaN when none does."""
    held = [s for s in functions.values() if s.get("count")]
    if not held:
        return {"total_mean": math.nan, "total_std": math.nan, "sum": math.nan}
    means = [s["mean"] for s in held]
    return {"total_mean": sum(means) / len(means),
            "total_std": sum(s["std"] for s in held) / len(held), "sum": sum(means)}


def _floats(values: list) -> tuple[np.ndarray, int, int]:
    """``values`` as float64 (nil and non-numbers left out), and the counts of nils and of
    non-numbers."""
    if all(type(v) is float for v in values):
        return np.array(values, dtype=np.float64), 0, 0
    floats, missing, wrong = [], 0, 0
    for value in values:
        if value is None:
            missing += 1
        elif isinstance(value, float) or (isinstance(value, int) and abs(value) < 2**1023):
            floats.append(float(value))
        else:
            wrong += 1
    return np.array(floats, dtype=np.float64), missing, wrong


def _flag(flags: MutableMapping[str, int], array: np.ndarray, wrong: int) -> None:
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    for reason, count in (("wrong_type", wrong), ("nan", nan), ("inf", inf)):
        if count:
            flags[reason] = flags.get(reason, 0) + count
