"""The collector's answers to QUERY messages, driven through CollectorState without sockets."""

from __future__ import annotations

import subprocess
import sys

from collector.state import CollectorState, StateConfig
from rlmon import wire
from rlmon.wire import Kind


def _state_with_steps(n: int = 6) -> CollectorState:
    state = CollectorState(StateConfig(run_id="r", kl_threshold=0.1))
    keys = ["reward", "kl", "policy_loss", "clip_fraction"]
    rows = [[0.1 * s, 0.5 if s == n - 1 else 0.01, 1.0 - 0.1 * s, 0.2] for s in range(n)]
    batch = wire.envelope(Kind.BATCH, "r", 0, 1, seq=1, t=1.0, step=n - 1,
                          blocks=[[keys, list(range(n)), [1.0] * n, rows]], samples=[])
    state.handle(wire.decode(wire.encode(batch)), b"id", 2.0)
    state.finish(3.0)
    return state


def test_query_round_trip_through_wire():
    """A QUERY is answered with a RESULT to the same identity, carrying the query's id."""
    state = _state_with_steps()
    query = wire.envelope(Kind.QUERY, "r", 0, 1, q="stop", id=42)
    replies = state.handle(wire.decode(wire.encode(query)), b"me", 4.0)
    assert len(replies) == 1 and replies[0].identity == b"me"
    result = wire.decode(wire.encode(replies[0].fields))
    assert result.kind is Kind.RESULT and result.fields["id"] == 42
    assert result.fields["result"]["stopped"] is True


def test_metrics_answer_has_stats_and_recent_values():
    """``metrics`` gives window stats and the last n points of the cross-rank mean series."""
    answer = _state_with_steps().answer("metrics", {"name": "reward", "n": 3})["metrics"]
    assert list(answer) == ["reward"]
    assert answer["reward"]["steps"] == [3, 4, 5]
    assert answer["reward"]["stats"]["count"] == 6
    assert abs(answer["reward"]["stats"]["slope"] - 0.1) < 1e-9


def test_alerts_ppo_comparisons_answers():
    """``alerts`` counts by severity, ``ppo`` gives trends and update counts, unknown is an error."""
    state = _state_with_steps()
    alerts = state.answer("alerts", {"n": 5})
    assert alerts["counts"]["CRITICAL"] >= 1 and alerts["recent"][-1]["metric"] == "kl"
    ppo = state.answer("ppo")
    assert ppo["num_policy_updates"] == 6 and ppo["policy_loss_trend"] < 0
    assert abs(ppo["avg_clip_fraction"] - 0.2) < 1e-9
    assert state.answer("comparisons")["num_comparisons"] == 0
    assert "error" in state.answer("nope")
    assert "error" in state.answer("metrics", {"n": -1})


def test_import_rlmon_stays_light():
    """``import rlmon`` and the seed names load no numpy, torch, collector or exporters."""
    code = ("import sys, rlmon; rlmon.TrainingMonitor; rlmon.QualityAnalyzer;"
            "print([m for m in ('numpy','torch','collector','exporters','matplotlib','numba')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
