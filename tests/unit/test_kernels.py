"""Every collector kernel against its slow plain-Python reference (see reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import kernels
from reference import RefStore, ref_ema, ref_window_stats

ALPHA_SHORT = 2 / 11
ALPHA_LONG = 2 / 101
STAT_FIELDS = {
    "count": kernels.STAT_COUNT, "mean": kernels.STAT_MEAN, "std": kernels.STAT_STD,
    "min": kernels.STAT_MIN, "max": kernels.STAT_MAX, "median": kernels.STAT_MEDIAN,
    "p25": kernels.STAT_P25, "p75": kernels.STAT_P75, "p90": kernels.STAT_P90,
    "slope": kernels.STAT_SLOPE,
}


def make_rings(n_series: int, width: int) -> tuple[np.ndarray, ...]:
    """Empty ring arrays in kernel argument order."""
    return (
        np.full((n_series, width), -7.0), np.full((n_series, width), -7, np.int64),
        np.zeros(n_series, np.int64), np.zeros(n_series, np.int64),
        np.full(n_series, np.nan), np.full(n_series, np.nan),
    )


def append_block(rings, ids, steps, values) -> int:
    """Call the block kernel with the test alphas."""
    return kernels.ring_append_block(
        *rings, ALPHA_SHORT, ALPHA_LONG, np.asarray(ids, np.int64), np.asarray(steps, np.int64),
        np.asarray(values, np.float64).reshape(len(steps), len(ids)))


def read_all(rings, sid: int, n: int | None = None) -> tuple[list[int], list[float]]:
    """Read a series back with ring_read."""
    m = int(rings[3][sid]) if n is None else n
    out_steps, out_values = np.empty(m, np.int64), np.empty(m)
    got = kernels.ring_read(*rings[:4], sid, out_steps, out_values)
    return out_steps[:got].tolist(), out_values[:got].tolist()


def same_floats(a: list[float], b: list[float]) -> bool:
    """Element-wise equality where NaN equals NaN."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def assert_ema(actual: float, expected: float) -> None:
    """EMAs agree to rounding; NaN matches only NaN."""
    if math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert actual == pytest.approx(expected, rel=1e-12)


def stats_of(values, steps) -> np.ndarray:
    """Run window_stats on lists."""
    out = np.empty(kernels.N_STATS)
    kernels.window_stats(np.asarray(values, np.float64), np.asarray(steps, np.int64), out)
    return out


def assert_stats_match(values, steps) -> None:
    """window_stats equals the reference within rounding (exact count, NaN where NaN)."""
    out = stats_of(values, steps)
    ref = ref_window_stats(list(steps), list(values))
    finite = [v for v in values if math.isfinite(v)]
    scale = max((abs(v) for v in finite), default=1.0) or 1.0
    assert out[kernels.STAT_COUNT] == ref["count"]
    for name, slot in STAT_FIELDS.items():
        tol = max(1e-9 * scale, 1e-300)  # the floor absorbs subnormal rounding
        if name == "slope" and len(set(steps)) > 1:
            tol /= max(1, max(steps) - min(steps))
        if math.isnan(ref[name]):
            assert math.isnan(out[slot]), name
        else:
            assert out[slot] == pytest.approx(ref[name], rel=1e-9, abs=tol), name


def test_ema_update_matches_reference_with_nan_and_inf():
    """ema_update skips non-finite inputs and starts at the first finite value."""
    xs = [math.nan, math.inf, 3.0, -math.inf, 5.0, math.nan, -2.0, 7.5]
    ema = math.nan
    for x in xs:
        ema = kernels.ema_update(ema, x, 0.3)
    assert ema == pytest.approx(ref_ema(xs, 0.3), rel=1e-15)
    assert math.isnan(kernels.ema_update(math.nan, math.nan, 0.3))


