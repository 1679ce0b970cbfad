"""The seed's analyzers as views of the collector: their detectors run there, not here.

``SampleComparator``, ``QualityAnalyzer`` and ``PPOMetricsTracker`` carry the seed's settings,
which become the embedded collector's flags when bound to a ``TrainingMonitor`` before it starts
(``register_callback``, or ``QualityAnalyzer(monitor=...)``). Their ``on_event`` does nothing in
this process; their methods ask the collector.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlmon.seed.events import TrainingEvent, VerbosityLevel

if TYPE_CHECKING:
    from rlmon.seed.monitor import TrainingMonitor


class _CollectorView:
    """Shared plumbing: the monitor this analyzer is bound to and its collector flags."""

    _monitor: TrainingMonitor | None = None

    def on_event(self, event: TrainingEvent) -> None:
        """Nothing to do here: the collector analyzes the events the monitor sends."""

    def _bind(self, monitor: TrainingMonitor) -> None:
        self._monitor = monitor
        monitor.configure_collector(self._collector_settings())

    def _collector_settings(self) -> dict[str, Any]:
        return {}

    def _ask(self, question: str, **args: Any) -> dict[str, Any] | None:
        return None if self._monitor is None else self._monitor.query(question, **args)


class SampleComparator(_CollectorView):
    """The forgetting probe: the first response to each of the first ``sample_size`` prompts is the
    baseline; every ``comparison_frequency`` iterations later responses are compared with it, and a
    similarity below ``degradation_threshold`` counts as degraded. Prompts and responses come from
    RESPONSE_GENERATED events' ``prompts``/``responses`` metadata."""

    def __init__(self, sample_size: int = 10, comparison_frequency: int = 5,
                 degradation_threshold: float = 0.7) -> None:
        if sample_size < 1 or comparison_frequency < 1 or not 0 < degradation_threshold <= 1:
            raise ValueError("sample_size and comparison_frequency must be >= 1, "
                             "degradation_threshold in (0, 1]")
        self.sample_size = sample_size
        self.comparison_frequency = comparison_frequency
        self.degradation_threshold = degradation_threshold

    def _collector_settings(self) -> dict[str, Any]:
        return {"--sample-size": self.sample_size,
                "--comparison-frequency": self.comparison_frequency,
                "--degradation-threshold": self.degradation_threshold}

    def compute_diff(self, original: str, updated: str) -> dict[str, Any]:
        """Similarity (difflib ratio, 0..1), both lengths, the length change, and ``degraded``.
        Computed here, locally (the collector uses the same formula)."""
        similarity = difflib.SequenceMatcher(None, original, updated).ratio()
        return {"similarity": similarity, "original_length": len(original),
                "updated_length": len(updated), "length_change": len(updated) - len(original),
                "degraded": similarity < self.degradation_threshold}

    def get_comparison_summary(self) -> dict[str, Any]:
        """``num_comparisons``, ``avg_similarity`` (None before any), ``degraded_count`` and
        ``catastrophic_forgetting``, from the collector."""
        result = self._ask("comparisons") or {}
        return {"num_comparisons": result.get("num_comparisons", 0),
                "avg_similarity": result.get("avg_similarity"),
                "degraded_count": result.get("degraded_count", 0),
                "catastrophic_forgetting": bool(result.get("catastrophic_forgetting", False))}

    def detect_catastrophic_forgetting(self) -> bool:
        """True when the recent comparisons' mean similarity is below the threshold."""
        return self.get_comparison_summary()["catastrophic_forgetting"]


@dataclass(frozen=True, slots=True)
class QualityAlert:
    """One alert as the seed shows it: iteration (step), severity, reason, metric and value."""

    iteration: int
    severity: str
    reason: str
    metric_name: str
    metric_value: float
    alert_type: str = ""
    threshold: float = math.nan
    timestamp: float = 0.0


