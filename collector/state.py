"""The collector's state machine, with no sockets: messages in, replies and decisions out.

:class:`CollectorState` is fed decoded messages by the receive loop (or by ``rlmon report``
replaying the event log) together with the time; it updates the store, the aggregates, the rank
table, the detectors and the stop state, and returns the replies to send. Everything is
single-threaded and takes the clock as an argument, so tests drive it directly.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

from collector.aggregate import CompletedSteps, StepAggregator
from collector.detectors import (RankWatch, SampleComparator, StreamDetector,
                                 default_stream_detectors, rank_scores)
from collector.rules import DEFAULT_RULES, Finding, Rule, RuleEngine, Score, kl_rule
from collector.ranks import RankTable
from collector.reward_stats import RewardStats
from collector.snapshot import (Alert, CollectorSnapshot, MetricSnapshot, SampleRecord,
                                StopSnapshot)
from collector.stop import MarginPolicy, StopCoordinator
from collector.store import RingStore, SeriesLimitError
from rlmon import wire
from rlmon.wire import Kind, Message, Route

#: Rank number of the cross-rank mean series in the store.
AGGREGATE_RANK = -1
#: Samples kept for reports.
MAX_RECENT_SAMPLES = 256
#: Ranks are numbered 0 .. MAX_RANKS - 1; anything else is refused as ``bad_rank``.
MAX_RANKS = 65_536
#: Alerts kept in memory (all of them also go to alerts.jsonl).
MAX_ALERTS = 10_000


@dataclass(frozen=True, slots=True)
class Reply:
    """A message for one peer, addressed by its ZeroMQ route (:data:`rlmon.wire.Route`)."""

    identity: Route
    fields: dict[str, Any]


@dataclass(kw_only=True, slots=True)
class StateConfig:
    """Settings of the collector's state (the CLI fills these)."""

    run_id: str
    world_size: int = 1
    capacity: int = 10_000
    max_series: int = 4_096
    kl_threshold: float = 0.1
    stats_window: int = 100
    control_key: str = ""
    margin: MarginPolicy = field(default_factory=MarginPolicy)
    rules: dict[str, Rule] | None = None
    """Detector rules; None means the defaults, with the KL rule from ``kl_threshold``."""
    window_size: int = 50
    """Steps in the reward-hacking trend window (the seed's QualityAnalyzer ``window_size``)."""
    sample_size: int = 10
    """Baseline prompts kept by the forgetting probe (the seed's SampleComparator)."""
    comparison_frequency: int = 5
    """Steps between forgetting comparisons."""
    degradation_threshold: float = 0.7
    """Similarity below which a sample counts as degraded."""


