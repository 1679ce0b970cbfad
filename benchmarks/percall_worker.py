r"""Time one logging backend in one pacing, in this fresh process; print one JSON line.

Each call is timed alone with ``perf_counter_ns``; what happens between calls (nothing, a 1 ms
``time.sleep``, or 1 ms of busy work) is not timed. Warm-up calls (same pacing) come first and are
not timed. The timed loop also stops once ``--budget`` seconds have passed, so slow backends take
bounded time; the number of calls actually timed is reported as ``n``. Usage (normally run by
:mod:`benchmarks.percall`)::

    python benchmarks/percall_worker.py --backend rlmon --pacing sleep --calls 5000 \
        --endpoint tcp://127.0.0.1:5555 --metrics-url http://127.0.0.1:9000/metrics
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import summarize  # noqa: E402
from benchmarks.percall_backends import Backend, Context, NotInstalled, make_backend  # noqa: E402

PACINGS = ("tight", "sleep", "spin")
"""Back to back; 1 ms ``time.sleep`` between calls; 1 ms busy-wait between calls."""
GAP_NS = 1_000_000


def timed_loop(backend: Backend, start: int, calls: int, pacing: str, budget_s: float
               ) -> tuple[list[int], float]:
    """Per-call nanoseconds of up to ``calls`` calls, and the process CPU seconds over the loop
    (all threads; reported for back-to-back pacing only, where nothing else runs between calls)."""
    clock, call, sleep = time.perf_counter_ns, backend.call, time.sleep
    samples: list[int] = []
    append = samples.append
    deadline = clock() + int(budget_s * 1e9)
    cpu_started = time.process_time()
    for i in range(start, start + calls):
        started = clock()
        call(i)
        ended = clock()
        append(ended - started)
        if pacing == "sleep":
            sleep(0.001)
        elif pacing == "spin":
            until = ended + GAP_NS
            while clock() < until:
                pass
        if ended > deadline:
            break
    return samples, time.process_time() - cpu_started


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    """Build the backend, warm it up, time it, close it; the result record."""
    ctx = Context(args.endpoint, args.metrics_url, tmp, args.step_offset)
    started = time.perf_counter()
    try:
        backend = make_backend(args.backend, ctx)
    except NotInstalled as exc:
        return {"not_installed": str(exc)}
    setup_s = time.perf_counter() - started
    timed_loop(backend, 0, args.warmup, args.pacing, args.budget)
    if backend.freeze is not None:
        backend.freeze()
    try:
        samples, cpu = timed_loop(backend, args.warmup, args.calls, args.pacing, args.budget)
    finally:
        if backend.thaw is not None:
            backend.thaw()
    facts = backend.close()
    summary = summarize(samples)
    cpu_per_call = cpu / max(1, len(samples)) * 1e6 if args.pacing == "tight" else None
    return {"summary": summary, "cpu_us_per_call": cpu_per_call, "setup_s": setup_s,
            "calls_made": args.warmup + len(samples), "keys_per_step": backend.keys_per_step,
            **backend.info, **facts}


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, measure, write (or print) the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--pacing", choices=PACINGS, default="tight")
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls at most")
    parser.add_argument("--warmup", type=int, default=1_000, help="untimed calls first")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed loop at most")
    parser.add_argument("--endpoint", default="", help="the shared collector's endpoint")
    parser.add_argument("--metrics-url", default="", help="the shared collector's /metrics")
    parser.add_argument("--step-offset", type=int, default=0, help="first step number")
    parser.add_argument("--result", type=Path, default=None,
                        help="write the JSON record here (else print it as the last line)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlmon-percall-") as tmp:
        result = measure(args, Path(tmp))
    result.update(backend=args.backend, pacing=args.pacing)
    if args.result is not None:
        args.result.write_text(json.dumps(result))
    else:
        sys.stdout.write("\n" + json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
