"""The logging calls compared per call: each backend logs one step's metrics given a step number.

A backend is built by :func:`make_backend` in the process that times it (one fresh process per
backend, pacing and round: see :mod:`benchmarks.percall_worker`). Competitors that are not
installed raise :class:`NotInstalled`; the tables then say "not installed".

Backends (key → what one call does):

* ``empty`` — nothing: the timer and call overhead, included in every other figure alike;
* ``list.append`` — append ``(step, dict)`` to a list: the floor, nothing leaves the process;
* ``prometheus`` — 16 ``prometheus_client`` ``Gauge.set``;
* ``zmq_push`` — ``msgpack.packb`` of the step and dict, one non-blocking PUSH send over loopback
  TCP to a PULL sink process that decodes every message;
* ``rlmon`` — ``mon.log(step, 16 scalars)`` against a real collector process;
* ``wandb`` — ``wandb.log`` in a real offline run (``WANDB_MODE=offline``) in a temp dir;
* ``tensorboard`` — 16 ``SummaryWriter.add_scalar`` (``torch.utils.tensorboard``, else
  ``tensorboardX``);
* ``mlflow_sync`` / ``mlflow_async`` — ``mlflow.log_metrics`` with a file store, synchronous and
  ``synchronous=False``;
* ``rlmon_absent`` — ``mon.log`` with no collector ever started (a closed port);
* ``rlmon_frozen`` — ``mon.log`` while this backend's own collector is SIGSTOPped (SIGCONT after);
* ``rlmon_256`` — ``mon.log`` of 256 scalars a step;
* ``rlmon_samples`` — ``mon.log_samples`` of 8 prompt/response pairs of 200 characters.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import METRIC_NAMES_16, closed_endpoint, scrape, sample_sum, wait_for

#: Table labels, in table order.
LABELS = {
    "empty": "timer + call overhead (empty call)",
    "list.append": "`list.append` of `(step, dict)` (the floor)",
    "prometheus": "`prometheus_client` 16 × `Gauge.set`",
    "zmq_push": "raw ZeroMQ PUSH + `msgpack.packb`, one message a step",
    "rlmon": "**rlmon `mon.log`**, collector running",
    "wandb": "`wandb.log` (offline)",
    "tensorboard": "TensorBoard 16 × `SummaryWriter.add_scalar`",
    "mlflow_sync": "MLflow `log_metrics`, file store, synchronous",
    "mlflow_async": "MLflow `log_metrics`, file store, `synchronous=False`",
    "rlmon_absent": "rlmon `mon.log`, collector absent (closed port)",
    "rlmon_frozen": "rlmon `mon.log`, collector frozen (SIGSTOP)",
    "rlmon_256": "rlmon `mon.log`, 256 scalars a step",
    "rlmon_samples": "rlmon `mon.log_samples`, 8 pairs × 200 characters",
}
#: The side-by-side comparison (part 1).
COMPARISON = ("empty", "list.append", "prometheus", "zmq_push", "rlmon", "wandb", "tensorboard",
              "mlflow_sync", "mlflow_async")
#: rlmon under other conditions (part 2).
VARIANTS = ("rlmon_absent", "rlmon_frozen", "rlmon_256", "rlmon_samples")
#: Backends that log through rlmon (their ledger is checked).
RLMON_BACKENDS = ("rlmon", "rlmon_absent", "rlmon_frozen", "rlmon_256", "rlmon_samples")
#: Backends slow enough (ms a call) that their call count is capped by ``--slow-calls``.
SLOW = ("wandb", "tensorboard", "mlflow_sync", "mlflow_async")


class NotInstalled(Exception):
    """The competitor's package is not importable here."""


