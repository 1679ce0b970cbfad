"""The rank API without a collector: queueing, ledger, tensors, stop-state acceptance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlmon.config import RankConfig
from rlmon.monitor import Monitor, NullMonitor
from rlmon import wire
from rlmon.publisher import DeferredScalar, HostValues, StopOffer, encode_blocks, resolve_value
from rlmon.wire import Kind


@pytest.fixture
def monitor():
    """A monitor pointed at an address nobody listens on; always closed."""
    mon = Monitor(RankConfig(endpoint="tcp://127.0.0.1:1", run_id="t", close_timeout=0.05),
                  "tcp://127.0.0.1:1")
    yield mon
    mon.close()


def _idle_monitor(**overrides) -> Monitor:
    """A monitor whose sender does not flush during the test (a 60 s flush interval)."""
    config = RankConfig(endpoint="tcp://127.0.0.1:1", run_id="t", close_timeout=0.05,
                        flush_interval=60.0, **overrides)
    return Monitor(config, config.endpoint)


def test_log_copies_the_dict():
    """Mutating the dict after log() does not change what was logged."""
    mon = _idle_monitor()
    try:
        metrics = {"a": 1.0}
        mon.log(0, metrics)
        metrics["a"] = 2.0
        assert [item[2] for item in mon._publisher.pending] == [{"a": 1.0}]
    finally:
        mon.close()


def test_cpu_tensors_and_numpy_scalars_become_numbers():
    """0-d CPU tensors are read directly; numpy scalars are resolved by the sender."""
    blocks, bad = encode_blocks([(1, 0.0, HostValues(t=torch.tensor(2.5).item(), n=np.float32(1.5)))])
    assert bad == 0 and _plain(blocks[0])[3] == [[2.5, 1.5]]
    from rlmon.monitor import _host_values
    values = _host_values({"loss": torch.tensor(0.25), "x": 3})
    assert values == {"loss": 0.25, "x": 3}


def test_deferred_scalar_waits_on_its_event_before_reading():
    """A device value is read only after its copy's event has completed."""
    calls = []

    class Event:  # stands in for torch.cuda.Event: no GPU on this machine
        def synchronize(self):
            calls.append("synchronize")

    value = DeferredScalar(torch.tensor(1.25), Event())
    assert resolve_value(value) == 1.25 and calls == ["synchronize"]


def test_blocks_group_equal_key_sets_in_order():
    """Consecutive steps with the same keys share a block; a new key set starts another."""
    records = [(0, 1.0, {"a": 1.0}), (1, 2.0, {"a": 2.0}), (1, 2.5, {"span/x": 0.1}),
               (2, 3.0, {"a": 3.0})]
    blocks, bad = encode_blocks(records)
    assert bad == 0
    assert [b[0] for b in blocks] == [["a"], ["span/x"], ["a"]]
    assert _plain(blocks[0])[1:] == [[0, 1], [1.0, 2.0], [[1.0], [2.0]]]


def test_blocks_of_numbers_are_packed_and_others_stay_plain():
    """All-number blocks travel as packed bin columns; a block with a string stays plain (the
    collector counts the wrong type); both decode to the same steps and times."""
    numbers, _ = encode_blocks([(0, 1.0, {"a": 1.0, "b": 2}), (1, 2.0, {"a": float("nan"), "b": True})])
    mixed, _ = encode_blocks([(0, 1.0, {"a": 1.0, "b": "x"})])
    assert isinstance(numbers[0][3], bytes) and mixed[0][3] == [[1.0, "x"]]
    decoded = wire._block_of(numbers[0])
    assert decoded.packed and decoded.steps.tolist() == [0, 1] and decoded.times.tolist() == [1.0, 2.0]
    assert decoded.values[0].tolist() == [1.0, 2.0] and decoded.values[1, 1] == 1.0
    assert not wire._block_of(mixed[0]).packed


def test_unreadable_records_are_counted_not_raised():
    """A step that is not an integer is dropped and counted by the encoder."""
    blocks, bad = encode_blocks([("x", 0.0, {"a": 1.0}), (1, 0.0, {"a": 2.0})])
    assert bad == 1 and _plain(blocks[0])[1] == [1]


