"""The GRPO reward-monitoring guide's examples, run against rlmon with only their imports changed
(``tunrex.monitoring`` → ``rlmon``).

The guide's ``tunrex.datasets.rewards`` functions and its ``GRPOLearner`` are replaced by the small
real stand-ins below (a policy whose output format improves as it trains, scored by the reward
functions in TRL's ``reward_funcs`` call shape). Absolute ``/tmp/...`` output directories become
directories of the test, and the Quick Start's ``# Training happens...`` placeholder becomes one
stand-in training step. Statistics come from the embedded collector (no ``RLMON_ENDPOINT``); W&B
runs in offline mode only: ``use_wandb=True`` has the collector's sink write an offline run, and
Example 2 logs into an offline run started in a child process (importing wandb patches the
importing process's streams, so pytest's own process never imports it).
"""

from __future__ import annotations

import inspect
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rlmon
from rlmon.seed import grpo
from tests.integration.helpers import child_env, running_collector

ALERT_TYPES = ("OUTLIER", "DROP", "SPIKE", "FLATLINE", "NEGATIVE")
GUIDE_FILES = ("final_dashboard.png", "final_summary.html", "reward_history.png",
               "reward_distributions.png", "reward_statistics.png", "monitoring_data.json")


# --- stand-ins for tunrex.datasets.rewards and GRPOLearner ----------------------------------------

FORMAT = re.compile(r"^<reasoning>.*?</reasoning><answer>(.*?)</answer>$", re.S)


def match_format_exactly(prompts, completions, **kwargs):
    """3 points for a completion in the exact reasoning/answer format."""
    return [3.0 if FORMAT.match(c) else 0.0 for c in completions]


def match_format_approximately(prompts, completions, **kwargs):
    """+0.5 for each format tag present exactly once, -0.5 for each one that is not."""
    tags = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
    return [sum(0.5 if c.count(t) == 1 else -0.5 for t in tags) for c in completions]


def check_answer(prompts, completions, answer, **kwargs):
    """3 for the exact answer, 1.5 within 10 %, -1 for a wrong one, 0 without an answer."""
    scores = []
    for completion, truth in zip(completions, answer):
        found = FORMAT.match(completion)
        if found is None:
            scores.append(0.0)
        elif found.group(1) == truth:
            scores.append(3.0)
        else:
            close = abs(float(found.group(1)) - float(truth)) <= 0.1 * abs(float(truth))
            scores.append(1.5 if close else -1.0)
    return scores


def check_numbers(prompts, completions, answer, **kwargs):
    """1.5 when the first number in the completion is the answer."""
    numbers = [re.search(r"-?\d+", c) for c in completions]
    return [1.5 if n is not None and n.group(0) == a else 0.0 for n, a in zip(numbers, answer)]


class GRPOLearner:
    """Stands in for the guide's GRPOLearner: each step samples a group of completions from a toy
    policy whose chance of using the format grows as it trains, and scores them with every reward
    function (``fn(prompts=..., completions=..., answer=...)``)."""

    def __init__(self, rl_cluster=None, reward_fns=(), algo_config=None):
        self.reward_fns = list(reward_fns)
        self.config = dict(algo_config or {})
        self.rng = random.Random(0)
        self.p_format = 0.2
        self.steps_run = 0

    def train_step(self, step: int, dataset=None) -> list[list[float]]:
        """One step: 8 completions of one prompt, scored by every reward function."""
        question, truth = (dataset or train_dataset)[step % len(dataset or train_dataset)]
        completions = [self._complete(truth) for _ in range(8)]
        scores = [fn(prompts=[question] * 8, completions=completions, answer=[truth] * 8)
                  for fn in self.reward_fns]
        self.p_format = min(0.95, self.p_format + 0.03)
        self.steps_run += 1
        return scores

    def train(self, train_dataset, val_dataset=None) -> None:
        """``num_steps`` steps over ``train_dataset``."""
        for step in range(self.config.get("num_steps", 30)):
            self.train_step(step, train_dataset)

    def _complete(self, truth: str) -> str:
        guess = truth if self.rng.random() < 0.6 else str(int(truth) + self.rng.choice((-5, 1, 9)))
        if self.rng.random() < self.p_format:
            return f"<reasoning>adding</reasoning><answer>{guess}</answer>"
        return f"I think it is {guess}"


