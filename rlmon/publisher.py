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
from typing import Any, Callable

import zmq

from rlmon import wire
from rlmon.config import RankConfig
from rlmon.keys import client_keys_from_env
from rlmon.wire import Kind

log = logging.getLogger("rlmon")

#: Most steps encoded into one batch frame; more pending steps go into further batches.
MAX_STEPS_PER_BATCH = 512
#: Longest wait between two flushes while nothing is queued (the wait doubles from
#: ``flush_interval`` up to this, and drops back as soon as something is logged).
IDLE_FLUSH_INTERVAL = 0.1
#: Reward values (summed over ``rv`` entries) put into one batch frame: about 1 MB of msgpack.
MAX_REWARD_VALUES_PER_BATCH = 131_072


@dataclass(frozen=True, slots=True)
class StopOffer:
    """A stop state received from the collector (see DESIGN.md, "Stop decisions")."""

    generation: int
    stop_at_step: int
    reason: str
    severity: str
    source: str


#: Drop reasons counted when ``log`` is called (the step never entered the queue).
CALL_DROPS = ("queue_full", "closed", "bad_value")
#: Drop reasons that count samples or reward values, not ``log`` calls.
NON_STEP_DROPS = ("bad_sample", "bad_key")


@dataclass(slots=True)
class Ledger:
    """What happened to the steps this rank logged. Counts only ever grow, except ``unacked``.

    ``emitted`` counts every ``log`` call. Each one is, at any moment, exactly one of:
    acknowledged (``acked``: the collector holds it durably), dropped and counted by reason
    (``queue_full``, ``closed``, ``bad_value``: at the call; ``unreadable``: a tensor copy failed;
    ``resend_overflow``: its batch was pushed out of the bounded re-send buffer), unacknowledged
    (``unacked``: sent or waiting to be sent, held for re-sending), or still queued. ``rlmon
    verify`` checks that balance against the event log. ``bad_sample`` counts samples and reward
    values that could not be read (not steps)."""

    emitted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    batches_sent: int = 0
    acked_seq: int = 0
    acked: int = 0
    taken: int = 0
    """Steps the sender took off the queue (acknowledged, dropped by the sender, or unacked)."""
    unacked: int = 0

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` lost steps (or samples, for ``bad_sample``) under ``reason``."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def queued(self) -> int:
        """Steps logged and not yet taken by the sender."""
        call_drops = sum(self.dropped.get(reason, 0) for reason in CALL_DROPS)
        return max(0, self.emitted - call_drops - self.taken)

    def as_wire(self) -> dict[str, Any]:
        """The ledger as sent in batches, heartbeats and BYE."""
        return {"emitted": self.emitted, "dropped": dict(self.dropped), "sent": self.batches_sent,
                "acked": self.acked, "acked_seq": self.acked_seq, "unacked": self.unacked,
                "queued": self.queued()}


@dataclass(slots=True)
class SentBatch:
    """A batch held until the collector acknowledges it: its frame, its steps, when it was last
    handed to ZeroMQ (``None`` while ZeroMQ refused it)."""

    frame: bytes
    steps: int
    sent_at: float | None
    sends: int = 0


class ResendBuffer:
    """Batches sent and not yet acknowledged, oldest first, bounded by ``max_batches`` and
    ``max_bytes``: a full buffer pushes its oldest batch out (counted as ``resend_overflow``).

    The collector acknowledges the highest ``seq`` up to which it holds every batch; after a
    collector restart (or a batch lost in flight) the unacknowledged ones are sent again, in
    order, with their original ``seq``, and the collector drops the ones it already holds."""

    #: Longest wait between two re-sends while the collector acknowledges nothing.
    MAX_BACKOFF = 120.0

    def __init__(self, ledger: Ledger, max_batches: int, max_bytes: int, resend_after: float) -> None:
        self.ledger = ledger
        self.max_batches, self.max_bytes, self.resend_after = max_batches, max_bytes, resend_after
        self.batches: collections.OrderedDict[int, SentBatch] = collections.OrderedDict()
        self.bytes = 0
        self.resends = 0
        self._given_up: collections.OrderedDict[int, int] = collections.OrderedDict()
        """Batches pushed out after they were handed to ZeroMQ: seq → steps."""
        self._last_event = 0.0  # the last ACK that made progress, or the last re-send
        self._backoff = resend_after

    def floor(self, next_seq: int) -> int:
        """The lowest ``seq`` still held (``next_seq`` when none): every batch below it is
        acknowledged or given up, so the collector need not wait for it."""
        return next(iter(self.batches), next_seq)

    def add(self, seq: int, frame: bytes, steps: int) -> None:
        """Hold a new batch (not yet sent); push out the oldest while over the bounds."""
        self.batches[seq] = SentBatch(frame, steps, None)
        self.bytes += len(frame)
        self.ledger.unacked += steps
        while len(self.batches) > 1 and (len(self.batches) > self.max_batches
                                          or self.bytes > self.max_bytes):
            seq_out, oldest = self.batches.popitem(last=False)
            self._forget(oldest)
            self.ledger.drop("resend_overflow", oldest.steps)
            if oldest.sends:  # it may still arrive (ZeroMQ's queue): an ACK can still vouch for it
                self._given_up[seq_out] = oldest.steps
                while len(self._given_up) > 65_536:
                    del self._given_up[next(iter(self._given_up))]

    def acknowledge(self, seq: int) -> None:
        """The collector durably holds every batch up to ``seq``."""
        progress = False
        while self._given_up and next(iter(self._given_up)) <= seq:
            _, steps = self._given_up.popitem(last=False)
            self.ledger.dropped["resend_overflow"] -= steps  # it arrived after all
            if not self.ledger.dropped["resend_overflow"]:
                del self.ledger.dropped["resend_overflow"]
            self.ledger.acked += steps
        while self.batches and next(iter(self.batches)) <= seq:
            _, batch = self.batches.popitem(last=False)
            self._forget(batch)
            self.ledger.acked += batch.steps
            progress = True
        if progress:  # the collector is alive and keeping up, if slowly: no re-send needed
            self._last_event, self._backoff = time.monotonic(), self.resend_after

    def due(self, now: float) -> list[SentBatch]:
        """Batches to hand to ZeroMQ now, in order: the ones it refused before; or, when no
        acknowledgement made progress for ``resend_after`` seconds after the oldest was sent,
        all of them, again after 2×, 4×… that wait (up to :data:`MAX_BACKOFF`) while none comes.
        A collector that is slow but acknowledging is never sent duplicates."""
        unsent = self._unsent_tail()
        if unsent:
            return unsent
        oldest = next(iter(self.batches.values()), None)
        if oldest is None or now - max(oldest.sent_at, self._last_event) < self._backoff:
            return []
        self._last_event = now
        self._backoff = min(2 * self._backoff, self.MAX_BACKOFF)
        self.resends += 1
        return list(self.batches.values())

    def has_unsent(self) -> bool:
        """True when a held batch waits to be handed to ZeroMQ."""
        newest = next(reversed(self.batches.values()), None)
        return newest is not None and newest.sent_at is None

    def _unsent_tail(self) -> list[SentBatch]:
        """The batches ZeroMQ has not taken yet, oldest first. They are always the newest ones
        (batches go out in order and sending stops at the first refusal; a reconnection marks
        them all), so this reads from the end instead of walking every held batch each flush."""
        tail = []
        for batch in reversed(self.batches.values()):
            if batch.sent_at is not None:
                break
            tail.append(batch)
        tail.reverse()
        return tail

    def mark_unsent(self) -> None:
        """After a reconnection: every held batch goes out again, in order (the collector drops
        the ones it already holds)."""
        if self.batches:
            self.resends += 1
        for batch in self.batches.values():
            batch.sent_at = None

    def _forget(self, batch: SentBatch) -> None:
        self.bytes -= len(batch.frame)
        self.ledger.unacked -= batch.steps


class Publisher:
    """Queues and a background sender for one process. Thread affinity: ``pending``, ``samples``
    and ``outbox`` are appended to by the training thread; everything else runs on the sender."""

    def __init__(self, config: RankConfig, endpoint: str, start: bool = True) -> None:
        self.config = config
        self.endpoint = endpoint
        self.incarnation = random.getrandbits(31)
        self.pending: collections.deque = collections.deque()
        self.samples: collections.deque = collections.deque()
        self.reward_values: collections.deque = collections.deque()
        """``[step, name, values]`` entries (the BATCH field ``rv``) from wrapped reward functions."""
        self.outbox: collections.deque = collections.deque()
        self.queries: collections.deque = collections.deque()
        """QUERY messages, sent after the pending steps (a query usually sees what was logged
        before it; not when ZeroMQ refused an earlier batch, which then follows later)."""
        self.curve = client_keys_from_env(os.environ)  # ConfigError here, at init, if misconfigured
        self.ledger = Ledger()
        self.resend = ResendBuffer(self.ledger, config.resend_batches, config.resend_bytes,
                                   config.resend_after)
        self.stop_offer: StopOffer | None = None
        self.checkpoint_offer: StopOffer | None = None
        self.current_step = -1
        self._seq = 0
        self._connected_before = False
        self._last_stop_ack: dict[str, Any] | None = None
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
        connections = None
        try:
            self._configure(sock)
            connections = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
            sock.connect(self.endpoint)
            self._send(sock, self._hello())
            self._loop(sock, connections)
            self._say_goodbye(sock)
        except Exception:  # the sender must never take the process down
            log.exception("rlmon publisher stopped")
        finally:
            if connections is not None:
                connections.close(linger=0)
            sock.close(linger=0)
            context.term()

    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.IMMEDIATE, 0)
        if self.curve is not None:
            self.curve.apply(sock)

    def _loop(self, sock: zmq.Socket, connections: zmq.Socket) -> None:
        """Read replies as they come; flush on a fixed cadence. (Flushing on every reply made
        each ACK trigger the next small batch: a batch/ACK ping-pong that kept this thread, and
        the GIL, busy between the training thread's calls.) A new TCP connection after the first
        (the collector restarted, or the link was reset) re-sends every unacknowledged batch:
        what was in flight on the old connection may be lost; on a live one ZeroMQ loses nothing."""
        interval = wait = self.config.flush_interval
        next_flush = time.monotonic()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(connections, zmq.POLLIN)
        while not self._closing.is_set():
            wait_ms = max(0, int((next_flush - time.monotonic()) * 1000) + 1)
            ready = dict(poller.poll(wait_ms))
            if sock in ready:
                self._receive_all(sock)
            if connections in ready:
                self._on_connection_events(connections)
            now = time.monotonic()
            if now >= next_flush:
                busy = self._has_work()
                try:
                    self._flush(sock)
                except Exception:  # one bad item must not end the sender (stops would be lost)
                    log.exception("rlmon: a flush failed; the sender goes on")
                # Idle, the thread wakes less and less often (up to every IDLE_FLUSH_INTERVAL):
                # a thousand idle ranks on a host should not cost it 50 wake-ups a second each.
                wait = interval if busy else min(2 * wait, IDLE_FLUSH_INTERVAL)
                next_flush = now + max(wait, interval)

    def _flush(self, sock: zmq.Socket) -> None:
        """Send control messages, samples and pending steps; a heartbeat when idle."""
        while self.outbox:
            message = self.outbox.popleft()
            if message.get("k") == Kind.STOP_ACK:
                self._last_stop_ack = message
            self._send(sock, message)
        self._send_held(sock)
        records = _take(self.pending, MAX_STEPS_PER_BATCH)
        samples = _take(self.samples, 64)
        rewards = _take_reward_values(self.reward_values, MAX_REWARD_VALUES_PER_BATCH)
        while records or samples or rewards:
            self._send_batch(sock, records, samples, rewards)
            records = _take(self.pending, MAX_STEPS_PER_BATCH)
            samples = []
            rewards = _take_reward_values(self.reward_values, MAX_REWARD_VALUES_PER_BATCH)
        while self.queries:
            self._send(sock, self.queries.popleft())
        if time.monotonic() - self._last_send >= self.config.heartbeat_interval:
            self._send(sock, self._message(Kind.HEARTBEAT, step=self.current_step, t=time.time(),
                                           ledger=self.ledger.as_wire()))

    def _has_work(self) -> bool:
        """Anything queued to send (steps, samples, reward values, control messages, queries,
        batches ZeroMQ refused)?"""
        return bool(self.pending or self.samples or self.reward_values or self.outbox
                    or self.queries or self.resend.has_unsent())

    def _on_connection_events(self, connections: zmq.Socket) -> None:
        while True:
            try:
                connections.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self._connected_before:
                self.resend.mark_unsent()
            self._connected_before = True

    def _send_batch(self, sock: zmq.Socket, records: list, samples: list,
                    rewards: list | None = None) -> None:
        """Encode one batch, hold it for re-sending, and hand it to ZeroMQ (unless batches it
        refused earlier are still waiting: order is kept)."""
        self.ledger.taken += len(records)
        key_drops: list[int] = []
        blocks, bad = encode_blocks(records, key_drops)
        if key_drops:
            self.ledger.drop("bad_key", sum(key_drops))
        if bad:
            self.ledger.drop("unreadable", bad)
        self._seq += 1
        steps = len(records) - bad
        self.ledger.unacked += steps  # counted before the ledger is written into the batch
        message = self._message(Kind.BATCH, seq=self._seq, t=time.time(), step=self.current_step,
                                blocks=blocks, samples=samples, ledger=self.ledger.as_wire(),
                                floor=self.resend.floor(self._seq))
        self.ledger.unacked -= steps
        if rewards:
            message["rv"] = rewards
        try:
            frame = wire.encode(message)
        except (TypeError, ValueError, OverflowError):  # a value msgpack cannot carry
            message.pop("rv", None)
            message["samples"] = []
            message["blocks"], bad = encode_blocks(_encodable(records))
            self.ledger.drop("unreadable", steps - sum(_block_steps(b) for b in message["blocks"]))
            steps = sum(_block_steps(b) for b in message["blocks"])
            self.ledger.drop("bad_sample", len(samples) + len(rewards or ()))
            frame = wire.encode(message)
        self.resend.add(self._seq, frame, steps)
        self._send_held(sock)

    def _send_held(self, sock: zmq.Socket) -> None:
        """Hand ZeroMQ the held batches that are due (see :meth:`ResendBuffer.due`), in order,
        stopping at the first one it refuses (its queue is full: the collector is slow or gone)."""
        now = time.monotonic()
        for batch in self.resend.due(now):
            if not self._send_frame(sock, batch.frame):
                return
            if not batch.sends:
                self.ledger.batches_sent += 1
            batch.sends += 1
            batch.sent_at = now

    def _send(self, sock: zmq.Socket, message: dict[str, Any]) -> bool:
        return self._send_frame(sock, wire.encode(message))

    def _send_frame(self, sock: zmq.Socket, frame: bytes) -> bool:
        try:
            sock.send(frame, zmq.NOBLOCK)
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
            self.resend.acknowledge(fields["seq"])
            if fields.get("bye"):
                self._bye_acked.set()
        elif message.kind is Kind.STOP_STATE:
            offer = StopOffer(fields["gen"], fields["at"], fields["reason"], fields["sev"],
                              str(fields.get("src", "")))
            current = self.stop_offer
            if current is None or offer.generation > current.generation:
                self.stop_offer = offer
            elif self._last_stop_ack is not None and self._last_stop_ack["gen"] == offer.generation:
                self.outbox.append(self._last_stop_ack)  # a collector that lost our ACK (restarted)
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
        """Final flush; wait (within ``close_timeout``) for the held batches' acknowledgements so
        the BYE's ledger says what the collector holds; then BYE, and wait for its ACK."""
        deadline = time.monotonic() + self.config.close_timeout
        self._flush(sock)
        self._wait_until(sock, deadline, lambda: not self.resend.batches)
        self._send(sock, self._message(Kind.BYE, seq=self._seq, step=self.current_step,
                                       ledger=self.ledger.as_wire()))
        self._wait_until(sock, deadline, self._bye_acked.is_set)

    def _wait_until(self, sock: zmq.Socket, deadline: float, done: Callable[[], bool]) -> None:
        """Read replies until ``done()`` or the deadline."""
        while not done():
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


def _take_reward_values(queue: collections.deque, max_values: int) -> list:
    """Pop ``rv`` entries from the left of ``queue`` until they hold ``max_values`` values (at
    least one entry when any is queued)."""
    entries: list = []
    total = 0
    while queue and (not entries or total + len(queue[0][2]) <= max_values):
        entry = queue.popleft()
        entries.append(entry)
        total += len(entry[2])
    return entries


def encode_blocks(records: list, key_drops: list[int] | None = None) -> tuple[list[list[Any]], int]:
    """Group ``(step, time, metrics)`` records into columnar blocks of equal key sets, packed
    (:func:`rlmon.wire.pack_block`) when every value is a number.

    Returns the wire blocks and how many records had to be dropped because a value could not be
    read (a tensor whose copy failed, a step that is not an integer). Keys the collector would
    refuse (not a string, empty, longer than 256 characters) are left out of their record, and
    how many is appended to ``key_drops``: one bad key must not cost the whole batch."""
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
        valid = _valid_keys(keys)
        if len(valid) != len(keys):
            if key_drops is not None:
                key_drops.append(len(keys) - len(valid))
            if not valid:
                bad += 1
                continue
            metrics, keys = {key: metrics[key] for key in valid}, valid
        if keys != current_keys:
            current_keys = keys
            blocks.append([list(keys), [], [], []])
        block = blocks[-1]
        block[1].append(step)
        block[2].append(when)
        block[3].append(list(metrics.values()))
    return [wire.pack_block(*block) for block in blocks], bad


def _valid_keys(keys: tuple) -> tuple:
    """``keys`` itself when the collector accepts every one, else the acceptable ones
    (cached per key set: a rank logs the same few key sets over and over)."""
    checked = _CHECKED_KEYS.get(keys)
    if checked is None:
        good = tuple(key for key in keys if wire.valid_key(key))
        checked = keys if len(good) == len(keys) else good
        if len(_CHECKED_KEYS) >= 512:
            _CHECKED_KEYS.clear()
        _CHECKED_KEYS[keys] = checked
    return checked


_CHECKED_KEYS: dict[tuple, tuple] = {}


def _encodable(records: list) -> list:
    """The records whose step and values msgpack can encode (the rest are left out)."""
    kept = []
    for record in records:
        try:
            wire.encode(encode_blocks([record])[0])
        except (TypeError, ValueError, OverflowError):
            continue
        kept.append(record)
    return kept


def _block_steps(block: list) -> int:
    """Steps in one wire block (plain or packed)."""
    steps = block[1]
    return len(steps) // 8 if isinstance(steps, bytes) else len(steps)


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
    if value is None or type(value) is str:
        return value  # the collector counts it as a wrong type
    try:
        return float(value)  # Decimal, Fraction, a 1-element array...
    except (TypeError, ValueError, OverflowError):
        return None  # not encodable (an array, an object): sent as nil, counted as wrong_type


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
