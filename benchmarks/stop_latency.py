"""Stop latency: from the offending event to every rank holding the stop state (part 5).

Each trial starts a real collector (rlmon's launcher) and forks ``--stop-ranks`` ranks (rlmon's
real publisher each). The ranks run a toy loop on one shared schedule (a step every
``--stop-period`` seconds), log ``kl`` (0.01), ``reward`` and ``loss`` and call
``should_stop(step)`` at the top of every step. At a known step rank 0 logs ``kl = 10`` (the
cross-rank mean passes the critical threshold, 0.2 by default: the KL rule stops) and notes the
wall time just before that ``mon.log`` call. Every rank records, on the same clock:

* **arrived** — when the stop state reached the rank (its publisher holds it; polled every 1 ms
  while the rank waits for its next step), the figure DESIGN.md's budget is about;
* **seen by the loop** — the first ``should_stop`` call after that (adds up to one step period);
* **should_stop true** — when the loop leaves (the collector picks a step ahead of every rank).

Per trial the figure is the slowest rank; the table gives median and max over trials, and whether
every rank left at the same step. Usage::

    python benchmarks/stop_latency.py --stop-trials 10 --stop-ranks 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (fork_call, reap, standalone, start_collector,  # noqa: E402
                               stop_process, table)

DEFAULTS = {"stop_trials": 10, "stop_ranks": 4, "stop_period": 0.01, "stop_after": 2.0}
QUICK = {"stop_trials": 2, "stop_ranks": 2}
OFFENDING_KL = 10.0
BUDGET_S = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's flags (None: the default, or the quick value with ``--quick``)."""
    group = parser.add_argument_group("stop latency (part 5)")
    group.add_argument("--stop-trials", type=int, help="trials, a fresh collector each (10)")
    group.add_argument("--stop-ranks", type=int, help="ranks per trial (4)")
    group.add_argument("--stop-period", type=float, help="seconds per toy step (0.01)")
    group.add_argument("--stop-after", type=float, help="seconds before the offending step (2)")


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """All trials; per trial each rank's record."""
    trials = []
    for trial in range(args.stop_trials):
        print(f"  stop latency: trial {trial}", file=sys.stderr, flush=True)
        trials.append(run_trial(args))
    return {"trials": trials, "settings": {k: getattr(args, k) for k in DEFAULTS}}


def run_trial(args: argparse.Namespace) -> dict[str, Any]:
    """One collector, the forked ranks, their records."""
    import rlmon  # noqa: F401  (before the fork)

    ranks = args.stop_ranks
    with tempfile.TemporaryDirectory(prefix="rlmon-stop-") as tmp:
        collector, info = start_collector(Path(tmp) / "collector", "--world-size", str(ranks),
                                          "--visualization-frequency", "0", run_id="bench-stop")
        try:
            plan = {"world": ranks, "endpoint": info["endpoint"], "period": args.stop_period,
                    "t0": time.time() + 1.0 + 0.01 * ranks, "dir": tmp,
                    "bad_step": int(args.stop_after / args.stop_period),
                    "max_steps": int((args.stop_after + 10.0) / args.stop_period)}
            pids = [fork_call(stop_rank, rank, plan) for rank in range(ranks)]
            reap(pids, timeout=args.stop_after + 60)
        finally:
            stop_process(collector)
        records = [_read(Path(tmp) / f"stop-{rank}.json") for rank in range(ranks)]
    return summarize_trial(records, plan["bad_step"])


