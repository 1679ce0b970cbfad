"""One rank for the fault tests, without torchrun: ``RLMON_*`` and ``RANK``/``WORLD_SIZE`` come
from the environment. Logs ``--steps`` steps of ``--keys`` scalars (8) at ``--step-seconds`` a step, times every
``log`` call, and writes ``<out>/rank<R>.json``: the last step, the stop step (if the collector
stopped it), the slowest and median ``log`` call, the seconds ``close()`` took, and the ledger.

``--workers N`` also runs a torch DataLoader with N worker processes (fork start method) whose
dataset logs one value per item through the rank's monitor (forked after ``rlmon.init``).
``--wait-file F`` waits (polling) until F exists before the first step.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import rlmon


class LoggingDataset:
    """A map-style dataset whose items log from whatever process reads them."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        rlmon.get().log(index, {"worker/item": float(index), "worker/pid": float(os.getpid())})
        return index


def run_workers(workers: int, items: int) -> int:
    """Read ``items`` items through a DataLoader with ``workers`` forked workers."""
    import torch.multiprocessing as mp
    from torch.utils.data import DataLoader

    loader = DataLoader(LoggingDataset(items), batch_size=4, num_workers=workers,
                        multiprocessing_context=mp.get_context("fork"))
    return sum(len(batch) for batch in loader)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-seconds", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--keys", type=int, default=8, help="scalars a step")
    parser.add_argument("--wait-file", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    mon = rlmon.init()
    while args.wait_file is not None and not args.wait_file.exists():
        time.sleep(0.01)  # a test's go signal, polled
    items = run_workers(args.workers, 64) if args.workers else 0
    durations, stop_step, step = [], None, -1
    for step in range(args.steps):
        started = time.perf_counter()
        mon.log(step, {f"m{k}": step * 0.01 + k for k in range(args.keys - 1)} | {"kl": 0.01})
        durations.append(time.perf_counter() - started)
        if mon.should_stop(step):
            stop_step = step
            break
        time.sleep(args.step_seconds)
    started = time.perf_counter()
    statistics_before_close = mon.statistics()
    mon.close()
    close_seconds = time.perf_counter() - started
    summary = {"rank": rank, "last_step": step, "stop_step": stop_step, "items": items,
               "log_max_us": max(durations) * 1e6, "log_median_us": statistics.median(durations) * 1e6,
               "close_seconds": close_seconds, "ledger": mon.statistics(),
               "ledger_before_close": statistics_before_close}
    (args.out / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
