"""The scale benchmark's own machinery, run small: simulated ranks straight to a real collector
and through relays, with rlmon's publisher and with the lean client. Each must deliver every
step it emitted (the benchmark's loss figure is only as good as this)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.helpers import REPO, child_env


@pytest.mark.parametrize("rank_kind, ranks_per_relay, steps_per_frame",
                         [("publisher", 2, 1), ("lean", 0, 3), ("lean", 3, 1)])
def test_scale_run_delivers_every_step(tmp_path, rank_kind, ranks_per_relay, steps_per_frame):
    """4 ranks × 2 s at 10 steps/s: every step stored, none dropped, the relays counted."""
    result = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--one", "4",
                          "--seconds", "2", "--rate", "10", "--scalars", "4",
                          "--ranks-per-relay", str(ranks_per_relay), "--rank-kind", rank_kind,
                          "--ranks-per-process", "2", "--steps-per-frame", str(steps_per_frame),
                          "--result", str(result)],
                         env=child_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads(result.read_text())
    assert record["ranks_reported"] == 4, record
    assert record["emitted"] == 4 * 20
    assert record["collector_scalars"] == 4 * 20 * 4, record
    assert not sum(record["ranks_dropped"].values()), record
    assert record["relays"] == (-(-4 // ranks_per_relay) if ranks_per_relay else 0)
    assert record["lag"]["n"] > 0
    if rank_kind == "lean":  # one BATCH frame per steps_per_frame steps, the last one shorter
        assert record["collector_batches"] == 4 * -(-20 // steps_per_frame), record
