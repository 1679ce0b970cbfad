"""Slow, obvious per-step references for the collector's stream detectors.

These are the detectors as first written: one completed step at a time, each recomputing its
window from a ``history(metric, n)`` function (the last ``n`` cross-rank means at or before the
step). The collector scores whole blocks of steps with Numba scans (:mod:`collector.detectors`);
``tests/unit/test_detector_blocks.py`` checks the two give the same scores.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from collector import kernels
from collector.detectors import KL_METRICS, LOSS_METRICS, QUALITY_PREFIXES, REWARD_METRICS, REWARD_PREFIXES, is_reward
from collector.rules import Score

History = Callable[[str, int], np.ndarray]
"""``history(metric, n)``: the last ``n`` completed cross-rank means of ``metric``, oldest first."""


class StreamDetector:
    """Base of the per-step reference detectors."""

    name = ""

    def watches(self, metric: str) -> bool:
        """True when this detector scores ``metric``."""
        raise NotImplementedError

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Score one completed cross-rank step."""
        raise NotImplementedError


class MetricSetDetector(StreamDetector):
    """A detector of a fixed set of metric names."""

    def __init__(self, name: str, alert_type: str, metrics: Iterable[str], describe: str) -> None:
        self.name, self.alert_type, self.metrics, self.describe = name, alert_type, set(metrics), describe

    def watches(self, metric: str) -> bool:
        """True for the configured metric names."""
        return metric in self.metrics


@dataclass(slots=True)
class Baseline:
    """Mean of the first ``size`` finite observations; then a short EMA of the rest."""

    size: int = 10
    span: int = 5
    _first: list[float] = field(default_factory=list)
    ema: float = math.nan

    def update(self, value: float) -> float | None:
        """Feed a value; return short-EMA / baseline once the baseline is complete."""
        if not math.isfinite(value):
            return None
        if len(self._first) < self.size:
            self._first.append(value)
            return None
        alpha = 2.0 / (self.span + 1)
        self.ema = value if math.isnan(self.ema) else self.ema + alpha * (value - self.ema)
        base = statistics.fmean(self._first)
        return self.ema / base if abs(base) > 1e-12 else None


class ValueDetector(MetricSetDetector):
    """Scores the value itself (KL, frac_reward_zero_std, clip fraction)."""

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """The value is the score."""
        return [Score(self.name, self.alert_type, metric, step, value, self.describe)]


class RatioToBaselineDetector(MetricSetDetector):
    """Scores short-EMA / mean of the first observations (entropy collapse, length blow-up)."""

    def __init__(self, name: str, alert_type: str, metrics: Iterable[str], describe: str) -> None:
        super().__init__(name, alert_type, metrics, describe)
        self._baselines: dict[str, Baseline] = {}

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Score once the baseline (first 10 steps) is known."""
        ratio = self._baselines.setdefault(metric, Baseline()).update(value)
        return [] if ratio is None else [Score(self.name, self.alert_type, metric, step, ratio,
                                               self.describe)]


class KLAccelerationDetector(StreamDetector):
    """KL EMA over 5 steps divided by its EMA over 50: a KL that suddenly multiplies."""

    name = "kl_acceleration"

    def __init__(self) -> None:
        self._state: dict[str, tuple[int, float, float]] = {}

    def watches(self, metric: str) -> bool:
        """KL metrics."""
        return metric in KL_METRICS

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Score after 20 steps of history."""
        if not math.isfinite(value):
            return []
        count, short, long = self._state.get(metric, (0, math.nan, math.nan))
        short = kernels.ema_update(short, value, 2.0 / 6)
        long = kernels.ema_update(long, value, 2.0 / 51)
        self._state[metric] = (count + 1, short, long)
        if count + 1 < 20 or long <= 1e-6:
            return []
        return [Score(self.name, "KL_ACCELERATING", metric, step, short / long,
                      "KL short/long EMA ratio")]


class SpikeDetector(MetricSetDetector):
    """Value divided by the median of the previous 50 values (gradient-norm spikes)."""

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Score once 10 earlier points exist."""
        previous = history(metric, 51)[:-1]
        previous = previous[np.isfinite(previous)]
        if previous.size < 10 or not math.isfinite(value):
            return []
        median = float(np.median(np.abs(previous)))
        if median <= 1e-12:
            return []
        return [Score(self.name, self.alert_type, metric, step, abs(value) / median, self.describe)]


class TrendDetector(StreamDetector):
    """How many standard deviations a loss rose over the last 50 steps (slope × span / std)."""

    name = "loss_rising"

    def watches(self, metric: str) -> bool:
        """Loss metrics."""
        return metric in LOSS_METRICS

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Score once 20 points exist."""
        window = history(metric, 50)
        window = window[np.isfinite(window)]
        if window.size < 20:
            return []
        out = np.empty(kernels.N_STATS)
        kernels.window_stats(window, np.arange(window.size, dtype=np.int64), out)
        std = out[kernels.STAT_STD]
        if not std > 1e-12:
            return []
        rise = out[kernels.STAT_SLOPE] * window.size / std
        return [Score(self.name, "LOSS_RISING", metric, step, float(rise), "loss rise in std units")]


