"""Custom training callbacks run beside the collector: ``rlmon collector --callback pkg.mod:Class``.

The training-monitor guide's ``TrainingCallback`` (anything with ``on_event(event)``) can run on
the collector's host instead of in the training process. The collector starts one callback
process (``python -m exporters.callbacks_main``) that reads nothing but the collector's files —
``DIR/events.rlog``, as the TensorBoard and W&B sinks do (:mod:`exporters.sinks`), and
``DIR/alerts.jsonl`` — so a callback can neither stall nor crash ingest, and its imports (torch,
a database client) never enter the collector::

    EventLogTail → StepAssembler → ITERATION_END      one per completed cross-rank step
                 → samples       → RESPONSE_GENERATED one per rank per ``log_samples`` call
    alerts.jsonl → QualityAlert  → on_alert(alert)    only for callbacks that define it
                 → bounded queue → the delivery thread → each callback, in the order given

What a callback receives (:class:`~rlmon.seed.events.TrainingEvent`):

* ``TRAINING_START`` once, when the first rank is heard from (``metadata``: ``run_id``,
  ``world_size``).
* ``ITERATION_END`` for every step once every live rank has moved past it (the same rule as the
  sinks: a silent rank holds a step back at most ``max_pending_steps`` steps), in increasing
  step order. ``metrics`` holds the cross-rank mean of each metric (over the ranks' finite values,
  as the collector's aggregates; NaN when none is finite); ``metadata["ranks"]`` holds every
  rank's own value (``{metric: {rank: value}}``), plus ``world_size`` and ``run_id``. The
  ranks' phases are not on the wire (a rank's ``TrainingMonitor`` merges one iteration's events
  into one ``log``), so code written for ``REWARD_COMPUTED`` should look at ``ITERATION_END``.
* ``RESPONSE_GENERATED`` for each ``log_samples`` call (``metadata``: ``prompts``,
  ``responses``, ``rewards`` (or None) and ``rank``), before that step's ``ITERATION_END``.
* ``TRAINING_END`` once, at the end (``iteration``: the last step; ``metadata["stop"]``: the
  last coordinated stop decision as a dict, or None).
* ``on_alert(alert)`` — an rlmon extension, not in the seed: called for every alert the
  detectors raise, with the seed's :class:`~rlmon.seed.analyzers.QualityAlert`, if the callback
  has such a method.

The whole event log is read from its start, so a collector restarted on the same directory
replays the earlier steps to its callbacks.

Failures: an exception from a callback is logged (the first few with their traceback, then one
line every 100) and counted per callback; the callback keeps receiving events. The queue holds
``queue_size`` items; while the delivery thread makes progress the reader waits for room (a
slow callback lags, it loses nothing), and once no callback call has returned for
``stall_seconds`` the reader drops instead (counted): a hung callback costs its own events, never
the reader. Counters go to ``DIR/callbacks.json`` (every ``status_interval`` seconds and at the
end; :func:`read_status`), which ``rlmon top`` shows. A bad ``module:Class`` —
no such module, no such attribute, a constructor that raises, no ``on_event`` — is a
:class:`~rlmon.errors.ConfigError` naming the spec, raised before anything is read.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from collector.eventlog import FILE_NAME as EVENT_LOG_NAME
from exporters.atomic import atomic_write_text
from exporters.sinks import EventLogTail, StepAssembler, StepRow, StopEvent
from rlmon.errors import ConfigError
from rlmon.processes import process_alive
from rlmon.seed.analyzers import QualityAlert
from rlmon.seed.events import TrainingEvent, TrainingPhase
from rlmon.wire import Kind, Message

log = logging.getLogger("rlmon.callbacks")

STATUS_FILE = "callbacks.json"
"""The callback process's counters in the run directory."""
ALERTS_FILE = "alerts.jsonl"
"""The collector's alert log in the run directory (one JSON object a line)."""
TRACEBACKS_PER_CALLBACK = 3
"""Exceptions of one callback logged with their traceback; later ones every 100th, one line."""


