"""The demo, as a user runs it: `rlmon demo` with torchrun, 2 ranks, a KL blow-up and a stop."""

from __future__ import annotations

import re
import subprocess

from tests.integration.helpers import child_env, read_json, rlmon_command


def test_demo_stops_both_ranks_at_the_same_step(tmp_path):
    """A quick demo with an injected KL blow-up: alert, coordinated stop, reports, exit 0."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [*rlmon_command(), "demo", "--out", str(out), "--visualization-frequency", "5", "--",
         "--quick", "--inject", "kl_blowup", "--inject_step", "4"],
        env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    stops = dict(re.findall(r"rank (\d): stopped at step (\d+)", output))
    report = read_json(out / "training_report.json")
    stop_at = report["summary"]["stop"]["stop_at_step"]
    assert stops == {"0": str(stop_at), "1": str(stop_at)}, output
    assert report["summary"]["early_stopped"] and "KL" in report["summary"]["stop_reason"]
    assert "metrics at http://127.0.0.1:" in output
    assert (out / "training_report.md").exists()
    for name in ("reward", "kl", "rewards/check_answer", "span/rollout",
                 "reward_fn/check_answer/calls"):
        assert report["metrics"][name]["count"] > 0, name
    for name in ("final_summary.html", "monitoring_data.json", "final_dashboard.png",
                 "loss_curves.png", "rewards.png", "kl_divergence.png", "quality_metrics.png",
                 "ppo_mechanics.png", "reward_history.png", "reward_distributions.png",
                 "reward_statistics.png", "dashboard_step_5.png", "summary_step_5.html"):
        assert (out / name).stat().st_size > 0, name


def test_ppo_demo_logs_ppo_mechanics_and_ends_both_ranks_together(tmp_path):
    """`rlmon demo --algo ppo --quick --verbose`: PPO's metrics (value loss, clip fraction,
    advantages, ...) reach the collector from both ranks, both finish at the same step, and the
    collector's PPO summary is printed."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [*rlmon_command(), "demo", "--out", str(out), "--algo", "ppo", "--quick", "--verbose"],
        env=child_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PPO on 2 rank(s)" in output, output
    assert dict(re.findall(r"rank (\d): finished (\d+) steps", output)) == {"0": "15", "1": "15"}
    report = read_json(out / "training_report.json")
    assert {rank: seen["last_step"] for rank, seen in report["ranks"].items()} == {"0": 14, "1": 14}
    for name in ("policy_loss", "value_loss", "clip_fraction", "advantage_mean", "advantage_std",
                 "grad_norm", "kl", "entropy", "explained_variance", "approx_kl"):
        assert report["metrics"][name]["count"] > 0, name
    assert "collector's PPO summary: avg clip fraction" in output, output
