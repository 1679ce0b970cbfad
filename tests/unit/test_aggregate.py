"""StepAggregator: completion by all ranks or by age, duplicates, late values, bounded memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.aggregate import StepAggregate, StepAggregator
from reference import RefAggregator


def as_tuples(aggs: list[StepAggregate]) -> list[tuple]:
    """Aggregates as plain tuples, NaN replaced by the string 'nan' so they compare equal."""
    def clean(x):
        """NaN as a comparable marker."""
        return "nan" if isinstance(x, float) and math.isnan(x) else x
    return [tuple(clean(getattr(a, f)) for f in StepAggregate.__slots__) for a in aggs]


def in_step_order(aggs: list[StepAggregate]) -> list[StepAggregate]:
    """Check that each metric's aggregates come in increasing step order; return them."""
    for metric in {a.metric for a in aggs}:
        steps = [a.step for a in aggs if a.metric == metric]
        assert steps == sorted(steps)
    return aggs


def test_all_ranks_reporting_completes_the_step():
    """A step completes as soon as every rank reported it, with mean/min/max/count over ranks."""
    agg = StepAggregator(world_size=3)
    agg.add("loss", 0, 5, 1.0)
    agg.add("loss", 1, 5, 2.0)
    assert agg.pop_completed() == [] and agg.pending_steps == 1
    agg.add("loss", 2, 5, 6.0)
    assert agg.pop_completed() == [StepAggregate("loss", 5, 3.0, 1.0, 6.0, 3)]
    assert agg.pop_completed() == [] and agg.pending_steps == 0


def test_world_size_one_emits_every_value():
    """With one rank every value is its own complete step."""
    agg = StepAggregator(world_size=1)
    for step in (3, 1, 2):
        agg.add("kl", 0, step, float(step))
    got = [(a.step, a.mean, a.count) for a in agg.pop_completed()]
    assert got == [(1, 1.0, 1), (2, 2.0, 1), (3, 3.0, 1)]


def test_silent_rank_steps_complete_by_age():
    """With rank 1 silent, a step completes once it is more than max_pending_steps behind."""
    agg = StepAggregator(world_size=2, max_pending_steps=4)
    for step in range(5):
        agg.add("loss", 0, step, float(step))
    assert agg.pop_completed() == []
    agg.add("loss", 0, 5, 5.0)
    assert agg.pop_completed() == [StepAggregate("loss", 0, 0.0, 0.0, 0.0, 1)]
    agg.add("loss", 0, 9, 9.0)
    assert [a.step for a in agg.pop_completed()] == [1, 2, 3, 4]
    assert agg.pending_steps == 2


def test_duplicate_report_counts_once_with_the_last_value():
    """A rank reporting the same step twice counts once; its last value wins."""
    agg = StepAggregator(world_size=2)
    agg.add("loss", 0, 1, 100.0)
    agg.add("loss", 0, 1, 4.0)
    assert agg.pop_completed() == [] and agg.pending_steps == 1
    agg.add("loss", 1, 1, 2.0)
    assert agg.pop_completed() == [StepAggregate("loss", 1, 3.0, 2.0, 4.0, 2)]


def test_late_values_are_ignored_and_counted():
    """Values for completed steps, or steps already past the horizon, are dropped and counted."""
    agg = StepAggregator(world_size=2, max_pending_steps=3)
    agg.add("loss", 0, 1, 1.0)
    agg.add("loss", 1, 1, 1.0)
    agg.add("loss", 1, 1, 9.0)
    agg.add("loss", 0, 10, 1.0)
    agg.add("loss", 1, 6, 1.0)
    assert agg.late_values == 2
    assert [a.step for a in agg.pop_completed()] == [1]
    agg.add("loss", 1, 7, 1.0)
    assert agg.late_values == 2 and agg.pending_steps == 2


