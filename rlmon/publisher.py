"""The rank side's I/O: a background thread that owns the ZeroMQ socket.

The training thread only appends to in-memory queues (:class:`Publisher` ``pending``, ``samples``,
``outbox``); a daemon thread wakes every ``flush_interval`` seconds (or when a control message
arrives), encodes what is pending into columnar batches, hands them to ZeroMQ without blocking,
reads acknowledgements and stop states, and sends heartbeats. Nothing here raises into training:
failures become counts in :class:`Ledger`, which travels to the collector with every batch.

One DEALER socket carries both directions (ranks → collector data; collector → rank acks and stop
state), so a rank needs exactly one address, ``RLMON_ENDPOINT``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from rlmon import wire
from rlmon.config import RankConfig
from rlmon.wire import Kind

log = logging.getLogger("rlmon")

#: Most steps encoded into one batch frame; more pending steps go into further batches.
MAX_STEPS_PER_BATCH = 512


@dataclass(frozen=True, slots=True)
class StopOffer:
    """A stop state received from the collector (see DESIGN.md, "Stop decisions")."""

    generation: int
    stop_at_step: int
    reason: str
    severity: str
    source: str


@dataclass(slots=True)
class Ledger:
    """What happened to the steps this rank logged. Counts only ever grow.

    ``emitted`` counts ``log`` calls that were queued; ``dropped`` counts calls and steps lost, by
    reason (``queue_full``, ``send_full``: ZeroMQ's high-water mark, ``bad_value``: the metrics
    could not be read, ``closed``: logged after ``close``)."""

    emitted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    batches_sent: int = 0
    acked_seq: int = 0

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` lost steps under ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def as_wire(self) -> dict[str, Any]:
        """The ledger as sent in batches, heartbeats and BYE."""
        return {"emitted": self.emitted, "dropped": dict(self.dropped), "sent": self.batches_sent}


class Publisher:
    """Queues and a background sender for one process. Thread affinity: ``pending``, ``samples``
    and ``outbox`` are appended to by the training thread; everything else runs on the sender."""

    def __init__(self, config: RankConfig, endpoint: str, start: bool = True) -> None:
        self.config = config
        self.endpoint = endpoint
        self.incarnation = random.getrandbits(31)
        self.pending: collections.deque = collections.deque()
        self.samples: collections.deque = collections.deque()
        self.outbox: collections.deque = collections.deque()
        self.queries: collections.deque = collections.deque()
        """QUERY messages, sent after the pending steps so a query sees what was logged before it."""
        self.ledger = Ledger()
        self.stop_offer: StopOffer | None = None
        self.checkpoint_offer: StopOffer | None = None
        self.current_step = -1
        self._seq = 0
        self._closing = threading.Event()
        self._bye_acked = threading.Event()
        self._last_send = 0.0
        self._waiters: dict[int, QueryWaiter] = {}
        self._waiters_lock = threading.Lock()
        self._query_ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="rlmon-publisher", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the sender thread (once)."""
        if not self._thread.is_alive() and not self._closing.is_set():
            self._thread.start()

    # -- called from the training thread -------------------------------------------------------

    def close(self) -> None:
        """Flush, say goodbye, wait up to ``close_timeout`` for the last acknowledgement, stop."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._thread.ident is not None:
            self._thread.join(self.config.close_timeout + 0.4)

    def query(self, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Send a QUERY (``message`` without ``id``) and wait up to ``timeout`` seconds for its
        RESULT. Blocking; call from any thread but the sender. None when no answer came in time
        or the sender is not running."""
        if self._closing.is_set() or not self._thread.is_alive():
            return None
        waiter = QueryWaiter()
        query_id = next(self._query_ids)
        with self._waiters_lock:
            self._waiters[query_id] = waiter
        try:
            self.queries.append({**message, "id": query_id})
            if waiter.event.wait(timeout):
                return waiter.result
            return None
        finally:
            with self._waiters_lock:
                self._waiters.pop(query_id, None)

    # -- the sender thread ---------------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context(io_threads=1)
        sock = context.socket(zmq.DEALER)
        try:
            self._configure(sock)
            sock.connect(self.endpoint)
            self._send(sock, self._hello())
            self._loop(sock)
            self._say_goodbye(sock)
        except Exception:  # the sender must never take the process down
            log.exception("rlmon publisher stopped")
        finally:
            sock.close(linger=0)
            context.term()

    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.IMMEDIATE, 0)

    def _loop(self, sock: zmq.Socket) -> None:
        interval_ms = max(1, int(self.config.flush_interval * 1000))
        while not self._closing.is_set():
            if sock.poll(interval_ms, zmq.POLLIN):
                self._receive_all(sock)
            self._flush(sock)

    def _flush(self, sock: zmq.Socket) -> None:
        """Send control messages, samples and pending steps; a heartbeat when idle."""
        while self.outbox:
            self._send(sock, self.outbox.popleft())
        records = _take(self.pending, MAX_STEPS_PER_BATCH)
        samples = _take(self.samples, 64)
        while records or samples:
            self._send_batch(sock, records, samples)
            records = _take(self.pending, MAX_STEPS_PER_BATCH)
            samples = []
        while self.queries:
            self._send(sock, self.queries.popleft())
        if time.monotonic() - self._last_send >= self.config.heartbeat_interval:
            self._send(sock, self._message(Kind.HEARTBEAT, step=self.current_step, t=time.time(),
                                           ledger=self.ledger.as_wire()))

    def _send_batch(self, sock: zmq.Socket, records: list, samples: list) -> None:
        blocks, bad = encode_blocks(records)
        if bad:
            self.ledger.drop("bad_value", bad)
        self._seq += 1
        message = self._message(Kind.BATCH, seq=self._seq, t=time.time(), step=self.current_step,
                                blocks=blocks, samples=samples, ledger=self.ledger.as_wire())
        if self._send(sock, message):
            self.ledger.batches_sent += 1
        else:
            self.ledger.drop("send_full", len(records))

    def _send(self, sock: zmq.Socket, message: dict[str, Any]) -> bool:
        try:
            sock.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._last_send = time.monotonic()
        return True

    def _receive_all(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(wire.decode(frame))
            except Exception:  # a bad reply is ignored, never fatal
                log.debug("rlmon: ignored a bad reply from the collector", exc_info=True)

    def _handle(self, message: wire.Message) -> None:
        fields = message.fields
        if message.kind is Kind.ACK:
            self.ledger.acked_seq = max(self.ledger.acked_seq, fields["seq"])
            if fields.get("bye"):
                self._bye_acked.set()
        elif message.kind is Kind.STOP_STATE:
            offer = StopOffer(fields["gen"], fields["at"], fields["reason"], fields["sev"],
                              str(fields.get("src", "")))
            current = self.stop_offer
            if current is None or offer.generation > current.generation:
                self.stop_offer = offer
        elif message.kind is Kind.RESULT:
            with self._waiters_lock:
                waiter = self._waiters.get(fields["id"])
            if waiter is not None:
                waiter.result = fields["result"]
                waiter.event.set()
        elif message.kind is Kind.CHECKPOINT_STATE:
            offer = StopOffer(fields["gen"], fields["at"], fields["reason"], "", "")
            current = self.checkpoint_offer
            if current is None or offer.generation > current.generation:
                self.checkpoint_offer = offer

    def _say_goodbye(self, sock: zmq.Socket) -> None:
        """Final flush, then BYE with the ledger; wait a bounded time for its acknowledgement."""
        self._flush(sock)
        self._send(sock, self._message(Kind.BYE, seq=self._seq, step=self.current_step,
                                       ledger=self.ledger.as_wire()))
        deadline = time.monotonic() + self.config.close_timeout
        while not self._bye_acked.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return
            if sock.poll(remaining_ms, zmq.POLLIN):
                self._receive_all(sock)

    def _hello(self) -> dict[str, Any]:
        return self._message(Kind.HELLO, world=self.config.world_size,
                             local_rank=self.config.local_rank, pid=os.getpid(),
                             host=socket.gethostname(), t=time.time())

    def _message(self, kind: Kind, **fields: Any) -> dict[str, Any]:
        return wire.envelope(kind, self.config.run_id, self.config.rank, self.incarnation, **fields)


class QueryWaiter:
    """One outstanding query: the sender thread fills ``result`` and sets ``event``."""

    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: dict[str, Any] | None = None


def _take(queue: collections.deque, limit: int) -> list:
    """Pop up to ``limit`` items from the left of ``queue`` (safe against concurrent appends)."""
    items = []
    while queue and len(items) < limit:
        items.append(queue.popleft())
    return items


def encode_blocks(records: list) -> tuple[list[list[Any]], int]:
    """Group ``(step, time, metrics)`` records into columnar blocks of equal key sets.

    Returns the wire blocks and how many records had to be dropped because a value could not be
    read (a tensor whose copy failed, a step that is not an integer)."""
    blocks: list[list[Any]] = []
    current_keys: tuple | None = None
    bad = 0
    for step, when, metrics in records:
        try:
            step = step if type(step) is int else int(step)
            if type(metrics) is not dict:  # HostValues: tensors or other non-plain values inside
                metrics = {key: resolve_value(value) for key, value in metrics.items()}
        except Exception:
            bad += 1
            continue
        keys = tuple(metrics)
        if keys != current_keys:
            current_keys = keys
            blocks.append([list(keys), [], [], []])
        block = blocks[-1]
        block[1].append(step)
        block[2].append(when)
        block[3].append(list(metrics.values()))
    return blocks, bad


def resolve_value(value: Any) -> Any:
    """A value as it goes on the wire: plain numbers pass; deferred tensor copies are read now."""
    if type(value) is float or type(value) is int:
        return value
    if isinstance(value, DeferredScalar):
        return value.read()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy scalars, CPU tensors that reached here
    if isinstance(value, bool):
        return int(value)
    return value  # anything else goes as-is; the collector flags wrong types


class HostValues(dict):
    """A copy of a metrics dict that holds values other than plain floats and ints (tensors,
    numpy scalars); the sender resolves them before encoding. Plain dicts skip that step."""

    __slots__ = ()


class DeferredScalar:
    """A 0-d device tensor whose copy to the host was started without blocking the caller.

    The training thread starts the copy (``non_blocking=True``) and records a CUDA event; the
    sender thread waits on that event, off the training thread, before reading the value."""

    __slots__ = ("host_tensor", "event")

    def __init__(self, host_tensor: Any, event: Any) -> None:
        self.host_tensor = host_tensor
        self.event = event

    def read(self) -> float:
        """Wait for the copy (on the calling, background, thread) and return the value."""
        if self.event is not None:
            self.event.synchronize()
        return float(self.host_tensor.item())
