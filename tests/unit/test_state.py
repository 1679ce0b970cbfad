"""CollectorState driven message by message with an injected clock: no sockets, no sleeps."""

from __future__ import annotations

import math

from collector.state import CollectorState, StateConfig
from rlmon import wire
from rlmon.wire import Kind


def _msg(kind, rank=0, inc=1, **fields):
    return wire.decode(wire.encode(wire.envelope(kind, "run", rank, inc, **fields)))


def _batch(rank, seq, steps, metrics, inc=1, t=0.0):
    keys = list(metrics)
    rows = [[metrics[k][i] for k in keys] for i in range(len(steps))]
    times = [t + 0.01 * i for i in range(len(steps))]
    return _msg(Kind.BATCH, rank, inc, seq=seq, t=t, step=steps[-1],
                blocks=[[keys, steps, times, rows]])


def _state(world=2, **config):
    state = CollectorState(StateConfig(run_id="run", world_size=world, control_key="k", **config))
    for rank in range(world):
        state.handle(_msg(Kind.HELLO, rank, world=world, local_rank=rank, pid=1, host="h"),
                     b"id%d" % rank, 0.0)
    return state


def test_batches_fill_rank_and_aggregate_series():
    """Per-rank series hold each rank's values; the aggregate holds the cross-rank mean."""
    state = _state()
    state.handle(_batch(0, 1, [0, 1], {"reward": [1.0, 2.0]}), b"id0", 1.0)
    state.handle(_batch(1, 1, [0, 1], {"reward": [3.0, 6.0]}), b"id1", 1.0)
    snap = state.snapshot(2.0, with_history=True)
    reward = snap.metrics["reward"]
    assert dict(reward.last_by_rank) == {0: 2.0, 1: 6.0}
    assert list(reward.steps) == [0, 1] and list(reward.values) == [2.0, 4.0]
    assert reward.aggregate["min"] == 2.0 and reward.aggregate["max"] == 6.0
    assert snap.ranks[1].last_step == 1


def test_duplicate_batches_are_dropped_and_counted():
    """A re-sent (rank, incarnation, seq) is stored once."""
    state = _state(world=1)
    batch = _batch(0, 1, [0], {"a": [1.0]})
    state.handle(batch, b"id0", 1.0)
    state.handle(batch, b"id0", 1.0)
    assert state.rejected_by_reason["duplicate"] == 1
    assert state.ranks.get(0).batches == 1


def test_a_gap_is_filled_by_a_resend_and_acks_carry_the_watermark():
    """Batches 1 and 3 arrive, 2 was lost with a dead collector: the ACK stays at 1 until the
    re-sent 2 arrives, then jumps to 3; re-sent 1 and 3 are duplicates."""
    state = _state(world=1)
    state.handle(_batch(0, 1, [0], {"a": [1.0]}), b"id0", 1.0)
    state.handle(_batch(0, 3, [2], {"a": [3.0]}), b"id0", 1.0)
    assert state.ack(b"id0", 0, 1).fields["seq"] == 1
    assert state.is_duplicate(_batch(0, 3, [2], {"a": [3.0]}))
    assert not state.is_duplicate(_batch(0, 2, [1], {"a": [2.0]}))
    state.handle(_batch(0, 2, [1], {"a": [2.0]}), b"id0", 1.0)
    assert state.ack(b"id0", 0, 1).fields["seq"] == 3
    assert state.is_duplicate(_batch(0, 1, [0], {"a": [1.0]}))
    assert state.ranks.get(0).batches == 3 and state.rejected_by_reason["duplicate"] == 2


def test_a_floor_gives_up_on_batches_the_rank_dropped():
    """A rank that dropped batch 2 says so (floor 3): the watermark moves past the gap."""
    state = _state(world=1)
    state.handle(_batch(0, 1, [0], {"a": [1.0]}), b"id0", 1.0)
    message = _msg(Kind.BATCH, 0, 1, seq=3, t=0.0, step=2, floor=3,
                   blocks=[[["a"], [2], [0.0], [[3.0]]]])
    state.handle(message, b"id0", 1.0)
    assert state.ack(b"id0", 0, 1).fields["seq"] == 3