train_dataset = [(f"What is {a} + {a + 3}?", str(2 * a + 3)) for a in range(10, 20)]
val_dataset = train_dataset[:3]
rl_cluster = object()
grpo_config = {"num_steps": 30}
my_reward_fns = [match_format_exactly, check_answer]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """W&B offline with its files under the test's directory; no monitor of another test reused;
    every rank monitor an example starts (and would close at exit) is closed after the test."""
    for name, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                      ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(rlmon, "_current", None)
    at_exit: list = []
    monkeypatch.setattr(grpo.atexit, "register", at_exit.append)
    yield
    for close in at_exit:
        close()


def _wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until truthy; fail past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # the poll interval of a deadline-bounded wait
    return value


def _assert_guide_files(out: Path) -> None:
    for name in GUIDE_FILES:
        assert (out / name).stat().st_size > 0, name


# --- the guide's examples -------------------------------------------------------------------------

def test_quick_start(capsys):
    """Quick Start 1-3: setup, wrapped functions to the learner, update_step, finalize."""
    from rlmon import setup_grpo_monitoring

    monitoring = setup_grpo_monitoring(
        reward_functions=[
            match_format_exactly,
            match_format_approximately,
            check_answer,
            check_numbers,
        ],
        use_wandb=True,
        output_dir="reward_monitoring",
    )

    grpo_trainer = GRPOLearner(
        rl_cluster=rl_cluster,
        reward_fns=monitoring.get_wrapped_reward_functions(),  # Use wrapped functions
        algo_config=grpo_config,
    )

    num_steps = 101
    for step in range(num_steps):
        grpo_trainer.train_step(step)  # Training happens...
        monitoring.update_step(step)

    # Finalize at the end
    monitoring.finalize()

    out = Path("reward_monitoring")
    _assert_guide_files(out)
    printed = capsys.readouterr().out
    assert "Reward Monitoring Summary (Step 100)" in printed
    assert "check_numbers:\n  Mean: " in printed and "  Samples: 808" in printed
    data = json.loads((out / "monitoring_data.json").read_text())
    assert len(data["history"]["check_answer"]) == num_steps
    assert data["reward_statistics"]["functions"]["match_format_exactly"]["samples"] == 808
    assert list(out.glob("wandb/offline-run-*")), "the collector's W&B offline run"


def test_example_1_training_then_example_3_offline_analysis(monkeypatch):
    """Example 1 (a trainer that only calls the functions), then Example 3 on its export."""
    from rlmon import setup_grpo_monitoring

    # Setup
    monitoring = setup_grpo_monitoring(
        reward_functions=[match_format_exactly, check_answer],
        use_wandb=True,
    )

    # Train
    grpo_trainer = GRPOLearner(
        rl_cluster=rl_cluster,
        reward_fns=monitoring.get_wrapped_reward_functions(),
        algo_config=grpo_config,
    )

    grpo_trainer.train(train_dataset, val_dataset)

    # Finalize
    monitoring.finalize()

    _assert_guide_files(Path("reward_monitoring"))
    monkeypatch.chdir("reward_monitoring")

    import json
    from rlmon import RewardVisualizer

    # Load saved monitoring data
    with open("monitoring_data.json") as f:
        data = json.load(f)

    # Create visualizations
    viz = RewardVisualizer()
    viz.plot_reward_history(data["history"], save_path="analysis.png")

    assert len(data["history"]["check_answer"]) == grpo_config["num_steps"]
    assert Path("analysis.png").stat().st_size > 0


