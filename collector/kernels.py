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
    slot_ints, slot_floats = np.zeros((1, 2, 4), np.int64), np.zeros((1, 2, 4))
    pairs = (np.ones((1, 2), np.int64), np.zeros((1, 2)), np.zeros(1, np.int64))
    out = (np.zeros((3, 4), np.int64), np.zeros((3, 4)), np.zeros(2, np.int64))
    aggregate_block(slot_ints, slot_floats, np.zeros((1, 2), np.int64), *pairs, *out, 2, ids, ids,
                    np.zeros(1, np.int64), np.ones((1, 1)))
    aggregate_complete(slot_ints, slot_floats, *out, 0)
    sorted_by_metric_and_step(out[0][0, :], out[0][1, :])
    _warm_up_detector_scans()


def _warm_up_detector_scans() -> None:
    ext, flags = np.zeros(4), np.zeros(4, np.bool_)
    ema_ratio_scan(ext, np.array([0.0, np.nan, np.nan]), 0.5, 0.5, 1, 0.0, np.empty(4), flags)
    baseline_ratio_scan(ext, np.zeros(3), 1, 0.5, np.empty(4), flags)
    median_ratio_scan(ext, 2, 2, 1, np.empty(2), flags)
    trend_scan(ext, 2, 2, 1, np.empty(2), flags)
    reward_anomaly_scan(ext, 2, np.full(2, np.nan), 4, 0.5, 0.5, np.empty((2, N_REWARD_SCORES)),
                        np.zeros((2, N_REWARD_SCORES), np.bool_))
    split_change_scan(ext, np.array([4], np.int64), 4, 1, np.empty(1), flags)
    rule_levels(ext, np.full(6, np.nan), np.empty(4, np.int8))


# -- detector scans -------------------------------------------------------------------------------
#
# Each scan scores the last ``k`` points of one cross-rank series at once. ``ext`` holds the
# series' stored tail, oldest first, ending with those ``k`` points (the block being scored), so a
# rolling window for block point ``j`` ends at ``ext[len(ext) - k + j]``. Outputs are written per
# block point with an ``emitted`` flag: a point with too little history (or a non-finite value)
# emits no score. Running state (EMAs, baselines) lives in small float64 arrays the caller keeps
# per metric. The per-step reference implementations are in ``tests/unit/reference_detectors.py``.

@njit(cache=True)
def finite_of(x, start, stop, buf):
    """Copy the finite values of ``x[start:stop]`` to the front of ``buf``; return how many."""
    m = 0
    for i in range(start, stop):
        if np.isfinite(x[i]):
            buf[m] = x[i]
            m += 1
    return m


@njit(cache=True)
def scale_of(x):
    """:func:`magnitude_scale` for a non-empty, unsorted finite ``x``."""
    largest = 0.0
    for v in x:
        largest = max(largest, abs(v))
    if largest == 0.0 or 2.0**-500 <= largest < 2.0**500:
        return 1.0
    return math.ldexp(1.0, max(math.frexp(largest)[1] - 1, -1000))


@njit(cache=True)
def ema_ratio_scan(values, state, alpha_short, alpha_long, min_count, min_long, out, emitted):
    """KL acceleration: short EMA / long EMA of the finite values, once ``min_count`` finite
    values were seen and the long EMA exceeds ``min_long``.

    ``state`` float64 ``[count, short, long]`` is updated in place (NaN EMAs before the first
    value)."""
    count, short, long = state[0], state[1], state[2]
    for j in range(values.shape[0]):
        emitted[j] = False
        x = values[j]
        if not np.isfinite(x):
            continue
        short = ema_update(short, x, alpha_short)
        long = ema_update(long, x, alpha_long)
        count += 1
        if count >= min_count and long > min_long:
            out[j] = short / long
            emitted[j] = True
    state[0], state[1], state[2] = count, short, long


