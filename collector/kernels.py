"""Every Numba kernel of the collector: ring-buffer appends and reads, window statistics, EMA.

The kernels are tiny typed loops that write into arrays they are given; they validate nothing a
caller can check cheaply in Python (dtypes, shapes) and never raise. State and validation live in
:class:`collector.store.RingStore`. Each kernel has a slow plain-Python reference in
``tests/unit/reference.py`` and is tested against it, with and without ``NUMBA_DISABLE_JIT=1``.

Ring layout (one row per series, ``W = values.shape[1]`` slots per row):

* ``values`` float64 ``(S, W)`` and ``steps`` int64 ``(S, W)``: the points, indexed modulo ``W``;
  arrays are never shifted.
* ``heads`` int64 ``(S,)``: the slot the next point of each series goes to.
* ``counts`` int64 ``(S,)``: points held, at most ``W``; the oldest sits at ``(head - count) % W``.
* ``ema_short`` / ``ema_long`` float64 ``(S,)``: running EMAs, NaN until the first finite point.

Kernels are compiled on first call and cached on disk (``cache=True``: ``__pycache__`` beside this
file, or ``NUMBA_CACHE_DIR``); :func:`warm_up` triggers that at start-up instead of on the first
batch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

STAT_COUNT = 0
"""Index in a :func:`window_stats` output: number of finite points (stored as a float)."""
STAT_MEAN = 1
"""Index in a :func:`window_stats` output: arithmetic mean."""
STAT_STD = 2
"""Index in a :func:`window_stats` output: population standard deviation (ddof=0)."""
STAT_MIN = 3
"""Index in a :func:`window_stats` output: minimum."""
STAT_MAX = 4
"""Index in a :func:`window_stats` output: maximum."""
STAT_MEDIAN = 5
"""Index in a :func:`window_stats` output: median (50th percentile)."""
STAT_P25 = 6
"""Index in a :func:`window_stats` output: 25th percentile."""
STAT_P75 = 7
"""Index in a :func:`window_stats` output: 75th percentile."""
STAT_P90 = 8
"""Index in a :func:`window_stats` output: 90th percentile."""
STAT_SLOPE = 9
"""Index in a :func:`window_stats` output: least-squares slope of value against step (per step)."""
N_STATS = 10
"""Length of a :func:`window_stats` output array."""


@njit(cache=True)
def ema_update(ema: float, x: float, alpha: float) -> float:
    """One EMA step: non-finite ``x`` leaves ``ema`` as is; a NaN ``ema`` is initialised to ``x``."""
    if not np.isfinite(x):
        return ema
    if np.isnan(ema):
        return x
    return ema + alpha * (x - ema)


@njit(cache=True)
def first_bad_id(series_ids, n_series):
    """Index of the first id outside ``[0, n_series)`` or repeated in ``series_ids``; else -1."""
    seen = np.zeros(n_series, np.bool_)
    for j in range(series_ids.shape[0]):
        sid = series_ids[j]
        if sid < 0 or sid >= n_series or seen[sid]:
            return j
        seen[sid] = True
    return -1


@njit(cache=True)
def ring_required_width(counts, series_ids, n):
    """Most points a row in ``series_ids`` would hold after ``n`` more, ring width ignored.

    Returns -1 when an id is outside ``[0, counts.shape[0])``.
    """
    most = 0
    for j in range(series_ids.shape[0]):
        sid = series_ids[j]
        if sid < 0 or sid >= counts.shape[0]:
            return -1
        most = max(most, counts[sid] + n)
    return most


@njit(cache=True)
def ring_append_block(values, steps, heads, counts, ema_short, ema_long, alpha_short, alpha_long,
                      series_ids, new_steps, new_values):
    """Append ``(new_steps[i], new_values[i, j])`` to row ``series_ids[j]`` for every ``i``, in order.

    ``series_ids`` int64 ``(k,)``, ``new_steps`` int64 ``(n,)``, ``new_values`` float64 ``(n, k)``.
    Returns -1 on success. If an id is outside ``[0, heads.shape[0])`` or repeated, nothing is
    written and the column index of the first such id is returned. Shapes and dtypes are trusted.
    """
    bad = first_bad_id(series_ids, heads.shape[0])
    if bad >= 0:
        return bad
    width = values.shape[1]
    for j in range(series_ids.shape[0]):
        sid = series_ids[j]
        head = heads[sid]
        short = ema_short[sid]
        long = ema_long[sid]
        for i in range(new_steps.shape[0]):
            x = new_values[i, j]
            values[sid, head] = x
            steps[sid, head] = new_steps[i]
            head = head + 1 if head + 1 < width else 0
            short = ema_update(short, x, alpha_short)
            long = ema_update(long, x, alpha_long)
        heads[sid] = head
        counts[sid] = min(counts[sid] + new_steps.shape[0], width)
        ema_short[sid] = short
        ema_long[sid] = long
    return -1


@njit(cache=True)
def ring_read(values, steps, heads, counts, sid, out_steps, out_values):
    """Copy the last ``m = min(len(out_values), counts[sid])`` points of row ``sid``, oldest first.

    Writes ``out_steps[:m]`` and ``out_values[:m]`` and returns ``m``. ``sid`` must be a valid row.
    """
    width = values.shape[1]
    m = min(out_values.shape[0], counts[sid])
    slot = heads[sid] - m
    if slot < 0:
        slot += width
    for i in range(m):
        out_values[i] = values[sid, slot]
        out_steps[i] = steps[sid, slot]
        slot += 1
        if slot == width:
            slot = 0
    return m


@njit(cache=True)
def magnitude_scale(sorted_x):
    """A power of two to divide the ascending ``sorted_x`` by before summing squares.

    1.0 when the largest magnitude lies in ``[2**-500, 2**500)`` (or is 0); otherwise about that
    magnitude, clamped to ``[2**-1000, 2**1023]``, so squares of values near the float64 limits
    neither overflow nor underflow. Scaling by a power of two is exact.
    """
    largest = max(abs(sorted_x[0]), abs(sorted_x[-1]))
    if largest == 0.0 or 2.0**-500 <= largest < 2.0**500:
        return 1.0
    return math.ldexp(1.0, max(math.frexp(largest)[1] - 1, -1000))


@njit(cache=True)
def moments(x, scale, out):
    """Write the mean and population std of ``x`` (finite, non-empty) into ``out``.

    Works on ``x / scale`` (see :func:`magnitude_scale`), relative to ``x[0]``, with the corrected
    two-pass variance: a constant window gives its value and a std of exactly 0.
    """
    m = x.shape[0]
    inv = 1.0 / scale
    first = x[0] * inv
    total = 0.0
    for i in range(m):
        total += x[i] * inv - first
    mean = first + total / m
    dev = 0.0
    sq = 0.0
    for i in range(m):
        d = x[i] * inv - mean
        dev += d
        sq += d * d
    out[STAT_MEAN] = mean * scale
    out[STAT_STD] = np.sqrt(max(sq - dev * dev / m, 0.0) / m) * scale


@njit(cache=True)
def lerp(a, b, t):
    """NumPy's linear interpolation between ``a`` and ``b`` (exact at both ends).

    Ends of magnitude 2**1022 or more, where ``b - a`` could overflow, are weighed instead
    (NumPy returns an infinity there).
    """
    if abs(a) >= 2.0**1022 or abs(b) >= 2.0**1022:
        return a * (1.0 - t) + b * t
    diff = b - a
    if t >= 0.5:
        return b - diff * (1.0 - t)
    return a + diff * t


@njit(cache=True)
def quantile(sorted_x, q):
    """The ``q`` quantile of the ascending, non-empty ``sorted_x`` (NumPy's default method)."""
    pos = (sorted_x.shape[0] - 1) * q
    lo = int(np.floor(pos))
    hi = min(lo + 1, sorted_x.shape[0] - 1)
    return lerp(sorted_x[lo], sorted_x[hi], pos - lo)


@njit(cache=True)
def order_stats(sorted_x, out):
    """Write min, max, median, p25, p75 and p90 of the ascending, non-empty ``sorted_x``."""
    out[STAT_MIN] = sorted_x[0]
    out[STAT_MAX] = sorted_x[-1]
    out[STAT_MEDIAN] = quantile(sorted_x, 0.5)
    out[STAT_P25] = quantile(sorted_x, 0.25)
    out[STAT_P75] = quantile(sorted_x, 0.75)
    out[STAT_P90] = quantile(sorted_x, 0.9)


@njit(cache=True)
def step_offset(step, origin):
    """``step - origin`` as a float, without int64 overflow when the signs differ."""
    if (step ^ origin) >= 0:
        return float(step - origin)
    return float(step) - float(origin)


@njit(cache=True)
def slope(values, steps, mean, scale):
    """Least-squares slope of the finite ``values`` against ``steps``; NaN if undefined.

    ``mean`` is the mean of the finite values; values are divided by the power of two ``scale``
    (see :func:`magnitude_scale`).
    Steps are taken relative to the first finite point's step before conversion to float, so
    huge step numbers keep their differences.
    """
    origin = 0
    total = 0.0
    m = 0
    for i in range(values.shape[0]):
        if np.isfinite(values[i]):
            if m == 0:
                origin = steps[i]
            total += step_offset(steps[i], origin)
            m += 1
    if m < 2:
        return np.nan
    xmean = total / m
    inv = 1.0 / scale
    scaled_mean = mean * inv
    sxx = 0.0
    sxy = 0.0
    for i in range(values.shape[0]):
        if np.isfinite(values[i]):
            dx = step_offset(steps[i], origin) - xmean
            sxx += dx * dx
            sxy += dx * (values[i] * inv - scaled_mean)
    return sxy / sxx * scale if sxx > 0.0 else np.nan


@njit(cache=True)
def series_stats(values_chrono, steps_chrono, finite_sorted, out):
    """Window statistics into ``out`` (float64, ``N_STATS`` long, slots ``STAT_*``).

    ``values_chrono``/``steps_chrono`` are the window oldest first; ``finite_sorted`` holds its
    finite values in ascending order. With no finite value every slot but ``STAT_COUNT`` (0) is
    NaN; the slope is NaN with fewer than 2 finite points or a single distinct step.
    """
    out[:] = np.nan
    out[STAT_COUNT] = finite_sorted.shape[0]
    if finite_sorted.shape[0] == 0:
        return
    scale = magnitude_scale(finite_sorted)
    moments(finite_sorted, scale, out)
    order_stats(finite_sorted, out)
    out[STAT_SLOPE] = slope(values_chrono, steps_chrono, out[STAT_MEAN], scale)


@njit(cache=True)
def sign_fractions(values, out):
    """Fractions of the finite ``values`` that are zero, negative and positive, into ``out[0:3]``
    (NaN when none is finite). The reward detectors' FLATLINE and NEGATIVE scores."""
    zeros = 0
    negatives = 0
    positives = 0
    for x in values:
        if not np.isfinite(x):
            continue
        if x == 0.0:
            zeros += 1
        elif x < 0.0:
            negatives += 1
        else:
            positives += 1
    total = zeros + negatives + positives
    if total == 0:
        out[0] = out[1] = out[2] = np.nan
        return
    out[0] = zeros / total
    out[1] = negatives / total
    out[2] = positives / total


def window_stats(values_chrono: np.ndarray, steps_chrono: np.ndarray, out: np.ndarray) -> None:
    """Statistics of the finite points of one window into ``out``; see :func:`series_stats`.

    ``values_chrono`` float64 and ``steps_chrono`` int64, same length, oldest first. Plain Python:
    it sorts the finite values with NumPy (a vectorised sort, several times faster than a sort
    compiled by Numba) and hands them to the :func:`series_stats` kernel.
    """
    finite = values_chrono[np.isfinite(values_chrono)]
    finite.sort()
    series_stats(values_chrono, steps_chrono, finite, out)


def warm_up() -> None:
    """Compile (or load from the disk cache) every kernel by running it once on tiny inputs.

    Call it at collector start-up so the first batch does not pay the compile time (about a
    second per kernel without a cache). Main thread or any thread; raises nothing of its own.
    """
    sign_fractions(np.zeros(2), np.empty(3))
    values = np.zeros((1, 2))
    steps = np.zeros((1, 2), np.int64)
    state = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.full(1, np.nan), np.full(1, np.nan))
    ids = np.zeros(1, np.int64)
    ring_append_block(values, steps, *state, 0.5, 0.5, ids, np.zeros(1, np.int64), np.ones((1, 1)))
    ring_required_width(state[1], ids, 1)
    out_steps = np.empty(2, np.int64)
    out_values = np.empty(2)
    ring_read(values, steps, state[0], state[1], 0, out_steps, out_values)
    window_stats(out_values, out_steps, np.empty(N_STATS))