# -- loading ------------------------------------------------------------------------------------


def load_callback(spec: str) -> Any:
    """Import ``module:Class`` (``Class`` may be dotted, or any callable returning a callback),
    call it with no arguments and return the object. Raises :class:`ConfigError` (key
    ``--callback SPEC``) naming what is wrong."""
    module_name, sep, attribute = spec.partition(":")
    if not (sep and module_name and attribute):
        raise _bad(spec, "expected module:Class, e.g. mypkg.callbacks:RewardLogger")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise _bad(spec, f"cannot import module {module_name!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _bad(spec, f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    try:
        callback = target()
    except Exception as exc:
        raise _bad(spec, f"{attribute}() raised {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(callback, "on_event", None)):
        raise _bad(spec, f"{attribute} has no on_event(event) method")
    return callback


def load_callbacks(specs: list[str]) -> dict[str, Any]:
    """Every callback of ``specs`` by its spec (a spec given twice is loaded once)."""
    return {spec: load_callback(spec) for spec in dict.fromkeys(specs)}


def _bad(spec: str, reason: str) -> ConfigError:
    error = ConfigError(f"--callback {spec}", reason)
    error.reason = reason  # what is wrong, without the key (sent back to the collector)
    return error


# -- from the event log to events ---------------------------------------------------------------


class EventBuilder:
    """Turns event-log messages into :class:`TrainingEvent` objects (see the module docstring).

    :meth:`feed` returns the events a message makes at once (start, samples); :meth:`ready`
    the ``ITERATION_END`` events of the steps every live rank has passed; :meth:`finish` the
    rest and ``TRAINING_END``. Not thread-safe."""

    def __init__(self, max_pending_steps: int = 1024) -> None:
        self.assembler = StepAssembler(max_pending_steps)
        self.run_id = ""
        self.started = False
        self.last_step = -1
        self.last_stop: StopEvent | None = None

    def feed(self, message: Message) -> list[TrainingEvent]:
        """The events ``message`` makes now (its step values wait in the assembler)."""
        duplicates = self.assembler.duplicates
        self.assembler.feed(message)
        events = self._start(message) if message.kind in (Kind.HELLO, Kind.BATCH) else []
        if message.kind is Kind.BATCH and self.assembler.duplicates == duplicates:
            events += self._samples(message)
        return events

    def ready(self) -> list[TrainingEvent]:
        """``ITERATION_END`` for each step released now, in step order."""
        return self._rows(self.assembler.ready())

    def finish(self) -> list[TrainingEvent]:
        """Every pending step, then ``TRAINING_END`` (with ``TRAINING_START`` first if no rank
        ever said hello)."""
        events = self._start(None) + self._rows(self.assembler.flush())
        self._take_stops()
        stop = None if self.last_stop is None else dataclasses.asdict(self.last_stop)
        return events + [TrainingEvent(TrainingPhase.TRAINING_END, max(self.last_step, 0),
                                       metadata={"stop": stop, "run_id": self.run_id,
                                                 "world_size": self.assembler.world_size})]

    def _start(self, message: Message | None) -> list[TrainingEvent]:
        if self.started:
            return []
        self.started = True
        self.run_id = message.run if message is not None else self.run_id
        return [TrainingEvent(TrainingPhase.TRAINING_START, 0, metadata={
            "run_id": self.run_id, "world_size": self.assembler.world_size})]

    def _samples(self, message: Message) -> list[TrainingEvent]:
        events = []
        for step, prompts, responses, rewards in message.fields.get("samples", []):
            events.append(TrainingEvent(TrainingPhase.RESPONSE_GENERATED, int(step), metadata={
                "prompts": list(prompts), "responses": list(responses),
                "rewards": None if rewards is None else list(rewards), "rank": message.rank}))
        return events

    def _rows(self, rows: list[StepRow]) -> list[TrainingEvent]:
        self._take_stops()
        events = []
        for row in rows:
            self.last_step = max(self.last_step, row.step)
            events.append(TrainingEvent(
                TrainingPhase.ITERATION_END, row.step, timestamp=row.time,
                metrics={name: _finite_mean(by_rank.values())
                         for name, by_rank in row.values.items()},
                metadata={"ranks": row.values, "world_size": row.world_size,
                          "run_id": self.run_id}))
        return events

    def _take_stops(self) -> None:
        stops = self.assembler.take_stops()
        if stops:
            self.last_stop = stops[-1]


def _finite_mean(values: Any) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def alert_of(record: dict[str, Any]) -> QualityAlert | None:
    """The seed's :class:`QualityAlert` for one ``alerts.jsonl`` record (None if malformed)."""
    try:
        return QualityAlert(int(record["step"]), str(record["severity"]), str(record["message"]),
                            str(record.get("metric", "")), _float(record.get("value")),
                            str(record.get("type", "")), _float(record.get("threshold")),
                            _float(record.get("time")))
    except (KeyError, TypeError, ValueError):
        return None


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


class AlertLog:
    """New records of ``alerts.jsonl`` from its start, whole lines only. Not thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0

    def poll(self) -> list[dict[str, Any]]:
        """Records appended since the last call (malformed lines are skipped)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


# -- delivery -----------------------------------------------------------------------------------


@dataclass(slots=True)
class CallbackStatistics:
    """What the callback process did: items (events and alerts) ``delivered`` to every callback
    (whether or not a callback raised on it) and ``dropped`` undelivered, the alerts among the
    delivered, exceptions per callback spec, items still queued, and whether it has ended."""

    callbacks: list[str] = field(default_factory=list)
    delivered: int = 0
    dropped: int = 0
    alerts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    finished: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able copy, with the time it was taken (``updated_at``, Unix seconds)."""
        return {**dataclasses.asdict(self), "updated_at": time.time()}


_STOP = object()  # the delivery thread's end marker


class Delivery:
    """A bounded queue and the thread that calls the callbacks (see the module docstring).
    :meth:`submit` is called by the reader; everything else about the callbacks happens on the
    delivery thread."""

    def __init__(self, callbacks: dict[str, Any], stats: CallbackStatistics, *,
                 queue_size: int = 10_000, stall_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if queue_size < 1:
            raise ConfigError("--queue-size", "must be >= 1")
        self.callbacks = callbacks
        self.stats = stats
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._progress = clock()  # when a callback call last returned (or the queue was empty)
        self._thread = threading.Thread(target=self._run, name="rlmon-callbacks", daemon=True)
        self._thread.start()

    def submit(self, item: TrainingEvent | QualityAlert) -> bool:
        """Queue ``item``; wait for room while the delivery thread makes progress, else drop it
        (counted). Returns whether it was queued."""
        while True:
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                if self._clock() - self._progress > self.stall_seconds:
                    self.stats.dropped += 1
                    return False

    def close(self, timeout: float) -> None:
        """Let the thread finish what is queued, waiting up to ``timeout`` seconds; what is left
        then counts as dropped."""
        deadline = self._clock() + timeout
        while self._thread.is_alive() and self._clock() < deadline:
            try:
                self._queue.put(_STOP, timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - self._clock()))
        if self._thread.is_alive():
            self.stats.dropped += self._queue.qsize()
            log.warning("callbacks still busy after %.0f s; %d events left undelivered",
                        timeout, self._queue.qsize())

    @property
    def pending(self) -> int:
        """Items waiting in the queue."""
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._progress = self._clock()  # idle is not stuck
                continue
            if item is _STOP:
                return
            self._deliver(item)
            self.stats.delivered += 1
            self.stats.alerts += isinstance(item, QualityAlert)

    def _deliver(self, item: TrainingEvent | QualityAlert) -> None:
        is_alert = isinstance(item, QualityAlert)
        for spec, callback in self.callbacks.items():
            method = getattr(callback, "on_alert" if is_alert else "on_event", None)
            if method is not None:
                try:
                    method(item)
                except Exception:
                    self._failed(spec, item)
            self._progress = self._clock()

    def _failed(self, spec: str, item: Any) -> None:
        count = self.stats.errors.get(spec, 0) + 1
        self.stats.errors = {**self.stats.errors, spec: count}  # a new dict: readers never race
        what = f"alert at step {item.iteration}" if isinstance(item, QualityAlert) else (
            f"{item.phase.name} at step {item.iteration}")
        if count <= TRACEBACKS_PER_CALLBACK:
            log.exception("callback %s failed on %s", spec, what)
        elif count % 100 == 0:
            log.error("callback %s failed on %s (%d failures so far)", spec, what, count)


# -- the process ---------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class CallbackOptions:
    """Settings of :func:`run_callbacks`."""

    follow: bool = True
    """Follow the run until its collector is gone or ``stop_event`` is set (else read the log
    as it is now and finish)."""
    collector_pid: int | None = None
    """The collector being followed: nothing is read before ``collector.json`` names it (it
    then holds the directory), and following ends once it is gone. None: until ``stop_event``."""
    poll_interval: float = 0.1
    """Seconds between looks at a log that has not grown."""
    queue_size: int = 10_000
    """Events and alerts waiting for the callbacks, at most."""
    stall_seconds: float = 2.0
    """A full queue drops once no callback call has returned for this long."""
    drain_seconds: float = 30.0
    """At the end, seconds the callbacks get to finish what is queued."""
    status_interval: float = 2.0
    """Seconds between writes of ``callbacks.json``."""
    max_pending_steps: int = 1024
    """Steps a silent rank may hold back before steps are delivered without it."""

    def __post_init__(self) -> None:
        for name in ("poll_interval", "stall_seconds", "drain_seconds", "status_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError("--" + name.replace("_", "-"), "must be > 0")
        if self.queue_size < 1 or self.max_pending_steps < 1:
            raise ConfigError("--queue-size", "queue_size and max_pending_steps must be >= 1")


def run_callbacks(run_dir: Path, callbacks: dict[str, Any], options: CallbackOptions,
                  stop_event: threading.Event | None = None) -> CallbackStatistics:
    """Feed ``callbacks`` (spec → object) from ``run_dir`` until the run ends (see
    :class:`CallbackOptions`); return the statistics, also left in ``callbacks.json``.
    Blocks the calling thread; raises ConfigError when the event log is not one."""
    run_dir = Path(run_dir)
    stop_event = stop_event or threading.Event()
    stats = CallbackStatistics(callbacks=list(callbacks))
    if options.follow and not _collector_serving(run_dir, options, stop_event):
        stats.finished = True
        return stats  # the collector never served this directory: nothing of it to read
    delivery = Delivery(callbacks, stats, queue_size=options.queue_size,
                        stall_seconds=options.stall_seconds)
    reader = _Reader(run_dir, options, delivery)
    try:
        while True:
            done = (not options.follow or stop_event.is_set()
                    or (options.collector_pid is not None
                        and not process_alive(options.collector_pid)))  # decided before reading
            grew = reader.pump()
            if done and not grew:
                break
            reader.status_now_and_then(stats)
            if not grew:
                stop_event.wait(options.poll_interval)
        for event in reader.builder.finish():
            delivery.submit(event)
        delivery.close(options.drain_seconds)
    finally:
        reader.tail.close()
        stats.finished, stats.pending = True, delivery.pending
        write_status(run_dir, stats)
    return stats


def _collector_serving(run_dir: Path, options: CallbackOptions,
                       stop_event: threading.Event) -> bool:
    """Wait until ``collector.json`` names the followed collector (it then holds the directory);
    False when it is gone first or ``stop_event`` is set. True at once without a pid."""
    pid = options.collector_pid
    while pid is not None:
        try:
            if json.loads((run_dir / "collector.json").read_text()).get("pid") == pid:
                return True
        except (OSError, ValueError, AttributeError):
            pass
        if not process_alive(pid) or stop_event.wait(options.poll_interval):
            return False
    return True


class _Reader:
    """The reader side of :func:`run_callbacks`: log and alerts in, events to the queue."""

    def __init__(self, run_dir: Path, options: CallbackOptions, delivery: Delivery) -> None:
        self.run_dir = run_dir
        self.tail = EventLogTail(run_dir / EVENT_LOG_NAME)
        self.alerts = AlertLog(run_dir / ALERTS_FILE)
        self.builder = EventBuilder(options.max_pending_steps)
        self.delivery = delivery
        self.status_interval = options.status_interval
        self._next_status = 0.0

    def pump(self) -> bool:
        """Read what is new and queue its events; True when anything was read."""
        before = self.tail.records
        for message in self.tail.poll():
            for event in self.builder.feed(message):
                self.delivery.submit(event)
        for event in self.builder.ready():
            self.delivery.submit(event)
        records = self.alerts.poll()
        for alert in filter(None, map(alert_of, records)):
            self.delivery.submit(alert)
        return self.tail.records > before or bool(records)

    def status_now_and_then(self, stats: CallbackStatistics) -> None:
        if time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + self.status_interval
            stats.pending = self.delivery.pending
            write_status(self.run_dir, stats)


def write_status(run_dir: Path, stats: CallbackStatistics) -> None:
    """``callbacks.json`` (atomically); a failure to write is logged, never raised."""
    try:
        atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(stats.as_dict()) + "\n")
    except OSError:
        log.exception("could not write %s", Path(run_dir) / STATUS_FILE)


def read_status(run_dir: Path) -> dict[str, Any]:
    """``callbacks.json`` of a run directory, or ``{}`` when there is none (yet)."""
    try:
        value = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# -- the collector's side -------------------------------------------------------------------------


READY_TIMEOUT = 120.0
"""Seconds the collector waits for the callback process to import and build its callbacks."""


def start_callback_process(run_dir: Path, specs: list[str], collector_pid: int,
                           timeout: float = READY_TIMEOUT, quiet: bool = False
                           ) -> subprocess.Popen:
    """Start ``python -m exporters.callbacks_main`` following ``run_dir`` for the collector
    ``collector_pid`` (in its own session: a terminal's Ctrl-C reaches the collector, which ends
    it in order) and wait until its callbacks are built. ``quiet``: its summary line only when
    something failed or was dropped. Raises :class:`ConfigError` naming a bad
    spec (the process is gone then)."""
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "exporters.callbacks_main", "--out", str(run_dir),
               "--follow", "--collector-pid", str(collector_pid), "--ready-fd", str(write_fd),
               *[item for spec in specs for item in ("--callback", spec)],
               *(["--quiet"] if quiet else [])]
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=(write_fd,),
                                   start_new_session=True)
    finally:
        os.close(write_fd)
    try:
        verdict = _read_verdict(read_fd, timeout)
    finally:
        os.close(read_fd)
    if not verdict.get("ok"):
        stop_callback_process(process, 5.0)
        raise ConfigError(verdict.get("key", "--callback"), verdict.get(
            "reason", f"the callback process did not start (exit code {process.returncode})"))
    return process


def _read_verdict(fd: int, timeout: float) -> dict[str, Any]:
    """The one JSON line the callback process writes on ``fd`` when ready (``{}`` if it ended
    or ``timeout`` passed first)."""
    data, deadline = b"", time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {}
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        verdict = json.loads(data.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        return {}
    return verdict if isinstance(verdict, dict) else {}


def stop_callback_process(process: subprocess.Popen, timeout: float = 45.0) -> int:
    """SIGTERM the callback process (it reads the rest of the log, lets the callbacks finish,
    writes ``callbacks.json`` and exits) and wait; kill it past ``timeout``. Returns its code."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("the callback process did not end in %.0f s; killing it", timeout)
        process.kill()
        return process.wait(5)