def test_bad_arguments_never_raise(monitor):
    """log() with a non-dict and log_samples() with junk are counted, not raised."""
    monitor.log(0, None)
    monitor.log_samples(0, ["p"], ["r"], rewards=["not a number"])
    assert monitor.statistics()["dropped"] == {"bad_value": 1, "bad_sample": 1}


def test_queue_bound_drops_and_counts():
    """Past max_pending queued steps, log() drops and counts queue_full."""
    mon = _idle_monitor(max_pending=5)
    try:
        for step in range(20):
            mon.log(step, {"a": 1.0})
        stats = mon.statistics()
        assert stats["emitted"] == 20 and stats["pending"] == 5
        assert stats["dropped"] == {"queue_full": 15}
    finally:
        mon.close()


def _offer(monitor, generation, at):
    monitor._publisher.stop_offer = StopOffer(generation, at, "why", "CRITICAL", "operator")


def _acks(monitor):
    return [m for m in monitor._publisher.outbox if m["k"] == Kind.STOP_ACK]


def test_stop_state_is_followed_from_its_step(monitor):
    """should_stop is false before stop_at_step and true from it on; the state is acknowledged."""
    monitor._publisher.outbox.clear()
    assert not monitor.should_stop(0)
    _offer(monitor, 1, 3)
    assert [monitor.should_stop(s) for s in (1, 2, 3, 4)] == [False, False, True, True]
    assert monitor.stop_reason == "why" and monitor.stop_at_step == 3
    assert [(a["gen"], a["ok"]) for a in _acks(monitor)] == [(1, True)]


def test_a_stop_step_already_passed_is_refused(monitor):
    """A rank that already evaluated step 5 refuses a stop at 5 and keeps going."""
    monitor._publisher.outbox.clear()
    for step in range(6):
        monitor.should_stop(step)
    _offer(monitor, 1, 5)
    assert not monitor.should_stop(6)
    assert [(a["gen"], a["ok"], a["step"]) for a in _acks(monitor)] == [(1, False, 6)]
    _offer(monitor, 2, 9)
    assert [monitor.should_stop(s) for s in (7, 8, 9)] == [False, False, True]


def test_stop_at_the_current_step_is_accepted(monitor):
    """A stop at exactly the step being checked (not yet evaluated) is accepted."""
    monitor.should_stop(4)
    _offer(monitor, 1, 5)
    assert monitor.should_stop(5)


def test_request_early_stop_queues_a_request(monitor):
    """request_early_stop sends a STOP_REQUEST with the reason."""
    monitor._publisher.outbox.clear()
    monitor.request_early_stop("reward hacking suspected")
    requests = [m for m in monitor._publisher.outbox if m["k"] == Kind.STOP_REQUEST]
    assert requests and requests[0]["reason"] == "reward hacking suspected"


def test_null_monitor_has_the_same_methods():
    """NullMonitor offers every public method of Monitor."""
    public = {n for n in dir(Monitor) if not n.startswith("_")}
    assert public <= set(dir(NullMonitor))
    null = NullMonitor()
    null.log(0, {"a": math.nan})
    assert null.should_stop(10**9) is False


