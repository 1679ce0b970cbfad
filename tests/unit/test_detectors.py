"""The KL detector against the seeds' rule: WARNING above the threshold, CRITICAL above twice it."""

from __future__ import annotations

import math

import pytest

from collector.detectors import CRITICAL, WARNING, KLDetector


def _levels(detector, values):
    out = []
    for step, value in enumerate(values):
        out.append([(f.alert.severity, f.stop) for f in detector.observe("kl", step, value, 0.0)])
    return out


def test_below_threshold_is_quiet():
    """KL at or below the threshold raises nothing."""
    assert _levels(KLDetector(threshold=0.1), [0.0, 0.05, 0.1]) == [[], [], []]


def test_warning_then_critical_with_one_stop():
    """Crossing the threshold warns; crossing twice it is critical and asks for a stop once."""
    levels = _levels(KLDetector(threshold=0.1), [0.05, 0.15, 0.25, 0.3])
    assert levels[1] == [(WARNING, False)]
    assert levels[2] == [(CRITICAL, True)]
    assert levels[3] == []  # same level, within the cooldown


def test_cooldown_repeats_alerts_at_the_same_level():
    """A level that persists is alerted again after cooldown_steps steps, never asks twice."""
    detector = KLDetector(threshold=0.1, cooldown_steps=3)
    levels = _levels(detector, [0.5] * 7)
    assert [len(x) for x in levels] == [1, 0, 0, 1, 0, 0, 1]
    assert [stop for x in levels for _, stop in x] == [True, False, False]


def test_other_metrics_and_nan_are_ignored():
    """Only KL names count, and a NaN KL is not judged here (the NaN detector's job)."""
    detector = KLDetector(threshold=0.1)
    assert detector.observe("reward", 0, 5.0, 0.0) == []
    assert detector.observe("kl", 1, math.nan, 0.0) == []
    assert detector.watches("objective/kl") and detector.watches("kl_div")


def test_alert_carries_the_seed_fields():
    """The alert names the metric, value, threshold and a readable reason."""
    finding = KLDetector(threshold=0.1).observe("kl_div", 45, 0.1234, 7.0)[0]
    alert = finding.alert
    assert (alert.step, alert.metric, alert.value, alert.threshold) == (45, "kl_div", 0.1234, 0.1)
    assert "KL divergence above threshold" in alert.message and alert.time == 7.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_invalid_threshold_is_refused(bad):
    """A threshold that is not a positive finite number is a clear error."""
    with pytest.raises(ValueError):
        KLDetector(threshold=bad)
