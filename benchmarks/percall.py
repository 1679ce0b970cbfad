"""Per-call cost of logging one step, rlmon side by side with the trackers people use (part 1),
and rlmon with its collector absent, frozen, at 256 scalars and for text samples (part 2).

Every (backend, pacing) runs in a fresh process (:mod:`benchmarks.percall_worker`), all of them
once per round, rounds interleaved and the backend order rotated each round; each cell is the
median over rounds of the per-round figure, and ratios to rlmon are taken within a round, then
their median. rlmon backends log against one real collector process started with rlmon's own
launcher (``python -m collector``); steps keep rising across runs. After each rlmon run the
rank's ledger is checked against what the collector stored (emitted = stored + dropped +
unacknowledged at exit). Usage::

    python benchmarks/percall.py --rounds 5 --calls 20000 --paced-calls 5000
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

from benchmarks.common import (REPO, child_env, fmt, run_json_command,  # noqa: E402
                               sample_sum, scrape, standalone, start_collector, stop_process,
                               table)
from benchmarks.percall_backends import (COMPARISON, LABELS, RLMON_BACKENDS, SLOW,  # noqa: E402
                                         VARIANTS)

PACING_TITLES = {"tight": "back to back", "sleep": "1 ms `time.sleep` between calls",
                 "spin": "1 ms busy work between calls"}
DEFAULTS = {"rounds": 5, "calls": 20_000, "paced_calls": 5_000, "slow_calls": 2_000,
            "warmup": 1_000, "budget": 20.0, "backends": ",".join(COMPARISON + VARIANTS),
            "pacings": "tight,sleep,spin"}
QUICK = {"rounds": 1, "calls": 400, "paced_calls": 200, "slow_calls": 100, "warmup": 50,
         "budget": 5.0}
STAT_KEYS = ("median", "p99", "p99.9", "mean")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's flags (None: the default, or the quick value with ``--quick``)."""
    group = parser.add_argument_group("per-call cost (parts 1 and 2)")
    group.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    group.add_argument("--calls", type=int, help="timed calls back to back per run (default 20000)")
    group.add_argument("--paced-calls", type=int, help="timed calls per paced run (default 5000)")
    group.add_argument("--slow-calls", type=int,
                       help="cap for wandb, TensorBoard, MLflow (default 2000; MLflow async must "
                            "flush them all at end_run)")
    group.add_argument("--warmup", type=int, help="untimed calls first (default 1000; paced: /10)")
    group.add_argument("--budget", type=float, help="seconds of timed loop per run at most (20)")
    group.add_argument("--backends", help="comma-separated backends (default: all)")
    group.add_argument("--pacings", help="comma-separated: tight,sleep,spin (default: all three)")


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Every round × pacing × backend; raw per-run records plus the collector's rejections."""
    backends = [b for b in args.backends.split(",") if b]
    pacings = [p for p in args.pacings.split(",") if p]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rlmon-percall-") as tmp:
        collector, info = start_collector(Path(tmp) / "collector", "--visualization-frequency", "0",
                                          run_id="bench-percall")
        try:
            offset = 0
            for round_index in range(args.rounds):
                for pacing in pacings:
                    for backend in _rotated(backends, round_index):
                        record = _run_one(args, backend, pacing, info, offset, Path(tmp))
                        offset += record.get("calls_made", 0) + 1
                        records.append({**record, "round": round_index})
                        _progress(record)
            rejected = _rejections(info["metrics_url"])
        finally:
            stop_process(collector)
    return {"records": records, "collector_rejected": rejected, "backends": backends,
            "pacings": pacings, "settings": {k: getattr(args, k) for k in DEFAULTS}}


def _rotated(items: list[str], by: int) -> list[str]:
    by %= max(1, len(items))
    return items[by:] + items[:by]


