"""Callbacks beside the collector: loading ``module:Class``, event-log messages to TrainingEvents,
and delivery (exceptions counted, a stuck callback dropping instead of stalling the reader)."""

from __future__ import annotations

import math
import threading

import pytest

from exporters.callbacks import (CallbackOptions, CallbackStatistics, Delivery, EventBuilder,
                                 alert_of, load_callback, load_callbacks)
from rlmon import wire
from rlmon.errors import ConfigError
from rlmon.seed.analyzers import QualityAlert
from rlmon.seed.events import TrainingEvent, TrainingPhase
from rlmon.wire import Kind


class Recorder:
    """A callback that keeps what it gets."""

    def __init__(self) -> None:
        self.events: list[TrainingEvent] = []
        self.alerts: list[QualityAlert] = []

    def on_event(self, event: TrainingEvent) -> None:
        """Keep the event."""
        self.events.append(event)

    def on_alert(self, alert: QualityAlert) -> None:
        """Keep the alert."""
        self.alerts.append(alert)


class Failing:
    """Raises on every event."""

    def on_event(self, event: TrainingEvent) -> None:
        """Fail."""
        raise RuntimeError("no")


def _message(kind: Kind, rank: int, **fields) -> wire.Message:
    """A message as the event log holds it (encoded, then decoded)."""
    return wire.decode(wire.encode(wire.envelope(kind, "run-1", rank, 1, **fields)))


def _hello(rank: int, world: int = 2) -> wire.Message:
    return _message(Kind.HELLO, rank, world=world, local_rank=rank, pid=100 + rank, host="h")


def _batch(rank: int, seq: int, steps: list[int], samples: list | None = None) -> wire.Message:
    rows = [[float(step + rank), 0.1] for step in steps]
    block = [["reward", "kl"], steps, [1000.0 + s for s in steps], rows]
    return _message(Kind.BATCH, rank, seq=seq, t=1000.0, step=steps[-1], blocks=[block],
                    samples=samples or [])


def _phases(events: list[TrainingEvent]) -> list[tuple[str, int]]:
    return [(e.phase.name, e.iteration) for e in events]


def test_load_callback_builds_the_object():
    """``module:Class`` is imported and instantiated with no arguments."""
    assert isinstance(load_callback("test_callbacks:Recorder"), Recorder)
    assert list(load_callbacks(["test_callbacks:Recorder", "test_callbacks:Recorder"])) == [
        "test_callbacks:Recorder"]


@pytest.mark.parametrize("spec, words", [
    ("no_colon", "expected module:Class"),
    ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
    ("test_callbacks:Missing", "has no attribute 'Missing'"),
    ("collections:OrderedDict", "has no on_event(event) method"),
    ("exporters.callbacks:AlertLog", "AlertLog() raised TypeError"),
])
def test_a_bad_spec_is_a_config_error_naming_it(spec, words):
    """Every way a spec can be wrong names the spec and says what is wrong."""
    with pytest.raises(ConfigError) as caught:
        load_callback(spec)
    assert caught.value.key == f"--callback {spec}" and words in str(caught.value)


def test_steps_become_iteration_end_events_once_every_rank_has_passed_them():
    """TRAINING_START at the first message; ITERATION_END per step with the cross-rank mean in
    ``metrics`` and each rank's value in ``metadata['ranks']``, released in step order."""
    builder = EventBuilder()
    events = builder.feed(_hello(0)) + builder.feed(_hello(1))
    events += builder.feed(_batch(0, 1, [0, 1, 2])) + builder.ready()
    assert _phases(events) == [("TRAINING_START", 0)]  # rank 1 has not passed step 0 yet
    events = builder.feed(_batch(1, 1, [0, 1])) + builder.ready()
    assert _phases(events) == [("ITERATION_END", 0)]
    (event,) = events
    assert event.metrics == {"reward": 0.5, "kl": 0.1}
    assert event.metadata["ranks"] == {"reward": {0: 0.0, 1: 1.0}, "kl": {0: 0.1, 1: 0.1}}
    assert event.metadata["world_size"] == 2 and event.timestamp == 1000.0


