"""Sinks: the run's metrics as TensorBoard event files and as a W&B run in offline mode.

A sink runs in its own process beside the collector (``python -m exporters.sinks_main``, see
:mod:`exporters.sinks_main`), so neither the training ranks nor the collector's receive loop ever
import TensorBoard or wandb or wait for them. It reads nothing but the collector's event log,
``DIR/events.rlog``, which holds every accepted frame in order::

    EventLogTail  (complete, checksummed records from a byte offset; decoded messages)
      → StepAssembler  (duplicates dropped; per-rank values grouped into one row per step,
                        released in step order once every live rank has moved past the step)
      → row_scalars    ("reward/rank0", "reward/rank1", "reward/mean")
      → TensorBoardSink → DIR/tensorboard/events.out.tfevents.*
      → WandbOfflineSink → DIR/wandb/offline-run-*/run-*.wandb

Because the export is a function of the log alone, the same code converts a finished run offline
and follows a live one; a restarted sink rebuilds the TensorBoard directory from the start of the
log (earlier event files there are removed) and starts a new W&B offline run.

Steps are released in increasing order because W&B drops a step lower than one already logged. A
step is released once every rank of the world that is still connected has logged a later step, or
once it is more than ``max_pending_steps`` behind the newest step (a dead or silent rank never
stalls the export), or at the end. A value for a step already released is dropped and counted in
``late_values``. The cross-rank ``mean`` is over the finite values the ranks reported for that
step, as the collector's aggregates are.

Errors::

    RlmonError (rlmon.errors)
    └── SinkUnavailable     the sink's package is not installed; ``.package`` and ``.extra`` say
                            what to install (``pip install 'rlmon[tensorboard]'``)

A sink that fails while running (a bug, a full disk, wandb's service gone) is switched off and
its error kept in :attr:`SinkStatistics.failed`; the other sink carries on.

Imports: stdlib, :mod:`rlmon.wire` and :mod:`collector.eventlog` at import time (plus what the
``exporters`` package's ``__init__`` loads: prometheus_client, numpy); ``tensorboard`` and
``wandb`` only inside :class:`TensorBoardSink` and :class:`WandbOfflineSink`. The rank side
imports none of this module.
"""

from __future__ import annotations

import heapq
import importlib
import json
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from collector.eventlog import FILE_NAME as EVENT_LOG_NAME
from collector.eventlog import MAGIC
from collector.ranks import SeqWindow
from rlmon import wire
from rlmon.errors import ConfigError, FrameRejected, RlmonError
from rlmon.processes import process_alive
from rlmon.wire import Kind, Message

log = logging.getLogger("rlmon.sinks")

TENSORBOARD_DIR = "tensorboard"
"""Sub-directory of the run directory holding the TensorBoard event files."""
WANDB_DIR = "wandb"
"""Sub-directory wandb itself creates under the run directory (``offline-run-*`` inside)."""
REPORT_NAME = "training_report.json"
"""Written by the collector when it finishes: one of the signs that a followed run is over."""

#: Ranks are numbered 0 .. MAX_RANKS - 1 (``collector.state.MAX_RANKS``, not imported: it pulls
#: in numpy and numba, which a sink does not need).
MAX_RANKS = 65_536
#: Messages read between two looks for releasable rows (each look costs O(world size)).
READY_EVERY = 256

_HEADER = struct.Struct("<II")  # the event log's record header: payload length, crc32


class SinkUnavailable(RlmonError):
    """A sink's package is missing. ``package`` is the import name, ``extra`` the rlmon extra."""

    def __init__(self, package: str, extra: str, sink: str) -> None:
        super().__init__(f"the {sink} sink needs the '{package}' package: "
                         f"pip install 'rlmon[{extra}]'")
        self.package = package
        self.extra = extra