class QualityAnalyzer(_CollectorView):
    """KL divergence (warning above ``kl_threshold``, critical and a coordinated stop above twice
    it), reward hacking (reward rising while quality falls, ``reward_hack_threshold``, over
    ``window_size`` iterations) and forgetting (via ``comparator``'s settings): all detected in the
    collector. Binds to ``monitor`` at construction."""

    def __init__(self, monitor: TrainingMonitor, comparator: SampleComparator | None = None,
                 kl_threshold: float = 0.1, reward_hack_threshold: float = 0.3,
                 window_size: int = 50) -> None:
        if not kl_threshold > 0 or not reward_hack_threshold > 0 or window_size < 2:
            raise ValueError("thresholds must be > 0 and window_size >= 2")
        self.monitor = monitor
        self.comparator = comparator
        self.kl_threshold = kl_threshold
        self.reward_hack_threshold = reward_hack_threshold
        self.window_size = window_size
        self._bind(monitor)
        if comparator is not None:
            comparator._bind(monitor)

    def _collector_settings(self) -> dict[str, Any]:
        return {"--kl-threshold": self.kl_threshold,
                "--reward-hack-threshold": self.reward_hack_threshold,
                "--window-size": self.window_size}

    def get_alert_summary(self) -> dict[str, Any]:
        """``total_alerts``, ``critical_count``, ``warning_count``, ``info_count`` and
        ``by_severity``, over every alert the collector raised."""
        result = self._ask("alerts", n=0) or {}
        counts = result.get("counts", {})
        return {"total_alerts": result.get("total", 0),
                "critical_count": counts.get("CRITICAL", 0),
                "warning_count": counts.get("WARNING", 0), "info_count": counts.get("INFO", 0),
                "by_severity": dict(counts)}

    def get_recent_alerts(self, n: int = 10) -> list[QualityAlert]:
        """The ``n`` most recent alerts, oldest first."""
        result = self._ask("alerts", n=int(n)) or {}
        return [QualityAlert(a["step"], a["severity"], a["message"], a["metric"], a["value"],
                             a["type"], a["threshold"], a["time"])
                for a in result.get("recent", [])]


class PPOMetricsTracker(_CollectorView):
    """PPO mechanics from the metrics the trainer sends: ``clip_fraction``, ``advantage_mean``
    (and ``advantage_std``), ``policy_loss``, ``value_loss``, ``grad_norm``. As in the seed it is
    active only in VERBOSE mode: with SIMPLE its figures are empty."""

    def __init__(self, verbosity: VerbosityLevel = VerbosityLevel.VERBOSE) -> None:
        self.verbosity = verbosity

    def _figures(self) -> dict[str, Any]:
        if self.verbosity is not VerbosityLevel.VERBOSE:
            return {}
        return self._ask("ppo") or {}

    def get_ppo_summary(self) -> dict[str, Any]:
        """``avg_clip_fraction``, ``num_policy_updates``, both loss trends, and the clip
        fraction, advantage and gradient-norm statistics."""
        figures = self._figures()
        return {"avg_clip_fraction": figures.get("avg_clip_fraction", 0.0),
                "num_policy_updates": figures.get("num_policy_updates", 0),
                "policy_loss_trend": figures.get("policy_loss_trend"),
                "value_loss_trend": figures.get("value_loss_trend"),
                "clip_fraction_stats": _basic(figures.get("clip_fraction")),
                "advantage_stats": _basic(figures.get("advantage")),
                "grad_norm_stats": _basic(figures.get("grad_norm"))}

    def get_policy_loss_trend(self) -> float | None:
        """Slope of the policy loss per iteration (negative: improving); None with < 2 points."""
        return self._figures().get("policy_loss_trend")

    def get_value_loss_trend(self) -> float | None:
        """Slope of the value loss per iteration; None with < 2 points."""
        return self._figures().get("value_loss_trend")

    def get_clip_fraction_stats(self) -> dict[str, float]:
        """``mean``, ``std``, ``min``, ``max`` and ``count`` of the clip fraction."""
        return _basic(self._figures().get("clip_fraction"))

    def get_advantage_stats(self) -> dict[str, float]:
        """``mean``, ``std``, ``min``, ``max`` and ``count`` of the mean advantage."""
        return _basic(self._figures().get("advantage"))


def _basic(stats: dict[str, Any] | None) -> dict[str, float]:
    if not stats:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "count": 0}
    return {key: stats[key] for key in ("mean", "std", "min", "max", "count")}
