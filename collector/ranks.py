"""The rank table: who is publishing, how far each rank got, how fast, and what it dropped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Sequence

from collector.snapshot import RankSnapshot
from rlmon.wire import Route

#: Shortest stretch of a rank's clock over which its step rate is measured.
RATE_WINDOW_SECONDS = 0.5
#: Weight of the newest observation in the step-rate and lag moving averages.
_SMOOTHING = 0.3


#: Sequence numbers remembered above the contiguous watermark (older ones are forgotten and
#: counted as given up, so a rank that never fills a gap cannot grow the set without bound).
MAX_SEQS_ABOVE_WATERMARK = 4096


@dataclass(slots=True)
class SeqWindow:
    """Which batches of one incarnation the collector holds: every ``seq <= watermark``, plus the
    ones in ``above`` (received out of order, after a gap that a re-send may still fill)."""

    watermark: int = 0
    above: set[int] = field(default_factory=set)

    def seen(self, seq: int) -> bool:
        """True when batch ``seq`` was already accepted (a duplicate)."""
        return seq <= self.watermark or seq in self.above

    def accept(self, seq: int) -> None:
        """Record batch ``seq`` and advance the watermark over what is now contiguous."""
        self.above.add(seq)
        self._advance()

    def give_up_below(self, floor: int) -> None:
        """The rank holds nothing below ``floor`` any more (acknowledged or dropped): stop
        waiting for those gaps."""
        if floor - 1 > self.watermark:
            self.watermark = floor - 1
            self.above = {s for s in self.above if s > self.watermark}
            self._advance()

    def _advance(self) -> None:
        while self.watermark + 1 in self.above:
            self.watermark += 1
            self.above.discard(self.watermark)
        if len(self.above) > MAX_SEQS_ABOVE_WATERMARK:
            self.give_up_below(min(self.above))


@dataclass(slots=True)
class RankInfo:
    """Mutable record of one rank, owned by the receive loop."""

    rank: int
    local_rank: int = -1
    host: str = ""
    pid: int = 0
    incarnation: int = 0
    identities: dict[int, Route] = field(default_factory=dict)
    """Route (routing ids) to each open incarnation (a forked worker that logs is one more)."""
    last_step: int = -1
    last_seen: float = 0.0
    batches: int = 0
    scalars: int = 0
    seqs: dict[int, SeqWindow] = field(default_factory=dict)
    """Per incarnation, the batches accepted (duplicates are refused; acknowledgements carry the
    watermark)."""
    ledger_dropped: dict[str, int] = field(default_factory=dict)
    emitted: int = 0
    steps_per_second: float = math.nan
    lag_seconds: float = 0.0
    _rate_anchor: tuple[int, float] | None = None

    def window(self, incarnation: int) -> SeqWindow:
        """The batch window of one incarnation (created empty; at most 64 kept per rank)."""
        window = self.seqs.get(incarnation)
        if window is None:
            if len(self.seqs) >= 64:
                del self.seqs[next(iter(self.seqs))]
            window = self.seqs[incarnation] = SeqWindow()
        return window

    def acknowledged(self, incarnation: int) -> int:
        """The seq an ACK to this incarnation carries: every batch up to it is held."""
        window = self.seqs.get(incarnation)
        return window.watermark if window is not None else 0

    @property
    def closed(self) -> bool:
        """True when every incarnation of this rank has said goodbye."""
        return not self.identities

    def connect(self, incarnation: int, identity: Route | None) -> None:
        """Remember where an incarnation of this rank can be reached (at most 16 kept)."""
        if identity is None:
            identity = self.identities.get(incarnation, ())
        self.identities.pop(incarnation, None)
        self.identities[incarnation] = identity
        while len(self.identities) > 16:
            del self.identities[next(iter(self.identities))]

    def disconnect(self, incarnation: int) -> None:
        """An incarnation said goodbye."""
        self.identities.pop(incarnation, None)

    def observe_steps(self, steps: Sequence[int], times: Sequence[float]) -> None:
        """Update the last step and the step rate from a block's steps and their log times.

        The rate is measured over at least ``RATE_WINDOW_SECONDS`` of the rank's own clock, so
        two records logged microseconds apart (a span, then the step's metrics) never read as a
        burst of thousands of steps per second."""
        if not len(steps):
            return
        step = int(steps.max()) if hasattr(steps, "max") else max(steps)
        when = float(times[-1])
        self.last_step = max(self.last_step, step)
        anchor = self._rate_anchor
        if anchor is None or step < anchor[0]:
            self._rate_anchor = (step, when)
            return
        elapsed = when - anchor[1]
        if elapsed < RATE_WINDOW_SECONDS:
            return
        rate = (step - anchor[0]) / elapsed
        old = self.steps_per_second
        self.steps_per_second = rate if math.isnan(old) else old + _SMOOTHING * (rate - old)
        self._rate_anchor = (step, when)

    def observe_lag(self, sent_at: float, received_at: float) -> None:
        """Track how long batches take from the rank's clock to the collector's (never < 0)."""
        lag = max(0.0, received_at - sent_at)
        self.lag_seconds = max(lag, self.lag_seconds + _SMOOTHING * (lag - self.lag_seconds))

    def snapshot(self) -> RankSnapshot:
        """An immutable copy for exporters."""
        return RankSnapshot(self.rank, self.local_rank, self.host, self.pid, self.incarnation,
                            self.last_step, self.last_seen, self.batches, self.scalars,
                            MappingProxyType(dict(self.ledger_dropped)), self.closed,
                            self.lag_seconds)


class RankTable:
    """All ranks seen so far, by global rank."""

    def __init__(self) -> None:
        self.ranks: dict[int, RankInfo] = {}

    def get(self, rank: int) -> RankInfo:
        """The record of ``rank``, created on first sight."""
        info = self.ranks.get(rank)
        if info is None:
            info = self.ranks[rank] = RankInfo(rank)
        return info

    def furthest_step(self) -> int:
        """The largest step any rank has reported (-1 before any)."""
        return max((r.last_step for r in self.ranks.values()), default=-1)

    def live(self) -> list[int]:
        """Ranks that have not said goodbye."""
        return [r.rank for r in self.ranks.values() if not r.closed]

    def fastest_rate(self) -> float:
        """The highest smoothed step rate of any live rank (steps/s; NaN when unknown)."""
        rates = [r.steps_per_second for r in self.ranks.values()
                 if not r.closed and math.isfinite(r.steps_per_second)]
        return max(rates, default=math.nan)

    def worst_lag(self) -> float:
        """The largest smoothed reporting lag of any live rank, in seconds."""
        return max((r.lag_seconds for r in self.ranks.values() if not r.closed), default=0.0)
