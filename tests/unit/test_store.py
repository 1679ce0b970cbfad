"""RingStore against a deque-based reference store (see reference.py)."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.snapshot import SeriesStats
from collector import store as store_module
from collector.store import RingStore, SeriesLimitError
from reference import RefStore, ref_window_stats

WINDOW_FIELDS = ("count", "mean", "std", "min", "max", "median", "p25", "p75", "p90", "slope")


def same_floats(a, b) -> bool:
    """Element-wise equality where NaN equals NaN."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def close(actual: float, expected: float, scale: float = 1.0) -> bool:
    """Equal within rounding; NaN only matches NaN."""
    if math.isnan(expected):
        return math.isnan(actual)
    return actual == pytest.approx(expected, rel=1e-9, abs=max(1e-9 * scale, 1e-300))


def assert_matches(store: RingStore, ref: RefStore, sid: int) -> None:
    """History, count, last and EMAs of one series equal the reference."""
    steps, values = store.history(sid)
    ref_steps, ref_values = ref.history(sid)
    assert steps.tolist() == ref_steps and same_floats(values.tolist(), ref_values)
    assert store.count(sid) == len(ref_steps)
    last = store.last(sid)
    if ref_steps:
        assert last[0] == ref_steps[-1] and same_floats([last[1]], [ref_values[-1]])
    else:
        assert last[0] == -1 and math.isnan(last[1])
    stats = store.window_stats(sid)
    assert close(stats.ema_short, ref.series[sid].ema_short)
    assert close(stats.ema_long, ref.series[sid].ema_long)


def assert_window_matches(store: RingStore, ref: RefStore, sid: int, window: int | None) -> None:
    """window_stats over the last `window` points equals the reference statistics."""
    steps, values = ref.history(sid, window)
    expected = ref_window_stats(steps, values)
    stats = store.window_stats(sid, window)
    scale = max((abs(v) for v in values if math.isfinite(v)), default=1.0)
    for name in WINDOW_FIELDS:
        step_range = max(1, max(steps) - min(steps)) if name == "slope" and steps else 1
        assert close(getattr(stats, name), expected[name], scale / step_range), name


def store_and_ref(capacity: int, n_series: int) -> tuple[RingStore, RefStore, list[int]]:
    """A store and a reference with `n_series` series named m0..mN on rank 0."""
    store, ref = RingStore(capacity=capacity), RefStore(capacity)
    ids = [store.series_id(f"m{i}", 0) for i in range(n_series)]
    for _ in ids:
        ref.add_series()
    return store, ref, ids


def test_series_ids_are_stable_and_dense():
    """series_id creates once, find never creates, keys lists (metric, rank) in id order."""
    store = RingStore(capacity=4)
    assert store.find("loss", 0) is None and store.series_count == 0
    a, b, c = store.series_id("loss", 0), store.series_id("loss", -1), store.series_id("kl", 0)
    assert (a, b, c) == (0, 1, 2) and store.series_id("loss", -1) == 1
    assert store.find("kl", 0) == 2 and store.find("kl", 1) is None
    assert store.keys() == [("loss", 0), ("loss", -1), ("kl", 0)] and store.series_count == 3
    assert store.capacity == 4


def test_series_limit_error_carries_its_data_and_changes_nothing():
    """Past max_series, SeriesLimitError names the series and limit; existing series still work."""
    store = RingStore(capacity=3, max_series=2)
    store.series_id("a", 0)
    store.series_id("b", 0)
    with pytest.raises(SeriesLimitError) as info:
        store.series_id("c", 5)
    assert (info.value.metric, info.value.rank, info.value.limit) == ("c", 5, 2)
    assert store.series_count == 2 and store.find("c", 5) is None
    store.append(1, 7, 1.5)
    assert store.last(1) == (7, 1.5)


def test_bad_names_and_arguments_are_rejected():
    """Non-str metrics, non-int ranks, bad sizes and unknown ids raise the documented errors."""
    store = RingStore(capacity=3)
    with pytest.raises(TypeError):
        store.series_id(3, 0)
    with pytest.raises(TypeError):
        store.series_id("x", 1.5)
    for bad in (dict(capacity=0), dict(max_series=0), dict(ema_short_span=0)):
        with pytest.raises(ValueError):
            RingStore(**bad)
    with pytest.raises(IndexError):
        store.last(0)
    sid = store.series_id("x", 0)
    with pytest.raises(ValueError):
        store.history(sid, -1)
    with pytest.raises(TypeError):
        store.append(sid, 1.5, 0.0)
    with pytest.raises(OverflowError):
        store.append(sid, 2**63, 0.0)


