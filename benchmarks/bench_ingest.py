"""Collector ingest throughput: scalars/s through receive → event log → store → aggregates →
detectors, by batch size, with every default detector and rule on.

Two measurements per batch size:

* ``socket`` — the real thing: a :class:`collector.service.CollectorService` (ROUTER socket on
  loopback TCP, event log with group commit and fsync, state, acknowledgements, snapshots) fed
  by a separate sender process that holds one DEALER socket per rank and sends frames encoded
  exactly as a rank's publisher encodes them. Timed from the first frame handled to the last.
* ``in-process`` — the same frames through ``wire.decode`` → ``EventLog.append`` (a commit per
  2,000 frames) → ``CollectorState.handle`` in one loop, no socket: the collector's CPU cost
  alone.

Each round starts a fresh collector; the first ``--warm-steps`` steps of each round (store and
aggregator growth, first-seen series) are not timed, so the figure is the sustained rate.

Usage::

    python benchmarks/bench_ingest.py --ranks 2 --metrics 32 --steps 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from collector import kernels  # noqa: E402
from collector.eventlog import EventLog  # noqa: E402
from collector.service import CollectorService, ServiceConfig  # noqa: E402
from collector.state import CollectorState, StateConfig  # noqa: E402
from rlmon import wire  # noqa: E402
from rlmon.publisher import encode_blocks  # noqa: E402
from rlmon.wire import Kind  # noqa: E402


def frames(ranks: int, metrics: int, steps: int, batch: int) -> list[tuple[int, bytes]]:
    """``(rank, frame)``: HELLOs then BATCH frames of ``batch`` steps, ranks interleaved like a
    live job. Metric names include ``reward`` and ``kl`` so the reward and KL detectors run."""
    names = [f"m{k:03d}" for k in range(metrics - 2)] + ["reward", "kl"]
    out = [(r, wire.encode(wire.envelope(Kind.HELLO, "b", r, 1, world=ranks, local_rank=r, pid=1,
                                         host="h"))) for r in range(ranks)]
    for seq, start in enumerate(range(0, steps, batch), start=1):
        step_range = list(range(start, min(start + batch, steps)))
        for rank in range(ranks):
            records = [(s, 1000.0 + 0.1 * s,
                        {name: 0.01 + 1e-4 * ((s * 7 + k) % 13) for k, name in enumerate(names)})
                       for s in step_range]
            blocks, _ = encode_blocks(records)  # exactly as a rank's sender thread encodes them
            out.append((rank, wire.encode(wire.envelope(
                Kind.BATCH, "b", rank, 1, seq=seq, t=records[-1][1], step=step_range[-1],
                blocks=blocks))))
    return out


def in_process_once(encoded: list[tuple[int, bytes]], ranks: int, warm: int) -> float:
    """Seconds to decode, log and handle every frame after the first ``warm`` ones."""
    with tempfile.TemporaryDirectory() as tmp:
        state = CollectorState(StateConfig(run_id="b", world_size=ranks))
        log = EventLog(Path(tmp))
        started = 0.0
        for index, (_, frame) in enumerate(encoded):
            if index == warm:
                log.commit()
                started = time.perf_counter()
            message = wire.decode(frame)
            log.append(frame)
            state.handle(message, b"id", 1000.0)
            if index % 2000 == 1999:
                log.commit()
        log.commit()
        elapsed = time.perf_counter() - started
        log.close()
    return elapsed


def _send_all(endpoint: str, encoded: list[tuple[int, bytes]], ranks: int, warm: int,
              go_rest) -> None:
    """Sender process: one DEALER per rank; the first ``warm`` frames at once, the rest when
    ``go_rest`` is set, each as fast as the socket takes it."""
    context = zmq.Context()
    sockets = []
    for rank in range(ranks):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(endpoint)
        sockets.append(sock)
    for index, (rank, frame) in enumerate(encoded):
        if index == warm:
            go_rest.wait()
        sockets[rank].send(frame, copy=False)
    for sock in sockets:
        sock.close()
    context.term()


def socket_once(encoded: list[tuple[int, bytes]], ranks: int, warm: int) -> float:
    """Seconds the real collector service takes for every frame after the first ``warm``."""
    batches = len(encoded) - ranks
    with tempfile.TemporaryDirectory() as tmp:
        service = CollectorService(ServiceConfig(
            out_dir=Path(tmp), metrics_port=-1, visualization_frequency=0,
            state=StateConfig(run_id="b", world_size=ranks)))
        service.start()
        go_rest = multiprocessing.Event()
        sender = multiprocessing.Process(target=_send_all,
                                         args=(service.endpoint, encoded, ranks, warm, go_rest))
        sender.start()
        try:
            handled = _serve_until(service, warm)
            go_rest.set()
            started = time.perf_counter()
            _serve_until(service, len(encoded) - handled)
            elapsed = time.perf_counter() - started
            received = sum(info.batches for info in service.state.ranks.ranks.values())
            if received != batches:
                raise RuntimeError(f"collector handled {received} of {batches} batches")
        finally:
            sender.join(30)
            service.close()
    return elapsed


def _serve_until(service: CollectorService, frames_wanted: int) -> int:
    """Run the service's loop body (receive, commit, acknowledge; a snapshot every 0.25 s, as
    :meth:`CollectorService.run` does) until it handled ``frames_wanted`` frames."""
    handled, next_snapshot = 0, 0.0
    deadline = time.monotonic() + 600
    while handled < frames_wanted and time.monotonic() < deadline:
        handled += service.serve_once(timeout_ms=50)
        now = time.time()
        if now >= next_snapshot:
            service._publish_snapshot(now)
            next_snapshot = now + 0.25
    return handled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--metrics", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--warm-steps", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,8,32,128")
    args = parser.parse_args()
    kernels.warm_up()
    print(f"# {args.ranks} ranks x {args.metrics} scalars x {args.steps} steps "
          f"({args.warm_steps} warm-up steps untimed); median of {args.rounds} rounds, the two "
          f"paths interleaved; Python {platform.python_version()} {platform.machine()}")
    print("\n| steps per batch | through the socket (scalars/s) | in-process (scalars/s) | "
          "µs per batch frame (socket) |\n|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        encoded = frames(args.ranks, args.metrics, args.steps, batch)
        warm = args.ranks + args.ranks * (args.warm_steps // batch)
        timed_frames = len(encoded) - warm
        scalars = timed_frames * batch * args.metrics
        sock, local = [], []
        for _ in range(args.rounds):
            sock.append(socket_once(encoded, args.ranks, warm))
            local.append(in_process_once(encoded, args.ranks, warm))
        s, p = statistics.median(sock), statistics.median(local)
        print(f"| {batch} | {scalars / s:,.0f} | {scalars / p:,.0f} | {s / timed_frames * 1e6:,.0f} |")


if __name__ == "__main__":
    main()
