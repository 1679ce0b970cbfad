"""The stop state machine, driven with an injected clock (no sockets, no sleeps)."""

from __future__ import annotations

import math

from collector.stop import MarginPolicy, StopCoordinator


def test_first_request_decides_generation_one_ahead_of_the_furthest_step():
    """A request picks stop_at_step = furthest reported step + margin, generation 1."""
    stop = StopCoordinator()
    state = stop.request(reason="kl", severity="CRITICAL", source="detector:kl_high",
                         furthest_step=40, margin_steps=3, now=100.0)
    assert state is not None and (state.generation, state.stop_at_step) == (1, 43)
    assert state.decided_at == 100.0 and state.source == "detector:kl_high"


def test_later_requests_do_not_move_the_stop():
    """Once stopping, another request is recorded but does not change the state."""
    stop = StopCoordinator()
    first = stop.request(reason="a", severity="CRITICAL", source="operator", furthest_step=5,
                         margin_steps=2, now=1.0)
    assert stop.request(reason="b", severity="WARNING", source="rank:1", furthest_step=9,
                        margin_steps=2, now=2.0) is None
    assert stop.state == first and len(stop.requests) == 2


def test_refusal_issues_a_later_generation_once():
    """A rank that passed the step makes the coordinator issue gen 2 further ahead, once."""
    stop = StopCoordinator()
    stop.request(reason="a", severity="CRITICAL", source="operator", furthest_step=10,
                 margin_steps=2, now=0.0)
    second = stop.refused(rank=1, generation=1, rank_step=13, furthest_step=11, margin_steps=2,
                          now=1.0)
    assert second is not None and (second.generation, second.stop_at_step) == (2, 15)
    assert second.reason == "a"
    assert stop.refused(rank=0, generation=1, rank_step=14, furthest_step=11, margin_steps=2,
                        now=1.1) is None, "a refusal of an old generation changes nothing"


def test_resends_until_each_rank_acknowledges():
    """The state is due to every live rank, again after the interval, until acknowledged."""
    stop = StopCoordinator(resend_interval=0.2)
    stop.request(reason="a", severity="CRITICAL", source="operator", furthest_step=0,
                 margin_steps=2, now=0.0)
    assert stop.due([0, 1], now=0.0) == [0, 1]
    assert stop.due([0, 1], now=0.1) == []
    stop.acknowledged(0, 1)
    assert stop.due([0, 1], now=0.25) == [1]
    stop.acknowledged(1, 1)
    assert stop.due([0, 1], now=1.0) == []
    assert stop.state.acked_ranks == (0, 1)


def test_acknowledging_an_old_generation_does_not_count():
    """An ack for generation 1 does not silence resends of generation 2."""
    stop = StopCoordinator(resend_interval=0.0)
    stop.request(reason="a", severity="CRITICAL", source="operator", furthest_step=0,
                 margin_steps=2, now=0.0)
    stop.refused(rank=1, generation=1, rank_step=5, furthest_step=5, margin_steps=2, now=0.1)
    stop.acknowledged(0, 1)
    assert stop.due([0, 1], now=0.2) == [0, 1]


def test_restore_prefers_the_logged_decision():
    """Replaying the event log adopts the logged state of the same or a later generation."""
    stop = StopCoordinator()
    stop.request(reason="recomputed", severity="CRITICAL", source="x", furthest_step=3,
                 margin_steps=2, now=0.0)
    logged = StopCoordinator().request(reason="logged", severity="CRITICAL", source="x",
                                       furthest_step=9, margin_steps=2, now=0.0)
    stop.restore(logged)
    assert stop.state.reason == "logged" and stop.state.stop_at_step == 11


def test_margin_grows_with_rate_and_lag():
    """The margin is the minimum plus the steps a rank can take while the state travels."""
    policy = MarginPolicy(min_steps=2, safety_seconds=0.1)
    assert policy.steps(math.nan, 0.0) == 2
    assert policy.steps(1.0, 0.0) == 3            # ceil(1 * 0.1) = 1
    assert policy.steps(100.0, 0.4) == 2 + 50     # ceil(100 * 0.5)
    assert policy.steps(-3.0, 1.0) == 2