def test_samples_become_response_generated_events_and_duplicates_are_dropped():
    """A ``log_samples`` call is one RESPONSE_GENERATED event; a re-sent batch adds nothing."""
    builder = EventBuilder()
    batch = _batch(0, 1, [3], samples=[[3, ["p"], ["r"], [1.0]]])
    events = builder.feed(_hello(0, world=1)) + builder.feed(batch)
    assert _phases(events) == [("TRAINING_START", 0), ("RESPONSE_GENERATED", 3)]
    assert events[1].metadata == {"prompts": ["p"], "responses": ["r"], "rewards": [1.0], "rank": 0}
    assert builder.feed(batch) == []


def test_finish_releases_every_step_and_ends_with_the_stop():
    """At the end pending steps are delivered, then TRAINING_END carrying the last stop."""
    builder = EventBuilder()
    builder.feed(_hello(0, world=1))
    builder.feed(_batch(0, 1, [0, 1]))
    builder.feed(_message(Kind.STOP_STATE, -1, gen=1, at=5, reason="kl", sev="CRITICAL"))
    events = builder.ready() + builder.finish()
    assert _phases(events) == [("ITERATION_END", 0), ("ITERATION_END", 1), ("TRAINING_END", 1)]
    assert events[-1].metadata["stop"]["stop_at_step"] == 5


def test_alert_records_become_quality_alerts():
    """An alerts.jsonl record is the seed's QualityAlert; a malformed one is skipped."""
    alert = alert_of({"step": 4, "severity": "WARNING", "type": "KL_HIGH", "metric": "kl",
                      "value": 0.3, "threshold": 0.1, "message": "KL_HIGH: up", "time": 5.0})
    assert alert == QualityAlert(4, "WARNING", "KL_HIGH: up", "kl", 0.3, "KL_HIGH", 0.1, 5.0)
    assert alert_of({"severity": "WARNING"}) is None
    assert math.isnan(alert_of({"step": 1, "severity": "INFO", "message": "m"}).metric_value)


def test_delivery_counts_exceptions_and_keeps_delivering():
    """A failing callback is counted; the other one still gets everything, alerts included."""
    recorder = Recorder()
    stats = CallbackStatistics()
    delivery = Delivery({"bad": Failing(), "good": recorder}, stats, queue_size=4)
    for step in range(10):
        delivery.submit(TrainingEvent(TrainingPhase.ITERATION_END, step))
    delivery.submit(QualityAlert(3, "WARNING", "m", "kl", 0.2))
    delivery.close(10.0)
    assert [e.iteration for e in recorder.events] == list(range(10))
    assert len(recorder.alerts) == 1
    assert stats.errors == {"bad": 10} and stats.delivered == 11 and stats.alerts == 1
    assert stats.dropped == 0


def test_a_stuck_callback_makes_the_reader_drop_not_wait():
    """With the queue full and no callback call returning for ``stall_seconds``, submit drops
    (counted) and returns; close gives up after its timeout and counts what is left."""
    release = threading.Event()

    class Stuck:
        def on_event(self, event: TrainingEvent) -> None:
            release.wait(30)

    stats = CallbackStatistics()
    delivery = Delivery({"stuck": Stuck()}, stats, queue_size=1, stall_seconds=0.5)
    results = [delivery.submit(TrainingEvent(TrainingPhase.ITERATION_END, s)) for s in range(4)]
    assert results[:2] == [True, True] and results[2:] == [False, False]
    assert stats.dropped == 2
    delivery.close(0.2)
    assert stats.dropped == 3  # the one still queued
    release.set()


def test_options_are_validated():
    """Bad settings are a ConfigError."""
    with pytest.raises(ConfigError):
        CallbackOptions(queue_size=0)
    with pytest.raises(ConfigError):
        CallbackOptions(drain_seconds=0)