@njit(cache=True)
def baseline_ratio_scan(values, state, size, alpha, out, emitted):
    """Entropy collapse / length blow-up: the mean of the first ``size`` finite values is the
    baseline; after it, score short EMA / baseline (no score while ``|baseline| <= 1e-12``).

    ``state`` float64 ``[n_first, sum_first, ema]`` is updated in place."""
    n_first, total, ema = state[0], state[1], state[2]
    for j in range(values.shape[0]):
        emitted[j] = False
        x = values[j]
        if not np.isfinite(x):
            continue
        if n_first < size:
            n_first += 1
            total += x
            continue
        ema = ema_update(ema, x, alpha)
        base = total / n_first
        if abs(base) > 1e-12:
            out[j] = ema / base
            emitted[j] = True
    state[0], state[1], state[2] = n_first, total, ema


@njit(cache=True)
def median_ratio_scan(ext, k, lookback, min_points, out, emitted):
    """Gradient-norm spikes: ``|x| / median(|previous|)`` over the finite values of the
    ``lookback`` points before ``x``; needs ``min_points`` of them and a median above 1e-12."""
    buf = np.empty(lookback)
    first = ext.shape[0] - k
    for j in range(k):
        emitted[j] = False
        idx = first + j
        x = ext[idx]
        m = finite_of(ext, max(0, idx - lookback), idx, buf)
        if m < min_points or not np.isfinite(x):
            continue
        window = np.abs(buf[:m])
        median = np.median(window)
        if median > 1e-12:
            out[j] = abs(x) / median
            emitted[j] = True


@njit(cache=True)
def trend_scan(ext, k, window, min_points, out, emitted):
    """Loss rising: over the finite values of the ``window`` points ending at each block point,
    least-squares slope (against their order) × count / population std; needs ``min_points``
    finite values and a std above 1e-12."""
    buf = np.empty(window)
    moments_out = np.empty(N_STATS)
    first = ext.shape[0] - k
    for j in range(k):
        emitted[j] = False
        idx = first + j
        m = finite_of(ext, max(0, idx - window + 1), idx + 1, buf)
        if m < min_points:
            continue
        x = buf[:m]
        scale = scale_of(x)
        moments(x, scale, moments_out)
        std = moments_out[STAT_STD]
        if not std > 1e-12:
            continue
        rise = slope(x, np.arange(m), moments_out[STAT_MEAN], scale)
        out[j] = rise * m / std
        emitted[j] = True


#: Columns of a :func:`reward_anomaly_scan` output.
REWARD_FLATLINE = 0
REWARD_NEGATIVE = 1
REWARD_OUTLIER = 2
REWARD_DROP = 3
REWARD_SPIKE = 4
N_REWARD_SCORES = 5


@njit(cache=True)
def reward_anomaly_scan(ext, k, state, window, alpha_short, alpha_long, out, emitted):
    """The GRPO guide's reward anomalies for each block point with a finite value, over the finite
    values of the ``window`` points ending there (at least 10):

    * ``REWARD_FLATLINE`` / ``REWARD_NEGATIVE``: fractions of zeros / negatives;
    * ``REWARD_OUTLIER``: ``|x - mean| / std`` of the earlier values (10 or more, std > 1e-12);
    * with 20 or more values and ``|long EMA| > 1e-9``: ``REWARD_DROP`` = (long − short) / |long|,
      and when both EMAs are positive ``REWARD_SPIKE`` = short / long.

    ``state`` float64 ``[short, long]`` (EMAs of every finite value) is updated in place.
    """
    buf = np.empty(window)
    fractions = np.empty(3)
    stats = np.empty(N_STATS)
    short, long = state[0], state[1]
    first = ext.shape[0] - k
    for j in range(k):
        for c in range(N_REWARD_SCORES):
            emitted[j, c] = False
        idx = first + j
        x = ext[idx]
        if not np.isfinite(x):
            continue
        short = ema_update(short, x, alpha_short)
        long = ema_update(long, x, alpha_long)
        m = finite_of(ext, max(0, idx - window + 1), idx + 1, buf)
        if m < 10:
            continue
        sign_fractions(buf[:m], fractions)
        out[j, REWARD_FLATLINE], out[j, REWARD_NEGATIVE] = fractions[0], fractions[1]
        emitted[j, REWARD_FLATLINE] = emitted[j, REWARD_NEGATIVE] = True
        if m - 1 >= 10:
            previous = buf[:m - 1]
            moments(previous, scale_of(previous), stats)
            if stats[STAT_STD] > 1e-12:
                out[j, REWARD_OUTLIER] = abs(x - stats[STAT_MEAN]) / stats[STAT_STD]
                emitted[j, REWARD_OUTLIER] = True
        if abs(long) > 1e-9 and m >= 20:
            out[j, REWARD_DROP] = (long - short) / abs(long)
            emitted[j, REWARD_DROP] = True
            if long > 0 and short > 0:
                out[j, REWARD_SPIKE] = short / long
                emitted[j, REWARD_SPIKE] = True
    state[0], state[1] = short, long


