r"""Training overhead: the 2-rank torchrun demo training with rlmon on and off, interleaved (part 4).

Each repeat runs three arms in a rotated order: **on** (``rlmon launch --no-top -- torchrun
--nproc_per_node 2 benchmarks/timed_demo.py ...``: a real collector on the same host, every rank
logging), **off** and **off′** (the same torchrun command with ``RLMON_DISABLE=1`` and no
collector). The demo's steps are timed by :mod:`benchmarks.timed_demo`; a run's figure is the mean
loop iteration (step start to next step start, both ranks averaged) after ``--ab-skip`` steps.
The A/B ratio is on / off within a repeat; the A/A ratio off′ / off is the noise floor: a 1 %
budget is only testable when the A/A spread is well under 1 %. Usage::

    python benchmarks/training_ab.py --ab-repeats 5 \
        --ab-train-args="--quick --inject none --num_steps 60"
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, child_env, free_port, standalone, table  # noqa: E402

DEFAULTS = {"ab_repeats": 5, "ab_train_args": "--quick --inject none --num_steps 60",
            "ab_skip": 5, "ab_nproc": 2}
QUICK = {"ab_repeats": 1, "ab_train_args": "--quick --inject none", "ab_skip": 2}
ARMS = ("on", "off", "off_b")
RUN_TIMEOUT_S = 1800


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's flags (None: the default, or the quick value with ``--quick``)."""
    group = parser.add_argument_group("training overhead A/B (part 4)")
    group.add_argument("--ab-repeats", type=int, help="repeats of (on, off, off') (default 5)")
    group.add_argument("--ab-train-args",
                       help=f"demo flags (default {DEFAULTS['ab_train_args']!r}); pass as "
                            "--ab-train-args=\"...\"")
    group.add_argument("--ab-skip", type=int, help="first steps left out of the mean (5)")
    group.add_argument("--ab-nproc", type=int, help="ranks (torchrun --nproc_per_node, 2)")


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Every repeat's three arms; per-run step statistics."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="rlmon-ab-") as tmp:
        for repeat in range(args.ab_repeats):
            order = ARMS[repeat % 3:] + ARMS[:repeat % 3]
            for arm in order:
                print(f"  training A/B: repeat {repeat}, rlmon {arm}", file=sys.stderr, flush=True)
                record = run_arm(arm, args, Path(tmp) / f"{arm}-{repeat}")
                runs.append({**record, "arm": arm, "repeat": repeat})
    return {"runs": runs, "settings": {k: getattr(args, k) for k in DEFAULTS}}


def run_arm(arm: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One training run; its mean step and iteration times and wall time."""
    times_dir = work / "times"
    times_dir.mkdir(parents=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ab_nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                str(REPO / "benchmarks" / "timed_demo.py"), *args.ab_train_args.split()]
    env = child_env(RLMON_BENCH_STEP_TIMES=str(times_dir))
    if arm == "on":
        command = [sys.executable, "-m", "rlmon.cli", "launch", "--out", str(work / "run"),
                   "--no-top", "--", *torchrun]
    else:
        command, env["RLMON_DISABLE"] = torchrun, "1"
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-600:]}",
                "wall_s": wall}
    return {**step_stats(times_dir, args.ab_skip), "wall_s": wall}


def step_stats(times_dir: Path, skip: int) -> dict[str, Any]:
    """Mean iteration and ``step()`` seconds over the ranks, after ``skip`` steps."""
    iterations, steps, counts = [], [], []
    for path in sorted(times_dir.glob("rank*.json")):
        data = json.loads(path.read_text())
        starts, ends = data["starts"][skip:], data["ends"][skip:]
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        if gaps:
            iterations.append(statistics.fmean(gaps))
        if ends:
            steps.append(statistics.fmean(e - s for s, e in zip(starts, ends)))
        counts.append(len(data["starts"]))
    if not iterations:
        return {"error": "no step times recorded"}
    return {"iteration_s": statistics.fmean(iterations), "step_s": statistics.fmean(steps),
            "steps": min(counts)}


def ratios(results: dict[str, Any], numerator: str, denominator: str, key: str = "iteration_s"
           ) -> list[float]:
    """``numerator / denominator`` run figures, per repeat where both ran."""
    by = {(r["arm"], r["repeat"]): r for r in results["runs"] if key in r}
    return [by[(numerator, rep)][key] / by[(denominator, rep)][key]
            for rep in range(results["settings"]["ab_repeats"])
            if (numerator, rep) in by and (denominator, rep) in by]


def _spread(values: list[float]) -> list[Any]:
    if not values:
        return ["–"] * 5
    stdev = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "–"
    return [len(values), *(f"{v:.4f}" for v in (statistics.median(values), min(values),
                                                  max(values))), stdev]


def _run_row(run: dict[str, Any]) -> list[Any]:
    if "error" in run:
        return [run["repeat"], run["arm"], run["error"][:160], "–", "–", run.get("wall_s")]
    return [run["repeat"], run["arm"], run["iteration_s"] * 1e3, run["step_s"] * 1e3, run["steps"],
            run["wall_s"]]


def markdown(results: dict[str, Any]) -> str:
    """Runs, then the A/B and A/A ratio tables and the budget line."""
    s = results["settings"]
    run_rows = [_run_row(r) for r in results["runs"]]
    ratio_rows = [[label, key, *_spread(ratios(results, a, b, key))]
                  for label, a, b in (("A/B: on / off", "on", "off"),
                                      ("A/A: off′ / off (noise floor)", "off_b", "off"))
                  for key in ("iteration_s", "step_s")]
    ab = ratios(results, "on", "off")
    verdict = "–" if not ab else ("met" if statistics.median(ab) <= 1.01 else "**MISSED**")
    return ("## Training overhead: 2-rank torchrun demo, rlmon on vs off\n\n"
            f"Demo flags `{s['ab_train_args']}`, {s['ab_nproc']} ranks, {s['ab_repeats']} "
            f"repeat(s) of (on, off, off′) in rotated order; figures leave out the first "
            f"{s['ab_skip']} steps. \"on\": `rlmon launch` (collector on the same host); \"off\": "
            "`RLMON_DISABLE=1`, no collector.\n\n"
            + table(["repeat", "arm", "iteration ms", "step() ms", "steps", "wall s"], run_rows)
            + "\n" + table(["ratio", "figure", "repeats", "median", "min", "max", "stdev"],
                           ratio_rows)
            + f"\nBudget (DESIGN.md): step-time ratio ≤ 1.01 — {verdict}"
            + (f" (median {statistics.median(ab):.4f}); compare with the A/A spread above.\n"
               if ab else "\n"))


def main(argv: list[str] | None = None) -> dict:
    """Run this part alone."""
    return standalone("training_ab", __doc__, add_arguments, DEFAULTS, QUICK, run, markdown, argv)


if __name__ == "__main__":
    main()
