"""A real collector process answering a real Monitor's queries over ZeroMQ."""

from __future__ import annotations

import time

from rlmon.config import RankConfig
from rlmon.embedded import start_embedded_collector
from rlmon.monitor import Monitor


def test_monitor_query_answers_from_a_live_collector(tmp_path):
    """Logged steps are visible to a following query; a dead collector gives None, not a hang."""
    config = RankConfig(run_id="q1", out_dir=str(tmp_path / "run"))
    embedded = start_embedded_collector(config)
    assert embedded.wait_until_ready()
    mon = Monitor(config, embedded.endpoint, on_close=embedded.finalize,
                  before_close=embedded.wait_until_ready)
    try:
        for step in range(5):
            mon.log(step, {"reward": float(step), "kl": 0.01})
        metrics = mon.query("metrics", name="reward", n=5)
        assert metrics is not None
        assert metrics["metrics"]["reward"]["values"][-1] == 4.0
        assert mon.query("stop") == {"stopped": False}
        assert "error" in mon.query("bogus")
    finally:
        mon.close()
    started = time.monotonic()
    assert mon.query("stop", timeout=0.2) is None
    assert time.monotonic() - started < 1.0
