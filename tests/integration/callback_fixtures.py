"""Callback classes that ``tests/integration/test_collector_callback.py`` hands to a real
collector (``--callback tests.integration.callback_fixtures:RecordingCallback``); they run in the
collector's callback process, which imports this module by name."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

RECORD_ENV = "CALLBACK_RECORD_FILE"
"""Environment variable naming the file :class:`RecordingCallback` appends to."""


def _jsonable(value):
    """NaN as None, int keys as strings: one strict-JSON line per record."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RecordingCallback:
    """Appends every event and alert it receives to ``$CALLBACK_RECORD_FILE``, a JSON line
    each."""

    def __init__(self) -> None:
        self.path = Path(os.environ[RECORD_ENV])

    def on_event(self, event) -> None:
        """Record the event's phase, step, metrics and metadata."""
        self._write({"phase": event.phase.value, "iteration": event.iteration,
                     "metrics": event.metrics, "metadata": event.metadata})

    def on_alert(self, alert) -> None:
        """Record an alert (rlmon's optional hook)."""
        self._write({"alert": alert.alert_type, "severity": alert.severity,
                     "iteration": alert.iteration, "metric": alert.metric_name})

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_jsonable(record)) + "\n")


class FailingCallback:
    """Raises on every event: the collector must not notice."""

    def on_event(self, event) -> None:
        """Fail."""
        raise RuntimeError(f"failing on purpose at step {event.iteration}")


class NoOnEvent:
    """Not a callback: it has no ``on_event``."""


class BrokenInit:
    """A callback whose constructor raises."""

    def __init__(self) -> None:
        raise ValueError("cannot be built")

    def on_event(self, event) -> None:
        """Never reached."""
