"""The rank table: who is publishing, how far each rank got, how fast, and what it dropped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType

from collector.snapshot import RankSnapshot

#: Shortest stretch of a rank's clock over which its step rate is measured.
RATE_WINDOW_SECONDS = 0.5
#: Weight of the newest observation in the step-rate and lag moving averages.
_SMOOTHING = 0.3


@dataclass(slots=True)
class RankInfo:
    """Mutable record of one rank, owned by the receive loop."""

    rank: int
    local_rank: int = -1
    host: str = ""
    pid: int = 0
    incarnation: int = 0
    identities: dict[int, bytes] = field(default_factory=dict)
    """Routing identity of each open incarnation (a forked worker that logs is one more)."""
    last_step: int = -1
    last_seen: float = 0.0
    batches: int = 0
    scalars: int = 0
    last_seq: dict[int, int] = field(default_factory=dict)
    ledger_dropped: dict[str, int] = field(default_factory=dict)
    emitted: int = 0
    steps_per_second: float = math.nan
    lag_seconds: float = 0.0
    _rate_anchor: tuple[int, float] | None = None

    @property
    def closed(self) -> bool:
        """True when every incarnation of this rank has said goodbye."""
        return not self.identities

    def connect(self, incarnation: int, identity: bytes | None) -> None:
        """Remember where an incarnation of this rank can be reached (at most 16 kept)."""
        if identity is None:
            identity = self.identities.get(incarnation, b"")
        self.identities.pop(incarnation, None)
        self.identities[incarnation] = identity
        while len(self.identities) > 16:
            del self.identities[next(iter(self.identities))]

    def disconnect(self, incarnation: int) -> None:
        """An incarnation said goodbye."""
        self.identities.pop(incarnation, None)

    def observe_steps(self, steps: list[int], times: list[float]) -> None:
        """Update the last step and the step rate from a block's steps and their log times.

        The rate is measured over at least ``RATE_WINDOW_SECONDS`` of the rank's own clock, so
        two records logged microseconds apart (a span, then the step's metrics) never read as a
        burst of thousands of steps per second."""
        if not steps:
            return
        self.last_step = max(self.last_step, max(steps))
        step, when = max(steps), times[-1]
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
                            MappingProxyType(dict(self.ledger_dropped)), self.closed)


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