def _calls_for(args: argparse.Namespace, backend: str, pacing: str) -> tuple[int, int]:
    """(timed calls, warm-up calls) for a run."""
    calls = args.calls if pacing == "tight" else args.paced_calls
    warmup = args.warmup if pacing == "tight" else max(10, args.warmup // 10)
    if backend in SLOW:
        calls, warmup = min(calls, args.slow_calls), min(warmup, max(10, args.slow_calls // 10))
    return calls, warmup


def _run_one(args: argparse.Namespace, backend: str, pacing: str, info: dict, offset: int,
             tmp: Path) -> dict[str, Any]:
    """One worker process; for rlmon backends on the shared collector, the steps it stored."""
    calls, warmup = _calls_for(args, backend, pacing)
    result_path = tmp / f"result-{backend}-{pacing}.json"
    command = [sys.executable, str(REPO / "benchmarks" / "percall_worker.py"), "--backend", backend,
               "--pacing", pacing, "--calls", str(calls), "--warmup", str(warmup),
               "--budget", str(args.budget), "--endpoint", info["endpoint"],
               "--metrics-url", info["metrics_url"], "--step-offset", str(offset),
               "--result", str(result_path)]
    shared = backend in RLMON_BACKENDS and backend not in ("rlmon_absent", "rlmon_frozen")
    before = _rank0_scalars(info["metrics_url"]) if shared else 0.0
    outcome = run_json_command(command, timeout=args.budget * 4 + 240, env=child_env())
    record = _read_result(result_path, outcome)
    if shared and "summary" in record and record.get("keys_per_step"):
        stored = _stored_since(info["metrics_url"], before)
        record["stored_steps"] = stored / record["keys_per_step"]
    record.update(backend=backend, pacing=pacing)
    return record


def _read_result(path: Path, outcome: dict) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": outcome.get("error", "no result written")}


def _rank0_scalars(url: str) -> float:
    return sample_sum(scrape(url), "rlmon_rank_scalars_received_total", rank="0")


def _stored_since(url: str, before: float) -> float:
    """Scalars rank 0 added since ``before``, read once two snapshots agree (bounded wait)."""
    deadline = time.monotonic() + 15
    last = _rank0_scalars(url)
    while time.monotonic() < deadline:
        time.sleep(0.6)  # more than two snapshot intervals (0.25 s)
        now = _rank0_scalars(url)
        if now == last:
            break
        last = now
    return last - before


def _rejections(url: str) -> dict[str, float]:
    from benchmarks.common import by_label

    return by_label(scrape(url), "rlmon_frames_rejected_total", "reason")


def _progress(record: dict[str, Any]) -> None:
    summary = record.get("summary") or {}
    state = record.get("error") or record.get("not_installed") and "not installed" or \
        f"median {summary.get('median', 0):.2f} µs, p99 {summary.get('p99', 0):.2f} µs"
    print(f"  percall {record['pacing']:5s} {record['backend']:14s} {state}", file=sys.stderr,
          flush=True)


# -- summaries -------------------------------------------------------------------------------------

def cells(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{pacing: {backend: cell}}``: medians over rounds of each statistic, the median over
    rounds of the within-round ratio to rlmon (median and mean), calls per run, close time."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for pacing in results["pacings"]:
        rows = [r for r in results["records"] if r["pacing"] == pacing]
        out[pacing] = {backend: _cell([r for r in rows if r["backend"] == backend], rows)
                       for backend in results["backends"]}
    return out


def _cell(runs: list[dict[str, Any]], all_runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "summary" in r and r["summary"].get("n")]
    if not good:
        missing = next((r for r in runs if "not_installed" in r), None)
        return {"status": "not installed" if missing else (runs[0].get("error", "no data")
                                                            if runs else "not run")}
    cell: dict[str, Any] = {k: statistics.median(r["summary"][k] for r in good) for k in STAT_KEYS}
    cell["n"] = statistics.median(r["summary"]["n"] for r in good)
    cpu = [r["cpu_us_per_call"] for r in good if r.get("cpu_us_per_call") is not None]
    cell["cpu"] = statistics.median(cpu) if cpu else None
    closes = [r["close_s"] for r in good if r.get("close_s") is not None]
    cell["close_s"] = statistics.median(closes) if closes else None
    for key in ("median", "mean"):
        cell[f"x_rlmon_{key}"] = _ratio_to_rlmon(good, all_runs, key)
    cell["rounds"] = len(good)
    return cell


def _ratio_to_rlmon(runs: list[dict[str, Any]], all_runs: list[dict[str, Any]], key: str
                    ) -> float | None:
    """Median over rounds of (this backend's ``key`` / rlmon's ``key``) in the same round."""
    rlmon = {r["round"]: r["summary"][key] for r in all_runs
             if r["backend"] == "rlmon" and "summary" in r and r["summary"].get(key)}
    ratios = [r["summary"][key] / rlmon[r["round"]] for r in runs if r["round"] in rlmon]
    return statistics.median(ratios) if ratios else None


def ledger_rows(results: dict[str, Any]) -> list[list[Any]]:
    """One row per rlmon run: calls, emitted, dropped, stored, unacknowledged, check."""
    rows = []
    for r in results["records"]:
        ledger = r.get("ledger")
        if not ledger:
            continue
        after_emit = sum(v for k, v in ledger["dropped"].items() if k in ("send_full", "bad_value"))
        stored = r.get("stored_steps")
        unacked = None if stored is None else ledger["emitted"] - stored - after_emit
        balanced = "ok" if unacked == 0 else (f"{unacked:g} unacknowledged at exit"
                                               if unacked is not None and unacked > 0 else "CHECK")
        if r["backend"] == "rlmon_samples":
            balanced = "samples are not counted in the ledger"
        rows.append([r["backend"], r["pacing"], r["round"], r.get("calls_made"), ledger["emitted"],
                     dict(ledger["dropped"]) or 0, ledger["batches_sent"],
                     f"{ledger['acked_seq']}/{ledger.get('seq')}", stored, balanced,
                     r.get("close_s")])
    return rows


def markdown(results: dict[str, Any]) -> str:
    """Tables: the comparison per pacing, rlmon's variants, the ledgers, the budget checks."""
    summary = cells(results)
    parts = ["## Per-call cost of logging one step (16 scalars unless said)\n",
             _method_note(results)]
    for pacing in results["pacings"]:
        names = [b for b in results["backends"] if b not in VARIANTS]
        parts.append(f"\n### {PACING_TITLES[pacing]}\n\n" + _cost_table(summary[pacing], names))
    variant_rows = [[LABELS[b], PACING_TITLES[p], *_stat_cells(summary[p].get(b, {}))]
                    for b in ("rlmon",) + VARIANTS if b in results["backends"]
                    for p in results["pacings"]]
    if variant_rows:
        parts.append("\n### rlmon under other conditions (part 2)\n\n" + table(
            ["call", "pacing", "median µs", "p99 µs", "p99.9 µs", "mean µs"], variant_rows))
    parts.append("\n### rlmon ledgers after each run\n\n" + table(
        ["backend", "pacing", "round", "calls", "emitted", "dropped", "batches sent",
         "acked seq / last seq", "stored by collector", "emitted = stored + dropped + unacked",
         "close s"], ledger_rows(results)))
    rejected = results["collector_rejected"] or "none"
    parts.append(f"\nCollector frames rejected during the runs: {rejected}\n")
    parts.append("\n" + budget_lines(summary))
    return "\n".join(parts)


def _method_note(results: dict[str, Any]) -> str:
    s = results["settings"]
    return (f"Each call timed alone with `perf_counter_ns`; between-call time not timed. "
            f"{s['rounds']} interleaved round(s), one fresh process per backend, pacing and round; "
            f"up to {s['calls']:,} timed calls back to back, {s['paced_calls']:,} paced, "
            f"{s['slow_calls']:,} for wandb/TensorBoard/MLflow, at most {s['budget']:g} s of "
            f"timed loop per run. Cells: median over rounds. \"× rlmon\": median over rounds of "
            f"the within-round ratio. CPU µs/call: process CPU (all threads) over the "
            f"back-to-back loop / calls. Close s: `close()`/`finish()`/`end_run()` time.\n")


def _stat_cells(cell: dict[str, Any]) -> list[Any]:
    if "status" in cell or not cell:
        return [cell.get("status", "not run")] + ["–"] * 3
    return [cell[k] for k in STAT_KEYS]


def _cost_table(pacing_cells: dict[str, dict[str, Any]], names: list[str]) -> str:
    rows = []
    for name in names:
        cell = pacing_cells.get(name, {})
        if "status" in cell or not cell:
            rows.append([LABELS[name], cell.get("status", "not run")] + ["–"] * 8)
            continue
        rows.append([LABELS[name], *[cell[k] for k in STAT_KEYS], cell["cpu"],
                     cell["x_rlmon_median"], cell["x_rlmon_mean"], int(cell["n"]), cell["close_s"]])
    return table(["call", "median µs", "p99 µs", "p99.9 µs", "mean µs", "CPU µs/call",
                  "× rlmon (median)", "× rlmon (mean)", "calls/run", "close s"], rows)


def budget_lines(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """DESIGN.md's per-call budgets, each with the measured figure and met / MISSED."""
    lines = ["### Budgets (DESIGN.md)\n"]
    tight = summary.get("tight", {})
    rl = tight.get("rlmon", {})
    if "median" in rl:
        lines.append(_check("back to back: median ≤ 1 µs", rl["median"], 1.0))
        lines.append(_check("back to back: p99 ≤ 15 µs", rl["p99"], 15.0))
        lines.append(_check("back to back: mean ≤ 1.5 µs", rl["mean"], 1.5))
    for pacing in ("sleep", "spin"):
        cells_ = summary.get(pacing, {})
        cell, floor = cells_.get("rlmon", {}), cells_.get("list.append", {})
        if "median" in cell and "median" in floor:
            bound = 2 * floor["median"]
            lines.append(_check(f"{PACING_TITLES[pacing]}: median ≤ 2 × list.append "
                                f"({bound:.2f} µs)", cell["median"], bound))
        if "p99" in cell:
            lines.append(_check(f"{PACING_TITLES[pacing]}: p99 ≤ 40 µs", cell["p99"], 40.0))
    for pacing, cells_ in summary.items():
        for name, factor in (("wandb", 100.0), ("prometheus", 5.0)):
            ratio = cells_.get(name, {}).get("x_rlmon_median")
            if ratio is not None:
                what = f"{PACING_TITLES[pacing]}: {name} ≥ {factor:g}× rlmon (median)"
                lines.append(_check(what, ratio, factor, at_least=True, unit="×"))
    return "\n".join(lines) + "\n"


def _check(what: str, value: float, bound: float, at_least: bool = False, unit: str = "µs") -> str:
    met = value >= bound if at_least else value <= bound
    return f"- {what}: {fmt(value)} {unit} — {'met' if met else '**MISSED**'}"


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``percall.png``: median (bar) and p99 (marker) per backend, log scale, a panel a pacing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = cells(results)
    pacings = results["pacings"]
    fig, axes = plt.subplots(1, len(pacings), figsize=(6 * len(pacings), 6), squeeze=False)
    for ax, pacing in zip(axes[0], pacings):
        names = [b for b in results["backends"] if "median" in summary[pacing].get(b, {})]
        medians = [summary[pacing][b]["median"] for b in names]
        p99 = [summary[pacing][b]["p99"] for b in names]
        y = range(len(names))
        colors = ["#d62728" if b.startswith("rlmon") else "#1f77b4" for b in names]
        ax.barh(y, medians, color=colors)
        ax.scatter(p99, y, marker="|", s=200, color="black", label="p99")
        ax.set_yticks(list(y), [b for b in names])
        ax.set_xscale("log")
        ax.set_xlabel("µs per call (bar: median)")
        ax.set_title(PACING_TITLES[pacing].replace("`", ""))
        ax.invert_yaxis()
        ax.legend(loc="lower right")
    fig.tight_layout()
    path = out_dir / "percall.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> dict:
    """Run this part alone."""
    return standalone("percall", __doc__, add_arguments, DEFAULTS, QUICK, run, markdown, argv)


if __name__ == "__main__":
    main()
