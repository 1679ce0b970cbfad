"""Detectors: they turn the metric streams into scores; :mod:`collector.rules` decides.

Each stream detector watches some metric names and scores each block of newly completed
cross-rank steps of them at once (:meth:`StreamDetector.score`, a Numba scan from
:mod:`collector.kernels` over the stored tail of the series); the rank detectors score the rank
table on every tick; :class:`SampleComparator` scores text samples against the first ones seen
for the same prompts. What each score means, and its default rule, is in ``docs/detectors.md``.
No sockets, and the clock is an argument.
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
from collector.rules import Score, ScoreSeries

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

def emitted_series(detector: str, alert_type: str, metric: str, steps: np.ndarray,
                   out: np.ndarray, emitted: np.ndarray, describe: str) -> list[ScoreSeries]:
    """A scan's scores at the steps where it emitted one, as one series (none when it emitted
    nothing)."""
    if not emitted.any():
        return []
    return [ScoreSeries(detector, alert_type, metric, steps[emitted], out[emitted], describe)]


def _tail_ending_with(tail: Tail, metric: str, n: int, values: np.ndarray) -> np.ndarray:
    """The stored tail of ``metric`` (at most ``n`` points), which ends with the block being
    scored; the block alone when the store holds fewer points than the block (a block longer
    than the ring), so a scan never indexes before the start of its array."""
    _, ext = tail(metric, n)
    return ext if ext.size >= values.size else values


def is_reward(metric: str) -> bool:
    """True for a total reward or a per-reward-function series (``rewards/<name>``)."""
    return metric in REWARD_METRICS or metric.startswith(REWARD_PREFIXES)


Tail = Callable[[str, int], tuple[np.ndarray, np.ndarray]]
"""``tail(metric, n)``: ``(steps, values)`` of the last ``n`` stored cross-rank points of
``metric``, oldest first (fewer when the series holds fewer; empty for an unknown metric)."""


class StreamDetector:
    """Base of the detectors that score completed cross-rank steps, a block at a time.

    :meth:`score` gets the steps and values of one metric's newly completed block, already stored,
    so ``tail(metric, n)`` ends with them. It returns one :class:`ScoreSeries` per kind of score,
    holding only the steps that have a score (too little history, or a non-finite value, gives
    none). Scoring a run in blocks of any size gives the same scores as step by step
    (``tests/unit/test_detector_blocks.py`` checks it against the per-step references).
    """

    name = ""

    def watches(self, metric: str) -> bool:
        """True when this detector scores ``metric``."""
        raise NotImplementedError

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """Score one block of completed steps of ``metric`` (int64 ``steps``, float64 ``values``)."""
        raise NotImplementedError


class MetricSetDetector(StreamDetector):
    """A detector of a fixed set of metric names, configured with its rule key (``name``), the
    alert type it raises and a short phrase describing its score."""

    def __init__(self, name: str, alert_type: str, metrics: Iterable[str], describe: str) -> None:
        self.name, self.alert_type, self.metrics, self.describe = name, alert_type, set(metrics), describe

    def watches(self, metric: str) -> bool:
        """True for the configured metric names."""
        return metric in self.metrics

    def _series(self, metric: str, steps: np.ndarray, out: np.ndarray, emitted: np.ndarray) -> list[ScoreSeries]:
        """The emitted scores as one series (none when nothing was emitted)."""
        return emitted_series(self.name, self.alert_type, metric, steps, out, emitted, self.describe)


class ValueDetector(MetricSetDetector):
    """Scores the value itself (KL, frac_reward_zero_std, clip fraction)."""

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """The values are the scores."""
        return [ScoreSeries(self.name, self.alert_type, metric, steps, values, self.describe)]


#: Finite values that make the baseline of :class:`RatioToBaselineDetector`.
BASELINE_SIZE = 10
#: Span of the short EMA compared with the baseline.
BASELINE_EMA_SPAN = 5


class RatioToBaselineDetector(MetricSetDetector):
    """Scores short EMA / mean of the first ``BASELINE_SIZE`` finite values (entropy collapse,
    length blow-up)."""

    def __init__(self, name: str, alert_type: str, metrics: Iterable[str], describe: str) -> None:
        super().__init__(name, alert_type, metrics, describe)
        self._state: dict[str, np.ndarray] = {}

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """Scores once the baseline is known."""
        state = self._state.setdefault(metric, np.array([0.0, 0.0, math.nan]))
        out, emitted = np.empty(values.size), np.empty(values.size, np.bool_)
        kernels.baseline_ratio_scan(values, state, BASELINE_SIZE, 2.0 / (BASELINE_EMA_SPAN + 1),
                                    out, emitted)
        return self._series(metric, steps, out, emitted)


class KLAccelerationDetector(StreamDetector):
    """KL EMA over 5 steps divided by its EMA over 50: a KL that suddenly multiplies."""

    name = "kl_acceleration"

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] = {}

    def watches(self, metric: str) -> bool:
        """KL metrics."""
        return metric in KL_METRICS

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """Scores after 20 finite values, while the long EMA is above 1e-6."""
        state = self._state.setdefault(metric, np.array([0.0, math.nan, math.nan]))
        out, emitted = np.empty(values.size), np.empty(values.size, np.bool_)
        kernels.ema_ratio_scan(values, state, 2.0 / 6, 2.0 / 51, 20, 1e-6, out, emitted)
        return emitted_series(self.name, "KL_ACCELERATING", metric, steps, out, emitted,
                              "KL short/long EMA ratio")


class SpikeDetector(MetricSetDetector):
    """Value divided by the median of the previous 50 values (gradient-norm spikes)."""

    lookback = 50

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """Scores once 10 earlier finite values exist."""
        ext = _tail_ending_with(tail, metric, self.lookback + values.size, values)
        out, emitted = np.empty(values.size), np.empty(values.size, np.bool_)
        kernels.median_ratio_scan(ext, values.size, self.lookback, 10, out, emitted)
        return self._series(metric, steps, out, emitted)


class TrendDetector(StreamDetector):
    """How many standard deviations a loss rose over the last 50 steps (slope × span / std)."""

    name = "loss_rising"
    window = 50

    def watches(self, metric: str) -> bool:
        """Loss metrics."""
        return metric in LOSS_METRICS

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """Scores once the window holds 20 finite values."""
        ext = _tail_ending_with(tail, metric, self.window - 1 + values.size, values)
        out, emitted = np.empty(values.size), np.empty(values.size, np.bool_)
        kernels.trend_scan(ext, values.size, self.window, 20, out, emitted)
        return emitted_series(self.name, "LOSS_RISING", metric, steps, out, emitted,
                              "loss rise in std units")


#: The reward anomaly scores: (rule key, alert type, description) per kernel output column.
REWARD_SCORES = {
    kernels.REWARD_FLATLINE: ("reward_flatline", "FLATLINE", "fraction of zeros"),
    kernels.REWARD_NEGATIVE: ("reward_negative", "NEGATIVE", "fraction negative"),
    kernels.REWARD_OUTLIER: ("reward_outlier", "OUTLIER", "distance from the mean in std"),
    kernels.REWARD_DROP: ("reward_drop", "DROP", "fall of the short EMA"),
    kernels.REWARD_SPIKE: ("reward_spike", "SPIKE", "short/long EMA ratio"),
}


class RewardAnomalyDetector(StreamDetector):
    """The GRPO seed's reward anomalies per reward series: OUTLIER, DROP, SPIKE, FLATLINE,
    NEGATIVE, each its own detector name so each has its own rule (see
    :func:`collector.kernels.reward_anomaly_scan`; EMAs over 10 and 100 steps)."""

    name = "reward_anomalies"

    def __init__(self, window: int = 100) -> None:
        self.window = window
        self._emas: dict[str, np.ndarray] = {}

    def watches(self, metric: str) -> bool:
        """Total and per-function rewards."""
        return is_reward(metric)

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """Up to five score series (each once enough history exists)."""
        ext = _tail_ending_with(tail, metric, self.window - 1 + values.size, values)
        state = self._emas.setdefault(metric, np.array([math.nan, math.nan]))
        shape = (values.size, kernels.N_REWARD_SCORES)
        out, emitted = np.empty(shape), np.empty(shape, np.bool_)
        kernels.reward_anomaly_scan(ext, values.size, state, self.window, 2.0 / 11, 2.0 / 101,
                                    out, emitted)
        return [series for column, (name, alert_type, describe) in REWARD_SCORES.items()
                for series in emitted_series(name, alert_type, metric, steps, out[:, column],
                                             emitted[:, column], describe)]


#: Points that count as "recent" in the reward-hacking comparison.
RECENT_STEPS = 10


class RewardHackingDetector(StreamDetector):
    """Reward rising while quality falls (the seed's ``reward_hack_threshold``).

    Over the last ``window_size`` steps, compare the mean of the last ``RECENT_STEPS`` points with
    the mean of the points before them; when the total reward rose, the score is the largest
    relative fall of a quality signal measured the same way over its own points at or before the
    step: ``rewards/*`` components, ``quality/*`` metrics, and the sample comparator's
    similarities (all of them so far: they are not tied to steps).
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

    def score(self, metric: str, steps: np.ndarray, values: np.ndarray, tail: Tail) -> list[ScoreSeries]:
        """Scores once the window holds ``2 * RECENT_STEPS`` steps."""
        k = values.size
        ext = _tail_ending_with(tail, metric, self.window_size - 1 + k, values)
        ends = np.arange(ext.size - k + 1, ext.size + 1, dtype=np.int64)
        gain, emitted = self._changes(ext, ends)
        if not emitted.any():
            return []
        worst = np.zeros(k)
        for fall in self._quality_falls(steps, tail):
            np.fmax(worst, fall, out=worst)
        scores = np.where(gain > 0, worst, 0.0)
        return emitted_series(self.name, "REWARD_HACKING", metric, steps, scores, emitted,
                              "quality fall while reward rises")

    def _changes(self, values: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, emitted = np.full(ends.size, np.nan), np.empty(ends.size, np.bool_)
        kernels.split_change_scan(values, ends, self.window_size, RECENT_STEPS, out, emitted)
        return out, emitted

    def _quality_falls(self, steps: np.ndarray, tail: Tail) -> list[np.ndarray]:
        """Per quality signal, its relative fall at each block step (NaN where unknown)."""
        falls = []
        reach = 4 * (self.window_size + steps.size)
        for name in sorted(self.quality_metrics):
            q_steps, q_values = tail(name, reach)
            change, emitted = self._changes(q_values, np.searchsorted(q_steps, steps, "right"))
            falls.append(np.where(emitted, -change, np.nan))
        for similarities in self._quality().values():
            if similarities.size >= 2 * RECENT_STEPS:
                change, _ = self._changes(similarities, np.array([similarities.size], np.int64))
                falls.append(np.full(steps.size, -change[0]))
        return falls


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