@njit(cache=True)
def finite_mean(x, start, stop):
    """Mean of the finite values of ``x[start:stop]`` (NaN when none)."""
    total = 0.0
    m = 0
    for i in range(start, stop):
        if np.isfinite(x[i]):
            total += x[i]
            m += 1
    return total / m if m else np.nan


@njit(cache=True)
def split_change_scan(values, ends, window, recent, out, emitted):
    """Reward hacking's trend comparison. For each ``e`` in ``ends``, the window is
    ``values[max(0, e - window):e]``; when it holds at least ``2 * recent`` points, ``out`` is the
    relative change (after − before) / max(|before|, 1e-9) between the finite means of its first
    part and of its last ``recent`` points (NaN when either part has no finite value)."""
    for j in range(ends.shape[0]):
        e = ends[j]
        start = max(0, e - window)
        emitted[j] = e - start >= 2 * recent
        if not emitted[j]:
            continue
        before = finite_mean(values, start, e - recent)
        after = finite_mean(values, e - recent, e)
        out[j] = (after - before) / max(abs(before), 1e-9)


#: Slots of a rule's threshold array (:func:`rule_levels`); NaN means "not set".
THRESHOLD_SLOTS = ("info_above", "info_below", "warning_above", "warning_below",
                   "critical_above", "critical_below")


@njit(cache=True)
def rule_levels(values, thresholds, out):
    """Severity code of each score (0 none, 1 INFO, 2 WARNING, 3 CRITICAL: the highest whose
    threshold it breaches; non-finite scores breach nothing). Returns the index of the first
    non-zero code, or -1 when every code is 0."""
    first = -1
    for j in range(values.shape[0]):
        x = values[j]
        code = 0
        if np.isfinite(x):
            for level in range(3, 0, -1):
                above = thresholds[2 * (level - 1)]
                below = thresholds[2 * (level - 1) + 1]
                if (not np.isnan(above) and x > above) or (not np.isnan(below) and x < below):
                    code = level
                    break
        out[j] = code
        if code and first < 0:
            first = j
    return first


