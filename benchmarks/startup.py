"""Collector start-up with a cold and a warm Numba cache (part 5).

Each round starts ``python -m collector --out DIR --quiet`` (the command rlmon's launcher runs)
twice, in rotated order: with ``NUMBA_CACHE_DIR`` pointing at a fresh empty directory (cold: every
kernel compiles) and at a directory an untimed first start already filled (warm). The figure is
the time from ``Popen`` to ``collector.json`` carrying the new process's pid — the launcher's
readiness signal, written after the kernels are compiled or loaded, the socket bound and
``/metrics`` serving. The time SIGTERM takes to end the idle collector (it writes its reports) is
reported too. Usage::

    python benchmarks/startup.py --startup-rounds 5
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

from benchmarks.common import REPO, child_env, standalone, stop_process, table  # noqa: E402

DEFAULTS = {"startup_rounds": 5}
QUICK = {"startup_rounds": 1}
READY_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's flags (None: the default, or the quick value with ``--quick``)."""
    group = parser.add_argument_group("collector start-up (part 5)")
    group.add_argument("--startup-rounds", type=int, help="rounds of (cold, warm) (5)")


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Rounds of cold and warm starts; seconds to ready and to exit for each."""
    starts = []
    with tempfile.TemporaryDirectory(prefix="rlmon-startup-") as tmp:
        warm_cache = Path(tmp) / "warm-cache"
        start_once(Path(tmp) / "prime", warm_cache)  # fills the warm cache, untimed
        for round_index in range(args.startup_rounds):
            order = ("cold", "warm") if round_index % 2 == 0 else ("warm", "cold")
            for kind in order:
                cache = warm_cache if kind == "warm" else Path(tmp) / f"cold-{round_index}"
                print(f"  startup: round {round_index}, {kind} cache", file=sys.stderr, flush=True)
                ready, exit_s = start_once(Path(tmp) / f"{kind}-{round_index}", cache)
                starts.append({"kind": kind, "round": round_index, "ready_s": ready,
                               "exit_s": exit_s})
    return {"starts": starts, "settings": {k: getattr(args, k) for k in DEFAULTS}}


def start_once(out_dir: Path, cache_dir: Path) -> tuple[float | None, float]:
    """Start a collector with ``NUMBA_CACHE_DIR=cache_dir``; (seconds to ready, seconds to exit)."""
    out_dir.mkdir(parents=True)
    env = child_env(NUMBA_CACHE_DIR=str(cache_dir))
    command = [sys.executable, "-m", "collector", "--out", str(out_dir), "--quiet"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    ready = _wait_ready(out_dir / "collector.json", process, started)
    return ready, stop_process(process)


def _wait_ready(info_path: Path, process: subprocess.Popen, started: float) -> float | None:
    """Seconds from ``started`` until ``collector.json`` names ``process`` (None: never)."""
    while time.perf_counter() - started < READY_TIMEOUT_S and process.poll() is None:
        try:
            if json.loads(info_path.read_text()).get("pid") == process.pid:
                return time.perf_counter() - started
        except (OSError, ValueError):
            pass
        time.sleep(0.01)  # the poll interval of a deadline-bounded wait
    return None


def markdown(results: dict[str, Any]) -> str:
    """Median, min and max per cache state."""
    rows = []
    for kind in ("cold", "warm"):
        ready = [s["ready_s"] for s in results["starts"] if s["kind"] == kind and s["ready_s"]]
        exits = [s["exit_s"] for s in results["starts"] if s["kind"] == kind]
        if ready:
            rows.append([kind, len(ready), statistics.median(ready), min(ready), max(ready),
                         statistics.median(exits)])
        else:
            rows.append([kind, 0, "never ready", "–", "–", "–"])
    return ("## Collector start-up (Popen → collector.json)\n\n"
            "`python -m collector --out DIR --quiet`; cold: `NUMBA_CACHE_DIR` a fresh empty "
            "directory; warm: one already filled. Exit: SIGTERM to exit of the idle collector "
            "(writes its reports).\n\n"
            + table(["Numba cache", "starts", "median s", "min s", "max s", "exit median s"], rows))


def main(argv: list[str] | None = None) -> dict:
    """Run this part alone."""
    return standalone("startup", __doc__, add_arguments, DEFAULTS, QUICK, run, markdown, argv)


if __name__ == "__main__":
    main()
