"""End to end: real collector processes, real sockets, real torchrun with 2 gloo ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import zmq

from rlmon import wire
from rlmon.config import RankConfig
from rlmon.monitor import Monitor
from rlmon.wire import Kind
from tests.integration.helpers import (TOY_TRAINER, child_env, free_port, promtool, read_json,
                                       rlmon_command, running_collector, sample_value, scrape, scrape_until,
                                       stop_process, torchrun_command, wait_for)


def _monitor(endpoint: str, rank: int = 0, world: int = 1, run_id: str = "test") -> Monitor:
    config = RankConfig(rank=rank, world_size=world, endpoint=endpoint, run_id=run_id)
    return Monitor(config, endpoint)


def test_rank_metrics_reach_prometheus_and_pass_promtool(tmp_path):
    """Metrics logged on a rank show up on /metrics, and promtool check metrics prints nothing."""
    with running_collector(tmp_path) as (_, info):
        mon = _monitor(info["endpoint"])
        try:
            for step in range(20):
                mon.log(step, {"reward": 0.5 + step / 100, "kl": 0.01, "loss": 1.0})
            text = scrape_until(info["metrics_url"], lambda t: sample_value(
                t, "rlmon_rank_last_step", rank="0") == 19, 30, "rank 0 at step 19 on /metrics")
        finally:
            mon.close()
        assert sample_value(text, "rlmon_metric_value", metric="reward", rank="0") == 0.69
        check = subprocess.run([promtool(), "check", "metrics"], input=text, text=True,
                               capture_output=True, timeout=60)
        assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr
        assert mon.statistics()["acked_seq"] >= 1


def test_bad_frames_are_counted_and_the_collector_keeps_serving(tmp_path):
    """Garbage, truncated, wrong-version and multi-part frames are counted by reason."""
    with running_collector(tmp_path) as (_, info):
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(info["endpoint"])
        good = wire.encode(wire.envelope(Kind.HEARTBEAT, "r", 3, 1, step=1, t=time.time()))
        sock.send(b"\xc1garbage")
        sock.send(good[:-3])
        sock.send(wire.encode({"v": 99, "k": 7}))
        sock.send_multipart([b"a", b"b"])
        sock.send(wire.encode(wire.envelope(Kind.BATCH, "r", 3, 1, seq=1, t=time.time(), step=2,
                                            blocks=[[["x", "y"], [2], [time.time()],
                                                     [[float("nan"), "str"]]]])))
        try:
            reasons = ("malformed", "bad_version", "bad_framing")
            text = scrape_until(info["metrics_url"], lambda t: all(
                sample_value(t, "rlmon_frames_rejected_total", reason=r) for r in reasons),
                30, "rejections on /metrics")
            assert sample_value(text, "rlmon_frames_rejected_total", reason="malformed") == 2
            flagged = scrape_until(info["metrics_url"], lambda t: sample_value(
                t, "rlmon_values_flagged_total", reason="wrong_type"), 30, "flagged values")
            assert sample_value(flagged, "rlmon_values_flagged_total", reason="nan") == 1
            sock.send(good)
            wait_for(lambda: sample_value(scrape(info["metrics_url"]), "rlmon_rank_last_step",
                                          rank="3") == 2, 30, "the collector still serving")
        finally:
            sock.close(linger=0)
            context.term()


def test_operator_stop_is_refused_without_the_key(tmp_path):
    """A STOP_REQUEST with a wrong control key is refused and counted; the run goes on."""
    with running_collector(tmp_path) as (_, info):
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(info["endpoint"])
        try:
            sock.send(wire.encode(wire.envelope(Kind.STOP_REQUEST, "r", -1, 0, reason="forged",
                                                sev="CRITICAL", key="not-the-key")))
            assert sock.poll(10_000)
            assert wire.decode(sock.recv()).kind is Kind.REFUSED
        finally:
            sock.close(linger=0)
            context.term()
        text = scrape(info["metrics_url"])
        assert sample_value(text, "rlmon_frames_rejected_total", reason="bad_control_key") == 1
        assert sample_value(text, "rlmon_stop_requested") == 0


def _launch_toy(tmp_path, *train_flags, env=None):
    out = tmp_path / "run"
    command = [*rlmon_command(), "launch", "--out", str(out), "--",
               *torchrun_command(2), str(TOY_TRAINER), "--out", str(tmp_path / "ranks"),
               *train_flags]
    return out, subprocess.Popen(command, env=env or child_env(), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank_results(tmp_path):
    return [read_json(tmp_path / "ranks" / f"rank{r}.json") for r in (0, 1)]


def test_kl_detector_stops_both_ranks_at_the_same_step(tmp_path):
    """Under rlmon launch + torchrun, a KL spike makes both ranks stop at stop_at_step, exit 0."""
    out, job = _launch_toy(tmp_path, "--steps", "400", "--kl-spike-at", "30")
    try:
        output, _ = job.communicate(timeout=240)
    finally:
        stop_process(job)
    assert job.returncode == 0, output
    ranks = _rank_results(tmp_path)
    report = read_json(out / "training_report.json")
    stop_at = report["summary"]["stop"]["stop_at_step"]
    assert ranks[0]["last_step"] == ranks[1]["last_step"] == stop_at, (ranks, report["summary"])
    assert 30 < stop_at < 399
    assert report["summary"]["early_stopped"] is True
    assert "KL" in report["summary"]["stop_reason"]
    assert "KL" in ranks[0]["reason"] and "KL" in ranks[1]["reason"]
    assert any(a["severity"] == "CRITICAL" for a in report["alerts"])
    markdown = (out / "training_report.md").read_text()
    assert "Early Stopped" in markdown and "KL" in markdown
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    assert {a["severity"] for a in alerts} >= {"WARNING", "CRITICAL"} or \
        {a["severity"] for a in alerts} == {"CRITICAL"}


def test_operator_stop_reaches_both_ranks_at_the_same_step(tmp_path):
    """`rlmon stop DIR --reason` during a torchrun job stops both ranks at stop_at_step."""
    out, job = _launch_toy(tmp_path, "--steps", "100000", "--step-seconds", "0.01",
                           "--slow-rank", "1")
    try:
        info = wait_for(lambda: read_json(out / "collector.json"), 120, "collector.json")
        wait_for(lambda: (sample_value(scrape(info["metrics_url"]), "rlmon_rank_last_step",
                                       rank="1") or 0) > 20, 120, "both ranks training")
        stop = subprocess.run([*rlmon_command(), "stop", str(out), "--reason", "operator test"],
                              env=child_env(), capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        state = json.loads(stop.stdout)
        output, _ = job.communicate(timeout=120)
    finally:
        stop_process(job)
    assert job.returncode == 0, output
    ranks = _rank_results(tmp_path)
    assert ranks[0]["last_step"] == ranks[1]["last_step"] == state["stop_at_step"], (ranks, state)
    assert ranks[0]["reason"] == "operator test"
    report = read_json(out / "training_report.json")
    assert report["summary"]["stop_reason"] == "operator test"


def test_job_without_a_collector_finishes_normally(tmp_path):
    """With RLMON_ENDPOINT pointing at nothing, training runs to the end and exits 0."""
    dead = f"tcp://127.0.0.1:{free_port()}"
    command = [*torchrun_command(2), str(TOY_TRAINER), "--out", str(tmp_path / "ranks"),
               "--steps", "50", "--step-seconds", "0.001"]
    result = subprocess.run(command, env=child_env(RLMON_ENDPOINT=dead), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in _rank_results(tmp_path):
        assert rank["last_step"] == 49 and rank["reason"] is None
        assert rank["stats"]["emitted"] == 50
        print("close() with the collector absent took", rank["close_seconds"], "s")


def test_embedded_collector_writes_reports(tmp_path):
    """A single-process script with no collector configured gets a local one and its reports."""
    script = ("import rlmon\n"
              "mon = rlmon.init()\n"
              "for step in range(30):\n"
              "    mon.log(step, {'reward': step / 30, 'kl': 0.01})\n"
              "mon.close()\n")
    out = tmp_path / "embedded"
    result = subprocess.run([sys.executable, "-c", script], env=child_env(RLMON_OUT=str(out)),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    report = read_json(out / "training_report.json")
    assert report["metrics"]["reward"]["count"] == 30
    assert report["summary"]["early_stopped"] is False
    assert (out / "training_report.md").exists()


def test_disabled_monitor_is_a_no_op(tmp_path):
    """RLMON_DISABLE=1 gives a monitor whose calls do nothing and start nothing."""
    script = ("import rlmon, threading\n"
              "mon = rlmon.init()\n"
              "mon.log(0, {'a': 1.0}); mon.log_samples(0, ['p'], ['r'])\n"
              "with mon.span('x'): pass\n"
              "assert not mon.should_stop(0)\n"
              "assert type(mon).__name__ == 'NullMonitor'\n"
              "assert threading.active_count() == 1\n"
              "mon.close()\n")
    result = subprocess.run([sys.executable, "-c", script], env=child_env(RLMON_DISABLE="1"),
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "rlmon_out").exists()


def test_sigterm_reaches_the_ranks_and_reports_are_still_written(tmp_path):
    """SIGTERM to `rlmon launch` ends torchrun's ranks; the collector still writes the reports."""
    out, job = _launch_toy(tmp_path, "--steps", "100000", "--step-seconds", "0.005")
    try:
        info = wait_for(lambda: read_json(out / "collector.json"), 120, "collector.json")
        scrape_until(info["metrics_url"], lambda t: (sample_value(
            t, "rlmon_rank_last_step", rank="1") or 0) > 5, 120, "both ranks training")
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=120)
    finally:
        stop_process(job)
    assert job.returncode != 0, output
    report = read_json(out / "training_report.json")
    assert report["summary"]["total_iterations"] > 5
    assert (out / "training_report.md").exists()
    assert not any((tmp_path / "ranks").glob("rank*.json")), "ranks were killed mid-loop"