# -- cross-rank step aggregates -------------------------------------------------------------
#
# State of :class:`collector.aggregate.StepAggregator`, one ring of ``W = max_pending_steps + 1``
# slots per metric, step ``s`` in slot ``s % W`` (every step a metric still holds lies in
# ``[newest - W + 1, newest]``, so they never collide):
#
# * ``slot_ints`` int64 ``(M, W, 4)``: ``SLOT_STEP``, ``SLOT_STATE`` (``FREE``/``PENDING``/``DONE``),
#   ``SLOT_REPORTED`` (ranks that reported, NaN included), ``SLOT_FINITE`` (finite values among them).
# * ``slot_floats`` float64 ``(M, W, 4)``: ``SLOT_SUM`` + ``SLOT_COMP`` (Neumaier-compensated sum of
#   the finite values), ``SLOT_MIN``, ``SLOT_MAX`` (+Inf/-Inf while no value is finite).
# * ``metric_ints`` int64 ``(M, 2)``: ``METRIC_NEWEST`` step accepted, ``METRIC_SEEN`` (0 before the
#   first value).
# * ``pair_steps`` int64 / ``pair_values`` float64 ``(P, W)``: per ``(metric, rank)`` pair, the step
#   and value it reported into each slot (so a repeated report replaces its value), and
#   ``pair_metric`` int64 ``(P,)`` the pair's metric (-1 for unused rows). Slot ``k`` of a fresh row
#   holds step ``k + 1``, which never maps to slot ``k``.
# * ``out_ints`` int64 ``(3, C)`` (rows ``OUT_METRIC``, ``OUT_STEP``, ``OUT_COUNT``) and
#   ``out_floats`` float64 ``(3, C)`` (rows ``OUT_MEAN``, ``OUT_MIN``, ``OUT_MAX``): completed
#   steps, appended at column ``counters[COUNTER_OUT]``; the caller guarantees room.
#   ``counters[COUNTER_LATE]`` counts late values.

INT64_MIN = -(2**63)
"""Smallest int64 (steps may be any int64)."""
SLOT_STEP = 0
"""Index in ``slot_ints``: the step the slot holds."""
SLOT_STATE = 1
"""Index in ``slot_ints``: ``FREE``, ``PENDING`` or ``DONE``."""
SLOT_REPORTED = 2
"""Index in ``slot_ints``: ranks that reported the step (any value)."""
SLOT_FINITE = 3
"""Index in ``slot_ints``: finite values among them."""
SLOT_SUM = 0
"""Index in ``slot_floats``: running sum of the finite values."""
SLOT_COMP = 1
"""Index in ``slot_floats``: Neumaier compensation of that sum."""
SLOT_MIN = 2
"""Index in ``slot_floats``: smallest finite value (+Inf when none)."""
SLOT_MAX = 3
"""Index in ``slot_floats``: largest finite value (-Inf when none)."""
FREE = 0
"""Slot state: holds no step."""
PENDING = 1
"""Slot state: waiting for more ranks."""
DONE = 2
"""Slot state: emitted; later values for its step are late."""
METRIC_NEWEST = 0
"""Index in ``metric_ints``: newest step accepted for the metric."""
METRIC_SEEN = 1
"""Index in ``metric_ints``: 1 once the metric accepted a value."""
OUT_METRIC = 0
"""Index in ``out_ints``: metric id."""
OUT_STEP = 1
"""Index in ``out_ints``: step."""
OUT_COUNT = 2
"""Index in ``out_ints``: ranks that reported."""
OUT_MEAN = 0
"""Index in ``out_floats``: mean of the finite values (NaN when none)."""
OUT_MIN = 1
"""Index in ``out_floats``: minimum of the finite values (NaN when none)."""
OUT_MAX = 2
"""Index in ``out_floats``: maximum of the finite values (NaN when none)."""
COUNTER_OUT = 0
"""Index in ``counters``: columns of ``out_ints``/``out_floats`` in use."""
COUNTER_LATE = 1
"""Index in ``counters``: values dropped as late (a running total)."""


@njit(cache=True)
def steps_ahead(lo, hi, cap):
    """``min(hi - lo, cap)`` for ``hi > lo`` and ``cap >= 1``, without int64 overflow."""
    if hi >= INT64_MIN + cap and hi - cap >= lo:
        return cap
    return hi - lo


@njit(cache=True)
def older_than(step, newest, horizon):
    """``step < newest - horizon`` for any int64 steps and ``horizon >= 1``, without overflow."""
    return newest >= INT64_MIN + horizon and step < newest - horizon


