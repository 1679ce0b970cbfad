"""Collector ingest throughput: scalars/s through decode → event log → store → aggregates →
detectors, in one process, by batch size. No sockets: frames are encoded up front exactly as a
rank sends them, then fed to the same code the receive loop runs (``wire.decode``,
``EventLog.append`` + one ``commit`` per 2,000 frames as the loop's group commit does, and
``CollectorState.handle``). Every detector is on (the defaults).

Usage::

    python benchmarks/bench_ingest.py --ranks 2 --metrics 32 --steps 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from collector import kernels  # noqa: E402
from collector.eventlog import EventLog  # noqa: E402
from collector.state import CollectorState, StateConfig  # noqa: E402
from rlmon import wire  # noqa: E402
from rlmon.wire import Kind  # noqa: E402


def frames(ranks: int, metrics: int, steps: int, batch: int) -> list[bytes]:
    """HELLOs then BATCH frames of ``batch`` steps, ranks interleaved like a live job."""
    names = [f"m{k:03d}" for k in range(metrics - 2)] + ["reward", "kl"]
    out = [wire.encode(wire.envelope(Kind.HELLO, "b", r, 1, world=ranks, local_rank=r, pid=1,
                                     host="h")) for r in range(ranks)]
    for seq, start in enumerate(range(0, steps, batch), start=1):
        step_range = list(range(start, min(start + batch, steps)))
        for rank in range(ranks):
            rows = [[0.01 + 1e-4 * ((s * 7 + k) % 13) for k in range(metrics)] for s in step_range]
            times = [1000.0 + 0.1 * s for s in step_range]
            out.append(wire.encode(wire.envelope(
                Kind.BATCH, "b", rank, 1, seq=seq, t=times[-1], step=step_range[-1],
                blocks=[[names, step_range, times, rows]])))
    return out


def run_once(encoded: list[bytes], ranks: int) -> float:
    """Seconds to ingest every frame into a fresh state with a real event log."""
    with tempfile.TemporaryDirectory() as tmp:
        state = CollectorState(StateConfig(run_id="b", world_size=ranks))
        log = EventLog(Path(tmp))
        started = time.perf_counter()
        for index, frame in enumerate(encoded):
            message = wire.decode(frame)
            log.append(frame)
            state.handle(message, b"id", 1000.0)
            if index % 2000 == 1999:
                log.commit()
        log.commit()
        elapsed = time.perf_counter() - started
        log.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--metrics", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,8,32,128")
    args = parser.parse_args()
    kernels.warm_up()
    print(f"# {args.ranks} ranks x {args.metrics} scalars x {args.steps} steps; "
          f"{args.rounds} rounds; {platform.python_version()} {platform.machine()}")
    print("\n| steps per batch | scalars/s (median) | µs per batch |\n|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        encoded = frames(args.ranks, args.metrics, args.steps, batch)
        scalars = args.ranks * args.metrics * args.steps
        seconds = statistics.median(run_once(encoded, args.ranks) for _ in range(args.rounds))
        batches = len(encoded) - args.ranks
        print(f"| {batch} | {scalars / seconds:,.0f} | {seconds / batches * 1e6:,.0f} |")


if __name__ == "__main__":
    main()
