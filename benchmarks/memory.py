"""Collector memory against series × capacity (part 5).

For each ``SERIESxCAPACITY`` point of ``--memory-grid``, a fresh process imports the collector,
compiles its kernels (the baseline RSS), builds a :class:`~collector.state.CollectorState` with
that capacity and fills it through the real ingest path — frames encoded as a rank's publisher
encodes them, ``wire.decode``, ``CollectorState.handle`` (store, aggregates, detectors; no socket,
no event log) — with 8 ranks × SERIES/8 metrics for CAPACITY steps, so every ring is full. It
reports RSS after the fill, the peak (``VmHWM``, including one full snapshot with history, what
the final reports read), the delta over the baseline, and the store's own arrays
(16 bytes a point). DESIGN.md's budget: RSS ≤ 300 MB with 2,000 series × 10,000 points. Usage::

    python benchmarks/memory.py --memory-grid 2000x10000,1000x10000,2000x1000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (REPO, rss_bytes, run_json_command,  # noqa: E402
                               standalone, status_kib, table)

DEFAULTS = {"memory_grid": "2000x10000,1000x10000,2000x1000", "memory_ranks": 8}
QUICK = {"memory_grid": "200x1000"}
STEPS_PER_FRAME = 128
BUDGET_MB = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's flags (None: the default, or the quick value with ``--quick``)."""
    group = parser.add_argument_group("collector memory (part 5)")
    group.add_argument("--memory-grid", help="comma-separated SERIESxCAPACITY points "
                                             f"(default {DEFAULTS['memory_grid']})")
    group.add_argument("--memory-ranks", type=int, help="ranks the series are spread over (8)")


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Each grid point in a fresh process."""
    points = []
    for item in args.memory_grid.split(","):
        series, capacity = (int(x) for x in item.lower().split("x"))
        print(f"  memory: {series} series x {capacity} points", file=sys.stderr, flush=True)
        command = [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--one",
                   str(series), str(capacity), str(args.memory_ranks)]
        points.append({"series": series, "capacity": capacity,
                       **run_json_command(command, timeout=3600)})
    return {"points": points, "settings": {k: getattr(args, k) for k in DEFAULTS}}


def frames(ranks: int, metrics: int, steps: int) -> Iterator[bytes]:
    """HELLOs, then BATCH frames of ``STEPS_PER_FRAME`` steps per rank, made one at a time."""
    from rlmon import wire
    from rlmon.publisher import encode_blocks
    from rlmon.wire import Kind

    names = [f"m{k:04d}" for k in range(metrics - 2)] + ["reward", "kl"]
    for rank in range(ranks):
        yield wire.encode(wire.envelope(Kind.HELLO, "mem", rank, 1, world=ranks, local_rank=rank,
                                        pid=1, host="h"))
    for seq, start in enumerate(range(0, steps, STEPS_PER_FRAME), start=1):
        step_range = range(start, min(start + STEPS_PER_FRAME, steps))
        for rank in range(ranks):
            records = [(s, 1000.0 + 0.1 * s, {n: 0.01 + 1e-4 * ((s * 7 + k) % 13)
                                              for k, n in enumerate(names)}) for s in step_range]
            blocks, _ = encode_blocks(records)
            yield wire.encode(wire.envelope(Kind.BATCH, "mem", rank, 1, seq=seq, t=records[-1][1],
                                            step=step_range[-1], blocks=blocks))


def measure_one(series: int, capacity: int, ranks: int) -> dict[str, Any]:
    """Fill a state with ``series`` rank series of ``capacity`` points; RSS figures in MB."""
    from collector import kernels
    from collector.state import CollectorState, StateConfig
    from rlmon import wire

    kernels.warm_up()
    metrics = max(2, series // ranks)
    state = CollectorState(StateConfig(run_id="mem", world_size=ranks, capacity=capacity,
                                       max_series=2 * ranks * metrics + 4 * metrics + 64))
    gc.collect()
    baseline = rss_bytes(os.getpid()) or 0
    started = time.perf_counter()
    for frame in frames(ranks, metrics, capacity):
        state.handle(wire.decode(frame), b"id", time.time())
    state.finish(time.time())
    fill_s = time.perf_counter() - started
    gc.collect()
    filled = rss_bytes(os.getpid()) or 0
    snapshot = state.snapshot(time.time(), with_history=True, finished=True)
    peak = 1024 * (status_kib(os.getpid(), "VmHWM") or 0)
    del snapshot
    stored = state.store.series_count
    return {"store_series": stored, "rank_series": ranks * metrics, "baseline_mb": baseline / 2**20,
            "rss_mb": filled / 2**20, "delta_mb": (filled - baseline) / 2**20,
            "peak_mb": peak / 2**20, "store_arrays_mb": 16 * capacity * stored / 2**20,
            "fill_s": fill_s, "scalars_per_s": ranks * metrics * capacity / fill_s}


def markdown(results: dict[str, Any]) -> str:
    """One row per grid point and the budget line."""
    rows = []
    for p in results["points"]:
        if "error" in p:
            rows.append([p["series"], p["capacity"], p["error"][:160]] + ["–"] * 7)
            continue
        rows.append([p["series"], p["capacity"], p["store_series"], p["baseline_mb"], p["rss_mb"],
                     p["delta_mb"], p["peak_mb"], p["store_arrays_mb"], p["fill_s"],
                     p["scalars_per_s"]])
    lines = ["## Collector memory against series × capacity\n",
             f"Series spread over {results['settings']['memory_ranks']} ranks; every ring full. "
             "\"store series\" adds the collector's own cross-rank series. Peak includes one full "
             "snapshot with history (what the final reports read).\n",
             table(["rank series", "capacity", "store series", "baseline RSS MB", "RSS MB",
                    "delta MB", "peak MB", "store arrays MB", "fill s", "scalars/s (fill)"], rows)]
    for p in results["points"]:
        if p.get("series") == 2000 and p.get("capacity") == 10_000 and "rss_mb" in p:
            verdict = "met" if p["rss_mb"] <= BUDGET_MB else "**MISSED**"
            lines.append(f"\nBudget (DESIGN.md) RSS ≤ {BUDGET_MB:g} MB at 2,000 series × 10,000 "
                         f"points: {p['rss_mb']:.0f} MB (peak {p['peak_mb']:.0f} MB) — "
                         f"{verdict}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """Run this part alone, or (``--one SERIES CAPACITY RANKS``) one point, printing JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--one"]:
        series, capacity, ranks = (int(x) for x in argv[1:4])
        print(json.dumps(measure_one(series, capacity, ranks)))
        return None
    return standalone("memory", __doc__, add_arguments, DEFAULTS, QUICK, run, markdown, argv)


if __name__ == "__main__":
    main()