@njit(cache=True)
def agg_open(slot_ints, slot_floats, m, slot, step):
    """Start ``step`` in ``slot`` of metric ``m``: pending, no reports."""
    slot_ints[m, slot, SLOT_STEP] = step
    slot_ints[m, slot, SLOT_STATE] = PENDING
    slot_ints[m, slot, SLOT_REPORTED] = 0
    slot_ints[m, slot, SLOT_FINITE] = 0
    slot_floats[m, slot, SLOT_SUM] = 0.0
    slot_floats[m, slot, SLOT_COMP] = 0.0
    slot_floats[m, slot, SLOT_MIN] = np.inf
    slot_floats[m, slot, SLOT_MAX] = -np.inf


@njit(cache=True)
def agg_add_finite(slot_ints, slot_floats, m, slot, x):
    """Add the finite ``x`` to the slot's count, compensated sum, min and max."""
    slot_ints[m, slot, SLOT_FINITE] += 1
    total = slot_floats[m, slot, SLOT_SUM]
    t = total + x
    if abs(total) >= abs(x):
        slot_floats[m, slot, SLOT_COMP] += (total - t) + x
    else:
        slot_floats[m, slot, SLOT_COMP] += (x - t) + total
    slot_floats[m, slot, SLOT_SUM] = t
    slot_floats[m, slot, SLOT_MIN] = min(slot_floats[m, slot, SLOT_MIN], x)
    slot_floats[m, slot, SLOT_MAX] = max(slot_floats[m, slot, SLOT_MAX], x)


@njit(cache=True)
def agg_rescan(slot_ints, slot_floats, pair_steps, pair_values, pair_metric, m, slot):
    """Recompute the slot's finite statistics from every pair of metric ``m`` that reported its
    step (after a repeated report replaced a value)."""
    step = slot_ints[m, slot, SLOT_STEP]
    agg_open(slot_ints, slot_floats, m, slot, step)
    reported = 0
    for p in range(pair_metric.shape[0]):
        if pair_metric[p] == m and pair_steps[p, slot] == step:
            reported += 1
            if np.isfinite(pair_values[p, slot]):
                agg_add_finite(slot_ints, slot_floats, m, slot, pair_values[p, slot])
    slot_ints[m, slot, SLOT_REPORTED] = reported


@njit(cache=True)
def agg_emit(slot_ints, slot_floats, m, slot, out_ints, out_floats, counters):
    """Mark the slot done and append its aggregate to the out arrays.

    The mean is clamped to ``[min, max]`` (so equal values give exactly that value); when the
    sum overflows it is ±Inf.
    """
    row = counters[COUNTER_OUT]
    out_ints[OUT_METRIC, row] = m
    out_ints[OUT_STEP, row] = slot_ints[m, slot, SLOT_STEP]
    out_ints[OUT_COUNT, row] = slot_ints[m, slot, SLOT_REPORTED]
    finite = slot_ints[m, slot, SLOT_FINITE]
    if finite == 0:
        out_floats[OUT_MEAN, row] = np.nan
        out_floats[OUT_MIN, row] = np.nan
        out_floats[OUT_MAX, row] = np.nan
    else:
        low = slot_floats[m, slot, SLOT_MIN]
        high = slot_floats[m, slot, SLOT_MAX]
        total = slot_floats[m, slot, SLOT_SUM] + slot_floats[m, slot, SLOT_COMP]
        if not np.isfinite(total):
            total = slot_floats[m, slot, SLOT_SUM]
        mean = total / finite
        out_floats[OUT_MEAN, row] = min(max(mean, low), high) if np.isfinite(mean) else mean
        out_floats[OUT_MIN, row] = low
        out_floats[OUT_MAX, row] = high
    slot_ints[m, slot, SLOT_STATE] = DONE
    counters[COUNTER_OUT] = row + 1


@njit(cache=True)
def agg_in_window(metric_ints, m, step, horizon):
    """False when ``step`` is more than ``horizon`` below metric ``m``'s newest (a late value);
    the first step a metric sees becomes its newest."""
    if metric_ints[m, METRIC_SEEN] == 0:
        metric_ints[m, METRIC_SEEN] = 1
        metric_ints[m, METRIC_NEWEST] = step
        return True
    return not older_than(step, metric_ints[m, METRIC_NEWEST], horizon)


