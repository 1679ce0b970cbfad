"""``/metrics`` scrape time of a real collector holding R ranks × M metrics (part 5).

For each rank count, a real collector process (rlmon's launcher; default ``--max-rank-labels 64``,
so past 64 ranks it exports aggregates and the worst ranks instead of per-rank series) is fed,
through one DEALER socket per rank, HELLO and BATCH frames encoded as a rank's publisher encodes
them: ``--scrape-metrics`` metrics for ``--scrape-steps`` steps. Once the collector has stored
them all, ``--scrape-count`` sequential HTTP GETs of ``/metrics`` are timed (whole body read).
DESIGN.md's budget: ≤ 100 ms at 64 ranks × 50 metrics. Usage::

    python benchmarks/scrape.py --scrape-ranks 64,1024 --scrape-metrics 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (int_list, percentiles, sample_sum, scrape, standalone,  # noqa: E402
                               start_collector, stop_process, table, wait_for)

DEFAULTS = {"scrape_ranks": "64,1024", "scrape_metrics": 50, "scrape_steps": 20,
            "scrape_count": 50}
QUICK = {"scrape_ranks": "64", "scrape_steps": 5, "scrape_count": 5}
BUDGET_MS = 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's flags (None: the default, or the quick value with ``--quick``)."""
    group = parser.add_argument_group("/metrics scrape (part 5)")
    group.add_argument("--scrape-ranks", help="comma-separated rank counts (default 64,1024)")
    group.add_argument("--scrape-metrics", type=int, help="metrics per rank (50)")
    group.add_argument("--scrape-steps", type=int, help="steps each rank sends (20)")
    group.add_argument("--scrape-count", type=int, help="timed scrapes (50)")


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Each rank count against a fresh collector."""
    points = []
    for ranks in int_list(args.scrape_ranks):
        print(f"  scrape: {ranks} ranks x {args.scrape_metrics} metrics", file=sys.stderr,
              flush=True)
        points.append({"ranks": ranks, **measure(ranks, args.scrape_metrics, args.scrape_steps,
                                                 args.scrape_count)})
    return {"points": points, "settings": {k: getattr(args, k) for k in DEFAULTS}}


def measure(ranks: int, metrics: int, steps: int, count: int) -> dict[str, Any]:
    """Feed the collector, wait until it stored everything, time ``count`` scrapes."""
    with tempfile.TemporaryDirectory(prefix="rlmon-scrape-") as tmp:
        collector, info = start_collector(Path(tmp) / "collector", "--world-size", str(ranks),
                                          "--visualization-frequency", "0", run_id="bench-scrape")
        try:
            context, sockets = feed(info["endpoint"], ranks, metrics, steps)
            url, wanted = info["metrics_url"], ranks * metrics * steps
            stored = wait_for(lambda: sample_sum(scrape(url), "rlmon_scalars_received_total")
                              >= wanted, timeout=120, poll=0.25)
            times, size = _timed_scrapes(url, count)
            for sock in sockets:
                sock.close(linger=0)
            context.term()
        finally:
            stop_process(collector)
    return {"stored_all": bool(stored), "bytes": size,
            **{k: v * 1e3 for k, v in percentiles(times, (50, 99)).items() if k != "n"},
            "mean": statistics.fmean(times) * 1e3, "count": len(times)}


def feed(endpoint: str, ranks: int, metrics: int, steps: int):
    """One DEALER per rank sends HELLO and its BATCH frames; returns (context, sockets)."""
    import zmq

    from rlmon import wire
    from rlmon.publisher import encode_blocks
    from rlmon.wire import Kind

    names = [f"m{k:03d}" for k in range(metrics - 2)] + ["reward", "kl"]
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, ranks + 64)  # the default (1,023) is below 1,024 ranks
    sockets = []
    for rank in range(ranks):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(endpoint)
        sock.send(wire.encode(wire.envelope(Kind.HELLO, "bench-scrape", rank, 1, world=ranks,
                                            local_rank=rank % 8, pid=1, host=f"node{rank // 8}")))
        now = time.time()
        records = [(s, now, {n: 0.01 + 1e-4 * ((s * 7 + k + rank) % 13)
                             for k, n in enumerate(names)}) for s in range(steps)]
        blocks, _ = encode_blocks(records)
        sock.send(wire.encode(wire.envelope(Kind.BATCH, "bench-scrape", rank, 1, seq=1, t=now,
                                            step=steps - 1, blocks=blocks)))
        sockets.append(sock)
    return context, sockets


def _timed_scrapes(url: str, count: int) -> tuple[list[float], int]:
    scrape(url)  # the first one warms the HTTP server thread
    times, size = [], 0
    for _ in range(count):
        started = time.perf_counter()
        size = len(scrape(url, timeout=60))
        times.append(time.perf_counter() - started)
    return times, size


def markdown(results: dict[str, Any]) -> str:
    """One row per rank count and the budget line."""
    m = results["settings"]["scrape_metrics"]
    rows = [[p["ranks"], m, p.get("p50"), p.get("p99"), p.get("max"), p.get("mean"),
             p.get("bytes"), p.get("count"), p.get("stored_all")] for p in results["points"]]
    lines = ["## `/metrics` scrape time\n",
             "Sequential GETs of a real collector's `/metrics` (body read), after every frame "
             "was stored; `--max-rank-labels 64` (the default).\n",
             table(["ranks", "metrics", "p50 ms", "p99 ms", "max ms", "mean ms", "bytes",
                    "scrapes", "all stored"], rows)]
    for p in results["points"]:
        if p["ranks"] == 64 and m == 50 and p.get("p50") is not None:
            verdict = "met" if p["p50"] <= BUDGET_MS else "**MISSED**"
            lines.append(f"\nBudget (DESIGN.md) ≤ {BUDGET_MS:g} ms at 64 ranks × 50 metrics: "
                         f"p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms — {verdict}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run this part alone."""
    return standalone("scrape", __doc__, add_arguments, DEFAULTS, QUICK, run, markdown, argv)


if __name__ == "__main__":
    main()
