"""The training-monitoring guide's examples, with only their imports changed
(``src.training.monitoring`` → ``rlmon``) and its PPOTrainer replaced by the tiny one in conftest."""

from __future__ import annotations

import json
from pathlib import Path

from tests.seeds.conftest import PPOTrainer, PROMPTS, TinyPPOTrainer

prompts = PROMPTS


def test_minimal_example():
    """Basic Usage / Minimal Example (and Example 1): the reports land in ./outputs."""
    from rlmon import TrainingMonitor

    monitor = TrainingMonitor(output_dir="./outputs")
    trainer = PPOTrainer(monitor=monitor)
    with monitor.monitor_context():
        results = trainer.train(prompts, num_steps=20)
    assert results["steps"] == 20
    report = json.loads(Path("outputs/training_report.json").read_text())
    assert report["summary"]["total_iterations"] >= 20
    assert Path("outputs/training_report.md").exists()


def test_quality_tracking_then_generate_reports():
    """With Quality Tracking followed by Generate Reports: plots and reports are (re)written."""
    from rlmon import (
        TrainingMonitor,
        SampleComparator,
        QualityAnalyzer,
        VerbosityLevel
    )
    from rlmon import PlotManager, ReportGenerator

    monitor = TrainingMonitor(output_dir="./outputs", verbosity=VerbosityLevel.SIMPLE)
    comparator = SampleComparator(sample_size=10, comparison_frequency=5, degradation_threshold=0.7)
    analyzer = QualityAnalyzer(monitor=monitor, comparator=comparator, kl_threshold=0.1,
                               reward_hack_threshold=0.3)
    monitor.register_callback(comparator)
    monitor.register_callback(analyzer)
    trainer = PPOTrainer(monitor=monitor)
    with monitor.monitor_context():
        results = trainer.train(prompts, num_steps=30)

    plot_manager = PlotManager(output_dir="./outputs")
    plot_manager.create_all_plots(metrics_store=monitor.get_metrics_store(), comparator=comparator,
                                  analyzer=analyzer)
    report_gen = ReportGenerator(output_dir="./outputs")
    report_gen.generate_all_reports(monitor=monitor, comparator=comparator, analyzer=analyzer)
    print("✅ Reports saved to ./outputs/")
    for name in ("training_report.md", "training_report.json", "loss_curves.png", "rewards.png",
                 "kl_divergence.png"):
        assert Path("outputs", name).stat().st_size > 0
    assert results["steps"] == 30


def test_ppo_mechanics_tracking(capsys):
    """Advanced 1: PPOMetricsTracker summary and loss trend after training."""
    from rlmon import PPOMetricsTracker, VerbosityLevel
    from rlmon import TrainingMonitor

    monitor = TrainingMonitor(output_dir="./outputs", verbosity=VerbosityLevel.VERBOSE)
    ppo_tracker = PPOMetricsTracker(verbosity=VerbosityLevel.VERBOSE)
    monitor.register_callback(ppo_tracker)
    trainer = PPOTrainer(monitor=monitor)
    with monitor.monitor_context():
        trainer.train(prompts, num_steps=15)

    ppo_summary = ppo_tracker.get_ppo_summary()
    print(f"Avg Clip Fraction: {ppo_summary['avg_clip_fraction']:.4f}")
    print(f"Policy Updates: {ppo_summary['num_policy_updates']}")
    policy_trend = ppo_tracker.get_policy_loss_trend()
    if policy_trend < 0:
        print("✅ Policy loss improving!")
    assert ppo_summary["num_policy_updates"] == 15
    assert "Policy Updates: 15" in capsys.readouterr().out


def test_early_stopping(capsys):
    """Advanced 2 (and Example 2): KL above 2x the threshold stops training at a coordinated step."""
    from rlmon import QualityAnalyzer, TrainingMonitor

    monitor = TrainingMonitor(output_dir="./outputs")
    analyzer = QualityAnalyzer(
        monitor=monitor,
        kl_threshold=0.1  # Will trigger early stop if KL > 0.2 (2x threshold)
    )
    monitor.register_callback(analyzer)
    trainer = TinyPPOTrainer(monitor=monitor, kl_blowup_at=5)
    with monitor.monitor_context():
        results = trainer.train(prompts, num_steps=5000)

    should_stop, reason = monitor.should_stop_early()
    if should_stop:
        print(f"⚠️  Training stopped early: {reason}")
    assert should_stop and "KL" in reason
    assert 5 < results["steps"] < 5000
    assert analyzer.get_alert_summary()["critical_count"] >= 1