@njit(cache=True)
def aggregate_block(slot_ints, slot_floats, metric_ints, pair_steps, pair_values, pair_metric,
                    out_ints, out_floats, counters, world_size, metric_ids, pair_ids, steps, values):
    """Record ``values[i, j]`` of pair ``pair_ids[j]`` (metric ``metric_ids[j]``) at ``steps[i]``,
    column by column, each column in row order.

    A value is late (counted in ``counters[COUNTER_LATE]``, nothing else changes) when its step is
    more than ``W - 1`` below the metric's newest or already done. Otherwise a step above the
    newest first frees the slots of the steps it pushes out of the ring, emitting the pending ones
    (completion by age); then the value is recorded (a pair's repeated report replaces its
    value), and the step completes once ``world_size`` ranks reported it. Completions are appended
    to ``out_ints``/``out_floats``, which must have room for ``k * W + n * k`` more columns. Ids,
    shapes and dtypes are trusted.

    The loop calls only helpers that call no array helper themselves: Numba reference-counts
    arrays passed down nested calls, and that made a one-helper-per-value version ~4x slower.
    """
    width = slot_ints.shape[1]
    for j in range(metric_ids.shape[0]):
        m = metric_ids[j]
        p = pair_ids[j]
        for i in range(steps.shape[0]):
            step = steps[i]
            if not agg_in_window(metric_ints, m, step, width - 1):
                counters[COUNTER_LATE] += 1
                continue
            newest = metric_ints[m, METRIC_NEWEST]
            if step > newest:
                for ahead in range(1, steps_ahead(newest, step, width) + 1):
                    old = (newest + ahead) % width
                    if slot_ints[m, old, SLOT_STATE] == PENDING:
                        agg_emit(slot_ints, slot_floats, m, old, out_ints, out_floats, counters)
                    slot_ints[m, old, SLOT_STATE] = FREE
                metric_ints[m, METRIC_NEWEST] = step
            slot = step % width
            if slot_ints[m, slot, SLOT_STATE] == FREE or slot_ints[m, slot, SLOT_STEP] != step:
                agg_open(slot_ints, slot_floats, m, slot, step)
            elif slot_ints[m, slot, SLOT_STATE] == DONE:
                counters[COUNTER_LATE] += 1
                continue
            x = values[i, j]
            pair_values[p, slot] = x
            if pair_steps[p, slot] == step:  # a repeated report: its last value wins
                agg_rescan(slot_ints, slot_floats, pair_steps, pair_values, pair_metric, m, slot)
            else:
                pair_steps[p, slot] = step
                slot_ints[m, slot, SLOT_REPORTED] += 1
                if np.isfinite(x):
                    agg_add_finite(slot_ints, slot_floats, m, slot, x)
            if slot_ints[m, slot, SLOT_REPORTED] >= world_size:
                agg_emit(slot_ints, slot_floats, m, slot, out_ints, out_floats, counters)


@njit(cache=True)
def sorted_by_metric_and_step(metric, step):
    """True when the pairs ``(metric[i], step[i])`` are in ascending order."""
    for i in range(1, metric.shape[0]):
        if metric[i] < metric[i - 1] or (metric[i] == metric[i - 1] and step[i] < step[i - 1]):
            return False
    return True


@njit(cache=True)
def aggregate_complete(slot_ints, slot_floats, out_ints, out_floats, counters, min_reported):
    """Emit every pending step of every metric reported by at least ``min_reported`` ranks (all
    when 0), metric by metric in slot order. ``out_*`` must have room for ``M * W`` more
    columns."""
    for m in range(slot_ints.shape[0]):
        for slot in range(slot_ints.shape[1]):
            if (slot_ints[m, slot, SLOT_STATE] == PENDING
                    and slot_ints[m, slot, SLOT_REPORTED] >= min_reported):
                agg_emit(slot_ints, slot_floats, m, slot, out_ints, out_floats, counters)