def test_block_append_matches_reference_through_several_wraps():
    """Blocks of many shapes wrap a 5-slot ring many times and keep the last 5 points in order."""
    rng = np.random.default_rng(1)
    rings, ref = make_rings(4, 5), RefStore(5)
    for _ in range(4):
        ref.add_series()
    step = 0
    for n, k in [(1, 1), (3, 2), (7, 4), (0, 3), (2, 0), (12, 3), (1, 4), (23, 1)]:
        ids = rng.permutation(4)[:k].tolist()
        steps = list(range(step, step + n))
        values = rng.normal(size=(n, k)).tolist()
        assert append_block(rings, ids, steps, values) == -1
        ref.append_block(ids, steps, values)
        step += n
    for sid in range(4):
        assert read_all(rings, sid) == ref.history(sid)
        assert_ema(rings[4][sid], ref.series[sid].ema_short)
        assert_ema(rings[5][sid], ref.series[sid].ema_long)


def test_block_append_32x32_matches_reference():
    """A 32-step by 32-series block lands in every row with the right steps, values and EMAs."""
    rng = np.random.default_rng(2)
    rings, ref = make_rings(40, 100), RefStore(100)
    for _ in range(40):
        ref.add_series()
    ids = rng.permutation(40)[:32].tolist()
    for start in (0, 32, 64, 96):
        values = rng.normal(size=(32, 32)).tolist()
        assert append_block(rings, ids, list(range(start, start + 32)), values) == -1
        ref.append_block(ids, list(range(start, start + 32)), values)
    for sid in range(40):
        assert read_all(rings, sid) == ref.history(sid)
        assert_ema(rings[4][sid], ref.series[sid].ema_short)
        assert_ema(rings[5][sid], ref.series[sid].ema_long)


def test_block_append_stores_nan_and_inf_without_poisoning_ema():
    """NaN and Inf are stored as given; the EMAs only see the finite values."""
    rings = make_rings(1, 8)
    values = [1.0, math.nan, math.inf, 3.0, -math.inf, 2.0]
    assert append_block(rings, [0], list(range(6)), values) == -1
    steps, stored = read_all(rings, 0)
    assert steps == list(range(6)) and same_floats(stored, values)
    assert rings[4][0] == pytest.approx(ref_ema(values, ALPHA_SHORT))
    assert rings[5][0] == pytest.approx(ref_ema(values, ALPHA_LONG))


def test_block_append_keeps_negative_and_extreme_steps():
    """Steps are stored verbatim, including negatives and the int64 extremes."""
    rings = make_rings(2, 4)
    steps = [-(2**63), -1, 0, 2**63 - 1, 2**62]
    assert append_block(rings, [1, 0], steps, np.arange(10.0)) == -1
    assert read_all(rings, 0)[0] == steps[1:]
    assert read_all(rings, 1)[1] == [2.0, 4.0, 6.0, 8.0]


@pytest.mark.parametrize("ids, bad", [([0, 5], 1), ([-1, 0], 0), ([1, 0, 1], 2), ([2, 2], 1)])
def test_block_append_rejects_unknown_or_repeated_ids_without_writing(ids, bad):
    """An out-of-range or repeated id makes the kernel return its column and write nothing."""
    rings = make_rings(3, 4)
    assert append_block(rings, ids, [1, 2], np.ones((2, len(ids)))) == bad
    assert not rings[3].any() and not rings[2].any() and np.isnan(rings[4]).all()


def test_required_width_counts_pending_points():
    """ring_required_width is the largest count after n more points, or -1 for a bad id."""
    counts = np.array([3, 9, 0], np.int64)
    assert kernels.ring_required_width(counts, np.array([0, 2], np.int64), 5) == 8
    assert kernels.ring_required_width(counts, np.array([1], np.int64), 0) == 9
    assert kernels.ring_required_width(counts, np.array([], np.int64), 5) == 0
    assert kernels.ring_required_width(counts, np.array([0, 3], np.int64), 5) == -1


@pytest.mark.parametrize("n", [0, 1, 3, 5, 9])
def test_ring_read_returns_last_n_in_order(n):
    """ring_read copies min(n, count) newest points oldest first, before and after wrapping."""
    for total in (0, 2, 5, 13):
        rings, ref = make_rings(1, 5), RefStore(5)
        ref.add_series()
        if total:
            vals = [float(v) for v in range(total)]
            append_block(rings, [0], list(range(100, 100 + total)), vals)
            ref.append_block([0], list(range(100, 100 + total)), [[v] for v in vals])
        assert read_all(rings, 0, n) == ref.history(0, n)