def test_late_value_after_age_completion_is_dropped():
    """A straggler's value for a step that completed by age does not emit it a second time."""
    agg = StepAggregator(world_size=2, max_pending_steps=2)
    agg.add("loss", 0, 0, 1.0)
    agg.add("loss", 0, 3, 1.0)
    assert [a.step for a in agg.pop_completed()] == [0]
    agg.add("loss", 1, 0, 5.0)
    assert agg.pop_completed() == [] and agg.late_values == 1


def test_non_finite_values_count_but_do_not_enter_the_statistics():
    """NaN/Inf reports count as reports; mean/min/max use the finite ones, NaN when none."""
    agg = StepAggregator(world_size=3)
    for rank, value in enumerate([math.nan, 2.0, math.inf]):
        agg.add("loss", rank, 1, value)
    for rank in range(3):
        agg.add("kl", rank, 1, math.nan)
    loss, kl = agg.pop_completed()
    assert (loss.mean, loss.min, loss.max, loss.count) == (2.0, 2.0, 2.0, 3)
    assert kl.count == 3 and math.isnan(kl.mean) and math.isnan(kl.min) and math.isnan(kl.max)


def test_add_block_equals_scalar_adds():
    """add_block records values[i, j] for (metrics[j], steps[i]) exactly like add()."""
    rng = np.random.default_rng(0)
    block = StepAggregator(world_size=2, max_pending_steps=5)
    scalar = StepAggregator(world_size=2, max_pending_steps=5)
    metrics = ["a", "b", "c"]
    for rank in (0, 1):
        steps = np.arange(8) + rank
        values = rng.normal(size=(8, 3))
        block.add_block(rank, metrics, steps, values)
        for i, step in enumerate(steps):
            for j, metric in enumerate(metrics):
                scalar.add(metric, rank, int(step), float(values[i, j]))
    assert as_tuples(block.pop_completed()) == as_tuples(scalar.pop_completed())
    assert as_tuples(block.flush()) == as_tuples(scalar.flush())


def test_results_are_in_step_order_per_metric():
    """Out-of-order completions come back sorted by step within each metric."""
    agg = StepAggregator(world_size=2)
    for step in (4, 2, 3):
        for metric in ("b", "a"):
            agg.add(metric, 0, step, 0.0)
            agg.add(metric, 1, step, 1.0)
    assert [(a.metric, a.step) for a in agg.pop_completed()] == [
        ("b", 2), ("b", 3), ("b", 4), ("a", 2), ("a", 3), ("a", 4)]


def test_flush_emits_everything_pending_once():
    """flush completes pending steps with the ranks they have; later values for them are late."""
    agg = StepAggregator(world_size=4)
    agg.add("loss", 0, 1, 1.0)
    agg.add("loss", 2, 1, 3.0)
    agg.add("loss", 1, 2, 5.0)
    assert as_tuples(agg.flush()) == [("loss", 1, 2.0, 1.0, 3.0, 2), ("loss", 2, 5.0, 5.0, 5.0, 1)]
    agg.add("loss", 3, 1, 7.0)
    assert agg.flush() == [] and agg.late_values == 1 and agg.pending_steps == 0


def test_set_world_size_completes_steps_that_now_have_every_rank():
    """Shrinking the world completes steps reported by enough ranks; growing makes steps wait."""
    agg = StepAggregator(world_size=3)
    agg.add("loss", 0, 1, 1.0)
    agg.add("loss", 1, 1, 1.0)
    agg.set_world_size(2)
    assert [a.step for a in agg.pop_completed()] == [1]
    agg.set_world_size(4)
    for rank in range(3):
        agg.add("loss", rank, 2, 1.0)
    assert agg.pop_completed() == [] and agg.world_size == 4