def test_configuration_examples():
    """Basic and Advanced Configuration; the advanced integration's custom names are used."""
    from rlmon import setup_grpo_monitoring

    monitoring = setup_grpo_monitoring(
        reward_functions=my_reward_fns,
        use_wandb=True,              # Enable W&B logging
        enable_anomaly_detection=True, # Enable alerts
        log_frequency=10,            # Log every 10 steps
        summary_frequency=100,       # Print summary every 100 steps
        visualization_frequency=500, # Create plots every 500 steps
        output_dir="monitoring", # Where to save files
        verbose=True,                # Print monitoring info
    )
    assert (monitoring.log_frequency, monitoring.summary_frequency) == (10, 100)

    from rlmon import GRPOMonitoringIntegration

    monitoring = GRPOMonitoringIntegration(
        reward_functions=my_reward_fns,
        reward_names=["custom_name_1", "custom_name_2"],  # Custom names
        use_wandb=True,
        enable_anomaly_detection=True,
        log_frequency=10,
        summary_frequency=100,
        visualization_frequency=500,
        output_dir="monitoring",
        verbose=True,
    )

    # Access individual components
    monitor = monitoring.reward_monitor
    logger = monitoring.metrics_logger
    visualizer = monitoring.visualizer

    from rlmon import RewardMetricsLogger, RewardMonitor, RewardVisualizer
    assert isinstance(monitor, RewardMonitor) and isinstance(logger, RewardMetricsLogger)
    assert isinstance(visualizer, RewardVisualizer)
    wrapped = monitoring.get_wrapped_reward_functions()
    assert [f.__name__ for f in wrapped] == ["custom_name_1", "custom_name_2"]
    learner = GRPOLearner(reward_fns=wrapped)
    for step in range(5):
        learner.train_step(step)
        monitoring.update_step(step)
    monitoring.finalize()
    assert sorted(monitor.get_statistics()) == ["custom_name_1", "custom_name_2"]
    assert monitor.get_metrics_dict()["reward_fn/custom_name_2/calls"] == 5


EXAMPLE_2 = '''
import wandb
wandb.init(mode="offline", dir=".", project="rlmon-guide-test")
from tests.seeds.test_grpo_reward_guide import compute_reward
num_steps = 30

from rlmon import RewardMonitor, RewardMetricsLogger

monitor = RewardMonitor(reward_names=["my_reward"])
logger = RewardMetricsLogger(use_wandb=True)

for step in range(num_steps):
    reward_value = compute_reward()

    stats = monitor.update({"my_reward": reward_value}, step=step)
    logger.log_step(monitor.get_metrics_dict(), step=step)

    if monitor.all_alerts:
        print(f"Alert: {monitor.all_alerts[-1]['message']}")

import json
print("RESULT " + json.dumps({"rows": logger.rows_logged, "stats": stats["my_reward"]["count"],
                              "types": sorted({a["type"] for a in monitor.all_alerts}),
                              "run_dir": str(wandb.run.dir)}))
wandb.finish()
'''


_calls = 0


def compute_reward() -> list[float]:
    """Example 2's ``compute_reward()``: a group of 4 rewards near 1, and -10s at call 20."""
    global _calls
    _calls += 1
    if _calls == 21:
        return [-10.0] * 4
    return [1.0 + 0.1 * ((_calls * 7 + i) % 5 - 2) for i in range(4)]


