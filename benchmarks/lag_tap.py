"""The real collector (``python -m collector``, same flags) plus a tap that records, for every
block of steps it stores, the seconds from the rank's ``mon.log`` call of the block's last step to
the moment the block is in the store.

The collector itself keeps only a smoothed per-rank lag (``RankInfo.observe_lag``, used to size
stop margins) and exports none of it, so the benchmark wraps that method: it is called once per
stored block, right after the store append, with the block's last log time. The wrapper adds one
``time.time()`` and a list append per block. On exit the samples are saved as a ``(n, 2)`` float64
array of ``(stored at, lag seconds)`` to ``--lag-out`` (``.npy``). Also raises the open-file
limit to its hard maximum (a collector with 1,024 ranks holds 1,024 TCP connections). Usage::

    python benchmarks/lag_tap.py --lag-out lag.npy --out DIR --world-size 1024 ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def install_tap() -> list[tuple[float, float]]:
    """Wrap ``RankInfo.observe_lag``; returns the list the samples go to."""
    from collector import ranks

    samples: list[tuple[float, float]] = []
    original = ranks.RankInfo.observe_lag
    clock = time.time

    def observe_lag(self, sent_at: float, received_at: float) -> None:
        now = clock()
        samples.append((now, now - sent_at))
        original(self, sent_at, received_at)

    ranks.RankInfo.observe_lag = observe_lag
    return samples


def install_gc_watch() -> list[float]:
    """Record the seconds of every collection of Python's cyclic garbage collector."""
    import gc

    pauses: list[float] = []
    started = [0.0]

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info.get("generation") == 2 or time.perf_counter() - started[0] > 0.005:
            pauses.append(time.perf_counter() - started[0])

    gc.callbacks.append(watch)
    return pauses


def main(argv: list[str] | None = None) -> int:
    """Split off ``--lag-out PATH``, run the collector with the rest, save the samples."""
    argv = list(sys.argv[1:] if argv is None else argv)
    index = argv.index("--lag-out")
    lag_out = Path(argv[index + 1])
    del argv[index:index + 2]
    samples = install_tap()  # the collector lifts its own open-file limit when it starts
    pauses = install_gc_watch()
    from collector.cli import main as collector_main

    try:
        return collector_main(argv)
    finally:
        import numpy as np

        np.save(lag_out, np.array(samples, dtype=np.float64).reshape(-1, 2))
        if pauses:
            print(f"lag_tap: {len(pauses)} gc pauses, total {sum(pauses):.3f} s, "
                  f"max {max(pauses) * 1e3:.1f} ms", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