class CollectorState:
    """Everything the collector knows, updated one message at a time."""

    def __init__(self, config: StateConfig, on_alert: Callable[[Alert], None] | None = None,
                 on_stop: Callable[[StopSnapshot], None] | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        self.store = RingStore(capacity=config.capacity, max_series=config.max_series)
        self.aggregator = StepAggregator(world_size=config.world_size)
        self.ranks = RankTable()
        self.stop = StopCoordinator()
        self.rules = RuleEngine(config.rules if config.rules is not None else
                                {**DEFAULT_RULES, "kl": kl_rule(config.kl_threshold)})
        self.comparator = SampleComparator(config.sample_size, config.comparison_frequency,
                                           config.degradation_threshold)
        self.detectors = default_stream_detectors(
            config.window_size, lambda: {"sample_similarity": self.comparator.similarity_series()})
        self._detectors_for: dict[str, list[StreamDetector]] = {}
        self._rank_watch = RankWatch()
        self.checkpoints: list[StopSnapshot] = []
        self._checkpoint_sent: float = -math.inf
        self.world_size = config.world_size
        self.frames_by_kind: collections.Counter[str] = collections.Counter()
        self.rejected_by_reason: collections.Counter[str] = collections.Counter()
        self.flagged_by_reason: collections.Counter[str] = collections.Counter()
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=MAX_ALERTS)
        self.alert_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.samples: collections.deque[SampleRecord] = collections.deque(maxlen=MAX_RECENT_SAMPLES)
        self.reward_stats = RewardStats()
        self._last_step = np.zeros(config.max_series, dtype=np.int64)
        self._last_seen = np.zeros(config.max_series, dtype=bool)
        self._last_values = np.full((config.max_series, 3), math.nan)
        self._series_ids: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}
        self._aggregate_ids: dict[str, int] = {}
        self._on_alert = on_alert
        self._on_stop = on_stop

    # -- input -------------------------------------------------------------------------------------

    def reject(self, reason: str) -> None:
        """Count a frame refused before it became a message."""
        self.rejected_by_reason[reason] += 1

    def handle(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        """Apply one validated message; return the replies (none when replaying)."""
        handler = _HANDLERS.get(message.kind)
        if handler is None:
            self.reject("unexpected_kind")
            return []
        if not (message.rank == -1 and message.kind in (Kind.STOP_REQUEST, Kind.QUERY)
                or message.kind is Kind.STOP_STATE) and not 0 <= message.rank < MAX_RANKS:
            self.reject("bad_rank")
            return []
        self.frames_by_kind[message.kind.name.lower()] += 1
        if message.rank >= self.world_size:  # a rank beyond the announced world: widen it
            self._widen_world(message.rank + 1)
        return handler(self, message, identity, now)

    def _widen_world(self, world_size: int) -> None:
        self.world_size = world_size
        self.aggregator.set_world_size(world_size)

    def _on_hello(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        info = self._touch(message, identity, now)
        fields = message.fields
        info.local_rank, info.pid, info.host = fields["local_rank"], fields["pid"], fields["host"][:128]
        if self.world_size < fields["world"] <= MAX_RANKS:
            self._widen_world(fields["world"])
        return self._stop_state_for(info.rank, identity)

    def _on_batch(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        info = self._touch(message, identity, now)
        fields = message.fields
        window = info.window(message.inc)
        floor = fields.get("floor")
        if isinstance(floor, int) and not isinstance(floor, bool) and floor <= fields["seq"]:
            window.give_up_below(floor)  # a floor above the batch's own seq is a lie: ignored
        if window.seen(fields["seq"]):
            self.rejected_by_reason["duplicate"] += 1
            return []
        window.accept(fields["seq"])
        info.batches += 1
        self._read_ledger(info, fields.get("ledger"))
        for block in fields["blocks"]:
            self._ingest_block(message.rank, block, info)
        info.last_step = max(info.last_step, fields["step"])
        self._ingest_samples(message.rank, fields.get("samples", ()), now)
        self.reward_stats.observe(fields.get("rv"), self.flagged_by_reason)
        self._complete_steps(now)
        return []

    def _on_heartbeat(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        info = self._touch(message, identity, now)
        info.last_step = max(info.last_step, message.fields["step"])
        self._read_ledger(info, message.fields.get("ledger"))
        return []

    def _on_bye(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        """Close the incarnation. Its ACK (``bye``) vouches for every batch, so the receive loop
        sends it with :meth:`ack` only after the group commit."""
        info = self._touch(message, identity, now)
        self._read_ledger(info, message.fields.get("ledger"))
        info.disconnect(message.inc)
        return []

    def _on_stop_ack(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        info = self._touch(message, identity, now)
        fields = message.fields
        if fields["ok"]:
            self.stop.acknowledged(message.rank, fields["gen"])
            return []
        info.last_step = max(info.last_step, fields["step"])
        state = self.stop.refused(rank=message.rank, generation=fields["gen"],
                                  rank_step=fields["step"], furthest_step=self.ranks.furthest_step(),
                                  margin_steps=self.margin_steps(), now=now)
        return self._announce(state)

    def _on_stop_request(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        fields = message.fields
        if message.rank < 0:  # an operator: must prove it holds the control key
            if not self.config.control_key or fields.get("key") != self.config.control_key:
                self.rejected_by_reason["bad_control_key"] += 1
                return [Reply(identity, self._reply(Kind.REFUSED, why="bad control key"))] if identity else []
            source = "operator"
        else:
            self._touch(message, identity, now)
            source = f"rank:{message.rank}"
        state = self.request_stop(fields["reason"][:512], _severity(fields["sev"]), source, now)
        replies = self._announce(state)
        if message.rank < 0 and identity is not None and self.stop.state is not None:
            replies.append(Reply(identity, self._stop_message(self.stop.state)))
        return replies

    def _on_stop_state(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        """Only the collector writes STOP_STATE records into its own log; replay restores them."""
        if identity is not None:
            self.rejected_by_reason["unexpected_kind"] += 1
            return []
        f = message.fields
        self.stop.restore(StopSnapshot(f["gen"], f["at"], f["reason"], f["sev"],
                                       float(f.get("t", 0.0)), str(f.get("src", ""))))
        return []

    def _on_query(self, message: Message, identity: Route | None, now: float) -> list[Reply]:
        """Answer a read-only question (:mod:`collector.queries`) to the identity that asked."""
        if identity is None:
            return []
        from collector.queries import answer

        fields = message.fields
        result = answer(self, fields["q"], fields.get("args"))
        return [Reply(identity, self._reply(Kind.RESULT, id=fields["id"], result=result))]

    def is_duplicate(self, message: Message) -> bool:
        """True for a BATCH this collector already holds (the receive loop neither logs nor
        handles it again; it is counted as ``duplicate`` and acknowledged)."""
        if message.kind is not Kind.BATCH or not 0 <= message.rank < MAX_RANKS:
            return False
        info = self.ranks.ranks.get(message.rank)
        window = info.seqs.get(message.inc) if info is not None else None
        if window is None or not window.seen(message.fields["seq"]):
            return False
        self.rejected_by_reason["duplicate"] += 1
        return True

    def system_condition(self, alert_type: str, subject: str, holding: bool, message: str,
                         now: float) -> None:
        """A condition of the collector itself (its event log failing): a CRITICAL alert when it
        starts, firing while it holds, cleared when it ends."""
        key = ("system", subject)
        if holding and key not in self.rules.firing:
            self.rules.firing[key] = (alert_type, "CRITICAL")
            alert = Alert(self.ranks.furthest_step(), "CRITICAL", alert_type, subject, 1.0, 0.0,
                          message, now)
            self._act_on([Finding(alert)], now)
        elif not holding:
            self.rules.firing.pop(key, None)

    def answer(self, question: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer to a QUERY, computed here (tests and offline tools call this directly)."""
        from collector.queries import answer

        return answer(self, question, args)

    # -- decisions -----------------------------------------------------------------------------------

    def request_stop(self, reason: str, severity: str, source: str, now: float) -> StopSnapshot | None:
        """Ask for a coordinated stop; returns the new state when this request decided it."""
        return self.stop.request(reason=reason, severity=severity, source=source,
                                 furthest_step=self.ranks.furthest_step(),
                                 margin_steps=self.margin_steps(), now=now)

    def request_checkpoint(self, reason: str, now: float) -> StopSnapshot | None:
        """Decide a coordinated checkpoint ahead of every rank, unless one is still pending."""
        furthest = self.ranks.furthest_step()
        if self.checkpoints and self.checkpoints[-1].stop_at_step >= furthest:
            return None
        state = StopSnapshot(len(self.checkpoints) + 1, furthest + self.margin_steps(), reason,
                             "CRITICAL", now, "rule")
        self.checkpoints.append(state)
        self._checkpoint_sent = -math.inf
        return state

    def _checkpoint_resends(self, now: float) -> list[Reply]:
        """The pending checkpoint state to every live rank, once a second until its step passed."""
        if not self.checkpoints or now - self._checkpoint_sent < 1.0:
            return []
        state = self.checkpoints[-1]
        if self.ranks.furthest_step() > state.stop_at_step + 1:
            return []
        self._checkpoint_sent = now
        message = self._reply(Kind.CHECKPOINT_STATE, gen=state.generation, at=state.stop_at_step,
                              reason=state.reason)
        return [Reply(identity, message) for rank in self.ranks.live()
                for identity in self.ranks.ranks[rank].identities.values() if identity]

    def margin_steps(self) -> int:
        """Steps between the furthest reported step and a new stop step, from measured rates."""
        return self.config.margin.steps(self.ranks.fastest_rate(), self.ranks.worst_lag())

    def resends(self, now: float) -> list[Reply]:
        """The stop state for every live rank that has not acknowledged it (rate-limited)."""
        replies = self._checkpoint_resends(now)
        state = self.stop.state
        if state is None:
            return replies
        for rank in self.stop.due(self.ranks.live(), now):
            for identity in self.ranks.ranks[rank].identities.values():
                if identity:
                    replies.append(Reply(identity, self._stop_message(state)))
        return replies

    def _announce(self, state: StopSnapshot | None) -> list[Reply]:
        if state is None:
            return []
        if self._on_stop is not None:
            self._on_stop(state)
        return []  # the next resends() call sends it to every rank

    def _stop_state_for(self, rank: int, identity: Route | None) -> list[Reply]:
        state = self.stop.state
        if state is None or identity is None:
            return []
        return [Reply(identity, self._stop_message(state))]

    # -- ingest ----------------------------------------------------------------------------------

    def _touch(self, message: Message, identity: Route | None, now: float):
        info = self.ranks.get(message.rank)
        info.last_seen = now
        info.incarnation = message.inc
        if message.kind is not Kind.BYE:
            info.connect(message.inc, identity)
        return info

    def _read_ledger(self, info, ledger: Any) -> None:
        if not isinstance(ledger, dict):
            return
        dropped = ledger.get("dropped")
        if isinstance(dropped, dict):
            info.ledger_dropped = {str(k)[:32]: int(v) for k, v in list(dropped.items())[:16]
                                   if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        emitted = ledger.get("emitted")
        if isinstance(emitted, int) and not isinstance(emitted, bool):
            info.emitted = emitted

    def _ingest_block(self, rank: int, block: wire.Block, info) -> None:
        if block.packed:
            matrix, valid = block.values, None
        else:
            matrix, valid = _numeric_matrix(block.values, len(block.keys))
        wrong = int(valid.size - valid.sum()) if valid is not None else 0
        if wrong:
            self.flagged_by_reason["wrong_type"] += wrong
        finite = np.isfinite(matrix)
        if not finite.all():
            self._count_non_finite(matrix, finite, valid)
            self._score_non_finite(rank, block, finite if valid is None else finite | ~valid)
        elif self.rules.firing:
            self._clear_non_finite(rank, block)
        ids = self._ids_for(rank, block.keys)
        if ids is None:
            return
        steps = block.steps
        if valid is None:
            self.store.append_block(ids, steps, matrix)
        else:
            self._append_valid(ids, steps, matrix, valid)
        self.aggregator.add_block(rank, block.keys, steps, np.where(valid, matrix, np.nan)
                                  if valid is not None else matrix)
        info.scalars += matrix.size - wrong
        info.observe_steps(block.steps, block.times)
        info.observe_lag(float(block.times[-1]) if len(block.times) else info.last_seen, info.last_seen)

    def _count_non_finite(self, matrix: np.ndarray, finite: np.ndarray, valid) -> None:
        nan = np.isnan(matrix) if valid is None else np.isnan(matrix) & valid
        self.flagged_by_reason["nan"] += int(nan.sum())
        self.flagged_by_reason["inf"] += int(np.isinf(matrix).sum())

    def _score_non_finite(self, rank: int, block: wire.Block, finite: np.ndarray) -> None:
        """Every metric with a NaN/Inf in this block gets a NAN_VALUE score of 1."""
        now = self.ranks.get(rank).last_seen
        for column in np.flatnonzero(~finite.all(axis=0)):
            row = int(np.flatnonzero(~finite[:, column])[0])
            score = Score("nan", "NAN_VALUE", block.keys[column], int(block.steps[row]), 1.0,
                          "non-finite values", rank)
            self._act_on([self.rules.evaluate(score, now)], now)

    def _clear_non_finite(self, rank: int, block: wire.Block) -> None:
        """A finite value again clears a firing NAN_VALUE for that metric."""
        for key in block.keys:
            if ("nan", key) in self.rules.firing:
                self.rules.evaluate(Score("nan", "NAN_VALUE", key, int(block.steps[-1]), 0.0), 0.0)

    def _append_valid(self, ids: np.ndarray, steps: np.ndarray, matrix: np.ndarray,
                      valid: np.ndarray) -> None:
        for column, series in enumerate(ids):
            for row in np.flatnonzero(valid[:, column]):
                self.store.append(int(series), int(steps[row]), float(matrix[row, column]))

    def _ids_for(self, rank: int, keys: list[str]) -> np.ndarray | None:
        cache_key = (rank, tuple(keys))
        ids = self._series_ids.get(cache_key)
        if ids is not None:
            return ids
        try:
            ids = np.array([self.store.series_id(k, rank) for k in keys], dtype=np.int64)
        except SeriesLimitError:
            self.rejected_by_reason["series_limit"] += 1
            return None
        if len(self._series_ids) > 10_000:
            self._series_ids.clear()
        self._series_ids[cache_key] = ids
        return ids

    def _ingest_samples(self, rank: int, samples: Any, now: float) -> None:
        for step, prompts, responses, rewards in samples:
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                reward = _as_float(rewards[i]) if rewards is not None else math.nan
                self.samples.append(SampleRecord(step, rank, prompt[:2000], response[:2000], reward))
            for score in self.comparator.observe(step, prompts, responses):
                self._act_on([self.rules.evaluate(score, now)], now)

    def _complete_steps(self, now: float) -> None:
        self._apply_aggregates(self.aggregator.pop_completed_arrays(), now)

    def finish(self, now: float) -> None:
        """End of run: complete every pending step with whatever ranks reported."""
        self._apply_aggregates(self.aggregator.flush_arrays(), now)

    def _apply_aggregates(self, done: CompletedSteps, now: float) -> None:
        """Store completed cross-rank steps, then let the detectors score each metric's block;
        alerts are acted on in step order."""
        runs = list(done.runs())
        if not runs:
            return
        self._store_aggregates(done, runs)
        findings: list[Finding] = []
        for metric, rows in runs:
            detectors = self._detectors_watching(metric)
            if not detectors or metric not in self._aggregate_ids:  # not stored: series_limit
                continue
            steps, means = done.step[rows], done.mean[rows]
            for detector in detectors:
                for series in detector.score(metric, steps, means, self._aggregate_tail):
                    findings += self.rules.evaluate_series(series, now)
        findings.sort(key=lambda finding: finding.alert.step)
        self._act_on(findings, now)

    def _detectors_watching(self, metric: str) -> list[StreamDetector]:
        detectors = self._detectors_for.get(metric)
        if detectors is None:
            detectors = self._detectors_for[metric] = [d for d in self.detectors if d.watches(metric)]
        return detectors

    def _aggregate_tail(self, metric: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The last ``n`` stored cross-rank means of ``metric`` as ``(steps, values)``."""
        series = self._aggregate_ids.get(metric)
        if series is None:
            series = self.store.find(metric, AGGREGATE_RANK)
        if series is None:
            return np.empty(0, np.int64), np.empty(0)
        return self.store.history(series, n)

    def tick(self, now: float) -> None:
        """Score the rank table (silent, stuck, straggling ranks; dropped events)."""
        scores = rank_scores(self.ranks, now, self._span_seconds_by_rank(), self._rank_watch)
        self._act_on([self.rules.evaluate(score, now) for score in scores], now)

    def _span_seconds_by_rank(self) -> dict[int, float]:
        """Per rank, the mean seconds a step spent in timed phases (``span/*``), last 20 steps:
        one pass over the series, whatever the number of ranks."""
        totals: dict[int, float] = collections.defaultdict(float)
        for series, (metric, rank) in enumerate(self.store.keys()):
            if rank >= 0 and metric.startswith("span/"):
                _, values = self.store.history(series, 20)
                finite = values[np.isfinite(values)]
                totals[rank] += float(finite.mean()) if finite.size else 0.0
        return totals

    def _store_aggregates(self, done: CompletedSteps, runs: list[tuple[str, slice]]) -> None:
        """Append each metric's completed means to its cross-rank series: one store call when
        every metric completed the same steps (the usual case), else one per metric."""
        ids = [self._aggregate_id(metric) for metric, _ in runs]
        first = runs[0][1]
        width = first.stop - first.start
        if all(rows.stop - rows.start == width for _, rows in runs) and None not in ids:
            steps = done.step.reshape(len(runs), width)
            if len(runs) == 1 or (steps == steps[0]).all():
                self.store.append_block(np.array(ids, dtype=np.int64), steps[0],
                                        done.mean.reshape(len(runs), width).T)
                self._note_last_aggregates(done, runs, ids)
                return
        for (metric, rows), series in zip(runs, ids):
            if series is not None:
                self.store.append_block(np.array([series], dtype=np.int64), done.step[rows],
                                        done.mean[rows].reshape(-1, 1))
        self._note_last_aggregates(done, runs, ids)

    def _aggregate_id(self, metric: str) -> int | None:
        series = self._aggregate_ids.get(metric)
        if series is None:
            try:
                series = self._aggregate_ids[metric] = self.store.series_id(metric, AGGREGATE_RANK)
            except SeriesLimitError:
                self.rejected_by_reason["series_limit"] += 1
        return series

    def _note_last_aggregates(self, done: CompletedSteps, runs: list[tuple[str, slice]],
                              ids: list[int | None]) -> None:
        """Remember each metric's newest completed step, mean, min and max (by series id)."""
        known = [(series, rows.stop - 1) for (_, rows), series in zip(runs, ids) if series is not None]
        if not known:
            return
        series, lasts = np.array(known, dtype=np.int64).T
        self._last_step[series] = done.step[lasts]
        self._last_seen[series] = True
        for column, source in enumerate((done.mean, done.min, done.max)):
            self._last_values[series, column] = source[lasts]

    def last_aggregate(self, metric: str) -> tuple[int, float, float, float]:
        """``(step, mean, min, max)`` of the newest completed step of ``metric``
        (``(-1, nan, nan, nan)`` before the first)."""
        series = self._aggregate_ids.get(metric)
        if series is None or not self._last_seen[series]:
            return -1, math.nan, math.nan, math.nan
        mean, low, high = self._last_values[series].tolist()
        return int(self._last_step[series]), mean, low, high

    def _act_on(self, findings: list[Finding | None], now: float) -> None:
        for finding in findings:
            if finding is None:
                continue
            self.alerts.append(finding.alert)
            self.alert_counts[(finding.alert.type, finding.alert.severity)] += 1
            if self._on_alert is not None:
                self._on_alert(finding.alert)
            if finding.action == "checkpoint":
                self.request_checkpoint(finding.alert.message, now)
            if finding.action == "stop":
                state = self.request_stop(finding.alert.message, finding.alert.severity,
                                          f"detector:{finding.alert.type.lower()}", now)
                self._announce(state)

    # -- output ----------------------------------------------------------------------------------

    def _reply(self, kind: Kind, **fields: Any) -> dict[str, Any]:
        return wire.envelope(kind, self.config.run_id, -1, 0, **fields)

    def _stop_message(self, state: StopSnapshot) -> dict[str, Any]:
        return self._reply(Kind.STOP_STATE, gen=state.generation, at=state.stop_at_step,
                           reason=state.reason, sev=state.severity, t=state.decided_at,
                           src=state.source)

    def stop_record(self, state: StopSnapshot) -> bytes:
        """The STOP_STATE frame the collector writes into its own event log."""
        return wire.encode(self._stop_message(state))

    def ack(self, identity: Route, rank: int, inc: int, bye: bool = False) -> Reply:
        """Acknowledge everything durably logged from ``(rank, inc)`` (``bye``: answering its
        BYE, which the rank waits for before it exits)."""
        seq = self.ranks.get(rank).acknowledged(inc)
        fields = {"seq": seq, "bye": True} if bye else {"seq": seq}
        return Reply(identity, self._reply(Kind.ACK, **fields))

    def snapshot(self, now: float, *, with_history: bool = False, finished: bool = False,
                 window: int | None = None) -> CollectorSnapshot:
        """An immutable view for exporters. ``with_history`` copies whole series (reports)."""
        window = self.config.stats_window if window is None else window
        last_points = self._last_points_by_metric()
        metrics = {name: self._metric_snapshot(name, with_history, window, *last_points[name])
                   for name in sorted(last_points)}
        ranks = {r: info.snapshot() for r, info in sorted(self.ranks.ranks.items())}
        return CollectorSnapshot(
            run_id=self.config.run_id, started_at=self.started_at, taken_at=now,
            world_size=self.world_size, kl_threshold=self.config.kl_threshold,
            metrics=MappingProxyType(metrics), ranks=MappingProxyType(ranks),
            frames_received_by_kind=MappingProxyType(dict(self.frames_by_kind)),
            frames_rejected_by_reason=MappingProxyType(dict(self.rejected_by_reason)),
            values_flagged_by_reason=MappingProxyType(dict(self.flagged_by_reason)),
            alerts=tuple(self.alerts), alert_counts=MappingProxyType(dict(self.alert_counts)),
            stop=self.stop.state, recent_samples=tuple(self.samples),
            series_count=self.store.series_count, series_capacity=self.store.capacity,
            finished=finished, firing=tuple(sorted(
                (kind, subject, severity)
                for (_, subject), (kind, severity) in self.rules.firing.items())),
            extra=MappingProxyType({"rewards": self.reward_stats.summary(), "sample_comparisons": {
                **self.comparator.get_comparison_summary(),
                "similarities": self.comparator.similarity_series().tolist() if with_history else [],
                "threshold": self.comparator.degradation_threshold}}))

    def _last_points_by_metric(self) -> dict[str, tuple[dict[int, float], dict[int, int]]]:
        """Per metric logged by some rank: ``({rank: last value}, {rank: its step})``, from one
        gather over the whole store."""
        steps, values = self.store.last_of_all()
        by_metric: dict[str, tuple[dict[int, float], dict[int, int]]] = {}
        for (metric, rank), step, value in zip(self.store.keys(), steps.tolist(), values.tolist()):
            if rank < 0:
                continue
            last_values, last_steps = by_metric.setdefault(metric, ({}, {}))
            last_values[rank], last_steps[rank] = value, step
        return by_metric

    def _metric_snapshot(self, name: str, with_history: bool, window: int | None,
                         last_by_rank: dict[int, float],
                         last_step_by_rank: dict[int, int]) -> MetricSnapshot:
        aggregate_series = self.store.find(name, AGGREGATE_RANK)
        if aggregate_series is None:  # no step completed yet: describe rank 0's series instead
            aggregate_series = self.store.find(name, min(last_by_rank, default=0))
        stats = self.store.window_stats(aggregate_series, None if with_history else window)
        by_rank = {}
        if with_history:
            steps, values = self.store.history(aggregate_series)
            by_rank = {rank: self.store.history(self.store.find(name, rank))
                       for rank in last_by_rank}
        else:
            steps, values = np.empty(0, np.int64), np.empty(0, np.float64)
        step, mean, low, high = self.last_aggregate(name)
        return MetricSnapshot(name, MappingProxyType(last_by_rank),
                              MappingProxyType(last_step_by_rank),
                              MappingProxyType({"mean": mean, "min": low, "max": high}), step,
                              stats, steps, values, MappingProxyType(by_rank))


_HANDLERS = {
    Kind.HELLO: CollectorState._on_hello,
    Kind.BATCH: CollectorState._on_batch,
    Kind.HEARTBEAT: CollectorState._on_heartbeat,
    Kind.BYE: CollectorState._on_bye,
    Kind.STOP_ACK: CollectorState._on_stop_ack,
    Kind.STOP_REQUEST: CollectorState._on_stop_request,
    Kind.STOP_STATE: CollectorState._on_stop_state,
    Kind.QUERY: CollectorState._on_query,
}


def _numeric_matrix(rows: list[list[Any]], width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of values as a float64 matrix; with a validity mask when some are not numbers."""
    if not rows:
        return np.empty((0, width), np.float64), None
    try:
        plain = np.array(rows)
        if plain.dtype.kind in "fiub" and plain.shape == (len(rows), width):
            return plain.astype(np.float64, copy=False), None
    except (TypeError, ValueError, OverflowError):
        pass
    valid = np.array([[_is_number(v) for v in row] for row in rows], dtype=bool).reshape(len(rows), width)
    matrix = np.array([[_as_float(v) if ok else math.nan for v, ok in zip(row, oks)]
                       for row, oks in zip(rows, valid)], dtype=np.float64).reshape(len(rows), width)
    return matrix, valid


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < 2**1023
    return isinstance(value, float)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _severity(value: str) -> str:
    value = value.upper()
    return value if value in ("INFO", "WARNING", "CRITICAL") else "CRITICAL"
