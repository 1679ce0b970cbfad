"""Individual reward values on the rank side and on the wire (the BATCH field ``rv``)."""

from __future__ import annotations

import collections

import pytest

from rlmon import wire
from rlmon.config import RankConfig
from rlmon.errors import FrameRejected
from rlmon.monitor import Monitor, NullMonitor
from rlmon.publisher import _take_reward_values
from rlmon.wire import Kind


def _batch(**fields) -> bytes:
    """A BATCH frame with no blocks and ``fields``."""
    return wire.encode(wire.envelope(Kind.BATCH, "r", 0, 1, seq=1, t=1.0, step=0, blocks=[],
                                     **fields))


def _idle_monitor() -> Monitor:
    """A monitor whose sender does not flush during the test (a 60 s flush interval)."""
    config = RankConfig(endpoint="tcp://127.0.0.1:1", run_id="t", close_timeout=0.05,
                        flush_interval=60.0)
    return Monitor(config, config.endpoint)


def test_decode_accepts_reward_values():
    """``rv`` entries of [step, name, values] pass, nil and NaN values included."""
    message = wire.decode(_batch(rv=[[3, "check_answer", [1.0, None, float("nan"), 2]]]))
    assert message.fields["rv"][0][:2] == [3, "check_answer"]


@pytest.mark.parametrize("rv, reason", [
    ({"a": 1}, "wrong_type"),
    ([[1, "f"]], "bad_block"),
    ([["1", "f", []]], "bad_block"),
    ([[1, "", []]], "bad_block"),
    ([[1, "f" * (wire.MAX_NAME_LENGTH + 1), []]], "bad_block"),
    ([[1, "f", 2.0]], "bad_block"),
    ([[1, "f", [0.0] * (wire.MAX_REWARD_VALUES + 1)]], "bad_block"),
    ([[1, "f", []]] * (wire.MAX_REWARD_ENTRIES + 1), "bad_block"),
])
def test_decode_rejects_bad_reward_values(rv, reason):
    """A bad ``rv`` shape rejects the frame with a counted reason."""
    with pytest.raises(FrameRejected) as caught:
        wire.decode(_batch(rv=rv))
    assert caught.value.reason == reason


def test_values_wait_for_the_next_log_step_with_their_mean():
    """With step None the values take the next log call's step and attach ``rewards/<name>``."""
    mon = _idle_monitor()
    try:
        mon.log_reward_values(None, "f", [1.0, None, 2.0])
        mon.log_reward_values(None, "f", (3.0,))
        assert list(mon._publisher.reward_values) == []
        mon.log(7, {"loss": 0.5})
        assert list(mon._publisher.reward_values) == [[7, "f", [1.0, None, 2.0]], [7, "f", [3.0]]]
        assert mon._publisher.pending[-1][2]["rewards/f"] == 2.0
        mon.log_reward_values(9, "g", 4)
        mon.log_reward_values("x", "g", [1.0])
        assert list(mon._publisher.reward_values)[-1] == [9, "g", [4.0]]
        assert mon.statistics()["dropped"] == {"bad_sample": 1}
    finally:
        mon.close()


def test_wrapped_function_sends_its_values_and_returns_its_result():
    """A wrapped reward function's result is returned as is and its values are queued."""
    mon = _idle_monitor()
    try:
        result = [1.0, None, 0.5]
        (wrapped,) = mon.wrap_rewards([lambda prompts, completions, **kw: result], ["fmt"])
        assert wrapped(["p"] * 3, ["a", "b", "c"]) is result
        mon.log(2, {})
        assert list(mon._publisher.reward_values) == [[2, "fmt", [1.0, None, 0.5]]]
        assert mon._publisher.pending[-1][2]["rewards/fmt"] == 0.75
    finally:
        mon.close()


def test_null_monitor_ignores_reward_values():
    """The disabled monitor accepts the call and does nothing."""
    assert NullMonitor().log_reward_values(None, "f", [1.0]) is None


def test_batches_carry_reward_values_bounded():
    """The sender takes entries up to a value budget; a batch without them has no ``rv``."""
    queue = collections.deque([[0, "f", [1.0] * 3], [0, "g", [1.0] * 3], [1, "f", [0.0] * 10]])
    assert [e[1] for e in _take_reward_values(queue, 7)] == ["f", "g"]
    assert len(_take_reward_values(queue, 7)) == 1  # one entry even above the budget
    mon = _idle_monitor()
    sent = []

    class Socket:
        """Records what the sender sends."""

        def send(self, frame, flags):
            sent.append(wire.decode(frame).fields)

    try:
        mon._publisher._send_batch(Socket(), [], [], [[4, "f", [1.0, None]]])
        mon._publisher._send_batch(Socket(), [(1, 1.0, {"a": 1.0})], [])
        assert sent[0]["rv"] == [[4, "f", [1.0, None]]] and "rv" not in sent[1]
    finally:
        mon.close()
