"""Per-call cost of logging one step of 16 scalars, side by side, interleaved over rounds.

Measured in the same process and run, round after round in turn:

- ``list.append`` of a ``(step, dict)`` tuple — the floor: nothing leaves the process;
- 16 ``prometheus_client`` ``Gauge.set`` calls — what a hand-made exporter costs;
- ``rlmon`` ``mon.log(step, 16 scalars)`` with a real collector process running.

Each call is timed alone with ``perf_counter_ns`` (whose own cost, measured and printed, is
included in every figure alike). Prints a markdown table of median / p99 / p99.9 / mean in µs
(medians over rounds) and the ratios. Usage::

    python benchmarks/bench_log.py --rounds 5 --calls 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def time_calls(call: Callable[[int], None], calls: int) -> list[int]:
    """Time each of ``calls`` calls alone; returns nanoseconds per call."""
    clock = time.perf_counter_ns
    samples = [0] * calls
    for i in range(calls):
        started = clock()
        call(i)
        samples[i] = clock() - started
    return samples


def summarize(samples: list[int]) -> dict[str, float]:
    """Median, p99, p99.9 and mean in microseconds."""
    ordered = sorted(samples)
    n = len(ordered)
    return {"median": ordered[n // 2] / 1e3, "p99": ordered[int(n * 0.99)] / 1e3,
            "p99.9": ordered[int(n * 0.999)] / 1e3, "mean": sum(ordered) / n / 1e3}


def metrics_dict(step: int) -> dict[str, float]:
    """One step's 16 scalars, fresh floats like a real loop produces."""
    base = float(step)
    return {f"metric_{k:02d}": base + k * 0.5 for k in range(16)}


def make_candidates(endpoint: str) -> dict[str, Callable[[int], None]]:
    """The calls to compare, each taking the step number."""
    import prometheus_client

    import rlmon
    from rlmon.config import RankConfig
    from rlmon.monitor import Monitor

    payloads = [metrics_dict(i) for i in range(64)]
    floor: list = []
    registry = prometheus_client.CollectorRegistry()
    gauges = [prometheus_client.Gauge(f"bench_metric_{k:02d}", "bench", registry=registry)
              for k in range(16)]
    mon = Monitor(RankConfig(endpoint=endpoint, run_id="bench"), endpoint)

    def list_append(i: int) -> None:
        floor.append((i, payloads[i & 63]))

    def gauge_set(i: int) -> None:
        for gauge, value in zip(gauges, payloads[i & 63].values()):
            gauge.set(value)

    def rlmon_log(i: int) -> None:
        mon.log(i, payloads[i & 63])

    candidates = {"list.append (floor)": list_append,
                  "prometheus_client 16 x Gauge.set": gauge_set,
                  "rlmon mon.log (collector running)": rlmon_log}
    candidates["_monitor"] = mon  # closed by the caller
    del rlmon
    return candidates


def start_collector(out_dir: Path) -> tuple[subprocess.Popen, dict]:
    """A real collector process; returns it with its collector.json."""
    process = subprocess.Popen([sys.executable, "-m", "collector", "--out", str(out_dir), "--quiet"],
                               cwd=REPO, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            info = json.loads((out_dir / "collector.json").read_text())
            if info.get("pid") == process.pid:
                return process, info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    process.kill()
    raise SystemExit("collector did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        collector, info = start_collector(Path(tmp))
        try:
            results = run_rounds(info["endpoint"], args.rounds, args.calls)
        finally:
            collector.terminate()
            collector.wait(60)
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run_rounds(endpoint: str, rounds: int, calls: int) -> dict[str, list[dict[str, float]]]:
    """Interleave the candidates round after round; per candidate, one summary per round."""
    candidates = make_candidates(endpoint)
    monitor = candidates.pop("_monitor")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in candidates}
    for name, call in candidates.items():  # warm-up
        time_calls(call, 2_000)
    for _ in range(rounds):
        for name, call in candidates.items():
            results[name].append(summarize(time_calls(call, calls)))
    monitor.close()
    results["_ledger"] = [monitor.statistics()]
    return results


def print_table(results: dict, args: argparse.Namespace) -> None:
    """Markdown table of medians over rounds, with ratios to rlmon."""
    ledger = results.pop("_ledger")[0]
    overhead = summarize(time_calls(lambda i: None, 20_000))["median"]
    print(f"# {args.rounds} rounds x {args.calls} calls, interleaved; {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} cores; timer+call overhead median {overhead:.3f} µs")
    print("\n| call | median µs | p99 µs | p99.9 µs | mean µs |\n|---|---|---|---|---|")
    medians = {}
    for name, rounds in results.items():
        row = {k: statistics.median(r[k] for r in rounds) for k in ("median", "p99", "p99.9", "mean")}
        medians[name] = row
        print(f"| {name} | {row['median']:.2f} | {row['p99']:.2f} | {row['p99.9']:.2f} | {row['mean']:.2f} |")
    rl = medians["rlmon mon.log (collector running)"]
    gauge = medians["prometheus_client 16 x Gauge.set"]
    print(f"\nGauge.set x16 / rlmon: median {gauge['median'] / rl['median']:.1f}x, "
          f"mean {gauge['mean'] / rl['mean']:.1f}x")
    print(f"rlmon ledger: {ledger}")


if __name__ == "__main__":
    main()
