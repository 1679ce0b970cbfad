"""``python -m exporters.sinks_main``: export a run directory to TensorBoard and/or W&B offline.

::

    python -m exporters.sinks_main --out DIR --tensorboard --wandb            convert DIR once
    python -m exporters.sinks_main --out DIR --tensorboard --follow           follow a live run

With ``--follow`` the process tails ``DIR/events.rlog`` until the collector has finished (its
process is gone, or its ``training_report.json`` has appeared) or until SIGTERM/SIGINT, then
exports what is left and exits 0. Without it, it converts the log as it is now and exits.
TensorBoard files go to ``DIR/tensorboard``, the W&B offline run to ``DIR/wandb/offline-run-*``.
Exit codes: 0 done, 1 a sink failed while running, 2 a bad flag, a missing package or no log.
A summary line (steps, cost per step of each sink, what was dropped) goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from rlmon.errors import RlmonError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exporters.sinks_main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--tensorboard", action="store_true",
                        help="write TensorBoard event files to DIR/tensorboard")
    parser.add_argument("--wandb", action="store_true",
                        help="write a W&B offline run under DIR/wandb")
    parser.add_argument("--follow", action="store_true",
                        help="tail the log until the collector finishes (else convert once)")
    parser.add_argument("--collector-pid", type=int, default=None,
                        help="the collector to follow (default: the pid in DIR/collector.json)")
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="seconds between looks at a log that has not grown")
    parser.add_argument("--max-pending-steps", type=int, default=1024,
                        help="steps a silent rank may fall behind before steps are written without it")
    parser.add_argument("--per-rank-limit", type=int, default=64,
                        help="write per-rank tags only while the run has at most this many ranks")
    parser.add_argument("--wandb-project", default="rlmon", help="W&B project of the offline run")
    parser.add_argument("--quiet", action="store_true", help="no summary line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sinks as the flags say; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="rlmon sinks: %(message)s")
    from exporters.sinks import SinkOptions, run_sinks

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        options = SinkOptions(follow=args.follow, collector_pid=args.collector_pid,
                              poll_interval=args.poll_interval,
                              max_pending_steps=args.max_pending_steps,
                              per_rank_limit=args.per_rank_limit, wandb_project=args.wandb_project)
        stats = run_sinks(args.out, tensorboard=args.tensorboard, wandb=args.wandb,
                          options=options, stop_event=stop)
    except RlmonError as exc:
        print(f"rlmon sinks: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(_summary(stats), file=sys.stderr, flush=True)
    for name, error in stats.failed.items():
        print(f"rlmon sinks: the {name} sink failed: {error}", file=sys.stderr)
    return 1 if stats.failed else 0


def _summary(stats) -> str:
    costs = ", ".join(f"{name} {stats.seconds_per_step(name) * 1e6:.0f} µs/step"
                      for name in stats.seconds)
    dropped = (f"{stats.duplicates} duplicate batches, {stats.late_values} late values, "
               f"{stats.wrong_type} non-numbers, {sum(stats.rejected.values())} bad records, "
               f"{stats.torn_tail_bytes} bytes of incomplete tail")
    corrupt = "" if stats.corrupt_at is None else f"; a corrupt record at byte {stats.corrupt_at} ended the log"
    return (f"rlmon sinks: {stats.steps} steps, {stats.stops} stops exported ({costs}); "
            f"skipped {dropped}{corrupt}")


if __name__ == "__main__":
    sys.exit(main())
