"""Detectors: they look at cross-rank aggregates as steps complete and raise alerts.

A detector returns :class:`Finding` objects; the collector records the alert and, for a finding
that asks for it, requests a coordinated stop. Detectors are plain Python around the numbers the
store already computed, testable without sockets and with any clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from collector.snapshot import Alert

INFO, WARNING, CRITICAL = "INFO", "WARNING", "CRITICAL"
_LEVEL = {None: 0, INFO: 1, WARNING: 2, CRITICAL: 3}

#: Metric names the KL detector watches (TRL, OpenRLHF, verl and the seeds' spellings).
KL_METRIC_NAMES = ("kl", "kl_div", "kl_divergence", "objective/kl", "train/kl", "actor/kl",
                   "policy/kl", "ppo/mean_kl")


@dataclass(frozen=True, slots=True)
class Finding:
    """An alert plus whether it asks for a coordinated stop."""

    alert: Alert
    stop: bool = False


@dataclass(kw_only=True, slots=True)
class KLDetector:
    """The seeds' KL check: WARNING above ``threshold``, CRITICAL above twice it (stops the run).

    It alerts when the level rises, and again at the same level every ``cooldown_steps`` steps
    while it stays there; it asks for a stop once."""

    threshold: float = 0.1
    metric_names: tuple[str, ...] = KL_METRIC_NAMES
    cooldown_steps: int = 10
    _level: dict[str, str | None] = field(default_factory=dict)
    _last_alert_step: dict[str, int] = field(default_factory=dict)
    _stop_asked: bool = False

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ValueError(f"kl_threshold must be a positive number, got {self.threshold}")

    def watches(self, metric: str) -> bool:
        """True when ``metric`` is a KL metric."""
        return metric in self.metric_names

    def observe(self, metric: str, step: int, value: float, now: float) -> list[Finding]:
        """Judge one completed step's cross-rank mean KL."""
        if not self.watches(metric) or not math.isfinite(value):
            return []
        level = CRITICAL if value > 2 * self.threshold else WARNING if value > self.threshold else None
        previous = self._level.get(metric)
        self._level[metric] = level
        if level is None:
            return []
        rising = _LEVEL[level] > _LEVEL[previous]
        cooled = step - self._last_alert_step.get(metric, -10**18) >= self.cooldown_steps
        if not (rising or cooled):
            return []
        self._last_alert_step[metric] = step
        limit = 2 * self.threshold if level == CRITICAL else self.threshold
        verb = "critically above" if level == CRITICAL else "above"
        message = f"KL divergence {verb} threshold: {value:.4f} > {limit:.4f} ({metric})"
        alert = Alert(step, level, "KL_HIGH", metric, float(value), limit, message, now)
        stop = level == CRITICAL and not self._stop_asked
        self._stop_asked = self._stop_asked or stop
        return [Finding(alert, stop)]
