"""Every rlmon benchmark in one run: markdown tables printed and written to ``OUT/results.md``,
raw numbers to ``OUT/results.json``, plots (``percall.png``, ``scale_lag.png``) to ``OUT``.

Parts (``--parts``, default all, in this order):

* ``startup``  — collector start-up, cold and warm Numba cache (:mod:`benchmarks.startup`)
* ``percall``  — per-call cost against wandb, TensorBoard, MLflow, prometheus_client, raw
  ZeroMQ and ``list.append``, three pacings; rlmon with the collector absent / frozen, 256
  scalars, ``log_samples``; ledgers (:mod:`benchmarks.percall`)
* ``stop``     — stop latency (:mod:`benchmarks.stop_latency`)
* ``scrape``   — ``/metrics`` scrape time (:mod:`benchmarks.scrape`)
* ``memory``   — collector RSS against series × capacity (:mod:`benchmarks.memory`)
* ``scale``    — 64 → 256 → 1,024 simulated ranks against one collector
  (:mod:`benchmarks.scale`)
* ``training`` — 2-rank torchrun demo, rlmon on vs off, A/B and A/A
  (:mod:`benchmarks.training_ab`)

``--quick`` (what ``rlmon bench`` runs) uses tiny parameters: a smoke run, not a measurement.
Every part's own flags are accepted here (``--help`` lists them). Usage::

    python benchmarks/run_all.py --out bench_out/full            # the full measurement
    python benchmarks/run_all.py --quick --out bench_out/quick   # minutes
    python benchmarks/run_all.py --parts percall --rounds 7
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (memory, percall, scale, scrape, startup, stop_latency,  # noqa: E402
                        training_ab)
from benchmarks.common import machine_info, machine_markdown, resolve, write_json  # noqa: E402

PARTS: dict[str, ModuleType] = {"startup": startup, "percall": percall, "stop": stop_latency,
                                "scrape": scrape, "memory": memory, "scale": scale,
                                "training": training_ab}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Every part's flags plus ``--out``, ``--quick`` and ``--parts``; defaults resolved."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default bench_out/<UTC date-time>)")
    parser.add_argument("--quick", action="store_true", help="tiny parameters: a smoke run")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts (default: {','.join(PARTS)})")
    for module in PARTS.values():
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    for module in PARTS.values():
        resolve(args, module.DEFAULTS, module.QUICK)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out = Path("bench_out") / (stamp + ("-quick" if args.quick else ""))
    return args


def header(args: argparse.Namespace, info: dict[str, Any], argv: list[str]) -> str:
    """Title, the command, the smoke warning with ``--quick``, the machine."""
    command = "python benchmarks/run_all.py " + " ".join(shlex.quote(a) for a in argv)
    warning = ("\n> **Smoke run (`--quick`)**: tiny parameters to prove the scripts work end to "
               "end. These are not measurements.\n" if args.quick else "")
    return (f"# rlmon benchmarks\n\n**Command:** `{command}`\n{warning}\n"
            + machine_markdown(info))


def run_part(name: str, module: ModuleType, args: argparse.Namespace) -> tuple[dict, str]:
    """Run one part; its results (or the error) and its markdown."""
    print(f"== {name}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        results = module.run(args, args.out)
        text = module.markdown(results)
    except Exception as exc:  # one broken part must not lose the others
        results = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        text = f"## {name}\n\n**Failed:** `{results['error']}`\n"
    results["elapsed_s"] = time.perf_counter() - started
    return results, text


def make_plots(parts: dict[str, dict], out: Path) -> list[Path]:
    """The plots of the parts that have them (none without matplotlib)."""
    paths: list[Path] = []
    for name in ("percall", "scale"):
        results = parts.get(name)
        if not results or "error" in results:
            continue
        try:
            paths += PARTS[name].plot(results, out)
        except ImportError:
            print("no plots: matplotlib is not installed", file=sys.stderr)
        except Exception as exc:
            print(f"plot of {name} failed: {exc}", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts; write results.md, results.json and the plots; 0 unless all failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    sections = [header(args, info, argv)]
    data: dict[str, Any] = {"machine": info, "argv": argv, "quick": args.quick, "parts": {}}
    for name in args.parts.split(","):
        results, text = run_part(name, PARTS[name], args)
        data["parts"][name] = results
        sections.append(text)
        print(text, flush=True)
        (args.out / "results.md").write_text("\n".join(sections))  # kept current after each part
        write_json(args.out / "results.json", data)
    plots = make_plots(data["parts"], args.out)
    if plots:
        sections.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    data["machine_at_end"] = {"load_average": os.getloadavg()}
    (args.out / "results.md").write_text("\n".join(sections))
    write_json(args.out / "results.json", data)
    print(f"\nresults: {args.out / 'results.md'}, {args.out / 'results.json'}"
          + "".join(f", {p}" for p in plots), file=sys.stderr)
    failed = all("error" in r for r in data["parts"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