def test_custom_callbacks(capsys):
    """Advanced 3 and Example 4: custom callbacks run in the training process on every event."""
    from rlmon import TrainingCallback, TrainingEvent, TrainingPhase
    from rlmon import TrainingMonitor

    class MyCustomCallback:
        """Custom callback example."""

        def on_event(self, event: TrainingEvent) -> None:
            if event.phase == TrainingPhase.ITERATION_END:
                reward = event.get_metric('reward', 0.0)
                if reward > 0.0:
                    print(f"🎉 High reward at iteration {event.iteration}: {reward:.4f}")

    class RewardLogger(TrainingCallback):
        """Log high rewards to a file."""

        def __init__(self, threshold: float = 0.8):
            self.threshold = threshold
            self.high_rewards = []

        def on_event(self, event: TrainingEvent) -> None:
            if event.phase == TrainingPhase.REWARD_COMPUTED:
                reward = event.get_metric('reward', 0.0)
                if reward > self.threshold:
                    self.high_rewards.append((event.iteration, reward))

    monitor = TrainingMonitor(output_dir="./outputs")
    monitor.register_callback(MyCustomCallback())
    logger = RewardLogger(threshold=0.5)
    monitor.register_callback(logger)
    trainer = PPOTrainer(monitor=monitor)
    with monitor.monitor_context():
        trainer.train(prompts, num_steps=10)
    assert "High reward at iteration" in capsys.readouterr().out
    assert logger.high_rewards


def test_catastrophic_forgetting_and_selective_plots():
    """Advanced 4 and 5: the comparator's summary, then individual plots and close_all."""
    from rlmon import PlotManager, SampleComparator, TrainingMonitor

    monitor = TrainingMonitor(output_dir="./outputs")
    comparator = SampleComparator(sample_size=20, comparison_frequency=3, degradation_threshold=0.75)
    monitor.register_callback(comparator)
    trainer = PPOTrainer(monitor=monitor)
    with monitor.monitor_context():
        trainer.train(prompts, num_steps=12)

    if comparator.detect_catastrophic_forgetting():
        print("⚠️  CATASTROPHIC FORGETTING DETECTED!")
        summary = comparator.get_comparison_summary()
        print(f"Degraded samples: {summary['degraded_count']}/{summary['num_comparisons']}")
        print(f"Avg similarity: {summary['avg_similarity']:.4f}")
    assert comparator.get_comparison_summary()["num_comparisons"] > 0

    plot_manager = PlotManager(output_dir="./plots")
    plot_manager.create_loss_plot(monitor.get_metrics_store())
    plot_manager.create_reward_plot(monitor.get_metrics_store())
    plot_manager.create_kl_plot(monitor.get_metrics_store(), kl_threshold=0.1)
    plot_manager.close_all()
    assert {p.name for p in Path("plots").iterdir()} == {"loss_curves.png", "rewards.png",
                                                         "kl_divergence.png"}


def test_metrics_access():
    """Advanced 6: statistics, trend, recent values and names from the metrics store."""
    from rlmon import TrainingMonitor

    monitor = TrainingMonitor(output_dir="./outputs")
    trainer = PPOTrainer(monitor=monitor)
    with monitor.monitor_context():
        trainer.train(prompts, num_steps=12)
        metrics_store = monitor.get_metrics_store()
        live = metrics_store.get_statistics('reward')
    metrics_store = monitor.get_metrics_store()
    reward_stats = metrics_store.get_statistics('reward')
    print(f"Mean: {reward_stats['mean']:.4f}")
    print(f"Std: {reward_stats['std']:.4f}")
    print(f"Min: {reward_stats['min']:.4f}, Max: {reward_stats['max']:.4f}")
    reward_trend = metrics_store.compute_trend('reward')
    if reward_trend > 0:
        print("📈 Rewards are improving!")
    recent_rewards = metrics_store.get_recent('reward', n=10)
    metric_names = metrics_store.get_metric_names()
    assert reward_stats["count"] == 12 and live["count"] >= 11
    assert len(recent_rewards) == 10
    assert {"reward", "kl_div", "policy_loss", "value_loss"} <= set(metric_names)


