"""Wrapped reward functions: the same function to the trainer, plus what rlmon needs to watch it.

A wrapper keeps the function's ``__name__``, docstring and signature (``functools.wraps``; TRL
reads ``__name__`` for its own logs) and returns exactly what the function returns. Per step it
attaches to the rank's next ``log`` call: the mean of the rewards returned (``rewards/<name>``, the
series the reward detectors watch), the seconds spent (``reward_fn/<name>/seconds``) and the
cumulative ``calls`` and ``errors``; every individual value returned goes to the collector too
(``Monitor.log_reward_values``, the BATCH field ``rv``). Timing is measured here, on the rank;
statistics (mean, std, percentiles, EMAs, histograms, anomalies) are computed in the collector.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

#: Reward function names are cut to this many characters, so ``reward_fn/<name>/errors`` stays
#: within the wire's 256-character key limit.
MAX_REWARD_NAME = 200


@dataclass(slots=True)
class RewardTally:
    """One function's counts: cumulative calls/errors; this step's sum, count and seconds."""

    calls: int = 0
    errors: int = 0
    generation: int = -1
    total: float = 0.0
    count: int = 0
    seconds: float = 0.0

    def start_step_if_new(self, generation: int) -> None:
        """Reset the per-step sums when the monitor has sent a log since the last call."""
        if generation != self.generation:
            self.generation, self.total, self.count, self.seconds = generation, 0.0, 0, 0.0

    def add(self, values: Any) -> None:
        """Add the finite numbers of a reward function's result to this step's sum."""
        for value in _as_list(values):
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                self.total += number
                self.count += 1


def wrap_reward(monitor: Any, function: Callable, name: str | None = None) -> Callable:
    """Wrap one reward function for ``monitor`` (see the module docstring)."""
    label = str(name or getattr(function, "__name__", "reward"))[:MAX_REWARD_NAME]
    tally = RewardTally()

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        tally.start_step_if_new(monitor.attach_generation)
        tally.calls += 1
        started = time.perf_counter()
        try:
            result = function(*args, **kwargs)
        except Exception:
            tally.errors += 1
            _attach(monitor, label, tally, time.perf_counter() - started)
            raise
        _attach(monitor, label, tally, time.perf_counter() - started, result)
        return result

    if name is not None:
        wrapped.__name__ = name
    wrapped.rlmon_tally = tally  # type: ignore[attr-defined]
    return wrapped


def _attach(monitor: Any, label: str, tally: RewardTally, seconds: float,
            result: Any = None) -> None:
    """Attach this step's counts; hand a result's values (and so its mean) to the monitor."""
    tally.seconds += seconds
    values = {f"reward_fn/{label}/calls": tally.calls, f"reward_fn/{label}/errors": tally.errors,
              f"reward_fn/{label}/seconds": tally.seconds}
    try:
        monitor.attach(values)
        if result is not None:
            monitor.log_reward_values(None, label, result)
    except Exception:  # monitoring must never break the reward computation
        pass


def reward_floats(values: Any) -> list[float | None]:
    """A reward function's result as a list of floats, one per sample: numbers, lists, tuples,
    arrays and tensors are accepted; anything that is not a number (TRL's ``None`` for "does not
    apply", a string) becomes ``None``. A single number is a list of one."""
    floats: list[float | None] = []
    for value in _as_list(values):
        try:
            floats.append(float(value))
        except (TypeError, ValueError, OverflowError):
            floats.append(None)
    return floats


def _as_list(values: Any) -> list:
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        return list(values)
    return [values]