@dataclass
class Backend:
    """One way of logging a step: ``call(step)``, then ``close()`` (returns facts to report,
    such as a ledger or drops). ``freeze``/``thaw`` run around the timed loop when set."""

    call: Callable[[int], None]
    close: Callable[[], dict[str, Any]] = lambda: {}
    keys_per_step: int = 16
    freeze: Callable[[], None] | None = None
    thaw: Callable[[], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a backend needs: the shared collector's endpoint and /metrics, a temp dir, a step
    offset (so steps keep rising across runs against the shared collector)."""

    endpoint: str
    metrics_url: str
    tmp: Path
    step_offset: int = 0


def payloads(keys: int = 16, count: int = 64) -> list[dict[str, float]]:
    """``count`` dicts of ``keys`` fresh floats, reused cyclically (built outside timing)."""
    names = list(METRIC_NAMES_16) if keys == 16 else [f"layer_{k // 8:02d}/m{k % 8}"
                                                       for k in range(keys)]
    return [{name: step * 0.001 + k * 0.5 for k, name in enumerate(names)} for step in range(count)]


def make_backend(name: str, ctx: Context) -> Backend:
    """Build backend ``name`` (see the module docstring); raises NotInstalled or KeyError."""
    return _FACTORIES[name](ctx)


def _empty(ctx: Context) -> Backend:
    return Backend(lambda i: None)


def _list_append(ctx: Context) -> Backend:
    rows = payloads()
    floor: list = []
    return Backend(lambda i: floor.append((i, rows[i & 63])))


def _prometheus(ctx: Context) -> Backend:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    gauges = [prometheus_client.Gauge("bench_" + re.sub(r"\W", "_", name), "bench",
                                      registry=registry) for name in METRIC_NAMES_16]
    rows = payloads()

    def call(i: int) -> None:
        for gauge, value in zip(gauges, rows[i & 63].values()):
            gauge.set(value)
    return Backend(call)


# -- rlmon -----------------------------------------------------------------------------------------

def _rlmon_backend(endpoint: str, keys: int, ctx: Context, run_id: str) -> tuple[Backend, Any]:
    import rlmon

    mon = rlmon.init(endpoint=endpoint, run_id=run_id)
    rows = payloads(keys)
    offset = ctx.step_offset

    def call(i: int) -> None:
        mon.log(offset + i, rows[i & 63])
    return Backend(call, lambda: _close_monitor(mon), keys_per_step=keys), mon


def _close_monitor(mon) -> dict[str, Any]:
    started = time.perf_counter()
    mon.close()
    ledger = mon.statistics()
    ledger["seq"] = getattr(getattr(mon, "_publisher", None), "_seq", None)  # batches numbered
    return {"ledger": ledger, "close_s": time.perf_counter() - started}


def _rlmon(ctx: Context) -> Backend:
    return _rlmon_backend(ctx.endpoint, 16, ctx, "bench-percall")[0]


def _rlmon_256(ctx: Context) -> Backend:
    return _rlmon_backend(ctx.endpoint, 256, ctx, "bench-percall")[0]


def _rlmon_absent(ctx: Context) -> Backend:
    backend, _ = _rlmon_backend(closed_endpoint(), 16, ctx, "bench-absent")
    close = backend.close
    backend.close = lambda: {**close(), "stored_steps": 0}
    return backend


def _rlmon_frozen(ctx: Context) -> Backend:
    """Its own collector, warmed up (HELLO and a batch acknowledged), frozen for the timing."""
    from benchmarks.common import start_collector, stop_process

    process, info = start_collector(ctx.tmp / "frozen", "--visualization-frequency", "0",
                                    run_id="bench-frozen")
    backend, mon = _rlmon_backend(info["endpoint"], 16, dataclasses.replace(ctx, step_offset=0),
                                  "bench-frozen")
    close = backend.close

    def frozen_close() -> dict[str, Any]:
        facts = close()
        facts["stored_steps"] = _stored_steps(info["metrics_url"], 16)
        stop_process(process)
        return facts
    backend.freeze = lambda: _freeze(process.pid, mon)
    backend.thaw = lambda: os.kill(process.pid, signal.SIGCONT)
    backend.close = frozen_close
    return backend


def _freeze(pid: int, mon) -> None:
    wait_for(lambda: mon.statistics()["acked_seq"] >= 1, 30)  # connected and acknowledged
    os.kill(pid, signal.SIGSTOP)


def _stored_steps(metrics_url: str, keys: int) -> float:
    """Steps the collector stored for rank 0 (scalars received / keys), once it is stable."""
    def stable() -> float | None:
        first = sample_sum(scrape(metrics_url), "rlmon_rank_scalars_received_total", rank="0")
        time.sleep(0.6)  # two snapshots apart (a snapshot every 0.25 s)
        second = sample_sum(scrape(metrics_url), "rlmon_rank_scalars_received_total", rank="0")
        return second if first == second else None
    value = wait_for(stable, 15) or 0.0
    return value / keys


def _rlmon_samples(ctx: Context) -> Backend:
    import rlmon

    mon = rlmon.init(endpoint=ctx.endpoint, run_id="bench-percall")
    text = ("What is 12 + 30? Show the working, then the answer. " * 8)[:200]
    prompts = [text] * 8
    responses = [("12 + 30 = 42. The answer is 42. " * 8)[:200]] * 8
    offset = ctx.step_offset

    def call(i: int) -> None:
        mon.log_samples(offset + i, prompts, responses)
    return Backend(call, lambda: _close_monitor(mon), keys_per_step=0)


# -- raw ZeroMQ ------------------------------------------------------------------------------------

def _pull_sink(conn) -> None:
    """A PULL sink process: bind, report the port, decode every message until ``END``."""
    import msgpack
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    received = 0
    while True:
        frame = sock.recv()
        if frame == b"END":
            break
        msgpack.unpackb(frame)
        received += 1
    conn.send(received)
    sock.close()
    context.term()


def _zmq_push(ctx: Context) -> Backend:
    import msgpack
    import zmq

    parent, child = multiprocessing.Pipe()
    fork = multiprocessing.get_context("fork")
    sink = fork.Process(target=_pull_sink, args=(child,), daemon=True)
    sink.start()  # forked before this process makes its own ZeroMQ context
    endpoint = parent.recv()
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    rows = payloads()
    counts = {"sent": 0, "dropped": 0}
    packb, flags, again = msgpack.packb, zmq.NOBLOCK, zmq.Again

    def call(i: int) -> None:
        try:
            sock.send(packb({"step": i, "m": rows[i & 63]}), flags)
            counts["sent"] += 1
        except again:
            counts["dropped"] += 1

    def close() -> dict[str, Any]:
        sock.setsockopt(zmq.SNDTIMEO, 10_000)
        sock.send(b"END")
        received = parent.recv() if parent.poll(30) else None
        sink.join(10)
        sock.close()
        context.term()
        return {"zmq": {**counts, "received": received}}
    return Backend(call, close)


# -- the trackers people use -----------------------------------------------------------------------

def _wandb(ctx: Context) -> Backend:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(ctx.tmp),
                      WANDB_CONSOLE="off")
    try:
        import wandb
    except ImportError as exc:
        raise NotInstalled("wandb") from exc
    run = wandb.init(project="rlmon-bench", dir=str(ctx.tmp), mode="offline")
    rows = payloads()

    def call(i: int) -> None:
        wandb.log(rows[i & 63], step=i)
    return Backend(call, lambda: _timed_close(run.finish), info={"version": wandb.__version__})


def _tensorboard(ctx: Context) -> Backend:
    try:
        from torch.utils.tensorboard import SummaryWriter
        source = "torch.utils.tensorboard"
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
            source = "tensorboardX"
        except ImportError as exc:
            raise NotInstalled("tensorboard") from exc
    writer = SummaryWriter(log_dir=str(ctx.tmp / "tb"))
    rows = payloads()

    def call(i: int) -> None:
        for key, value in rows[i & 63].items():
            writer.add_scalar(key, value, i)
    return Backend(call, lambda: _timed_close(writer.close), info={"source": source})


def _mlflow(ctx: Context, synchronous: bool) -> Backend:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # mlflow 3 refuses file stores without it
    try:
        import mlflow
    except ImportError as exc:
        raise NotInstalled("mlflow") from exc
    mlflow.set_tracking_uri((ctx.tmp / "mlruns").as_uri())  # must not exist beforehand
    mlflow.start_run()
    rows = payloads()

    def call(i: int) -> None:
        mlflow.log_metrics(rows[i & 63], step=i, synchronous=synchronous)
    return Backend(call, lambda: _timed_close(mlflow.end_run), info={"version": mlflow.__version__})


def _timed_close(close: Callable[[], Any]) -> dict[str, Any]:
    started = time.perf_counter()
    close()
    return {"close_s": time.perf_counter() - started}


_FACTORIES: dict[str, Callable[[Context], Backend]] = {
    "empty": _empty, "list.append": _list_append, "prometheus": _prometheus,
    "zmq_push": _zmq_push, "rlmon": _rlmon, "wandb": _wandb, "tensorboard": _tensorboard,
    "mlflow_sync": lambda ctx: _mlflow(ctx, True), "mlflow_async": lambda ctx: _mlflow(ctx, False),
    "rlmon_absent": _rlmon_absent, "rlmon_frozen": _rlmon_frozen, "rlmon_256": _rlmon_256,
    "rlmon_samples": _rlmon_samples,
}