def test_example_2_manual_monitoring_with_wandb_offline(tmp_path):
    """Example 2 in a child process with an offline W&B run: rows are logged, an alert shows."""
    script = tmp_path / "example_2.py"
    script.write_text(EXAMPLE_2)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=child_env(
                                WANDB_MODE="offline", WANDB_SILENT="true",
                                WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                                WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                                WANDB_DATA_DIR=str(tmp_path / "wandb-data")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Alert: " in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    found = json.loads(line[len("RESULT "):])
    assert found["rows"] == 30 and found["stats"] == 30 * 4 and "OUTLIER" in found["types"]
    assert list((tmp_path / found["run_dir"]).parent.glob("run-*.wandb"))


# --- behaviour the guide promises -----------------------------------------------------------------

def test_each_reward_alert_reaches_all_alerts_through_the_collector():
    """OUTLIER, DROP, SPIKE, FLATLINE and NEGATIVE, raised by the real collector's detectors,
    show in RewardMonitor.all_alerts with type, message, step and severity."""
    from rlmon import RewardMonitor

    monitor = RewardMonitor(reward_names=["flat", "neg", "outlier", "drop", "spike"])
    try:
        for step in range(40):
            noise = 0.1 * ((step * 7) % 5 - 2)
            monitor.update({"flat": [0.0, 0.0], "neg": [-1.0, -2.0],
                            "outlier": [50.0] if step == 30 else [1.0 + noise],
                            "drop": [1.0 if step < 25 else 0.01],
                            "spike": [1.0 if step < 25 else 10.0]}, step=step)

        def alert_types() -> dict[str, str]:
            monitor.refresh()
            return {a["type"]: a["reward_name"] for a in monitor.all_alerts}
        _wait_for(lambda: set(ALERT_TYPES) <= set(alert_types()), 30, "every reward alert type")
        by_type = {}
        for alert in monitor.all_alerts:
            by_type.setdefault(alert["type"], set()).add(alert["reward_name"])
            assert {"type", "message", "step", "severity"} <= set(alert)
        assert "flat" in by_type["FLATLINE"] and "neg" in by_type["NEGATIVE"]
        assert "outlier" in by_type["OUTLIER"] and "drop" in by_type["DROP"]
        assert "spike" in by_type["SPIKE"]
        metrics = monitor.get_metrics_dict()
        assert all(metrics[f"alerts/{t}"] >= 1 for t in ALERT_TYPES)
        assert metrics["alerts/total"] == sum(metrics[f"alerts/{t}"] for t in ALERT_TYPES)
        assert metrics["flat/zero_fraction"] == 1.0 and metrics["neg/negative_fraction"] == 1.0
    finally:
        monitor.close()


def test_wrapped_function_is_a_trl_reward_func_and_errors_are_counted():
    """A wrapped function keeps __name__, signature and return value; an exception propagates
    unchanged and is counted in ``reward_fn/<name>/errors``."""
    from rlmon import setup_grpo_monitoring

    def reward_len(completions, **kwargs):
        """Reward short completions (TRL's docs example)."""
        return [-abs(20 - len(c)) / 10 for c in completions]

    failure = ValueError("no answer")

    def broken(prompts, completions, **kwargs):
        raise failure

    monitoring = setup_grpo_monitoring([reward_len, broken], output_dir="out", verbose=False)
    try:
        wrapped_len, wrapped_broken = monitoring.get_wrapped_reward_functions()
        assert (wrapped_len.__name__, wrapped_len.__doc__) == ("reward_len", reward_len.__doc__)
        assert inspect.signature(wrapped_len) == inspect.signature(reward_len)
        assert inspect.signature(wrapped_broken) == inspect.signature(broken)
        completions = ["a" * 20, "b" * 5]
        expected = reward_len(completions=completions)
        for step in range(3):
            assert wrapped_len(prompts=["p", "q"], completions=completions,
                               completion_ids=[[1], [2]], trainer_state=None) == expected
            with pytest.raises(ValueError) as caught:
                wrapped_broken(prompts=["p"], completions=["x"])
            assert caught.value is failure
            monitoring.update_step(step)
        metrics = monitoring.reward_monitor.get_metrics_dict()
        assert metrics["reward_fn/broken/errors"] == 3 and metrics["reward_fn/broken/calls"] == 3
        assert metrics["reward_fn/reward_len/errors"] == 0
        assert metrics["reward_fn/reward_len/avg_time_ms"] >= 0
        assert metrics["reward_len/mean"] == pytest.approx(-0.75)
    finally:
        monitoring.finalize()


def test_with_an_external_collector_finalize_writes_every_guide_file(tmp_path, monkeypatch):
    """Under a collector of its own (``rlmon launch``), finalize writes the guide's files into
    output_dir itself, from the collector's answers."""
    from rlmon import setup_grpo_monitoring

    with running_collector(tmp_path / "collector") as (_, info):
        monkeypatch.setenv("RLMON_ENDPOINT", info["endpoint"])
        monitoring = setup_grpo_monitoring(my_reward_fns, output_dir="mine", verbose=False)
        learner = GRPOLearner(reward_fns=monitoring.get_wrapped_reward_functions())
        for step in range(12):
            learner.train_step(step)
            monitoring.update_step(step)
        written = monitoring.finalize()
    _assert_guide_files(Path("mine"))
    assert {p.name for p in written} == set(GUIDE_FILES)
    data = json.loads(Path("mine/monitoring_data.json").read_text())
    assert len(data["steps"]) == 12 and set(data["history"]) == {"match_format_exactly",
                                                                 "check_answer"}
    assert "Reward monitoring summary" in Path("mine/final_summary.html").read_text()