def test_custom_trainer_integration(capsys):
    """Integration Guide: a custom trainer emitting events and checking should_stop_early."""
    from rlmon import TrainingMonitor, TrainingEvent, TrainingPhase

    class MyCustomTrainer:
        def __init__(self, monitor=None):
            self.monitor = monitor

        def _emit_event(self, event):
            if self.monitor is not None:
                self.monitor.on_event(event)

        def train(self, prompts, num_steps):
            self._emit_event(TrainingEvent(phase=TrainingPhase.TRAINING_START, iteration=0,
                                           metadata={'num_steps': num_steps}))
            for step in range(num_steps):
                self._emit_event(TrainingEvent(phase=TrainingPhase.ITERATION_START, iteration=step))
                loss_value, reward_value = 1.0 / (step + 1), step / num_steps
                self._emit_event(TrainingEvent(phase=TrainingPhase.ITERATION_END, iteration=step,
                                               metrics={'loss': loss_value, 'reward': reward_value}))
                if self.monitor is not None:
                    should_stop, reason = self.monitor.should_stop_early()
                    if should_stop:
                        print(f"Early stopping: {reason}")
                        break
            self._emit_event(TrainingEvent(phase=TrainingPhase.TRAINING_END, iteration=step))

    monitor = TrainingMonitor(output_dir="./outputs")
    MyCustomTrainer(monitor).train(prompts, num_steps=25)
    monitor.close()
    assert monitor.get_metrics_store().get_statistics("loss")["count"] == 25


def test_verbose_full_reports_example_3():
    """Example 3: verbose PPO tracking with every plot and report, dpi=300 plot manager."""
    from rlmon import (
        TrainingMonitor, SampleComparator, QualityAnalyzer,
        PPOMetricsTracker, PlotManager, ReportGenerator,
        VerbosityLevel
    )

    monitor = TrainingMonitor(output_dir="./outputs", verbosity=VerbosityLevel.VERBOSE)
    comparator = SampleComparator()
    analyzer = QualityAnalyzer(monitor=monitor, comparator=comparator)
    ppo_tracker = PPOMetricsTracker(verbosity=VerbosityLevel.VERBOSE)
    monitor.register_callback(comparator)
    monitor.register_callback(analyzer)
    monitor.register_callback(ppo_tracker)
    trainer = PPOTrainer(monitor=monitor)
    with monitor.monitor_context():
        trainer.train(prompts, num_steps=20)
    plot_mgr = PlotManager(output_dir="./outputs", dpi=300)
    plot_mgr.create_all_plots(metrics_store=monitor.get_metrics_store(), comparator=comparator,
                              analyzer=analyzer, ppo_tracker=ppo_tracker)
    report_gen = ReportGenerator(output_dir="./outputs")
    report_gen.generate_all_reports(monitor, comparator, analyzer, ppo_tracker)
    assert Path("outputs/ppo_mechanics.png").exists()
    assert Path("outputs/training_report.md").read_text().startswith("# ")


def test_troubleshooting_alert_inspection():
    """Troubleshooting 4: alert summary and recent alerts expose counts, iteration and reason."""
    from rlmon import QualityAnalyzer, TrainingMonitor

    monitor = TrainingMonitor(output_dir="./outputs", metrics_capacity=5000)
    analyzer = QualityAnalyzer(monitor=monitor, kl_threshold=0.1)
    monitor.register_callback(analyzer)
    trainer = TinyPPOTrainer(monitor=monitor, kl_blowup_at=3)
    with monitor.monitor_context():
        trainer.train(prompts, num_steps=2000)
    alerts = analyzer.get_alert_summary()
    print(f"Critical alerts: {alerts['critical_count']}")
    recent_alerts = analyzer.get_recent_alerts(n=5)
    for alert in recent_alerts:
        print(f"Iteration {alert.iteration}: {alert.reason}")
    assert alerts["critical_count"] >= 1 and recent_alerts
    assert any(a.iteration >= 3 and "KL" in a.reason for a in recent_alerts)