def test_invalid_arguments_raise():
    """Bad ranks, sizes and block shapes raise ValueError/TypeError and record nothing."""
    agg = StepAggregator(world_size=2)
    for bad_rank in (-1, 2):
        with pytest.raises(ValueError):
            agg.add("loss", bad_rank, 1, 1.0)
    with pytest.raises(ValueError):
        agg.add_block(0, ["a", "b"], np.arange(3), np.zeros((3, 3)))
    with pytest.raises(TypeError):
        agg.add_block(0, ["a"], np.array([1.5]), np.zeros((1, 1)))
    with pytest.raises(TypeError):
        agg.add(3, 0, 1, 1.0)
    for bad in (dict(world_size=0), dict(world_size=1, max_pending_steps=0)):
        with pytest.raises(ValueError):
            StepAggregator(**bad)
    with pytest.raises(ValueError):
        agg.set_world_size(0)
    assert agg.pending_steps == 0


def test_pending_state_stays_bounded_with_a_dead_rank():
    """Over 10,000 steps with one rank dead, pending steps never exceed max_pending_steps + 1."""
    agg = StepAggregator(world_size=2, max_pending_steps=16)
    emitted = 0
    for step in range(10_000):
        agg.add("loss", 0, step, 1.0)
        agg.add("kl", 0, step, 1.0)
        assert agg.pending_steps <= 2 * 17
        emitted += len(agg.pop_completed())
    assert emitted + agg.pending_steps == 20_000


events = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 2), st.integers(0, 30),
              st.sampled_from([1.0, -2.5, 3.25, math.nan, math.inf])),
    max_size=80)


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 3), st.integers(1, 6), st.integers(1, 10))
def test_aggregator_matches_naive_reference(stream, world_size, horizon, pop_every):
    """Any report stream yields the same aggregates, order and late count as the naive model."""
    agg, ref = StepAggregator(world_size, horizon), RefAggregator(world_size, horizon)
    got = []
    for i, (metric, rank, step, value) in enumerate(stream):
        rank %= world_size
        agg.add(metric, rank, step, value)
        ref.add(metric, rank, step, value)
        if i % pop_every == 0:
            got += in_step_order(agg.pop_completed())
    got += in_step_order(agg.flush())
    for metric, step in list(ref.values):
        ref.finish(metric, step)
    assert agg.late_values == ref.late
    assert sorted(as_tuples(got)) == sorted(as_tuples([StepAggregate(*t) for t in ref.out]))
    assert len({(a.metric, a.step) for a in got}) == len(got)


def test_first_report_of_a_step_is_not_taken_for_a_repeat():
    """A rank whose first report lands in a slot no step used yet counts as a new rank there."""
    agg = StepAggregator(world_size=3, max_pending_steps=8)
    agg.add("loss", 1, 5, 1.0)
    agg.add("loss", 0, 0, 2.0)
    agg.add("loss", 2, 0, 4.0)
    assert agg.pop_completed() == [] and agg.pending_steps == 2
    assert as_tuples(agg.flush()) == [("loss", 0, 3.0, 2.0, 4.0, 2), ("loss", 5, 1.0, 1.0, 1.0, 1)]


def test_pop_completed_arrays_hold_what_pop_completed_returns():
    """The columnar pop has the same rows in the same order, contiguous, with runs per metric."""
    rng = np.random.default_rng(3)
    listed, columns = StepAggregator(world_size=2), StepAggregator(world_size=2)
    for rank in (1, 0):
        steps, values = np.arange(10) + 3 * rank, rng.normal(size=(10, 3))
        for agg in (listed, columns):
            agg.add_block(rank, ["c", "a", "b"], steps, values)
    done = columns.pop_completed_arrays()
    assert as_tuples(done.to_list()) == as_tuples(listed.pop_completed()) and len(done) == 7 * 3
    assert [(name, rows.stop - rows.start) for name, rows in done.runs()] == [
        ("c", 7), ("a", 7), ("b", 7)]
    assert all(a.flags.c_contiguous for a in (done.step, done.mean, done.min, done.max, done.count))
    assert as_tuples(columns.flush_arrays().to_list()) == as_tuples(listed.flush())
    assert len(columns.pop_completed_arrays()) == 0 and list(columns.flush_arrays().runs()) == []


