"""The seeds' API (``TrainingMonitor`` and friends, the GRPO reward monitoring), on rlmon.

Events go to the collector (the embedded one in a single script); the analyzers' query methods
answer from the collector's state through ``Monitor.query``; ``should_stop_early()`` reflects the
coordinated stop. Custom callbacks run in the training process. See ``docs/seeds.md``.
"""

from rlmon.seed.analyzers import PPOMetricsTracker, QualityAlert, QualityAnalyzer, SampleComparator
from rlmon.seed.events import TrainingCallback, TrainingEvent, TrainingPhase, VerbosityLevel
from rlmon.seed.grpo import (GRPOMonitoringIntegration, RewardMetricsLogger, RewardMonitor,
                             setup_grpo_monitoring)
from rlmon.seed.monitor import MetricsStore, TrainingMonitor
from rlmon.seed.outputs import PlotManager, ReportGenerator
from rlmon.seed.reward_visualizer import RewardVisualizer

__all__ = ["TrainingMonitor", "TrainingEvent", "TrainingPhase", "TrainingCallback",
           "VerbosityLevel", "MetricsStore", "SampleComparator", "QualityAnalyzer", "QualityAlert",
           "PPOMetricsTracker", "PlotManager", "ReportGenerator", "setup_grpo_monitoring",
           "GRPOMonitoringIntegration", "RewardMonitor", "RewardMetricsLogger", "RewardVisualizer"]
