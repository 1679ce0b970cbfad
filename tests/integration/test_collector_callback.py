"""``rlmon collector --callback module:Class``: a real collector, real ranks, and callback classes
from ``tests/integration/callback_fixtures.py`` that the collector's callback process imports by
name and that write what they receive to a file."""

from __future__ import annotations

import json
import subprocess
import sys

from exporters.callbacks import read_status
from rlmon.config import RankConfig
from rlmon.monitor import Monitor
from tests.integration.callback_fixtures import RECORD_ENV
from tests.integration.helpers import (child_env, read_json, rlmon_command, running_collector,
                                       sample_value, scrape_until, stop_process, wait_for)

STEPS = 30
SPIKE_AT = 20  # KL jumps above twice the threshold here: alerts and a stop decision
RECORDING = "tests.integration.callback_fixtures:RecordingCallback"
FAILING = "tests.integration.callback_fixtures:FailingCallback"


def _publish(endpoint: str) -> None:
    """Two ranks log STEPS steps (KL spiking from SPIKE_AT) and one batch of samples, then close."""
    monitors = [Monitor(RankConfig(rank=r, world_size=2, endpoint=endpoint, run_id="cb"), endpoint)
                for r in range(2)]
    try:
        for step in range(STEPS):
            for rank, mon in enumerate(monitors):
                mon.log(step, {"reward": step + rank, "kl": 0.5 if step >= SPIKE_AT else 0.01})
            if step == 5:
                monitors[1].log_samples(5, ["2+2?"], ["4"], [1.0])
    finally:
        for mon in monitors:
            mon.close()


def _records(path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except OSError:
        return []


def _iteration_ends(path) -> list[dict]:
    return [r for r in _records(path) if r.get("phase") == "iteration_end"]


def test_callbacks_receive_steps_samples_alerts_and_the_end(tmp_path, monkeypatch):
    """Every completed step reaches the callback while the run goes on (cross-rank mean in
    metrics, per-rank values in metadata), samples and alerts too, TRAINING_END last with the
    stop decision; a callback that raises on everything is counted and costs ingest nothing."""
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(record))
    out = tmp_path / "run"
    with running_collector(out, "--callback", RECORDING, "--callback", FAILING) as (proc, info):
        _publish(info["endpoint"])
        wait_for(lambda: len(_iteration_ends(record)) == STEPS, 60, "every step in the callback")
        text = scrape_until(info["metrics_url"], lambda t: sample_value(
            t, "rlmon_rank_last_step", rank="1") == STEPS - 1, 30, "rank 1's last step")
        stop_process(proc)
    assert sum(v for line in text.splitlines() if line.startswith("rlmon_frames_rejected_total")
               for v in [float(line.rsplit(" ", 1)[1])]) == 0
    records = _records(record)
    assert records[0]["phase"] == "training_start" and records[0]["metadata"]["world_size"] == 2
    assert records[-1]["phase"] == "training_end"
    assert records[-1]["metadata"]["stop"]["severity"] == "CRITICAL"
    steps = _iteration_ends(record)
    assert [r["iteration"] for r in steps] == list(range(STEPS))
    assert steps[3]["metrics"] == {"reward": 3.5, "kl": 0.01}
    assert steps[3]["metadata"]["ranks"]["reward"] == {"0": 3.0, "1": 4.0}
    samples = [i for i, r in enumerate(records) if r.get("phase") == "response_generated"]
    assert len(samples) == 1 and records[samples[0]]["metadata"]["rank"] == 1
    assert samples[0] < records.index(steps[5])  # before its step's ITERATION_END
    assert any(r.get("alert") == "KL_HIGH" and r["severity"] == "CRITICAL" for r in records)
    status = read_status(out)
    events = len([r for r in records if "phase" in r])
    assert status["finished"] and status["dropped"] == 0
    assert status["errors"] == {FAILING: events}
    assert status["delivered"] == len(records)


def test_a_bad_callback_is_an_error_at_start_naming_it(tmp_path):
    """A class that is not there stops `rlmon collector` before it serves (exit 2, the spec in
    the message, no collector.json); `rlmon launch` fails the same way."""
    spec = "tests.integration.callback_fixtures:Missing"
    result = subprocess.run([*rlmon_command(), "collector", "--out", str(tmp_path / "a"),
                             "--callback", spec], env=child_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert f"--callback {spec}: module 'tests.integration.callback_fixtures' has no attribute" \
        in result.stderr
    assert not (tmp_path / "a" / "collector.json").exists()
    launched = subprocess.run([*rlmon_command(), "launch", "--out", str(tmp_path / "b"),
                               "--callback", "no_such_module_xyz:Thing", "--",
                               sys.executable, "-c", "pass"], env=child_env(),
                              capture_output=True, text=True, timeout=120)
    assert launched.returncode == 2
    assert "--callback no_such_module_xyz:Thing: cannot import module" in launched.stderr


def test_launch_forwards_callbacks_to_its_collector(tmp_path):
    """`rlmon launch --callback ...` runs the callback beside the collector it starts."""
    record = tmp_path / "record.jsonl"
    job = ("import rlmon\nmon = rlmon.init()\n"
           "for step in range(5):\n    mon.log(step, {'reward': float(step)})\nmon.close()\n")
    result = subprocess.run([*rlmon_command(), "launch", "--out", str(tmp_path / "run"),
                             "--no-top", "--callback", RECORDING, "--", sys.executable, "-c", job],
                            env=child_env(**{RECORD_ENV: str(record)}), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert [r["iteration"] for r in _iteration_ends(record)] == list(range(5))
    assert read_json(tmp_path / "run" / "callbacks.json")["delivered"] == len(_records(record))