def test_mean_is_compensated_and_clamped():
    """Means keep small values next to huge ones (like fsum) and equal values give that value."""
    agg = StepAggregator(world_size=3)
    for rank, (a, b) in enumerate([(1e16, 0.1), (1.0, 0.1), (-1e16, 0.1)]):
        agg.add_block(rank, ["a", "b"], np.array([0]), np.array([[a, b]]))
    a, b = agg.pop_completed()
    assert a.mean == 1 / 3 and (b.mean, b.min, b.max) == (0.1, 0.1, 0.1)


def test_steps_outside_int64_raise_and_record_nothing():
    """Steps that do not fit in int64 raise OverflowError; nothing is recorded."""
    agg = StepAggregator(world_size=2)
    with pytest.raises(OverflowError):
        agg.add("loss", 0, 2**63, 1.0)
    with pytest.raises(OverflowError):
        agg.add_block(0, ["loss"], np.array([1, 2**63], np.uint64), np.zeros((2, 1)))
    with pytest.raises(TypeError):
        agg.add_block(0, ["loss", 7], np.arange(2), np.zeros((2, 2)))
    assert agg.pending_steps == 0 and agg.flush() == []


def test_memory_stays_flat_over_many_steps():
    """Arrays stop growing once every metric and rank was seen, however many steps follow."""
    agg = StepAggregator(world_size=4, max_pending_steps=8)
    metrics = [f"m{k}" for k in range(20)]
    sizes = []
    for start in range(0, 20_000, 100):
        for rank in (0, 2):  # ranks 1 and 3 are dead: every step completes by age
            agg.add_block(rank, metrics, np.arange(start, start + 100), np.ones((100, 20)))
        agg.pop_completed_arrays()
        sizes.append(agg.nbytes())
    assert len(set(sizes[1:])) == 1 and agg.pending_steps == 20 * 9


blocks = st.lists(
    st.tuples(st.integers(0, 2), st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
              st.lists(st.integers(0, 12), max_size=5)),
    max_size=25)


@settings(max_examples=200, deadline=None)
@given(blocks, st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_add_block_matches_naive_reference(stream, world_size, horizon, seed):
    """Blocks (repeated steps and metrics included) give the reference's aggregates and late count."""
    rng = np.random.default_rng(seed)
    agg, ref = StepAggregator(world_size, horizon), RefAggregator(world_size, horizon)
    got = []
    for rank, metrics, steps in stream:
        rank %= world_size
        values = rng.choice([1.0, -2.5, 3.25, math.nan, -math.inf], size=(len(steps), len(metrics)))
        agg.add_block(rank, metrics, np.array(steps, np.int64), values)
        for j, metric in enumerate(metrics):
            for i, step in enumerate(steps):
                ref.add(metric, rank, step, float(values[i, j]))
        got += in_step_order(agg.pop_completed_arrays().to_list())
    got += in_step_order(agg.flush())
    for metric, step in list(ref.values):
        ref.finish(metric, step)
    assert agg.late_values == ref.late
    assert sorted(as_tuples(got)) == sorted(as_tuples([StepAggregate(*t) for t in ref.out]))


def test_a_block_split_into_kernel_chunks_equals_small_blocks(monkeypatch):
    """A block bigger than one kernel chunk of values gives what the same rows in small blocks give."""
    import collector.aggregate as aggregate
    monkeypatch.setattr(aggregate, "_CHUNK_VALUES", 7)
    values = np.random.default_rng(5).normal(size=(40, 3))
    whole, pieces = StepAggregator(world_size=1, max_pending_steps=3), StepAggregator(1, 3)
    whole.add_block(0, ["x", "y", "z"], np.arange(40), values)
    for start in range(0, 40, 6):
        pieces.add_block(0, ["x", "y", "z"], np.arange(start, min(start + 6, 40)),
                         values[start:start + 6])
    assert as_tuples(whole.flush()) == as_tuples(pieces.flush())
    assert whole.nbytes() == pieces.nbytes()