def test_seq_window_stays_bounded():
    """A rank that never fills a gap cannot grow the remembered set without bound."""
    from collector.ranks import MAX_SEQS_ABOVE_WATERMARK, SeqWindow
    window = SeqWindow()
    for seq in range(2, MAX_SEQS_ABOVE_WATERMARK + 10):
        window.accept(seq)
    assert len(window.above) <= MAX_SEQS_ABOVE_WATERMARK and window.watermark > 1
    assert window.seen(5) and not window.seen(MAX_SEQS_ABOVE_WATERMARK + 10)


def test_nan_and_wrong_types_are_flagged():
    """NaN/Inf are stored and counted; a string value is counted and not stored."""
    state = _state(world=1)
    state.handle(_batch(0, 1, [0, 1], {"a": [math.nan, 1.0], "b": [math.inf, "x"]}), b"id0", 1.0)
    assert state.flagged_by_reason["nan"] == 1
    assert state.flagged_by_reason["inf"] == 1
    assert state.flagged_by_reason["wrong_type"] == 1
    assert state.store.count(state.store.find("b", 0)) == 1


def test_kl_spike_decides_a_stop_ahead_of_every_rank():
    """A critical KL stops the run at a step past the furthest one any rank reported."""
    state = _state()
    for rank in (0, 1):
        state.handle(_batch(rank, 1, [0, 1, 2], {"kl": [0.01, 0.01, 0.5]}), b"id%d" % rank, 1.0)
    stop = state.stop.state
    assert stop is not None and stop.generation == 1
    assert stop.stop_at_step > 2 and stop.source == "detector:kl_high"
    assert {r.identity for r in state.resends(1.0)} == {b"id0", b"id1"}
    assert state.resends(1.05) == []  # rate-limited
    assert state.alert_counts[("KL_HIGH", "CRITICAL")] == 1


def test_a_refusal_makes_a_later_generation():
    """A rank that passed stop_at_step refuses; the collector issues a later generation."""
    state = _state()
    state.request_stop("operator", "CRITICAL", "operator", 0.0)
    first = state.stop.state
    state.handle(_msg(Kind.STOP_ACK, 1, gen=1, step=first.stop_at_step + 4, ok=False), b"id1", 0.5)
    second = state.stop.state
    assert second.generation == 2 and second.stop_at_step > first.stop_at_step + 4
    state.handle(_msg(Kind.STOP_ACK, 0, gen=2, step=0, ok=True), b"id0", 0.6)
    assert state.stop.state.acked_ranks == (0,)


def test_late_joiner_gets_the_stop_state_on_hello():
    """A rank that says HELLO after the decision is told the state at once."""
    state = _state()
    state.request_stop("why", "CRITICAL", "operator", 0.0)
    replies = state.handle(_msg(Kind.HELLO, 1, inc=9, world=2, local_rank=1, pid=2, host="h"),
                           b"new", 1.0)
    assert [r.fields["k"] for r in replies] == [Kind.STOP_STATE]
    assert replies[0].identity == b"new"


def test_operator_needs_the_control_key():
    """An operator stop request without the key is refused and counted; with it, it stops."""
    state = _state()
    refused = state.handle(_msg(Kind.STOP_REQUEST, -1, 0, reason="x", sev="CRITICAL", key="bad"),
                           b"op", 0.0)
    assert refused[0].fields["k"] == Kind.REFUSED and state.stop.state is None
    assert state.rejected_by_reason["bad_control_key"] == 1
    accepted = state.handle(_msg(Kind.STOP_REQUEST, -1, 0, reason="x", sev="CRITICAL", key="k"),
                            b"op", 0.0)
    assert accepted[-1].fields["k"] == Kind.STOP_STATE and state.stop.state.source == "operator"


def test_out_of_range_ranks_are_refused():
    """A rank number outside [0, 65536) is refused as bad_rank."""
    state = _state(world=1)
    state.handle(_msg(Kind.HEARTBEAT, -5, step=1, t=0.0), b"x", 0.0)
    state.handle(_msg(Kind.HEARTBEAT, 10**7, step=1, t=0.0), b"x", 0.0)
    assert state.rejected_by_reason["bad_rank"] == 2