@pytest.mark.parametrize("values, steps", [
    ([], []),
    ([4.2], [7]),
    ([2.5] * 9, list(range(9))),
    ([0.1] * 3, [5, 5, 5]),
    ([1.0, 2.0], [3, 3]),
    ([math.nan, 1.0, math.inf, 2.0, -math.inf, 4.0], list(range(6))),
    ([math.nan, math.inf], [1, 2]),
    ([3.0, 1.0, 2.0, 5.0], [-(2**63), -5, 2**62, 2**63 - 1]),
    ([1.0, 2.0, 4.0], [2**62, 2**62 + 1, 2**62 + 3]),
    ([1e300, -1e300, 5.0], [0, 1, 2]),
    ([1.7e308, 1.6e308, -1.7e308, 1e308], [0, 1, 2, 3]),
    ([1.7e308, 1.7e308], [0, 1]),
    ([5e-324, 0.0, 1e-310], [0, 1, 2]),
])
def test_window_stats_edge_cases_match_reference(values, steps):
    """Empty, single, constant, NaN/Inf, repeated-step and huge-step windows match the reference."""
    assert_stats_match(values, steps)


def test_window_stats_of_empty_window_is_all_nan_with_zero_count():
    """No finite point: count 0 and every other slot NaN."""
    out = stats_of([math.nan, math.inf], [1, 2])
    assert out[kernels.STAT_COUNT] == 0 and np.isnan(out[1:]).all()


def test_window_stats_of_constant_window_is_exact():
    """A constant window gives its value as mean/min/max/percentiles, std 0 and slope 0."""
    out = stats_of([0.1] * 7, range(7))
    assert out[kernels.STAT_STD] == 0.0 and out[kernels.STAT_SLOPE] == 0.0
    for slot in (kernels.STAT_MEAN, kernels.STAT_MIN, kernels.STAT_MAX, kernels.STAT_MEDIAN,
                 kernels.STAT_P25, kernels.STAT_P75, kernels.STAT_P90):
        assert out[slot] == 0.1


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 101, 1000, 10_000])
def test_window_stats_random_windows_match_reference_and_numpy(n):
    """Random windows match the reference, and the percentiles equal numpy.percentile exactly."""
    rng = np.random.default_rng(n)
    values = rng.normal(3.0, 2.0, size=n)
    values[rng.random(n) < 0.1] = np.nan
    steps = np.sort(rng.integers(-1000, 10**6, size=n))
    assert_stats_match(values.tolist(), steps.tolist())
    finite = values[np.isfinite(values)]
    out = stats_of(values, steps)
    expected = np.percentile(finite, [50, 25, 75, 90]) if finite.size else np.full(4, np.nan)
    got = out[[kernels.STAT_MEDIAN, kernels.STAT_P25, kernels.STAT_P75, kernels.STAT_P90]]
    np.testing.assert_array_equal(got, expected)


def test_series_stats_accepts_presorted_finite_values():
    """series_stats reads order statistics from the sorted finite values it is given."""
    values = np.array([5.0, np.nan, 1.0, 3.0])
    out = np.empty(kernels.N_STATS)
    kernels.series_stats(values, np.arange(4, dtype=np.int64), np.array([1.0, 3.0, 5.0]), out)
    assert (out[kernels.STAT_MIN], out[kernels.STAT_MEDIAN], out[kernels.STAT_MAX]) == (1.0, 3.0, 5.0)


def test_warm_up_runs():
    """warm_up compiles (or loads) every kernel without error."""
    kernels.warm_up()


finite_or_not = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**40), 2**40), finite_or_not), max_size=60))
def test_window_stats_property(points):
    """For any window of (step, value) points, window_stats matches the reference."""
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    assert_stats_match(values, steps)