def test_training_survives_the_collector_dying(tmp_path):
    """kill -9 of the collector mid-run: both ranks finish every step and exit 0."""
    with running_collector(tmp_path / "run") as (collector, info):
        command = [*torchrun_command(2), str(TOY_TRAINER), "--out", str(tmp_path / "ranks"),
                   "--steps", "300", "--step-seconds", "0.005"]
        job = subprocess.Popen(command, env=child_env(RLMON_ENDPOINT=info["endpoint"]),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            scrape_until(info["metrics_url"], lambda t: (sample_value(
                t, "rlmon_rank_last_step", rank="0") or 0) > 20, 120, "rank 0 past step 20")
            collector.kill()
            output, _ = job.communicate(timeout=240)
        finally:
            stop_process(job)
    assert job.returncode == 0, output
    for rank in _rank_results(tmp_path):
        assert rank["last_step"] == 299
        print("close() after the collector died took", rank["close_seconds"], "s")


def test_report_rebuilds_from_the_event_log(tmp_path):
    """`rlmon report DIR` rewrites the reports offline, stop decision included."""
    out, job = _launch_toy(tmp_path, "--steps", "300", "--kl-spike-at", "20")
    try:
        job.communicate(timeout=240)
    finally:
        stop_process(job)
    original = read_json(out / "training_report.json")
    for name in ("training_report.json", "training_report.md"):
        (out / name).unlink()
    rebuilt = subprocess.run([*rlmon_command(), "report", str(out)], env=child_env(),
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    report = read_json(out / "training_report.json")
    assert report["summary"]["stop"]["stop_at_step"] == original["summary"]["stop"]["stop_at_step"]
    assert report["metrics"]["reward"]["count"] == original["metrics"]["reward"]["count"]
    assert report["summary"]["stop_reason"] == original["summary"]["stop_reason"]


def test_checkpoint_rule_makes_both_ranks_checkpoint_at_the_same_step(tmp_path):
    """A rule with action=checkpoint: should_checkpoint is true once, at the same step, on both."""
    out = tmp_path / "run"
    command = [*rlmon_command(), "launch", "--out", str(out), "--rule", "kl.action=checkpoint",
               "--", *torchrun_command(2), str(TOY_TRAINER), "--out", str(tmp_path / "ranks"),
               "--steps", "150", "--kl-spike-at", "30"]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = _rank_results(tmp_path)
    assert ranks[0]["last_step"] == ranks[1]["last_step"] == 149, "a checkpoint does not stop"
    assert ranks[0]["checkpoints"] == ranks[1]["checkpoints"]
    checkpoints = ranks[0]["checkpoints"]
    assert checkpoints and checkpoints[0] > 30, "one checkpoint per critical alert, after the spike"
    assert checkpoints == sorted(set(checkpoints)), "each checkpoint once, in order"


def test_report_rebuilt_after_the_collector_was_killed(tmp_path):
    """kill -9 of the collector mid-run, then `rlmon report DIR`: every report file is written
    from the event log, plots and HTML included."""
    out = tmp_path / "run"
    with running_collector(out) as (collector, info):
        command = [*torchrun_command(2), str(TOY_TRAINER), "--out", str(tmp_path / "ranks"),
                   "--steps", "300", "--step-seconds", "0.005", "--rl-metrics"]
        job = subprocess.Popen(command, env=child_env(RLMON_ENDPOINT=info["endpoint"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            scrape_until(info["metrics_url"], lambda t: (sample_value(
                t, "rlmon_rank_last_step", rank="1") or 0) > 40, 120, "rank 1 past step 40")
            collector.kill()
            collector.wait(30)
            job.wait(240)
        finally:
            stop_process(job)
    assert not (out / "training_report.json").exists(), "a killed collector wrote no report"
    rebuilt = subprocess.run([*rlmon_command(), "report", str(out)], env=child_env(),
                             capture_output=True, text=True, timeout=180)
    assert rebuilt.returncode == 0, rebuilt.stderr
    report = read_json(out / "training_report.json")
    assert report["metrics"]["reward"]["count"] > 40
    for name in ("training_report.md", "final_summary.html", "monitoring_data.json",
                 "final_dashboard.png", "rewards.png", "kl_divergence.png", "reward_history.png"):
        assert (out / name).stat().st_size > 0, name
