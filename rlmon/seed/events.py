"""The seed's event vocabulary: phases, verbosity, the event record and the callback protocol.

Pure data; imports only the standard library."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class TrainingPhase(enum.Enum):
    """Where in the training loop an event was emitted (the seed's eight phases)."""

    TRAINING_START = "training_start"
    TRAINING_END = "training_end"
    ITERATION_START = "iteration_start"
    ITERATION_END = "iteration_end"
    RESPONSE_GENERATED = "response_generated"
    REWARD_COMPUTED = "reward_computed"
    POLICY_UPDATE = "policy_update"
    VALUE_UPDATE = "value_update"


class VerbosityLevel(enum.Enum):
    """SIMPLE: essential metrics; VERBOSE: PPO mechanics too (the seed's two levels)."""

    SIMPLE = "simple"
    VERBOSE = "verbose"


@dataclass(frozen=True, slots=True)
class TrainingEvent:
    """One event from the training loop: its phase, iteration (the step), epoch, Unix timestamp,
    numeric ``metrics`` (sent to the collector) and free-form ``metadata`` (``prompts`` and
    ``responses`` of RESPONSE_GENERATED go to the collector's text-quality detectors)."""

    phase: TrainingPhase
    iteration: int
    epoch: int = 0
    timestamp: float = field(default_factory=time.time)
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def get_metric(self, name: str, default: float = 0.0) -> float:
        """The metric ``name``, or ``default`` when absent."""
        return self.metrics.get(name, default)

    def has_metric(self, name: str) -> bool:
        """Whether the event carries metric ``name``."""
        return name in self.metrics

    def get_metadata(self, key: str, default: Any = None) -> Any:
        """The metadata entry ``key``, or ``default`` when absent."""
        return self.metadata.get(key, default)


@runtime_checkable
class TrainingCallback(Protocol):
    """Anything with ``on_event(event)``. A custom callback runs in the training process, on the
    thread that emitted the event: its cost is the user's (rlmon's own analyzers run in the
    collector instead). An exception from it is logged and does not stop training."""

    def on_event(self, event: TrainingEvent) -> None:
        """Handle one event."""