def test_forked_child_starts_no_sender_until_it_logs():
    """A fork (DataLoader worker) gets a fresh, idle sender: no thread until the child logs."""
    import os
    import threading

    mon = _idle_monitor()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report thread counts before and after logging, then leave
        try:
            before = threading.active_count()
            mon.log(1, {"a": 1.0})
            after = threading.active_count()
            os.write(write_end, f"{before} {after} {mon._publisher.incarnation}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    before, after, incarnation = os.read(read_end, 100).decode().split()
    os.waitpid(pid, 0)
    mon.close()
    assert (int(before), int(after)) == (1, 2)
    assert int(incarnation) != mon._publisher.incarnation


def test_spans_land_on_the_next_logged_step():
    """Phases timed inside a step are sent with that step's log call, summed per name."""
    mon = _idle_monitor()
    try:
        mon.log(0, {"a": 1.0})
        with mon.span("rollout"):
            pass
        with mon.span("rollout"):
            pass
        with mon.span("update"):
            pass
        mon.log(1, {"a": 2.0})
        steps = [(item[0], sorted(item[2])) for item in mon._publisher.pending]
        assert steps == [(0, ["a"]), (1, ["a", "span/rollout", "span/update"])]
        assert mon._publisher.pending[1][2]["span/rollout"] >= 0.0
    finally:
        mon.close()


def test_wrapped_rewards_keep_name_signature_and_results():
    """A wrapped reward function is the same function to TRL, and reports mean, time, calls."""
    import inspect

    def check_answer(prompts, completions, **kwargs):
        """Doc."""
        return [1.0 if c == "4" else 0.0 for c in completions]

    def broken(prompts, completions, **kwargs):
        raise ValueError("bad")

    mon = _idle_monitor()
    try:
        wrapped, wrapped_broken = mon.wrap_rewards([check_answer, broken])
        assert wrapped.__name__ == "check_answer" and wrapped.__doc__ == "Doc."
        assert inspect.signature(wrapped) == inspect.signature(check_answer)
        assert wrapped(["2+2="] * 2, ["4", "5"]) == [1.0, 0.0]
        assert wrapped(["2+2="], ["4"]) == [1.0]
        with pytest.raises(ValueError):
            wrapped_broken([], [])
        mon.log(0, {"loss": 1.0})
        sent = mon._publisher.pending[-1][2]
        assert sent["rewards/check_answer"] == pytest.approx(2 / 3)
        assert sent["reward_fn/check_answer/calls"] == 2
        assert sent["reward_fn/broken/errors"] == 1 and "rewards/broken" not in sent
        assert sent["reward_fn/check_answer/seconds"] >= 0
        wrapped(["1+1="], ["3"])
        mon.log(1, {"loss": 1.0})
        assert mon._publisher.pending[-1][2]["rewards/check_answer"] == 0.0
        assert mon._publisher.pending[-1][2]["reward_fn/check_answer/calls"] == 3
    finally:
        mon.close()


def test_should_checkpoint_fires_once_at_its_step(monitor):
    """should_checkpoint is true once at the chosen step; a passed step is skipped."""
    assert not monitor.should_checkpoint(0)
    monitor._publisher.checkpoint_offer = StopOffer(1, 3, "kl", "", "")
    assert [monitor.should_checkpoint(s) for s in (1, 2, 3, 4)] == [False, False, True, False]
    monitor._publisher.checkpoint_offer = StopOffer(2, 2, "late", "", "")
    assert not monitor.should_checkpoint(5)


def test_log_after_close_is_dropped_and_counted():
    """After close(), log() queues nothing and counts the call as dropped ("closed")."""
    mon = _idle_monitor()
    mon.close()
    mon.log(0, {"a": 1.0})
    assert mon.statistics()["dropped"] == {"closed": 1}
    assert len(mon._publisher.pending) == 0


def _plain(block: list) -> list:
    """A wire block as plain lists (packed columns decoded)."""
    decoded = wire._block_of(block)
    values = decoded.values.tolist() if decoded.packed else decoded.values
    return [decoded.keys, decoded.steps.tolist(), decoded.times.tolist(), values]


def test_resend_buffer_resends_only_when_acknowledgements_stall(monkeypatch):
    """Held batches go out again only after resend_after seconds without ACK progress, then
    after twice as long; a slow but acknowledging collector gets no duplicates; past the bound
    the oldest batch is dropped and counted."""
    from rlmon.publisher import Ledger, ResendBuffer

    clock = [100.0]
    monkeypatch.setattr("rlmon.publisher.time.monotonic", lambda: clock[0])
    ledger = Ledger()
    buffer = ResendBuffer(ledger, max_batches=3, max_bytes=10**6, resend_after=2.0)
    for seq in (1, 2):
        buffer.add(seq, b"x" * 10, steps=4)
    for batch in buffer.due(clock[0]):  # never sent yet: due at once
        batch.sent_at = clock[0]
    assert buffer.due(101.0) == [] and ledger.unacked == 8
    clock[0] = 101.5
    buffer.acknowledge(1)  # progress: the collector is alive
    assert ledger.acked == 4 and ledger.unacked == 4
    assert buffer.due(103.0) == []  # 1.5 s since the progress
    assert len(buffer.due(103.6)) == 1 and buffer.due(105.0) == []  # re-sent; next after 4 s
    assert len(buffer.due(107.7)) == 1 and buffer.resends == 2
    for seq in (3, 4, 5):
        buffer.add(seq, b"y" * 10, steps=1)
    assert list(buffer.batches) == [3, 4, 5] and ledger.dropped == {"resend_overflow": 4}
    assert ledger.unacked == 3


def test_values_msgpack_cannot_carry_never_stop_the_sender():
    """An array, a list of numpy scalars or an object as a metric value, and a step beyond
    uint64: the batch still encodes (such values go as nil, counted by the collector; such a
    step is dropped as unreadable) and the sender thread keeps running."""
    import zmq

    mon = _idle_monitor()
    try:
        publisher = mon._publisher
        context = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            records = [(1, 0.0, HostValues(a=np.zeros(3), b=[np.float32(1.0)], c=object())),
                       (2**70, 0.0, {"a": 1.0}), (3, 0.0, {"a": 2.0})]
            publisher._send_batch(sock, records, [[1, ["p"], ["r"], [np.zeros(2)]]], None)
        finally:
            sock.close(linger=0)
        held = list(publisher.resend.batches.values())
        assert len(held) == 1
        decoded = wire.decode(held[0].frame)
        steps = [s for block in decoded.fields["blocks"] for s in block.steps.tolist()]
        assert steps == [1, 3]
        assert publisher.ledger.dropped.get("unreadable") == 1
        assert mon._publisher._thread.is_alive() or not mon._publisher._thread.ident
    finally:
        mon.close()


def test_a_batch_pushed_out_after_sending_counts_as_acked_when_an_ack_covers_it():
    """The oldest held batch, already handed to ZeroMQ, is pushed out (counted as
    resend_overflow); when the collector's ACK later covers it, its steps move to acked, so
    the ledger agrees with the log."""
    from rlmon.publisher import Ledger, ResendBuffer

    ledger = Ledger()
    buffer = ResendBuffer(ledger, max_batches=1, max_bytes=10**6, resend_after=30.0)
    buffer.add(1, b"x", steps=5)
    for batch in buffer.due(0.0):
        batch.sent_at, batch.sends = 0.0, 1
    buffer.add(2, b"y", steps=3)
    assert ledger.dropped == {"resend_overflow": 5}
    buffer.acknowledge(2)
    assert ledger.acked == 8 and ledger.dropped == {} and ledger.unacked == 0


def test_keys_the_collector_would_refuse_are_left_out_not_the_batch():
    """An empty, a non-string and an overlong key are dropped from their record (and
    counted); the record's other values and the other records still go."""
    drops: list[int] = []
    blocks, bad = encode_blocks([(0, 1.0, {"": 1.0, 7: 2.0, "x" * 300: 3.0, "ok": 4.0}),
                                 (1, 2.0, {"": 5.0})], drops)
    assert bad == 1 and drops == [3, 1]
    again: list[int] = []
    encode_blocks([(2, 3.0, {"ok": 1.0}), (3, 4.0, {"ok": 2.0})], again)
    assert again == []  # a valid key set, cached or not, drops nothing
    decoded = wire.decode(wire.encode(wire.envelope(
        wire.Kind.BATCH, "r", 0, 1, seq=1, t=1.0, step=1, blocks=blocks))).fields["blocks"]
    assert [b.keys for b in decoded] == [["ok"]] and decoded[0].values.tolist() == [[4.0]]


def test_a_repeated_stop_state_gets_the_same_ack_again():
    """A collector that lost a rank's STOP_ACK (it restarted) re-sends the stop state; the rank
    answers again with the ACK it sent for that generation instead of ignoring it."""
    mon = _idle_monitor()
    try:
        publisher = mon._publisher
        state = wire.decode(wire.encode(wire.envelope(Kind.STOP_STATE, "t", -1, 0, gen=1, at=5,
                                                      reason="r", sev="CRITICAL")))
        publisher._handle(state)
        assert mon.should_stop(1) is False
        ack = publisher.outbox.popleft()
        publisher._last_stop_ack = ack  # what the sender records when it sends it
        publisher._handle(state)
        assert list(publisher.outbox) == [ack] and ack["ok"] is True
    finally:
        mon.close()