def test_bye_closes_the_rank_and_its_ack_is_flagged_bye():
    """BYE marks the rank closed and answers nothing itself: the receive loop sends the ACK
    flagged bye (``ack(..., bye=True)``) after the group commit, with every batch held."""
    state = _state(world=1)
    state.handle(_batch(0, 1, [0], {"a": [1.0]}), b"id0", 0.0)
    assert state.handle(_msg(Kind.BYE, 0, seq=1, step=0), b"id0", 0.0) == []
    assert state.ranks.get(0).closed and state.ranks.live() == []
    ack = state.ack(b"id0", 0, _batch(0, 1, [0], {"a": [1.0]}).inc, bye=True)
    assert ack.fields["k"] == Kind.ACK and ack.fields["bye"] is True and ack.fields["seq"] == 1


def test_a_silent_rank_does_not_stall_aggregates():
    """With one rank silent, steps still complete once they are old enough; finish() flushes."""
    state = _state()
    for seq, step in enumerate(range(0, 100), start=1):
        state.handle(_batch(0, seq, [step], {"a": [1.0]}), b"id0", 0.0)
    series = state.store.find("a", -1)
    assert series is not None and state.store.count(series) > 0
    state.finish(1.0)
    assert state.store.count(series) == 100


def test_step_rate_ignores_records_logged_microseconds_apart():
    """A span record then the step's metrics, microseconds apart, do not inflate the step rate."""
    from collector.ranks import RankInfo
    info = RankInfo(rank=0)
    t = 100.0
    for step in range(40):  # 10 steps/s, each step sends two records 1 µs apart
        info.observe_steps([step - 1 if step else 0], [t])
        info.observe_steps([step], [t + 1e-6])
        t += 0.1
    assert 8.0 < info.steps_per_second < 12.0


def test_checkpoint_action_sends_a_checkpoint_state_to_every_rank():
    """A critical finding of a checkpoint rule sends CHECKPOINT_STATE ahead of every rank."""
    from collector.rules import DEFAULT_RULES, Rule
    rules = {**DEFAULT_RULES, "kl": Rule(warning_above=0.1, critical_above=0.2, action="checkpoint")}
    state = _state(rules=rules)
    for rank in (0, 1):
        state.handle(_batch(rank, 1, [0, 1, 2], {"kl": [0.01, 0.01, 0.5]}), b"id%d" % rank, 1.0)
    assert state.stop.state is None and len(state.checkpoints) == 1
    replies = state.resends(1.0)
    assert {r.identity for r in replies} == {b"id0", b"id1"}
    assert all(r.fields["k"] == Kind.CHECKPOINT_STATE and r.fields["at"] > 2 for r in replies)


def test_a_floor_above_the_batch_itself_is_ignored():
    """A forged floor far past the batch's own seq cannot make the collector treat the rank's
    real batches as duplicates."""
    state = _state(world=1)
    forged = _msg(Kind.BATCH, 0, 1, seq=1, t=0.0, step=0, floor=2**62,
                  blocks=[[["a"], [0], [0.0], [[1.0]]]])
    state.handle(forged, b"id0", 1.0)
    assert state.ack(b"id0", 0, 1).fields["seq"] == 1
    state.handle(_batch(0, 2, [1], {"a": [2.0]}), b"id0", 1.0)
    assert state.ranks.get(0).batches == 2


def test_detectors_skip_a_metric_without_an_aggregate_series():
    """When the series limit leaves a watched metric without its cross-rank series, its
    detectors do not run on a missing history (their state stays clean)."""
    state = _state(world=1, max_series=1)
    state.handle(_batch(0, 1, list(range(200)), {"reward": [1.0] * 200}), b"id0", 1.0)
    anomaly = next(d for d in state.detectors if d.name == "reward_anomalies")
    assert "reward" not in anomaly._emas
    assert state.rejected_by_reason["series_limit"] >= 1
