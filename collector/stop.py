"""Stop decisions: a state machine that every rank follows.

A stop is *state*, not a message: ``{generation, stop_at_step, reason, severity, decided_at}``.
The coordinator picks ``stop_at_step`` ahead of the furthest step any rank has reported, by a margin
sized from the ranks' measured step rate and reporting lag; it re-sends the state to each live rank
until that rank acknowledges the generation; when a rank refuses (it had already passed the step),
it issues a later generation. All times come from the caller (an injected clock), so the machine is
testable without sockets or sleeps.

States and transitions::

    RUNNING ──request──▶ STOPPING(gen=1) ──refused by a rank──▶ STOPPING(gen=n+1)
                              │
                              └── further requests are recorded but change nothing
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from collector.snapshot import StopSnapshot


@dataclass(kw_only=True, slots=True)
class MarginPolicy:
    """How far ahead of the furthest reported step a stop is placed."""

    min_steps: int = 2
    """Never fewer steps than this, whatever the measured rates."""
    safety_seconds: float = 0.1
    """Extra time allowed for the stop state to reach every rank (loopback: a few ms)."""

    def steps(self, steps_per_second: float, lag_seconds: float) -> int:
        """Steps a rank may advance while the stop state is on its way, plus the minimum."""
        if not math.isfinite(steps_per_second) or steps_per_second <= 0:
            return self.min_steps
        travel = max(lag_seconds, 0.0) + self.safety_seconds
        return self.min_steps + math.ceil(steps_per_second * travel)


@dataclass(slots=True)
class StopCoordinator:
    """Holds the current stop state and who has acknowledged it."""

    resend_interval: float = 0.2
    state: StopSnapshot | None = None
    requests: list[tuple[float, str, str, str]] = field(default_factory=list)
    _acked: set[int] = field(default_factory=set)
    _last_sent: dict[int, float] = field(default_factory=dict)

    def request(self, *, reason: str, severity: str, source: str, furthest_step: int,
                margin_steps: int, now: float) -> StopSnapshot | None:
        """Record a stop request; return the new state if this request decided the stop."""
        self.requests.append((now, source, severity, reason))
        if self.state is not None:
            return None
        return self._decide(1, reason, severity, source, furthest_step + margin_steps, now)

    def refused(self, *, rank: int, generation: int, rank_step: int, furthest_step: int,
                margin_steps: int, now: float) -> StopSnapshot | None:
        """A rank had passed ``stop_at_step`` of ``generation``: issue a later generation once."""
        state = self.state
        if state is None or generation != state.generation:
            return None
        at = max(furthest_step, rank_step) + margin_steps
        return self._decide(state.generation + 1, state.reason, state.severity, state.source, at, now)

    def acknowledged(self, rank: int, generation: int) -> None:
        """A rank accepted ``generation``; stop re-sending it there."""
        if self.state is not None and generation == self.state.generation:
            self._acked.add(rank)
            self.state = _with_acks(self.state, self._acked)

    def due(self, live_ranks: list[int], now: float) -> list[int]:
        """Ranks that should be (re)sent the current state now; marks them as sent."""
        if self.state is None:
            return []
        due = [r for r in live_ranks if r not in self._acked
               and now - self._last_sent.get(r, -math.inf) >= self.resend_interval]
        for rank in due:
            self._last_sent[rank] = now
        return due

    def restore(self, state: StopSnapshot) -> None:
        """Adopt a state read back from the event log: the logged decision wins over one
        recomputed during replay for the same generation, and a later generation wins."""
        if self.state is None or state.generation >= self.state.generation:
            self.state = state
            self._acked.clear()
            self._last_sent.clear()

    def _decide(self, generation: int, reason: str, severity: str, source: str, at: int,
                now: float) -> StopSnapshot:
        self.state = StopSnapshot(generation, at, reason, severity, now, source, ())
        self._acked.clear()
        self._last_sent.clear()
        return self.state


def _with_acks(state: StopSnapshot, acked: set[int]) -> StopSnapshot:
    return StopSnapshot(state.generation, state.stop_at_step, state.reason, state.severity,
                        state.decided_at, state.source, tuple(sorted(acked)))
