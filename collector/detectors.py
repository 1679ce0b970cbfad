"""Detectors: they turn the metric streams into scores; :mod:`collector.rules` decides.

Each stream detector watches some metric names and scores every completed cross-rank step of
them (:meth:`StreamDetector.observe`); the rank detectors score the rank table on every tick;
:class:`SampleComparator` scores text samples against the first ones seen for the same prompts.
What each score means, and its default rule, is in ``docs/detectors.md``. Detectors are plain
Python over windows the store already holds (the window statistics themselves are Numba kernels);
no sockets, and the clock is an argument.
"""

from __future__ import annotations

import difflib
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from collector import kernels
from collector.rules import Score

#: Metric names per signal: TRL, OpenRLHF, verl and the seeds' spellings.
KL_METRICS = ("kl", "kl_div", "kl_divergence", "objective/kl", "train/kl", "actor/kl", "policy/kl",
              "ppo/mean_kl", "actor/ppo_kl")
ENTROPY_METRICS = ("entropy", "policy/entropy", "actor/entropy", "objective/entropy")
ZERO_STD_METRICS = ("frac_reward_zero_std",)
LENGTH_METRICS = ("response_length", "completion_length", "completions/mean_length",
                  "response_length/mean", "tokens/responses_len_mean")
CLIP_METRICS = ("clip_fraction", "clipfrac", "policy/clipfrac", "actor/pg_clipfrac",
                "clip_ratio", "objective/clipfrac")
GRAD_METRICS = ("grad_norm", "actor/grad_norm", "policy/grad_norm")
LOSS_METRICS = ("loss", "policy_loss", "value_loss", "pg_loss", "vf_loss", "actor/pg_loss",
                "critic/vf_loss")
REWARD_PREFIXES = ("rewards/",)
REWARD_METRICS = ("reward", "rewards", "train/reward", "objective/scores", "critic/score/mean")
QUALITY_PREFIXES = ("quality/",)

History = Callable[[str, int], np.ndarray]
"""``history(metric, n)``: the last ``n`` completed cross-rank means of ``metric``, oldest first."""


def is_reward(metric: str) -> bool:
    """True for a total reward or a per-reward-function series (``rewards/<name>``)."""
    return metric in REWARD_METRICS or metric.startswith(REWARD_PREFIXES)


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


class StreamDetector:
    """Base of the detectors that score completed steps of some metrics."""

    name = ""

    def watches(self, metric: str) -> bool:
        """True when this detector scores ``metric``."""
        raise NotImplementedError

    def observe(self, metric: str, step: int, value: float, history: History) -> list[Score]:
        """Score one completed cross-rank step."""
        raise NotImplementedError


class MetricSetDetector(StreamDetector):
    """A detector of a fixed set of metric names, configured with its rule key (``name``), the
    alert type it raises and a short phrase describing its score."""

    def __init__(self, name: str, alert_type: str, metrics: Iterable[str], describe: str) -> None:
        self.name, self.alert_type, self.metrics, self.describe = name, alert_type, set(metrics), describe

    def watches(self, metric: str) -> bool:
        """True for the configured metric names."""
        return metric in self.metrics


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
        series += list(self._quality().values())
        return [s for s in series if s.size >= 2 * RECENT_STEPS]


def _relative_change(before: np.ndarray, after: np.ndarray) -> float:
    before, after = before[np.isfinite(before)], after[np.isfinite(after)]
    if not before.size or not after.size:
        return math.nan
    first, second = float(before.mean()), float(after.mean())
    scale = max(abs(first), 1e-9)
    return (second - first) / scale


def default_stream_detectors(window_size: int = 50,
                             quality: Callable[[], dict[str, np.ndarray]] | None = None
                             ) -> list[StreamDetector]:
    """Every built-in stream detector."""
    return [
        ValueDetector("kl", "KL_HIGH", KL_METRICS, "KL divergence"),
        KLAccelerationDetector(),
        RewardHackingDetector(window_size, quality),
        RatioToBaselineDetector("entropy_collapse", "ENTROPY_COLLAPSE", ENTROPY_METRICS,
                                "entropy relative to its start"),
        ValueDetector("zero_std_groups", "ZERO_STD_GROUPS", ZERO_STD_METRICS,
                      "fraction of reward groups with zero std"),
        RatioToBaselineDetector("length_blowup", "LENGTH_BLOWUP", LENGTH_METRICS,
                                "response length relative to its start"),
        ValueDetector("clip_fraction", "CLIP_FRACTION_HIGH", CLIP_METRICS, "clip fraction"),
        SpikeDetector("grad_norm_spike", "GRAD_NORM_SPIKE", GRAD_METRICS,
                      "gradient norm relative to its median"),
        TrendDetector(),
        RewardAnomalyDetector(),
    ]


