"""``rlmon top DIR`` and the view in ``rlmon launch`` against a real collector fed by real ranks,
with the output piped (so: plain lines, no escape codes)."""

from __future__ import annotations

import subprocess
import sys

from rlmon.config import RankConfig
from rlmon.monitor import Monitor
from tests.integration.helpers import (child_env, rlmon_command, running_collector, sample_value,
                                       scrape_until, stop_process, wait_for)

STEPS = 20


def _publish(endpoint: str, steps: int = STEPS) -> None:
    """Two ranks log ``steps`` steps of RL-looking metrics, then close."""
    monitors = [Monitor(RankConfig(rank=r, world_size=2, endpoint=endpoint, run_id="top"), endpoint)
                for r in range(2)]
    try:
        for step in range(steps):
            for rank, mon in enumerate(monitors):
                mon.log(step, {"reward": step / steps + 0.01 * rank, "kl": 0.01,
                               "loss": 1.0 / (step + 1), "entropy": 2.0 - step / steps})
    finally:
        for mon in monitors:
            mon.close()


def _all_steps_served(url: str) -> str:
    """Wait until /metrics shows both ranks at the last step."""
    return scrape_until(url, lambda text: all(
        sample_value(text, "rlmon_rank_last_step", rank=str(r)) == STEPS - 1 for r in (0, 1)),
        60, "both ranks' last step on /metrics")


def test_top_once_prints_plain_lines(tmp_path):
    """`rlmon top DIR --once`, piped: one plain status line with progress, ranks and metrics,
    and a line per alert, without escape codes."""
    out = tmp_path / "run"
    with running_collector(out) as (_, info):
        _publish(info["endpoint"])
        _all_steps_served(info["metrics_url"])
        result = subprocess.run([*rlmon_command(), "top", str(out), "--once", "--total-steps",
                                 str(STEPS)], env=child_env(), capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    status = [line for line in result.stdout.splitlines() if line.startswith("rlmon: step")]
    assert len(status) == 1, result.stdout
    line = status[0]
    assert line.startswith(f"rlmon: step {STEPS - 1}/{STEPS} (100%)")
    assert "ranks 2/2" in line and "stop: none" in line and "rejected 0" in line
    for metric in ("reward", "kl", "loss", "entropy"):
        assert f" {metric} " in line
    assert "reward 0.955↑" in line and "loss 0.05↓" in line


def test_top_follows_until_the_collector_exits(tmp_path):
    """Piped and left running, `rlmon top` prints status lines and ends by itself (exit 0) once
    the collector is gone; started on the finished run, it says so (exit 2) without waiting."""
    out = tmp_path / "run"
    log = tmp_path / "top.log"
    with running_collector(out) as (collector, info):
        _publish(info["endpoint"])
        _all_steps_served(info["metrics_url"])
        with open(log, "w") as sink:
            top = subprocess.Popen([*rlmon_command(), "top", str(out), "--interval", "0.2",
                                    "--plain-interval", "0.2"], env=child_env(), stdout=sink,
                                   stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: f"rlmon: step {STEPS - 1}" in log.read_text(), 60, "a status line")
            stop_process(collector)
            assert top.wait(30) == 0
        finally:
            stop_process(top)
    text = log.read_text()
    assert "\x1b" not in text
    assert text.rstrip().endswith(f"the collector has exited; reports in {out}")
    after = subprocess.run([*rlmon_command(), "top", str(out), "--once"], env=child_env(),
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 2 and "the run has finished" in after.stderr


def test_top_without_a_collector_is_an_error(tmp_path):
    """No collector in DIR: exit code 2 and a message saying what was waited for."""
    result = subprocess.run([*rlmon_command(), "top", str(tmp_path), "--wait", "0.5"],
                            env=child_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "waiting for" in result.stderr and "collector.json" in result.stderr


_JOB = ("import rlmon, sys\n"
        "mon = rlmon.init()\n"
        "for step in range(30):\n"
        "    mon.log(step, {'reward': step / 30})\n"
        "print('job stdout line'); print('job stderr line', file=sys.stderr)\n"
        "mon.close()\n")


def test_launch_piped_prints_status_lines_and_keeps_the_command_output(tmp_path):
    """Not on a terminal, `rlmon launch` leaves the command's own stdout and stderr alone and adds
    plain status lines on stderr; `--no-top` adds none."""
    def launch(out, *flags):
        return subprocess.run([*rlmon_command(), "launch", "--out", str(out), *flags, "--",
                               sys.executable, "-c", _JOB], env=child_env(), capture_output=True,
                              text=True, timeout=180)

    with_view = launch(tmp_path / "a")
    assert with_view.returncode == 0, with_view.stderr
    assert with_view.stdout.strip() == "job stdout line"
    assert "job stderr line" in with_view.stderr and "\x1b" not in with_view.stderr
    status = [line for line in with_view.stderr.splitlines() if " · ranks " in line]
    assert status and all(line.startswith("rlmon: ") for line in status)
    without = launch(tmp_path / "b", "--no-top")
    assert without.returncode == 0, without.stderr
    assert not [line for line in without.stderr.splitlines() if " · ranks " in line]