def _import(module: str, package: str, extra: str, sink: str) -> Any:
    """Import ``module`` or raise :class:`SinkUnavailable` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SinkUnavailable(package, extra, sink) from exc


# -- reading the event log ---------------------------------------------------------------------------


class EventLogTail:
    """Reads ``DIR/events.rlog`` as it grows, from a byte offset, never re-reading a record.

    :meth:`poll` yields the decoded messages of the complete records written since the previous
    call. A record whose bytes are not all there yet is left for a later call (the writer may be
    in the middle of it); once the writer is done it is a torn tail, and :attr:`pending_bytes`
    counts it. A record that is all there but fails its checksum, or whose length exceeds any
    frame's, is corruption: :attr:`corrupt` becomes true and nothing after it is read or trusted,
    as the collector's own replay does. Frames that fail :func:`rlmon.wire.decode` are skipped
    and counted in :attr:`rejected`. Not thread-safe; one reader per instance.
    """

    def __init__(self, path: Path, chunk_bytes: int = 4 << 20) -> None:
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self.records = 0
        """Complete records read so far (decoded or rejected)."""
        self.rejected: Counter[str] = Counter()
        """Records whose frame :func:`rlmon.wire.decode` refused, by reason."""
        self.corrupt = False
        """True once a complete record failed its checksum: reading stops there for good."""
        self._file = None
        self._read_to = 0  # file offset up to which bytes are in the buffer or consumed
        self._buffer = b""  # bytes read but not yet consumed as whole records
        self._has_magic = False

    @property
    def offset(self) -> int:
        """File offset just past the last complete record read (0 before the magic)."""
        return self._read_to - len(self._buffer) if self._has_magic else 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of the file past :attr:`offset`: a record being written, or a torn/corrupt tail."""
        try:
            return max(0, self.path.stat().st_size - self.offset)
        except OSError:
            return 0

    def poll(self) -> Iterator[Message]:
        """Yield every message of the complete records available now, in log order.

        Returns at the end of the file, at an incomplete record or at corruption, without
        waiting. Raises :class:`~rlmon.errors.ConfigError` when the file is not an rlmon event
        log or shrank."""
        if self._file is None and not self._open():
            return
        while not self.corrupt:
            chunk = self._read_chunk()
            for payload in self._complete_records():
                message = self._decode(payload)
                if message is not None:
                    yield message
            if len(chunk) < self.chunk_bytes:
                return

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> bool:
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            return False
        return True

    def _read_chunk(self) -> bytes:
        size = os.fstat(self._file.fileno()).st_size
        if size < self._read_to:
            raise ConfigError(str(self.path), f"the event log shrank from {self._read_to} to {size} bytes")
        chunk = os.pread(self._file.fileno(), self.chunk_bytes, self._read_to)
        self._read_to += len(chunk)
        self._buffer += chunk
        return chunk

    def _complete_records(self) -> list[bytes]:
        """Take the whole records off the buffer (a list, so the state is updated before any
        caller sees a record: an abandoned iteration never replays one)."""
        if not self._has_magic and not self._consume_magic():
            return []
        data, offset, payloads = self._buffer, 0, []
        while offset + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, offset)
            start, end = offset + _HEADER.size, offset + _HEADER.size + length
            if length > wire.MAX_FRAME_BYTES or (end <= len(data) and zlib.crc32(data[start:end]) != crc):
                self.corrupt = True
                break
            if end > len(data):
                break
            payloads.append(data[start:end])
            offset = end
        self._buffer = data[offset:]
        self.records += len(payloads)
        return payloads

    def _consume_magic(self) -> bool:
        head = self._buffer[:len(MAGIC)]
        if head != MAGIC[:len(head)]:
            raise ConfigError(str(self.path), "not an rlmon event log")
        if len(head) < len(MAGIC):
            return False
        self._buffer = self._buffer[len(MAGIC):]
        self._has_magic = True
        return True

    def _decode(self, payload: bytes) -> Message | None:
        try:
            return wire.decode(payload)
        except FrameRejected as exc:
            self.rejected[exc.reason] += 1
            return None


# -- from messages to rows, one per step -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepRow:
    """Everything the ranks logged for one step: ``values[metric][rank]``, in the metric's units.

    ``time`` is the latest ``time.time()`` of a rank's ``log`` call for this step (Unix seconds);
    ``world_size`` the ranks the run had when the row was released."""

    step: int
    time: float
    values: dict[str, dict[int, float]]
    world_size: int


@dataclass(frozen=True, slots=True)
class StopEvent:
    """A stop decision the collector wrote into its log (a STOP_STATE record)."""

    generation: int
    stop_at_step: int
    reason: str
    severity: str
    source: str
    decided_at: float


