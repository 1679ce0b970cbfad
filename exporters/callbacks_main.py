"""``python -m exporters.callbacks_main``: run custom callbacks on a run directory's event log.

::

    python -m exporters.callbacks_main --out DIR --callback pkg.mod:Class            read DIR once
    python -m exporters.callbacks_main --out DIR --callback pkg.mod:Class --follow   follow a run

The collector starts it for ``rlmon collector --callback ...`` (see :mod:`exporters.callbacks`);
it can also replay a finished run's log through callbacks by hand. With ``--follow`` it reads
until SIGTERM/SIGINT or until ``--collector-pid`` is gone, then delivers what is left and exits.
Exit codes: 0 done, 2 a bad flag or a bad ``--callback`` (the message names it). With
``--ready-fd N`` the verdict on the callbacks (``{"ok": true}``, or ``{"ok": false, "key": ...,
"reason": ...}``) is written to file descriptor N as one JSON line, for the collector.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from rlmon.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exporters.callbacks_main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--callback", action="append", required=True, metavar="MODULE:CLASS",
                        help="a TrainingCallback class to instantiate and feed (repeatable)")
    parser.add_argument("--follow", action="store_true",
                        help="follow the run until the collector is gone (else read once)")
    parser.add_argument("--collector-pid", type=int, default=None, help="the collector followed")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--queue-size", type=int, default=10_000,
                        help="events waiting for the callbacks, at most")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="at the end, seconds the callbacks get to finish what is queued")
    parser.add_argument("--quiet", action="store_true", help="no summary line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the callbacks, feed them, return the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="rlmon callbacks: %(message)s")
    from exporters.callbacks import CallbackOptions, load_callbacks, run_callbacks

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        options = CallbackOptions(follow=args.follow, collector_pid=args.collector_pid,
                                  queue_size=args.queue_size, drain_seconds=args.drain_seconds)
        callbacks = load_callbacks(args.callback)
    except ConfigError as exc:
        _tell(args.ready_fd, {"ok": False, "key": exc.key,
                              "reason": getattr(exc, "reason", str(exc))})
        if args.ready_fd is None:
            print(f"rlmon callbacks: error: {exc}", file=sys.stderr)
        return 2
    _tell(args.ready_fd, {"ok": True})
    stats = run_callbacks(args.out, callbacks, options, stop)
    if not args.quiet or stats.errors or stats.dropped:
        errors = ", ".join(f"{k} {v}" for k, v in stats.errors.items()) or "none"
        print(f"rlmon callbacks: {stats.delivered} events delivered ({stats.alerts} alerts), "
              f"{stats.dropped} dropped; exceptions: {errors}", file=sys.stderr, flush=True)
    return 0


def _tell(fd: int | None, verdict: dict) -> None:
    """Write the verdict line to ``fd`` and close it (nothing without one)."""
    if fd is None:
        return
    try:
        os.write(fd, (json.dumps(verdict) + "\n").encode())
        os.close(fd)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