# -- samples ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class SampleComparator:
    """The seed's forgetting probe: the first response seen for each of the first ``sample_size``
    prompts is the baseline; every ``comparison_frequency`` steps, later responses to the same
    prompts are compared with it (``difflib`` ratio); below ``degradation_threshold`` is degraded."""

    sample_size: int = 10
    comparison_frequency: int = 5
    degradation_threshold: float = 0.7
    baseline: dict[str, str] = field(default_factory=dict)
    similarities: deque = field(default_factory=lambda: deque(maxlen=10_000))
    degraded_count: int = 0
    _last_compared_step: int = -(10**18)

    def compute_diff(self, original: str, updated: str) -> dict[str, object]:
        """The seed's diff of two responses: similarity ratio, lengths, and whether degraded."""
        similarity = difflib.SequenceMatcher(None, original, updated).ratio()
        return {"similarity": similarity, "original_length": len(original),
                "updated_length": len(updated), "length_change": len(updated) - len(original),
                "degraded": similarity < self.degradation_threshold}

    def observe(self, step: int, prompts: list[str], responses: list[str]) -> list[Score]:
        """Record baselines; on comparison steps, score the mean similarity to them."""
        compared = []
        due = (step == self._last_compared_step
               or step - self._last_compared_step >= self.comparison_frequency)
        for prompt, response in zip(prompts, responses):
            if prompt not in self.baseline:
                if len(self.baseline) < self.sample_size:
                    self.baseline[prompt] = response
            elif due:
                compared.append(self.compute_diff(self.baseline[prompt], response)["similarity"])
        if not compared:
            return []
        self._last_compared_step = step
        self.similarities.extend(compared)
        self.degraded_count += sum(s < self.degradation_threshold for s in compared)
        return [Score("forgetting", "FORGETTING", "baseline samples", step,
                      statistics.fmean(compared), "similarity to baseline responses")]

    def detect_catastrophic_forgetting(self) -> bool:
        """True when the mean similarity of the last 10 comparisons is below the threshold."""
        recent = list(self.similarities)[-10:]
        return bool(recent) and statistics.fmean(recent) < self.degradation_threshold

    def get_comparison_summary(self) -> dict[str, object]:
        """The seed's summary: num_comparisons, avg_similarity, degraded_count,
        catastrophic_forgetting."""
        count = len(self.similarities)
        return {"num_comparisons": count,
                "avg_similarity": statistics.fmean(self.similarities) if count else None,
                "degraded_count": self.degraded_count,
                "catastrophic_forgetting": self.detect_catastrophic_forgetting()}

    def similarity_series(self) -> np.ndarray:
        """Every similarity so far, oldest first (a quality signal for reward hacking)."""
        return np.fromiter(self.similarities, dtype=np.float64, count=len(self.similarities))


# -- ranks -----------------------------------------------------------------------------------------

@dataclass(slots=True)
class RankWatch:
    """What the rank scores remember between ticks: the step each rank was last seen advancing
    (and when, on the collector's clock) and the drops already reported."""

    progress: dict[int, tuple[int, float]] = field(default_factory=dict)
    dropped: dict[int, int] = field(default_factory=dict)


def rank_scores(ranks, now: float, span_seconds: dict[int, float], watch: RankWatch) -> list[Score]:
    """Scores of every rank: seconds silent, seconds without a new step, events newly dropped,
    and how many times slower than the other ranks its timed phases (``span/*``) run."""
    scores: list[Score] = []
    live = [info for info in ranks.ranks.values() if not info.closed]
    for info in live:
        subject = f"rank {info.rank}"
        scores.append(Score("rank_silent", "RANK_SILENT", subject, info.last_step,
                            now - info.last_seen, "seconds since last heard", info.rank))
        step, since = watch.progress.get(info.rank, (None, now))
        if step != info.last_step:
            step, since = info.last_step, now
            watch.progress[info.rank] = (step, since)
        scores.append(Score("rank_stuck", "RANK_STUCK", subject, info.last_step, now - since,
                            "seconds without a new step", info.rank))
    for info in ranks.ranks.values():
        dropped = sum(info.ledger_dropped.values())
        new = dropped - watch.dropped.get(info.rank, 0)
        watch.dropped[info.rank] = dropped
        scores.append(Score("events_dropped", "EVENTS_DROPPED", f"rank {info.rank}", info.last_step,
                            float(max(new, 0)), "events dropped since the last check", info.rank))
    scores += _straggler_scores({i.rank: span_seconds.get(i.rank, 0.0) for i in live}, ranks)
    return scores


def _straggler_scores(busy: dict[int, float], ranks) -> list[Score]:
    """Each rank's phase time over the median of the others' (needs ``span/*`` metrics)."""
    busy = {rank: seconds for rank, seconds in busy.items() if seconds > 0}
    if len(busy) < 2:
        return []
    scores = []
    for rank, seconds in busy.items():
        others = statistics.median(s for r, s in busy.items() if r != rank)
        if others > 0:
            scores.append(Score("straggler", "STRAGGLER", f"rank {rank}", ranks.ranks[rank].last_step,
                                seconds / others, "step phases slower than the other ranks", rank))
    return scores