class StepAssembler:
    """Turns log messages into :class:`StepRow` objects released in increasing step order.

    Feed it with :meth:`feed`; take rows with :meth:`ready` (while following) and :meth:`flush`
    (at the end); take stop decisions with :meth:`take_stops`. Batches already seen for a
    ``(rank, incarnation)`` (re-sent after a reconnect: the log keeps every accepted frame) are
    dropped and counted in :attr:`duplicates`, as the collector drops them. Not thread-safe.
    """

    def __init__(self, max_pending_steps: int = 1024) -> None:
        if max_pending_steps < 1:
            raise ConfigError("max_pending_steps", "must be >= 1")
        self.max_pending_steps = max_pending_steps
        self.world_size = 1
        self.duplicates = 0
        """Batches dropped because their ``seq`` was already seen for that incarnation."""
        self.late_values = 0
        """Values dropped because their step had already been released."""
        self.wrong_type = 0
        """Values that were not numbers (the collector counts them as ``wrong_type`` too)."""
        self._pending: dict[int, dict[str, dict[int, float]]] = {}
        self._times: dict[int, float] = {}
        self._queue: list[int] = []
        self._released_to = -math.inf  # highest step released so far
        self._newest = -math.inf
        self._rank_step: dict[int, int] = {}  # furthest step each rank logged
        self._live: dict[int, set[int]] = defaultdict(set)  # rank -> incarnations not yet gone
        self._gone: set[tuple[int, int]] = set()  # (rank, incarnation) that said BYE
        self._seqs: dict[tuple[int, int], SeqWindow] = {}
        self._stops: list[StopEvent] = []

    def feed(self, message: Message) -> None:
        """Apply one message from the log (HELLO, BATCH, BYE, STOP_STATE; others are ignored)."""
        if message.kind is Kind.STOP_STATE:
            self._stops.append(_stop_event(message.fields))
        elif 0 <= message.rank < MAX_RANKS:
            if message.kind is Kind.HELLO:
                self._on_hello(message)
            elif message.kind is Kind.BATCH:
                self._on_batch(message)
            elif message.kind is Kind.BYE:
                self._live[message.rank].discard(message.inc)
                self._gone.add((message.rank, message.inc))

    def ready(self) -> list[StepRow]:
        """Rows every live rank has moved past, or that fell behind the pending horizon."""
        live_steps = [self._rank_step.get(rank, -1) for rank in range(self.world_size)
                      if self._live.get(rank) or rank not in self._live]
        cut = min(live_steps, default=math.inf)
        return self._release(max(cut, self._newest - self.max_pending_steps))

    def flush(self) -> list[StepRow]:
        """Every pending row (end of the run), in step order."""
        return self._release(math.inf)

    def take_stops(self) -> list[StopEvent]:
        """Stop decisions read since the last call, in log order."""
        stops, self._stops = self._stops, []
        return stops

    @property
    def pending_steps(self) -> int:
        """Steps waiting for a rank to move past them."""
        return len(self._pending)

    def _on_hello(self, message: Message) -> None:
        self._live[message.rank].add(message.inc)
        world = message.fields["world"]
        self.world_size = max(self.world_size, message.rank + 1,
                              world if world <= MAX_RANKS else 1)

    def _on_batch(self, message: Message) -> None:
        identity = (message.rank, message.inc)
        seq = message.fields["seq"]
        window = self._seqs.setdefault(identity, SeqWindow())
        if window.seen(seq):  # logs written before duplicates were kept out of the log
            self.duplicates += 1
            return
        window.accept(seq)
        if identity not in self._gone:
            self._live[message.rank].add(message.inc)
        self.world_size = max(self.world_size, message.rank + 1)
        for block in message.fields["blocks"]:
            self._add_block(message.rank, block)

    def _add_block(self, rank: int, block: wire.Block) -> None:
        rows = block.values.tolist() if block.packed else block.values
        for step, when, row in zip(block.steps.tolist(), block.times.tolist(), rows):
            self._rank_step[rank] = max(self._rank_step.get(rank, step), step)
            self._newest = max(self._newest, step)
            if step <= self._released_to:
                self.late_values += len(row)
                continue
            values = self._row_for(step, when)
            for key, value in zip(block.keys, row):
                number = _as_number(value)
                if number is None:
                    self.wrong_type += 1
                else:
                    values.setdefault(key, {})[rank] = number

    def _row_for(self, step: int, when: float) -> dict[str, dict[int, float]]:
        values = self._pending.get(step)
        if values is None:
            values = self._pending[step] = {}
            heapq.heappush(self._queue, step)
        self._times[step] = max(self._times.get(step, when), when)
        return values

    def _release(self, below: float) -> list[StepRow]:
        rows = []
        while self._queue and self._queue[0] < below:
            step = heapq.heappop(self._queue)
            rows.append(StepRow(step, self._times.pop(step), self._pending.pop(step), self.world_size))
            self._released_to = step
        return rows