@settings(max_examples=100, deadline=None)
@given(
    width=st.integers(1, 6),
    blocks=st.lists(
        st.tuples(st.integers(0, 9), st.lists(st.integers(0, 3), unique=True, max_size=4)),
        max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_append_property(width, blocks, seed):
    """Any sequence of blocks leaves every ring equal to a deque of the last `width` points."""
    rng = np.random.default_rng(seed)
    rings, ref = make_rings(4, width), RefStore(width)
    for _ in range(4):
        ref.add_series()
    for n, ids in blocks:
        steps = rng.integers(-(2**62), 2**62, size=n).tolist()
        values = np.where(rng.random((n, len(ids))) < 0.2, np.nan, rng.normal(size=(n, len(ids))))
        assert append_block(rings, ids, steps, values) == -1
        ref.append_block(ids, steps, values.tolist())
    for sid in range(4):
        steps, values = read_all(rings, sid)
        ref_steps, ref_values = ref.history(sid)
        assert steps == ref_steps and same_floats(values, ref_values)
        assert_ema(rings[4][sid], ref.series[sid].ema_short)
        assert_ema(rings[5][sid], ref.series[sid].ema_long)


def _sign_fractions_reference(values):
    """Plain Python: fractions of finite values that are zero, negative, positive."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [math.nan] * 3
    n = len(finite)
    return [sum(v == 0 for v in finite) / n, sum(v < 0 for v in finite) / n,
            sum(v > 0 for v in finite) / n]


@pytest.mark.parametrize("values", [[], [0.0], [1.0, -1.0, 0.0, math.nan], [math.inf, -math.inf],
                                    [0.0] * 50, [-2.0] * 3 + [math.nan] * 5])
def test_sign_fractions_matches_reference_on_edge_cases(values):
    """sign_fractions agrees with the reference on empty, all-equal, NaN and Inf windows."""
    from collector import kernels
    out = np.empty(3)
    kernels.sign_fractions(np.asarray(values, dtype=np.float64), out)
    np.testing.assert_allclose(out, _sign_fractions_reference(values), equal_nan=True)


def test_sign_fractions_matches_reference_on_random_windows():
    """sign_fractions agrees with the reference on random windows with zeros and NaN mixed in."""
    from collector import kernels
    rng = np.random.default_rng(7)
    for _ in range(200):
        values = rng.choice([-1.5, 0.0, 2.0, math.nan], size=rng.integers(0, 40))
        out = np.empty(3)
        kernels.sign_fractions(values, out)
        np.testing.assert_allclose(out, _sign_fractions_reference(list(values)), equal_nan=True)


# -- cross-rank step aggregates ----------------------------------------------------------------------

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def make_agg_state(n_metrics: int, n_pairs: int, width: int, capacity: int = 4096) -> dict:
    """Empty aggregator arrays as the kernel module docstring lays them out, by argument name."""
    return dict(
        slot_ints=np.zeros((n_metrics, width, 4), np.int64),
        slot_floats=np.zeros((n_metrics, width, 4)),
        metric_ints=np.zeros((n_metrics, 2), np.int64),
        pair_steps=np.tile(np.arange(1, width + 1, dtype=np.int64), (n_pairs, 1)),
        pair_values=np.zeros((n_pairs, width)), pair_metric=np.full(n_pairs, -1, np.int64),
        out_ints=np.zeros((3, capacity), np.int64), out_floats=np.zeros((3, capacity)),
        counters=np.zeros(2, np.int64))


def agg_block(state: dict, world_size: int, metric_ids, pair_ids, steps, values) -> None:
    """Call aggregate_block with list inputs."""
    kernels.aggregate_block(
        *state.values(), world_size, np.asarray(metric_ids, np.int64),
        np.asarray(pair_ids, np.int64), np.asarray(steps, np.int64),
        np.asarray(values, np.float64).reshape(len(steps), len(metric_ids)))


def agg_emitted(state: dict, names: list[str]) -> list[tuple]:
    """Emitted rows as (metric, step, mean, min, max, count), NaN as 'nan'; clears the out arrays."""
    n = int(state["counters"][kernels.COUNTER_OUT])
    ints, floats = state["out_ints"][:, :n].T.tolist(), state["out_floats"][:, :n].T.tolist()
    state["counters"][kernels.COUNTER_OUT] = 0
    clean = lambda x: "nan" if math.isnan(x) else x  # noqa: E731
    return [(names[i[kernels.OUT_METRIC]], i[kernels.OUT_STEP], clean(f[kernels.OUT_MEAN]),
             clean(f[kernels.OUT_MIN]), clean(f[kernels.OUT_MAX]), i[kernels.OUT_COUNT])
            for i, f in zip(ints, floats)]


def ref_rows(ref) -> list[tuple]:
    """The reference's output rows with NaN as 'nan'."""
    return [tuple("nan" if isinstance(x, float) and math.isnan(x) else x for x in row)
            for row in ref.out]


@pytest.mark.parametrize("lo, hi, cap", [
    (0, 1, 5), (0, 9, 5), (-3, 2, 5), (INT64_MIN, INT64_MAX, 7), (INT64_MIN, INT64_MIN + 3, 7),
    (INT64_MAX - 2, INT64_MAX, 7), (-5, INT64_MAX, 1), (INT64_MIN, 0, 3)])
def test_steps_ahead_is_exact_at_the_int64_limits(lo, hi, cap):
    """steps_ahead equals min(hi - lo, cap) computed with Python ints, even across the int64 range."""
    assert kernels.steps_ahead(np.int64(lo), np.int64(hi), np.int64(cap)) == min(hi - lo, cap)


@pytest.mark.parametrize("step, newest, horizon", [
    (0, 10, 3), (7, 10, 3), (6, 10, 3), (INT64_MIN, INT64_MAX, 5), (INT64_MIN, INT64_MIN + 4, 5),
    (INT64_MIN, INT64_MIN + 6, 5), (INT64_MAX, INT64_MAX, 1), (-1, INT64_MAX, 64)])
def test_older_than_is_exact_at_the_int64_limits(step, newest, horizon):
    """older_than equals step < newest - horizon computed with Python ints."""
    assert kernels.older_than(np.int64(step), np.int64(newest), np.int64(horizon)) == (
        step < newest - horizon)


def test_aggregate_block_completes_by_ranks_and_by_age():
    """A step all ranks reported completes at once; one a rank skipped completes when pushed out."""
    state = make_agg_state(1, 2, width=3)
    state["pair_metric"][:] = 0
    agg_block(state, 2, [0], [0], [0, 1, 2], [1.0, 2.0, 3.0])
    agg_block(state, 2, [0], [1], [0, 2], [3.0, math.nan])
    assert agg_emitted(state, ["m"]) == [("m", 0, 2.0, 1.0, 3.0, 2), ("m", 2, 3.0, 3.0, 3.0, 2)]
    agg_block(state, 2, [0], [0], [4], [0.5])
    assert agg_emitted(state, ["m"]) == [("m", 1, 2.0, 2.0, 2.0, 1)]
    agg_block(state, 2, [0], [1], [1, 2], [9.0, 9.0])
    assert state["counters"][kernels.COUNTER_LATE] == 2 and agg_emitted(state, ["m"]) == []


def test_aggregate_block_repeated_report_replaces_the_value():
    """A pair reporting a step twice counts once, with its last value, min and max recomputed."""
    state = make_agg_state(1, 2, width=4)
    state["pair_metric"][:] = 0
    agg_block(state, 2, [0, 0], [0, 0], [5], [[-100.0, 7.0]])
    agg_block(state, 2, [0], [1], [5], [1.0])
    assert agg_emitted(state, ["m"]) == [("m", 5, 4.0, 1.0, 7.0, 2)]


def test_aggregate_complete_emits_steps_with_enough_ranks():
    """aggregate_complete emits pending steps reported by at least min_reported ranks, all at 0."""
    state = make_agg_state(2, 3, width=4)
    state["pair_metric"][:] = [0, 0, 1]
    agg_block(state, 3, [0, 1], [0, 2], [1, 2], [[1.0, 5.0], [2.0, 6.0]])
    agg_block(state, 3, [0], [1], [1], [3.0])
    args = [state[k] for k in ("slot_ints", "slot_floats", "out_ints", "out_floats", "counters")]
    kernels.aggregate_complete(*args, 2)
    assert agg_emitted(state, ["a", "b"]) == [("a", 1, 2.0, 1.0, 3.0, 2)]
    kernels.aggregate_complete(*args, 0)
    assert sorted(agg_emitted(state, ["a", "b"])) == [
        ("a", 2, 2.0, 2.0, 2.0, 1), ("b", 1, 5.0, 5.0, 5.0, 1), ("b", 2, 6.0, 6.0, 6.0, 1)]
    kernels.aggregate_complete(*args, 0)
    assert agg_emitted(state, ["a", "b"]) == []


def test_aggregate_block_mean_is_compensated_and_within_min_max():
    """The mean uses a compensated sum (1e16 + 1 - 1e16 keeps the 1) and equal values give
    exactly that value."""
    state = make_agg_state(2, 6, width=2)
    state["pair_metric"][:] = [0, 0, 0, 1, 1, 1]
    for rank in range(3):
        agg_block(state, 3, [0, 1], [rank, 3 + rank], [0], [[(1e16, 1.0, -1e16)[rank], 0.1]])
    assert agg_emitted(state, ["a", "b"]) == [("a", 0, 1 / 3, -1e16, 1e16, 3),
                                              ("b", 0, 0.1, 0.1, 0.1, 3)]


@pytest.mark.filterwarnings("error")  # without the JIT, an int64 overflow would warn
def test_aggregate_block_matches_reference_at_the_int64_limits():
    """Steps at both ends of int64 age out, complete and count as late exactly like the reference."""
    from reference import RefAggregator
    state, ref = make_agg_state(1, 2, width=3), RefAggregator(2, 2)
    state["pair_metric"][:] = 0
    for rank, step in [(0, INT64_MIN), (1, INT64_MIN + 1), (0, INT64_MIN + 3), (1, INT64_MIN),
                       (0, INT64_MAX - 1), (1, INT64_MAX), (0, INT64_MAX), (1, INT64_MIN + 2),
                       (1, INT64_MAX - 1), (0, INT64_MAX - 3)]:
        agg_block(state, 2, [0], [rank], [step], [1.5])
        ref.add("m", rank, step, 1.5)
    assert sorted(agg_emitted(state, ["m"])) == sorted(ref_rows(ref))
    assert state["counters"][kernels.COUNTER_LATE] == ref.late


@settings(max_examples=150, deadline=None)
@given(
    world_size=st.integers(1, 3), width=st.integers(2, 6),
    blocks=st.lists(st.tuples(
        st.integers(0, 2), st.lists(st.integers(0, 1), min_size=1, max_size=3),
        st.lists(st.integers(0, 20), max_size=4)), max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_aggregate_block_property(world_size, width, blocks, seed):
    """Any sequence of blocks emits what the naive reference emits (as a set) and counts the same
    late values; every column's pair belongs to its metric."""
    from reference import RefAggregator
    rng = np.random.default_rng(seed)
    names = ["a", "b"]
    state, ref = make_agg_state(2, 2 * world_size, width), RefAggregator(world_size, width - 1)
    state["pair_metric"][:] = [p % 2 for p in range(2 * world_size)]
    got = []
    for rank, metric_ids, steps in blocks:
        rank %= world_size
        values = rng.choice([1.0, -2.5, 3.25, math.nan, math.inf], size=(len(steps), len(metric_ids)))
        agg_block(state, world_size, metric_ids, [2 * rank + m for m in metric_ids], steps, values)
        for j, m in enumerate(metric_ids):
            for i, step in enumerate(steps):
                ref.add(names[m], rank, step, float(values[i, j]))
        got += agg_emitted(state, names)
    assert state["counters"][kernels.COUNTER_LATE] == ref.late
    args = [state[k] for k in ("slot_ints", "slot_floats", "out_ints", "out_floats", "counters")]
    kernels.aggregate_complete(*args, 0)
    got += agg_emitted(state, names)
    for metric, step in list(ref.values):
        ref.finish(metric, step)
    assert sorted(got) == sorted(ref_rows(ref))
