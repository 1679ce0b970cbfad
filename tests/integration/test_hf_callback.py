"""RlmonCallback in a real Hugging Face Trainer: torchrun with 2 gloo ranks under rlmon launch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import (child_env, read_json, rlmon_command, sample_value, scrape,
                                       stop_process, torchrun_command, wait_for)

HF_TRAINER = Path(__file__).resolve().parent / "hf_train.py"


@pytest.fixture(autouse=True)
def _transformers_installed():
    """The tests need transformers and accelerate: fail under CI, skip elsewhere, when missing."""
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc.name} is missing (pip install -e '.[hf]')")
        pytest.skip(f"{exc.name} not installed (pip install -e '.[hf]')")


def _launch(tmp_path: Path, *flags: str,
            rules: tuple[str, ...] = ()) -> tuple[Path, subprocess.Popen]:
    """`rlmon launch` of hf_train.py on 2 ranks; output goes to tmp_path/output.log."""
    out = tmp_path / "run"
    rule_flags = [arg for rule in rules for arg in ("--rule", rule)]
    command = [*rlmon_command(), "launch", "--out", str(out), *rule_flags, "--",
               *torchrun_command(2), str(HF_TRAINER), "--out", str(tmp_path / "ranks"), *flags]
    env = child_env(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                    TOKENIZERS_PARALLELISM="false")
    with open(tmp_path / "output.log", "w") as log:
        job = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT)
    return out, job


def _finish(tmp_path: Path, job: subprocess.Popen, timeout: float) -> str:
    """Wait for the job (stopped in any case) and return its output."""
    try:
        job.wait(timeout)
    finally:
        stop_process(job)
    return (tmp_path / "output.log").read_text()


def _alive(job: subprocess.Popen) -> bool:
    """True while ``job`` runs; fails the test at once when it has exited."""
    if job.poll() is not None:
        pytest.fail(f"rlmon launch exited early with {job.returncode}")
    return True


def _ranks(tmp_path: Path) -> list[dict]:
    return [read_json(tmp_path / "ranks" / f"rank{rank}.json") for rank in (0, 1)]


def _assert_both_ranks_reported(report: dict, stop_at: int) -> None:
    """The collector heard both ranks up to the stop step, and got the Trainer's logs."""
    for rank in ("0", "1"):
        seen = report["ranks"][rank]
        assert seen["last_step"] == stop_at and seen["scalars_received"] > 2 * stop_at, seen
    for name in ("loss", "grad_norm", "learning_rate", "span/step"):
        assert report["metrics"][name]["count"] > 0, name


def test_kl_in_the_trainer_logs_stops_both_ranks_at_the_same_step(tmp_path):
    """A `kl` in the Trainer's logs trips rlmon's KL rule; both ranks end at stop_at_step."""
    out, job = _launch(tmp_path, "--max-steps", "1000", "--kl-spike-at", "20")
    output = _finish(tmp_path, job, 240)
    assert job.returncode == 0, output
    report = read_json(out / "training_report.json")
    assert report["summary"]["stop"], output[-4000:]
    stop_at = report["summary"]["stop"]["stop_at_step"]
    ranks = _ranks(tmp_path)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == stop_at, (ranks, output[-3000:])
    assert 20 <= stop_at < 1000
    assert "KL" in ranks[0]["reason"] and "KL" in ranks[1]["reason"]
    _assert_both_ranks_reported(report, stop_at)


def test_operator_stop_ends_the_trainer_on_both_ranks_at_the_same_step(tmp_path):
    """`rlmon stop DIR` while the Trainer runs: both ranks leave train() at stop_at_step."""
    out, job = _launch(tmp_path, "--max-steps", "100000")
    try:
        info = wait_for(lambda: _alive(job) and read_json(out / "collector.json"), 120,
                        "collector.json")
        wait_for(lambda: _alive(job) and (sample_value(scrape(info["metrics_url"]),
                                                       "rlmon_rank_last_step", rank="1") or 0) > 10,
                 120, "both ranks training")
        stop = subprocess.run([*rlmon_command(), "stop", str(out), "--reason", "operator test"],
                              env=child_env(), capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        state = json.loads(stop.stdout)
    finally:
        output = _finish(tmp_path, job, 120)
    assert job.returncode == 0, output
    ranks = _ranks(tmp_path)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == state["stop_at_step"], ranks
    assert ranks[0]["reason"] == ranks[1]["reason"] == "operator test"
    assert state["stop_at_step"] < 100000
    _assert_both_ranks_reported(read_json(out / "training_report.json"), state["stop_at_step"])


def test_checkpoint_rule_saves_on_both_ranks_at_the_same_step(tmp_path):
    """A rule with action=checkpoint sets control.should_save at the same step on both ranks,
    and training goes on to max_steps."""
    _, job = _launch(tmp_path, "--max-steps", "80", "--kl-spike-at", "20",
                     rules=("kl.action=checkpoint",))
    output = _finish(tmp_path, job, 240)
    assert job.returncode == 0, output
    ranks = _ranks(tmp_path)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 80, ranks
    saves = ranks[0]["saves"]
    assert saves == ranks[1]["saves"] and saves and saves[0] >= 20, ranks
    assert (tmp_path / "ranks" / "hf" / f"checkpoint-{saves[0]}").is_dir()