def _as_number(value: Any) -> float | None:
    """A value cell as a float, or None when it is not a number (as the collector decides)."""
    if isinstance(value, (bool, float)):
        return float(value)
    if isinstance(value, int) and abs(value) < 2**1023:
        return float(value)
    return None


def _stop_event(fields: dict[str, Any]) -> StopEvent:
    t = fields.get("t", 0.0)
    return StopEvent(fields["gen"], fields["at"], fields["reason"], fields["sev"],
                     str(fields.get("src", "")), float(t) if isinstance(t, (int, float)) else 0.0)


def row_scalars(row: StepRow, per_rank_limit: int = 64) -> dict[str, float]:
    """The tags of one row: ``<metric>/rank<r>`` for each rank (only while the world has at most
    ``per_rank_limit`` ranks) and ``<metric>/mean``, the mean of the finite values (NaN if none)."""
    scalars: dict[str, float] = {}
    per_rank = row.world_size <= per_rank_limit
    for metric, by_rank in row.values.items():
        if per_rank:
            for rank, value in sorted(by_rank.items()):
                scalars[f"{metric}/rank{rank}"] = value
        finite = [v for v in by_rank.values() if math.isfinite(v)]
        scalars[f"{metric}/mean"] = math.fsum(finite) / len(finite) if finite else math.nan
    return scalars


def stop_text(stop: StopEvent) -> str:
    """One line describing a stop decision."""
    return (f"generation {stop.generation}: every rank stops at step {stop.stop_at_step} "
            f"({stop.severity}, {stop.source or 'unknown source'}): {stop.reason}")


# -- the sinks ---------------------------------------------------------------------------------------


class Sink(Protocol):
    """What :func:`run_sinks` drives. Called from one thread; a raised exception switches the
    sink off (see :class:`SinkStatistics`)."""

    name: str

    def write_step(self, step: int, wall_time: float, scalars: dict[str, float]) -> None:
        """Record the scalars of one step (steps arrive in increasing order)."""

    def write_stop(self, stop: StopEvent) -> None:
        """Record a stop decision."""

    def flush(self) -> None:
        """Make what was written visible to readers."""

    def close(self) -> None:
        """Flush and release everything (idempotent)."""