class RewardAnomalyDetector(StreamDetector):
    """The GRPO seed's reward anomalies per reward series: OUTLIER, DROP, SPIKE, FLATLINE,
    NEGATIVE, each its own detector name so each has its own rule."""

    name = "reward_anomalies"

    def __init__(self, window: int = 100) -> None:
        self.window = window
        self._emas: dict[str, tuple[float, float]] = {}

    def watches(self, metric: str) -> bool:
        """Total and per-function rewards."""
        return is_reward(metric)

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Up to five scores a step (each once enough history exists)."""
        if not math.isfinite(value):
            return []
        short, long = self._emas.get(metric, (math.nan, math.nan))
        short = kernels.ema_update(short, value, 2.0 / 11)
        long = kernels.ema_update(long, value, 2.0 / 101)
        self._emas[metric] = (short, long)
        window = history(metric, self.window)
        window = window[np.isfinite(window)]
        if window.size < 10:
            return []
        fractions = np.empty(3)
        kernels.sign_fractions(window, fractions)
        scores = [Score("reward_flatline", "FLATLINE", metric, step, fractions[0], "fraction of zeros"),
                  Score("reward_negative", "NEGATIVE", metric, step, fractions[1],
                        "fraction negative")]
        scores += self._outlier(metric, step, value, window[:-1])
        if abs(long) > 1e-9 and window.size >= 20:
            scores.append(Score("reward_drop", "DROP", metric, step, (long - short) / abs(long),
                                "fall of the short EMA"))
            if long > 0 and short > 0:
                scores.append(Score("reward_spike", "SPIKE", metric, step, short / long,
                                    "short/long EMA ratio"))
        return scores

    @staticmethod
    def _outlier(metric: str, step: int, value: float, previous: np.ndarray) -> list[Score]:
        std = float(previous.std()) if previous.size else 0.0
        if previous.size < 10 or std <= 1e-12:
            return []
        z = abs(value - float(previous.mean())) / std
        return [Score("reward_outlier", "OUTLIER", metric, step, z, "distance from the mean in std")]


#: Points that count as "recent" in the reward-hacking comparison.
RECENT_STEPS = 10


class RewardHackingDetector(StreamDetector):
    """Reward rising while quality falls (the seed's ``reward_hack_threshold``).

    Over the last ``window_size`` steps, compare the mean of the last ``RECENT_STEPS`` points with
    the mean of the points before them; when the total reward rose, the score is the largest
    relative fall of a quality signal measured the same way: ``rewards/*`` components,
    ``quality/*`` metrics and the sample comparator's similarities.
    """

    name = "reward_hacking"

    def __init__(self, window_size: int = 50, quality: Callable[[], dict[str, np.ndarray]] | None = None):
        self.window_size = window_size
        self._quality = quality or (lambda: {})
        self.quality_metrics: set[str] = set()

    def watches(self, metric: str) -> bool:
        """The total reward (and it remembers component/quality series as they appear)."""
        if metric.startswith(REWARD_PREFIXES + QUALITY_PREFIXES):
            self.quality_metrics.add(metric)
        return metric in REWARD_METRICS

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Score once the window holds at least 10 steps."""
        reward = history(metric, self.window_size)
        if reward.size < 2 * RECENT_STEPS:
            return []
        gain = _relative_change(reward[:-RECENT_STEPS], reward[-RECENT_STEPS:])
        if not gain > 0:
            return [Score(self.name, "REWARD_HACKING", metric, step, 0.0, "quality fall while reward rises")]
        falls = [-_relative_change(s[:-RECENT_STEPS], s[-RECENT_STEPS:])
                 for s in self._quality_series(history)]
        worst = max((f for f in falls if math.isfinite(f)), default=0.0)
        return [Score(self.name, "REWARD_HACKING", metric, step, max(worst, 0.0),
                      "quality fall while reward rises")]

    def _quality_series(self, history: History) -> list[np.ndarray]:
        series = [history(name, self.window_size) for name in sorted(self.quality_metrics)]
        series += [s[-self.window_size:] for s in self._quality().values()]
        return [s for s in series if s.size >= 2 * RECENT_STEPS]


def _relative_change(before: np.ndarray, after: np.ndarray) -> float:
    before, after = before[np.isfinite(before)], after[np.isfinite(after)]
    if not before.size or not after.size:
        return math.nan
    first, second = float(before.mean()), float(after.mean())
    scale = max(abs(first), 1e-9)
    return (second - first) / scale