def stop_rank(rank: int, plan: dict) -> int:
    """A toy rank (forked child): the loop, the offending log on rank 0, the times it saw."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(plan["world"]),
                      RLMON_ENDPOINT=plan["endpoint"], RLMON_RUN_ID="bench-stop")
    import rlmon

    mon = rlmon.init()
    record: dict[str, Any] = {"rank": rank}
    for step in range(plan["max_steps"]):
        _wait_for_step(mon, plan["t0"] + step * plan["period"], record)
        stop = mon.should_stop(step)
        if "seen_at" not in record and mon.stop_at_step is not None:
            record.update(seen_at=time.time(), seen_step=step)
        if stop:
            record.update(true_at=time.time(), stopped_step=step)
            break
        kl = OFFENDING_KL if rank == 0 and step == plan["bad_step"] else 0.01
        if kl == OFFENDING_KL:
            record["offended_at"] = time.time()
        mon.log(step, {"kl": kl, "reward": 1.0 + 0.001 * step, "loss": 0.5})
    record.update(stop_at_step=mon.stop_at_step, reason=mon.stop_reason)
    mon.close()
    Path(plan["dir"], f"stop-{rank}.json").write_text(json.dumps(record))
    return 0


def _wait_for_step(mon, due: float, record: dict[str, Any]) -> None:
    """Sleep until ``due`` in 1 ms slices, noting when the stop state first arrives."""
    publisher = mon._publisher  # the benchmark peeks at the sender's state for arrival times
    while True:
        now = time.time()
        if "arrived_at" not in record and publisher.stop_offer is not None:
            record["arrived_at"] = now
        if now >= due:
            return
        time.sleep(min(0.001, due - now))


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": f"no record at {path.name}"}


def summarize_trial(records: list[dict[str, Any]], bad_step: int) -> dict[str, Any]:
    """Slowest rank's arrival, loop-visible and stop latencies; same-step check."""
    offended = next((r.get("offended_at") for r in records if r.get("rank") == 0), None)
    out: dict[str, Any] = {"records": records, "bad_step": bad_step}
    if offended is None:
        return {**out, "error": "rank 0 did not log the offending step"}
    for key in ("arrived_at", "seen_at", "true_at"):
        times = [r.get(key) for r in records]
        out[key.replace("_at", "_s")] = (max(times) - offended) if all(times) else None
    steps = {r.get("stopped_step") for r in records}
    out.update(stopped_steps=sorted(s for s in steps if s is not None),
               same_step=len(steps) == 1 and None not in steps,
               stop_at_step=records[0].get("stop_at_step"))
    return out


def markdown(results: dict[str, Any]) -> str:
    """Per-trial rows, then median and max over trials and the budget line."""
    trials = results["trials"]
    rows = [[i, _ms(t.get("arrived_s")), _ms(t.get("seen_s")), _ms(t.get("true_s")),
             t.get("bad_step"), t.get("stop_at_step"), t.get("same_step"), t.get("error", "")]
            for i, t in enumerate(trials)]
    arrived = [t["arrived_s"] for t in trials if t.get("arrived_s") is not None]
    s = results["settings"]
    lines = ["## Stop latency: offending event → every rank holds the stop state\n",
             f"{s['stop_ranks']} ranks, a step every {s['stop_period'] * 1e3:g} ms, rank 0 logs "
             f"kl = {OFFENDING_KL:g} at step {trials[0].get('bad_step') if trials else '–'}; "
             "figures are the slowest rank's, from just before the offending `mon.log` call.\n",
             table(["trial", "arrived ms", "seen by loop ms", "should_stop true ms",
                    "offending step", "stop at step", "all ranks same step", "error"], rows)]
    if arrived:
        median = statistics.median(arrived)
        lines.append(f"\nArrived: median {median * 1e3:.1f} ms, max {max(arrived) * 1e3:.1f} ms "
                     f"over {len(arrived)} trials. Budget (DESIGN.md) median ≤ 100 ms — "
                     f"{'met' if median <= BUDGET_S else '**MISSED**'}.\n")
    return "\n".join(lines)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def main(argv: list[str] | None = None) -> dict:
    """Run this part alone."""
    return standalone("stop_latency", __doc__, add_arguments, DEFAULTS, QUICK, run, markdown, argv)


if __name__ == "__main__":
    main()