class TensorBoardSink:
    """Scalars as TensorBoard event files in ``log_dir`` (``DIR/tensorboard``).

    Writes plain ``simple_value`` scalar summaries through tensorboard's own
    ``EventFileWriter`` (the writer ``torch.utils.tensorboard`` uses), so it needs the
    ``tensorboard`` package alone, and TensorBoard, its ``EventAccumulator.Scalars`` and every
    other reader of event files see ordinary scalars. Stop decisions are a text summary under
    the tag ``rlmon/stop`` at the stop step. Event files already in ``log_dir`` are removed first:
    the directory is always rebuilt from the event log. Raises :class:`SinkUnavailable` when
    ``tensorboard`` is not installed.
    """

    name = "tensorboard"

    def __init__(self, log_dir: Path, flush_secs: float = 1.0) -> None:
        def tensorboard(module: str) -> Any:
            return _import(f"tensorboard.{module}", "tensorboard", "tensorboard", "TensorBoard")

        writer_module = tensorboard("summary.writer.event_file_writer")
        self._event_pb2 = tensorboard("compat.proto.event_pb2")
        self._summary_pb2 = tensorboard("compat.proto.summary_pb2")
        self._text = tensorboard("plugins.text.summary_v2")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("events.out.tfevents.*"):
            old.unlink()
        self._writer = writer_module.EventFileWriter(str(self.log_dir), max_queue_size=1024,
                                                     flush_secs=flush_secs)
        self._closed = False

    def write_step(self, step: int, wall_time: float, scalars: dict[str, float]) -> None:
        """One event holding every scalar of the step."""
        summary = self._summary_pb2.Summary
        values = [summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        self._writer.add_event(self._event_pb2.Event(wall_time=wall_time, step=step,
                                                     summary=summary(value=values)))

    def write_stop(self, stop: StopEvent) -> None:
        """A text summary ``rlmon/stop`` at the stop step."""
        self._writer.add_event(self._event_pb2.Event(
            wall_time=stop.decided_at or time.time(), step=stop.stop_at_step,
            summary=self._text.text_pb("rlmon/stop", stop_text(stop))))

    def flush(self) -> None:
        """Write the queued events to the file."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if not self._closed:
            self._closed = True
            self._writer.close()


class WandbOfflineSink:
    """The run as a W&B run in offline mode under ``out_dir/wandb/offline-run-*``.

    One ``wandb.log(scalars, step=step)`` per step, with ``_timestamp`` set to the time the ranks
    logged the step; stop decisions go to the run's summary (``rlmon/stop_*``). Nothing leaves the
    machine: ``wandb sync DIR/wandb/offline-run-*`` uploads it later. wandb starts its own service
    process (about a second); :meth:`close` finishes the run. Raises :class:`SinkUnavailable`
    when ``wandb`` is not installed.
    """

    name = "wandb"

    def __init__(self, out_dir: Path, run_name: str, project: str = "rlmon",
                 config: dict[str, Any] | None = None) -> None:
        wandb = _import("wandb", "wandb", "wandb", "W&B")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(mode="offline", dir=str(self.out_dir), project=project,
                               name=run_name, config=config or {}, settings=_wandb_settings(wandb))
        self._closed = False

    @property
    def run_dir(self) -> Path:
        """The ``offline-run-*`` directory of this run."""
        return Path(self._run.dir).parent

    def write_step(self, step: int, wall_time: float, scalars: dict[str, float]) -> None:
        """One history row for ``step``."""
        self._run.log({**scalars, "_timestamp": wall_time}, step=step)

    def write_stop(self, stop: StopEvent) -> None:
        """The stop decision in the run's summary."""
        self._run.summary.update({
            "rlmon/stop_generation": stop.generation, "rlmon/stop_at_step": stop.stop_at_step,
            "rlmon/stop_reason": stop.reason, "rlmon/stop_severity": stop.severity,
            "rlmon/stop_source": stop.source})

    def flush(self) -> None:
        """Nothing to do: wandb's service writes the run file as rows arrive."""

    def close(self) -> None:
        """Finish the run (its ``.wandb`` file is then complete)."""
        if not self._closed:
            self._closed = True
            self._run.finish()


def _wandb_settings(wandb: Any) -> Any:
    """Quiet settings without console capture or system metrics; plain ones if this wandb
    version does not know some of them."""
    try:
        return wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                              x_disable_stats=True, x_disable_meta=True, x_save_requirements=False)
    except Exception:  # pydantic's ValidationError on an unknown or renamed setting
        return wandb.Settings(console="off", silent=True)


# -- following a run -----------------------------------------------------------------------------