def test_empty_series_reads():
    """An empty series: last is (-1, nan), history is empty, stats are NaN with count 0."""
    store = RingStore(capacity=3)
    sid = store.series_id("x", 0)
    assert store.last(sid)[0] == -1 and math.isnan(store.last(sid)[1])
    steps, values = store.history(sid)
    assert steps.dtype == np.int64 and values.dtype == np.float64 and steps.size == values.size == 0
    stats = store.window_stats(sid)
    assert isinstance(stats, SeriesStats) and stats.count == 0
    assert all(math.isnan(getattr(stats, f)) for f in SeriesStats.__slots__ if f != "count")


def test_single_appends_wrap_around_several_times():
    """One point at a time, 23 points into 5 slots: the last 5 survive, in order."""
    store, ref, (sid,) = store_and_ref(5, 1)
    for i in range(23):
        store.append(sid, 10 * i - 50, float(i) if i % 7 else math.nan)
        ref.append(sid, 10 * i - 50, float(i) if i % 7 else math.nan)
        assert_matches(store, ref, sid)


@pytest.mark.parametrize("n, k", [(1, 1), (32, 32), (0, 4), (3, 0), (50, 3)])
def test_block_shapes(n, k):
    """Blocks of shape (n, k) append row by row to k series, wrapping when n > capacity."""
    rng = np.random.default_rng(n * 100 + k)
    store, ref, ids = store_and_ref(40, max(k, 1))
    values = rng.normal(size=(n, k))
    steps = np.arange(n, dtype=np.int64) * 3 - 7
    store.append_block(np.array(ids[:k], np.int64), steps, values)
    ref.append_block(ids[:k], steps.tolist(), values.tolist())
    for sid in ids:
        assert_matches(store, ref, sid)


def test_block_accepts_lists_and_safe_dtypes():
    """Lists, int32 ids/steps and float32 values are converted; a non-contiguous view too."""
    store, ref, ids = store_and_ref(10, 2)
    store.append_block([1, 0], [5, 6], [[1.0, 2.0], [3.0, 4.0]])
    store.append_block(np.array([0], np.int32), np.array([7], np.int32),
                       np.array([[0.5]], np.float32))
    store.append_block(np.array([0, 1]), np.array([8]), np.arange(4.0).reshape(2, 2)[:1, ::-1])
    ref.append_block([1, 0], [5, 6], [[1.0, 2.0], [3.0, 4.0]])
    ref.append_block([0], [7], [[0.5]])
    ref.append_block([0, 1], [8], [[1.0, 0.0]])
    for sid in ids:
        assert_matches(store, ref, sid)


@pytest.mark.parametrize("ids, steps, values, error", [
    ([0, 9], [1], [[1.0, 2.0]], IndexError),
    ([-1], [1], [[1.0]], IndexError),
    ([0, 0], [1], [[1.0, 2.0]], ValueError),
    ([0], [1, 2], [[1.0, 2.0]], ValueError),
    ([0], [1.5], [[1.0]], TypeError),
    ([0], [1], [["a"]], TypeError),
    ([0], [[1]], [[1.0]], ValueError),
    ([0], [1], [1.0], ValueError),
    (np.array([0], np.uint64), [1], [[1.0]], TypeError),
])
def test_bad_blocks_raise_and_append_nothing(ids, steps, values, error):
    """Unknown or repeated ids, bad shapes and unsafe dtypes raise before anything is written."""
    store, _, _ = store_and_ref(4, 2)
    with pytest.raises(error):
        store.append_block(ids, steps, values)
    assert store.count(0) == store.count(1) == 0


def test_negative_and_huge_steps_round_trip():
    """Steps at the int64 extremes are stored and read back exactly; the slope stays finite."""
    store, ref, (sid,) = store_and_ref(8, 1)
    steps = [-(2**63), -(2**62), -1, 0, 2**62, 2**63 - 1]
    store.append_block([sid], steps, [[float(i)] for i in range(6)])
    ref.append_block([sid], steps, [[float(i)] for i in range(6)])
    assert_matches(store, ref, sid)
    assert_window_matches(store, ref, sid, None)


