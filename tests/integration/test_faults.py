"""Faults survived, with real processes: the collector killed and restarted, frozen, gone at exit;
ranks killed and hung; forked DataLoader workers; late joiners. After each, ``rlmon verify``
proves from the event log that nothing acknowledged was lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.integration.helpers import (TOY_TRAINER, child_env, read_json, rlmon_command,
                                       running_collector, sample_value, scrape, stop_process,
                                       torchrun_command, wait_for)

FAULT_RANK = Path(__file__).resolve().parent / "fault_rank.py"
#: How long the collector stays frozen (SIGSTOP) while a rank logs.
FREEZE_SECONDS = 2.0


def _verify(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*rlmon_command(), "verify", str(out), *flags], env=child_env(),
                          capture_output=True, text=True, timeout=120)


def _rank(endpoint: str, out: Path, rank: int, world: int, *flags: str) -> subprocess.Popen:
    env = child_env(RLMON_ENDPOINT=endpoint, RLMON_RUN_ID="faults", RANK=str(rank),
                    WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    return subprocess.Popen([sys.executable, str(FAULT_RANK), "--out", str(out), *flags], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_process(process)
    assert process.returncode == 0, output
    return output


def _alerts(out: Path) -> list[dict]:
    path = out / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_collector_killed_mid_run_is_restarted_by_launch_and_nothing_acknowledged_is_lost(tmp_path):
    """kill -9 of the collector during a 2-rank torchrun job under `rlmon launch`: the launcher
    restarts it on the same directory and address, training runs every step, the ranks re-send
    what was not acknowledged, and `rlmon verify` passes with every rank closed."""
    out = tmp_path / "run"
    job = subprocess.Popen([*rlmon_command(), "launch", "--no-top", "--out", str(out), "--",
                            *torchrun_command(2), str(TOY_TRAINER), "--out", str(tmp_path / "ranks"),
                            "--steps", "600", "--step-seconds", "0.01"],
                           env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        first = wait_for(lambda: read_json(out / "collector.json"), 120, "collector.json")
        wait_for(lambda: (sample_value(scrape(first["metrics_url"]), "rlmon_rank_last_step",
                                       rank="1") or 0) > 50, 120, "both ranks past step 50")
        os.kill(first["pid"], signal.SIGKILL)
        second = wait_for(lambda: (lambda info: info if info.get("pid") not in (None, first["pid"])
                                   else None)(read_json(out / "collector.json")), 120,
                          "a restarted collector")
        output = _finish(job, 300)
    finally:
        stop_process(job)
    assert second["endpoint"] == first["endpoint"] and "restarting it" in output
    for rank in (0, 1):
        assert read_json(tmp_path / "ranks" / f"rank{rank}.json")["last_step"] == 599
    verdict = _verify(out, "--require-bye")
    print("collector killed and restarted:\n" + verdict.stdout)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    report = read_json(out / "training_report.json")
    assert report["metrics"]["loss"]["count"] >= 500  # steps from before and after the restart


def test_a_frozen_collector_costs_the_ranks_nothing_and_loses_nothing(tmp_path):
    """SIGSTOP of the collector for a few seconds while a rank logs: the rank never blocks or
    fails, and once the collector runs again every step is acknowledged (verify passes)."""
    out = tmp_path / "run"
    with running_collector(out) as (collector, info):
        go = tmp_path / "go"
        rank = _rank(info["endpoint"], tmp_path, 0, 1, "--steps", "1500", "--step-seconds",
                     "0.002", "--wait-file", str(go))
        try:
            collector.send_signal(signal.SIGSTOP)
            go.touch()
            threading.Event().wait(FREEZE_SECONDS)  # the fault itself lasts this long
        finally:
            collector.send_signal(signal.SIGCONT)
        _finish(rank)
        summary = read_json(tmp_path / "rank0.json")
    assert summary["last_step"] == 1499
    print("log() while the collector was frozen: max", round(summary["log_max_us"]), "µs, median",
          round(summary["log_median_us"], 2), "µs; ledger", summary["ledger"])
    verdict = _verify(out, "--require-bye")
    print("collector frozen:\n" + verdict.stdout)
    assert verdict.returncode == 0, verdict.stdout


def test_killed_and_hung_ranks_are_reported_by_rank(tmp_path):
    """One rank killed (SIGKILL), one hung (SIGSTOP): each gets a RANK_SILENT alert naming it,
    within the configured silence (2 s here; 60 s by default)."""
    out = tmp_path / "run"
    with running_collector(out, "--world-size", "3", "--rule", "rank_silent.critical_above=2") \
            as (_, info):
        ranks = [_rank(info["endpoint"], tmp_path, r, 3, "--steps", "100000", "--step-seconds",
                       "0.01") for r in range(3)]
        try:
            wait_for(lambda: all((sample_value(scrape(info["metrics_url"]), "rlmon_rank_last_step",
                                               rank=str(r)) or 0) > 5 for r in range(3)) or None,
                     60, "three ranks logging")
            ranks[0].kill()
            ranks[1].send_signal(signal.SIGSTOP)
            silent = wait_for(lambda: {a["rank"] for a in _alerts(out)
                                       if a["type"] == "RANK_SILENT"} >= {0, 1} or None, 30,
                              "RANK_SILENT for ranks 0 and 1")
            assert silent
            assert 2 not in {a["rank"] for a in _alerts(out) if a["type"] == "RANK_SILENT"}
        finally:
            ranks[1].send_signal(signal.SIGCONT)
            for process in ranks:
                stop_process(process)


def test_close_with_the_collector_gone_is_quick(tmp_path):
    """The collector disappears before the rank closes: close() and interpreter exit stay short
    (bounded by close_timeout, 0.5 s by default)."""
    import time
    out = tmp_path / "run"
    with running_collector(out) as (collector, info):
        go = tmp_path / "go"
        rank = _rank(info["endpoint"], tmp_path, 0, 1, "--steps", "50", "--wait-file", str(go))
        collector.kill()
        collector.wait(30)
        started = time.monotonic()
        go.touch()
        _finish(rank, 60)
        elapsed = time.monotonic() - started
    summary = read_json(tmp_path / "rank0.json")
    print(f"close() took {summary['close_seconds']:.3f} s; the whole rank {elapsed:.2f} s")
    assert summary["close_seconds"] < 5  # a hang would take forever; the budget is 1 s
    assert summary["ledger"]["acked"] == 0 and summary["ledger"]["unacked"] == 50


def test_forked_dataloader_workers_deliver_or_count_their_events(tmp_path):
    """DataLoader workers forked after rlmon.init log through the monitor: their steps reach
    the collector (each worker is its own incarnation) or are counted; nothing hangs."""
    out = tmp_path / "run"
    with running_collector(out) as (_, info):
        rank = _rank(info["endpoint"], tmp_path, 0, 1, "--steps", "20", "--workers", "2")
        _finish(rank, 180)
        summary = read_json(tmp_path / "rank0.json")
        assert summary["items"] == 64
    verdict = _verify(out, "--require-bye")  # every worker closed, its ledger balanced
    print(verdict.stdout)
    assert verdict.returncode == 0, verdict.stdout
    incarnations = [line for line in verdict.stdout.splitlines() if line.startswith("| 0 |")]
    assert len(incarnations) == 3, verdict.stdout  # the rank itself and its two workers
    worker_steps = sum(int(line.split("|")[4]) for line in incarnations) - 20
    assert worker_steps == 64, verdict.stdout  # one log call per item read, all accounted for


def test_a_late_joiner_stops_at_the_same_step(tmp_path):
    """After an operator stop, a rank that connects later learns the stop state in force and
    stops at the same step S as the rank that was running."""
    out = tmp_path / "run"
    with running_collector(out, "--world-size", "2") as (_, info):
        early = _rank(info["endpoint"], tmp_path, 0, 2, "--steps", "100000", "--step-seconds", "0.01")
        try:
            wait_for(lambda: (sample_value(scrape(info["metrics_url"]), "rlmon_rank_last_step",
                                           rank="0") or 0) > 20, 60, "rank 0 past step 20")
            stop = subprocess.run([*rlmon_command(), "stop", str(out), "--reason", "late joiner"],
                                  env=child_env(), capture_output=True, text=True, timeout=60)
            assert stop.returncode == 0, stop.stderr
            at = json.loads(stop.stdout)["stop_at_step"]
            _finish(early)
            late = _rank(info["endpoint"], tmp_path, 1, 2, "--steps", "100000", "--step-seconds", "0.001")
            _finish(late)
        finally:
            stop_process(early)
    # rank 0 stops at S = at, or at a later generation's step if it had already passed `at`
    # when the stop reached it (it refuses; the collector decides again further ahead)
    stopped = read_json(tmp_path / "rank0.json")["stop_step"]
    assert stopped is not None and stopped >= at
    assert read_json(tmp_path / "rank1.json")["stop_step"] == stopped


def test_a_full_disk_stops_acknowledgements_raises_an_alert_and_recovers(tmp_path):
    """The collector's run directory on a real 4 MiB tmpfs that fills up while a rank logs: the
    collector raises EVENT_LOG_FAILED and acknowledges nothing it could not fsync; once space
    returns the alert clears, the rank's held batches drain, and `rlmon verify` passes."""
    from tests.components import small_tmpfs

    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * 3_300_000)
        out = disk / "run"
        with running_collector(out, "--visualization-frequency", "0") as (_, info):
            rank = _rank(info["endpoint"], tmp_path, 0, 1, "--steps", "6000", "--step-seconds",
                         "0.0005", "--keys", "64")
            try:
                wait_for(lambda: sample_value(scrape(info["metrics_url"]), "rlmon_alert_firing",
                                              type="EVENT_LOG_FAILED") == 1 or None, 90,
                         "EVENT_LOG_FAILED firing")
                filler.unlink()
                wait_for(lambda: sample_value(scrape(info["metrics_url"]), "rlmon_alert_firing",
                                              type="EVENT_LOG_FAILED") in (None, 0) or None, 60,
                         "the alert to clear")
                _finish(rank, 180)
            finally:
                stop_process(rank)
        summary = read_json(tmp_path / "rank0.json")
        verdict = _verify(out, "--require-bye")
        alerts = [a for a in _alerts(out) if a["type"] == "EVENT_LOG_FAILED"]
    print("full disk:", summary["ledger"], "\n", verdict.stdout)
    assert summary["ledger"]["acked"] == 6000, summary["ledger"]
    assert verdict.returncode == 0, verdict.stdout
    assert alerts and alerts[0]["severity"] == "CRITICAL"