class CollectorWatch:
    """Tells whether the collector writing a run directory has finished.

    Finished means: its process (``pid``, else the one in ``DIR/collector.json``) is gone or a
    zombie; or ``training_report.json`` newer than that collector's start has existed for
    ``grace`` seconds (the collector may still append its last records after the report).
    Before ``collector.json`` exists the collector has not started: not finished.
    ``clock`` is injectable for tests (``time.monotonic`` by default)."""

    def __init__(self, run_dir: Path, pid: int | None = None, grace: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.run_dir = Path(run_dir)
        self.pid = pid
        self.grace = grace
        self._clock = clock
        self._started_at: float | None = None
        self._report_seen: float | None = None

    def finished(self) -> bool:
        """True once the collector is done writing the event log."""
        if self.pid is None or self._started_at is None:
            self._read_collector_json()
        if self.pid is None:
            return False
        if not process_alive(self.pid):
            return True
        if self._fresh_report():
            if self._report_seen is None:
                self._report_seen = self._clock()
            return self._clock() - self._report_seen >= self.grace
        return False

    def _read_collector_json(self) -> None:
        try:
            info = json.loads((self.run_dir / "collector.json").read_text())
        except (OSError, ValueError):
            return
        if self.pid is None and isinstance(info.get("pid"), int):
            self.pid = info["pid"]
        if info.get("pid") == self.pid and isinstance(info.get("started_at"), (int, float)):
            self._started_at = float(info["started_at"])

    def _fresh_report(self) -> bool:
        try:
            mtime = (self.run_dir / REPORT_NAME).stat().st_mtime
        except OSError:
            return False
        return self._started_at is None or mtime >= self._started_at


@dataclass(kw_only=True, slots=True)
class SinkOptions:
    """Settings of :func:`run_sinks` beyond which sinks run."""

    follow: bool = False
    """Tail the log until the collector finishes (else convert what is there and return)."""
    collector_pid: int | None = None
    """The collector to follow (default: the pid in ``DIR/collector.json``)."""
    poll_interval: float = 0.1
    """Seconds between looks at the log when it has not grown (following only)."""
    max_pending_steps: int = 1024
    """Steps a silent rank may fall behind before rows are released without it."""
    per_rank_limit: int = 64
    """Per-rank tags are written while the world has at most this many ranks; only means above."""
    wandb_project: str = "rlmon"
    """The W&B project name of the offline run."""

    def __post_init__(self) -> None:
        if not self.poll_interval > 0:
            raise ConfigError("--poll-interval", "must be > 0")
        if self.max_pending_steps < 1:
            raise ConfigError("--max-pending-steps", "must be >= 1")
        if self.per_rank_limit < 0:
            raise ConfigError("--per-rank-limit", "must be >= 0")


@dataclass(slots=True)
class SinkStatistics:
    """What a :func:`run_sinks` call did. ``seconds`` is the wall time spent inside each sink's
    writes and flushes (not its start or its close); ``failed`` maps a switched-off sink to its
    error; the rest counts records, steps and what was dropped (see :class:`StepAssembler`)."""

    records: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    late_values: int = 0
    wrong_type: int = 0
    steps: int = 0
    stops: int = 0
    torn_tail_bytes: int = 0
    corrupt_at: int | None = None
    """File offset of a corrupt record, where reading stopped for good; None when there was none."""
    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def seconds_per_step(self, sink: str) -> float:
        """Mean cost of one step in ``sink`` (seconds; NaN before any step)."""
        return self.seconds.get(sink, 0.0) / self.steps if self.steps else math.nan


class _Driver:
    """Feeds rows and stops to every sink, timing each and switching off one that fails."""

    def __init__(self, sinks: list[Sink], options: SinkOptions, stats: SinkStatistics) -> None:
        self.sinks = sinks
        self.options = options
        self.stats = stats
        self._last_flush = time.monotonic()

    def write(self, rows: list[StepRow], stops: list[StopEvent]) -> None:
        for row in rows:
            scalars = row_scalars(row, self.options.per_rank_limit)
            self._each(lambda s: s.write_step(row.step, row.time, scalars))
        for stop in stops:
            self._each(lambda s: s.write_stop(stop))
        self.stats.steps += len(rows)
        self.stats.stops += len(stops)

    def flush_now_and_then(self, interval: float = 1.0) -> None:
        if time.monotonic() - self._last_flush >= interval:
            self._each(lambda s: s.flush())
            self._last_flush = time.monotonic()

    def close(self) -> None:
        self._each(lambda s: s.close(), timed=False)

    def _each(self, call: Callable[[Sink], None], timed: bool = True) -> None:
        for sink in list(self.sinks):
            started = time.perf_counter()
            try:
                call(sink)
            except Exception as exc:  # a failing sink costs itself, never the other one
                log.exception("the %s sink failed and is switched off", sink.name)
                self.stats.failed[sink.name] = f"{type(exc).__name__}: {exc}"
                self.sinks.remove(sink)
            if timed:
                self.stats.seconds[sink.name] = (self.stats.seconds.get(sink.name, 0.0)
                                                 + time.perf_counter() - started)


def open_sinks(run_dir: Path, *, tensorboard: bool, wandb: bool,
               options: SinkOptions | None = None) -> list[Sink]:
    """Create the requested sinks for ``run_dir``; :class:`SinkUnavailable` if a package is
    missing (nothing is left open then)."""
    options = options or SinkOptions()
    run_dir = Path(run_dir)
    sinks: list[Sink] = []
    try:
        if tensorboard:
            sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR))
        if wandb:
            info = _collector_info(run_dir)
            run_id = str(info.get("run_id") or run_dir.resolve().name)
            sinks.append(WandbOfflineSink(run_dir, run_id, options.wandb_project,
                                          {"rlmon_run_id": run_id, "rlmon_out_dir": str(run_dir)}))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def run_sinks(run_dir: Path, *, tensorboard: bool = False, wandb: bool = False,
              options: SinkOptions | None = None,
              stop_event: threading.Event | None = None) -> SinkStatistics:
    """Export ``run_dir``'s event log to the requested sinks; return what was done.

    Without ``options.follow``: convert the log as it is now and return (a record still being
    written is left out and counted in ``torn_tail_bytes``). With it: tail the log, exporting
    each step once every rank has moved past it, until the collector finishes
    (:class:`CollectorWatch`) or ``stop_event`` is set; then drain, release every pending step
    and close the sinks. Blocks the calling thread. Raises :class:`SinkUnavailable` before
    reading anything when a package is missing, and :class:`~rlmon.errors.ConfigError` when there
    is no event log to convert or the file is not one.
    """
    options = options or SinkOptions()
    run_dir = Path(run_dir)
    path = run_dir / EVENT_LOG_NAME
    if not (tensorboard or wandb):
        raise ConfigError("--tensorboard/--wandb", "no sink requested")
    if not options.follow and not path.exists():
        raise ConfigError("--out", f"no event log at {path}")
    stats = SinkStatistics()
    driver = _Driver(open_sinks(run_dir, tensorboard=tensorboard, wandb=wandb, options=options),
                     options, stats)
    tail = EventLogTail(path)
    assembler = StepAssembler(options.max_pending_steps)
    watch = CollectorWatch(run_dir, options.collector_pid) if options.follow else None
    stop_event = stop_event or threading.Event()
    try:
        _pump(tail, assembler, driver, watch, stop_event, options.poll_interval)
        driver.write(assembler.flush(), assembler.take_stops())
    finally:
        driver.close()
        tail.close()
    stats.records, stats.rejected = tail.records, dict(tail.rejected)
    stats.duplicates, stats.late_values = assembler.duplicates, assembler.late_values
    stats.wrong_type, stats.torn_tail_bytes = assembler.wrong_type, tail.pending_bytes
    stats.corrupt_at = tail.offset if tail.corrupt else None
    return stats


def _pump(tail: EventLogTail, assembler: StepAssembler, driver: _Driver,
          watch: CollectorWatch | None, stop_event: threading.Event, poll_interval: float) -> None:
    """Read and export until the log is drained and (when following) the collector is done."""
    warned = False
    while driver.sinks:
        done = watch is None or stop_event.is_set() or watch.finished()  # decided before reading
        before = tail.records
        for count, message in enumerate(tail.poll(), 1):
            assembler.feed(message)
            if count % READY_EVERY == 0:  # release rows as we go through a long log
                driver.write(assembler.ready(), assembler.take_stops())
        driver.write(assembler.ready(), assembler.take_stops())
        grew = tail.records > before
        if tail.corrupt and not warned:
            log.warning("corrupt record at byte %d of %s: nothing after it is exported",
                        tail.offset, tail.path)
            warned = True
        if done and not grew:
            return
        driver.flush_now_and_then()
        if not grew:
            stop_event.wait(poll_interval)


def _collector_info(run_dir: Path) -> dict[str, Any]:
    try:
        info = json.loads((Path(run_dir) / "collector.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