def test_rings_widen_lazily_and_keep_every_point():
    """Rings start narrow and widen (256, 1024, then capacity) without losing or reordering points."""
    store, ref, ids = store_and_ref(10_000, 3)
    rng = np.random.default_rng(7)
    sizes = []
    step = 0
    for n in (100, 156, 1, 700, 1500, 9000, 33):
        values = rng.normal(size=(n, 2))
        store.append_block(ids[:2], np.arange(step, step + n), values)
        ref.append_block(ids[:2], list(range(step, step + n)), values.tolist())
        store.append(ids[2], step, float(n))
        ref.append(ids[2], step, float(n))
        step += n
        sizes.append(store.nbytes())
        for sid in ids:
            assert_matches(store, ref, sid)
    assert sizes[0] == sizes[1] < sizes[2] == sizes[3] < sizes[4] == sizes[-1]


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(3, 120),
    sizes=st.lists(st.integers(0, 40), max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_widening_property(capacity, sizes, seed):
    """With a 2-slot first width, any growth sequence keeps the store equal to the reference."""
    rng = np.random.default_rng(seed)
    with mock.patch.object(store_module, "_FIRST_WIDTH", 2):
        store, ref, ids = store_and_ref(capacity, 2)
    for n in sizes:
        cols = [int(c) for c in rng.permutation(2)[: rng.integers(1, 3)]]
        values = rng.normal(size=(n, len(cols)))
        steps = rng.integers(-100, 100, size=n)
        store.append_block(cols, steps, values)
        ref.append_block(cols, steps.tolist(), values.tolist())
    for sid in ids:
        assert_matches(store, ref, sid)


def test_rows_grow_past_first_allocation_keeping_data():
    """Creating hundreds of series (several doublings) keeps every earlier series intact."""
    store, ref = RingStore(capacity=6), RefStore(6)
    for i in range(300):
        sid = store.series_id(f"m{i}", i % 8)
        assert sid == ref.add_series()
        for j in range(i % 9):
            store.append(sid, j, float(i * 10 + j))
            ref.append(sid, j, float(i * 10 + j))
    for sid in range(300):
        assert_matches(store, ref, sid)


def test_memory_is_allocated_lazily():
    """A store with few short series allocates far less than max_series x capacity."""
    store = RingStore()
    sid = store.series_id("loss", 0)
    store.append_block([sid], np.arange(100), np.ones((100, 1)))
    assert store.nbytes() < 2_000_000
    assert store.nbytes() < 4096 * 10_000 * 16 // 100


@pytest.mark.parametrize("window", [None, 0, 1, 2, 7, 40, 1000])
def test_window_stats_match_reference(window):
    """Window statistics over the last `window` points (NaN/Inf sprinkled, wrapped ring) match."""
    store, ref, (sid,) = store_and_ref(40, 1)
    rng = np.random.default_rng(3)
    values = rng.normal(5.0, 3.0, size=(97, 1))
    values[rng.random((97, 1)) < 0.15] = np.nan
    values[5, 0] = np.inf
    store.append_block([sid], np.arange(97) * 2, values)
    ref.append_block([sid], list(range(0, 194, 2)), values.tolist())
    assert_window_matches(store, ref, sid, window)
    stats = store.window_stats(sid, window)
    assert same_floats([stats.last], [values[-1, 0]])


def test_window_of_only_nan_keeps_running_emas():
    """A window with no finite point has NaN stats but the EMAs of the whole series and last=NaN."""
    store = RingStore(capacity=10, ema_short_span=1)
    sid = store.series_id("x", 0)
    store.append_block([sid], np.arange(6), [[1.0], [2.0], [4.0], [np.nan], [np.nan], [np.nan]])
    stats = store.window_stats(sid, 3)
    assert stats.count == 0 and math.isnan(stats.mean) and math.isnan(stats.last)
    assert stats.ema_short == 4.0 and 1.0 < stats.ema_long < 4.0


def test_constant_series_has_zero_spread_and_zero_slope():
    """All-equal values give std 0, slope 0 and every percentile equal to the value."""
    store = RingStore(capacity=50)
    sid = store.series_id("x", 0)
    store.append_block([sid], np.arange(30), np.full((30, 1), 0.1))
    stats = store.window_stats(sid)
    assert stats.std == 0.0 and stats.slope == 0.0
    assert stats.mean == stats.median == stats.p25 == stats.p90 == stats.ema_long == 0.1


def test_slope_of_a_line_with_noise_free_steps():
    """Values on a line of slope 0.25 per step give exactly that slope."""
    store = RingStore(capacity=100)
    sid = store.series_id("x", 0)
    steps = np.arange(1000, 1100, 5)
    store.append_block([sid], steps, (0.25 * steps + 3.0)[:, None])
    assert store.window_stats(sid).slope == pytest.approx(0.25, rel=1e-12)


@settings(max_examples=80, deadline=None)
@given(
    capacity=st.integers(1, 9),
    ops=st.lists(
        st.tuples(st.integers(0, 11),
                  st.lists(st.integers(0, 3), unique=True, min_size=1, max_size=4)),
        max_size=15),
    seed=st.integers(0, 2**32 - 1),
    window=st.one_of(st.none(), st.integers(0, 12)),
)
def test_store_property(capacity, ops, seed, window):
    """Any sequence of single and block appends leaves the store equal to the reference."""
    rng = np.random.default_rng(seed)
    store, ref, ids = store_and_ref(capacity, 4)
    for n, cols in ops:
        steps = rng.integers(-(2**40), 2**40, size=n)
        values = np.where(rng.random((n, len(cols))) < 0.2, np.nan, rng.normal(size=(n, len(cols))))
        if n == 1 and len(cols) == 1:
            store.append(cols[0], int(steps[0]), float(values[0, 0]))
        else:
            store.append_block(np.array(cols), steps, values)
        ref.append_block(cols, steps.tolist(), values.tolist())
    for sid in ids:
        assert_matches(store, ref, sid)
        assert_window_matches(store, ref, sid, window)


def test_widening_uses_arrays_prepared_in_the_background():
    """Half way to the current width, the next arrays are prepared on a background thread (their
    first columns already touched); the widening then moves into exactly those arrays, and every
    point, of series and rows created meanwhile too, survives."""
    store, ref, ids = store_and_ref(10_000, 3)
    store.append_block(ids, np.arange(129), np.ones((129, 3)))  # past half of the 256 slots
    ref.append_block(ids, list(range(129)), np.ones((129, 3)).tolist())
    preparation = store._spare._current
    preparation.thread.join()
    prepared = preparation.rings
    assert preparation.shape == (64, 1024)
    assert np.all(prepared.steps[:3, :256] == 0)  # touched by the thread where the copy writes
    values = np.arange(200 * 3, dtype=np.float64).reshape(200, 3)
    store.append_block(ids, np.arange(129, 329), values)
    ref.append_block(ids, list(range(129, 329)), values.tolist())
    assert store._arrays.values is prepared.values
    for sid in ids:
        assert_matches(store, ref, sid)


def test_a_spare_of_another_shape_is_not_used():
    """Rows grown after the spare was prepared make it the wrong shape: a fresh allocation."""
    store, ref = RingStore(capacity=10_000), RefStore(10_000)
    sid = store.series_id("a", 0)
    ref.add_series()
    store.append_block([sid], np.arange(200), np.ones((200, 1)))
    ref.append_block([sid], list(range(200)), np.ones((200, 1)).tolist())
    store._spare._current.thread.join()
    prepared = store._spare._current.rings
    for i in range(1, 100):  # past 64 rows: the rows double, the spare no longer fits
        store.series_id(f"m{i}", 0)
        ref.add_series()
    store.append_block([sid], np.arange(200, 300), np.ones((100, 1)))
    ref.append_block([sid], list(range(200, 300)), np.ones((100, 1)).tolist())
    assert store._arrays.values is not prepared.values
    assert store._arrays.values.shape == (128, 1024)
    assert_matches(store, ref, sid)


def test_a_spare_given_up_on_is_not_kept():
    """A widening straight to capacity (a block past the prepared width) drops the preparation:
    nothing is held beside the store's own arrays."""
    store = RingStore(capacity=10_000)
    sid = store.series_id("a", 0)
    store.append_block([sid], np.arange(200), np.ones((200, 1)))
    assert store._spare._current is not None
    store.append_block([sid], np.arange(200, 5200), np.ones((5000, 1)))
    assert store._spare._current is None
    assert store._arrays.values.shape == (64, 10_000)
